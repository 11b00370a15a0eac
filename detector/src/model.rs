//! Everything the detector keeps for one pair as one reporter sees it: a baseline per
//! signal, the last windows (to score over 1 to 30 windows, and the median latency
//! over half an hour, so that quiet pairs are judged on enough traffic), and which kinds of
//! anomaly are hot or active (k of the last n windows).
//!
//! Pure: `observe` takes one window's numbers and its event time and returns verdicts.

use std::collections::VecDeque;

use meshwatch_collector::window::PairStats;

use crate::baseline::{
    Assessment, BytesBaseline, Cadence, CountBaseline, LatencyBaseline, LearntSpread, Lesson, RatioBaseline,
    RatioSpread, WEEKDAY_MIN_EXPECTED,
};
use crate::upstream::{UpstreamModel, UpstreamObs};

/// Windows the ring keeps: the largest scale (`Cadence::scales`), and the recent windows of
/// the API.
pub(crate) const RING: usize = 30;

/// A block of `SlowMedian` (five minutes), and the completed blocks it keeps: the median
/// latency of a pair too quiet to judge over its scales is judged over the last half hour.
const BLOCK_MS: i64 = 300_000;
const BLOCKS: usize = 6;

/// Requests a latency median is learnt from (per window, or pooled over windows).
const MEDIAN_MIN_REQUESTS: f64 = 5.0;

/// Requests and the request-weighted sum of ln(p50) over some windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Pooled {
    requests: f64,
    weighted: f64,
    /// Windows with requests, and windows in all.
    with_data: u32,
    span: u32,
}

impl Pooled {
    fn add(&mut self, o: &Obs) {
        self.span += 1;
        if o.requests > 0.0 && o.latency[0].is_finite() {
            self.requests += o.requests;
            self.weighted += o.requests * o.latency[0];
            self.with_data += 1;
        }
    }

    fn merge(&mut self, other: &Pooled) {
        self.requests += other.requests;
        self.weighted += other.weighted;
        self.with_data += other.with_data;
        self.span += other.span;
    }
}

/// The median latency of a pair with few requests a window: windows pooled until they hold
/// enough requests to learn from, and half-hour blocks to judge over.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct SlowMedian {
    /// Windows too quiet to learn from alone, not learnt from yet.
    pool: Pooled,
    /// The block being filled, and the last completed ones (oldest first).
    current: Pooled,
    blocks: VecDeque<Pooled>,
}

impl SlowMedian {
    fn push(&mut self, o: &Obs, cadence: Cadence) {
        self.current.add(o);
        if self.current.span >= cadence.count(BLOCK_MS) {
            if self.blocks.len() == BLOCKS {
                self.blocks.pop_front();
            }
            self.blocks.push_back(std::mem::take(&mut self.current));
        }
    }

    /// The completed blocks and the current one, pooled.
    fn recent(&self) -> Pooled {
        let mut all = self.current;
        for b in &self.blocks {
            all.merge(b);
        }
        all
    }
}

/// Detection settings, validated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetectorConfig {
    /// Windows a pair is `learning` before it can raise anomalies (a day of 10 s windows: the
    /// daily shape must be seen once).
    pub warmup_windows: u64,
    /// One-sided p-value under which a window is hot.
    pub threshold_p: f64,
    /// A detection needs `k` hot windows among the last `n`.
    pub k: u32,
    pub n: u32,
    /// Anomalous windows in a row after which a baseline adopts the new level.
    pub adapt_after: u32,
    /// A detection ends after this many windows in a row without a hot one (at least `n`,
    /// at most 32): an incident on a quiet pair, hot only now and then, stays one anomaly.
    pub clear_after: u32,
    /// The window length, which turns the rate baselines' memories (durations) into windows.
    pub cadence: Cadence,
}

impl DetectorConfig {
    /// Whether hot flags (bit 0 the latest window) hold `k` among the last `n` windows.
    pub fn k_of_n(&self, history: u32) -> bool {
        (history & ((1u32 << self.n.min(31)) - 1)).count_ones() >= self.k
    }

    /// Windows a signal's own baseline must have learnt from before it is judged: 30 (a
    /// level and a spread to judge by), or the whole warm-up when that is shorter, so that a
    /// pair past its warm-up is judged on every signal it has data for.
    pub fn min_signal_windows(&self) -> u64 {
        self.warmup_windows.min(30)
    }
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            warmup_windows: 8_640,
            threshold_p: 1e-6,
            k: 2,
            n: 3,
            adapt_after: 360,
            clear_after: 30,
            cadence: Cadence::default(),
        }
    }
}

/// The signals of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    RequestRate,
    ConnectionRate,
    ErrorRatio,
    DenialRatio,
    RateLimitRatio,
    LatencyP50,
    LatencyP90,
    LatencyP99,
    BytesOut,
    BytesIn,
    // From the source Envoy's stats of the upstream cluster (`UpstreamModel`).
    UpstreamRequestRate,
    UpstreamErrorRatio,
    UpstreamTimeoutRatio,
    UpstreamRetryRatio,
    ConnectFailureRatio,
    PendingOverflowRatio,
    OutlierEjections,
    UnhealthyHostShare,
}

impl Signal {
    pub const ALL: [Signal; 18] = [
        Signal::RequestRate,
        Signal::ConnectionRate,
        Signal::ErrorRatio,
        Signal::DenialRatio,
        Signal::RateLimitRatio,
        Signal::LatencyP50,
        Signal::LatencyP90,
        Signal::LatencyP99,
        Signal::BytesOut,
        Signal::BytesIn,
        Signal::UpstreamRequestRate,
        Signal::UpstreamErrorRatio,
        Signal::UpstreamTimeoutRatio,
        Signal::UpstreamRetryRatio,
        Signal::ConnectFailureRatio,
        Signal::PendingOverflowRatio,
        Signal::OutlierEjections,
        Signal::UnhealthyHostShare,
    ];

    /// The signals of the access logs, and of the stats sink.
    pub const CORE: usize = 10;

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::RequestRate => "request_rate",
            Signal::ConnectionRate => "connection_rate",
            Signal::ErrorRatio => "error_ratio",
            Signal::DenialRatio => "denial_ratio",
            Signal::RateLimitRatio => "rate_limit_ratio",
            Signal::LatencyP50 => "latency_p50",
            Signal::LatencyP90 => "latency_p90",
            Signal::LatencyP99 => "latency_p99",
            Signal::BytesOut => "bytes_out",
            Signal::BytesIn => "bytes_in",
            Signal::UpstreamRequestRate => "upstream_request_rate",
            Signal::UpstreamErrorRatio => "upstream_error_ratio",
            Signal::UpstreamTimeoutRatio => "upstream_timeout_ratio",
            Signal::UpstreamRetryRatio => "upstream_retry_ratio",
            Signal::ConnectFailureRatio => "connect_failure_ratio",
            Signal::PendingOverflowRatio => "pending_overflow_ratio",
            Signal::OutlierEjections => "outlier_ejections",
            Signal::UnhealthyHostShare => "unhealthy_host_share",
        }
    }

    pub fn parse(s: &str) -> Option<Signal> {
        Signal::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// Whether the signal comes from Envoy's stats (the stats sink) rather than access logs.
    pub fn is_upstream(self) -> bool {
        self.index() >= Signal::CORE
    }

    fn quantile(self) -> Option<(usize, f64, f64)> {
        // (slot, quantile, least requests for the quantile to mean anything)
        match self {
            Signal::LatencyP50 => Some((0, 0.5, 10.0)),
            Signal::LatencyP90 => Some((1, 0.9, 20.0)),
            Signal::LatencyP99 => Some((2, 0.99, 100.0)),
            _ => None,
        }
    }
}

/// One window's numbers for one pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Obs {
    pub requests: f64,
    pub connections: f64,
    pub errors: f64,
    pub denied: f64,
    pub rate_limited: f64,
    /// ln(µs) of p50, p90, p99; NaN without requests.
    pub latency: [f64; 3],
    pub bytes_out: f64,
    pub bytes_in: f64,
}

impl Obs {
    /// A window with no traffic (a known pair that was silent).
    pub fn zero() -> Obs {
        Obs { latency: [f64::NAN; 3], ..Obs::default() }
    }

    pub fn from_stats(s: &PairStats) -> Obs {
        let q = |p: f64| s.latency.quantile(p).map_or(f64::NAN, |v| v.max(1.0).ln());
        Obs {
            requests: s.total_requests() as f64,
            connections: s.tcp_connections as f64,
            errors: s.errors as f64,
            denied: s.denied as f64,
            rate_limited: s.rate_limited as f64,
            latency: [q(0.5), q(0.9), q(0.99)],
            bytes_out: (s.request_bytes + s.tcp_sent_bytes) as f64,
            bytes_in: (s.response_bytes + s.tcp_received_bytes) as f64,
        }
    }

    fn flows(&self) -> f64 {
        self.requests + self.connections
    }

    /// The events of a ratio signal (errors, denials or rate limits).
    fn events(&self, signal: Signal) -> f64 {
        match signal {
            Signal::ErrorRatio => self.errors,
            Signal::DenialRatio => self.denied,
            _ => self.rate_limited,
        }
    }
}

/// One window in the ring: what was observed and what the count baselines expected.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Slot {
    obs: Obs,
    requests_expected: f64,
    connections_expected: f64,
}

/// How a signal stands in the current window, at the scale where it deviates most.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    pub signal: Signal,
    pub assessment: Assessment,
    /// Windows the assessment covers.
    pub scale: usize,
    /// The deviation is significant and large enough to count toward a detection.
    pub hot: bool,
    /// A rate hot over at least `n` windows and off in at least `k` of the last `n` on their
    /// own: it starts a detection at once (it already is `k` of the last `n` windows).
    pub sustained: bool,
    /// What a detection of it is called (`request_rate_high`, `vanished`, `error_ratio`, …).
    pub kind: &'static str,
}

impl Verdict {
    /// Anomaly score in [0, 1]: one minus the tail probability.
    pub fn score(&self) -> f64 {
        (1.0 - self.assessment.p_value).clamp(0.0, 1.0)
    }
}

/// What one window did to a pair's detections.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    pub verdicts: Vec<Verdict>,
    /// Signals whose detection started in this window.
    pub fired: Vec<Verdict>,
    /// Signals whose detection ended in this window.
    pub cleared: Vec<Signal>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairModel {
    requests: CountBaseline,
    connections: CountBaseline,
    errors: RatioBaseline,
    denials: RatioBaseline,
    rate_limits: RatioBaseline,
    latency: [LatencyBaseline; 3],
    bytes_out: BytesBaseline,
    bytes_in: BytesBaseline,
    ring: VecDeque<Slot>,
    pub windows: u64,
    /// Per signal: hot flags of the last windows (bit 0 is the latest) and whether a
    /// detection is active.
    history: [u32; 10],
    active: [bool; 10],
    /// For the API and metrics only: not persisted, and not read by scoring or learning.
    #[serde(skip)]
    last: [Option<Verdict>; 10],
    /// The signals of the source Envoy's stats, once a stats flush reported on the pair.
    /// Stored after the rest (see `to_bytes`).
    #[serde(skip)]
    pub upstream: Option<Box<UpstreamModel>>,
    /// The median latency over the last half hour, for quiet pairs. Stored in the trailer
    /// (see `to_bytes`).
    #[serde(skip)]
    slow: SlowMedian,
    /// The ratios' evidence over spans longer than the ring. Stored in the trailer.
    #[serde(skip)]
    long: LongRatios,
    /// Per ratio (errors, denials, rate limits): whether the latest window's long-span
    /// evidence is suspect (see `LongRatios`). Not persisted.
    #[serde(skip)]
    suspect: [bool; 3],
    /// Per latency quantile: windows in a row without a verdict while its detection is
    /// active (too few requests to tell), held for at most `adapt_after`. Not persisted.
    #[serde(skip)]
    unjudged: [u32; 3],
}

