//! The jump listener's settings: a leaf module the relay's configuration can build them with,
//! without importing the listener (which uses the configuration).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use jumpgate_config::{ConfigError, DurationValue};

/// The systemd credential that stands for `jump_ca_key` when the setting is not given
/// (`LoadCredential=jump-ca-key:/etc/jumpgate/jump_ca`).
pub const CA_KEY_CREDENTIAL: &str = "jump-ca-key";
/// Default cap on a signed certificate's lifetime.
pub const DEFAULT_CERT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Signing short-lived user certificates for job names (`POST /api/jump/certificates`,
/// `relay-server sign-jump-cert`): independent of the listener, so a relay without one (or an
/// operator's machine) can sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningConfig {
    /// The operator's SSH CA private key (OpenSSH format, readable by the relay alone).
    pub ca_key_file: PathBuf,
    /// Longest lifetime a certificate may be given.
    pub max_lifetime: Duration,
}

impl SigningConfig {
    /// `None` when `jump_ca_key` is not set (nor its credential); the cap alone is an error.
    pub fn from_settings(
        ca_key_file: Option<PathBuf>,
        max_lifetime: Option<DurationValue>,
    ) -> Result<Option<Self>, ConfigError> {
        let ca_key_file = jumpgate_config::or_credential(ca_key_file, CA_KEY_CREDENTIAL);
        let set = max_lifetime.is_some();
        let max_lifetime = jumpgate_config::duration_setting(
            "jump_cert_max_lifetime",
            max_lifetime,
            DEFAULT_CERT_MAX_LIFETIME,
        )?;
        if max_lifetime.is_zero() {
            return Err(ConfigError::Invalid {
                key: "jump_cert_max_lifetime",
                detail: "must be more than 0, e.g. 24h".into(),
            });
        }
        match ca_key_file {
            Some(ca_key_file) => Ok(Some(Self {
                ca_key_file,
                max_lifetime,
            })),
            None if set => Err(ConfigError::Missing {
                key: "jump_ca_key",
                hint: "jump_cert_max_lifetime is set but no CA key signs certificates; set jump_ca_key (--jump-ca-key FILE) or pass the systemd credential jump-ca-key",
            }),
            None => Ok(None),
        }
    }
}

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
    /// An OpenSSH host certificate of the host key, presented to clients that trust its CA.
    pub host_certificate: Option<PathBuf>,
}

impl JumpConfig {
    /// Builds the settings from the raw flags: `None` when `jump_listen` is not set (the
    /// listener is off by default); the other jump settings then must not be set either.
    pub fn from_settings(
        listen: Option<String>,
        host_key_file: Option<PathBuf>,
        authorized_keys_file: Option<PathBuf>,
        trusted_user_ca_keys: Option<PathBuf>,
        host_certificate: Option<PathBuf>,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(listen) = listen else {
            let stray = [
                ("jump_host_key_file", host_key_file.is_some()),
                ("jump_host_certificate", host_certificate.is_some()),
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
            host_certificate,
        }))
    }
}
