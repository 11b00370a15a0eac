//! End to end with the real Envoy 1.40: an ingress gateway, a client-side and a server-side
//! sidecar with mutual TLS between them, and an external API, all streaming access logs to
//! the real `meshwatch` binary. Traffic with known outcomes goes through; `/metrics` must
//! show exactly it, per pair, direction, reporter and identity.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FRONTEND: &str = "spiffe://mesh.test/ns/shop/sa/frontend";
const BACKEND: &str = "spiffe://mesh.test/ns/shop/sa/backend";

fn pair<'a>(src: &'a str, dst: &'a str, direction: &'a str, reporter: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("source", src), ("destination", dst), ("direction", direction), ("reporter", reporter)]
}

fn with<'a>(mut labels: Vec<(&'a str, &'a str)>, k: &'a str, v: &'a str) -> Vec<(&'a str, &'a str)> {
    labels.push((k, v));
    labels
}

/// The backend's server-side sidecar and the frontend's client-side sidecar, streaming to
/// meshwatch on `mw_port`.
async fn sidecars(
    work: &std::path::Path,
    mw_port: u16,
    backend_app: u16,
    tcp_app: u16,
    external_app: u16,
    inventory_app: u16,
) -> (Envoy, Envoy) {
    sidecars_named(work, mw_port, [backend_app, tcp_app, external_app, inventory_app], |t, _| t.to_string()).await
}

