//! Anomaly records: one per pair (source, destination, direction) and signal while it lasts,
//! shared by the reporters that see it, with a reason a human can read. Zero-trust findings
//! (`crate::trust`) are records of the same shape whose signal is their kind.

use std::collections::{HashMap, VecDeque};

use meshwatch_collector::window::PairKey;
use serde::{Deserialize, Serialize};

use crate::model::{Signal, Verdict};

/// Anomalies kept (active ones and the most recent ended ones).
pub const MAX_KEPT: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Anomaly {
    pub id: u64,
    /// `request_rate_high`, `vanished`, `error_ratio`, `latency_p99`, …
    pub kind: String,
    pub signal: String,
    pub source: String,
    pub destination: String,
    pub direction: String,
    /// Which proxies' views show it (`source`, `destination`, `gateway`).
    pub reporters: Vec<String>,
    /// `critical` or `warning`.
    pub severity: String,
    /// When the detection was made: the end of the window that completed k of n.
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    /// At detection: observed and expected values and the band, in the signal's unit (per
    /// second for rates and bytes, a ratio, seconds for latency).
    pub observed: f64,
    pub expected: f64,
    pub lower: f64,
    pub upper: f64,
    pub score: f64,
    pub reason: String,
}

/// The unit-converted values of a verdict: (observed, expected, lower, upper).
pub fn in_units(v: &Verdict, window_ms: i64) -> (f64, f64, f64, f64) {
    let a = &v.assessment;
    let seconds = v.scale as f64 * window_ms as f64 / 1000.0;
    let f = match v.signal {
        Signal::LatencyP50 | Signal::LatencyP90 | Signal::LatencyP99 => 1e-6,
        s if ratio_name(s).is_some() => 1.0,
        // Counts and bytes, per second.
        _ => 1.0 / seconds,
    };
    (a.observed * f, a.expected * f, a.lower * f, a.upper * f)
}

/// What a ratio signal is called in a reason; `None` for the other signals.
fn ratio_name(s: Signal) -> Option<&'static str> {
    Some(match s {
        Signal::ErrorRatio => "error ratio",
        Signal::DenialRatio => "denial ratio",
        Signal::RateLimitRatio => "rate-limited ratio",
        Signal::UpstreamErrorRatio => "upstream 5xx ratio (Envoy stats)",
        Signal::UpstreamTimeoutRatio => "upstream timeout ratio (Envoy stats)",
        Signal::UpstreamRetryRatio => "retries per upstream request (Envoy stats)",
        Signal::ConnectFailureRatio => "connection failure ratio (Envoy stats)",
        Signal::PendingOverflowRatio => "circuit-breaker overflow ratio (Envoy stats)",
        Signal::UnhealthyHostShare => "unhealthy host share (Envoy stats)",
        _ => return None,
    })
}

fn duration_text(seconds: f64) -> String {
    if seconds >= 60.0 { format!("{:.0} min", seconds / 60.0) } else { format!("{seconds:.0} s") }
}

fn latency_text(seconds: f64) -> String {
    if seconds >= 1.0 { format!("{seconds:.2} s") } else { format!("{:.0} ms", seconds * 1000.0) }
}

