//! Delivery of notifications to receivers: Alertmanager (API v2), PagerDuty (Events API v2),
//! Slack (incoming webhook) and a signed JSON webhook.
//!
//! Every notification goes through the durable outbox in the store first; one task per
//! receiver sends its queue in order (so the notifications of an alert arrive in order),
//! removes what was acknowledged (2xx), retries the rest with exponential backoff and jitter
//! (or what a 429's or 503's `Retry-After` asks), and moves a notification to the dead-letter
//! list when the receiver refuses it for good (another 4xx) or when it is older than
//! `max_age`. Firing alerts are re-sent to Alertmanager every `resend_interval`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use meshwatch_collector::identity::Pattern;
use meshwatch_collector::pipeline::wall_clock_ms;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde_json::json;
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use crate::alert::{Notification, State};
use crate::score::Detector;
use crate::store::{DeadLetter, Store};
use crate::timefmt::format_ms;

/// Where notifications go.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// An Alertmanager's base URL (`http://alertmanager:9093`).
    Alertmanager {
        url: String,
    },
    /// The Events API v2 URL and the integration's routing key.
    PagerDuty {
        url: String,
        routing_key: String,
    },
    Slack {
        url: String,
    },
    /// A JSON webhook, signed with `secret`.
    Webhook {
        url: String,
        secret: String,
    },
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Alertmanager { .. } => "alertmanager",
            Target::PagerDuty { .. } => "pagerduty",
            Target::Slack { .. } => "slack",
            Target::Webhook { .. } => "webhook",
        }
    }
}

/// One receiver: a target and which alerts it wants (empty lists want everything).
#[derive(Clone, Debug, PartialEq)]
pub struct Receiver {
    pub name: String,
    pub target: Target,
    pub severities: Vec<String>,
    pub directions: Vec<String>,
    /// Kinds (`error_ratio`, `new_edge`, …), `*` globs.
    pub kinds: Vec<Pattern>,
}

impl Receiver {
    pub fn wants(&self, n: &Notification) -> bool {
        let label = |k: &str| n.labels.get(k).map_or("", String::as_str);
        (self.severities.is_empty() || self.severities.iter().any(|s| s == label("severity")))
            && (self.directions.is_empty() || self.directions.iter().any(|d| d == label("direction")))
            && (self.kinds.is_empty() || self.kinds.iter().any(|p| p.matches(label("kind").as_bytes())))
    }
}

/// Delivery settings, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryConfig {
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// A notification not delivered after this long goes to the dead-letter list.
    pub max_age: Duration,
    /// Alertmanager: firing alerts are re-sent this often, with `endsAt` 4 intervals ahead.
    pub resend_interval: Duration,
    /// Per request.
    pub timeout: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            max_age: Duration::from_secs(24 * 3600),
            resend_interval: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Delivery counters and outbox gauges, by receiver.
#[derive(Clone, Debug)]
pub struct NotifyMetrics {
    pub sent: IntCounterVec,
    pub failed: IntCounterVec,
    pub retried: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub depth: IntGaugeVec,
    /// When each receiver's oldest queued notification was made; its age is read at scrape
    /// time, so it grows while a sender waits out a backoff.
    pub oldest: OldestQueued,
}

/// `meshwatch_outbox_oldest_age_seconds`, computed at each scrape from the creation time of
/// each receiver's oldest queued notification (0 when its queue is empty).
#[derive(Clone, Debug)]
pub struct OldestQueued {
    created_ms: Arc<std::sync::Mutex<std::collections::BTreeMap<String, Option<i64>>>>,
    desc: prometheus::core::Desc,
}

const OLDEST_AGE: &str = "meshwatch_outbox_oldest_age_seconds";
const OLDEST_AGE_HELP: &str = "Age of the oldest notification queued for a receiver.";

impl OldestQueued {
    fn new() -> prometheus::Result<OldestQueued> {
        let desc = prometheus::core::Desc::new(
            OLDEST_AGE.into(),
            OLDEST_AGE_HELP.into(),
            vec!["receiver".into()],
            std::collections::HashMap::new(),
        )?;
        Ok(OldestQueued { created_ms: Arc::default(), desc })
    }

    /// Sets when `receiver`'s oldest queued notification was made (`None`: nothing queued).
    pub fn set(&self, receiver: &str, created_ms: Option<i64>) {
        let mut m = self.created_ms.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.insert(receiver.to_string(), created_ms);
    }
}

