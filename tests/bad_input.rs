//! Bad input over real gRPC into the real binary: each case gets a counted rejection (or lands
//! in `unknown` or the overflow pair), nothing panics, and the process keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::data::accesslog::v3 as al;
use envoy_types::pb::envoy::service::accesslog::v3::{StreamAccessLogsMessage, stream_access_logs_message as sm};
use envoy_types::pb::google::protobuf::{Timestamp, UInt32Value};
use meshwatch_collector::als::{BytesCodec, STREAM_ACCESS_LOGS_PATH};
use prost::Message;

fn start(extra: &[(&str, &str)]) -> (Meshwatch, TempDir) {
    let data = TempDir::new("bad-input");
    let mut env = vec![
        ("MESHWATCH_DATA_DIR", data.path().display().to_string()),
        ("MESHWATCH_WINDOW__LENGTH", "1s".to_string()),
        ("MESHWATCH_WINDOW__GRACE", "1s".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    (Meshwatch::start(&repo_root().join("deploy/meshwatch-example.toml"), &env), data)
}

/// Sends one client stream of raw messages; `Err` when the server ended it with an error.
async fn send(mw: &Meshwatch, messages: Vec<Bytes>) -> Result<(), tonic::Status> {
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", mw.grpc)).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(STREAM_ACCESS_LOGS_PATH);
    grpc.client_streaming(tonic::Request::new(tokio_stream::iter(messages)), path, BytesCodec).await.map(|_| ())
}

fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn identifier(log_name: &str) -> Option<sm::Identifier> {
    Some(sm::Identifier {
        node: Some(core::Node { id: "web-1".into(), cluster: "web".into(), ..Default::default() }),
        log_name: log_name.into(),
    })
}

fn socket(ip: &str) -> Option<core::Address> {
    Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(443)),
            ..Default::default()
        })),
    })
}

