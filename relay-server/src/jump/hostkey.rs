//! The jump listener's host key: Ed25519, generated once in the state dir (mode 0600) or loaded
//! from an operator's file (one key a whole fleet can share, so users pin one key), and printed
//! in `known_hosts` form by `relay-server fingerprint --jump`.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
use russh::keys::ssh_key::LineEnding;
use russh::keys::{HashAlg, PrivateKey};

/// Name of the generated host key inside the state dir.
pub const GENERATED_HOST_KEY: &str = "jump_host_key";

/// Why the host key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// The file could not be read or written.
    #[error("jump host key {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not an unencrypted OpenSSH private key.
    #[error("jump host key {path}: {detail}; give an unencrypted OpenSSH private key (ssh-keygen -t ed25519 -N '' -f FILE)")]
    Format {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// Where the host key lives: the operator's file, else [`GENERATED_HOST_KEY`] in `state_dir`.
pub fn path(state_dir: &Path, file: Option<&Path>) -> PathBuf {
    file.map_or_else(|| state_dir.join(GENERATED_HOST_KEY), Path::to_path_buf)
}

/// Loads the host key from `file`, or from the state dir, generating it there on first use.
pub fn load_or_generate(state_dir: &Path, file: Option<&Path>) -> Result<PrivateKey, HostKeyError> {
    let path = path(state_dir, file);
    if file.is_none() && !path.exists() {
        generate(&path)?;
    }
    let text = std::fs::read_to_string(&path).map_err(|source| HostKeyError::Io {
        path: path.clone(),
        source,
    })?;
    let key = PrivateKey::from_openssh(text.as_bytes()).map_err(|e| HostKeyError::Format {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    if key.is_encrypted() {
        return Err(HostKeyError::Format {
            path,
            detail: "the key is encrypted".into(),
        });
    }
    Ok(key)
}

/// Writes a new Ed25519 key to `path`, readable by the relay's user only; an existing file is
/// never overwritten (a second relay starting at the same moment keeps the first one's key).
fn generate(path: &Path) -> Result<(), HostKeyError> {
    let io = |source| HostKeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let keypair = Ed25519Keypair::from_seed(&seed);
    let key =
        PrivateKey::new(KeypairData::Ed25519(keypair), "jumpgate jump host key").map_err(|e| {
            HostKeyError::Format {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }
        })?;
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| HostKeyError::Format {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut f) => f.write_all(text.as_bytes()).map_err(io),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(e)),
    }
}

/// The key's `known_hosts` line for users reaching the jump listener at `host:port`
/// (`[host]:port` unless the port is 22), plus its SHA256 fingerprint as a comment line, as
/// `ssh-keygen -lf` shows it.
pub fn known_hosts(key: &PrivateKey, host: &str, port: u16) -> String {
    let public = key.public_key();
    let mut public = public.clone();
    public.set_comment("");
    let line = public.to_openssh().unwrap_or_default();
    let pattern = if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    };
    format!(
        "# jumpgate jump host key {}\n{pattern} {}\n",
        key.fingerprint(HashAlg::Sha256),
        line.trim()
    )
}

/// The `known_hosts` line that trusts `certificate`'s CA (`@cert-authority`) for the relay at
/// `host:port`, with a comment telling the user to widen the pattern (`*.example.com`) so one
/// line trusts every relay the CA signs.
pub fn cert_authority(certificate: &russh::keys::Certificate, host: &str, port: u16) -> String {
    let ca = russh::keys::PublicKey::from(certificate.signature_key().clone());
    let line = ca.to_openssh().unwrap_or_default();
    let pattern = if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    };
    format!(
        "# or trust the host CA ({}) that signed its certificate {:?}; edit the host pattern to\n\
         # cover every relay it signs, e.g. *.example.com or [*.example.com]:{port}\n\
         @cert-authority {pattern} {}\n",
        ca.fingerprint(HashAlg::Sha256),
        jumpgate_proto::sanitize(certificate.key_id(), 64),
        line.trim()
    )
}

