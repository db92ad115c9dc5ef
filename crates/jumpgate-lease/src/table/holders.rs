//! Which identity (credential) holds each agent name, so that only it may renew or take over
//! the name, and how many names and leases each identity holds, for the caps on hoarding.

use std::collections::BTreeMap;

use super::LeaseTable;

impl LeaseTable {
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

    /// Forgets `agent`'s holder once the name has neither leases nor a live session.
    pub(super) fn forget_holder_if_unused(&mut self, agent: &str) {
        if !self.has_leases(agent) && !self.live.contains(agent) && self.holders.contains_key(agent)
        {
            self.note_holder(agent);
            self.holders.remove(agent);
        }
    }
}
