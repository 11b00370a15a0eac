//! Who is on each side of a flow, and whether that side is inside the trust boundary.
//!
//! Evidence is taken strongest first (README "Identities and directions"): the SPIFFE ID of a
//! peer certificate, Istio peer metadata in filter state, the reporting node itself, configured
//! address and cluster → service mappings, Istio cluster names, the authority of external
//! requests; otherwise `unknown`, which the caller counts.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, value::Kind};
use ipnet::IpNet;
use prost::Message;

use crate::flow::{Identity, Reporter};
use crate::wire::{AddressWire, CertificateWire, FilterStateWire};

/// The identity of a side that no evidence names.
pub const UNKNOWN: &str = "unknown";
/// The identity of a client outside the trust boundary that no mapping names. Individual
/// external addresses are not identities: they would make the pair table unbounded.
pub const EXTERNAL: &str = "external";

/// A glob over names: `*` matches any run of characters, everything else matches itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(glob: impl Into<String>) -> Pattern {
        Pattern(glob.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, name: &[u8]) -> bool {
        glob_match(self.0.as_bytes(), name)
    }
}

/// Iterative `*` glob with single-star backtracking: linear in practice, never recursive.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// An operator-declared service: traffic to these clusters or from or to these addresses is
/// this identity.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceMapping {
    pub name: String,
    pub cidrs: Vec<IpNet>,
    pub clusters: Vec<Pattern>,
    /// Reporting Envoys (by `node.id` or `node.cluster`) that are this service's proxies.
    pub nodes: Vec<Pattern>,
    /// The service lies outside the trust boundary (a partner API, a SaaS endpoint).
    pub external: bool,
}

/// The trust boundary and the naming rules, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshConfig {
    /// SPIFFE trust domains that are inside; the first one names identities built from Istio
    /// metadata (`NAMESPACE` and `SERVICE_ACCOUNT`).
    pub trust_domains: Vec<String>,
    /// Addresses inside the boundary.
    pub internal_cidrs: Vec<IpNet>,
    /// Host-name suffixes inside the boundary, stripped from Istio cluster names
    /// (`outbound|9080||reviews.shop.svc.cluster.local` → `reviews.shop`).
    pub internal_domains: Vec<String>,
    /// Nodes (by `node.id` or `node.cluster`) that are gateways.
    pub gateway_nodes: Vec<Pattern>,
    /// Upstream clusters that lead outside (`PassthroughCluster`, egress clusters).
    pub external_clusters: Vec<Pattern>,
    /// Access-logger `log_name`s of inbound (server-side) listeners.
    pub inbound_log_names: Vec<Pattern>,
    pub services: Vec<ServiceMapping>,
    /// Longer identities are cut to this many bytes (at a character boundary).
    pub max_identity_bytes: usize,
}

impl Default for MeshConfig {
    fn default() -> Self {
        let cidrs =
            ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8", "fc00::/7", "::1/128"];
        MeshConfig {
            trust_domains: vec!["cluster.local".into()],
            internal_cidrs: cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
            internal_domains: vec![".svc.cluster.local".into()],
            gateway_nodes: vec![Pattern::new("router~*"), Pattern::new("*gateway*")],
            external_clusters: vec![Pattern::new("PassthroughCluster")],
            inbound_log_names: vec![Pattern::new("*inbound*")],
            services: Vec::new(),
            max_identity_bytes: 256,
        }
    }
}

/// A resolved side of a flow.
#[derive(Clone, Debug, PartialEq)]
pub struct Side {
    pub identity: Identity,
    pub inside: bool,
}

/// What is known of the proxy that reported a stream, worked out once per stream.
#[derive(Clone, Debug)]
pub struct NodeContext {
    pub node_id: String,
    /// The node's own workload identity.
    pub identity: Identity,
    pub is_gateway: bool,
    /// The stream comes from a logger configured on an inbound listener.
    pub inbound_logger: bool,
}

