//! TLS for the agent-relay link: rustls with the aws-lc-rs provider, TLS 1.3 only.
//!
//! The agent never trusts a relay by default: it needs either a CA bundle (`--ca`) or one or more
//! pinned SHA-256 certificate fingerprints (`--fingerprint sha256:HEX`). Pinning lets a relay run
//! with a self-signed certificate it generated itself, which is the common case on a jump host.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::{
    CipherSuite, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use sha2::{Digest, Sha256};

/// Why TLS material could not be loaded or a configuration built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}: {detail}")]
    Pem {
        /// "certificate", "private key" or "CA bundle".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The parser's complaint (never the file's content).
        detail: String,
    },
    /// A PEM file holds no item of the expected kind.
    #[error("{path} contains no {what}")]
    Missing {
        /// What was expected.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the combination of certificate, key and settings.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// Certificate generation failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A fingerprint string is malformed.
    #[error("fingerprint must look like sha256:<64 hex digits>; got {0:?}")]
    BadFingerprint(String),
}

/// The crypto provider used everywhere. Picked explicitly so that no feature unification can make
/// rustls see two providers and panic.
///
/// TLS 1.3's AES-128-GCM-SHA256 comes first (rustls puts AES-256-GCM-SHA384 first): every byte
/// of every tunnel goes through AES-128's 10 rounds instead of AES-256's 14, and each handshake's
/// key schedule hashes with SHA-256, which CPUs accelerate (SHA-NI, ARMv8), instead of SHA-384,
/// which ran in software and took 8% of the relay's CPU while 5,000 agents connected. It is
/// TLS 1.3's mandatory suite, as strong as the X25519 exchange that keys it. The other suites
/// stay, in rustls' order, for servers that offer only those (PostgreSQL, HTTPS proxies).
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// SHA-256 of a DER certificate: what `--fingerprint` pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER-encoded certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        Self(Sha256::digest(cert.as_ref()).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = TlsError;

    /// Accepts `sha256:` followed by 64 hex digits, optionally separated by colons as `openssl
    /// x509 -fingerprint` prints them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TlsError::BadFingerprint(s.to_string());
        let hex: String = s
            .trim()
            .strip_prefix("sha256:")
            .or_else(|| s.trim().strip_prefix("SHA256:"))
            .ok_or_else(bad)?
            .chars()
            .filter(|&c| c != ':')
            .collect();
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

/// Reads every certificate from a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |e: rustls::pki_types::pem::Error| TlsError::Pem {
        what: "certificate",
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            what: "PEM certificate",
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads the first private key from a PEM file. Errors name the file, never its content.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing {
            what: "PEM private key",
            path: path.to_path_buf(),
        },
        e => TlsError::Pem {
            what: "private key",
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
    })
}

/// A freshly generated self-signed certificate and its key, both PEM.
pub struct SelfSigned {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM. Secret.
    pub key_pem: String,
}

impl fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SelfSigned").finish_non_exhaustive()
    }
}

/// Generates a self-signed certificate valid for `names` (DNS names or IP addresses).
pub fn generate_self_signed(names: &[String]) -> Result<SelfSigned, TlsError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "jumpgate relay");
    // Pinned certificates are replaced by rotation, not by expiry: make it last.
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let cert = params.self_signed(&key)?;
    Ok(SelfSigned {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The relay's TLS configuration. With `client_verifier` set, agents must present a certificate
/// it accepts (mutual TLS).
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // The relay's order, not the agent's: agents built before AES-128 came first get it too.
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// Verifies agents' client certificates against `roots` (mutual TLS). Agents without a
/// certificate are still let through the TLS handshake, to authenticate with a token instead;
/// agents with a certificate from any other CA are rejected during the handshake.
pub fn client_cert_verifier(
    roots: Vec<CertificateDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in roots {
        store.add(cert)?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))
}

/// The DNS names a verified certificate was issued for: an agent's identity under mutual TLS.
pub fn certificate_dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    webpki::EndEntityCert::try_from(cert)
        .map(|c| c.valid_dns_names().map(str::to_string).collect())
        .unwrap_or_default()
}

/// ALPN identifier; a relay and an agent that disagree on it are not talking jumpgate.
pub const ALPN: &[u8] = b"jumpgate/1";

/// How an agent decides to trust a relay.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// Certificates chaining to these roots, for the server name dialled.
    Roots(Vec<CertificateDer<'static>>),
    /// Any certificate whose SHA-256 is one of these; the name is not checked.
    Pinned(Vec<Fingerprint>),
}

