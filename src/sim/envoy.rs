//! Access-log entries filled in the way Envoy fills them, for the simulator and benchmarks.
//!
//! What Envoy sets, this sets too: addresses on both sides, the upstream cluster, timings, TLS
//! properties with SPIFFE URI SANs on server-side mTLS entries, response flags, header and
//! body byte counts, and logged headers — so that decoding cost and message sizes are what a
//! real mesh produces.

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::data::accesslog::v3 as al;
use envoy_types::pb::envoy::service::accesslog::v3::{StreamAccessLogsMessage, stream_access_logs_message as sm};
use envoy_types::pb::envoy::service::metrics::v3::stream_metrics_message;
use envoy_types::pb::google::protobuf::{Duration, Struct, Timestamp, UInt32Value, Value, value::Kind};
use envoy_types::pb::io::prometheus::client::{Counter, Gauge, Metric, MetricFamily, MetricType};
use prost::Message;

/// What HTTP and TCP entries share: when, between which addresses, through which cluster.
#[derive(Clone, Debug)]
pub struct FlowSpec<'a> {
    pub start_ms: i64,
    pub duration_us: u64,
    pub downstream_ip: &'a str,
    pub upstream_ip: &'a str,
    pub upstream_cluster: &'a str,
    /// Envoy `ResponseFlags` bits (bit `n - 1` is field `n`).
    pub flags: u32,
    /// The caller's certificate URI SAN, on a server-side mTLS entry.
    pub peer_spiffe: Option<&'a str>,
    /// The server's own certificate URI SAN, on a server-side mTLS entry.
    pub local_spiffe: Option<&'a str>,
    /// Makes request ids and ports differ between entries.
    pub seq: u64,
}

/// One request, as the simulator decided it.
#[derive(Clone, Debug)]
pub struct HttpSpec<'a> {
    pub flow: FlowSpec<'a>,
    pub authority: &'a str,
    pub path: &'a str,
    /// 0: no response was sent.
    pub code: u32,
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
}

/// One TCP connection.
#[derive(Clone, Debug)]
pub struct TcpSpec<'a> {
    pub flow: FlowSpec<'a>,
    pub sni: &'a str,
    /// Bytes from the caller.
    pub sent_bytes: u64,
    /// Bytes to the caller.
    pub received_bytes: u64,
}

fn socket(ip: &str, port: u32) -> Option<core::Address> {
    Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    })
}

fn timestamp(ms: i64) -> Option<Timestamp> {
    Some(Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 })
}

fn duration(us: u64) -> Option<Duration> {
    Some(Duration { seconds: (us / 1_000_000) as i64, nanos: ((us % 1_000_000) * 1000) as i32 })
}

fn certificate(uri: &str) -> al::tls_properties::CertificateProperties {
    use al::tls_properties::certificate_properties::{SubjectAltName, subject_alt_name::San};
    al::tls_properties::CertificateProperties {
        subject_alt_name: vec![SubjectAltName { san: Some(San::Uri(uri.to_string())) }],
        subject: String::new(),
        issuer: "O=cluster.local".into(),
    }
}

fn tls(peer: Option<&str>, local: Option<&str>, sni: &str) -> Option<al::TlsProperties> {
    if peer.is_none() && local.is_none() {
        return None;
    }
    Some(al::TlsProperties {
        tls_version: al::tls_properties::TlsVersion::TlSv13 as i32,
        tls_cipher_suite: Some(UInt32Value { value: 0x1301 }),
        tls_sni_hostname: sni.to_string(),
        peer_certificate_properties: peer.map(certificate),
        local_certificate_properties: local.map(certificate),
        ..Default::default()
    })
}

