//! The table's primitive changes: a lease taken, dropped, freed or renewed, each keeping
//! `leases`, `owners` and the free queue in step and noting the prior state in the undo log
//! first, so an attempt built from them can be rolled back.

use super::{Lease, LeaseKey, LeaseTable};

impl LeaseTable {
    /// Leases `port` to `key`, held by a session, taking it off the free queue.
    pub(super) fn insert_lease(&mut self, key: LeaseKey, port: u16) {
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

    /// Drops `key`'s lease and frees its port as of `now`; returns the port, if there was a lease.
    pub(super) fn remove_lease(&mut self, key: &LeaseKey, now: u64) -> Option<u16> {
        self.note_lease(key);
        let lease = self.leases.remove(key)?;
        self.note_port(lease.port);
        self.owners.remove(&lease.port);
        self.mark_free(lease.port, now.max(1));
        self.forget_holder_if_unused(&key.agent);
        Some(lease.port)
    }

    /// Puts `port` in the free queue as freed at `at` (0: never leased), replacing its old place.
    pub(super) fn mark_free(&mut self, port: u16, at: u64) {
        self.note_port(port);
        if let Some(old) = self.freed_at.insert(port, at) {
            self.free.remove(&(old, port));
        }
        self.free.remove(&(0, port));
        self.free.insert((at, port));
    }

    /// Marks `key`'s lease as held by a session or not, seen at `now`.
    pub(super) fn set_active(&mut self, key: &LeaseKey, active: bool, now: u64) {
        self.note_lease(key);
        if let Some(l) = self.leases.get_mut(key) {
            l.active = active;
            l.last_seen = now;
            if !active {
                self.note_inactive(now);
            }
        }
    }
}
