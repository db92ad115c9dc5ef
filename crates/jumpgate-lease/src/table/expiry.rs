//! How leases end: a session ending starts its leases' TTL, an operator's release drops them at
//! once, and [`LeaseTable::expire`] drops those whose agent stayed away for the TTL, putting
//! their ports at the back of the free queue in the order they were last used.

use super::{LeaseKey, LeaseTable};

impl LeaseTable {
    /// The agent's session ended: its leases start ageing from `now`, and a name without
    /// leases is no longer held.
    pub fn deactivate_agent(&mut self, agent: &str, now: u64) {
        for (k, l) in self.leases.iter_mut() {
            if k.agent == agent {
                l.active = false;
                l.last_seen = now;
            }
        }
        self.note_inactive(now);
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
        if now < self.next_due {
            return Vec::new();
        }
        let ttl = self.ttl_secs;
        let mut due = Vec::new();
        let mut next_due = u64::MAX;
        for (k, l) in self.leases.iter().filter(|(_, l)| !l.active) {
            let at = l.last_seen.saturating_add(ttl);
            if at <= now {
                due.push((l.last_seen, k.clone()));
            } else {
                next_due = next_due.min(at);
            }
        }
        self.next_due = next_due;
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
