//! The relay's TLS identity and agent token: loaded from the operator's files, or generated once
//! in the state directory and reused on every start, so pins and tokens handed to agents stay valid.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use jumpgate_config::{read_secret_file, secret_file::check_private, write_atomic};
use jumpgate_proto::Secret;
use jumpgate_transport::tls::{self, Fingerprint};
use rand::RngCore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::config::{self_signed_paths, RelayConfig, TlsSource};
use crate::error::RelayError;

/// Creates the state directory (mode 0700) if it does not exist.
pub fn ensure_state_dir(dir: &Path) -> Result<(), RelayError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| RelayError::StateDir {
            path: dir.to_path_buf(),
            source,
        })
}

/// Loads the configured certificate and key, or the self-signed pair in `state_dir`, generating it
/// on first use for `names`.
pub fn load_certificate(
    state_dir: &Path,
    source: &TlsSource,
    names: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), RelayError> {
    let (cert, key) = match source {
        TlsSource::Files { cert, key } => (cert.clone(), key.clone()),
        TlsSource::SelfSigned => {
            let (cert, key) = self_signed_paths(state_dir);
            if !cert.exists() || !key.exists() {
                ensure_state_dir(state_dir)?;
                let generated = tls::generate_self_signed(names)?;
                let io = |path: &Path| {
                    let path = path.to_path_buf();
                    move |source| RelayError::StateDir { path, source }
                };
                write_atomic(&key, generated.key_pem.as_bytes(), 0o600).map_err(io(&key))?;
                write_atomic(&cert, generated.cert_pem.as_bytes(), 0o644).map_err(io(&cert))?;
                tracing::info!(cert = %cert.display(), "generated a self-signed TLS certificate");
            }
            (cert, key)
        }
    };
    check_private(&key)?;
    Ok((tls::load_certs(&cert)?, tls::load_key(&key)?))
}

/// The pin of the relay's certificate (`relay-server fingerprint`), creating the self-signed one
/// if the configuration uses it and it does not exist yet.
pub fn fingerprint(config: &RelayConfig) -> Result<Fingerprint, RelayError> {
    let (certs, _key) = load_certificate(&config.state_dir, &config.tls, &["localhost".into()])?;
    Ok(Fingerprint::of(&certs[0]))
}

/// The rustls config for the agent listener and the certificate's pin.
pub fn server_tls(config: &RelayConfig) -> Result<(Arc<ServerConfig>, Fingerprint), RelayError> {
    let mut names = vec!["localhost".to_string(), config.public_host.clone()];
    if !config.listen.ip().is_unspecified() {
        names.push(config.listen.ip().to_string());
    }
    names.dedup();
    let (certs, key) = load_certificate(&config.state_dir, &config.tls, &names)?;
    let fingerprint = Fingerprint::of(&certs[0]);
    let client_verifier = match &config.client_ca {
        Some(ca) => Some(tls::client_cert_verifier(tls::load_certs(ca)?)?),
        None => None,
    };
    Ok((
        tls::server_config(certs, key, client_verifier)?,
        fingerprint,
    ))
}

/// The shared agent token: `token_file` if configured, else `JUMPGATE_TOKEN`, else the token in
/// the state dir, generated (32 random bytes, hex) on first start.
pub fn load_token(config: &RelayConfig) -> Result<Secret, RelayError> {
    if let Some(path) = &config.token_file {
        return Ok(read_secret_file(path, true)?);
    }
    if let Some(token) = &config.env_token {
        return Ok(token.clone());
    }
    let path = config.generated_token_file();
    if !path.exists() {
        ensure_state_dir(&config.state_dir)?;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        write_atomic(&path, format!("{token}\n").as_bytes(), 0o600).map_err(|source| {
            RelayError::StateDir {
                path: path.clone(),
                source,
            }
        })?;
        // Make sure a pre-existing umask did not widen it.
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        tracing::info!(path = %path.display(), "generated an agent token; give agents this file (--token-file)");
    }
    Ok(read_secret_file(&path, true)?)
}
