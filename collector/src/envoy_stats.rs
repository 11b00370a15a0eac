//! Envoy's stats (the `envoy.stat_sinks.metrics_service` sink) into upstream records: what
//! each Envoy's cluster stats say about the service behind the cluster. Pure: no I/O, the
//! caller passes the time.
//!
//! Both names Envoy can send are read: raw dotted names
//! (`cluster.outbound|9080||reviews.default.svc.cluster.local.upstream_rq_total`) and
//! tag-extracted names with labels (`cluster.upstream_rq_total` with `envoy.cluster_name`,
//! `emit_tags_as_labels`). Counters are cumulative (Envoy's default) or deltas
//! (`report_counters_as_deltas`); cumulative ones become increments against the last value
//! seen from the same node, and a counter that went down (Envoy restarted) starts again from
//! zero. Only the cluster stats below are read; the rest of Envoy's stats are ignored, but
//! for Istio's own request metrics, which say who the clusters' callees are (`IstioAlias`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::io::prometheus::client::{Metric, MetricFamily, MetricType};

use crate::flow::{Direction, Identity, Reporter, UpstreamCounts, UpstreamRecord};
use crate::identity::{Evidence, Interner, MeshConfig, NodeContext, Pattern, Resolver, istio_cluster_host};

/// The full path of the one method.
pub const STREAM_METRICS_PATH: &str = "/envoy.service.metrics.v3.MetricsService/StreamMetrics";

/// How an Envoy reports counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterMode {
    /// The value since Envoy started (Envoy's default).
    Cumulative,
    /// The increment since the previous flush (`report_counters_as_deltas: true`).
    Delta,
}

impl CounterMode {
    pub fn parse(s: &str) -> Option<CounterMode> {
        match s {
            "cumulative" => Some(CounterMode::Cumulative),
            "delta" => Some(CounterMode::Delta),
            _ => None,
        }
    }
}

/// Node metadata key with which one Envoy says how it reports counters (`delta` or
/// `cumulative`), overriding `StatsConfig::counters`.
pub const COUNTERS_METADATA_KEY: &str = "meshwatch_counters";

/// Settings of the stats sink, validated.
#[derive(Clone, Debug)]
pub struct StatsConfig {
    /// How Envoys report counters unless their node metadata says otherwise.
    pub counters: CounterMode,
    /// Clusters whose stats are not a pair: the control plane, meshwatch itself, inbound
    /// clusters (the local workload).
    pub ignore_clusters: Vec<Pattern>,
    /// Nodes and (node, cluster) pairs whose cumulative counters are remembered, one node's
    /// clusters at most an eighth of them; beyond, new ones are rejected (`state_full`) until
    /// idle nodes are forgotten (after an hour, or after a minute while the book is full).
    pub max_tracked_clusters: usize,
}

impl Default for StatsConfig {
    fn default() -> Self {
        let ignore = [
            "inbound|*",
            "meshwatch*",
            "xds-grpc",
            "xds_cluster",
            "sds-grpc",
            "prometheus_stats",
            "agent",
            "BlackHoleCluster",
            "InboundPassthroughCluster*",
        ];
        StatsConfig {
            counters: CounterMode::Cumulative,
            ignore_clusters: ignore.into_iter().map(Pattern::new).collect(),
            max_tracked_clusters: 40_000,
        }
    }
}

/// Why a sample (one metric of a family) was not used. Label values of
/// `meshwatch_envoy_stats_rejected_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatsRejection {
    /// The family's type is not one Prometheus' protobuf format defines.
    UnknownType,
    /// A stat meshwatch reads, with a type it does not have (a gauge for a counter).
    WrongType,
    /// NaN, infinite, negative, or no value.
    BadValue,
    /// A cluster stat without the cluster (`envoy.cluster_name` missing), or with one longer
    /// than `MAX_CLUSTER_NAME_BYTES`.
    BadName,
    /// Sent before the stream's identifier: the reporting node is unknown.
    NoIdentifier,
    /// More (node, cluster) counters than `max_tracked_clusters`.
    StateFull,
}

impl StatsRejection {
    pub const ALL: [StatsRejection; 6] = [
        StatsRejection::UnknownType,
        StatsRejection::WrongType,
        StatsRejection::BadValue,
        StatsRejection::BadName,
        StatsRejection::NoIdentifier,
        StatsRejection::StateFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StatsRejection::UnknownType => "unknown_type",
            StatsRejection::WrongType => "wrong_type",
            StatsRejection::BadValue => "bad_value",
            StatsRejection::BadName => "bad_name",
            StatsRejection::NoIdentifier => "no_identifier",
            StatsRejection::StateFull => "state_full",
        }
    }
}

/// The cluster stats that are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stat {
    /// One of `UpstreamCounts`' fields, by index.
    Counter(usize),
    HostsTotal,
    HostsHealthy,
}

