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
///
/// The file ends up with exactly `mode` (the umask does not narrow it). The temporary file has an
/// unpredictable name and is created exclusively (`O_CREAT|O_EXCL`, which never follows a
/// symlink), so another user who can write to the directory cannot plant a symlink at its name
/// to make us overwrite some other file; the rename replaces a symlink at `path` itself rather
/// than writing through it.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Dropped on any error below, which removes the temporary file.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    let file = tmp.as_file_mut();
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(data)?;
    file.sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
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

    #[test]
    fn atomic_write_gives_the_file_exactly_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // 0666 would be narrowed by any usual umask if the mode were only passed to open(2).
        write_atomic(&p, b"one", 0o666).unwrap();
        assert_eq!(mode(&p), 0o666);
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(mode(&p), 0o600);
    }

    /// The temporary name used to be `.NAME.tmp.PID`: whoever could write to the directory could
    /// plant a symlink there and have the write go through it to any file.
    #[test]
    fn atomic_write_never_follows_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let p = dir.path().join("state.json");
        let old_tmp = dir
            .path()
            .join(format!(".state.json.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old_tmp).unwrap();
        write_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert!(std::fs::symlink_metadata(&old_tmp)
            .unwrap()
            .file_type()
            .is_symlink());

        // A symlink at the target itself is replaced, not written through.
        let target = dir.path().join("leases.json");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write_atomic(&target, b"leases", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&target).unwrap().is_file());
        assert_eq!(std::fs::read(&target).unwrap(), b"leases");
        // Nothing left behind but the three names.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
    }
}
