//! Port leases: which public port belongs to which (agent, service), and for how long.
//!
//! A lease outlives the session that created it, so an agent that reconnects (network blip, agent
//! restart, relay restart with the table restored from a [`LeaseSnapshot`]) gets the same port back.
//! A lease expires a configurable time after its agent was last seen. Free ports are handed out
//! least-recently-freed first, so a port that just expired is the last one given to someone else
//! while its old user may still have it in an ssh config.
//!
//! The table decides; it does not bind. The caller answers a probe for each candidate port from
//! what it knows (bound by it, or known to be taken), and [`LeaseTable::try_acquire`] keeps its
//! changes only if the caller accepts the grants (it holds every granted port), undoing them
//! otherwise, so the caller can bind the ports it was granted without holding its lock and try
//! again. Nothing is copied: an attempt records what it changes in a small undo log. Only the relay keeps this table; the agent never sees it, which is why
//! it lives outside the wire protocol crate.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An inclusive range of public ports the relay may hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    lo: u16,
    hi: u16,
}

/// Why a port range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// Not of the form `LO-HI`.
    #[error("expected LO-HI with ports 1-65535, e.g. 10000-50000; got {0:?}")]
    Syntax(String),
    /// LO is greater than HI, or LO is 0.
    #[error("port range {lo}-{hi} is empty or starts at 0; LO must be 1 or more and at most HI")]
    Empty {
        /// First port.
        lo: u16,
        /// Last port.
        hi: u16,
    },
}

impl PortRange {
    /// A range from `lo` to `hi`, both included.
    pub fn new(lo: u16, hi: u16) -> Result<Self, PortRangeError> {
        if lo == 0 || lo > hi {
            return Err(PortRangeError::Empty { lo, hi });
        }
        Ok(Self { lo, hi })
    }

    /// First port.
    pub fn lo(&self) -> u16 {
        self.lo
    }

    /// Last port.
    pub fn hi(&self) -> u16 {
        self.hi
    }

    /// Whether `port` is inside.
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        usize::from(self.hi - self.lo) + 1
    }

    /// Always false: a range has at least one port. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Every port, in order.
    pub fn ports(&self) -> impl Iterator<Item = u16> {
        self.lo..=self.hi
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || PortRangeError::Syntax(s.to_string());
        let (lo, hi) = s.trim().split_once('-').ok_or_else(syntax)?;
        let lo = lo.trim().parse().map_err(|_| syntax())?;
        let hi = hi.trim().parse().map_err(|_| syntax())?;
        Self::new(lo, hi)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    port: u16,
    /// Unix seconds when the agent was last connected; meaningless while `active`.
    last_seen: u64,
    /// A session currently holds the port.
    active: bool,
}

/// One service's wish, as the relay passes it to [`LeaseTable::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAsk {
    /// Service name.
    pub service: String,
    /// Port it would like.
    pub preferred: Option<u16>,
    /// Fail rather than take another port.
    pub strict: bool,
}

/// How a port came to be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantKind {
    /// The service's existing lease.
    Renewed,
    /// The port the service asked for.
    Preferred,
    /// A port from the free pool.
    Fresh,
}

/// A port granted to one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Service name.
    pub service: String,
    /// The port.
    pub port: u16,
    /// How it was chosen.
    pub kind: GrantKind,
    /// Why the agent did not get the port it preferred or had, if it did not.
    pub note: Option<String>,
}

/// Why a set of services could not be given ports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// No free, bindable port is left.
    #[error("port range {lo}-{hi} exhausted ({in_use} in use)")]
    Exhausted {
        /// First port of the range.
        lo: u16,
        /// Last port of the range.
        hi: u16,
        /// Ports leased.
        in_use: usize,
    },
    /// A strict preferred port could not be granted.
    #[error("service {service:?} asked strictly for port {port}, which {why}")]
    PreferredUnavailable {
        /// Service name.
        service: String,
        /// The port.
        port: u16,
        /// Why not.
        why: String,
    },
}

/// A lease as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Agent name.
    pub agent: String,
    /// Service name.
    pub service: String,
    /// Leased port.
    pub port: u16,
    /// Unix seconds the agent was last connected.
    pub last_seen: u64,
}

/// Everything needed to rebuild a [`LeaseTable`] after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSnapshot {
    /// Live leases.
    pub leases: Vec<LeaseRecord>,
    /// Free ports that were once leased, with the Unix second they were freed: they keep their
    /// place at the back of the free queue across restarts.
    #[serde(default)]
    pub freed: Vec<(u16, u64)>,
    /// Who holds each agent name that has leases: `(agent, identity)`. Missing in files written
    /// before identities were recorded; such names go to the next identity allowed to claim them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<(String, String)>,
}