/// Stat names after `cluster.<name>.` (raw) and after `cluster.` (tag-extracted), with what
/// they are. The 5xx counter's tag-extracted form is `cluster.upstream_rq_xx` with
/// `envoy.response_code_class="5"`, handled apart.
const STATS: [(&str, Stat); 10] = [
    ("upstream_rq_total", Stat::Counter(0)),
    ("upstream_rq_5xx", Stat::Counter(1)),
    ("upstream_rq_timeout", Stat::Counter(2)),
    ("upstream_rq_retry", Stat::Counter(3)),
    ("upstream_cx_total", Stat::Counter(4)),
    ("upstream_cx_connect_fail", Stat::Counter(5)),
    ("upstream_rq_pending_overflow", Stat::Counter(6)),
    ("outlier_detection.ejections_enforced_total", Stat::Counter(7)),
    ("membership_total", Stat::HostsTotal),
    ("membership_healthy", Stat::HostsHealthy),
];

const CLUSTER_NAME_TAG: &str = "envoy.cluster_name";
/// The tag Istio's proxies use instead (they turn Envoy's default tags off).
const ISTIO_CLUSTER_NAME_TAG: &str = "cluster_name";
/// Longer cluster names are refused (`bad_name`): they are remembered per node.
pub const MAX_CLUSTER_NAME_BYTES: usize = 1024;
const CODE_CLASS_TAG: &str = "envoy.response_code_class";
const ISTIO_CODE_CLASS_TAG: &str = "response_code_class";

/// Sub-scopes of a cluster's stats that repeat its counters (`cluster.X.internal.
/// upstream_rq_5xx`, `cluster.X.zone.a.b.upstream_rq_5xx`, the retried requests' `cluster.X.
/// retry.upstream_rq_5xx`): not the cluster's own.
fn is_sub_scope(candidate: &str) -> bool {
    [".internal", ".external", ".canary", ".retry"].iter().any(|s| candidate.ends_with(s))
        || candidate.contains(".zone.")
}

/// A sample that names a stat of a cluster.
#[derive(Debug, PartialEq)]
struct ClusterSample<'a> {
    /// A slice of the name or the label, or put back together from both (see `classify`).
    cluster: Cow<'a, str>,
    stat: Stat,
}

/// The value of a sample's label `key`.
fn label_value<'a>(metric: &'a Metric, key: &str) -> Option<&'a str> {
    metric.label.iter().find(|l| l.name.as_deref() == Some(key)).and_then(|l| l.value.as_deref())
}

/// The stat a tag-extracted name ends with, and what comes before it (`shop.svc` of
/// `shop.svc.upstream_rq_total`; empty when the name is the stat alone).
fn tagged_stat<'a>(rest: &'a str, metric: &Metric) -> Option<(&'a str, Stat)> {
    let split = |suffix: &str| -> Option<&'a str> {
        if rest == suffix {
            return Some("");
        }
        rest.strip_suffix(suffix).and_then(|r| r.strip_suffix('.'))
    };
    let label = |key: &str| label_value(metric, key);
    // The 5xx counter: Envoy's tag leaves `upstream_rq_xx` and the class `5`; Istio's leaves
    // `upstream_rq` and the class `5xx` (`upstream_rq` with a `response_code` is one code).
    if let Some(middle) = split("upstream_rq_xx") {
        return (label(CODE_CLASS_TAG) == Some("5")).then_some((middle, Stat::Counter(1)));
    }
    if let Some(middle) = split("upstream_rq") {
        return (label(ISTIO_CODE_CLASS_TAG) == Some("5xx")).then_some((middle, Stat::Counter(1)));
    }
    STATS.iter().find_map(|(suffix, stat)| split(suffix).map(|middle| (middle, *stat)))
}

/// What a family's name (and a sample's labels) say: a stat of a cluster, nothing read, or a
/// cluster stat that does not name its cluster.
///
/// With tags as labels, the cluster is the `envoy.cluster_name` label (Envoy's default tag)
/// or the `cluster_name` label (Istio's). Both tags' expressions stop at the first dot of
/// names they do not know (Envoy's at any dot: `outbound|8443||payments.shop…` gives the tag
/// `outbound|8443||payments` and the name `cluster.shop….upstream_rq_total`; Istio's past a
/// `….svc.cluster.local`, but not in `partner.example`): what is left between `cluster.` and
/// the stat is the rest of the cluster's name, and is put back after the label.
fn classify<'a>(name: &'a str, metric: &'a Metric) -> Result<Option<ClusterSample<'a>>, StatsRejection> {
    let Some(rest) = name.strip_prefix("cluster.") else { return Ok(None) };
    let label = |key: &str| label_value(metric, key);
    let tag = label(CLUSTER_NAME_TAG).or_else(|| label(ISTIO_CLUSTER_NAME_TAG));
    let tagged = tagged_stat(rest, metric);
    match (tag, tagged) {
        (Some(tag), Some((middle, stat))) => {
            let cluster = if middle.is_empty() { Cow::Borrowed(tag) } else { Cow::Owned(format!("{tag}.{middle}")) };
            if tag.is_empty() || cluster.len() > MAX_CLUSTER_NAME_BYTES {
                return Err(StatsRejection::BadName);
            }
            return Ok((!is_sub_scope(&cluster)).then_some(ClusterSample { cluster, stat }));
        }
        // A tagged stat whose cluster tag is gone.
        (None, Some(("", _))) => return Err(StatsRejection::BadName),
        (Some(_), None) => return Ok(None),
        _ => {}
    }
    if rest.ends_with("upstream_rq_xx") || rest.ends_with("upstream_rq") {
        return Ok(None);
    }
    // Raw: `<cluster>.<stat>`, the cluster name possibly dotted.
    for (suffix, stat) in STATS {
        if let Some(cluster) = rest.strip_suffix(suffix).and_then(|c| c.strip_suffix('.')) {
            if cluster.is_empty() || cluster.len() > MAX_CLUSTER_NAME_BYTES {
                return Err(StatsRejection::BadName);
            }
            return Ok((!is_sub_scope(cluster)).then_some(ClusterSample { cluster: Cow::Borrowed(cluster), stat }));
        }
    }
    Ok(None)
}

