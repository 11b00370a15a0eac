//! The traffic generator: a scenario, slice by slice of simulated time, becomes the access-log
//! messages each simulated Envoy would send, plus the ground truth of the incidents.
//!
//! Pure and deterministic: the same scenario and seed give the same bytes, whatever the pace
//! at which slices are taken. Each sidecar has an outbound and an inbound logger per
//! protocol (one gRPC stream each); ingress goes through one gateway node. With
//! `envoy_stats`, each caller's sidecar (and the gateway) also flushes its upstream clusters'
//! cumulative counters at the end of every slice, as Envoy's stats sink does.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytes::Bytes;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::Identifier;
use ipnet::IpNet;
use meshwatch_collector::flow::ResponseFlags;
use meshwatch_collector::identity::{EXTERNAL, MeshConfig, Pattern, ServiceMapping};
use serde::Serialize;

use envoy_types::pb::envoy::service::metrics::v3::StreamMetricsMessage;
use envoy_types::pb::io::prometheus::client::MetricFamily;
use prost::Message as _;

use super::envoy::{
    FlowSpec, HttpSpec, TcpSpec, Template, Varying, http_entry, identifier, metric_family, stats_identifier,
};
use super::random::Rng;
use super::scenario::{Edge, IncidentKind, Protocol, Scenario};

/// What a stream of the simulated mesh is.
#[derive(Clone, Debug)]
pub struct StreamInfo {
    pub node_id: String,
    pub log_name: String,
    identifier: Identifier,
}

/// One labelled incident, as the ground-truth file holds it (one JSON object a line).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Truth {
    pub kind: String,
    pub source: String,
    /// `*` for a fan-out scan (many destinations).
    pub destination: String,
    pub direction: String,
    pub start_ms: i64,
    pub end_ms: i64,
    /// For ingress incidents: the gateway's identity. The callee's sidecar sees the same
    /// traffic arrive from the gateway (an east/west hop), and a detection there is of the
    /// same incident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// The requests of a latency or error incident's own edge while it lasts, slice by slice, and
/// the edge's normal: what an ideal test of the incident could know (`eval`'s bound on the
/// time to detect it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evidence {
    /// Log-sd of the edge's latency, and its normal error ratio.
    pub latency_sigma: f64,
    pub error_ratio: f64,
    pub slices: Vec<EvidenceSlice>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EvidenceSlice {
    pub requests: u64,
    /// Sum over the requests of ln(latency / the edge's normal median).
    pub log_ratio_sum: f64,
    /// Requests that failed (5xx).
    pub errors: u64,
}

/// Whether the generator records an incident's `Evidence`: latency shifts and error bursts.
fn has_evidence(kind: IncidentKind) -> bool {
    matches!(kind, IncidentKind::LatencyShift | IncidentKind::ErrorBurst)
}

/// What the generator produced for one pair as one reporter logs it: HTTP requests by
/// status class (as `meshwatch_collector::flow::StatusClass`) and TCP connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: [u64; 6],
    pub connections: u64,
}

/// (source, destination, direction, reporter).
pub type PairReporter = (String, String, &'static str, &'static str);

/// One slice of simulated time: the messages to send, by stream index.
#[derive(Debug, Default)]
pub struct Slice {
    pub start_ms: i64,
    pub messages: Vec<(usize, Bytes)>,
    pub entries: u64,
    /// Stats-sink messages (`StreamMetricsMessage`), by the index of the calling service (0:
    /// the gateway).
    pub stats: Vec<(usize, Bytes)>,
}

/// Cumulative counters of one upstream cluster of a simulated Envoy.
#[derive(Clone, Copy, Debug, Default)]
struct UpstreamTotals {
    tcp: bool,
    requests: u64,
    errors: u64,
    timeouts: u64,
    connections: u64,
    connect_failures: u64,
}

const GATEWAY: &str = "ingress-gateway";

/// A logger kind of a sidecar, the offset of its stream in the node's block of four.
#[derive(Clone, Copy)]
enum Logger {
    OutboundHttp = 0,
    InboundHttp = 1,
    OutboundTcp = 2,
    InboundTcp = 3,
}

/// An edge as it runs: the scenario's edge, or one an incident added.
struct LiveEdge {
    edge: Edge,
    rng: Rng,
    /// Only carries traffic within [from, until) (incident edges).
    from_ms: i64,
    until_ms: i64,
    /// Scan traffic: answered 404 by the callee.
    scan: bool,
    counts: [Counts; 2],
    noise_factor: f64,
    /// The latency level the deploys so far have left (1 before the first).
    deploy_factor: f64,
    /// Entry templates: client side, server side with mTLS, server side plaintext.
    templates: [Option<Template>; 3],
}

pub struct Generator {
    scenario: Scenario,
    /// Per incident of the scenario: its evidence, for latency shifts and error bursts.
    evidence: Vec<Option<Evidence>>,
    slice_ms: i64,
    next_ms: i64,
    end_ms: i64,
    streams: Vec<StreamInfo>,
    /// Entries waiting per stream (the repeated field's encoded records).
    pending: Vec<Vec<u8>>,
    /// Per stream, where in `pending` a new message starts (messages stay under
    /// `MESSAGE_BYTES`, as an Envoy's do).
    cuts: Vec<Vec<usize>>,
    sent_identifier: Vec<bool>,
    edges: Vec<LiveEdge>,
    seq: u64,
    total_entries: u64,
    /// Per (caller, callee) HTTP edge inside the mesh: what the caller's Envoy counted.
    upstream: BTreeMap<(usize, usize), UpstreamTotals>,
    stats_identified: Vec<bool>,
    /// Draws of identity floods.
    flood_rng: Rng,
}

fn spiffe(s: &Scenario, name: &str) -> String {
    let td = s.services.iter().find(|x| x.name == name).and_then(|x| x.trust_domain.as_deref());
    format!("spiffe://{}/ns/{}/sa/{}", td.unwrap_or(&s.trust_domain), s.namespace, name)
}

/// A workload of another trust domain: it has no sidecar of ours, and it is outside.
fn foreign(s: &Scenario, i: usize) -> bool {
    s.services[i].trust_domain.as_ref().is_some_and(|td| *td != s.trust_domain)
}

/// Whether the caller's Envoy reports the edge in its stats: to a service inside the mesh
/// (not through the passthrough cluster), from a caller with a sidecar of ours (or the
/// gateway).
fn stats_counted(s: &Scenario, from: usize, to: usize) -> bool {
    !s.services[to].external && !foreign(s, from)
}

