//! The agents connected right now, by name.
//!
//! One live session per agent name: a new authenticated session for a name takes over, closing
//! the old one and waiting until its ports are released, so a restarted agent never finds its own
//! ports "in use". Admission is serialised per name so two racing sessions cannot both win.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use jumpgate_proto::Cidr;
use jumpgate_transport::counted::ByteCounts;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::guard::{PerSource, TokenBucket};
use crate::policy::Credential;

use super::lanes::Lanes;

/// Live counters of one service, read by metrics and the API while connections run.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Bytes: `read` is from users (up), `written` is to users (down).
    pub bytes: Arc<ByteCounts>,
    /// User connections open now.
    pub active: AtomicUsize,
    /// User connections carried since the session began.
    pub total: AtomicU64,
    /// User connections refused (allowlist, limits).
    pub refused: AtomicU64,
}

/// A service of a connected agent and the public port it is reachable on.
#[derive(Debug, Clone)]
pub struct ServiceEndpoint {
    /// Service name.
    pub name: Arc<str>,
    /// Public port on the relay.
    pub port: u16,
    /// Port of the target on the agent's side.
    pub target_port: u16,
    /// The agent's own allowlist for this service (empty: the relay's applies alone).
    pub allow: Arc<[Cidr]>,
    /// Counters.
    pub stats: Arc<ServiceStats>,
    /// New-connection rate limit.
    pub bucket: Arc<Mutex<TokenBucket>>,
    /// Concurrent connections by source address.
    pub sources: Arc<PerSource>,
}

/// One connected agent.
pub struct AgentSession {
    /// Distinguishes this session from an older or newer one with the same name.
    pub id: u64,
    /// Agent name.
    pub name: Arc<str>,
    /// The agent's address as the relay sees it.
    pub remote: SocketAddr,
    /// The session's connections, which open streams to the agent; a tunnel shares its host
    /// session's.
    pub lanes: Arc<Lanes>,
    /// Caps concurrent user connections, below the session's stream limit.
    pub permits: Arc<Semaphore>,
    /// Fired to end the session (takeover, shutdown).
    pub cancel: CancellationToken,
    /// Fired once the session has released its ports.
    pub finished: CancellationToken,
    /// Exposed services.
    pub services: Vec<ServiceEndpoint>,
    /// When it connected.
    pub connected_at: SystemTime,
    /// How it authenticated, so a reload can revoke it.
    pub credential: Credential,
    /// Its place among its credential's sessions on this relay, given back at teardown (before
    /// `finished`, so a takeover by the same credential finds the room).
    pub slot: Mutex<Option<SessionSlot>>,
    /// The keys that alone may reach this agent through the jump listener (the agent's
    /// `jump_authorized_keys`); `None`: the relay's jump policy alone.
    pub jump_keys: Option<Arc<[russh::keys::ssh_key::public::KeyData]>>,
    /// Set for a tunnel registered over a host session (issue 28): its streams name it
    /// ([`jumpgate_proto::StreamOpen::tunnel`]) and its end is reported to the host.
    pub tunnel: Option<TunnelOf>,
}

/// What a registered tunnel knows of the host session that carries it.
pub struct TunnelOf {
    /// The host session's agent name, shown by the admin API.
    pub host: Arc<str>,
    /// The host session's id: a re-registration over the same session replaces the tunnel
    /// quietly.
    pub host_id: u64,
    /// Its end is not reported to the host: the host asked for it (unregistered, or registered
    /// the name again).
    pub quiet: std::sync::atomic::AtomicBool,
    /// Why the relay ended it, when the code ending it knows (takeover, operator); otherwise
    /// worked out at teardown (revocation, shutdown).
    pub closed_by: Mutex<Option<jumpgate_proto::Refusal>>,
}

impl TunnelOf {
    /// Records why the relay ends this tunnel, unless a reason is recorded already.
    pub fn close_because(&self, reason: jumpgate_proto::Refusal) {
        let mut slot = self.closed_by.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(reason);
    }
}

/// Live sessions on this relay by identity, shared with the slots that count them.
type SessionCounts = Arc<Mutex<HashMap<String, usize>>>;

/// One session counted against its credential's `max_sessions`; dropping it gives the room
/// back.
pub struct SessionSlot {
    counts: SessionCounts,
    identity: String,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.identity);
            }
        }
    }
}

/// Connected agents by name.
#[derive(Default)]
pub struct Registry {
    sessions: DashMap<Arc<str>, Arc<AgentSession>>,
    /// One lock per name being admitted right now; an entry lives only while someone holds or
    /// waits for it, so the map does not grow with every name ever seen.
    turns: DashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>,
    /// Sessions (admitted or being placed) by identity.
    by_identity: SessionCounts,
}