/// `sidecars`, with each bootstrap passed through `name(template, service)` first.
async fn sidecars_named(
    work: &std::path::Path,
    mw_port: u16,
    [backend_app, tcp_app, external_app, inventory_app]: [u16; 4],
    name: fn(&str, &str) -> String,
) -> (Envoy, Envoy) {
    let template = |file: &str| std::fs::read_to_string(repo_root().join(format!("deploy/envoy/{file}.yaml"))).unwrap();
    let backend = Envoy::start_config(
        "sidecar-backend",
        &name(&template("sidecar-backend"), "backend"),
        &HashMap::from([
            ("backend_inbound_http", 0),
            ("backend_inbound_tcp", 0),
            ("backend_app", backend_app),
            ("backend_tcp_app", tcp_app),
            ("meshwatch", mw_port),
        ]),
        work,
    )
    .await;
    let frontend = Envoy::start_config(
        "sidecar-frontend",
        &name(&template("sidecar-frontend"), "frontend"),
        &HashMap::from([
            ("frontend_outbound_http", 0),
            ("frontend_outbound_tcp", 0),
            ("backend_inbound_http", backend.listeners["inbound_http"]),
            ("backend_inbound_tcp", backend.listeners["inbound_tcp"]),
            ("backend_down", closed_port()),
            ("external_api", external_app),
            ("inventory_app", inventory_app),
            ("meshwatch", mw_port),
        ]),
        work,
    )
    .await;
    (backend, frontend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_mesh_traffic_is_counted_per_pair_direction_and_identity() {
    let work = TempDir::new("e2e");
    gen_certs(&work.path().join("certs"));
    let data = TempDir::new("e2e-data");
    let config = repo_root().join("deploy/meshwatch-example.toml");
    let env = [
        ("MESHWATCH_DATA_DIR", data.path().display().to_string()),
        ("MESHWATCH_WINDOW__LENGTH", "1s".to_string()),
        ("MESHWATCH_WINDOW__GRACE", "3s".to_string()),
    ];
    let mw = Meshwatch::start(&config, &env);
    let mw_port = mw.grpc.port();

    let frontend_app = start_app("127.0.0.1", 5).await;
    let backend_app = start_app("127.0.0.1", 100).await;
    let external_app = start_app("127.0.0.3", 1234).await;
    let tcp_app = start_tcp_app(1000, 2500).await;

    let (backend, frontend) =
        sidecars(work.path(), mw_port, backend_app.port(), tcp_app.port(), external_app.port(), closed_port()).await;
    let gateway = Envoy::start(
        "gateway",
        &HashMap::from([("gateway_http", 0), ("frontend_app", frontend_app.port()), ("meshwatch", mw_port)]),
        work.path(),
    )
    .await;

    // Ingress: an outside client (127.0.0.2 is outside internal_cidrs) through the gateway.
    let gw = gateway.listener("gateway_http");
    for _ in 0..3 {
        assert_eq!(http_request(Some("127.0.0.2"), gw, "GET", "/hello", "shop.test", b"").await.0, 200);
    }
    assert_eq!(http_request(Some("127.0.0.2"), gw, "GET", "/missing", "shop.test", b"").await.0, 404);

    // East/west over mTLS: the frontend app calls the backend through its sidecar.
    let out = frontend.listener("outbound_http");
    for _ in 0..4 {
        assert_eq!(http_request(None, out, "POST", "/ok", "backend", &[b'p'; 300]).await.0, 200);
    }
    for _ in 0..2 {
        assert_eq!(http_request(None, out, "GET", "/fail", "backend", b"").await.0, 503);
    }
    assert_eq!(http_request(None, out, "GET", "/slow", "backend", b"").await.0, 504, "route timeout");
    assert_eq!(http_request(None, out, "GET", "/nowhere", "backend", b"").await.0, 503, "connection refused");

    // Egress: to an API outside the boundary.
    let (status, body) = http_request(None, out, "GET", "/ext/data", "api.example.com", b"").await;
    assert_eq!((status, body.len()), (200, 1234));

    // TCP over mTLS: two connections, 1000 bytes up and 2500 down each.
    let tcp = frontend.listener("outbound_tcp");
    for _ in 0..2 {
        let mut s = connect(None, tcp).await;
        s.write_all(&[b'q'; 1000]).await.unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply.len(), 2500);
    }

    // 4 gateway + 9 client-side + 7 server-side HTTP entries; 2 + 2 TCP entries.
    let m = mw
        .metrics_until(Duration::from_secs(40), |m| {
            m.sum("meshwatch_pair_requests_total", &[]) >= 20.0
                && m.sum("meshwatch_pair_tcp_connections_total", &[]) >= 4.0
        })
        .await;
    let text = &m.text;
    assert_eq!(m.sum("meshwatch_pair_requests_total", &[]), 20.0, "{text}\n{}", mw.logs());
    assert_eq!(m.sum("meshwatch_pair_tcp_connections_total", &[]), 4.0, "{text}");
    assert_eq!(m.sum("meshwatch_als_entries_decoded_total", &[("protocol", "http")]), 20.0);
    assert_eq!(m.sum("meshwatch_als_entries_decoded_total", &[("protocol", "tcp")]), 4.0);
    assert_eq!(m.sum("meshwatch_als_entries_rejected_total", &[]), 0.0, "{text}");
    assert_eq!(m.sum("meshwatch_identities_unresolved_total", &[]), 0.0, "{text}");

    // Ingress, reported by the gateway.
    let ingress = pair("external", FRONTEND, "ingress", "gateway");
    assert_eq!(
        m.get("meshwatch_pair_requests_total", &with(ingress.clone(), "status_class", "2xx")),
        Some(3.0),
        "{text}"
    );
    assert_eq!(m.get("meshwatch_pair_requests_total", &with(ingress.clone(), "status_class", "4xx")), Some(1.0));
    assert_eq!(m.get("meshwatch_pair_request_duration_seconds_count", &ingress), Some(4.0));
    assert_eq!(m.get("meshwatch_pair_mtls_total", &ingress), Some(0.0));

    // East/west, as the client side saw it: 4 ok, 2 × 503 from the app, 504 (UT), 503 (UF).
    let client = pair(FRONTEND, BACKEND, "east_west", "source");
    assert_eq!(
        m.get("meshwatch_pair_requests_total", &with(client.clone(), "status_class", "2xx")),
        Some(4.0),
        "{text}"
    );
    assert_eq!(m.get("meshwatch_pair_requests_total", &with(client.clone(), "status_class", "5xx")), Some(4.0));
    assert_eq!(m.get("meshwatch_pair_response_flags_total", &with(client.clone(), "flag", "UT")), Some(1.0));
    assert_eq!(m.get("meshwatch_pair_response_flags_total", &with(client.clone(), "flag", "UF")), Some(1.0));
    assert_eq!(m.get("meshwatch_pair_mtls_total", &client), Some(0.0), "the app talks plaintext to its own sidecar");
    // The 0.5 s route timeout: one request took at least 0.5 s.
    let under_half_second =
        m.get("meshwatch_pair_request_duration_seconds_bucket", &with(client.clone(), "le", "0.25")).unwrap();
    assert_eq!(m.get("meshwatch_pair_request_duration_seconds_count", &client), Some(8.0));
    assert_eq!(under_half_second, 7.0, "{text}");
    let request_bytes = m.get("meshwatch_pair_request_bytes_total", &client).unwrap();
    assert!(request_bytes >= 4.0 * 300.0, "request bytes {request_bytes} below the 4 × 300 bytes of bodies");

    // The same traffic as the server side saw it: the caller's SPIFFE ID from its client
    // certificate, every request over mTLS, and not one request counted twice.
    let server = pair(FRONTEND, BACKEND, "east_west", "destination");
    assert_eq!(
        m.get("meshwatch_pair_requests_total", &with(server.clone(), "status_class", "2xx")),
        Some(4.0),
        "{text}"
    );
    assert_eq!(m.get("meshwatch_pair_requests_total", &with(server.clone(), "status_class", "5xx")), Some(2.0));
    assert_eq!(
        m.sum("meshwatch_pair_requests_total", &server),
        7.0,
        "the unreachable instance never reached the server"
    );
    assert_eq!(m.get("meshwatch_pair_mtls_total", &server), Some(9.0), "7 requests and 2 TCP connections");

    // Egress to the external API, named by its authority.
    let egress = pair(FRONTEND, "api.example.com", "egress", "source");
    assert_eq!(
        m.get("meshwatch_pair_requests_total", &with(egress.clone(), "status_class", "2xx")),
        Some(1.0),
        "{text}"
    );
    let response_bytes = m.get("meshwatch_pair_response_bytes_total", &egress).unwrap();
    assert!((1234.0..1234.0 + 512.0).contains(&response_bytes), "egress response bytes {response_bytes}");

    // TCP, both views, exact bytes.
    for reporter in ["source", "destination"] {
        let tcp = pair(FRONTEND, BACKEND, "east_west", reporter);
        assert_eq!(m.get("meshwatch_pair_tcp_connections_total", &tcp), Some(2.0), "{reporter}: {text}");
        assert_eq!(m.get("meshwatch_pair_tcp_sent_bytes_total", &tcp), Some(2000.0), "{reporter}");
        assert_eq!(m.get("meshwatch_pair_tcp_received_bytes_total", &tcp), Some(5000.0), "{reporter}");
    }

    // No other pair appeared.
    let pairs: std::collections::BTreeSet<_> = m
        .matching("meshwatch_pair_first_seen_timestamp_seconds", &[])
        .map(|s| {
            (
                s.labels["source"].clone(),
                s.labels["destination"].clone(),
                s.labels["direction"].clone(),
                s.labels["reporter"].clone(),
            )
        })
        .collect();
    assert_eq!(pairs.len(), 4, "{pairs:?}");

    // The exposition passes promtool.
    promtool_check_metrics(text);

    // Restart: the pairs learnt survive.
    drop((gateway, frontend, backend));
    let status = mw.stop();
    assert!(status.success(), "meshwatch exited with {status}");
    let mw = Meshwatch::start(&config, &env);
    let (code, body) = http_get(mw.http, "/api/v1/pairs").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let restored = v["pairs"].as_array().unwrap();
    assert_eq!(restored.len(), 4, "{body}");
    let server_pair = restored
        .iter()
        .find(|p| p["reporter"] == "destination" && p["source"] == FRONTEND)
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(server_pair["total_flows"], 9, "7 requests and 2 connections: {body}");
    assert!(mw.stop().success());
}

const INVENTORY: &str = "spiffe://mesh.test/ns/shop/sa/inventory";

/// The findings meshwatch reports, as (kind, source, destination, direction).
async fn findings(mw: &Meshwatch) -> Vec<(String, String, String, String)> {
    let (status, body) = http_get(mw.http, "/api/v1/findings").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap().to_string();
            (s("kind"), s("source"), s("destination"), s("direction"))
        })
        .collect()
}

