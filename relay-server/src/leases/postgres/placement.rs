//! Leases change here: a placement (expiry first, then [`jumpgate_lease::LeaseTable`]'s
//! statements for each service, inside one transaction under the agent's lock), the end of a
//! session, a release, and expiry.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::Transaction;
use jumpgate_lease::{AllocError, Attempt, Grant, GrantKind, LeaseKey, PortRange, ServiceAsk};

use super::reads::{holder_in, holdings_in, live_elsewhere, ports_in};
use super::{
    count_of, down, down_text, free_row, holds, live, port_of, secs, too_slow, PgStore, Sql,
    AGENT_LOCK_CLASS, IDENTITY_LOCK_CLASS, LOCK_NAME, OP_TIMEOUT,
};
use crate::leases::{check_caps, Claim, PlaceError, StoreError};

/// What the relay knows about ports going into an attempt.
#[derive(Clone, Copy)]
pub struct KnownPorts<'a> {
    /// Ports this relay cannot bind (other processes, or placements in progress here).
    pub taken: &'a HashSet<u16>,
    /// Ports this placement has bound already.
    pub bound: &'a HashSet<u16>,
}

impl PgStore {
    /// Deletes leases whose agent has no live session anywhere and was last seen a TTL ago
    /// (see [`expire_in`]), in a transaction of its own.
    pub(super) async fn expire(&self, now: u64) -> Result<Vec<(LeaseKey, u16)>, StoreError> {
        self.in_tx(None, async |tx| expire_in(tx, now, self.ttl_secs).await)
            .await
    }

    /// One placement attempt (see [`crate::leases::LeaseStore::place`]): expires due leases,
    /// then places, in one transaction. Granted ports not bound yet are bound through `bind`
    /// while the transaction holds their rows, so a new agent needs one transaction, not two;
    /// the placement is kept only if every granted port is bound. Expiry is kept whatever the
    /// placement decides, as in the file store (a savepoint separates the two when something
    /// expired).
    pub(in crate::leases) async fn attempt(
        &self,
        relay: &str,
        claim: Claim<'_>,
        now: u64,
        ports: KnownPorts<'_>,
        bind: &mut impl FnMut(u16) -> bool,
    ) -> (Result<Attempt, PlaceError>, Vec<(LeaseKey, u16)>) {
        tokio::time::timeout(OP_TIMEOUT, self.try_place(relay, claim, now, ports, bind))
            .await
            .unwrap_or_else(|_| (Err(too_slow().into()), Vec::new()))
    }