/// Bytes for people: `1.2 MB`.
pub fn bytes_text(b: f64) -> String {
    match b {
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}

/// One line that says what is wrong, against what was expected.
pub fn reason(v: &Verdict, window_ms: i64) -> String {
    let a = &v.assessment;
    let span = duration_text(v.scale as f64 * window_ms as f64 / 1000.0);
    let times = |o: f64, e: f64| if e > 0.0 { format!("{:.1}×", o / e) } else { "far above".into() };
    match v.signal {
        Signal::RequestRate | Signal::ConnectionRate | Signal::UpstreamRequestRate => {
            let what = match v.signal {
                Signal::RequestRate => "requests",
                Signal::ConnectionRate => "connections",
                _ => "upstream requests (Envoy stats)",
            };
            if a.observed == 0.0 && !a.high {
                format!("no {what} in {span}; {:.0} expected", a.expected)
            } else {
                format!(
                    "{:.0} {what} in {span}, {} the {:.0} expected (normal {:.0} to {:.0})",
                    a.observed,
                    times(a.observed, a.expected),
                    a.expected,
                    a.lower,
                    a.upper
                )
            }
        }
        Signal::OutlierEjections => {
            format!("{:.0} outlier ejections in {span} (Envoy stats), {:.1} expected", a.observed, a.expected)
        }
        Signal::LatencyP50 | Signal::LatencyP90 | Signal::LatencyP99 => {
            let q = &v.signal.as_str()["latency_".len()..];
            format!(
                "latency {q} {} over {span}, {} the {} expected (normal up to {})",
                latency_text(a.observed / 1e6),
                times(a.observed, a.expected),
                latency_text(a.expected / 1e6),
                latency_text(a.upper / 1e6)
            )
        }
        Signal::BytesOut | Signal::BytesIn => {
            let what = if v.signal == Signal::BytesOut { "sent" } else { "received" };
            format!(
                "{} {what} in {span}, {} the {} expected",
                bytes_text(a.observed),
                times(a.observed, a.expected),
                bytes_text(a.expected)
            )
        }
        // The ratios.
        s => format!(
            "{} {:.2} % over {span}, {:.2} % expected (normal up to {:.2} %)",
            ratio_name(s).unwrap_or("ratio"),
            a.observed * 100.0,
            a.expected * 100.0,
            a.upper * 100.0
        ),
    }
}

fn severity(kind: &str) -> &'static str {
    match kind {
        "error_ratio"
        | "vanished"
        | "request_rate_low"
        | "connection_rate_low"
        | "denial_ratio"
        | "bytes_out_high"
        | "upstream_error_ratio"
        | "upstream_vanished"
        | "connect_failure_ratio" => "critical",
        _ => "warning",
    }
}

type IndexKey = (String, String, String, String);

/// A zero-trust finding as it becomes a record (see `crate::trust`).
#[derive(Clone, Debug, PartialEq)]
pub struct FindingRecord {
    pub kind: &'static str,
    pub source: String,
    pub destination: String,
    pub direction: &'static str,
    pub reporters: Vec<String>,
    pub severity: &'static str,
    pub observed: f64,
    pub expected: f64,
    pub reason: String,
}

/// Active and recent anomalies.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Anomalies {
    next_id: u64,
    list: VecDeque<Anomaly>,
    /// (source, destination, direction, signal) → id, while active.
    #[serde(skip)]
    active: HashMap<IndexKey, u64>,
}

impl Anomalies {
    /// Rebuilds the index of active anomalies after loading.
    pub fn reindex(&mut self) {
        self.active = self
            .list
            .iter()
            .filter(|a| a.ended_ms.is_none())
            .map(|a| ((a.source.clone(), a.destination.clone(), a.direction.clone(), a.signal.clone()), a.id))
            .collect();
    }

    fn find(&mut self, id: u64) -> Option<&mut Anomaly> {
        self.list.iter_mut().rev().find(|a| a.id == id)
    }

    fn index_key(key: &PairKey, signal: Signal) -> IndexKey {
        (
            key.source.to_string(),
            key.destination.to_string(),
            key.direction.as_str().to_string(),
            signal.as_str().to_string(),
        )
    }

    /// A detection fired for `key`; joins the pair's active anomaly of that signal if another
    /// reporter raised it first. Returns whether a new anomaly started.
    pub fn fire(&mut self, key: &PairKey, v: &Verdict, at_ms: i64, window_ms: i64) -> bool {
        let index = Self::index_key(key, v.signal);
        let reporter = key.reporter.as_str().to_string();
        if let Some(&id) = self.active.get(&index) {
            if let Some(a) = self.find(id)
                && !a.reporters.contains(&reporter)
            {
                a.reporters.push(reporter);
            }
            return false;
        }
        let (observed, expected, lower, upper) = in_units(v, window_ms);
        self.push(
            index,
            Anomaly {
                id: 0,
                kind: v.kind.to_string(),
                signal: v.signal.as_str().to_string(),
                source: String::new(),
                destination: String::new(),
                direction: String::new(),
                reporters: vec![reporter],
                severity: severity(v.kind).to_string(),
                started_ms: at_ms,
                ended_ms: None,
                observed,
                expected,
                lower,
                upper,
                score: v.score(),
                reason: reason(v, window_ms),
            },
        );
        true
    }

