//! Converting the table to and from its [`LeaseSnapshot`]: what survives a relay restart
//! (leases, the free queue's order, holders) and what does not (live sessions).

use super::{Lease, LeaseKey, LeaseTable};
use crate::range::PortRange;
use crate::snapshot::{LeaseRecord, LeaseSnapshot, RestoreError};

impl LeaseTable {
    /// Rebuilds a table from a snapshot. Leases outside `range` (the range was changed) are dropped
    /// and returned so the caller can report them; conflicting leases are an error, since they
    /// mean the file was edited or corrupted.
    pub fn restore(
        range: PortRange,
        ttl_secs: u64,
        snapshot: LeaseSnapshot,
    ) -> Result<(Self, Vec<LeaseRecord>), RestoreError> {
        let mut table = Self::new(range, ttl_secs);
        let mut dropped = Vec::new();
        for rec in snapshot.leases {
            if !range.contains(rec.port) {
                dropped.push(rec);
                continue;
            }
            let key = LeaseKey::new(rec.agent.clone(), rec.service.clone());
            if table.owners.contains_key(&rec.port) || table.leases.contains_key(&key) {
                return Err(RestoreError::Conflict {
                    agent: rec.agent,
                    service: rec.service,
                    port: rec.port,
                });
            }
            table.free.remove(&(0, rec.port));
            table.owners.insert(rec.port, key.clone());
            table.note_inactive(rec.last_seen);
            table.leases.insert(
                key,
                Lease {
                    port: rec.port,
                    last_seen: rec.last_seen,
                    active: false,
                },
            );
        }
        for (port, at) in snapshot.freed {
            if range.contains(port) && !table.owners.contains_key(&port) && at > 0 {
                table.mark_free(port, at);
            }
        }
        for (agent, identity) in snapshot.holders {
            table.set_holder(&agent, &identity);
        }
        Ok((table, dropped))
    }

    /// The state to persist. Active leases are recorded as seen at `now`. Holders are sorted by
    /// name (they live in a hash map), so equal tables give equal snapshots and the same file.
    pub fn snapshot(&self, now: u64) -> LeaseSnapshot {
        let mut holders: Vec<(String, String)> = self
            .holders
            .iter()
            // A name held only by its live session is not kept: after a restart no session is.
            .filter(|(agent, _)| self.has_leases(agent))
            .map(|(agent, identity)| (agent.clone(), identity.clone()))
            .collect();
        holders.sort_unstable();
        LeaseSnapshot {
            leases: self
                .leases
                .iter()
                .map(|(k, l)| LeaseRecord {
                    agent: k.agent.clone(),
                    service: k.service.clone(),
                    port: l.port,
                    last_seen: if l.active { now } else { l.last_seen },
                })
                .collect(),
            freed: self
                .free
                .iter()
                .filter(|(at, _)| *at > 0)
                .map(|&(at, port)| (port, at))
                .collect(),
            holders,
        }
    }
}