/// Istio's standard metrics that a source proxy reports per callee: with a callee's service
/// and, over mTLS, its principal.
const ISTIO_METRICS: [&str; 2] = ["istio_requests_total", "istio_tcp_connections_opened_total"];

/// Aliases a stream remembers (services of one node's callees); more are not learnt.
pub const MAX_ALIASES: usize = 4_096;

/// What one sample of Istio's metrics says: a callee's service (`destination_service`,
/// `payments.shop.svc.cluster.local`, the host of the cluster `outbound|8443||payments.shop.
/// svc.cluster.local`) is the principal `destination_principal` (a SPIFFE ID), as the caller's
/// sidecar saw it (`reporter="source"`). With mTLS, access logs name the callee by that
/// principal while cluster stats name it by the cluster: the alias puts the cluster's stats on
/// the access logs' pair.
#[derive(Debug, PartialEq)]
struct IstioAlias<'a> {
    service: &'a str,
    principal: &'a str,
}

/// `None` for a sample of another metric; `Some(None)` for an Istio metric sample that names
/// no alias (the callee's view, no principal); else the alias. Tags are labels
/// (`emit_tags_as_labels`) or in Istio's raw name, `reporter=.=source;.;…;.;istio_requests_total`.
fn istio_alias<'a>(name: &'a str, metric: &'a Metric) -> Option<Option<IstioAlias<'a>>> {
    let raw = ISTIO_METRICS.iter().find_map(|m| name.strip_suffix(m).and_then(|r| r.strip_suffix(";.;")));
    if raw.is_none() && !ISTIO_METRICS.contains(&name) {
        return None;
    }
    let tag = |key: &str| match raw {
        Some(raw) => raw.split(";.;").find_map(|kv| kv.split_once("=.=").filter(|(k, _)| *k == key).map(|(_, v)| v)),
        None => label_value(metric, key),
    };
    let (Some("source"), Some(service), Some(principal)) =
        (tag("reporter"), tag("destination_service"), tag("destination_principal"))
    else {
        return Some(None);
    };
    let named = principal.starts_with("spiffe://") && !service.is_empty() && service != "unknown";
    Some(named.then_some(IstioAlias { service, principal }))
}

/// One sample's number: the counter's or the gauge's value, finite and not negative.
fn value(kind: MetricType, stat: Stat, metric: &Metric) -> Result<f64, StatsRejection> {
    let v = match (stat, kind) {
        (Stat::Counter(_), MetricType::Counter) => metric.counter.as_ref().and_then(|c| c.value),
        (Stat::HostsTotal | Stat::HostsHealthy, MetricType::Gauge) => metric.gauge.as_ref().and_then(|g| g.value),
        _ => return Err(StatsRejection::WrongType),
    };
    match v {
        Some(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(StatsRejection::BadValue),
    }
}

/// What decoding one message counted.
#[derive(Debug, Default, PartialEq)]
pub struct StatsTally {
    /// Samples (metrics of families) in the message.
    pub received: u64,
    /// Samples that went into an upstream record.
    pub used: u64,
    /// Samples of stats meshwatch does not read, or of ignored clusters.
    pub ignored: u64,
    pub rejected: Vec<(StatsRejection, u64)>,
    /// Cumulative counters that went down (an Envoy restart), read as starting again.
    pub resets: u64,
}

impl StatsTally {
    fn reject(&mut self, reason: StatsRejection, n: u64) {
        match self.rejected.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, count)) => *count += n,
            None => self.rejected.push((reason, n)),
        }
    }
}

/// Last cumulative values of one cluster as one node reported them.
type Last = [Option<f64>; 8];

/// What is remembered of one node across its streams.
#[derive(Debug, Default)]
struct NodeState {
    clusters: HashMap<Box<str>, Last>,
    last_seen_ms: i64,
}

/// Cumulative counter values by node, shared by every stream (an Envoy that reconnects, or
/// restarts, continues from what it last said).
#[derive(Debug, Default)]
pub struct CounterBook {
    nodes: HashMap<Box<str>, NodeState>,
    tracked: usize,
    /// When idle nodes were last looked for.
    swept_ms: i64,
    /// When the book was last full and looked for nodes silent for `PRESSED_IDLE_MS`.
    pressed_ms: i64,
}

/// A node not heard from for this long is forgotten.
pub const NODE_IDLE_MS: i64 = 3_600_000;
/// While the book is full, a node not heard from for this long (six of Envoy's default
/// 10 s stats flushes) makes room for a new one: a burst of made-up nodes cannot keep real
/// Envoys out for an hour.
pub const PRESSED_IDLE_MS: i64 = 60_000;
/// The share of the book one node may fill (its clusters), so that one Envoy's junk cannot
/// take the places of the others.
const NODE_SHARE: usize = 8;

