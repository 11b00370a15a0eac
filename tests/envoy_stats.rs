//! Envoy's stats sink, end to end with the real Envoy 1.40: a checkout sidecar streams its
//! stats (and access logs) to the real `meshwatch`, once with cumulative counters and raw
//! stat names (Envoy's defaults), once with deltas and tag-extracted names as labels. Real
//! failures go through it: an upstream that refuses connections, a route that retries a
//! failing upstream, a route that times out, outlier detection ejecting a host. Each pair's
//! `meshwatch_pair_upstream_*` series must equal what Envoy itself counted for the cluster,
//! and an Envoy restart (counters from zero) must not lose or double a count. Replayed stats
//! with a retry storm must become an anomaly of the pair, and nothing else.
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

/// How the sidecar names its clusters and sends its stats.
#[derive(Clone, Copy)]
struct Setup {
    /// `report_counters_as_deltas` (else cumulative counters, Envoy's default).
    deltas: bool,
    tags: Tags,
    /// Clusters named as Istio names them (`outbound|8080||payments.shop.svc.cluster.local`)
    /// and a dotted egress-like name (`ledger.partner.example`), instead of one-word names.
    istio_names: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Tags {
    /// Raw stat names (`emit_tags_as_labels: false`).
    Off,
    /// Envoy's default tags as labels (`envoy.cluster_name`).
    EnvoyDefault,
    /// Istio's tags: the default ones off, `cluster_name` by Istio's expression.
    Istio,
}

impl Setup {
    /// The Envoy cluster of a test cluster, and the destination meshwatch names it by.
    fn cluster(&self, c: &str) -> (String, String) {
        match (self.istio_names, c) {
            (false, _) => (c.to_string(), c.to_string()),
            (true, "ledger") => ("ledger.partner.example".into(), "ledger.partner.example".into()),
            (true, _) => (format!("outbound|8080||{c}.shop.svc.cluster.local"), format!("{c}.shop")),
        }
    }

