//! Alerting end to end: the simulator's incidents through the real binary become alerts,
//! delivered to a real Alertmanager 0.25 and to local PagerDuty, Slack and webhook receivers,
//! through the durable outbox (a receiver down across a restart loses nothing), held back by
//! silences, with bad input refused clearly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use meshwatch_detector::timefmt::format_ms;

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const REPORTS: &str = "spiffe://cluster.local/ns/shop/sa/reports";
const TOKEN: &str = "s3cret-token";

/// An hour of a small mesh: after 10 minutes of learning, the frontend → cart hop turns
/// plaintext for 10 minutes (a finding that ends 15 minutes after its last evidence), and at
/// 50 minutes the frontend calls a service it never called (still active at the end).
const SCENARIO: &str = r#"
name = "alerts"
start = "2026-01-05"
duration = "1h"
namespace = "shop"
seed = 3
services = [{ name = "frontend" }, { name = "cart" }, { name = "catalog" }, { name = "reports" }]
[[edges]]
from = "internet"
to = "frontend"
rate = 5
[[edges]]
from = "frontend"
to = ["cart", "catalog"]
rate = 3
[[incidents]]
kind = "mtls_downgrade"
from = "frontend"
to = "cart"
start = "15m"
duration = "10m"
[[incidents]]
kind = "new_edge"
from = "frontend"
to = "reports"
start = "50m"
duration = "10m"
"#;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Writes the scenario and a meshwatch config with `receivers` (TOML tables) and more
/// `[zero_trust]` settings into `dir`.
fn setup(dir: &Path, scenario: &str, zero_trust: &str, receivers: &str) -> (PathBuf, PathBuf) {
    let settings = format!(
        r#"[zero_trust]
learning = "10m"
{zero_trust}

[alerting]
for = "0s"
keep_firing_for = "1m"
api_token = "{TOKEN}"
retry_initial = "100ms"
retry_max = "400ms"
resend_interval = "1s"
timeout = "1s"
runbook_url = "https://runbooks.example/meshwatch/{{kind}}"
external_url = "http://meshwatch.example:9978"
{receivers}"#
    );
    replay_files(dir, scenario, &settings)
}

/// One signed webhook receiver, `hook`.
fn webhook(hook: &Recorder) -> String {
    format!(
        "[[alerting.receivers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"{}/hook\"\nsecret = \"k\"\n",
        hook.url()
    )
}