/// The ratios' long spans, in blocks of `LongRatios` besides the ring: evidence that adds up
/// over about 10, 30 and 60 minutes (at 10 s windows), for deviations too small or pairs too
/// quiet to show within the ring.
const LONG_SPANS: [usize; 3] = [1, 5, 11];

/// A long span's tail probability below which its windows do not teach the ratio's level
/// (while the ring shows the rise too), so that a slow burst is not learnt before it is judged.
const SUSPECT_P: f64 = 1e-3;

/// The windows that left the ring, in blocks of `BLOCK_MS` (the latest `LONG_SPANS`' most, and
/// the one being filled): per block `Σn`, `Σn(n − 1)`, then the events of each ratio (errors,
/// denials, rate limits). A long span is the ring, the open block and its latest blocks.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct LongRatios {
    blocks: VecDeque<[f64; 5]>,
    open: [f64; 5],
    open_windows: u32,
    /// Per ratio, windows since its last detection was active: a long span never reaches back
    /// into one (the errors of an incident that ended are not a new one).
    since_detection: [u32; 3],
}

impl Default for LongRatios {
    fn default() -> Self {
        LongRatios { blocks: VecDeque::new(), open: [0.0; 5], open_windows: 0, since_detection: [u32::MAX; 3] }
    }
}

impl LongRatios {
    /// Adds a window that left the ring.
    fn push(&mut self, o: &Obs, cadence: Cadence) {
        let n = o.requests;
        for (sum, x) in self.open.iter_mut().zip([n, n * (n - 1.0).max(0.0), o.errors, o.denied, o.rate_limited]) {
            *sum += x;
        }
        self.open_windows += 1;
        if self.open_windows >= cadence.count(BLOCK_MS).max(1) {
            self.blocks.push_back(std::mem::take(&mut self.open));
            self.open_windows = 0;
            while self.blocks.len() > LONG_SPANS[LONG_SPANS.len() - 1] {
                self.blocks.pop_front();
            }
        }
    }

    /// The open block and the latest `blocks`: (events of ratio `j`, requests, Σ n(n − 1),
    /// windows), or `None` before that many blocks are complete.
    fn evidence(&self, blocks: usize, j: usize, cadence: Cadence) -> Option<(f64, f64, f64, usize)> {
        if self.blocks.len() < blocks {
            return None;
        }
        let mut sum = self.open;
        for b in self.blocks.iter().rev().take(blocks) {
            for (s, x) in sum.iter_mut().zip(b) {
                *s += x;
            }
        }
        let windows = self.open_windows as usize + blocks * cadence.count(BLOCK_MS).max(1) as usize;
        Some((sum[2 + j], sum[0], sum[1], windows))
    }
}

/// A count baseline as `GET /api/v1/pairs/{id}` shows it, per second.
#[derive(Debug, serde::Serialize)]
pub struct CountView {
    /// What the next window is expected to hold (level × daily × weekly × short-term).
    pub expected_per_s: f64,
    /// The deseasonalised level.
    pub level_per_s: f64,
    /// Factor per hour of the day (UTC, hour 0 first) and per weekday (Monday first).
    pub daily: [f64; 24],
    pub weekly: [f64; 7],
    /// Recent windows over what level and shapes expect.
    pub short_term: f64,
    /// Variance over mean of a window's count (1 for Poisson): φ, learnt.
    pub dispersion: f64,
    /// The expectation's relative error (√κ, learnt, at least `MIN_RELATIVE_ERROR`): the
    /// variance of a count expected at λ is `φ·λ + κ·λ²`.
    pub relative_error: f64,
    /// Anomalous windows in a row so far; at `adapt_after` the new level is adopted.
    pub shifted_windows: u32,
}

/// A ratio baseline: the learnt share of requests, and how many requests (decayed) it
/// rests on.
#[derive(Debug, serde::Serialize)]
pub struct RatioView {
    pub expected: f64,
    pub requests: f64,
    /// The learnt intra-window correlation ρ (0: binomial).
    pub overdispersion: f64,
}

/// A latency quantile's baseline.
#[derive(Debug, serde::Serialize)]
pub struct LatencyView {
    pub expected_seconds: f64,
    /// Log-sd of latency within a window, and of the quantile between windows beyond
    /// sampling error.
    pub within_window_log_sd: f64,
    pub between_windows_log_sd: f64,
    pub windows: u64,
    pub shifted_windows: u32,
}

/// Bytes per request or connection.
#[derive(Debug, serde::Serialize)]
pub struct BytesView {
    pub per_flow_mean: f64,
    pub per_flow_sd: f64,
}

/// The baselines of a pair's signals from its access logs.
#[derive(Debug, serde::Serialize)]
pub struct Baselines {
    pub request_rate: CountView,
    pub connection_rate: CountView,
    pub error_ratio: RatioView,
    pub denial_ratio: RatioView,
    pub rate_limit_ratio: RatioView,
    /// `None` until the quantile has been learnt from a window.
    pub latency_p50: Option<LatencyView>,
    pub latency_p90: Option<LatencyView>,
    pub latency_p99: Option<LatencyView>,
    pub bytes_out: BytesView,
    pub bytes_in: BytesView,
}

/// One recent window of a pair, counts per window, latency in seconds (`None` without
/// requests).
#[derive(Debug, serde::Serialize)]
pub struct WindowView {
    /// 0 for the last window scored, 1 for the one before, …
    pub windows_ago: usize,
    pub requests: f64,
    pub requests_expected: f64,
    pub connections: f64,
    pub connections_expected: f64,
    pub errors: f64,
    pub denied: f64,
    pub rate_limited: f64,
    pub latency_p50_seconds: Option<f64>,
    pub latency_p90_seconds: Option<f64>,
    pub latency_p99_seconds: Option<f64>,
    pub bytes_out: f64,
    pub bytes_in: f64,
}

/// What a pair's model holds, for `GET /api/v1/pairs/{id}`.
#[derive(Debug, serde::Serialize)]
pub struct ModelDetail {
    /// Windows scored, of `warmup_windows` while learning.
    pub windows: u64,
    pub warmup_windows: u64,
    pub baselines: Baselines,
    /// The last windows scored (up to 30), the latest first.
    pub recent_windows: Vec<WindowView>,
}

/// Keeps the verdict that counts most of `best` and `v`: a hot one over one that is not, then
/// the smaller tail probability.
pub(crate) fn keep_better(best: &mut Option<Verdict>, v: Verdict) {
    let better = match best {
        None => true,
        Some(b) => (v.hot && !b.hot) || (v.hot == b.hot && v.assessment.p_value < b.assessment.p_value),
    };
    if better {
        *best = Some(v);
    }
}

/// Folds one window's verdict of a signal into its k-of-n detection: the hot flags of the
/// last windows (bit 0 the latest) and whether a detection is active.
pub(crate) fn track(
    signal: Signal,
    verdict: Option<Verdict>,
    history: &mut u32,
    active: &mut bool,
    ready: bool,
    cfg: &DetectorConfig,
    step: &mut Step,
) {
    let hot = verdict.is_some_and(|v| v.hot);
    *history = (*history << 1) | u32::from(hot);
    if let Some(v) = verdict {
        if ready && !*active && (cfg.k_of_n(*history) || (v.hot && v.sustained)) {
            *active = true;
            step.fired.push(v);
        }
        step.verdicts.push(v);
    }
    let quiet = cfg.clear_after.clamp(cfg.n, 32);
    let quiet_mask = if quiet >= 32 { u32::MAX } else { (1u32 << quiet) - 1 };
    if *active && *history & quiet_mask == 0 {
        *active = false;
        step.cleared.push(signal);
    }
}

impl Default for PairModel {
    fn default() -> Self {
        PairModel {
            requests: CountBaseline::default(),
            connections: CountBaseline::default(),
            errors: RatioBaseline::default(),
            denials: RatioBaseline::default(),
            rate_limits: RatioBaseline::default(),
            latency: Default::default(),
            bytes_out: BytesBaseline::default(),
            bytes_in: BytesBaseline::default(),
            ring: VecDeque::with_capacity(RING),
            windows: 0,
            history: [0; 10],
            active: [false; 10],
            last: [None; 10],
            upstream: None,
            slow: SlowMedian::default(),
            long: LongRatios::default(),
            suspect: [false; 3],
            unjudged: [0; 3],
        }
    }
}

/// How far a weekday whose factor is still being learnt may be from the days the level was
/// learnt on, and be that day's normal: weekends at a fifth of the weekdays, or at twice.
const UNSETTLED_WEEKDAY: (f64, f64) = (0.2, 2.0);

/// A count of requests or connections (`x`, summed over a scale, up to the window at `t_ms`)
/// against what its baseline expected: the assessment, and whether it is hot (significant,
/// and at least double or down to under a third, five apart). On a weekday whose factor is
/// still being learnt, the deviation must also be significant beyond `UNSETTLED_WEEKDAY`
/// (the assessment's p-value and band say so). `None` before the baseline has its
/// `min_signal_windows`, and for silence where less than one was expected.
pub(crate) fn rate_verdict(
    baseline: &CountBaseline,
    x: f64,
    expected: f64,
    t_ms: i64,
    cfg: &DetectorConfig,
) -> Option<(Assessment, bool)> {
    if baseline.windows < cfg.min_signal_windows() || (x == 0.0 && expected < 0.5) {
        return None;
    }
    let p = cfg.threshold_p;
    let mut a = baseline.assess(x, expected, p);
    if baseline.unsettled_at(t_ms, cfg.cadence) {
        let (down, up) = UNSETTLED_WEEKDAY;
        let (low, high) = (baseline.assess(x, down * expected, p), baseline.assess(x, up * expected, p));
        let beyond = match (a.high, x < down * expected, x > up * expected) {
            (false, true, _) => low.p_value,
            (true, _, true) => high.p_value,
            _ => 1.0,
        };
        a = Assessment { p_value: a.p_value.max(beyond), lower: low.lower, upper: high.upper, ..a };
    }
    let significant = a.p_value < p;
    let high = significant && a.high && x >= 2.0 * expected && x - expected >= 5.0;
    let low = significant && !a.high && x <= 0.3 * expected && expected - x >= 5.0;
    Some((a, high || low))
}

