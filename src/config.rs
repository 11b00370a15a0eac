//! Configuration: a TOML file (optional) plus `MESHWATCH_*` environment overrides, parsed
//! into `RawConfig`, then validated into `Config` with every problem reported at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use meshwatch_collector::als::AlsConfig;
use meshwatch_collector::envoy_stats::{CounterMode, StatsConfig};
use meshwatch_collector::flow::Direction;
use meshwatch_collector::identity::{MeshConfig, Pattern, ServiceMapping};
use meshwatch_collector::pipeline::Clock;
use meshwatch_collector::window::WindowConfig;
use meshwatch_detector::alert::AlertConfig;
use meshwatch_detector::baseline::Cadence;
use meshwatch_detector::model::DetectorConfig;
use meshwatch_detector::notify::{DeliveryConfig, Receiver, Target};
use meshwatch_detector::trust::{Policy, Rule, TrustConfig};
use serde::Deserialize;

/// Environment variables with this prefix override the file: `MESHWATCH_DATA_DIR` sets
/// `data_dir`, `MESHWATCH_LISTEN__GRPC` sets `[listen] grpc` (a double underscore between
/// section and key). Values are read as TOML when they parse (`10`, `["a", "b"]`), else as
/// plain strings.
pub const ENV_PREFIX: &str = "MESHWATCH_";
/// Not a configuration key: the log filter (tracing `EnvFilter` syntax).
pub const ENV_LOG: &str = "MESHWATCH_LOG";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub data_dir: Option<String>,
    pub shutdown_grace: Option<String>,
    pub shutdown_drain: Option<String>,
    pub listen: RawListen,
    pub ingest: RawIngest,
    pub window: RawWindow,
    pub limits: RawLimits,
    pub mesh: RawMesh,
    pub detector: RawDetector,
    pub zero_trust: RawZeroTrust,
    pub alerting: RawAlerting,
    pub telemetry: RawTelemetry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAlerting {
    #[serde(rename = "for")]
    pub for_: Option<String>,
    pub keep_firing_for: Option<String>,
    pub runbook_url: Option<String>,
    pub external_url: Option<String>,
    pub api_token: Option<String>,
    pub retry_initial: Option<String>,
    pub retry_max: Option<String>,
    pub max_age: Option<String>,
    pub resend_interval: Option<String>,
    pub timeout: Option<String>,
    pub receivers: Vec<RawReceiver>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReceiver {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub url: Option<String>,
    /// Alertmanager: several instances, each sent everything.
    #[serde(default)]
    pub urls: Vec<String>,
    pub routing_key: Option<String>,
    pub secret: Option<String>,
    #[serde(default)]
    pub severities: Vec<String>,
    #[serde(default)]
    pub directions: Vec<String>,
    #[serde(default)]
    pub kinds: Vec<String>,
}

/// The PagerDuty Events API v2 endpoint.
pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

impl RawAlerting {
    fn validate(&self, c: &mut Check) -> Alerting {
        let a = AlertConfig::default();
        let d = DeliveryConfig::default();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let for_ =
            c.duration("alerting.for", self.for_.as_deref(), Duration::from_millis(a.for_ms as u64), Duration::ZERO);
        let keep = c.duration(
            "alerting.keep_firing_for",
            self.keep_firing_for.as_deref(),
            Duration::from_millis(a.keep_firing_ms as u64),
            Duration::ZERO,
        );
        let second = Duration::from_secs(1);
        let delivery = DeliveryConfig {
            retry_initial: c.duration(
                "alerting.retry_initial",
                self.retry_initial.as_deref(),
                d.retry_initial,
                Duration::from_millis(10),
            ),
            retry_max: c.duration(
                "alerting.retry_max",
                self.retry_max.as_deref(),
                d.retry_max,
                Duration::from_millis(10),
            ),
            max_age: c.duration("alerting.max_age", self.max_age.as_deref(), d.max_age, second),
            resend_interval: c.duration(
                "alerting.resend_interval",
                self.resend_interval.as_deref(),
                d.resend_interval,
                second,
            ),
            timeout: c.duration("alerting.timeout", self.timeout.as_deref(), d.timeout, Duration::from_millis(100)),
        };
        let external_url = self.external_url.clone().unwrap_or(a.external_url);
        if !external_url.starts_with("http://") && !external_url.starts_with("https://") {
            c.0.push(format!("alerting.external_url: `{external_url}` is not an http(s) URL"));
        }
        let api_token = self.api_token.clone().filter(|t| !t.is_empty());
        let mut receivers = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.receivers.iter().enumerate() {
            let key = format!("alerting.receivers[{i}]");
            if r.name.is_empty() || !r.name.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) {
                c.0.push(format!("{key}.name: `{}` (letters, digits, - _ .)", r.name));
            }
            if !names.insert(r.name.clone()) {
                c.0.push(format!("{key}.name: `{}` is used twice", r.name));
            }
            let url_ok = |c: &mut Check, u: &str| {
                if !u.starts_with("http://") && !u.starts_with("https://") {
                    c.0.push(format!("{key}: `{u}` is not an http(s) URL"));
                }
            };
            let need = |c: &mut Check, v: &Option<String>, what: &str| -> String {
                match v.as_deref() {
                    Some(x) if !x.is_empty() => x.to_string(),
                    _ => {
                        c.0.push(format!("{key}.{what}: required for type `{}`", r.kind));
                        String::new()
                    }
                }
            };
            let mut targets = Vec::new();
            match r.kind.as_str() {
                "alertmanager" => {
                    let mut urls = r.urls.clone();
                    urls.extend(r.url.clone());
                    if urls.is_empty() {
                        c.0.push(format!("{key}.urls: at least one Alertmanager"));
                    }
                    for u in urls {
                        url_ok(c, &u);
                        targets.push(Target::Alertmanager { url: u });
                    }
                }
                "pagerduty" => {
                    let url = r.url.clone().unwrap_or_else(|| PAGERDUTY_EVENTS_URL.into());
                    url_ok(c, &url);
                    targets.push(Target::PagerDuty { url, routing_key: need(c, &r.routing_key, "routing_key") });
                }
                "slack" => {
                    let url = need(c, &r.url, "url");
                    url_ok(c, &url);
                    targets.push(Target::Slack { url });
                }
                "webhook" => {
                    let url = need(c, &r.url, "url");
                    url_ok(c, &url);
                    targets.push(Target::Webhook { url, secret: need(c, &r.secret, "secret") });
                }
                other => c.0.push(format!("{key}.type: `{other}` (alertmanager, pagerduty, slack or webhook)")),
            }
            for s in &r.severities {
                if !matches!(s.as_str(), "critical" | "warning") {
                    c.0.push(format!("{key}.severities: `{s}` (critical or warning)"));
                }
            }
            for d in &r.directions {
                if Direction::parse(d).is_none() {
                    c.0.push(format!("{key}.directions: `{d}` (ingress, east_west or egress)"));
                }
            }
            let kinds = c.patterns(&format!("{key}.kinds"), &r.kinds);
            let n = targets.len();
            for (j, target) in targets.into_iter().enumerate() {
                receivers.push(Receiver {
                    name: if n > 1 { format!("{}-{j}", r.name) } else { r.name.clone() },
                    target,
                    severities: r.severities.clone(),
                    directions: r.directions.clone(),
                    kinds: kinds.clone(),
                });
            }
        }
        Alerting {
            rules: AlertConfig {
                for_ms: ms(for_),
                keep_firing_ms: ms(keep),
                runbook_url: self.runbook_url.clone().filter(|u| !u.is_empty()),
                external_url,
            },
            delivery,
            receivers,
            api_token,
        }
    }
}