/// The exclusive right to admit a session named `name`; the next one waits until it is dropped.
pub struct NameTurn<'a> {
    registry: &'a Registry,
    name: Arc<str>,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for NameTurn<'_> {
    fn drop(&mut self) {
        // The map's reference and ours: nobody else holds or waits for this turn. The check and
        // the removal happen under the map's shard lock, which a newcomer also takes to join.
        self.registry
            .turns
            .remove_if(&self.name, |_, lock| Arc::strong_count(lock) <= 2);
    }
}

impl Registry {
    /// Waits for the turn to admit a session named `name`.
    pub async fn turn(&self, name: &str) -> NameTurn<'_> {
        let name: Arc<str> = Arc::from(name);
        let lock = self.turns.entry(name.clone()).or_default().clone();
        NameTurn {
            registry: self,
            name,
            _held: lock.lock_owned().await,
        }
    }

    /// Ends the current session named `name`, if any, and waits (at most `limit`) until its
    /// ports are free. Returns the old session's address for the log, or `Err` with it when the
    /// old session did not finish in time.
    pub async fn take_over(
        &self,
        name: &str,
        limit: Duration,
    ) -> Result<Option<SocketAddr>, SocketAddr> {
        let Some(old) = self.get(name) else {
            return Ok(None);
        };
        if let Some(tunnel) = &old.tunnel {
            tunnel.close_because(jumpgate_proto::Refusal::Unavailable {
                detail: "taken over by a newer session or tunnel with the same identity".into(),
            });
        }
        old.cancel.cancel();
        match tokio::time::timeout(limit, old.finished.cancelled()).await {
            Ok(()) => Ok(Some(old.remote)),
            Err(_) => Err(old.remote),
        }
    }

    /// Records a session as the current one for its name.
    pub fn insert(&self, session: Arc<AgentSession>) {
        self.sessions.insert(session.name.clone(), session);
    }

    /// Forgets `name`'s session if it is still session `id` (a takeover may have replaced it).
    pub fn remove(&self, name: &str, id: u64) {
        self.sessions.remove_if(name, |_, s| s.id == id);
    }

    /// The current session named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<AgentSession>> {
        self.sessions.get(name).map(|s| s.clone())
    }

    /// All current sessions.
    pub fn all(&self) -> Vec<Arc<AgentSession>> {
        self.sessions.iter().map(|s| s.clone()).collect()
    }

    /// Number of connected agents.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Counts one more session of `identity`, unless it has `cap` already (`None`: no cap, as
    /// for the shared token); `Err` carries the cap. Checked and counted under one lock, so
    /// concurrent placements of one credential's names cannot overshoot.
    pub fn admit(&self, identity: &str, cap: Option<usize>) -> Result<SessionSlot, usize> {
        let mut counts = self.by_identity.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(identity.to_string()).or_insert(0);
        if let Some(cap) = cap.filter(|cap| *n >= *cap) {
            if *n == 0 {
                counts.remove(identity);
            }
            return Err(cap);
        }
        *n += 1;
        Ok(SessionSlot {
            counts: self.by_identity.clone(),
            identity: identity.to_string(),
        })
    }

    /// Live sessions (and placements in progress) on this relay by identity, sorted.
    pub fn sessions_by_identity(&self) -> Vec<(String, usize)> {
        let counts = self.by_identity.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, usize)> = counts.iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_exclusive_per_name_and_forgotten_when_free() {
        let registry = Registry::default();
        let first = registry.turn("a").await;
        let other_name = registry.turn("b").await; // another name does not wait
        let waiting = registry.turn("a");
        tokio::pin!(waiting);
        tokio::select! {
            biased;
            _ = &mut waiting => panic!("a second turn for the same name must wait"),
            () = std::future::ready(()) => {}
        }
        drop(first);
        let second = waiting.await;
        assert_eq!(registry.turns.len(), 2, "a and b are still held");
        drop((second, other_name));
        assert!(registry.turns.is_empty(), "no turn outlives its holders");
    }

    #[test]
    fn sessions_are_counted_per_identity_up_to_the_cap() {
        let registry = Registry::default();
        let a = registry.admit("token:a", Some(2)).unwrap();
        let b = registry.admit("token:a", Some(2)).unwrap();
        assert_eq!(registry.admit("token:a", Some(2)).err(), Some(2));
        let shared = registry.admit("shared-token", None).unwrap();
        assert_eq!(
            registry.sessions_by_identity(),
            vec![("shared-token".into(), 1), ("token:a".into(), 2)]
        );
        drop(a);
        let c = registry.admit("token:a", Some(2)).unwrap();
        drop((b, c, shared));
        assert!(registry.sessions_by_identity().is_empty());
    }
}
