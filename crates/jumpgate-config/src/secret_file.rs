//! Reading tokens and keys from files, including the copies systemd hands a service
//! (`LoadCredential=`).
//!
//! Under systemd with `DynamicUser=yes` the service cannot read a root-owned 0600 file in
//! /etc/jumpgate; `LoadCredential=NAME:/etc/jumpgate/FILE` copies it to
//! `$CREDENTIALS_DIRECTORY/NAME`, readable by the service alone. Each secret setting of either
//! binary has a conventional credential name ([`credential`]): when the setting is given neither
//! as a flag nor in the config file and that credential exists, the setting takes its path. So
//! an operator adds one `LoadCredential=` line to the unit and names the file nowhere else.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use jumpgate_proto::Secret;

/// Why a secret file was refused. Messages name the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// This user may not read the file.
    #[error("cannot read secret file {path}: permission denied; let the user the service runs as read it (chown), or under systemd pass it with LoadCredential=NAME:{path} and leave the setting unset (see \"Secrets under systemd\" in docs/operations.md)")]
    Denied {
        /// The file.
        path: PathBuf,
    },
    /// The file could not be read.
    #[error("cannot read secret file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error("secret file {path} is readable by group or others (mode {mode:o}); fix it with: chmod 600 {path}")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file holds nothing but whitespace.
    #[error("secret file {path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// The conventional credential names: `LoadCredential=NAME:PATH` with one of these names stands
/// for the setting named beside it when that setting is not given (see the module docs).
pub mod credential {
    /// Either binary's `token_file`: the shared agent token.
    pub const TOKEN: &str = "token";
    /// The relay's `tokens_file`: per-agent tokens.
    pub const TOKENS: &str = "tokens.toml";
    /// The relay's `admin_token_file`.
    pub const ADMIN_TOKEN: &str = "admin-token";
    /// The relay's `webhook_secret_file`.
    pub const WEBHOOK_SECRET: &str = "webhook-secret";
    /// The relay's `tls_cert` (not secret, but it comes with its key).
    pub const TLS_CERT: &str = "tls.crt";
    /// The relay's `tls_key`.
    pub const TLS_KEY: &str = "tls.key";
    /// The relay's `join_key_file`: the public key join tokens are checked against. Not secret,
    /// but replacing it lets anyone mint tokens, so it travels like the secrets.
    pub const JOIN_KEY: &str = "join-key.pub";
    /// The agent's `client_cert` (not secret, but it comes with its key).
    pub const CLIENT_CERT: &str = "client.crt";
    /// The agent's `client_key`.
    pub const CLIENT_KEY: &str = "client.key";
    /// The relay's `lease_store_password_file` (the PostgreSQL lease store's password).
    pub const LEASE_STORE_PASSWORD: &str = "lease-store-password";
}

/// The variable in which systemd names the directory of the service's credentials.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// `$CREDENTIALS_DIRECTORY`, when systemd set it (to an absolute path).
pub fn credentials_directory() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(CREDENTIALS_DIRECTORY)?);
    dir.is_absolute().then_some(dir)
}

/// The file setting as given, else the credential `name` when systemd passed one (a file
/// `$CREDENTIALS_DIRECTORY/name`), else `None`. The binaries' validation passes call it for each
/// secret setting, so a given setting always wins over a credential.
pub fn or_credential(setting: Option<PathBuf>, name: &str) -> Option<PathBuf> {
    setting.or_else(|| credential_in(credentials_directory().as_deref(), name))
}

fn credential_in(dir: Option<&Path>, name: &str) -> Option<PathBuf> {
    let path = dir?.join(name);
    path.is_file().then_some(path)
}