fn fqdn(s: &Scenario, name: &str) -> String {
    format!("{name}.{}.svc.cluster.local", s.namespace)
}

fn service_ip(i: usize) -> String {
    format!("10.10.{}.{}", i / 250, i % 250 + 1)
}

const GATEWAY_IP: &str = "10.9.0.1";

/// Entries per message, in bytes, at most about (an Envoy flushes its buffer at 16 KiB by
/// default; meshwatch accepts 4 MiB).
const MESSAGE_BYTES: usize = 1 << 20;

/// How close together the requests of one burst are.
const BURST_SPREAD_MS: u64 = 200;

/// A stable public-looking address for an external host.
fn external_ip(host: &str) -> String {
    let h = host.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    format!("52.{}.{}.{}", h % 200 + 1, (h >> 8) % 250 + 1, (h >> 16) % 250 + 1)
}

/// The `[mesh]` settings under which meshwatch names this scenario's services as the ground
/// truth does: each sidecar's cluster and address → its SPIFFE ID.
pub fn mesh_config(s: &Scenario) -> MeshConfig {
    let mut services: Vec<ServiceMapping> = s
        .services
        .iter()
        .enumerate()
        .filter(|(_, svc)| !svc.external)
        .map(|(i, svc)| ServiceMapping {
            name: spiffe(s, &svc.name),
            cidrs: service_ip(i).parse::<std::net::IpAddr>().map(IpNet::from).into_iter().collect(),
            clusters: vec![
                Pattern::new(format!("outbound|8080||{}", fqdn(s, &svc.name))),
                Pattern::new(format!("outbound|9000||{}", fqdn(s, &svc.name))),
            ],
            nodes: vec![],
            external: false,
        })
        .collect();
    services.push(ServiceMapping {
        name: spiffe(s, GATEWAY),
        cidrs: GATEWAY_IP.parse::<std::net::IpAddr>().map(IpNet::from).into_iter().collect(),
        clusters: vec![],
        nodes: vec![],
        external: false,
    });
    MeshConfig {
        trust_domains: vec![s.trust_domain.clone()],
        internal_cidrs: vec![IpNet::V4(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 0, 0, 0), 8).unwrap_or_default(),
        )],
        gateway_nodes: vec![Pattern::new("*gateway*")],
        services,
        ..MeshConfig::default()
    }
}

/// The same settings as TOML, to paste into meshwatch's configuration.
pub fn mesh_config_toml(s: &Scenario) -> String {
    let m = mesh_config(s);
    let mut out = String::new();
    let _ = writeln!(out, "# [mesh] settings for scenario `{}`", s.name);
    let _ = writeln!(
        out,
        "[mesh]\ntrust_domains = [\"{}\"]\ninternal_cidrs = [\"10.0.0.0/8\"]\ngateway_nodes = [\"*gateway*\"]",
        s.trust_domain
    );
    for svc in &m.services {
        let cidrs: Vec<String> = svc.cidrs.iter().map(|c| format!("\"{c}\"")).collect();
        let clusters: Vec<String> = svc.clusters.iter().map(|c| format!("\"{}\"", c.as_str())).collect();
        let _ = writeln!(
            out,
            "\n[[mesh.services]]\nname = \"{}\"\ncidrs = [{}]\nclusters = [{}]",
            svc.name,
            cidrs.join(", "),
            clusters.join(", ")
        );
    }
    out
}

impl Generator {
    /// Slices are `slice_ms` of simulated time; the generator covers the scenario's duration.
    pub fn new(scenario: Scenario, seed: u64, slice_ms: i64) -> Generator {
        let mut streams = Vec::new();
        let ns = scenario.namespace.clone();
        for (i, svc) in scenario.services.iter().enumerate() {
            let node_id = format!("{}-0", svc.name);
            for log_name in ["outbound_http", "inbound_http", "outbound_tcp", "inbound_tcp"] {
                let id = if svc.external || i == 0 {
                    Identifier::default()
                } else {
                    identifier(&node_id, &format!("{}.{ns}", svc.name), Some(&spiffe(&scenario, &svc.name)), log_name)
                };
                streams.push(StreamInfo { node_id: node_id.clone(), log_name: log_name.into(), identifier: id });
            }
        }
        // The gateway node's streams sit where `internet` (service 0) would have its own.
        for (k, log_name) in
            ["gateway_http", "gateway_http_unused", "gateway_tcp", "gateway_tcp_unused"].iter().enumerate()
        {
            streams[k] = StreamInfo {
                node_id: format!("{GATEWAY}-0"),
                log_name: log_name.to_string(),
                identifier: identifier(&format!("{GATEWAY}-0"), GATEWAY, Some(&spiffe(&scenario, GATEWAY)), log_name),
            };
        }
        let mut edges: Vec<LiveEdge> = scenario
            .edges
            .iter()
            .map(|e| LiveEdge {
                rng: Rng::derive(seed, &format!("edge {} {}", e.from, e.to)),
                edge: e.clone(),
                from_ms: i64::MIN,
                until_ms: i64::MAX,
                scan: false,
                counts: Default::default(),
                noise_factor: 1.0,
                deploy_factor: 1.0,
                templates: Default::default(),
            })
            .collect();
        for (k, inc) in scenario.incidents.iter().enumerate() {
            let template = |to: usize, rate: f64| Edge {
                from: inc.from,
                to,
                protocol: Protocol::Http,
                rate_per_s: rate,
                daily: [1.0; 24],
                weekly: [1.0; 7],
                noise: 0.0,
                burst: 1.0,
                error_ratio: 0.0,
                error_clusters: 0.0,
                deploy_every_ms: 0,
                deploy_shift: 0.0,
                latency_median_ms: 15.0,
                latency_sigma: 0.4,
                request_bytes: 400.0,
                response_bytes: 1500.0,
                mtls: !scenario.services[inc.from].external
                    && !scenario.services[to].external
                    && inc.kind != IncidentKind::PlaintextEdge,
            };
            let mut add = |edge: Edge, scan: bool, label: String| {
                edges.push(LiveEdge {
                    rng: Rng::derive(seed, &label),
                    edge,
                    from_ms: inc.start_ms,
                    until_ms: inc.end_ms,
                    scan,
                    counts: Default::default(),
                    noise_factor: 1.0,
                    deploy_factor: 1.0,
                    templates: Default::default(),
                })
            };
            match (inc.kind, inc.to) {
                (
                    IncidentKind::NewEdge
                    | IncidentKind::NewEgress
                    | IncidentKind::NewPrincipal
                    | IncidentKind::ForeignPrincipal
                    | IncidentKind::PolicyViolation
                    | IncidentKind::PlaintextEdge,
                    Some(to),
                ) => {
                    add(template(to, inc.magnitude), false, format!("incident {k}"));
                }
                (IncidentKind::FanOutScan, _) => {
                    // Every internal service `from` does not call yet, a few requests each.
                    let targets: Vec<usize> = (1..scenario.services.len())
                        .filter(|&t| t != inc.from && !scenario.services[t].external && !foreign(&scenario, t))
                        .filter(|&t| !scenario.edges.iter().any(|e| e.from == inc.from && e.to == t))
                        .take(inc.magnitude.max(1.0) as usize)
                        .collect();
                    let seconds = (inc.end_ms - inc.start_ms) as f64 / 1000.0;
                    for t in targets {
                        add(template(t, 3.0 / seconds.max(1.0)), true, format!("incident {k} scan {t}"));
                    }
                }
                _ => {}
            }
        }
        let n = streams.len();
        let scenario_services = scenario.services.len();
        // An Envoy knows its clusters from its configuration: it reports them from its first
        // flush, before any traffic.
        let upstream = scenario
            .edges
            .iter()
            .filter(|e| scenario.envoy_stats && stats_counted(&scenario, e.from, e.to))
            .map(|e| ((e.from, e.to), UpstreamTotals { tcp: e.protocol == Protocol::Tcp, ..Default::default() }))
            .collect();
        Generator {
            evidence: vec![None; scenario.incidents.len()],
            next_ms: scenario.start_ms,
            end_ms: scenario.start_ms + scenario.duration_ms,
            scenario,
            slice_ms,
            streams,
            pending: vec![Vec::new(); n],
            cuts: vec![Vec::new(); n],
            sent_identifier: vec![false; n],
            edges,
            seq: 0,
            total_entries: 0,
            upstream,
            stats_identified: vec![false; scenario_services],
            flood_rng: Rng::derive(seed, "identity floods"),
        }
    }

