//! Where leases live: behind [`LeaseStore`], either the relay's own file in the state dir or a
//! PostgreSQL database a fleet of relays shares (`lease_store`).
//!
//! The rest of the relay sees leases only through [`LeaseStore`]'s methods (place, deactivate,
//! release, views), never a backend, so the sessions do not care which one is configured. Both
//! backends read the time from the store's clock ([`LeaseStore::with_clock`] in tests), so they
//! decide identically given the same operations at the same times.
//!
//! Placement is a loop on this side of either backend: the backend makes an attempt with what the
//! relay knows (ports bound in an earlier round, ports found taken) and keeps it only when every
//! granted port is bound here. The file store's attempt holds the one lock every placement
//! shares, so it binds nothing: it rolls back, the relay binds the missing ports with nothing
//! locked and tries again. The database's attempt locks only its own rows, so it binds the
//! ports it grants inside its transaction and commits when they are bound.

mod file;
mod postgres;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jumpgate_lease::{AllocError, Attempt, Grant, LeaseKey, PortRange, ServiceAsk};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::claims::CredentialCaps;
use crate::error::RelayError;
pub use crate::error::StoreError;

pub use postgres::{PgSettings, StoreTls, PASSWORD_ENV, SCHEMA};

/// Longest interval between collecting expired leases and writing active leases' last-seen times.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(60);

/// Most rounds of "attempt, bind what the attempt needs" before a placement gives up. Every round
/// either succeeds or learns that at least one more port cannot be bound, so this is reached only
/// where over a thousand ports of the range are held by other processes (or are taken faster
/// than the relay can look).
const MAX_PLACEMENT_ROUNDS: usize = 1024;

/// Current wall-clock time in Unix seconds, the unit the lease table works in.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Told about every lease that expires, after any lock is released.
pub type OnExpired = Box<dyn Fn(&LeaseKey, u16) + Send + Sync>;

/// Where a store reads the time (Unix seconds): the wall clock, or a test's hand.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Ports granted to one agent's services, with a listener (of the caller's kind) for each.
pub struct Placement<L> {
    /// One grant per ask, in the asks' order.
    pub grants: Vec<Grant>,
    /// The listener for every granted port.
    pub listeners: HashMap<u16, L>,
}

/// Why an agent's services got no ports.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
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
    /// The shared store says the agent holds `port`, and this relay cannot bind it: moving the
    /// agent would give it a second port in the fleet, so it is told to come back later.
    #[error("the agent's port {port} is held by another process on this relay; the fleet keeps the agent on that port")]
    LocalConflict {
        /// The agent's port.
        port: u16,
    },
    /// The store could not be reached; transient.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one agent asks of a backend: its name, who it is, what that identity may hold, and its
/// services' wishes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim<'a> {
    /// The agent name.
    pub agent: &'a str,
    /// The credential's identity, which must hold (or come to hold) the name.
    pub identity: &'a str,
    /// The identity's caps (`None`: not capped).
    pub caps: Option<CredentialCaps>,
    /// One per service that wants a port.
    pub asks: &'a [ServiceAsk],
}

/// The ports one placement has bound and not yet committed, in [`LeaseStore`]'s `binding` set
/// until the placement ends either way.
struct Binding<'a> {
    store: &'a LeaseStore,
    ports: Vec<u16>,
}

impl Binding<'_> {
    fn hold(&mut self, port: u16) {
        self.store
            .binding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port);
        self.ports.push(port);
    }
}

impl Drop for Binding<'_> {
    fn drop(&mut self) {
        let mut binding = self.store.binding.lock().unwrap_or_else(|p| p.into_inner());
        for port in &self.ports {
            binding.remove(port);
        }
    }
}

/// One lease as the operator API shows it.
pub struct LeaseView {
    /// Whose it is.
    pub key: LeaseKey,
    /// The port.
    pub port: u16,
    /// When it expires (Unix seconds) if its agent stays away; `None` while a session holds it.
    pub expires_at: Option<u64>,
}

/// A live relay of the fleet, as agents and operators need to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// The relay's stable id (`relay_id`).
    pub id: String,
    /// Where agents dial it (`advertise`).
    pub agent_addr: String,
    /// The name users connect to.
    pub public_host: String,
    /// Where agents reach it as WebSocket (`ws_public_url`), if it says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_url: Option<String>,
}

enum Backend {
    File(Box<file::FileStore>),
    Postgres(postgres::PgStore),
}

