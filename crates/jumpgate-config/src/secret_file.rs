//! Reading tokens and keys from files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use jumpgate_proto::Secret;

/// Why a secret file was refused. Messages name the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
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

/// Fails if `path` is readable by group or others.
pub fn check_private(path: &Path) -> Result<(), SecretFileError> {
    let meta = std::fs::metadata(path).map_err(|source| SecretFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
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
    let text = std::fs::read_to_string(path).map_err(|source| SecretFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
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
