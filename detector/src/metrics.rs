//! The detector's exposition: per pair and signal, the anomaly score and the observed value
//! beside the expected value and band (so dashboards can draw them), and anomalies by signal.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};

use crate::anomaly::in_units;
use crate::pairs::{family, label};
use crate::score::Detector;

/// A pair's labels, then the signal.
const PAIR_SIGNAL: [&str; 9] = {
    let l = crate::pairs::PAIR_LABELS;
    [l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], "signal"]
};

/// (name, help, labels) of every family.
const FAMILIES: [(&str, &str, &[&str]); 11] = [
    (
        "meshwatch_pair_anomaly_score",
        "Anomaly score of a pair's signal in the last window: one minus the tail probability, in [0, 1].",
        &PAIR_SIGNAL,
    ),
    (
        "meshwatch_pair_signal_observed",
        "Observed value of a pair's signal (rates and bytes per second, ratios, latency in seconds), at the scale scored.",
        &PAIR_SIGNAL,
    ),
    (
        "meshwatch_pair_signal_expected",
        "Expected value of a pair's signal, in the unit of meshwatch_pair_signal_observed.",
        &PAIR_SIGNAL,
    ),
    ("meshwatch_pair_signal_lower", "Lower edge of the normal band of a pair's signal.", &PAIR_SIGNAL),
    ("meshwatch_pair_signal_upper", "Upper edge of the normal band of a pair's signal.", &PAIR_SIGNAL),
    ("meshwatch_pairs_learning", "Pairs still learning their baselines (no anomalies raised yet).", &[]),
    (
        "meshwatch_anomalies_active",
        "Active anomalies and zero-trust findings, by signal (a finding's signal is its kind) and direction.",
        &["signal", "direction"],
    ),
    ("meshwatch_edges_known", "Edges (source, destination, direction) in the first-seen book.", &[]),
    (
        "meshwatch_zero_trust_learning",
        "1 while the zero-trust learning period runs (new edges are learnt, not reported), else 0.",
        &[],
    ),
    ("meshwatch_alerts", "Alerts by state (resolved ones are kept for a while).", &["state"]),
    (
        "meshwatch_findings_total",
        "Zero-trust findings raised since the store was created, by kind and direction.",
        &["kind", "direction"],
    ),
];

/// Index of the first counter family; the ones before are gauges.
const FIRST_COUNTER: usize = 10;

#[derive(Debug)]
pub struct DetectorCollector {
    detector: Arc<Mutex<Detector>>,
    descs: Vec<Desc>,
}

impl DetectorCollector {
    pub fn new(detector: Arc<Mutex<Detector>>) -> prometheus::Result<DetectorCollector> {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, labels)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    labels.iter().map(|l| l.to_string()).collect(),
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<_>>()?;
        Ok(DetectorCollector { detector, descs })
    }
}

fn gauge(labels: &[(&str, &str)], value: f64) -> proto::Metric {
    let pairs = labels.iter().map(|(n, v)| label(n, v)).collect();
    let mut g = proto::Gauge::default();
    g.set_value(value);
    let mut m = proto::Metric::from_label(pairs);
    m.set_gauge(g);
    m
}