/// Alerting, validated.
#[derive(Clone, Debug, Default)]
pub struct Alerting {
    pub rules: AlertConfig,
    pub delivery: DeliveryConfig,
    pub receivers: Vec<Receiver>,
    pub api_token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawZeroTrust {
    pub learning: Option<String>,
    pub forget_after: Option<String>,
    pub hold: Option<String>,
    pub require_mtls: Option<bool>,
    pub fan_out_span: Option<String>,
    pub fan_out_min_new: Option<i64>,
    pub scan_min_paths: Option<i64>,
    pub new_egress_volume_bytes: Option<i64>,
    pub max_edges: Option<i64>,
    /// A policy file (relative paths are relative to the configuration file).
    pub policy: Option<String>,
}

/// A policy file: `[[allow]]` tables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    #[serde(default)]
    pub allow: Vec<RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub from: String,
    pub to: String,
    pub direction: Option<String>,
}

/// Reads and validates a policy file.
pub fn load_policy(path: &Path) -> Result<Policy, ConfigError> {
    let name = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::one(format!("{name}: cannot read: {e}")))?;
    let raw: RawPolicy =
        toml::from_str(&text).map_err(|e| ConfigError::one(format!("{name}: not a valid policy: {}", e.message())))?;
    let mut problems = Vec::new();
    let mut allow = Vec::new();
    for (i, r) in raw.allow.iter().enumerate() {
        let direction = match r.direction.as_deref() {
            None => None,
            Some(d) => match Direction::parse(d) {
                Some(d) => Some(d),
                None => {
                    problems.push(format!("{name}: allow[{i}].direction: `{d}` (ingress, east_west or egress)"));
                    None
                }
            },
        };
        for (what, v) in [("from", &r.from), ("to", &r.to)] {
            if v.is_empty() {
                problems.push(format!("{name}: allow[{i}].{what}: empty pattern"));
            }
        }
        allow.push(Rule { from: Pattern::new(r.from.clone()), to: Pattern::new(r.to.clone()), direction });
    }
    if allow.is_empty() {
        problems.push(format!("{name}: no [[allow]] rule, so every edge would be a violation"));
    }
    if problems.is_empty() { Ok(Policy { allow }) } else { Err(ConfigError { problems }) }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDetector {
    pub warmup: Option<String>,
    pub threshold: Option<f64>,
    pub k: Option<i64>,
    pub n: Option<i64>,
    pub adapt_after: Option<String>,
    pub clear_after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawListen {
    pub grpc: Option<String>,
    pub http: Option<String>,
    pub read_token: Option<String>,
    pub tls: RawTls,
}

/// `[listen.tls]`: TLS on the gRPC listener. Paths are relative to the configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub client_ca: Option<String>,
    pub allowed_identities: Vec<String>,
    pub bind_node_identity: bool,
    pub http: bool,
}