fn entry(start_s: Option<i64>, cluster: &str, code: Option<u32>) -> al::HttpAccessLogEntry {
    al::HttpAccessLogEntry {
        common_properties: Some(al::AccessLogCommon {
            start_time: start_s.map(|seconds| Timestamp { seconds, nanos: 0 }),
            upstream_cluster: cluster.into(),
            upstream_remote_address: socket("127.0.0.1"),
            downstream_remote_address: socket("127.0.0.1"),
            ..Default::default()
        }),
        response: Some(al::HttpResponseProperties {
            response_code: code.map(|value| UInt32Value { value }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn message(id: Option<sm::Identifier>, entries: Vec<al::HttpAccessLogEntry>) -> Bytes {
    StreamAccessLogsMessage {
        identifier: id,
        log_entries: Some(sm::LogEntries::HttpLogs(sm::HttpAccessLogEntries { log_entry: entries })),
    }
    .encode_to_vec()
    .into()
}

/// A message built from already-encoded entries, for entries prost would not encode.
fn raw_message(id: Option<sm::Identifier>, entries: &[Vec<u8>]) -> Bytes {
    let mut list = Vec::new();
    for e in entries {
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut list);
        prost::encoding::encode_varint(e.len() as u64, &mut list);
        list.extend_from_slice(e);
    }
    let mut out = StreamAccessLogsMessage { identifier: id, log_entries: None }.encode_to_vec();
    prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(list.len() as u64, &mut out);
    out.extend_from_slice(&list);
    out.into()
}

const DECODED: &str = "meshwatch_als_entries_decoded_total";
const REJECTED: &str = "meshwatch_als_entries_rejected_total";

#[tokio::test]
async fn the_grpc_health_service_reports_the_access_log_service_serving() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let (mw, _data) = start(&[]);
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", mw.grpc)).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    let service = "envoy.service.accesslog.v3.AccessLogService".to_string();
    let status = health.check(HealthCheckRequest { service }).await.unwrap().into_inner().status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let unknown = health.check(HealthCheckRequest { service: "nope".into() }).await.expect_err("unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    drop(health);
    assert!(mw.stop().success());
}

#[tokio::test]
async fn malformed_messages_are_counted_and_the_stream_goes_on() {
    let (mw, _data) = start(&[]);
    let good = message(identifier("outbound"), vec![entry(Some(now_s()), "backend", Some(200))]);
    let garbage = Bytes::from_static(&[0x12, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x00]);
    send(&mw, vec![garbage, good.clone()]).await.unwrap();
    // An entry that is not protobuf inside a valid batch costs only itself.
    let bad_entry = vec![0x0a, 0x03, 0xff, 0xff, 0xff];
    let good_entry = entry(Some(now_s()), "backend", Some(200)).encode_to_vec();
    let batch = raw_message(identifier("outbound"), &[bad_entry, good_entry]);
    send(&mw, vec![batch]).await.unwrap();
    let m = mw.metrics().await;
    assert_eq!(m.get("meshwatch_als_messages_rejected_total", &[("reason", "malformed")]), Some(1.0), "{}", m.text);
    assert_eq!(m.get(REJECTED, &[("reason", "malformed")]), Some(1.0), "{}", m.text);
    assert_eq!(m.sum(DECODED, &[]), 2.0);
    assert_eq!(m.get("meshwatch_als_streams_opened_total", &[]), Some(2.0));
    assert!(mw.stop().success());
}

#[tokio::test]
async fn a_stream_without_identifier_is_rejected_until_one_arrives() {
    let (mw, _data) = start(&[]);
    let e = || entry(Some(now_s()), "backend", Some(200));
    send(
        &mw,
        vec![message(None, vec![e(), e(), e()]), message(identifier("outbound"), vec![e()]), message(None, vec![e()])],
    )
    .await
    .unwrap();
    let m = mw.metrics().await;
    assert_eq!(m.get(REJECTED, &[("reason", "no_identifier")]), Some(3.0), "{}", m.text);
    assert_eq!(m.sum(DECODED, &[]), 2.0, "the identifier holds for the rest of the stream");
    assert!(mw.stop().success());
}

#[tokio::test]
async fn missing_fields_and_impossible_times() {
    let (mw, _data) = start(&[]);
    let now = now_s();
    let mut no_addresses = entry(Some(now), "", Some(200));
    let common = no_addresses.common_properties.as_mut().unwrap();
    common.upstream_remote_address = None;
    common.downstream_remote_address = None;
    let entries = vec![
        entry(None, "orders", Some(200)),
        entry(Some(now), "orders", None),
        no_addresses,
        entry(Some(now - 3 * 365 * 86_400), "orders", Some(200)),
        entry(Some(now + 5 * 365 * 86_400), "orders", Some(200)),
        al::HttpAccessLogEntry::default(),
    ];
    send(&mw, vec![message(identifier("outbound"), entries)]).await.unwrap();
    let m = mw.metrics_until(Duration::from_secs(10), |m| m.sum("meshwatch_pair_requests_total", &[]) >= 2.0).await;
    assert_eq!(m.get(REJECTED, &[("reason", "missing_time")]), Some(2.0), "{}", m.text);
    assert_eq!(m.get(REJECTED, &[("reason", "late")]), Some(1.0));
    assert_eq!(m.get(REJECTED, &[("reason", "future")]), Some(1.0));
    assert_eq!(m.get("meshwatch_identities_unresolved_total", &[("side", "destination")]), Some(1.0));
    let web_orders = [("source", "web"), ("destination", "orders"), ("status_class", "none")];
    assert_eq!(m.get("meshwatch_pair_requests_total", &web_orders), Some(1.0), "{}", m.text);
    let web_unknown = [("source", "web"), ("destination", "unknown"), ("status_class", "2xx")];
    assert_eq!(m.get("meshwatch_pair_requests_total", &web_unknown), Some(1.0), "{}", m.text);
    assert!(mw.stop().success());
}

#[tokio::test]
async fn hostile_header_values_are_cut_or_replaced_never_fatal() {
    let (mw, _data) = start(&[]);
    let now = now_s();
    // Egress entries are named by their authority: one of a megabyte, one not UTF-8.
    let egress = |authority: String| {
        let mut e = entry(Some(now), "ext", Some(200));
        e.common_properties.as_mut().unwrap().upstream_remote_address = socket("203.0.113.7");
        e.request = Some(al::HttpRequestProperties {
            authority,
            request_headers: [("x-big".to_string(), "b".repeat(1 << 20))].into(),
            ..Default::default()
        });
        e
    };
    let raw = message(identifier("outbound"), vec![egress("a".repeat(1 << 20))]).to_vec();
    // The same entry again with a non-UTF-8 authority, spliced in by hand (prost will not
    // encode one): authority is field 3 of the request, inside field 3 of the entry.
    let mut odd = egress("\u{1}\u{1}".into()).encode_to_vec();
    let at = odd.windows(2).position(|w| w == [1, 1]).unwrap();
    odd[at] = 0xc3;
    odd[at + 1] = 0x28;
    send(&mw, vec![raw.into(), raw_message(None, &[odd])]).await.unwrap();
    let m = mw.metrics_until(Duration::from_secs(10), |m| m.sum("meshwatch_pair_requests_total", &[]) >= 2.0).await;
    assert_eq!(m.sum(DECODED, &[]), 2.0, "{}", &m.text[..m.text.len().min(4000)]);
    let destinations: Vec<_> = m
        .matching("meshwatch_pair_requests_total", &[("direction", "egress")])
        .map(|s| s.labels["destination"].clone())
        .collect();
    assert_eq!(destinations.len(), 2, "{destinations:?}");
    assert!(destinations.iter().any(|d| d == &"a".repeat(256)), "a megabyte identity is cut to 256 bytes");
    assert!(destinations.iter().any(|d| d == "\u{FFFD}("), "{destinations:?}");
    assert!(mw.stop().success());
}

#[tokio::test]
async fn oversized_messages_end_their_stream_only() {
    let (mw, _data) = start(&[("MESHWATCH_INGEST__MAX_MESSAGE_BYTES", "65536")]);
    let mut big = entry(Some(now_s()), "backend", Some(200));
    big.request = Some(al::HttpRequestProperties {
        request_headers: [("x-big".to_string(), "b".repeat(100_000))].into(),
        ..Default::default()
    });
    let status = send(&mw, vec![message(identifier("outbound"), vec![big])]).await.expect_err("too large");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    send(&mw, vec![message(identifier("outbound"), vec![entry(Some(now_s()), "backend", Some(200))])]).await.unwrap();
    let m = mw.metrics().await;
    assert_eq!(m.get("meshwatch_als_messages_rejected_total", &[("reason", "too_large")]), Some(1.0), "{}", m.text);
    assert_eq!(m.sum(DECODED, &[]), 1.0);
    assert!(mw.stop().success());
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_flood_of_identities_stays_within_the_pair_cap() {
    // A long grace, so that no entry of the flood arrives after its window closed.
    let (mw, _data) = start(&[("MESHWATCH_LIMITS__MAX_PAIRS", "1000"), ("MESHWATCH_WINDOW__GRACE", "10s")]);
    let now = now_s();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // 100,000 server-side entries, each from a caller with a random SPIFFE ID.
    let messages: Vec<Bytes> = (0..100)
        .map(|i| {
            let entries = (0..1000)
                .map(|_| {
                    let mut e = entry(Some(now), "inbound|8080||", Some(200));
                    e.common_properties.as_mut().unwrap().tls_properties = Some(al::TlsProperties {
                        peer_certificate_properties: Some(al::tls_properties::CertificateProperties {
                            subject_alt_name: vec![al::tls_properties::certificate_properties::SubjectAltName {
                                san: Some(al::tls_properties::certificate_properties::subject_alt_name::San::Uri(
                                    format!("spiffe://mesh.test/ns/flood/sa/{:016x}", next()),
                                )),
                            }],
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                    e
                })
                .collect();
            message(if i == 0 { identifier("inbound") } else { None }, entries)
        })
        .collect();
    send(&mw, messages).await.unwrap();
    let m =
        mw.metrics_until(Duration::from_secs(20), |m| m.sum("meshwatch_pair_requests_total", &[]) >= 100_000.0).await;
    assert_eq!(m.sum(REJECTED, &[]), 0.0, "{}", &m.text[..4000]);
    assert_eq!(m.sum("meshwatch_pair_requests_total", &[]), 100_000.0, "nothing lost");
    assert_eq!(m.get("meshwatch_pairs_tracked", &[]), Some(1000.0));
    assert_eq!(m.get("meshwatch_pairs_overflow_entries_total", &[]), Some(99_000.0));
    let overflow = [("source", "__overflow__"), ("destination", "__overflow__"), ("status_class", "2xx")];
    assert_eq!(m.get("meshwatch_pair_requests_total", &overflow), Some(99_000.0));
    assert_eq!(m.matching("meshwatch_pair_first_seen_timestamp_seconds", &[]).count(), 1001);
    let rss_mib = rss_kib(mw.pid()) / 1024;
    assert!(rss_mib < 256, "resident memory {rss_mib} MiB after the flood");
    assert!(mw.stop().success());
}

/// One OTLP logs Export call with a raw body.
async fn export_logs(mw: &Meshwatch, body: Bytes) -> Result<Bytes, tonic::Status> {
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", mw.grpc)).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(meshwatch_collector::otlp::EXPORT_LOGS_PATH);
    grpc.unary(tonic::Request::new(body), path, BytesCodec).await.map(|r| r.into_inner())
}

/// An ExportLogsServiceRequest with two records, one with a time (now), a response code and
/// an upstream cluster, and one with nothing; hand-encoded, so that the tests do not lean on
/// meshwatch's own mirrors.
fn two_log_records() -> Bytes {
    // KeyValue { key: 1, value: 2 = AnyValue { string_value: 1 } }, as attribute (field 6).
    let attribute = |key: &str, value: &str| {
        let any = [vec![0x0a, value.len() as u8], value.as_bytes().to_vec()].concat();
        let kv = [vec![0x0a, key.len() as u8], key.as_bytes().to_vec(), vec![0x12, any.len() as u8], any].concat();
        [vec![0x32, kv.len() as u8], kv].concat()
    };
    let now_ns = (now_s() as u64) * 1_000_000_000;
    let mut timed = vec![0x09];
    timed.extend_from_slice(&now_ns.to_le_bytes());
    timed.extend(attribute("response.code", "200"));
    timed.extend(attribute("upstream.cluster", "backend"));
    let log_records = [vec![0x12, timed.len() as u8], timed, vec![0x12, 0x00]].concat();
    let scope_logs = [vec![0x12, log_records.len() as u8], log_records].concat();
    Bytes::from([vec![0x0a, scope_logs.len() as u8], scope_logs].concat())
}

/// POST to meshwatch's HTTP port with a content type; (status, body bytes).
async fn post_raw(mw: &Meshwatch, path: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(mw.http).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: meshwatch\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let at = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(out.len(), |p| p + 4);
    (status, out[at..].to_vec())
}

#[tokio::test]
async fn otlp_logs_over_http_protobuf() {
    let (mw, _data) = start(&[]);
    let (status, reply) = post_raw(&mw, "/v1/logs", "application/x-protobuf", &two_log_records()).await;
    assert_eq!(status, 200);
    assert!(reply.starts_with(&[0x0a]) && reply[2..4] == [0x08, 0x01], "partial success: {reply:?}");
    assert_eq!(post_raw(&mw, "/v1/logs", "application/json", b"{}").await.0, 415);
    assert_eq!(post_raw(&mw, "/v1/logs", "application/x-protobuf", &[0x0a, 0xff, 0xff]).await.0, 400);
    let m = mw.metrics_until(Duration::from_secs(10), |m| m.sum(DECODED, &[]) >= 1.0).await;
    assert_eq!(m.sum(DECODED, &[]), 1.0, "{}", m.text);
    assert_eq!(m.get(REJECTED, &[("reason", "missing_time")]), Some(1.0));
    assert!(mw.stop().success());
}

#[tokio::test]
async fn otlp_logs_bad_bodies_and_records_without_time_are_refused_alone() {
    let (mw, _data) = start(&[]);
    let garbage = Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    let refused = export_logs(&mw, garbage).await.expect_err("not OTLP");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let reply = export_logs(&mw, two_log_records()).await.expect("a batch is not refused for one record");
    // partial_success { rejected_log_records: 1, error_message: … }
    assert!(reply.starts_with(&[0x0a]) && reply[2..4] == [0x08, 0x01], "{reply:?}");
    assert!(String::from_utf8_lossy(&reply).contains("log records rejected: missing_time 1"), "{reply:?}");
    let m = mw.metrics_until(Duration::from_secs(10), |m| m.sum(DECODED, &[]) >= 1.0).await;
    assert_eq!(m.get(REJECTED, &[("reason", "missing_time")]), Some(1.0), "{}", m.text);
    assert_eq!(m.get("meshwatch_als_messages_rejected_total", &[("reason", "malformed")]), Some(1.0));
    assert_eq!(m.sum(DECODED, &[]), 1.0, "the record with a time is kept: {}", m.text);
    assert!(mw.stop().success());
}

/// Envoy stats sink messages: `StreamMetricsMessage`s of metric families.
mod stats {
    use super::*;
    use envoy_types::pb::envoy::service::metrics::v3::{StreamMetricsMessage, stream_metrics_message};
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use envoy_types::pb::io::prometheus::client::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
    use meshwatch_collector::envoy_stats::STREAM_METRICS_PATH;

    const REJECTED: &str = "meshwatch_envoy_stats_rejected_total";

    pub async fn send(mw: &Meshwatch, messages: Vec<Bytes>) -> Result<(), tonic::Status> {
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{}", mw.grpc)).unwrap().connect().await.unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(STREAM_METRICS_PATH);
        grpc.client_streaming(tonic::Request::new(tokio_stream::iter(messages)), path, BytesCodec).await.map(|_| ())
    }

    fn node(id: &str, counters: &str) -> Option<stream_metrics_message::Identifier> {
        let mode = Value { kind: Some(Kind::StringValue(counters.into())) };
        let metadata = Struct { fields: [("meshwatch_counters".to_string(), mode)].into_iter().collect() };
        Some(stream_metrics_message::Identifier {
            node: Some(core::Node {
                id: id.into(),
                cluster: "web".into(),
                metadata: Some(metadata),
                ..Default::default()
            }),
        })
    }

    fn family(name: &str, kind: i32, value: f64, labels: &[(&str, &str)]) -> MetricFamily {
        let label =
            labels.iter().map(|(n, v)| LabelPair { name: Some((*n).into()), value: Some((*v).into()) }).collect();
        let mut metric = Metric { label, timestamp_ms: Some(now_s() * 1000), ..Default::default() };
        if kind == MetricType::Gauge as i32 {
            metric.gauge = Some(Gauge { value: Some(value) });
        } else {
            metric.counter = Some(Counter { value: Some(value), ..Default::default() });
        }
        MetricFamily { name: Some(name.into()), r#type: Some(kind), metric: vec![metric], ..Default::default() }
    }

    fn counter(name: &str, value: f64) -> MetricFamily {
        family(name, MetricType::Counter as i32, value, &[])
    }

    fn message(id: Option<stream_metrics_message::Identifier>, families: Vec<MetricFamily>) -> Bytes {
        StreamMetricsMessage { identifier: id, envoy_metrics: families }.encode_to_vec().into()
    }

    #[tokio::test]
    async fn bad_samples_are_counted_and_the_good_ones_kept() {
        let (mw, _data) = start(&[]);
        let good = |v| counter("cluster.payments.upstream_rq_total", v);
        let huge = format!("cluster.{}.upstream_rq_total", "x".repeat(1 << 20));
        let messages = vec![
            // Before the identifier: the node is unknown.
            message(None, vec![good(1.0)]),
            Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            message(
                node("web-1", "delta"),
                vec![
                    family("cluster.payments.upstream_rq_total", 42, 1.0, &[]),
                    counter("cluster.payments.upstream_rq_retry", f64::NAN),
                    counter("cluster.payments.upstream_rq_timeout", -3.0),
                    counter("cluster.payments.upstream_rq_5xx", f64::INFINITY),
                    family("cluster.payments.upstream_cx_total", MetricType::Gauge as i32, 1.0, &[]),
                    counter("cluster.upstream_rq_total", 1.0),
                    counter("cluster..upstream_rq_total", 1.0),
                    counter(&huge, 1.0),
                    family("server.uptime", MetricType::Gauge as i32, 1.0, &[]),
                    family("cluster.payments.upstream_rq_time", MetricType::Histogram as i32, 1.0, &[]),
                    good(5.0),
                ],
            ),
            message(None, vec![good(7.0)]),
        ];
        send(&mw, messages).await.expect("bad samples never end the stream");
        let requests = [("source", "web"), ("destination", "payments")];
        let m = mw
            .metrics_until(Duration::from_secs(10), |m| {
                m.get("meshwatch_pair_upstream_requests_total", &requests) == Some(12.0)
            })
            .await;
        assert_eq!(m.get("meshwatch_pair_upstream_requests_total", &requests), Some(12.0), "{}", m.text);
        for (reason, n) in
            [("no_identifier", 1.0), ("unknown_type", 1.0), ("bad_value", 3.0), ("wrong_type", 1.0), ("bad_name", 3.0)]
        {
            assert_eq!(m.get(REJECTED, &[("reason", reason)]), Some(n), "{reason}");
        }
        assert_eq!(m.get("meshwatch_envoy_stats_messages_rejected_total", &[("reason", "malformed")]), Some(1.0));
        assert_eq!(m.get("meshwatch_envoy_stats_samples_ignored_total", &[]), Some(2.0));
        assert_eq!(m.get("meshwatch_envoy_stats_samples_used_total", &[]), Some(2.0));
        assert!(mw.stop().success());
    }

    #[tokio::test]
    async fn a_flood_of_clusters_stays_within_the_caps() {
        let (mw, _data) = start(&[
            ("MESHWATCH_LIMITS__MAX_PAIRS", "500"),
            ("MESHWATCH_INGEST__STATS_MAX_TRACKED", "5000"),
            ("MESHWATCH_WINDOW__GRACE", "10s"),
        ]);
        // 100,000 distinct clusters from one node, cumulative, twice over (in messages of
        // 25,000, under the message size limit).
        let part = |id, p: usize| {
            let families = (p * 25_000..(p + 1) * 25_000)
                .map(|i| counter(&format!("cluster.c{i:06}.upstream_rq_total"), 3.0))
                .collect();
            message(id, families)
        };
        let mut messages = vec![part(node("web-1", "cumulative"), 0)];
        messages.extend((1..8).map(|p| part(None, p % 4)));
        send(&mw, messages).await.unwrap();
        let m = mw
            .metrics_until(Duration::from_secs(20), |m| {
                m.sum("meshwatch_envoy_stats_samples_received_total", &[]) >= 200_000.0
            })
            .await;
        // The node and 625 of its clusters (one node's share: an eighth of the cap) are
        // remembered; the rest are refused, and the book has room for other Envoys.
        assert_eq!(m.get("meshwatch_envoy_stats_tracked", &[]), Some(626.0));
        assert_eq!(m.get(REJECTED, &[("reason", "state_full")]), Some(2.0 * 99_375.0));
        let m =
            mw.metrics_until(Duration::from_secs(10), |m| m.get("meshwatch_pairs_tracked", &[]) == Some(500.0)).await;
        assert_eq!(m.get("meshwatch_pairs_tracked", &[]), Some(500.0), "the pair cap holds too");
        let rss_mib = rss_kib(mw.pid()) / 1024;
        assert!(rss_mib < 256, "resident memory {rss_mib} MiB after the flood");
        assert!(mw.stop().success());
    }
}

/// Reads until the server closes the connection (end of stream or an error), for up to
/// `limit`; whether it did.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // An HTTP/2 server's settings frame, or a response.
            Ok(Ok(_)) => {}
        }
    }
}

/// Opens `n` connections to `addr` and sends nothing: how many the server closed within
/// `limit`, and the ones it did not.
async fn silent_connections(
    addr: std::net::SocketAddr,
    n: usize,
    limit: Duration,
) -> (usize, Vec<tokio::net::TcpStream>) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        set.spawn(async move { if closed_within(&mut s, limit).await { None } else { Some(s) } });
    }
    let mut open = Vec::new();
    let mut closed = 0;
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Some(s) => open.push(s),
            None => closed += 1,
        }
    }
    (closed, open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_and_silent_or_dripping_ones_are_closed() {
    let (mw, _data) = start(&[
        ("MESHWATCH_LIMITS__MAX_CONNECTIONS", "20"),
        ("MESHWATCH_LIMITS__CONNECTION_IDLE", "2s"),
        ("MESHWATCH_LIMITS__REQUEST_TIMEOUT", "2s"),
        ("MESHWATCH_LIMITS__IDENTIFY_WITHIN", "2s"),
    ]);
    for addr in [mw.http, mw.grpc] {
        // 30 silent connections: 20 stay open, and each one over the cap closes the oldest
        // silent one (10 closed).
        let (closed, mut held) = silent_connections(addr, 30, Duration::from_millis(700)).await;
        assert_eq!((closed, held.len()), (10, 20), "{addr}");
        // A 21st is let in, and the oldest of the 20 makes room.
        let (closed, newest) = silent_connections(addr, 1, Duration::from_millis(700)).await;
        assert_eq!((closed, newest.len()), (0, 1), "{addr}: a 21st connection");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut closed = 0;
        for s in &mut held {
            closed += usize::from(closed_within(s, Duration::from_millis(10)).await);
        }
        assert_eq!(closed, 1, "{addr}: one held connection made room");
        held.extend(newest);
        // Silent for the idle time: every one of them is closed, and the listener serves again.
        for s in &mut held {
            assert!(closed_within(s, Duration::from_secs(4)).await, "{addr}: a silent connection stayed open");
        }
    }
    assert_eq!(http_get(mw.http, "/healthz").await.0, 200);

    // A request dripped a header line at a time is never answered: closed after 2 s although
    // bytes keep coming.
    use tokio::io::AsyncWriteExt;
    let mut drip = tokio::net::TcpStream::connect(mw.http).await.unwrap();
    drip.write_all(b"GET /healthz HTTP/1.1\r\nHost: meshwatch.test\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut closed = false;
    for i in 0..12 {
        if drip.write_all(format!("X-Drip-{i}: 1\r\n").as_bytes()).await.is_err()
            || closed_within(&mut drip, Duration::from_millis(500)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a dripping request stayed open for {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    // An access-log stream that never sends its identifier is ended.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", mw.grpc)).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(STREAM_ACCESS_LOGS_PATH);
    let silent = tokio_stream::pending::<Bytes>();
    let ended = tokio::time::timeout(
        Duration::from_secs(6),
        grpc.client_streaming(tonic::Request::new(silent), path, BytesCodec),
    )
    .await
    .expect("the stream was ended");
    assert_eq!(ended.map(|_| ()).unwrap_err().code(), tonic::Code::DeadlineExceeded);

    // A stream that identified itself and then has nothing to send for longer than the idle
    // time stays open: the server's pings, which the client answers, are traffic.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(STREAM_ACCESS_LOGS_PATH);
    let quiet = tokio::spawn(async move {
        grpc.ready().await.unwrap();
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        grpc.client_streaming(tonic::Request::new(stream), path, BytesCodec).await.map(|_| ())
    });
    tx.send(message(identifier("quiet"), vec![entry(Some(now_s()), "backend", Some(200))])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    tx.send(message(None, vec![entry(Some(now_s()), "backend", Some(200))])).await.unwrap();
    drop(tx);
    quiet.await.unwrap().expect("the quiet stream was not cut");

    let m = mw.metrics().await;
    for listener in ["http", "grpc"] {
        let evicted = m.sum("meshwatch_connections_closed_total", &[("listener", listener), ("reason", "evicted")]);
        assert_eq!(evicted, 11.0, "{listener}: {}", m.text);
        assert_eq!(m.sum("meshwatch_connections_refused_total", &[("listener", listener)]), 0.0, "{listener}");
        let idle = m.sum("meshwatch_connections_closed_total", &[("listener", listener), ("reason", "idle")]);
        assert!(idle >= 20.0, "{listener}: {idle}");
    }
    assert!(m.sum("meshwatch_connections_closed_total", &[("listener", "http"), ("reason", "unanswered")]) >= 1.0);
    assert!(m.sum("meshwatch_als_messages_rejected_total", &[("reason", "no_identifier")]) >= 1.0);
    assert_eq!(m.sum("meshwatch_als_entries_decoded_total", &[]), 2.0, "both entries of the quiet stream");
    assert!(mw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_grpc_a_connection_that_spoke_is_never_closed_for_a_new_one() {
    let (mw, _data) = start(&[("MESHWATCH_LIMITS__MAX_CONNECTIONS", "5")]);
    // Five HTTP/2 clients that have spoken (each has its channel up and a call answered).
    let mut channels = Vec::new();
    for _ in 0..5 {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{}", mw.grpc)).unwrap().connect().await.unwrap();
        let mut health = HealthClient::new(channel.clone());
        health.check(HealthCheckRequest { service: String::new() }).await.expect("answered");
        channels.push(channel);
    }
    // A sixth, silent, finds no connection to close: it is refused, and the five stay up.
    let (closed, _) = silent_connections(mw.grpc, 1, Duration::from_millis(700)).await;
    assert_eq!(closed, 1, "a silent sixth connection");
    let m = mw.metrics().await;
    assert_eq!(m.get("meshwatch_connections_refused_total", &[("listener", "grpc")]), Some(1.0), "{}", m.text);
    assert_eq!(m.get("meshwatch_connections_closed_total", &[("listener", "grpc"), ("reason", "evicted")]), Some(0.0));
    for channel in channels {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.expect("still up");
    }
    assert!(mw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_made_up_pairs_does_not_hold_the_pair_cap() {
    let (mw, data) = start(&[("MESHWATCH_LIMITS__MAX_PAIRS", "50"), ("MESHWATCH_LIMITS__EVICT_IDLE", "2s")]);
    // A pair in use, then 200 made-up destinations in one message: 49 are let in, the rest
    // overflow.
    let busy: Vec<_> = (0..20).map(|_| entry(Some(now_s()), "backend", Some(200))).collect();
    send(&mw, vec![message(identifier("outbound"), busy)]).await.unwrap();
    let flood: Vec<_> = (0..200).map(|i| entry(Some(now_s()), &format!("made-up-{i}"), Some(200))).collect();
    send(&mw, vec![message(identifier("outbound"), flood)]).await.unwrap();
    // The overflow is counted as the entries are, which can be after the pairs are tracked.
    let m = mw
        .metrics_until(Duration::from_secs(10), |m| {
            m.get("meshwatch_pairs_tracked", &[]) == Some(50.0)
                && m.sum("meshwatch_pairs_overflow_entries_total", &[]) >= 151.0
        })
        .await;
    assert_eq!(m.get("meshwatch_pairs_tracked", &[]), Some(50.0));
    assert_eq!(m.sum("meshwatch_pairs_overflow_entries_total", &[]), 151.0);
    // Once the burst's pairs have been silent for limits.evict_idle, a new pair takes a place
    // of theirs; the pair in use keeps its own.
    tokio::time::sleep(Duration::from_secs(3)).await;
    send(&mw, vec![message(identifier("outbound"), vec![entry(Some(now_s()), "newcomer", Some(200))])]).await.unwrap();
    let m = mw.metrics_until(Duration::from_secs(10), |m| m.sum("meshwatch_pairs_evicted_total", &[]) > 0.0).await;
    assert_eq!(m.sum("meshwatch_pairs_evicted_total", &[]), 49.0);
    assert_eq!(m.sum("meshwatch_pairs_overflow_entries_total", &[]), 151.0, "the newcomer did not overflow");
    let (_, body) = http_get(mw.http, "/api/v1/pairs").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let destinations: Vec<&str> =
        v["pairs"].as_array().unwrap().iter().map(|p| p["destination"].as_str().unwrap()).collect();
    // The pair in use (its cluster mapped to its SPIFFE ID by the example configuration),
    // the newcomer, and the overflow pair that counted the rest of the burst.
    let mut destinations = destinations;
    destinations.sort();
    assert_eq!(destinations, ["__overflow__", "newcomer", "spiffe://mesh.test/ns/shop/sa/backend"]);
    assert!(mw.stop().success());
    // The pairs given up are gone from the store too: a restart restores the other three.
    let env =
        [("MESHWATCH_DATA_DIR", data.path().display().to_string()), ("MESHWATCH_LIMITS__MAX_PAIRS", "50".to_string())];
    let mw = Meshwatch::start(&repo_root().join("deploy/meshwatch-example.toml"), &env);
    let (_, body) = http_get(mw.http, "/api/v1/pairs").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["pairs"].as_array().unwrap().len(), 3, "{body}");
    assert!(mw.stop().success());
}

#[tokio::test]
async fn after_sigterm_readyz_answers_503_for_the_drain_while_ingest_goes_on_then_it_stops() {
    let (mw, _data) = start(&[("MESHWATCH_SHUTDOWN_DRAIN", "3s")]);
    assert_eq!(http_get(mw.http, "/readyz").await.0, 200);
    let _ = std::process::Command::new("kill").arg("-TERM").arg(mw.pid().to_string()).status();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        seen.push(http_get(mw.http, "/readyz").await.0);
        if seen.last() == Some(&503) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen.last(), Some(&503), "{seen:?}\n{}", mw.logs());
    // Still serving: metrics answer, and an access-log stream is taken.
    assert_eq!(http_get(mw.http, "/healthz").await.0, 200);
    send(&mw, vec![message(identifier("outbound"), vec![entry(Some(now_s()), "backend", Some(200))])])
        .await
        .expect("ingest during the drain");
    let log = mw.log.clone();
    assert!(mw.stop().success(), "it stops after the drain");
    let log = log.lock().unwrap().join("\n");
    assert!(log.contains("not ready; serving on while probes see it"), "{log}");
}
