//! Zero-trust findings: structural facts about who talks to whom, not statistics.
//!
//! Per closed window, every pair's views (source, destination and gateway sidecars) are folded
//! into one edge (source, destination, direction), and the edge book answers: was this edge
//! ever seen (after the learning period, a new edge, a new egress destination or a principal
//! never seen in the mesh is a finding)? Is the caller's SPIFFE ID in a trust domain of ours?
//! Did the destination's sidecar see plaintext on an edge that used mTLS? Is a source reaching
//! far more destinations than it ever did? Did a new egress destination receive a large
//! volume? Does the policy allow the edge? A finding stays active while its evidence goes on
//! and ends `hold` after the last evidence.
//!
//! Pure: the caller passes closed windows and the anomaly registry the findings go to.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use meshwatch_collector::flow::Identity;
use meshwatch_collector::flow::{Direction, Reporter};
use meshwatch_collector::identity::Pattern;
use meshwatch_collector::window::{ClosedWindow, PairKey};
use serde::{Deserialize, Serialize};

use crate::anomaly::{Anomalies, FindingRecord, bytes_text};
use crate::baseline::{Cadence, Lesson, RatioBaseline};

pub const NEW_EDGE: &str = "new_edge";
pub const NEW_EGRESS: &str = "new_egress_destination";
pub const NEW_PRINCIPAL: &str = "new_principal";
pub const FOREIGN_PRINCIPAL: &str = "foreign_principal";
pub const MTLS_DOWNGRADE: &str = "mtls_downgrade";
pub const PLAINTEXT: &str = "plaintext";
pub const FAN_OUT: &str = "fan_out";
pub const NEW_EGRESS_VOLUME: &str = "new_egress_volume";
pub const POLICY_VIOLATION: &str = "policy_violation";
pub const PATH_SCAN: &str = "path_scan";
pub const DENIAL_SURGE: &str = "denial_surge";
pub const RATE_LIMIT_SURGE: &str = "rate_limit_surge";
pub const CARDINALITY_FLOOD: &str = "cardinality_flood";

/// Every finding kind.
pub const KINDS: [&str; 13] = [
    NEW_EDGE,
    NEW_EGRESS,
    NEW_PRINCIPAL,
    FOREIGN_PRINCIPAL,
    MTLS_DOWNGRADE,
    PLAINTEXT,
    FAN_OUT,
    NEW_EGRESS_VOLUME,
    POLICY_VIOLATION,
    PATH_SCAN,
    DENIAL_SURGE,
    RATE_LIMIT_SURGE,
    CARDINALITY_FLOOD,
];

/// New edges that one Envoy (a reporting identity, `PairKey::reporting`) reports in one
/// window beyond which they are a flood of made-up identities, not edges one by one.
pub const FLOOD_NEW_EDGES: u32 = 50;

/// Whether an anomaly record's kind is a zero-trust finding.
pub fn is_finding(kind: &str) -> bool {
    KINDS.contains(&kind)
}

fn severity(kind: &str) -> &'static str {
    match kind {
        NEW_EDGE | NEW_PRINCIPAL | PLAINTEXT | RATE_LIMIT_SURGE => "warning",
        _ => "critical",
    }
}

/// One allow rule of the policy: identity globs (`*` matches any run of characters) and an
/// optional direction.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub from: Pattern,
    pub to: Pattern,
    pub direction: Option<Direction>,
}

/// The allowlist: an edge no rule allows is a violation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    pub allow: Vec<Rule>,
}

impl Policy {
    pub fn allows(&self, source: &str, destination: &str, direction: Direction) -> bool {
        self.allow.iter().any(|r| {
            r.direction.is_none_or(|d| d == direction)
                && r.from.matches(source.as_bytes())
                && r.to.matches(destination.as_bytes())
        })
    }
}

/// Zero-trust settings, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct TrustConfig {
    /// Event time after the first window before an edge never seen is a finding.
    pub learning_ms: i64,
    /// An edge unseen this long is new again.
    pub forget_after_ms: i64,
    /// A finding ends this long after its last evidence.
    pub hold_ms: i64,
    /// Any plaintext east/west traffic is a finding (not only on edges that used mTLS).
    pub require_mtls: bool,
    /// SPIFFE trust domains of the mesh; a caller's SPIFFE ID outside them is a finding.
    /// Empty: not checked.
    pub trust_domains: Vec<String>,
    /// Windows over which a source's distinct destinations are counted.
    pub fan_out_windows: i64,
    /// Least number of distinct paths answered 404 to one source within the span for a
    /// path scan (it also needs four times the source's usual number).
    pub scan_min_paths: u32,
    /// Least number of destinations a source calls for the first time within the span for a
    /// fan-out finding (it also needs at least as many as the source usually reaches: twice
    /// its usual count in all).
    pub fan_out_min_new: u32,
    /// Bytes sent to an egress destination within a day of its first appearance that make a
    /// finding.
    pub new_egress_volume_bytes: u64,
    /// Edges remembered at most; beyond, new edges are counted but not remembered.
    pub max_edges: usize,
    pub policy: Option<Policy>,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            learning_ms: 24 * 3_600_000,
            forget_after_ms: 30 * 24 * 3_600_000,
            hold_ms: 15 * 60_000,
            require_mtls: false,
            trust_domains: Vec::new(),
            fan_out_windows: 60,
            fan_out_min_new: 3,
            scan_min_paths: 20,
            new_egress_volume_bytes: 100_000_000,
            max_edges: 200_000,
            policy: None,
        }
    }
}

/// What is remembered of one edge.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeState {
    /// Event time of the first and the last window with traffic (Unix milliseconds).
    pub first_ms: i64,
    pub last_ms: i64,
    /// Requests and connections on the edge (all views summed per window, the largest view).
    pub flows: u64,
    /// Requests and connections the destination's sidecar received with and without a client
    /// certificate.
    pub mtls: u64,
    pub plaintext: u64,
    /// Bytes sent to the destination in the first day, for a new egress destination.
    pub early_bytes_out: u64,
    /// The edge appeared after the learning period (it was a finding).
    pub appeared_new: bool,
    pub volume_reported: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeKey {
    pub source: Arc<str>,
    pub destination: Arc<str>,
    pub direction: Direction,
}

/// One window's view of an edge, all reporters folded.
#[derive(Debug, Default)]
struct WindowEdge {
    flows: u64,
    errors: u64,
    /// HTTP requests, denied (401, 403, unauthorized flag) and rate-limited (429, RL flag).
    requests: u64,
    denied: u64,
    rate_limited: u64,
    not_found_paths: Vec<u64>,
    mtls: u64,
    plaintext: u64,
    bytes_out: u64,
    reporters: Vec<Reporter>,
}