    /// [`Self::attempt`] without its deadline. The one transaction not run by
    /// [`Self::in_tx`]: what it keeps depends on what the placement decided.
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
            tx.run(LOCK_NAME, &[&AGENT_LOCK_CLASS, &claim.agent])
                .await?;
            let expired = expire_in(&tx, now, self.ttl_secs).await?;
            if !expired.is_empty() {
                tx.batch("SAVEPOINT jumpgate_placement").await?;
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
        tx: &Transaction<'_>,
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
        let services: Vec<&str> = asks.iter().map(|a| a.service.as_str()).collect();
        // A live session of the name on another relay may still serve services this hello does
        // not list, on ports that relay keeps listening on: their leases stay, and count.
        let elsewhere = live_elsewhere(tx, agent, relay, now).await?;
        let kept = if elsewhere {
            current
                .keys()
                .filter(|s| !services.contains(&s.as_str()))
                .count()
        } else {
            0
        };
        if let Some(caps) = caps {
            // Placements of one identity's names are serialised, so two relays cannot both
            // admit its last allowed name.
            tx.run(LOCK_NAME, &[&IDENTITY_LOCK_CLASS, &identity])
                .await?;
            let held = holdings_in(tx, identity, now).await?;
            check_caps(
                caps,
                held,
                current.len() - kept,
                holder.is_none(),
                asks.len(),
            )?;
        }
        // Otherwise the name's services are the ones this placement asks for: the others'
        // leases end here, as in the file store (`LeaseTable::retire_unasked`).
        if !elsewhere {
            let retired = tx
                .rows(
                    concat!(
                        "WITH gone AS (SELECT port, service FROM jumpgate_ports \
                         WHERE agent = $1 AND NOT (service = ANY($3)) FOR UPDATE) \
                         UPDATE jumpgate_ports p SET ",
                        free_row!("$2::bigint"),
                        " FROM gone WHERE p.port = gone.port RETURNING gone.service"
                    ),
                    &[&agent, &secs(now), &services],
                )
                .await?;
            for row in &retired {
                current.remove(row.get::<_, &str>(0));
            }
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
        tx.run(
            "INSERT INTO jumpgate_holders (agent, identity) VALUES ($1, $2) \
             ON CONFLICT (agent) DO UPDATE SET identity = EXCLUDED.identity",
            &[&agent, &identity],
        )
        .await?;
        tx.run(
            "INSERT INTO jumpgate_sessions (agent, relay) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&agent, &relay],
        )
        .await?;
        Ok(Attempt::Committed(grants))
    }

    /// This relay's session with `agent` ended: its leases age from `now` unless another relay
    /// still holds a session.
    pub(in crate::leases) async fn deactivate(
        &self,
        relay: &str,
        agent: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        // Under the name's lock (serialised with placements of the name), so a session placed
        // on another relay meanwhile is seen before the holder is dropped.
        self.in_tx(Some(agent), async |tx| {
            tx.run(
                "DELETE FROM jumpgate_sessions WHERE agent = $1 AND relay = $2",
                &[&agent, &relay],
            )
            .await?;
            tx.run(
                "UPDATE jumpgate_ports SET last_seen = $2 WHERE agent = $1",
                &[&agent, &secs(now)],
            )
            .await?;
            // A name without leases and without a session anywhere is no longer held (a
            // `--no-port` agent that left), as in the file store.
            tx.run(
                &format!(
                    "DELETE FROM jumpgate_holders h WHERE h.agent = $1 AND NOT {}",
                    holds("$2")
                ),
                &[&agent, &secs(now)],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// Drops all of `agent`'s leases, its holder and its session rows, fleet-wide.
    pub(in crate::leases) async fn release(
        &self,
        agent: &str,
        now: u64,
    ) -> Result<Vec<u16>, StoreError> {
        self.in_tx(Some(agent), async |tx| {
            let rows = tx
                .rows(
                    concat!(
                        "WITH gone AS (SELECT port, service FROM jumpgate_ports WHERE agent = $1 FOR UPDATE) \
                         UPDATE jumpgate_ports p SET ",
                        free_row!("$2::bigint"),
                        " FROM gone WHERE p.port = gone.port RETURNING gone.service, gone.port"
                    ),
                    &[&agent, &secs(now)],
                )
                .await?;
            let mut freed: Vec<(String, u16)> = rows
                .iter()
                .map(|r| (r.get::<_, String>(0), port_of(r.get(1))))
                .collect();
            freed.sort();
            tx.run("DELETE FROM jumpgate_holders WHERE agent = $1", &[&agent])
                .await?;
            tx.run("DELETE FROM jumpgate_sessions WHERE agent = $1", &[&agent])
                .await?;
            Ok(freed.into_iter().map(|(_, p)| p).collect())
        })
        .await
    }
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
                .run(
                    "UPDATE jumpgate_ports SET last_seen = $2 WHERE port = $1",
                    &[&i32::from(port), &self.now],
                )
                .await?;
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
            .row_opt(
                "SELECT agent, service FROM jumpgate_ports WHERE port = $1 FOR UPDATE",
                &[&i32::from(want)],
            )
            .await?;
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
            .run(
                concat!(
                    "UPDATE jumpgate_ports SET ",
                    free_row!("$2::bigint"),
                    " WHERE port = $1"
                ),
                &[&i32::from(port), &self.now],
            )
            .await?;
        Ok(())
    }

    async fn take(&self, port: u16) -> Result<(), StoreError> {
        let n = self
            .tx
            .run(
                "UPDATE jumpgate_ports SET agent = $2, service = $3, last_seen = $4 \
                 WHERE port = $1 AND agent IS NULL",
                &[&i32::from(port), &self.agent, &self.ask.service, &self.now],
            )
            .await?;
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
            .row_opt(
                "SELECT port FROM jumpgate_ports WHERE agent IS NULL AND NOT (port = ANY($1)) \
                 ORDER BY freed_at, port LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[&self.taken_list],
            )
            .await?;
        let Some(row) = row else {
            let in_use: i64 = self
                .tx
                .row(
                    "SELECT count(*) FROM jumpgate_ports WHERE agent IS NOT NULL",
                    &[],
                )
                .await?
                .get(0);
            return Err(AllocError::Exhausted {
                lo: self.range.lo(),
                hi: self.range.hi(),
                in_use: count_of(in_use),
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
        .rows(
            &format!(
                "WITH due AS (SELECT port, agent, service, last_seen FROM jumpgate_ports p \
                 WHERE agent IS NOT NULL AND last_seen <= $1::bigint - $2::bigint AND NOT {} \
                 FOR UPDATE SKIP LOCKED), \
                 freed AS (UPDATE jumpgate_ports p SET {} FROM due \
                 WHERE p.port = due.port RETURNING due.agent, due.service, due.port, due.last_seen) \
                 SELECT agent, service, port FROM freed ORDER BY last_seen, agent, service",
                live("$1"),
                free_row!("due.last_seen"),
            ),
            &[&secs(now), &ttl_secs],
        )
        .await?;
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
        tx.run(
            "DELETE FROM jumpgate_holders h WHERE h.agent = ANY($1) \
             AND NOT EXISTS (SELECT 1 FROM jumpgate_ports p WHERE p.agent = h.agent)",
            &[&agents],
        )
        .await?;
    }
    Ok(expired)
}
