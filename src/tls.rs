//! TLS on the gRPC listener (access logs, stats, OTLP): meshwatch's certificate, and with a
//! client CA, mutual TLS — a client without a certificate from that CA does not get past the
//! handshake. With `allowed_identities`, a client whose certificate names none of them (as a
//! URI SAN: a SPIFFE ID) is refused each call with `PERMISSION_DENIED`, counted. With
//! `bind_node_identity`, an access-log or stats-sink stream's node, and an OTLP export's, must
//! report as an identity its certificate names (the collector checks it).

use std::sync::Arc;

use meshwatch_collector::als::ProvenIdentities;
use meshwatch_collector::identity::Pattern;
use prometheus::{IntCounter, Opts, Registry};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};
use x509_cert::der::Decode;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

/// `[listen.tls]`, validated: PEM read from the files at load time.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Clients must present a certificate issued by one of these.
    pub client_ca_pem: Option<Vec<u8>>,
    /// URI SANs (globs, `*` any run of characters) a client certificate must name one of;
    /// empty: any client the CA vouches for.
    pub allowed_identities: Vec<Pattern>,
    /// An access-log or stats-sink stream's node (or an OTLP export's) must report as one of
    /// its certificate's URI SANs.
    pub bind_node_identity: bool,
    /// The HTTP listener over TLS too (same certificate, no client certificates).
    pub http: bool,
}

impl TlsSettings {
    /// The HTTP listener's TLS: the same certificate, HTTP/1.1, no client certificates.
    pub fn http_config(&self) -> Result<tokio_rustls::rustls::ServerConfig, String> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("listen.tls.cert: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| format!("listen.tls.key: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("listen.tls: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// "on", or "mutual" with what else is checked, for the log.
    pub fn describe(&self) -> String {
        let mut d = String::from(if self.client_ca_pem.is_some() { "mutual" } else { "on" });
        if !self.allowed_identities.is_empty() {
            d.push_str(", allowed identities");
        }
        if self.bind_node_identity {
            d.push_str(", node identity bound");
        }
        if self.http {
            d.push_str(", HTTP too");
        }
        d
    }

    pub fn server_config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// The URI SANs of a DER certificate; none when it does not parse (rustls verified it
/// already: that does not happen with a CA's certificate, and names nothing if it does).
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some((_, SubjectAltName(names)))) = cert.tbs_certificate.get::<SubjectAltName>() else {
        return Vec::new();
    };
    names
        .into_iter()
        .filter_map(|n| match n {
            GeneralName::UniformResourceIdentifier(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

/// Whether a client naming `uris` is one of `allowed`.
pub fn admitted(allowed: &[Pattern], uris: &[String]) -> bool {
    uris.iter().any(|u| allowed.iter().any(|p| p.matches(u.as_bytes())))
}

/// `meshwatch_grpc_calls_refused_total{reason}`.
pub fn refused_counter(registry: &Registry) -> prometheus::Result<IntCounter> {
    let refused = IntCounter::with_opts(
        Opts::new(
            "meshwatch_grpc_calls_refused_total",
            "gRPC calls refused: the client certificate names none of listen.tls.allowed_identities.",
        )
        .const_label("reason", "identity"),
    )?;
    registry.register(Box::new(refused.clone()))?;
    Ok(refused)
}

/// The check of each gRPC call against `allowed` (a tonic interceptor); passes every call
/// when `allowed` is empty. With `bind`, a call carries the identities its client's
/// certificate proves (`ProvenIdentities`, none without a certificate).
pub fn admission(
    allowed: Vec<Pattern>,
    bind: bool,
    refused: IntCounter,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    let allowed: Arc<[Pattern]> = allowed.into();
    move |mut request: Request<()>| {
        if allowed.is_empty() && !bind {
            return Ok(request);
        }
        let uris = request.peer_certs().and_then(|certs| certs.first().map(|c| uri_sans(c))).unwrap_or_default();
        if allowed.is_empty() || admitted(&allowed, &uris) {
            if bind {
                request.extensions_mut().insert(ProvenIdentities(uris.into()));
            }
            return Ok(request);
        }
        refused.inc();
        let named = if uris.is_empty() { "no URI SAN".to_string() } else { uris.join(", ") };
        tracing::debug!(client = %named, "gRPC call refused: not an allowed identity");
        Err(Status::permission_denied(format!(
            "the client certificate ({named}) names none of listen.tls.allowed_identities"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_admitted_by_an_exact_name_or_a_glob_and_nothing_else() {
        let allowed =
            [Pattern::new("spiffe://mesh.test/ns/shop/sa/frontend"), Pattern::new("spiffe://mesh.test/ns/edge/*")];
        let one = |u: &str| admitted(&allowed, &[u.to_string()]);
        assert!(one("spiffe://mesh.test/ns/shop/sa/frontend"));
        assert!(one("spiffe://mesh.test/ns/edge/sa/gateway"));
        assert!(!one("spiffe://mesh.test/ns/shop/sa/frontend2"));
        assert!(!one("spiffe://other.test/ns/edge/sa/gateway"));
        assert!(!admitted(&allowed, &[]), "a certificate without a URI SAN");
        assert!(admitted(&allowed, &["dns:x".into(), "spiffe://mesh.test/ns/edge/sa/x".into()]));
    }

    #[test]
    fn a_certificate_that_does_not_parse_names_nobody() {
        assert!(uri_sans(b"not a certificate").is_empty());
        assert!(uri_sans(&[]).is_empty());
        assert!(uri_sans(&[0x30, 0x82, 0xff, 0xff, 0x30]).is_empty());
    }
}
