//! The `ssh -J` jump listener: an SSH server on the relay that reaches any connected agent by
//! name with nothing but OpenSSH (`ssh -J relay:2222 vh-exec-123`), on every OS, so Windows
//! and VS Code users need no netcat for a ProxyCommand.
//!
//! OpenSSH's ProxyJump opens a `direct-tcpip` channel for `HOST:PORT` inside an SSH
//! connection to the jump host. That is the only thing this server accepts: the channel is
//! routed by the HTTP CONNECT router's rule ([`crate::users::router`]: `AGENT` and the service
//! whose target port is `PORT`, or `SERVICE.AGENT`) and carried to the agent exactly as a user
//! connection on the agent's port is (allowlists, caps, audit). The session to the job's sshd
//! stays end to end encrypted inside the channel; the relay sees only ciphertext.
//!
//! - [`hostkey`]: the relay's Ed25519 host key (generated once in the state dir, or a file).
//! - [`auth`]: who may jump: any key, an authorized_keys file, user certificates from trusted
//!   CAs.
//! - [`sign`]: short-lived user certificates for job names, signed with the operator's CA.
//! - [`server`]: the accept loop (per-address caps, an authentication deadline) and the
//!   per-connection handler.

pub(crate) mod auth;
pub mod hostkey;
pub(crate) mod server;
pub mod settings;
pub mod sign;

pub use settings::{JumpConfig, SigningConfig};

use std::sync::Arc;

use jumpgate_config::ConfigError;
use tokio::net::TcpListener;

use crate::RelayConfig;

/// A host key that cannot be used is a configuration error (exit 64).
pub(crate) fn host_key_invalid(e: &hostkey::HostKeyError) -> ConfigError {
    ConfigError::Invalid {
        key: "jump_host_key_file",
        detail: e.to_string(),
    }
}

/// The certificate signer, when `jump_ca_key` is set; a CA key that cannot be used is a
/// configuration error. Warns when this relay's own listener would not accept what it signs.
pub(crate) fn signer(config: &RelayConfig) -> Result<Option<Arc<sign::Signer>>, ConfigError> {
    let Some(signing) = &config.jump_signing else {
        return Ok(None);
    };
    let signer = sign::Signer::load(signing).map_err(|e| sign_invalid(&e))?;
    let trusted = config
        .jump
        .as_ref()
        .and_then(|j| j.trusted_user_ca_keys.as_deref())
        .and_then(|p| auth::Access::load(None, Some(p)).ok())
        .is_some_and(|a| a.trusts(signer.ca_public()));
    if config.jump.is_some() && !trusted {
        tracing::warn!(
            "jump_ca_key signs certificates this relay's jump listener does not accept: add its public key ({}) to jump_trusted_user_ca_keys",
            signer.ca_public().fingerprint(russh::keys::HashAlg::Sha256)
        );
    }
    Ok(Some(Arc::new(signer)))
}

/// A CA key or signing request that cannot be used, as a configuration error (exit 64).
pub(crate) fn sign_invalid(e: &sign::SignError) -> ConfigError {
    ConfigError::Invalid {
        key: match e {
            sign::SignError::Request(_) => "sign-jump-cert",
            _ => "jump_ca_key",
        },
        detail: e.to_string(),
    }
}

/// `check-config`: reads the jump access files and the CA key as a start would.
pub(crate) fn check_files(config: &RelayConfig) -> Result<(), ConfigError> {
    if let Some(jump) = &config.jump {
        load_access(jump)?;
    }
    signer(config).map(|_| ())
}

/// Reads the access files (`jump_authorized_keys_file`, `jump_trusted_user_ca_keys`): at start
/// and on every reload.
pub(crate) fn load_access(jump: &JumpConfig) -> Result<auth::Access, ConfigError> {
    auth::Access::load(
        jump.authorized_keys_file.as_deref(),
        jump.trusted_user_ca_keys.as_deref(),
    )
    .map_err(|e| ConfigError::Invalid {
        key: e.key(),
        detail: e.to_string(),
    })
}

/// Reads `jump_host_certificate` for `key`, if set: at start and on every reload.
pub(crate) fn host_certificate(
    jump: &JumpConfig,
    key: &russh::keys::PrivateKey,
) -> Result<Option<russh::keys::Certificate>, ConfigError> {
    jump.host_certificate
        .as_deref()
        .map(|p| hostkey::load_certificate(p, key, std::time::SystemTime::now()))
        .transpose()
        .map_err(|detail| ConfigError::Invalid {
            key: "jump_host_certificate",
            detail,
        })
}

/// The certificate signer in force (`jump_ca_key`), shared by the admin API and the reload
/// that swaps it when the CA key is rotated.
#[derive(Debug, Default)]
pub(crate) struct SignerSlot(std::sync::RwLock<Option<Arc<sign::Signer>>>);

impl SignerSlot {
    /// A slot holding `signer`.
    pub fn new(signer: Option<Arc<sign::Signer>>) -> Self {
        Self(std::sync::RwLock::new(signer))
    }

    /// The signer for the next request, if the relay signs.
    pub fn current(&self) -> Option<Arc<sign::Signer>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts a re-read CA key (or none) in force for the next request.
    pub fn replace(&self, signer: Option<Arc<sign::Signer>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = signer;
    }
}

/// Binds the jump listener and builds its state: the host key, the access files.
pub(crate) async fn bind(
    config: &RelayConfig,
    users: Arc<crate::users::Users>,
    registry: Arc<crate::agents::registry::Registry>,
) -> Result<Option<(TcpListener, Arc<server::Jump>)>, ConfigError> {
    let Some(jump) = &config.jump else {
        return Ok(None);
    };
    let key = hostkey::load_or_generate(&config.state_dir, jump.host_key_file.as_deref())
        .map_err(|e| host_key_invalid(&e))?;
    let certificate = host_certificate(jump, &key)?;
    let access = load_access(jump)?;
    let listener = TcpListener::bind(jump.listen)
        .await
        .map_err(|e| ConfigError::Invalid {
            key: "jump_listen",
            detail: format!("cannot listen on {}: {e}", jump.listen),
        })?;
    let state = server::Jump::new(
        users,
        registry,
        access,
        key,
        certificate,
        config.max_handshakes,
        crate::guard::AuthGuard::new(config.auth_failure_limit, config.auth_ban),
    );
    Ok(Some((listener, Arc::new(state))))
}

/// Serves the jump listener until shutdown.
pub(crate) async fn serve(listener: TcpListener, jump: Arc<server::Jump>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("jump listener for ssh -J on {addr}");
    }
    server::serve(listener, jump).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_stray_settings_are_named() {
        assert!(matches!(
            JumpConfig::from_settings(None, None, None, None, None),
            Ok(None)
        ));
        let err =
            JumpConfig::from_settings(None, None, Some("keys".into()), None, None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid jump_authorized_keys_file: the jump listener is off"),
            "{err}"
        );
        let err =
            JumpConfig::from_settings(Some("2222".into()), None, None, None, None).unwrap_err();
        assert!(err.to_string().contains("jump_listen"), "{err}");
        let on = JumpConfig::from_settings(Some("127.0.0.1:2222".into()), None, None, None, None)
            .unwrap()
            .unwrap();
        assert_eq!(on.listen.port(), 2222);
    }
}
