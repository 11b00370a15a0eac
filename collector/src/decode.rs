//! From wire entries to flow records: one function per entry kind, pure, no I/O.
//!
//! An entry that is not the end of a request or connection (periodic and start entries of
//! long streams) is skipped, not counted: its final entry will be.

use bytes::Bytes;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::Identifier;
use prost::Message;

use crate::flow::{Direction, FlowRecord, Protocol, Reporter, ResponseFlags};
use crate::identity::{Evidence, Interner, MeshConfig, NodeContext, Resolver, Side, UNKNOWN, reporter};
use crate::wire::{
    AlsMessageWire, CertificateWire, CommonWire, DurationWire, HttpEntryWire, TcpEntryWire, TimestampWire,
};

/// Why an entry (or a whole message) was not counted. Each is a label value of
/// `meshwatch_als_entries_rejected_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Not a valid protobuf entry.
    Malformed,
    /// No `start_time`: the entry cannot be placed in a window.
    MissingTime,
    /// Sent on a stream whose identifier never arrived, so the reporter is unknown.
    NoIdentifier,
    /// For a window that is already closed.
    Late,
    /// Too far ahead of the clock to be true.
    Future,
    /// Dropped because the pipeline queue stayed full.
    QueueFull,
    /// An OpenTelemetry record of an HTTP request without a response code: its status class
    /// cannot be told.
    MissingStatus,
    /// An OpenTelemetry record with nothing that names a peer (no upstream cluster or host,
    /// no downstream address, no certificate): it would be a pair of `unknown`s.
    MissingPeer,
}

impl Rejection {
    pub const ALL: [Rejection; 8] = [
        Rejection::Malformed,
        Rejection::MissingTime,
        Rejection::NoIdentifier,
        Rejection::Late,
        Rejection::Future,
        Rejection::QueueFull,
        Rejection::MissingStatus,
        Rejection::MissingPeer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::MissingTime => "missing_time",
            Rejection::NoIdentifier => "no_identifier",
            Rejection::Late => "late",
            Rejection::Future => "future",
            Rejection::QueueFull => "queue_full",
            Rejection::MissingStatus => "missing_status",
            Rejection::MissingPeer => "missing_peer",
        }
    }
}

/// What became of one entry.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Record(FlowRecord),
    /// A start or periodic entry of a request or connection that has not ended.
    Intermediate,
    Rejected(Rejection),
}

/// Decodes a stream identifier (node and log name).
pub fn identifier(bytes: Bytes) -> Result<Identifier, prost::DecodeError> {
    Identifier::decode(bytes)
}

/// Envoy's `AccessLogType` values that end a request or connection; `NotSet` is what Envoys
/// older than the field send, where `intermediate_log_entry` marks the periodic ones.
fn is_final(common: &CommonWire) -> bool {
    const NOT_SET: i32 = 0;
    const TCP_CONNECTION_END: i32 = 3;
    const DOWNSTREAM_END: i32 = 6;
    const UDP_SESSION_END: i32 = 13;
    match common.access_log_type {
        NOT_SET => !common.intermediate_log_entry,
        TCP_CONNECTION_END | DOWNSTREAM_END | UDP_SESSION_END => true,
        _ => false,
    }
}

fn timestamp_ms(t: TimestampWire) -> i64 {
    t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos) / 1_000_000)
}

/// A duration in microseconds; negative durations (a broken clock) are not durations.
fn duration_us(d: DurationWire) -> Option<u64> {
    let us = d.seconds.checked_mul(1_000_000)?.checked_add(i64::from(d.nanos) / 1000)?;
    u64::try_from(us).ok()
}

/// The fields shared by HTTP and TCP entries, decided.
struct Common {
    end_ms: i64,
    duration_us: Option<u64>,
    flags: ResponseFlags,
}

fn common_fields(common: &CommonWire) -> Result<Common, Rejection> {
    let start = common.start_time.ok_or(Rejection::MissingTime)?;
    let duration_us = common.duration.or(common.time_to_last_downstream_tx_byte).and_then(duration_us);
    let start_ms = timestamp_ms(start);
    let duration_ms = i64::try_from(duration_us.unwrap_or(0) / 1000).unwrap_or(i64::MAX);
    Ok(Common {
        end_ms: start_ms.saturating_add(duration_ms),
        duration_us,
        flags: ResponseFlags(common.response_flags.map_or(0, |f| f.bits)),
    })
}