fn read_error(path: &Path, source: std::io::Error) -> SecretFileError {
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        SecretFileError::Denied {
            path: path.to_path_buf(),
        }
    } else {
        SecretFileError::Read {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Fails if `path` is readable by group or others, with the `chmod` that fixes it.
///
/// One exception: systemd's credential files. systemd grants the service user read access to a
/// root-owned file with an ACL, whose mask then shows as group bits (mode 0440), inside a
/// directory nobody else may enter. A file directly in `$CREDENTIALS_DIRECTORY` is accepted
/// when neither it nor that directory grants anything to others.
pub fn check_private(path: &Path) -> Result<(), SecretFileError> {
    check_private_in(path, credentials_directory().as_deref())
}

fn check_private_in(path: &Path, credentials: Option<&Path>) -> Result<(), SecretFileError> {
    let meta = std::fs::metadata(path).map_err(|source| read_error(path, source))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if mode & 0o007 == 0 && credentials.is_some_and(|dir| is_systemd_credential(path, dir)) {
        return Ok(());
    }
    Err(SecretFileError::Permissions {
        path: path.to_path_buf(),
        mode,
    })
}

/// Whether `path` sits directly in the credentials directory `dir`, which others cannot enter.
fn is_systemd_credential(path: &Path, dir: &Path) -> bool {
    let (Some(parent), Ok(dir)) = (path.parent(), dir.canonicalize()) else {
        return false;
    };
    let Ok(parent) = parent.canonicalize() else {
        return false;
    };
    parent == dir && std::fs::metadata(&dir).is_ok_and(|m| m.is_dir() && m.mode() & 0o007 == 0)
}

/// The environment variable that may hold the agents' token instead of a file.
const TOKEN_ENV: &str = "JUMPGATE_TOKEN";

/// The token in `JUMPGATE_TOKEN` (surrounding whitespace trimmed), or `None` when it is unset or
/// blank. The one place either binary reads the variable: their validation passes call it.
pub fn env_token() -> Option<Secret> {
    let value = std::env::var(TOKEN_ENV).ok()?;
    let token = value.trim();
    (!token.is_empty()).then(|| Secret::new(token))
}

/// Reads a token from a file (surrounding whitespace trimmed). With `require_private`, refuses a
/// file that group or others can read.
pub fn read_secret_file(path: &Path, require_private: bool) -> Result<Secret, SecretFileError> {
    if require_private {
        check_private(path)?;
    }
    let text = std::fs::read_to_string(path).map_err(|source| read_error(path, source))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(Secret::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_readable_file_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "tok\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret_file(&p, true).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains("tok\n"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&p, true).unwrap().expose(), "tok");
    }

    /// What systemd makes of `LoadCredential=`: a 0440 (ACL) or 0400 file in a directory only
    /// the service may enter. Accepted there, and only there.
    #[test]
    fn systemd_credential_files_pass_the_check() {
        let creds = tempfile::tempdir().unwrap();
        let p = creds.path().join("token");
        std::fs::write(&p, "tok\n").unwrap();
        let chmod = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        chmod(creds.path(), 0o550);
        for mode in [0o400, 0o440] {
            chmod(&p, mode);
            check_private_in(&p, Some(creds.path())).unwrap();
        }
        // The same file outside a credentials directory, or with others' bits, is refused.
        let err = check_private_in(&p, None).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        chmod(&p, 0o444);
        assert!(check_private_in(&p, Some(creds.path())).is_err());
        chmod(&p, 0o440);
        chmod(creds.path(), 0o755);
        assert!(check_private_in(&p, Some(creds.path())).is_err());
        chmod(creds.path(), 0o700);
        // A file elsewhere with the directory merely named is no credential.
        let other = tempfile::tempdir().unwrap();
        let q = other.path().join("token");
        std::fs::write(&q, "tok\n").unwrap();
        chmod(&q, 0o440);
        assert!(check_private_in(&q, Some(creds.path())).is_err());
    }

    #[test]
    fn a_credential_stands_in_for_an_unset_setting_only() {
        let creds = tempfile::tempdir().unwrap();
        std::fs::write(creds.path().join("token"), "tok\n").unwrap();
        let dir = Some(creds.path());
        assert_eq!(
            credential_in(dir, credential::TOKEN),
            Some(creds.path().join("token"))
        );
        assert_eq!(credential_in(dir, credential::ADMIN_TOKEN), None);
        assert_eq!(credential_in(None, credential::TOKEN), None);
        // A given setting wins whatever the environment says.
        let given = PathBuf::from("/etc/jumpgate/token");
        assert_eq!(
            or_credential(Some(given.clone()), credential::TOKEN),
            Some(given)
        );
    }

    #[test]
    fn env_token_is_trimmed_and_blank_is_none() {
        std::env::set_var(TOKEN_ENV, "  env-tok \n");
        assert_eq!(env_token().unwrap().expose(), "env-tok");
        std::env::set_var(TOKEN_ENV, " \n");
        assert!(env_token().is_none());
        std::env::remove_var(TOKEN_ENV);
        assert!(env_token().is_none());
    }
}