/// Sends a request every 200 ms until `done` holds on meshwatch's metrics (at most 30 s).
async fn drive_until(mw: &Meshwatch, out: std::net::SocketAddr, path: &str, done: impl Fn(&Metrics) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert_eq!(http_request(None, out, "GET", path, "backend", b"").await.0, 200, "{path}");
        let m = mw.metrics().await;
        if done(&m) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "timed out driving {path}:\n{}\n{}", m.text, mw.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_upstream_and_a_plaintext_hop_are_findings_and_known_edges_survive_a_restart() {
    let work = TempDir::new("e2e-zt");
    gen_certs(&work.path().join("certs"));
    let data = TempDir::new("e2e-zt-data");
    let config = repo_root().join("deploy/meshwatch-example.toml");
    let env = [
        ("MESHWATCH_DATA_DIR", data.path().display().to_string()),
        ("MESHWATCH_WINDOW__LENGTH", "1s".to_string()),
        ("MESHWATCH_WINDOW__GRACE", "2s".to_string()),
        ("MESHWATCH_ZERO_TRUST__LEARNING", "3s".to_string()),
    ];
    let backend_app = start_app("127.0.0.1", 100).await;
    let external_app = start_app("127.0.0.3", 10).await;
    let inventory_app = start_app("127.0.0.1", 20).await;
    let tcp_app = start_tcp_app(1, 1).await;
    let ports = (backend_app.port(), tcp_app.port(), external_app.port(), inventory_app.port());

    // Learning: the frontend calls the backend over mTLS and the external API.
    let mw = Meshwatch::start(&config, &env);
    let (backend, frontend) = sidecars(work.path(), mw.grpc.port(), ports.0, ports.1, ports.2, ports.3).await;
    let out = frontend.listener("outbound_http");
    assert_eq!(http_request(None, out, "GET", "/ext/data", "api.example.com", b"").await.0, 200);
    drive_until(&mw, out, "/ok", |m| m.get("meshwatch_zero_trust_learning", &[]) == Some(0.0)).await;
    let server = pair(FRONTEND, BACKEND, "east_west", "destination");
    let m = mw.metrics().await;
    assert!(m.get("meshwatch_pair_mtls_total", &server).unwrap() >= 1.0, "{}", m.text);
    assert_eq!(m.get("meshwatch_pair_plaintext_total", &server), Some(0.0), "{}", m.text);
    assert_eq!(findings(&mw).await, vec![], "nothing is new while learning");

    // Restart (the sidecars follow meshwatch to its new port): the edges learnt are known.
    drop((backend, frontend));
    assert!(mw.stop().success());
    let mw = Meshwatch::start(&config, &env);
    let (_backend, frontend) = sidecars(work.path(), mw.grpc.port(), ports.0, ports.1, ports.2, ports.3).await;
    let out = frontend.listener("outbound_http");
    assert_eq!(http_request(None, out, "GET", "/ext/data", "api.example.com", b"").await.0, 200);
    let egress = pair(FRONTEND, "api.example.com", "egress", "source");
    drive_until(&mw, out, "/ok", |m| {
        m.sum("meshwatch_pair_requests_total", &server) >= 3.0 && m.sum("meshwatch_pair_requests_total", &egress) >= 1.0
    })
    .await;

    // A request routed to an upstream cluster the frontend never used: one new edge.
    let to_inventory = pair(FRONTEND, INVENTORY, "east_west", "source");
    drive_until(&mw, out, "/inventory/items", |m| m.sum("meshwatch_pair_requests_total", &to_inventory) >= 1.0).await;
    // The same hop in plaintext (the backend's sidecar is permissive): one downgrade.
    drive_until(&mw, out, "/plain/ok", |m| m.get("meshwatch_pair_plaintext_total", &server).unwrap_or(0.0) >= 1.0)
        .await;
    let m = mw.metrics_until(Duration::from_secs(10), |m| m.sum("meshwatch_findings_total", &[]) >= 2.0).await;
    assert_eq!(
        findings(&mw).await,
        vec![
            ("new_edge".to_string(), FRONTEND.to_string(), INVENTORY.to_string(), "east_west".to_string()),
            ("mtls_downgrade".to_string(), FRONTEND.to_string(), BACKEND.to_string(), "east_west".to_string()),
        ],
        "{}",
        mw.logs()
    );
    let (_, body) = http_get(mw.http, "/api/v1/findings?kind=mtls_downgrade").await;
    assert!(body.contains("plaintext requests or connections from"), "{body}");
    assert_eq!(m.get("meshwatch_findings_total", &[("kind", "new_edge"), ("direction", "east_west")]), Some(1.0));
    assert_eq!(m.get("meshwatch_findings_total", &[("kind", "mtls_downgrade"), ("direction", "east_west")]), Some(1.0));
    assert_eq!(m.sum("meshwatch_findings_total", &[]), 2.0, "{}", m.text);
    assert_eq!(m.get("meshwatch_anomalies_active", &[("signal", "new_edge"), ("direction", "east_west")]), Some(1.0));

    // The graph shows the edges with their state, shaped for Grafana's Node Graph.
    let (status, body) = http_get(mw.http, "/api/v1/graph").await;
    assert_eq!(status, 200);
    let g: serde_json::Value = serde_json::from_str(&body).unwrap();
    let edge = |src: &str, dst: &str| {
        g["edges"].as_array().unwrap().iter().find(|e| e["source"] == src && e["target"] == dst).cloned()
    };
    let downgraded = edge(FRONTEND, BACKEND).unwrap_or_else(|| panic!("{body}"));
    assert_eq!(downgraded["state"], "mtls_downgrade", "{body}");
    let share = downgraded["mtls_share"].as_f64().unwrap();
    assert!(share > 0.5 && share < 1.0, "{body}");
    assert_eq!(edge(FRONTEND, INVENTORY).unwrap()["state"], "new_edge");
    assert_eq!(edge(FRONTEND, "api.example.com").unwrap()["state"], "known");
    let nodes = g["nodes"].as_array().unwrap();
    assert!(nodes.iter().any(|n| n["id"] == INVENTORY && n["title"] == "inventory"), "{body}");
    assert!(mw.stop().success());
}

/// A sidecar as Istio names it: an Istio node id, `node.cluster` as `app.namespace`, and
/// the metadata Istio's proxies carry (`NAMESPACE`, `SERVICE_ACCOUNT`, `WORKLOAD_NAME`), with
/// no `meshwatch_identity`.
fn istio_node(template: &str, service: &str) -> String {
    let (id, ip) = (format!("{service}-1"), if service == "frontend" { "127.0.0.5" } else { "127.0.0.1" });
    let ours = format!("  id: {id}\n  cluster: {service}\n");
    assert!(template.contains(&ours), "{ours}");
    let identity = format!("meshwatch_identity: spiffe://mesh.test/ns/shop/sa/{service}\n");
    assert!(template.contains(&identity), "{identity}");
    template
        .replacen(
            &ours,
            &format!(
                "  id: sidecar~{ip}~{service}-v1-6d5f9-x2x7q.shop~shop.svc.cluster.local\n  cluster: {service}.shop\n"
            ),
            1,
        )
        .replacen(
            &identity,
            &format!("NAMESPACE: shop\n    SERVICE_ACCOUNT: {service}\n    WORKLOAD_NAME: {service}-v1\n"),
            1,
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_named_as_istio_names_them_give_one_pair_per_hop_and_one_downgrade() {
    let work = TempDir::new("e2e-istio-nodes");
    gen_certs(&work.path().join("certs"));
    let data = TempDir::new("e2e-istio-nodes-data");
    let env = [
        ("MESHWATCH_DATA_DIR", data.path().display().to_string()),
        ("MESHWATCH_WINDOW__LENGTH", "1s".to_string()),
        ("MESHWATCH_WINDOW__GRACE", "2s".to_string()),
        ("MESHWATCH_ZERO_TRUST__LEARNING", "3s".to_string()),
    ];
    let mw = Meshwatch::start(&repo_root().join("deploy/meshwatch-example.toml"), &env);
    let backend_app = start_app("127.0.0.1", 100).await;
    let tcp_app = start_tcp_app(1, 1).await;
    let apps = [backend_app.port(), tcp_app.port(), closed_port(), closed_port()];
    let (_backend, frontend) = sidecars_named(work.path(), mw.grpc.port(), apps, istio_node).await;
    let out = frontend.listener("outbound_http");
    drive_until(&mw, out, "/ok", |m| m.get("meshwatch_zero_trust_learning", &[]) == Some(0.0)).await;
    let server = pair(FRONTEND, BACKEND, "east_west", "destination");
    drive_until(&mw, out, "/plain/ok", |m| m.get("meshwatch_pair_plaintext_total", &server).unwrap_or(0.0) >= 1.0)
        .await;
    let m = mw.metrics_until(Duration::from_secs(10), |m| m.sum("meshwatch_findings_total", &[]) >= 1.0).await;
    // Both sidecars' views of the hop are one pair (a reporter each), and nothing else.
    let pairs: std::collections::BTreeSet<_> = m
        .matching("meshwatch_pair_first_seen_timestamp_seconds", &[])
        .map(|s| (s.labels["source"].clone(), s.labels["destination"].clone(), s.labels["reporter"].clone()))
        .collect();
    let want: std::collections::BTreeSet<_> = ["source", "destination"]
        .into_iter()
        .map(|r| (FRONTEND.to_string(), BACKEND.to_string(), r.to_string()))
        .collect();
    assert_eq!(pairs, want, "{}", m.text);
    // Istio's labels beside meshwatch's.
    let istio_labels = [
        ("source_workload_namespace", "shop"),
        ("destination_workload_namespace", "shop"),
        ("source_principal", FRONTEND),
        ("destination_principal", BACKEND),
    ];
    assert_eq!(
        m.sum("meshwatch_pair_requests_total", &with(server.clone(), istio_labels[0].0, istio_labels[0].1)),
        m.sum("meshwatch_pair_requests_total", &server)
    );
    assert!(m.sum("meshwatch_pair_requests_total", &istio_labels) >= 2.0, "{}", m.text);
    assert_eq!(
        findings(&mw).await,
        vec![("mtls_downgrade".to_string(), FRONTEND.to_string(), BACKEND.to_string(), "east_west".to_string())],
        "{}",
        mw.logs()
    );
    assert_eq!(m.sum("meshwatch_findings_total", &[]), 1.0, "{}", m.text);
    drop(frontend);
    assert!(mw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opentelemetry_access_logs_name_the_callee_by_its_certificate() {
    otel_logs_count_what_the_access_log_counts("sidecar-frontend-otel", |t| t.to_string()).await;
}

/// The same sidecar with the attribute keys of Istio's default access-log format
/// (`response_code`, `upstream_cluster`, `duration`, …) as users of the stock OpenTelemetry
/// logger write them, and the certificates under snake_case keys too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opentelemetry_access_logs_with_istio_style_keys_give_the_same_pairs() {
    otel_logs_count_what_the_access_log_counts("sidecar-frontend-otel-istio-keys", |template| {
        let mut t = template.to_string();
        for (dotted, snake) in [
            ("downstream.peer.uri_san", "downstream_peer_uri_san"),
            ("downstream.local.uri_san", "downstream_local_uri_san"),
            ("upstream.peer.uri_san", "upstream_peer_uri_san"),
            ("upstream.cluster", "upstream_cluster"),
            ("response.code", "response_code"),
            ("response.flags", "response_flags"),
            ("duration_ms", "duration"),
            ("bytes.received", "bytes_received"),
            ("bytes.sent", "bytes_sent"),
            ("downstream.remote_address", "downstream_remote_address"),
            ("upstream.host", "upstream_host"),
        ] {
            t = t.replace(&format!("key: {dotted},"), &format!("key: {snake},"));
        }
        assert!(!t.contains("key: response.code"), "the template's keys were renamed");
        t
    })
    .await;
}

/// A frontend sidecar logging with the OpenTelemetry logger (its config: `keys` applied to
/// `deploy/envoy/sidecar-frontend-otel.yaml`) and a backend logging with the gRPC access log:
/// both views of the same requests land on the same pair, with the same counts.
async fn otel_logs_count_what_the_access_log_counts(name: &str, keys: fn(&str) -> String) {
    let work = TempDir::new("e2e-otel");
    gen_certs(&work.path().join("certs"));
    let data = TempDir::new("e2e-otel-data");
    // No cluster mapping for the backend: only its certificate names it.
    let config = work.path().join("meshwatch.toml");
    std::fs::write(
        &config,
        "[mesh]\ntrust_domains = [\"mesh.test\"]\ninternal_cidrs = [\"127.0.0.1/32\"]\n\n[window]\nlength = \"1s\"\ngrace = \"3s\"\n",
    )
    .unwrap();
    let env = [("MESHWATCH_DATA_DIR", data.path().display().to_string())];
    let mw = Meshwatch::start(&config, &env);
    let backend_app = start_app("127.0.0.1", 100).await;
    let tcp_app = start_tcp_app(1, 1).await;
    let backend = Envoy::start(
        "sidecar-backend",
        &HashMap::from([
            ("backend_inbound_http", 0),
            ("backend_inbound_tcp", 0),
            ("backend_app", backend_app.port()),
            ("backend_tcp_app", tcp_app.port()),
            ("meshwatch", mw.grpc.port()),
        ]),
        work.path(),
    )
    .await;
    let template = std::fs::read_to_string(repo_root().join("deploy/envoy/sidecar-frontend-otel.yaml")).unwrap();
    let frontend = Envoy::start_config(
        name,
        &keys(&template),
        &HashMap::from([
            ("frontend_outbound_http", 0),
            ("backend_inbound_http", backend.listeners["inbound_http"]),
            ("meshwatch", mw.grpc.port()),
        ]),
        work.path(),
    )
    .await;
    let out = frontend.listener("outbound_http");
    for _ in 0..3 {
        assert_eq!(http_request(None, out, "POST", "/ok", "backend", &[b'p'; 200]).await.0, 200);
    }
    assert_eq!(http_request(None, out, "GET", "/fail", "backend", b"").await.0, 503);
    assert_eq!(http_request(None, out, "GET", "/missing", "backend", b"").await.0, 404);

    let client = pair(FRONTEND, BACKEND, "east_west", "source");
    let server = pair(FRONTEND, BACKEND, "east_west", "destination");
    let m = mw
        .metrics_until(Duration::from_secs(40), |m| {
            m.sum("meshwatch_pair_requests_total", &client) >= 5.0
                && m.sum("meshwatch_pair_requests_total", &server) >= 5.0
        })
        .await;
    let text = &m.text;
    // The OpenTelemetry view (client side) and the gRPC access log view (server side) of the
    // same five requests, on the same pair.
    assert_eq!(
        m.get("meshwatch_pair_requests_total", &with(client.clone(), "status_class", "2xx")),
        Some(3.0),
        "{text}\n{}",
        mw.logs()
    );
    assert_eq!(
        m.get("meshwatch_pair_requests_total", &with(client.clone(), "status_class", "4xx")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        m.get("meshwatch_pair_requests_total", &with(client.clone(), "status_class", "5xx")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(m.sum("meshwatch_pair_requests_total", &server), 5.0, "{text}");
    assert_eq!(m.get("meshwatch_pair_request_duration_seconds_count", &client), Some(5.0));
    let request_bytes = m.get("meshwatch_pair_request_bytes_total", &client).unwrap();
    assert_eq!(request_bytes, 600.0, "three bodies of 200 bytes (%BYTES_RECEIVED% counts bodies)");
    assert_eq!(m.sum("meshwatch_identities_unresolved_total", &[]), 0.0, "{text}");
    assert_eq!(m.sum("meshwatch_als_entries_rejected_total", &[]), 0.0, "{text}");
    // Nothing else appeared.
    let pairs: std::collections::BTreeSet<_> = m
        .matching("meshwatch_pair_first_seen_timestamp_seconds", &[])
        .map(|s| (s.labels["source"].clone(), s.labels["destination"].clone(), s.labels["reporter"].clone()))
        .collect();
    assert_eq!(pairs.len(), 2, "{pairs:?}");
    drop((frontend, backend));
    assert!(mw.stop().success());
}

/// A sidecar bootstrap whose `meshwatch` cluster speaks mutual TLS: the sidecar's own
/// certificate, and meshwatch's checked against the CA and its DNS name.
fn over_mtls(template: &str, service: &str) -> String {
    let cluster = "  - name: meshwatch\n    type: STATIC\n    connect_timeout: 1s\n";
    assert!(template.contains(cluster), "the template's meshwatch cluster");
    let tls = format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: meshwatch
        common_tls_context:
          alpn_protocols: [h2]
          tls_certificates:
          - certificate_chain: {{ filename: certs/{service}.crt }}
            private_key: {{ filename: certs/{service}.key }}
          validation_context:
            trusted_ca: {{ filename: certs/ca.crt }}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{ exact: meshwatch }}
"#
    );
    template.replacen(cluster, &format!("{cluster}{tls}"), 1)
}

/// A gRPC channel over TLS to meshwatch as `client` (a certificate in `certs`), or with no
/// client certificate; `Err` when the connection is refused.
async fn channel_over_tls(
    mw: &Meshwatch,
    certs: &std::path::Path,
    client: Option<&str>,
) -> Result<tonic::transport::Channel, tonic::Status> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let read = |f: &str| std::fs::read(certs.join(f)).unwrap();
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca.crt"))).domain_name("meshwatch");
    if let Some(name) = client {
        tls = tls.identity(Identity::from_pem(read(&format!("{name}.crt")), read(&format!("{name}.key"))));
    }
    let endpoint = Channel::from_shared(format!("https://{}", mw.grpc)).unwrap().tls_config(tls).unwrap();
    endpoint.connect().await.map_err(|e| tonic::Status::unavailable(e.to_string()))
}

/// A gRPC health check over TLS (see `channel_over_tls`).
async fn health_over_tls(mw: &Meshwatch, certs: &std::path::Path, client: Option<&str>) -> Result<(), tonic::Status> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    // Refused in the handshake: the connection (or its first call) fails.
    let channel = channel_over_tls(mw, certs, client).await?;
    HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.map(|_| ())
}

/// One client stream of `message` over TLS as `client` to the gRPC method at `path`.
async fn stream_over_tls(
    mw: &Meshwatch,
    certs: &std::path::Path,
    client: &str,
    path: &'static str,
    message: Vec<u8>,
) -> Result<(), tonic::Status> {
    let channel = channel_over_tls(mw, certs, Some(client)).await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let messages = tokio_stream::iter(vec![bytes::Bytes::from(message)]);
    grpc.client_streaming(tonic::Request::new(messages), path, meshwatch_collector::als::BytesCodec).await.map(|_| ())
}

/// A node with no identity but its cluster, `cluster`.
fn node_named(cluster: &str) -> Option<envoy_types::pb::envoy::config::core::v3::Node> {
    Some(envoy_types::pb::envoy::config::core::v3::Node {
        id: "forger-1".into(),
        cluster: cluster.into(),
        ..Default::default()
    })
}

/// One access-log stream over TLS as `client`, from a node whose cluster (its identity, as
/// it has no other) is `node_cluster`, with one HTTP entry.
async fn access_log_over_tls(
    mw: &Meshwatch,
    certs: &std::path::Path,
    client: &str,
    node_cluster: &str,
) -> Result<(), tonic::Status> {
    use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogCommon, HttpAccessLogEntry};
    use envoy_types::pb::envoy::service::accesslog::v3::{StreamAccessLogsMessage, stream_access_logs_message as sm};
    use prost::Message;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let entry = HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            start_time: Some(envoy_types::pb::google::protobuf::Timestamp { seconds: now.as_secs() as i64, nanos: 0 }),
            upstream_cluster: "backend".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let message = StreamAccessLogsMessage {
        identifier: Some(sm::Identifier { node: node_named(node_cluster), log_name: "outbound_http".into() }),
        log_entries: Some(sm::LogEntries::HttpLogs(sm::HttpAccessLogEntries { log_entry: vec![entry] })),
    };
    let path = meshwatch_collector::als::STREAM_ACCESS_LOGS_PATH;
    stream_over_tls(mw, certs, client, path, message.encode_to_vec()).await
}

/// One OTLP logs export over TLS as `client`, from a node that names itself `identity`, with
/// one record.
async fn otlp_over_tls(
    mw: &Meshwatch,
    certs: &std::path::Path,
    client: &str,
    identity: &str,
) -> Result<(), tonic::Status> {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use prost::Message;
    let kv = |k: &str, v: &str| KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(v.into())) }),
        ..Default::default()
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let record = LogRecord {
        time_unix_nano: now,
        attributes: vec![kv("upstream.cluster", "backend"), kv("http.response.status_code", "200")],
        ..Default::default()
    };
    let request = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![kv("node_name", "forger-1"), kv("meshwatch.identity", identity)],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs { log_records: vec![record], ..Default::default() }],
            ..Default::default()
        }],
    };
    let channel = channel_over_tls(mw, certs, Some(client)).await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(meshwatch_collector::otlp::EXPORT_LOGS_PATH);
    let body = bytes::Bytes::from(request.encode_to_vec());
    grpc.unary(tonic::Request::new(body), path, meshwatch_collector::als::BytesCodec).await.map(|_| ())
}