/// The relay's leases, in whichever backend the configuration chose.
pub struct LeaseStore {
    backend: Backend,
    ttl: Duration,
    on_expired: OnExpired,
    clock: Clock,
    /// This relay, as [`LeaseStore::members`] reports it.
    me: Member,
    /// Told about leases that ended elsewhere in the fleet (expired or released by another
    /// relay, or moved to another port), so this relay stops keeping their ports.
    on_gone: Option<OnExpired>,
    /// The fleet's leases as of the last maintenance round (database store), to see which ended.
    seen: std::sync::Mutex<HashMap<LeaseKey, u16>>,
    /// Ports bound by placements still in progress here. Concurrent new agents would otherwise
    /// all be offered the same free port and each find it taken only by binding it, a round
    /// (with a database, two transactions) per sibling.
    binding: std::sync::Mutex<HashSet<u16>>,
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
            backend: Backend::File(Box::new(file::FileStore::open(path, range, ttl.as_secs())?)),
            ttl,
            on_expired,
            clock: Arc::new(now_secs),
            me: Member {
                id: "local".into(),
                agent_addr: String::new(),
                public_host: String::new(),
                ws_url: None,
            },
            on_gone: None,
            seen: Default::default(),
            binding: Default::default(),
        })
    }

    /// Connects to the PostgreSQL store, creating or migrating its schema, and registers `me`
    /// as a live member of the fleet. An unreachable store is [`RelayError::Store`] (exit 75,
    /// systemd retries); a fleet with another port range is a configuration error.
    pub async fn connect(
        settings: &PgSettings,
        range: PortRange,
        ttl: Duration,
        on_expired: OnExpired,
        me: Member,
        clock: Clock,
    ) -> Result<Self, RelayError> {
        let pg = postgres::PgStore::connect(settings, range, ttl.as_secs(), &me, clock()).await?;
        // The leases as the relay starts (and keeps their ports): what the first maintenance
        // round compares with, so a lease released before that round still counts as gone.
        let seen = pg
            .views(clock())
            .await
            .map_err(RelayError::from)?
            .into_iter()
            .map(|v| (v.key, v.port))
            .collect();
        Ok(Self {
            backend: Backend::Postgres(pg),
            ttl,
            on_expired,
            clock,
            me,
            on_gone: None,
            seen: std::sync::Mutex::new(seen),
            binding: Default::default(),
        })
    }

    /// The same store telling `on_gone` about leases that ended on other relays of the fleet
    /// (the file store has no others).
    pub fn with_on_gone(mut self, on_gone: OnExpired) -> Self {
        self.on_gone = Some(on_gone);
        self
    }

    /// The same store reading its time from `clock` (tests move time by hand).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The same store describing this relay as `me` (file store: its only member).
    pub fn with_member(mut self, me: Member) -> Self {
        self.me = me;
        self
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Whether the leases live in a database shared with other relays.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    fn announce(&self, expired: Vec<(LeaseKey, u16)>) {
        for (key, port) in expired {
            tracing::info!(agent = %key.agent, service = %key.service, port, "lease expired; port returns to the pool");
            (self.on_expired)(&key, port);
        }
    }

    /// Grants ports to all of `agent`'s services, or none, each with its listener made by
    /// `bind`, and records `identity` as the name's holder; a name whose leases another identity
    /// holds is refused, and so is a placement that would take `identity` past its `caps`.
    /// Call [`LeaseStore::persist`] before telling the agent.
    ///
    /// The backend attempts with what is known (ports bound in an earlier round, ports found
    /// taken) and keeps the attempt only if every granted port is bound (see the module
    /// comment for where binding happens); otherwise it attempts again. Decisions are the
    /// backend's own: a port another process holds is skipped exactly as if it had been probed
    /// under the lock.
    pub async fn place<L>(
        &self,
        agent: &str,
        identity: &str,
        caps: Option<CredentialCaps>,
        asks: &[ServiceAsk],
        mut bind: impl FnMut(u16) -> Option<L>,
    ) -> Result<Placement<L>, PlaceError> {
        let claim = Claim {
            agent,
            identity,
            caps,
            asks,
        };
        let mut listeners: HashMap<u16, L> = HashMap::new();
        let mut taken: HashSet<u16> = HashSet::new();
        let mut mine = Binding {
            store: self,
            ports: Vec::new(),
        };
        for _ in 0..MAX_PLACEMENT_ROUNDS {
            let now = self.now();
            let bound: HashSet<u16> = listeners.keys().copied().collect();
            // Ports other placements here are binding count as taken for this one.
            let avoid: HashSet<u16> = {
                let binding = self.binding.lock().unwrap_or_else(|p| p.into_inner());
                taken
                    .iter()
                    .chain(binding.iter().filter(|p| !bound.contains(p)))
                    .copied()
                    .collect()
            };
            // Binds `port` unless it is bound or known taken; whether it is bound now.
            let mut try_bind = |port: u16| {
                if listeners.contains_key(&port) {
                    return true;
                }
                if taken.contains(&port) {
                    return false;
                }
                match bind(port) {
                    Some(listener) => {
                        listeners.insert(port, listener);
                        mine.hold(port);
                        true
                    }
                    None => {
                        taken.insert(port);
                        false
                    }
                }
            };
            let (attempt, expired) = match &self.backend {
                Backend::File(f) => f.attempt(claim, now, &avoid, &bound),
                Backend::Postgres(p) => {
                    let ports = postgres::KnownPorts {
                        taken: &avoid,
                        bound: &bound,
                    };
                    p.attempt(&self.me.id, claim, now, ports, &mut try_bind)
                        .await
                }
            };
            self.announce(expired);
            match attempt? {
                Attempt::Committed(grants) => {
                    listeners.retain(|port, _| grants.iter().any(|g| g.port == *port));
                    return Ok(Placement { grants, listeners });
                }
                Attempt::RolledBack(grants) => {
                    for grant in &grants {
                        try_bind(grant.port);
                    }
                }
            }
        }
        Err(PlaceError::Unsettled)
    }

    /// `agent`'s session (on this relay) ended: its leases start ageing now, unless another
    /// relay of the fleet still holds a session with it. A store that cannot be reached is
    /// logged; the lease then ages from the last time this relay refreshed it.
    pub async fn deactivate(&self, agent: &str) {
        let now = self.now();
        match &self.backend {
            Backend::File(f) => self.announce(f.deactivate(agent, now)),
            Backend::Postgres(p) => {
                if let Err(e) = p.deactivate(&self.me.id, agent, now).await {
                    tracing::warn!(agent, "cannot record the end of the session: {e}");
                }
            }
        }
    }

    /// Drops all of `agent`'s leases, fleet-wide (the operator's explicit release); returns
    /// their ports.
    pub async fn release(&self, agent: &str) -> Result<Vec<u16>, StoreError> {
        let now = self.now();
        match &self.backend {
            Backend::File(f) => {
                let (ports, expired) = f.release(agent, now);
                self.announce(expired);
                Ok(ports)
            }
            Backend::Postgres(p) => p.release(agent, now).await,
        }
    }

    /// The identity holding `agent`'s leases, if it has any.
    pub async fn holder(&self, agent: &str) -> Result<Option<String>, StoreError> {
        match &self.backend {
            Backend::File(f) => Ok(f.holder(agent)),
            Backend::Postgres(p) => p.holder(agent, self.now()).await,
        }
    }

    /// Who holds `agent`'s name and its leased ports by service: what a newcomer under that
    /// name is checked against, in one trip to the store.
    pub async fn name_state(
        &self,
        agent: &str,
    ) -> Result<(Option<String>, Vec<(String, u16)>), StoreError> {
        match &self.backend {
            Backend::File(f) => Ok((f.holder(agent), f.ports_of(agent))),
            Backend::Postgres(p) => p.name_state(agent, self.now()).await,
        }
    }

    /// `agent`'s leased ports, by service.
    pub async fn ports_of(&self, agent: &str) -> Result<Vec<(String, u16)>, StoreError> {
        match &self.backend {
            Backend::File(f) => Ok(f.ports_of(agent)),
            Backend::Postgres(p) => p.ports_of(agent).await,
        }
    }

    /// Whether the store has anything under `agent`'s name to release: a lease, connected or
    /// not, or a holder (a live `--no-port` session anywhere in the fleet, or a holder row a
    /// relay left behind).
    pub async fn knows_agent(&self, agent: &str) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::File(f) => Ok(f.holder(agent).is_some() || !f.ports_of(agent).is_empty()),
            Backend::Postgres(p) => p.knows_agent(agent).await,
        }
    }

    /// Every lease, by key.
    pub async fn views(&self) -> Result<Vec<LeaseView>, StoreError> {
        match &self.backend {
            Backend::File(f) => Ok(f.views()),
            Backend::Postgres(p) => p.views(self.now()).await,
        }
    }

    /// Ports leased and ports free to hand out.
    pub async fn usage(&self) -> Result<(usize, usize), StoreError> {
        match &self.backend {
            Backend::File(f) => Ok(f.usage()),
            Backend::Postgres(p) => p.usage().await,
        }
    }

    /// How many agent names (with leases or a live session), and how many leases, `identity`
    /// holds (across the fleet): what a per-identity cap counts.
    pub async fn holdings(&self, identity: &str) -> Result<(usize, usize), StoreError> {
        match &self.backend {
            Backend::File(f) => Ok(f.holdings(identity)),
            Backend::Postgres(p) => p.holdings(identity, self.now()).await,
        }
    }

    /// `(identity, names, leases)` for every identity that holds a name, sorted: the metrics'
    /// per-credential gauges.
    pub async fn holdings_by_identity(&self) -> Result<Vec<(String, usize, usize)>, StoreError> {
        match &self.backend {
            Backend::File(f) => Ok(f.holdings_by_identity()),
            Backend::Postgres(p) => p.holdings_by_identity(self.now()).await,
        }
    }

    /// The live relays of the fleet (the file store: this relay alone).
    pub async fn members(&self) -> Result<Vec<Member>, StoreError> {
        match &self.backend {
            Backend::File(_) => Ok(vec![self.me.clone()]),
            Backend::Postgres(p) => p.members(self.now()).await,
        }
    }

    /// Which live relays hold a session with each agent that has one: the fleet view of
    /// `/api/tunnels` (the file store: this relay, for its connected agents).
    pub async fn sessions(&self) -> Result<HashMap<String, Vec<String>>, StoreError> {
        match &self.backend {
            Backend::File(f) => Ok(f
                .views()
                .into_iter()
                .filter(|v| v.expires_at.is_none())
                .map(|v| (v.key.agent, vec![self.me.id.clone()]))
                .collect()),
            Backend::Postgres(p) => p.sessions(self.now()).await,
        }
    }

    /// Makes every change so far durable. Concurrent callers share one write. (The database
    /// store commits each change as it makes it.)
    pub async fn persist(&self) -> std::io::Result<()> {
        match &self.backend {
            Backend::File(f) => f.persist(self.now()).await,
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Persists and logs on failure: the relay keeps serving with leases in memory.
    pub async fn persist_or_warn(&self) {
        if let Backend::File(f) = &self.backend {
            if let Err(e) = f.persist(self.now()).await {
                tracing::error!(path = %f.path().display(), "cannot write lease file: {e}; leases will not survive a restart until this is fixed");
            }
        }
    }

    /// One maintenance round: expire leases, and (database) heartbeat this relay and refresh the
    /// leases of the agents it holds sessions with.
    pub async fn tick(&self) -> Result<(), StoreError> {
        let now = self.now();
        match &self.backend {
            Backend::File(f) => {
                self.announce(f.expire(now));
                Ok(())
            }
            Backend::Postgres(p) => {
                let expired = p.tick(&self.me, now).await?;
                let current: HashMap<LeaseKey, u16> = p
                    .views(now)
                    .await?
                    .into_iter()
                    .map(|v| (v.key, v.port))
                    .collect();
                let gone: Vec<(LeaseKey, u16)> = {
                    let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                    let old = std::mem::replace(&mut *seen, current);
                    old.into_iter()
                        .filter(|(key, port)| seen.get(key) != Some(port))
                        .filter(|(key, port)| !expired.iter().any(|(k, p)| k == key && p == port))
                        .collect()
                };
                self.announce(expired);
                if let Some(on_gone) = &self.on_gone {
                    for (key, port) in gone {
                        tracing::info!(agent = %key.agent, service = %key.service, port, "lease ended on another relay of the fleet");
                        on_gone(&key, port);
                    }
                }
                Ok(())
            }
        }
    }

    /// Expires leases and refreshes the file (or the relay's membership and its agents' leases
    /// in the database) periodically until `stop` fires, then a final time.
    pub async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let period = match &self.backend {
            Backend::File(_) => (self.ttl / 4).clamp(Duration::from_secs(1), MAINTENANCE_PERIOD),
            Backend::Postgres(_) => postgres::HEARTBEAT_PERIOD,
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            match self.tick().await {
                Ok(()) => {
                    if warned.take().is_some() {
                        tracing::info!("lease store reachable again");
                    }
                }
                // One line a minute while the store is away, not one per tick.
                Err(e) => {
                    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!("lease maintenance skipped: {e}; tunnels keep working, new agents are asked to retry");
                        warned = Some(tokio::time::Instant::now());
                    }
                }
            }
            self.persist_or_warn().await;
        }
        match &self.backend {
            Backend::File(_) => {
                let _ = self.tick().await;
                self.persist_or_warn().await;
            }
            Backend::Postgres(p) => p.leave(&self.me.id, self.now()).await,
        }
    }
}