    pub fn scenario(&self) -> &Scenario {
        &self.scenario
    }

    pub fn streams(&self) -> &[StreamInfo] {
        &self.streams
    }

    /// Stops the simulation `duration_ms` after its start (shorter than the scenario's).
    pub fn limit(&mut self, duration_ms: i64) {
        self.end_ms = self.end_ms.min(self.scenario.start_ms + duration_ms);
    }

    pub fn total_entries(&self) -> u64 {
        self.total_entries
    }

    pub fn done(&self) -> bool {
        self.next_ms >= self.end_ms
    }

    /// Simulated time of the next slice.
    pub fn now_ms(&self) -> i64 {
        self.next_ms
    }

    /// The labelled incidents (those that start before the simulation ends).
    pub fn truth(&self) -> Vec<Truth> {
        let s = &self.scenario;
        s.incidents
            .iter()
            .filter(|i| i.start_ms < self.end_ms)
            .map(|i| {
                let (source, destination, direction) = match i.to {
                    Some(to) if i.kind == IncidentKind::IdentityFlood => {
                        ("*".to_string(), spiffe(s, &s.services[to].name), "east_west")
                    }
                    Some(to) => {
                        let (src, dst, dir) = pair_names(s, i.from, to);
                        (src, dst, dir)
                    }
                    None => (spiffe(s, &s.services[i.from].name), "*".to_string(), "east_west"),
                };
                Truth {
                    kind: i.kind.as_str().into(),
                    source,
                    destination,
                    direction: direction.into(),
                    start_ms: i.start_ms,
                    end_ms: i.end_ms.min(self.end_ms),
                    via: (i.from == 0).then(|| spiffe(s, GATEWAY)),
                }
            })
            .collect()
    }

    /// The evidence of each incident of `truth()` (same order): `None` but for latency
    /// shifts and error bursts.
    pub fn evidence(&self) -> Vec<Option<Evidence>> {
        let s = &self.scenario;
        s.incidents
            .iter()
            .zip(&self.evidence)
            .filter(|(i, _)| i.start_ms < self.end_ms)
            .map(|(i, e)| has_evidence(i.kind).then(|| e.clone().unwrap_or_default()))
            .collect()
    }

    /// What was generated so far, per pair and reporter.
    pub fn counts(&self) -> BTreeMap<PairReporter, Counts> {
        let s = &self.scenario;
        let mut out: BTreeMap<PairReporter, Counts> = BTreeMap::new();
        for e in &self.edges {
            let (src, dst, dir) = pair_names(s, e.edge.from, e.edge.to);
            let client_reporter = if e.edge.from == 0 { "gateway" } else { "source" };
            let views = [
                ((src.clone(), dst.clone(), dir, client_reporter), e.counts[0]),
                (server_view(s, e.edge.from, &dst), e.counts[1]),
            ];
            for (key, c) in views {
                if c == Counts::default() {
                    continue;
                }
                let slot = out.entry(key).or_default();
                for (a, b) in slot.requests.iter_mut().zip(c.requests) {
                    *a += b;
                }
                slot.connections += c.connections;
            }
        }
        out
    }

    /// What the callers' Envoys counted so far per upstream inside the mesh: (source,
    /// destination, direction) as meshwatch names the pair → requests, 5xx, connections.
    pub fn upstream_counts(&self) -> BTreeMap<(String, String, &'static str), (u64, u64, u64)> {
        let s = &self.scenario;
        self.upstream
            .iter()
            .map(|(&(from, to), u)| {
                let source = spiffe(s, if from == 0 { GATEWAY } else { &s.services[from].name });
                ((source, spiffe(s, &s.services[to].name), "east_west"), (u.requests, u.errors, u.connections))
            })
            .collect()
    }