/// One stats-sink stream over TLS as `client`, from a node named `node_cluster`, without
/// metrics.
async fn stats_over_tls(
    mw: &Meshwatch,
    certs: &std::path::Path,
    client: &str,
    node_cluster: &str,
) -> Result<(), tonic::Status> {
    use envoy_types::pb::envoy::service::metrics::v3::{StreamMetricsMessage, stream_metrics_message};
    use prost::Message;
    let identifier = stream_metrics_message::Identifier { node: node_named(node_cluster) };
    let message = StreamMetricsMessage { identifier: Some(identifier), envoy_metrics: Vec::new() };
    let path = meshwatch_collector::envoy_stats::STREAM_METRICS_PATH;
    stream_over_tls(mw, certs, client, path, message.encode_to_vec()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_over_mutual_tls_are_counted_and_clients_without_an_allowed_certificate_are_refused() {
    let work = TempDir::new("e2e-mtls");
    let certs = work.path().join("certs");
    gen_certs(&certs);
    let data = TempDir::new("e2e-mtls-data");
    let file = |f: &str| certs.join(f).display().to_string();
    let allowed = format!(r#"["{FRONTEND}", "{BACKEND}"]"#);
    let env = [
        ("MESHWATCH_DATA_DIR", data.path().display().to_string()),
        ("MESHWATCH_WINDOW__LENGTH", "1s".to_string()),
        ("MESHWATCH_WINDOW__GRACE", "2s".to_string()),
        ("MESHWATCH_LISTEN__TLS__CERT", file("meshwatch.crt")),
        ("MESHWATCH_LISTEN__TLS__KEY", file("meshwatch.key")),
        ("MESHWATCH_LISTEN__TLS__CLIENT_CA", file("ca.crt")),
        ("MESHWATCH_LISTEN__TLS__ALLOWED_IDENTITIES", allowed),
        ("MESHWATCH_LISTEN__TLS__BIND_NODE_IDENTITY", "true".to_string()),
    ];
    let mw = Meshwatch::start(&repo_root().join("deploy/meshwatch-example.toml"), &env);
    assert!(mw.logs().contains("grpc_tls=\"mutual, allowed identities, node identity bound\""), "{}", mw.logs());

    // Both sidecars stream their access logs over mutual TLS, each with its own certificate.
    let backend_app = start_app("127.0.0.1", 100).await;
    let tcp_app = start_tcp_app(1, 1).await;
    let apps = [backend_app.port(), tcp_app.port(), closed_port(), closed_port()];
    let (backend, frontend) = sidecars_named(work.path(), mw.grpc.port(), apps, over_mtls).await;
    let out = frontend.listener("outbound_http");
    for _ in 0..3 {
        assert_eq!(http_request(None, out, "GET", "/ok", "backend", b"").await.0, 200);
    }
    let client = pair(FRONTEND, BACKEND, "east_west", "source");
    let server = pair(FRONTEND, BACKEND, "east_west", "destination");
    let m = mw
        .metrics_until(Duration::from_secs(30), |m| {
            m.sum("meshwatch_pair_requests_total", &client) >= 3.0
                && m.sum("meshwatch_pair_requests_total", &server) >= 3.0
        })
        .await;
    assert_eq!(
        m.sum("meshwatch_pair_requests_total", &client),
        3.0,
        "{}\n{}",
        m.text,
        frontend.log("sidecar-frontend")
    );
    assert_eq!(m.sum("meshwatch_pair_requests_total", &server), 3.0, "{}\n{}", m.text, backend.log("sidecar-backend"));
    assert_eq!(m.get("meshwatch_grpc_calls_refused_total", &[]), Some(0.0));

    // Without a client certificate: no call gets through.
    let anonymous = health_over_tls(&mw, &certs, None).await;
    assert!(anonymous.is_err(), "a client without a certificate was answered");
    // Plaintext to the TLS listener: nothing either.
    let plain = tonic::transport::Channel::from_shared(format!("http://{}", mw.grpc)).unwrap().connect().await;
    if let Ok(channel) = plain {
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let answer = tonic_health::pb::health_client::HealthClient::new(channel).check(request).await;
        assert!(answer.is_err(), "a plaintext client was answered");
    }
    // A certificate from the same CA naming an identity not on the list: refused, counted.
    let intruder = health_over_tls(&mw, &certs, Some("intruder")).await.expect_err("the intruder was answered");
    assert_eq!(intruder.code(), tonic::Code::PermissionDenied, "{intruder:?}");
    assert!(intruder.message().contains("spiffe://mesh.test/ns/shop/sa/intruder"), "{intruder:?}");
    // OTLP over HTTP would go around the client certificates: refused.
    let (status, body) = http_send(mw.http, "POST", "/v1/logs", None, "").await;
    assert_eq!(status, 403, "{body}");
    // An allowed identity is answered.
    health_over_tls(&mw, &certs, Some("frontend")).await.expect("the frontend's certificate is allowed");
    // The frontend's certificate with a node that reports as the backend: the stream is
    // refused, and its entry is not counted.
    let forged = access_log_over_tls(&mw, &certs, "frontend", BACKEND).await.expect_err("a forged node was taken");
    assert_eq!(forged.code(), tonic::Code::PermissionDenied, "{forged:?}");
    // As itself, the same client's entry is taken.
    access_log_over_tls(&mw, &certs, "frontend", FRONTEND).await.expect("the frontend as itself");
    // The same for the stats sink.
    let forged = stats_over_tls(&mw, &certs, "frontend", BACKEND).await.expect_err("a forged stats node was taken");
    assert_eq!(forged.code(), tonic::Code::PermissionDenied, "{forged:?}");
    stats_over_tls(&mw, &certs, "frontend", FRONTEND).await.expect("the frontend's stats as itself");
    // And for OTLP over gRPC.
    let forged = otlp_over_tls(&mw, &certs, "frontend", BACKEND).await.expect_err("a forged OTLP node was taken");
    assert_eq!(forged.code(), tonic::Code::PermissionDenied, "{forged:?}");
    otlp_over_tls(&mw, &certs, "frontend", FRONTEND).await.expect("the frontend's OTLP records as itself");
    let m = mw.metrics_until(Duration::from_secs(10), |m| m.sum("meshwatch_pair_requests_total", &[]) >= 8.0).await;
    assert_eq!(m.get("meshwatch_grpc_calls_refused_total", &[]), Some(1.0), "{}", m.text);
    let unproven = [("reason", "unproven_identity")];
    assert_eq!(m.get("meshwatch_envoy_stats_messages_rejected_total", &unproven), Some(1.0), "{}", m.text);
    assert_eq!(m.sum("meshwatch_pair_requests_total", &[]), 8.0, "the sidecars' entries and the frontend's own two");
    assert_eq!(m.get("meshwatch_als_messages_rejected_total", &unproven), Some(2.0), "access log and OTLP");
    drop((frontend, backend));
    assert!(mw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_over_tls_answers_https_only_and_a_stalled_handshake_blocks_nobody() {
    let work = TempDir::new("e2e-https");
    let certs = work.path().join("certs");
    gen_certs(&certs);
    let data = TempDir::new("e2e-https-data");
    let file = |f: &str| certs.join(f).display().to_string();
    let env = [
        ("MESHWATCH_DATA_DIR", data.path().display().to_string()),
        ("MESHWATCH_LISTEN__TLS__CERT", file("meshwatch.crt")),
        ("MESHWATCH_LISTEN__TLS__KEY", file("meshwatch.key")),
        ("MESHWATCH_LISTEN__TLS__HTTP", "true".to_string()),
        ("MESHWATCH_LISTEN__READ_TOKEN", "s3cret".to_string()),
    ];
    let mw = Meshwatch::start(&repo_root().join("deploy/meshwatch-example.toml"), &env);
    assert!(mw.logs().contains("grpc_tls=\"on, HTTP too\""), "{}", mw.logs());
    // A client that opens a connection and never says hello.
    let stalled = tokio::net::TcpStream::connect(mw.http).await.unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.join("ca.crt")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve("meshwatch", mw.http)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = |path: &str| format!("https://meshwatch:{}{path}", mw.http.port());
    let get = |path: &str, token: Option<&str>| {
        let mut request = client.get(url(path));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request.send()
    };
    assert_eq!(get("/healthz", None).await.expect("https while a handshake stalls").status(), 200);
    assert_eq!(get("/api/v1/pairs", None).await.unwrap().status(), 401);
    assert_eq!(get("/api/v1/pairs", Some("s3cret")).await.unwrap().status(), 200);
    assert_eq!(get("/metrics", Some("s3cret")).await.unwrap().status(), 200);
    // Plain HTTP to the TLS listener gets no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(mw.http).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: meshwatch\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP was answered: {}", String::from_utf8_lossy(&answer));
    drop(stalled);
    assert!(mw.stop().success());
}
