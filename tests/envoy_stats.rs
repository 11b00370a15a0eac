//! Envoy's stats sink, end to end with the real Envoy 1.40: a checkout sidecar streams its
//! stats (and access logs) to the real `meshwatch`, once with cumulative counters and raw
//! stat names (Envoy's defaults), once with deltas and tag-extracted names as labels. Real
//! failures go through it: an upstream that refuses connections, a route that retries a
//! failing upstream, a route that times out, outlier detection ejecting a host. Each pair's
//! `meshwatch_pair_upstream_*` series must equal what Envoy itself counted for the cluster,
//! and an Envoy restart (counters from zero) must not lose or double a count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

const CHECKOUT: &str = "spiffe://mesh.test/ns/shop/sa/checkout";

/// Envoy's stat of a cluster and the meshwatch family that must carry it.
const STATS: [(&str, &str); 10] = [
    ("upstream_rq_total", "meshwatch_pair_upstream_requests_total"),
    ("upstream_rq_5xx", "meshwatch_pair_upstream_errors_total"),
    ("upstream_rq_timeout", "meshwatch_pair_upstream_timeouts_total"),
    ("upstream_rq_retry", "meshwatch_pair_upstream_retries_total"),
    ("upstream_cx_total", "meshwatch_pair_upstream_connections_total"),
    ("upstream_cx_connect_fail", "meshwatch_pair_upstream_connect_failures_total"),
    ("upstream_rq_pending_overflow", "meshwatch_pair_upstream_pending_overflows_total"),
    ("outlier_detection.ejections_enforced_total", "meshwatch_pair_upstream_ejections_total"),
    ("membership_total", "meshwatch_pair_upstream_hosts"),
    ("membership_healthy", "meshwatch_pair_upstream_healthy_hosts"),
];

const CLUSTERS: [&str; 3] = ["payments", "shipping", "ledger"];

fn pair(destination: &str) -> [(&str, &str); 4] {
    [("source", CHECKOUT), ("destination", destination), ("direction", "east_west"), ("reporter", "source")]
}

/// Envoy's own numbers for every cluster and stat, from its admin endpoint.
async fn envoy_numbers(envoy: &Envoy) -> HashMap<(&'static str, &'static str), f64> {
    let mut out = HashMap::new();
    for cluster in CLUSTERS {
        for (stat, _) in STATS {
            let v = envoy.stat(&format!("cluster.{cluster}.{stat}")).await.unwrap_or(0);
            out.insert((cluster, stat), v as f64);
        }
    }
    out
}

fn meshwatch_numbers(m: &Metrics) -> HashMap<(&'static str, &'static str), f64> {
    let mut out = HashMap::new();
    for cluster in CLUSTERS {
        for (stat, family) in STATS {
            out.insert((cluster, stat), m.get(family, &pair(cluster)).unwrap_or(-1.0));
        }
    }
    out
}

