//! Per-pair aggregation in event-time windows.
//!
//! Pure: the caller says what time it is. In live mode that is the wall clock and a window
//! closes at its end plus a grace period; in replay it is the watermark (the newest event
//! time seen), so weeks of traffic can go through in minutes. The set of pairs is capped:
//! a pair beyond the cap is counted under one `__overflow__` pair per direction and reporter,
//! and a bounded glimpse of it (its edge, flows, mTLS and bytes) goes with the window, so that
//! the first-seen checks see every edge even while the cap is full.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::decode::Rejection;
use crate::flow::{
    Direction, FlowRecord, Identity, Protocol, Reporter, ResponseFlags, StatusClass, UpstreamCounts, UpstreamRecord,
};
use crate::sketch::LatencySketch;

/// The identity both sides of the overflow pair carry.
pub const OVERFLOW: &str = "__overflow__";

/// Upper bounds (seconds) of the request-duration histogram buckets; `+Inf` is implied.
pub const DURATION_BUCKETS_S: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// One pair as one reporter saw it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairKey {
    pub source: Identity,
    pub destination: Identity,
    pub direction: Direction,
    pub reporter: Reporter,
}

impl PairKey {
    pub fn overflow(direction: Direction, reporter: Reporter) -> PairKey {
        let name: Identity = Arc::from(OVERFLOW);
        PairKey { source: name.clone(), destination: name, direction, reporter }
    }

    pub fn is_overflow(&self) -> bool {
        &*self.source == OVERFLOW && &*self.destination == OVERFLOW
    }

    /// The identity of the Envoy that reported the pair: the destination's for its own
    /// sidecar, the source's (the caller or the gateway's client) otherwise. The other side
    /// is the one a hostile peer can make up.
    pub fn reporting(&self) -> &Identity {
        if self.reporter == Reporter::Destination { &self.destination } else { &self.source }
    }
}

/// What the first-seen checks need of a flow record beyond the pair cap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Glimpse {
    /// Requests and connections.
    pub flows: u64,
    /// Of them, with a client certificate.
    pub mtls: u64,
    /// Bytes from source to destination.
    pub bytes_out: u64,
}

impl Glimpse {
    fn add(&mut self, r: &FlowRecord) {
        self.flows += 1;
        self.mtls += u64::from(r.mtls);
        self.bytes_out = self.bytes_out.saturating_add(r.bytes_sent);
    }
}

/// The records of one reporting identity (`PairKey::reporting`), reporter and direction
/// beyond the pair cap in one window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crowd {
    pub identity: Identity,
    pub reporter: Reporter,
    pub direction: Direction,
    /// Records beyond the cap.
    pub records: u64,
    /// Of them, records of pairs that got no glimpse: the identity's share
    /// (`GLIMPSES_PER_REPORTER`) or the window's (`MAX_GLIMPSES`) was used up.
    pub unglimpsed: u64,
}

/// Distinct pairs beyond the cap glimpsed per reporting identity and window: a flood from
/// one Envoy cannot crowd out the edges other Envoys report.
pub const GLIMPSES_PER_REPORTER: u32 = 16;
/// Distinct pairs beyond the cap glimpsed per window, in all.
pub const MAX_GLIMPSES: usize = 4_096;
/// Reporting identities with records beyond the cap kept per window; the rest are counted
/// under the overflow pair only.
pub const MAX_CROWDS: usize = 1_024;

/// What a window saw beyond the pair cap.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Unadmitted {
    /// Pairs counted under the overflow pair, sorted.
    pub glimpses: Vec<(PairKey, Glimpse)>,
    /// Per reporting identity, sorted.
    pub crowds: Vec<Crowd>,
}

/// `Unadmitted` while its window is open.
#[derive(Debug, Default)]
struct Beyond {
    glimpses: HashMap<PairKey, Glimpse>,
    crowds: HashMap<(Identity, Reporter, Direction), (u32, u64, u64)>,
}