fn evidence<'a>(common: &'a CommonWire, authority: &'a [u8]) -> Evidence<'a> {
    let tls = common.tls_properties.as_ref();
    Evidence {
        peer_certificate: tls.and_then(|t| t.peer_certificate_properties.as_ref()),
        local_certificate: tls.and_then(|t| t.local_certificate_properties.as_ref()),
        filter_state: &common.filter_state_objects,
        downstream_address: common
            .downstream_remote_address
            .as_ref()
            .or(common.downstream_direct_remote_address.as_ref()),
        upstream_address: common.upstream_remote_address.as_ref(),
        upstream_cluster: &common.upstream_cluster,
        authority,
        upstream_peer: None,
    }
}

/// The downstream presented a certificate: a mutual-TLS hop.
fn is_mtls(common: &CommonWire) -> bool {
    common
        .tls_properties
        .as_ref()
        .and_then(|t| t.peer_certificate_properties.as_ref())
        .is_some_and(|c| !c.subject_alt_name.is_empty() || !c.subject.is_empty())
}

/// What an HTTP or a TCP entry adds to the fields they share.
pub(crate) struct Specific<'a> {
    pub(crate) protocol: Protocol,
    /// HTTP `:authority`, or the TLS SNI for TCP.
    pub(crate) authority: &'a [u8],
    /// HTTP `:path` (empty for TCP).
    pub(crate) path: &'a [u8],
    pub(crate) code: u32,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
}

/// Decides a record from the shared fields and what the entry kind adds (and the upstream's
/// certificate, where the log carries it).
pub(crate) fn record(
    common: &CommonWire,
    specific: Specific<'_>,
    upstream_peer: Option<&CertificateWire>,
    node: &NodeContext,
    resolver: &mut Resolver<'_, '_>,
) -> Outcome {
    if !is_final(common) {
        return Outcome::Intermediate;
    }
    let fields = match common_fields(common) {
        Ok(f) => f,
        Err(r) => return Outcome::Rejected(r),
    };
    let ev = Evidence { upstream_peer, ..evidence(common, specific.authority) };
    let rep = reporter(node, &ev);
    let source = resolver.source(rep, node, &ev);
    // A request a gateway had no route for ended at the gateway: it is the destination the
    // client reached, not an unresolved one.
    let unrouted =
        rep == Reporter::Gateway && fields.flags.contains(ResponseFlags::NO_ROUTE) && ev.upstream_cluster.is_empty();
    let destination = if unrouted {
        Side { identity: node.identity.clone(), inside: true }
    } else {
        resolver.destination(rep, node, &ev)
    };
    Outcome::Record(FlowRecord {
        end_ms: fields.end_ms,
        reporter: rep,
        direction: Direction::from_sides(source.inside, destination.inside),
        source: source.identity,
        destination: destination.identity,
        protocol: specific.protocol,
        response_code: u16::try_from(specific.code).unwrap_or(0),
        response_flags: fields.flags,
        duration_us: fields.duration_us,
        bytes_sent: specific.bytes_sent,
        bytes_received: specific.bytes_received,
        mtls: is_mtls(common),
        not_found_path: if specific.code == 404 { crate::flow::path_hash(specific.path) } else { 0 },
    })
}

/// One encoded `HTTPAccessLogEntry`.
pub fn http_entry(raw: Bytes, node: &NodeContext, resolver: &mut Resolver<'_, '_>) -> Outcome {
    let Ok(entry) = HttpEntryWire::decode(raw) else {
        return Outcome::Rejected(Rejection::Malformed);
    };
    let request = entry.request.as_ref();
    let response = entry.response.as_ref();
    let specific = Specific {
        protocol: Protocol::Http,
        authority: request.map_or(&[][..], |r| &r.authority[..]),
        path: request.map_or(&[][..], |r| &r.path[..]),
        code: response.and_then(|r| r.response_code).map_or(0, |c| c.value),
        bytes_sent: request.map_or(0, |r| r.request_headers_bytes.saturating_add(r.request_body_bytes)),
        bytes_received: response.map_or(0, |r| r.response_headers_bytes.saturating_add(r.response_body_bytes)),
    };
    record(entry.common_properties.as_ref().unwrap_or(&CommonWire::default()), specific, None, node, resolver)
}