impl NodeContext {
    /// Builds the context from the stream identifier's node and log name.
    ///
    /// The node's own identity, the first that applies: its `meshwatch_identity` metadata; a
    /// `[[mesh.services]]` entry whose `nodes` match its id or cluster; Istio's metadata
    /// `NAMESPACE` and `SERVICE_ACCOUNT` as the SPIFFE ID its certificate carries;
    /// `WORKLOAD_NAME` and `NAMESPACE` as `workload.namespace` (how a peer is named by the
    /// same metadata); its `node.cluster`; its `node.id`. A namespace missing from the
    /// metadata is read from an Istio node id (`sidecar~IP~POD.NS~NS.svc.cluster.local`).
    pub fn new(node: Option<&Node>, log_name: &str, mesh: &MeshConfig) -> NodeContext {
        let empty = Node::default();
        let node = node.unwrap_or(&empty);
        let identity = node_identity(node, mesh).unwrap_or_else(|| UNKNOWN.to_owned());
        let is_gateway =
            mesh.gateway_nodes.iter().any(|p| p.matches(node.id.as_bytes()) || p.matches(node.cluster.as_bytes()));
        NodeContext {
            node_id: node.id.clone(),
            identity: Arc::from(truncate(&identity, mesh.max_identity_bytes)),
            is_gateway,
            inbound_logger: mesh.inbound_log_names.iter().any(|p| p.matches(log_name.as_bytes())),
        }
    }
}

/// The identity rule of `NodeContext::new`; `None` for a node that says nothing.
fn node_identity(node: &Node, mesh: &MeshConfig) -> Option<String> {
    let meta = node.metadata.as_ref();
    let meta_str = |keys: &[&str]| meta.and_then(|m| struct_str(m, keys));
    if let Some(id) = meta_str(&["meshwatch_identity"]) {
        return Some(id.to_owned());
    }
    let matches = |p: &Pattern| p.matches(node.id.as_bytes()) || p.matches(node.cluster.as_bytes());
    if let Some(svc) = mesh.services.iter().find(|s| s.nodes.iter().any(matches)) {
        return Some(svc.name.clone());
    }
    meta.and_then(|m| istio_identity(m, mesh, istio_node_namespace(&node.id)))
        .or_else(|| [&node.cluster, &node.id].into_iter().find(|s| !s.is_empty()).cloned())
}

/// The namespace of an Istio proxy's node id, `TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN`
/// (`sidecar~10.1.2.3~web-5d8f-x2.shop~shop.svc.cluster.local` → `shop`).
fn istio_node_namespace(id: &str) -> Option<&str> {
    let mut parts = id.split('~');
    let (kind, _ip, pod, domain) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !matches!(kind, "sidecar" | "router" | "waypoint") {
        return None;
    }
    let ns = domain.split('.').next().filter(|ns| !ns.is_empty())?;
    pod.strip_suffix(ns).is_some_and(|p| p.ends_with('.')).then_some(ns)
}

/// `spiffe://<first trust domain>/ns/<ns>/sa/<sa>`.
fn spiffe_id(mesh: &MeshConfig, ns: &str, sa: &str) -> String {
    let td = mesh.trust_domains.first().map_or("cluster.local", String::as_str);
    format!("spiffe://{td}/ns/{ns}/sa/{sa}")
}

/// Looks up the first of `keys` that holds a non-empty string in a protobuf `Struct`.
fn struct_str<'a>(s: &'a Struct, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| match s.fields.get(*k).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(v)) if !v.is_empty() => Some(v.as_str()),
        _ => None,
    })
}

/// The identity Istio metadata names (node metadata in upper case, peer metadata in lower
/// case), one rule for nodes and peers: `NAMESPACE` + `SERVICE_ACCOUNT` as
/// `spiffe://<first trust domain>/ns/<ns>/sa/<sa>`, else `WORKLOAD_NAME` + `NAMESPACE` as
/// `<workload>.<ns>`; `namespace` stands in for a missing `NAMESPACE`.
fn istio_identity(s: &Struct, mesh: &MeshConfig, namespace: Option<&str>) -> Option<String> {
    let ns = struct_str(s, &["NAMESPACE", "namespace"]).or(namespace)?;
    if let Some(sa) = struct_str(s, &["SERVICE_ACCOUNT", "service_account"]) {
        return Some(spiffe_id(mesh, ns, sa));
    }
    let workload = struct_str(s, &["WORKLOAD_NAME", "workload"])?;
    Some(format!("{workload}.{ns}"))
}