impl Beyond {
    fn add(&mut self, key: PairKey, r: &FlowRecord) {
        let crowd_key = (key.reporting().clone(), key.reporter, key.direction);
        let at_cap = self.crowds.len() >= MAX_CROWDS;
        let crowd = match self.crowds.get_mut(&crowd_key) {
            Some(c) => c,
            None if at_cap => return,
            None => self.crowds.entry(crowd_key).or_default(),
        };
        crowd.1 += 1;
        let room = self.glimpses.len() < MAX_GLIMPSES;
        match self.glimpses.entry(key) {
            Entry::Occupied(mut g) => g.get_mut().add(r),
            Entry::Vacant(v) if crowd.0 < GLIMPSES_PER_REPORTER && room => {
                crowd.0 += 1;
                v.insert(Glimpse::default()).add(r);
            }
            Entry::Vacant(_) => crowd.2 += 1,
        }
    }

    fn close(self) -> Unadmitted {
        let mut glimpses: Vec<(PairKey, Glimpse)> = self.glimpses.into_iter().collect();
        glimpses.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut crowds: Vec<Crowd> = self
            .crowds
            .into_iter()
            .map(|((identity, reporter, direction), (_, records, unglimpsed))| Crowd {
                identity,
                reporter,
                direction,
                records,
                unglimpsed,
            })
            .collect();
        crowds.sort_unstable_by(|a, b| {
            (&a.identity, a.reporter, a.direction).cmp(&(&b.identity, b.reporter, b.direction))
        });
        Unadmitted { glimpses, crowds }
    }
}

/// What one pair did in one window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairStats {
    /// HTTP requests by `StatusClass as usize`.
    pub requests: [u64; StatusClass::COUNT],
    /// HTTP requests and TCP connections by response flag (index as `ResponseFlags::NAMES`).
    pub response_flags: [u64; 28],
    /// HTTP request durations: counts per `DURATION_BUCKETS_S` bucket, the last one `+Inf`;
    /// not cumulative. (A TCP connection's duration is how long it stayed open, not latency.)
    pub duration_buckets: [u64; DURATION_BUCKETS_S.len() + 1],
    pub duration_sum_us: u64,
    /// HTTP bytes from source to destination (headers and body).
    pub request_bytes: u64,
    /// HTTP bytes from destination to source.
    pub response_bytes: u64,
    pub tcp_connections: u64,
    pub tcp_sent_bytes: u64,
    pub tcp_received_bytes: u64,
    /// Requests and connections whose downstream presented a client certificate.
    pub mtls: u64,
    /// HTTP requests that failed: 5xx, or an upstream failure flag (`ResponseFlags::ERRORS`).
    pub errors: u64,
    /// HTTP requests denied: 401, 403, or the unauthorized flag.
    pub denied: u64,
    /// HTTP requests rate-limited: 429, or the rate-limited flag.
    pub rate_limited: u64,
    /// HTTP request durations, for quantiles with bounded relative error.
    pub latency: LatencySketch,
    /// Distinct paths answered 404 (hashes, at most `MAX_NOT_FOUND_PATHS`).
    pub not_found_paths: Vec<u64>,
    /// What the source's Envoy stats said about the upstream cluster.
    pub upstream: UpstreamStats,
}

/// Upstream stats of a pair in a window: counter increments, and the host gauges of the
/// latest flush.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamStats {
    pub counts: UpstreamCounts,
    /// (hosts, healthy hosts) at the latest flush that had them.
    pub hosts: Option<(u64, u64)>,
    /// Stats flushes that reported on the pair.
    pub flushes: u64,
}

impl UpstreamStats {
    pub fn add(&mut self, r: &UpstreamRecord) {
        self.counts.merge(&r.counts);
        if r.hosts.is_some() {
            self.hosts = r.hosts;
        }
        self.flushes += 1;
    }

    /// Folds a later window in.
    pub fn merge(&mut self, o: &UpstreamStats) {
        self.counts.merge(&o.counts);
        if o.hosts.is_some() {
            self.hosts = o.hosts;
        }
        self.flushes = self.flushes.saturating_add(o.flushes);
    }
}

/// Distinct 404 paths kept per pair and window (enough to tell a scan).
pub const MAX_NOT_FOUND_PATHS: usize = 256;

