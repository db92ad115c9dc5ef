//! What each relay said of the fleet (its member list, its own entry, its protocol version),
//! reported by the links as sessions start and lists arrive, and read by the driver when told.
//! Every list is checked ([`check_members`]) here, the one place member lists are taken in.

use std::sync::Mutex;

use jumpgate_proto::member::check_members;
use jumpgate_proto::RelayMember;
use tokio::sync::Notify;

use super::set::Heard;

/// The member lists relays sent, by link id, shared between the links (which report) and the
/// driver (which reads them when told).
#[derive(Default)]
pub struct MemberReports {
    heard: Mutex<Heard>,
    /// Told when a list, an acceptance or a relay's own entry changed: the driver plans again.
    pub(super) changed: Notify,
    /// Told when a link lost its session: the driver looks names up again soon.
    pub(super) lost: Notify,
}

impl MemberReports {
    /// Link `id`'s relay accepted the agent: what it says of the fleet and of itself, if its
    /// version says anything.
    pub fn accepted(
        &self,
        id: u64,
        relay: &dyn std::fmt::Display,
        accepted: &jumpgate_proto::Accepted,
    ) {
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let legacy = accepted.version < jumpgate_proto::MEMBERS_SINCE;
        {
            let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
            heard
                .accepted
                .insert(id, COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            if legacy {
                heard.legacy.insert(id);
            } else {
                heard.legacy.remove(&id);
            }
        }
        if legacy {
            self.changed.notify_one();
        } else {
            self.report(id, relay, &accepted.members, accepted.relay.as_ref());
        }
    }

    /// Link `id`'s relay pushed a new member list.
    pub fn pushed(&self, id: u64, relay: &dyn std::fmt::Display, list: &[RelayMember]) {
        self.report(id, relay, list, None);
    }

    /// Records a member list and, with an acceptance, the relay's own entry. Malformed entries
    /// are dropped with a warning; the driver is told only if something changed (an acceptance
    /// always counts: a second session to one relay must be found at once).
    fn report(
        &self,
        id: u64,
        relay: &dyn std::fmt::Display,
        list: &[RelayMember],
        itself: Option<&RelayMember>,
    ) {
        let checked = check_members(list);
        let itself = itself.and_then(|me| check_members(std::slice::from_ref(me)).valid.pop());
        if !checked.rejected.is_empty() || checked.over_limit > 0 {
            tracing::warn!(
                relay = %relay,
                "ignoring part of the relay's member list: {} malformed address(es) ({}), {} past the limit of {}",
                checked.rejected.len(),
                checked.rejected.join(", "),
                checked.over_limit,
                jumpgate_proto::MAX_MEMBERS
            );
        }
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        if let Some(me) = itself {
            heard.itself.insert(id, me);
            changed = true;
        }
        if heard.lists.get(&id) != Some(&checked.valid) {
            tracing::debug!(relay = %relay, members = checked.valid.len(), "member list received");
            heard.lists.insert(id, checked.valid);
            changed = true;
        }
        if changed {
            self.changed.notify_one();
        }
    }

    /// Link `id` lost its session: names may deserve a fresh lookup.
    pub fn lost(&self) {
        self.lost.notify_one();
    }

    pub(super) fn snapshot(&self) -> Heard {
        self.heard.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Drops what links no longer in the set said (a report can land just after its link was
    /// stopped).
    pub(super) fn keep_only(&self, ids: &[u64]) {
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        heard.lists.retain(|id, _| ids.contains(id));
        heard.itself.retain(|id, _| ids.contains(id));
        heard.accepted.retain(|id, _| ids.contains(id));
        heard.legacy.retain(|id| ids.contains(id));
    }

    pub(super) fn forget(&self, id: u64) {
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        heard.lists.remove(&id);
        heard.itself.remove(&id);
        heard.accepted.remove(&id);
        heard.legacy.remove(&id);
    }
}
