//! The lease table behind a lock, persisted to the state dir.
//!
//! Every change that an agent is told about is on disk before the agent hears of it, so a
//! `kill -9` at any moment loses nothing an agent relies on. Writes are group-committed: when many
//! agents reconnect at once (relay restart), one write covers every change made before it began.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jumpgate_config::write_atomic;
use jumpgate_proto::{LeaseKey, LeaseSnapshot, LeaseTable, PortRange};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::RelayError;

/// Version of the lease file's layout.
const FILE_FORMAT: u32 = 1;

/// Longest interval between collecting expired leases and writing active leases' last-seen times.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseFile {
    format: u32,
    range: String,
    #[serde(flatten)]
    snapshot: LeaseSnapshot,
}

/// Current wall-clock time in Unix seconds, the unit the lease table works in.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The relay's lease table with its file.
pub struct LeaseStore {
    table: Mutex<LeaseTable>,
    path: PathBuf,
    /// Bumped after every change to the table.
    changes: AtomicU64,
    /// The value of `changes` the file on disk reflects.
    written: AtomicU64,
    write_lock: tokio::sync::Mutex<()>,
}

impl LeaseStore {
    /// Opens the lease file at `path`, or starts empty if there is none. A file that exists but
    /// cannot be parsed is an error: silently starting over would hand users' ports to others.
    pub fn open(path: &Path, range: PortRange, ttl: Duration) -> Result<Self, RelayError> {
        let bad = |detail: String| RelayError::LeaseFile {
            path: path.to_path_buf(),
            detail,
        };
        let table = match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                LeaseTable::new(range, ttl.as_secs())
            }
            Err(e) => return Err(bad(e.to_string())),
            Ok(bytes) => {
                let file: LeaseFile = serde_json::from_slice(&bytes)
                    .map_err(|e| bad(format!("not a valid lease file ({e})")))?;
                if file.format != FILE_FORMAT {
                    return Err(bad(format!(
                        "format {} is not the supported format {FILE_FORMAT}",
                        file.format
                    )));
                }
                let (table, dropped) = LeaseTable::restore(range, ttl.as_secs(), file.snapshot)
                    .map_err(|e| bad(e.to_string()))?;
                for rec in dropped {
                    tracing::warn!(
                        agent = %rec.agent, service = %rec.service, port = rec.port,
                        "dropping lease outside the new port range {range}"
                    );
                }
                tracing::info!(path = %path.display(), leases = table.in_use(), "restored leases");
                table
            }
        };
        Ok(Self {
            table: Mutex::new(table),
            path: path.to_path_buf(),
            changes: AtomicU64::new(0),
            written: AtomicU64::new(0),
            write_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LeaseTable> {
        // A panic while holding the lock cannot leave the table half-changed (acquire works on a
        // copy), so a poisoned lock is still safe to use.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the table.
    pub fn read<R>(&self, f: impl FnOnce(&LeaseTable) -> R) -> R {
        f(&self.lock())
    }

    /// Changes the table; call [`LeaseStore::persist`] before telling anyone about the change.
    pub fn update<R>(&self, f: impl FnOnce(&mut LeaseTable) -> R) -> R {
        let r = f(&mut self.lock());
        self.changes.fetch_add(1, Ordering::SeqCst);
        r
    }

    /// Makes every change so far durable. Concurrent callers share one write.
    pub async fn persist(&self) -> std::io::Result<()> {
        let wanted = self.changes.load(Ordering::SeqCst);
        let _guard = self.write_lock.lock().await;
        if self.written.load(Ordering::SeqCst) >= wanted && wanted > 0 {
            return Ok(());
        }
        let covers = self.changes.load(Ordering::SeqCst);
        let (range, snapshot) = self.read(|t| (t.range(), t.snapshot(now_secs())));
        let file = LeaseFile {
            format: FILE_FORMAT,
            range: range.to_string(),
            snapshot,
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes, 0o600))
            .await
            .map_err(std::io::Error::other)??;
        self.written.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }

    /// Persists and logs on failure: the relay keeps serving with leases in memory.
    pub async fn persist_or_warn(&self) {
        if let Err(e) = self.persist().await {
            tracing::error!(path = %self.path.display(), "cannot write lease file: {e}; leases will not survive a restart until this is fixed");
        }
    }

    /// Expires leases and refreshes the file periodically until `stop` fires, then writes a final
    /// time.
    pub async fn maintain(
        self: Arc<Self>,
        ttl: Duration,
        stop: CancellationToken,
        on_expired: impl Fn(&LeaseKey, u16) + Send + 'static,
    ) {
        let period = (ttl / 4).clamp(Duration::from_secs(1), MAINTENANCE_PERIOD);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            for (key, port) in self.update(|t| t.expire(now_secs())) {
                log_expired(&key, port);
                on_expired(&key, port);
            }
            self.persist_or_warn().await;
        }
        self.update(|_| ());
        self.persist_or_warn().await;
    }
}

/// The log line for an expired lease.
pub fn log_expired(key: &LeaseKey, port: u16) {
    tracing::info!(agent = %key.agent, service = %key.service, port, "lease expired; port returns to the pool");
}

#[cfg(test)]
mod tests {
    use super::*;
    use jumpgate_proto::ServiceAsk;

    fn range() -> PortRange {
        PortRange::new(20000, 20010).unwrap()
    }

    #[tokio::test]
    async fn leases_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        let store = LeaseStore::open(&path, range(), Duration::from_secs(60)).unwrap();
        let ask = ServiceAsk {
            service: "ssh".into(),
            preferred: None,
            strict: false,
        };
        let port = store
            .update(|t| t.acquire("a", &[ask], now_secs(), &mut |_| true))
            .unwrap()[0]
            .port;
        store.persist().await.unwrap();
        let again = LeaseStore::open(&path, range(), Duration::from_secs(60)).unwrap();
        let key = jumpgate_proto::LeaseKey::new("a", "ssh");
        assert_eq!(again.read(|t| t.port_of(&key)), Some(port));
    }

    #[test]
    fn corrupt_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        std::fs::write(
            &path,
            b"{\"format\":1,\"range\":\"1-2\",\"leases\":[{\"agent\":",
        )
        .unwrap();
        let err = LeaseStore::open(&path, range(), Duration::from_secs(60))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("leases.json"), "{err}");
        std::fs::write(&path, b"").unwrap();
        assert!(LeaseStore::open(&path, range(), Duration::from_secs(60)).is_err());
    }
}
