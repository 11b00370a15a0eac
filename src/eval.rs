//! `meshwatch eval`: runs a scenario through the real pipeline in fast-forward and measures
//! detection quality against the scenario's labelled incidents.
//!
//! Scoring is pure (`score`): a detection is a true positive when it names the incident's
//! pair (any destination, for a fan-out scan) with a compatible kind, starting between the
//! incident's start and its end plus a slack; every other detection is a false positive.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, RawConfig};
use crate::serve::{self, ServeError};
#[cfg(test)]
use crate::sim::generate::EvidenceSlice;
use crate::sim::generate::{Evidence, Generator, Truth, mesh_config};
use crate::sim::play::{Pace, PlayError, PlayOptions, Stamp, play};
use crate::sim::scenario::{IncidentKind, Scenario};
use meshwatch_detector::baseline::z_for_p;
use meshwatch_detector::model::DetectorConfig;
use meshwatch_detector::stats::binomial_upper_tail;

/// One detection, as the detector reports it.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Detection {
    /// The signal or finding kind (`latency_p99`, `error_ratio`, `new_edge`, …).
    pub kind: String,
    pub source: String,
    pub destination: String,
    pub direction: String,
    pub start_ms: i64,
    /// The detector's one-line reason, to look at.
    #[serde(default)]
    pub reason: String,
}

/// The detection kinds that count for each incident kind; the first is the kind's home.
pub fn compatible(kind: IncidentKind) -> &'static [&'static str] {
    match kind {
        IncidentKind::LatencyShift => &["latency_p50", "latency_p90", "latency_p99"],
        IncidentKind::ErrorBurst => {
            &["error_ratio", "upstream_error_ratio", "upstream_timeout_ratio", "connect_failure_ratio"]
        }
        IncidentKind::TrafficDrop => {
            &["request_rate_low", "vanished", "upstream_request_rate_low", "upstream_vanished"]
        }
        IncidentKind::TrafficSurge => &["request_rate_high", "upstream_request_rate_high"],
        IncidentKind::NewEdge => &["new_edge", "new_principal", "policy_violation"],
        IncidentKind::NewEgress => &["new_egress_destination", "new_egress_volume", "new_edge", "policy_violation"],
        IncidentKind::MtlsDowngrade => &["mtls_downgrade"],
        IncidentKind::DenialSurge => &["denial_ratio", "denial_surge"],
        IncidentKind::RateLimitSurge => &["rate_limit_ratio", "rate_limit_surge"],
        IncidentKind::FanOutScan => &["fan_out", "path_scan", "new_edge", "new_principal", "policy_violation"],
        IncidentKind::EgressBytesSurge => &["bytes_out_high", "new_egress_volume"],
        IncidentKind::NewPrincipal => &["new_principal", "new_edge", "policy_violation"],
        IncidentKind::ForeignPrincipal => &["foreign_principal", "new_principal", "new_edge", "policy_violation"],
        IncidentKind::PolicyViolation => {
            &["policy_violation", "new_edge", "new_principal", "new_egress_destination", "new_egress_volume"]
        }
        IncidentKind::DenialSpread => &["denial_surge", "denial_ratio"],
        IncidentKind::PlaintextEdge => &["plaintext", "new_edge", "new_principal", "policy_violation"],
        IncidentKind::IdentityFlood => &["cardinality_flood"],
    }
}