    fn template(&self) -> String {
        let mut t = std::fs::read_to_string(repo_root().join("deploy/envoy/sidecar-checkout.yaml")).unwrap();
        let mut edits = Vec::new();
        if self.deltas {
            edits.push(("report_counters_as_deltas: false".to_string(), "report_counters_as_deltas: true".to_string()));
            edits.push(("meshwatch_counters: cumulative".into(), "meshwatch_counters: delta".into()));
        }
        if self.tags != Tags::Off {
            edits.push(("emit_tags_as_labels: false".into(), "emit_tags_as_labels: true".into()));
        }
        if self.tags == Tags::Istio {
            // Istio's bootstrap: no default tags, its own `cluster_name`.
            edits.push((
                "stats_config:\n".into(),
                "stats_config:\n  use_all_default_tags: false\n  stats_tags:\n  - tag_name: cluster_name\n    regex: '^cluster\\.((.+?(\\..+?\\.svc\\.cluster\\.local)?)\\.)'\n  - tag_name: response_code\n    regex: '_rq(_(\\d{3}))$'\n  - tag_name: response_code_class\n    regex: '_rq(_(\\dxx))$'\n".into(),
            ));
        }
        if self.istio_names {
            for c in CLUSTERS {
                let (name, _) = self.cluster(c);
                edits.push((format!("- name: {c}\n"), format!("- name: \"{name}\"\n")));
                edits.push((format!("cluster_name: {c}\n"), format!("cluster_name: \"{name}\"\n")));
                // The route: `cluster: payments` on its own line, the others inline.
                let route = if c == "payments" { format!("cluster: {c}\n") } else { format!("cluster: {c},") };
                edits.push((route.clone(), route.replace(c, &format!("\"{name}\""))));
            }
        }
        for (from, to) in edits {
            assert!(t.contains(&from), "{from}");
            t = t.replace(&from, &to);
        }
        t
    }
}

fn pair(destination: &str) -> [(&str, &str); 4] {
    [("source", CHECKOUT), ("destination", destination), ("direction", "east_west"), ("reporter", "source")]
}

/// Envoy's own numbers for every cluster and stat, from its admin endpoint.
async fn envoy_numbers(envoy: &Envoy, setup: Setup) -> HashMap<(&'static str, &'static str), f64> {
    let mut out = HashMap::new();
    for cluster in CLUSTERS {
        let (name, _) = setup.cluster(cluster);
        for (stat, _) in STATS {
            let v = envoy.stat(&format!("cluster.{name}.{stat}")).await.unwrap_or(0);
            out.insert((cluster, stat), v as f64);
        }
    }
    out
}

fn meshwatch_numbers(m: &Metrics, setup: Setup) -> HashMap<(&'static str, &'static str), f64> {
    let mut out = HashMap::new();
    for cluster in CLUSTERS {
        let (_, destination) = setup.cluster(cluster);
        for (stat, family) in STATS {
            out.insert((cluster, stat), m.get(family, &pair(&destination)).unwrap_or(-1.0));
        }
    }
    out
}

async fn upstream_signals_equal_envoys_own(setup: Setup) {
    let tag = match (setup.deltas, setup.tags, setup.istio_names) {
        (false, Tags::Off, false) => "stats-cumulative",
        (true, Tags::EnvoyDefault, false) => "stats-deltas",
        (_, Tags::EnvoyDefault, true) => "stats-istio-names-envoy-tags",
        (_, Tags::Istio, true) => "stats-istio-names-istio-tags",
        _ => "stats-other",
    };
    let work = TempDir::new(tag);
    let data = TempDir::new(&format!("{tag}-data"));
    let env = [
        ("MESHWATCH_DATA_DIR", data.path().display().to_string()),
        ("MESHWATCH_WINDOW__LENGTH", "1s".to_string()),
        ("MESHWATCH_WINDOW__GRACE", "2s".to_string()),
    ];
    let mw = Meshwatch::start(&repo_root().join("deploy/meshwatch-example.toml"), &env);
    let app = start_app("127.0.0.1", 100).await;
    let template = setup.template();
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
    let want = envoy_numbers(&envoy, setup).await;
    let m = mw.metrics_until(Duration::from_secs(20), |m| meshwatch_numbers(m, setup) == want).await;
    let got = meshwatch_numbers(&m, setup);
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
    let (_, payments) = setup.cluster("payments");
    assert_eq!(m.sum("meshwatch_pair_requests_total", &pair(&payments)), 10.0);
    // Stats of no other pair: every pair with stats is one of the three.
    let with_stats: std::collections::BTreeSet<_> =
        m.matching("meshwatch_pair_upstream_requests_total", &[]).map(|s| s.labels["destination"].clone()).collect();
    let expected: std::collections::BTreeSet<_> = CLUSTERS.iter().map(|c| setup.cluster(c).1).collect();
    assert_eq!(with_stats, expected, "stats on pairs the access logs do not have");
    // Envoy's own stats are not re-exported, and nothing was rejected.
    assert!(m.matching("envoy_cluster_upstream_rq_total", &[]).next().is_none());
    assert_eq!(m.sum("meshwatch_envoy_stats_rejected_total", &[]), 0.0);
    assert_eq!(m.sum("meshwatch_envoy_stats_resets_total", &[]), 0.0);
    // meshwatch's own cluster is not a pair.
    assert!(m.matching("meshwatch_pair_upstream_requests_total", &[("destination", "meshwatch")]).next().is_none());
    promtool_check_metrics(&m.text);

    if !setup.deltas {
        // Envoy restarts (same node, counters from zero): meshwatch counts on from where it
        // was, and says it saw counters go down.
        drop(envoy);
        let envoy = Envoy::start_config("sidecar-checkout", &template, &ports, work.path()).await;
        let front = envoy.listener("outbound_http");
        for _ in 0..2 {
            assert_eq!(http_get(front, "/pay/ok").await.0, 200);
        }
        let payments = pair(&payments);
        let m = mw
            .metrics_until(Duration::from_secs(20), |m| {
                m.get("meshwatch_pair_upstream_requests_total", &payments) == Some(18.0)
            })
            .await;
        assert_eq!(m.get("meshwatch_pair_upstream_requests_total", &payments), Some(18.0), "{}", mw.logs());
        assert!(m.sum("meshwatch_envoy_stats_resets_total", &[]) >= 1.0);
        assert_eq!(envoy.stat(&format!("cluster.{}.upstream_rq_total", setup.cluster("payments").0)).await, Some(2));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cumulative_counters_with_raw_names() {
    upstream_signals_equal_envoys_own(Setup { deltas: false, tags: Tags::Off, istio_names: false }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_counters_with_tags_as_labels() {
    upstream_signals_equal_envoys_own(Setup { deltas: true, tags: Tags::EnvoyDefault, istio_names: false }).await;
}

/// Envoy's default tag cuts `outbound|8080||payments.shop.svc.cluster.local` at its first
/// dot (and `ledger.partner.example` too): the stats must still land on the access logs'
/// pairs, not on phantom pairs named by the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_cluster_names_with_envoys_default_tags() {
    upstream_signals_equal_envoys_own(Setup { deltas: false, tags: Tags::EnvoyDefault, istio_names: true }).await;
}

/// Istio's own bootstrap: default tags off, a `cluster_name` tag by Istio's expression.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_cluster_names_with_istios_tags() {
    upstream_signals_equal_envoys_own(Setup { deltas: true, tags: Tags::Istio, istio_names: true }).await;
}

/// Envoy stats messages as the sink sends them, with deltas, replayed fast: three hours of a
/// checkout sidecar's flushes every 10 s, then a retry storm against payments.
mod detection {
    use super::*;
    use bytes::Bytes;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::metrics::v3::{StreamMetricsMessage, stream_metrics_message};
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use envoy_types::pb::io::prometheus::client::{Counter, Gauge, Metric, MetricFamily, MetricType};
    use meshwatch_collector::als::BytesCodec;
    use meshwatch_collector::envoy_stats::STREAM_METRICS_PATH;
    use prost::Message;

    fn family(name: &str, gauge: bool, value: f64, t_ms: i64) -> MetricFamily {
        let mut metric = Metric { timestamp_ms: Some(t_ms), ..Metric::default() };
        if gauge {
            metric.gauge = Some(Gauge { value: Some(value) });
        } else {
            metric.counter = Some(Counter { value: Some(value), ..Counter::default() });
        }
        let kind = if gauge { MetricType::Gauge } else { MetricType::Counter };
        MetricFamily { name: Some(name.into()), r#type: Some(kind as i32), metric: vec![metric], ..Default::default() }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_storm_in_envoy_stats_is_an_anomaly_of_the_pair() {
        let dir = TempDir::new("stats-detect");
        let config = dir.path().join("meshwatch.toml");
        std::fs::write(&config, "[window]\nclock = \"watermark\"\ngrace = \"10s\"\n\n[detector]\nwarmup = \"1h\"\n")
            .unwrap();
        let mw = Meshwatch::start(&config, &[("MESHWATCH_DATA_DIR", dir.path().join("data").display().to_string())]);
        let start_ms = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
            / 10_000
            - 3 * 360)
            * 10_000;
        let node = Node {
            id: "checkout-1".into(),
            cluster: "checkout".into(),
            metadata: Some(Struct {
                fields: [("meshwatch_counters".to_string(), Value { kind: Some(Kind::StringValue("delta".into())) })]
                    .into_iter()
                    .collect(),
            }),
            ..Node::default()
        };
        // Three hours of flushes; from 2 h 50 min, three in ten upstream requests are retries.
        let storm = 3 * 360 - 60;
        let requests = |i: i64| 100.0 + ((i * 7919) % 11) as f64;
        let retries = |i: i64| if i >= storm { (requests(i) * 0.3).round() } else { 0.0 };
        let messages: Vec<Bytes> = (0..3 * 360)
            .map(|i: i64| {
                let t = start_ms + i * 10_000 + 5_000;
                let families = vec![
                    family("cluster.payments.upstream_rq_total", false, requests(i), t),
                    family("cluster.payments.upstream_rq_retry", false, retries(i), t),
                    family("cluster.payments.membership_total", true, 3.0, t),
                    family("cluster.payments.membership_healthy", true, 3.0, t),
                ];
                let identifier = (i == 0).then(|| stream_metrics_message::Identifier { node: Some(node.clone()) });
                Bytes::from(StreamMetricsMessage { identifier, envoy_metrics: families }.encode_to_vec())
            })
            .collect();
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{}", mw.grpc)).unwrap().connect().await.unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(STREAM_METRICS_PATH);
        grpc.client_streaming(tonic::Request::new(tokio_stream::iter(messages)), path, BytesCodec).await.unwrap();

        let pair = [("source", "checkout"), ("destination", "payments"), ("direction", "east_west")];
        let sum = |f: &dyn Fn(i64) -> f64| (0..3 * 360).map(f).sum::<f64>();
        let m = mw
            .metrics_until(Duration::from_secs(20), |m| {
                m.get("meshwatch_pair_upstream_requests_total", &pair) == Some(sum(&requests))
            })
            .await;
        assert_eq!(m.get("meshwatch_pair_upstream_requests_total", &pair), Some(sum(&requests)));
        assert_eq!(m.get("meshwatch_pair_upstream_retries_total", &pair), Some(sum(&retries)));
        let (status, body) = http_get(mw.http, "/api/v1/anomalies").await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let anomalies = v["anomalies"].as_array().unwrap();
        assert_eq!(anomalies.len(), 1, "{body}");
        let a = &anomalies[0];
        assert_eq!(
            (a["signal"].as_str(), a["source"].as_str(), a["destination"].as_str()),
            (Some("upstream_retry_ratio"), Some("checkout"), Some("payments")),
            "{a}"
        );
        assert!(a["reason"].as_str().unwrap().starts_with("retries per upstream request (Envoy stats) "), "{a}");
        assert!(a["observed"].as_f64().unwrap() > 0.05 && a["expected"].as_f64().unwrap() < 0.001, "{a}");
        // Detected within three windows of the storm's start.
        let storm_ms = start_ms + storm * 10_000;
        let started = a["started_ms"].as_i64().unwrap();
        assert!(
            (storm_ms..=storm_ms + 30_000).contains(&started),
            "started {} s after the storm",
            (started - storm_ms) / 1000
        );
        assert!(mw.stop().success());
    }
}