impl Collector for DetectorCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut metrics: [Vec<proto::Metric>; FAMILIES.len()] = Default::default();
        let d = crate::lock(&self.detector);
        let mut learning = 0;
        for (k, model) in d.models() {
            if model.learning(&d.cfg) {
                learning += 1;
                continue;
            }
            for v in model.last_verdicts() {
                let [l0, l1, l2, l3, l4, l5, l6, l7] = crate::pairs::pair_label_values(k);
                let labels = [l0, l1, l2, l3, l4, l5, l6, l7, ("signal", v.signal.as_str())];
                let (observed, expected, lower, upper) = in_units(v, d.window_ms);
                for (i, value) in [v.score(), observed, expected, lower, upper].into_iter().enumerate() {
                    metrics[i].push(gauge(&labels, value));
                }
            }
        }
        metrics[5].push(gauge(&[], f64::from(learning)));
        // Every signal, finding kind and direction, at zero when none is active.
        let mut active: BTreeMap<(String, String), u32> = BTreeMap::new();
        let names = crate::model::Signal::ALL.iter().map(|s| s.as_str()).chain(crate::trust::KINDS);
        for name in names {
            for dir in meshwatch_collector::flow::Direction::ALL {
                active.insert((name.to_string(), dir.as_str().to_string()), 0);
            }
        }
        for a in d.anomalies.iter().filter(|a| a.ended_ms.is_none()) {
            *active.entry((a.signal.clone(), a.direction.clone())).or_default() += 1;
        }
        for ((signal, direction), n) in active {
            metrics[6].push(gauge(&[("signal", &signal), ("direction", &direction)], f64::from(n)));
        }
        metrics[7].push(gauge(&[], d.trust.edges().count() as f64));
        let learning = d.last_start_ms.is_none_or(|t| !d.trust.learned(t));
        metrics[8].push(gauge(&[], f64::from(u8::from(learning))));
        for state in [crate::alert::State::Pending, crate::alert::State::Firing, crate::alert::State::Resolved] {
            metrics[9].push(gauge(&[("state", state.as_str())], d.alerts.count(state) as f64));
        }
        let mut raised: Vec<_> = d.trust.raised().collect();
        raised.sort();
        for ((kind, direction), n) in raised {
            let mut c = proto::Counter::default();
            c.set_value(*n as f64);
            let mut m = proto::Metric::from_label(vec![label("kind", kind), label("direction", direction)]);
            m.set_counter(c);
            metrics[10].push(m);
        }
        FAMILIES
            .iter()
            .zip(metrics)
            .enumerate()
            .filter(|(_, (_, m))| !m.is_empty())
            .map(|(i, ((name, help, _), m))| {
                let kind = if i >= FIRST_COUNTER { MetricType::COUNTER } else { MetricType::GAUGE };
                family(name, help, kind, m)
            })
            .collect()
    }
}

/// The process's own CPU time, resident memory, open file descriptors and start time, read
/// from `/proc/self` at each scrape (Linux; nothing elsewhere), under the standard names.
#[derive(Debug)]
pub struct ProcessCollector {
    descs: Vec<Desc>,
    start_time_s: f64,
}

/// Clock ticks per second of `/proc/PID/stat` times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
const CLOCK_TICKS: f64 = 100.0;
/// Bytes of a memory page in `/proc/PID/statm` (4 KiB on the platforms meshwatch runs on).
const PAGE_BYTES: f64 = 4096.0;

const PROCESS_FAMILIES: [(&str, &str, MetricType); 4] = [
    ("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", MetricType::COUNTER),
    ("process_resident_memory_bytes", "Resident memory size in bytes.", MetricType::GAUGE),
    ("process_open_fds", "Number of open file descriptors.", MetricType::GAUGE),
    ("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", MetricType::GAUGE),
];

impl ProcessCollector {
    pub fn new() -> prometheus::Result<ProcessCollector> {
        let descs = PROCESS_FAMILIES
            .iter()
            .map(|(name, help, _)| Desc::new(name.to_string(), help.to_string(), vec![], HashMap::new()))
            .collect::<prometheus::Result<_>>()?;
        let start_time_s =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64().floor());
        Ok(ProcessCollector { descs, start_time_s })
    }
}

/// utime + stime from `/proc/self/stat` (fields 14 and 15, after the command in parentheses).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / CLOCK_TICKS)
}

fn resident_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    Some(statm.split_whitespace().nth(1)?.parse::<f64>().ok()? * PAGE_BYTES)
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as f64).ok();
        let values = [cpu_seconds(), resident_bytes(), fds, Some(self.start_time_s)];
        PROCESS_FAMILIES
            .iter()
            .zip(values)
            .filter_map(|((name, help, kind), v)| {
                let v = v?;
                let mut m = proto::Metric::default();
                if *kind == MetricType::COUNTER {
                    let mut c = proto::Counter::default();
                    c.set_value(v);
                    m.set_counter(c);
                } else {
                    let mut g = proto::Gauge::default();
                    g.set_value(v);
                    m.set_gauge(g);
                }
                Some(family(name, help, *kind, vec![m]))
            })
            .collect()
    }
}
