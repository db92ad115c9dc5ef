//! Where leases live: the lease table behind a lock, persisted to the state dir.
//!
//! Every change that an agent is told about is on disk before the agent hears of it, so a
//! `kill -9` at any moment loses nothing an agent relies on. Writes are group-committed: when many
//! agents reconnect at once (relay restart), one write covers every change made before it began.
//!
//! The rest of the relay sees leases only through [`LeaseStore`]'s methods (place, deactivate,
//! release, views), never the table itself, so the store can gain another backing (a database
//! shared by a fleet) without touching the sessions. The lock is held only while the table is
//! read or changed: ports are bound, files written and expiries announced outside it.

mod file;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jumpgate_config::write_atomic;
use jumpgate_lease::{AllocError, Grant, LeaseKey, LeaseTable, PortRange, ServiceAsk};
use tokio_util::sync::CancellationToken;

use crate::error::RelayError;
use crate::policy::CredentialCaps;

/// Longest interval between collecting expired leases and writing active leases' last-seen times.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(60);

/// Most rounds of "plan, bind what the plan needs" before a placement gives up. Every round
/// either succeeds or learns that at least one more port cannot be bound, so this is reached only
/// where over a thousand ports of the range are held by other processes (or are taken faster
/// than the relay can look); each round costs one copy of the table.
const MAX_PLACEMENT_ROUNDS: usize = 1024;

/// Current wall-clock time in Unix seconds, the unit the lease table works in.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Told about every lease that expires, after the lock is released.
pub(crate) type OnExpired = Box<dyn Fn(&LeaseKey, u16) + Send + Sync>;

/// Ports granted to one agent's services, with a listener (of the caller's kind) for each.
pub(crate) struct Placement<L> {
    /// One grant per ask, in the asks' order.
    pub grants: Vec<Grant>,
    /// The listener for every granted port.
    pub listeners: HashMap<u16, L>,
}

/// Why an agent's services got no ports.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PlaceError {
    /// The table said no (range exhausted, strict preferred port unavailable).
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// Ports kept turning out unbindable; the relay's problem, not the agent's.
    #[error("ports kept being taken by other processes while the relay bound them")]
    Unsettled,
    /// The name's leases belong to another identity.
    #[error("the name's leases are held by another identity")]
    HeldByAnother,
    /// The identity holds as many names or leases as its caps allow; says which cap.
    #[error("the credential holds its maximum of {0}")]
    CredentialFull(String),
}

/// One lease as the operator API shows it.
pub(crate) struct LeaseView {
    /// Whose it is.
    pub key: LeaseKey,
    /// The port.
    pub port: u16,
    /// When it expires (Unix seconds) if its agent stays away; `None` while a session holds it.
    pub expires_at: Option<u64>,
}

/// The relay's lease table with its file.
pub(crate) struct LeaseStore {
    table: Mutex<LeaseTable>,
    path: PathBuf,
    ttl: Duration,
    on_expired: OnExpired,
    /// Bumped after every change to the table.
    changes: AtomicU64,
    /// The value of `changes` the file on disk reflects.
    written: AtomicU64,
    write_lock: tokio::sync::Mutex<()>,
}