    /// The next slice of traffic, with timestamps moved by `shift_ms` (0 for simulated
    /// time; wall clock minus simulated time to stamp entries "now"). `None` when done.
    pub fn next_slice(&mut self, shift_ms: i64) -> Option<Slice> {
        if self.done() {
            return None;
        }
        let start = self.next_ms;
        let end = (start + self.slice_ms).min(self.end_ms);
        self.next_ms = end;
        // The first flush comes before the first traffic: an Envoy's first values are what it
        // counted before meshwatch heard from it.
        let mut stats = Vec::new();
        if self.scenario.envoy_stats && start == self.scenario.start_ms {
            stats = self.stats_messages(start - 1 + shift_ms);
        }
        let mut entries = 0;
        for k in 0..self.edges.len() {
            entries += self.edge_slice(k, start, end, shift_ms);
        }
        entries += self.floods(start, end, shift_ms);
        self.total_entries += entries;
        let mut messages = Vec::new();
        for (i, buf) in self.pending.iter_mut().enumerate() {
            if buf.is_empty() {
                continue;
            }
            let mut from = 0;
            let cuts = std::mem::take(&mut self.cuts[i]);
            for to in cuts.into_iter().chain([buf.len()]) {
                if to <= from {
                    continue;
                }
                let part = &buf[from..to];
                from = to;
                let mut msg = Vec::with_capacity(part.len() + 256);
                if !self.sent_identifier[i] {
                    self.sent_identifier[i] = true;
                    prost::encoding::message::encode(1, &self.streams[i].identifier, &mut msg);
                }
                let field = if self.streams[i].log_name.contains("tcp") { 3 } else { 2 };
                prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut msg);
                prost::encoding::encode_varint(part.len() as u64, &mut msg);
                msg.extend_from_slice(part);
                messages.push((i, Bytes::from(msg)));
            }
            buf.clear();
        }
        if self.scenario.envoy_stats {
            stats.extend(self.stats_messages(end - 1 + shift_ms));
        }
        Some(Slice { start_ms: start, messages, entries, stats })
    }

    /// Every caller's flush of its upstream clusters' counters at `t_ms`: one message per
    /// calling Envoy, raw stat names, cumulative counters, every cluster it has called.
    fn stats_messages(&mut self, t_ms: i64) -> Vec<(usize, Bytes)> {
        let s = &self.scenario;
        let mut by_caller: BTreeMap<usize, Vec<MetricFamily>> = BTreeMap::new();
        for (&(from, to), u) in &self.upstream {
            let port = if u.tcp { 9000 } else { 8080 };
            let prefix = format!("cluster.outbound|{port}||{}.", fqdn(s, &s.services[to].name));
            let families = by_caller.entry(from).or_default();
            // A TCP proxy's cluster counts connections only.
            let http =
                [("upstream_rq_total", u.requests), ("upstream_rq_5xx", u.errors), ("upstream_rq_timeout", u.timeouts)];
            let counters = [("upstream_cx_total", u.connections), ("upstream_cx_connect_fail", u.connect_failures)];
            for (stat, value) in http.into_iter().filter(|_| !u.tcp).chain(counters) {
                families.push(metric_family(&format!("{prefix}{stat}"), value as f64, false, t_ms));
            }
            for stat in ["membership_total", "membership_healthy"] {
                families.push(metric_family(&format!("{prefix}{stat}"), 3.0, true, t_ms));
            }
        }
        let mut out = Vec::with_capacity(by_caller.len());
        for (from, families) in by_caller {
            let identifier = (!std::mem::replace(&mut self.stats_identified[from], true)).then(|| {
                let name = if from == 0 { GATEWAY } else { s.services[from].name.as_str() };
                let cluster = if from == 0 { GATEWAY.to_string() } else { format!("{name}.{}", s.namespace) };
                stats_identifier(&format!("{name}-0"), &cluster, &spiffe(s, name))
            });
            out.push((from, Bytes::from(StreamMetricsMessage { identifier, envoy_metrics: families }.encode_to_vec())));
        }
        out
    }

    /// The entries of identity floods in [start, end): server-side entries of the target's
    /// sidecar, each from a made-up SPIFFE ID; returns how many.
    fn floods(&mut self, start: i64, end: i64, shift_ms: i64) -> u64 {
        let s = &self.scenario;
        let active: Vec<(usize, i64, i64, f64)> = s
            .incidents
            .iter()
            .filter(|i| i.kind == IncidentKind::IdentityFlood && i.start_ms < end && i.end_ms > start)
            .filter_map(|i| Some((i.to?, start.max(i.start_ms), end.min(i.end_ms), i.magnitude)))
            .collect();
        let mut written = 0;
        for (to, from, until, rate) in active {
            let s = &self.scenario;
            let callee = spiffe(s, &s.services[to].name);
            let (callee_ip, authority) = (service_ip(to), format!("{}.{}:8080", s.services[to].name, s.namespace));
            let n = self.flood_rng.poisson(rate * (until - from) as f64 / 1000.0);
            for _ in 0..n {
                self.seq += 1;
                let made_up = format!("made-up-{:012x}", self.flood_rng.next_u64() >> 16);
                let caller = spiffe(&self.scenario, &made_up);
                let caller_ip = format!("10.250.{}.{}", self.seq / 250 % 250, self.seq % 250 + 1);
                let t = from + self.flood_rng.below((until - from) as u64) as i64;
                let entry = http_entry(&HttpSpec {
                    flow: FlowSpec {
                        start_ms: t + shift_ms,
                        duration_us: 2_000,
                        downstream_ip: &caller_ip,
                        upstream_ip: &callee_ip,
                        upstream_cluster: "inbound|8080||",
                        flags: 0,
                        peer_spiffe: Some(&caller),
                        local_spiffe: Some(&callee),
                        seq: self.seq,
                    },
                    authority: &authority,
                    path: "/api",
                    code: 200,
                    request_body_bytes: 0,
                    response_body_bytes: 100,
                });
                let stream = to * 4 + Logger::InboundHttp as usize;
                prost::encoding::message::encode(1, &entry, &mut self.pending[stream]);
                self.cut(stream);
                written += 1;
            }
        }
        written
    }

    /// Starts a new message of `stream` after its last entry if the current one is full.
    fn cut(&mut self, stream: usize) {
        let last = self.cuts[stream].last().copied().unwrap_or(0);
        if self.pending[stream].len() - last >= MESSAGE_BYTES {
            self.cuts[stream].push(self.pending[stream].len());
        }
    }

    /// Traffic of one edge in [start, end); returns the entries written.
    fn edge_slice(&mut self, k: usize, start: i64, end: i64, shift_ms: i64) -> u64 {
        let e = &self.edges[k];
        if end <= e.from_ms || start >= e.until_ms {
            return 0;
        }
        let s = &self.scenario;
        let edge = e.edge.clone();
        let mut rate = edge.rate_per_s * shape(&edge, start);
        let mut latency_factor = 1.0;
        let mut error_ratio = edge.error_ratio;
        let mut mtls = edge.mtls;
        let mut denial = 0.0;
        let mut rate_limit = 0.0;
        let mut request_bytes_factor = 1.0;
        // The latency or error incident on this edge, if one is on.
        let mut evidence = None;
        for (index, inc) in s.incidents.iter().enumerate().filter(|(_, i)| i.start_ms < end && i.end_ms > start) {
            if has_evidence(inc.kind) && inc.from == edge.from && inc.to == Some(edge.to) {
                evidence = Some((index, inc.start_ms, inc.end_ms, EvidenceSlice::default()));
            }
            let spread = inc.kind == IncidentKind::DenialSpread && inc.from == edge.from;
            if !spread && (inc.from != edge.from || inc.to != Some(edge.to)) {
                continue;
            }
            match inc.kind {
                IncidentKind::LatencyShift => latency_factor *= inc.magnitude,
                IncidentKind::ErrorBurst => error_ratio = inc.magnitude,
                IncidentKind::TrafficDrop => rate = 0.0,
                IncidentKind::TrafficSurge => rate *= inc.magnitude,
                IncidentKind::MtlsDowngrade => mtls = false,
                IncidentKind::DenialSurge | IncidentKind::DenialSpread => denial = inc.magnitude,
                IncidentKind::RateLimitSurge => rate_limit = inc.magnitude,
                IncidentKind::EgressBytesSurge => request_bytes_factor *= inc.magnitude,
                // The kinds that add edges (`IncidentKind::adds_edge`) act through those edges.
                _ => {}
            }
        }
        let e = &mut self.edges[k];
        // Noise moves slowly: a new factor every slice, half of the old one kept.
        if edge.noise > 0.0 {
            let fresh = e.rng.lognormal(1.0, edge.noise);
            e.noise_factor = (e.noise_factor * fresh).sqrt();
        }
        // A deploy now and then: the latency moves to a new level and stays there.
        if edge.deploy_every_ms > 0 && e.rng.chance((end - start) as f64 / edge.deploy_every_ms as f64) {
            e.deploy_factor *= e.rng.lognormal(1.0, edge.deploy_shift);
        }
        latency_factor *= e.deploy_factor;
        // Errors in clusters: this slice's ratio drawn around the edge's (Beta, mean kept).
        if edge.error_clusters > 0.0 && error_ratio > 0.0 && error_ratio < 1.0 {
            let n = (1.0 - edge.error_clusters) / edge.error_clusters;
            error_ratio = e.rng.beta(error_ratio * n, (1.0 - error_ratio) * n);
        }
        let from = start.max(e.from_ms);
        let to = end.min(e.until_ms);
        // Requests come in bursts of `burst` on average (1 + Poisson(burst − 1)), the members
        // of one within `BURST_SPREAD_MS`: a window's count varies about `burst` times more
        // than Poisson's. With bursts of one, the draws are those of plain Poisson arrivals.
        let bursts = e.rng.poisson(rate * e.noise_factor * (to - from) as f64 / 1000.0 / edge.burst);
        let mut written = 0;
        for _ in 0..bursts {
            let e = &mut self.edges[k];
            let t0 = from + e.rng.below((to - from) as u64) as i64;
            let size = if edge.burst > 1.0 { 1 + e.rng.poisson(edge.burst - 1.0) } else { 1 };
            for member in 0..size {
                let e = &mut self.edges[k];
                let t = if member == 0 { t0 } else { (t0 + e.rng.below(BURST_SPREAD_MS) as i64).min(to - 1) };
                let latency_us =
                    (e.rng.lognormal(edge.latency_median_ms * latency_factor, edge.latency_sigma) * 1000.0) as u64;
                let (code, flags) = if e.scan {
                    (404, 0)
                } else if e.rng.chance(denial) {
                    (403, ResponseFlags::UNAUTHORIZED)
                } else if e.rng.chance(rate_limit) {
                    (429, ResponseFlags::RATE_LIMITED)
                } else if e.rng.chance(error_ratio) {
                    match e.rng.below(5) {
                        0 => (503, ResponseFlags::UPSTREAM_CONNECTION_FAILURE),
                        1 => (504, ResponseFlags::UPSTREAM_REQUEST_TIMEOUT),
                        _ => (500, 0),
                    }
                } else {
                    (200, 0)
                };
                let req_bytes = (e.rng.exponential(edge.request_bytes) * request_bytes_factor) as u64;
                let resp_bytes = e.rng.exponential(edge.response_bytes) as u64;
                if let Some((_, from, until, slice)) = evidence.as_mut()
                    && (*from..*until).contains(&t)
                {
                    slice.requests += 1;
                    slice.log_ratio_sum += (latency_us.max(1) as f64 / (edge.latency_median_ms * 1000.0)).ln();
                    slice.errors += u64::from(code >= 500);
                }
                let outcome = Outcome { t: t + shift_ms, latency_us, code, flags, req_bytes, resp_bytes, mtls };
                written += self.request(k, &outcome);
            }
        }
        if let Some((index, _, _, slice)) = evidence {
            let record = self.evidence[index].get_or_insert_with(|| Evidence {
                latency_sigma: edge.latency_sigma,
                error_ratio: edge.error_ratio,
                slices: Vec::new(),
            });
            record.slices.push(slice);
        }
        written
    }

    /// Writes the entries of one request (client side, and server side when the callee
    /// has a sidecar); returns how many.
    fn request(&mut self, k: usize, o: &Outcome) -> u64 {
        self.seq += 1;
        let v = Varying {
            start_ms: o.t,
            duration_us: o.latency_us,
            code: o.code,
            flags: o.flags,
            up_bytes: o.req_bytes,
            down_bytes: o.resp_bytes,
            seq: self.seq,
        };
        let (from, to, tcp) = {
            let edge = &self.edges[k].edge;
            (edge.from, edge.to, edge.protocol == Protocol::Tcp)
        };
        let class = (o.code / 100) as usize;
        // Client side: the caller's sidecar, or the gateway for traffic from the internet;
        // none for a workload of another trust domain.
        if foreign(&self.scenario, from) {
            return self.server_side(k, o, &v, class);
        }
        let client_stream = from * 4 + if tcp { Logger::OutboundTcp as usize } else { Logger::OutboundHttp as usize };
        if self.edges[k].templates[0].is_none() {
            self.edges[k].templates[0] = Some(self.template(k, None));
        }
        if let Some(t) = self.edges[k].templates[0].as_mut() {
            t.write(&v, &mut self.pending[client_stream]);
        }
        self.cut(client_stream);
        let e = &mut self.edges[k];
        if tcp {
            e.counts[0].connections += 1
        } else {
            e.counts[0].requests[class] += 1
        }
        if self.scenario.envoy_stats && stats_counted(&self.scenario, from, to) {
            let u = self.upstream.entry((from, to)).or_insert(UpstreamTotals { tcp, ..Default::default() });
            if tcp {
                u.connections += 1;
            } else {
                u.requests += 1;
                // Pooled connections: a new one every hundred requests, and every failed attempt.
                if u.requests % 100 == 1 {
                    u.connections += 1;
                }
            }
            if o.code >= 500 && !tcp {
                u.errors += 1;
            }
            if o.flags & ResponseFlags::UPSTREAM_REQUEST_TIMEOUT != 0 && !tcp {
                u.timeouts += 1;
            }
            if o.flags & ResponseFlags::UPSTREAM_CONNECTION_FAILURE != 0 {
                u.connections += 1;
                u.connect_failures += 1;
            }
        }
        if self.scenario.services[to].external || (o.flags & ResponseFlags::UPSTREAM_CONNECTION_FAILURE) != 0 {
            return 1;
        }
        1 + self.server_side(k, o, &v, class)
    }

    /// Writes the server side's entry of one request; returns 1.
    fn server_side(&mut self, k: usize, o: &Outcome, v: &Varying, class: usize) -> u64 {
        let (to, tcp) = {
            let edge = &self.edges[k].edge;
            (edge.to, edge.protocol == Protocol::Tcp)
        };
        // Server side: the callee's sidecar, which sees the caller's certificate under mTLS.
        let server_stream = to * 4 + if tcp { Logger::InboundTcp as usize } else { Logger::InboundHttp as usize };
        let slot = if o.mtls { 1 } else { 2 };
        if self.edges[k].templates[slot].is_none() {
            self.edges[k].templates[slot] = Some(self.template(k, Some(o.mtls)));
        }
        if let Some(t) = self.edges[k].templates[slot].as_mut() {
            t.write(v, &mut self.pending[server_stream]);
        }
        self.cut(server_stream);
        let e = &mut self.edges[k];
        if tcp {
            e.counts[1].connections += 1
        } else {
            e.counts[1].requests[class] += 1
        }
        1
    }

    /// The entry template of edge `k`: the client side (`server: None`) or the server side,
    /// with or without mTLS.
    fn template(&self, k: usize, server: Option<bool>) -> Template {
        let s = &self.scenario;
        let edge = &self.edges[k].edge;
        let (from, to) = (edge.from, edge.to);
        let tcp = edge.protocol == Protocol::Tcp;
        let callee = &s.services[to];
        let caller_ip = if from == 0 { format!("203.0.113.{}", k % 254 + 1) } else { service_ip(from) };
        let callee_ip = if callee.external { external_ip(&callee.name) } else { service_ip(to) };
        let port = if tcp { 9000 } else { 8080 };
        let (cluster, authority) = if callee.external {
            ("PassthroughCluster".to_string(), callee.name.clone())
        } else {
            (format!("outbound|{port}||{}", fqdn(s, &callee.name)), format!("{}.{}:{port}", callee.name, s.namespace))
        };
        let caller_spiffe = if from == 0 { spiffe(s, GATEWAY) } else { spiffe(s, &s.services[from].name) };
        let callee_spiffe = spiffe(s, &callee.name);
        let inbound_cluster = format!("inbound|{port}||");
        let mtls = server.unwrap_or(false);
        let flow = match server {
            None => FlowSpec {
                start_ms: 0,
                duration_us: 0,
                downstream_ip: &caller_ip,
                upstream_ip: &callee_ip,
                upstream_cluster: &cluster,
                flags: 0,
                peer_spiffe: None,
                local_spiffe: None,
                seq: 0,
            },
            Some(_) => FlowSpec {
                start_ms: 0,
                duration_us: 0,
                downstream_ip: if from == 0 { GATEWAY_IP } else { &caller_ip },
                upstream_ip: &callee_ip,
                upstream_cluster: &inbound_cluster,
                flags: 0,
                peer_spiffe: mtls.then_some(caller_spiffe.as_str()),
                local_spiffe: mtls.then_some(callee_spiffe.as_str()),
                seq: 0,
            },
        };
        if tcp {
            Template::tcp(&TcpSpec { flow, sni: "", sent_bytes: 0, received_bytes: 0 })
        } else {
            Template::http(&HttpSpec {
                flow,
                authority: &authority,
                path: "/api",
                code: 200,
                request_body_bytes: 0,
                response_body_bytes: 0,
            })
        }
    }
}