/// One encoded `TCPAccessLogEntry`.
pub fn tcp_entry(raw: Bytes, node: &NodeContext, resolver: &mut Resolver<'_, '_>) -> Outcome {
    let Ok(entry) = TcpEntryWire::decode(raw) else {
        return Outcome::Rejected(Rejection::Malformed);
    };
    let common = entry.common_properties.unwrap_or_default();
    let conn = entry.connection_properties.unwrap_or_default();
    let specific = Specific {
        protocol: Protocol::Tcp,
        authority: common.tls_properties.as_ref().map_or(&[][..], |t| &t.tls_sni_hostname[..]),
        path: &[],
        code: 0,
        bytes_sent: conn.received_bytes,
        bytes_received: conn.sent_bytes,
    };
    record(&common, specific, None, node, resolver)
}

/// What decoding one message counted. Index 0 is HTTP, 1 is TCP; `unresolved` is
/// [source, destination].
#[derive(Debug, Default, PartialEq)]
pub struct Tally {
    /// Set when the whole message was unusable (`malformed`, `malformed_identifier`,
    /// `unproven_identity`).
    pub message_rejected: Option<&'static str>,
    /// The identity a node claimed without its certificate proving it.
    pub unproven: Option<std::sync::Arc<str>>,
    pub received: [u64; 2],
    pub decoded: [u64; 2],
    pub intermediate: [u64; 2],
    pub rejected: Vec<(Rejection, u64)>,
    pub unresolved: [u64; 2],
}

impl Tally {
    pub(crate) fn reject(&mut self, reason: Rejection, n: u64) {
        match self.rejected.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, count)) => *count += n,
            None => self.rejected.push((reason, n)),
        }
    }

    pub(crate) fn count(&mut self, protocol: usize, outcome: Outcome, records: &mut Vec<FlowRecord>) {
        match outcome {
            Outcome::Record(r) => {
                self.decoded[protocol] += 1;
                self.unresolved[0] += u64::from(&*r.source == UNKNOWN);
                self.unresolved[1] += u64::from(&*r.destination == UNKNOWN);
                records.push(r);
            }
            Outcome::Intermediate => self.intermediate[protocol] += 1,
            Outcome::Rejected(reason) => self.reject(reason, 1),
        }
    }
}

/// Decodes the messages of one access-log stream, in order. Envoy sends the node only in a
/// stream's first message; the decoder keeps it, and interns identities, for the rest.
#[derive(Debug)]
pub struct StreamDecoder {
    node: Option<NodeContext>,
    interner: Interner,
    /// The identities the client's certificate proves, when its node must be one of them.
    proven: Option<crate::als::ProvenIdentities>,
}

/// `Tally::message_rejected` when a node claims an identity its client certificate does not
/// prove; the stream ends there.
pub const UNPROVEN_IDENTITY: &str = "unproven_identity";

impl StreamDecoder {
    pub fn new(interner_capacity: usize) -> StreamDecoder {
        StreamDecoder { node: None, interner: Interner::new(interner_capacity), proven: None }
    }

    /// A decoder whose node must be one of `proven`: an identifier naming another identity
    /// is rejected (`UNPROVEN_IDENTITY`) and nothing of the stream is decoded.
    pub fn bound(interner_capacity: usize, proven: Option<crate::als::ProvenIdentities>) -> StreamDecoder {
        StreamDecoder { proven, ..StreamDecoder::new(interner_capacity) }
    }