/// Whether an identity that holds `held` (names, leases), `this_name` of them under the name
/// being placed (`new_name`: a name it does not hold yet) and replaced by this placement, may
/// hold `asks` leases under that name within `caps`. Both backends count under the same lock as
/// the placement, and the placement frees the name's leases of services it no longer asks for,
/// so the name holds exactly `asks` leases afterwards; in a fleet, while the name is live on
/// another relay, those leases stay (that relay may serve them) and are left out of
/// `this_name`, so they count. A name counts whether or not it asks for ports: a live
/// `--no-port` agent holds its name as much as one with ports.
pub(crate) fn check_caps(
    caps: CredentialCaps,
    held: (usize, usize),
    this_name: usize,
    new_name: bool,
    asks: usize,
) -> Result<(), PlaceError> {
    let (names, leases) = held;
    if names + usize::from(new_name) > caps.names {
        return Err(PlaceError::CredentialFull(format!(
            "{} agent names",
            caps.names
        )));
    }
    if leases.saturating_sub(this_name) + asks > caps.leases {
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
            .await
            .unwrap();
        let port = placed.grants[0].port;
        store.persist().await.unwrap();
        let again = open(&path).unwrap();
        let view = again.views().await.unwrap();
        assert_eq!(view.len(), 1);
        assert_eq!((view[0].key.agent.as_str(), view[0].port), ("a", port));
    }

    #[tokio::test]
    async fn caps_count_names_and_leases_of_one_identity() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("leases.json")).unwrap();
        let caps = Some(CredentialCaps {
            names: 2,
            leases: 3,
            sessions: 2,
        });
        let place = |agent: &'static str, identity: &'static str, asks: &'static [ServiceAsk]| {
            let store = &store;
            async move {
                store
                    .place(agent, identity, caps, asks, |_| Some(()))
                    .await
                    .map(|_| ())
            }
        };
        let one: &'static [ServiceAsk] = Box::leak(Box::new([ask("ssh", None)]));
        let two: &'static [ServiceAsk] = Box::leak(Box::new([ask("ssh", None), ask("web", None)]));
        place("a", "token:team", one).await.unwrap();
        place("b", "token:team", two).await.unwrap();
        // A third name is over the names cap; renewing a held name is not.
        let third = place("c", "token:team", one).await.unwrap_err();
        assert!(matches!(third, PlaceError::CredentialFull(ref d) if d.contains("2 agent names")));
        place("a", "token:team", one).await.unwrap();
        // Growing "a" to two leases would make four.
        let grown = place("a", "token:team", two).await.unwrap_err();
        assert!(matches!(grown, PlaceError::CredentialFull(ref d) if d.contains("3 leased ports")));
        // Other identities are counted apart; releasing gives room back.
        place("c", "token:other", two).await.unwrap();
        store.release("b").await.unwrap();
        place("d", "token:team", two).await.unwrap();
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

    /// Placement binds outside the lock and attempts again when a port turns out taken: the
    /// result is what the table decides with that port known unbindable, and only granted ports
    /// keep a listener.
    #[tokio::test]
    async fn a_taken_preferred_port_falls_back_like_the_table_says() {
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
            .await
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
        assert_eq!(store.usage().await.unwrap().0, 2);
    }

    #[tokio::test]
    async fn only_the_holder_of_a_name_gets_its_leases() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("leases.json")).unwrap();
        let bind = |_| std::net::TcpListener::bind(("127.0.0.1", 0)).ok();
        let first = store
            .place("a", "token:team-a", None, &[ask("ssh", None)], bind)
            .await
            .unwrap();
        store.deactivate("a").await;
        let err = store
            .place("a", "token:team-b", None, &[ask("ssh", None)], bind)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, PlaceError::HeldByAnother), "{err}");
        let again = store
            .place("a", "token:team-a", None, &[ask("ssh", None)], bind)
            .await
            .unwrap();
        assert_eq!(again.grants[0].port, first.grants[0].port);
        assert_eq!(
            store.holder("a").await.unwrap().as_deref(),
            Some("token:team-a")
        );
        assert_eq!(store.holdings("token:team-a").await.unwrap(), (1, 1));
        store.release("a").await.unwrap();
        assert!(store
            .place("a", "token:team-b", None, &[ask("ssh", None)], bind)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn a_host_that_takes_every_port_is_unsettled_or_exhausted_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("leases.json")).unwrap();
        let err = store
            .place("a", "cert:a", None, &[ask("ssh", None)], |_| {
                None::<std::net::TcpListener>
            })
            .await
            .err()
            .unwrap();
        // 11 ports, each found taken once: the table runs out before the round limit.
        assert!(
            matches!(err, PlaceError::Alloc(AllocError::Exhausted { .. })),
            "{err}"
        );
        assert_eq!(store.usage().await.unwrap(), (0, 11));
    }
}