fn add_path(paths: &mut Vec<u64>, h: u64) {
    if paths.len() < MAX_NOT_FOUND_PATHS && !paths.contains(&h) {
        paths.push(h);
    }
}

impl PairStats {
    pub fn add(&mut self, r: &FlowRecord) {
        match r.protocol {
            Protocol::Http => {
                self.requests[r.status_class() as usize] += 1;
                self.request_bytes = self.request_bytes.saturating_add(r.bytes_sent);
                self.response_bytes = self.response_bytes.saturating_add(r.bytes_received);
                let flags = r.response_flags;
                self.errors += u64::from(r.response_code >= 500 || flags.0 & ResponseFlags::ERRORS != 0);
                self.denied +=
                    u64::from(matches!(r.response_code, 401 | 403) || flags.contains(ResponseFlags::UNAUTHORIZED));
                self.rate_limited += u64::from(r.response_code == 429 || flags.contains(ResponseFlags::RATE_LIMITED));
                if let Some(us) = r.duration_us {
                    self.latency.add(us);
                    let seconds = us as f64 / 1e6;
                    let bucket =
                        DURATION_BUCKETS_S.iter().position(|&le| seconds <= le).unwrap_or(DURATION_BUCKETS_S.len());
                    self.duration_buckets[bucket] += 1;
                    self.duration_sum_us = self.duration_sum_us.saturating_add(us);
                }
            }
            Protocol::Tcp => {
                self.tcp_connections += 1;
                self.tcp_sent_bytes = self.tcp_sent_bytes.saturating_add(r.bytes_sent);
                self.tcp_received_bytes = self.tcp_received_bytes.saturating_add(r.bytes_received);
            }
        }
        for (i, _) in r.response_flags.iter() {
            self.response_flags[i] += 1;
        }
        if r.mtls {
            self.mtls += 1;
        }
        if r.not_found_path != 0 {
            add_path(&mut self.not_found_paths, r.not_found_path);
        }
    }

    /// Adds another window's counts (used to fold windows into totals).
    pub fn merge(&mut self, o: &PairStats) {
        fn add<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
            for (x, y) in a.iter_mut().zip(b) {
                *x = x.saturating_add(*y);
            }
        }
        add(&mut self.requests, &o.requests);
        add(&mut self.response_flags, &o.response_flags);
        add(&mut self.duration_buckets, &o.duration_buckets);
        self.duration_sum_us = self.duration_sum_us.saturating_add(o.duration_sum_us);
        self.request_bytes = self.request_bytes.saturating_add(o.request_bytes);
        self.response_bytes = self.response_bytes.saturating_add(o.response_bytes);
        self.tcp_connections = self.tcp_connections.saturating_add(o.tcp_connections);
        self.tcp_sent_bytes = self.tcp_sent_bytes.saturating_add(o.tcp_sent_bytes);
        self.tcp_received_bytes = self.tcp_received_bytes.saturating_add(o.tcp_received_bytes);
        self.mtls = self.mtls.saturating_add(o.mtls);
        self.errors = self.errors.saturating_add(o.errors);
        self.denied = self.denied.saturating_add(o.denied);
        self.rate_limited = self.rate_limited.saturating_add(o.rate_limited);
        self.latency.merge(&o.latency);
        for &h in &o.not_found_paths {
            add_path(&mut self.not_found_paths, h);
        }
        self.upstream.merge(&o.upstream);
    }

    pub fn total_requests(&self) -> u64 {
        self.requests.iter().sum()
    }

    /// Requests plus TCP connections.
    pub fn flows(&self) -> u64 {
        self.total_requests() + self.tcp_connections
    }

    pub fn duration_count(&self) -> u64 {
        self.duration_buckets.iter().sum()
    }
}

/// A closed window: every pair that had traffic in `[start_ms, end_ms)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClosedWindow {
    pub start_ms: i64,
    pub end_ms: i64,
    pub pairs: Vec<(PairKey, PairStats)>,
    /// Pairs given up since the last window closed, to make room at the cap (`Seen`): the
    /// table, the models and the store forget them.
    pub evicted: Vec<PairKey>,
    /// Flow records beyond the pair cap (counted under the overflow pair).
    pub unadmitted: Unadmitted,
}