/// The incident kind whose precision a detection kind counts toward.
fn home(detection_kind: &str) -> Option<IncidentKind> {
    IncidentKind::ALL
        .into_iter()
        .find(|k| compatible(*k).first() == Some(&detection_kind))
        .or_else(|| IncidentKind::ALL.into_iter().find(|k| compatible(*k).contains(&detection_kind)))
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KindReport {
    pub kind: String,
    pub incidents: usize,
    pub detected: usize,
    pub recall: Option<f64>,
    pub detections: usize,
    pub true_detections: usize,
    pub precision: Option<f64>,
    pub ttd_median_s: Option<f64>,
    pub ttd_p95_s: Option<f64>,
    /// Median of the incidents' `ideal_ttd_s` (latency shifts and error bursts).
    pub ideal_ttd_median_s: Option<f64>,
}

/// How one labelled incident was detected: its first matching detection, if any.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IncidentOutcome {
    pub kind: String,
    pub source: String,
    pub destination: String,
    pub start_ms: i64,
    /// Seconds from the incident's start to its first matching detection.
    pub ttd_s: Option<f64>,
    /// That detection's kind and reason.
    pub detected_as: Option<String>,
    pub reason: Option<String>,
    /// For a latency shift or an error burst: when an ideal test would have found it (see
    /// `ideal_ttd`); `None` if it would not have, or for the other kinds.
    pub ideal_ttd_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Quality {
    pub per_kind: Vec<KindReport>,
    /// Every labelled incident, in the scenario's order.
    pub incidents: Vec<IncidentOutcome>,
    pub detections: usize,
    pub false_detections: usize,
    pub pair_days: f64,
    pub false_per_1000_pair_days: f64,
    /// The first false detections, to look at.
    pub false_examples: Vec<Detection>,
}

/// The `q` quantile of sorted values, interpolated between the two nearest (the median of
/// two values is their mean).
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let at = last as f64 * q;
    let (lo, hi) = (at.floor() as usize, (at.ceil() as usize).min(last));
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64))
}

/// Scores detections against the truth. `slack_ms`: how long after an incident ends a
/// detection of it still counts (windows close after their end).
pub fn score(truth: &[Truth], detections: &[Detection], pair_days: f64, slack_ms: i64) -> Quality {
    let matches = |t: &Truth, d: &Detection| -> bool {
        let Some(kind) = IncidentKind::parse(&t.kind) else { return false };
        let same_pair = (d.source == t.source && d.direction == t.direction)
            || t.via.as_ref().is_some_and(|via| &d.source == via && d.direction == "east_west");
        // `*`: a finding about a source across its destinations, or an incident of that kind.
        let any_destination = t.destination == "*" || d.destination == "*";
        compatible(kind).contains(&d.kind.as_str())
            && (same_pair || (any_destination && d.source == t.source))
            && (any_destination || d.destination == t.destination)
            && d.start_ms >= t.start_ms
            && d.start_ms <= t.end_ms + slack_ms
    };
    let true_detection: Vec<bool> = detections.iter().map(|d| truth.iter().any(|t| matches(t, d))).collect();
    // Each incident and its first matching detection.
    let incidents: Vec<IncidentOutcome> = truth
        .iter()
        .map(|t| {
            let d = detections.iter().filter(|d| matches(t, d)).min_by_key(|d| d.start_ms);
            IncidentOutcome {
                kind: t.kind.clone(),
                source: t.source.clone(),
                destination: t.destination.clone(),
                start_ms: t.start_ms,
                ttd_s: d.map(|d| (d.start_ms - t.start_ms) as f64 / 1000.0),
                detected_as: d.map(|d| d.kind.clone()),
                reason: d.map(|d| d.reason.clone()),
                ideal_ttd_s: None,
            }
        })
        .collect();
    let mut per_kind = Vec::new();
    for kind in IncidentKind::ALL {
        let of_kind = || incidents.iter().filter(|i| i.kind == kind.as_str());
        let count = of_kind().count();
        let mut ttd: Vec<f64> = of_kind().filter_map(|i| i.ttd_s).collect();
        ttd.sort_by(f64::total_cmp);
        let own: Vec<usize> = (0..detections.len()).filter(|&i| home(&detections[i].kind) == Some(kind)).collect();
        let true_own = own.iter().filter(|&&i| true_detection[i]).count();
        if count == 0 && own.is_empty() {
            continue;
        }
        per_kind.push(KindReport {
            kind: kind.as_str().into(),
            incidents: count,
            detected: ttd.len(),
            recall: (count > 0).then(|| ttd.len() as f64 / count as f64),
            detections: own.len(),
            true_detections: true_own,
            precision: (!own.is_empty()).then(|| true_own as f64 / own.len() as f64),
            ttd_median_s: percentile(&ttd, 0.5),
            ttd_p95_s: percentile(&ttd, 0.95),
            ideal_ttd_median_s: None,
        });
    }
    let false_detections = true_detection.iter().filter(|t| !**t).count();
    let false_examples =
        detections.iter().zip(&true_detection).filter(|(_, t)| !**t).take(200).map(|(d, _)| d.clone()).collect();
    Quality {
        per_kind,
        incidents,
        detections: detections.len(),
        false_detections,
        false_examples,
        pair_days,
        false_per_1000_pair_days: if pair_days > 0.0 { false_detections as f64 * 1000.0 / pair_days } else { 0.0 },
    }
}