/// Bounded interning of identities, so that a flow record costs no allocation for a name
/// that was seen before. When full it starts again empty rather than grow.
#[derive(Debug)]
pub struct Interner {
    names: HashSet<Arc<str>>,
    capacity: usize,
}

impl Interner {
    pub fn new(capacity: usize) -> Interner {
        Interner { names: HashSet::new(), capacity: capacity.max(1) }
    }

    pub fn intern(&mut self, name: &str) -> Identity {
        if let Some(found) = self.names.get(name) {
            return found.clone();
        }
        if self.names.len() >= self.capacity {
            self.names.clear();
        }
        let arc: Arc<str> = Arc::from(name);
        self.names.insert(arc.clone());
        arc
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Wire bytes as text: borrowed when valid UTF-8 (always, from a sane Envoy), else lossy.
fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// The evidence about one entry that identity resolution reads.
#[derive(Debug, Default)]
pub struct Evidence<'a> {
    pub peer_certificate: Option<&'a CertificateWire>,
    pub local_certificate: Option<&'a CertificateWire>,
    pub filter_state: &'a [FilterStateWire],
    pub downstream_address: Option<&'a AddressWire>,
    pub upstream_address: Option<&'a AddressWire>,
    pub upstream_cluster: &'a [u8],
    /// HTTP `:authority`, or the TLS SNI for TCP.
    pub authority: &'a [u8],
    /// The upstream's certificate (Envoy's OpenTelemetry logger can carry its URI SAN; the
    /// gRPC access log cannot).
    pub upstream_peer: Option<&'a CertificateWire>,
}

/// Decides the reporter of an entry.
pub fn reporter(node: &NodeContext, ev: &Evidence<'_>) -> Reporter {
    if node.is_gateway {
        Reporter::Gateway
    } else if ev.upstream_cluster.starts_with(b"inbound|")
        || node.inbound_logger
        || ev.peer_certificate.is_some_and(|c| !c.subject_alt_name.is_empty() || !c.subject.is_empty())
    {
        Reporter::Destination
    } else {
        Reporter::Source
    }
}

/// Resolves identities with a configuration and a per-stream interner.
#[derive(Debug)]
pub struct Resolver<'m, 'i> {
    pub mesh: &'m MeshConfig,
    pub interner: &'i mut Interner,
}

impl<'m> Resolver<'m, '_> {
    fn side(&mut self, name: &str, inside: bool) -> Side {
        let name = truncate(name, self.mesh.max_identity_bytes);
        Side { identity: self.interner.intern(name), inside }
    }

    pub(crate) fn spiffe_side(&mut self, uri: &str) -> Side {
        let inside = spiffe_trust_domain(uri).is_some_and(|td| self.mesh.trust_domains.iter().any(|t| t == td));
        self.side(uri, inside)
    }

    /// The caller.
    pub fn source(&mut self, reporter: Reporter, node: &NodeContext, ev: &Evidence<'_>) -> Side {
        if reporter == Reporter::Source {
            return Side { identity: node.identity.clone(), inside: true };
        }
        if let Some(uri) = ev.peer_certificate.and_then(spiffe_uri) {
            return self.spiffe_side(&text(uri));
        }
        if let Some(name) = self.peer_metadata(ev.filter_state, b"downstream_peer") {
            return self.side(&name, true);
        }
        self.by_address(ev.downstream_address, true)
    }

