//! OpenTelemetry logs in: `opentelemetry.proto.collector.logs.v1.LogsService/Export`, as
//! Envoy's OpenTelemetry access logger (`envoy.access_loggers.open_telemetry`) sends them.
//!
//! Each log record becomes a flow record through the same identity and direction rules as the
//! gRPC access log: its attributes are read into the fields of an access-log entry (addresses,
//! certificates' URI SANs, upstream cluster, response code and flags, duration, bytes) and
//! decided by `decode::record`. The node comes from the resource attributes Envoy fills
//! (`node_name`, `cluster_name`, `log_name`, and `meshwatch.identity` if configured). A record
//! without a time, an HTTP record without a response code, and one with nothing that names a
//! peer are rejected alone, counted by reason (never made into `unknown` pairs); a peer that
//! is named but not resolved is `unknown`, counted as unresolved; a batch is never refused for
//! its records.

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use prost::Message;

use crate::decode::{Outcome, Rejection, Specific, Tally, record};
use crate::flow::{FlowRecord, Protocol, ResponseFlags};
use crate::identity::{Interner, MeshConfig, NodeContext, Resolver};
use crate::wire::{
    AddressWire, CertificateWire, CommonWire, DurationWire, ResponseFlagsWire, SanWire, SocketAddressWire,
    TimestampWire, TlsWire,
};

/// The full path of the method.
pub const EXPORT_LOGS_PATH: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";