/// When an ideal test would have found a latency shift or an error burst: one that knows when
/// the incident began and the edge's true normal (its latency median and log-sd, its error
/// ratio), and tests all the edge's requests since then — the mean of their log latency
/// (the most powerful test of a shift in log-normal latency) or their errors (binomial) — at
/// the detector's threshold, needing it in `k` of the last `n` windows as the detector does.
/// No detector can do better at that threshold; the gap to it is what a better one could win.
/// Seconds from the start to the end of the window it is reached in, or `None`.
pub fn ideal_ttd(kind: IncidentKind, e: &Evidence, cfg: &DetectorConfig, window_s: f64) -> Option<f64> {
    let z_threshold = z_for_p(cfg.threshold_p);
    let (mut requests, mut log_sum, mut errors, mut history) = (0u64, 0.0, 0u64, 0u32);
    for (w, slice) in e.slices.iter().enumerate() {
        requests += slice.requests;
        log_sum += slice.log_ratio_sum;
        errors += slice.errors;
        let hot = requests > 0
            && match kind {
                IncidentKind::LatencyShift => log_sum / (e.latency_sigma * (requests as f64).sqrt()) >= z_threshold,
                IncidentKind::ErrorBurst => binomial_upper_tail(errors, requests, e.error_ratio) < cfg.threshold_p,
                _ => return None,
            };
        history = (history << 1) | u32::from(hot);
        if cfg.k_of_n(history) {
            return Some((w + 1) as f64 * window_s);
        }
    }
    None
}

impl Quality {
    /// Adds each incident's ideal time to detect (`ideal[i]` for `incidents[i]`) and their
    /// median per kind.
    pub fn set_ideal(&mut self, ideal: &[Option<f64>]) {
        for (i, t) in self.incidents.iter_mut().zip(ideal) {
            i.ideal_ttd_s = *t;
        }
        for k in &mut self.per_kind {
            let mut of_kind: Vec<f64> =
                self.incidents.iter().filter(|i| i.kind == k.kind).filter_map(|i| i.ideal_ttd_s).collect();
            of_kind.sort_by(f64::total_cmp);
            k.ideal_ttd_median_s = percentile(&of_kind, 0.5);
        }
    }
}

/// What `meshwatch eval` prints.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub scenario: String,
    pub seed: u64,
    pub simulated_days: f64,
    pub pairs: usize,
    pub entries_sent: u64,
    pub entries_counted: u64,
    pub wall_seconds: f64,
    /// How the detections were made.
    pub detector: String,
    pub quality: Quality,
}

impl EvalReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "scenario {} (seed {}): {:.2} simulated days, {} pairs, {} entries sent, {} counted, {:.1} s\ndetector: {}\n\n",
            self.scenario,
            self.seed,
            self.simulated_days,
            self.pairs,
            self.entries_sent,
            self.entries_counted,
            self.wall_seconds,
            self.detector
        );
        out.push_str(&format!(
            "{:<20} {:>9} {:>8} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9}\n",
            "kind", "incidents", "detected", "recall", "detections", "precision", "ttd p50", "ttd p95", "ideal p50"
        ));
        let opt = |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v:.2}{unit}"));
        for k in &self.quality.per_kind {
            out.push_str(&format!(
                "{:<20} {:>9} {:>8} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9}\n",
                k.kind,
                k.incidents,
                k.detected,
                opt(k.recall, ""),
                k.detections,
                opt(k.precision, ""),
                opt(k.ttd_median_s, "s"),
                opt(k.ttd_p95_s, "s"),
                opt(k.ideal_ttd_median_s, "s")
            ));
        }
        if self.quality.per_kind.iter().any(|k| k.ideal_ttd_median_s.is_some()) {
            out.push_str(
                "ideal: an ideal test of the incident's own requests since it began, against the edge's true normal, at the same threshold and k of n\n",
            );
        }
        for i in self.quality.incidents.iter().filter(|i| i.ttd_s.is_none()) {
            out.push_str(&format!("missed: {} {} -> {} at {} ms\n", i.kind, i.source, i.destination, i.start_ms));
        }
        out.push_str(&format!(
            "\nfalse detections: {} over {:.1} pair-days ({:.3} per 1000 pair-days)\n",
            self.quality.false_detections, self.quality.pair_days, self.quality.false_per_1000_pair_days
        ));
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Play(#[from] PlayError),
    #[error("meshwatch did not start")]
    NotStarted,
    #[error("cannot read meshwatch's metrics: {0}")]
    Scrape(String),
}

