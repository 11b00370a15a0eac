//! Lean mirrors of Envoy's access-log protobufs, for decoding on the hot path.
//!
//! Each struct keeps only the fields meshwatch reads, with Envoy's field numbers; everything
//! else (header maps, metadata, timings we do not use) is skipped on the wire without being
//! allocated. Strings are declared as `bytes`, which is wire-compatible with `string`: they are
//! zero-copy slices of the received buffer and are not UTF-8 checked here, so one bad header
//! value cannot make a whole batch undecodable. Text is checked where it becomes a label.
//!
//! The field numbers are tested against the full `envoy-types` messages in `tests` below.

use bytes::Bytes;

/// `envoy.service.accesslog.v3.StreamAccessLogsMessage`, with each entry left encoded so that
/// entries are decoded (and rejected) one by one.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AlsMessageWire {
    /// `Identifier` (node, log_name), still encoded: present in the first message of a stream.
    #[prost(bytes = "bytes", optional, tag = "1")]
    pub identifier: Option<Bytes>,
    #[prost(message, optional, tag = "2")]
    pub http_logs: Option<EntriesWire>,
    #[prost(message, optional, tag = "3")]
    pub tcp_logs: Option<EntriesWire>,
}

/// `HTTPAccessLogEntries` and `TCPAccessLogEntries`: `repeated … log_entry = 1`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EntriesWire {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub log_entry: Vec<Bytes>,
}

/// `envoy.data.accesslog.v3.HTTPAccessLogEntry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpEntryWire {
    #[prost(message, optional, tag = "1")]
    pub common_properties: Option<CommonWire>,
    #[prost(int32, tag = "2")]
    pub protocol_version: i32,
    #[prost(message, optional, tag = "3")]
    pub request: Option<RequestWire>,
    #[prost(message, optional, tag = "4")]
    pub response: Option<ResponseWire>,
}

/// `envoy.data.accesslog.v3.TCPAccessLogEntry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TcpEntryWire {
    #[prost(message, optional, tag = "1")]
    pub common_properties: Option<CommonWire>,
    #[prost(message, optional, tag = "2")]
    pub connection_properties: Option<ConnectionWire>,
}

/// `envoy.data.accesslog.v3.ConnectionProperties`; both counts are seen from the downstream side.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct ConnectionWire {
    #[prost(uint64, tag = "1")]
    pub received_bytes: u64,
    #[prost(uint64, tag = "2")]
    pub sent_bytes: u64,
}

/// `envoy.data.accesslog.v3.AccessLogCommon`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommonWire {
    #[prost(message, optional, tag = "2")]
    pub downstream_remote_address: Option<AddressWire>,
    #[prost(message, optional, tag = "4")]
    pub tls_properties: Option<TlsWire>,
    #[prost(message, optional, tag = "5")]
    pub start_time: Option<TimestampWire>,
    /// Older Envoys have no `duration`; this is the closest stand-in they send.
    #[prost(message, optional, tag = "12")]
    pub time_to_last_downstream_tx_byte: Option<DurationWire>,
    #[prost(message, optional, tag = "13")]
    pub upstream_remote_address: Option<AddressWire>,
    #[prost(bytes = "bytes", tag = "15")]
    pub upstream_cluster: Bytes,
    #[prost(message, optional, tag = "16")]
    pub response_flags: Option<ResponseFlagsWire>,
    #[prost(message, optional, tag = "20")]
    pub downstream_direct_remote_address: Option<AddressWire>,
    /// `map<string, google.protobuf.Any>`: a map is a repeated entry message on the wire.
    #[prost(message, repeated, tag = "21")]
    pub filter_state_objects: Vec<FilterStateWire>,
    #[prost(message, optional, tag = "23")]
    pub duration: Option<DurationWire>,
    /// Deprecated in favour of `access_log_type`; still sent by older Envoys.
    #[prost(bool, tag = "27")]
    pub intermediate_log_entry: bool,
    #[prost(int32, tag = "33")]
    pub access_log_type: i32,
}