struct Outcome {
    t: i64,
    latency_us: u64,
    code: u32,
    flags: u32,
    req_bytes: u64,
    resp_bytes: u64,
    mtls: bool,
}

/// The daily and weekly multiplier at `t_ms`, hours interpolated linearly.
fn shape(e: &Edge, t_ms: i64) -> f64 {
    let (hour, weekday) = meshwatch_detector::baseline::calendar(t_ms);
    let h = hour.floor() as usize % 24;
    let frac = hour - hour.floor();
    let daily = e.daily[h] * (1.0 - frac) + e.daily[(h + 1) % 24] * frac;
    daily * e.weekly[weekday]
}

/// The pair names meshwatch will show for an edge, as the caller's side (or the gateway)
/// reports it.
fn pair_names(s: &Scenario, from: usize, to: usize) -> (String, String, &'static str) {
    let caller = &s.services[from];
    let callee = &s.services[to];
    let source = if from == 0 { EXTERNAL.to_string() } else { spiffe(s, &caller.name) };
    let destination = if callee.external { callee.name.clone() } else { spiffe(s, &callee.name) };
    let direction = if from == 0 || caller.external || foreign(s, from) {
        "ingress"
    } else if callee.external {
        "egress"
    } else {
        "east_west"
    };
    (source, destination, direction)
}

