//! Who may jump: the operator's choice between any key (the job's own sshd still authenticates
//! the user, as behind any bastion), the keys of an `authorized_keys` file, and OpenSSH user
//! certificates signed by a trusted CA (`TrustedUserCAKeys` semantics).
//!
//! A certificate is accepted when it is a user certificate signed by one of the CA keys, within
//! its validity window, with no critical options (`force-command` and `source-address` mean
//! nothing to a jump host, and a certificate the relay cannot honour in full is refused) and at
//! least one principal. Its principals are the jobs it reaches: an agent name, `prefix-*` for
//! every name with that prefix, or `*` for every job. A certificate without principals is
//! refused (OpenSSH would take it for any user; here that would mean every job).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::Fingerprint;
use russh::keys::{Certificate, HashAlg, PublicKey};

/// An access file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The file could not be read.
    #[error("{key} {path}: {source}")]
    Io {
        /// The setting naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not an OpenSSH public key.
    #[error("{key} {path} line {line}: not an OpenSSH public key ({detail}); expected `ssh-ed25519 AAAA... comment`")]
    Line {
        /// The setting naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parser's words.
        detail: String,
    },
    /// The file holds no key at all.
    #[error("{key} {path}: no keys in the file; add one OpenSSH public key per line")]
    Empty {
        /// The setting naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
    },
}

impl AccessError {
    /// The setting naming the file.
    pub fn key(&self) -> &'static str {
        match self {
            AccessError::Io { key, .. }
            | AccessError::Line { key, .. }
            | AccessError::Empty { key, .. } => key,
        }
    }
}

/// Who may open the jump listener's door.
#[derive(Debug, Default)]
pub(crate) struct Access {
    /// Keys listed in `jump_authorized_keys_file`; `None`: no such file.
    keys: Option<Vec<KeyData>>,
    /// Fingerprints of the CA keys of `jump_trusted_user_ca_keys`; empty: no certificates.
    cas: Vec<Fingerprint>,
}

/// The user behind an authenticated jump connection, for routing and the audit log.
#[derive(Debug, Clone)]
pub(crate) struct JumpUser {
    /// The user's key (the certificate's key for a certificate), matched against an agent's
    /// `jump_authorized_keys`.
    pub key: KeyData,
    /// SHA256 fingerprint of the user's key (the certificate's key for a certificate).
    pub fingerprint: String,
    /// A certificate's key id.
    pub key_id: Option<String>,
    /// A certificate's principals: the jobs it reaches; `None` for a plain key (every job).
    pub principals: Option<Vec<String>>,
}

impl JumpUser {
    /// Whether an agent that brought `keys` (its `jump_authorized_keys`) admits this user:
    /// any user when it brought none, else only those keys, plain or certified.
    pub fn admitted_by(&self, keys: Option<&[KeyData]>) -> bool {
        keys.is_none_or(|keys| keys.contains(&self.key))
    }

    /// Whether this user may reach the agent `name`.
    pub fn may_reach(&self, name: &str) -> bool {
        let Some(principals) = &self.principals else {
            return true;
        };
        principals.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        })
    }

    /// How the audit log names the user: `key SHA256:...` plus `cert ID` for a certificate.
    pub fn audit(&self) -> String {
        match &self.key_id {
            Some(id) => format!(
                "key {} cert {}",
                self.fingerprint,
                jumpgate_proto::sanitize(id, jumpgate_proto::display::MAX_FIELD_LEN)
            ),
            None => format!("key {}", self.fingerprint),
        }
    }
}

impl Access {
    /// Reads the access files; with neither, any key may jump.
    pub fn load(
        authorized_keys: Option<&Path>,
        trusted_cas: Option<&Path>,
    ) -> Result<Self, AccessError> {
        let keys = authorized_keys
            .map(|p| read_keys("jump_authorized_keys_file", p))
            .transpose()?;
        let cas = match trusted_cas {
            Some(p) => read_keys("jump_trusted_user_ca_keys", p)?
                .iter()
                .map(|k| k.fingerprint(HashAlg::Sha256))
                .collect(),
            None => Vec::new(),
        };
        Ok(Self { keys, cas })
    }

