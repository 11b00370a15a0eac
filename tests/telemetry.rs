//! meshwatch's own traces, end to end: the real binary with `[telemetry] otlp_endpoint` set
//! exports its spans over OTLP/gRPC to a local trace receiver while a simulated mesh with an
//! incident plays into it and the alert goes to a webhook. The receiver must get the spans of
//! access-log batches, closed windows, scored windows and the notification's delivery, under
//! the configured service name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};

/// One span as received: its name, attributes, and its resource's `service.name`.
#[derive(Clone, Debug)]
struct Received {
    name: String,
    service: String,
    attributes: BTreeMap<String, String>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                let attributes = span.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect();
                spans.push(Received { name: span.name.clone(), service: service.clone(), attributes });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

const SCENARIO: &str = r#"
name = "traced"
start = "2026-01-05"
duration = "30m"
namespace = "shop"
seed = 5
services = [{ name = "frontend" }, { name = "cart" }, { name = "reports" }]
[[edges]]
from = "internet"
to = "frontend"
rate = 5
[[edges]]
from = "frontend"
to = "cart"
rate = 3
[[incidents]]
kind = "new_edge"
from = "frontend"
to = "reports"
start = "20m"
duration = "10m"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_ingest_windows_scoring_and_delivery_reach_an_otlp_receiver() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);

    let dir = TempDir::new("telemetry");
    let hook = Recorder::start(Answer::Status(200, None)).await;
    let settings = format!(
        r#"[zero_trust]
learning = "10m"

[alerting]
for = "0s"

[[alerting.receivers]]
name = "hook"
type = "webhook"
url = "{}/hook"
secret = "s3cret"

[telemetry]
otlp_endpoint = "http://{addr}"
service_name = "meshwatch-under-test"
"#,
        hook.url()
    );
    let (scenario, config) = replay_files(dir.path(), SCENARIO, &settings);
    let env = [
        ("MESHWATCH_DATA_DIR", dir.path().join("data").display().to_string()),
        // The SDK's batch exporter: export every 100 ms rather than every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let mw = Meshwatch::start(&config, &env);
    simulate_into(&mw, &scenario, &["--rate", "max", "--clock", "simulated"]);
    let taken = hook.until(Duration::from_secs(20), |t| !t.is_empty()).await;
    assert!(!taken.is_empty(), "no notification was delivered:\n{}", mw.logs());
    // Stopping exports what is still buffered.
    assert!(mw.stop().success());

    let spans = receiver.0.lock().unwrap().clone();
    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for name in ["als.message", "window.close", "detector.window", "notify.deliver"] {
        assert!(names.contains(name), "no {name} span among {names:?}");
    }
    assert!(spans.iter().all(|s| s.service == "meshwatch-under-test"), "{:?}", spans.first());
    let delivered = spans.iter().find(|s| s.name == "notify.deliver").unwrap();
    assert_eq!(delivered.attributes.get("receiver").map(String::as_str), Some("hook"), "{delivered:?}");
    assert_eq!(delivered.attributes.get("outcome").map(String::as_str), Some("delivered"), "{delivered:?}");
    let message = spans.iter().find(|s| s.name == "als.message" && s.attributes["records"] != "0").unwrap();
    assert!(message.attributes["records"].parse::<u64>().unwrap() > 0, "{message:?}");
    // Every closed window was traced once, with its pairs.
    let closed = spans.iter().filter(|s| s.name == "window.close").count();
    let scored = spans.iter().filter(|s| s.name == "detector.window").count();
    assert_eq!(closed, scored);
    assert!(closed >= 150, "30 minutes of 10 s windows: {closed}");
}
