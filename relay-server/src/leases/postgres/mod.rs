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
//!
//! One job a file: [`url_tls`] (what `lease_store_url` may say, TLS or not), [`pool`] (the
//! connections), [`schema`] (tables and migrations), [`placement`] (placing, releasing and
//! expiring leases), [`reads`] (what the relay and operators ask), [`fleet`] (the member list:
//! heartbeats, sessions, leaving). This file holds what they share: the timings, the lock keys,
//! the SQL conditions that decide whether a relay is alive, and the one way to run statements
//! and transactions.

mod fleet;
mod placement;
mod pool;
mod reads;
mod schema;
mod url_tls;

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool, Transaction};
use jumpgate_lease::PortRange;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::StoreError;

pub use placement::KnownPorts;
pub use schema::SCHEMA;
pub use url_tls::{PgSettings, StoreTls, PASSWORD_ENV};

/// How often a relay heartbeats and refreshes the leases of the agents it holds sessions with.
pub(super) const HEARTBEAT_PERIOD: Duration = Duration::from_secs(5);

/// A relay whose heartbeat is older than this is gone: its sessions stop keeping leases alive
/// and it leaves the member list. Every SQL condition on a relay's heartbeat is formatted from
/// it ([`relay_alive`]).
const RELAY_GONE_AFTER_SECS: i64 = 30;

/// Rows of relays gone this long are deleted, with their session rows.
const FORGET_RELAY_AFTER_SECS: i64 = 3600;

/// Longest one store operation may take before the caller is told the store is unavailable.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// First key of the two-key advisory locks taken per agent name during placement and release.
const AGENT_LOCK_CLASS: i32 = 0x6a67;
/// The advisory lock class serialising placements under one identity (for its caps); always
/// taken after the agent's lock, never before, so the two cannot deadlock.
const IDENTITY_LOCK_CLASS: i32 = 0x6a68;

/// Takes the two-key advisory lock (`$1` the class, `$2` a name hashed) until the transaction
/// ends.
const LOCK_NAME: &str = "SELECT pg_advisory_xact_lock($1, hashtext($2))";

/// Frees a port row in an `UPDATE jumpgate_ports p SET ...`: no holder, and the time it was
/// freed (`FREED_AT`, at least 1 so a freed row sorts after never-used ones) for least recently
/// freed first.
macro_rules! free_row {
    ($freed_at:literal) => {
        concat!(
            "agent = NULL, service = NULL, last_seen = 0, freed_at = GREATEST(",
            $freed_at,
            ", 1)"
        )
    };
}
use free_row;

/// Refreshes the leases of every agent holding a session with relay `$1` to time `$2`.
const REFRESH_RELAYS_LEASES: &str = "UPDATE jumpgate_ports SET last_seen = $2 WHERE agent IN \
     (SELECT agent FROM jumpgate_sessions WHERE relay = $1)";

/// Whether the relay row named `relay` heartbeat recently enough at time `now` (an SQL
/// parameter such as `$1`) to count as alive.
fn relay_alive(relay: &str, now: &str) -> String {
    format!("{relay}.heartbeat_at > {now}::bigint - {RELAY_GONE_AFTER_SECS}")
}

/// Whether a lease's agent holds a live session on any relay: the SQL condition, for a row of
/// `jumpgate_ports` named `p`, at time `now` (an SQL parameter).
fn live(now: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM jumpgate_sessions s JOIN jumpgate_relays r ON r.id = s.relay \
         WHERE s.agent = p.agent AND {})",
        relay_alive("r", now)
    )
}

/// Whether a holder row (named `h`) still holds its name: the name has a lease, or a session on
/// a live relay (a `--no-port` agent). A row for neither is a leftover (its relay died, or an
/// older relay kept it) and counts for nothing; maintenance deletes it. At time `now` (an SQL
/// parameter).
fn holds(now: &str) -> String {
    format!(
        "(EXISTS (SELECT 1 FROM jumpgate_ports hp WHERE hp.agent = h.agent) OR \
         EXISTS (SELECT 1 FROM jumpgate_sessions hs JOIN jumpgate_relays hr ON hr.id = hs.relay \
         WHERE hs.agent = h.agent AND {}))",
        relay_alive("hr", now)
    )
}

/// The database store.
pub(super) struct PgStore {
    pool: Pool,
    range: PortRange,
    ttl_secs: i64,
    /// Where the store is, for messages.
    target: Arc<str>,
}

impl PgStore {
    /// Runs `body` in a transaction of its own, under the advisory lock on `agent`'s name when
    /// one is given, and commits what it did if it succeeds, all within [`OP_TIMEOUT`]. An
    /// error (the database's, or the body's own) rolls everything back.
    async fn in_tx<T, E: From<StoreError>>(
        &self,
        agent: Option<&str>,
        body: impl AsyncFnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(down)?;
            if let Some(agent) = agent {
                tx.run(LOCK_NAME, &[&AGENT_LOCK_CLASS, &agent]).await?;
            }
            let out = body(&tx).await?;
            tx.commit().await.map_err(down)?;
            Ok(out)
        })
        .await
    }
}

/// Statements on a pooled connection or in a transaction, failing as
/// [`StoreError::Unavailable`] with the database's reason.
trait Sql: GenericClient {
    /// Executes one statement; the rows it changed.
    async fn run(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        self.execute(sql, params).await.map_err(down)
    }

    /// The rows a query returns.
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.query(sql, params).await.map_err(down)
    }

    /// The one row a query returns.
    async fn row(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, StoreError> {
        self.query_one(sql, params).await.map_err(down)
    }

    /// The row a query returns, if any.
    async fn row_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        self.query_opt(sql, params).await.map_err(down)
    }

    /// Several statements without parameters.
    async fn batch(&self, sql: &str) -> Result<(), StoreError> {
        self.batch_execute(sql).await.map_err(down)
    }
}

impl<C: GenericClient> Sql for C {}

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

/// The store failed (a database error and its causes).
fn down(e: impl std::error::Error + 'static) -> StoreError {
    StoreError::Unavailable(chain(&e))
}

/// The store failed, for a reason of ours.
fn down_text(e: impl Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The error of an operation that took longer than [`OP_TIMEOUT`].
fn too_slow() -> StoreError {
    StoreError::Unavailable(format!("no answer within {OP_TIMEOUT:?}"))
}

/// Runs `f` with a deadline, so an unreachable database becomes an error, not a hang.
async fn timed<T, E: From<StoreError>>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    tokio::time::timeout(OP_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(too_slow().into()))
}

/// Converts a port read from the database.
fn port_of(v: i32) -> u16 {
    u16::try_from(v).unwrap_or(0)
}

/// Converts a time read from the database.
fn secs_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Converts a count read from the database.
fn count_of(v: i64) -> usize {
    usize::try_from(v).unwrap_or(0)
}

/// A time for the database (Unix seconds fit comfortably).
fn secs(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
