//! Scenario files: a mesh (services and the edges between them, with their traffic shape)
//! and the incidents to inject into it. The format is documented in `scenarios/README.md`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The pseudo-service that stands for clients on the internet: edges from it are ingress
/// through the mesh's gateway.
pub const INTERNET: &str = "internet";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    #[serde(default)]
    description: String,
    /// UTC date the simulation starts, `YYYY-MM-DD` (midnight).
    start: String,
    duration: String,
    #[serde(default = "default_trust_domain")]
    trust_domain: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    seed: u64,
    services: Vec<RawService>,
    edges: Vec<RawEdge>,
    #[serde(default)]
    incidents: Vec<RawIncident>,
    /// A meshwatch policy file (allowed edges) for this mesh, relative to the scenario file.
    #[serde(default)]
    policy: Option<String>,
    /// The sidecars and the gateway also stream their upstream clusters' stats (the stats
    /// sink), cumulative counters flushed every slice.
    #[serde(default)]
    envoy_stats: bool,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    /// Outside the mesh: an API reached by egress (`name` is its host name).
    #[serde(default)]
    external: bool,
    /// A workload of another SPIFFE trust domain (its certificates name that domain).
    #[serde(default)]
    trust_domain: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Shape {
    Preset(String),
    Values(Vec<f64>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdge {
    from: String,
    to: OneOrMany,
    #[serde(default = "default_protocol")]
    protocol: String,
    /// Requests (or connections) per second, averaged over a week.
    rate: f64,
    #[serde(default)]
    daily: Option<Shape>,
    #[serde(default)]
    weekly: Option<Shape>,
    #[serde(default = "default_noise")]
    noise: f64,
    #[serde(default = "default_burst")]
    burst: f64,
    #[serde(default = "default_error_ratio")]
    error_ratio: f64,
    #[serde(default)]
    error_clusters: f64,
    #[serde(default)]
    deploy_every: Option<String>,
    #[serde(default = "default_deploy_shift")]
    deploy_shift: f64,
    #[serde(default = "default_latency_ms")]
    latency_ms: f64,
    #[serde(default = "default_latency_tail")]
    latency_tail: f64,
    #[serde(default = "default_request_bytes")]
    request_bytes: f64,
    #[serde(default = "default_response_bytes")]
    response_bytes: f64,
    #[serde(default = "default_true")]
    mtls: bool,
}

fn default_protocol() -> String {
    "http".into()
}
fn default_noise() -> f64 {
    0.1
}
fn default_burst() -> f64 {
    1.0
}
fn default_error_ratio() -> f64 {
    0.001
}
fn default_deploy_shift() -> f64 {
    0.1
}
fn default_latency_ms() -> f64 {
    20.0
}
fn default_latency_tail() -> f64 {
    0.5
}
fn default_request_bytes() -> f64 {
    300.0
}
fn default_response_bytes() -> f64 {
    2000.0
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIncident {
    kind: String,
    from: String,
    #[serde(default)]
    to: Option<String>,
    /// Offset from the start of the simulation, such as `3d14h30m`.
    start: String,
    duration: String,
    #[serde(default)]
    magnitude: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tcp,
}

/// The kinds of incident a scenario can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IncidentKind {
    /// Latency of an edge × magnitude (default 2).
    LatencyShift,
    /// Error ratio of an edge set to magnitude (default 0.05).
    ErrorBurst,
    /// No traffic on an edge.
    TrafficDrop,
    /// Rate of an edge × magnitude (default 3).
    TrafficSurge,
    /// A new internal edge, at magnitude requests per second (default 1).
    NewEdge,
    /// A new edge to an external host (`to`), at magnitude requests per second (default 0.5).
    NewEgress,
    /// An mTLS edge turns plaintext.
    MtlsDowngrade,
    /// Share magnitude (default 0.3) of an edge's requests denied with 403 (unauthorized flag).
    DenialSurge,
    /// Share magnitude (default 0.3) of an edge's requests rate-limited with 429 (RL flag).
    RateLimitSurge,
    /// `from` calls magnitude (default 40) destinations it never called, most answering 404.
    FanOutScan,
    /// Request bytes of an egress edge × magnitude (default 20).
    EgressBytesSurge,
    /// A service that never called anything calls `to`, at magnitude requests per second
    /// (default 1).
    NewPrincipal,
    /// A workload of another trust domain (a service with `trust_domain`) calls `to` over
    /// mTLS, at magnitude requests per second (default 0.5).
    ForeignPrincipal,
    /// A new edge that the scenario's policy does not allow, at magnitude requests per
    /// second (default 0.5).
    PolicyViolation,
    /// A new internal edge in plaintext (no mTLS), at magnitude requests per second (default
    /// 0.5): a `plaintext` finding where mTLS is required.
    PlaintextEdge,
    /// Share magnitude (default 0.3) of the requests of `from` to every destination denied
    /// with 403 (a workload whose permissions were revoked, or one probing).
    DenialSpread,
    /// `to`'s sidecar receives magnitude requests per second (default 200) over mTLS from
    /// made-up workloads, a new SPIFFE ID each (`from` is where they come from, `internet`
    /// or a service; only `to`'s sidecar reports them).
    IdentityFlood,
}

impl IncidentKind {
    pub const ALL: [IncidentKind; 17] = [
        IncidentKind::LatencyShift,
        IncidentKind::ErrorBurst,
        IncidentKind::TrafficDrop,
        IncidentKind::TrafficSurge,
        IncidentKind::NewEdge,
        IncidentKind::NewEgress,
        IncidentKind::MtlsDowngrade,
        IncidentKind::DenialSurge,
        IncidentKind::RateLimitSurge,
        IncidentKind::FanOutScan,
        IncidentKind::EgressBytesSurge,
        IncidentKind::NewPrincipal,
        IncidentKind::ForeignPrincipal,
        IncidentKind::PolicyViolation,
        IncidentKind::DenialSpread,
        IncidentKind::PlaintextEdge,
        IncidentKind::IdentityFlood,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IncidentKind::LatencyShift => "latency_shift",
            IncidentKind::ErrorBurst => "error_burst",
            IncidentKind::TrafficDrop => "traffic_drop",
            IncidentKind::TrafficSurge => "traffic_surge",
            IncidentKind::NewEdge => "new_edge",
            IncidentKind::NewEgress => "new_egress",
            IncidentKind::MtlsDowngrade => "mtls_downgrade",
            IncidentKind::DenialSurge => "denial_surge",
            IncidentKind::RateLimitSurge => "rate_limit_surge",
            IncidentKind::FanOutScan => "fan_out_scan",
            IncidentKind::EgressBytesSurge => "egress_bytes_surge",
            IncidentKind::NewPrincipal => "new_principal",
            IncidentKind::ForeignPrincipal => "foreign_principal",
            IncidentKind::PolicyViolation => "policy_violation",
            IncidentKind::DenialSpread => "denial_spread",
            IncidentKind::PlaintextEdge => "plaintext_edge",
            IncidentKind::IdentityFlood => "identity_flood",
        }
    }

    pub fn parse(s: &str) -> Option<IncidentKind> {
        IncidentKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn default_magnitude(self) -> f64 {
        match self {
            IncidentKind::LatencyShift => 2.0,
            IncidentKind::ErrorBurst => 0.05,
            IncidentKind::TrafficDrop | IncidentKind::MtlsDowngrade => 0.0,
            IncidentKind::TrafficSurge => 3.0,
            IncidentKind::NewEdge | IncidentKind::NewPrincipal => 1.0,
            IncidentKind::NewEgress
            | IncidentKind::ForeignPrincipal
            | IncidentKind::PolicyViolation
            | IncidentKind::PlaintextEdge => 0.5,
            IncidentKind::DenialSurge | IncidentKind::RateLimitSurge | IncidentKind::DenialSpread => 0.3,
            IncidentKind::FanOutScan => 40.0,
            IncidentKind::EgressBytesSurge => 20.0,
            IncidentKind::IdentityFlood => 200.0,
        }
    }

    /// Kinds that act on an edge the scenario already has.
    fn needs_existing_edge(self) -> bool {
        !self.adds_edge() && self != IncidentKind::IdentityFlood
    }

    /// Kinds that add traffic on an edge the scenario does not have.
    pub fn adds_edge(self) -> bool {
        matches!(
            self,
            IncidentKind::NewEdge
                | IncidentKind::NewEgress
                | IncidentKind::FanOutScan
                | IncidentKind::NewPrincipal
                | IncidentKind::ForeignPrincipal
                | IncidentKind::PolicyViolation
                | IncidentKind::PlaintextEdge
        )
    }
}

#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub external: bool,
    /// Another SPIFFE trust domain than the scenario's.
    pub trust_domain: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    pub protocol: Protocol,
    pub rate_per_s: f64,
    /// 24 hourly multipliers, mean 1.
    pub daily: [f64; 24],
    /// 7 daily multipliers from Monday, mean 1.
    pub weekly: [f64; 7],
    pub noise: f64,
    /// Mean size of a burst of requests (1: independent arrivals).
    pub burst: f64,
    pub error_ratio: f64,
    /// Over-dispersion of errors: each slice's error ratio is Beta-distributed around
    /// `error_ratio` with this intra-class correlation (0: independent requests).
    pub error_clusters: f64,
    /// Mean time between deploy-like lasting shifts of the edge's latency (none when 0), and
    /// the log-normal sigma of each shift's factor.
    pub deploy_every_ms: i64,
    pub deploy_shift: f64,
    pub latency_median_ms: f64,
    pub latency_sigma: f64,
    pub request_bytes: f64,
    pub response_bytes: f64,
    pub mtls: bool,
}

#[derive(Clone, Debug)]
pub struct Incident {
    pub kind: IncidentKind,
    pub from: usize,
    /// The target service; for `FanOutScan`, none.
    pub to: Option<usize>,
    pub start_ms: i64,
    pub end_ms: i64,
    pub magnitude: f64,
}

/// A validated scenario. Service 0 is always `internet`.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub start_ms: i64,
    pub duration_ms: i64,
    pub trust_domain: String,
    pub namespace: String,
    pub seed: u64,
    pub services: Vec<Service>,
    pub edges: Vec<Edge>,
    pub incidents: Vec<Incident>,
    /// The mesh's policy file, relative to the scenario file until `load` resolves it.
    pub policy: Option<PathBuf>,
    /// Whether the simulated Envoys stream their stats too.
    pub envoy_stats: bool,
}