/// One entry of `filter_state_objects`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FilterStateWire {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyWire>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyWire {
    #[prost(bytes = "bytes", tag = "1")]
    pub type_url: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

/// `envoy.config.core.v3.Address`; only socket addresses carry what we need.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddressWire {
    #[prost(message, optional, tag = "1")]
    pub socket_address: Option<SocketAddressWire>,
}

/// `envoy.config.core.v3.SocketAddress`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SocketAddressWire {
    #[prost(bytes = "bytes", tag = "2")]
    pub address: Bytes,
    #[prost(uint32, tag = "3")]
    pub port_value: u32,
}

/// `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct TimestampWire {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `google.protobuf.Duration`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct DurationWire {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `envoy.data.accesslog.v3.TLSProperties` (of the downstream connection).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TlsWire {
    #[prost(int32, tag = "1")]
    pub tls_version: i32,
    #[prost(bytes = "bytes", tag = "3")]
    pub tls_sni_hostname: Bytes,
    #[prost(message, optional, tag = "4")]
    pub local_certificate_properties: Option<CertificateWire>,
    #[prost(message, optional, tag = "5")]
    pub peer_certificate_properties: Option<CertificateWire>,
}

/// `TLSProperties.CertificateProperties`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CertificateWire {
    #[prost(message, repeated, tag = "1")]
    pub subject_alt_name: Vec<SanWire>,
    #[prost(bytes = "bytes", tag = "2")]
    pub subject: Bytes,
}

/// `CertificateProperties.SubjectAltName` (a oneof of `uri` and `dns`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SanWire {
    #[prost(bytes = "bytes", tag = "1")]
    pub uri: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub dns: Bytes,
}

/// `envoy.data.accesslog.v3.HTTPRequestProperties`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestWire {
    #[prost(bytes = "bytes", tag = "3")]
    pub authority: Bytes,
    #[prost(bytes = "bytes", tag = "5")]
    pub path: Bytes,
    #[prost(uint64, tag = "11")]
    pub request_headers_bytes: u64,
    #[prost(uint64, tag = "12")]
    pub request_body_bytes: u64,
}

/// `envoy.data.accesslog.v3.HTTPResponseProperties`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseWire {
    /// `google.protobuf.UInt32Value`: absent when Envoy sent no response.
    #[prost(message, optional, tag = "1")]
    pub response_code: Option<UInt32Wire>,
    #[prost(uint64, tag = "2")]
    pub response_headers_bytes: u64,
    #[prost(uint64, tag = "3")]
    pub response_body_bytes: u64,
}

/// `google.protobuf.UInt32Value`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct UInt32Wire {
    #[prost(uint32, tag = "1")]
    pub value: u32,
}

/// `envoy.data.accesslog.v3.ResponseFlags`: one bool per flag, field numbers 1 to 28, with
/// field 13 a message (`unauthorized_details`). Decoded by hand into a bit set, since a
/// derive would need 28 named fields.
#[derive(Clone, Copy, PartialEq, Default, Debug)]
pub struct ResponseFlagsWire {
    /// Bit `n - 1` is set when field `n` was true; field 13 sets its bit when present.
    pub bits: u32,
}

impl prost::Message for ResponseFlagsWire {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        for tag in 1..=28u32 {
            if self.bits & (1 << (tag - 1)) != 0 {
                if tag == 13 {
                    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
                    prost::encoding::encode_varint(0, buf);
                } else {
                    prost::encoding::bool::encode(tag, &true, buf);
                }
            }
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            13 => {
                prost::encoding::skip_field(wire_type, tag, buf, ctx)?;
                self.bits |= 1 << 12;
                Ok(())
            }
            1..=28 => {
                let mut value = false;
                prost::encoding::bool::merge(wire_type, &mut value, buf, ctx)?;
                if value {
                    self.bits |= 1 << (tag - 1);
                }
                Ok(())
            }
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        // Each set flag is its key and one value byte (field 13: its key and a zero length).
        (1..=28u32).filter(|tag| self.bits & (1 << (tag - 1)) != 0).map(|tag| prost::encoding::key_len(tag) + 1).sum()
    }