/// Ends the bytes of a model with a trailer (see `PairModel::to_bytes`).
const TRAILER_MAGIC: [u8; 4] = *b"MWt1";
const TRAILER_MAGIC_V2: [u8; 4] = *b"MWt2";
const TRAILER_MAGIC_V3: [u8; 4] = *b"MWt3";
const TRAILER_MAGIC_V4: [u8; 4] = *b"MWt4";
const TRAILER_MAGIC_V5: [u8; 4] = *b"MWt5";

/// Whether a ratio's assessment over `scale` windows is hot: significant, at least 3 events,
/// at least double the expected ratio and a point above it, and (over several windows) events
/// in at least `k` of them, so that one odd window does not page however long it stays in a
/// sum.
pub(crate) fn ratio_hot(
    a: &Assessment,
    events: f64,
    windows_with_events: usize,
    scale: usize,
    cfg: &DetectorConfig,
) -> bool {
    let p0 = a.expected;
    a.p_value < cfg.threshold_p
        && a.high
        && events >= 3.0
        && a.observed >= (2.0 * p0).max(p0 + 0.01)
        && (scale == 1 || windows_with_events >= cfg.k as usize)
}

/// The slot of an access-log ratio among errors, denials and rate limits.
fn ratio_slot(signal: Signal) -> Option<usize> {
    match signal {
        Signal::ErrorRatio => Some(0),
        Signal::DenialRatio => Some(1),
        Signal::RateLimitRatio => Some(2),
        _ => None,
    }
}

/// Whether a latency assessment is hot: significant, and at least ×1.4.
fn latency_hot(a: &Assessment, cfg: &DetectorConfig) -> bool {
    a.p_value < cfg.threshold_p && a.high && a.observed >= 1.4 * a.expected
}

/// Sums over the last `scale` slots.
fn window_sum(ring: &VecDeque<Slot>, scale: usize, f: impl Fn(&Slot) -> f64) -> f64 {
    ring.iter().rev().take(scale).map(f).sum()
}

