//! The PostgreSQL store a fleet of relays shares: one port per (agent, service) across the
//! fleet, enforced by the database (a row per port of the range, a unique key on (agent,
//! service), row locks), never by one relay's memory.
//!
//! The relay creates and migrates the schema itself ([`SCHEMA`]), in one transaction under an
//! advisory lock, so relays starting together do it once. Placement mirrors
//! [`jumpgate_lease::LeaseTable::acquire`] statement by statement inside one transaction under
//! an advisory lock on the agent's name; the relay's placement loop commits it only when every
//! granted port is bound locally. Time is the relay's clock, passed in, never the database's.
//! docs/operations.md, "Lease store", describes the tables.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use jumpgate_lease::{AllocError, Attempt, Grant, GrantKind, LeaseKey, PortRange, ServiceAsk};
use jumpgate_proto::Secret;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{NoTls, Transaction};

use super::{check_caps, Claim, LeaseView, Member, PlaceError, StoreError};
use crate::error::RelayError;

/// How often a relay heartbeats and refreshes the leases of the agents it holds sessions with.
pub(super) const HEARTBEAT_PERIOD: Duration = Duration::from_secs(5);

/// A relay whose heartbeat is older than this is gone: its sessions stop keeping leases alive
/// and it leaves the member list.
pub(super) const RELAY_GONE_AFTER_SECS: i64 = 30;

/// Rows of relays gone this long are deleted, with their session rows.
const FORGET_RELAY_AFTER_SECS: i64 = 3600;

/// Longest one store operation may take before the caller is told the store is unavailable.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections the relay keeps to the database.
const POOL_SIZE: usize = 8;

/// The advisory lock (single 64-bit key) that serialises schema migrations across the fleet:
/// "jumpgate" in ASCII.
const MIGRATION_LOCK: i64 = 0x6a75_6d70_6761_7465;

/// First key of the two-key advisory locks taken per agent name during placement and release.
const AGENT_LOCK_CLASS: i32 = 0x6a67;
/// The advisory lock class serialising placements under one identity (for its caps); always
/// taken after the agent's lock, never before, so the two cannot deadlock.
const IDENTITY_LOCK_CLASS: i32 = 0x6a68;

/// The schema, version by version. A version is applied once, in order, in the same transaction
/// as its row in `jumpgate_schema`; a released version is never edited, only followed.
pub const SCHEMA: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE jumpgate_settings (
         key text PRIMARY KEY,
         value text NOT NULL
     );
     CREATE TABLE jumpgate_ports (
         port integer PRIMARY KEY,
         agent text,
         service text,
         last_seen bigint NOT NULL DEFAULT 0,
         freed_at bigint NOT NULL DEFAULT 0,
         UNIQUE (agent, service),
         CHECK ((agent IS NULL) = (service IS NULL))
     );
     CREATE INDEX jumpgate_ports_free ON jumpgate_ports (freed_at, port) WHERE agent IS NULL;
     CREATE INDEX jumpgate_ports_seen ON jumpgate_ports (last_seen) WHERE agent IS NOT NULL;
     CREATE TABLE jumpgate_holders (
         agent text PRIMARY KEY,
         identity text NOT NULL
     );
     CREATE INDEX jumpgate_holders_identity ON jumpgate_holders (identity);
     CREATE TABLE jumpgate_relays (
         id text PRIMARY KEY,
         agent_addr text NOT NULL,
         public_host text NOT NULL,
         heartbeat_at bigint NOT NULL
     );
     CREATE TABLE jumpgate_sessions (
         agent text NOT NULL,
         relay text NOT NULL,
         PRIMARY KEY (agent, relay)
     );
     CREATE INDEX jumpgate_sessions_relay ON jumpgate_sessions (relay);",
)];

/// Whether the connection to the database is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreTls {
    /// TLS, verified against `lease_store_ca` or the system roots.
    Require,
    /// Plain TCP (or a Unix socket).
    Disable,
}

/// How to reach the shared store: the validated `lease_store_*` settings.
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// The connection URL or key=value string, without a password.
    pub url: String,
    /// File holding the password (0600), if any; else `JUMPGATE_LEASE_STORE_PASSWORD`.
    pub password_file: Option<PathBuf>,
    /// TLS or not.
    pub tls: StoreTls,
    /// CA bundle for the server's certificate; `None`: the system bundle.
    pub ca: Option<PathBuf>,
}

/// The environment variable that may hold the database password instead of a file.
pub const PASSWORD_ENV: &str = "JUMPGATE_LEASE_STORE_PASSWORD";