/// A source's recent destinations, for fan-out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Reach {
    /// Destination → start of the last window it was reached in, and when the edge appeared
    /// if that was after the learning period.
    recent: HashMap<Arc<str>, (i64, Option<i64>)>,
    /// The most distinct destinations reached within one span, those first called within
    /// the span not counted.
    usual: u32,
    /// Paths answered 404 (hashes) → start of the last window; the most distinct within one
    /// span while not flagged.
    paths: HashMap<u64, i64>,
    usual_paths: u32,
    /// The most distinct paths within the current span-long period, and when it began.
    paths_period_max: u32,
    paths_period_start: i64,
    /// Denied and rate-limited ratios of all the source's requests.
    denied: RatioBaseline,
    limited: RatioBaseline,
    /// The last `SURGE_WINDOWS` windows (without their paths).
    recent_ratios: VecDeque<SourceWindow>,
}

/// One window of a source, across its destinations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct SourceWindow {
    requests: u64,
    denied: u64,
    rate_limited: u64,
    /// Destinations (hashes) that denied, or rate-limited, some of its requests.
    denied_by: Vec<u64>,
    limited_by: Vec<u64>,
    /// Paths answered 404 (hashes).
    not_found_paths: Vec<u64>,
    east_west: bool,
}

/// Windows over which a source's denied and rate-limited ratios are judged.
const SURGE_WINDOWS: usize = 6;
/// Distinct 404 paths remembered per source.
const MAX_PATHS_PER_SOURCE: usize = 4096;
/// Tail probability under which a source's ratio is a surge (the detector's default).
const SURGE_P: f64 = 1e-6;

/// The zero-trust state: the edge book, principals, reach of sources and open findings.
#[derive(Debug)]
pub struct Trust {
    pub cfg: TrustConfig,
    /// Start of the first window ever seen (the learning period starts there).
    since_ms: Option<i64>,
    edges: HashMap<EdgeKey, EdgeState>,
    /// SPIFFE IDs seen calling: first and last window.
    principals: HashMap<String, (i64, i64)>,
    reach: HashMap<Arc<str>, Reach>,
    /// Active findings: (source, destination, direction, kind) → last evidence (window end).
    open: HashMap<(String, String, String, String), i64>,
    /// Findings raised, by (kind, direction), since the store was created.
    raised: HashMap<(String, String), u64>,
    /// New edges not remembered because the book was full.
    pub edges_dropped: u64,
    /// The last window: its length, and each edge's flows and errors in it (not saved).
    last_window_ms: i64,
    last: HashMap<EdgeKey, (u64, u64)>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    since_ms: Option<i64>,
    edges: Vec<(String, String, u8, EdgeState)>,
    principals: Vec<(String, i64, i64)>,
    reach: Vec<(String, Reach)>,
    open: Vec<(String, String, String, String, i64)>,
    raised: Vec<(String, String, u64)>,
    edges_dropped: u64,
}

/// What one window did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrustStep {
    pub started: u32,
    pub ended: u32,
}

fn spiffe_trust_domain(id: &str) -> Option<&str> {
    id.strip_prefix("spiffe://").map(|rest| rest.split('/').next().unwrap_or(rest))
}

fn days(ms: i64) -> String {
    let ms = ms.max(0) as f64;
    if ms >= 86_400_000.0 {
        format!("{:.1} days", ms / 86_400_000.0)
    } else if ms >= 3_600_000.0 {
        format!("{:.1} h", ms / 3_600_000.0)
    } else if ms >= 60_000.0 {
        format!("{:.0} min", ms / 60_000.0)
    } else {
        format!("{:.0} s", ms / 1000.0)
    }
}

/// "N requests or connections in S s", formatted only when a reason is written.
struct FlowsText(u64, f64);

impl std::fmt::Display for FlowsText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} requests or connections in {:.0} s", self.0, self.1)
    }
}

/// The source and destination of a flood's finding: `*` for the made-up side.
fn flood_key((identity, reporter, _): &(Identity, Reporter, Direction)) -> (String, String) {
    if *reporter == Reporter::Destination {
        ("*".to_string(), identity.to_string())
    } else {
        (identity.to_string(), "*".to_string())
    }
}

/// A finding about a source across its destinations (`destination` is `*`).
fn source_finding(
    kind: &'static str,
    source: &str,
    direction: &'static str,
    observed: f64,
    expected: f64,
    reason: String,
) -> FindingRecord {
    FindingRecord {
        kind,
        source: source.to_string(),
        destination: "*".into(),
        direction,
        reporters: vec![Reporter::Source.as_str().to_string()],
        severity: severity(kind),
        observed,
        expected,
        reason,
    }
}

impl Default for Trust {
    fn default() -> Self {
        Trust::new(TrustConfig::default())
    }
}

impl Trust {
    pub fn new(cfg: TrustConfig) -> Trust {
        Trust {
            cfg,
            since_ms: None,
            edges: HashMap::new(),
            principals: HashMap::new(),
            reach: HashMap::new(),
            open: HashMap::new(),
            raised: HashMap::new(),
            edges_dropped: 0,
            last_window_ms: 0,
            last: HashMap::new(),
        }
    }

    /// Whether the learning period is over at `t_ms`.
    pub fn learned(&self, t_ms: i64) -> bool {
        self.since_ms.is_some_and(|s| t_ms >= s + self.cfg.learning_ms)
    }

    pub fn edges(&self) -> impl Iterator<Item = (&EdgeKey, &EdgeState)> {
        self.edges.iter()
    }

    pub fn edge(&self, key: &EdgeKey) -> Option<&EdgeState> {
        self.edges.get(key)
    }

    /// An edge's requests (and connections) per second and error ratio in the last window.
    pub fn last_rates(&self, key: &EdgeKey) -> (f64, Option<f64>) {
        let seconds = self.last_window_ms as f64 / 1000.0;
        match self.last.get(key) {
            Some(&(flows, errors)) if seconds > 0.0 => {
                (flows as f64 / seconds, (flows > 0).then(|| errors as f64 / flows as f64))
            }
            _ => (0.0, None),
        }
    }

    /// Findings raised so far, by (kind, direction).
    pub fn raised(&self) -> impl Iterator<Item = (&(String, String), &u64)> {
        self.raised.iter()
    }

    fn raise(&mut self, anomalies: &mut Anomalies, f: FindingRecord, end_ms: i64, step: &mut TrustStep) {
        let key = (f.source.clone(), f.destination.clone(), f.direction.to_string(), f.kind.to_string());
        self.open.insert(key, end_ms);
        let counter = (f.kind.to_string(), f.direction.to_string());
        if anomalies.raise(f, end_ms) {
            step.started += 1;
            *self.raised.entry(counter).or_default() += 1;
        }
    }

