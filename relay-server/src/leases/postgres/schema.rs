//! The tables, version by version, and the migration every relay runs as it starts.

use jumpgate_lease::PortRange;

use super::{PgStore, Sql};
use crate::leases::StoreError;

/// The advisory lock (single 64-bit key) that serialises schema migrations across the fleet:
/// "jumpgate" in ASCII.
const MIGRATION_LOCK: i64 = 0x6a75_6d70_6761_7465;

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

/// Why a migration did not commit.
enum Refused {
    /// The database failed.
    Store(StoreError),
    /// The fleet uses this other port range.
    OtherRange(String),
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl PgStore {
    /// Applies missing schema versions and fills the port rows; `Err(range)` if the fleet uses
    /// another port range (and then commits nothing).
    pub(super) async fn migrate(&self, range: PortRange) -> Result<Result<(), String>, StoreError> {
        let migrated = self
            .in_tx(None, async |tx| {
                tx.run("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                    .await?;
                tx.batch(
                    "CREATE TABLE IF NOT EXISTS jumpgate_schema (
                         version integer PRIMARY KEY,
                         applied_at timestamptz NOT NULL DEFAULT now()
                     )",
                )
                .await?;
                let current: i32 = tx
                    .row("SELECT coalesce(max(version), 0) FROM jumpgate_schema", &[])
                    .await?
                    .get(0);
                if usize::try_from(current).unwrap_or(usize::MAX) > SCHEMA.len() {
                    return Err(StoreError::Unavailable(format!(
                        "the store's schema is version {current}, newer than this relay's {}; upgrade this relay",
                        SCHEMA.len()
                    ))
                    .into());
                }
                for (version, sql) in SCHEMA.iter().filter(|(v, _)| *v > current) {
                    tx.batch(sql).await?;
                    tx.run(
                        "INSERT INTO jumpgate_schema (version) VALUES ($1)",
                        &[version],
                    )
                    .await?;
                    tracing::info!(version, "lease store schema migrated");
                }
                let fleet: Option<String> = tx
                    .row_opt(
                        "SELECT value FROM jumpgate_settings WHERE key = 'port_range'",
                        &[],
                    )
                    .await?
                    .map(|r| r.get(0));
                match fleet {
                    Some(fleet) if fleet != range.to_string() => {
                        return Err(Refused::OtherRange(fleet))
                    }
                    Some(_) => {}
                    None => {
                        tx.run(
                            "INSERT INTO jumpgate_settings (key, value) VALUES ('port_range', $1)",
                            &[&range.to_string()],
                        )
                        .await?;
                        tx.run(
                            "INSERT INTO jumpgate_ports (port) SELECT generate_series($1::int, $2::int) \
                             ON CONFLICT DO NOTHING",
                            &[&i32::from(range.lo()), &i32::from(range.hi())],
                        )
                        .await?;
                    }
                }
                Ok(())
            })
            .await;
        match migrated {
            Ok(()) => Ok(Ok(())),
            Err(Refused::OtherRange(fleet)) => Ok(Err(fleet)),
            Err(Refused::Store(e)) => Err(e),
        }
    }
}