/// The system CA bundle (Debian's ca-certificates), used when `lease_store_ca` is not set.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl PgSettings {
    /// Checks a `lease_store_url`: it must parse, and carry no password (a flag shows in `ps`
    /// and a URL in logs). Returns the TLS default for its host: off for loopback and Unix
    /// sockets, on otherwise.
    pub fn check_url(url: &str) -> Result<StoreTls, String> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("not a PostgreSQL connection URL: {e}"))?;
        if config.get_password().is_some() {
            return Err(format!(
                "the URL carries a password; remove it and put the password in a 0600 file named by \
                 lease_store_password_file (or the systemd credential {}), or in the environment variable {PASSWORD_ENV}",
                jumpgate_config::credential::LEASE_STORE_PASSWORD
            ));
        }
        let (hosts, addrs) = (config.get_hosts().len(), config.get_hostaddrs().len());
        if hosts == 0 && addrs == 0 {
            return Err("the URL names no host".into());
        }
        if hosts > 0 && addrs > 0 && hosts != addrs {
            return Err(format!(
                "the URL names {hosts} host(s) but {addrs} hostaddr(s); give one hostaddr per host, or none"
            ));
        }
        Ok(if goes_to_this_host(&config) {
            StoreTls::Disable
        } else {
            StoreTls::Require
        })
    }

    /// Where the store is, for messages: hosts, ports, database, user; never the password.
    fn describe(config: &tokio_postgres::Config) -> String {
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = config.get_ports().get(i).or(config.get_ports().first());
                let host = match h {
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => path.display().to_string(),
                };
                match port {
                    Some(p) => format!("{host}:{p}"),
                    None => host,
                }
            })
            .collect();
        format!(
            "postgres://{}@{}/{}",
            config.get_user().unwrap_or("?"),
            hosts.join(","),
            config.get_dbname().unwrap_or("")
        )
    }
}

/// Whether every connection the URL makes stays on this host (loopback or a Unix socket), which
/// makes plain TCP the default. Decided from where each connection really goes: a host's
/// `hostaddr`, when given, is the address dialled (`host` is then only the name TLS checks), so
/// `host=localhost hostaddr=203.0.113.5` is remote and gets TLS.
fn goes_to_this_host(config: &tokio_postgres::Config) -> bool {
    let loopback = |text: &str| {
        text.trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    };
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    (0..hosts.len().max(addrs.len())).all(|i| match (addrs.get(i), hosts.get(i)) {
        (Some(addr), _) => addr.is_loopback(),
        (None, Some(Host::Tcp(name))) => name == "localhost" || loopback(name),
        (None, Some(Host::Unix(_))) => true,
        (None, None) => false,
    })
}

#[cfg(test)]
mod tls_default_tests {
    use super::*;

    #[test]
    fn the_tls_default_follows_where_the_connection_goes() {
        let tls = |url: &str| PgSettings::check_url(url).unwrap();
        assert_eq!(tls("postgres://j@localhost/db"), StoreTls::Disable);
        assert_eq!(tls("postgres://j@127.0.0.1:5432/db"), StoreTls::Disable);
        assert_eq!(tls("host=/run/postgresql user=j"), StoreTls::Disable);
        assert_eq!(tls("postgres://j@db.example/db"), StoreTls::Require);
        // hostaddr is what is dialled: a remote one needs TLS whatever host says.
        assert_eq!(
            tls("host=localhost hostaddr=203.0.113.5 user=j"),
            StoreTls::Require
        );
        assert_eq!(
            tls("postgres://j@localhost/db?hostaddr=203.0.113.5"),
            StoreTls::Require
        );
        assert_eq!(
            tls("host=db.example hostaddr=127.0.0.1 user=j"),
            StoreTls::Disable
        );
        assert_eq!(tls("hostaddr=::1 user=j"), StoreTls::Disable);
        assert!(PgSettings::check_url("host=a,b hostaddr=127.0.0.1 user=j")
            .unwrap_err()
            .contains("one hostaddr per host"));
        // One remote host of several is enough to need TLS.
        assert_eq!(
            tls("host=localhost,localhost hostaddr=127.0.0.1,198.51.100.7 user=j"),
            StoreTls::Require
        );
    }
}

/// `e` and its causes, one line, for a log or a refusal (tokio-postgres puts the server's
/// message in the source).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn down(e: impl std::error::Error + 'static) -> StoreError {
    StoreError::Unavailable(chain(&e))
}

fn down_text(e: impl Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Runs `f` with a deadline, so an unreachable database becomes an error, not a hang.
async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(OP_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "no answer within {OP_TIMEOUT:?}"
            )))
        })
}

/// Converts a port read from the database.
fn port_of(v: i32) -> u16 {
    u16::try_from(v).unwrap_or(0)
}

/// Converts a time read from the database.
fn secs_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A time for the database (Unix seconds fit comfortably).
fn secs(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The database store.
pub(super) struct PgStore {
    pool: Pool,
    range: PortRange,
    ttl_secs: i64,
    /// Where the store is, for messages.
    target: Arc<str>,
}

/// Whether a lease's agent holds a live session on any relay: the SQL condition, for a row of
/// `jumpgate_ports` named `p`, with `$now` as parameter `NOW`.
macro_rules! live {
    ($now:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM jumpgate_sessions s JOIN jumpgate_relays r ON r.id = s.relay \
             WHERE s.agent = p.agent AND r.heartbeat_at > ",
            $now,
            "::bigint - 30)"
        )
    };
}

/// Whether a holder row (named `h`) still holds its name: the name has a lease, or a session on
/// a live relay (a `--no-port` agent). A row for neither is a leftover (its relay died, or an
/// older relay kept it) and counts for nothing; maintenance deletes it. `$now` as parameter
/// `NOW`.
macro_rules! holds {
    ($now:literal) => {
        concat!(
            "(EXISTS (SELECT 1 FROM jumpgate_ports hp WHERE hp.agent = h.agent) OR \
             EXISTS (SELECT 1 FROM jumpgate_sessions hs JOIN jumpgate_relays hr ON hr.id = hs.relay \
             WHERE hs.agent = h.agent AND hr.heartbeat_at > ",
            $now,
            "::bigint - 30))"
        )
    };
}

