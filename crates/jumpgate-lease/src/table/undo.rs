//! The undo log of an attempt: the prior state of everything a placement changes, recorded just
//! before each change and restored in reverse when the caller refuses the grants or placement
//! fails. Nothing is copied, so an attempt costs what it changes, not the table's size.

use super::{Lease, LeaseKey, LeaseTable};

/// The prior state of what an attempt changed, in the order of the changes; undone in reverse.
#[derive(Debug, Clone, Default)]
pub(super) struct UndoLog(Vec<Undo>);

#[derive(Debug, Clone)]
enum Undo {
    /// `leases[key]` was this.
    Lease(LeaseKey, Option<Lease>),
    /// The port's owner and the time it was freed were these (free iff no owner).
    Port(u16, Option<LeaseKey>, Option<u64>),
    /// `holders[agent]` was this.
    Holder(String, Option<String>),
}

impl LeaseTable {
    /// Puts back, newest first, everything `log` recorded.
    pub(super) fn roll_back(&mut self, log: UndoLog) {
        for undo in log.0.into_iter().rev() {
            match undo {
                Undo::Lease(key, Some(lease)) => {
                    if !lease.active {
                        self.note_inactive(lease.last_seen);
                    }
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
    pub(super) fn note_lease(&mut self, key: &LeaseKey) {
        if let Some(log) = &mut self.undo {
            log.0
                .push(Undo::Lease(key.clone(), self.leases.get(key).copied()));
        }
    }

    /// Records `port`'s owner and free time as they are, if an attempt is running.
    pub(super) fn note_port(&mut self, port: u16) {
        if let Some(log) = &mut self.undo {
            log.0.push(Undo::Port(
                port,
                self.owners.get(&port).cloned(),
                self.freed_at.get(&port).copied(),
            ));
        }
    }

    /// Records `agent`'s holder as it is, if an attempt is running.
    pub(super) fn note_holder(&mut self, agent: &str) {
        if let Some(log) = &mut self.undo {
            log.0.push(Undo::Holder(
                agent.to_string(),
                self.holders.get(agent).cloned(),
            ));
        }
    }
}