impl prometheus::core::Collector for OldestQueued {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Ok(gauges) = prometheus::GaugeVec::new(Opts::new(OLDEST_AGE, OLDEST_AGE_HELP), &["receiver"]) else {
            return Vec::new();
        };
        let now = wall_clock_ms();
        let m = self.created_ms.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (receiver, created) in m.iter() {
            let age = created.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
            gauges.with_label_values(&[receiver.as_str()]).set(age);
        }
        gauges.collect()
    }
}

impl NotifyMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<NotifyMetrics> {
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &["receiver"])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let depth = IntGaugeVec::new(
            Opts::new("meshwatch_outbox_depth", "Notifications queued for a receiver, not yet acknowledged."),
            &["receiver"],
        )?;
        registry.register(Box::new(depth.clone()))?;
        let oldest = OldestQueued::new()?;
        registry.register(Box::new(oldest.clone()))?;
        Ok(NotifyMetrics {
            sent: counter("meshwatch_notifications_sent_total", "Notifications a receiver acknowledged.")?,
            failed: counter("meshwatch_notifications_failed_total", "Delivery attempts that failed.")?,
            retried: counter("meshwatch_notifications_retried_total", "Delivery attempts that repeated a failed one.")?,
            dead_lettered: counter(
                "meshwatch_notifications_dead_lettered_total",
                "Notifications given up on (refused for good, or too old) and moved to the dead-letter list.",
            )?,
            depth,
            oldest,
        })
    }
}

/// A factor in [0.5, 1.5) for backoff jitter, from the clock's nanoseconds.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let mut x = u64::from(nanos) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    0.5 + (x % 10_000) as f64 / 10_000.0
}

/// The HMAC-SHA256 signature of a webhook body: hex of HMAC(secret, `timestamp.body`).
pub fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return String::new() };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn alertmanager_alert(n: &Notification, now: i64, resend: Duration) -> serde_json::Value {
    let ends = match n.status {
        State::Resolved => n.ends_at_ms.unwrap_or(now),
        _ => now + 4 * i64::try_from(resend.as_millis()).unwrap_or(60_000),
    };
    json!({
        "labels": n.labels,
        "annotations": n.annotations,
        "startsAt": format_ms(n.starts_at_ms),
        "endsAt": format_ms(ends),
        "generatorURL": n.annotations.get("detection_url").cloned().unwrap_or_default(),
    })
}

fn label<'a>(n: &'a Notification, k: &str) -> &'a str {
    n.labels.get(k).map_or("", String::as_str)
}

fn annotation<'a>(n: &'a Notification, k: &str) -> &'a str {
    n.annotations.get(k).map_or("", String::as_str)
}

/// The body a receiver gets for a notification (Alertmanager: one alert in an array).
pub fn body(target: &Target, n: &Notification, now: i64, resend: Duration) -> serde_json::Value {
    let resolved = n.status == State::Resolved;
    match target {
        Target::Alertmanager { .. } => json!([alertmanager_alert(n, now, resend)]),
        Target::PagerDuty { routing_key, .. } => {
            if resolved {
                return json!({"routing_key": routing_key, "event_action": "resolve", "dedup_key": n.fingerprint});
            }
            let severity = match label(n, "severity") {
                "critical" => "critical",
                "warning" => "warning",
                _ => "info",
            };
            let mut details = serde_json::Map::new();
            for (k, v) in n.labels.iter().chain(n.annotations.iter()) {
                details.insert(k.clone(), json!(v));
            }
            json!({
                "routing_key": routing_key,
                "event_action": "trigger",
                "dedup_key": n.fingerprint,
                "payload": {
                    "summary": annotation(n, "summary").chars().take(1024).collect::<String>(),
                    "source": label(n, "source"),
                    "severity": severity,
                    "timestamp": format_ms(n.starts_at_ms),
                    "component": label(n, "destination"),
                    "group": label(n, "direction"),
                    "class": label(n, "kind"),
                    "custom_details": details,
                },
                "client": "meshwatch",
                "client_url": annotation(n, "detection_url"),
                "links": [{"href": annotation(n, "detection_url"), "text": "Detection in meshwatch"}],
            })
        }
        Target::Slack { .. } => {
            let (icon, status) =
                if resolved { (":white_check_mark:", "RESOLVED") } else { (":rotating_light:", "FIRING") };
            let title = format!("{status} [{}] {}", label(n, "severity"), annotation(n, "summary"));
            let mut fields = format!(
                "*Source:* `{}`\n*Destination:* `{}`\n*Direction:* {}",
                label(n, "source"),
                label(n, "destination"),
                label(n, "direction")
            );
            if let Some(url) = n.annotations.get("runbook_url") {
                fields.push_str(&format!("\n*Runbook:* <{url}>"));
            }
            json!({
                "text": format!("{icon} {title}: {}", annotation(n, "reason")),
                "blocks": [
                    {"type": "header", "text": {"type": "plain_text", "text": title.chars().take(150).collect::<String>()}},
                    {"type": "section", "text": {"type": "mrkdwn", "text": annotation(n, "reason")}},
                    {"type": "section", "text": {"type": "mrkdwn", "text": fields}},
                    {"type": "context", "elements": [{"type": "mrkdwn", "text": format!("<{}|detection> · fingerprint {}", annotation(n, "detection_url"), n.fingerprint)}]},
                ],
            })
        }
        Target::Webhook { .. } => json!({
            "version": "1",
            "status": if resolved { "resolved" } else { "firing" },
            "fingerprint": n.fingerprint,
            "labels": n.labels,
            "annotations": n.annotations,
            "starts_at": format_ms(n.starts_at_ms),
            "ends_at": n.ends_at_ms.map(format_ms),
        }),
    }
}