    /// Whether certificates signed by `ca` are accepted.
    pub fn trusts(&self, ca: &PublicKey) -> bool {
        self.cas.contains(&ca.fingerprint(HashAlg::Sha256))
    }

    /// Whether plain keys are accepted at all (any key, or a listed one).
    fn any_key(&self) -> bool {
        self.keys.is_none() && self.cas.is_empty()
    }

    /// A plain public key whose possession was proven: accepted, or why not.
    pub fn check_key(&self, key: &PublicKey) -> Result<JumpUser, String> {
        let listed = match &self.keys {
            Some(keys) => keys.iter().any(|k| k == key.key_data()),
            None => self.any_key(),
        };
        if !listed {
            return Err("key not in jump_authorized_keys_file".into());
        }
        Ok(JumpUser {
            key: key.key_data().clone(),
            fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
            key_id: None,
            principals: None,
        })
    }

    /// A user certificate whose key's possession was proven: accepted, or why not.
    pub fn check_certificate(
        &self,
        cert: &Certificate,
        now: SystemTime,
    ) -> Result<JumpUser, String> {
        if self.cas.is_empty() {
            return Err("certificates are not accepted (no jump_trusted_user_ca_keys)".into());
        }
        if cert.cert_type() != CertType::User {
            return Err("not a user certificate".into());
        }
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now < cert.valid_after() || now >= cert.valid_before() {
            return Err(format!(
                "certificate {:?} is outside its validity window",
                cert.key_id()
            ));
        }
        cert.validate_at(now, &self.cas)
            .map_err(|_| "certificate not signed by a trusted CA".to_string())?;
        if let Some((option, _)) = cert.critical_options().iter().next() {
            return Err(format!(
                "certificate has critical option {option:?}, which a jump host cannot honour"
            ));
        }
        if cert.valid_principals().is_empty() {
            return Err("certificate names no principals (the jobs it may reach)".into());
        }
        Ok(JumpUser {
            key: cert.public_key().clone(),
            fingerprint: KeyData::fingerprint(cert.public_key(), HashAlg::Sha256).to_string(),
            key_id: Some(cert.key_id().to_string()),
            principals: Some(cert.valid_principals().to_vec()),
        })
    }
}

/// The keys an agent brought in its hello ([`jumpgate_proto::AgentHello::jump_keys`]): `None`
/// when it brought none, or why the hello is refused (too many, too long, not a key).
pub(crate) fn agent_keys(lines: &[String]) -> Result<Option<Arc<[KeyData]>>, String> {
    use jumpgate_proto::{MAX_JUMP_KEYS, MAX_JUMP_KEY_LEN};
    if lines.is_empty() {
        return Ok(None);
    }
    if lines.len() > MAX_JUMP_KEYS {
        return Err(format!(
            "jump_authorized_keys lists {} keys; the relay takes at most {MAX_JUMP_KEYS}",
            lines.len()
        ));
    }
    let mut keys = Vec::with_capacity(lines.len());
    for (n, line) in lines.iter().enumerate() {
        if line.len() > MAX_JUMP_KEY_LEN {
            return Err(format!(
                "jump_authorized_keys key {} is {} bytes; the relay takes at most {MAX_JUMP_KEY_LEN}",
                n + 1,
                line.len()
            ));
        }
        let key = PublicKey::from_openssh(line).map_err(|e| {
            format!(
                "jump_authorized_keys key {} is not an OpenSSH public key: {e}",
                n + 1
            )
        })?;
        if key.key_data().is_certificate() {
            return Err(format!(
                "jump_authorized_keys key {} is a certificate, not a key",
                n + 1
            ));
        }
        keys.push(key.key_data().clone());
    }
    Ok(Some(keys.into()))
}