    /// The callee.
    pub fn destination(&mut self, reporter: Reporter, node: &NodeContext, ev: &Evidence<'_>) -> Side {
        if reporter == Reporter::Destination {
            if let Some(uri) = ev.local_certificate.and_then(spiffe_uri) {
                return self.spiffe_side(&text(uri));
            }
            return Side { identity: node.identity.clone(), inside: true };
        }
        if let Some(uri) = ev.upstream_peer.and_then(spiffe_uri) {
            return self.spiffe_side(&text(uri));
        }
        if let Some(name) = self.peer_metadata(ev.filter_state, b"upstream_peer") {
            return self.side(&name, true);
        }
        let mesh = self.mesh;
        let cluster = ev.upstream_cluster;
        if let Some(svc) = mesh.services.iter().find(|s| s.clusters.iter().any(|p| p.matches(cluster))) {
            return self.side(&svc.name, !svc.external);
        }
        let upstream_ip = ev.upstream_address.and_then(ip_of);
        if let Some(svc) = upstream_ip.and_then(|ip| self.mapped(ip)) {
            return self.side(&svc.name, !svc.external);
        }
        let external_cluster = mesh.external_clusters.iter().any(|p| p.matches(cluster));
        let outside_address = upstream_ip.is_some_and(|ip| !self.internal(ip));
        if external_cluster || outside_address {
            let host = host_of(ev.authority);
            let name = if !host.is_empty() {
                text(host)
            } else if let Some(ip) = upstream_ip.filter(|_| external_cluster) {
                ip.to_string().into()
            } else if !cluster.is_empty() {
                text(cluster)
            } else {
                EXTERNAL.into()
            };
            return self.side(&name, false);
        }
        if let Some(fqdn) = istio_cluster_host(cluster) {
            let fqdn = text(fqdn);
            return match mesh.internal_domains.iter().find(|d| fqdn.ends_with(d.as_str())) {
                Some(suffix) => self.side(&fqdn[..fqdn.len() - suffix.len()], true),
                None => self.side(&fqdn, false),
            };
        }
        if !cluster.is_empty() {
            return self.side(&text(cluster), true);
        }
        self.side(UNKNOWN, true)
    }

    /// A side known only by its address: a mapped service, else `unknown` inside the
    /// boundary or `external` outside it. No address at all is `unknown`, inside.
    fn by_address(&mut self, address: Option<&AddressWire>, default_inside: bool) -> Side {
        let Some(ip) = address.and_then(ip_of) else {
            return self.side(UNKNOWN, default_inside);
        };
        if let Some(svc) = self.mapped(ip) {
            return self.side(&svc.name, !svc.external);
        }
        if self.internal(ip) { self.side(UNKNOWN, true) } else { self.side(EXTERNAL, false) }
    }

    fn mapped(&self, ip: IpAddr) -> Option<&'m ServiceMapping> {
        self.mesh.services.iter().find(|s| s.cidrs.iter().any(|c| c.contains(&ip)))
    }

    fn internal(&self, ip: IpAddr) -> bool {
        self.mesh.internal_cidrs.iter().any(|c| c.contains(&ip))
    }

    /// Istio peer metadata (a `google.protobuf.Struct` in filter state under `key`), as a
    /// SPIFFE ID when it names a namespace and service account, else `workload.namespace`.
    fn peer_metadata(&self, filter_state: &[FilterStateWire], key: &[u8]) -> Option<String> {
        let value = filter_state
            .iter()
            .find(|f| {
                // `downstream_peer`, or a prefixed form such as `wasm.downstream_peer`.
                let k = f.key.as_ref();
                k.ends_with(key) && (k.len() == key.len() || k[k.len() - key.len() - 1] == b'.')
            })?
            .value
            .as_ref()?;
        if !value.type_url.ends_with(b"google.protobuf.Struct") {
            return None;
        }
        let s = Struct::decode(value.value.clone()).ok()?;
        istio_identity(&s, self.mesh, None)
    }
}

/// The first `spiffe://` URI SAN of a certificate.
fn spiffe_uri(cert: &CertificateWire) -> Option<&[u8]> {
    cert.subject_alt_name.iter().map(|s| s.uri.as_ref()).find(|u| u.starts_with(b"spiffe://"))
}