/// How one attempt went.
#[derive(Debug, PartialEq)]
enum Outcome {
    Delivered,
    /// Try again after at least this long (from `Retry-After`), or after the backoff.
    Retry {
        after: Option<Duration>,
        error: String,
    },
    /// The receiver refuses it for good.
    Refused {
        error: String,
    },
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let v = resp.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Sends one body to a receiver, traced as `notify.deliver`.
async fn post(client: &reqwest::Client, receiver: &Receiver, body: &serde_json::Value) -> Outcome {
    let span = tracing::debug_span!(
        target: meshwatch_collector::TRACE_TARGET,
        "notify.deliver",
        receiver = %receiver.name,
        outcome = tracing::field::Empty,
    );
    let outcome = send(client, &receiver.target, body).instrument(span.clone()).await;
    let what = match &outcome {
        Outcome::Delivered => "delivered",
        Outcome::Retry { .. } => "retry",
        Outcome::Refused { .. } => "refused",
    };
    span.record("outcome", what);
    outcome
}

async fn send(client: &reqwest::Client, target: &Target, body: &serde_json::Value) -> Outcome {
    let url = match target {
        Target::Alertmanager { url } => format!("{}/api/v2/alerts", url.trim_end_matches('/')),
        Target::PagerDuty { url, .. } | Target::Slack { url } | Target::Webhook { url, .. } => url.clone(),
    };
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut req = client.post(&url).header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Target::Webhook { secret, .. } = target {
        let ts = (wall_clock_ms() / 1000).to_string();
        req = req.header("X-Meshwatch-Timestamp", &ts).header("X-Meshwatch-Signature", signature(secret, &ts, &bytes));
    }
    match req.body(bytes).send().await {
        Err(e) => Outcome::Retry { after: None, error: format!("{url}: {e}") },
        Ok(resp) => {
            let status = resp.status();
            let after = retry_after(&resp);
            // Read (a bounded part of) the body so that the connection can be reused, and
            // to say what the receiver answered.
            let text = resp.text().await.unwrap_or_default();
            let text: String = text.chars().take(200).collect();
            if status.is_success() {
                Outcome::Delivered
            } else if status.as_u16() == 429 || status.as_u16() == 408 || status.is_server_error() {
                Outcome::Retry { after, error: format!("{url}: {status} {text}") }
            } else {
                Outcome::Refused { error: format!("{url}: {status} {text}") }
            }
        }
    }
}

/// Notifications in one post to an Alertmanager (it takes a list of alerts).
const ALERTMANAGER_BATCH: usize = 64;
/// Queued notifications looked at to pick the next ones (critical first).
const NEXT_SCAN: usize = 512;

/// What a delivery task needs.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub store: Store,
    pub receiver: Receiver,
    pub cfg: DeliveryConfig,
    pub metrics: NotifyMetrics,
    pub wake: Arc<Notify>,
    pub detector: Arc<Mutex<Detector>>,
    pub client: reqwest::Client,
}

/// An HTTP client for receivers.
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("meshwatch/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            warn!(error = %e, "outbox store error");
            None
        }
        Err(e) => {
            warn!(error = %e, "outbox task failed");
            None
        }
    }
}