impl PgStore {
    /// Connects, migrates the schema, checks the fleet's port range and registers `me`.
    pub(super) async fn connect(
        settings: &PgSettings,
        range: PortRange,
        ttl_secs: u64,
        me: &Member,
        now: u64,
    ) -> Result<Self, RelayError> {
        let mut config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e| RelayError::StoreConfig(format!("lease_store_url: {e}")))?;
        let password = match &settings.password_file {
            Some(path) => Some(jumpgate_config::read_secret_file(path, true)?),
            None => std::env::var(PASSWORD_ENV)
                .ok()
                .filter(|p| !p.is_empty())
                .map(Secret::new),
        };
        if let Some(password) = &password {
            config.password(password.expose());
        }
        config.connect_timeout(Duration::from_secs(5));
        config.keepalives_idle(Duration::from_secs(30));
        config.application_name("jumpgate-relay");
        let target: Arc<str> = PgSettings::describe(&config).into();
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match settings.tls {
            StoreTls::Disable => {
                config.ssl_mode(SslMode::Disable);
                Manager::from_config(config, NoTls, manager_config)
            }
            StoreTls::Require => {
                config.ssl_mode(SslMode::Require);
                let bundle = settings
                    .ca
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(SYSTEM_BUNDLE));
                let mut roots = rustls::RootCertStore::empty();
                for cert in jumpgate_transport::tls::load_certs(&bundle)? {
                    roots.add(cert).map_err(|e| {
                        RelayError::StoreConfig(format!("lease_store_ca {}: {e}", bundle.display()))
                    })?;
                }
                let tls = rustls::ClientConfig::builder_with_provider(
                    jumpgate_transport::tls::provider(),
                )
                .with_safe_default_protocol_versions()
                .map_err(|e| RelayError::StoreConfig(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
                Manager::from_config(
                    config,
                    tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                    manager_config,
                )
            }
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(OP_TIMEOUT))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| RelayError::StoreConfig(e.to_string()))?;
        let store = Self {
            pool,
            range,
            ttl_secs: secs(ttl_secs),
            target: target.clone(),
        };
        let unreachable = |e: StoreError| {
            RelayError::Store(StoreError::Unavailable(format!(
                "cannot use the lease store {target}: {e}"
            )))
        };
        match timed(store.migrate(range)).await.map_err(unreachable)? {
            Ok(()) => {}
            Err(fleet) => {
                return Err(RelayError::StoreConfig(format!(
                    "this relay's port_range {range} differs from the fleet's {fleet} (in the lease store {target}); \
                     every relay of a fleet must use the same range"
                )))
            }
        }
        timed(store.register(me, now)).await.map_err(unreachable)?;
        tracing::info!(store = %target, relay = %me.id, "lease store ready (PostgreSQL, schema version {})", SCHEMA.len());
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| {
            StoreError::Unavailable(format!("cannot reach {}: {}", self.target, chain(&e)))
        })
    }

    /// Applies missing schema versions and fills the port rows; `Err(range)` if the fleet uses
    /// another port range.
    async fn migrate(&self, range: PortRange) -> Result<Result<(), String>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(down)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(down)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS jumpgate_schema (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(down)?;
        let current: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM jumpgate_schema", &[])
            .await
            .map_err(down)?
            .get(0);
        if usize::try_from(current).unwrap_or(usize::MAX) > SCHEMA.len() {
            return Err(StoreError::Unavailable(format!(
                "the store's schema is version {current}, newer than this relay's {}; upgrade this relay",
                SCHEMA.len()
            )));
        }
        for (version, sql) in SCHEMA.iter().filter(|(v, _)| *v > current) {
            tx.batch_execute(sql).await.map_err(down)?;
            tx.execute(
                "INSERT INTO jumpgate_schema (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(down)?;
            tracing::info!(version, "lease store schema migrated");
        }
        let fleet: Option<String> = tx
            .query_opt(
                "SELECT value FROM jumpgate_settings WHERE key = 'port_range'",
                &[],
            )
            .await
            .map_err(down)?
            .map(|r| r.get(0));
        match fleet {
            Some(fleet) if fleet != range.to_string() => return Ok(Err(fleet)),
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO jumpgate_settings (key, value) VALUES ('port_range', $1)",
                    &[&range.to_string()],
                )
                .await
                .map_err(down)?;
                tx.execute(
                    "INSERT INTO jumpgate_ports (port) SELECT generate_series($1::int, $2::int) \
                     ON CONFLICT DO NOTHING",
                    &[&i32::from(range.lo()), &i32::from(range.hi())],
                )
                .await
                .map_err(down)?;
            }
        }
        tx.commit().await.map_err(down)?;
        Ok(Ok(()))
    }

    /// Enters `me` into the member list, dropping the session rows a previous run of this relay
    /// left (it holds no session yet).
    async fn register(&self, me: &Member, now: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM jumpgate_sessions WHERE relay = $1", &[&me.id])
            .await
            .map_err(down)?;
        self.heartbeat(&client, me, now).await
    }

    async fn heartbeat(
        &self,
        client: &deadpool_postgres::Object,
        me: &Member,
        now: u64,
    ) -> Result<(), StoreError> {
        client
            .execute(
                "INSERT INTO jumpgate_relays (id, agent_addr, public_host, heartbeat_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET \
                 agent_addr = EXCLUDED.agent_addr, public_host = EXCLUDED.public_host, \
                 heartbeat_at = EXCLUDED.heartbeat_at",
                &[&me.id, &me.agent_addr, &me.public_host, &secs(now)],
            )
            .await
            .map_err(down)?;
        Ok(())
    }

    /// Deletes leases whose agent has no live session anywhere and was last seen a TTL ago
    /// (see [`expire_in`]), in a transaction of its own.
    async fn expire(&self, now: u64) -> Result<Vec<(LeaseKey, u16)>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(down)?;
        let expired = expire_in(&tx, now, self.ttl_secs).await?;
        tx.commit().await.map_err(down)?;
        Ok(expired)
    }

    /// One placement attempt (see [`super::LeaseStore::place`]): expires due leases, then
    /// places, in one transaction. Granted ports not bound yet are bound through `bind` while
    /// the transaction holds their rows, so a new agent needs one transaction, not two; the
    /// placement is kept only if every granted port is bound. Expiry is kept whatever the
    /// placement decides, as in the file store (a savepoint separates the two when something
    /// expired).
    pub(super) async fn attempt(
        &self,
        relay: &str,
        claim: Claim<'_>,
        now: u64,
        ports: KnownPorts<'_>,
        bind: &mut impl FnMut(u16) -> bool,
    ) -> (Result<Attempt, PlaceError>, Vec<(LeaseKey, u16)>) {
        tokio::time::timeout(OP_TIMEOUT, self.try_place(relay, claim, now, ports, bind))
            .await
            .unwrap_or_else(|_| {
                let e = StoreError::Unavailable(format!("no answer within {OP_TIMEOUT:?}"));
                (Err(e.into()), Vec::new())
            })
    }

    async fn try_place(
        &self,
        relay: &str,
        claim: Claim<'_>,
        now: u64,
        ports: KnownPorts<'_>,
        bind: &mut impl FnMut(u16) -> bool,
    ) -> (Result<Attempt, PlaceError>, Vec<(LeaseKey, u16)>) {
        let mut client = match self.client().await {
            Ok(client) => client,
            Err(e) => return (Err(e.into()), Vec::new()),
        };
        let prepared = async {
            let tx = client.transaction().await.map_err(down)?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&AGENT_LOCK_CLASS, &claim.agent],
            )
            .await
            .map_err(down)?;
            let expired = expire_in(&tx, now, self.ttl_secs).await?;
            if !expired.is_empty() {
                tx.batch_execute("SAVEPOINT jumpgate_placement")
                    .await
                    .map_err(down)?;
            }
            Ok::<_, StoreError>((tx, expired))
        };
        let (tx, expired) = match prepared.await {
            Ok(prepared) => prepared,
            Err(e) => return (Err(e.into()), Vec::new()),
        };
        let placed = self.place_in(&tx, relay, claim, now, ports, bind).await;
        let kept = match &placed {
            // The database failed: nothing is kept, expiry included.
            Err(PlaceError::Store(_)) => return (placed, Vec::new()),
            Ok(Attempt::Committed(_)) => tx.commit().await,
            // A decision against placing (or a port to bind first): undo the placement, keep
            // the expiry.
            _ if expired.is_empty() => tx.rollback().await,
            _ => match tx
                .batch_execute("ROLLBACK TO SAVEPOINT jumpgate_placement")
                .await
            {
                Ok(()) => tx.commit().await,
                Err(e) => Err(e),
            },
        };
        match kept {
            Ok(()) => (placed, expired),
            Err(e) => (Err(down(e).into()), Vec::new()),
        }
    }

    /// The placement inside `tx` (its agent lock held, due leases expired): the holder and
    /// caps checks, a grant per ask, binding, and the session row. Commits nothing; an attempt
    /// whose ports could not all be bound is [`Attempt::RolledBack`] for the caller to undo.
    async fn place_in(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        relay: &str,
        claim: Claim<'_>,
        now: u64,
        ports: KnownPorts<'_>,
        bind: &mut impl FnMut(u16) -> bool,
    ) -> Result<Attempt, PlaceError> {
        let Claim {
            agent,
            identity,
            caps,
            asks,
        } = claim;
        let KnownPorts { taken, bound } = ports;
        let holder = holder_in(tx, agent, now).await?;
        if holder.as_deref().is_some_and(|h| h != identity) {
            return Err(PlaceError::HeldByAnother);
        }
        let mut current: HashMap<String, u16> = ports_in(tx, agent).await?.into_iter().collect();
        if let Some(caps) = caps {
            // Placements of one identity's names are serialised, so two relays cannot both
            // admit its last allowed name.
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&IDENTITY_LOCK_CLASS, &identity],
            )
            .await
            .map_err(down)?;
            let held = holdings_in(tx, identity, now).await?;
            check_caps(caps, held, current.len(), holder.is_none(), asks.len())?;
        }
        // The name's services are the ones this placement asks for: the others' leases end
        // here, as in the file store (`LeaseTable::retire_unasked`).
        let services: Vec<&str> = asks.iter().map(|a| a.service.as_str()).collect();
        let retired = tx
            .query(
                "WITH gone AS (SELECT port, service FROM jumpgate_ports \
                 WHERE agent = $1 AND NOT (service = ANY($3)) FOR UPDATE) \
                 UPDATE jumpgate_ports p SET agent = NULL, service = NULL, last_seen = 0, \
                 freed_at = GREATEST($2::bigint, 1) FROM gone WHERE p.port = gone.port \
                 RETURNING gone.service",
                &[&agent, &secs(now), &services],
            )
            .await
            .map_err(down)?;
        for row in &retired {
            current.remove(row.get::<_, &str>(0));
        }
        let taken_list: Vec<i32> = taken.iter().map(|&p| i32::from(p)).collect();
        let mut grants = Vec::with_capacity(asks.len());
        for ask in asks {
            let op = Placing {
                tx,
                range: self.range,
                agent,
                ask,
                now: secs(now),
                taken,
                taken_list: &taken_list,
            };
            let grant = op.acquire_one(current.get(&ask.service).copied()).await?;
            current.insert(ask.service.clone(), grant.port);
            grants.push(grant);
        }
        // Every port is bound before any is kept (no short circuit): a rolled-back attempt
        // then tells the next one about every port that cannot be bound.
        let unbound = grants
            .iter()
            .filter(|g| !bound.contains(&g.port))
            .fold(false, |failed, g| !bind(g.port) | failed);
        if unbound {
            return Ok(Attempt::RolledBack(grants));
        }
        tx.execute(
            "INSERT INTO jumpgate_holders (agent, identity) VALUES ($1, $2) \
             ON CONFLICT (agent) DO UPDATE SET identity = EXCLUDED.identity",
            &[&agent, &identity],
        )
        .await
        .map_err(down)?;
        tx.execute(
            "INSERT INTO jumpgate_sessions (agent, relay) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&agent, &relay],
        )
        .await
        .map_err(down)?;
        Ok(Attempt::Committed(grants))
    }

    /// This relay's session with `agent` ended: its leases age from `now` unless another relay
    /// still holds a session.
    pub(super) async fn deactivate(
        &self,
        relay: &str,
        agent: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(down)?;
            // Serialised with placements of the name, so a session placed on another relay
            // meanwhile is seen before the holder is dropped.
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&AGENT_LOCK_CLASS, &agent],
            )
            .await
            .map_err(down)?;
            tx.execute(
                "DELETE FROM jumpgate_sessions WHERE agent = $1 AND relay = $2",
                &[&agent, &relay],
            )
            .await
            .map_err(down)?;
            tx.execute(
                "UPDATE jumpgate_ports SET last_seen = $2 WHERE agent = $1",
                &[&agent, &secs(now)],
            )
            .await
            .map_err(down)?;
            // A name without leases and without a session anywhere is no longer held (a
            // `--no-port` agent that left), as in the file store.
            tx.execute(
                concat!(
                    "DELETE FROM jumpgate_holders h WHERE h.agent = $1 AND NOT ",
                    holds!("$2")
                ),
                &[&agent, &secs(now)],
            )
            .await
            .map_err(down)?;
            tx.commit().await.map_err(down)
        })
        .await
    }

    /// Drops all of `agent`'s leases, its holder and its session rows, fleet-wide.
    pub(super) async fn release(&self, agent: &str, now: u64) -> Result<Vec<u16>, StoreError> {
        timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(down)?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&AGENT_LOCK_CLASS, &agent],
            )
            .await
            .map_err(down)?;
            let rows = tx
                .query(
                    "WITH gone AS (SELECT port, service FROM jumpgate_ports WHERE agent = $1 FOR UPDATE) \
                     UPDATE jumpgate_ports p SET agent = NULL, service = NULL, last_seen = 0, \
                     freed_at = GREATEST($2::bigint, 1) FROM gone WHERE p.port = gone.port \
                     RETURNING gone.service, gone.port",
                    &[&agent, &secs(now)],
                )
                .await
                .map_err(down)?;
            let mut freed: Vec<(String, u16)> = rows
                .iter()
                .map(|r| (r.get::<_, String>(0), port_of(r.get(1))))
                .collect();
            freed.sort();
            tx.execute("DELETE FROM jumpgate_holders WHERE agent = $1", &[&agent])
                .await
                .map_err(down)?;
            tx.execute("DELETE FROM jumpgate_sessions WHERE agent = $1", &[&agent])
                .await
                .map_err(down)?;
            tx.commit().await.map_err(down)?;
            Ok(freed.into_iter().map(|(_, p)| p).collect())
        })
        .await
    }

    pub(super) async fn holder(&self, agent: &str, now: u64) -> Result<Option<String>, StoreError> {
        timed(async { holder_in(&self.client().await?, agent, now).await }).await
    }

    /// Whether `agent` has a lease or a holder row (even a leftover one), for the operator's
    /// release.
    pub(super) async fn knows_agent(&self, agent: &str) -> Result<bool, StoreError> {
        timed(async {
            let client = self.client().await?;
            let row = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM jumpgate_ports WHERE agent = $1) \
                     OR EXISTS (SELECT 1 FROM jumpgate_holders WHERE agent = $1)",
                    &[&agent],
                )
                .await
                .map_err(down)?;
            Ok(row.get(0))
        })
        .await
    }

    pub(super) async fn ports_of(&self, agent: &str) -> Result<Vec<(String, u16)>, StoreError> {
        timed(async { ports_in(&self.client().await?, agent).await }).await
    }

    /// Both of the above on one connection, the two queries pipelined.
    pub(super) async fn name_state(
        &self,
        agent: &str,
        now: u64,
    ) -> Result<(Option<String>, Vec<(String, u16)>), StoreError> {
        timed(async {
            let client = self.client().await?;
            tokio::try_join!(holder_in(&client, agent, now), ports_in(&client, agent))
        })
        .await
    }

    pub(super) async fn views(&self, now: u64) -> Result<Vec<LeaseView>, StoreError> {
        let ttl = secs_of(self.ttl_secs);
        timed(async {
            let client = self.client().await?;
            Ok(client
                .query(
                    concat!(
                        "SELECT agent, service, port, last_seen, ",
                        live!("$1"),
                        " FROM jumpgate_ports p WHERE agent IS NOT NULL ORDER BY agent, service"
                    ),
                    &[&secs(now)],
                )
                .await
                .map_err(down)?
                .iter()
                .map(|r| LeaseView {
                    key: LeaseKey::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                    port: port_of(r.get(2)),
                    expires_at: (!r.get::<_, bool>(4))
                        .then(|| secs_of(r.get(3)).saturating_add(ttl)),
                })
                .collect())
        })
        .await
    }

    pub(super) async fn usage(&self) -> Result<(usize, usize), StoreError> {
        timed(async {
            let client = self.client().await?;
            let row = client
                .query_one(
                    "SELECT count(*) FILTER (WHERE agent IS NOT NULL), \
                     count(*) FILTER (WHERE agent IS NULL) FROM jumpgate_ports",
                    &[],
                )
                .await
                .map_err(down)?;
            let count = |i| usize::try_from(row.get::<_, i64>(i)).unwrap_or(0);
            Ok((count(0), count(1)))
        })
        .await
    }

    pub(super) async fn holdings(
        &self,
        identity: &str,
        now: u64,
    ) -> Result<(usize, usize), StoreError> {
        timed(async {
            let client = self.client().await?;
            holdings_in(&client, identity, now).await
        })
        .await
    }

    /// `(identity, names, leases)` for every identity holding a name, by identity.
    pub(super) async fn holdings_by_identity(
        &self,
        now: u64,
    ) -> Result<Vec<(String, usize, usize)>, StoreError> {
        timed(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    concat!(
                        "SELECT h.identity, count(*), coalesce(sum((SELECT count(*) FROM jumpgate_ports p \
                         WHERE p.agent = h.agent)), 0)::bigint FROM jumpgate_holders h WHERE ",
                        holds!("$1"),
                        " GROUP BY h.identity ORDER BY h.identity"
                    ),
                    &[&secs(now)],
                )
                .await
                .map_err(down)?;
            let count = |v: i64| usize::try_from(v).unwrap_or(0);
            Ok(rows
                .iter()
                .map(|r| (r.get(0), count(r.get(1)), count(r.get(2))))
                .collect())
        })
        .await
    }

    pub(super) async fn members(&self, now: u64) -> Result<Vec<Member>, StoreError> {
        timed(async {
            let client = self.client().await?;
            Ok(client
                .query(
                    "SELECT id, agent_addr, public_host FROM jumpgate_relays \
                     WHERE heartbeat_at > $1::bigint - 30 ORDER BY id",
                    &[&secs(now)],
                )
                .await
                .map_err(down)?
                .iter()
                .map(|r| Member {
                    id: r.get(0),
                    agent_addr: r.get(1),
                    public_host: r.get(2),
                })
                .collect())
        })
        .await
    }

    /// Every agent with a session on a live relay, with those relays' ids.
    pub(super) async fn sessions(
        &self,
        now: u64,
    ) -> Result<HashMap<String, Vec<String>>, StoreError> {
        timed(async {
            let client = self.client().await?;
            let mut by_agent: HashMap<String, Vec<String>> = HashMap::new();
            for row in client
                .query(
                    "SELECT s.agent, s.relay FROM jumpgate_sessions s \
                     JOIN jumpgate_relays r ON r.id = s.relay \
                     WHERE r.heartbeat_at > $1::bigint - 30 ORDER BY 1, 2",
                    &[&secs(now)],
                )
                .await
                .map_err(down)?
            {
                by_agent.entry(row.get(0)).or_default().push(row.get(1));
            }
            Ok(by_agent)
        })
        .await
    }

    /// Maintenance: heartbeat, refresh the leases of this relay's agents, expire, forget relays
    /// long gone.
    pub(super) async fn tick(
        &self,
        me: &Member,
        now: u64,
    ) -> Result<Vec<(LeaseKey, u16)>, StoreError> {
        timed(async {
            let client = self.client().await?;
            self.heartbeat(&client, me, now).await?;
            client
                .execute(
                    "UPDATE jumpgate_ports SET last_seen = $2 WHERE agent IN \
                     (SELECT agent FROM jumpgate_sessions WHERE relay = $1)",
                    &[&me.id, &secs(now)],
                )
                .await
                .map_err(down)?;
            client
                .execute(
                    "WITH old AS (DELETE FROM jumpgate_relays WHERE heartbeat_at < $1 RETURNING id) \
                     DELETE FROM jumpgate_sessions WHERE relay IN (SELECT id FROM old)",
                    &[&(secs(now) - FORGET_RELAY_AFTER_SECS)],
                )
                .await
                .map_err(down)?;
            // Holder rows that hold nothing (a `--no-port` agent whose relay died): they already
            // count for nothing; this keeps the table from growing. A name being placed right
            // now holds its lock and is left alone.
            client
                .execute(
                    concat!(
                        "DELETE FROM jumpgate_holders h WHERE NOT ",
                        holds!("$1"),
                        " AND pg_try_advisory_xact_lock($2, hashtext(h.agent))"
                    ),
                    &[&secs(now), &AGENT_LOCK_CLASS],
                )
                .await
                .map_err(down)?;
            drop(client);
            self.expire(now).await
        })
        .await
    }

    /// Leaves the fleet on a clean stop: this relay's agents' leases age from now, its session
    /// rows and its member row go.
    pub(super) async fn leave(&self, relay: &str, now: u64) {
        let left = timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(down)?;
            tx.execute(
                "UPDATE jumpgate_ports SET last_seen = $2 WHERE agent IN \
                 (SELECT agent FROM jumpgate_sessions WHERE relay = $1)",
                &[&relay, &secs(now)],
            )
            .await
            .map_err(down)?;
            tx.execute("DELETE FROM jumpgate_sessions WHERE relay = $1", &[&relay])
                .await
                .map_err(down)?;
            tx.execute("DELETE FROM jumpgate_relays WHERE id = $1", &[&relay])
                .await
                .map_err(down)?;
            tx.commit().await.map_err(down)
        })
        .await;
        if let Err(e) = left {
            tracing::warn!("could not leave the fleet cleanly: {e}; the other relays stop counting this one within {RELAY_GONE_AFTER_SECS}s");
        }
    }
}