impl PairModel {
    /// The model as bytes, for the store; `from_bytes` gives back a model that scores and
    /// learns exactly as this one. The upstream model follows the rest, so that bytes written
    /// before it existed still read (as a model without one); then a trailer, its length and
    /// a magic: `TRAILER_MAGIC_V5`, the half-hour median, the rate baselines' learnt spreads,
    /// the ratio baselines' learnt over-dispersion, the ratios' long spans and the rate
    /// baselines' weekday evidence. Older bytes still read: `TRAILER_MAGIC_V4` (no weekday
    /// evidence: a weekday that taught its factor counts as settled once it has for two
    /// hours), `TRAILER_MAGIC_V3` (no long spans, and the over-dispersion's moments in
    /// older units: its ρ is kept, `RatioSpread::migrated`), `TRAILER_MAGIC_V2` (no
    /// over-dispersion: ratios start binomial), `TRAILER_MAGIC` (the half-hour median alone;
    /// spreads start from the stored dispersion) and, before any trailer, bytes that end with a
    /// flag (0 or 1), never with a magic.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = postcard::to_stdvec(self).unwrap_or_default();
        if let Some(u) = &self.upstream {
            bytes.extend(postcard::to_stdvec(u.as_ref()).unwrap_or_default());
        }
        let trailer =
            postcard::to_stdvec(&(&self.slow, self.spreads(), self.ratio_spreads(), &self.long, self.weekdays()))
                .unwrap_or_default();
        bytes.extend(&trailer);
        bytes.extend((trailer.len() as u32).to_le_bytes());
        bytes.extend(TRAILER_MAGIC_V5);
        bytes
    }

    /// The learnt spreads of the rate baselines: requests, connections, then the upstream
    /// requests and ejections.
    fn spreads(&self) -> [Option<LearntSpread>; 4] {
        let up = self.upstream.as_deref();
        [
            Some(self.requests.spread.clone()),
            Some(self.connections.spread.clone()),
            up.map(|u| u.requests.spread.clone()),
            up.map(|u| u.ejections.spread.clone()),
        ]
    }

    /// The rate baselines' weekday evidence, in `spreads`' order.
    fn weekdays(&self) -> [Option<[f64; 7]>; 4] {
        let up = self.upstream.as_deref();
        [
            Some(self.requests.weekday_expected),
            Some(self.connections.weekday_expected),
            up.map(|u| u.requests.weekday_expected),
            up.map(|u| u.ejections.weekday_expected),
        ]
    }

    /// The ratio baselines: errors, denials, rate limits, then the upstream ratios.
    fn ratio_baselines(&mut self) -> [Option<&mut RatioBaseline>; 9] {
        let mut out: [Option<&mut RatioBaseline>; 9] = Default::default();
        let own = [&mut self.errors, &mut self.denials, &mut self.rate_limits];
        let up = self.upstream.as_deref_mut().map(|u| u.ratios.iter_mut());
        for (slot, b) in out.iter_mut().zip(own.into_iter().chain(up.into_iter().flatten())) {
            *slot = Some(b);
        }
        out
    }

    /// The ratio baselines' learnt over-dispersion, in `ratio_baselines`' order.
    fn ratio_spreads(&self) -> [Option<RatioSpread>; 9] {
        let mut out: [Option<RatioSpread>; 9] = Default::default();
        let own = [&self.errors, &self.denials, &self.rate_limits];
        let up = self.upstream.as_deref().map(|u| u.ratios.iter());
        for (slot, b) in out.iter_mut().zip(own.into_iter().chain(up.into_iter().flatten())) {
            *slot = Some(b.spread.clone());
        }
        out
    }

    /// A model holding only `upstream`, to test how it is stored.
    #[cfg(test)]
    pub(crate) fn with_upstream(upstream: UpstreamModel) -> PairModel {
        PairModel { upstream: Some(Box::new(upstream)), ..PairModel::default() }
    }

    fn count_baselines(&mut self) -> [Option<&mut CountBaseline>; 4] {
        let (requests, connections) = (&mut self.requests, &mut self.connections);
        let (up_requests, up_ejections) = match self.upstream.as_deref_mut() {
            Some(u) => (Some(&mut u.requests), Some(&mut u.ejections)),
            None => (None, None),
        };
        [Some(requests), Some(connections), up_requests, up_ejections]
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<PairModel> {
        fn trailer(rest: &[u8]) -> Option<(&[u8], &[u8])> {
            let (rest, len) = rest.split_at_checked(rest.len().checked_sub(4)?)?;
            let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
            rest.split_at_checked(rest.len().checked_sub(len)?)
        }
        type Spreads = [Option<LearntSpread>; 4];
        type RatioSpreads = [Option<RatioSpread>; 9];
        type Weekdays = [Option<[f64; 7]>; 4];
        let mut weekdays: Option<Weekdays> = None;
        let (bytes, slow, spreads, ratio_spreads, long) = if let Some(rest) = bytes.strip_suffix(&TRAILER_MAGIC_V5) {
            let (rest, t) = trailer(rest)?;
            let (slow, spreads, ratios, long, w): (SlowMedian, Spreads, RatioSpreads, LongRatios, Weekdays) =
                postcard::from_bytes(t).ok()?;
            weekdays = Some(w);
            (rest, slow, Some(spreads), ratios, long)
        } else if let Some(rest) = bytes.strip_suffix(&TRAILER_MAGIC_V4) {
            let (rest, t) = trailer(rest)?;
            let (slow, spreads, ratios, long): (SlowMedian, Spreads, RatioSpreads, LongRatios) =
                postcard::from_bytes(t).ok()?;
            (rest, slow, Some(spreads), ratios, long)
        } else if let Some(rest) = bytes.strip_suffix(&TRAILER_MAGIC_V3) {
            let (rest, t) = trailer(rest)?;
            let (slow, spreads, ratios): (SlowMedian, Spreads, RatioSpreads) = postcard::from_bytes(t).ok()?;
            let ratios = ratios.map(|r| r.map(|r| RatioSpread::migrated(r.rho)));
            (rest, slow, Some(spreads), ratios, LongRatios::default())
        } else if let Some(rest) = bytes.strip_suffix(&TRAILER_MAGIC_V2) {
            let (rest, t) = trailer(rest)?;
            let (slow, spreads): (SlowMedian, Spreads) = postcard::from_bytes(t).ok()?;
            (rest, slow, Some(spreads), Default::default(), LongRatios::default())
        } else if let Some(rest) = bytes.strip_suffix(&TRAILER_MAGIC) {
            let (rest, t) = trailer(rest)?;
            (rest, postcard::from_bytes(t).ok()?, None, Default::default(), LongRatios::default())
        } else {
            (bytes, SlowMedian::default(), None, Default::default(), LongRatios::default())
        };
        let (mut model, rest): (PairModel, _) = postcard::take_from_bytes(bytes).ok()?;
        if !rest.is_empty() {
            let (upstream, rest) = postcard::take_from_bytes(rest).ok()?;
            if !rest.is_empty() {
                return None;
            }
            model.upstream = Some(Box::new(upstream));
        }
        model.slow = slow;
        model.long = long;
        for (baseline, spread) in model.ratio_baselines().into_iter().zip(ratio_spreads) {
            if let (Some(b), Some(spread)) = (baseline, spread) {
                b.spread = spread;
            }
        }
        for (i, b) in model.count_baselines().into_iter().enumerate() {
            let Some(b) = b else { continue };
            b.weekday_expected = match weekdays.and_then(|w| w[i]) {
                Some(w) => w,
                None => b.weekly_n.map(|n| if n > 0 { WEEKDAY_MIN_EXPECTED } else { 0.0 }),
            };
        }
        match spreads {
            Some(spreads) => {
                for (baseline, spread) in model.count_baselines().into_iter().zip(spreads) {
                    if let (Some(b), Some(spread)) = (baseline, spread) {
                        b.spread = spread;
                    }
                }
            }
            // Stored before spreads were learnt: start from the dispersion learnt then.
            None => {
                for b in model.count_baselines().into_iter().flatten() {
                    b.spread = LearntSpread::migrated(b.dispersion);
                }
            }
        }
        Some(model)
    }

    /// The model's baselines (`next_ms`: start of the window to come) and recent windows.
    pub fn detail(&self, next_ms: i64, window_ms: i64, cfg: &DetectorConfig) -> ModelDetail {
        let per_s = 1000.0 / window_ms as f64;
        let count = |b: &CountBaseline| CountView {
            expected_per_s: b.expected(next_ms, cfg.cadence) * per_s,
            level_per_s: b.level * per_s,
            daily: b.daily,
            weekly: b.weekly,
            short_term: b.short,
            dispersion: b.spread.phi,
            relative_error: b.spread.kappa.max(b.spread.min_kappa).sqrt(),
            shifted_windows: b.shifted,
        };
        let ratio =
            |b: &RatioBaseline| RatioView { expected: b.expected(), requests: b.total, overdispersion: b.spread.rho };
        let latency = |b: &LatencyBaseline| {
            (b.windows > 0).then(|| LatencyView {
                expected_seconds: b.mean.exp() * 1e-6,
                within_window_log_sd: b.spread,
                between_windows_log_sd: b.between_var.sqrt(),
                windows: b.windows,
                shifted_windows: b.shifted,
            })
        };
        let bytes = |b: &BytesBaseline| BytesView { per_flow_mean: b.mean, per_flow_sd: b.var.sqrt() };
        let seconds = |l: f64| l.is_finite().then(|| l.exp() * 1e-6);
        ModelDetail {
            windows: self.windows,
            warmup_windows: cfg.warmup_windows,
            baselines: Baselines {
                request_rate: count(&self.requests),
                connection_rate: count(&self.connections),
                error_ratio: ratio(&self.errors),
                denial_ratio: ratio(&self.denials),
                rate_limit_ratio: ratio(&self.rate_limits),
                latency_p50: latency(&self.latency[0]),
                latency_p90: latency(&self.latency[1]),
                latency_p99: latency(&self.latency[2]),
                bytes_out: bytes(&self.bytes_out),
                bytes_in: bytes(&self.bytes_in),
            },
            recent_windows: self
                .ring
                .iter()
                .rev()
                .enumerate()
                .map(|(ago, s)| WindowView {
                    windows_ago: ago,
                    requests: s.obs.requests,
                    requests_expected: s.requests_expected,
                    connections: s.obs.connections,
                    connections_expected: s.connections_expected,
                    errors: s.obs.errors,
                    denied: s.obs.denied,
                    rate_limited: s.obs.rate_limited,
                    latency_p50_seconds: seconds(s.obs.latency[0]),
                    latency_p90_seconds: seconds(s.obs.latency[1]),
                    latency_p99_seconds: seconds(s.obs.latency[2]),
                    bytes_out: s.obs.bytes_out,
                    bytes_in: s.obs.bytes_in,
                })
                .collect(),
        }
    }

    pub fn learning(&self, cfg: &DetectorConfig) -> bool {
        self.windows < cfg.warmup_windows
    }

    /// The last verdict of every signal that had one.
    pub fn last_verdicts(&self) -> impl Iterator<Item = &Verdict> {
        self.last.iter().flatten().chain(self.upstream.iter().flat_map(|u| u.last_verdicts()))
    }

    /// Marks the detection of `s` active (see `Detector::restore`): it ends as any does.
    pub fn resume(&mut self, s: Signal) {
        if s.is_upstream() {
            if let Some(u) = self.upstream.as_deref_mut() {
                u.resume(s);
            }
        } else {
            self.active[s.index()] = true;
        }
    }

    pub fn is_active(&self, s: Signal) -> bool {
        if s.is_upstream() {
            return self.upstream.as_ref().is_some_and(|u| u.is_active(s));
        }
        self.active[s.index()]
    }

    /// Scores a window's upstream stats (a window with a stats flush), learns from them, and
    /// returns what changed. Call after `observe` of the same window.
    pub fn observe_upstream(&mut self, obs: &UpstreamObs, t_ms: i64, cfg: &DetectorConfig) -> Step {
        let logged_requests = self.requests.level > 0.0;
        let logged_errors = self.active[Signal::ErrorRatio.index()];
        self.upstream.get_or_insert_default().observe(obs, t_ms, logged_requests, logged_errors, cfg)
    }

    /// Expected requests (or connections) in a window at `t_ms`.
    pub fn expected_flows(&self, t_ms: i64, cadence: Cadence) -> f64 {
        self.requests.expected(t_ms, cadence) + self.connections.expected(t_ms, cadence)
    }

    /// Scores one window (`t_ms`: its start), learns from it, and returns what changed.
    pub fn observe(&mut self, obs: &Obs, t_ms: i64, cfg: &DetectorConfig) -> Step {
        let slot = Slot {
            obs: *obs,
            requests_expected: self.requests.expected(t_ms, cfg.cadence),
            connections_expected: self.connections.expected(t_ms, cfg.cadence),
        };
        if self.ring.len() == RING
            && let Some(left) = self.ring.pop_front()
        {
            self.long.push(&left.obs, cfg.cadence);
        }
        self.ring.push_back(slot);
        self.slow.push(obs, cfg.cadence);
        let ready = !self.learning(cfg);
        if self.windows == cfg.warmup_windows {
            // What was hot while learning does not count toward the first detections.
            self.history = [0; 10];
        }
        let mut step = Step::default();
        for signal in &Signal::ALL[..Signal::CORE] {
            let verdict = self.assess(*signal, t_ms, cfg);
            let i = signal.index();
            // A latency detection whose pair has too few requests to judge it goes on as it
            // is, for up to `adapt_after` windows: no evidence is not evidence that it ended.
            if let Some((q, _, _)) = signal.quantile() {
                let held = &mut self.unjudged[q];
                *held = if verdict.is_none() && self.active[i] { held.saturating_add(1) } else { 0 };
                if *held > 0 && *held <= cfg.adapt_after {
                    self.last[i] = None;
                    continue;
                }
            }
            track(*signal, verdict, &mut self.history[i], &mut self.active[i], ready, cfg, &mut step);
            if let Some(j) = ratio_slot(*signal) {
                let since = &mut self.long.since_detection[j];
                *since = if self.active[i] { 0 } else { since.saturating_add(1) };
            }
            self.last[i] = verdict;
        }
        self.learn(obs, t_ms, cfg);
        self.windows += 1;
        step
    }

    /// Whether the latest window of `signal` counted as anomalous (it must not teach).
    fn hot_now(&self, s: Signal) -> bool {
        self.history[s.index()] & 1 == 1
    }

    fn learn(&mut self, obs: &Obs, t_ms: i64, cfg: &DetectorConfig) {
        // While learning, every window teaches (robust clipping still applies): what the
        // first day looks like is the normal to learn, however far from the priors.
        let ready = !self.learning(cfg);
        let hot = |s: Signal| ready && self.hot_now(s);
        // A ratio's hot window teaches later if it started no detection (see `Lesson`).
        let suspect = |s: Signal| ready && ratio_slot(s).is_some_and(|j| self.suspect[j]);
        let lesson = |s: Signal| match (ready && self.active[s.index()], hot(s), suspect(s)) {
            (true, _, _) => Lesson::Detecting,
            (false, true, _) => Lesson::Hot { n: cfg.n },
            (false, false, true) => Lesson::Suspect,
            (false, false, false) => Lesson::Normal,
        };
        let (h_req, h_conn, h_err, h_den, h_rl) = (
            hot(Signal::RequestRate),
            hot(Signal::ConnectionRate),
            lesson(Signal::ErrorRatio),
            lesson(Signal::DenialRatio),
            lesson(Signal::RateLimitRatio),
        );
        let h_lat = [hot(Signal::LatencyP50), hot(Signal::LatencyP90), hot(Signal::LatencyP99)];
        let (h_out, h_in) = (hot(Signal::BytesOut), hot(Signal::BytesIn));
        let changed = self.requests.update(obs.requests, t_ms, h_req, cfg.adapt_after, cfg.cadence);
        if self.connections.update(obs.connections, t_ms, h_conn, cfg.adapt_after, cfg.cadence) | changed {
            // The first day has just set the level and daily shape, or a weekday's factor has
            // settled: the windows in the ring are judged against what the baselines now say.
            let ring = &mut self.ring;
            self.requests.reexpect(ring.iter_mut().rev().map(|s| &mut s.requests_expected), t_ms, cfg.cadence);
            self.connections.reexpect(ring.iter_mut().rev().map(|s| &mut s.connections_expected), t_ms, cfg.cadence);
        }
        self.errors.update(obs.errors, obs.requests, h_err, cfg.adapt_after, cfg.cadence);
        self.denials.update(obs.denied, obs.requests, h_den, cfg.adapt_after, cfg.cadence);
        self.rate_limits.update(obs.rate_limited, obs.requests, h_rl, cfg.adapt_after, cfg.cadence);
        // p90 − p50 of n requests is short of the pair's by about 2/n of it.
        let spread = (obs.requests >= 10.0 && obs.latency[0].is_finite() && obs.latency[1].is_finite())
            .then(|| (obs.latency[1] - obs.latency[0]) / 1.2816 * obs.requests / (obs.requests - 2.0));
        // While a latency detection is active, every window counts toward adopting its level
        // (`adapt_after`), not only the hot ones: a lasting shift whose windows are hot only
        // now and then is adopted once, instead of ending and firing again for hours.
        let lat_active = [Signal::LatencyP50, Signal::LatencyP90, Signal::LatencyP99]
            .iter()
            .any(|s| ready && self.active[s.index()]);
        let any_lat = lat_active || h_lat.iter().any(|h| *h);
        for (k, q) in [0.5, 0.9, 0.99].into_iter().enumerate() {
            let min_n = [MEDIAN_MIN_REQUESTS, 10.0, 50.0][k];
            if obs.latency[k].is_finite() && obs.requests >= min_n {
                self.latency[k].update(
                    q,
                    obs.latency[k],
                    obs.requests,
                    spread,
                    any_lat,
                    1,
                    cfg.adapt_after,
                    cfg.cadence,
                );
            }
        }
        // The median of a pair with fewer requests a window: learnt from windows pooled until
        // they hold enough (the quantiles of a few requests are not the pair's p90 or p99).
        if obs.requests < MEDIAN_MIN_REQUESTS {
            let pool = &mut self.slow.pool;
            pool.add(obs);
            if pool.requests >= MEDIAN_MIN_REQUESTS {
                let p = std::mem::take(pool);
                self.latency[0].update(
                    0.5,
                    p.weighted / p.requests,
                    p.requests,
                    None,
                    any_lat,
                    p.span,
                    cfg.adapt_after,
                    cfg.cadence,
                );
            }
        }
        self.bytes_out.update(obs.bytes_out, obs.flows(), h_out, cfg.cadence);
        self.bytes_in.update(obs.bytes_in, obs.flows(), h_in, cfg.cadence);
    }

    /// The verdict of `signal` at the scale where it is most significant.
    fn assess(&mut self, signal: Signal, t_ms: i64, cfg: &DetectorConfig) -> Option<Verdict> {
        let mut best: Option<Verdict> = None;
        for scale in cfg.cadence.scales(RING) {
            if scale > self.ring.len() {
                break;
            }
            let Some(mut v) = self.assess_at(signal, scale, t_ms, cfg) else { continue };
            // Over several windows, a deviation starts a detection only while the latest
            // window shares it: one odd window must not stay hot for as long as it is in a
            // sum. Once a detection is active, the sum alone keeps it (a quiet pair's single
            // windows are too noisy to end it).
            if scale > 1
                && v.hot
                && !self.active[signal.index()]
                && self.latest_above(signal, &v.assessment).is_some_and(|up| up != v.assessment.high)
            {
                v.hot = false;
            }
            v.sustained = v.hot && scale >= cfg.n as usize && self.seen_alone(&v, cfg);
            keep_better(&mut best, v);
        }
        if let Some(j) = ratio_slot(signal) {
            let (long, suspect) = self.assess_long(signal, j, cfg);
            self.suspect[j] = suspect;
            if let Some(v) = long {
                keep_better(&mut best, v);
            }
        }
        // A quiet pair's median over half an hour, where its recent windows hold too few
        // requests to tell (none, or not enough to be significant): otherwise a lasting shift
        // would be judged in turns by the one and the other, and end and fire again.
        if signal == Signal::LatencyP50
            && !best.is_some_and(|b| b.hot)
            && let Some(v) = self.assess_slow_median(cfg)
        {
            keep_better(&mut best, v);
        }
        best
    }

    /// Ratio `signal` (slot `j`) over the ring and the latest blocks of `LongRatios`, at each
    /// of `LONG_SPANS`: the verdict that counts most, and whether any span's tail probability
    /// is under `SUSPECT_P`. Only a rise that the ring still shows (at least double the
    /// expected ratio, in two of its windows) counts, so that a burst that has ended, or one
    /// cluster, does not stay significant for as long as it is in the span.
    fn assess_long(&self, signal: Signal, j: usize, cfg: &DetectorConfig) -> (Option<Verdict>, bool) {
        if self.ring.len() < RING {
            return (None, false);
        }
        let baseline = [&self.errors, &self.denials, &self.rate_limits][j];
        let p0 = baseline.expected();
        let (mut ring_events, mut ring_total, mut ring_pairs, mut with_events) = (0.0, 0.0, 0.0, 0);
        for s in &self.ring {
            let (e, n) = (s.obs.events(signal), s.obs.requests);
            ring_events += e;
            ring_total += n;
            ring_pairs += n * (n - 1.0).max(0.0);
            with_events += usize::from(e > 0.0);
        }
        if with_events < cfg.k as usize || ring_events < 2.0 * p0 * ring_total {
            return (None, false);
        }
        let (mut best, mut suspect) = (None, false);
        for blocks in LONG_SPANS {
            let Some((events, total, pairs, windows)) = self.long.evidence(blocks, j, cfg.cadence) else { break };
            let scale = self.ring.len() + windows;
            if scale as u64 > u64::from(self.long.since_detection[j]) {
                break;
            }
            let (events, total, pairs) = (events + ring_events, total + ring_total, pairs + ring_pairs);
            if events <= p0 * total {
                continue;
            }
            let Some(a) = baseline.assess(events as u64, total as u64, pairs, cfg.threshold_p) else { continue };
            suspect |= a.p_value < SUSPECT_P;
            let hot = ratio_hot(&a, events, with_events, 1, cfg);
            keep_better(
                &mut best,
                Verdict { signal, assessment: a, scale, hot, sustained: false, kind: signal.as_str() },
            );
        }
        (best, suspect)
    }

    /// The median over the last half hour, for a pair that did not have enough requests to
    /// judge it over 30 windows.
    fn assess_slow_median(&self, cfg: &DetectorConfig) -> Option<Verdict> {
        let (_, q, min_n) = Signal::LatencyP50.quantile()?;
        let baseline = &self.latency[0];
        let pooled = self.slow.recent();
        if baseline.windows < cfg.min_signal_windows() || pooled.requests < min_n {
            return None;
        }
        let a = baseline.assess(
            q,
            pooled.weighted / pooled.requests,
            pooled.requests,
            pooled.with_data.into(),
            cfg.threshold_p,
        );
        // Half an hour reaches back past the end of an incident: the requests of the last 30
        // windows must still show it.
        let mut last = Pooled::default();
        for s in &self.ring {
            last.add(&s.obs);
        }
        // With fewer requests than a median needs they cannot tell: an active detection goes
        // on (a quiet pair at night must not end and fire again between its requests).
        let still = if last.requests >= MEDIAN_MIN_REQUESTS || !self.active[Signal::LatencyP50.index()] {
            last.requests > 0.0 && (last.weighted / last.requests).exp() >= 1.4 * a.expected
        } else {
            true
        };
        let hot = latency_hot(&a, cfg) && still;
        let scale = pooled.span as usize;
        Some(Verdict { signal: Signal::LatencyP50, assessment: a, scale, hot, sustained: false, kind: "latency_p50" })
    }

    /// Whether a rate deviating over several windows does so in at least `k` of the last `n`
    /// windows on their own. Not for latency (half the windows of a pair are above its median
    /// by chance: only `k` hot windows tell) nor ratios (a quiet pair's windows mostly hold no
    /// event).
    fn seen_alone(&self, v: &Verdict, cfg: &DetectorConfig) -> bool {
        let high = v.assessment.high;
        let last_n = || self.ring.iter().rev().take(cfg.n as usize);
        let deviating = match v.signal {
            Signal::RequestRate => last_n().filter(|s| (s.obs.requests > s.requests_expected) == high).count(),
            Signal::ConnectionRate => last_n().filter(|s| (s.obs.connections > s.connections_expected) == high).count(),
            _ => 0,
        };
        deviating >= cfg.k as usize
    }

    /// Whether the latest window alone is above what was expected of it, for the signals
    /// whose single windows say so (rates and latency); `None` when it cannot tell (no
    /// requests, or a ratio whose windows mostly hold no event at all).
    fn latest_above(&self, signal: Signal, a: &Assessment) -> Option<bool> {
        let last = self.ring.back()?;
        match signal {
            Signal::RequestRate => Some(last.obs.requests > last.requests_expected),
            Signal::ConnectionRate => Some(last.obs.connections > last.connections_expected),
            Signal::LatencyP50 | Signal::LatencyP90 | Signal::LatencyP99 => {
                let (slot, _, _) = signal.quantile()?;
                let l = last.obs.latency[slot];
                l.is_finite().then(|| l.exp() > a.expected)
            }
            _ => None,
        }
    }

    fn assess_at(&self, signal: Signal, scale: usize, t_ms: i64, cfg: &DetectorConfig) -> Option<Verdict> {
        let p = cfg.threshold_p;
        let sum = |f: fn(&Slot) -> f64| window_sum(&self.ring, scale, f);
        let verdict = |assessment: Assessment, hot: bool, kind: &'static str| Verdict {
            signal,
            assessment,
            scale,
            hot,
            sustained: false,
            kind,
        };
        match signal {
            Signal::RequestRate | Signal::ConnectionRate => {
                let (baseline, x, expected) = if signal == Signal::RequestRate {
                    (&self.requests, sum(|s| s.obs.requests), sum(|s| s.requests_expected))
                } else {
                    (&self.connections, sum(|s| s.obs.connections), sum(|s| s.connections_expected))
                };
                let (a, hot) = rate_verdict(baseline, x, expected, t_ms, cfg)?;
                let rate = if signal == Signal::RequestRate { "request_rate" } else { "connection_rate" };
                let kind = match (a.high, x == 0.0) {
                    (true, _) => {
                        if rate == "request_rate" {
                            "request_rate_high"
                        } else {
                            "connection_rate_high"
                        }
                    }
                    (false, true) => "vanished",
                    (false, false) => {
                        if rate == "request_rate" {
                            "request_rate_low"
                        } else {
                            "connection_rate_low"
                        }
                    }
                };
                Some(verdict(a, hot, kind))
            }
            Signal::ErrorRatio | Signal::DenialRatio | Signal::RateLimitRatio => {
                let baseline = match signal {
                    Signal::ErrorRatio => &self.errors,
                    Signal::DenialRatio => &self.denials,
                    _ => &self.rate_limits,
                };
                let recent = || self.ring.iter().rev().take(scale);
                let events: f64 = recent().map(|s| s.obs.events(signal)).sum();
                let with_events = recent().filter(|s| s.obs.events(signal) > 0.0).count();
                let total = sum(|s| s.obs.requests);
                let pairs = sum(|s| s.obs.requests * (s.obs.requests - 1.0).max(0.0));
                let a = baseline.assess(events as u64, total as u64, pairs, p)?;
                let hot = ratio_hot(&a, events, with_events, scale, cfg);
                Some(verdict(a, hot, signal.as_str()))
            }
            Signal::LatencyP50 | Signal::LatencyP90 | Signal::LatencyP99 => {
                let (slot, q, min_n) = signal.quantile()?;
                let baseline = &self.latency[slot];
                if baseline.windows < cfg.min_signal_windows() {
                    return None;
                }
                let (mut n, mut weighted, mut windows) = (0.0, 0.0, 0.0);
                for s in self.ring.iter().rev().take(scale) {
                    let v = s.obs.latency[slot];
                    if v.is_finite() && s.obs.requests > 0.0 {
                        n += s.obs.requests;
                        weighted += v * s.obs.requests;
                        windows += 1.0;
                    }
                }
                if n < min_n {
                    return None;
                }
                let a = baseline.assess(q, weighted / n, n, windows, p);
                let hot = latency_hot(&a, cfg);
                Some(verdict(a, hot, signal.as_str()))
            }
            Signal::BytesOut | Signal::BytesIn => {
                let baseline = if signal == Signal::BytesOut { &self.bytes_out } else { &self.bytes_in };
                if baseline.windows < cfg.min_signal_windows() {
                    return None;
                }
                let bytes = sum(if signal == Signal::BytesOut {
                    |s: &Slot| s.obs.bytes_out
                } else {
                    |s: &Slot| s.obs.bytes_in
                });
                let flows = sum(|s| s.obs.flows());
                let a = baseline.assess(bytes, flows, p)?;
                let hot = a.p_value < p && a.high && bytes >= 3.0 * a.expected && bytes - a.expected >= 10_000.0;
                let kind = if signal == Signal::BytesOut { "bytes_out_high" } else { "bytes_in_high" };
                Some(verdict(a, hot, kind))
            }
            // Scored by the pair's `UpstreamModel`.
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baseline::tests::Draws;

    /// An hour of warm-up instead of a day, so that tests stay short.
    fn test_config() -> DetectorConfig {
        DetectorConfig { warmup_windows: 360, ..DetectorConfig::default() }
    }

    const W: i64 = 10_000;

    fn obs(requests: f64, latency_ms: f64, errors: f64) -> Obs {
        let l = (latency_ms * 1000.0).ln();
        Obs {
            requests,
            errors,
            latency: [l, l + 0.6, l + 1.2],
            bytes_out: requests * 300.0,
            bytes_in: requests * 2000.0,
            ..Obs::zero()
        }
    }

    /// A pair at 50 requests a window with mild, deterministic wobble.
    fn steady(i: i64) -> Obs {
        let wobble = ((i * 7919) % 11) as f64 - 5.0;
        obs(50.0 + wobble, 20.0 * (1.0 + wobble / 200.0), 0.0)
    }

    fn warm(cfg: &DetectorConfig) -> PairModel {
        let mut m = PairModel::default();
        for i in 0..2_000 {
            let step = m.observe(&steady(i), i * W, cfg);
            assert!(step.fired.is_empty(), "window {i}: {:?}", step.fired);
        }
        m
    }

    #[test]
    fn a_steady_pair_never_fires() {
        let cfg = test_config();
        let m = warm(&cfg);
        assert!(!m.learning(&cfg));
    }

    #[test]
    fn a_pair_at_ten_percent_errors_from_its_first_request_raises_nothing_over_a_day() {
        // A warm-up of two minutes (the shortest a user is likely to set) and of an hour;
        // a busy pair and a quiet one.
        for warmup_windows in [12, 360] {
            let cfg = DetectorConfig { warmup_windows, ..DetectorConfig::default() };
            for requests in [30u64, 3] {
                let mut draws = Draws(0x9e37_79b9_7f4a_7c15 ^ requests);
                let mut m = PairModel::default();
                for i in 0..8_640 {
                    let n = requests + (i % 3) as u64;
                    let o = obs(n as f64, 20.0, draws.binomial(n, 0.1));
                    let step = m.observe(&o, i * W, &cfg);
                    assert!(
                        step.fired.is_empty(),
                        "warm-up {warmup_windows}, {requests} requests, window {i}: {:?}",
                        step.fired
                    );
                }
                let learnt = m.errors.expected();
                assert!((0.08..0.12).contains(&learnt), "{learnt}");
            }
        }
    }

    #[test]
    fn a_pair_whose_errors_come_in_clusters_learns_it_and_is_not_paged_for_them() {
        // One window in twenty is a cluster at 30 % errors, the rest at 0.5 %: a mean of 2 %
        // with ρ ≈ 0.2. A binomial calls a cluster impossible; for this pair it is ordinary.
        let cfg = test_config();
        let run = |learn_spread: bool| {
            let mut draws = Draws(0x2545_f491_4f6c_dd1d);
            let mut m = PairModel::default();
            let mut fired = Vec::new();
            for i in 0..8_640 {
                let p = if draws.uniform() < 0.05 { 0.3 } else { 0.005 };
                let o = obs(50.0, 20.0, draws.binomial(50, p));
                if !learn_spread {
                    m.errors.spread = RatioSpread::default();
                }
                fired.extend(m.observe(&o, i * W, &cfg).fired.into_iter().filter(|v| v.signal == Signal::ErrorRatio));
            }
            (m, fired)
        };
        let (m, fired) = run(true);
        assert!((0.12..0.3).contains(&m.errors.spread.rho), "{:?}", m.errors.spread);
        assert!(fired.is_empty(), "{} error-ratio detections: {:?}", fired.len(), fired.first());
        let (_, binomial) = run(false);
        assert!(binomial.len() >= 10, "a binomial pages on the clusters: {}", binomial.len());
        // And a real burst still pages: every window at 30 % for five minutes.
        let (mut m, _) = run(true);
        let mut draws = Draws(7);
        let burst: Vec<_> = (8_640..8_670)
            .flat_map(|i| m.observe(&obs(50.0, 20.0, draws.binomial(50, 0.3)), i * W, &cfg).fired)
            .filter(|v| v.signal == Signal::ErrorRatio)
            .collect();
        assert!(!burst.is_empty(), "a lasting burst is still an anomaly");
    }

    #[test]
    fn rare_errors_in_clusters_learn_their_spread_and_page_nothing_until_a_burst() {
        // 30 requests a window in bursts of 8, errors at 0.1 % with ρ = 0.1 (a window's ratio
        // drawn from a Beta): most windows hold no error, and one in a few hundred holds
        // several. Three days of it, then ten minutes of a dependency failing 5 % of the
        // requests.
        let cfg = DetectorConfig::default();
        let mut draws = Draws(0x2545_f491_4f6c_dd1d);
        let mut m = PairModel::default();
        let window = |m: &mut PairModel, i: i64, ratio: f64, rho: f64, draws: &mut Draws| {
            let n: f64 = (0..draws.poisson(30.0 / 8.0) as usize).map(|_| 1.0 + draws.poisson(7.0)).sum();
            let c = (1.0 - rho) / rho;
            let p = if rho > 0.0 { draws.beta(ratio * c, (1.0 - ratio) * c) } else { ratio };
            let o =
                Obs { requests: n, errors: draws.binomial(n as u64, p), latency: [10.0, 10.5, 11.0], ..Obs::zero() };
            m.observe(&o, i * W, &cfg).fired.into_iter().filter(|v| v.signal == Signal::ErrorRatio).count()
        };
        let fired: usize = (0..3 * 8_640).map(|i| window(&mut m, i, 0.001, 0.1, &mut draws)).sum();
        assert!((0.05..0.2).contains(&m.errors.spread.rho), "{:?}", m.errors.spread);
        assert_eq!(fired, 0, "error-ratio detections on ordinary clusters");
        // Judged against clusters of 30 %, 5 % takes more than the ring's five minutes: the
        // long spans add it up.
        let burst: usize = (3 * 8_640..3 * 8_640 + 60).map(|i| window(&mut m, i, 0.05, 0.0, &mut draws)).sum();
        assert!(burst >= 1, "ten minutes at 5 % is a detection");
    }

    #[test]
    fn independent_errors_learn_no_over_dispersion() {
        let cfg = test_config();
        let mut draws = Draws(0x9e37_79b9);
        let mut m = PairModel::default();
        for i in 0..8_640 {
            m.observe(&obs(50.0, 20.0, draws.binomial(50, 0.02)), i * W, &cfg);
        }
        assert!(m.errors.spread.rho < 0.005, "{:?}", m.errors.spread);
    }

    #[test]
    fn a_short_warm_up_is_the_gate_of_every_signal() {
        // Two minutes of 10 s windows: latency, rate and bytes are judged from the 13th
        // window on, not after 30.
        let cfg = DetectorConfig { warmup_windows: 12, ..DetectorConfig::default() };
        let mut m = PairModel::default();
        for i in 0..12 {
            assert!(m.observe(&steady(i), i * W, &cfg).fired.is_empty());
        }
        assert!(!m.learning(&cfg));
        let mut fired = Vec::new();
        for i in 12..16 {
            let mut o = steady(i);
            o.latency = o.latency.map(|l| l + 2.0f64.ln());
            o.requests *= 4.0;
            o.bytes_out *= 40.0;
            fired.extend(m.observe(&o, i * W, &cfg).fired.into_iter().map(|v| v.signal));
        }
        for s in [Signal::LatencyP50, Signal::RequestRate, Signal::BytesOut] {
            assert!(fired.contains(&s), "{s:?} not judged: {fired:?}");
        }
    }

    #[test]
    fn latency_doubling_fires_within_three_windows_with_a_reason() {
        let cfg = test_config();
        let mut m = warm(&cfg);
        let mut fired_at = None;
        for i in 2_000..2_010 {
            let mut o = steady(i);
            for l in &mut o.latency {
                *l += 2f64.ln();
            }
            let step = m.observe(&o, i * W, &cfg);
            if let Some(v) = step.fired.iter().find(|v| v.signal == Signal::LatencyP50) {
                fired_at = Some(i - 2_000);
                assert!(v.assessment.observed >= 1.4 * v.assessment.expected, "{v:?}");
                break;
            }
        }
        assert!(fired_at.is_some_and(|w| w <= 2), "{fired_at:?}");
    }

    #[test]
    fn silence_fires_vanished_and_recovery_clears_it() {
        let cfg = test_config();
        let mut m = warm(&cfg);
        let mut fired = Vec::new();
        for i in 2_000..2_006 {
            fired.extend(m.observe(&Obs::zero(), i * W, &cfg).fired);
        }
        assert!(fired.iter().any(|v| v.kind == "vanished"), "{fired:?}");
        assert!(m.is_active(Signal::RequestRate));
        let mut cleared = Vec::new();
        for i in 2_006..2_060 {
            cleared.extend(m.observe(&steady(i), i * W, &cfg).cleared);
        }
        assert!(cleared.contains(&Signal::RequestRate), "{cleared:?}");
    }

    #[test]
    fn an_error_burst_fires_error_ratio() {
        let cfg = test_config();
        let mut m = warm(&cfg);
        let mut fired = Vec::new();
        for i in 2_000..2_004 {
            let mut o = steady(i);
            o.errors = (o.requests * 0.05).round();
            fired.extend(m.observe(&o, i * W, &cfg).fired);
        }
        assert!(fired.iter().any(|v| v.signal == Signal::ErrorRatio), "{fired:?}");
    }

    #[test]
    fn one_odd_window_does_not_fire() {
        let cfg = test_config();
        let mut m = warm(&cfg);
        let mut odd = steady(2_000);
        for l in &mut odd.latency {
            *l += 3f64.ln();
        }
        assert!(m.observe(&odd, 2_000 * W, &cfg).fired.is_empty());
        for i in 2_001..2_010 {
            assert!(m.observe(&steady(i), i * W, &cfg).fired.is_empty());
        }
        // Nor does a window of errors, on a pair that errs once in a long while, however long
        // it stays in the sums.
        let mut odd = steady(2_010);
        odd.errors = 10.0;
        assert!(m.observe(&odd, 2_010 * W, &cfg).fired.is_empty());
        for i in 2_011..2_060 {
            let fired = m.observe(&steady(i), i * W, &cfg).fired;
            assert!(fired.is_empty(), "window {i}: {fired:?}");
        }
    }

    #[test]
    fn traffic_gone_for_three_windows_is_a_detection_in_the_third() {
        let cfg = test_config();
        let mut m = PairModel::default();
        // Six requests a window: one empty window is not beyond chance, three are (in the
        // sum), and each of the three is below what was expected of it.
        for i in 0..2_000 {
            assert!(m.observe(&obs(6.0, 20.0, 0.0), i * W, &cfg).fired.is_empty());
        }
        let mut fired_at = None;
        for i in 2_000..2_010 {
            if let Some(v) = m.observe(&Obs::zero(), i * W, &cfg).fired.first() {
                fired_at = Some((i - 2_000 + 1, v.scale, v.sustained, v.kind));
                break;
            }
        }
        assert_eq!(fired_at, Some((3, 3, true, "vanished")));
    }

    #[test]
    fn the_same_traffic_at_10_s_and_60_s_windows_gives_the_same_detections() {
        // Two days of a pair at 3 requests a second with a strong daily shape (nights at a
        // twentieth of the afternoon), then on the third day
        // a surge ×4 for 20 minutes; once as 10 s windows, once as their sums over a minute,
        // each with the configuration's durations in its own windows (a day of warm-up, an
        // hour to adapt, 5 minutes to clear). Both find the surge within two minutes of its
        // start, and nothing else; and they expect the same rate per second at night and in
        // the afternoon (with memories counted in 10 s windows, the minute baseline had not
        // learnt its day after three).
        let run = |window_ms: i64| {
            let per_day = 86_400_000 / window_ms;
            let cfg = DetectorConfig {
                warmup_windows: per_day as u64,
                adapt_after: (3_600_000 / window_ms) as u32,
                clear_after: (300_000 / window_ms).max(3) as u32,
                cadence: Cadence::of(window_ms),
                ..DetectorConfig::default()
            };
            let mut m = PairModel::default();
            let surge = (2 * 86_400_000 + 14 * 3_600_000)..(2 * 86_400_000 + 14 * 3_600_000 + 1_200_000);
            let mut fired = Vec::new();
            for i in 0..(3 * per_day) {
                let t = i * window_ms;
                let hour = (t % 86_400_000) as f64 / 3_600_000.0;
                // From 0.3 a second at night to 5.7 in the afternoon.
                let per_s = 3.0 * (1.0 + 0.9 * ((hour - 8.0) / 24.0 * std::f64::consts::TAU).sin());
                let factor = if surge.contains(&t) { 4.0 } else { 1.0 };
                let requests = (per_s * factor * window_ms as f64 / 1000.0).round();
                for v in m.observe(&obs(requests, 20.0, 0.0), t, &cfg).fired {
                    fired.push((t - surge.start, v.kind));
                }
            }
            // The expected rate per second at 03:00 and 15:00 of the fourth day.
            let expected = [3, 15].map(|h| {
                let at = 3 * 86_400_000 + h * 3_600_000;
                m.detail(at, window_ms, &cfg).baselines.request_rate.expected_per_s
            });
            (fired, expected)
        };
        let (fine, coarse) = (run(10_000), run(60_000));
        for (window_ms, (fired, _)) in [(10_000, &fine), (60_000, &coarse)] {
            assert!(!fired.is_empty(), "{window_ms} ms: the surge was missed");
            assert!(
                fired.iter().all(|(after, kind)| (0..120_000).contains(after) && kind.starts_with("request_rate_high")),
                "{window_ms} ms windows: {fired:?}"
            );
        }
        for (a, b) in fine.1.iter().zip(&coarse.1) {
            assert!((a / b - 1.0).abs() < 0.15, "expected per second: {:?} at 10 s, {:?} at 60 s", fine.1, coarse.1);
        }
    }

    #[test]
    fn the_upstream_model_is_stored_after_the_rest() {
        let cfg = test_config();
        let mut m = PairModel::default();
        for i in 0..50 {
            m.observe(&steady(i), i * W, &cfg);
        }
        // Bytes from before a stats flush ever reported on the pair (or before upstream
        // signals existed) read as a model without them.
        let core = m.to_bytes();
        assert_eq!(PairModel::from_bytes(&core).expect("decodes").upstream, None);
        let up = UpstreamObs { requests: 10.0, hosts: 2.0, ..UpstreamObs::default() };
        for i in 50..100 {
            m.observe(&steady(i), i * W, &cfg);
            m.observe_upstream(&up, i * W, &cfg);
        }
        let restored = PairModel::from_bytes(&m.to_bytes()).expect("decodes");
        assert_eq!(restored.upstream.as_ref().map(|u| u.windows), Some(50));
        assert_eq!(restored.to_bytes(), m.to_bytes());
        assert_eq!(PairModel::from_bytes(&m.to_bytes()[..m.to_bytes().len() - 1]), None);
        // Bytes from before the half-hour median existed (no trailer) read with an empty one.
        let trailer = postcard::to_stdvec(&(&m.slow, m.spreads(), m.ratio_spreads(), &m.long, m.weekdays()))
            .expect("encodes")
            .len()
            + 8;
        let bytes = m.to_bytes();
        let body = &bytes[..bytes.len() - trailer];
        let legacy = PairModel::from_bytes(body).expect("legacy bytes decode");
        assert_eq!(legacy.slow, SlowMedian::default());
        assert_eq!(legacy.upstream.as_ref().map(|u| u.windows), Some(50));
        assert_ne!(m.slow, SlowMedian::default());
        // Bytes with the first trailer (the half-hour median alone) read with it, and their
        // rate baselines' spreads start from the dispersion they had learnt.
        let mut v1 = body.to_vec();
        let slow = postcard::to_stdvec(&m.slow).expect("encodes");
        v1.extend(&slow);
        v1.extend((slow.len() as u32).to_le_bytes());
        v1.extend(TRAILER_MAGIC);
        let migrated = PairModel::from_bytes(&v1).expect("first-trailer bytes decode");
        assert_eq!(migrated.slow, m.slow);
        assert_eq!(migrated.requests.spread.phi, m.requests.dispersion.max(1.0));
        assert_eq!(migrated.requests.spread.kappa, crate::baseline::MODEL_ERROR * crate::baseline::MODEL_ERROR);
        assert_ne!(m.requests.spread, migrated.requests.spread);
        // Bytes with the second trailer (no ratio over-dispersion) read with binomial ratios
        // and everything else as it was.
        let mut v2 = body.to_vec();
        let t2 = postcard::to_stdvec(&(&m.slow, m.spreads())).expect("encodes");
        v2.extend(&t2);
        v2.extend((t2.len() as u32).to_le_bytes());
        v2.extend(TRAILER_MAGIC_V2);
        let before_ratios = PairModel::from_bytes(&v2).expect("second-trailer bytes decode");
        assert_eq!(before_ratios.requests.spread, m.requests.spread);
        assert_eq!(before_ratios.errors.spread, RatioSpread::default());
        assert_eq!((before_ratios.errors.events, before_ratios.errors.total), (m.errors.events, m.errors.total));
        // Bytes with the third trailer (over-dispersion in older units) keep its ρ alone.
        let learnt = m.errors.spread.clone();
        assert_ne!(learnt, RatioSpread::migrated(learnt.rho), "moments were learnt");
        let mut old = body.to_vec();
        let t3 = postcard::to_stdvec(&(&m.slow, m.spreads(), m.ratio_spreads())).expect("encodes");
        old.extend(&t3);
        old.extend((t3.len() as u32).to_le_bytes());
        old.extend(TRAILER_MAGIC_V3);
        let before_weights = PairModel::from_bytes(&old).expect("third-trailer bytes decode");
        assert_eq!(before_weights.errors.spread, RatioSpread::migrated(learnt.rho));
        assert_eq!(before_weights.requests.spread, m.requests.spread);
        // Bytes with the fourth trailer (no weekday evidence) read with everything else, and
        // a weekday that taught its factor counts its evidence as enough.
        let mut m4 = m.clone();
        m4.requests.weekly_n[2] = 5;
        let bytes = m4.to_bytes();
        let body = &bytes[..bytes.len() - trailer];
        let mut v4 = body.to_vec();
        let t4 = postcard::to_stdvec(&(&m.slow, m.spreads(), m.ratio_spreads(), &m.long)).expect("encodes");
        v4.extend(&t4);
        v4.extend((t4.len() as u32).to_le_bytes());
        v4.extend(TRAILER_MAGIC_V4);
        let before_weekdays = PairModel::from_bytes(&v4).expect("fourth-trailer bytes decode");
        assert_eq!(before_weekdays.long, m.long);
        assert_eq!(before_weekdays.requests.weekday_expected, [0.0, 0.0, WEEKDAY_MIN_EXPECTED, 0.0, 0.0, 0.0, 0.0]);
    }

    /// A window of `n` requests whose latencies are log-normal (median 20 ms, log-sd 0.5),
    /// through the sketch as the collector builds it.
    fn sampled(seed: &mut u64, n: u64) -> Obs {
        let mut uniform = || {
            *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((*seed >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let mut stats = PairStats::default();
        stats.requests[2] = n;
        for _ in 0..n {
            let normal = (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos();
            stats.latency.add((20_000f64.ln() + 0.5 * normal).exp() as u64);
        }
        Obs::from_stats(&stats)
    }

    #[test]
    fn latency_bands_are_the_sampling_error_of_a_windows_median() {
        // Too wide a band is slow to see a shift; too narrow a one pages on chance.
        let cfg = test_config();
        let mut m = PairModel::default();
        let mut seed = 7;
        for i in 0..4_000 {
            let n = 6 + (i % 7) as u64 * 2;
            m.observe(&sampled(&mut seed, n), i * W, &cfg);
        }
        let b = &m.latency[0];
        assert!((b.spread - 0.5).abs() < 0.05, "within-window spread {} for 0.5", b.spread);
        assert!((b.mean - 20_000f64.ln()).abs() < 0.03, "median {}", b.mean.exp());
        let zt = crate::baseline::z_for_p(cfg.threshold_p);
        let z: Vec<f64> = (0..3_000)
            .map(|i| {
                let n = 6 + (i % 7) as u64 * 2;
                let o = sampled(&mut seed, n);
                let a = b.assess(0.5, o.latency[0], n as f64, 1.0, cfg.threshold_p);
                (o.latency[0] - b.mean) * zt / (a.upper.ln() - b.mean)
            })
            .collect();
        let sd = (z.iter().map(|z| z * z).sum::<f64>() / z.len() as f64).sqrt();
        assert!((0.85..1.1).contains(&sd), "z of a window's median has sd {sd}");
    }

    /// A pair with a request every minute, its latency wobbling by up to ±30 %.
    fn quiet(i: i64, factor: f64) -> Obs {
        if i % 6 != 0 {
            return Obs::zero();
        }
        let wobble = ((i * 7919) % 13) as f64 / 20.0 - 0.3;
        obs(1.0, 240.0 * factor * (1.0 + wobble), 0.0)
    }

    #[test]
    fn a_quiet_pairs_median_is_learnt_from_pooled_windows_and_judged_over_half_an_hour() {
        let cfg = test_config();
        let mut m = PairModel::default();
        for i in 0..3_000 {
            let step = m.observe(&quiet(i, 1.0), i * W, &cfg);
            assert!(step.fired.is_empty(), "window {i}: {:?}", step.fired);
        }
        assert!(m.latency[0].windows >= 30, "{:?}", m.latency[0]);
        assert!((m.latency[0].mean.exp() / 240_000.0 - 1.0).abs() < 0.2, "{:?}", m.latency[0]);
        let mut fired = None;
        for i in 3_000..3_400 {
            let step = m.observe(&quiet(i, 3.0), i * W, &cfg);
            assert!(step.fired.iter().all(|v| v.signal == Signal::LatencyP50), "{:?}", step.fired);
            if let Some(v) = step.fired.first() {
                fired = Some((i - 3_000, *v));
                break;
            }
        }
        let (after, v) = fired.expect("the tripled median is detected");
        // Ten requests at the tripled latency are enough, whatever the blocks' phase.
        assert!(after <= 100, "{after} windows");
        assert!(v.scale > RING, "{v:?}");
        assert!(crate::anomaly::reason(&v, W).contains("min"), "{}", crate::anomaly::reason(&v, W));
    }

    #[test]
    fn a_detection_hot_now_and_then_stays_one_until_quiet_for_clear_after() {
        let cfg = DetectorConfig { clear_after: 30, ..test_config() };
        let a = Assessment { p_value: 1e-9, high: true, observed: 2.0, expected: 1.0, lower: 0.0, upper: 1.5 };
        let (mut history, mut active) = (0u32, false);
        let (mut fired, mut cleared) = (0, Vec::new());
        for i in 0..200 {
            // Two hot windows, then one every 20 windows until 100, then none.
            let hot = i < 2 || (i < 100 && i % 20 == 0);
            let v = Verdict {
                signal: Signal::ErrorRatio,
                assessment: a,
                scale: 1,
                hot,
                sustained: false,
                kind: "error_ratio",
            };
            let mut step = Step::default();
            track(Signal::ErrorRatio, Some(v), &mut history, &mut active, true, &cfg, &mut step);
            fired += step.fired.len();
            cleared.extend(step.cleared.iter().map(|_| i));
        }
        assert_eq!(fired, 1);
        // The last hot window was 80: the detection ends 30 windows later.
        assert_eq!(cleared, vec![110]);
    }

    #[test]
    fn nothing_fires_while_learning() {
        let cfg = test_config();
        let mut m = PairModel::default();
        for i in 0..100 {
            m.observe(&steady(i), i * W, &cfg);
        }
        for i in 100..110 {
            assert!(m.observe(&Obs::zero(), i * W, &cfg).fired.is_empty());
        }
        assert!(m.learning(&cfg));
    }

    #[test]
    fn weekends_at_a_fifth_of_the_weekdays_page_nothing_and_a_drop_on_a_new_weekday_still_does() {
        // Mondays to Fridays at 20 requests a window, weekends at 4, from a Monday, in bursts
        // of two; two weeks and a day under the default warm-up. Each day of the first week
        // is new once: its first hours teach its factor.
        let cfg = DetectorConfig::default();
        const MONDAY: i64 = 4 * 86_400_000;
        let run = |outage: Option<std::ops::Range<i64>>| {
            let mut draws = Draws(0x2f6b_3c1d);
            let mut m = PairModel::default();
            let mut fired = Vec::new();
            for i in 0..(15 * 8_640) {
                let t = MONDAY + i * W;
                let weekend = crate::baseline::calendar(t).1 >= 5;
                let mean = if weekend { 4.0 } else { 20.0 };
                let n =
                    if outage.as_ref().is_some_and(|o| o.contains(&i)) { 0.0 } else { 2.0 * draws.poisson(mean / 2.0) };
                fired.extend(m.observe(&obs(n, 20.0, 0.0), t, &cfg).fired.into_iter().map(|v| (i, v.kind)));
            }
            (m, fired)
        };
        let (m, fired) = run(None);
        assert!(fired.is_empty(), "{} detections: {:?}", fired.len(), &fired[..fired.len().min(5)]);
        let saturday = m.requests.weekly[5] / m.requests.weekly[2];
        assert!((0.17..0.23).contains(&saturday), "Saturday over Wednesday {saturday}");
        // Gone on the first Saturday at three in the morning, an hour after its first two
        // hours taught its factor.
        let start = 5 * 8_640 + 3 * 360;
        let (_, fired) = run(Some(start..start + 90));
        let first = fired.iter().find(|(i, k)| *i >= start && ["vanished", "request_rate_low"].contains(k));
        assert!(first.is_some_and(|(i, _)| i - start <= 12), "{fired:?}");
    }

    #[test]
    fn a_lasting_doubling_of_a_quiet_pairs_median_is_detected_and_then_adopted_not_paged_again_and_again() {
        // Half a request a window at the busiest hour, a twentieth at night; each request's
        // latency log-normal (σ 0.78) around 250 ms, doubled for good from the third night.
        let cfg = DetectorConfig::default();
        let mut draws = Draws(0x77);
        let mut m = PairModel::default();
        let evening = [
            0.1, 0.08, 0.06, 0.05, 0.05, 0.08, 0.2, 0.5, 0.9, 1.0, 1.1, 1.3, 1.8, 1.5, 1.1, 1.0, 0.9, 0.8, 0.6, 0.5,
            0.4, 0.3, 0.2, 0.15,
        ];
        let shift_at = 2 * 8_640 + 360;
        let mut fired = Vec::new();
        for i in 0..(4 * 8_640) {
            let n = draws.poisson(0.72 * evening[(i % 8_640) as usize / 360]);
            let factor = if i >= shift_at { 2.0 } else { 1.0 };
            let o = if n > 0.0 {
                let l = (250_000.0f64 * factor).ln() + 0.78 * draws.normal() / n.sqrt();
                Obs { requests: n, latency: [l, l + 1.0, l + 1.8], ..Obs::zero() }
            } else {
                Obs::zero()
            };
            fired.extend(m.observe(&o, i * W, &cfg).fired.into_iter().map(|v| (i, v.kind)));
        }
        assert!(fired.iter().all(|(i, _)| *i >= shift_at), "{fired:?}");
        // 16 detections in two days, the doubled median never adopted, when a quiet median's
        // detection ended whenever its last windows had too few requests to tell and a pooled
        // median's memory was 100 times longer in time than a busy pair's.
        assert!((1..=2).contains(&fired.len()), "{} detections: {fired:?}", fired.len());
        let learnt = m.latency[0].mean.exp() / 250_000.0;
        assert!((1.7..2.3).contains(&learnt), "the doubled median is the new normal: {learnt}");
    }

    #[test]
    fn sparse_bursty_pairs_are_not_paged_when_their_first_day_ends() {
        // Pairs at 0.02 requests a second in bursts of four, busy in office hours, under the
        // default day of warm-up: the first windows judged sum expectations that the first
        // day's calibration has since corrected, not the ones stored before it.
        let cfg = DetectorConfig::default();
        let office = |hour: f64| if (8.0..18.0).contains(&hour) { 2.2 } else { 0.15 };
        let mut fired = Vec::new();
        for seed in 0..40u64 {
            let mut draws = Draws(0x51_7cc1_b727_220a ^ seed);
            let mut m = PairModel::default();
            for i in 0..(2 * 8_640) {
                let hour = (i % 8_640) as f64 / 360.0;
                let bursts = draws.poisson(0.02 * 10.0 * office(hour) / 4.0);
                let n = (0..bursts as u64).map(|_| 1.0 + draws.poisson(3.0)).sum::<f64>();
                fired.extend(m.observe(&obs(n, 20.0, 0.0), i * W, &cfg).fired.into_iter().map(|v| (seed, i, v.kind)));
            }
        }
        assert!(fired.is_empty(), "{} detections: {:?}", fired.len(), &fired[..fired.len().min(5)]);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> DetectorConfig {
        DetectorConfig { warmup_windows: 60, ..DetectorConfig::default() }
    }

    fn window(requests: f64, latency_ms: f64, errors: f64) -> Obs {
        let l = (latency_ms.max(0.001) * 1000.0).ln();
        Obs {
            requests,
            errors: errors.min(requests),
            latency: if requests > 0.0 { [l, l + 0.5, l + 1.0] } else { [f64::NAN; 3] },
            bytes_out: requests * 400.0,
            bytes_in: requests * 1500.0,
            ..Obs::zero()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// Whatever comes in, scores are finite and in [0, 1], and bands are ordered.
        #[test]
        fn scores_are_finite_and_in_range(
            series in prop::collection::vec((0.0f64..5_000.0, 0.01f64..60_000.0, 0.0f64..1.0), 1..300)
        ) {
            let mut m = PairModel::default();
            for (i, (requests, latency, error_share)) in series.into_iter().enumerate() {
                let step = m.observe(&window(requests.floor(), latency, (requests * error_share).floor()), i as i64 * 10_000, &cfg());
                for v in &step.verdicts {
                    prop_assert!(v.score().is_finite() && (0.0..=1.0).contains(&v.score()), "{v:?}");
                    let a = v.assessment;
                    prop_assert!(a.expected.is_finite() && a.lower.is_finite() && a.upper.is_finite(), "{v:?}");
                    prop_assert!(a.lower <= a.upper, "{v:?}");
                }
            }
        }

        /// A constant series never raises an anomaly, at any level (with the default day of
        /// warm-up, over which even a ratio far from the prior is learnt).
        #[test]
        fn a_constant_series_never_alarms(requests in 0u32..2_000, latency in 0.1f64..10_000.0, errors in 0u32..20) {
            let cfg = DetectorConfig::default();
            let mut m = PairModel::default();
            let o = window(f64::from(requests), latency, f64::from(errors.min(requests)));
            for i in 0..(cfg.warmup_windows as i64 + 500) {
                let fired = m.observe(&o, i * 10_000, &cfg).fired;
                prop_assert!(fired.is_empty(), "window {i}: {fired:?}");
            }
        }

        /// The bigger the latency shift, the smaller the tail probability.
        #[test]
        fn latency_scores_grow_with_the_shift(base in 1.0f64..500.0, small in 1.05f64..2.0, extra in 1.05f64..4.0) {
            let mut m = PairModel::default();
            for i in 0..300 {
                m.observe(&window(100.0, base, 0.0), i * 10_000, &cfg());
            }
            let p = |factor: f64| {
                let mut probe = m.clone();
                let step = probe.observe(&window(100.0, base * factor, 0.0), 300 * 10_000, &cfg());
                step.verdicts.iter().find(|v| v.signal == Signal::LatencyP50).map(|v| v.assessment.p_value)
            };
            let (a, b) = (p(small), p(small * extra));
            prop_assert!(a.is_some() && b.is_some());
            prop_assert!(b <= a, "shift {small}: {a:?}, shift {}: {b:?}", small * extra);
        }

        /// A model restored from its bytes scores the next windows exactly as the original.
        #[test]
        fn a_restored_model_scores_identically(
            history in prop::collection::vec((0.0f64..300.0, 1.0f64..200.0), 1..200),
            next in prop::collection::vec((0.0f64..600.0, 1.0f64..400.0), 1..50),
        ) {
            let mut m = PairModel::default();
            for (i, (r, l)) in history.iter().enumerate() {
                m.observe(&window(r.floor(), *l, 0.0), i as i64 * 10_000, &cfg());
            }
            let mut restored = PairModel::from_bytes(&m.to_bytes()).expect("decodes");
            let offset = history.len() as i64;
            for (j, (r, l)) in next.iter().enumerate() {
                let t = (offset + j as i64) * 10_000;
                let o = window(r.floor(), *l, 0.0);
                let (a, b) = (m.observe(&o, t, &cfg()), restored.observe(&o, t, &cfg()));
                prop_assert_eq!(format!("{:?}", a), format!("{:?}", b));
            }
            prop_assert_eq!(m.to_bytes(), restored.to_bytes());
        }

        /// The same for a quiet pair, whose median is pooled and judged over half an hour.
        #[test]
        fn a_restored_quiet_model_scores_identically(
            history in prop::collection::vec((0u32..4, 1.0f64..200.0), 250..500),
            next in prop::collection::vec((0u32..4, 1.0f64..600.0), 1..100),
        ) {
            let mut m = PairModel::default();
            for (i, (r, l)) in history.iter().enumerate() {
                m.observe(&window(f64::from(*r), *l, 0.0), i as i64 * 10_000, &cfg());
            }
            let mut restored = PairModel::from_bytes(&m.to_bytes()).expect("decodes");
            prop_assert_eq!(&restored.slow, &m.slow);
            let offset = history.len() as i64;
            for (j, (r, l)) in next.iter().enumerate() {
                let t = (offset + j as i64) * 10_000;
                let o = window(f64::from(*r), *l, 0.0);
                let (a, b) = (m.observe(&o, t, &cfg()), restored.observe(&o, t, &cfg()));
                prop_assert_eq!(format!("{:?}", a), format!("{:?}", b));
            }
            prop_assert_eq!(m.to_bytes(), restored.to_bytes());
        }
    }
}
