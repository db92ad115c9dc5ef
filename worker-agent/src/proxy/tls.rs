//! TLS to what sits between the agent and the relay (an `https://` proxy, a `wss://` ingress):
//! verified against a CA bundle, never the relay's pins (the relay's own TLS runs inside).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// CA bundles tried, in order, for an `https://` proxy without `--proxy-ca` (Debian, Fedora).
const SYSTEM_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// TLS client settings for an `https://` proxy or a `wss://` ingress: its certificate is
/// checked against `ca` or the system's bundle (neither is the relay: the relay's pins do not
/// apply to them; the relay's own TLS runs inside).
pub(crate) fn web_tls(ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let path = match ca {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("SSL_CERT_FILE")
            .map(std::path::PathBuf::from)
            .into_iter()
            .chain(SYSTEM_BUNDLES.iter().map(std::path::PathBuf::from))
            .find(|p| p.is_file())
            .ok_or("an https:// proxy or a wss:// relay needs a CA bundle to verify it (no system bundle found): pass --proxy-ca FILE, or set SSL_CERT_FILE")?,
    };
    let certs = jumpgate_transport::tls::load_certs(&path).map_err(|e| e.to_string())?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "no usable CA certificate in {} for the https:// proxy",
            path.display()
        ));
    }
    let config = ClientConfig::builder_with_provider(jumpgate_transport::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
