//! Short-lived OpenSSH user certificates for a set of job names (the flow of a platform that
//! "issues a short-lived SSH certificate, and routes the connection to the correct training
//! job"): the operator's SSH CA signs a user's public key with the job names as principals, for
//! a lifetime capped by `jump_cert_max_lifetime`.
//!
//! The jump listener accepts such a certificate for exactly those names once the CA's public key
//! is in `jump_trusted_user_ca_keys`; a job's own sshd accepts it when the same `.pub` is in its
//! `TrustedUserCAKeys` (docs/operations.md shows the principals file that maps the job's name
//! to its login user). Used by `POST /api/jump/certificates` and `relay-server sign-jump-cert`.
//!
//! The CA key comes from a file that only its owner may read (`jump_ca_key`, or the systemd
//! credential `jump-ca-key`); it is never a flag value, never logged and never in an error.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{Algorithm, Certificate, HashAlg, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};

use super::settings::SigningConfig;

/// How far back a certificate's validity starts, so a user's clock running a little behind
/// the relay's does not make a fresh certificate "not yet valid".
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Most names one certificate may carry.
pub const MAX_NAMES: usize = 256;
/// Longest key id.
pub const MAX_KEY_ID_LEN: usize = 256;
/// The extensions OpenSSH's `ssh-keygen -s` grants by default, so the job's own sshd gives a
/// certificate user a pty, port forwarding (VS Code) and agent forwarding as a key user.
const EXTENSIONS: &[&str] = &[
    "permit-X11-forwarding",
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
    "permit-user-rc",
];

/// Why the CA key cannot be used, or a request cannot be signed. Never quotes the key.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The CA key file is unusable (mode, read error).
    #[error(transparent)]
    Secret(#[from] jumpgate_config::SecretFileError),
    /// The CA key file holds no usable key.
    #[error("jump_ca_key {path}: {detail}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        detail: String,
    },
    /// The request is wrong (a client error: HTTP 400, exit 64).
    #[error("{0}")]
    Request(String),
    /// Signing itself failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A signing request, as the admin API takes it in JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    /// The user's OpenSSH public key (`ssh-ed25519 AAAA... comment`).
    pub public_key: String,
    /// The job (agent) names the certificate reaches; its principals.
    pub names: Vec<String>,
    /// How long it is valid, e.g. `8h`; at most `jump_cert_max_lifetime`.
    pub lifetime: String,
    /// The certificate's key id, shown in audit lines (default: `jumpgate:` and the key's
    /// fingerprint).
    #[serde(default)]
    pub key_id: Option<String>,
}

/// A signed certificate and what it says, as the admin API answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Signed {
    /// The certificate in OpenSSH form: save it as `KEY-cert.pub` next to the private key.
    pub certificate: String,
    /// Its key id.
    pub key_id: String,
    /// Its serial number (random).
    pub serial: u64,
    /// Its principals: the job names.
    pub names: Vec<String>,
    /// Valid from (Unix seconds).
    pub valid_after: u64,
    /// Valid until (Unix seconds).
    pub valid_before: u64,
    /// The lifetime asked for, in seconds (`valid_before` minus the signing time).
    pub lifetime_secs: u64,
    /// SHA256 fingerprint of the certified key.
    pub fingerprint: String,
}

impl Signed {
    /// The audit file's record of this signing, signed at `now` for `caller`.
    pub(crate) fn audit_record(
        &self,
        caller: &str,
        now: SystemTime,
    ) -> crate::audit::CertificateRecord {
        crate::audit::CertificateRecord {
            event: "jump_certificate",
            time: crate::audit::timestamp(now),
            caller: caller.to_string(),
            key_id: self.key_id.clone(),
            serial: self.serial,
            names: self.names.clone(),
            lifetime_secs: self.lifetime_secs,
            valid_after: self.valid_after,
            valid_before: self.valid_before,
            fingerprint: self.fingerprint.clone(),
        }
    }

    /// The audit line for this signing: key id, names, lifetime, key and who asked.
    pub fn audit(&self, caller: &str) -> String {
        format!(
            "jump certificate signed: key id {:?}, serial {}, names {:?}, lifetime {}s (valid from {} to {}), key {}, for {caller}",
            jumpgate_proto::sanitize(&self.key_id, MAX_KEY_ID_LEN),
            self.serial,
            self.names,
            self.lifetime_secs,
            self.valid_after,
            self.valid_before,
            self.fingerprint,
        )
    }
}