fn flags(bits: u32) -> Option<al::ResponseFlags> {
    if bits == 0 {
        return None;
    }
    let on = |i: u32| bits & (1 << i) != 0;
    Some(al::ResponseFlags {
        failed_local_healthcheck: on(0),
        no_healthy_upstream: on(1),
        upstream_request_timeout: on(2),
        local_reset: on(3),
        upstream_remote_reset: on(4),
        upstream_connection_failure: on(5),
        upstream_connection_termination: on(6),
        upstream_overflow: on(7),
        no_route_found: on(8),
        rate_limited: on(11),
        unauthorized_details: on(12).then_some(al::response_flags::Unauthorized { reason: 1 }),
        downstream_connection_termination: on(14),
        upstream_retry_limit_exceeded: on(15),
        ..Default::default()
    })
}

fn common(f: &FlowSpec<'_>, end: al::AccessLogType, sni: &str) -> al::AccessLogCommon {
    let port = 30_000 + (f.seq % 30_000) as u32;
    al::AccessLogCommon {
        sample_rate: 1.0,
        downstream_remote_address: socket(f.downstream_ip, port),
        downstream_local_address: socket(f.upstream_ip, 8080),
        downstream_direct_remote_address: socket(f.downstream_ip, port),
        tls_properties: tls(f.peer_spiffe, f.local_spiffe, sni),
        start_time: timestamp(f.start_ms),
        time_to_last_rx_byte: duration(200),
        time_to_first_upstream_tx_byte: duration(400),
        time_to_last_upstream_tx_byte: duration(450),
        time_to_first_upstream_rx_byte: duration(f.duration_us.saturating_sub(300)),
        time_to_last_upstream_rx_byte: duration(f.duration_us.saturating_sub(100)),
        time_to_first_downstream_tx_byte: duration(f.duration_us.saturating_sub(250)),
        time_to_last_downstream_tx_byte: duration(f.duration_us),
        upstream_remote_address: socket(f.upstream_ip, 8080),
        upstream_local_address: socket(f.downstream_ip, 40_000 + (f.seq % 20_000) as u32),
        upstream_cluster: f.upstream_cluster.to_string(),
        response_flags: flags(f.flags),
        route_name: "default".into(),
        duration: duration(f.duration_us),
        upstream_request_attempt_count: 1,
        stream_id: format!("{:016x}", f.seq),
        access_log_type: end as i32,
        ..Default::default()
    }
}

/// A request id in UUID text form, as `x-request-id` carries it.
fn request_id(seq: u64) -> String {
    RequestId(seq).to_string()
}

pub fn http_entry(s: &HttpSpec<'_>) -> al::HttpAccessLogEntry {
    let c = common(&s.flow, al::AccessLogType::DownstreamEnd, s.authority);
    let seq = s.flow.seq;
    // One logged header each way: Envoy-types maps are hash maps, and more than one entry
    // would make the encoding (and so the simulator's output) differ from run to run.
    let request_headers = [("x-request-id".to_string(), request_id(seq))];
    al::HttpAccessLogEntry {
        common_properties: Some(c),
        protocol_version: al::http_access_log_entry::HttpVersion::Http2 as i32,
        request: Some(al::HttpRequestProperties {
            request_method: if s.request_body_bytes > 0 { 3 } else { 1 },
            scheme: "http".into(),
            authority: s.authority.to_string(),
            path: s.path.to_string(),
            user_agent: "Go-http-client/2.0".into(),
            request_id: request_id(seq),
            request_headers_bytes: 180,
            request_body_bytes: s.request_body_bytes,
            request_headers: request_headers.into(),
            ..Default::default()
        }),
        response: Some(al::HttpResponseProperties {
            response_code: (s.code > 0).then_some(UInt32Value { value: s.code }),
            response_headers_bytes: 120,
            response_body_bytes: s.response_body_bytes,
            response_code_details: if s.flow.flags == 0 {
                "via_upstream".into()
            } else {
                "upstream_reset_before_response_started".into()
            },
            response_headers: [("x-envoy-upstream-service-time".to_string(), (s.flow.duration_us / 1000).to_string())]
                .into(),
            ..Default::default()
        }),
    }
}

