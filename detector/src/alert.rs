//! Alerts: one per detection fingerprint (rule + pair + signal or finding kind), with a
//! lifecycle — pending for `for`, firing, resolved after `keep_firing_for` without the
//! detection (hysteresis: a detection that comes back meanwhile keeps the alert firing) —
//! and silences that hold back notifications.
//!
//! Pure: `Alerts::update` takes the anomaly registry, the event time of the last window and
//! the wall time, and returns the notifications to send. Lifecycle times (`for`, hysteresis)
//! are in event time, as detection is; the times notifications carry are wall time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::anomaly::{Anomalies, Anomaly};
use crate::trust;

/// Resolved alerts kept for the API.
pub const MAX_RESOLVED: usize = 1_000;

/// Alerting settings, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertConfig {
    /// How long a detection must last before its alert fires.
    pub for_ms: i64,
    /// How long a firing alert stays firing after its detection ended.
    pub keep_firing_ms: i64,
    /// Template of the `runbook_url` annotation: `{kind}`, `{signal}`, `{source}`,
    /// `{destination}`, `{direction}`, `{severity}` are replaced.
    pub runbook_url: Option<String>,
    /// Base URL of meshwatch's HTTP API as receivers reach it, for links.
    pub external_url: String,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            for_ms: 0,
            keep_firing_ms: 60_000,
            runbook_url: None,
            external_url: "http://127.0.0.1:9978".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Firing,
    Resolved,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Firing => "firing",
            State::Resolved => "resolved",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub fingerprint: String,
    pub state: State,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The anomaly or finding record behind it (the latest, if the detection came back).
    pub detection_id: u64,
    /// Event time the detection started, and when it was last active.
    pub active_since_ms: i64,
    pub last_active_ms: i64,
    /// Wall time it started firing, and was resolved.
    pub fired_at_ms: Option<i64>,
    pub resolved_at_ms: Option<i64>,
    /// A firing notification went out (so a resolved one must follow).
    pub notified: bool,
    /// Held back by a silence when it would have notified.
    pub silenced: bool,
}

/// What a receiver is told.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub fingerprint: String,
    /// `firing` or `resolved`.
    pub status: State,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Wall time, Unix milliseconds.
    pub starts_at_ms: i64,
    pub ends_at_ms: Option<i64>,
    /// When it was queued (wall time), for its age.
    pub created_ms: i64,
}

impl Alert {
    pub fn notification(&self, now_ms: i64) -> Notification {
        Notification {
            fingerprint: self.fingerprint.clone(),
            status: if self.state == State::Resolved { State::Resolved } else { State::Firing },
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            starts_at_ms: self.fired_at_ms.unwrap_or(now_ms),
            ends_at_ms: self.resolved_at_ms,
            created_ms: now_ms,
        }
    }
}

/// One label matcher of a silence (Alertmanager's shape).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Matcher {
    pub name: String,
    pub value: String,
    #[serde(default, rename = "isRegex")]
    pub is_regex: bool,
    #[serde(default = "yes", rename = "isEqual")]
    pub is_equal: bool,
    /// The anchored regex, compiled once.
    #[serde(skip)]
    compiled: CompiledRegex,
}

/// A regex compiled on first use (not part of a matcher's identity).
#[derive(Clone, Debug, Default)]
struct CompiledRegex(std::sync::OnceLock<Option<regex::Regex>>);

impl PartialEq for CompiledRegex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Matcher {
    pub fn new(name: &str, value: &str, is_regex: bool, is_equal: bool) -> Matcher {
        Matcher { name: name.into(), value: value.into(), is_regex, is_equal, compiled: CompiledRegex::default() }
    }
}

fn yes() -> bool {
    true
}

impl Matcher {
    /// Whether the matcher holds on `labels`; a regex is anchored, as in Alertmanager. An
    /// invalid regex matches nothing (silences are validated when created).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.name).map_or("", String::as_str);
        let hit = if self.is_regex {
            let re = self.compiled.0.get_or_init(|| regex::Regex::new(&format!("^(?:{})$", self.value)).ok());
            re.as_ref().is_some_and(|r| r.is_match(value))
        } else {
            value == self.value
        };
        hit == self.is_equal
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    pub matchers: Vec<Matcher>,
    /// Wall time, Unix milliseconds.
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    pub created_by: String,
    pub comment: String,
}