async fn upstream_signals_equal_envoys_own(deltas: bool) {
    let tag = if deltas { "stats-deltas" } else { "stats-cumulative" };
    let work = TempDir::new(tag);
    let data = TempDir::new(&format!("{tag}-data"));
    let env = [
        ("MESHWATCH_DATA_DIR", data.path().display().to_string()),
        ("MESHWATCH_WINDOW__LENGTH", "1s".to_string()),
        ("MESHWATCH_WINDOW__GRACE", "2s".to_string()),
    ];
    let mw = Meshwatch::start(&repo_root().join("deploy/meshwatch-example.toml"), &env);
    let app = start_app("127.0.0.1", 100).await;
    let mut template = std::fs::read_to_string(repo_root().join("deploy/envoy/sidecar-checkout.yaml")).unwrap();
    if deltas {
        for (from, to) in [
            ("report_counters_as_deltas: false", "report_counters_as_deltas: true"),
            ("emit_tags_as_labels: false", "emit_tags_as_labels: true"),
            ("meshwatch_counters: cumulative", "meshwatch_counters: delta"),
        ] {
            assert!(template.contains(from), "{from}");
            template = template.replace(from, to);
        }
    }
    let ports = HashMap::from([
        ("checkout_outbound_http", 0),
        ("payments_app", app.port()),
        ("shipping_app", closed_port()),
        ("ledger_app", app.port()),
        ("meshwatch", mw.grpc.port()),
    ]);
    let envoy = Envoy::start_config("sidecar-checkout", &template, &ports, work.path()).await;
    // Traffic only once meshwatch has heard from this Envoy: a cumulative counter's first
    // value from a node never heard from is history, not traffic of the window.
    let m = mw
        .metrics_until(Duration::from_secs(15), |m| m.sum("meshwatch_envoy_stats_samples_used_total", &[]) > 0.0)
        .await;
    assert!(m.sum("meshwatch_envoy_stats_samples_used_total", &[]) > 0.0, "no stats arrived:\n{}", mw.logs());

    let front = envoy.listener("outbound_http");
    for _ in 0..5 {
        assert_eq!(http_get(front, "/pay/ok").await.0, 200);
    }
    // 503, retried twice each.
    for _ in 0..3 {
        assert_eq!(http_get(front, "/pay/fail").await.0, 503);
    }
    // The route gives up after 0.5 s.
    for _ in 0..2 {
        assert_eq!(http_get(front, "/pay/slow").await.0, 504);
    }
    // Nothing listens: connection refused.
    for _ in 0..4 {
        assert_eq!(http_get(front, "/ship/x").await.0, 503);
    }
    // Two 5xx in a row eject the ledger's one host.
    for _ in 0..3 {
        assert_eq!(http_get(front, "/ledger/fail").await.0, 503);
    }
    // Envoy's counts are final once its outlier detector has run.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let want = envoy_numbers(&envoy).await;
    let m = mw.metrics_until(Duration::from_secs(20), |m| meshwatch_numbers(m) == want).await;
    let got = meshwatch_numbers(&m);
    let mut diff: Vec<_> = want.iter().filter(|(k, v)| got.get(*k) != Some(*v)).map(|(k, v)| (k, v, got[k])).collect();
    diff.sort_by(|a, b| a.0.cmp(b.0));
    assert!(diff.is_empty(), "(cluster, stat), Envoy, meshwatch: {diff:?}\n{}", mw.logs());

    // What the test made happen, as Envoy counted it (and so meshwatch).
    assert_eq!(want[&("payments", "upstream_rq_retry")], 6.0);
    assert_eq!(want[&("payments", "upstream_rq_timeout")], 2.0);
    assert_eq!(want[&("shipping", "upstream_cx_connect_fail")], 4.0);
    // Envoy charges the answer, not each attempt: three 503s after retries, two 504s.
    assert_eq!(want[&("payments", "upstream_rq_total")], 16.0);
    assert_eq!(want[&("payments", "upstream_rq_5xx")], 5.0);
    assert_eq!(want[&("ledger", "outlier_detection.ejections_enforced_total")], 1.0);
    assert_eq!(want[&("ledger", "membership_healthy")], 0.0);
    // The stats join the access logs' pair: the same labels count the client's 10 requests.
    assert_eq!(m.sum("meshwatch_pair_requests_total", &pair("payments")), 10.0);
    // Envoy's own stats are not re-exported, and nothing was rejected.
    assert!(m.matching("envoy_cluster_upstream_rq_total", &[]).next().is_none());
    assert_eq!(m.sum("meshwatch_envoy_stats_rejected_total", &[]), 0.0);
    assert_eq!(m.sum("meshwatch_envoy_stats_resets_total", &[]), 0.0);
    // meshwatch's own cluster is not a pair.
    assert!(m.matching("meshwatch_pair_upstream_requests_total", &[("destination", "meshwatch")]).next().is_none());
    promtool_check_metrics(&m.text);

    if !deltas {
        // Envoy restarts (same node, counters from zero): meshwatch counts on from where it
        // was, and says it saw counters go down.
        drop(envoy);
        let envoy = Envoy::start_config("sidecar-checkout", &template, &ports, work.path()).await;
        let front = envoy.listener("outbound_http");
        for _ in 0..2 {
            assert_eq!(http_get(front, "/pay/ok").await.0, 200);
        }
        let payments = pair("payments");
        let m = mw
            .metrics_until(Duration::from_secs(20), |m| {
                m.get("meshwatch_pair_upstream_requests_total", &payments) == Some(18.0)
            })
            .await;
        assert_eq!(m.get("meshwatch_pair_upstream_requests_total", &payments), Some(18.0), "{}", mw.logs());
        assert!(m.sum("meshwatch_envoy_stats_resets_total", &[]) >= 1.0);
        assert_eq!(envoy.stat("cluster.payments.upstream_rq_total").await, Some(2));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cumulative_counters_with_raw_names() {
    upstream_signals_equal_envoys_own(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_counters_with_tags_as_labels() {
    upstream_signals_equal_envoys_own(true).await;
}