impl LeaseStore {
    /// Opens the lease file at `path`, or starts empty if there is none; `on_expired` hears of
    /// every lease that expires from now on.
    pub fn open(
        path: &Path,
        range: PortRange,
        ttl: Duration,
        on_expired: OnExpired,
    ) -> Result<Self, RelayError> {
        Ok(Self {
            table: Mutex::new(file::load(path, range, ttl.as_secs())?),
            path: path.to_path_buf(),
            ttl,
            on_expired,
            changes: AtomicU64::new(0),
            written: AtomicU64::new(0),
            write_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LeaseTable> {
        // The table is only ever replaced whole (a plan is committed by assignment), so a panic
        // while holding the lock cannot leave it half-changed and a poisoned lock is safe to use.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the table under the lock, then announces the leases that expired meanwhile.
    fn update<R>(&self, f: impl FnOnce(&mut LeaseTable) -> R) -> R {
        let (r, expired) = {
            let mut table = self.lock();
            // Expired leases go first, so their ports count as free exactly when they expire.
            let expired = table.expire(now_secs());
            let r = f(&mut table);
            (r, expired)
        };
        self.changes.fetch_add(1, Ordering::SeqCst);
        for (key, port) in expired {
            tracing::info!(agent = %key.agent, service = %key.service, port, "lease expired; port returns to the pool");
            (self.on_expired)(&key, port);
        }
        r
    }

    /// Grants ports to all of `agent`'s services, or none, each with its listener made by
    /// `bind`, and records `identity` as the name's holder; a name whose leases another identity
    /// holds is refused, and so is a placement that would take `identity` past its `caps`.
    /// Call [`LeaseStore::persist`] before telling the agent.
    ///
    /// The table plans with what is known (ports bound in an earlier round, ports found taken);
    /// ports the plan needs that are not bound yet are bound with the lock released, and the plan
    /// is made again until it needs nothing new. Decisions are the table's own: a port another
    /// process holds is skipped exactly as if it had been probed under the lock.
    pub fn place<L>(
        &self,
        agent: &str,
        identity: &str,
        caps: Option<CredentialCaps>,
        asks: &[ServiceAsk],
        mut bind: impl FnMut(u16) -> Option<L>,
    ) -> Result<Placement<L>, PlaceError> {
        let mut listeners: HashMap<u16, L> = HashMap::new();
        let mut taken: HashSet<u16> = HashSet::new();
        for _ in 0..MAX_PLACEMENT_ROUNDS {
            let planned = self.update(|table| {
                if table.holder(agent).is_some_and(|holder| holder != identity) {
                    return Err(PlaceError::HeldByAnother);
                }
                if let Some(caps) = caps {
                    within_caps(table, agent, identity, caps, asks.len())?;
                }
                let mut known = |port: u16| !taken.contains(&port);
                let (mut plan, grants) = table.plan(agent, asks, now_secs(), &mut known)?;
                let unbound: Vec<u16> = grants
                    .iter()
                    .map(|g| g.port)
                    .filter(|p| !listeners.contains_key(p))
                    .collect();
                if unbound.is_empty() {
                    plan.set_holder(agent, identity);
                    *table = plan;
                }
                Ok((grants, unbound))
            })?;
            match planned {
                (grants, unbound) if unbound.is_empty() => {
                    listeners.retain(|port, _| grants.iter().any(|g| g.port == *port));
                    return Ok(Placement { grants, listeners });
                }
                (_, unbound) => {
                    for port in unbound {
                        match bind(port) {
                            Some(listener) => {
                                listeners.insert(port, listener);
                            }
                            None => {
                                taken.insert(port);
                            }
                        }
                    }
                }
            }
        }
        Err(PlaceError::Unsettled)
    }

    /// `agent`'s session ended: its leases start ageing now.
    pub fn deactivate(&self, agent: &str) {
        self.update(|t| t.deactivate_agent(agent, now_secs()));
    }

    /// Drops all of `agent`'s leases (the operator's explicit release); returns their ports.
    pub fn release(&self, agent: &str) -> Vec<u16> {
        self.update(|t| t.release_agent(agent, now_secs()))
    }

    /// The identity holding `agent`'s leases, if it has any.
    pub fn holder(&self, agent: &str) -> Option<String> {
        self.lock().holder(agent).map(str::to_string)
    }

    /// `agent`'s leased ports, by service.
    pub fn ports_of(&self, agent: &str) -> Vec<(String, u16)> {
        self.lock()
            .leases_of(agent)
            .map(|(service, port)| (service.to_string(), port))
            .collect()
    }

    /// Whether `agent` holds any lease, connected or not.
    pub fn knows_agent(&self, agent: &str) -> bool {
        self.lock().iter().any(|(k, ..)| k.agent == agent)
    }

    /// Every lease, by key.
    pub fn views(&self) -> Vec<LeaseView> {
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

    /// Ports leased and ports free to hand out.
    pub fn usage(&self) -> (usize, usize) {
        let table = self.lock();
        (table.in_use(), table.free_count())
    }

    /// Makes every change so far durable. Concurrent callers share one write.
    pub async fn persist(&self) -> std::io::Result<()> {
        let wanted = self.changes.load(Ordering::SeqCst);
        let _guard = self.write_lock.lock().await;
        if self.written.load(Ordering::SeqCst) >= wanted && wanted > 0 {
            return Ok(());
        }
        let covers = self.changes.load(Ordering::SeqCst);
        let (range, snapshot) = {
            let table = self.lock();
            (table.range(), table.snapshot(now_secs()))
        };
        let bytes = file::encode(range, snapshot)?;
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
    pub async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let period = (self.ttl / 4).clamp(Duration::from_secs(1), MAINTENANCE_PERIOD);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.update(|_| ());
            self.persist_or_warn().await;
        }
        self.update(|_| ());
        self.persist_or_warn().await;
    }
}

/// Whether `identity` may hold `agent`'s `asks` leases within `caps`: counts what it holds under
/// other names plus what this placement would leave it with.
fn within_caps(
    table: &LeaseTable,
    agent: &str,
    identity: &str,
    caps: CredentialCaps,
    asks: usize,
) -> Result<(), PlaceError> {
    let (names, leases) = table.holdings(identity);
    let this_name = table.leases_of(agent).count();
    let new_name = usize::from(asks > 0 && table.holder(agent).is_none());
    if names + new_name > caps.names {
        return Err(PlaceError::CredentialFull(format!(
            "{} agent names",
            caps.names
        )));
    }
    if leases - this_name + asks > caps.leases {
        return Err(PlaceError::CredentialFull(format!(
            "{} leased ports",
            caps.leases
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range() -> PortRange {
        PortRange::new(20000, 20010).unwrap()
    }

    fn open(path: &Path) -> Result<LeaseStore, RelayError> {
        LeaseStore::open(path, range(), Duration::from_secs(60), Box::new(|_, _| {}))
    }

    fn ask(service: &str, preferred: Option<u16>) -> ServiceAsk {
        ServiceAsk {
            service: service.into(),
            preferred,
            strict: false,
        }
    }

    #[tokio::test]
    async fn leases_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        let store = open(&path).unwrap();
        let placed = store
            .place("a", "cert:a", None, &[ask("ssh", None)], |p| {
                std::net::TcpListener::bind(("127.0.0.1", p)).ok()
            })
            .unwrap();
        let port = placed.grants[0].port;
        store.persist().await.unwrap();
        let again = open(&path).unwrap();
        let view = again.views();
        assert_eq!(view.len(), 1);
        assert_eq!((view[0].key.agent.as_str(), view[0].port), ("a", port));
    }

    #[test]
    fn caps_count_names_and_leases_of_one_identity() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("leases.json")).unwrap();
        let bind = |_| Some(());
        let caps = Some(CredentialCaps {
            names: 2,
            leases: 3,
        });
        let place = |agent: &str, identity: &str, asks: &[ServiceAsk]| {
            store.place(agent, identity, caps, asks, bind).map(|_| ())
        };
        let one = [ask("ssh", None)];
        let two = [ask("ssh", None), ask("web", None)];
        place("a", "token:team", &one).unwrap();
        place("b", "token:team", &two).unwrap();
        // A third name is over the names cap; renewing a held name is not.
        let third = place("c", "token:team", &one).unwrap_err();
        assert!(matches!(third, PlaceError::CredentialFull(ref d) if d.contains("2 agent names")));
        place("a", "token:team", &one).unwrap();
        // Growing "a" to two leases would make four.
        let grown = place("a", "token:team", &two).unwrap_err();
        assert!(matches!(grown, PlaceError::CredentialFull(ref d) if d.contains("3 leased ports")));
        // Other identities are counted apart; releasing gives room back.
        place("c", "token:other", &two).unwrap();
        store.release("b");
        place("d", "token:team", &two).unwrap();
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
        let err = open(&path).err().unwrap().to_string();
        assert!(err.contains("leases.json"), "{err}");
        std::fs::write(&path, b"").unwrap();
        assert!(open(&path).is_err());
    }

    /// Placement binds outside the lock and plans again when a port turns out taken: the result
    /// is what the table decides with that port known unbindable, and only granted ports keep a
    /// listener.
    #[test]
    fn a_taken_preferred_port_falls_back_like_the_table_says() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("leases.json")).unwrap();
        let mut asked = Vec::new();
        let placed = store
            .place(
                "a",
                "cert:a",
                None,
                &[ask("ssh", Some(20005)), ask("web", None)],
                |p| {
                    asked.push(p);
                    // 20005 is held by "another process"; everything else binds.
                    (p != 20005).then(|| std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap())
                },
            )
            .unwrap();
        let ssh = &placed.grants[0];
        assert_ne!(ssh.port, 20005);
        assert!(
            ssh.note
                .as_deref()
                .unwrap_or("")
                .contains("preferred port 20005"),
            "{:?}",
            ssh.note
        );
        let mut granted: Vec<u16> = placed.grants.iter().map(|g| g.port).collect();
        let mut held: Vec<u16> = placed.listeners.keys().copied().collect();
        granted.sort_unstable();
        held.sort_unstable();
        assert_eq!(granted, held);
        assert!(asked.contains(&20005));
        assert_eq!(store.usage().0, 2);
    }

    #[test]
    fn only_the_holder_of_a_name_gets_its_leases() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("leases.json")).unwrap();
        let bind = |_| std::net::TcpListener::bind(("127.0.0.1", 0)).ok();
        let first = store
            .place("a", "token:team-a", None, &[ask("ssh", None)], bind)
            .unwrap();
        store.deactivate("a");
        let err = store
            .place("a", "token:team-b", None, &[ask("ssh", None)], bind)
            .err()
            .unwrap();
        assert!(matches!(err, PlaceError::HeldByAnother), "{err}");
        let again = store
            .place("a", "token:team-a", None, &[ask("ssh", None)], bind)
            .unwrap();
        assert_eq!(again.grants[0].port, first.grants[0].port);
        assert_eq!(store.holder("a").as_deref(), Some("token:team-a"));
        store.release("a");
        assert!(store
            .place("a", "token:team-b", None, &[ask("ssh", None)], bind)
            .is_ok());
    }

    #[test]
    fn a_host_that_takes_every_port_is_unsettled_or_exhausted_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("leases.json")).unwrap();
        let err = store
            .place("a", "cert:a", None, &[ask("ssh", None)], |_| {
                None::<std::net::TcpListener>
            })
            .err()
            .unwrap();
        // 11 ports, each found taken once: the table runs out before the round limit.
        assert!(
            matches!(err, PlaceError::Alloc(AllocError::Exhausted { .. })),
            "{err}"
        );
        assert_eq!(store.usage(), (0, 11));
    }
}