impl Silence {
    pub fn active(&self, now_ms: i64) -> bool {
        self.starts_at_ms <= now_ms && now_ms < self.ends_at_ms
    }

    pub fn silences(&self, labels: &BTreeMap<String, String>, now_ms: i64) -> bool {
        self.active(now_ms) && self.matchers.iter().all(|m| m.matches(labels))
    }
}

/// FNV-1a (64 bit) of the parts, each followed by a zero byte.
pub fn fnv(parts: &[&str]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0)) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The rule an anomaly record falls under.
fn rule(a: &Anomaly) -> &'static str {
    if trust::is_finding(&a.kind) { "MeshwatchFinding" } else { "MeshwatchAnomaly" }
}

fn fingerprint(a: &Anomaly) -> String {
    format!("{:016x}", fnv(&[rule(a), &a.source, &a.destination, &a.direction, &a.signal]))
}

fn short(identity: &str) -> &str {
    identity.strip_prefix("spiffe://").and_then(|r| r.rsplit('/').next()).unwrap_or(identity)
}

/// Every alert, by fingerprint.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Alerts {
    alerts: BTreeMap<String, Alert>,
}

impl Alerts {
    pub fn iter(&self) -> impl Iterator<Item = &Alert> {
        self.alerts.values()
    }

    pub fn get(&self, fingerprint: &str) -> Option<&Alert> {
        self.alerts.get(fingerprint)
    }

    pub fn count(&self, state: State) -> usize {
        self.alerts.values().filter(|a| a.state == state).count()
    }