    /// Folds one closed window in and raises or ends findings in `anomalies`.
    pub fn observe(&mut self, w: &ClosedWindow, anomalies: &mut Anomalies) -> TrustStep {
        let mut step = TrustStep::default();
        let since = *self.since_ms.get_or_insert(w.start_ms);
        let learned = self.learned(w.start_ms);
        let span_s = (w.end_ms - w.start_ms) as f64 / 1000.0;

        let mut window: HashMap<EdgeKey, WindowEdge> = HashMap::new();
        let edge_key = |k: &PairKey| EdgeKey {
            source: k.source.clone(),
            destination: k.destination.clone(),
            direction: k.direction,
        };
        // Beyond the pair cap, a glimpse of each pair: enough for the first-seen checks.
        for (k, g) in &w.unadmitted.glimpses {
            let e = window.entry(edge_key(k)).or_default();
            e.flows = e.flows.max(g.flows);
            e.bytes_out = e.bytes_out.max(g.bytes_out);
            if k.reporter == Reporter::Destination {
                e.mtls += g.mtls;
                e.plaintext += g.flows.saturating_sub(g.mtls);
            }
            if !e.reporters.contains(&k.reporter) {
                e.reporters.push(k.reporter);
            }
        }
        for (k, s) in w.pairs.iter().filter(|(k, _)| !k.is_overflow()) {
            let e = window.entry(edge_key(k)).or_default();
            let flows = s.flows();
            e.flows = e.flows.max(flows);
            e.errors = e.errors.max(s.errors);
            e.requests = e.requests.max(s.total_requests());
            e.denied = e.denied.max(s.denied);
            e.rate_limited = e.rate_limited.max(s.rate_limited);
            for h in &s.not_found_paths {
                if !e.not_found_paths.contains(h) {
                    e.not_found_paths.push(*h);
                }
            }
            e.bytes_out = e.bytes_out.max(s.request_bytes + s.tcp_sent_bytes);
            if k.reporter == Reporter::Destination {
                e.mtls += s.mtls;
                e.plaintext += flows.saturating_sub(s.mtls);
            }
            if !e.reporters.contains(&k.reporter) {
                e.reporters.push(k.reporter);
            }
        }

        self.floods(w, &mut window, learned, anomalies, &mut step);

        let mut keys: Vec<&EdgeKey> = window.keys().collect();
        keys.sort();
        for key in keys {
            let we = &window[key];
            if we.flows == 0 {
                continue;
            }
            let (src, dst, dir) = (&*key.source, &*key.destination, key.direction.as_str());
            // Built only for a finding: most edges in most windows raise nothing.
            let record = |kind: &'static str, observed: f64, expected: f64, reason: String| FindingRecord {
                kind,
                source: src.to_string(),
                destination: dst.to_string(),
                direction: dir,
                reporters: we.reporters.iter().map(|r| r.as_str().to_string()).collect(),
                severity: severity(kind),
                observed,
                expected,
                reason,
            };
            let prev = self.edges.get(key).cloned();
            let is_new = self.is_new(key, w.start_ms);
            let flows_text = FlowsText(we.flows, span_s);

            let foreign = !self.cfg.trust_domains.is_empty()
                && spiffe_trust_domain(src).is_some_and(|td| !self.cfg.trust_domains.iter().any(|t| t == td));
            if foreign {
                let reason = format!(
                    "{dst} received calls from {src}, outside the trust domains ({}): {flows_text}",
                    self.cfg.trust_domains.join(", ")
                );
                self.raise(anomalies, record(FOREIGN_PRINCIPAL, we.flows as f64, 0.0, reason), w.end_ms, &mut step);
            } else if is_new && learned {
                let history = days(w.start_ms - since);
                let (kind, reason) = if key.direction == Direction::Egress {
                    let reason = format!(
                        "{src} reached {dst}, an outside destination never seen in {history}: {flows_text}, {} sent",
                        bytes_text(we.bytes_out as f64)
                    );
                    (NEW_EGRESS, reason)
                } else if src.starts_with("spiffe://") && !self.principals.contains_key(src) {
                    let reason =
                        format!("{dst} received calls from {src}, a principal never seen in {history}: {flows_text}");
                    (NEW_PRINCIPAL, reason)
                } else {
                    let reason = format!("{src} called {dst} ({dir}), never seen in {history}: {flows_text}");
                    (NEW_EDGE, reason)
                };
                self.raise(anomalies, record(kind, we.flows as f64, 0.0, reason), w.end_ms, &mut step);
            }

            if let Some(policy) = &self.cfg.policy
                && !policy.allows(src, dst, key.direction)
            {
                let reason = format!("{src} → {dst} ({dir}) is allowed by no policy rule: {flows_text}");
                self.raise(anomalies, record(POLICY_VIOLATION, we.flows as f64, 0.0, reason), w.end_ms, &mut step);
            }

            if key.direction == Direction::EastWest && we.plaintext > 0 {
                let used_mtls = prev.as_ref().filter(|_| !is_new).map_or(0, |p| p.mtls);
                if used_mtls > 0 {
                    let reason = format!(
                        "{} plaintext requests or connections from {src} to {dst} in {span_s:.0} s; the edge had used mTLS ({used_mtls} before)",
                        we.plaintext
                    );
                    let f = record(MTLS_DOWNGRADE, we.plaintext as f64, 0.0, reason);
                    self.raise(anomalies, f, w.end_ms, &mut step);
                } else if self.cfg.require_mtls {
                    let reason = format!(
                        "{} plaintext requests or connections from {src} to {dst} in {span_s:.0} s; mTLS is required east/west",
                        we.plaintext
                    );
                    self.raise(anomalies, record(PLAINTEXT, we.plaintext as f64, 0.0, reason), w.end_ms, &mut step);
                }
            }

            // Update the book.
            let full = self.edges.len() >= self.cfg.max_edges;
            if prev.is_none() && full {
                self.edges_dropped += 1;
                continue;
            }
            let e = self.edges.entry(key.clone()).or_default();
            if is_new {
                *e = EdgeState { first_ms: w.start_ms, appeared_new: learned, ..EdgeState::default() };
            }
            e.last_ms = w.start_ms;
            e.flows = e.flows.saturating_add(we.flows);
            e.mtls = e.mtls.saturating_add(we.mtls);
            e.plaintext = e.plaintext.saturating_add(we.plaintext);
            if key.direction == Direction::Egress && e.appeared_new && w.start_ms - e.first_ms < 86_400_000 {
                e.early_bytes_out = e.early_bytes_out.saturating_add(we.bytes_out);
                if !e.volume_reported && e.early_bytes_out >= self.cfg.new_egress_volume_bytes {
                    e.volume_reported = true;
                    let reason = format!(
                        "{} sent from {src} to {dst}, an outside destination first seen {} ago",
                        bytes_text(e.early_bytes_out as f64),
                        days(w.end_ms - e.first_ms)
                    );
                    let f = record(
                        NEW_EGRESS_VOLUME,
                        e.early_bytes_out as f64,
                        self.cfg.new_egress_volume_bytes as f64,
                        reason,
                    );
                    self.raise(anomalies, f, w.end_ms, &mut step);
                }
            }
            if src.starts_with("spiffe://") {
                let p = self.principals.entry(src.to_string()).or_insert((w.start_ms, w.start_ms));
                p.1 = w.start_ms;
            }
        }

