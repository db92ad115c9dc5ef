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
mod maintenance;
mod placement;
mod postgres;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jumpgate_lease::{LeaseKey, PortRange};
use serde::Serialize;

use crate::error::RelayError;
pub use crate::error::StoreError;

pub(crate) use placement::{check_caps, Claim};
pub use placement::{PlaceError, Placement};
pub use postgres::{PgSettings, StoreTls, PASSWORD_ENV, SCHEMA};

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
}