    fn labels(a: &Anomaly) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        l.insert("alertname".to_string(), rule(a).to_string());
        l.insert("source".to_string(), a.source.clone());
        l.insert("destination".to_string(), a.destination.clone());
        l.insert("direction".to_string(), a.direction.clone());
        l.insert("kind".to_string(), a.kind.clone());
        if !trust::is_finding(&a.kind) {
            l.insert("signal".to_string(), a.signal.clone());
        }
        l.insert("severity".to_string(), a.severity.clone());
        l
    }

    fn annotations(a: &Anomaly, cfg: &AlertConfig) -> BTreeMap<String, String> {
        let mut n = BTreeMap::new();
        let what = a.kind.replace('_', " ");
        n.insert(
            "summary".to_string(),
            format!("{what}: {} → {} ({})", short(&a.source), short(&a.destination), a.direction),
        );
        n.insert("description".to_string(), a.reason.clone());
        n.insert("reason".to_string(), a.reason.clone());
        n.insert("observed".to_string(), format!("{}", a.observed));
        n.insert("expected".to_string(), format!("{}", a.expected));
        n.insert(
            "detection_url".to_string(),
            format!("{}/api/v1/anomalies/{}", cfg.external_url.trim_end_matches('/'), a.id),
        );
        if let Some(t) = &cfg.runbook_url {
            let url = t
                .replace("{kind}", &a.kind)
                .replace("{signal}", &a.signal)
                .replace("{source}", &a.source)
                .replace("{destination}", &a.destination)
                .replace("{direction}", &a.direction)
                .replace("{severity}", &a.severity);
            n.insert("runbook_url".to_string(), url);
        }
        n
    }

    /// Brings every alert up to date with the detections; returns the notifications due, in
    /// the order they happened.
    pub fn update(
        &mut self,
        anomalies: &Anomalies,
        silences: &[Silence],
        cfg: &AlertConfig,
        event_ms: i64,
        wall_ms: i64,
    ) -> Vec<Notification> {
        let mut out = Vec::new();
        let mut active: BTreeMap<String, &Anomaly> = BTreeMap::new();
        for a in anomalies.iter().filter(|a| a.ended_ms.is_none()) {
            active.insert(fingerprint(a), a);
        }
        for (fp, a) in &active {
            let alert = self.alerts.entry(fp.clone()).or_insert_with(|| Alert {
                fingerprint: fp.clone(),
                state: State::Pending,
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                detection_id: a.id,
                active_since_ms: a.started_ms,
                last_active_ms: event_ms,
                fired_at_ms: None,
                resolved_at_ms: None,
                notified: false,
                silenced: false,
            });
            if alert.state == State::Resolved {
                *alert = Alert {
                    state: State::Pending,
                    active_since_ms: a.started_ms,
                    fired_at_ms: None,
                    resolved_at_ms: None,
                    notified: false,
                    silenced: false,
                    ..alert.clone()
                };
            }
            // A record's labels and annotations do not change while it lasts: built once per
            // record, not at every update.
            if alert.labels.is_empty() || alert.detection_id != a.id {
                alert.labels = Self::labels(a);
                alert.annotations = Self::annotations(a, cfg);
            }
            alert.detection_id = a.id;
            alert.last_active_ms = event_ms;
        }
        for alert in self.alerts.values_mut() {
            let is_active = active.contains_key(&alert.fingerprint);
            match alert.state {
                State::Pending if !is_active => alert.state = State::Resolved,
                State::Pending if event_ms - alert.active_since_ms >= cfg.for_ms => {
                    alert.state = State::Firing;
                    alert.fired_at_ms = Some(wall_ms);
                }
                State::Firing if !is_active && event_ms - alert.last_active_ms >= cfg.keep_firing_ms => {
                    alert.state = State::Resolved;
                    alert.resolved_at_ms = Some(wall_ms);
                    if alert.notified {
                        out.push(alert.notification(wall_ms));
                    }
                    continue;
                }
                _ => {}
            }
            if alert.state == State::Firing {
                let silenced = silences.iter().any(|s| s.silences(&alert.labels, wall_ms));
                alert.silenced = silenced;
                if !alert.notified && !silenced {
                    alert.notified = true;
                    out.push(alert.notification(wall_ms));
                }
            }
        }
        // Pending alerts that never fired leave no trace; resolved ones are kept a while.
        self.alerts.retain(|_, a| a.state != State::Resolved || a.fired_at_ms.is_some());
        let resolved = self.count(State::Resolved);
        if resolved > MAX_RESOLVED {
            let mut old: Vec<(i64, String)> = self
                .alerts
                .values()
                .filter(|a| a.state == State::Resolved)
                .map(|a| (a.resolved_at_ms.unwrap_or(0), a.fingerprint.clone()))
                .collect();
            old.sort();
            for (_, fp) in old.into_iter().take(resolved - MAX_RESOLVED) {
                self.alerts.remove(&fp);
            }
        }
        out
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Alerts> {
        serde_json::from_slice(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anomaly::FindingRecord;

    fn finding(kind: &'static str, src: &str) -> FindingRecord {
        FindingRecord {
            kind,
            source: src.into(),
            destination: "spiffe://mesh.test/ns/shop/sa/db".into(),
            direction: "east_west",
            reporters: vec!["source".into()],
            severity: "critical",
            observed: 3.0,
            expected: 0.0,
            reason: "3 plaintext requests".into(),
        }
    }

    fn cfg() -> AlertConfig {
        AlertConfig {
            for_ms: 20_000,
            keep_firing_ms: 30_000,
            runbook_url: Some("https://runbooks.example/{kind}?from={source}".into()),
            external_url: "http://mw:9978/".into(),
        }
    }

    #[test]
    fn pending_then_firing_then_resolved_after_the_hysteresis() {
        let mut anomalies = Anomalies::default();
        let mut alerts = Alerts::default();
        let c = cfg();
        anomalies.raise(finding(trust::MTLS_DOWNGRADE, "web"), 10_000);
        assert!(alerts.update(&anomalies, &[], &c, 10_000, 1_000).is_empty());
        assert_eq!(alerts.count(State::Pending), 1);
        let fired = alerts.update(&anomalies, &[], &c, 30_000, 2_000);
        assert_eq!(fired.len(), 1);
        let n = &fired[0];
        assert_eq!((n.status, n.starts_at_ms, n.ends_at_ms), (State::Firing, 2_000, None));
        assert_eq!(n.labels["kind"], "mtls_downgrade");
        assert_eq!(n.labels["severity"], "critical");
        assert_eq!(n.labels["alertname"], "MeshwatchFinding");
        assert!(!n.labels.contains_key("signal"));
        assert_eq!(n.annotations["runbook_url"], "https://runbooks.example/mtls_downgrade?from=web");
        assert_eq!(n.annotations["detection_url"], "http://mw:9978/api/v1/anomalies/1");
        assert_eq!(n.annotations["summary"], "mtls downgrade: web → db (east_west)");
        // Still firing: nothing new.
        assert!(alerts.update(&anomalies, &[], &c, 40_000, 3_000).is_empty());
        // The detection ends; it comes back within the hysteresis: no flapping.
        anomalies.end("web", "spiffe://mesh.test/ns/shop/sa/db", "east_west", "mtls_downgrade", 50_000);
        assert!(alerts.update(&anomalies, &[], &c, 60_000, 4_000).is_empty());
        anomalies.raise(finding(trust::MTLS_DOWNGRADE, "web"), 70_000);
        assert!(alerts.update(&anomalies, &[], &c, 70_000, 5_000).is_empty());
        assert_eq!(alerts.count(State::Firing), 1);
        anomalies.end("web", "spiffe://mesh.test/ns/shop/sa/db", "east_west", "mtls_downgrade", 80_000);
        assert!(alerts.update(&anomalies, &[], &c, 90_000, 6_000).is_empty());
        let resolved = alerts.update(&anomalies, &[], &c, 100_000, 7_000);
        assert_eq!(resolved.len(), 1);
        assert_eq!(
            (resolved[0].status, resolved[0].starts_at_ms, resolved[0].ends_at_ms),
            (State::Resolved, 2_000, Some(7_000))
        );
        assert_eq!(resolved[0].fingerprint, fired[0].fingerprint);
        // Kept across a restart.
        let restored = Alerts::from_bytes(&alerts.to_bytes()).expect("decodes");
        assert_eq!(restored.iter().collect::<Vec<_>>(), alerts.iter().collect::<Vec<_>>());
    }

    #[test]
    fn a_detection_shorter_than_for_never_notifies() {
        let mut anomalies = Anomalies::default();
        let mut alerts = Alerts::default();
        anomalies.raise(finding(trust::NEW_EDGE, "web"), 10_000);
        assert!(alerts.update(&anomalies, &[], &cfg(), 10_000, 1).is_empty());
        anomalies.end("web", "spiffe://mesh.test/ns/shop/sa/db", "east_west", "new_edge", 20_000);
        assert!(alerts.update(&anomalies, &[], &cfg(), 40_000, 2).is_empty());
        assert_eq!(alerts.iter().count(), 0);
    }

    #[test]
    fn a_silence_holds_back_notifications_until_it_expires() {
        let mut anomalies = Anomalies::default();
        let mut alerts = Alerts::default();
        let c = AlertConfig { for_ms: 0, ..cfg() };
        let silence = Silence {
            id: "s1".into(),
            matchers: vec![
                Matcher::new("source", "we.*", true, true),
                Matcher::new("severity", "warning", false, false),
            ],
            starts_at_ms: 0,
            ends_at_ms: 5_000,
            created_by: "ops".into(),
            comment: "deploy".into(),
        };
        anomalies.raise(finding(trust::MTLS_DOWNGRADE, "web"), 10_000);
        anomalies.raise(finding(trust::MTLS_DOWNGRADE, "api"), 10_000);
        let first = alerts.update(&anomalies, std::slice::from_ref(&silence), &c, 10_000, 1_000);
        assert_eq!(first.iter().map(|n| n.labels["source"].as_str()).collect::<Vec<_>>(), vec!["api"]);
        assert!(alerts.update(&anomalies, std::slice::from_ref(&silence), &c, 20_000, 4_999).is_empty());
        let after = alerts.update(&anomalies, std::slice::from_ref(&silence), &c, 30_000, 5_000);
        assert_eq!(after.iter().map(|n| n.labels["source"].as_str()).collect::<Vec<_>>(), vec!["web"]);
    }
}