impl CounterBook {
    /// Nodes and clusters tracked.
    pub fn tracked(&self) -> usize {
        self.tracked
    }

    /// Forgets nodes idle since before `now_ms - NODE_IDLE_MS`; looks at most once a minute
    /// (every message of every stream asks).
    pub fn forget_idle(&mut self, now_ms: i64) {
        if now_ms.saturating_sub(self.swept_ms) < 60_000 {
            return;
        }
        self.swept_ms = now_ms;
        self.forget_silent_since(now_ms.saturating_sub(NODE_IDLE_MS));
    }

    /// Forgets the nodes last heard from before `before_ms`, and their clusters.
    fn forget_silent_since(&mut self, before_ms: i64) {
        let mut forgotten = 0;
        self.nodes.retain(|_, n| {
            let keep = n.last_seen_ms >= before_ms;
            if !keep {
                forgotten += 1 + n.clusters.len();
            }
            keep
        });
        self.tracked -= forgotten;
    }

    /// With the book full: forgets the nodes silent for `PRESSED_IDLE_MS` (looking at most
    /// once a second); whether there is room now.
    fn make_room(&mut self, now_ms: i64, cap: usize) -> bool {
        if self.tracked < cap {
            return true;
        }
        if now_ms.saturating_sub(self.pressed_ms) < 1_000 {
            return false;
        }
        self.pressed_ms = now_ms;
        self.forget_silent_since(now_ms.saturating_sub(PRESSED_IDLE_MS));
        self.tracked < cap
    }
}

/// Per-stream state of the stats sink: the node (sent in the first message only).
#[derive(Debug)]
pub struct StatsStream {
    node: Option<StreamNode>,
    interner: Interner,
    /// Callee services → principals, from Istio's metrics (`IstioAlias`), up to `MAX_ALIASES`.
    aliases: HashMap<Box<str>, Box<str>>,
}

#[derive(Debug)]
struct StreamNode {
    ctx: NodeContext,
    mode: CounterMode,
    /// No message of this stream has been read yet.
    first: bool,
}

/// The cluster stats of one message, gathered before they become records.
#[derive(Debug, Default)]
struct Gathered {
    counters: [Option<f64>; 8],
    hosts: [Option<f64>; 2],
    time_ms: i64,
}

impl StatsStream {
    pub fn new(interner_capacity: usize) -> StatsStream {
        StatsStream { node: None, interner: Interner::new(interner_capacity), aliases: HashMap::new() }
    }

    /// The reporting node's identity, once the stream has said who it is.
    pub fn identity(&self) -> Option<&str> {
        self.node.as_ref().map(|n| &*n.ctx.identity)
    }

