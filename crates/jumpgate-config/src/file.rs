//! Reading config files and writing state files.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration problem. Every variant names what is wrong and how to fix it; all of them end
/// the process with exit code 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown/mistyped keys.
    #[error("config file {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the key and what it expected.
        detail: String,
    },
    /// A setting has a bad value.
    #[error("invalid {key}: {detail}")]
    Invalid {
        /// The flag or key, e.g. `--port-range` / `port_range`.
        key: &'static str,
        /// What is wrong and what is expected.
        detail: String,
    },
    /// A required setting is missing.
    #[error("missing {key}: {hint}")]
    Missing {
        /// The flag or key.
        key: &'static str,
        /// How to provide it.
        hint: &'static str,
    },
}

/// A repeatable setting's values, each parsed, with the key named in the error.
pub fn parse_list<T>(key: &'static str, texts: &[String]) -> Result<Vec<T>, ConfigError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    texts
        .iter()
        .map(|t| t.parse::<T>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::Invalid {
            key,
            detail: e.to_string(),
        })
}

/// Loads a TOML file into `T` (whose fields should use `deny_unknown_fields`).
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        detail: e.to_string().trim_end().replace('\n', " | "),
    })
}

/// Replaces `path` with `data` so that a crash at any moment leaves either the old or the new
/// content: write a temporary file beside it, fsync, rename over, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        listen: Option<String>,
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "listne = \"x\"\n").unwrap();
        let err = load_toml::<Sample>(&p).unwrap_err().to_string();
        assert!(err.contains("listne"), "{err}");
        assert!(err.contains("c.toml"), "{err}");
    }

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