    /// A zero-trust finding: starts a record, or joins the active one of the same kind on the
    /// same pair (adding reporters). Returns whether a new record started.
    pub fn raise(&mut self, f: FindingRecord, at_ms: i64) -> bool {
        let index = (f.source.clone(), f.destination.clone(), f.direction.to_string(), f.kind.to_string());
        if let Some(&id) = self.active.get(&index) {
            if let Some(a) = self.find(id) {
                for r in f.reporters {
                    if !a.reporters.contains(&r) {
                        a.reporters.push(r);
                    }
                }
            }
            return false;
        }
        self.push(
            index,
            Anomaly {
                id: 0,
                kind: f.kind.to_string(),
                signal: f.kind.to_string(),
                source: String::new(),
                destination: String::new(),
                direction: String::new(),
                reporters: f.reporters,
                severity: f.severity.to_string(),
                started_ms: at_ms,
                ended_ms: None,
                observed: f.observed,
                expected: f.expected,
                lower: 0.0,
                upper: f.expected,
                score: 1.0,
                reason: f.reason,
            },
        );
        true
    }

    /// Ends the active record of `signal` (a finding kind) on a pair, whoever reported it.
    pub fn end(&mut self, source: &str, destination: &str, direction: &str, signal: &str, at_ms: i64) -> bool {
        let index = (source.to_string(), destination.to_string(), direction.to_string(), signal.to_string());
        let Some(id) = self.active.remove(&index) else { return false };
        if let Some(a) = self.find(id) {
            a.ended_ms = Some(at_ms);
        }
        true
    }

    /// Whether a record of `signal` is active on a pair.
    pub fn is_active(&self, source: &str, destination: &str, direction: &str, signal: &str) -> bool {
        self.active.contains_key(&(
            source.to_string(),
            destination.to_string(),
            direction.to_string(),
            signal.to_string(),
        ))
    }

    /// Adds a new record under `index` (which names its pair and signal), keeping the list
    /// bounded.
    fn push(&mut self, index: IndexKey, mut anomaly: Anomaly) {
        self.next_id += 1;
        anomaly.id = self.next_id;
        (anomaly.source, anomaly.destination, anomaly.direction) = (index.0.clone(), index.1.clone(), index.2.clone());
        self.active.insert(index, anomaly.id);
        self.list.push_back(anomaly);
        while self.list.len() > MAX_KEPT {
            // Drop the oldest ended anomaly; active ones are kept.
            match self.list.iter().position(|a| a.ended_ms.is_some()) {
                Some(pos) => {
                    self.list.remove(pos);
                }
                None => break,
            }
        }
    }

    /// `key`'s view of `signal` is back to normal; the anomaly ends when no reporter still
    /// sees it. Returns whether one ended.
    pub fn clear(&mut self, key: &PairKey, signal: Signal, at_ms: i64) -> bool {
        let index = Self::index_key(key, signal);
        let Some(&id) = self.active.get(&index) else { return false };
        let reporter = key.reporter.as_str();
        let Some(a) = self.find(id) else { return false };
        a.reporters.retain(|r| r != reporter);
        if a.reporters.is_empty() {
            a.ended_ms = Some(at_ms);
            self.active.remove(&index);
            return true;
        }
        false
    }

    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Anomaly> {
        self.list.iter()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Anomalies> {
        let mut a: Anomalies = postcard::from_bytes(bytes).ok()?;
        a.reindex();
        Some(a)
    }
}
