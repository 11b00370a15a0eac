//! Detection end to end: the simulator's latency incident, streamed over real gRPC into the
//! real binary, is flagged on the right pair with the right signal and a reason, and nothing
//! else is; the anomaly survives a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use meshwatch::sim::scenario::Scenario;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_incident_is_flagged_on_its_pair_and_nothing_else_is() {
    let dir = TempDir::new("detect");
    let scenario = Scenario::parse(LATENCY_SCENARIO).unwrap();
    let (scenario_path, config) = replay_files(dir.path(), LATENCY_SCENARIO, "[detector]\nwarmup = \"1h\"");
    let env = [("MESHWATCH_DATA_DIR", dir.path().join("data").display().to_string())];
    let mw = Meshwatch::start(&config, &env);
    simulate_into(&mw, &scenario_path, &["--duration", "2h"]);

    // Once the replay has ended, its windows close and are scored.
    let m = mw
        .metrics_until(Duration::from_secs(60), |m| {
            m.get("meshwatch_windows_open", &[]) == Some(0.0) && m.sum("meshwatch_windows_closed_total", &[]) >= 700.0
        })
        .await;
    assert_eq!(m.get("meshwatch_pairs_learning", &[]), Some(0.0), "every pair had its hour of warm-up");
    let (status, body) = http_get(mw.http, "/api/v1/anomalies").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let anomalies = v["anomalies"].as_array().unwrap();
    assert!(!anomalies.is_empty(), "the latency incident was not detected");
    let incident_start = scenario.start_ms + 90 * 60_000;
    for a in anomalies {
        let kind = a["kind"].as_str().unwrap();
        assert!(kind.starts_with("latency_p"), "only latency is anomalous here: {a}");
        assert_eq!(a["source"], "spiffe://cluster.local/ns/shop/sa/frontend", "{a}");
        assert_eq!(a["destination"], "spiffe://cluster.local/ns/shop/sa/catalog", "{a}");
        assert_eq!(a["direction"], "east_west");
        let started = a["started_ms"].as_i64().unwrap();
        assert!((incident_start..incident_start + 15 * 60_000).contains(&started), "{a}");
        let reason = a["reason"].as_str().unwrap();
        assert!(reason.starts_with("latency p") && reason.contains("expected"), "{reason}");
        // At least the ×1.4 a latency detection needs (the first windows of the shift can
        // share their scale with windows before it).
        assert!(a["observed"].as_f64().unwrap() >= 1.4 * a["expected"].as_f64().unwrap(), "{a}");
    }
    let p50 = anomalies.iter().find(|a| a["kind"] == "latency_p50").expect("the median moved 2.5×");
    assert!(p50["started_ms"].as_i64().unwrap() <= incident_start + 30_000, "detected within 3 windows: {p50}");
    // The incident ended at 1h45m: by 2h every anomaly has ended.
    assert!(anomalies.iter().all(|a| a["ended_ms"].is_i64()), "{body}");
    // Scores and bands are on /metrics for the pair.
    let pair = [
        ("source", "spiffe://cluster.local/ns/shop/sa/frontend"),
        ("destination", "spiffe://cluster.local/ns/shop/sa/catalog"),
        ("reporter", "source"),
        ("signal", "latency_p50"),
    ];
    assert!(
        m.get("meshwatch_pair_signal_expected", &pair).is_some_and(|e| (0.010..0.025).contains(&e)),
        "{:?}",
        m.get("meshwatch_pair_signal_expected", &pair)
    );

    // A restart keeps what was learnt and what was detected.
    assert!(mw.stop().success());
    let mw = Meshwatch::start(&config, &env);
    let (_, again) = http_get(mw.http, "/api/v1/anomalies").await;
    let w: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(w["anomalies"], v["anomalies"]);
    let (_, pairs) = http_get(mw.http, "/api/v1/pairs").await;
    let p: serde_json::Value = serde_json::from_str(&pairs).unwrap();
    assert!(p["pairs"].as_array().unwrap().iter().all(|p| p["state"] == "ready"), "{pairs}");
    assert!(mw.stop().success());
}
