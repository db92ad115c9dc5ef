//! The jump listener's settings: a leaf module the relay's configuration can build them with,
//! without importing the listener (which uses the configuration).

use std::net::SocketAddr;
use std::path::PathBuf;

use jumpgate_config::ConfigError;

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
