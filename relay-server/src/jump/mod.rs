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
//! - [`server`]: the accept loop (per-address caps, an authentication deadline) and the
//!   per-connection handler.

pub(crate) mod auth;
pub mod hostkey;
pub(crate) mod server;

use std::net::SocketAddr;
use std::path::PathBuf;

use std::sync::Arc;

use jumpgate_config::ConfigError;
use tokio::net::TcpListener;

use crate::cli::CliError;
use crate::config::{Purpose, RunArgs};
use crate::RelayConfig;

/// The jump listener's settings, checked once with the rest of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpConfig {
    /// Where the SSH server listens.
    pub listen: SocketAddr,
    /// The host key (OpenSSH private key file); `None`: `jump_host_key` in the state dir,
    /// generated on first start.
    pub host_key_file: Option<PathBuf>,
    /// Only these keys may jump (OpenSSH authorized_keys format); with no file and no CA, any
    /// key may (the job's own sshd still authenticates the user).
    pub authorized_keys_file: Option<PathBuf>,
    /// CA public keys whose user certificates may jump (`TrustedUserCAKeys` semantics).
    pub trusted_user_ca_keys: Option<PathBuf>,
}

impl JumpConfig {
    /// Builds the settings from the raw flags: `None` when `jump_listen` is not set (the
    /// listener is off by default); the other jump settings then must not be set either.
    pub fn from_settings(
        listen: Option<String>,
        host_key_file: Option<PathBuf>,
        authorized_keys_file: Option<PathBuf>,
        trusted_user_ca_keys: Option<PathBuf>,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(listen) = listen else {
            let stray = [
                ("jump_host_key_file", host_key_file.is_some()),
                ("jump_authorized_keys_file", authorized_keys_file.is_some()),
                ("jump_trusted_user_ca_keys", trusted_user_ca_keys.is_some()),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(ConfigError::Invalid {
                    key,
                    detail: "the jump listener is off; set jump_listen (--jump-listen), e.g. 0.0.0.0:2222, to use it".into(),
                });
            }
            return Ok(None);
        };
        let listen = listen.parse().map_err(|_| ConfigError::Invalid {
            key: "jump_listen",
            detail: format!("{listen:?} is not IP:PORT, e.g. 0.0.0.0:2222"),
        })?;
        Ok(Some(Self {
            listen,
            host_key_file,
            authorized_keys_file,
            trusted_user_ca_keys,
        }))
    }
}

/// Where users reach the jump listener (`HOST:PORT` for `ssh -J`), if it is on.
fn address(config: &RelayConfig) -> Option<(String, u16)> {
    let port = config.jump.as_ref()?.listen.port();
    Some((config.public_host.clone(), port))
}

/// `HOST:PORT` as `ssh -J` takes it (IPv6 in brackets).
fn jump_spec(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn jump_off() -> CliError {
    CliError::Config(ConfigError::Missing {
        key: "jump_listen",
        hint: "the relay has no jump listener; set jump_listen (--jump-listen), e.g. 0.0.0.0:2222",
    })
}

/// `relay-server fingerprint --jump`: the jump host key as a `known_hosts` line (generated in
/// the state dir on first use, as the relay would), for users to pin.
pub fn fingerprint_cli(args: &RunArgs) -> Result<String, CliError> {
    let config = RelayConfig::load(args.clone(), Purpose::Inspect)?;
    let (host, port) = address(&config).ok_or_else(jump_off)?;
    let jump = config.jump.as_ref().ok_or_else(jump_off)?;
    let key = hostkey::load_or_generate(&config.state_dir, jump.host_key_file.as_deref())
        .map_err(|e| host_key_invalid(&e))?;
    Ok(hostkey::known_hosts(&key, &host, port))
}

/// A host key that cannot be used is a configuration error (exit 64).
fn host_key_invalid(e: &hostkey::HostKeyError) -> ConfigError {
    ConfigError::Invalid {
        key: "jump_host_key_file",
        detail: e.to_string(),
    }
}

/// `relay-server ssh-config --jump`: one wildcard block that reaches every job by name through
/// the jump listener, with OpenSSH alone (Windows and VS Code included).
pub fn ssh_config_cli(
    args: &RunArgs,
    pattern: &str,
    user: Option<&str>,
) -> Result<String, CliError> {
    let config = RelayConfig::load(args.clone(), Purpose::Inspect)?;
    let (host, port) = address(&config).ok_or_else(jump_off)?;
    let mut out = format!(
        "# Generated by `relay-server ssh-config --jump`: reach any job by name with `ssh -J`.\n\
         # Pin the relay: `relay-server fingerprint --jump` >> ~/.ssh/known_hosts\n\
         Host {pattern}\n    ProxyJump {}\n",
        jump_spec(&host, port)
    );
    if let Some(user) = user {
        out.push_str(&format!("    User {user}\n"));
    }
    Ok(out)
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
    let access = auth::Access::load(
        jump.authorized_keys_file.as_deref(),
        jump.trusted_user_ca_keys.as_deref(),
    )
    .map_err(|e| ConfigError::Invalid {
        key: e.key(),
        detail: e.to_string(),
    })?;
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
            JumpConfig::from_settings(None, None, None, None),
            Ok(None)
        ));
        let err = JumpConfig::from_settings(None, None, Some("keys".into()), None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid jump_authorized_keys_file: the jump listener is off"),
            "{err}"
        );
        let err = JumpConfig::from_settings(Some("2222".into()), None, None, None).unwrap_err();
        assert!(err.to_string().contains("jump_listen"), "{err}");
        let on = JumpConfig::from_settings(Some("127.0.0.1:2222".into()), None, None, None)
            .unwrap()
            .unwrap();
        assert_eq!(on.listen.port(), 2222);
    }
}