/// `SCENARIO` with one signed webhook receiver, `hook`, and a data directory in `dir`: the
/// scenario, the config and the environment to start meshwatch with.
fn with_webhook(dir: &Path, hook: &Recorder) -> (PathBuf, PathBuf, [(&'static str, String); 1]) {
    let (scenario_path, config) = setup(dir, SCENARIO, "", &webhook(hook));
    (scenario_path, config, [("MESHWATCH_DATA_DIR", dir.join("data").display().to_string())])
}

fn simulate(scenario: &Path, mw: &Meshwatch, rate: &str) {
    simulate_into(mw, scenario, &["--rate", rate, "--clock", "simulated"]);
}

/// (fingerprint, status) of webhook bodies.
fn statuses(taken: &[Recorded]) -> Vec<(String, String, String)> {
    taken
        .iter()
        .map(|r| {
            let v = r.json();
            (
                v["fingerprint"].as_str().unwrap().into(),
                v["labels"]["kind"].as_str().unwrap().into(),
                v["status"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// A real Alertmanager on 127.0.0.1, routing every alert to `webhook`.
struct Alertmanager {
    child: Child,
    url: String,
}

impl Alertmanager {
    async fn start(dir: &Path, webhook: &str) -> Alertmanager {
        let config = dir.join("alertmanager.yml");
        std::fs::write(
            &config,
            format!(
                r#"route:
  receiver: hook
  group_by: ['alertname', 'source', 'destination', 'kind']
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
- name: hook
  webhook_configs:
  - url: {webhook}
    send_resolved: true
"#
            ),
        )
        .unwrap();
        let port = closed_port();
        let log = std::fs::File::create(dir.join("alertmanager.log")).unwrap();
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("am-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus-alertmanager (Debian package prometheus-alertmanager) is installed");
        let am = Alertmanager { child, url: format!("http://127.0.0.1:{port}") };
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..100 {
            if let Ok(Ok((200, _))) =
                tokio::time::timeout(Duration::from_secs(1), async { Ok::<_, ()>(try_get(addr, "/-/ready").await) })
                    .await
            {
                return am;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "alertmanager did not start: {}",
            std::fs::read_to_string(dir.join("alertmanager.log")).unwrap_or_default()
        );
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET that tolerates a refused connection: (0, "") then.
async fn try_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    match tokio::net::TcpStream::connect(addr).await {
        Ok(_) => http_get(addr, path).await,
        Err(_) => (0, String::new()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_gets_one_firing_and_one_resolved_notification_per_incident() {
    let dir = TempDir::new("alerting-am");
    let hook = Recorder::start(Answer::Status(200, None)).await;
    let am = Alertmanager::start(dir.path(), &format!("{}/am", hook.url())).await;
    // Only the downgrade: half an hour, paced so that Alertmanager sees it fire before it ends.
    let scenario = SCENARIO.replace("duration = \"1h\"", "duration = \"30m\"").replace(
        "[[incidents]]\nkind = \"new_edge\"\nfrom = \"frontend\"\nto = \"reports\"\nstart = \"50m\"\nduration = \"10m\"\n",
        "",
    );
    let receivers =
        format!("[[alerting.receivers]]\nname = \"am\"\ntype = \"alertmanager\"\nurls = [\"{}\"]\n", am.url);
    let (scenario_path, config) = setup(dir.path(), &scenario, "hold = \"1m\"", &receivers);
    let env = [("MESHWATCH_DATA_DIR", dir.path().join("data").display().to_string())];
    let mw = Meshwatch::start(&config, &env);
    simulate(&scenario_path, &mw, "100x");
    let taken = hook.until(Duration::from_secs(20), |t| t.iter().any(|r| r.json()["status"] == "resolved")).await;
    // Nothing more comes (Alertmanager would repeat only after an hour).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let taken = if taken.len() == hook.taken().len() { taken } else { hook.taken() };
    let summary: Vec<(String, usize)> = taken
        .iter()
        .map(|r| {
            let v = r.json();
            (v["status"].as_str().unwrap().to_string(), v["alerts"].as_array().unwrap().len())
        })
        .collect();
    assert_eq!(summary, vec![("firing".to_string(), 1), ("resolved".to_string(), 1)], "{}", mw.logs());
    let firing = taken[0].json();
    let alert = &firing["alerts"][0];
    assert_eq!(alert["labels"]["alertname"], "MeshwatchFinding");
    assert_eq!(alert["labels"]["kind"], "mtls_downgrade");
    assert_eq!(alert["labels"]["source"], FRONTEND);
    assert_eq!(alert["labels"]["destination"], CART);
    assert_eq!(alert["labels"]["direction"], "east_west");
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["annotations"]["runbook_url"], "https://runbooks.example/meshwatch/mtls_downgrade");
    assert!(alert["annotations"]["description"].as_str().unwrap().contains("plaintext"), "{alert}");
    assert!(alert["generatorURL"].as_str().unwrap().starts_with("http://meshwatch.example:9978/api/v1/anomalies/"));
    let resolved = taken[1].json();
    assert_eq!(resolved["alerts"][0]["fingerprint"], alert["fingerprint"]);
    assert_eq!(resolved["alerts"][0]["status"], "resolved");
    let m = mw.metrics().await;
    assert_eq!(m.get("meshwatch_alerts", &[("state", "resolved")]), Some(1.0), "{}", m.text);
    assert!(m.get("meshwatch_notifications_sent_total", &[("receiver", "am")]).unwrap() >= 2.0);
    assert!(mw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_across_a_restart_gets_every_notification_in_order() {
    let dir = TempDir::new("alerting-outbox");
    let hook = Recorder::start(Answer::Status(503, Some(0))).await;
    let (scenario_path, config, env) = with_webhook(dir.path(), &hook);
    let mw = Meshwatch::start(&config, &env);
    simulate(&scenario_path, &mw, "max");
    // Firing and resolved for the downgrade, firing for the new edge: queued, failing.
    let m = mw
        .metrics_until(Duration::from_secs(30), |m| {
            m.get("meshwatch_outbox_depth", &[("receiver", "hook")]) == Some(3.0)
                && m.get("meshwatch_notifications_retried_total", &[("receiver", "hook")]).unwrap_or(0.0) >= 2.0
        })
        .await;
    assert_eq!(m.get("meshwatch_outbox_depth", &[("receiver", "hook")]), Some(3.0), "{}\n{}", m.text, mw.logs());
    assert!(m.get("meshwatch_outbox_oldest_age_seconds", &[("receiver", "hook")]).is_some());
    assert!(hook.refused() >= 2);
    assert!(mw.stop().success());

    // Restarted, with the receiver back.
    hook.answer(Answer::Status(200, None));
    let mw = Meshwatch::start(&config, &env);
    let taken = hook.until(Duration::from_secs(20), |t| t.len() >= 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = statuses(&hook.taken());
    let kinds: Vec<(&str, &str)> = got.iter().map(|(_, k, s)| (k.as_str(), s.as_str())).collect();
    assert_eq!(
        kinds,
        vec![("mtls_downgrade", "firing"), ("mtls_downgrade", "resolved"), ("new_edge", "firing")],
        "{}",
        mw.logs()
    );
    assert_eq!(got[0].0, got[1].0, "one alert, one fingerprint");
    assert_eq!(taken[2].json()["labels"]["destination"], REPORTS);
    let m = mw
        .metrics_until(Duration::from_secs(5), |m| {
            m.get("meshwatch_outbox_depth", &[("receiver", "hook")]) == Some(0.0)
        })
        .await;
    assert_eq!(m.get("meshwatch_outbox_depth", &[("receiver", "hook")]), Some(0.0));
    let (_, dead) = http_get(mw.http, "/api/v1/deadletters").await;
    assert_eq!(dead, r#"{"dead_letters":[],"total":0}"#);
    // The alert state survived too: the new edge is still firing, the downgrade resolved.
    let (_, alerts) = http_get(mw.http, "/api/v1/alerts?state=firing").await;
    let v: serde_json::Value = serde_json::from_str(&alerts).unwrap();
    let firing: Vec<_> = v["alerts"].as_array().unwrap().iter().map(|a| a["labels"]["kind"].clone()).collect();
    assert_eq!(firing, vec![serde_json::json!("new_edge")], "{alerts}");
    assert!(mw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alertmanager_back_from_an_outage_gets_its_queue_batched_one_notification_per_alert_a_post() {
    let dir = TempDir::new("alerting-am-batch");
    let am = Recorder::start(Answer::Status(503, Some(0))).await;
    let receivers =
        format!("[[alerting.receivers]]\nname = \"am\"\ntype = \"alertmanager\"\nurls = [\"{}/am\"]\n", am.url());
    let (scenario_path, config) = setup(dir.path(), SCENARIO, "", &receivers);
    let env = [("MESHWATCH_DATA_DIR", dir.path().join("data").display().to_string())];
    let mw = Meshwatch::start(&config, &env);
    simulate(&scenario_path, &mw, "max");
    // The downgrade's firing and resolved and the new edge's firing, queued while refused.
    let m = mw
        .metrics_until(Duration::from_secs(30), |m| m.get("meshwatch_outbox_depth", &[("receiver", "am")]) == Some(3.0))
        .await;
    assert_eq!(m.get("meshwatch_outbox_depth", &[("receiver", "am")]), Some(3.0), "{}\n{}", m.text, mw.logs());
    am.answer(Answer::Status(200, None));
    let posts = am.until(Duration::from_secs(20), |t| t.len() >= 2).await;
    let alerts = |i: usize| posts[i].json().as_array().unwrap().clone();
    let kind = |a: &serde_json::Value| a["labels"]["kind"].as_str().unwrap().to_string();
    // One post for both alerts' firing notifications, the critical downgrade first; its
    // resolution in the next (never two notifications of one alert in a post).
    let first: Vec<String> = alerts(0).iter().map(kind).collect();
    assert_eq!(first, ["mtls_downgrade", "new_edge"], "{:?}", posts[0].json());
    let second = alerts(1);
    assert_eq!(second.iter().map(kind).collect::<Vec<_>>(), ["mtls_downgrade"], "{:?}", posts[1].json());
    let ends = |a: &serde_json::Value| a["endsAt"].as_str().unwrap().to_string();
    assert!(ends(&second[0]) < ends(&alerts(0)[0]), "the second post ends the downgrade: {second:?}");
    let m = mw
        .metrics_until(Duration::from_secs(5), |m| m.get("meshwatch_outbox_depth", &[("receiver", "am")]) == Some(0.0))
        .await;
    assert_eq!(m.get("meshwatch_notifications_sent_total", &[("receiver", "am")]), Some(3.0), "{}", m.text);
    assert!(mw.stop().success());
}

/// Per alert fingerprint, its statuses in the order received, repeats collapsed: one firing
/// cycle is `["firing"]` or `["firing", "resolved"]`.
fn cycles(got: &[(String, String, String)]) -> std::collections::BTreeMap<(String, String), Vec<String>> {
    let mut out: std::collections::BTreeMap<(String, String), Vec<String>> = Default::default();
    for (fingerprint, kind, status) in got {
        let seen = out.entry((kind.clone(), fingerprint.clone())).or_default();
        if seen.last() != Some(status) {
            seen.push(status.clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_notifications_neither_starts_a_firing_cycle_again_nor_reuses_ids() {
    let dir = TempDir::new("alerting-crash");
    let hook = Recorder::start(Answer::Status(200, None)).await;
    let (scenario_path, config, env) = with_webhook(dir.path(), &hook);
    let mw = Meshwatch::start(&config, &env);
    // The hour in a second or two: the downgrade fires and ends, the new edge fires, all
    // within the few seconds that checkpoints of the models are spaced by.
    simulate(&scenario_path, &mw, "max");
    let taken = hook.until(Duration::from_secs(20), |t| t.len() >= 3).await;
    let before = cycles(&statuses(&taken));
    let kinds: Vec<_> = before.iter().map(|((k, _), s)| (k.as_str(), s.join(","))).collect();
    assert_eq!(
        kinds,
        vec![("mtls_downgrade", "firing,resolved".to_string()), ("new_edge", "firing".to_string())],
        "{}",
        mw.logs()
    );
    let url = |r: &Recorded| r.json()["annotations"]["detection_url"].as_str().map(str::to_string);
    let urls_before: std::collections::BTreeSet<_> = taken.iter().filter_map(url).collect();
    mw.kill();

    let mw = Meshwatch::start(&config, &env);
    // Alerts are brought up to date every second: a few rounds of them.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let all = hook.taken();
    let after = cycles(&statuses(&all));
    assert_eq!(after, before, "no alert started again or ended early after the crash:\n{}", mw.logs());
    // Each delivered detection link still names the detection it was sent for.
    let urls: std::collections::BTreeSet<_> = all.iter().filter_map(url).collect();
    assert_eq!(urls, urls_before);
    let (_, body) = http_get(mw.http, "/api/v1/anomalies").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let state: Vec<(String, bool)> = v["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["kind"].as_str().unwrap().to_string(), a["ended_ms"].is_null()))
        .collect();
    assert!(state.contains(&("mtls_downgrade".to_string(), false)), "{body}");
    assert!(state.contains(&("new_edge".to_string(), true)), "{body}");
    assert!(mw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_back_from_an_outage_gets_its_queue_with_the_next_notification_not_after_the_backoff() {
    let dir = TempDir::new("alerting-backoff");
    let hook = Recorder::start(Answer::Status(503, None)).await;
    let (scenario_path, config, [data]) = with_webhook(dir.path(), &hook);
    // After a failure the sender waits 1 to 3 minutes (2 with jitter).
    let env = [
        data,
        ("MESHWATCH_ALERTING__RETRY_INITIAL", "2m".to_string()),
        ("MESHWATCH_ALERTING__RETRY_MAX", "2m".to_string()),
    ];
    let mw = Meshwatch::start(&config, &env);
    // The hour at 60×: the downgrade fires about 15 s in and is resolved about 41 s in (its
    // finding holds 15 minutes, its alert keeps firing one more).
    let play = simulate_in_background(&mw, &scenario_path, &["--rate", "60x", "--clock", "simulated"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while hook.refused() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(hook.refused() >= 1, "the downgrade's firing was tried: {}", mw.logs());
    // While the sender waits out its backoff, the outbox's oldest age keeps growing at each
    // scrape (it is not the value of the sender's last attempt).
    let age = |m: &Metrics| m.get("meshwatch_outbox_oldest_age_seconds", &[("receiver", "hook")]).unwrap_or(0.0);
    let before = age(&mw.metrics().await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = age(&mw.metrics().await);
    assert!(after - before >= 2.5, "oldest age {before} s, then {after} s three seconds later");
    hook.answer(Answer::Status(200, None));
    let back = std::time::Instant::now();
    let taken = hook.until(Duration::from_secs(70), |t| !t.is_empty()).await;
    let waited = back.elapsed();
    let got = statuses(&taken);
    assert_eq!(got.first().map(|(_, k, s)| (k.as_str(), s.as_str())), Some(("mtls_downgrade", "firing")));
    // The resolved notification came about 26 s after the receiver was back, and took the
    // queue with it; the backoff alone would have waited at least 45 s more.
    assert!(waited < Duration::from_secs(40), "delivered {waited:?} after the receiver was back");
    play.join().unwrap();
    assert!(mw.stop().success());
}

/// HMAC-SHA256 by openssl, to check meshwatch's signature independently.
fn openssl_hmac(secret: &str, message: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl is installed");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(message).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().rsplit(' ').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagerduty_slack_and_signed_webhook_bodies_silences_and_bad_receivers() {
    let dir = TempDir::new("alerting-receivers");
    let pd = Recorder::start(Answer::Status(202, None)).await;
    let slack = Recorder::start(Answer::Status(200, None)).await;
    let hook = Recorder::start(Answer::Status(200, None)).await;
    let hang = Recorder::start(Answer::Hang).await;
    let garbage = Recorder::start(Answer::Garbage).await;
    let refuse = Recorder::start(Answer::Status(400, None)).await;
    let receivers = format!(
        r#"[[alerting.receivers]]
name = "pd"
type = "pagerduty"
url = "{}/v2/enqueue"
routing_key = "R0UT1NGKEY"

[[alerting.receivers]]
name = "slack"
type = "slack"
url = "{}/services/T/B/X"
severities = ["critical", "warning"]

[[alerting.receivers]]
name = "hook"
type = "webhook"
url = "{}/hook"
secret = "shared-secret"

[[alerting.receivers]]
name = "hang"
type = "webhook"
url = "{}/"
secret = "x"

[[alerting.receivers]]
name = "garbage"
type = "slack"
url = "{}/"

[[alerting.receivers]]
name = "refuse"
type = "webhook"
url = "{}/"
secret = "x"
kinds = ["mtls_*"]
"#,
        pd.url(),
        slack.url(),
        hook.url(),
        hang.url(),
        garbage.url(),
        refuse.url()
    );
    let (scenario_path, config) = setup(dir.path(), SCENARIO, "", &receivers);
    let env = [("MESHWATCH_DATA_DIR", dir.path().join("data").display().to_string())];
    let mw = Meshwatch::start(&config, &env);

    // Bad silences and bad tokens are refused with a reason; nothing is changed.
    let silence_ends = now_ms() + 15_000;
    let ends = format_ms(silence_ends);
    let good = format!(
        r#"{{"matchers":[{{"name":"kind","value":"new_edge","isRegex":false}}],"endsAt":"{ends}","createdBy":"ops","comment":"expected: reports is new"}}"#
    );
    assert_eq!(http_send(mw.http, "POST", "/api/v1/silences", None, &good).await.0, 401);
    assert_eq!(http_send(mw.http, "POST", "/api/v1/silences", Some("wrong"), &good).await.0, 401);
    let long_comment = format!(
        r#"{{"matchers":[{{"name":"kind","value":"x"}}],"endsAt":"2030-01-01T00:00:00Z","createdBy":"a","comment":"{}"}}"#,
        "c".repeat(1 << 20)
    );
    let many = vec![r#"{"name":"kind","value":"x"}"#; 100].join(",");
    let many_matchers =
        format!(r#"{{"matchers":[{many}],"endsAt":"2030-01-01T00:00:00Z","createdBy":"a","comment":"c"}}"#);
    for (bad, why) in [
        (long_comment.as_str(), "comment: 1048576 bytes, at most 4096"),
        (many_matchers.as_str(), "matchers: 100, at most 32"),
        (
            r#"{"matchers":[{"name":"kind","value":"x"}],"endsAt":"2030-01-01T00:00:00Z","createdBy":"a\u0000b","comment":"c"}"#,
            "createdBy: control characters",
        ),
        (
            r#"{"matchers":[{"name":"kind","value":"x"}],"endsAt":"2030-01-01T00:00:00+99:99","createdBy":"a","comment":"c"}"#,
            "RFC 3339",
        ),
        ("not json", "not a silence"),
        (r#"{"matchers":[],"endsAt":"2030-01-01T00:00:00Z","createdBy":"a","comment":"c"}"#, "matchers"),
        (
            r#"{"matchers":[{"name":"kind","value":"(","isRegex":true}],"endsAt":"2030-01-01T00:00:00Z","createdBy":"a","comment":"c"}"#,
            "regular expression",
        ),
        (
            r#"{"matchers":[{"name":"kind","value":"x"}],"endsAt":"2020-01-01T00:00:00Z","createdBy":"a","comment":"c"}"#,
            "future",
        ),
        (r#"{"matchers":[{"name":"kind","value":"x"}],"endsAt":"tomorrow","createdBy":"a","comment":"c"}"#, "RFC 3339"),
        (
            r#"{"matchers":[{"name":"kind","value":"x"}],"endsAt":"2030-01-01T00:00:00Z","createdBy":"","comment":"c","extra":1}"#,
            "unknown field",
        ),
    ] {
        let (status, body) = http_send(mw.http, "POST", "/api/v1/silences", Some(TOKEN), bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains(why), "{bad}: {body}");
    }
    assert_eq!(http_send(mw.http, "DELETE", "/api/v1/silences/nope", Some(TOKEN), "").await.0, 404);
    let (status, body) = http_send(mw.http, "POST", "/api/v1/silences", Some(TOKEN), &good).await;
    assert_eq!(status, 200, "{body}");
    let (_, listed) = http_get(mw.http, "/api/v1/silences").await;
    assert!(listed.contains("expected: reports is new"), "{listed}");

    simulate(&scenario_path, &mw, "max");

    // PagerDuty: trigger, then resolve with the same dedup_key; the new edge is silenced.
    let events = pd.until(Duration::from_secs(20), |t| t.len() >= 2).await;
    let trigger = events[0].json();
    assert_eq!(events[0].path, "/v2/enqueue");
    assert_eq!(trigger["routing_key"], "R0UT1NGKEY");
    assert_eq!(trigger["event_action"], "trigger");
    let payload = &trigger["payload"];
    assert!(payload["summary"].as_str().unwrap().starts_with("mtls downgrade: frontend → cart"), "{trigger}");
    assert!(payload["summary"].as_str().unwrap().len() <= 1024);
    assert_eq!(payload["source"], FRONTEND);
    assert!(["critical", "error", "warning", "info"].contains(&payload["severity"].as_str().unwrap()));
    assert!(meshwatch_detector::timefmt::parse_ms(payload["timestamp"].as_str().unwrap()).is_ok(), "{payload}");
    assert_eq!(payload["component"], CART);
    assert_eq!(payload["class"], "mtls_downgrade");
    let resolve = events[1].json();
    assert_eq!(resolve["event_action"], "resolve");
    assert_eq!(resolve["dedup_key"], trigger["dedup_key"]);
    assert_eq!(resolve["routing_key"], "R0UT1NGKEY");
    // Meanwhile the new edge fires, held back by the silence.
    let (_, alerts) = http_get(mw.http, "/api/v1/alerts?state=firing").await;
    let v: serde_json::Value = serde_json::from_str(&alerts).unwrap();
    let firing = v["alerts"].as_array().unwrap();
    assert_eq!(firing.len(), 1, "{alerts}");
    assert_eq!((firing[0]["labels"]["kind"].as_str(), firing[0]["silenced"].as_bool()), (Some("new_edge"), Some(true)));
    assert!(now_ms() < silence_ends - 2_000, "the checks above took too long for the silence");
    assert_eq!(pd.taken().len(), 2, "silenced");

    // Slack: readable text and blocks.
    let messages = slack.until(Duration::from_secs(10), |t| t.len() >= 2).await;
    for (m, status) in messages.iter().zip(["FIRING", "RESOLVED"]) {
        let v = m.json();
        assert!(v["text"].as_str().unwrap().contains(status), "{v}");
        assert!(v["text"].as_str().unwrap().contains("plaintext"), "{v}");
        let blocks = v["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        assert_eq!(blocks[0]["text"]["type"], "plain_text");
        assert!(blocks[0]["text"]["text"].as_str().unwrap().chars().count() <= 150);
        assert!(blocks.iter().skip(1).all(|b| ["section", "context"].contains(&b["type"].as_str().unwrap())), "{v}");
    }

    // The webhook: the documented body, signed over timestamp and body.
    let signed = hook.until(Duration::from_secs(10), |t| t.len() >= 2).await;
    for r in &signed {
        let ts = &r.headers["x-meshwatch-timestamp"];
        assert!((ts.parse::<i64>().unwrap() - now_ms() / 1000).abs() < 120, "{ts}");
        let mut message = format!("{ts}.").into_bytes();
        message.extend_from_slice(&r.body);
        assert_eq!(r.headers["x-meshwatch-signature"], openssl_hmac("shared-secret", &message));
        let v = r.json();
        assert_eq!(v["version"], "1");
        assert!(v["labels"]["kind"] == "mtls_downgrade" && v["annotations"]["reason"].is_string(), "{v}");
    }
    assert_eq!(statuses(&signed).iter().map(|s| s.2.as_str()).collect::<Vec<_>>(), vec!["firing", "resolved"]);

    // A receiver that refuses for good: dead letters (its filter wants the downgrade only).
    let m = mw
        .metrics_until(Duration::from_secs(10), |m| {
            m.get("meshwatch_notifications_dead_lettered_total", &[("receiver", "refuse")]) == Some(2.0)
                && m.get("meshwatch_notifications_failed_total", &[("receiver", "hang")]).unwrap_or(0.0) >= 1.0
                && m.get("meshwatch_notifications_failed_total", &[("receiver", "garbage")]).unwrap_or(0.0) >= 1.0
        })
        .await;
    assert_eq!(
        m.get("meshwatch_notifications_dead_lettered_total", &[("receiver", "refuse")]),
        Some(2.0),
        "{}",
        m.text
    );
    let (_, dead) = http_get(mw.http, "/api/v1/deadletters").await;
    let v: serde_json::Value = serde_json::from_str(&dead).unwrap();
    let letters = v["dead_letters"].as_array().unwrap();
    assert_eq!((letters.len(), v["total"].as_u64()), (2, Some(2)), "{dead}");
    let (_, one) = http_get(mw.http, "/api/v1/deadletters?receiver=refuse&limit=1").await;
    let one: serde_json::Value = serde_json::from_str(&one).unwrap();
    assert_eq!((one["dead_letters"].as_array().map(Vec::len), one["total"].as_u64()), (Some(1), Some(2)), "{one}");
    assert_eq!(one["dead_letters"][0], letters[0], "the newest first");
    let (_, none) = http_get(mw.http, "/api/v1/deadletters?receiver=pd").await;
    assert!(none.contains(r#""total":0"#), "{none}");
    assert!(
        letters.iter().all(|l| l["receiver"] == "refuse" && l["reason"].as_str().unwrap().contains("400")),
        "{dead}"
    );
    // Hanging and garbage receivers fail and retry; the others were not held up by them.
    assert!(m.get("meshwatch_notifications_failed_total", &[("receiver", "hang")]).unwrap_or(0.0) >= 1.0, "{}", m.text);
    assert!(m.get("meshwatch_notifications_failed_total", &[("receiver", "garbage")]).unwrap_or(0.0) >= 1.0);
    assert_eq!(m.get("meshwatch_notifications_sent_total", &[("receiver", "hang")]), Some(0.0));

    // The silence ends: the new edge, still firing, is notified now.
    let events = pd.until(Duration::from_secs(20), |t| t.len() >= 3).await;
    assert_eq!(events.len(), 3);
    let late = events[2].json();
    assert_eq!((late["event_action"].as_str(), late["payload"]["class"].as_str()), (Some("trigger"), Some("new_edge")));
    assert_eq!(late["payload"]["component"], REPORTS);
    assert!(mw.stop().success());
}

/// `SCENARIO`'s mesh with an external API, a flood of made-up callers of the catalog from
/// 20 to 40 minutes (200 a second, a new SPIFFE ID each) and, during it, a new egress
/// destination of the frontend at 25 minutes.
const FLOOD: &str = r#"
name = "flood-alerts"
start = "2026-01-05"
duration = "45m"
namespace = "shop"
seed = 5
services = [{ name = "frontend" }, { name = "cart" }, { name = "catalog" }, { name = "paste.example.net", external = true }]
[[edges]]
from = "internet"
to = "frontend"
rate = 5
[[edges]]
from = "frontend"
to = ["cart", "catalog"]
rate = 3
[[incidents]]
kind = "identity_flood"
from = "internet"
to = "catalog"
start = "20m"
duration = "20m"
magnitude = 200
[[incidents]]
kind = "new_egress"
from = "frontend"
to = "paste.example.net"
start = "25m"
duration = "10m"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_identities_pages_once_and_the_real_page_comes_through_during_it() {
    let dir = TempDir::new("alerting-flood");
    let hook = Recorder::start(Answer::Status(200, None)).await;
    let (scenario_path, config) = setup(dir.path(), FLOOD, "", &webhook(&hook));
    // A pair cap of 100: the flood fills it within a second and goes on beyond it.
    let env = [
        ("MESHWATCH_DATA_DIR", dir.path().join("data").display().to_string()),
        ("MESHWATCH_LIMITS__MAX_PAIRS", "100".to_string()),
    ];
    let mw = Meshwatch::start(&config, &env);
    // 45 minutes at 60×: the new egress destination starts 25 s after the simulator, the
    // flood (240,000 made-up callers) ends 40 s after it.
    let started = std::time::Instant::now();
    let play = simulate_in_background(&mw, &scenario_path, &["--rate", "60x", "--clock", "simulated"]);
    let firing = |kind: &str| statuses(&hook.taken()).iter().any(|(_, k, s)| k == kind && s == "firing");
    let mut egress_at = None;
    while started.elapsed() < Duration::from_secs(60) && egress_at.is_none() {
        if firing("new_egress_destination") {
            egress_at = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let egress_at = egress_at.unwrap_or_else(|| panic!("no new_egress_destination page: {}", mw.logs()));
    // While the flood still goes on (it ends 40 s in; the page came 30 s in, 5 s after the
    // destination's first request, on an idle machine).
    assert!(egress_at < Duration::from_secs(40), "paged {egress_at:?} after the simulator started");
    play.join().unwrap();
    let m = mw.metrics_until(Duration::from_secs(10), |_| true).await;
    assert!(m.sum("meshwatch_pairs_overflow_entries_total", &[]) > 100_000.0, "the flood went beyond the cap");
    assert!(mw.stop().success());
    // One page for the flood, one for the destination: none per made-up identity.
    let mut kinds: Vec<String> =
        statuses(&hook.taken()).into_iter().filter(|(_, _, s)| s == "firing").map(|(_, k, _)| k).collect();
    kinds.sort();
    assert_eq!(kinds, ["cardinality_flood", "new_egress_destination"]);
}