pub fn tcp_entry(s: &TcpSpec<'_>) -> al::TcpAccessLogEntry {
    let c = common(&s.flow, al::AccessLogType::TcpConnectionEnd, s.sni);
    al::TcpAccessLogEntry {
        common_properties: Some(c),
        connection_properties: Some(al::ConnectionProperties {
            received_bytes: s.sent_bytes,
            sent_bytes: s.received_bytes,
        }),
    }
}

/// The stream identifier of a simulated Envoy: its node (with `meshwatch_identity` metadata
/// when `identity` is given) and the logger's name.
pub fn identifier(node_id: &str, cluster: &str, identity: Option<&str>, log_name: &str) -> sm::Identifier {
    let metadata = identity.map(|id| Struct {
        fields: [("meshwatch_identity".to_string(), Value { kind: Some(Kind::StringValue(id.to_string())) })].into(),
    });
    sm::Identifier {
        node: Some(core::Node {
            id: node_id.to_string(),
            cluster: cluster.to_string(),
            metadata,
            user_agent_name: "envoy".into(),
            ..Default::default()
        }),
        log_name: log_name.to_string(),
    }
}

/// The identifier of a simulated Envoy's stats-sink stream: the node (as its access logs
/// name it), its counters cumulative (Envoy's default).
pub fn stats_identifier(node_id: &str, cluster: &str, identity: &str) -> stream_metrics_message::Identifier {
    let metadata = Struct {
        fields: [("meshwatch_identity".to_string(), Value { kind: Some(Kind::StringValue(identity.to_string())) })]
            .into(),
    };
    stream_metrics_message::Identifier {
        node: Some(core::Node {
            id: node_id.to_string(),
            cluster: cluster.to_string(),
            metadata: Some(metadata),
            user_agent_name: "envoy".into(),
            ..Default::default()
        }),
    }
}