/// Reads `jump_host_certificate`: an OpenSSH host certificate for `key`, signed by the
/// operator's host CA, that the listener presents to clients trusting that CA
/// (`@cert-authority` in known_hosts), so one line trusts every relay of a fleet. Refused: a
/// user certificate, one for another key, one past its validity.
pub fn load_certificate(
    path: &Path,
    key: &PrivateKey,
    now: std::time::SystemTime,
) -> Result<russh::keys::Certificate, String> {
    use russh::keys::ssh_key::certificate::CertType;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cert = russh::keys::Certificate::from_openssh(text.trim()).map_err(|e| {
        format!(
            "{}: not an OpenSSH certificate ({e}); sign the host key with `ssh-keygen -s HOST_CA -h -I ID -n HOSTNAME KEY.pub`",
            path.display()
        )
    })?;
    if cert.cert_type() != CertType::Host {
        return Err(format!(
            "{}: a user certificate; sign the host key with -h",
            path.display()
        ));
    }
    if cert.public_key() != key.public_key().key_data() {
        return Err(format!(
            "{}: certifies another key than the jump host key ({}); sign the key `relay-server fingerprint --jump` prints",
            path.display(),
            key.public_key().fingerprint(russh::keys::HashAlg::Sha256)
        ));
    }
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now < cert.valid_after() || now >= cert.valid_before() {
        return Err(format!(
            "{}: outside its validity window; sign it again",
            path.display()
        ));
    }
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_with_mode_0600_and_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_generate(dir.path(), None).unwrap();
        let second = load_or_generate(dir.path(), None).unwrap();
        assert_eq!(first.public_key(), second.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(GENERATED_HOST_KEY))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let line = known_hosts(&first, "relay.example", 2222);
        assert!(
            line.contains("\n[relay.example]:2222 ssh-ed25519 "),
            "{line}"
        );
        assert!(
            line.starts_with("# jumpgate jump host key SHA256:"),
            "{line}"
        );
    }

    #[test]
    fn a_missing_or_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = load_or_generate(dir.path(), Some(&missing)).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        std::fs::write(&missing, "not a key").unwrap();
        let err = load_or_generate(dir.path(), Some(&missing)).unwrap_err();
        assert!(
            err.to_string().contains("unencrypted OpenSSH private key"),
            "{err}"
        );
    }

    #[test]
    fn a_host_certificate_must_be_for_this_key_a_host_one_and_current() {
        use russh::keys::ssh_key::certificate::{Builder, CertType};
        use russh::keys::ssh_key::private::Ed25519Keypair;
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&[1; 32]));
        let other = PrivateKey::from(Ed25519Keypair::from_seed(&[2; 32]));
        let ca = PrivateKey::from(Ed25519Keypair::from_seed(&[3; 32]));
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let write = |subject: &PrivateKey, kind: CertType, until: u64| {
            let mut b = Builder::new(
                vec![0; 16],
                subject.public_key().key_data().clone(),
                1_700_000_000,
                until,
            )
            .unwrap();
            b.cert_type(kind).unwrap().valid_principal("relay").unwrap();
            let path = dir.path().join("cert");
            std::fs::write(&path, b.sign(&ca).unwrap().to_openssh().unwrap()).unwrap();
            path
        };
        let good = write(&key, CertType::Host, 1_900_000_000);
        assert!(load_certificate(&good, &key, now).is_ok());
        let err = load_certificate(&good, &other, now).unwrap_err();
        assert!(err.contains("certifies another key"), "{err}");
        let err =
            load_certificate(&write(&key, CertType::User, 1_900_000_000), &key, now).unwrap_err();
        assert!(err.contains("a user certificate"), "{err}");
        let err =
            load_certificate(&write(&key, CertType::Host, 1_750_000_000), &key, now).unwrap_err();
        assert!(err.contains("outside its validity window"), "{err}");
    }
}