/// The callee sidecar's view: traffic from the internet arrives from the gateway.
fn server_view(s: &Scenario, from: usize, destination: &str) -> PairReporter {
    let source = if from == 0 { spiffe(s, GATEWAY) } else { spiffe(s, &s.services[from].name) };
    let direction = if foreign(s, from) { "ingress" } else { "east_west" };
    (source, destination.to_string(), direction, "destination")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
        name = "t"
        start = "2026-01-05"
        duration = "1h"
        namespace = "shop"
        services = [{ name = "web" }, { name = "api" }, { name = "db" }, { name = "pay.example.com", external = true }]
        [[edges]]
        from = "internet"
        to = "web"
        rate = 5
        [[edges]]
        from = "web"
        to = "api"
        rate = 10
        [[edges]]
        from = "api"
        to = "db"
        protocol = "tcp"
        rate = 2
        [[edges]]
        from = "api"
        to = "pay.example.com"
        rate = 1
        [[incidents]]
        kind = "error_burst"
        from = "web"
        to = "api"
        start = "20m"
        duration = "10m"
        magnitude = 0.5
    "#;

    fn run(seed: u64) -> (Vec<(usize, Bytes)>, u64) {
        let mut g = Generator::new(Scenario::parse(SMALL).expect("valid"), seed, 10_000);
        let mut all = Vec::new();
        while let Some(slice) = g.next_slice(0) {
            all.extend(slice.messages);
        }
        (all, g.total_entries())
    }

    #[test]
    fn a_flood_is_made_up_callers_of_one_sidecar_in_messages_of_bounded_size() {
        use envoy_types::pb::envoy::service::accesslog::v3::{
            StreamAccessLogsMessage, stream_access_logs_message as sm,
        };
        let text = SMALL.replace(
            "[[incidents]]",
            "[[incidents]]\nkind = \"identity_flood\"\nfrom = \"internet\"\nto = \"api\"\nstart = \"5m\"\nduration = \"1m\"\nmagnitude = 1000\n[[incidents]]",
        );
        let mut g = Generator::new(Scenario::parse(&text).expect("valid"), 1, 10_000);
        let (mut callers, mut decoded) = (std::collections::HashSet::new(), 0u64);
        while let Some(slice) = g.next_slice(0) {
            for (stream, bytes) in slice.messages {
                assert!(bytes.len() < MESSAGE_BYTES + 4096, "a message of {} bytes", bytes.len());
                let m = StreamAccessLogsMessage::decode(bytes).expect("decodes");
                let entries = match m.log_entries {
                    Some(sm::LogEntries::HttpLogs(h)) => h.log_entry,
                    Some(sm::LogEntries::TcpLogs(t)) => {
                        decoded += t.log_entry.len() as u64;
                        continue;
                    }
                    None => continue,
                };
                decoded += entries.len() as u64;
                if stream != 2 * 4 + Logger::InboundHttp as usize {
                    continue;
                }
                for e in entries {
                    let peer =
                        e.common_properties.and_then(|c| c.tls_properties).and_then(|t| t.peer_certificate_properties);
                    let san = peer.and_then(|p| p.subject_alt_name.into_iter().next()).and_then(|s| s.san);
                    if let Some(envoy_types::pb::envoy::data::accesslog::v3::tls_properties::certificate_properties::subject_alt_name::San::Uri(uri)) = san
                        && uri.contains("made-up-")
                    {
                        callers.insert(uri);
                    }
                }
            }
        }
        // Every entry is in a message; about 60,000 callers, every one new.
        assert_eq!(decoded, g.total_entries());
        assert!((58_000..62_000).contains(&callers.len()), "{} made-up callers", callers.len());
        let truth = g.truth();
        let flood = truth.iter().find(|t| t.kind == "identity_flood").expect("labelled");
        assert_eq!((flood.source.as_str(), flood.destination.as_str()), ("*", "spiffe://cluster.local/ns/shop/sa/api"));
    }

    /// Variance over mean of the entries per 10 s slice of a one-edge mesh (an external
    /// egress: one entry per request), over three hours of a flat rate of 5 a second.
    fn slice_dispersion(burst: f64) -> f64 {
        let text = format!(
            r#"
            name = "b"
            start = "2026-01-05"
            duration = "3h"
            namespace = "shop"
            services = [{{ name = "api" }}, {{ name = "pay.example.com", external = true }}]
            [[edges]]
            from = "api"
            to = "pay.example.com"
            rate = 5
            noise = 0
            burst = {burst}
            "#
        );
        let mut g = Generator::new(Scenario::parse(&text).expect("valid"), 5, 10_000);
        let mut counts = Vec::new();
        while let Some(slice) = g.next_slice(0) {
            counts.push(slice.entries as f64);
        }
        let mean = counts.iter().sum::<f64>() / counts.len() as f64;
        let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / counts.len() as f64;
        assert!((mean - 50.0).abs() < 5.0, "burst {burst}: {mean} a slice");
        var / mean
    }

    #[test]
    fn bursts_make_counts_vary_more_than_poisson() {
        // Bursts of 1 + Poisson(b − 1): variance over mean b + 1 − 1/b.
        for (burst, expected) in [(1.0, 1.0), (4.0, 4.75), (8.0, 8.875)] {
            let d = slice_dispersion(burst);
            assert!((d / expected - 1.0).abs() < 0.25, "burst {burst}: variance over mean {d}, not {expected}");
        }
    }

    #[test]
    fn deterministic_under_a_seed() {
        let (a, na) = run(1);
        let (b, nb) = run(1);
        let (c, _) = run(2);
        assert_eq!(na, nb);
        assert!(a == b, "same seed, different bytes");
        assert!(a != c, "another seed, same bytes");
        // 1 h of 5 + 10 + 2 + 1 per second, mostly logged twice.
        assert!((100_000..140_000).contains(&na), "{na} entries");
    }

    #[test]
    fn counts_and_truth_describe_the_traffic() {
        let mut g = Generator::new(Scenario::parse(SMALL).expect("valid"), 3, 10_000);
        while g.next_slice(0).is_some() {}
        let counts = g.counts();
        let web = "spiffe://cluster.local/ns/shop/sa/web".to_string();
        let api = "spiffe://cluster.local/ns/shop/sa/api".to_string();
        let client = counts.get(&(web.clone(), api.clone(), "east_west", "source")).expect("client view");
        let server = counts.get(&(web.clone(), api.clone(), "east_west", "destination")).expect("server view");
        let total: u64 = client.requests.iter().sum();
        assert!((30_000..42_000).contains(&total), "{total}");
        // Errors concentrate in the 10-minute burst at ratio 0.5: about 3000 of them.
        assert!((2_000..4_000).contains(&client.requests[5]), "{:?}", client.requests);
        // Connection failures never reach the server side.
        assert!(server.requests.iter().sum::<u64>() <= total);
        let egress = counts.get(&(api.clone(), "pay.example.com".into(), "egress", "source")).expect("egress");
        assert!(egress.requests[2] > 3_000);
        assert!(!counts.contains_key(&(api.clone(), "pay.example.com".into(), "egress", "destination")));
        let tcp =
            counts.get(&(api, "spiffe://cluster.local/ns/shop/sa/db".into(), "east_west", "destination")).expect("tcp");
        assert!(tcp.connections > 5_000);
        let ingress = counts.get(&("external".into(), web, "ingress", "gateway")).expect("ingress");
        assert!(ingress.requests[2] > 15_000);
        let total_entries: u64 = counts.values().map(|c| c.requests.iter().sum::<u64>() + c.connections).sum();
        assert_eq!(total_entries, g.total_entries());
        let truth = g.truth();
        assert_eq!(truth.len(), 1);
        assert_eq!(truth[0].kind, "error_burst");
        assert_eq!(truth[0].end_ms - truth[0].start_ms, 600_000);
    }

    /// The evidence of one incident on a one-edge mesh at `rate` requests a second, the edge
    /// with `settings` added, over `hours`.
    fn edge_evidence(incident: &str, settings: &str, rate: f64, hours: u32, seed: u64) -> Evidence {
        let text = format!(
            r#"
            name = "e"
            start = "2026-01-05"
            duration = "{hours}h"
            namespace = "shop"
            services = [{{ name = "api" }}, {{ name = "pay.example.com", external = true }}]
            [[edges]]
            from = "api"
            to = "pay.example.com"
            rate = {rate}
            noise = 0
            {settings}
            [[incidents]]
            from = "api"
            to = "pay.example.com"
            {incident}
            "#
        );
        let mut g = Generator::new(Scenario::parse(&text).expect("valid"), seed, 10_000);
        while g.next_slice(0).is_some() {}
        g.evidence().remove(0).expect("the incident has evidence")
    }

    #[test]
    fn error_clusters_make_errors_vary_as_a_beta_binomial() {
        // 5 % errors for three hours in 10 s slices of ~200 requests: the errors of a slice
        // vary by n·p·(1 − p)·(1 + (n − 1)·ρ), about 1 + 199·ρ times the binomial variance.
        let burst = "kind = \"error_burst\"\nstart = \"0s\"\nduration = \"3h\"\nmagnitude = 0.05";
        for (rho, expected) in [(0.0, 1.0), (0.05, 10.95)] {
            let e = edge_evidence(burst, &format!("error_clusters = {rho}"), 20.0, 3, 9);
            let ratios: Vec<(f64, f64)> = e.slices.iter().map(|s| (s.errors as f64, s.requests as f64)).collect();
            let p = ratios.iter().map(|r| r.0).sum::<f64>() / ratios.iter().map(|r| r.1).sum::<f64>();
            assert!((p - 0.05).abs() < 0.01, "ρ {rho}: mean ratio {p}");
            let excess = ratios.iter().map(|(x, n)| (x - n * p).powi(2) / (n * p * (1.0 - p))).sum::<f64>()
                / ratios.len() as f64;
            assert!((excess / expected - 1.0).abs() < 0.35, "ρ {rho}: variance {excess} times the binomial");
        }
    }

    #[test]
    fn deploys_leave_the_latency_at_a_new_level() {
        // A latency "shift" of ×1 over the last hour of twelve measures where deploys left the
        // median: with none it is where it started, with one every half hour (log-sd 0.2 each)
        // it has wandered about 0.2·√22 ≈ 0.9 in log.
        let probe = "kind = \"latency_shift\"\nstart = \"11h\"\nduration = \"1h\"\nmagnitude = 1";
        let drift = |settings: &str, seed: u64| {
            let e = edge_evidence(probe, settings, 2.0, 12, seed);
            let requests: u64 = e.slices.iter().map(|s| s.requests).sum();
            (e.slices.iter().map(|s| s.log_ratio_sum).sum::<f64>() / requests as f64).abs()
        };
        for seed in 1..=4 {
            assert!(drift("", seed) < 0.05, "seed {seed}: no deploys, {}", drift("", seed));
        }
        let moved = (1..=4).filter(|&seed| drift("deploy_every = \"30m\"\ndeploy_shift = 0.2", seed) > 0.1).count();
        assert!(moved >= 3, "{moved} of 4");
    }

    #[test]
    fn evidence_is_the_incidents_own_requests() {
        let text = SMALL.replace(
            "[[incidents]]",
            "[[incidents]]\nkind = \"latency_shift\"\nfrom = \"api\"\nto = \"pay.example.com\"\nstart = \"5m\"\nduration = \"5m\"\nmagnitude = 2\n\n[[incidents]]",
        );
        let mut g = Generator::new(Scenario::parse(&text).expect("valid"), 3, 10_000);
        while g.next_slice(0).is_some() {}
        let evidence = g.evidence();
        assert_eq!(evidence.len(), g.truth().len());
        let slow = evidence[0].as_ref().expect("a latency shift has evidence");
        // 5 minutes of 10 s slices, at 1 request a second, twice the normal median.
        assert_eq!(slow.slices.len(), 30);
        let requests: u64 = slow.slices.iter().map(|s| s.requests).sum();
        assert!((200..400).contains(&requests), "{requests}");
        let mean_log_ratio = slow.slices.iter().map(|s| s.log_ratio_sum).sum::<f64>() / requests as f64;
        assert!((mean_log_ratio - 2f64.ln()).abs() < 0.1, "{mean_log_ratio}");
        // The error burst: 10 minutes at 10 requests a second, half of them failing.
        let failing = evidence[1].as_ref().expect("an error burst has evidence");
        assert_eq!(failing.slices.len(), 60);
        let (requests, errors) = failing.slices.iter().fold((0, 0), |(r, e), s| (r + s.requests, e + s.errors));
        assert!((errors as f64 / requests as f64 - 0.5).abs() < 0.05, "{errors} of {requests}");
        assert_eq!(failing.error_ratio, 0.001);
    }

    #[test]
    fn shapes_average_to_the_rate() {
        let s = Scenario::parse(&SMALL.replace("rate = 10", "rate = 10\ndaily = \"business\"\nweekly = \"weekdays\""))
            .expect("valid");
        let e = &s.edges[1];
        let week_ms = 7 * 86_400_000;
        let samples = 7 * 24 * 6;
        let mean: f64 =
            (0..samples).map(|i| shape(e, s.start_ms + i * week_ms / samples)).sum::<f64>() / samples as f64;
        assert!((mean - 1.0).abs() < 0.02, "{mean}");
    }
}