/// What the relay knows about ports going into an attempt.
#[derive(Clone, Copy)]
pub(super) struct KnownPorts<'a> {
    /// Ports this relay cannot bind (other processes, or placements in progress here).
    pub taken: &'a HashSet<u16>,
    /// Ports this placement has bound already.
    pub bound: &'a HashSet<u16>,
}

/// One service's placement inside the attempt's transaction: the statements that mirror
/// [`jumpgate_lease::LeaseTable`]'s `acquire_one`.
struct Placing<'a> {
    tx: &'a Transaction<'a>,
    range: PortRange,
    agent: &'a str,
    ask: &'a ServiceAsk,
    now: i64,
    taken: &'a HashSet<u16>,
    taken_list: &'a [i32],
}

impl Placing<'_> {
    fn grant(&self, port: u16, kind: GrantKind, note: Option<String>) -> Grant {
        Grant {
            service: self.ask.service.clone(),
            port,
            kind,
            note,
        }
    }

    async fn acquire_one(&self, current: Option<u16>) -> Result<Grant, PlaceError> {
        if let Some(want) = self.ask.preferred.filter(|&p| Some(p) != current) {
            match self.why_not(want).await? {
                None => {
                    if let Some(old) = current {
                        self.free(old).await?;
                    }
                    self.take(want).await?;
                    return Ok(self.grant(want, GrantKind::Preferred, None));
                }
                Some(why) if self.ask.strict => {
                    return Err(AllocError::PreferredUnavailable {
                        service: self.ask.service.clone(),
                        port: want,
                        why,
                    }
                    .into());
                }
                Some(why) => {
                    let note = format!("preferred port {want} {why}");
                    return self.renew_or_fresh(current, Some(note)).await;
                }
            }
        }
        self.renew_or_fresh(current, None).await
    }

    async fn renew_or_fresh(
        &self,
        current: Option<u16>,
        note: Option<String>,
    ) -> Result<Grant, PlaceError> {
        if let Some(port) = current {
            if self.taken.contains(&port) {
                // Moving would leave the agent's old port bound on the other relays.
                return Err(PlaceError::LocalConflict { port });
            }
            self.tx
                .execute(
                    "UPDATE jumpgate_ports SET last_seen = $2 WHERE port = $1",
                    &[&i32::from(port), &self.now],
                )
                .await
                .map_err(down)?;
            return Ok(self.grant(port, GrantKind::Renewed, note));
        }
        let port = self.fresh().await?;
        Ok(self.grant(port, GrantKind::Fresh, note))
    }

    /// Why `want` cannot be granted, or `None` if it can; locks its row either way.
    async fn why_not(&self, want: u16) -> Result<Option<String>, StoreError> {
        if !self.range.contains(want) {
            return Ok(Some(format!(
                "is outside the relay's port range {}",
                self.range
            )));
        }
        let owner = self
            .tx
            .query_opt(
                "SELECT agent, service FROM jumpgate_ports WHERE port = $1 FOR UPDATE",
                &[&i32::from(want)],
            )
            .await
            .map_err(down)?;
        let owner: Option<(String, String)> = owner.and_then(|r| {
            let agent: Option<String> = r.get(0);
            let service: Option<String> = r.get(1);
            agent.zip(service)
        });
        if owner.is_some_and(|(a, s)| a != self.agent || s != self.ask.service) {
            return Ok(Some("is leased to another agent".into()));
        }
        if self.taken.contains(&want) {
            return Ok(Some("is in use by another process on the relay".into()));
        }
        Ok(None)
    }

    async fn free(&self, port: u16) -> Result<(), StoreError> {
        self.tx
            .execute(
                "UPDATE jumpgate_ports SET agent = NULL, service = NULL, last_seen = 0, \
                 freed_at = GREATEST($2::bigint, 1) WHERE port = $1",
                &[&i32::from(port), &self.now],
            )
            .await
            .map_err(down)?;
        Ok(())
    }

    async fn take(&self, port: u16) -> Result<(), StoreError> {
        let n = self
            .tx
            .execute(
                "UPDATE jumpgate_ports SET agent = $2, service = $3, last_seen = $4 \
                 WHERE port = $1 AND agent IS NULL",
                &[&i32::from(port), &self.agent, &self.ask.service, &self.now],
            )
            .await
            .map_err(down)?;
        if n == 1 {
            Ok(())
        } else {
            Err(down_text(format!("port {port} was taken meanwhile")))
        }
    }

    /// The least recently freed free port not known to be taken here.
    async fn fresh(&self) -> Result<u16, PlaceError> {
        let row = self
            .tx
            .query_opt(
                "SELECT port FROM jumpgate_ports WHERE agent IS NULL AND NOT (port = ANY($1)) \
                 ORDER BY freed_at, port LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[&self.taken_list],
            )
            .await
            .map_err(down)?;
        let Some(row) = row else {
            let in_use: i64 = self
                .tx
                .query_one(
                    "SELECT count(*) FROM jumpgate_ports WHERE agent IS NOT NULL",
                    &[],
                )
                .await
                .map_err(down)?
                .get(0);
            return Err(AllocError::Exhausted {
                lo: self.range.lo(),
                hi: self.range.hi(),
                in_use: usize::try_from(in_use).unwrap_or(0),
            }
            .into());
        };
        let port = port_of(row.get(0));
        self.take(port).await?;
        Ok(port)
    }
}

