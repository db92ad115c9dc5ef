//! What the relay and its operators ask the store, changing nothing: who holds a name, its
//! ports, every lease, usage, and what each identity holds.

use deadpool_postgres::GenericClient;
use jumpgate_lease::LeaseKey;

use super::{count_of, holds, live, port_of, relay_alive, secs, secs_of, timed, PgStore, Sql};
use crate::leases::{LeaseView, StoreError};

impl PgStore {
    /// The identity holding `agent`'s name, if any.
    pub(in crate::leases) async fn holder(
        &self,
        agent: &str,
        now: u64,
    ) -> Result<Option<String>, StoreError> {
        timed(async { holder_in(&self.client().await?, agent, now).await }).await
    }

    /// Whether `agent` has a lease or a holder row (even a leftover one), for the operator's
    /// release.
    pub(in crate::leases) async fn knows_agent(&self, agent: &str) -> Result<bool, StoreError> {
        timed(async {
            let row = self
                .client()
                .await?
                .row(
                    "SELECT EXISTS (SELECT 1 FROM jumpgate_ports WHERE agent = $1) \
                     OR EXISTS (SELECT 1 FROM jumpgate_holders WHERE agent = $1)",
                    &[&agent],
                )
                .await?;
            Ok(row.get(0))
        })
        .await
    }

    /// `agent`'s leased ports by service.
    pub(in crate::leases) async fn ports_of(
        &self,
        agent: &str,
    ) -> Result<Vec<(String, u16)>, StoreError> {
        timed(async { ports_in(&self.client().await?, agent).await }).await
    }

    /// Both of the above on one connection, the two queries pipelined.
    pub(in crate::leases) async fn name_state(
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

    /// Every lease, with when it expires unless its agent is live somewhere.
    pub(in crate::leases) async fn views(&self, now: u64) -> Result<Vec<LeaseView>, StoreError> {
        let ttl = secs_of(self.ttl_secs);
        timed(async {
            Ok(self
                .client()
                .await?
                .rows(
                    &format!(
                        "SELECT agent, service, port, last_seen, {} \
                         FROM jumpgate_ports p WHERE agent IS NOT NULL ORDER BY agent, service",
                        live("$1")
                    ),
                    &[&secs(now)],
                )
                .await?
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

    /// `(leased, free)` ports of the range.
    pub(in crate::leases) async fn usage(&self) -> Result<(usize, usize), StoreError> {
        timed(async {
            let row = self
                .client()
                .await?
                .row(
                    "SELECT count(*) FILTER (WHERE agent IS NOT NULL), \
                     count(*) FILTER (WHERE agent IS NULL) FROM jumpgate_ports",
                    &[],
                )
                .await?;
            Ok((count_of(row.get(0)), count_of(row.get(1))))
        })
        .await
    }

    /// `(names, leases)` `identity` holds.
    pub(in crate::leases) async fn holdings(
        &self,
        identity: &str,
        now: u64,
    ) -> Result<(usize, usize), StoreError> {
        timed(async { holdings_in(&self.client().await?, identity, now).await }).await
    }

    /// `(identity, names, leases)` for every identity holding a name, by identity.
    pub(in crate::leases) async fn holdings_by_identity(
        &self,
        now: u64,
    ) -> Result<Vec<(String, usize, usize)>, StoreError> {
        timed(async {
            let rows = self
                .client()
                .await?
                .rows(
                    &format!(
                        "SELECT h.identity, count(*), coalesce(sum((SELECT count(*) FROM jumpgate_ports p \
                         WHERE p.agent = h.agent)), 0)::bigint FROM jumpgate_holders h WHERE {} \
                         GROUP BY h.identity ORDER BY h.identity",
                        holds("$1")
                    ),
                    &[&secs(now)],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), count_of(r.get(1)), count_of(r.get(2))))
                .collect())
        })
        .await
    }
}

/// The identity holding `agent`'s name (it has leases or a live session), as `client` sees it.
pub(super) async fn holder_in(
    client: &impl GenericClient,
    agent: &str,
    now: u64,
) -> Result<Option<String>, StoreError> {
    Ok(client
        .row_opt(
            &format!(
                "SELECT identity FROM jumpgate_holders h WHERE agent = $1 AND {}",
                holds("$2")
            ),
            &[&agent, &secs(now)],
        )
        .await?
        .map(|r| r.get(0)))
}

/// `agent`'s leased ports by service, as `client` sees it.
pub(super) async fn ports_in(
    client: &impl GenericClient,
    agent: &str,
) -> Result<Vec<(String, u16)>, StoreError> {
    Ok(client
        .rows(
            "SELECT service, port FROM jumpgate_ports WHERE agent = $1 ORDER BY service",
            &[&agent],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), port_of(r.get(1))))
        .collect())
}

/// Whether `agent` holds a session on a live relay other than `relay`, as `client` sees it:
/// that relay may still listen on ports of services this relay's hello does not list.
pub(super) async fn live_elsewhere(
    client: &impl GenericClient,
    agent: &str,
    relay: &str,
    now: u64,
) -> Result<bool, StoreError> {
    let row = client
        .row(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM jumpgate_sessions s JOIN jumpgate_relays r \
                 ON r.id = s.relay WHERE s.agent = $1 AND s.relay <> $2 AND {})",
                relay_alive("r", "$3")
            ),
            &[&agent, &relay, &secs(now)],
        )
        .await?;
    Ok(row.get(0))
}

/// How many names `identity` holds (with leases or a live session) and how many leases they
/// have, as `client` sees it (inside a placement's transaction, or on its own).
pub(super) async fn holdings_in(
    client: &impl GenericClient,
    identity: &str,
    now: u64,
) -> Result<(usize, usize), StoreError> {
    let row = client
        .row(
            &format!(
                "SELECT (SELECT count(*) FROM jumpgate_holders h WHERE h.identity = $1 AND {}), \
                 (SELECT count(*) FROM jumpgate_ports p \
                 JOIN jumpgate_holders h ON h.agent = p.agent WHERE h.identity = $1)",
                holds("$2")
            ),
            &[&identity, &secs(now)],
        )
        .await?;
    Ok((count_of(row.get(0)), count_of(row.get(1))))
}