/// The configuration eval runs meshwatch with: the defaults, or the detection settings of
/// `base`; the watermark clock, the scenario's mesh (and policy, if it has one), a fresh data
/// directory, ports chosen by the system.
pub fn eval_config(scenario: &Scenario, base: Option<&Path>, data_dir: PathBuf) -> Result<Config, ConfigError> {
    let mut config = match base {
        Some(path) => crate::config::load(Some(path), std::iter::empty())?,
        None => RawConfig::default().validate()?,
    };
    config.data_dir = data_dir;
    config.grpc_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.clock = meshwatch_collector::pipeline::Clock::Watermark;
    // Event time: streams of a fast-forward replay may drift a few slices apart.
    config.window.grace_ms = 300_000;
    config.window.max_future_ms = i64::MAX / 4;
    config.mesh = mesh_config(scenario);
    config.trust.trust_domains = config.mesh.trust_domains.clone();
    if let Some(path) = &scenario.policy {
        config.trust.policy = Some(crate::config::load_policy(path)?);
    }
    Ok(config)
}

/// Sums the samples of a metric family from a `/metrics` text.
fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{') || r.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn scrape(addr: SocketAddr) -> Result<String, EvalError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| EvalError::Scrape(e.to_string()))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: meshwatch\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| EvalError::Scrape(e.to_string()))?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.map_err(|e| EvalError::Scrape(e.to_string()))?;
    Ok(body)
}

/// Simulated time per generated slice: the ideal test (`ideal_ttd`) is checked once a slice.
const SLICE_MS: i64 = 10_000;