/// What the aggregator remembers of an admitted pair: when it last had traffic (event time)
/// and how many requests and connections it carried. At the cap, a pair with fewer than
/// `TRANSIENT_FLOWS` silent for `WindowConfig::evict_idle_ms` gives its place to a new pair:
/// a burst of made-up identities must not hold every place for good.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub last_ms: i64,
    pub flows: u64,
}

pub const TRANSIENT_FLOWS: u64 = 10;

/// Window settings, validated (all positive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowConfig {
    pub length_ms: i64,
    /// How long after its end a window waits for stragglers.
    pub grace_ms: i64,
    /// Entries more than this far ahead of the clock are rejected.
    pub max_future_ms: i64,
    /// Distinct pairs tracked, overflow pairs not included.
    pub max_pairs: usize,
    /// At the cap, a pair with under `TRANSIENT_FLOWS` silent this long can be given up.
    pub evict_idle_ms: i64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            length_ms: 10_000,
            grace_ms: 5_000,
            max_future_ms: 60_000,
            max_pairs: 10_000,
            evict_idle_ms: 600_000,
        }
    }
}

/// What `Aggregator::add` did with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    Counted,
    /// Counted under the overflow pair, because the pair cap was reached.
    Overflowed,
    /// The pair was seen for the first time and admitted.
    NewPair,
}

#[derive(Debug)]
pub struct Aggregator {
    cfg: WindowConfig,
    open: BTreeMap<i64, HashMap<PairKey, PairStats>>,
    /// Open windows' records beyond the cap.
    beyond: BTreeMap<i64, Beyond>,
    pairs: HashMap<PairKey, Seen>,
    /// Given up since the last window closed.
    evicted: Vec<PairKey>,
    /// Event time of the last search for pairs to give up (at most one a second).
    swept_ms: i64,
    /// Everything before this time is closed; entries for it are late.
    closed_until_ms: i64,
}

impl Aggregator {
    /// `known` are the pairs admitted before (restored from the store).
    pub fn new(cfg: WindowConfig, known: impl IntoIterator<Item = (PairKey, Seen)>) -> Aggregator {
        Aggregator {
            cfg,
            open: BTreeMap::new(),
            beyond: BTreeMap::new(),
            pairs: known.into_iter().collect(),
            evicted: Vec::new(),
            swept_ms: i64::MIN,
            closed_until_ms: i64::MIN,
        }
    }

    /// At the cap, gives up the pairs that carried a few flows and have been silent for
    /// `evict_idle_ms` at event time `t_ms` (searched for at most once a second of event
    /// time); returns how many.
    fn make_room(&mut self, t_ms: i64) -> usize {
        if t_ms.saturating_sub(self.swept_ms) < 1_000 {
            return 0;
        }
        self.swept_ms = t_ms;
        // Silent that long, and with nothing in a window still open.
        let before = t_ms.saturating_sub(self.cfg.evict_idle_ms).min(self.closed_until_ms);
        let evicted = &mut self.evicted;
        let n = self.pairs.len();
        self.pairs.retain(|k, s| {
            let transient = s.flows < TRANSIENT_FLOWS && s.last_ms < before;
            if transient {
                evicted.push(k.clone());
            }
            !transient
        });
        n - self.pairs.len()
    }

    pub fn config(&self) -> &WindowConfig {
        &self.cfg
    }

