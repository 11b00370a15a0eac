//! The detector's exposition: per pair and signal, the anomaly score and the observed value
//! beside the expected value and band (so dashboards can draw them), and anomalies by signal.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};

use crate::anomaly::in_units;
use crate::pairs::{family, label};
use crate::score::Detector;

const PAIR_SIGNAL: [&str; 5] = ["source", "destination", "direction", "reporter", "signal"];

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
                let labels = [
                    ("source", &*k.source),
                    ("destination", &*k.destination),
                    ("direction", k.direction.as_str()),
                    ("reporter", k.reporter.as_str()),
                    ("signal", v.signal.as_str()),
                ];
                let (observed, expected, lower, upper) = in_units(v, d.window_ms);
                for (i, value) in [v.score(), observed, expected, lower, upper].into_iter().enumerate() {
                    metrics[i].push(gauge(&labels, value));
                }
            }
        }
        metrics[5].push(gauge(&[], f64::from(learning)));
        let mut active: BTreeMap<(String, String), u32> = BTreeMap::new();
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
