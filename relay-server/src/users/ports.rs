//! The allocated ports: one listener per leased port, kept bound by the relay for as long as the
//! lease lives, whether or not its agent is connected.
//!
//! While a session is attached, every connection is admitted and carried to the agent. While the
//! agent is away, users are answered at once (the connection is closed and audited as "away")
//! instead of timing out, and no other process on the jump host can take the port over. A
//! reconnecting agent is attached to the same listener; the port is closed only when its lease
//! expires or is released.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::registry::{AgentSession, ServiceEndpoint};
use crate::audit::{timestamp, Outcome, Record};
use crate::net::accept_backoff;

use super::carry::spawn_carry;
use super::{Greeting, Users};

/// What a user on a port reaches: a live session's service.
#[derive(Clone)]
pub(crate) struct Attached {
    /// The session.
    pub agent: Arc<AgentSession>,
    /// Its service on this port.
    pub service: ServiceEndpoint,
}

/// One kept port.
struct Kept {
    /// The agent whose lease the port is.
    agent: Arc<str>,
    attached: watch::Sender<Option<Attached>>,
    stop: CancellationToken,
}

/// Every port the relay keeps bound, by number.
pub(crate) struct Ports {
    kept: DashMap<u16, Kept>,
    users: Arc<Users>,
    /// The keepers; they end on shutdown or when their port is closed.
    pub tasks: TaskTracker,
}

impl Ports {
    /// No ports kept yet.
    pub fn new(users: Arc<Users>) -> Self {
        Self {
            kept: DashMap::new(),
            users,
            tasks: TaskTracker::new(),
        }
    }

    /// Whether `port` is kept for `agent`, so a placement for it needs no new listener.
    pub fn is_kept_for(&self, port: u16, agent: &str) -> bool {
        self.kept.get(&port).is_some_and(|k| *k.agent == *agent)
    }

    /// Whether `port` is kept at all (for whichever agent).
    pub fn is_kept(&self, port: u16) -> bool {
        self.kept.contains_key(&port)
    }

    /// Starts keeping `listener` as `port` of `agent`'s `service`, attached to `attached` (or
    /// away, for a lease restored at start).
    pub fn keep(
        &self,
        listener: TcpListener,
        port: u16,
        agent: &str,
        service: &str,
        attached: Option<Attached>,
    ) {
        let (tx, rx) = watch::channel(attached);
        let stop = CancellationToken::new();
        let kept = Kept {
            agent: Arc::from(agent),
            attached: tx,
            stop: stop.clone(),
        };
        if let Some(old) = self.kept.insert(port, kept) {
            old.stop.cancel();
        }
        let (agent, service) = (Arc::from(agent), Arc::from(service));
        self.tasks.spawn(serve(
            listener,
            port,
            agent,
            service,
            rx,
            stop,
            self.users.clone(),
        ));
    }

    /// Attaches a session's service to the port kept for it. Returns `false` if the port is not
    /// kept (closed meanwhile); the caller then has no listener for it.
    pub fn attach(&self, port: u16, attached: Attached) -> bool {
        match self.kept.get(&port) {
            Some(kept) => {
                kept.attached.send_replace(Some(attached));
                true
            }
            None => false,
        }
    }

    /// Marks `port` away if session `session` is the one attached: its users are answered at
    /// once until the agent is back.
    pub fn detach(&self, port: u16, session: u64) {
        if let Some(kept) = self.kept.get(&port) {
            kept.attached.send_if_modified(|current| {
                let ours = current.as_ref().is_some_and(|a| a.agent.id == session);
                if ours {
                    *current = None;
                }
                ours
            });
        }
    }

    /// Stops keeping `port`: its lease expired or was released (or moved elsewhere).
    pub fn close(&self, port: u16) {
        if let Some((_, kept)) = self.kept.remove(&port) {
            kept.stop.cancel();
        }
    }
}

/// Accepts users on one kept port until it is closed or the relay shuts down.
async fn serve(
    listener: TcpListener,
    port: u16,
    agent: Arc<str>,
    service: Arc<str>,
    attached: watch::Receiver<Option<Attached>>,
    stop: CancellationToken,
    users: Arc<Users>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            _ = users.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(ok) => ok,
            Err(e) => {
                accept_backoff("allocated port", e).await;
                continue;
            }
        };
        let current = attached.borrow().clone();
        match current {
            Some(Attached { agent, service }) if !agent.cancel.is_cancelled() => {
                // A refused connection is dropped here, which closes it.
                if let Ok(admitted) = users.admit(peer, &agent.name, &agent.permits, &service) {
                    spawn_carry(
                        tcp,
                        peer,
                        admitted,
                        &agent,
                        &service,
                        &users,
                        Greeting::None,
                    );
                }
            }
            _ => {
                drop(tcp);
                away(&users, peer, port, &agent, &service);
            }
        }
    }
}

/// Audits a user who came while the port's agent was away.
fn away(users: &Users, peer: SocketAddr, port: u16, agent: &str, service: &str) {
    tracing::debug!(%peer, port, "closing user connection: agent {agent} is away");
    users.audit.record(Record {
        start: timestamp(SystemTime::now()),
        src: peer.to_string(),
        relay_port: port,
        agent: agent.to_string(),
        service: service.to_string(),
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: 0,
        outcome: Outcome::AgentAway,
        detail: Some(
            "the job behind this port is away (its agent is disconnected); the port stays reserved for it"
                .into(),
        ),
        user: None,
    });
}