    /// Takes the stream's identifier (the node).
    pub fn identify(&mut self, node: Option<&Node>, mesh: &MeshConfig, cfg: &StatsConfig) {
        let mode = node
            .and_then(|n| n.metadata.as_ref())
            .and_then(|m| m.fields.get(COUNTERS_METADATA_KEY))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => CounterMode::parse(s),
                _ => None,
            })
            .unwrap_or(cfg.counters);
        self.node = Some(StreamNode { ctx: NodeContext::new(node, "", mesh), mode, first: true });
    }

    /// One message's metric families into upstream records (one per cluster), with what was
    /// counted. `now_ms` stands in for samples without a timestamp.
    pub fn families(
        &mut self,
        families: &[MetricFamily],
        book: &mut CounterBook,
        mesh: &MeshConfig,
        cfg: &StatsConfig,
        now_ms: i64,
    ) -> (Vec<UpstreamRecord>, StatsTally) {
        let received = families.iter().map(|f| f.metric.len() as u64).sum();
        let mut tally = StatsTally { received, ..StatsTally::default() };
        let Some(node) = self.node.as_mut() else {
            tally.reject(StatsRejection::NoIdentifier, tally.received);
            return (Vec::new(), tally);
        };
        let mut gathered: HashMap<Cow<'_, str>, Gathered> = HashMap::new();
        for family in families {
            let n = family.metric.len() as u64;
            let Ok(kind) = MetricType::try_from(family.r#type.unwrap_or(0)) else {
                tally.reject(StatsRejection::UnknownType, n);
                continue;
            };
            let name = family.name.as_deref().unwrap_or("");
            for metric in &family.metric {
                match istio_alias(name, metric) {
                    Some(Some(alias)) => {
                        if self.aliases.len() < MAX_ALIASES || self.aliases.contains_key(alias.service) {
                            self.aliases.insert(alias.service.into(), alias.principal.into());
                        }
                        tally.used += 1;
                        continue;
                    }
                    Some(None) => {
                        tally.ignored += 1;
                        continue;
                    }
                    None => {}
                }
                let sample = match classify(name, metric) {
                    Ok(Some(s)) if !cfg.ignore_clusters.iter().any(|p| p.matches(s.cluster.as_bytes())) => s,
                    Ok(_) => {
                        tally.ignored += 1;
                        continue;
                    }
                    Err(reason) => {
                        tally.reject(reason, 1);
                        continue;
                    }
                };
                let v = match value(kind, sample.stat, metric) {
                    Ok(v) => v,
                    Err(reason) => {
                        tally.reject(reason, 1);
                        continue;
                    }
                };
                let g = gathered.entry(sample.cluster).or_default();
                g.time_ms = g.time_ms.max(metric.timestamp_ms.filter(|t| *t > 0).unwrap_or(now_ms));
                match sample.stat {
                    Stat::Counter(i) => g.counters[i] = Some(v),
                    Stat::HostsTotal => g.hosts[0] = Some(v),
                    Stat::HostsHealthy => g.hosts[1] = Some(v),
                }
                tally.used += 1;
            }
        }
        let first = std::mem::replace(&mut node.first, false);
        let mut records = Vec::with_capacity(gathered.len());
        let reporter = if node.ctx.is_gateway { Reporter::Gateway } else { Reporter::Source };
        let mut resolver = Resolver { mesh, interner: &mut self.interner };
        // Cumulative counters need the node's last values.
        let mut state = None;
        if node.mode == CounterMode::Cumulative && !gathered.is_empty() {
            let node_id: &str = &node.ctx.node_id;
            if !book.nodes.contains_key(node_id) {
                if !book.make_room(now_ms, cfg.max_tracked_clusters) {
                    tally.reject(StatsRejection::StateFull, tally.used);
                    tally.used = 0;
                    return (Vec::new(), tally);
                }
                book.tracked += 1;
                book.nodes.insert(node_id.into(), NodeState::default());
            }
            state = book.nodes.get_mut(node_id);
        }
        let (primed, restarted) = match state.as_deref_mut() {
            Some(st) => {
                // A known node's first message on a new stream with a counter that went down
                // is an Envoy that restarted: every counter starts again from zero.
                let restarted = first
                    && gathered.iter().any(|(cluster, g)| {
                        st.clusters.get(cluster.as_ref()).is_some_and(|last| {
                            g.counters
                                .iter()
                                .zip(last)
                                .any(|(now, before)| matches!((now, before), (Some(n), Some(b)) if n < b))
                        })
                    });
                let primed = st.last_seen_ms != 0;
                st.last_seen_ms = now_ms.max(1);
                (primed, restarted)
            }
            None => (false, false),
        };
        for (cluster, g) in gathered {
            let mut counts = UpstreamCounts::default();
            match state.as_deref_mut() {
                None => {
                    for (slot, v) in counts.fields_mut().into_iter().zip(g.counters) {
                        *slot = v.map_or(0, |v| v as u64);
                    }
                }
                Some(st) => {
                    let node_full = st.clusters.len() >= (cfg.max_tracked_clusters / NODE_SHARE).max(1);
                    let last = match st.clusters.get_mut(cluster.as_ref()) {
                        Some(last) => last,
                        None if node_full || book.tracked >= cfg.max_tracked_clusters => {
                            let n = g.counters.iter().chain(&g.hosts).flatten().count() as u64;
                            tally.used -= n;
                            tally.reject(StatsRejection::StateFull, n);
                            continue;
                        }
                        None => {
                            book.tracked += 1;
                            st.clusters.entry(cluster.as_ref().into()).or_default()
                        }
                    };
                    for ((slot, now), before) in counts.fields_mut().into_iter().zip(g.counters).zip(last.iter_mut()) {
                        let Some(now) = now else { continue };
                        *slot = match *before {
                            Some(b) if now >= b && !restarted => (now - b) as u64,
                            Some(_) => {
                                tally.resets += 1;
                                now as u64
                            }
                            // First seen: Envoy flushes a counter once it is used, so on a
                            // node already heard from all of it is new; on a new node it is
                            // history.
                            None if primed => now as u64,
                            None => 0,
                        };
                        *before = Some(now);
                    }
                }
            }
            let hosts = match g.hosts {
                [Some(total), Some(healthy)] => Some((total as u64, (healthy as u64).min(total as u64))),
                _ => None,
            };
            let alias = istio_cluster_host(cluster.as_bytes())
                .and_then(|host| std::str::from_utf8(host).ok())
                .and_then(|host| self.aliases.get(host));
            let destination = match alias {
                Some(principal) => resolver.spiffe_side(principal),
                None => resolver.destination(
                    Reporter::Source,
                    &node.ctx,
                    &Evidence { upstream_cluster: cluster.as_bytes(), ..Evidence::default() },
                ),
            };
            let source: Identity = node.ctx.identity.clone();
            records.push(UpstreamRecord {
                time_ms: g.time_ms,
                reporter,
                source,
                destination: destination.identity,
                direction: Direction::from_sides(true, destination.inside),
                counts,
                hosts,
            });
        }
        (records, tally)
    }
}