/// The attributes meshwatch reads, with the Envoy command operator that fills each; README
/// documents them as the recommended set. Other attributes are ignored.
pub const ATTRIBUTES: [(&str, &str); 12] = [
    ("downstream.peer.uri_san", "%DOWNSTREAM_PEER_URI_SAN%"),
    ("downstream.local.uri_san", "%DOWNSTREAM_LOCAL_URI_SAN%"),
    ("upstream.peer.uri_san", "%UPSTREAM_PEER_URI_SAN%"),
    ("upstream.cluster", "%UPSTREAM_CLUSTER%"),
    ("response.code", "%RESPONSE_CODE%"),
    ("response.flags", "%RESPONSE_FLAGS%"),
    ("duration_ms", "%DURATION%"),
    ("bytes.received", "%BYTES_RECEIVED%"),
    ("bytes.sent", "%BYTES_SENT%"),
    ("downstream.remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("upstream.host", "%UPSTREAM_HOST%"),
    ("authority", "%REQ(:AUTHORITY)%"),
];

/// Also read: `path` (`%REQ(:PATH)%`, for 404 scans) and `protocol` (`%PROTOCOL%`, which
/// Envoy prints as `-` for TCP: without it, a record is taken for HTTP). Other spellings are
/// accepted for the same fields: the snake_case keys of Istio's default access-log format
/// (`response_code`, `upstream_cluster`, `duration`, …, which Envoy setups copy into the
/// OpenTelemetry logger's attributes) and the OpenTelemetry semantic conventions' names.
const ALIASES: [(&str, &str); 15] = [
    ("http.response.status_code", "response.code"),
    ("response_code", "response.code"),
    ("response_flags", "response.flags"),
    ("upstream_cluster", "upstream.cluster"),
    ("upstream_host", "upstream.host"),
    ("duration", "duration_ms"),
    ("bytes_received", "bytes.received"),
    ("bytes_sent", "bytes.sent"),
    ("downstream_remote_address", "downstream.remote_address"),
    ("downstream_peer_uri_san", "downstream.peer.uri_san"),
    ("downstream_local_uri_san", "downstream.local.uri_san"),
    ("upstream_peer_uri_san", "upstream.peer.uri_san"),
    ("url.path", "path"),
    ("server.address", "authority"),
    ("network.protocol.name", "protocol"),
];

/// The attributes that name a peer: a record with none of them is rejected (`missing_peer`).
const PEER_KEYS: [&str; 5] = [
    "upstream.cluster",
    "upstream.host",
    "downstream.remote_address",
    "downstream.peer.uri_san",
    "upstream.peer.uri_san",
];

#[derive(Clone, PartialEq, prost::Message)]
struct ExportRequestWire {
    #[prost(message, repeated, tag = "1")]
    resource_logs: Vec<ResourceLogsWire>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceLogsWire {
    #[prost(message, optional, tag = "1")]
    resource: Option<ResourceWire>,
    #[prost(message, repeated, tag = "2")]
    scope_logs: Vec<ScopeLogsWire>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceWire {
    #[prost(message, repeated, tag = "1")]
    attributes: Vec<KeyValueWire>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ScopeLogsWire {
    #[prost(message, repeated, tag = "2")]
    log_records: Vec<LogRecordWire>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LogRecordWire {
    #[prost(fixed64, tag = "1")]
    time_unix_nano: u64,
    #[prost(message, repeated, tag = "6")]
    attributes: Vec<KeyValueWire>,
    #[prost(fixed64, tag = "11")]
    observed_time_unix_nano: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct KeyValueWire {
    #[prost(bytes = "bytes", tag = "1")]
    key: Bytes,
    #[prost(message, optional, tag = "2")]
    value: Option<AnyValueWire>,
}

/// `AnyValue`: the scalar cases; arrays and key-value lists are skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct AnyValueWire {
    #[prost(bytes = "bytes", optional, tag = "1")]
    string_value: Option<Bytes>,
    #[prost(bool, optional, tag = "2")]
    bool_value: Option<bool>,
    #[prost(int64, optional, tag = "3")]
    int_value: Option<i64>,
    #[prost(double, optional, tag = "4")]
    double_value: Option<f64>,
}

impl AnyValueWire {
    /// The value as text: a string as received (no copy), a number formatted.
    fn text(&self) -> Option<Bytes> {
        if let Some(s) = &self.string_value {
            return Some(s.clone());
        }
        self.int_value.map(|i| i.to_string()).or_else(|| self.double_value.map(|d| d.to_string())).map(Bytes::from)
    }
}

/// The attribute keys meshwatch reads, in records and resources; others are skipped.
const KNOWN: [&str; 18] = [
    "downstream.peer.uri_san",
    "downstream.local.uri_san",
    "upstream.peer.uri_san",
    "upstream.cluster",
    "response.code",
    "response.flags",
    "duration_ms",
    "bytes.received",
    "bytes.sent",
    "downstream.remote_address",
    "upstream.host",
    "authority",
    "path",
    "protocol",
    "node_name",
    "cluster_name",
    "log_name",
    "meshwatch.identity",
];

/// The attributes meshwatch reads, by their canonical key, as slices of the request.
/// Envoy's `-` (no value) counts as absent, except for the protocol, where it means TCP.
struct Attributes(Vec<(&'static str, Bytes)>);

impl Attributes {
    fn read(kvs: &[KeyValueWire]) -> Attributes {
        let mut out = Vec::with_capacity(kvs.len());
        for kv in kvs {
            let key = &kv.key[..];
            let alias = ALIASES.iter().find(|(a, _)| a.as_bytes() == key).map(|(_, k)| *k);
            let Some(key) = alias.or_else(|| KNOWN.iter().find(|k| k.as_bytes() == key).copied()) else { continue };
            let Some(v) = kv.value.as_ref().and_then(AnyValueWire::text) else { continue };
            if v.is_empty() || (&v[..] == b"-" && key != "protocol") {
                continue;
            }
            out.push((key, v));
        }
        Attributes(out)
    }

    fn bytes(&self, key: &str) -> Option<&Bytes> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    fn text(&self, key: &str) -> Option<&str> {
        self.bytes(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    fn number(&self, key: &str) -> Option<u64> {
        self.text(key).and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite() && *v >= 0.0).map(|v| v as u64)
    }
}

/// `10.0.0.1:8080` or `[::1]:8080` (a bare address is accepted); the address is a slice of
/// `value`.
fn address(value: &Bytes) -> Option<AddressWire> {
    let s = std::str::from_utf8(value).ok()?;
    let (host, port) = match s.rsplit_once(':') {
        // A bare IPv6 address has colons but no brackets: it has no port.
        Some((h, p))
            if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (h.starts_with('[') || !h.contains(':')) =>
        {
            (h.trim_start_matches('[').trim_end_matches(']'), p.parse().unwrap_or(0))
        }
        _ => (s, 0),
    };
    host.parse::<std::net::IpAddr>().ok()?;
    Some(AddressWire {
        socket_address: Some(SocketAddressWire { address: value.slice_ref(host.as_bytes()), port_value: port }),
    })
}

/// A certificate known only by its URI SAN(s), comma-separated as Envoy prints them; each a
/// slice of `uri_sans`.
fn certificate(uri_sans: &Bytes) -> CertificateWire {
    CertificateWire {
        subject_alt_name: uri_sans
            .split(|&b| b == b',')
            .map(|u| SanWire { uri: uri_sans.slice_ref(u.trim_ascii()), dns: Bytes::new() })
            .collect(),
        subject: Bytes::new(),
    }
}

/// Envoy's short response-flag names (`UF,URX`) as flag bits.
fn flags(s: &str) -> u32 {
    s.split(',')
        .filter_map(|name| ResponseFlags::NAMES.iter().position(|n| *n == name.trim()))
        .fold(0, |bits, i| bits | (1 << i))
}

/// The node of a resource: `node_name`, `cluster_name`, `log_name` as Envoy fills them, and
/// `meshwatch.identity` as node metadata.
fn node(resource: &Attributes, mesh: &MeshConfig) -> NodeContext {
    let text = |k: &str| resource.text(k).unwrap_or_default().to_string();
    let mut n = core::Node { id: text("node_name"), cluster: text("cluster_name"), ..Default::default() };
    if let Some(identity) = resource.text("meshwatch.identity") {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "meshwatch_identity".to_string(),
            Value { kind: Some(value::Kind::StringValue(identity.to_string())) },
        );
        n.metadata = Some(Struct { fields: fields.into_iter().collect() });
    }
    NodeContext::new(Some(&n), resource.text("log_name").unwrap_or_default(), mesh)
}

/// One log record into an outcome, as an access-log entry of the node would be.
fn log_record(rec: &LogRecordWire, node: &NodeContext, resolver: &mut Resolver<'_, '_>) -> (usize, Outcome) {
    let a = Attributes::read(&rec.attributes);
    let nanos = if rec.time_unix_nano > 0 { rec.time_unix_nano } else { rec.observed_time_unix_nano };
    let tcp = a.text("protocol").is_some_and(|p| p == "-" || p.eq_ignore_ascii_case("tcp"));
    let protocol_index = usize::from(tcp);
    if nanos == 0 {
        return (protocol_index, Outcome::Rejected(Rejection::MissingTime));
    }
    if !tcp && a.number("response.code").is_none() {
        return (protocol_index, Outcome::Rejected(Rejection::MissingStatus));
    }
    if PEER_KEYS.iter().all(|k| a.bytes(k).is_none()) {
        return (protocol_index, Outcome::Rejected(Rejection::MissingPeer));
    }
    let local = a.bytes("downstream.local.uri_san").map(certificate);
    let peer = a.bytes("downstream.peer.uri_san").map(certificate);
    let common = CommonWire {
        downstream_remote_address: a.bytes("downstream.remote_address").and_then(address),
        tls_properties: (local.is_some() || peer.is_some()).then(|| TlsWire {
            local_certificate_properties: local,
            peer_certificate_properties: peer,
            ..Default::default()
        }),
        start_time: Some(TimestampWire {
            seconds: i64::try_from(nanos / 1_000_000_000).unwrap_or(i64::MAX),
            nanos: i32::try_from(nanos % 1_000_000_000).unwrap_or(0),
        }),
        upstream_remote_address: a.bytes("upstream.host").and_then(address),
        upstream_cluster: a.bytes("upstream.cluster").cloned().unwrap_or_default(),
        response_flags: a.text("response.flags").map(|s| ResponseFlagsWire { bits: flags(s) }),
        duration: a.number("duration_ms").map(|ms| DurationWire {
            seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
            nanos: i32::try_from(ms % 1000 * 1_000_000).unwrap_or(0),
        }),
        ..Default::default()
    };
    let upstream_peer = a.bytes("upstream.peer.uri_san").map(certificate);
    let specific = Specific {
        protocol: if tcp { Protocol::Tcp } else { Protocol::Http },
        authority: a.bytes("authority").map_or(&b""[..], |v| &v[..]),
        path: a.bytes("path").map_or(&b""[..], |v| &v[..]),
        code: a.number("response.code").and_then(|c| u32::try_from(c).ok()).unwrap_or(0),
        // Envoy's BYTES_RECEIVED came from the caller; BYTES_SENT went back to it.
        bytes_sent: a.number("bytes.received").unwrap_or(0),
        bytes_received: a.number("bytes.sent").unwrap_or(0),
    };
    (protocol_index, record(&common, specific, upstream_peer.as_ref(), node, resolver))
}

/// String attributes, as (key, value).
pub type StringAttributes = Vec<(String, String)>;

/// Encodes an `ExportLogsServiceRequest` of string attributes: for each resource, its
/// attributes and its records (time in Unix nanoseconds, attributes). For load generators
/// and tests.
pub fn encode_export(resources: &[(StringAttributes, Vec<(u64, StringAttributes)>)]) -> Bytes {
    let kvs = |attrs: &[(String, String)]| -> Vec<KeyValueWire> {
        attrs
            .iter()
            .map(|(k, v)| KeyValueWire {
                key: Bytes::copy_from_slice(k.as_bytes()),
                value: Some(AnyValueWire {
                    string_value: Some(Bytes::copy_from_slice(v.as_bytes())),
                    ..Default::default()
                }),
            })
            .collect()
    };
    ExportRequestWire {
        resource_logs: resources
            .iter()
            .map(|(resource, records)| ResourceLogsWire {
                resource: Some(ResourceWire { attributes: kvs(resource) }),
                scope_logs: vec![ScopeLogsWire {
                    log_records: records
                        .iter()
                        .map(|(t, attrs)| LogRecordWire {
                            time_unix_nano: *t,
                            attributes: kvs(attrs),
                            observed_time_unix_nano: 0,
                        })
                        .collect(),
                }],
            })
            .collect(),
    }
    .encode_to_vec()
    .into()
}

/// Decodes one `ExportLogsServiceRequest`: flow records, and what was counted (`received`,
/// `decoded` and `rejected` by protocol as for the gRPC access log). With `proven`, every
/// resource's node must be one of those identities, or nothing of the request is taken
/// (`unproven_identity`).
pub fn export(
    bytes: Bytes,
    mesh: &MeshConfig,
    interner: &mut Interner,
    proven: Option<&crate::als::ProvenIdentities>,
) -> (Vec<FlowRecord>, Tally) {
    let mut tally = Tally::default();
    let Ok(request) = ExportRequestWire::decode(bytes) else {
        tally.message_rejected = Some("malformed");
        return (Vec::new(), tally);
    };
    let nodes: Vec<NodeContext> = request
        .resource_logs
        .iter()
        .map(|rl| node(&Attributes::read(rl.resource.as_ref().map_or(&[][..], |r| &r.attributes)), mesh))
        .collect();
    if let Some(p) = proven
        && let Some(claimed) = nodes.iter().find(|n| !p.proves(&n.identity))
    {
        tally.message_rejected = Some(crate::decode::UNPROVEN_IDENTITY);
        tally.unproven = Some(claimed.identity.clone());
        return (Vec::new(), tally);
    }
    let mut records = Vec::new();
    let mut resolver = Resolver { mesh, interner };
    for (rl, node) in request.resource_logs.iter().zip(&nodes) {
        for rec in rl.scope_logs.iter().flat_map(|s| &s.log_records) {
            let (p, outcome) = log_record(rec, node, &mut resolver);
            tally.received[p] += 1;
            tally.count(p, outcome, &mut records);
        }
    }
    (records, tally)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Direction, Reporter};

    fn kv(key: &str, v: &str) -> KeyValueWire {
        KeyValueWire {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Some(AnyValueWire {
                string_value: Some(Bytes::copy_from_slice(v.as_bytes())),
                ..Default::default()
            }),
        }
    }

    fn request(resource: Vec<KeyValueWire>, records: Vec<Vec<KeyValueWire>>) -> Bytes {
        ExportRequestWire {
            resource_logs: vec![ResourceLogsWire {
                resource: Some(ResourceWire { attributes: resource }),
                scope_logs: vec![ScopeLogsWire {
                    log_records: records
                        .into_iter()
                        .map(|attributes| LogRecordWire {
                            time_unix_nano: 1_700_000_000_000_000_000,
                            attributes,
                            observed_time_unix_nano: 0,
                        })
                        .collect(),
                }],
            }],
        }
        .encode_to_vec()
        .into()
    }

    fn mesh() -> MeshConfig {
        MeshConfig { trust_domains: vec!["mesh.test".into()], ..MeshConfig::default() }
    }

    #[test]
    fn with_proven_identities_a_request_naming_another_node_is_taken_whole_or_not_at_all() {
        let web = "spiffe://mesh.test/ns/shop/sa/web";
        let resource = |identity: &str| vec![kv("node_name", "web-1"), kv("meshwatch.identity", identity)];
        let rec = || vec![kv("upstream.cluster", "api"), kv("http.response.status_code", "200")];
        let proven = crate::als::ProvenIdentities(vec![web.to_string()].into());
        let (records, tally) =
            export(request(resource(web), vec![rec()]), &mesh(), &mut Interner::new(16), Some(&proven));
        assert_eq!((records.len(), tally.message_rejected), (1, None));
        let db = "spiffe://mesh.test/ns/shop/sa/db";
        let (records, tally) =
            export(request(resource(db), vec![rec()]), &mesh(), &mut Interner::new(16), Some(&proven));
        assert!(records.is_empty());
        assert_eq!(tally.message_rejected, Some(crate::decode::UNPROVEN_IDENTITY));
        assert_eq!(tally.unproven.as_deref(), Some(db));
    }

    #[test]
    fn client_side_records_name_the_callee_by_its_certificate() {
        let resource = vec![kv("node_name", "web-1"), kv("cluster_name", "web"), kv("log_name", "outbound_otel")];
        let rec = vec![
            kv("upstream.peer.uri_san", "spiffe://mesh.test/ns/shop/sa/api"),
            kv("upstream.cluster", "api_cluster"),
            kv("http.response.status_code", "503"),
            kv("response.flags", "UF,URX"),
            kv("duration_ms", "12"),
            kv("bytes.received", "300"),
            kv("bytes.sent", "40"),
            kv("upstream.host", "10.1.2.3:8443"),
            kv("downstream.peer.uri_san", "-"),
        ];
        let (records, tally) = export(request(resource, vec![rec]), &mesh(), &mut Interner::new(16), None);
        assert_eq!((tally.received, tally.decoded), ([1, 0], [1, 0]));
        let r = &records[0];
        assert_eq!((&*r.source, &*r.destination), ("web", "spiffe://mesh.test/ns/shop/sa/api"));
        assert_eq!((r.reporter, r.direction, r.protocol), (Reporter::Source, Direction::EastWest, Protocol::Http));
        assert_eq!((r.response_code, r.duration_us, r.bytes_sent, r.bytes_received), (503, Some(12_000), 300, 40));
        assert!(r.response_flags.contains(ResponseFlags::UPSTREAM_CONNECTION_FAILURE));
        assert_eq!(r.end_ms, 1_700_000_000_012);
        assert!(!r.mtls);
    }

    #[test]
    fn server_side_records_read_the_callers_certificate() {
        let resource = vec![
            kv("node_name", "api-1"),
            kv("log_name", "inbound_otel"),
            kv("meshwatch.identity", "spiffe://mesh.test/ns/shop/sa/api"),
        ];
        let full = vec![
            kv("downstream.peer.uri_san", "spiffe://mesh.test/ns/shop/sa/web"),
            kv("downstream.local.uri_san", "spiffe://mesh.test/ns/shop/sa/api"),
            kv("response.code", "200"),
        ];
        let plaintext = vec![kv("downstream.remote_address", "10.0.0.9:51000"), kv("response.code", "200")];
        let (records, tally) = export(request(resource, vec![full, plaintext]), &mesh(), &mut Interner::new(16), None);
        assert_eq!(tally.decoded, [2, 0]);
        assert_eq!(
            (&*records[0].source, &*records[0].destination, records[0].reporter, records[0].mtls),
            ("spiffe://mesh.test/ns/shop/sa/web", "spiffe://mesh.test/ns/shop/sa/api", Reporter::Destination, true)
        );
        // A caller known only by its address is an unresolved source, counted as such.
        assert_eq!((&*records[1].source, records[1].mtls), ("unknown", false));
        assert_eq!(tally.unresolved, [1, 0]);
    }

    #[test]
    fn records_without_a_status_or_a_peer_are_rejected_by_reason_not_made_unknown_pairs() {
        let resource = vec![kv("node_name", "api-1"), kv("log_name", "inbound_otel")];
        let no_peer = vec![kv("response.code", "200"), kv("duration_ms", "3")];
        let no_status = vec![kv("upstream.cluster", "api"), kv("response.flags", "-")];
        let tcp_no_status = vec![kv("upstream.cluster", "db"), kv("protocol", "-")];
        let (records, tally) =
            export(request(resource, vec![no_peer, no_status, tcp_no_status]), &mesh(), &mut Interner::new(16), None);
        assert_eq!(records.len(), 1, "only the TCP record, which has no status by nature");
        assert_eq!(records[0].protocol, Protocol::Tcp);
        let mut rejected = tally.rejected.clone();
        rejected.sort_by_key(|(r, _)| r.as_str());
        assert_eq!(rejected, vec![(Rejection::MissingPeer, 1), (Rejection::MissingStatus, 1)]);
    }

    #[test]
    fn istio_default_format_keys_read_as_meshwatch_keys() {
        // The keys of Istio's default access-log format, copied into the OpenTelemetry
        // logger's attributes as a user of the stock logger writes them.
        let resource = vec![kv("node_name", "web-1"), kv("cluster_name", "web"), kv("log_name", "outbound_otel")];
        let snake = vec![
            kv("upstream_cluster", "outbound|8080||api.shop.svc.cluster.local"),
            kv("upstream_host", "10.1.2.3:8080"),
            kv("response_code", "503"),
            kv("response_flags", "UF"),
            kv("duration", "12"),
            kv("bytes_received", "300"),
            kv("bytes_sent", "40"),
            kv("downstream_remote_address", "10.0.0.5:40000"),
            kv("authority", "api.shop:8080"),
            kv("protocol", "HTTP/1.1"),
        ];
        let dotted = vec![
            kv("upstream.cluster", "outbound|8080||api.shop.svc.cluster.local"),
            kv("upstream.host", "10.1.2.3:8080"),
            kv("response.code", "503"),
            kv("response.flags", "UF"),
            kv("duration_ms", "12"),
            kv("bytes.received", "300"),
            kv("bytes.sent", "40"),
            kv("downstream.remote_address", "10.0.0.5:40000"),
            kv("authority", "api.shop:8080"),
            kv("protocol", "HTTP/1.1"),
        ];
        let (records, tally) = export(request(resource, vec![snake, dotted]), &mesh(), &mut Interner::new(16), None);
        assert_eq!(tally.decoded, [2, 0]);
        assert_eq!(records[0], records[1]);
        let r = &records[0];
        assert_eq!((r.response_code, r.duration_us, r.bytes_sent, r.bytes_received), (503, Some(12_000), 300, 40));
        assert_eq!(&*r.source, "web");
        assert_ne!(&*r.destination, "unknown");
    }

    #[test]
    fn bad_input_is_counted_not_fatal() {
        let (records, tally) = export(Bytes::from_static(b"\xff\xff\xff"), &mesh(), &mut Interner::new(4), None);
        assert!(records.is_empty());
        assert_eq!(tally.message_rejected, Some("malformed"));
        let mut no_time = request(vec![], vec![vec![kv("response.code", "200")]]).to_vec();
        // Zero the time: fixed64 field 1 follows its tag byte 0x09.
        let at = no_time.windows(1).position(|w| w[0] == 0x09).expect("time field");
        no_time[at + 1..at + 9].fill(0);
        let (records, tally) = export(no_time.into(), &mesh(), &mut Interner::new(4), None);
        assert!(records.is_empty());
        assert_eq!(tally.rejected, vec![(Rejection::MissingTime, 1)]);
        let v6 = Bytes::from_static(b"[::1]:80");
        assert_eq!(
            address(&v6).and_then(|a| a.socket_address).map(|s| (s.port_value, s.address)),
            Some((80, Bytes::from_static(b"::1")))
        );
        assert!(address(&Bytes::from_static(b"not an address")).is_none());
        assert_eq!(flags("-,UF,NOPE"), 1 << ResponseFlags::NAMES.iter().position(|n| *n == "UF").unwrap_or(0));
    }
}