    /// One encoded `StreamAccessLogsMessage` into flow records, and what was counted.
    pub fn message(&mut self, mesh: &MeshConfig, bytes: Bytes) -> (Vec<FlowRecord>, Tally) {
        let mut tally = Tally::default();
        let Ok(wire) = AlsMessageWire::decode(bytes) else {
            tally.message_rejected = Some("malformed");
            return (Vec::new(), tally);
        };
        if let Some(raw) = wire.identifier {
            match identifier(raw) {
                Ok(id) => {
                    let node = NodeContext::new(id.node.as_ref(), &id.log_name, mesh);
                    if self.proven.as_ref().is_some_and(|p| !p.proves(&node.identity)) {
                        tally.message_rejected = Some(UNPROVEN_IDENTITY);
                        tally.unproven = Some(node.identity);
                        self.node = None;
                        return (Vec::new(), tally);
                    }
                    self.node = Some(node);
                }
                Err(_) => tally.message_rejected = Some("malformed_identifier"),
            }
        }
        let http = wire.http_logs.map(|e| e.log_entry).unwrap_or_default();
        let tcp = wire.tcp_logs.map(|e| e.log_entry).unwrap_or_default();
        tally.received = [http.len() as u64, tcp.len() as u64];
        let Some(node) = self.node.as_ref() else {
            tally.reject(Rejection::NoIdentifier, (http.len() + tcp.len()) as u64);
            return (Vec::new(), tally);
        };
        let mut records = Vec::with_capacity(http.len() + tcp.len());
        let mut resolver = Resolver { mesh, interner: &mut self.interner };
        for raw in http {
            tally.count(0, http_entry(raw, node, &mut resolver), &mut records);
        }
        for raw in tcp {
            tally.count(1, tcp_entry(raw, node, &mut resolver), &mut records);
        }
        (records, tally)
    }
}

#[cfg(test)]
#[allow(deprecated)] // old Envoys' `intermediate_log_entry` is part of what is tested
mod tests {
    use super::*;
    use crate::flow::Reporter;
    use crate::identity::{Interner, MeshConfig};
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::data::accesslog::v3 as al;
    use envoy_types::pb::google::protobuf::{Duration, Timestamp};

