//! The lease table itself: its state and the questions a caller may ask of it. What changes it
//! lives in the child modules, one way of changing it each: [`placement`] grants ports,
//! [`expiry`] ages and drops leases, [`holders`] records which identity holds a name,
//! [`persist`] converts to and from a [`LeaseSnapshot`](crate::LeaseSnapshot), and [`writes`] and
//! [`undo`] are the journaled primitive changes an attempt can roll back.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::range::PortRange;
use undo::UndoLog;

mod expiry;
mod holders;
mod persist;
mod placement;
mod undo;
mod writes;

/// Who a lease belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseKey {
    /// Agent name.
    pub agent: String,
    /// Service name within the agent.
    pub service: String,
}

impl LeaseKey {
    /// Key for `agent`'s `service`.
    pub fn new(agent: impl Into<String>, service: impl Into<String>) -> Self {
        Self {
            agent: agent.into(),
            service: service.into(),
        }
    }
}

/// One service's lease: kept private, so every change goes through the table's methods and
/// stays in step with `owners` and `free`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    port: u16,
    /// Unix seconds when the agent was last connected; meaningless while `active`.
    last_seen: u64,
    /// A session currently holds the port.
    active: bool,
}

/// The relay's port bookkeeping. See the crate documentation.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    range: PortRange,
    ttl_secs: u64,
    leases: BTreeMap<LeaseKey, Lease>,
    owners: HashMap<u16, LeaseKey>,
    /// Free ports ordered by when they were freed (0 = never leased), then by number.
    free: BTreeSet<(u64, u16)>,
    freed_at: HashMap<u16, u64>,
    /// The identity (credential) that holds each agent name with leases or a live session; only
    /// that identity may renew or take over the name. Forgotten when the name has neither.
    holders: HashMap<String, String>,
    /// Names with a live session ([`LeaseTable::hold`] until [`LeaseTable::deactivate_agent`] or
    /// [`LeaseTable::release_agent`]): they keep their holder without leases (a `--no-port`
    /// agent) and count towards their identity's names. Not persisted: after a restart no
    /// session is live.
    live: HashSet<String>,
    /// No lease waiting for its agent expires before this (Unix seconds): a lower bound on
    /// `last_seen + ttl` of every inactive lease, lowered wherever a lease goes inactive and
    /// recomputed by [`LeaseTable::expire`], so that the expiry every table change begins with
    /// costs nothing until something can be due, instead of a walk over every lease per
    /// placement (a relay with thousands of agents places thousands of times in a cold start).
    next_due: u64,
    /// While an attempt runs: the state of everything it changed, as it was before each change.
    undo: Option<UndoLog>,
}

impl LeaseTable {
    /// An empty table over `range`; leases live `ttl_secs` after their agent was last seen.
    pub fn new(range: PortRange, ttl_secs: u64) -> Self {
        Self {
            range,
            ttl_secs,
            leases: BTreeMap::new(),
            owners: HashMap::new(),
            free: range.ports().map(|p| (0, p)).collect(),
            freed_at: HashMap::new(),
            holders: HashMap::new(),
            live: HashSet::new(),
            next_due: u64::MAX,
            undo: None,
        }
    }

    /// A lease now waits for its agent since `last_seen`: it may be due as early as then plus
    /// the TTL.
    fn note_inactive(&mut self, last_seen: u64) {
        self.next_due = self.next_due.min(last_seen.saturating_add(self.ttl_secs));
    }

    /// `agent`'s leases: service name and port.
    pub fn leases_of<'a>(&'a self, agent: &'a str) -> impl Iterator<Item = (&'a str, u16)> + 'a {
        self.leases
            .range(LeaseKey::new(agent, "")..)
            .take_while(move |(k, _)| k.agent == agent)
            .map(|(k, l)| (k.service.as_str(), l.port))
    }

    fn has_leases(&self, agent: &str) -> bool {
        self.leases
            .range(LeaseKey::new(agent, "")..)
            .next()
            .is_some_and(|(k, _)| k.agent == agent)
    }

    /// The configured range.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Ports currently leased (held by a session or waiting for their agent).
    pub fn in_use(&self) -> usize {
        self.owners.len()
    }

    /// Ports free to hand out.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// The port leased to `key`, if any.
    pub fn port_of(&self, key: &LeaseKey) -> Option<u16> {
        self.leases.get(key).map(|l| l.port)
    }

    /// Who holds `port`, if anyone.
    pub fn owner_of(&self, port: u16) -> Option<&LeaseKey> {
        self.owners.get(&port)
    }

    /// Every lease with its port, whether a session holds it, and when its agent was last seen.
    pub fn iter(&self) -> impl Iterator<Item = (&LeaseKey, u16, bool, u64)> {
        self.leases
            .iter()
            .map(|(k, l)| (k, l.port, l.active, l.last_seen))
    }

    /// When `key`'s lease expires (Unix seconds), or `None` if it is held by a session or absent.
    pub fn expires_at(&self, key: &LeaseKey) -> Option<u64> {
        let l = self.leases.get(key)?;
        (!l.active).then(|| l.last_seen.saturating_add(self.ttl_secs))
    }
}

#[cfg(test)]
mod tests;