/// Deletes leases whose agent has no live session anywhere and was last seen `ttl_secs` ago,
/// oldest first, and forgets their names' holders when they have no lease left; inside `tx`.
async fn expire_in(
    tx: &Transaction<'_>,
    now: u64,
    ttl_secs: i64,
) -> Result<Vec<(LeaseKey, u16)>, StoreError> {
    // `last_seen <= $1 - $2` (not `last_seen + $2 <= $1`) so the index on last_seen answers
    // "nothing is due" without reading every lease: this runs before every placement.
    let rows = tx
        .query(
            concat!(
                "WITH due AS (SELECT port, agent, service, last_seen FROM jumpgate_ports p \
                 WHERE agent IS NOT NULL AND last_seen <= $1::bigint - $2::bigint AND NOT ",
                live!("$1"),
                " FOR UPDATE SKIP LOCKED), \
                 freed AS (UPDATE jumpgate_ports p SET agent = NULL, service = NULL, \
                 last_seen = 0, freed_at = GREATEST(due.last_seen, 1) FROM due \
                 WHERE p.port = due.port RETURNING due.agent, due.service, due.port, due.last_seen) \
                 SELECT agent, service, port FROM freed ORDER BY last_seen, agent, service"
            ),
            &[&secs(now), &ttl_secs],
        )
        .await
        .map_err(down)?;
    let expired: Vec<(LeaseKey, u16)> = rows
        .iter()
        .map(|r| {
            (
                LeaseKey::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                port_of(r.get(2)),
            )
        })
        .collect();
    if !expired.is_empty() {
        let agents: Vec<&str> = expired.iter().map(|(k, _)| k.agent.as_str()).collect();
        tx.execute(
            "DELETE FROM jumpgate_holders h WHERE h.agent = ANY($1) \
             AND NOT EXISTS (SELECT 1 FROM jumpgate_ports p WHERE p.agent = h.agent)",
            &[&agents],
        )
        .await
        .map_err(down)?;
    }
    Ok(expired)
}