/// The operator's SSH CA, loaded once.
pub struct Signer {
    ca: PrivateKey,
    max_lifetime: Duration,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("ca", &self.ca.fingerprint(HashAlg::Sha256).to_string())
            .field("max_lifetime", &self.max_lifetime)
            .finish()
    }
}

impl Signer {
    /// Loads the CA key: a private file (mode 0600, or a systemd credential), an unencrypted
    /// OpenSSH Ed25519 or ECDSA key.
    pub fn load(config: &SigningConfig) -> Result<Self, SignError> {
        let ca = read_ca(&config.ca_key_file)?;
        Ok(Self {
            ca,
            max_lifetime: config.max_lifetime,
        })
    }

    /// The CA's public key: what `jump_trusted_user_ca_keys` and the jobs' `TrustedUserCAKeys`
    /// must list.
    pub fn ca_public(&self) -> &PublicKey {
        self.ca.public_key()
    }

    /// Signs `request` as of `now`: valid from `now - BACKDATE` to `now + lifetime`.
    pub fn sign(&self, request: &SignRequest, now: SystemTime) -> Result<Signed, SignError> {
        let bad = |s: String| SignError::Request(s);
        let user = PublicKey::from_openssh(request.public_key.trim()).map_err(|e| {
            bad(format!(
                "public_key is not an OpenSSH public key ({e}); send the line of the user's .pub file"
            ))
        })?;
        if user.key_data().is_certificate() {
            return Err(bad(
                "public_key is a certificate; send the user's public key itself".into(),
            ));
        }
        if request.names.is_empty() || request.names.len() > MAX_NAMES {
            return Err(bad(format!(
                "names must list between 1 and {MAX_NAMES} job names, not {}",
                request.names.len()
            )));
        }
        for name in &request.names {
            jumpgate_proto::validate_name("job", name).map_err(|e| {
                bad(format!(
                    "names: {e} (certificates name jobs exactly; no patterns)"
                ))
            })?;
        }
        let lifetime = jumpgate_config::parse_duration(&request.lifetime)
            .map_err(|e| bad(format!("lifetime: {e}")))?;
        if lifetime.is_zero() || lifetime > self.max_lifetime {
            return Err(bad(format!(
                "lifetime {} must be more than 0 and at most jump_cert_max_lifetime ({})",
                request.lifetime,
                humantime::format_duration(self.max_lifetime)
            )));
        }
        let fingerprint = user.fingerprint(HashAlg::Sha256).to_string();
        let key_id = match &request.key_id {
            Some(id) => {
                if id.is_empty() || id.len() > MAX_KEY_ID_LEN || id.chars().any(char::is_control) {
                    return Err(bad(format!(
                        "key_id must be 1 to {MAX_KEY_ID_LEN} bytes without control characters"
                    )));
                }
                id.clone()
            }
            None => format!("jumpgate:{fingerprint}"),
        };
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let valid_after = now.saturating_sub(BACKDATE.as_secs());
        let valid_before = now.saturating_add(lifetime.as_secs().max(1));
        let mut nonce = [0u8; Builder::RECOMMENDED_NONCE_SIZE];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let serial = rand::rngs::OsRng.next_u64();
        let failed = |e: russh::keys::ssh_key::Error| SignError::Sign(e.to_string());
        let mut builder = Builder::new(
            nonce.to_vec(),
            user.key_data().clone(),
            valid_after,
            valid_before,
        )
        .map_err(failed)?;
        builder
            .serial(serial)
            .map_err(failed)?
            .cert_type(CertType::User)
            .map_err(failed)?
            .key_id(key_id.clone())
            .map_err(failed)?;
        for name in &request.names {
            builder.valid_principal(name.clone()).map_err(failed)?;
        }
        for ext in EXTENSIONS {
            builder.extension(*ext, "").map_err(failed)?;
        }
        let cert: Certificate = builder.sign(&self.ca).map_err(failed)?;
        Ok(Signed {
            certificate: cert.to_openssh().map_err(failed)?,
            key_id,
            serial,
            names: request.names.clone(),
            valid_after,
            valid_before,
            lifetime_secs: valid_before - now,
            fingerprint,
        })
    }
}