/// The namespace an identity names: `NS` of `spiffe://td/ns/NS/sa/SA`, and `NS` of the
/// `name.NS` that Istio cluster names and workload metadata give (`reviews.shop`). `None`
/// for anything else (a host name of more parts, an address, `unknown`).
pub fn namespace_of(identity: &str) -> Option<&str> {
    if let Some(rest) = identity.strip_prefix("spiffe://") {
        let mut parts = rest.split('/').skip(1);
        return match (parts.next(), parts.next()) {
            (Some("ns"), Some(ns)) if !ns.is_empty() => Some(ns),
            _ => None,
        };
    }
    let (name, ns) = identity.split_once('.')?;
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    (plain(name) && plain(ns) && !ns.bytes().all(|b| b.is_ascii_digit())).then_some(ns)
}

/// `spiffe://td/path` → `td`.
pub fn spiffe_trust_domain(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("spiffe://")?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// The host of Istio's `outbound|port|subset|host` and `inbound|port|subset|host` names.
pub(crate) fn istio_cluster_host(cluster: &[u8]) -> Option<&[u8]> {
    if !(cluster.starts_with(b"outbound|") || cluster.starts_with(b"inbound|")) {
        return None;
    }
    let host = cluster.rsplit(|&b| b == b'|').next()?;
    (!host.is_empty()).then_some(host)
}

/// `host:port` → `host`; `[v6]:port` → `v6`.
fn host_of(authority: &[u8]) -> &[u8] {
    if let Some(rest) = authority.strip_prefix(b"[") {
        return rest.split(|&b| b == b']').next().unwrap_or(rest);
    }
    authority.split(|&b| b == b':').next().unwrap_or(authority)
}

fn ip_of(address: &AddressWire) -> Option<IpAddr> {
    let sock = address.socket_address.as_ref()?;
    std::str::from_utf8(&sock.address).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AnyWire, SanWire, SocketAddressWire};
    use envoy_types::pb::google::protobuf::Value;

    fn addr(ip: &str) -> AddressWire {
        AddressWire { socket_address: Some(SocketAddressWire { address: ip.to_owned().into(), port_value: 80 }) }
    }

    fn cert(uri: &str) -> CertificateWire {
        CertificateWire {
            subject_alt_name: vec![SanWire { uri: uri.to_owned().into(), dns: Default::default() }],
            subject: Default::default(),
        }
    }

    fn node(id: &str, cluster: &str, meta: &[(&str, &str)]) -> Node {
        Node {
            id: id.into(),
            cluster: cluster.into(),
            metadata: (!meta.is_empty()).then(|| Struct {
                fields: meta
                    .iter()
                    .map(|(k, v)| (k.to_string(), Value { kind: Some(Kind::StringValue(v.to_string())) }))
                    .collect(),
            }),
            ..Default::default()
        }
    }

    fn mesh() -> MeshConfig {
        MeshConfig {
            trust_domains: vec!["mesh.test".into()],
            services: vec![
                ServiceMapping {
                    name: "payments".into(),
                    cidrs: vec!["10.7.0.0/16".parse().expect("cidr")],
                    clusters: vec![Pattern::new("payments*")],
                    nodes: vec![],
                    external: false,
                },
                ServiceMapping {
                    name: "payments-svc".into(),
                    cidrs: vec![],
                    clusters: vec![],
                    nodes: vec![Pattern::new("payments-*")],
                    external: false,
                },
                ServiceMapping {
                    name: "partner-api".into(),
                    cidrs: vec!["203.0.113.0/24".parse().expect("cidr")],
                    clusters: vec![],
                    nodes: vec![],
                    external: true,
                },
            ],
            ..MeshConfig::default()
        }
    }

    #[test]
    fn glob_patterns() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("ab*", "abcd", true),
            ("*cd", "abcd", true),
            ("*gateway*", "istio-ingressgateway-7d9", true),
            ("*gateway*", "frontend", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("outbound|*||*.svc.cluster.local", "outbound|80||web.shop.svc.cluster.local", true),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(Pattern::new(pattern).matches(name.as_bytes()), want, "{pattern} ~ {name}");
        }
    }

    #[test]
    fn identities_name_their_namespace() {
        assert_eq!(namespace_of("spiffe://mesh.test/ns/shop/sa/cart"), Some("shop"));
        assert_eq!(namespace_of("spiffe://mesh.test/workload/x"), None);
        assert_eq!(namespace_of("reviews.shop"), Some("shop"));
        assert_eq!(namespace_of("api.example.com"), None);
        assert_eq!(namespace_of("10.0.0.1"), None);
        assert_eq!(namespace_of("unknown"), None);
    }

    #[test]
    fn istio_node_ids_give_their_namespace() {
        assert_eq!(istio_node_namespace("sidecar~10.0.0.1~web-5d8f-x2.shop~shop.svc.cluster.local"), Some("shop"));
        assert_eq!(
            istio_node_namespace("router~10.0.0.1~gw-1.istio-system~istio-system.svc.cluster.local"),
            Some("istio-system")
        );
        assert_eq!(istio_node_namespace("sidecar~10.0.0.1~pod"), None);
        assert_eq!(istio_node_namespace("sidecar~10.0.0.1~web.other~shop.svc.cluster.local"), None);
        assert_eq!(istio_node_namespace("web-1"), None);
    }

    #[test]
    fn node_identity_rules() {
        let m = mesh();
        let cases: [(Node, &str, &str); 9] = [
            (node("n", "c", &[("meshwatch_identity", "spiffe://mesh.test/web")]), "outbound", "spiffe://mesh.test/web"),
            (
                node("n", "c", &[("NAMESPACE", "shop"), ("SERVICE_ACCOUNT", "cart")]),
                "x",
                "spiffe://mesh.test/ns/shop/sa/cart",
            ),
            (node("n", "reviews.shop", &[]), "x", "reviews.shop"),
            (node("sidecar~10.0.0.1~pod", "", &[]), "x", "sidecar~10.0.0.1~pod"),
            (Node::default(), "x", UNKNOWN),
            // A node named by configuration, before what its metadata says.
            (node("payments-7f9c-x2", "payments", &[("NAMESPACE", "shop")]), "x", "payments-svc"),
            // The workload and namespace, as a peer is named by the same metadata.
            (node("n", "c", &[("WORKLOAD_NAME", "web-v1"), ("NAMESPACE", "shop")]), "x", "web-v1.shop"),
            // Istio's node id gives the namespace the metadata lacks.
            (
                node(
                    "sidecar~10.0.0.1~cart-5d8f-x2.shop~shop.svc.cluster.local",
                    "cart.shop",
                    &[("SERVICE_ACCOUNT", "cart")],
                ),
                "x",
                "spiffe://mesh.test/ns/shop/sa/cart",
            ),
            (
                node("sidecar~10.0.0.1~web-5d8f-x2.shop~shop.svc.cluster.local", "", &[("WORKLOAD_NAME", "web")]),
                "x",
                "web.shop",
            ),
        ];
        for (n, log_name, want) in cases {
            assert_eq!(&*NodeContext::new(Some(&n), log_name, &m).identity, want);
        }
        assert!(NodeContext::new(Some(&node("edge-gateway", "", &[])), "x", &m).is_gateway);
        assert!(NodeContext::new(Some(&node("router~1.2.3.4~gw", "", &[])), "x", &m).is_gateway);
        assert!(!NodeContext::new(Some(&node("web", "", &[])), "x", &m).is_gateway);
        assert!(NodeContext::new(None, "inbound_http", &m).inbound_logger);
    }

    #[test]
    fn reporter_rules() {
        let m = mesh();
        let sidecar = NodeContext::new(Some(&node("web", "web", &[])), "als", &m);
        let gateway = NodeContext::new(Some(&node("edge-gateway", "", &[])), "als", &m);
        let inbound = NodeContext::new(Some(&node("web", "web", &[])), "inbound_als", &m);
        let peer = cert("spiffe://mesh.test/ns/a/sa/b");
        let with_peer = Evidence { peer_certificate: Some(&peer), ..Default::default() };
        let istio_inbound = Evidence { upstream_cluster: b"inbound|9080||", ..Default::default() };
        let plain = Evidence::default();
        assert_eq!(reporter(&gateway, &with_peer), Reporter::Gateway);
        assert_eq!(reporter(&sidecar, &with_peer), Reporter::Destination);
        assert_eq!(reporter(&sidecar, &istio_inbound), Reporter::Destination);
        assert_eq!(reporter(&inbound, &plain), Reporter::Destination);
        assert_eq!(reporter(&sidecar, &plain), Reporter::Source);
    }

    struct Case {
        name: &'static str,
        reporter: Reporter,
        ev: Evidence<'static>,
        want: (&'static str, bool),
    }

    fn leak<T>(t: T) -> &'static T {
        Box::leak(Box::new(t))
    }

    #[test]
    fn source_rules() {
        let m = mesh();
        let node_ctx = NodeContext::new(Some(&node("web", "web.shop", &[])), "x", &m);
        let peer_struct = Struct {
            fields: [("workload", "cart-v1"), ("namespace", "shop")]
                .iter()
                .map(|(k, v)| (k.to_string(), Value { kind: Some(Kind::StringValue(v.to_string())) }))
                .collect(),
        };
        let fs = leak(vec![FilterStateWire {
            key: "wasm.downstream_peer".into(),
            value: Some(AnyWire {
                type_url: "type.googleapis.com/google.protobuf.Struct".into(),
                value: peer_struct.encode_to_vec().into(),
            }),
        }]);
        let cases = [
            Case {
                name: "source reporter is the node",
                reporter: Reporter::Source,
                ev: Evidence::default(),
                want: ("web.shop", true),
            },
            Case {
                name: "peer spiffe in trust domain",
                reporter: Reporter::Destination,
                ev: Evidence {
                    peer_certificate: Some(leak(cert("spiffe://mesh.test/ns/shop/sa/cart"))),
                    downstream_address: Some(leak(addr("8.8.8.8"))),
                    ..Default::default()
                },
                want: ("spiffe://mesh.test/ns/shop/sa/cart", true),
            },
            Case {
                name: "peer spiffe from a foreign trust domain is outside",
                reporter: Reporter::Destination,
                ev: Evidence { peer_certificate: Some(leak(cert("spiffe://evil.example/x"))), ..Default::default() },
                want: ("spiffe://evil.example/x", false),
            },
            Case {
                name: "istio peer metadata",
                reporter: Reporter::Destination,
                ev: Evidence { filter_state: fs, ..Default::default() },
                want: ("cart-v1.shop", true),
            },
            Case {
                name: "mapped cidr",
                reporter: Reporter::Gateway,
                ev: Evidence { downstream_address: Some(leak(addr("10.7.1.1"))), ..Default::default() },
                want: ("payments", true),
            },
            Case {
                name: "mapped external cidr",
                reporter: Reporter::Gateway,
                ev: Evidence { downstream_address: Some(leak(addr("203.0.113.9"))), ..Default::default() },
                want: ("partner-api", false),
            },
            Case {
                name: "internal address",
                reporter: Reporter::Destination,
                ev: Evidence { downstream_address: Some(leak(addr("10.1.1.1"))), ..Default::default() },
                want: (UNKNOWN, true),
            },
            Case {
                name: "external address",
                reporter: Reporter::Gateway,
                ev: Evidence { downstream_address: Some(leak(addr("8.8.8.8"))), ..Default::default() },
                want: (EXTERNAL, false),
            },
            Case { name: "no address", reporter: Reporter::Gateway, ev: Evidence::default(), want: (UNKNOWN, true) },
        ];
        let mut interner = Interner::new(64);
        for c in cases {
            let mut r = Resolver { mesh: &m, interner: &mut interner };
            let side = r.source(c.reporter, &node_ctx, &c.ev);
            assert_eq!((&*side.identity, side.inside), c.want, "{}", c.name);
        }
    }

    #[test]
    fn destination_rules() {
        let m = mesh();
        let node_ctx = NodeContext::new(Some(&node("reviews", "reviews.shop", &[])), "x", &m);
        let ext = |cluster: &'static [u8], authority: &'static [u8], ip: &str| Evidence {
            upstream_cluster: cluster,
            authority,
            upstream_address: Some(leak(addr(ip))),
            ..Default::default()
        };
        let cases = [
            Case {
                name: "destination reporter, local cert",
                reporter: Reporter::Destination,
                ev: Evidence {
                    local_certificate: Some(leak(cert("spiffe://mesh.test/ns/shop/sa/reviews"))),
                    ..Default::default()
                },
                want: ("spiffe://mesh.test/ns/shop/sa/reviews", true),
            },
            Case {
                name: "destination reporter, node",
                reporter: Reporter::Destination,
                ev: Evidence::default(),
                want: ("reviews.shop", true),
            },
            Case {
                name: "mapped cluster",
                reporter: Reporter::Source,
                ev: ext(b"payments-v2", b"", "10.1.1.1"),
                want: ("payments", true),
            },
            Case {
                name: "mapped address",
                reporter: Reporter::Source,
                ev: ext(b"whatever", b"", "10.7.3.3"),
                want: ("payments", true),
            },
            Case {
                name: "passthrough by authority",
                reporter: Reporter::Source,
                ev: ext(b"PassthroughCluster", b"api.stripe.com:443", "10.1.1.1"),
                want: ("api.stripe.com", false),
            },
            Case {
                name: "passthrough tcp by address",
                reporter: Reporter::Source,
                ev: ext(b"PassthroughCluster", b"", "52.1.2.3"),
                want: ("52.1.2.3", false),
            },
            Case {
                name: "plain cluster to outside address",
                reporter: Reporter::Source,
                ev: ext(b"ext_api", b"api.example.com", "52.1.2.3"),
                want: ("api.example.com", false),
            },
            Case {
                name: "plain cluster to outside address, no authority",
                reporter: Reporter::Source,
                ev: ext(b"ext_api", b"", "52.1.2.3"),
                want: ("ext_api", false),
            },
            Case {
                name: "istio internal",
                reporter: Reporter::Source,
                ev: ext(b"outbound|9080||ratings.shop.svc.cluster.local", b"ratings", "10.1.1.1"),
                want: ("ratings.shop", true),
            },
            Case {
                name: "istio service entry",
                reporter: Reporter::Gateway,
                ev: ext(b"outbound|443||api.github.com", b"", "10.1.1.1"),
                want: ("api.github.com", false),
            },
            Case {
                name: "plain cluster",
                reporter: Reporter::Source,
                ev: ext(b"backend", b"backend:80", "10.1.1.1"),
                want: ("backend", true),
            },
            Case { name: "no cluster", reporter: Reporter::Source, ev: Evidence::default(), want: (UNKNOWN, true) },
        ];
        let mut interner = Interner::new(64);
        for c in cases {
            let mut r = Resolver { mesh: &m, interner: &mut interner };
            let side = r.destination(c.reporter, &node_ctx, &c.ev);
            assert_eq!((&*side.identity, side.inside), c.want, "{}", c.name);
        }
    }

    #[test]
    fn long_identities_are_cut_at_a_char_boundary() {
        let m = MeshConfig { max_identity_bytes: 5, ..mesh() };
        let mut interner = Interner::new(4);
        let mut r = Resolver { mesh: &m, interner: &mut interner };
        let side = r.side("abcdé-long", true);
        assert_eq!(&*side.identity, "abcd");
    }

    #[test]
    fn interner_stays_bounded_and_shares() {
        let mut interner = Interner::new(2);
        let a1 = interner.intern("a");
        let a2 = interner.intern("a");
        assert!(Arc::ptr_eq(&a1, &a2));
        interner.intern("b");
        interner.intern("c");
        assert!(interner.names.len() <= 2);
    }

    #[test]
    fn directions() {
        use crate::flow::Direction;
        assert_eq!(Direction::from_sides(true, true), Direction::EastWest);
        assert_eq!(Direction::from_sides(false, true), Direction::Ingress);
        assert_eq!(Direction::from_sides(true, false), Direction::Egress);
        assert_eq!(Direction::from_sides(false, false), Direction::Egress);
    }
}