    fn socket(ip: &str) -> Option<core::Address> {
        Some(core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: ip.into(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(1)),
                ..Default::default()
            })),
        })
    }

    fn base_common() -> al::AccessLogCommon {
        al::AccessLogCommon {
            start_time: Some(Timestamp { seconds: 1_000, nanos: 250_000_000 }),
            duration: Some(Duration { seconds: 0, nanos: 12_000_000 }),
            downstream_remote_address: socket("10.0.0.5"),
            upstream_remote_address: socket("10.0.0.6"),
            upstream_cluster: "backend".into(),
            access_log_type: al::AccessLogType::DownstreamEnd as i32,
            ..Default::default()
        }
    }

    fn http(common: al::AccessLogCommon, code: Option<u32>) -> Bytes {
        al::HttpAccessLogEntry {
            common_properties: Some(common),
            protocol_version: 2,
            request: Some(al::HttpRequestProperties {
                authority: "backend".into(),
                path: "/admin/.env?probe=1".into(),
                request_headers_bytes: 100,
                request_body_bytes: 11,
                ..Default::default()
            }),
            response: Some(al::HttpResponseProperties {
                response_code: code.map(|value| envoy_types::pb::google::protobuf::UInt32Value { value }),
                response_headers_bytes: 50,
                response_body_bytes: 7,
                ..Default::default()
            }),
        }
        .encode_to_vec()
        .into()
    }

    fn run(raw: Bytes, tcp: bool) -> Outcome {
        let mesh = MeshConfig::default();
        let node = NodeContext::new(
            Some(&core::Node { id: "web-1".into(), cluster: "web".into(), ..Default::default() }),
            "outbound",
            &mesh,
        );
        let mut interner = Interner::new(16);
        let mut resolver = Resolver { mesh: &mesh, interner: &mut interner };
        if tcp { tcp_entry(raw, &node, &mut resolver) } else { http_entry(raw, &node, &mut resolver) }
    }

    fn record(o: Outcome) -> FlowRecord {
        match o {
            Outcome::Record(r) => r,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    #[test]
    fn a_404_keeps_a_hash_of_its_path_without_the_query() {
        assert_eq!(
            record(run(http(base_common(), Some(404)), false)).not_found_path,
            crate::flow::path_hash(b"/admin/.env")
        );
        assert_eq!(record(run(http(base_common(), Some(200)), false)).not_found_path, 0);
        assert_ne!(crate::flow::path_hash(b"/a"), crate::flow::path_hash(b"/b"));
        assert_ne!(crate::flow::path_hash(b""), 0);
    }

    #[test]
    fn a_request_a_gateway_had_no_route_for_ends_at_the_gateway_not_at_unknown() {
        let mesh = MeshConfig::default();
        let gw = core::Node { id: "edge-gateway-1".into(), cluster: "edge-gateway".into(), ..Default::default() };
        let node = NodeContext::new(Some(&gw), "ingress", &mesh);
        let mut interner = Interner::new(16);
        let mut resolver = Resolver { mesh: &mesh, interner: &mut interner };
        let unrouted = al::AccessLogCommon {
            upstream_cluster: String::new(),
            upstream_remote_address: None,
            downstream_remote_address: socket("203.0.113.9"),
            response_flags: Some(al::ResponseFlags { no_route_found: true, ..Default::default() }),
            ..base_common()
        };
        let r = record(http_entry(http(unrouted, Some(404)), &node, &mut resolver));
        assert_eq!((r.reporter, &*r.source, &*r.destination), (Reporter::Gateway, "external", "edge-gateway"));
        assert_eq!(r.direction, Direction::Ingress);
        let mut tally = Tally::default();
        let mut records = Vec::new();
        tally.count(0, Outcome::Record(r), &mut records);
        assert_eq!(tally.unresolved, [0, 0]);
    }

    #[test]
    fn http_entry_becomes_a_record() {
        let r = record(run(http(base_common(), Some(503)), false));
        assert_eq!(r.end_ms, 1_000_262);
        assert_eq!(r.reporter, Reporter::Source);
        assert_eq!((&*r.source, &*r.destination), ("web", "backend"));
        assert_eq!(r.direction, Direction::EastWest);
        assert_eq!(r.response_code, 503);
        assert_eq!(r.duration_us, Some(12_000));
        assert_eq!((r.bytes_sent, r.bytes_received), (111, 57));
        assert!(!r.mtls);
    }

    #[test]
    fn entry_types_that_are_not_the_end_are_skipped() {
        use al::AccessLogType as T;
        let cases = [
            (T::NotSet, false, true),
            (T::NotSet, true, false),
            (T::DownstreamEnd, false, true),
            (T::DownstreamStart, false, false),
            (T::DownstreamPeriodic, false, false),
            (T::UpstreamPoolReady, false, false),
            (T::UpstreamPeriodic, false, false),
            (T::UpstreamEnd, false, false),
            (T::TcpPeriodic, false, false),
            (T::TcpUpstreamConnected, false, false),
            (T::TcpConnectionEnd, false, true),
        ];
        for (kind, intermediate, counted) in cases {
            let common = al::AccessLogCommon {
                access_log_type: kind as i32,
                intermediate_log_entry: intermediate,
                ..base_common()
            };
            let got = run(http(common, Some(200)), false);
            assert_eq!(matches!(got, Outcome::Record(_)), counted, "{kind:?} intermediate={intermediate}");
            if !counted {
                assert_eq!(got, Outcome::Intermediate);
            }
        }
    }

    #[test]
    fn old_envoy_fields_give_the_duration() {
        let common = al::AccessLogCommon {
            duration: None,
            time_to_last_downstream_tx_byte: Some(Duration { seconds: 1, nanos: 500_000_000 }),
            access_log_type: 0,
            ..base_common()
        };
        assert_eq!(record(run(http(common, Some(200)), false)).duration_us, Some(1_500_000));
    }

    #[test]
    fn missing_fields() {
        let no_time = al::AccessLogCommon { start_time: None, ..base_common() };
        assert_eq!(run(http(no_time, Some(200)), false), Outcome::Rejected(Rejection::MissingTime));
        let no_code = record(run(http(base_common(), None), false));
        assert_eq!(no_code.response_code, 0);
        assert_eq!(no_code.status_class(), crate::flow::StatusClass::None);
        let no_addresses = al::AccessLogCommon {
            downstream_remote_address: None,
            upstream_remote_address: None,
            upstream_cluster: String::new(),
            ..base_common()
        };
        let r = record(run(http(no_addresses, Some(404)), false));
        assert_eq!(&*r.destination, crate::identity::UNKNOWN);
        let empty = record(run(
            al::HttpAccessLogEntry {
                common_properties: Some(al::AccessLogCommon {
                    start_time: Some(Timestamp { seconds: 5, nanos: 0 }),
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec()
            .into(),
            false,
        ));
        assert_eq!((empty.end_ms, empty.duration_us, empty.bytes_sent), (5_000, None, 0));
    }

    /// One access-log message from a node named `cluster`, with one HTTP entry.
    fn stream_message(cluster: &str) -> Bytes {
        use envoy_types::pb::envoy::service::accesslog::v3::{
            StreamAccessLogsMessage, stream_access_logs_message as sm,
        };
        let entry = al::HttpAccessLogEntry { common_properties: Some(base_common()), ..Default::default() };
        StreamAccessLogsMessage {
            identifier: Some(sm::Identifier {
                node: Some(core::Node { id: "web-1".into(), cluster: cluster.into(), ..Default::default() }),
                log_name: "outbound".into(),
            }),
            log_entries: Some(sm::LogEntries::HttpLogs(sm::HttpAccessLogEntries { log_entry: vec![entry] })),
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn a_bound_stream_takes_only_a_node_its_certificate_proves() {
        let mesh = MeshConfig::default();
        let proven = || Some(crate::als::ProvenIdentities(vec!["spiffe://t/ns/a/sa/web".to_string()].into()));
        let mut honest = StreamDecoder::bound(16, proven());
        let (records, tally) = honest.message(&mesh, stream_message("spiffe://t/ns/a/sa/web"));
        assert_eq!((records.len(), tally.message_rejected, tally.unproven), (1, None, None));
        let mut forger = StreamDecoder::bound(16, proven());
        let (records, tally) = forger.message(&mesh, stream_message("spiffe://t/ns/a/sa/db"));
        assert!(records.is_empty());
        assert_eq!(tally.message_rejected, Some(UNPROVEN_IDENTITY));
        assert_eq!(tally.unproven.as_deref(), Some("spiffe://t/ns/a/sa/db"));
        // A certificate without URI SANs proves nothing; an unbound stream takes any node.
        let (records, _) = StreamDecoder::bound(16, Some(crate::als::ProvenIdentities(Vec::new().into())))
            .message(&mesh, stream_message("spiffe://t/ns/a/sa/web"));
        assert!(records.is_empty());
        let (records, _) = StreamDecoder::new(16).message(&mesh, stream_message("spiffe://t/ns/a/sa/db"));
        assert_eq!(records.len(), 1);
    }

    #[test]
    fn garbage_is_malformed() {
        let garbage = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]);
        assert_eq!(run(garbage.clone(), false), Outcome::Rejected(Rejection::Malformed));
        assert_eq!(run(garbage, true), Outcome::Rejected(Rejection::Malformed));
    }

    #[test]
    fn tcp_entry_counts_bytes_from_the_downstream_view() {
        let raw: Bytes = al::TcpAccessLogEntry {
            common_properties: Some(al::AccessLogCommon {
                access_log_type: al::AccessLogType::TcpConnectionEnd as i32,
                ..base_common()
            }),
            connection_properties: Some(al::ConnectionProperties { received_bytes: 300, sent_bytes: 4000 }),
        }
        .encode_to_vec()
        .into();
        let r = record(run(raw, true));
        assert_eq!(r.protocol, Protocol::Tcp);
        assert_eq!((r.bytes_sent, r.bytes_received), (300, 4000));
    }

    #[test]
    fn invalid_utf8_in_a_skipped_field_does_not_reject_the_entry() {
        // Field 13 of HTTPRequestProperties is a map<string, string> of headers; put a
        // non-UTF-8 value in it by hand, as an Envoy may.
        let mut raw = http(base_common(), Some(200)).to_vec();
        let header_entry: Vec<u8> = [&[0x0a, 0x01, b'x', 0x12, 0x02][..], &[0xc3, 0x28]].concat();
        let mut request_extra = vec![0x6a, header_entry.len() as u8];
        request_extra.extend_from_slice(&header_entry);
        let request = al::HttpRequestProperties { request_headers_bytes: 1, ..Default::default() };
        let mut request_bytes = request.encode_to_vec();
        request_bytes.extend_from_slice(&request_extra);
        raw.push(0x1a);
        raw.push(request_bytes.len() as u8);
        raw.extend_from_slice(&request_bytes);
        assert!(matches!(run(raw.into(), false), Outcome::Record(_)));
    }
}