    pub fn pair_count(&self) -> usize {
        self.pairs.len()
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    fn window_start(&self, t_ms: i64) -> i64 {
        t_ms.div_euclid(self.cfg.length_ms) * self.cfg.length_ms
    }

    /// Adds one record at clock time `now_ms`.
    pub fn add(&mut self, r: &FlowRecord, now_ms: i64) -> Result<Added, Rejection> {
        let key = PairKey {
            source: r.source.clone(),
            destination: r.destination.clone(),
            direction: r.direction,
            reporter: r.reporter,
        };
        let (stats, added) = self.slot(key, r.end_ms, now_ms, Some(r))?;
        stats.add(r);
        Ok(added)
    }

    /// Adds one upstream stats record at clock time `now_ms`, in the pair and window its
    /// snapshot time falls in, under the same cap as flow records.
    pub fn add_upstream(&mut self, r: &UpstreamRecord, now_ms: i64) -> Result<Added, Rejection> {
        let key = PairKey {
            source: r.source.clone(),
            destination: r.destination.clone(),
            direction: r.direction,
            reporter: r.reporter,
        };
        let (stats, added) = self.slot(key, r.time_ms, now_ms, None)?;
        stats.upstream.add(r);
        Ok(added)
    }

    /// The stats of `key` in the window that holds `t_ms`: the overflow pair's when the pair
    /// is new and the cap is reached (a flow record is then glimpsed too).
    fn slot(
        &mut self,
        key: PairKey,
        t_ms: i64,
        now_ms: i64,
        flow: Option<&FlowRecord>,
    ) -> Result<(&mut PairStats, Added), Rejection> {
        if t_ms > now_ms.saturating_add(self.cfg.max_future_ms) {
            return Err(Rejection::Future);
        }
        let start = self.window_start(t_ms);
        if start < self.closed_until_ms {
            return Err(Rejection::Late);
        }
        // At the cap, a pair not admitted before takes the place of one given up, or counts
        // under the overflow pair.
        let full = |a: &Self| a.pairs.len() >= a.cfg.max_pairs && !key.is_overflow() && !a.pairs.contains_key(&key);
        if full(self) {
            self.make_room(t_ms);
        }
        let key = if full(self) {
            let overflow = PairKey::overflow(key.direction, key.reporter);
            if let Some(r) = flow {
                self.beyond.entry(start).or_default().add(key, r);
            }
            overflow
        } else {
            key
        };
        let window = self.open.entry(start).or_default();
        match window.entry(key) {
            Entry::Occupied(e) => {
                let added = if e.key().is_overflow() { Added::Overflowed } else { Added::Counted };
                Ok((e.into_mut(), added))
            }
            Entry::Vacant(v) => {
                let added = if v.key().is_overflow() {
                    Added::Overflowed
                } else if self.pairs.contains_key(v.key()) {
                    Added::Counted
                } else {
                    self.pairs.insert(v.key().clone(), Seen { last_ms: t_ms, flows: 0 });
                    Added::NewPair
                };
                Ok((v.insert(PairStats::default()), added))
            }
        }
    }

    /// Closes every window whose end plus grace has passed at `now_ms`, oldest first.
    pub fn close_due(&mut self, now_ms: i64) -> Vec<ClosedWindow> {
        let horizon = now_ms.saturating_sub(self.cfg.grace_ms);
        let mut closed = Vec::new();
        while let Some(entry) = self.open.first_entry() {
            let start = *entry.key();
            let end = start + self.cfg.length_ms;
            if end > horizon {
                break;
            }
            let pairs: Vec<(PairKey, PairStats)> = entry.remove().into_iter().collect();
            for (k, stats) in &pairs {
                if let Some(seen) = self.pairs.get_mut(k) {
                    seen.last_ms = seen.last_ms.max(start);
                    seen.flows = seen.flows.saturating_add(stats.flows());
                }
            }
            let evicted = std::mem::take(&mut self.evicted);
            let unadmitted = self.beyond.remove(&start).map(Beyond::close).unwrap_or_default();
            closed.push(ClosedWindow { start_ms: start, end_ms: end, pairs, evicted, unadmitted });
        }
        // Every window that ends at or before the horizon is closed now, open or not.
        self.closed_until_ms = self.closed_until_ms.max(self.window_start(horizon));
        let until = self.closed_until_ms;
        self.beyond.retain(|start, _| *start >= until);
        closed
    }

    /// Closes every open window (at shutdown).
    pub fn close_all(&mut self) -> Vec<ClosedWindow> {
        self.close_due(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(src: &str, dst: &str, end_ms: i64, code: u16) -> FlowRecord {
        FlowRecord {
            end_ms,
            reporter: Reporter::Source,
            source: Arc::from(src),
            destination: Arc::from(dst),
            direction: Direction::EastWest,
            protocol: Protocol::Http,
            response_code: code,
            response_flags: ResponseFlags::default(),
            duration_us: Some(20_000),
            bytes_sent: 10,
            bytes_received: 20,
            mtls: true,
            not_found_path: if code == 404 { end_ms as u64 % 7 + 1 } else { 0 },
        }
    }

    fn cfg(max_pairs: usize) -> WindowConfig {
        WindowConfig { length_ms: 10_000, grace_ms: 5_000, max_future_ms: 60_000, max_pairs, evict_idle_ms: 600_000 }
    }

    #[test]
    fn windows_close_at_end_plus_grace() {
        let mut a = Aggregator::new(cfg(10), []);
        assert_eq!(a.add(&rec("a", "b", 1_000, 200), 1_000), Ok(Added::NewPair));
        assert_eq!(a.add(&rec("a", "b", 9_999, 500), 10_000), Ok(Added::Counted));
        assert_eq!(a.add(&rec("a", "b", 10_000, 200), 10_000), Ok(Added::Counted));
        assert!(a.close_due(14_999).is_empty());
        let closed = a.close_due(15_000);
        assert_eq!(closed.len(), 1);
        assert_eq!((closed[0].start_ms, closed[0].end_ms), (0, 10_000));
        let stats = &closed[0].pairs[0].1;
        assert_eq!(stats.requests[StatusClass::Success as usize], 1);
        assert_eq!(stats.requests[StatusClass::ServerError as usize], 1);
        assert_eq!((stats.request_bytes, stats.response_bytes, stats.mtls), (20, 40, 2));
        assert_eq!(stats.duration_count(), 2);
        assert_eq!(stats.duration_buckets[4], 2, "20 ms lands in the le=0.025 bucket");
        // The second window is still open, and the first is now closed to stragglers.
        assert_eq!(a.open_windows(), 1);
        assert_eq!(a.add(&rec("a", "b", 9_000, 200), 15_000), Err(Rejection::Late));
        assert_eq!(a.add(&rec("a", "b", 12_000, 200), 15_000), Ok(Added::Counted));
    }

    #[test]
    fn far_past_and_future_are_rejected() {
        let mut a = Aggregator::new(cfg(10), []);
        let now = 1_700_000_000_000;
        a.close_due(now);
        let years_ago = now - 3 * 365 * 86_400_000;
        assert_eq!(a.add(&rec("a", "b", years_ago, 200), now), Err(Rejection::Late));
        assert_eq!(a.add(&rec("a", "b", now + 61_000, 200), now), Err(Rejection::Future));
        assert_eq!(a.add(&rec("a", "b", now + 1_000, 200), now), Ok(Added::NewPair));
    }

    #[test]
    fn pairs_beyond_the_cap_go_to_overflow() {
        let mut a = Aggregator::new(cfg(2), []);
        assert_eq!(a.add(&rec("a", "b", 1, 200), 0), Ok(Added::NewPair));
        assert_eq!(a.add(&rec("a", "c", 1, 200), 0), Ok(Added::NewPair));
        assert_eq!(a.add(&rec("a", "d", 1, 200), 0), Ok(Added::Overflowed));
        assert_eq!(a.add(&rec("a", "e", 1, 200), 0), Ok(Added::Overflowed));
        assert_eq!(a.add(&rec("a", "b", 1, 200), 0), Ok(Added::Counted));
        assert_eq!(a.pair_count(), 2);
        let closed = a.close_all();
        let overflow = closed[0].pairs.iter().find(|(k, _)| k.is_overflow()).expect("overflow pair");
        assert_eq!(overflow.1.total_requests(), 2);
    }

    #[test]
    fn records_beyond_the_cap_are_glimpsed_within_each_reporters_share() {
        let mut a = Aggregator::new(cfg(2), []);
        a.add(&rec("a", "b", 1, 200), 0).unwrap();
        a.add(&rec("a", "c", 1, 200), 0).unwrap();
        // A flood of made-up callers of `b`, reported by b's sidecar, and one new edge that
        // another sidecar reports while the cap is full.
        let flooded = |i: u32| {
            let mut r = rec(&format!("made-up-{i}"), "b", 2, 200);
            r.reporter = Reporter::Destination;
            r
        };
        for i in 0..(GLIMPSES_PER_REPORTER + 30) {
            assert_eq!(a.add(&flooded(i), 0), Ok(Added::Overflowed));
        }
        assert_eq!(a.add(&flooded(0), 0), Ok(Added::Overflowed));
        assert_eq!(a.add(&rec("a", "new", 3, 200), 0), Ok(Added::Overflowed));
        let closed = a.close_all();
        let u = &closed[0].unadmitted;
        let of = |dst: &str| u.glimpses.iter().filter(|(k, _)| &*k.destination == dst).collect::<Vec<_>>();
        assert_eq!(of("b").len(), GLIMPSES_PER_REPORTER as usize);
        assert_eq!(of("b").iter().find(|(k, _)| &*k.source == "made-up-0").map(|(_, g)| g.flows), Some(2));
        let new = of("new");
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].1, Glimpse { flows: 1, mtls: 1, bytes_out: 10 });
        let crowd = |id: &str| u.crowds.iter().find(|c| &*c.identity == id).cloned();
        let b = crowd("b").expect("b's crowd");
        assert_eq!((b.reporter, b.records, b.unglimpsed), (Reporter::Destination, 47, 30));
        let a_crowd = crowd("a").expect("a's crowd");
        assert_eq!((a_crowd.reporter, a_crowd.records, a_crowd.unglimpsed), (Reporter::Source, 1, 0));
        // Nothing of a closed window stays behind.
        assert!(a.beyond.is_empty());
    }

    #[test]
    fn at_the_cap_pairs_of_a_burst_give_their_place_once_silent() {
        // A pair in use (20 requests) and two made up for one request each fill the cap of 3.
        let mut a = Aggregator::new(cfg(3), []);
        for i in 0..20 {
            a.add(&rec("web", "api", 1_000 + i, 200), 0).unwrap();
        }
        a.add(&rec("x1", "api", 1_000, 200), 0).unwrap();
        a.add(&rec("x2", "api", 1_000, 200), 0).unwrap();
        assert_eq!(a.close_due(30_000).len(), 1);
        // Within the idle time (10 minutes) a new pair overflows; after it, it takes a place of
        // the burst's, and the pair in use keeps its own.
        let later = 5 * 60_000;
        assert_eq!(a.add(&rec("new", "api", later, 200), later), Ok(Added::Overflowed));
        let much_later = 11 * 60_000;
        assert_eq!(a.add(&rec("new", "api", much_later, 200), much_later), Ok(Added::NewPair));
        assert_eq!(a.add(&rec("web", "api", much_later, 200), much_later), Ok(Added::Counted));
        let closed = a.close_all();
        let mut evicted: Vec<&str> = closed.iter().flat_map(|w| w.evicted.iter().map(|k| &*k.source)).collect();
        evicted.sort();
        assert_eq!(evicted, ["x1", "x2"]);
        assert_eq!(a.pair_count(), 2);
    }

    #[test]
    fn known_pairs_are_admitted_after_a_restart() {
        let key = PairKey {
            source: Arc::from("a"),
            destination: Arc::from("b"),
            direction: Direction::EastWest,
            reporter: Reporter::Source,
        };
        let mut a = Aggregator::new(cfg(1), [(key, Seen { last_ms: 0, flows: 100 })]);
        assert_eq!(a.add(&rec("a", "b", 1, 200), 0), Ok(Added::Counted));
        assert_eq!(a.add(&rec("x", "y", 1, 200), 0), Ok(Added::Overflowed));
    }

    #[test]
    fn negative_times_fall_in_the_right_window() {
        let mut a = Aggregator::new(cfg(10), []);
        a.add(&rec("a", "b", -1, 200), -1).expect("counted");
        let closed = a.close_all();
        assert_eq!((closed[0].start_ms, closed[0].end_ms), (-10_000, 0));
    }
}