impl Delivery {
    async fn refresh_gauges(&self) {
        let store = self.store.clone();
        let name = self.receiver.name.clone();
        if let Some((depth, oldest)) = blocking(move || store.depth(&name)).await {
            let r = [self.receiver.name.as_str()];
            self.metrics.depth.with_label_values(&r).set(i64::try_from(depth).unwrap_or(i64::MAX));
            self.metrics.oldest.set(&self.receiver.name, oldest);
        }
    }

    /// Firing alerts this receiver wants, for an Alertmanager re-send.
    fn firing(&self) -> Vec<Notification> {
        let now = wall_clock_ms();
        let d = crate::lock(&self.detector);
        d.alerts
            .iter()
            .filter(|a| a.state == State::Firing && a.notified && !a.silenced)
            .map(|a| a.notification(now))
            .filter(|n| self.receiver.wants(n))
            .collect()
    }

    /// Sends this receiver's queue until `shutdown`; what is left stays queued.
    pub async fn run(self, shutdown: CancellationToken) {
        let r = [self.receiver.name.as_str()];
        // Visible at zero from the start.
        for c in [&self.metrics.sent, &self.metrics.failed, &self.metrics.retried, &self.metrics.dead_lettered] {
            c.with_label_values(&r);
        }
        let mut attempt: u32 = 0;
        let mut last_resend = tokio::time::Instant::now();
        let mut gauges_at: Option<tokio::time::Instant> = None;
        loop {
            let store = self.store.clone();
            let name = self.receiver.name.clone();
            let max = if matches!(self.receiver.target, Target::Alertmanager { .. }) { ALERTMANAGER_BATCH } else { 1 };
            let batch = blocking(move || store.next_batch(&name, max, NEXT_SCAN)).await.unwrap_or_default();
            // The queue's depth needs a scan of it: at most once a second while it drains.
            if batch.is_empty() {
                self.metrics.depth.with_label_values(&r).set(0);
                self.metrics.oldest.set(&self.receiver.name, None);
            } else if gauges_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                gauges_at = Some(tokio::time::Instant::now());
                self.refresh_gauges().await;
            }
            if batch.is_empty() {
                attempt = 0;
                let mut wait = Duration::from_secs(3600);
                if let Target::Alertmanager { .. } = self.receiver.target {
                    let due = last_resend + self.cfg.resend_interval;
                    if tokio::time::Instant::now() >= due {
                        last_resend = tokio::time::Instant::now();
                        let alerts: Vec<_> = self
                            .firing()
                            .iter()
                            .map(|n| alertmanager_alert(n, wall_clock_ms(), self.cfg.resend_interval))
                            .collect();
                        if !alerts.is_empty() {
                            match post(&self.client, &self.receiver, &json!(alerts)).await {
                                Outcome::Delivered => {
                                    debug!(receiver = r[0], n = alerts.len(), "firing alerts re-sent")
                                }
                                Outcome::Retry { error, .. } | Outcome::Refused { error } => {
                                    self.metrics.failed.with_label_values(&r).inc();
                                    warn!(receiver = r[0], %error, "re-sending firing alerts failed");
                                }
                            }
                        }
                        continue;
                    }
                    wait = due - tokio::time::Instant::now();
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let now = wall_clock_ms();
            let age = |q: &crate::store::Queued| {
                Duration::from_millis(u64::try_from(now - q.notification.created_ms).unwrap_or(0))
            };
            let (expired, batch): (Vec<_>, Vec<_>) = batch.into_iter().partition(|q| age(q) > self.cfg.max_age);
            if !expired.is_empty() {
                for q in &expired {
                    let reason = format!("not delivered within {:?} ({attempt} attempts)", self.cfg.max_age);
                    self.give_up(q, reason, attempt).await;
                }
                attempt = 0;
                continue;
            }
            // An Alertmanager takes many alerts in one post; the others one notification each.
            let body = match &self.receiver.target {
                Target::Alertmanager { .. } => json!(
                    batch
                        .iter()
                        .map(|q| alertmanager_alert(&q.notification, now, self.cfg.resend_interval))
                        .collect::<Vec<_>>()
                ),
                target => body(target, &batch[0].notification, now, self.cfg.resend_interval),
            };
            if attempt > 0 {
                self.metrics.retried.with_label_values(&r).inc();
            }
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                o = post(&self.client, &self.receiver, &body) => o,
            };
            match outcome {
                Outcome::Delivered => {
                    let store = self.store.clone();
                    let keys: Vec<Vec<u8>> = batch.iter().map(|q| q.key.clone()).collect();
                    let removed = blocking(move || {
                        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                        store.delivered(&keys)
                    });
                    if removed.await.is_some() {
                        self.metrics.sent.with_label_values(&r).inc_by(batch.len() as u64);
                        for q in &batch {
                            debug!(receiver = r[0], fingerprint = %q.notification.fingerprint, status = q.notification.status.as_str(), "delivered");
                        }
                    }
                    attempt = 0;
                }
                Outcome::Refused { error } => {
                    self.metrics.failed.with_label_values(&r).inc();
                    warn!(receiver = r[0], %error, n = batch.len(), "receiver refused; dead-lettered");
                    for q in &batch {
                        self.give_up(q, format!("refused: {error}"), attempt + 1).await;
                    }
                    attempt = 0;
                }
                Outcome::Retry { after, error } => {
                    self.metrics.failed.with_label_values(&r).inc();
                    let backoff = self.cfg.retry_initial.as_secs_f64() * 2_f64.powi(attempt.min(30) as i32) * jitter();
                    let backoff = Duration::from_secs_f64(backoff.min(self.cfg.retry_max.as_secs_f64()));
                    let delay = after.map_or(backoff, |a| a.max(backoff.min(self.cfg.retry_initial)));
                    warn!(receiver = r[0], %error, retry_in = ?delay, "delivery failed");
                    attempt = attempt.saturating_add(1);
                    // New work ends the wait: a receiver that is back gets its queue at once
                    // rather than after up to `retry_max` (a `Retry-After` is waited out).
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                        () = self.wake.notified(), if after.is_none() => {}
                    }
                }
            }
        }
    }

    async fn give_up(&self, q: &crate::store::Queued, reason: String, attempts: u32) {
        let letter = DeadLetter {
            receiver: q.receiver.clone(),
            reason,
            dead_at_ms: wall_clock_ms(),
            attempts,
            notification: q.notification.clone(),
        };
        let store = self.store.clone();
        let key = q.key.clone();
        if blocking(move || store.dead_letter(&key, &letter)).await.is_some() {
            self.metrics.dead_lettered.with_label_values(&[self.receiver.name.as_str()]).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn notification(status: State) -> Notification {
        let labels: BTreeMap<String, String> = [
            ("alertname", "MeshwatchAnomaly"),
            ("source", "web"),
            ("destination", "api"),
            ("direction", "east_west"),
            ("kind", "error_ratio"),
            ("signal", "error_ratio"),
            ("severity", "critical"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let annotations = [
            ("summary", "error ratio: web → api"),
            ("reason", "error ratio 5 %"),
            ("detection_url", "http://mw/api/v1/anomalies/3"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Notification {
            fingerprint: "00ff".into(),
            status,
            labels,
            annotations,
            starts_at_ms: 1_767_621_780_000,
            ends_at_ms: (status == State::Resolved).then_some(1_767_621_840_000),
            created_ms: 0,
        }
    }

    #[test]
    fn filters_by_severity_direction_and_kind() {
        let mut r = Receiver {
            name: "r".into(),
            target: Target::Slack { url: "http://x".into() },
            severities: vec![],
            directions: vec![],
            kinds: vec![],
        };
        let n = notification(State::Firing);
        assert!(r.wants(&n));
        r.severities = vec!["warning".into()];
        assert!(!r.wants(&n));
        r.severities = vec!["critical".into()];
        r.kinds = vec![Pattern::new("error_*")];
        assert!(r.wants(&n));
        r.directions = vec!["egress".into()];
        assert!(!r.wants(&n));
    }

    #[test]
    fn alertmanager_bodies_end_firing_alerts_ahead_and_resolved_ones_now() {
        let target = Target::Alertmanager { url: "http://am".into() };
        let now = 1_767_621_800_000;
        let firing = body(&target, &notification(State::Firing), now, Duration::from_secs(60));
        assert_eq!(firing[0]["startsAt"], "2026-01-05T14:03:00.000Z");
        assert_eq!(firing[0]["endsAt"], format_ms(now + 240_000));
        assert_eq!(firing[0]["labels"]["alertname"], "MeshwatchAnomaly");
        let resolved = body(&target, &notification(State::Resolved), now, Duration::from_secs(60));
        assert_eq!(resolved[0]["endsAt"], "2026-01-05T14:04:00.000Z");
    }

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_dot_body() {
        // printf '1700000000.{}' | openssl dgst -sha256 -hmac key
        assert_eq!(
            signature("key", "1700000000", b"{}"),
            "9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }
}