/// Reads and checks the CA's private key; errors name the file, never its content.
fn read_ca(path: &Path) -> Result<PrivateKey, SignError> {
    jumpgate_config::secret_file::check_private(path)?;
    let invalid = |detail: String| SignError::Key {
        path: path.to_path_buf(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    let ca = PrivateKey::from_openssh(text.trim()).map_err(|_| {
        invalid(
            "not an OpenSSH private key; create one with `ssh-keygen -t ed25519 -f FILE`".into(),
        )
    })?;
    if ca.is_encrypted() {
        return Err(invalid(
            "the key is passphrase-protected; the relay needs it unencrypted (`ssh-keygen -p -N '' -f FILE`), readable by the relay alone or passed as the systemd credential jump-ca-key".into(),
        ));
    }
    match ca.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => Ok(ca),
        other => Err(invalid(format!(
            "{} CA keys are not supported; use an Ed25519 CA (`ssh-keygen -t ed25519`)",
            other.as_str()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn ca_file(dir: &Path) -> PathBuf {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
            &seed,
        ));
        let path = dir.join("ca");
        let text = key
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .unwrap();
        std::fs::write(&path, text.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn signer(dir: &Path) -> Signer {
        Signer::load(&SigningConfig {
            ca_key_file: ca_file(dir),
            max_lifetime: Duration::from_secs(24 * 3600),
        })
        .unwrap()
    }

    fn request(names: &[&str], lifetime: &str) -> SignRequest {
        SignRequest {
            public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEFkwdSamLggRUBgB2UbBTTYQdSHVWWZrGqYU1Ff5QMd a@b".into(),
            names: names.iter().map(|n| n.to_string()).collect(),
            lifetime: lifetime.into(),
            key_id: Some("alice@example".into()),
        }
    }

    #[test]
    fn signs_the_names_for_the_lifetime_backdated() {
        let dir = tempfile::tempdir().unwrap();
        let signer = signer(dir.path());
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let signed = signer
            .sign(&request(&["job-1", "job-2"], "8h"), now)
            .unwrap();
        let cert = Certificate::from_openssh(&signed.certificate).unwrap();
        assert_eq!(cert.valid_principals(), ["job-1", "job-2"]);
        assert_eq!(cert.key_id(), "alice@example");
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.valid_after(), 1_800_000_000 - 300);
        assert_eq!(cert.valid_before(), 1_800_000_000 + 8 * 3600);
        let ca = signer.ca_public().fingerprint(HashAlg::Sha256);
        cert.validate_at(1_800_000_000, &[ca]).unwrap();
        assert!(signed
            .audit("admin API")
            .contains("names [\"job-1\", \"job-2\"]"));
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let signer = signer(dir.path());
        let now = SystemTime::now();
        let err = |r: SignRequest| signer.sign(&r, now).unwrap_err().to_string();
        assert!(err(request(&["j"], "25h")).contains("at most jump_cert_max_lifetime (1day)"));
        assert!(err(request(&[], "1h")).contains("between 1 and 256"));
        assert!(err(request(&["job-*"], "1h")).contains("no patterns"));
        assert!(err(request(&["j"], "soon")).starts_with("lifetime:"));
        let mut r = request(&["j"], "1h");
        r.public_key = "ssh-ed25519 garbage".into();
        assert!(err(r).contains("not an OpenSSH public key"));
    }

    #[test]
    fn the_ca_file_must_be_private_unencrypted_and_not_rsa() {
        let dir = tempfile::tempdir().unwrap();
        let path = ca_file(dir.path());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = SigningConfig {
            ca_key_file: path.clone(),
            max_lifetime: Duration::from_secs(60),
        };
        let err = Signer::load(&config).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a key").unwrap();
        let err = Signer::load(&config).unwrap_err().to_string();
        assert!(err.contains("not an OpenSSH private key"), "{err}");
        assert!(!err.contains("not a key\""), "{err}");
        let debug = format!("{:?}", signer(dir.path()));
        assert!(
            debug.contains("SHA256:") && !debug.contains("PRIVATE"),
            "{debug}"
        );
    }
}