/// The agent's TLS configuration. `identity` is the agent's client certificate chain and key for
/// relays that require mutual TLS.
pub fn client_config(
    trust: ServerTrust,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        ServerTrust::Roots(roots) => {
            let mut store = RootCertStore::empty();
            for cert in roots {
                store.add(cert)?;
            }
            builder.with_root_certificates(store)
        }
        ServerTrust::Pinned(pins) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServer { pins, provider })),
    };
    let mut config = match identity {
        Some((certs, key)) => builder.with_client_auth_cert(certs, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The error a pin mismatch carries, so the agent can print what it saw and what it expected.
#[derive(Debug, thiserror::Error)]
#[error("the relay's certificate fingerprint is {seen}, which matches none of the pinned fingerprints ({expected})")]
pub struct PinMismatch {
    /// What the relay presented.
    pub seen: Fingerprint,
    /// What the agent pinned, comma separated.
    pub expected: String,
}

/// Verifies a server by certificate fingerprint, delegating handshake signatures to rustls so a
/// pinned certificate still has to be backed by its private key.
#[derive(Debug)]
struct PinnedServer {
    pins: Vec<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = Fingerprint::of(end_entity);
        if self.pins.contains(&seen) {
            return Ok(ServerCertVerified::assertion());
        }
        let expected = self
            .pins
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                seen,
                expected,
            }))),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server name an agent sends and (with CA trust) verifies: an IP address or a DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::Pem {
        what: "server name",
        path: PathBuf::from(host),
        detail: "not a valid DNS name or IP address".into(),
    })
}

/// If `err` says the peer's certificate was rejected (which retrying cannot fix), a plain
/// description of why; a pin mismatch names the fingerprint the relay actually presented.
pub fn certificate_rejection(err: &std::io::Error) -> Option<String> {
    let rustls_err = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    match rustls_err {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            match other.0.downcast_ref::<PinMismatch>() {
                Some(pin) => Some(pin.to_string()),
                None => Some(rustls_err.to_string()),
            }
        }
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            Some(rustls_err.to_string())
        }
        rustls::Error::AlertReceived(
            rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::CertificateRequired
            | rustls::AlertDescription::CertificateUnknown
            | rustls::AlertDescription::CertificateRevoked
            | rustls::AlertDescription::CertificateExpired,
        ) => Some(format!(
            "the relay rejected this agent's client certificate ({rustls_err}); check --client-cert against the relay's --client-ca"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_roundtrips_and_accepts_colons() {
        let s = generate_self_signed(&["localhost".into()]).unwrap();
        let der = CertificateDer::from_pem_slice(s.cert_pem.as_bytes()).unwrap();
        let fp = Fingerprint::of(&der);
        let text = fp.to_string();
        assert_eq!(text.len(), "sha256:".len() + 64);
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        let colons = format!(
            "SHA256:{}",
            text.as_bytes()[7..]
                .chunks(2)
                .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
                .collect::<Vec<_>>()
                .join(":")
        );
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
        assert!("sha256:abcd".parse::<Fingerprint>().is_err());
        assert!("md5:00".parse::<Fingerprint>().is_err());
    }

    /// Runs a handshake between `client` and a relay with a fresh self-signed certificate,
    /// in memory: the suite they agreed on.
    fn negotiated(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> CipherSuite {
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(client, name).unwrap();
        let mut server = rustls::ServerConnection::new(server).unwrap();
        while client.is_handshaking() || server.is_handshaking() {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut wire = Vec::new();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        client.negotiated_cipher_suite().unwrap().suite()
    }

    #[test]
    fn agent_links_use_aes_128_gcm_even_with_agents_that_prefer_aes_256() {
        let s = generate_self_signed(&["localhost".into()]).unwrap();
        let cert = CertificateDer::from_pem_slice(s.cert_pem.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(s.key_pem.as_bytes()).unwrap();
        let server = server_config(vec![cert.clone()], key, None).unwrap();
        let ours = client_config(ServerTrust::Pinned(vec![Fingerprint::of(&cert)]), None).unwrap();
        assert_eq!(
            negotiated(ours, server.clone()),
            CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        // An agent with rustls' own order (AES-256-GCM-SHA384 first), as before this change.
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let older = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        assert_eq!(
            negotiated(Arc::new(older), server),
            CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }

    #[test]
    fn self_signed_debug_hides_key() {
        let s = generate_self_signed(&["localhost".into()]).unwrap();
        assert!(!format!("{s:?}").contains("PRIVATE"));
    }
}