/// The identity holding `agent`'s name (it has leases or a live session), as `client` sees it.
async fn holder_in(
    client: &impl GenericClient,
    agent: &str,
    now: u64,
) -> Result<Option<String>, StoreError> {
    Ok(client
        .query_opt(
            concat!(
                "SELECT identity FROM jumpgate_holders h WHERE agent = $1 AND ",
                holds!("$2")
            ),
            &[&agent, &secs(now)],
        )
        .await
        .map_err(down)?
        .map(|r| r.get(0)))
}

/// `agent`'s leased ports by service, as `client` sees it.
async fn ports_in(
    client: &impl GenericClient,
    agent: &str,
) -> Result<Vec<(String, u16)>, StoreError> {
    Ok(client
        .query(
            "SELECT service, port FROM jumpgate_ports WHERE agent = $1 ORDER BY service",
            &[&agent],
        )
        .await
        .map_err(down)?
        .iter()
        .map(|r| (r.get(0), port_of(r.get(1))))
        .collect())
}

/// How many names `identity` holds (with leases or a live session) and how many leases they
/// have, as `client` sees it (inside a placement's transaction, or on its own).
async fn holdings_in(
    client: &impl GenericClient,
    identity: &str,
    now: u64,
) -> Result<(usize, usize), StoreError> {
    let row = client
        .query_one(
            concat!(
                "SELECT (SELECT count(*) FROM jumpgate_holders h WHERE h.identity = $1 AND ",
                holds!("$2"),
                "), (SELECT count(*) FROM jumpgate_ports p \
                 JOIN jumpgate_holders h ON h.agent = p.agent WHERE h.identity = $1)"
            ),
            &[&identity, &secs(now)],
        )
        .await
        .map_err(down)?;
    let count = |i| usize::try_from(row.get::<_, i64>(i)).unwrap_or(0);
    Ok((count(0), count(1)))
}