/// Runs `scenario` (for `duration_ms` of it, if given) through an in-process meshwatch
/// configured by `config` (see `eval_config`).
pub async fn run(
    scenario: Scenario,
    config: Config,
    seed: u64,
    duration_ms: Option<i64>,
) -> Result<EvalReport, EvalError> {
    let data_dir = config.data_dir.clone();
    let detector_cfg = config.detector;
    let shutdown = CancellationToken::new();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(serve::run(config, shutdown.clone(), move |b| {
        let _ = bound_tx.send(b);
    }));
    let bound = bound_rx.await.map_err(|_| EvalError::NotStarted)?;
    let name = scenario.name.clone();
    let mut generator = Generator::new(scenario, seed, SLICE_MS);
    if let Some(d) = duration_ms {
        generator.limit(d);
    }
    let opts = PlayOptions { target: bound.grpc, pace: Pace::Max, stamp: Stamp::Simulated, connections: 4 };
    let (generator, played) = play(generator, &opts, shutdown.clone()).await?;
    // Wait until meshwatch has taken every entry in (decoded or rejected).
    // Wait until meshwatch has taken every entry in: decoded (then counted in a window, or
    // rejected as late) or rejected while decoding.
    let (mut decoded, mut late) = (0, 0);
    for _ in 0..600 {
        let text = scrape(bound.http).await?;
        decoded = metric_sum(&text, "meshwatch_als_entries_decoded_total");
        let rejected = metric_sum(&text, "meshwatch_als_entries_rejected_total");
        late = text
            .lines()
            .filter(|l| {
                // Rejected after decoding: counted in `decoded` too.
                ["late", "future", "queue_full"]
                    .iter()
                    .any(|r| l.starts_with(&format!("meshwatch_als_entries_rejected_total{{reason=\"{r}\"}}")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
        if decoded + rejected - late >= played.entries {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counted = decoded.saturating_sub(late);
    // Shutting down closes every window and checkpoints the detector: its anomalies are
    // then all in the store.
    shutdown.cancel();
    server.await.map_err(|e| EvalError::Serve(ServeError::Task(e)))??;
    let detections = stored_detections(data_dir).await?;

    let truth = generator.truth();
    let ideal: Vec<Option<f64>> = truth
        .iter()
        .zip(generator.evidence())
        .map(|(t, e)| ideal_ttd(IncidentKind::parse(&t.kind)?, e.as_ref()?, &detector_cfg, SLICE_MS as f64 / 1000.0))
        .collect();
    let pairs: BTreeSet<_> = generator.counts().keys().map(|(s, d, dir, _)| (s.clone(), d.clone(), *dir)).collect();
    let simulated_days = played.simulated_ms as f64 / 86_400_000.0;
    let pair_days = pairs.len() as f64 * simulated_days;
    Ok(EvalReport {
        scenario: name,
        seed,
        simulated_days,
        pairs: pairs.len(),
        entries_sent: played.entries,
        entries_counted: counted,
        wall_seconds: played.wall.as_secs_f64(),
        detector: format!(
            "baselines per pair and signal; p < {:e}, {} of the last {} windows; {} windows of warm-up",
            detector_cfg.threshold_p, detector_cfg.k, detector_cfg.n, detector_cfg.warmup_windows
        ),
        quality: {
            let mut q = score(&truth, &detections, pair_days, 60_000);
            q.set_ideal(&ideal);
            q
        },
    })
}

/// Every anomaly the detector kept, from its store, as detections.
async fn stored_detections(data_dir: PathBuf) -> Result<Vec<Detection>, EvalError> {
    let loaded = tokio::task::spawn_blocking(move || {
        let store = meshwatch_detector::store::Store::open(&data_dir)?;
        store.load_checkpoint()
    })
    .await
    .map_err(|e| EvalError::Serve(ServeError::Task(e)))?
    .map_err(|e| EvalError::Serve(ServeError::Store(e)))?;
    let anomalies =
        loaded.anomalies.and_then(|b| meshwatch_detector::anomaly::Anomalies::from_bytes(&b)).unwrap_or_default();
    Ok(anomalies
        .iter()
        .map(|a| Detection {
            kind: a.kind.clone(),
            source: a.source.clone(),
            destination: a.destination.clone(),
            direction: a.direction.clone(),
            start_ms: a.started_ms,
            reason: a.reason.clone(),
        })
        .collect())
}

/// Ground truth as JSON lines.
pub fn truth_jsonl(truth: &[Truth]) -> String {
    truth.iter().filter_map(|t| serde_json::to_string(t).ok()).map(|l| l + "\n").collect()
}

/// Counts by kind, for summaries.
pub fn kinds(truth: &[Truth]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for t in truth {
        *out.entry(t.kind.clone()).or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn truth(kind: &str, src: &str, dst: &str, start: i64, end: i64) -> Truth {
        Truth {
            kind: kind.into(),
            source: src.into(),
            destination: dst.into(),
            direction: "east_west".into(),
            start_ms: start,
            end_ms: end,
            via: None,
        }
    }

    fn det(kind: &str, src: &str, dst: &str, start: i64) -> Detection {
        Detection {
            kind: kind.into(),
            source: src.into(),
            destination: dst.into(),
            direction: "east_west".into(),
            start_ms: start,
            reason: String::new(),
        }
    }

    #[test]
    fn a_hand_made_case_scores_as_counted_by_hand() {
        let t = vec![
            truth("latency_shift", "a", "b", 1_000_000, 2_000_000),
            truth("latency_shift", "c", "d", 5_000_000, 6_000_000),
            truth("error_burst", "a", "b", 3_000_000, 3_600_000),
            truth("fan_out_scan", "x", "*", 8_000_000, 8_600_000),
        ];
        let d = vec![
            // Detects the first latency shift 30 s in, and again later (both true).
            det("latency_p99", "a", "b", 1_030_000),
            det("latency_p50", "a", "b", 1_500_000),
            // Right pair, wrong kind: a false error_ratio detection.
            det("error_ratio", "a", "b", 1_100_000),
            // The error burst, 20 s in.
            det("error_ratio", "a", "b", 3_020_000),
            // Latency on a pair with no incident: false.
            det("latency_p90", "e", "f", 4_000_000),
            // Too late for the second latency incident (after end + slack): false.
            det("latency_p99", "c", "d", 6_100_000),
            // The scan, seen as a new edge from its source, 10 s in.
            det("new_edge", "x", "b", 8_010_000),
        ];
        let q = score(&t, &d, 100.0, 60_000);
        let by = |k: &str| q.per_kind.iter().find(|r| r.kind == k).cloned().expect(k);
        let lat = by("latency_shift");
        assert_eq!((lat.incidents, lat.detected, lat.recall), (2, 1, Some(0.5)));
        assert_eq!((lat.detections, lat.true_detections), (4, 2));
        assert_eq!(lat.precision, Some(0.5));
        assert_eq!(lat.ttd_median_s, Some(30.0));
        let err = by("error_burst");
        assert_eq!((err.recall, err.precision, err.ttd_median_s), (Some(1.0), Some(0.5), Some(20.0)));
        let scan = by("fan_out_scan");
        assert_eq!((scan.recall, scan.ttd_median_s), (Some(1.0), Some(10.0)));
        // new_edge's home is new_edge: a true detection there, no incident of that kind.
        let new_edge = by("new_edge");
        assert_eq!((new_edge.incidents, new_edge.recall, new_edge.precision), (0, None, Some(1.0)));
        assert_eq!(q.false_detections, 3);
        let second = &q.incidents[1];
        assert_eq!((second.ttd_s, second.detected_as.as_deref()), (None, None));
        assert_eq!((q.incidents[3].ttd_s, q.incidents[3].detected_as.as_deref()), (Some(10.0), Some("new_edge")));
        assert!((q.false_per_1000_pair_days - 30.0).abs() < 1e-9);
    }

    #[test]
    fn the_ideal_test_is_reached_when_counted_by_hand() {
        let cfg = DetectorConfig::default();
        let evidence = |requests, log_ratio_sum, errors| Evidence {
            latency_sigma: 0.5,
            error_ratio: 0.001,
            slices: vec![EvidenceSlice { requests, log_ratio_sum, errors }; 30],
        };
        // Five requests a window at twice the median (σ 0.5): z = ln 2 / 0.5 · √(5w) is 4.38
        // after two windows and 5.37 after three (over 4.75 for 1e-6); hot in windows 3 and
        // 4, so 2 of the last 3 in the fourth.
        let slow = evidence(5, 5.0 * 2f64.ln(), 0);
        assert_eq!(ideal_ttd(IncidentKind::LatencyShift, &slow, &cfg, 10.0), Some(40.0));
        // One error in ten requests a window, against 0.1 %: P(X ≥ 3 of 30) = 4.0e-6 is not
        // below 1e-6, P(X ≥ 4 of 40) = 9.1e-8 is; hot in windows 4 and 5.
        let failing = evidence(10, 0.0, 1);
        assert_eq!(ideal_ttd(IncidentKind::ErrorBurst, &failing, &cfg, 10.0), Some(50.0));
        // Normal traffic is never found; other kinds have no ideal test.
        assert_eq!(ideal_ttd(IncidentKind::LatencyShift, &evidence(5, 0.0, 0), &cfg, 10.0), None);
        assert_eq!(ideal_ttd(IncidentKind::TrafficDrop, &failing, &cfg, 10.0), None);
    }

    #[test]
    fn percentiles_interpolate() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[30.0], 0.5), Some(30.0));
        assert_eq!(percentile(&[30.0, 70.0], 0.5), Some(50.0));
        assert_eq!(percentile(&[10.0, 20.0, 40.0], 0.5), Some(20.0));
        assert_eq!(percentile(&[30.0, 70.0], 0.95), Some(68.0));
    }

    #[test]
    fn no_detections_is_zero_recall_and_no_false_positives() {
        let t = vec![truth("traffic_drop", "a", "b", 0, 10)];
        let q = score(&t, &[], 10.0, 0);
        assert_eq!(q.per_kind.len(), 1);
        assert_eq!(
            (q.per_kind[0].recall, q.per_kind[0].precision, q.per_kind[0].ttd_median_s),
            (Some(0.0), None, None)
        );
        assert_eq!(q.false_per_1000_pair_days, 0.0);
    }
}