/// One stat as Envoy's stats sink sends it: a counter or a gauge, stamped `t_ms`.
pub fn metric_family(name: &str, value: f64, gauge: bool, t_ms: i64) -> MetricFamily {
    let mut metric = Metric { timestamp_ms: Some(t_ms), ..Metric::default() };
    let kind = if gauge {
        metric.gauge = Some(Gauge { value: Some(value) });
        MetricType::Gauge
    } else {
        metric.counter = Some(Counter { value: Some(value), ..Counter::default() });
        MetricType::Counter
    };
    MetricFamily { name: Some(name.into()), r#type: Some(kind as i32), metric: vec![metric], ..Default::default() }
}

/// An encoded `StreamAccessLogsMessage` of HTTP entries.
pub fn http_message(id: Option<sm::Identifier>, entries: Vec<al::HttpAccessLogEntry>) -> Bytes {
    StreamAccessLogsMessage {
        identifier: id,
        log_entries: Some(sm::LogEntries::HttpLogs(sm::HttpAccessLogEntries { log_entry: entries })),
    }
    .encode_to_vec()
    .into()
}

/// An encoded `StreamAccessLogsMessage` of TCP entries.
pub fn tcp_message(id: Option<sm::Identifier>, entries: Vec<al::TcpAccessLogEntry>) -> Bytes {
    StreamAccessLogsMessage {
        identifier: id,
        log_entries: Some(sm::LogEntries::TcpLogs(sm::TcpAccessLogEntries { log_entry: entries })),
    }
    .encode_to_vec()
    .into()
}

/// What changes from one request (or connection) of an edge to the next.
#[derive(Clone, Copy, Debug)]
pub struct Varying {
    pub start_ms: i64,
    pub duration_us: u64,
    pub code: u32,
    pub flags: u32,
    /// HTTP: request and response bodies; TCP: bytes from and to the caller.
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub seq: u64,
}

/// An entry built once per edge and side, then refilled per request: the simulator's fast
/// path, with no allocation per entry once its strings have their capacity.
#[derive(Clone, Debug)]
pub enum Template {
    Http(Box<al::HttpAccessLogEntry>),
    Tcp(Box<al::TcpAccessLogEntry>),
}

fn set_duration(slot: &mut Option<Duration>, us: u64) {
    *slot = duration(us);
}

fn refill_common(c: &mut al::AccessLogCommon, v: &Varying) {
    c.start_time = timestamp(v.start_ms);
    set_duration(&mut c.time_to_first_upstream_rx_byte, v.duration_us.saturating_sub(300));
    set_duration(&mut c.time_to_last_upstream_rx_byte, v.duration_us.saturating_sub(100));
    set_duration(&mut c.time_to_first_downstream_tx_byte, v.duration_us.saturating_sub(250));
    set_duration(&mut c.time_to_last_downstream_tx_byte, v.duration_us);
    set_duration(&mut c.duration, v.duration_us);
    c.response_flags = flags(v.flags);
    c.stream_id.clear();
    let _ = std::fmt::Write::write_fmt(&mut c.stream_id, format_args!("{:016x}", v.seq));
    let port = 30_000 + (v.seq % 30_000) as u32;
    for addr in [&mut c.downstream_remote_address, &mut c.downstream_direct_remote_address].into_iter().flatten() {
        if let Some(core::address::Address::SocketAddress(sock)) = addr.address.as_mut() {
            sock.port_specifier = Some(core::socket_address::PortSpecifier::PortValue(port));
        }
    }
}

impl Template {
    pub fn http(spec: &HttpSpec<'_>) -> Template {
        Template::Http(Box::new(http_entry(spec)))
    }

    pub fn tcp(spec: &TcpSpec<'_>) -> Template {
        Template::Tcp(Box::new(tcp_entry(spec)))
    }

    /// Refills the entry for one request and appends it, as field 1 of an entries message,
    /// to `buf`.
    pub fn write(&mut self, v: &Varying, buf: &mut Vec<u8>) {
        match self {
            Template::Http(e) => {
                if let Some(c) = e.common_properties.as_mut() {
                    refill_common(c, v);
                }
                if let Some(r) = e.request.as_mut() {
                    // Answered 404: a probe of a path of its own (scans try many).
                    if v.code == 404 {
                        r.path.clear();
                        let _ = std::fmt::Write::write_fmt(&mut r.path, format_args!("/probe/{:x}", v.seq));
                    } else if r.path.starts_with("/probe/") {
                        r.path.clear();
                        r.path.push_str("/api");
                    }
                    r.request_method = if v.up_bytes > 0 { 3 } else { 1 };
                    r.request_body_bytes = v.up_bytes;
                    r.request_id.clear();
                    let _ = std::fmt::Write::write_fmt(&mut r.request_id, format_args!("{}", RequestId(v.seq)));
                    if let Some(h) = r.request_headers.get_mut("x-request-id") {
                        h.clear();
                        h.push_str(&r.request_id);
                    }
                }
                if let Some(r) = e.response.as_mut() {
                    r.response_code = (v.code > 0).then_some(UInt32Value { value: v.code });
                    r.response_body_bytes = v.down_bytes;
                }
                prost::encoding::message::encode(1, e.as_ref(), buf);
            }
            Template::Tcp(e) => {
                if let Some(c) = e.common_properties.as_mut() {
                    refill_common(c, v);
                }
                e.connection_properties =
                    Some(al::ConnectionProperties { received_bytes: v.up_bytes, sent_bytes: v.down_bytes });
                prost::encoding::message::encode(1, e.as_ref(), buf);
            }
        }
    }
}

/// `request_id` without allocating.
struct RequestId(u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        write!(
            f,
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            h >> 32,
            h & 0xffff,
            (h >> 16) & 0xfff,
            (h >> 4) & 0xfff,
            h & 0xffff_ffff_ffff
        )
    }
}