/// Why a snapshot could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// Two leases claim the same port, or one key appears twice.
    #[error("lease for {agent}/{service} on port {port} conflicts with another lease")]
    Conflict {
        /// Agent name.
        agent: String,
        /// Service name.
        service: String,
        /// Port.
        port: u16,
    },
}

/// The relay's port bookkeeping. See the module documentation.
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
    /// While an attempt runs: the state of everything it changed, as it was before each change.
    undo: Option<UndoLog>,
}

/// The prior state of what an attempt changed, in the order of the changes; undone in reverse.
#[derive(Debug, Clone, Default)]
struct UndoLog(Vec<Undo>);

#[derive(Debug, Clone)]
enum Undo {
    /// `leases[key]` was this.
    Lease(LeaseKey, Option<Lease>),
    /// The port's owner and the time it was freed were these (free iff no owner).
    Port(u16, Option<LeaseKey>, Option<u64>),
    /// `holders[agent]` was this.
    Holder(String, Option<String>),
}

/// What [`LeaseTable::try_acquire`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The caller accepted the grants; the table holds them.
    Committed(Vec<Grant>),
    /// The caller refused the grants (it does not hold every granted port yet); the table is as
    /// it was before the attempt.
    RolledBack(Vec<Grant>),
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
            undo: None,
        }
    }

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

    /// The identity that holds `agent`'s name (it has leases or a live session), if one was
    /// recorded.
    pub fn holder(&self, agent: &str) -> Option<&str> {
        self.holders.get(agent).map(String::as_str)
    }

    /// Records `identity` as the holder of `agent`'s leases; does nothing for a name without
    /// leases (a holder is never kept for nothing). What a restored table uses; a placement
    /// uses [`LeaseTable::hold`].
    pub fn set_holder(&mut self, agent: &str, identity: &str) {
        if self.has_leases(agent) {
            self.holders.insert(agent.to_string(), identity.to_string());
        }
    }

    /// A session of `identity` now holds `agent`'s name: it is live (so it keeps its holder and
    /// counts towards the identity's names even without a lease) until
    /// [`LeaseTable::deactivate_agent`] or [`LeaseTable::release_agent`].
    pub fn hold(&mut self, agent: &str, identity: &str) {
        self.live.insert(agent.to_string());
        self.holders.insert(agent.to_string(), identity.to_string());
    }

    /// How many names `identity` holds (with leases or a live session) and how many leases those
    /// names have, for caps on what one credential may hoard.
    pub fn holdings(&self, identity: &str) -> (usize, usize) {
        self.holders
            .iter()
            .filter(|(_, holder)| holder.as_str() == identity)
            .fold((0, 0), |(names, leases), (agent, _)| {
                (names + 1, leases + self.leases_of(agent).count())
            })
    }

    /// Names and leases held by every identity that holds any, for the relay's metrics.
    pub fn holdings_by_identity(&self) -> BTreeMap<String, (usize, usize)> {
        let mut by: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (agent, identity) in &self.holders {
            let held = by.entry(identity.clone()).or_default();
            held.0 += 1;
            held.1 += self.leases_of(agent).count();
        }
        by
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

    /// Grants ports to all of `agent`'s services, or none of them.
    ///
    /// `bindable` is asked before any port is promised. An existing lease is renewed; a preferred
    /// port is granted when it is in range, not leased to someone else and bindable; otherwise a
    /// free port is taken, least recently freed first. On error the table is unchanged.
    pub fn acquire(
        &mut self,
        agent: &str,
        asks: &[ServiceAsk],
        now: u64,
        bindable: &mut dyn FnMut(u16) -> bool,
    ) -> Result<Vec<Grant>, AllocError> {
        match self.try_acquire(agent, asks, now, bindable, &mut |_| true)? {
            Attempt::Committed(grants) | Attempt::RolledBack(grants) => Ok(grants),
        }
    }

    /// [`LeaseTable::acquire`], kept only if `accept` says yes to the grants; otherwise (and on
    /// error) the table is left exactly as it was. Every port `bindable` answered `true` for is
    /// granted, so a caller that answers `true` for ports it has not bound yet learns which ports
    /// to bind, refuses, binds them, and tries again, all without copying the table.
    pub fn try_acquire(
        &mut self,
        agent: &str,
        asks: &[ServiceAsk],
        now: u64,
        bindable: &mut dyn FnMut(u16) -> bool,
        accept: &mut dyn FnMut(&[Grant]) -> bool,
    ) -> Result<Attempt, AllocError> {
        self.undo = Some(UndoLog::default());
        self.retire_unasked(agent, asks, now);
        let grants = asks
            .iter()
            .map(|ask| self.acquire_one(agent, ask, now, bindable))
            .collect::<Result<Vec<_>, _>>();
        let log = self.undo.take().unwrap_or_default();
        match grants {
            Ok(grants) if accept(&grants) => Ok(Attempt::Committed(grants)),
            Ok(grants) => {
                self.roll_back(log);
                Ok(Attempt::RolledBack(grants))
            }
            Err(e) => {
                self.roll_back(log);
                Err(e)
            }
        }
    }

    /// Frees the leases of `agent`'s services that `asks` no longer lists: a name's services are
    /// the ones its latest placement asks for, so renaming services cannot pile up ports (each
    /// would otherwise wait out the TTL, uncounted by the credential's lease cap). Returns the
    /// freed ports.
    pub fn retire_unasked(&mut self, agent: &str, asks: &[ServiceAsk], now: u64) -> Vec<u16> {
        let dropped: Vec<LeaseKey> = self
            .leases_of(agent)
            .filter(|(service, _)| !asks.iter().any(|a| a.service == *service))
            .map(|(service, _)| LeaseKey::new(agent, service))
            .collect();
        dropped
            .iter()
            .filter_map(|key| self.remove_lease(key, now))
            .collect()
    }

    fn roll_back(&mut self, log: UndoLog) {
        for undo in log.0.into_iter().rev() {
            match undo {
                Undo::Lease(key, Some(lease)) => {
                    self.leases.insert(key, lease);
                }
                Undo::Lease(key, None) => {
                    self.leases.remove(&key);
                }
                Undo::Port(port, owner, freed_at) => {
                    if !self.owners.contains_key(&port) {
                        let at = self.freed_at.get(&port).copied().unwrap_or(0);
                        self.free.remove(&(at, port));
                    }
                    match freed_at {
                        Some(at) => self.freed_at.insert(port, at),
                        None => self.freed_at.remove(&port),
                    };
                    match owner {
                        Some(key) => {
                            self.owners.insert(port, key);
                        }
                        None => {
                            self.owners.remove(&port);
                            self.free.insert((freed_at.unwrap_or(0), port));
                        }
                    }
                }
                Undo::Holder(agent, Some(identity)) => {
                    self.holders.insert(agent, identity);
                }
                Undo::Holder(agent, None) => {
                    self.holders.remove(&agent);
                }
            }
        }
    }

    /// Records `key`'s lease as it is, if an attempt is running.
    fn note_lease(&mut self, key: &LeaseKey) {
        if let Some(log) = &mut self.undo {
            log.0
                .push(Undo::Lease(key.clone(), self.leases.get(key).copied()));
        }
    }

    /// Records `port`'s owner and free time as they are, if an attempt is running.
    fn note_port(&mut self, port: u16) {
        if let Some(log) = &mut self.undo {
            log.0.push(Undo::Port(
                port,
                self.owners.get(&port).cloned(),
                self.freed_at.get(&port).copied(),
            ));
        }
    }

    /// Records `agent`'s holder as it is, if an attempt is running.
    fn note_holder(&mut self, agent: &str) {
        if let Some(log) = &mut self.undo {
            log.0.push(Undo::Holder(
                agent.to_string(),
                self.holders.get(agent).cloned(),
            ));
        }
    }

    fn acquire_one(
        &mut self,
        agent: &str,
        ask: &ServiceAsk,
        now: u64,
        bindable: &mut dyn FnMut(u16) -> bool,
    ) -> Result<Grant, AllocError> {
        let key = LeaseKey::new(agent, ask.service.clone());
        let current = self.leases.get(&key).map(|l| l.port);
        let grant = |port, kind, note| Grant {
            service: ask.service.clone(),
            port,
            kind,
            note,
        };

        // A preferred port that differs from the current lease moves the lease when possible.
        if let Some(want) = ask.preferred.filter(|&p| Some(p) != current) {
            match self.why_not(want, &key, bindable) {
                None => {
                    self.remove_lease(&key, now);
                    self.insert_lease(key, want);
                    return Ok(grant(want, GrantKind::Preferred, None));
                }
                Some(why) if ask.strict => {
                    return Err(AllocError::PreferredUnavailable {
                        service: ask.service.clone(),
                        port: want,
                        why,
                    });
                }
                Some(why) => {
                    let note = format!("preferred port {want} {why}");
                    return self
                        .renew_or_fresh(key, current, now, bindable, Some(note))
                        .map(|(port, kind, note)| grant(port, kind, note));
                }
            }
        }
        self.renew_or_fresh(key, current, now, bindable, None)
            .map(|(port, kind, note)| grant(port, kind, note))
    }

    /// Renews `current` if it is still bindable, else leases a fresh port.
    fn renew_or_fresh(
        &mut self,
        key: LeaseKey,
        current: Option<u16>,
        now: u64,
        bindable: &mut dyn FnMut(u16) -> bool,
        note: Option<String>,
    ) -> Result<(u16, GrantKind, Option<String>), AllocError> {
        if let Some(port) = current {
            if bindable(port) {
                self.set_active(&key, true, now);
                return Ok((port, GrantKind::Renewed, note));
            }
            // Another process took the port while the agent was away: move on.
            self.remove_lease(&key, now);
            let note = Some(format!(
                "previous port {port} is in use by another process on the relay"
            ));
            return self
                .fresh(key, bindable)
                .map(|p| (p, GrantKind::Fresh, note));
        }
        self.fresh(key, bindable)
            .map(|p| (p, GrantKind::Fresh, note))
    }

    /// Why `port` cannot be granted to `key`, or `None` if it can (and has been probed bindable).
    fn why_not(
        &self,
        port: u16,
        key: &LeaseKey,
        bindable: &mut dyn FnMut(u16) -> bool,
    ) -> Option<String> {
        if !self.range.contains(port) {
            return Some(format!("is outside the relay's port range {}", self.range));
        }
        match self.owners.get(&port) {
            Some(owner) if owner != key => return Some("is leased to another agent".into()),
            _ => {}
        }
        if !bindable(port) {
            return Some("is in use by another process on the relay".into());
        }
        None
    }

    fn fresh(
        &mut self,
        key: LeaseKey,
        bindable: &mut dyn FnMut(u16) -> bool,
    ) -> Result<u16, AllocError> {
        let port = self
            .free
            .iter()
            .map(|&(_, p)| p)
            .find(|&p| bindable(p))
            .ok_or(AllocError::Exhausted {
                lo: self.range.lo,
                hi: self.range.hi,
                in_use: self.owners.len(),
            })?;
        self.insert_lease(key, port);
        Ok(port)
    }

    fn insert_lease(&mut self, key: LeaseKey, port: u16) {
        self.note_port(port);
        self.note_lease(&key);
        let at = self.freed_at.remove(&port).unwrap_or(0);
        self.free.remove(&(at, port));
        self.owners.insert(port, key.clone());
        self.leases.insert(
            key,
            Lease {
                port,
                last_seen: 0,
                active: true,
            },
        );
    }

    fn remove_lease(&mut self, key: &LeaseKey, now: u64) -> Option<u16> {
        self.note_lease(key);
        let lease = self.leases.remove(key)?;
        self.note_port(lease.port);
        self.owners.remove(&lease.port);
        self.mark_free(lease.port, now.max(1));
        self.forget_holder_if_unused(&key.agent);
        Some(lease.port)
    }

    fn forget_holder_if_unused(&mut self, agent: &str) {
        if !self.has_leases(agent) && !self.live.contains(agent) && self.holders.contains_key(agent)
        {
            self.note_holder(agent);
            self.holders.remove(agent);
        }
    }

    fn mark_free(&mut self, port: u16, at: u64) {
        self.note_port(port);
        if let Some(old) = self.freed_at.insert(port, at) {
            self.free.remove(&(old, port));
        }
        self.free.remove(&(0, port));
        self.free.insert((at, port));
    }

    fn set_active(&mut self, key: &LeaseKey, active: bool, now: u64) {
        self.note_lease(key);
        if let Some(l) = self.leases.get_mut(key) {
            l.active = active;
            l.last_seen = now;
        }
    }

    /// The agent's session ended: its leases start ageing from `now`, and a name without
    /// leases is no longer held.
    pub fn deactivate_agent(&mut self, agent: &str, now: u64) {
        for (k, l) in self.leases.iter_mut() {
            if k.agent == agent {
                l.active = false;
                l.last_seen = now;
            }
        }
        self.live.remove(agent);
        self.forget_holder_if_unused(agent);
    }

    /// Drops all of `agent`'s leases and its holder at once (operator's explicit release).
    /// Returns the leases' ports.
    pub fn release_agent(&mut self, agent: &str, now: u64) -> Vec<u16> {
        self.live.remove(agent);
        let keys: Vec<LeaseKey> = self
            .leases
            .keys()
            .filter(|k| k.agent == agent)
            .cloned()
            .collect();
        let ports = keys
            .iter()
            .filter_map(|k| self.remove_lease(k, now))
            .collect();
        self.forget_holder_if_unused(agent);
        ports
    }

    /// Removes inactive leases whose agent has been away for the TTL, returning them oldest first.
    pub fn expire(&mut self, now: u64) -> Vec<(LeaseKey, u16)> {
        let mut due: Vec<(u64, LeaseKey)> = self
            .leases
            .iter()
            .filter(|(_, l)| !l.active && l.last_seen.saturating_add(self.ttl_secs) <= now)
            .map(|(k, l)| (l.last_seen, k.clone()))
            .collect();
        due.sort();
        due.into_iter()
            .filter_map(|(last_seen, k)| {
                let lease = self.leases.remove(&k)?;
                self.owners.remove(&lease.port);
                // Freed "when it was last used", so older leases go back into the queue first.
                self.mark_free(lease.port, last_seen.max(1));
                self.forget_holder_if_unused(&k.agent);
                Some((k, lease.port))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ask(service: &str) -> ServiceAsk {
        ServiceAsk {
            service: service.into(),
            preferred: None,
            strict: false,
        }
    }

    fn prefer(service: &str, port: u16, strict: bool) -> ServiceAsk {
        ServiceAsk {
            service: service.into(),
            preferred: Some(port),
            strict,
        }
    }

    fn all(_: u16) -> bool {
        true
    }

    fn table(lo: u16, hi: u16) -> LeaseTable {
        LeaseTable::new(PortRange::new(lo, hi).unwrap(), 100)
    }

    #[test]
    fn range_parsing() {
        assert_eq!("10000-50000".parse(), PortRange::new(10000, 50000));
        assert!("10000".parse::<PortRange>().is_err());
        assert!("5-4".parse::<PortRange>().is_err());
        assert!("0-4".parse::<PortRange>().is_err());
        assert!("1-70000".parse::<PortRange>().is_err());
        assert_eq!(PortRange::new(7, 7).unwrap().len(), 1);
    }

    #[test]
    fn exhausted_range_names_the_range_and_usage() {
        let mut t = table(10000, 10001);
        t.acquire("a", &[ask("ssh")], 1, &mut all).unwrap();
        t.acquire("b", &[ask("ssh")], 1, &mut all).unwrap();
        let err = t.acquire("c", &[ask("ssh")], 1, &mut all).unwrap_err();
        assert_eq!(
            err.to_string(),
            "port range 10000-10001 exhausted (2 in use)"
        );
    }

    #[test]
    fn reconnect_renews_the_same_port() {
        let mut t = table(10, 20);
        let first = t.acquire("a", &[ask("ssh")], 1, &mut all).unwrap();
        t.deactivate_agent("a", 5);
        t.acquire("b", &[ask("ssh")], 6, &mut all).unwrap();
        let again = t.acquire("a", &[ask("ssh")], 7, &mut all).unwrap();
        assert_eq!(again[0].port, first[0].port);
        assert_eq!(again[0].kind, GrantKind::Renewed);
    }

    #[test]
    fn unbindable_ports_are_skipped() {
        let mut t = table(10, 12);
        let g = t
            .acquire("a", &[ask("ssh")], 1, &mut |p| p != 10 && p != 11)
            .unwrap();
        assert_eq!(g[0].port, 12);
        assert!(t.acquire("b", &[ask("ssh")], 1, &mut |p| p == 12).is_err());
    }

    #[test]
    fn renewal_moves_when_old_port_was_taken_by_another_process() {
        let mut t = table(10, 12);
        t.acquire("a", &[ask("ssh")], 1, &mut all).unwrap();
        t.deactivate_agent("a", 2);
        let g = t.acquire("a", &[ask("ssh")], 3, &mut |p| p != 10).unwrap();
        assert_eq!(g[0].port, 11);
        assert!(g[0].note.as_deref().unwrap().contains("port 10"));
    }

    #[test]
    fn preferred_port_granted_taken_and_strict() {
        let mut t = table(10, 20);
        let g = t
            .acquire("a", &[prefer("ssh", 15, false)], 1, &mut all)
            .unwrap();
        assert_eq!((g[0].port, g[0].kind), (15, GrantKind::Preferred));
        let g = t
            .acquire("b", &[prefer("ssh", 15, false)], 1, &mut all)
            .unwrap();
        assert_ne!(g[0].port, 15);
        assert!(g[0]
            .note
            .as_deref()
            .unwrap()
            .contains("leased to another agent"));
        let err = t
            .acquire("c", &[prefer("ssh", 15, true)], 1, &mut all)
            .unwrap_err();
        assert!(matches!(
            err,
            AllocError::PreferredUnavailable { port: 15, .. }
        ));
        let err = t
            .acquire("c", &[prefer("ssh", 99, true)], 1, &mut all)
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("outside the relay's port range 10-20"));
    }

    #[test]
    fn failure_leaves_table_unchanged() {
        let mut t = table(10, 11);
        let before = t.snapshot(0);
        let err = t.acquire("a", &[ask("ssh"), ask("web"), ask("x")], 1, &mut all);
        assert!(err.is_err());
        assert_eq!(t.snapshot(0), before);
        assert_eq!(t.free_count(), 2);
    }

    #[test]
    fn expired_ports_are_reused_last() {
        let mut t = table(10, 12);
        t.acquire("a", &[ask("ssh")], 1, &mut all).unwrap(); // 10
        t.deactivate_agent("a", 1);
        assert!(t.expire(100).is_empty(), "not yet: last seen 1 + ttl 100");
        assert_eq!(t.expire(101), vec![(LeaseKey::new("a", "ssh"), 10)]);
        let ports: Vec<u16> = ["b", "c", "d"]
            .iter()
            .map(|n| t.acquire(n, &[ask("ssh")], 102, &mut all).unwrap()[0].port)
            .collect();
        assert_eq!(ports, vec![11, 12, 10]);
    }

    #[test]
    fn active_leases_never_expire() {
        let mut t = table(10, 12);
        t.acquire("a", &[ask("ssh")], 1, &mut all).unwrap();
        assert!(t.expire(u64::MAX).is_empty());
        assert_eq!(t.expires_at(&LeaseKey::new("a", "ssh")), None);
    }

    #[test]
    fn snapshot_restores_leases_and_free_order() {
        let mut t = table(10, 13);
        t.acquire("a", &[ask("ssh")], 1, &mut all).unwrap(); // 10
        t.acquire("b", &[ask("ssh")], 1, &mut all).unwrap(); // 11
        t.deactivate_agent("a", 2);
        t.expire(1000);
        let snap = t.snapshot(50);
        let (mut r, dropped) = LeaseTable::restore(t.range(), 100, snap).unwrap();
        assert!(dropped.is_empty());
        assert_eq!(r.port_of(&LeaseKey::new("b", "ssh")), Some(11));
        let ports: Vec<u16> = ["c", "d", "e"]
            .iter()
            .map(|n| r.acquire(n, &[ask("ssh")], 60, &mut all).unwrap()[0].port)
            .collect();
        assert_eq!(ports, vec![12, 13, 10]);
        assert_eq!(
            r.acquire("b", &[ask("ssh")], 61, &mut all).unwrap()[0].port,
            11
        );
    }

    #[test]
    fn a_names_holder_lives_exactly_as_long_as_its_leases_and_survives_a_restart() {
        let mut t = table(10, 19);
        t.set_holder("a", "token:team-a");
        assert_eq!(t.holder("a"), None, "no leases, no holder");
        t.acquire("a", &[ask("ssh"), ask("web")], 1, &mut all)
            .unwrap();
        t.set_holder("a", "token:team-a");
        assert_eq!(t.holder("a"), Some("token:team-a"));
        let (restored, _) = LeaseTable::restore(t.range(), 100, t.snapshot(5)).unwrap();
        assert_eq!(restored.holder("a"), Some("token:team-a"));
        t.deactivate_agent("a", 10);
        assert_eq!(t.expire(50).len(), 0);
        assert_eq!(t.holder("a"), Some("token:team-a"), "still leased");
        assert_eq!(t.expire(111).len(), 2);
        assert_eq!(t.holder("a"), None, "expired with its leases");
        t.acquire("b", &[ask("ssh")], 200, &mut all).unwrap();
        t.set_holder("b", "cert:b");
        t.release_agent("b", 201);
        assert_eq!(t.holder("b"), None, "released with its leases");
    }

    #[test]
    fn services_a_placement_no_longer_asks_for_give_their_ports_back() {
        let mut t = table(10, 19);
        t.acquire("a", &[ask("a1"), ask("a2")], 1, &mut all)
            .unwrap();
        t.hold("a", "token:team");
        for (round, services) in [["b1", "b2"], ["c1", "c2"], ["d1", "d2"]]
            .iter()
            .enumerate()
        {
            t.deactivate_agent("a", 2 + round as u64);
            let asks: Vec<ServiceAsk> = services.iter().map(|s| ask(s)).collect();
            t.acquire("a", &asks, 3 + round as u64, &mut all).unwrap();
            t.hold("a", "token:team");
            let held: Vec<&str> = t.leases_of("a").map(|(s, _)| s).collect();
            assert_eq!(held, services.to_vec());
            assert_eq!(t.in_use(), 2);
            assert_eq!(t.holdings("token:team"), (1, 2));
        }
        // A refused attempt keeps what the name had.
        let before = t.snapshot(9);
        let err = t.acquire("a", &[prefer("x", 99, true)], 9, &mut all);
        assert!(err.is_err());
        assert_eq!(t.snapshot(9), before);
    }

    #[test]
    fn a_live_name_without_leases_is_held_until_its_session_ends() {
        let mut t = table(10, 19);
        t.acquire("np", &[], 1, &mut all).unwrap();
        t.hold("np", "token:team");
        assert_eq!(t.holder("np"), Some("token:team"));
        assert_eq!(t.holdings("token:team"), (1, 0));
        // Not persisted: a restarted relay has no live session.
        assert!(t.snapshot(2).holders.is_empty());
        t.deactivate_agent("np", 3);
        assert_eq!(t.holder("np"), None, "the session ended, nothing is held");
        assert_eq!(t.holdings("token:team"), (0, 0));
        // A live name that drops its last service keeps its holder; releasing drops it.
        t.acquire("b", &[ask("ssh")], 4, &mut all).unwrap();
        t.hold("b", "cert:b");
        t.acquire("b", &[], 5, &mut all).unwrap();
        assert_eq!((t.holder("b"), t.in_use()), (Some("cert:b"), 0));
        t.release_agent("b", 6);
        assert_eq!(t.holder("b"), None);
    }

    #[test]
    fn restore_reports_out_of_range_and_rejects_conflicts() {
        let rec = |agent: &str, port| LeaseRecord {
            agent: agent.into(),
            service: "ssh".into(),
            port,
            last_seen: 1,
        };
        let range = PortRange::new(10, 20).unwrap();
        let snap = LeaseSnapshot {
            leases: vec![rec("a", 10), rec("b", 99)],
            freed: vec![],
            holders: vec![],
        };
        let (_, dropped) = LeaseTable::restore(range, 5, snap).unwrap();
        assert_eq!(dropped, vec![rec("b", 99)]);
        let snap = LeaseSnapshot {
            leases: vec![rec("a", 10), rec("b", 10)],
            freed: vec![],
            holders: vec![],
        };
        assert!(LeaseTable::restore(range, 5, snap).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire(u8, Option<u16>, bool),
        Leave(u8),
        Release(u8),
        Expire,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12, proptest::option::of(0u16..40), any::<bool>())
                .prop_map(|(a, p, s)| Op::Acquire(a, p, s)),
            (0u8..12).prop_map(Op::Leave),
            (0u8..12).prop_map(Op::Release),
            Just(Op::Expire),
        ]
    }

    /// The clone-based placement that `try_acquire` replaced: plan on a copy, keep the copy.
    fn plan_by_clone(
        t: &LeaseTable,
        agent: &str,
        asks: &[ServiceAsk],
        now: u64,
        bindable: &mut dyn FnMut(u16) -> bool,
    ) -> Result<(LeaseTable, Vec<Grant>), AllocError> {
        let mut work = t.clone();
        work.retire_unasked(agent, asks, now);
        let grants = asks
            .iter()
            .map(|ask| work.acquire_one(agent, ask, now, bindable))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((work, grants))
    }

    /// Every field but the (idle) undo log.
    fn state(t: &LeaseTable) -> impl PartialEq + std::fmt::Debug {
        let mut freed: Vec<_> = t.freed_at.iter().map(|(p, a)| (*p, *a)).collect();
        freed.sort_unstable();
        let mut owners: Vec<_> = t.owners.iter().map(|(p, k)| (*p, k.clone())).collect();
        owners.sort_unstable();
        let mut holders: Vec<_> = t.holders.clone().into_iter().collect();
        holders.sort_unstable();
        let leases: Vec<_> = t
            .leases
            .iter()
            .map(|(k, l)| (k.clone(), l.port, l.active, l.last_seen))
            .collect();
        assert!(t.undo.is_none(), "undo log left behind");
        (leases, owners, t.free.clone(), freed, holders)
    }

    #[derive(Debug, Clone)]
    enum TxOp {
        /// Agent, preferred port of "ssh", strict, whether the caller accepts the grants, and
        /// the second service ("web" or "db": a placement may rename it, freeing the other).
        Acquire(u8, Option<u16>, bool, bool, bool),
        Leave(u8),
        Release(u8),
        Expire,
    }

    fn tx_op() -> impl Strategy<Value = TxOp> {
        prop_oneof![
            4 => (0u8..10, proptest::option::of(5u16..35), any::<bool>(), any::<bool>(), any::<bool>())
                .prop_map(|(a, p, s, ok, web)| TxOp::Acquire(a, p, s, ok, web)),
            1 => (0u8..10).prop_map(TxOp::Leave),
            1 => (0u8..10).prop_map(TxOp::Release),
            1 => Just(TxOp::Expire),
        ]
    }

    proptest! {
        /// Whatever happens, no port is ever leased twice, leased ports are in range, a port that
        /// cannot be bound is never granted, and every port of the range is exactly one of
        /// leased or free.
        #[test]
        fn ports_are_never_double_leased(ops in proptest::collection::vec(op(), 1..120),
                                         blocked in proptest::collection::hash_set(10u16..30, 0..5)) {
            let mut t = table(10, 29);
            let mut now = 1;
            for op in ops {
                now += 7;
                match op {
                    Op::Acquire(a, pref, strict) => {
                        let asks = [ServiceAsk { service: "ssh".into(), preferred: pref, strict }, ask("web")];
                        // A port the bind probe refuses is never granted.
                        if let Ok(grants) = t.acquire(&format!("agent{a}"), &asks, now, &mut |p| !blocked.contains(&p)) {
                            for g in grants {
                                prop_assert!(!blocked.contains(&g.port), "unbindable port {} granted", g.port);
                            }
                        }
                    }
                    Op::Leave(a) => t.deactivate_agent(&format!("agent{a}"), now),
                    Op::Release(a) => { t.release_agent(&format!("agent{a}"), now); }
                    Op::Expire => { t.expire(now); }
                }
                let mut seen = std::collections::HashSet::new();
                for (_, port, _, _) in t.iter() {
                    prop_assert!(seen.insert(port), "port {} leased twice", port);
                    prop_assert!(t.range().contains(port));
                }
                prop_assert_eq!(t.in_use() + t.free_count(), t.range().len());
                let snap = t.snapshot(now);
                let (r, dropped) = LeaseTable::restore(t.range(), 100, snap.clone()).unwrap();
                prop_assert!(dropped.is_empty());
                prop_assert_eq!(r.snapshot(now), snap);
            }
        }

        /// `try_acquire` (changes in place, undone when refused or failed) gives exactly the
        /// grants, errors and table of the clone-based plan it replaced, whether the caller keeps
        /// the attempt or not; a refused attempt leaves the table as it was.
        #[test]
        fn in_place_attempts_match_the_clone_based_plan(
            ops in proptest::collection::vec(tx_op(), 1..150),
            blocked in proptest::collection::hash_set(10u16..30, 0..6),
        ) {
            let mut new = table(10, 29);
            let mut old = table(10, 29);
            let mut now = 1;
            for op in ops {
                now += 13;
                match op {
                    TxOp::Acquire(a, pref, strict, ok, web) => {
                        let agent = format!("agent{a}");
                        let asks = [
                            ServiceAsk { service: "ssh".into(), preferred: pref, strict },
                            ask(if web { "web" } else { "db" }),
                        ];
                        let mut probe = |p: u16| !blocked.contains(&p);
                        let before = state(&new);
                        let got = new.try_acquire(&agent, &asks, now, &mut probe, &mut |_| ok);
                        let want = plan_by_clone(&old, &agent, &asks, now, &mut probe);
                        match (got, want) {
                            (Ok(Attempt::Committed(g)), Ok((plan, w))) if ok => {
                                prop_assert_eq!(g, w);
                                old = plan;
                                new.set_holder(&agent, "id");
                                old.set_holder(&agent, "id");
                            }
                            (Ok(Attempt::RolledBack(g)), Ok((_, w))) if !ok => {
                                prop_assert_eq!(g, w);
                                prop_assert_eq!(state(&new), before);
                            }
                            (Err(e), Err(w)) => {
                                prop_assert_eq!(e, w);
                                prop_assert_eq!(state(&new), before);
                            }
                            (g, w) => prop_assert!(false, "try_acquire {g:?} but plan {w:?}"),
                        }
                    }
                    TxOp::Leave(a) => {
                        new.deactivate_agent(&format!("agent{a}"), now);
                        old.deactivate_agent(&format!("agent{a}"), now);
                    }
                    TxOp::Release(a) => {
                        let agent = format!("agent{a}");
                        prop_assert_eq!(new.release_agent(&agent, now), old.release_agent(&agent, now));
                    }
                    TxOp::Expire => prop_assert_eq!(new.expire(now), old.expire(now)),
                }
                prop_assert_eq!(state(&new), state(&old));
                prop_assert_eq!(new.in_use() + new.free_count(), new.range().len());
            }
        }
    }
}