impl RawTls {
    fn validate(&self, c: &mut Check) -> Option<crate::tls::TlsSettings> {
        let mut read = |key: &str, path: &str| match std::fs::read(path) {
            Ok(pem) if pem.windows(11).any(|w| w == b"-----BEGIN ") => Some(pem),
            Ok(_) => {
                c.0.push(format!("listen.tls.{key}: {path} holds no PEM block"));
                None
            }
            Err(e) => {
                c.0.push(format!("listen.tls.{key}: cannot read {path}: {e}"));
                None
            }
        };
        let (cert, key) = match (self.cert.as_deref(), self.key.as_deref()) {
            (Some(cert), Some(key)) => (read("cert", cert), read("key", key)),
            (None, None) => {
                if self.client_ca.is_some() || !self.allowed_identities.is_empty() || self.bind_node_identity {
                    c.0.push(
                        "listen.tls: client_ca, allowed_identities and bind_node_identity need cert and key".into(),
                    );
                }
                return None;
            }
            _ => {
                c.0.push("listen.tls: cert and key go together".into());
                return None;
            }
        };
        let client_ca = self.client_ca.as_deref().map(|p| read("client_ca", p));
        if client_ca.is_none() && !self.allowed_identities.is_empty() {
            c.0.push(
                "listen.tls.allowed_identities: needs client_ca (the identities are read from client certificates)"
                    .into(),
            );
        }
        if client_ca.is_none() && self.bind_node_identity {
            c.0.push(
                "listen.tls.bind_node_identity: needs client_ca (the identity is read from client certificates)".into(),
            );
        }
        let allowed_identities = c.patterns("listen.tls.allowed_identities", &self.allowed_identities);
        Some(crate::tls::TlsSettings {
            cert_pem: cert?,
            key_pem: key?,
            client_ca_pem: match client_ca {
                Some(pem) => Some(pem?),
                None => None,
            },
            allowed_identities,
            bind_node_identity: self.bind_node_identity,
            http: self.http,
        })
    }
}

/// meshwatch's own traces.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    /// OTLP/gRPC endpoint (`http://collector:4317`); traces are off without one.
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    /// Share of traces kept, in (0, 1].
    pub sample_ratio: Option<f64>,
}

/// Where meshwatch's traces go, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct TracesConfig {
    pub endpoint: String,
    pub service_name: String,
    pub sample_ratio: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIngest {
    pub max_message_bytes: Option<i64>,
    pub queue_batches: Option<i64>,
    pub enqueue_timeout: Option<String>,
    /// How Envoys' stats sinks report counters: `cumulative` or `delta`.
    pub stats_counters: Option<String>,
    /// Clusters whose stats are not pairs.
    pub stats_ignore_clusters: Option<Vec<String>>,
    pub stats_max_tracked: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWindow {
    pub clock: Option<String>,
    pub length: Option<String>,
    pub grace: Option<String>,
    pub max_future: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_pairs: Option<i64>,
    pub max_identity_bytes: Option<i64>,
    pub evict_idle: Option<String>,
    pub max_connections: Option<i64>,
    pub connection_idle: Option<String>,
    pub request_timeout: Option<String>,
    pub max_streams_per_connection: Option<i64>,
    pub identify_within: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMesh {
    pub trust_domains: Option<Vec<String>>,
    pub internal_cidrs: Option<Vec<String>>,
    pub internal_domains: Option<Vec<String>>,
    pub gateway_nodes: Option<Vec<String>>,
    pub external_clusters: Option<Vec<String>>,
    pub inbound_log_names: Option<Vec<String>>,
    pub services: Vec<RawService>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: String,
    #[serde(default)]
    pub cidrs: Vec<String>,
    #[serde(default)]
    pub clusters: Vec<String>,
    /// Reporting Envoys (node id or cluster patterns) that are this service's own proxies.
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default)]
    pub external: bool,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// TLS (and mutual TLS) on the gRPC listener; plaintext when `None`.
    pub grpc_tls: Option<crate::tls::TlsSettings>,
    /// Bearer token that the HTTP listener's reads need (`/metrics`, `/api/v1/*`).
    pub read_token: Option<String>,
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long `/readyz` answers 503 before the listeners stop.
    pub shutdown_drain: Duration,
    pub queue_batches: usize,
    pub als: AlsConfig,
    /// Per listener (gRPC and HTTP): connections open, and when one is closed.
    pub grpc_connections: crate::listen::ConnectionLimits,
    pub http_connections: crate::listen::ConnectionLimits,
    /// HTTP/2 streams at once on one gRPC connection.
    pub max_streams_per_connection: u32,
    pub stats: StatsConfig,
    pub window: WindowConfig,
    pub clock: Clock,
    pub mesh: MeshConfig,
    pub detector: DetectorConfig,
    pub trust: TrustConfig,
    pub alerting: Alerting,
    /// meshwatch's own traces over OTLP; `None` (the default) turns them off.
    pub traces: Option<TracesConfig>,
}