/// One OpenSSH public key per line (blank lines and `#` comments skipped); a leading options
/// field (`restrict,...`) is skipped.
fn read_keys(key: &'static str, path: &Path) -> Result<Vec<KeyData>, AccessError> {
    let text = std::fs::read_to_string(path).map_err(|source| AccessError::Io {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = PublicKey::from_openssh(line).or_else(|first| {
            match line.split_once(char::is_whitespace) {
                Some((_options, rest)) => PublicKey::from_openssh(rest.trim_start()),
                None => Err(first),
            }
        });
        match parsed {
            Ok(k) => keys.push(k.key_data().clone()),
            Err(e) => {
                return Err(AccessError::Line {
                    key,
                    path: path.to_path_buf(),
                    line: n + 1,
                    detail: e.to_string(),
                })
            }
        }
    }
    if keys.is_empty() {
        return Err(AccessError::Empty {
            key,
            path: path.to_path_buf(),
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEFkwdSamLggRUBgB2UbBTTYQdSHVWWZrGqYU1Ff5QMd";

    fn user(principals: &[&str]) -> JumpUser {
        JumpUser {
            key: PublicKey::from_openssh(KEY).unwrap().key_data().clone(),
            fingerprint: "SHA256:x".into(),
            key_id: Some("alice".into()),
            principals: Some(principals.iter().map(|p| p.to_string()).collect()),
        }
    }

    #[test]
    fn principals_name_jobs_exactly_by_prefix_or_all() {
        assert!(user(&["vh-1"]).may_reach("vh-1"));
        assert!(!user(&["vh-1"]).may_reach("vh-10"));
        assert!(user(&["vh-*"]).may_reach("vh-10"));
        assert!(!user(&["vh-*"]).may_reach("db-1"));
        assert!(user(&["*"]).may_reach("anything"));
        assert!(!user(&[]).may_reach("vh-1"));
        let plain = JumpUser {
            principals: None,
            key_id: None,
            ..user(&[])
        };
        assert!(plain.may_reach("vh-1"));
        assert_eq!(plain.audit(), "key SHA256:x");
        assert_eq!(user(&["*"]).audit(), "key SHA256:x cert alice");
    }

    #[test]
    fn an_agents_keys_admit_exactly_themselves() {
        assert!(matches!(agent_keys(&[]), Ok(None)));
        let keys = agent_keys(&[KEY.to_string()]).unwrap();
        assert!(user(&["*"]).admitted_by(keys.as_deref()));
        assert!(user(&["*"]).admitted_by(None));
        let other =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let keys = agent_keys(&[other.to_string()]).unwrap();
        assert!(!user(&["*"]).admitted_by(keys.as_deref()));
        let err = agent_keys(&["ssh-ed25519 nope".into()]).unwrap_err();
        assert!(err.contains("key 1 is not an OpenSSH public key"), "{err}");
        let err = agent_keys(&vec![KEY.to_string(); 33]).unwrap_err();
        assert!(err.contains("at most 32"), "{err}");
        let err = agent_keys(&["x".repeat(2000)]).unwrap_err();
        assert!(err.contains("2000 bytes"), "{err}");
    }

    #[test]
    fn authorized_keys_lines_with_options_comments_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEFkwdSamLggRUBgB2UbBTTYQdSHVWWZrGqYU1Ff5QMd a@b";
        std::fs::write(&path, format!("# team\n\nrestrict {key}\n{key}\n")).unwrap();
        let access = Access::load(Some(&path), None).unwrap();
        assert_eq!(access.keys.as_ref().unwrap().len(), 2);
        std::fs::write(&path, format!("{key}\nssh-ed25519 garbage\n")).unwrap();
        let err = Access::load(Some(&path), None).unwrap_err().to_string();
        assert!(err.contains("line 2: not an OpenSSH public key"), "{err}");
        std::fs::write(&path, "# nobody\n").unwrap();
        let err = Access::load(Some(&path), None).unwrap_err().to_string();
        assert!(err.contains("no keys in the file"), "{err}");
    }
}
