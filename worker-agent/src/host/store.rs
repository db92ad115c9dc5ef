//! The host agent's registered tunnels on disk, so that a restart (`systemctl restart`, kill -9,
//! a reboot) brings every tunnel back without the platform doing anything.
//!
//! One file per tunnel, `STATE_DIR/tunnels/NAME.json`, mode 0600 (it holds the job's
//! credential), written atomically: a temporary file in the same directory, fsync, rename over
//! the old one, fsync of the directory. A registration is persisted before the API answers and
//! its file removed on `rm`, so after a crash a tunnel is either fully there or not there.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use jumpgate_proto::{validate_name, Secret};
use serde::{Deserialize, Serialize};

use super::TunnelSpec;
use crate::service::ServiceSpec;

/// What is kept of one tunnel: the request as the platform made it (services as written), with
/// the credential's value.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The tunnel's name.
    pub name: String,
    /// Services, `NAME=HOST:PORT[@PREFERRED[!]][,netns=NS]` each.
    pub services: Vec<String>,
    /// The job's credential; `None`: the host's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// OpenSSH public keys that alone may use `ssh -J` to this tunnel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jump_keys: Vec<String>,
}

/// Debug output without the credential.
impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("name", &self.name)
            .field("services", &self.services)
            .field("token", &self.token.as_ref().map(|_| "<secret>"))
            .field("jump_keys", &self.jump_keys.len())
            .finish()
    }
}

impl Record {
    /// The tunnel this record asks for, or what is wrong with it.
    pub fn spec(&self) -> Result<TunnelSpec, String> {
        let services = self
            .services
            .iter()
            .map(|s| ServiceSpec::parse(s).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TunnelSpec {
            name: self.name.clone(),
            services,
            credential: self.token.as_ref().map(Secret::new),
            jump_keys: self.jump_keys.clone(),
        })
    }
}

/// Why the store failed; names the file and never holds a credential.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system call failed.
    #[error("tunnel store {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A tunnel file is not a record (hand-edited or from another version).
    #[error("tunnel store {path}: not a tunnel record ({detail}); fix or remove the file")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// serde's words.
        detail: String,
    },
}

/// The tunnels directory of the agent's state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating it, 0700) `state_dir/tunnels`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let dir = state_dir.join("tunnels");
        let io = |source| StoreError::Io {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(io)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        Ok(Store { dir })
    }

    /// The file of tunnel `name` (a valid agent name: no `/`, no `..`).
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Writes `record` atomically (0600): after a crash the old record or the new one is there,
    /// never a part.
    pub fn save(&self, record: &Record) -> Result<(), StoreError> {
        let path = self.path(&record.name);
        let tmp = self.dir.join(format!(".{}.json.tmp", record.name));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| StoreError::Io { path: p, source }
        };
        let text = serde_json::to_vec_pretty(record).map_err(|e| StoreError::Io {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        let _ = fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        file.write_all(&text).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        self.sync_dir()
    }

    /// Removes tunnel `name`'s record (no error if there is none).
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Every record, by name; a file that cannot be read is reported beside the others so one
    /// bad file does not cost the other tunnels.
    pub fn load_all(&self) -> Result<Vec<Result<Record, StoreError>>, StoreError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| StoreError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        let mut names: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        names.sort();
        for path in names {
            out.push(read_record(&path));
        }
        Ok(out)
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::Io {
                path: self.dir.clone(),
                source,
            })
    }
}

fn read_record(path: &Path) -> Result<Record, StoreError> {
    let text = fs::read(path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let record: Record = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    validate_name("tunnel", &record.name).map_err(|e| corrupt(e.to_string()))?;
    if path.file_stem().is_none_or(|s| s != record.name.as_str()) {
        return Err(corrupt(format!(
            "it names tunnel {:?}, not its file name",
            record.name
        )));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> Record {
        Record {
            name: name.into(),
            services: vec!["ssh=127.0.0.1:22".into()],
            token: Some("s3cret-token".into()),
            jump_keys: vec![],
        }
    }

    #[test]
    fn records_round_trip_privately_and_go_away() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&record("vh-a")).unwrap();
        store.save(&record("vh-b")).unwrap();
        let mut again = record("vh-a");
        again.services.push("web=127.0.0.1:80".into());
        store.save(&again).unwrap();
        let file = dir.path().join("tunnels/vh-a.json");
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let all: Vec<Record> = store
            .load_all()
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].services.len(), 2);
        assert_eq!(all[0].spec().unwrap().services[1].name, "web");
        assert!(!format!("{:?}", all[0]).contains("s3cret"));
        store.remove("vh-a").unwrap();
        store.remove("vh-a").unwrap();
        assert_eq!(store.load_all().unwrap().len(), 1);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path().join("tunnels")).unwrap().count(), 1);
    }

    #[test]
    fn a_bad_file_is_named_and_does_not_hide_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&record("vh-good")).unwrap();
        fs::write(dir.path().join("tunnels/vh-bad.json"), "{not json").unwrap();
        fs::write(
            dir.path().join("tunnels/vh-other.json"),
            serde_json::to_vec(&record("vh-good")).unwrap(),
        )
        .unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all.len(), 3);
        let errors: Vec<String> = all
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().all(|e| e.contains("fix or remove")));
    }
}
