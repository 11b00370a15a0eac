//! The pair table: what meshwatch knows of every pair, and its Prometheus exposition.
//!
//! Written once per closed window by the detector task, read by `/metrics` and the API. The
//! lock is a `std` one, held for map work only, never across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use meshwatch_collector::flow::{Direction, Reporter, ResponseFlags, StatusClass};
use meshwatch_collector::window::{ClosedWindow, DURATION_BUCKETS_S, PairKey, PairStats};
use meshwatch_proto::v1;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};

/// Everything kept for one pair.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairEntry {
    /// Counts since this process started (Prometheus counters start again at a restart).
    pub totals: PairStats,
    /// Event time of the first and last windows with traffic, Unix milliseconds.
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Requests plus connections ever counted, across restarts.
    pub total_flows: u64,
}

#[derive(Debug, Default)]
pub struct PairTable {
    pairs: RwLock<HashMap<PairKey, PairEntry>>,
}

impl PairTable {
    /// A table holding the pairs restored from the store.
    pub fn restore(records: impl IntoIterator<Item = (PairKey, PairEntry)>) -> PairTable {
        PairTable { pairs: RwLock::new(records.into_iter().collect()) }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PairKey, PairEntry>> {
        // A poisoned lock means a panic while counting; the counts are still the best we have.
        self.pairs.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn keys(&self) -> Vec<PairKey> {
        self.read().keys().cloned().collect()
    }

    /// A copy of every pair, sorted by key.
    pub fn snapshot(&self) -> Vec<(PairKey, PairEntry)> {
        let mut all: Vec<_> = self.read().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The pair whose key `matches`, without copying the table.
    pub fn find(&self, matches: impl Fn(&PairKey) -> bool) -> Option<(PairKey, PairEntry)> {
        self.read().iter().find(|(k, _)| matches(k)).map(|(k, e)| (k.clone(), e.clone()))
    }

    pub fn get(&self, key: &PairKey) -> Option<PairEntry> {
        self.read().get(key).cloned()
    }

    /// Folds a closed window in (forgetting the pairs it gives up); returns the records of
    /// the pairs it touched, to persist.
    pub fn apply(&self, window: &ClosedWindow) -> Vec<v1::PairRecord> {
        let mut pairs = self.pairs.write().unwrap_or_else(|e| e.into_inner());
        for key in &window.evicted {
            pairs.remove(key);
        }
        let mut changed = Vec::with_capacity(window.pairs.len());
        for (key, stats) in &window.pairs {
            let entry = pairs
                .entry(key.clone())
                .or_insert_with(|| PairEntry { first_seen_ms: window.start_ms, ..PairEntry::default() });
            entry.totals.merge(stats);
            entry.last_seen_ms = entry.last_seen_ms.max(window.start_ms);
            entry.total_flows = entry.total_flows.saturating_add(stats.flows());
            changed.push(to_record(key, entry));
        }
        changed
    }
}

pub fn direction_to_proto(d: Direction) -> v1::Direction {
    match d {
        Direction::Ingress => v1::Direction::Ingress,
        Direction::EastWest => v1::Direction::EastWest,
        Direction::Egress => v1::Direction::Egress,
    }
}

pub fn reporter_to_proto(r: Reporter) -> v1::Reporter {
    match r {
        Reporter::Source => v1::Reporter::Source,
        Reporter::Destination => v1::Reporter::Destination,
        Reporter::Gateway => v1::Reporter::Gateway,
    }
}

pub fn key_to_proto(key: &PairKey) -> v1::PairKey {
    v1::PairKey {
        source: key.source.to_string(),
        destination: key.destination.to_string(),
        direction: direction_to_proto(key.direction) as i32,
        reporter: reporter_to_proto(key.reporter) as i32,
    }
}

pub fn to_record(key: &PairKey, e: &PairEntry) -> v1::PairRecord {
    v1::PairRecord {
        key: Some(key_to_proto(key)),
        first_seen_ms: e.first_seen_ms,
        last_seen_ms: e.last_seen_ms,
        total_flows: e.total_flows,
    }
}

/// A stored record back into a key and entry; `None` for a record no version wrote.
pub fn from_record(r: &v1::PairRecord) -> Option<(PairKey, PairEntry)> {
    let key = key_from_proto(r.key.as_ref()?)?;
    let entry = PairEntry {
        totals: PairStats::default(),
        first_seen_ms: r.first_seen_ms,
        last_seen_ms: r.last_seen_ms,
        total_flows: r.total_flows,
    };
    Some((key, entry))
}

/// A stored pair key back; `None` for values no version wrote.
pub fn key_from_proto(k: &v1::PairKey) -> Option<PairKey> {
    let direction = match v1::Direction::try_from(k.direction).ok()? {
        v1::Direction::Ingress => Direction::Ingress,
        v1::Direction::EastWest => Direction::EastWest,
        v1::Direction::Egress => Direction::Egress,
        v1::Direction::Unspecified => return None,
    };
    let reporter = match v1::Reporter::try_from(k.reporter).ok()? {
        v1::Reporter::Source => Reporter::Source,
        v1::Reporter::Destination => Reporter::Destination,
        v1::Reporter::Gateway => Reporter::Gateway,
        v1::Reporter::Unspecified => return None,
    };
    Some(PairKey {
        source: Arc::from(k.source.as_str()),
        destination: Arc::from(k.destination.as_str()),
        direction,
        reporter,
    })
}

/// Exposes the pair table as `meshwatch_pair_*` families.
#[derive(Debug)]
pub struct PairCollector {
    table: Arc<PairTable>,
    descs: Vec<Desc>,
}

/// (name, help, type) of every family the collector emits.
const FAMILIES: [(&str, &str, MetricType); 21] = [
    ("meshwatch_pair_requests_total", "HTTP requests per pair, by response status class.", MetricType::COUNTER),
    ("meshwatch_pair_request_duration_seconds", "Duration of HTTP requests per pair.", MetricType::HISTOGRAM),
    (
        "meshwatch_pair_request_bytes_total",
        "HTTP bytes from source to destination (headers and body) per pair.",
        MetricType::COUNTER,
    ),
    (
        "meshwatch_pair_response_bytes_total",
        "HTTP bytes from destination to source (headers and body) per pair.",
        MetricType::COUNTER,
    ),
    ("meshwatch_pair_tcp_connections_total", "TCP connections closed per pair.", MetricType::COUNTER),
    ("meshwatch_pair_tcp_sent_bytes_total", "TCP bytes from source to destination per pair.", MetricType::COUNTER),
    ("meshwatch_pair_tcp_received_bytes_total", "TCP bytes from destination to source per pair.", MetricType::COUNTER),
    (
        "meshwatch_pair_response_flags_total",
        "Requests and connections per pair with an Envoy response flag, by flag.",
        MetricType::COUNTER,
    ),
    (
        "meshwatch_pair_mtls_total",
        "Requests and connections per pair whose caller presented a client certificate.",
        MetricType::COUNTER,
    ),
    (
        "meshwatch_pair_plaintext_total",
        "Requests and connections per pair whose caller presented no client certificate.",
        MetricType::COUNTER,
    ),
    (
        "meshwatch_pair_first_seen_timestamp_seconds",
        "Event time of the first window in which the pair had traffic.",
        MetricType::GAUGE,
    ),
    // From the source's Envoy stats (the stats sink), in `UpstreamCounts::fields` order.
    (
        "meshwatch_pair_upstream_requests_total",
        "Upstream requests per pair, from the source Envoy's cluster stats (upstream_rq_total).",
        MetricType::COUNTER,
    ),
    (
        "meshwatch_pair_upstream_errors_total",
        "Upstream requests answered 5xx per pair, from the source Envoy's cluster stats (upstream_rq_5xx).",
        MetricType::COUNTER,
    ),
    (
        "meshwatch_pair_upstream_timeouts_total",
        "Upstream requests timed out per pair, from the source Envoy's cluster stats (upstream_rq_timeout).",
        MetricType::COUNTER,
    ),
    (
        "meshwatch_pair_upstream_retries_total",
        "Upstream request retries per pair, from the source Envoy's cluster stats (upstream_rq_retry).",
        MetricType::COUNTER,
    ),
    (
        "meshwatch_pair_upstream_connections_total",
        "Upstream connections per pair, from the source Envoy's cluster stats (upstream_cx_total).",
        MetricType::COUNTER,
    ),
    (
        "meshwatch_pair_upstream_connect_failures_total",
        "Upstream connection failures per pair, from the source Envoy's cluster stats (upstream_cx_connect_fail).",
        MetricType::COUNTER,
    ),
    (
        "meshwatch_pair_upstream_pending_overflows_total",
        "Requests refused by the circuit breaker per pair, from the source Envoy's cluster stats (upstream_rq_pending_overflow).",
        MetricType::COUNTER,
    ),
    (
        "meshwatch_pair_upstream_ejections_total",
        "Outlier-detection ejections per pair, from the source Envoy's cluster stats (outlier_detection.ejections_enforced_total).",
        MetricType::COUNTER,
    ),
    (
        "meshwatch_pair_upstream_hosts",
        "Hosts of the upstream cluster per pair at the last stats flush (membership_total).",
        MetricType::GAUGE,
    ),
    (
        "meshwatch_pair_upstream_healthy_hosts",
        "Healthy hosts of the upstream cluster per pair at the last stats flush (membership_healthy).",
        MetricType::GAUGE,
    ),
];

/// Index in `FAMILIES` of the first upstream family.
const UPSTREAM: usize = 11;

pub(crate) const PAIR_LABELS: [&str; 8] = [
    "source",
    "destination",
    "direction",
    "reporter",
    "source_workload_namespace",
    "destination_workload_namespace",
    "source_principal",
    "destination_principal",
];

impl PairCollector {
    pub fn new(table: Arc<PairTable>) -> prometheus::Result<PairCollector> {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _)| {
                let mut labels: Vec<String> = PAIR_LABELS.iter().map(|l| l.to_string()).collect();
                match *name {
                    "meshwatch_pair_requests_total" => labels.push("status_class".into()),
                    "meshwatch_pair_response_flags_total" => labels.push("flag".into()),
                    _ => {}
                }
                Desc::new(name.to_string(), help.to_string(), labels, HashMap::new())
            })
            .collect::<prometheus::Result<Vec<_>>>()?;
        Ok(PairCollector { table, descs })
    }
}

/// One label of an exposed series.
pub(crate) fn label(name: &str, value: &str) -> proto::LabelPair {
    let mut l = proto::LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn pair_labels(k: &PairKey) -> Vec<proto::LabelPair> {
    pair_label_values(k).into_iter().map(|(n, v)| label(n, v)).collect()
}

/// The labels of a pair's series: its key, and (after Istio's label names) the namespaces
/// and SPIFFE principals its identities name, `unknown` where they name none (an egress
/// destination, an ingress source, a name without a namespace).
pub(crate) fn pair_label_values(k: &PairKey) -> [(&'static str, &str); 8] {
    use meshwatch_collector::flow::Direction;
    use meshwatch_collector::identity::namespace_of;
    fn inside(id: &str, side_inside: bool) -> Option<&str> {
        if side_inside { namespace_of(id) } else { None }
    }
    fn principal(id: &str) -> &str {
        if id.starts_with("spiffe://") { id } else { "unknown" }
    }
    let (src, dst) = (&*k.source, &*k.destination);
    [
        ("source", src),
        ("destination", dst),
        ("direction", k.direction.as_str()),
        ("reporter", k.reporter.as_str()),
        ("source_workload_namespace", inside(src, k.direction != Direction::Ingress).unwrap_or("unknown")),
        ("destination_workload_namespace", inside(dst, k.direction != Direction::Egress).unwrap_or("unknown")),
        ("source_principal", principal(src)),
        ("destination_principal", principal(dst)),
    ]
}

fn counter(mut labels: Vec<proto::LabelPair>, extra: Option<(&str, &str)>, value: u64) -> proto::Metric {
    if let Some((n, v)) = extra {
        labels.push(label(n, v));
    }
    let mut c = proto::Counter::default();
    c.set_value(value as f64);
    let mut m = proto::Metric::from_label(labels);
    m.set_counter(c);
    m
}

fn gauge(labels: Vec<proto::LabelPair>, value: f64) -> proto::Metric {
    let mut g = proto::Gauge::default();
    g.set_value(value);
    let mut m = proto::Metric::from_label(labels);
    m.set_gauge(g);
    m
}

fn histogram(labels: Vec<proto::LabelPair>, s: &PairStats) -> proto::Metric {
    let mut cumulative = 0;
    let buckets = DURATION_BUCKETS_S
        .iter()
        .zip(&s.duration_buckets)
        .map(|(le, n)| {
            cumulative += n;
            let mut b = proto::Bucket::default();
            b.set_upper_bound(*le);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut h = proto::Histogram::default();
    h.set_bucket(buckets);
    h.set_sample_count(s.duration_count());
    h.set_sample_sum(s.duration_sum_us as f64 / 1e6);
    let mut m = proto::Metric::from_label(labels);
    m.set_histogram(h);
    m
}

impl Collector for PairCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut metrics: [Vec<proto::Metric>; FAMILIES.len()] = Default::default();
        for (k, e) in self.table.read().iter() {
            let s = &e.totals;
            let labels = pair_labels(k);
            for class in StatusClass::ALL {
                let n = s.requests[class as usize];
                if n > 0 {
                    metrics[0].push(counter(labels.clone(), Some(("status_class", class.as_str())), n));
                }
            }
            if s.duration_count() > 0 {
                metrics[1].push(histogram(labels.clone(), s));
            }
            if s.total_requests() > 0 {
                metrics[2].push(counter(labels.clone(), None, s.request_bytes));
                metrics[3].push(counter(labels.clone(), None, s.response_bytes));
            }
            if s.tcp_connections > 0 {
                metrics[4].push(counter(labels.clone(), None, s.tcp_connections));
                metrics[5].push(counter(labels.clone(), None, s.tcp_sent_bytes));
                metrics[6].push(counter(labels.clone(), None, s.tcp_received_bytes));
            }
            for (i, name) in ResponseFlags::NAMES.iter().enumerate() {
                if s.response_flags[i] > 0 {
                    metrics[7].push(counter(labels.clone(), Some(("flag", name)), s.response_flags[i]));
                }
            }
            if s.flows() > 0 {
                metrics[8].push(counter(labels.clone(), None, s.mtls));
                metrics[9].push(counter(labels.clone(), None, s.flows().saturating_sub(s.mtls)));
            }
            let up = &s.upstream;
            if up.flushes > 0 {
                for (i, (_, n)) in up.counts.fields().into_iter().enumerate() {
                    metrics[UPSTREAM + i].push(counter(labels.clone(), None, n));
                }
            }
            if let Some((hosts, healthy)) = up.hosts {
                metrics[UPSTREAM + 8].push(gauge(labels.clone(), hosts as f64));
                metrics[UPSTREAM + 9].push(gauge(labels.clone(), healthy as f64));
            }
            metrics[10].push(gauge(labels, e.first_seen_ms as f64 / 1000.0));
        }
        FAMILIES
            .iter()
            .zip(metrics)
            .filter(|(_, m)| !m.is_empty())
            .map(|((name, help, kind), m)| family(name, help, *kind, m))
            .collect()
    }
}

/// A metric family of the given series.
pub(crate) fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: &str) -> PairKey {
        PairKey {
            source: Arc::from(src),
            destination: Arc::from("b"),
            direction: Direction::EastWest,
            reporter: Reporter::Destination,
        }
    }

    #[test]
    fn series_carry_namespaces_and_principals_as_istio_names_them() {
        let k = PairKey {
            source: Arc::from("spiffe://mesh.test/ns/shop/sa/web"),
            destination: Arc::from("reviews.shop"),
            direction: Direction::EastWest,
            reporter: Reporter::Source,
        };
        let labels: std::collections::HashMap<_, _> = pair_label_values(&k).into_iter().collect();
        assert_eq!(labels["source_workload_namespace"], "shop");
        assert_eq!(labels["destination_workload_namespace"], "shop");
        assert_eq!(labels["source_principal"], "spiffe://mesh.test/ns/shop/sa/web");
        assert_eq!(labels["destination_principal"], "unknown");
        // An outside destination has no namespace, whatever its name looks like.
        let egress = PairKey { destination: Arc::from("partner.example"), direction: Direction::Egress, ..k };
        assert_eq!(pair_label_values(&egress)[5], ("destination_workload_namespace", "unknown"));
    }

    #[test]
    fn records_round_trip() {
        let e = PairEntry { first_seen_ms: 10, last_seen_ms: 20, total_flows: 7, ..Default::default() };
        let r = to_record(&key("a"), &e);
        assert_eq!(from_record(&r), Some((key("a"), e)));
        let mut bad = r.clone();
        bad.key.as_mut().expect("key").direction = 0;
        assert_eq!(from_record(&bad), None);
    }

    #[test]
    fn apply_keeps_first_seen_and_counts_flows() {
        let t = PairTable::default();
        let mut s = PairStats::default();
        s.requests[2] = 3;
        s.tcp_connections = 1;
        let w = |start| ClosedWindow {
            start_ms: start,
            end_ms: start + 10,
            pairs: vec![(key("a"), s.clone())],
            evicted: Vec::new(),
            ..Default::default()
        };
        t.apply(&w(100));
        let changed = t.apply(&w(200));
        assert_eq!(changed.len(), 1);
        let e = t.get(&key("a")).expect("pair");
        assert_eq!((e.first_seen_ms, e.last_seen_ms, e.total_flows), (100, 200, 8));
        assert_eq!(e.totals.requests[2], 6);
    }
}