    fn clear(&mut self) {
        self.bits = 0;
    }
}

#[cfg(test)]
#[allow(deprecated)] // old Envoys' `intermediate_log_entry` is part of what is tested
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::data::accesslog::v3 as al;
    use envoy_types::pb::envoy::service::accesslog::v3 as svc;
    use prost::Message;

    fn socket(address: &str, port: u32) -> core::Address {
        core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: address.into(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }
    }

    fn san_uri(uri: &str) -> al::tls_properties::certificate_properties::SubjectAltName {
        al::tls_properties::certificate_properties::SubjectAltName {
            san: Some(al::tls_properties::certificate_properties::subject_alt_name::San::Uri(uri.into())),
        }
    }

    #[test]
    fn http_entry_fields_match_envoy_numbering() {
        let common = al::AccessLogCommon {
            downstream_remote_address: Some(socket("10.1.2.3", 41000)),
            upstream_remote_address: Some(socket("10.9.9.9", 8080)),
            downstream_direct_remote_address: Some(socket("10.1.2.4", 41001)),
            start_time: Some(envoy_types::pb::google::protobuf::Timestamp { seconds: 1_700_000_000, nanos: 5 }),
            duration: Some(envoy_types::pb::google::protobuf::Duration { seconds: 1, nanos: 7 }),
            time_to_last_downstream_tx_byte: Some(envoy_types::pb::google::protobuf::Duration { seconds: 2, nanos: 0 }),
            upstream_cluster: "outbound|9080||reviews.shop.svc.cluster.local".into(),
            response_flags: Some(al::ResponseFlags {
                upstream_request_timeout: true,
                downstream_remote_reset: true,
                unauthorized_details: Some(al::response_flags::Unauthorized { reason: 1 }),
                ..Default::default()
            }),
            tls_properties: Some(al::TlsProperties {
                tls_version: al::tls_properties::TlsVersion::TlSv13 as i32,
                tls_sni_hostname: "reviews.shop".into(),
                peer_certificate_properties: Some(al::tls_properties::CertificateProperties {
                    subject_alt_name: vec![san_uri("spiffe://td/ns/shop/sa/web")],
                    subject: "CN=web".into(),
                    issuer: "CN=ca".into(),
                }),
                local_certificate_properties: Some(al::tls_properties::CertificateProperties {
                    subject_alt_name: vec![san_uri("spiffe://td/ns/shop/sa/reviews")],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            intermediate_log_entry: true,
            access_log_type: al::AccessLogType::DownstreamEnd as i32,
            route_name: "skipped".into(),
            ..Default::default()
        };
        let entry = al::HttpAccessLogEntry {
            common_properties: Some(common),
            protocol_version: 3,
            request: Some(al::HttpRequestProperties {
                authority: "reviews:9080".into(),
                path: "/skipped".into(),
                request_headers_bytes: 120,
                request_body_bytes: 30,
                request_headers: [("x-skipped".to_string(), "v".to_string())].into(),
                ..Default::default()
            }),
            response: Some(al::HttpResponseProperties {
                response_code: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 503 }),
                response_headers_bytes: 80,
                response_body_bytes: 19,
                ..Default::default()
            }),
        };
        let wire = HttpEntryWire::decode(entry.encode_to_vec().as_slice()).expect("decodes");
        let c = wire.common_properties.expect("common");
        assert_eq!(wire.protocol_version, 3);
        let down = c.downstream_remote_address.and_then(|a| a.socket_address).expect("addr");
        assert_eq!(&down.address[..], b"10.1.2.3");
        assert_eq!(down.port_value, 41000);
        let up = c.upstream_remote_address.and_then(|a| a.socket_address).expect("addr");
        assert_eq!(&up.address[..], b"10.9.9.9");
        assert_eq!(c.start_time, Some(TimestampWire { seconds: 1_700_000_000, nanos: 5 }));
        assert_eq!(c.duration, Some(DurationWire { seconds: 1, nanos: 7 }));
        assert_eq!(c.time_to_last_downstream_tx_byte.map(|d| d.seconds), Some(2));
        assert_eq!(&c.upstream_cluster[..], b"outbound|9080||reviews.shop.svc.cluster.local");
        // upstream_request_timeout = 3, unauthorized_details = 13, downstream_remote_reset = 28
        assert_eq!(c.response_flags.map(|f| f.bits), Some((1 << 2) | (1 << 12) | (1 << 27)));
        let tls = c.tls_properties.expect("tls");
        assert_eq!(tls.tls_version, 4);
        assert_eq!(&tls.tls_sni_hostname[..], b"reviews.shop");
        let peer = tls.peer_certificate_properties.expect("peer");
        assert_eq!(&peer.subject_alt_name[0].uri[..], b"spiffe://td/ns/shop/sa/web");
        assert_eq!(&peer.subject[..], b"CN=web");
        let local = tls.local_certificate_properties.expect("local");
        assert_eq!(&local.subject_alt_name[0].uri[..], b"spiffe://td/ns/shop/sa/reviews");
        assert!(c.intermediate_log_entry);
        assert_eq!(c.access_log_type, al::AccessLogType::DownstreamEnd as i32);
        let req = wire.request.expect("request");
        assert_eq!(&req.authority[..], b"reviews:9080");
        assert_eq!((req.request_headers_bytes, req.request_body_bytes), (120, 30));
        let resp = wire.response.expect("response");
        assert_eq!(resp.response_code.map(|c| c.value), Some(503));
        assert_eq!((resp.response_headers_bytes, resp.response_body_bytes), (80, 19));
    }

    #[test]
    fn filter_state_map_decodes_as_repeated_entries() {
        let common = al::AccessLogCommon {
            filter_state_objects: [(
                "downstream_peer".to_string(),
                envoy_types::pb::google::protobuf::Any {
                    type_url: "type.googleapis.com/google.protobuf.Struct".into(),
                    value: vec![1, 2, 3],
                },
            )]
            .into(),
            ..Default::default()
        };
        let wire = CommonWire::decode(common.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(wire.filter_state_objects.len(), 1);
        assert_eq!(&wire.filter_state_objects[0].key[..], b"downstream_peer");
        let any = wire.filter_state_objects[0].value.clone().expect("value");
        assert_eq!(&any.value[..], &[1, 2, 3]);
    }

    #[test]
    fn stream_message_keeps_entries_encoded() {
        let msg = svc::StreamAccessLogsMessage {
            identifier: Some(svc::stream_access_logs_message::Identifier {
                node: Some(core::Node { id: "n1".into(), ..Default::default() }),
                log_name: "outbound".into(),
            }),
            log_entries: Some(svc::stream_access_logs_message::LogEntries::TcpLogs(
                svc::stream_access_logs_message::TcpAccessLogEntries {
                    log_entry: vec![
                        al::TcpAccessLogEntry {
                            connection_properties: Some(al::ConnectionProperties { received_bytes: 7, sent_bytes: 9 }),
                            ..Default::default()
                        };
                        2
                    ],
                },
            )),
        };
        let wire = AlsMessageWire::decode(msg.encode_to_vec().as_slice()).expect("decodes");
        assert!(wire.identifier.is_some());
        assert!(wire.http_logs.is_none());
        let tcp = wire.tcp_logs.expect("tcp");
        assert_eq!(tcp.log_entry.len(), 2);
        let entry = TcpEntryWire::decode(tcp.log_entry[1].clone()).expect("entry");
        assert_eq!(entry.connection_properties, Some(ConnectionWire { received_bytes: 7, sent_bytes: 9 }));
    }

    #[test]
    fn response_flags_round_trip_through_the_hand_written_codec() {
        let flags = ResponseFlagsWire { bits: (1 << 0) | (1 << 12) | (1 << 27) };
        let bytes = flags.encode_to_vec();
        assert_eq!(bytes.len(), flags.encoded_len());
        assert_eq!(ResponseFlagsWire::decode(bytes.as_slice()).expect("decodes"), flags);
    }
}