/// Every problem of a scenario file, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ScenarioError(pub Vec<String>);

/// `3d14h30m`, `90s`, `250ms`: a sum of whole numbers with units (ms, s, m, h, d).
pub fn parse_offset_ms(s: &str) -> Result<i64, String> {
    let mut total: i64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| format!("`{s}`: a number without unit"))?;
        let n: i64 = rest[..digits].parse().map_err(|_| format!("`{s}`: expected a number"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let ms = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            u => return Err(format!("`{s}`: unknown unit `{u}` (ms, s, m, h, d)")),
        };
        total = n.checked_mul(ms).and_then(|v| total.checked_add(v)).ok_or_else(|| format!("`{s}` is too long"))?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

fn parse_date_ms(s: &str) -> Result<i64, String> {
    let parts: Vec<i64> = s
        .split('-')
        .map(|p| p.parse::<i64>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("`{s}` is not YYYY-MM-DD"))?;
    match parts[..] {
        [y, m, d] if (1..=12).contains(&m) && (1..=31).contains(&d) => {
            Ok(meshwatch_detector::timefmt::days_from_civil(y, m, d) * 86_400_000)
        }
        _ => Err(format!("`{s}` is not YYYY-MM-DD")),
    }
}

fn normalized<const N: usize>(values: &[f64], what: &str, problems: &mut Vec<String>) -> [f64; N] {
    let mut out = [1.0; N];
    if values.len() != N || values.iter().any(|v| !v.is_finite() || *v < 0.0) {
        problems.push(format!("{what}: needs {N} non-negative numbers"));
        return out;
    }
    let mean = values.iter().sum::<f64>() / N as f64;
    if mean <= 0.0 {
        problems.push(format!("{what}: all zero"));
        return out;
    }
    for (o, v) in out.iter_mut().zip(values) {
        *o = v / mean;
    }
    out
}

fn daily_shape(shape: Option<Shape>, what: &str, problems: &mut Vec<String>) -> [f64; 24] {
    let values: Vec<f64> = match shape {
        None => vec![1.0; 24],
        Some(Shape::Values(v)) => v,
        Some(Shape::Preset(p)) => match p.as_str() {
            "flat" => vec![1.0; 24],
            // Office hours: quiet at night, a morning ramp, a plateau, an evening tail.
            "business" => vec![
                0.15, 0.1, 0.1, 0.1, 0.1, 0.15, 0.3, 0.6, 1.2, 1.7, 1.9, 1.9, 1.7, 1.8, 1.9, 1.9, 1.7, 1.3, 0.9, 0.6,
                0.45, 0.35, 0.25, 0.2,
            ],
            // Consumer traffic: a midday bump and an evening peak.
            "evening" => vec![
                0.35, 0.25, 0.15, 0.1, 0.1, 0.15, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.2, 1.1, 1.0, 1.0, 1.1, 1.3, 1.6, 1.9,
                2.0, 1.8, 1.2, 0.6,
            ],
            // Batch jobs: busy at night.
            "night" => vec![
                2.5, 2.5, 2.2, 2.0, 1.5, 1.0, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.6,
                0.8, 1.2, 1.8, 2.3,
            ],
            other => {
                problems.push(format!("{what}: unknown daily shape `{other}` (flat, business, evening, night)"));
                vec![1.0; 24]
            }
        },
    };
    normalized(&values, what, problems)
}

fn weekly_shape(shape: Option<Shape>, what: &str, problems: &mut Vec<String>) -> [f64; 7] {
    let values: Vec<f64> = match shape {
        None => vec![1.0; 7],
        Some(Shape::Values(v)) => v,
        Some(Shape::Preset(p)) => match p.as_str() {
            "flat" => vec![1.0; 7],
            "weekdays" => vec![1.2, 1.2, 1.2, 1.2, 1.1, 0.5, 0.45],
            "weekends" => vec![0.85, 0.85, 0.85, 0.85, 0.95, 1.4, 1.3],
            other => {
                problems.push(format!("{what}: unknown weekly shape `{other}` (flat, weekdays, weekends)"));
                vec![1.0; 7]
            }
        },
    };
    normalized(&values, what, problems)
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ScenarioError(vec![format!("{}: {e}", path.display())]))?;
        let mut scenario = Scenario::parse(&text)
            .map_err(|e| ScenarioError(e.0.into_iter().map(|p| format!("{}: {p}", path.display())).collect()))?;
        if let (Some(policy), Some(dir)) = (scenario.policy.as_mut(), path.parent()) {
            *policy = dir.join(&*policy);
        }
        Ok(scenario)
    }

    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let raw: RawScenario = toml::from_str(text).map_err(|e| ScenarioError(vec![e.to_string()]))?;
        let mut problems = Vec::new();
        let start_ms = parse_date_ms(&raw.start).unwrap_or_else(|e| {
            problems.push(format!("start: {e}"));
            0
        });
        let duration_ms = parse_offset_ms(&raw.duration).unwrap_or_else(|e| {
            problems.push(format!("duration: {e}"));
            0
        });
        let mut services = vec![Service { name: INTERNET.into(), external: true, trust_domain: None }];
        let mut index = BTreeMap::from([(INTERNET.to_string(), 0usize)]);
        for s in raw.services {
            if index.insert(s.name.clone(), services.len()).is_some() {
                problems.push(format!("services: `{}` twice", s.name));
            }
            if s.name.is_empty() || s.name.contains(['|', ' ', '/']) {
                problems.push(format!("services: `{}` is not a usable name", s.name));
            }
            services.push(Service { name: s.name, external: s.external, trust_domain: s.trust_domain });
        }
        let lookup = |name: &str, what: &str, problems: &mut Vec<String>| -> Option<usize> {
            let found = index.get(name).copied();
            if found.is_none() {
                problems.push(format!("{what}: unknown service `{name}`"));
            }
            found
        };
        let mut edges = Vec::new();
        let mut seen = HashSet::new();
        for (i, e) in raw.edges.into_iter().enumerate() {
            let what = format!("edges[{i}]");
            let protocol = match e.protocol.as_str() {
                "http" => Protocol::Http,
                "tcp" => Protocol::Tcp,
                p => {
                    problems.push(format!("{what}.protocol: `{p}` (http or tcp)"));
                    Protocol::Http
                }
            };
            if !(e.rate.is_finite() && e.rate > 0.0) {
                problems.push(format!("{what}.rate: must be above 0"));
            }
            if !(0.0..=1.0).contains(&e.error_ratio) {
                problems.push(format!("{what}.error_ratio: must be within 0..=1"));
            }
            if !(e.latency_ms > 0.0 && e.latency_tail >= 0.0 && e.noise >= 0.0) {
                problems.push(format!("{what}: latency_ms must be above 0, latency_tail and noise at least 0"));
            }
            if !(e.burst >= 1.0 && e.burst <= 1_000.0) {
                problems.push(format!("{what}: burst {} must be from 1 to 1000", e.burst));
            }
            if !(0.0..0.5).contains(&e.error_clusters) {
                problems.push(format!("{what}.error_clusters: {} must be from 0 to under 0.5", e.error_clusters));
            }
            if !(0.0..=1.0).contains(&e.deploy_shift) {
                problems.push(format!("{what}.deploy_shift: {} must be from 0 to 1", e.deploy_shift));
            }
            let deploy_every_ms = match e.deploy_every.as_deref().map(parse_offset_ms) {
                None => 0,
                Some(Ok(ms)) if ms >= 60_000 => ms,
                Some(Ok(_)) => {
                    problems.push(format!("{what}.deploy_every: at least a minute"));
                    0
                }
                Some(Err(err)) => {
                    problems.push(format!("{what}.deploy_every: {err}"));
                    0
                }
            };
            let daily = daily_shape(e.daily, &format!("{what}.daily"), &mut problems);
            let weekly = weekly_shape(e.weekly, &format!("{what}.weekly"), &mut problems);
            let Some(from) = lookup(&e.from, &format!("{what}.from"), &mut problems) else { continue };
            for to_name in e.to.into_vec() {
                let Some(to) = lookup(&to_name, &format!("{what}.to"), &mut problems) else { continue };
                if to == 0
                    || from == to
                    || (from != 0 && services[from].external)
                    || (from == 0 && services[to].external)
                {
                    problems.push(format!("{what}: `{}` → `{to_name}` is not an edge meshwatch can see", e.from));
                    continue;
                }
                if !seen.insert((from, to)) {
                    problems.push(format!("{what}: `{}` → `{to_name}` twice", e.from));
                }
                edges.push(Edge {
                    from,
                    to,
                    protocol,
                    rate_per_s: e.rate,
                    daily,
                    weekly,
                    noise: e.noise,
                    burst: e.burst,
                    error_ratio: e.error_ratio,
                    error_clusters: e.error_clusters,
                    deploy_every_ms,
                    deploy_shift: e.deploy_shift,
                    latency_median_ms: e.latency_ms,
                    latency_sigma: e.latency_tail,
                    request_bytes: e.request_bytes,
                    response_bytes: e.response_bytes,
                    // From the internet, the hop that can be mutual TLS is the gateway's.
                    mtls: e.mtls && (from == 0 || !services[from].external) && !services[to].external,
                });
            }
        }
        let mut incidents = Vec::new();
        for (i, inc) in raw.incidents.into_iter().enumerate() {
            let what = format!("incidents[{i}]");
            let Some(kind) = IncidentKind::parse(&inc.kind) else {
                let kinds: Vec<_> = IncidentKind::ALL.iter().map(|k| k.as_str()).collect();
                problems.push(format!("{what}.kind: `{}` (one of {})", inc.kind, kinds.join(", ")));
                continue;
            };
            let start =
                parse_offset_ms(&inc.start).map_err(|e| problems.push(format!("{what}.start: {e}"))).unwrap_or(0);
            let length =
                parse_offset_ms(&inc.duration).map_err(|e| problems.push(format!("{what}.duration: {e}"))).unwrap_or(0);
            if start + length > duration_ms {
                problems.push(format!("{what}: ends after the scenario"));
            }
            let Some(from) = lookup(&inc.from, &format!("{what}.from"), &mut problems) else { continue };
            let to = match (&inc.to, kind) {
                (None, IncidentKind::FanOutScan | IncidentKind::DenialSpread) => None,
                (Some(t), IncidentKind::FanOutScan | IncidentKind::DenialSpread) => {
                    problems.push(format!("{what}.to: {} has no single target (`{t}`)", kind.as_str()));
                    None
                }
                (Some(t), _) => lookup(t, &format!("{what}.to"), &mut problems),
                (None, _) => {
                    problems.push(format!("{what}.to: required for {}", kind.as_str()));
                    None
                }
            };
            if let Some(to) = to {
                let exists = edges.iter().any(|e| e.from == from && e.to == to);
                if kind.needs_existing_edge() && !exists {
                    problems.push(format!(
                        "{what}: {} needs an existing edge `{}` → `{}`",
                        kind.as_str(),
                        inc.from,
                        services[to].name
                    ));
                }
                if kind.adds_edge() && exists {
                    problems.push(format!("{what}: {} needs an edge that does not exist yet", kind.as_str()));
                }
                let external_target = services[to].external;
                let wants_external = match kind {
                    IncidentKind::NewEgress | IncidentKind::EgressBytesSurge => Some(true),
                    IncidentKind::NewEdge
                    | IncidentKind::NewPrincipal
                    | IncidentKind::ForeignPrincipal
                    | IncidentKind::PlaintextEdge
                    | IncidentKind::IdentityFlood => Some(false),
                    _ => None,
                };
                if wants_external.is_some_and(|w| w != external_target) {
                    problems.push(format!(
                        "{what}: the target of {} must {}be external",
                        kind.as_str(),
                        if external_target { "not " } else { "" }
                    ));
                }
                if kind == IncidentKind::NewPrincipal && edges.iter().any(|e| e.from == from) {
                    problems.push(format!("{what}: the caller of new_principal must call nothing else"));
                }
                let foreign = services[from].trust_domain.as_ref().is_some_and(|td| *td != raw.trust_domain);
                if kind == IncidentKind::ForeignPrincipal && !foreign {
                    problems.push(format!("{what}: the caller of foreign_principal needs another trust_domain"));
                }
                if kind == IncidentKind::MtlsDowngrade && !edges.iter().any(|e| e.from == from && e.to == to && e.mtls)
                {
                    problems.push(format!("{what}: mtls_downgrade needs an mTLS edge"));
                }
            }
            if kind == IncidentKind::DenialSpread && edges.iter().filter(|e| e.from == from).count() < 2 {
                problems.push(format!("{what}: denial_spread needs a caller of two services or more"));
            }
            incidents.push(Incident {
                kind,
                from,
                to,
                start_ms: start_ms + start,
                end_ms: start_ms + start + length,
                magnitude: inc.magnitude.unwrap_or(kind.default_magnitude()),
            });
        }
        if !problems.is_empty() {
            return Err(ScenarioError(problems));
        }
        Ok(Scenario {
            name: raw.name,
            description: raw.description,
            start_ms,
            duration_ms,
            trust_domain: raw.trust_domain,
            namespace: raw.namespace,
            seed: raw.seed,
            services,
            edges,
            incidents,
            policy: raw.policy.map(PathBuf::from),
            envoy_stats: raw.envoy_stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_dates() {
        assert_eq!(parse_offset_ms("3d14h30m"), Ok(((3 * 24 + 14) * 60 + 30) * 60_000));
        assert_eq!(parse_offset_ms("250ms"), Ok(250));
        assert!(parse_offset_ms("3x").is_err());
        assert!(parse_offset_ms("").is_err());
        assert_eq!(parse_date_ms("1970-01-02"), Ok(86_400_000));
        assert_eq!(parse_date_ms("2026-01-05"), Ok(1_767_571_200_000));
    }

    #[test]
    fn every_problem_is_reported() {
        let text = r#"
            name = "bad"
            start = "2026-13-01"
            duration = "1d"
            services = [{ name = "a" }, { name = "a" }]
            [[edges]]
            from = "a"
            to = ["nowhere"]
            rate = 0
            daily = "lunar"
            burst = 0.5
            [[incidents]]
            kind = "meteor"
            from = "a"
            start = "1h"
            duration = "1h"
        "#;
        let err = Scenario::parse(text).expect_err("invalid");
        let all = err.0.join("\n");
        for needle in ["start", "twice", "nowhere", "rate", "lunar", "burst 0.5", "meteor"] {
            assert!(all.contains(needle), "no problem about {needle}: {all}");
        }
    }

    #[test]
    fn every_shipped_scenario_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut loaded = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("scenarios/") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.ends_with(".toml") && !name.ends_with("-policy.toml") {
                let scenario = Scenario::load(&path).unwrap_or_else(|e| panic!("{name}: {e:?}"));
                loaded.push((name, scenario));
            }
        }
        loaded.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<&str> = loaded.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "bursty-mesh.toml",
                "demo.toml",
                "flood-live.toml",
                "flood-mesh.toml",
                "quiet-mesh.toml",
                "rough-mesh.toml",
                "shop.toml",
                "small-mesh.toml"
            ]
        );
        let (_, bursty) = &loaded[0];
        assert!(bursty.edges.iter().any(|e| e.burst == 8.0), "bursty-mesh has bursts of 8");
        let (_, rough) = &loaded[5];
        assert!(rough.edges.iter().any(|e| e.error_clusters == 0.1), "rough-mesh has clusters of errors");
        assert!(rough.edges.iter().all(|e| e.deploy_every_ms > 0), "rough-mesh has deploys on every edge");
    }
}