        self.fan_out(w, &window, learned, anomalies, &mut step);
        self.scans_and_surges(w, &window, learned, anomalies, &mut step);
        self.last_window_ms = w.end_ms - w.start_ms;
        self.last = window.iter().map(|(k, e)| (k.clone(), (e.flows, e.errors))).collect();
        self.expire(w, anomalies, &mut step);
        step
    }

    /// Whether an edge is new at `t_ms`: never seen, or unseen for `forget_after`.
    fn is_new(&self, key: &EdgeKey, t_ms: i64) -> bool {
        self.edges.get(key).is_none_or(|p| t_ms - p.last_ms > self.cfg.forget_after_ms)
    }

    /// Floods of made-up identities: an Envoy whose pairs beyond the cap did not all fit in
    /// its share of glimpses, or that reports more than `FLOOD_NEW_EDGES` new edges in one
    /// window (after learning). Its new edges leave `window` — not judged one by one, not
    /// remembered — and one `cardinality_flood` finding per Envoy says how many and gives
    /// examples; its known edges and every other Envoy's edges are judged as always.
    fn floods(
        &mut self,
        w: &ClosedWindow,
        window: &mut HashMap<EdgeKey, WindowEdge>,
        learned: bool,
        anomalies: &mut Anomalies,
        step: &mut TrustStep,
    ) {
        type Group = (Identity, Reporter, Direction);
        let group = |k: &EdgeKey, r: Reporter| -> Group {
            let id = if r == Reporter::Destination { &k.destination } else { &k.source };
            (id.clone(), r, k.direction)
        };
        // Per Envoy: records beyond the cap without a glimpse, and its new edges.
        let mut crowded: HashMap<Group, u64> = HashMap::new();
        for c in w.unadmitted.crowds.iter().filter(|c| c.unglimpsed > 0) {
            crowded.insert((c.identity.clone(), c.reporter, c.direction), c.unglimpsed);
        }
        let flooding = self.open.keys().any(|k| k.3 == CARDINALITY_FLOOD);
        // No Envoy can have more than `FLOOD_NEW_EDGES` new edges in a window with fewer edges.
        let many = learned && window.len() > FLOOD_NEW_EDGES as usize;
        if crowded.is_empty() && !many && !flooding {
            return;
        }
        let mut new_edges: Vec<EdgeKey> =
            window.iter().filter(|(k, e)| e.flows > 0 && self.is_new(k, w.start_ms)).map(|(k, _)| k.clone()).collect();
        new_edges.sort_unstable();
        let mut new_per_group: HashMap<Group, u32> = HashMap::new();
        if learned || flooding {
            for k in &new_edges {
                for &r in &window[k].reporters {
                    *new_per_group.entry(group(k, r)).or_default() += 1;
                }
            }
        }
        // The flooded Envoys: beyond their share, too many new edges, or with a flood's finding
        // still open (a flood's first and last windows may carry a few).
        let open = |g: &Group| {
            let (src, dst) = flood_key(g);
            self.open.contains_key(&(src, dst, g.2.as_str().to_string(), CARDINALITY_FLOOD.to_string()))
        };
        let flooded: HashSet<Group> = new_per_group
            .iter()
            .filter(|(g, n)| **n > FLOOD_NEW_EDGES || open(g))
            .map(|(g, _)| g.clone())
            .chain(crowded.keys().cloned())
            .collect();
        if flooded.is_empty() {
            return;
        }
        #[derive(Default)]
        struct Flood {
            flows: u64,
            edges: u32,
            examples: Vec<Arc<str>>,
        }
        let mut floods: HashMap<Group, Flood> = HashMap::new();
        for k in new_edges {
            let groups: Vec<Group> = window[&k].reporters.iter().map(|&r| group(&k, r)).collect();
            if !groups.iter().all(|g| flooded.contains(g)) {
                continue;
            }
            let Some(e) = window.remove(&k) else { continue };
            for (g, r) in groups.into_iter().zip(&e.reporters) {
                let f = floods.entry(g).or_default();
                f.flows += e.flows;
                f.edges += 1;
                let other = if *r == Reporter::Destination { &k.source } else { &k.destination };
                if f.examples.len() < 3 {
                    f.examples.push(other.clone());
                }
            }
        }
        for (g, unglimpsed) in &crowded {
            floods.entry(g.clone()).or_default().flows += unglimpsed;
        }
        let span_s = (w.end_ms - w.start_ms) as f64 / 1000.0;
        let mut floods: Vec<(Group, Flood)> = floods.into_iter().collect();
        floods.sort_by(|a, b| a.0.cmp(&b.0));
        for ((identity, reporter, direction), f) in floods {
            let unglimpsed = crowded.get(&(identity.clone(), reporter, direction)).copied().unwrap_or(0);
            let (source, destination) = flood_key(&(identity.clone(), reporter, direction));
            let mut examples: Vec<&str> = f.examples.iter().map(|e| &**e).collect();
            examples.sort_unstable();
            let beyond = if unglimpsed > 0 {
                format!(" and {unglimpsed} more of pairs beyond the pair cap (not tracked)")
            } else {
                String::new()
            };
            let (verb, whom) =
                if reporter == Reporter::Destination { ("from", "callers") } else { ("to", "destinations") };
            let reason = format!(
                "{identity} reported {} {verb} {} {whom} never seen{beyond}, like a flood of made-up identities: {}",
                FlowsText(f.flows.saturating_sub(unglimpsed), span_s),
                f.edges,
                if examples.is_empty() { "none tracked".to_string() } else { examples.join(", ") }
            );
            let record = FindingRecord {
                kind: CARDINALITY_FLOOD,
                source,
                destination,
                direction: direction.as_str(),
                reporters: vec![reporter.as_str().to_string()],
                severity: severity(CARDINALITY_FLOOD),
                observed: f.flows as f64,
                expected: 0.0,
                reason,
            };
            self.raise(anomalies, record, w.end_ms, step);
        }
    }

    /// Counts the destinations each source reached for the first time within the span,
    /// against the number it usually reaches.
    fn fan_out(
        &mut self,
        w: &ClosedWindow,
        window: &HashMap<EdgeKey, WindowEdge>,
        learned: bool,
        anomalies: &mut Anomalies,
        step: &mut TrustStep,
    ) {
        let span_ms = self.cfg.fan_out_windows * (w.end_ms - w.start_ms);
        let mut touched: HashMap<&str, bool> = HashMap::new();
        for (k, e) in window {
            if e.flows == 0 {
                continue;
            }
            // Since when the source has called this destination, if that was after learning.
            let new_since = self.edges.get(k).map_or(Some(w.start_ms), |e| e.appeared_new.then_some(e.first_ms));
            let reach = self.reach.entry(k.source.clone()).or_default();
            reach.recent.insert(k.destination.clone(), (w.start_ms, new_since));
            *touched.entry(&k.source).or_default() |= k.direction == Direction::EastWest;
        }
        let mut sources: Vec<(&str, bool)> = touched.into_iter().collect();
        sources.sort();
        for (source, east_west) in sources {
            let Some(reach) = self.reach.get_mut(source) else { continue };
            reach.recent.retain(|_, (last, _)| w.start_ms - *last < span_ms);
            let distinct = u32::try_from(reach.recent.len()).unwrap_or(u32::MAX);
            let novel =
                reach.recent.values().filter(|(_, since)| since.is_some_and(|t| w.start_ms - t < span_ms)).count();
            let novel = u32::try_from(novel).unwrap_or(u32::MAX);
            let usual = reach.usual;
            reach.usual = usual.max(distinct - novel);
            if !learned || novel < usual.max(self.cfg.fan_out_min_new) {
                continue;
            }
            let direction = if east_west { "east_west" } else { "egress" };
            let reason = format!(
                "{source} reached {novel} destinations it had never called within {:.0} min ({distinct} in all; usually at most {usual})",
                span_ms as f64 / 60_000.0
            );
            let f = source_finding(FAN_OUT, source, direction, f64::from(distinct), f64::from(usual), reason);
            self.raise(anomalies, f, w.end_ms, step);
        }
        if w.start_ms % 3_600_000 < w.end_ms - w.start_ms {
            self.reach.retain(|_, r| {
                r.recent.retain(|_, (last, _)| w.start_ms - *last < span_ms);
                !r.recent.is_empty() || r.usual > 0 || r.denied.total > 0.5 || !r.paths.is_empty()
            });
        }
    }

    /// Per source, across its destinations: distinct paths answered 404 against its usual
    /// number (a path scan), and denied and rate-limited ratios against its baselines (a
    /// surge needs two destinations or more; one pair's surge is the detector's).
    fn scans_and_surges(
        &mut self,
        w: &ClosedWindow,
        window: &HashMap<EdgeKey, WindowEdge>,
        learned: bool,
        anomalies: &mut Anomalies,
        step: &mut TrustStep,
    ) {
        let span_ms = self.cfg.fan_out_windows * (w.end_ms - w.start_ms);
        let mut per_source: HashMap<&Arc<str>, SourceWindow> = HashMap::new();
        for (k, e) in window {
            let t = per_source.entry(&k.source).or_default();
            t.requests += e.requests;
            t.denied += e.denied;
            t.rate_limited += e.rate_limited;
            let dest = crate::alert::fnv(&[&k.destination]);
            if e.denied > 0 {
                t.denied_by.push(dest);
            }
            if e.rate_limited > 0 {
                t.limited_by.push(dest);
            }
            t.not_found_paths.extend_from_slice(&e.not_found_paths);
            t.east_west |= k.direction == Direction::EastWest;
        }
        let mut sources: Vec<_> = per_source.into_iter().collect();
        sources.sort_by(|a, b| a.0.cmp(b.0));
        let mut found = Vec::new();
        for (source, mut sw) in sources {
            let direction = if sw.east_west { "east_west" } else { "egress" };
            let reach = self.reach.entry(source.clone()).or_default();
            // Path scans.
            for h in std::mem::take(&mut sw.not_found_paths) {
                if reach.paths.len() < MAX_PATHS_PER_SOURCE || reach.paths.contains_key(&h) {
                    reach.paths.insert(h, w.start_ms);
                }
            }
            reach.paths.retain(|_, t| w.start_ms - *t < span_ms);
            let distinct = u32::try_from(reach.paths.len()).unwrap_or(u32::MAX);
            let usual = reach.usual_paths;
            if learned && distinct >= self.cfg.scan_min_paths.max(4 * usual) {
                let reason = format!(
                    "{source} was answered 404 for {distinct} distinct paths within {:.0} min, at most {usual} before",
                    span_ms as f64 / 60_000.0
                );
                found.push((PATH_SCAN, source.to_string(), direction, f64::from(distinct), f64::from(usual), reason));
            } else if !learned {
                reach.usual_paths = usual.max(distinct);
            } else {
                // After learning, the usual number grows once a span, at most to twice itself
                // plus one: a scan, fast or slow, must not teach its own size.
                reach.paths_period_max = reach.paths_period_max.max(distinct);
                if w.start_ms - reach.paths_period_start >= span_ms {
                    reach.usual_paths = usual.max(reach.paths_period_max.min(2 * usual + 1));
                    reach.paths_period_max = 0;
                    reach.paths_period_start = w.start_ms;
                }
            }
            // Denied and rate-limited ratios across destinations.
            let (requests, denied, limited) = (sw.requests, sw.denied, sw.rate_limited);
            reach.recent_ratios.push_back(sw);
            while reach.recent_ratios.len() > SURGE_WINDOWS {
                reach.recent_ratios.pop_front();
            }
            let (mut n, mut d, mut l) = (0, 0, 0);
            let (mut d_by, mut l_by) = (Vec::new(), Vec::new());
            for r in &reach.recent_ratios {
                (n, d, l) = (n + r.requests, d + r.denied, l + r.rate_limited);
                d_by.extend_from_slice(&r.denied_by);
                l_by.extend_from_slice(&r.limited_by);
            }
            for v in [&mut d_by, &mut l_by] {
                v.sort_unstable();
                v.dedup();
            }
            let checks = [
                (DENIAL_SURGE, d, d_by.len(), &mut reach.denied, denied),
                (RATE_LIMIT_SURGE, l, l_by.len(), &mut reach.limited, limited),
            ];
            for (kind, events, spread, base, this) in checks {
                // Without the windows' over-dispersion (pairs 0): a surge is judged against the
                // learnt ratio and its uncertainty only (the trust book does not store a spread).
                let hot = base.assess(events, n, 0.0, SURGE_P).is_some_and(|a| {
                    a.p_value < SURGE_P
                        && a.observed >= (2.0 * a.expected).max(a.expected + 0.01)
                        && events >= 5
                        && spread >= 2
                });
                let expected = base.expected();
                // A lasting surge becomes the normal after an hour.
                let cadence = Cadence::of(w.end_ms - w.start_ms);
                let lesson = if hot { Lesson::Detecting } else { Lesson::Normal };
                base.update(this as f64, requests as f64, lesson, cadence.hour(), cadence);
                if hot && learned {
                    let what = if kind == DENIAL_SURGE { "denied" } else { "rate-limited" };
                    let ratio = events as f64 / n.max(1) as f64;
                    let reason = format!(
                        "{:.1} % of {source}'s {n} requests {what} in {:.0} s, by {spread} destinations; {:.2} % expected",
                        ratio * 100.0,
                        SURGE_WINDOWS as f64 * (w.end_ms - w.start_ms) as f64 / 1000.0,
                        expected * 100.0
                    );
                    found.push((kind, source.to_string(), direction, ratio, expected, reason));
                }
            }
        }
        for (kind, source, direction, observed, expected, reason) in found {
            let f = source_finding(kind, &source, direction, observed, expected, reason);
            self.raise(anomalies, f, w.end_ms, step);
        }
    }

    /// Ends findings whose evidence stopped `hold` ago; forgets edges unseen for
    /// `forget_after` (checked once an hour of event time).
    fn expire(&mut self, w: &ClosedWindow, anomalies: &mut Anomalies, step: &mut TrustStep) {
        let hold = self.cfg.hold_ms;
        let mut done: Vec<(String, String, String, String)> =
            self.open.iter().filter(|(_, last)| w.end_ms - **last >= hold).map(|(k, _)| k.clone()).collect();
        done.sort();
        for k in done {
            self.open.remove(&k);
            if anomalies.end(&k.0, &k.1, &k.2, &k.3, w.end_ms) {
                step.ended += 1;
            }
        }
        if w.start_ms % 3_600_000 < w.end_ms - w.start_ms {
            let forget = self.cfg.forget_after_ms;
            self.edges.retain(|_, e| w.start_ms - e.last_ms <= forget);
            self.principals.retain(|_, p| w.start_ms - p.1 <= forget);
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let code = |d: Direction| Direction::ALL.iter().position(|x| *x == d).unwrap_or(0) as u8;
        let saved = Saved {
            since_ms: self.since_ms,
            edges: self
                .edges
                .iter()
                .map(|(k, e)| (k.source.to_string(), k.destination.to_string(), code(k.direction), e.clone()))
                .collect(),
            principals: self.principals.iter().map(|(p, (a, b))| (p.clone(), *a, *b)).collect(),
            reach: self.reach.iter().map(|(s, r)| (s.to_string(), r.clone())).collect(),
            open: self.open.iter().map(|(k, t)| (k.0.clone(), k.1.clone(), k.2.clone(), k.3.clone(), *t)).collect(),
            raised: self.raised.iter().map(|((k, d), n)| (k.clone(), d.clone(), *n)).collect(),
            edges_dropped: self.edges_dropped,
        };
        postcard::to_stdvec(&saved).unwrap_or_default()
    }

    /// State saved by `to_bytes`, under the given (current) configuration.
    pub fn from_bytes(cfg: TrustConfig, bytes: &[u8]) -> Option<Trust> {
        let saved: Saved = postcard::from_bytes(bytes).ok()?;
        let mut t = Trust::new(cfg);
        t.since_ms = saved.since_ms;
        for (s, d, dir, e) in saved.edges {
            let direction = *Direction::ALL.get(usize::from(dir))?;
            t.edges.insert(EdgeKey { source: Arc::from(s), destination: Arc::from(d), direction }, e);
        }
        t.principals = saved.principals.into_iter().map(|(p, a, b)| (p, (a, b))).collect();
        t.reach = saved.reach.into_iter().map(|(s, r)| (Arc::from(s), r)).collect();
        t.open = saved.open.into_iter().map(|(a, b, c, d, t)| ((a, b, c, d), t)).collect();
        t.raised = saved.raised.into_iter().map(|(k, d, n)| ((k, d), n)).collect();
        t.edges_dropped = saved.edges_dropped;
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwatch_collector::window::{PairKey, PairStats};

    const HOUR: i64 = 3_600_000;
    const W: i64 = 10_000;

    fn key(src: &str, dst: &str, direction: Direction, reporter: Reporter) -> PairKey {
        PairKey { source: Arc::from(src), destination: Arc::from(dst), direction, reporter }
    }

    fn stats(requests: u64, mtls: u64) -> PairStats {
        let mut s = PairStats::default();
        s.requests[2] = requests;
        s.mtls = mtls;
        s.request_bytes = requests * 1000;
        s
    }

    fn window(start_ms: i64, pairs: Vec<(PairKey, PairStats)>) -> ClosedWindow {
        ClosedWindow { start_ms, end_ms: start_ms + W, pairs, evicted: Vec::new(), ..Default::default() }
    }

    const A: &str = "spiffe://mesh.test/ns/shop/sa/a";
    const B: &str = "spiffe://mesh.test/ns/shop/sa/b";
    const C: &str = "spiffe://mesh.test/ns/shop/sa/c";

    fn steady(t: i64) -> Vec<(PairKey, PairStats)> {
        vec![
            (key(A, B, Direction::EastWest, Reporter::Source), stats(5, 0)),
            (key(A, B, Direction::EastWest, Reporter::Destination), stats(5, 5)),
            (key(A, "api.example.com", Direction::Egress, Reporter::Source), stats(u64::from(t % 3 == 0), 0)),
        ]
    }

    fn config() -> TrustConfig {
        TrustConfig { learning_ms: HOUR, trust_domains: vec!["mesh.test".into()], ..TrustConfig::default() }
    }

    /// Runs `windows` windows of steady traffic starting at 0; returns the next start.
    fn learn(t: &mut Trust, a: &mut Anomalies, windows: i64) -> i64 {
        for i in 0..windows {
            let step = t.observe(&window(i * W, steady(i)), a);
            assert_eq!(step.started, 0, "window {i}: {:?}", a.iter().collect::<Vec<_>>());
        }
        windows * W
    }

    fn kinds(a: &Anomalies) -> Vec<(String, String, String)> {
        a.iter().map(|x| (x.kind.clone(), x.source.clone(), x.destination.clone())).collect()
    }

    #[test]
    fn histories_read_in_a_unit_that_shows_them() {
        assert_eq!(days(2 * 86_400_000 + 43_200_000), "2.5 days");
        assert_eq!(days(4_000_000), "1.1 h");
        assert_eq!(days(5 * 60_000 + 10_000), "5 min");
        assert_eq!(days(4_200), "4 s");
    }

    #[test]
    fn new_edges_after_learning_are_findings_once_and_end_after_the_hold() {
        let mut t = Trust::new(config());
        let mut a = Anomalies::default();
        // During learning, a new edge is learnt silently.
        let mut pairs = steady(0);
        pairs.push((key(B, C, Direction::EastWest, Reporter::Source), stats(1, 0)));
        t.observe(&window(0, pairs), &mut a);
        let start = learn(&mut t, &mut a, 400);
        assert!(a.iter().next().is_none());

        let mut pairs = steady(0);
        pairs.push((key(A, C, Direction::EastWest, Reporter::Source), stats(2, 0)));
        pairs.push((key(A, C, Direction::EastWest, Reporter::Destination), stats(2, 2)));
        pairs.push((key(B, "paste.example.net", Direction::Egress, Reporter::Source), stats(1, 0)));
        let step = t.observe(&window(start, pairs.clone()), &mut a);
        assert_eq!(step.started, 2);
        assert_eq!(
            kinds(&a),
            vec![
                ("new_edge".into(), A.into(), C.into()),
                ("new_egress_destination".into(), B.into(), "paste.example.net".into())
            ]
        );
        let egress = a.iter().find(|x| x.kind == NEW_EGRESS).expect("egress finding");
        assert_eq!(egress.severity, "critical");
        assert!(egress.reason.contains("never seen in 1.1 h"), "{}", egress.reason);
        let edge = a.iter().find(|x| x.kind == NEW_EDGE).expect("edge finding");
        assert_eq!(edge.reporters, vec!["source", "destination"]);
        // Seen again: not new again, and the finding ends `hold` after its evidence.
        assert_eq!(t.observe(&window(start + W, pairs), &mut a).started, 0);
        let mut ended = 0;
        for i in 2..=91 {
            ended += t.observe(&window(start + i * W, steady(i)), &mut a).ended;
        }
        assert_eq!(ended, 2);
        assert!(a.iter().all(|x| x.ended_ms.is_some()));
    }

    #[test]
    fn a_principal_never_seen_and_a_foreign_trust_domain() {
        let mut t = Trust::new(config());
        let mut a = Anomalies::default();
        let start = learn(&mut t, &mut a, 400);
        let newcomer = "spiffe://mesh.test/ns/batch/sa/job";
        let foreign = "spiffe://evil.example/ns/x/sa/y";
        let mut pairs = steady(0);
        pairs.push((key(newcomer, B, Direction::EastWest, Reporter::Destination), stats(3, 3)));
        pairs.push((key(foreign, B, Direction::Ingress, Reporter::Destination), stats(1, 1)));
        t.observe(&window(start, pairs), &mut a);
        let mut got = kinds(&a);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("foreign_principal".into(), foreign.into(), B.into()),
                ("new_principal".into(), newcomer.into(), B.into())
            ]
        );
        // Foreign callers are findings during learning too.
        let mut t = Trust::new(config());
        let mut a = Anomalies::default();
        t.observe(&window(0, vec![(key(foreign, B, Direction::Ingress, Reporter::Destination), stats(1, 1))]), &mut a);
        assert_eq!(kinds(&a), vec![("foreign_principal".into(), foreign.into(), B.into())]);
    }

    #[test]
    fn a_flood_of_made_up_callers_is_one_finding_and_does_not_hide_a_new_egress_destination() {
        use meshwatch_collector::window::{Crowd, Glimpse, Unadmitted};
        let mut t = Trust::new(config());
        let mut a = Anomalies::default();
        let start = learn(&mut t, &mut a, 400);
        let made_up = |i: usize| format!("spiffe://mesh.test/ns/x/sa/made-up-{i:04}");
        // B's sidecar reports 200 callers never seen that fit under the pair cap, 16 glimpses
        // of more and 500 records beyond them; A's sidecar reports a new egress destination
        // beyond the cap.
        let mut pairs = steady(0);
        for i in 0..200 {
            pairs.push((key(&made_up(i), B, Direction::EastWest, Reporter::Destination), stats(1, 1)));
        }
        let mut glimpses: Vec<(PairKey, Glimpse)> = (200..216)
            .map(|i| {
                (
                    key(&made_up(i), B, Direction::EastWest, Reporter::Destination),
                    Glimpse { flows: 1, mtls: 1, bytes_out: 9 },
                )
            })
            .collect();
        let paste = key(A, "paste.example.net", Direction::Egress, Reporter::Source);
        glimpses.push((paste, Glimpse { flows: 2, mtls: 0, bytes_out: 5_000 }));
        let crowd = |id: &str, reporter, direction, records, unglimpsed| Crowd {
            identity: Arc::from(id),
            reporter,
            direction,
            records,
            unglimpsed,
        };
        let crowds = vec![
            crowd(A, Reporter::Source, Direction::Egress, 2, 0),
            crowd(B, Reporter::Destination, Direction::EastWest, 516, 500),
        ];
        let mut w = window(start, pairs);
        w.unadmitted = Unadmitted { glimpses, crowds };
        t.observe(&w, &mut a);
        let mut got = kinds(&a);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("cardinality_flood".into(), "*".into(), B.into()),
                ("new_egress_destination".into(), A.into(), "paste.example.net".into())
            ]
        );
        let flood = a.iter().find(|x| x.kind == CARDINALITY_FLOOD).expect("flood finding");
        assert_eq!((flood.severity.as_str(), flood.observed), ("critical", 716.0));
        assert!(
            flood.reason.starts_with(&format!(
                "{B} reported 216 requests or connections in 10 s from 216 callers never seen and 500 more of pairs beyond the pair cap (not tracked), like a flood of made-up identities: {}",
                made_up(0)
            )),
            "{}",
            flood.reason
        );
        // The made-up callers are not remembered; the new destination is.
        assert_eq!(t.edges().count(), 3);
        assert!(t.edges().any(|(k, _)| &*k.destination == "paste.example.net"));

        // Fewer new callers than a flood, and all under the cap: each one is a finding.
        let mut t = Trust::new(config());
        let mut a = Anomalies::default();
        let start = learn(&mut t, &mut a, 400);
        let mut pairs = steady(0);
        for i in 0..FLOOD_NEW_EDGES as usize {
            pairs.push((key(&made_up(i), B, Direction::EastWest, Reporter::Destination), stats(1, 1)));
        }
        assert_eq!(t.observe(&window(start, pairs), &mut a).started, FLOOD_NEW_EDGES);
        assert!(a.iter().all(|x| x.kind == NEW_PRINCIPAL));
    }

    #[test]
    fn plaintext_on_an_edge_that_used_mtls_is_a_downgrade() {
        let mut t = Trust::new(config());
        let mut a = Anomalies::default();
        let start = learn(&mut t, &mut a, 400);
        let mut pairs = steady(0);
        pairs[1].1 = stats(5, 2);
        t.observe(&window(start, pairs), &mut a);
        let d: Vec<_> = a.iter().collect();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].kind.as_str(), d[0].source.as_str(), d[0].observed), (MTLS_DOWNGRADE, A, 3.0));
        assert!(d[0].reason.starts_with("3 plaintext requests"), "{}", d[0].reason);
    }

    #[test]
    fn require_mtls_flags_any_plaintext_east_west() {
        let mut t = Trust::new(TrustConfig { require_mtls: true, ..config() });
        let mut a = Anomalies::default();
        t.observe(&window(0, vec![(key(B, C, Direction::EastWest, Reporter::Destination), stats(2, 0))]), &mut a);
        assert_eq!(kinds(&a), vec![("plaintext".into(), B.into(), C.into())]);
    }

    #[test]
    fn a_source_reaching_many_destinations_is_a_fan_out() {
        let mut t = Trust::new(TrustConfig { learning_ms: W, ..config() });
        let mut a = Anomalies::default();
        let start = learn(&mut t, &mut a, 100);
        let services: Vec<String> = (0..5).map(|i| format!("spiffe://mesh.test/ns/shop/sa/s{i}")).collect();
        let mut started = Vec::new();
        for (i, s) in services.iter().enumerate() {
            let mut pairs = steady(0);
            pairs.push((key(A, s, Direction::EastWest, Reporter::Source), stats(1, 0)));
            t.observe(&window(start + i as i64 * W, pairs), &mut a);
            started.push(a.iter().filter(|x| x.kind == FAN_OUT).count());
        }
        // A reaches B and api.example.com usually (2): three new ones make the finding.
        assert_eq!(started, vec![0, 0, 1, 1, 1]);
        let f = a.iter().find(|x| x.kind == FAN_OUT).expect("fan-out");
        assert_eq!((f.source.as_str(), f.destination.as_str(), f.observed, f.expected), (A, "*", 5.0, 2.0));
    }

    #[test]
    fn destinations_learnt_in_a_learning_period_shorter_than_the_span_are_not_a_fan_out() {
        let mut t = Trust::new(TrustConfig { learning_ms: 2 * W, ..config() });
        let mut a = Anomalies::default();
        let many: Vec<_> = (0..6)
            .map(|i| {
                (
                    key(A, &format!("spiffe://mesh.test/ns/shop/sa/s{i}"), Direction::EastWest, Reporter::Source),
                    stats(1, 0),
                )
            })
            .collect();
        for i in 0..10 {
            t.observe(&window(i * W, many.clone()), &mut a);
        }
        assert!(a.iter().next().is_none(), "{:?}", kinds(&a));
    }

    #[test]
    fn many_distinct_404_paths_are_a_path_scan() {
        let mut t = Trust::new(TrustConfig { learning_ms: W, ..config() });
        let mut a = Anomalies::default();
        let with_404 = |paths: std::ops::Range<i64>| {
            let mut pairs = steady(0);
            pairs[0].1.not_found_paths = paths.map(|p| p as u64 + 1).collect();
            pairs
        };
        // A crawler that usually gets a few 404s.
        for i in 0..100 {
            t.observe(&window(i * W, with_404(i % 3..i % 3 + 2)), &mut a);
        }
        assert!(a.iter().next().is_none());
        for i in 100..103 {
            t.observe(&window(i * W, with_404((i - 100) * 10..(i - 100) * 10 + 10)), &mut a);
        }
        let scans: Vec<_> = a.iter().filter(|x| x.kind == PATH_SCAN).collect();
        assert_eq!(scans.len(), 1, "{:?}", kinds(&a));
        assert_eq!((scans[0].source.as_str(), scans[0].destination.as_str()), (A, "*"));
        assert!(scans[0].reason.contains("404 for 2"), "{}", scans[0].reason);
    }

    #[test]
    fn denials_across_destinations_are_a_surge_of_the_source() {
        let mut t = Trust::new(TrustConfig { learning_ms: W, ..config() });
        let mut a = Anomalies::default();
        let d = "spiffe://mesh.test/ns/shop/sa/d";
        let with_denials = |denied: u64| {
            let mut pairs = steady(0);
            pairs.push((key(A, d, Direction::EastWest, Reporter::Source), stats(5, 0)));
            pairs[0].1.denied = denied;
            pairs[3].1.denied = denied;
            pairs
        };
        for i in 0..400 {
            t.observe(&window(i * W, with_denials(0)), &mut a);
        }
        assert!(a.iter().next().is_none());
        // Two of the five requests to each of two destinations denied.
        for i in 400..403 {
            t.observe(&window(i * W, with_denials(2)), &mut a);
        }
        let surges: Vec<_> = a.iter().filter(|x| x.kind == DENIAL_SURGE).collect();
        assert_eq!(surges.len(), 1, "{:?}", kinds(&a));
        assert!(surges[0].reason.contains("by 2 destinations"), "{}", surges[0].reason);
        // One destination only: the pair's anomaly, not the source's.
        let mut t = Trust::new(TrustConfig { learning_ms: W, ..config() });
        let mut a = Anomalies::default();
        for i in 0..400 {
            t.observe(&window(i * W, steady(0)), &mut a);
        }
        for i in 400..403 {
            let mut pairs = steady(0);
            pairs[0].1.denied = 4;
            t.observe(&window(i * W, pairs), &mut a);
        }
        assert!(a.iter().next().is_none(), "{:?}", kinds(&a));
    }

    #[test]
    fn a_large_volume_to_a_new_egress_destination() {
        let mut t = Trust::new(TrustConfig { new_egress_volume_bytes: 50_000, ..config() });
        let mut a = Anomalies::default();
        let start = learn(&mut t, &mut a, 400);
        for i in 0..10 {
            let mut pairs = steady(0);
            pairs.push((key(B, "drop.example.org", Direction::Egress, Reporter::Source), stats(10, 0)));
            t.observe(&window(start + i * W, pairs), &mut a);
        }
        let mut got: Vec<_> = a.iter().map(|x| x.kind.as_str()).collect();
        got.sort();
        assert_eq!(got, vec![NEW_EGRESS, NEW_EGRESS_VOLUME]);
    }

    #[test]
    fn the_policy_allows_or_flags_every_edge() {
        let policy = Policy {
            allow: vec![
                Rule { from: Pattern::new(A), to: Pattern::new("spiffe://mesh.test/*"), direction: None },
                Rule {
                    from: Pattern::new("spiffe://mesh.test/*"),
                    to: Pattern::new("*.example.com"),
                    direction: Some(Direction::Egress),
                },
            ],
        };
        assert!(policy.allows(A, B, Direction::EastWest));
        assert!(policy.allows(B, "api.example.com", Direction::Egress));
        assert!(!policy.allows(B, "api.example.com", Direction::EastWest));
        assert!(!policy.allows(B, A, Direction::EastWest));
        let mut t = Trust::new(TrustConfig { policy: Some(policy), ..config() });
        let mut a = Anomalies::default();
        learn(&mut t, &mut a, 10);
        // During learning as well.
        t.observe(&window(10 * W, vec![(key(B, A, Direction::EastWest, Reporter::Source), stats(1, 0))]), &mut a);
        assert_eq!(kinds(&a), vec![("policy_violation".into(), B.into(), A.into())]);
    }

    #[test]
    fn an_edge_unseen_past_forget_after_is_new_again_and_state_survives_a_restart() {
        let mut t = Trust::new(TrustConfig { forget_after_ms: 2 * HOUR, ..config() });
        let mut a = Anomalies::default();
        let start = learn(&mut t, &mut a, 400);
        let restored = Trust::from_bytes(t.cfg.clone(), &t.to_bytes()).expect("decodes");
        assert_eq!(restored.edges, t.edges);
        assert_eq!(restored.since_ms, t.since_ms);
        let mut t = restored;
        // Known after the restart.
        assert_eq!(t.observe(&window(start, steady(0)), &mut a).started, 0);
        // Both edges silent for three hours: new again.
        let later = start + 3 * HOUR;
        let step = t.observe(&window(later, steady(0)), &mut a);
        assert_eq!(step.started, 2, "{:?}", kinds(&a));
    }
}