/// Every problem found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: String) -> ConfigError {
        ConfigError { problems: vec![problem] }
    }
}

/// Parses `10s`, `250ms`, `5m`, `1h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| format!("`{s}` has no unit (ms, s, m, h, d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` does not start with a whole number"))?;
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{s}` has an unknown unit `{unit}` (ms, s, m, h, d)")),
    };
    n.checked_mul(ms_per).map(Duration::from_millis).ok_or_else(|| format!("`{s}` is too long"))
}

/// Reads the file (if any), applies environment overrides, and validates.
pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
    let mut table = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| ConfigError::one(format!("{}: cannot read: {e}", p.display())))?;
            text.parse::<toml::Table>()
                .map_err(|e| ConfigError::one(format!("{}: not valid TOML: {e}", p.display())))?
        }
        None => toml::Table::new(),
    };
    apply_env(&mut table, env)?;
    let mut raw: RawConfig = table.try_into().map_err(|e: toml::de::Error| {
        ConfigError::one(format!("{}: {}", path.map_or("environment".into(), |p| p.display().to_string()), e.message()))
    })?;
    if let Some(dir) = path.and_then(Path::parent) {
        let tls = &mut raw.listen.tls;
        for file in [raw.zero_trust.policy.as_mut(), tls.cert.as_mut(), tls.key.as_mut(), tls.client_ca.as_mut()]
            .into_iter()
            .flatten()
        {
            *file = dir.join(&*file).display().to_string();
        }
    }
    raw.validate()
}

fn apply_env(table: &mut toml::Table, env: impl IntoIterator<Item = (String, String)>) -> Result<(), ConfigError> {
    let vars: BTreeMap<String, String> =
        env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != ENV_LOG).collect();
    for (name, value) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let (last, sections) = path.split_last().ok_or_else(|| ConfigError::one(format!("{name}: empty key")))?;
        let mut cursor = &mut *table;
        for section in sections {
            let entry = cursor.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = entry
                .as_table_mut()
                .ok_or_else(|| ConfigError::one(format!("{name}: `{section}` is not a section")))?;
        }
        cursor.insert(last.clone(), parsed);
    }
    Ok(())
}

/// Collects problems while validating.
struct Check(Vec<String>);

impl Check {
    fn duration(&mut self, key: &str, v: Option<&str>, default: Duration, min: Duration) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(v) {
            Ok(d) if d >= min => d,
            Ok(_) => {
                self.0.push(format!("{key}: `{v}` is shorter than {}ms", min.as_millis()));
                default
            }
            Err(e) => {
                self.0.push(format!("{key}: {e}"));
                default
            }
        }
    }

    fn count(&mut self, key: &str, v: Option<i64>, default: usize, min: usize, max: usize) -> usize {
        let Some(v) = v else { return default };
        match usize::try_from(v) {
            Ok(n) if (min..=max).contains(&n) => n,
            _ => {
                self.0.push(format!("{key}: {v} is outside {min}..={max}"));
                default
            }
        }
    }

    fn addr(&mut self, key: &str, v: Option<&str>, default: &str) -> SocketAddr {
        let v = v.unwrap_or(default);
        v.parse().unwrap_or_else(|e| {
            self.0.push(format!("{key}: `{v}` is not an address like 127.0.0.1:9977 ({e})"));
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn cidrs(&mut self, key: &str, v: &[String]) -> Vec<IpNet> {
        v.iter()
            .filter_map(|c| match c.parse::<IpNet>() {
                Ok(n) => Some(n),
                Err(_) => match c.parse::<std::net::IpAddr>() {
                    Ok(ip) => Some(IpNet::from(ip)),
                    Err(_) => {
                        self.0.push(format!("{key}: `{c}` is not a CIDR like 10.0.0.0/8"));
                        None
                    }
                },
            })
            .collect()
    }

    fn patterns(&mut self, key: &str, v: &[String]) -> Vec<Pattern> {
        v.iter()
            .filter_map(|p| {
                if p.is_empty() {
                    self.0.push(format!("{key}: empty pattern"));
                    None
                } else {
                    Some(Pattern::new(p.clone()))
                }
            })
            .collect()
    }
}

impl RawConfig {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut c = Check(Vec::new());
        let defaults = MeshConfig::default();
        let window_defaults = WindowConfig::default();
        let als_defaults = AlsConfig::default();
        let grpc_listen = c.addr("listen.grpc", self.listen.grpc.as_deref(), "127.0.0.1:9977");
        let http_listen = c.addr("listen.http", self.listen.http.as_deref(), "127.0.0.1:9978");
        if grpc_listen == http_listen && grpc_listen.port() != 0 {
            c.0.push(format!("listen: grpc and http are both {grpc_listen}"));
        }
        let grpc_tls = self.listen.tls.validate(&mut c);
        let length = c.duration(
            "window.length",
            self.window.length.as_deref(),
            Duration::from_millis(window_defaults.length_ms as u64),
            Duration::from_secs(1),
        );
        let grace = c.duration(
            "window.grace",
            self.window.grace.as_deref(),
            Duration::from_millis(window_defaults.grace_ms as u64),
            Duration::ZERO,
        );
        let max_future = c.duration(
            "window.max_future",
            self.window.max_future.as_deref(),
            Duration::from_millis(window_defaults.max_future_ms as u64),
            Duration::ZERO,
        );
        let clock = match self.window.clock.as_deref() {
            None | Some("live") => Clock::Live,
            Some("watermark") => Clock::Watermark,
            Some(other) => {
                c.0.push(format!("window.clock: `{other}` (live or watermark)"));
                Clock::Live
            }
        };
        if !length.as_millis().is_multiple_of(1000) {
            c.0.push(format!("window.length: {}ms is not a whole number of seconds", length.as_millis()));
        }
        let max_pairs = c.count("limits.max_pairs", self.limits.max_pairs, window_defaults.max_pairs, 1, 10_000_000);
        let max_identity_bytes =
            c.count("limits.max_identity_bytes", self.limits.max_identity_bytes, defaults.max_identity_bytes, 16, 4096);
        let max_message_bytes = c.count(
            "ingest.max_message_bytes",
            self.ingest.max_message_bytes,
            als_defaults.max_message_bytes,
            1024,
            256 << 20,
        );
        let l = &self.limits;
        let evict_idle =
            c.duration("limits.evict_idle", l.evict_idle.as_deref(), Duration::from_secs(600), Duration::from_secs(1));
        let max_connections = c.count("limits.max_connections", l.max_connections, 1024, 1, 1 << 20);
        let second = Duration::from_secs(1);
        let connection_idle =
            c.duration("limits.connection_idle", l.connection_idle.as_deref(), Duration::from_secs(120), second);
        let request_timeout =
            c.duration("limits.request_timeout", l.request_timeout.as_deref(), Duration::from_secs(30), second);
        let identify_within =
            c.duration("limits.identify_within", l.identify_within.as_deref(), Duration::from_secs(30), second);
        let max_streams_per_connection =
            c.count("limits.max_streams_per_connection", l.max_streams_per_connection, 128, 1, 1 << 16) as u32;
        let queue_batches = c.count("ingest.queue_batches", self.ingest.queue_batches, 1024, 1, 1 << 20);
        let enqueue_timeout = c.duration(
            "ingest.enqueue_timeout",
            self.ingest.enqueue_timeout.as_deref(),
            als_defaults.enqueue_timeout,
            Duration::ZERO,
        );
        let stats_defaults = StatsConfig::default();
        let stats_counters = match self.ingest.stats_counters.as_deref() {
            None => stats_defaults.counters,
            Some(v) => CounterMode::parse(v).unwrap_or_else(|| {
                c.0.push(format!("ingest.stats_counters: `{v}` (cumulative or delta)"));
                stats_defaults.counters
            }),
        };
        let stats_ignore_clusters = match &self.ingest.stats_ignore_clusters {
            Some(v) => c.patterns("ingest.stats_ignore_clusters", v),
            None => stats_defaults.ignore_clusters.clone(),
        };
        let stats_max_tracked = c.count(
            "ingest.stats_max_tracked",
            self.ingest.stats_max_tracked,
            stats_defaults.max_tracked_clusters,
            1,
            10_000_000,
        );
        let shutdown_grace =
            c.duration("shutdown_grace", self.shutdown_grace.as_deref(), Duration::from_secs(10), Duration::ZERO);
        let shutdown_drain =
            c.duration("shutdown_drain", self.shutdown_drain.as_deref(), Duration::ZERO, Duration::ZERO);

        let det_defaults = DetectorConfig::default();
        let windows_of = |d: Duration| (d.as_millis() / length.as_millis().max(1)) as u64;
        let warmup =
            c.duration("detector.warmup", self.detector.warmup.as_deref(), Duration::from_secs(86_400), Duration::ZERO);
        let adapt_after =
            c.duration("detector.adapt_after", self.detector.adapt_after.as_deref(), Duration::from_secs(3600), length);
        let clear_after =
            c.duration("detector.clear_after", self.detector.clear_after.as_deref(), Duration::from_secs(300), length);
        let threshold = self.detector.threshold.unwrap_or(det_defaults.threshold_p);
        if !(threshold > 0.0 && threshold < 0.01) {
            c.0.push(format!("detector.threshold: {threshold} is not a p-value in (0, 0.01)"));
        }
        let n = c.count("detector.n", self.detector.n, det_defaults.n as usize, 1, 31);
        let k = c.count("detector.k", self.detector.k, det_defaults.k as usize, 1, 31);
        if k > n {
            c.0.push(format!("detector.k: {k} hot windows cannot fit in the last {n}"));
        }
        let detector = DetectorConfig {
            warmup_windows: windows_of(warmup),
            threshold_p: threshold,
            k: k as u32,
            n: n as u32,
            adapt_after: u32::try_from(windows_of(adapt_after)).unwrap_or(u32::MAX),
            clear_after: u32::try_from(windows_of(clear_after)).unwrap_or(u32::MAX),
            cadence: Cadence::of(length.as_millis() as i64),
        };
        let z = &self.zero_trust;
        let zt = TrustConfig::default();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let hour = Duration::from_secs(3600);
        let learning = c.duration("zero_trust.learning", z.learning.as_deref(), hour * 24, Duration::ZERO);
        let forget_after = c.duration("zero_trust.forget_after", z.forget_after.as_deref(), hour * 24 * 30, hour);
        let hold = c.duration("zero_trust.hold", z.hold.as_deref(), Duration::from_secs(900), length);
        let fan_out_span = c.duration("zero_trust.fan_out_span", z.fan_out_span.as_deref(), length * 60, length);
        let fan_out_min_new =
            c.count("zero_trust.fan_out_min_new", z.fan_out_min_new, zt.fan_out_min_new as usize, 1, 100_000);
        let scan_min_paths =
            c.count("zero_trust.scan_min_paths", z.scan_min_paths, zt.scan_min_paths as usize, 1, 100_000);
        let new_egress_volume_bytes = c.count(
            "zero_trust.new_egress_volume_bytes",
            z.new_egress_volume_bytes,
            zt.new_egress_volume_bytes as usize,
            1,
            usize::MAX,
        );
        let max_edges = c.count("zero_trust.max_edges", z.max_edges, zt.max_edges, 1, 100_000_000);
        let policy = z.policy.as_deref().and_then(|p| match load_policy(Path::new(p)) {
            Ok(policy) => Some(policy),
            Err(e) => {
                c.0.extend(e.problems.into_iter().map(|p| format!("zero_trust.policy: {p}")));
                None
            }
        });
        let alerting = self.alerting.validate(&mut c);
        let t = &self.telemetry;
        let sample_ratio = t.sample_ratio.unwrap_or(1.0);
        if !(sample_ratio > 0.0 && sample_ratio <= 1.0) {
            c.0.push(format!("telemetry.sample_ratio: {sample_ratio} is not in (0, 1]"));
        }
        let traces = t.otlp_endpoint.as_ref().map(|endpoint| {
            if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
                c.0.push(format!("telemetry.otlp_endpoint: `{endpoint}` is not an http:// or https:// URL"));
            }
            TracesConfig {
                endpoint: endpoint.clone(),
                service_name: t.service_name.clone().unwrap_or_else(|| "meshwatch".into()),
                sample_ratio,
            }
        });
        let m = self.mesh;
        let trust_domains = m.trust_domains.unwrap_or(defaults.trust_domains.clone());
        for td in &trust_domains {
            if td.is_empty() || td.contains('/') || td.contains(':') {
                c.0.push(format!("mesh.trust_domains: `{td}` is not a trust domain like cluster.local"));
            }
        }
        let internal_cidrs = match &m.internal_cidrs {
            Some(v) => c.cidrs("mesh.internal_cidrs", v),
            None => defaults.internal_cidrs.clone(),
        };
        let gateway_nodes = match &m.gateway_nodes {
            Some(v) => c.patterns("mesh.gateway_nodes", v),
            None => defaults.gateway_nodes.clone(),
        };
        let external_clusters = match &m.external_clusters {
            Some(v) => c.patterns("mesh.external_clusters", v),
            None => defaults.external_clusters.clone(),
        };
        let inbound_log_names = match &m.inbound_log_names {
            Some(v) => c.patterns("mesh.inbound_log_names", v),
            None => defaults.inbound_log_names.clone(),
        };
        let mut services = Vec::new();
        for (i, s) in m.services.iter().enumerate() {
            let key = format!("mesh.services[{i}]");
            if s.name.is_empty() {
                c.0.push(format!("{key}.name: must not be empty"));
            }
            if s.cidrs.is_empty() && s.clusters.is_empty() && s.nodes.is_empty() {
                c.0.push(format!("{key}: `{}` has no cidrs, clusters or nodes, so nothing maps to it", s.name));
            }
            services.push(ServiceMapping {
                name: s.name.clone(),
                cidrs: c.cidrs(&format!("{key}.cidrs"), &s.cidrs),
                clusters: c.patterns(&format!("{key}.clusters"), &s.clusters),
                nodes: c.patterns(&format!("{key}.nodes"), &s.nodes),
                external: s.external,
            });
        }
        let data_dir = PathBuf::from(self.data_dir.unwrap_or_else(|| "meshwatch-data".into()));
        if data_dir.as_os_str().is_empty() {
            c.0.push("data_dir: must not be empty".into());
        }
        if !c.0.is_empty() {
            return Err(ConfigError { problems: c.0 });
        }
        Ok(Config {
            data_dir,
            grpc_listen,
            http_listen,
            grpc_tls,
            read_token: self.listen.read_token.clone().filter(|t| !t.is_empty()),
            shutdown_grace,
            shutdown_drain,
            queue_batches,
            als: AlsConfig { max_message_bytes, enqueue_timeout, identify_within, ..als_defaults },
            grpc_connections: crate::listen::ConnectionLimits {
                max_connections,
                idle: connection_idle,
                answer_within: None,
            },
            http_connections: crate::listen::ConnectionLimits {
                max_connections,
                idle: connection_idle,
                answer_within: Some(request_timeout),
            },
            max_streams_per_connection,
            stats: StatsConfig {
                counters: stats_counters,
                ignore_clusters: stats_ignore_clusters,
                max_tracked_clusters: stats_max_tracked,
            },
            window: WindowConfig {
                length_ms: length.as_millis() as i64,
                grace_ms: grace.as_millis() as i64,
                max_future_ms: max_future.as_millis() as i64,
                max_pairs,
                evict_idle_ms: evict_idle.as_millis() as i64,
            },
            clock,
            detector,
            alerting,
            traces,
            trust: TrustConfig {
                learning_ms: ms(learning),
                forget_after_ms: ms(forget_after),
                hold_ms: ms(hold),
                require_mtls: z.require_mtls.unwrap_or(false),
                trust_domains: trust_domains.clone(),
                fan_out_windows: ms(fan_out_span) / ms(length).max(1),
                fan_out_min_new: u32::try_from(fan_out_min_new).unwrap_or(u32::MAX),
                scan_min_paths: u32::try_from(scan_min_paths).unwrap_or(u32::MAX),
                new_egress_volume_bytes: new_egress_volume_bytes as u64,
                max_edges,
                policy,
            },
            mesh: MeshConfig {
                trust_domains,
                internal_cidrs,
                internal_domains: m.internal_domains.unwrap_or(defaults.internal_domains),
                gateway_nodes,
                external_clusters,
                inbound_log_names,
                services,
                max_identity_bytes,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn no_file_gives_working_defaults() {
        let c = load(None, env(&[])).expect("defaults are valid");
        assert_eq!(c.grpc_listen.to_string(), "127.0.0.1:9977");
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:9978");
        assert_eq!(c.window.length_ms, 10_000);
        assert_eq!(c.data_dir, PathBuf::from("meshwatch-data"));
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("meshwatch-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("c.toml");
        std::fs::write(&file, "[listen]\ngrpc = \"0.0.0.0:1\"\n[limits]\nmax_pairs = 5\n").expect("write");
        let c = load(
            Some(&file),
            env(&[
                ("MESHWATCH_LISTEN__GRPC", "127.0.0.1:7000"),
                ("MESHWATCH_DATA_DIR", "/var/lib/meshwatch"),
                ("MESHWATCH_MESH__TRUST_DOMAINS", r#"["a.test", "b.test"]"#),
                ("MESHWATCH_LOG", "debug"),
                ("UNRELATED", "x"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.grpc_listen.to_string(), "127.0.0.1:7000");
        assert_eq!(c.window.max_pairs, 5);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/meshwatch"));
        assert_eq!(c.mesh.trust_domains, vec!["a.test", "b.test"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [listen]
            grpc = "nope"
            [window]
            length = "10 parsecs"
            grace = "5"
            [limits]
            max_pairs = 0
            [mesh]
            internal_cidrs = ["10.0.0.0/8", "not-a-cidr"]
            [[mesh.services]]
            name = ""
        "#;
        let raw: RawConfig = toml::from_str(text).expect("parses");
        let err = raw.validate().expect_err("invalid");
        let all = err.problems.join("\n");
        for key in [
            "listen.grpc",
            "window.length",
            "window.grace",
            "limits.max_pairs",
            "not-a-cidr",
            "mesh.services[0].name",
            "no cidrs, clusters or nodes",
        ] {
            assert!(all.contains(key), "no problem about {key} in:\n{all}");
        }
        assert_eq!(err.problems.len(), 7, "{all}");
    }

    #[test]
    fn zero_trust_settings_and_the_policy_file() {
        let dir = std::env::temp_dir().join(format!("meshwatch-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("c.toml");
        std::fs::write(&config, "[zero_trust]\nlearning = \"2h\"\nrequire_mtls = true\npolicy = \"p.toml\"\n")
            .expect("write");
        std::fs::write(dir.join("p.toml"), "[[allow]]\nfrom = \"a*\"\nto = \"b\"\ndirection = \"egress\"\n")
            .expect("write");
        let c = load(Some(&config), env(&[])).expect("valid");
        assert_eq!((c.trust.learning_ms, c.trust.require_mtls), (7_200_000, true));
        let policy = c.trust.policy.expect("policy loaded relative to the config file");
        assert!(policy.allows("ab", "b", Direction::Egress));
        assert!(!policy.allows("ab", "b", Direction::EastWest));
        std::fs::write(dir.join("p.toml"), "[[allow]]\nfrom = \"\"\nto = \"b\"\ndirection = \"sideways\"\n")
            .expect("write");
        let err = load(Some(&config), env(&[])).expect_err("invalid policy");
        let all = err.problems.join("\n");
        assert!(all.contains("allow[0].direction") && all.contains("allow[0].from"), "{all}");
        let _ = std::fs::remove_dir_all(&dir);
        // The policy shipped with the small-mesh scenario is valid.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        load_policy(&root.join("scenarios/small-mesh-policy.toml")).expect("valid policy");
    }

    #[test]
    fn alerting_receivers_are_validated() {
        let text = r#"
            [alerting]
            for = "30s"
            api_token = "t"
            [[alerting.receivers]]
            name = "am"
            type = "alertmanager"
            urls = ["http://a:9093", "http://b:9093"]
            [[alerting.receivers]]
            name = "pd"
            type = "pagerduty"
            routing_key = "k"
            severities = ["critical"]
        "#;
        let raw: RawConfig = toml::from_str(text).expect("parses");
        let c = raw.validate().expect("valid");
        assert_eq!(c.alerting.rules.for_ms, 30_000);
        let names: Vec<_> = c.alerting.receivers.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec!["am-0", "am-1", "pd"]);
        assert_eq!(
            c.alerting.receivers[2].target,
            Target::PagerDuty { url: PAGERDUTY_EVENTS_URL.into(), routing_key: "k".into() }
        );
        let bad = r#"
            [[alerting.receivers]]
            name = "x"
            type = "pagerduty"
            [[alerting.receivers]]
            name = "x"
            type = "webhook"
            url = "ftp://nope"
            severities = ["page"]
            [[alerting.receivers]]
            name = "y"
            type = "email"
        "#;
        let raw: RawConfig = toml::from_str(bad).expect("parses");
        let all = raw.validate().expect_err("invalid").problems.join("\n");
        for needle in ["routing_key: required", "used twice", "ftp://nope", "secret: required", "`page`", "`email`"] {
            assert!(all.contains(needle), "no problem about {needle} in:\n{all}");
        }
    }

    #[test]
    fn tls_files_are_read_relative_to_the_config_file_and_their_combinations_checked() {
        let dir = std::env::temp_dir().join(format!("meshwatch-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let pem = "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n";
        for f in ["mw.crt", "mw.key", "ca.crt"] {
            std::fs::write(dir.join(f), pem).expect("written");
        }
        std::fs::write(dir.join("empty.crt"), "").expect("written");
        let config = dir.join("meshwatch.toml");
        let load_with = |tls: &str| {
            std::fs::write(&config, format!("[listen.tls]\n{tls}")).expect("written");
            load(Some(&config), Vec::new())
        };
        let full = load_with(
            r#"cert = "mw.crt"
key = "mw.key"
client_ca = "ca.crt"
allowed_identities = ["spiffe://mesh.test/ns/shop/*"]
bind_node_identity = true"#,
        )
        .expect("valid");
        let tls = full.grpc_tls.expect("TLS on");
        assert_eq!(tls.cert_pem, pem.as_bytes());
        assert!(tls.client_ca_pem.is_some() && tls.bind_node_identity);
        assert_eq!(tls.describe(), "mutual, allowed identities, node identity bound");
        assert!(load(None, Vec::new()).expect("defaults").grpc_tls.is_none(), "off by default");
        for (tls, problem) in [
            (r#"cert = "mw.crt""#, "cert and key go together"),
            (r#"client_ca = "ca.crt""#, "need cert and key"),
            ("cert = \"mw.crt\"\nkey = \"mw.key\"\nallowed_identities = [\"spiffe://x/*\"]", "needs client_ca"),
            ("cert = \"mw.crt\"\nkey = \"mw.key\"\nbind_node_identity = true", "needs client_ca"),
            ("cert = \"missing.crt\"\nkey = \"mw.key\"", "cannot read"),
            ("cert = \"empty.crt\"\nkey = \"mw.key\"", "holds no PEM block"),
        ] {
            let err = load_with(tls).expect_err(tls).problems.join("\n");
            assert!(err.contains(problem), "{tls}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = load(None, env(&[("MESHWATCH_LISTEN__GRCP", "127.0.0.1:1")])).expect_err("typo");
        assert!(err.to_string().contains("grcp"), "{err}");
    }

    #[test]
    fn stats_sink_and_telemetry_settings() {
        let c = load(None, env(&[])).expect("defaults");
        assert_eq!((c.stats.counters, c.traces.clone()), (CounterMode::Cumulative, None));
        let c = load(
            None,
            env(&[
                ("MESHWATCH_INGEST__STATS_COUNTERS", "delta"),
                ("MESHWATCH_TELEMETRY__OTLP_ENDPOINT", "http://127.0.0.1:4317"),
                ("MESHWATCH_TELEMETRY__SAMPLE_RATIO", "0.25"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.stats.counters, CounterMode::Delta);
        let t = c.traces.expect("traces on");
        assert_eq!(
            (t.endpoint.as_str(), t.service_name.as_str(), t.sample_ratio),
            ("http://127.0.0.1:4317", "meshwatch", 0.25)
        );
        let err = load(
            None,
            env(&[
                ("MESHWATCH_INGEST__STATS_COUNTERS", "sometimes"),
                ("MESHWATCH_TELEMETRY__OTLP_ENDPOINT", "127.0.0.1:4317"),
                ("MESHWATCH_TELEMETRY__SAMPLE_RATIO", "0"),
            ]),
        )
        .expect_err("three problems");
        assert_eq!(err.problems.len(), 3, "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1w").is_err());
    }

    #[test]
    fn every_shipped_config_is_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut checked = 0;
        for dir in ["deploy", "tests/configs"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml") {
                    load(Some(&path), env(&[])).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    checked += 1;
                }
            }
        }
        assert!(checked >= 1, "no example config found");
    }
}
