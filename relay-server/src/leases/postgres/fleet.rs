//! The fleet's member list in the database: each relay's heartbeat row, which agents hold
//! sessions on which relay, and leaving it on a clean stop.

use std::collections::HashMap;

use jumpgate_lease::LeaseKey;

use super::{
    holds, relay_alive, secs, timed, PgStore, Sql, AGENT_LOCK_CLASS, FORGET_RELAY_AFTER_SECS,
    REFRESH_RELAYS_LEASES, RELAY_GONE_AFTER_SECS,
};
use crate::leases::{Member, StoreError};

/// Prefix of a relay's `jumpgate_settings` row holding its WebSocket URL (`ws_public_url`),
/// followed by its id. A settings row rather than a column of `jumpgate_relays`: the schema stays
/// at its version, so relays of the previous release keep starting against the same database
/// during a rolling upgrade (they refuse a newer schema) and simply do not read it.
const WS_URL_KEY: &str = "'ws_url:'";

impl PgStore {
    /// Enters `me` into the member list, dropping the session rows a previous run of this relay
    /// left (it holds no session yet).
    pub(super) async fn register(&self, me: &Member, now: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .run("DELETE FROM jumpgate_sessions WHERE relay = $1", &[&me.id])
            .await?;
        // Written once per start: the URL changes only with the configuration.
        match &me.ws_url {
            Some(url) => {
                client
                    .run(
                        &format!(
                            "INSERT INTO jumpgate_settings (key, value) VALUES ({WS_URL_KEY} || $1, $2) \
                             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                        ),
                        &[&me.id, url],
                    )
                    .await?
            }
            None => {
                client
                    .run(
                        &format!("DELETE FROM jumpgate_settings WHERE key = {WS_URL_KEY} || $1"),
                        &[&me.id],
                    )
                    .await?
            }
        };
        heartbeat(&client, me, now).await
    }

    /// The live relays, by id.
    pub(in crate::leases) async fn members(&self, now: u64) -> Result<Vec<Member>, StoreError> {
        timed(async {
            Ok(self
                .client()
                .await?
                .rows(
                    &format!(
                        "SELECT r.id, r.agent_addr, r.public_host, s.value FROM jumpgate_relays r \
                         LEFT JOIN jumpgate_settings s ON s.key = {WS_URL_KEY} || r.id \
                         WHERE {} ORDER BY r.id",
                        relay_alive("r", "$1")
                    ),
                    &[&secs(now)],
                )
                .await?
                .iter()
                .map(|r| Member {
                    id: r.get(0),
                    agent_addr: r.get(1),
                    public_host: r.get(2),
                    ws_url: r.get(3),
                })
                .collect())
        })
        .await
    }

    /// Every agent with a session on a live relay, with those relays' ids.
    pub(in crate::leases) async fn sessions(
        &self,
        now: u64,
    ) -> Result<HashMap<String, Vec<String>>, StoreError> {
        timed(async {
            let mut by_agent: HashMap<String, Vec<String>> = HashMap::new();
            for row in self
                .client()
                .await?
                .rows(
                    &format!(
                        "SELECT s.agent, s.relay FROM jumpgate_sessions s \
                         JOIN jumpgate_relays r ON r.id = s.relay \
                         WHERE {} ORDER BY 1, 2",
                        relay_alive("r", "$1")
                    ),
                    &[&secs(now)],
                )
                .await?
            {
                by_agent.entry(row.get(0)).or_default().push(row.get(1));
            }
            Ok(by_agent)
        })
        .await
    }

    /// Maintenance: heartbeat, refresh the leases of this relay's agents, expire, forget relays
    /// long gone.
    pub(in crate::leases) async fn tick(
        &self,
        me: &Member,
        now: u64,
    ) -> Result<Vec<(LeaseKey, u16)>, StoreError> {
        timed(async {
            let client = self.client().await?;
            heartbeat(&client, me, now).await?;
            client
                .run(REFRESH_RELAYS_LEASES, &[&me.id, &secs(now)])
                .await?;
            client
                .run(
                    "WITH old AS (DELETE FROM jumpgate_relays WHERE heartbeat_at < $1 RETURNING id) \
                     DELETE FROM jumpgate_sessions WHERE relay IN (SELECT id FROM old)",
                    &[&(secs(now) - FORGET_RELAY_AFTER_SECS)],
                )
                .await?;
            // Holder rows that hold nothing (a `--no-port` agent whose relay died): they already
            // count for nothing; this keeps the table from growing. A name being placed right
            // now holds its lock and is left alone.
            client
                .run(
                    &format!(
                        "DELETE FROM jumpgate_holders h WHERE NOT {} \
                         AND pg_try_advisory_xact_lock($2, hashtext(h.agent))",
                        holds("$1")
                    ),
                    &[&secs(now), &AGENT_LOCK_CLASS],
                )
                .await?;
            drop(client);
            self.expire(now).await
        })
        .await
    }

    /// Leaves the fleet on a clean stop: this relay's agents' leases age from now, its session
    /// rows and its member row go.
    pub(in crate::leases) async fn leave(&self, relay: &str, now: u64) {
        let left = self
            .in_tx(None, async |tx| {
                tx.run(REFRESH_RELAYS_LEASES, &[&relay, &secs(now)]).await?;
                tx.run("DELETE FROM jumpgate_sessions WHERE relay = $1", &[&relay])
                    .await?;
                tx.run("DELETE FROM jumpgate_relays WHERE id = $1", &[&relay])
                    .await?;
                tx.run(
                    &format!("DELETE FROM jumpgate_settings WHERE key = {WS_URL_KEY} || $1"),
                    &[&relay],
                )
                .await?;
                Ok::<_, StoreError>(())
            })
            .await;
        if let Err(e) = left {
            tracing::warn!("could not leave the fleet cleanly: {e}; the other relays stop counting this one within {RELAY_GONE_AFTER_SECS}s");
        }
    }
}

/// Writes `me`'s member row with a heartbeat at `now`.
async fn heartbeat(client: &impl Sql, me: &Member, now: u64) -> Result<(), StoreError> {
    client
        .run(
            "INSERT INTO jumpgate_relays (id, agent_addr, public_host, heartbeat_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET \
             agent_addr = EXCLUDED.agent_addr, public_host = EXCLUDED.public_host, \
             heartbeat_at = EXCLUDED.heartbeat_at",
            &[&me.id, &me.agent_addr, &me.public_host, &secs(now)],
        )
        .await?;
    Ok(())
}