/// Shared state of the sink's streams.
pub type SharedBook = Arc<std::sync::Mutex<CounterBook>>;

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::io::prometheus::client::{Counter, Gauge, LabelPair};

    fn family(name: &str, kind: MetricType, value: f64, labels: &[(&str, &str)]) -> MetricFamily {
        let label =
            labels.iter().map(|(n, v)| LabelPair { name: Some((*n).into()), value: Some((*v).into()) }).collect();
        let mut metric = Metric { label, timestamp_ms: Some(1_700_000_000_000), ..Metric::default() };
        match kind {
            MetricType::Gauge => metric.gauge = Some(Gauge { value: Some(value) }),
            _ => metric.counter = Some(Counter { value: Some(value), ..Counter::default() }),
        }
        MetricFamily {
            name: Some(name.into()),
            r#type: Some(kind as i32),
            metric: vec![metric],
            ..MetricFamily::default()
        }
    }

    fn node(id: &str, mode: Option<&str>) -> Node {
        use envoy_types::pb::google::protobuf::{Struct, Value};
        let mut n = Node { id: id.into(), cluster: id.into(), ..Node::default() };
        if let Some(m) = mode {
            let v = Value { kind: Some(Kind::StringValue(m.into())) };
            n.metadata = Some(Struct { fields: [(COUNTERS_METADATA_KEY.to_string(), v)].into_iter().collect() });
        }
        n
    }

    fn raw(cluster: &str, stat: &str, v: f64) -> MetricFamily {
        let kind = if stat.starts_with("membership") { MetricType::Gauge } else { MetricType::Counter };
        family(&format!("cluster.{cluster}.{stat}"), kind, v, &[])
    }

    fn run(stream: &mut StatsStream, book: &mut CounterBook, f: &[MetricFamily]) -> (Vec<UpstreamRecord>, StatsTally) {
        stream.families(f, book, &MeshConfig::default(), &StatsConfig::default(), 1_700_000_000_000)
    }

    #[test]
    fn raw_names_with_dotted_and_istio_cluster_names() {
        let none = Metric::default();
        let sample = |name: &'static str| classify(name, &none);
        let istio = "cluster.outbound|9080||reviews.default.svc.cluster.local.upstream_rq_total";
        assert_eq!(
            sample(istio),
            Ok(Some(ClusterSample {
                cluster: "outbound|9080||reviews.default.svc.cluster.local".into(),
                stat: Stat::Counter(0)
            }))
        );
        assert_eq!(
            sample("cluster.backend.outlier_detection.ejections_enforced_total"),
            Ok(Some(ClusterSample { cluster: "backend".into(), stat: Stat::Counter(7) }))
        );
        assert_eq!(sample("cluster.backend.internal.upstream_rq_5xx"), Ok(None));
        assert_eq!(sample("cluster.backend.zone.a.b.upstream_rq_5xx"), Ok(None));
        assert_eq!(sample("cluster.backend.retry.upstream_rq_5xx"), Ok(None));
        assert_eq!(sample("cluster.backend.upstream_rq_503"), Ok(None));
        assert_eq!(sample("http.ingress.downstream_rq_total"), Ok(None));
        assert_eq!(sample("cluster..upstream_rq_total"), Err(StatsRejection::BadName));
    }

    #[test]
    fn tag_extracted_names_read_the_cluster_label() {
        let f = family(
            "cluster.upstream_rq_xx",
            MetricType::Counter,
            3.0,
            &[(CLUSTER_NAME_TAG, "b"), (CODE_CLASS_TAG, "5")],
        );
        assert_eq!(
            classify("cluster.upstream_rq_xx", &f.metric[0]),
            Ok(Some(ClusterSample { cluster: "b".into(), stat: Stat::Counter(1) }))
        );
        let f = family(
            "cluster.upstream_rq_xx",
            MetricType::Counter,
            3.0,
            &[(CLUSTER_NAME_TAG, "b"), (CODE_CLASS_TAG, "2")],
        );
        assert_eq!(classify("cluster.upstream_rq_xx", &f.metric[0]), Ok(None));
        let f = family("cluster.upstream_rq_total", MetricType::Counter, 3.0, &[]);
        assert_eq!(classify("cluster.upstream_rq_total", &f.metric[0]), Err(StatsRejection::BadName));
    }

    #[test]
    fn dotted_cluster_names_cut_by_a_tag_are_put_back_together() {
        let read = |name: &str, labels: &[(&str, &str)]| {
            let f = family(name, MetricType::Counter, 1.0, labels);
            classify(name, &f.metric[0]).map(|s| s.map(|s| (s.cluster.into_owned(), s.stat)))
        };
        // Envoy's default tag stops at the first dot.
        assert_eq!(
            read("cluster.shop.svc.cluster.local.upstream_rq_total", &[(CLUSTER_NAME_TAG, "outbound|8443||payments")]),
            Ok(Some(("outbound|8443||payments.shop.svc.cluster.local".into(), Stat::Counter(0))))
        );
        assert_eq!(
            read("cluster.example.upstream_rq_total", &[(CLUSTER_NAME_TAG, "partner")]),
            Ok(Some(("partner.example".into(), Stat::Counter(0))))
        );
        assert_eq!(
            read("cluster.example.upstream_rq_xx", &[(CLUSTER_NAME_TAG, "partner"), (CODE_CLASS_TAG, "5")]),
            Ok(Some(("partner.example".into(), Stat::Counter(1))))
        );
        assert_eq!(
            read("cluster.example.outlier_detection.ejections_enforced_total", &[(CLUSTER_NAME_TAG, "partner")]),
            Ok(Some(("partner.example".into(), Stat::Counter(7))))
        );
        // Istio's tag keeps a whole `….svc.cluster.local` name; its 5xx class is `5xx`.
        let istio = [("cluster_name", "outbound|8443||payments.shop.svc.cluster.local")];
        assert_eq!(
            read("cluster.upstream_rq_total", &istio),
            Ok(Some(("outbound|8443||payments.shop.svc.cluster.local".into(), Stat::Counter(0))))
        );
        let class = |c| [istio[0], ("response_code_class", c)];
        assert_eq!(
            read("cluster.upstream_rq", &class("5xx")),
            Ok(Some(("outbound|8443||payments.shop.svc.cluster.local".into(), Stat::Counter(1))))
        );
        assert_eq!(read("cluster.upstream_rq", &class("2xx")), Ok(None));
        assert_eq!(read("cluster.upstream_rq", &[istio[0], ("response_code", "503")]), Ok(None));
        // A sub-scope is still not the cluster's own, and other stats are still not read.
        assert_eq!(read("cluster.internal.upstream_rq_total", &[(CLUSTER_NAME_TAG, "backend")]), Ok(None));
        assert_eq!(read("cluster.example.upstream_rq_503", &[(CLUSTER_NAME_TAG, "partner")]), Ok(None));
        assert_eq!(read("cluster.upstream_rq_total", &[(CLUSTER_NAME_TAG, "")]), Err(StatsRejection::BadName));
    }

    #[test]
    fn cumulative_counters_become_increments_and_restarts_start_again() {
        let mut book = CounterBook::default();
        let mut s = StatsStream::new(64);
        s.identify(Some(&node("frontend", None)), &MeshConfig::default(), &StatsConfig::default());
        let flush =
            |rq: f64, xx: f64| vec![raw("backend", "upstream_rq_total", rq), raw("backend", "upstream_rq_5xx", xx)];
        // The first flush of a node never heard from is history, not traffic.
        let (r, _) = run(&mut s, &mut book, &flush(100.0, 4.0));
        assert_eq!((r[0].counts.requests, r[0].counts.errors), (0, 0));
        let (r, _) = run(&mut s, &mut book, &flush(130.0, 4.0));
        assert_eq!((r[0].counts.requests, r[0].counts.errors), (30, 0));
        assert_eq!((&*r[0].source, &*r[0].destination, r[0].direction), ("frontend", "backend", Direction::EastWest));
        // A counter first flushed on a known node: all of it is new.
        let (r, _) = run(&mut s, &mut book, &[raw("backend", "upstream_rq_retry", 2.0)]);
        assert_eq!(r[0].counts.retries, 2);
        // Envoy restarts: a new stream, counters from zero.
        let mut s = StatsStream::new(64);
        s.identify(Some(&node("frontend", None)), &MeshConfig::default(), &StatsConfig::default());
        let (r, t) = run(&mut s, &mut book, &flush(7.0, 1.0));
        assert_eq!((r[0].counts.requests, r[0].counts.errors), (7, 1));
        assert_eq!(t.resets, 2);
    }

    #[test]
    fn delta_counters_by_node_metadata() {
        let mut book = CounterBook::default();
        let mut s = StatsStream::new(64);
        s.identify(Some(&node("frontend", Some("delta"))), &MeshConfig::default(), &StatsConfig::default());
        for _ in 0..2 {
            let (r, _) = run(&mut s, &mut book, &[raw("backend", "upstream_rq_total", 5.0)]);
            assert_eq!(r[0].counts.requests, 5);
        }
        assert_eq!(book.tracked(), 0, "deltas need no memory");
    }

    #[test]
    fn istio_metrics_put_a_clusters_stats_on_the_callees_principal() {
        let mut book = CounterBook::default();
        let mut s = StatsStream::new(64);
        s.identify(Some(&node("frontend", Some("delta"))), &MeshConfig::default(), &StatsConfig::default());
        let payments = "spiffe://cluster.local/ns/shop/sa/payments";
        let ledger = "spiffe://cluster.local/ns/shop/sa/ledger";
        let istio = |labels: &[(&str, &str)]| family("istio_requests_total", MetricType::Counter, 7.0, labels);
        let families = [
            // Tags as labels.
            istio(&[
                ("reporter", "source"),
                ("destination_service", "payments.shop.svc.cluster.local"),
                ("destination_principal", payments),
                ("response_code", "200"),
            ]),
            // Istio's raw name, tags inside.
            family(
                &format!(
                    "reporter=.=source;.;destination_service=.=ledger.shop.svc.cluster.local;.;\
                     destination_principal=.={ledger};.;response_code=.=503;.;istio_requests_total"
                ),
                MetricType::Counter,
                2.0,
                &[],
            ),
            // The callee's own view, and a plaintext callee: no alias.
            istio(&[
                ("reporter", "destination"),
                ("destination_service", "search.shop.svc.cluster.local"),
                ("destination_principal", "spiffe://cluster.local/ns/shop/sa/search"),
            ]),
            istio(&[
                ("reporter", "source"),
                ("destination_service", "search.shop.svc.cluster.local"),
                ("destination_principal", "unknown"),
            ]),
            raw("outbound|8443||payments.shop.svc.cluster.local", "upstream_rq_total", 5.0),
            raw("outbound|80||ledger.shop.svc.cluster.local", "upstream_rq_5xx", 1.0),
            raw("outbound|80||search.shop.svc.cluster.local", "upstream_rq_total", 3.0),
        ];
        let (mut records, tally) = run(&mut s, &mut book, &families);
        records.sort_by(|a, b| a.destination.cmp(&b.destination));
        let named: Vec<(&str, bool)> =
            records.iter().map(|r| (&*r.destination, r.direction == Direction::EastWest)).collect();
        assert_eq!(named, [("search.shop", true), (ledger, true), (payments, true)]);
        assert_eq!((records[2].counts.requests, records[1].counts.errors), (5, 1), "the cluster stats, not Istio's");
        assert_eq!((tally.used, tally.ignored), (5, 2));
        // Later flushes of the stream keep the alias.
        let (r, _) =
            run(&mut s, &mut book, &[raw("outbound|8443||payments.shop.svc.cluster.local", "upstream_rq_total", 1.0)]);
        assert_eq!(&*r[0].destination, payments);
    }

    #[test]
    fn host_gauges_give_the_healthy_share() {
        let mut book = CounterBook::default();
        let mut s = StatsStream::new(64);
        s.identify(Some(&node("frontend", None)), &MeshConfig::default(), &StatsConfig::default());
        let (r, t) = run(
            &mut s,
            &mut book,
            &[raw("backend", "membership_total", 3.0), raw("backend", "membership_healthy", 2.0)],
        );
        assert_eq!(r[0].hosts, Some((3, 2)));
        assert_eq!(t.used, 2);
    }

    #[test]
    fn bad_samples_are_counted_not_used() {
        let mut book = CounterBook::default();
        let mut s = StatsStream::new(64);
        let f = vec![raw("backend", "upstream_rq_total", 1.0)];
        let (r, t) = run(&mut s, &mut book, &f);
        assert!(r.is_empty());
        assert_eq!(t.rejected, vec![(StatsRejection::NoIdentifier, 1)]);
        s.identify(Some(&node("frontend", None)), &MeshConfig::default(), &StatsConfig::default());
        let mut unknown = raw("backend", "upstream_rq_total", 1.0);
        unknown.r#type = Some(42);
        let f = vec![
            unknown,
            raw("backend", "upstream_rq_timeout", f64::NAN),
            raw("backend", "upstream_rq_retry", -1.0),
            family("cluster.backend.upstream_rq_total", MetricType::Gauge, 1.0, &[]),
            raw("inbound|8080||", "upstream_rq_total", 1.0),
            family("server.uptime", MetricType::Gauge, 1.0, &[]),
        ];
        let (r, t) = run(&mut s, &mut book, &f);
        assert!(r.is_empty(), "{r:?}");
        assert_eq!(t.received, 6);
        assert_eq!(t.ignored, 2);
        assert_eq!(
            t.rejected,
            vec![(StatsRejection::UnknownType, 1), (StatsRejection::BadValue, 2), (StatsRejection::WrongType, 1)]
        );
    }

    #[test]
    fn tracked_clusters_are_capped() {
        let mut book = CounterBook::default();
        // The node and two of its clusters.
        let cfg = StatsConfig { max_tracked_clusters: 3, ..StatsConfig::default() };
        let mut s = StatsStream::new(64);
        s.identify(Some(&node("frontend", None)), &MeshConfig::default(), &cfg);
        let f: Vec<_> = (0..5).map(|i| raw(&format!("c{i}"), "upstream_rq_total", 1.0)).collect();
        let (r, t) = s.families(&f, &mut book, &MeshConfig::default(), &cfg, 0);
        assert_eq!(r.len(), 1, "a node holds at most an eighth of the book, here one cluster");
        assert_eq!(t.rejected, vec![(StatsRejection::StateFull, 4)]);
        book.forget_idle(NODE_IDLE_MS + 10);
        assert_eq!(book.tracked(), 0);
    }

    #[test]
    fn made_up_nodes_that_filled_the_book_make_room_for_a_real_one_after_a_minute_of_silence() {
        let mut book = CounterBook::default();
        let cfg = StatsConfig { max_tracked_clusters: 80, ..StatsConfig::default() };
        let mesh = MeshConfig::default();
        let f: Vec<_> = (0..30).map(|i| raw(&format!("c{i}"), "upstream_rq_total", 1.0)).collect();
        // One node's junk takes at most its share: ten clusters of eighty.
        let mut junk = StatsStream::new(64);
        junk.identify(Some(&node("junk", None)), &mesh, &cfg);
        let (r, _) = junk.families(&f, &mut book, &mesh, &cfg, 0);
        assert_eq!(r.len(), 10);
        // Made-up nodes fill the rest.
        for i in 0..30 {
            let mut s = StatsStream::new(64);
            s.identify(Some(&node(&format!("made-up-{i}"), None)), &mesh, &cfg);
            s.families(&f[..2], &mut book, &mesh, &cfg, 1_000);
        }
        assert_eq!(book.tracked(), 80);
        let mut real = StatsStream::new(64);
        real.identify(Some(&node("frontend", None)), &mesh, &cfg);
        let (r, t) = real.families(&f[..2], &mut book, &mesh, &cfg, 2_000);
        assert!(r.is_empty() && t.rejected == vec![(StatsRejection::StateFull, 2)], "full: {t:?}");
        // A minute after the made-up nodes went silent, the real one gets in.
        let (r, t) = real.families(&f[..2], &mut book, &mesh, &cfg, 1_000 + PRESSED_IDLE_MS + 1);
        assert_eq!((r.len(), t.rejected.len()), (2, 0), "{t:?}");
    }
}
