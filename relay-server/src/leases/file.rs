//! The file store: the lease table in memory behind a lock, persisted to a file in the state dir
//! (its layout and version below), read at start and written after every change an agent is told
//! about.
//!
//! Every change that an agent is told about is on disk before the agent hears of it, so a
//! `kill -9` at any moment loses nothing an agent relies on. Writes are group-committed: when many
//! agents reconnect at once (relay restart), one write covers every change made before it began.
//! The lock is held only while the table is read or changed: ports are bound, files written and
//! expiries announced outside it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use jumpgate_config::write_atomic;
use jumpgate_lease::{Attempt, LeaseKey, LeaseSnapshot, LeaseTable, PortRange};
use serde::{Deserialize, Serialize};

use super::{check_caps, Claim, LeaseView, PlaceError};
use crate::error::RelayError;

/// Leases that expired during an operation, to announce once the lock is released.
type Expired = Vec<(LeaseKey, u16)>;

/// The relay's lease table with its file.
pub(super) struct FileStore {
    table: Mutex<LeaseTable>,
    path: PathBuf,
    /// Bumped after every change to the table.
    changes: AtomicU64,
    /// The value of `changes` the file on disk reflects.
    written: AtomicU64,
    write_lock: tokio::sync::Mutex<()>,
}

impl FileStore {
    /// Opens the lease file at `path`, or starts empty if there is none.
    pub(super) fn open(path: &Path, range: PortRange, ttl_secs: u64) -> Result<Self, RelayError> {
        Ok(Self {
            table: Mutex::new(load(path, range, ttl_secs)?),
            path: path.to_path_buf(),
            changes: AtomicU64::new(0),
            written: AtomicU64::new(0),
            write_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The lease file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, LeaseTable> {
        // An attempt undoes its own changes before it returns and nothing else leaves the table
        // half-changed, so a panic while holding the lock leaves it consistent and a poisoned
        // lock is safe to use.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the table under the lock, expiring due leases first so their ports count as free
    /// exactly when they expire; returns what expired for the caller to announce.
    fn update<R>(&self, now: u64, f: impl FnOnce(&mut LeaseTable) -> R) -> (R, Expired) {
        let (r, expired) = {
            let mut table = self.lock();
            let expired = table.expire(now);
            let r = f(&mut table);
            (r, expired)
        };
        self.changes.fetch_add(1, Ordering::SeqCst);
        (r, expired)
    }

    /// One placement attempt: kept only if every granted port is in `bound`; a port in `taken`
    /// is never granted.
    pub(super) fn attempt(
        &self,
        claim: Claim<'_>,
        now: u64,
        taken: &HashSet<u16>,
        bound: &HashSet<u16>,
    ) -> (Result<Attempt, PlaceError>, Expired) {
        let Claim {
            agent,
            identity,
            caps,
            asks,
        } = claim;
        self.update(now, |table| {
            if table.holder(agent).is_some_and(|holder| holder != identity) {
                return Err(PlaceError::HeldByAnother);
            }
            if let Some(caps) = caps {
                check_caps(
                    caps,
                    table.holdings(identity),
                    table.leases_of(agent).count(),
                    table.holder(agent).is_none(),
                    asks.len(),
                )?;
            }
            let attempt = table.try_acquire(
                agent,
                asks,
                now,
                &mut |port| !taken.contains(&port),
                &mut |grants| grants.iter().all(|g| bound.contains(&g.port)),
            )?;
            if let Attempt::Committed(_) = attempt {
                table.hold(agent, identity);
            }
            Ok(attempt)
        })
    }

    /// The agent's session ended.
    pub(super) fn deactivate(&self, agent: &str, now: u64) -> Expired {
        self.update(now, |t| t.deactivate_agent(agent, now)).1
    }

    /// Drops all of `agent`'s leases.
    pub(super) fn release(&self, agent: &str, now: u64) -> (Vec<u16>, Expired) {
        self.update(now, |t| t.release_agent(agent, now))
    }

    /// Expires due leases.
    pub(super) fn expire(&self, now: u64) -> Expired {
        self.update(now, |_| ()).1
    }

    pub(super) fn holder(&self, agent: &str) -> Option<String> {
        self.lock().holder(agent).map(str::to_string)
    }

    pub(super) fn ports_of(&self, agent: &str) -> Vec<(String, u16)> {
        self.lock()
            .leases_of(agent)
            .map(|(service, port)| (service.to_string(), port))
            .collect()
    }

    /// Whether a session holds `agent`'s leases.
    pub(super) fn views(&self) -> Vec<LeaseView> {
        let table = self.lock();
        table
            .iter()
            .map(|(key, port, ..)| LeaseView {
                key: key.clone(),
                port,
                expires_at: table.expires_at(key),
            })
            .collect()
    }

    pub(super) fn usage(&self) -> (usize, usize) {
        let table = self.lock();
        (table.in_use(), table.free_count())
    }

    /// Names and leases held by `identity`.
    pub(super) fn holdings(&self, identity: &str) -> (usize, usize) {
        self.lock().holdings(identity)
    }

    /// Names and leases held, by identity.
    pub(super) fn holdings_by_identity(&self) -> Vec<(String, usize, usize)> {
        self.lock()
            .holdings_by_identity()
            .into_iter()
            .map(|(identity, (names, leases))| (identity, names, leases))
            .collect()
    }

    /// Makes every change so far durable. Concurrent callers share one write.
    pub(super) async fn persist(&self, now: u64) -> std::io::Result<()> {
        let wanted = self.changes.load(Ordering::SeqCst);
        let _guard = self.write_lock.lock().await;
        if self.written.load(Ordering::SeqCst) >= wanted && wanted > 0 {
            return Ok(());
        }
        let covers = self.changes.load(Ordering::SeqCst);
        let (range, snapshot) = {
            let table = self.lock();
            (table.range(), table.snapshot(now))
        };
        let bytes = encode(range, snapshot)?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes, 0o600))
            .await
            .map_err(std::io::Error::other)??;
        self.written.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }
}

/// Version of the lease file's layout.
const FILE_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseFile {
    format: u32,
    range: String,
    #[serde(flatten)]
    snapshot: LeaseSnapshot,
}

/// Reads the lease file at `path`, or an empty table if there is none. A file that exists but
/// cannot be parsed is an error: silently starting over would hand users' ports to others.
fn load(path: &Path, range: PortRange, ttl_secs: u64) -> Result<LeaseTable, RelayError> {
    let bad = |detail: String| RelayError::LeaseFile {
        path: path.to_path_buf(),
        detail,
    };
    let bytes = match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(LeaseTable::new(range, ttl_secs))
        }
        Err(e) => return Err(bad(e.to_string())),
        Ok(bytes) => bytes,
    };
    let file: LeaseFile =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a valid lease file ({e})")))?;
    if file.format != FILE_FORMAT {
        return Err(bad(format!(
            "format {} is not the supported format {FILE_FORMAT}",
            file.format
        )));
    }
    let (table, dropped) =
        LeaseTable::restore(range, ttl_secs, file.snapshot).map_err(|e| bad(e.to_string()))?;
    for rec in dropped {
        tracing::warn!(
            agent = %rec.agent, service = %rec.service, port = rec.port,
            "dropping lease outside the new port range {range}"
        );
    }
    tracing::info!(path = %path.display(), leases = table.in_use(), "restored leases");
    Ok(table)
}

/// The file's bytes for `snapshot` of a table over `range`.
fn encode(range: PortRange, snapshot: LeaseSnapshot) -> std::io::Result<Vec<u8>> {
    let file = LeaseFile {
        format: FILE_FORMAT,
        range: range.to_string(),
        snapshot,
    };
    serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)
}
