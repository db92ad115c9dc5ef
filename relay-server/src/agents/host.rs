//! Host sessions (issue 28; the design is [`jumpgate_proto::tunnel`]'s): one agent session
//! carrying the tunnels of many jobs. The host's own name and credential buy it the session
//! (placed like any agent's); every tunnel it registers on its control stream is authenticated
//! with its own credential and placed by the same code as an agent's hello
//! ([`placement::claim`]), then lives in the registry as an [`AgentSession`] of its own whose
//! lanes are the host's. A tunnel ends on the host's `Unregister`, on its own cancellation
//! (revocation, an operator's disconnect, a takeover: the host is told with
//! [`Control::TunnelClosed`]) or with the host session; its teardown is an agent's.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jumpgate_proto::display::shown;
use jumpgate_proto::tunnel::{TunnelHello, TunnelReply, MAX_TUNNELS_PER_HOST};
use jumpgate_proto::{validate_name, Control, Refusal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::handshake::{check_services, HandshakeError};
use super::hold::{end_session, serve_ports};
use super::placement::{self, Claim, SessionParts};
use super::registry::{AgentSession, TunnelOf};
use super::Agents;
use crate::net::rate_limited_warn;

/// Frames a host's tunnels want written on its control stream (answers, closures).
pub(crate) type HostOutbox = mpsc::UnboundedReceiver<Control>;

/// How far back a host session's failed registrations count towards its limit.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Longest an `Unregister` waits for the tunnel's teardown before releasing its leases.
const UNREGISTER_WAIT: Duration = Duration::from_secs(10);

/// One host session's tunnels.
pub(crate) struct Host {
    /// The host session.
    session: Arc<AgentSession>,
    agents: Arc<Agents>,
    /// Live tunnels by name.
    tunnels: Mutex<HashMap<Arc<str>, Arc<AgentSession>>>,
    /// Tunnels live or being registered, against [`MAX_TUNNELS_PER_HOST`].
    held: AtomicUsize,
    /// Answers and closures for the control writer. Unbounded: one answer per registration the
    /// host sent (and it cannot send more than the control stream carries), one closure per
    /// tunnel.
    out: mpsc::UnboundedSender<Control>,
    /// When recent registrations failed authentication: a host guessing credentials is slowed
    /// to the agent port's own limit (`auth_failure_limit` a minute) without harming its other
    /// tunnels.
    failures: Mutex<VecDeque<Instant>>,
    /// Per name, the end of the latest registration or removal the host asked for: each waits
    /// for the one before, so `Register` then `Unregister` of a name act in that order.
    ops: Mutex<HashMap<Arc<str>, (u64, CancellationToken)>>,
    next_op: AtomicU64,
}

/// One registration or removal's place in its name's order; dropping it lets the next go.
struct OpTurn {
    host: Arc<Host>,
    name: Arc<str>,
    id: u64,
    done: CancellationToken,
}

impl Drop for OpTurn {
    fn drop(&mut self) {
        self.done.cancel();
        let mut ops = self.host.ops.lock().unwrap_or_else(|p| p.into_inner());
        if ops.get(&self.name).is_some_and(|(id, _)| *id == self.id) {
            ops.remove(&self.name);
        }
    }
}

/// Gives a tunnel's place among its host's back when dropped.
struct HeldTunnel(Arc<Host>);

impl Drop for HeldTunnel {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Host {
    /// The tunnels of host session `session`, and where their frames for the host come out.
    pub fn new(session: Arc<AgentSession>, agents: Arc<Agents>) -> (Arc<Host>, HostOutbox) {
        let (out, rx) = mpsc::unbounded_channel();
        let host = Arc::new(Host {
            session,
            agents,
            tunnels: Mutex::default(),
            held: AtomicUsize::new(0),
            out,
            failures: Mutex::default(),
            ops: Mutex::default(),
            next_op: AtomicU64::new(0),
        });
        (host, rx)
    }

    /// Queues an operation on `name` behind the host's previous one (in the order the frames
    /// came): the previous one's end to wait for, and this one's place.
    fn queue(self: &Arc<Self>, name: &str) -> (Option<CancellationToken>, OpTurn) {
        let id = self.next_op.fetch_add(1, Ordering::Relaxed);
        let done = CancellationToken::new();
        let name: Arc<str> = Arc::from(name);
        let previous = self
            .ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), (id, done.clone()))
            .map(|(_, t)| t);
        let turn = OpTurn {
            host: self.clone(),
            name,
            id,
            done,
        };
        (previous, turn)
    }

    fn reply(&self, id: u64, reply: TunnelReply) {
        let _ = self.out.send(Control::Registered { id, reply });
    }

    fn tunnels(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<AgentSession>>> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a tunnel on a task of `tasks` (the host's heartbeats carry on meanwhile); the
    /// answer goes out through the control writer. Registrations in progress count towards
    /// [`MAX_TUNNELS_PER_HOST`] with the live tunnels, so a flood of them cannot pile up tasks.
    pub fn register(self: &Arc<Self>, id: u64, tunnel: TunnelHello, tasks: &TaskTracker) {
        let name = shown(&tunnel.name);
        if self.held.fetch_add(1, Ordering::Relaxed) >= MAX_TUNNELS_PER_HOST {
            self.held.fetch_sub(1, Ordering::Relaxed);
            let detail = format!(
                "{MAX_TUNNELS_PER_HOST} tunnels on one host session (remove some, or run a second host agent)"
            );
            rate_limited_warn("host tunnels full", || {
                tracing::warn!("refusing tunnel {name:?}: {detail}")
            });
            self.reply(id, TunnelReply::Refused(Refusal::CredentialFull { detail }));
            return;
        }
        let held = HeldTunnel(self.clone());
        let (previous, turn) = self.queue(&tunnel.name);
        let span = tracing::info_span!("tunnel", tunnel = %name);
        let host = self.clone();
        tasks.spawn(
            async move {
                if let Some(previous) = previous {
                    previous.cancelled().await;
                }
                let registered = host.clone().register_and_run(id, tunnel, held, turn);
                if let Err(refusal) = registered.await {
                    host.reply(id, TunnelReply::Refused(refusal.sanitized()));
                }
            }
            .instrument(span),
        );
    }

    /// Places the tunnel, answers, and serves it until it ends; `Err`: the refusal to answer.
    async fn register_and_run(
        self: Arc<Self>,
        id: u64,
        tunnel: TunnelHello,
        held: HeldTunnel,
        turn: OpTurn,
    ) -> Result<(), Refusal> {
        let agents = self.agents.clone();
        let name = shown(&tunnel.name);
        if let Some(refusal) = self.limited() {
            rate_limited_warn("host registrations limited", || {
                tracing::warn!("refusing tunnel {name:?}: {refusal}")
            });
            return Err(refusal);
        }
        let checked = self.check(&tunnel);
        let (credential, jump_keys) = match checked {
            Ok(ok) => ok,
            Err(refusal) => {
                let refusal = refusal.sanitized();
                let guessing = HandshakeError::Refused(refusal.clone());
                agents.metrics.handshake_failed(guessing.metric());
                if guessing.counts_as_failure() {
                    self.failed();
                }
                // Never the token: the name, the host and why.
                tracing::warn!(
                    host = %self.session.name,
                    "refusing tunnel {name:?} registered by host {:?}: {refusal}",
                    &*self.session.name
                );
                return Err(refusal);
            }
        };
        let claim = Claim {
            name: &tunnel.name,
            services: &tunnel.services,
            credential: &credential,
            host_id: Some(self.session.id),
        };
        // Boxed: placement's state (the lease store's futures) must not size a live tunnel's
        // task, which lives as long as the tunnel.
        let claimed = match Box::pin(placement::claim(&agents, &claim)).await {
            Ok(claimed) => claimed,
            Err(refusal) => {
                tracing::warn!(credential = %credential, "refusing tunnel {name:?}: {refusal}");
                return Err(refusal);
            }
        };
        let allocations = claimed.allocations(&tunnel.services);
        let session = &self.session;
        let parts = SessionParts {
            remote: session.remote,
            lanes: session.lanes.clone(),
            permits: session.permits.clone(),
            cancel: session.cancel.child_token(),
            credential,
            jump_keys,
            tunnel: Some(TunnelOf {
                host: session.name.clone(),
                host_id: session.id,
                quiet: Default::default(),
                closed_by: Mutex::default(),
            }),
        };
        let (agent, ports) =
            placement::register(claimed, &tunnel.name, &tunnel.services, parts, &agents);
        self.tunnels().insert(agent.name.clone(), agent.clone());
        tracing::info!(credential = %agent.credential, "tunnel registered");
        serve_ports(&agent, ports, &agents);
        self.reply(
            id,
            TunnelReply::Accepted {
                services: allocations,
            },
        );
        drop((tunnel, turn));
        self.run(agent, held).await;
        Ok(())
    }

    /// Authenticates a registration with its own credential, as a hello would be, and checks
    /// what it asks for.
    #[allow(clippy::type_complexity)]
    fn check(
        &self,
        tunnel: &TunnelHello,
    ) -> Result<
        (
            crate::policy::Credential,
            Option<Arc<[russh::keys::ssh_key::public::KeyData]>>,
        ),
        Refusal,
    > {
        let bad = |detail: String| Refusal::BadRequest { detail };
        let Some(token) = tunnel.token.as_ref() else {
            return Err(bad(
                "the tunnel has no credential: each tunnel needs its own (the job's token or signed join token); the host session's credential grants no tunnel name".into(),
            ));
        };
        // The tunnel's own token decides; the host's certificate, if any, is the host's.
        let credential = self
            .agents
            .policy
            .current()
            .authorize(Some(token), &[], &tunnel.name)?;
        validate_name("tunnel", &tunnel.name).map_err(|e| bad(e.to_string()))?;
        if *tunnel.name == *self.session.name {
            return Err(bad(format!(
                "the tunnel {:?} has the host session's own name; give the tunnel a name of its own",
                tunnel.name
            )));
        }
        check_services(&tunnel.services, &self.agents)?;
        let keys = crate::jump::auth::agent_keys(&tunnel.jump_keys).map_err(bad)?;
        Ok((credential, keys))
    }

    /// The refusal for a host that failed too many registrations lately, if it did.
    fn limited(&self) -> Option<Refusal> {
        let limit = self.agents.config.auth_failure_limit.max(1) as usize;
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        while failures
            .front()
            .is_some_and(|t| now.duration_since(*t) >= FAILURE_WINDOW)
        {
            failures.pop_front();
        }
        let oldest = *failures.front()?;
        (failures.len() >= limit).then(|| {
            let wait = FAILURE_WINDOW.saturating_sub(now.duration_since(oldest));
            Refusal::Unavailable {
                detail: format!(
                    "{limit} registrations on this host session failed authentication within {FAILURE_WINDOW:?} \
                     (auth_failure_limit); registrations resume in {}s",
                    wait.as_secs().max(1)
                ),
            }
        })
    }

    fn failed(&self) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.push_back(Instant::now());
        let limit = self.agents.config.auth_failure_limit.max(1) as usize;
        while failures.len() > limit {
            failures.pop_front();
        }
    }

    /// Serves a registered tunnel until it ends, then tears it down as an agent session and
    /// tells the host why, unless the host asked for it or is gone.
    async fn run(&self, agent: Arc<AgentSession>, held: HeldTunnel) {
        let agents = &self.agents;
        agent.cancel.cancelled().await;
        let host_gone = self.session.cancel.is_cancelled();
        let reason = if host_gone {
            None
        } else {
            Some(self.closed_because(&agent))
        };
        let said = match &reason {
            Some(r) => r.to_string(),
            None => "its host session ended".into(),
        };
        end_session(&agent, agents, &said).await;
        agents.leases.persist_or_warn().await;
        {
            let mut tunnels = self.tunnels();
            if tunnels.get(&agent.name).is_some_and(|t| t.id == agent.id) {
                tunnels.remove(&agent.name);
            }
        }
        drop(held);
        let quiet = agent
            .tunnel
            .as_ref()
            .is_some_and(|t| t.quiet.load(Ordering::Relaxed));
        match reason {
            Some(reason) if !quiet => {
                tracing::info!("tunnel closed by the relay: {reason}; lease kept");
                let _ = self.out.send(Control::TunnelClosed {
                    name: agent.name.to_string(),
                    reason,
                });
            }
            _ => tracing::info!("tunnel closed ({said}); lease kept"),
        }
    }

    /// Why the relay ended a tunnel of a live host: revoked, shutting down, or what the code
    /// that ended it recorded (a takeover, an operator).
    fn closed_because(&self, agent: &AgentSession) -> Refusal {
        let policy = self.agents.policy.current();
        if !policy.still_allows(&agent.credential, &agent.name) {
            return Refusal::Unauthorized;
        }
        if self.agents.shutdown.is_cancelled() {
            return Refusal::ShuttingDown;
        }
        agent
            .tunnel
            .as_ref()
            .and_then(|t| t.closed_by.lock().unwrap_or_else(|p| p.into_inner()).take())
            .unwrap_or_else(|| Refusal::Unavailable {
                detail: "closed by the relay".into(),
            })
    }

    /// Ends one of this host's tunnels at its request, on a task of `tasks`: its ports close
    /// now; with `release` its leases go too (as the admin API's
    /// `DELETE /api/agents/NAME?release=true`), otherwise they age as a departed agent's.
    /// Names this host does not carry are ignored; a registration of the name sent before is
    /// answered first.
    pub fn unregister(self: &Arc<Self>, name: String, release: bool, tasks: &TaskTracker) {
        let (previous, op) = self.queue(&name);
        let host = self.clone();
        let span = tracing::info_span!("tunnel", tunnel = %shown(&name));
        tasks.spawn(
            async move {
                if let Some(previous) = previous {
                    previous.cancelled().await;
                }
                let Some(tunnel) = host.tunnels().get(name.as_str()).cloned() else {
                    tracing::debug!("ignoring unregister: no tunnel of this host by that name");
                    return;
                };
                let agents = &host.agents;
                // Under the name's turn: a registration of the same name waits until this is
                // done, and what is released is still this tunnel's.
                let turn = agents.registry.turn(&tunnel.name).await;
                let current = agents.registry.get(&tunnel.name);
                if current.is_none_or(|c| c.id != tunnel.id) {
                    return; // replaced meanwhile: the newer one stays
                }
                if let Some(t) = &tunnel.tunnel {
                    t.quiet.store(true, Ordering::Relaxed);
                }
                tunnel.cancel.cancel();
                let _ = tokio::time::timeout(UNREGISTER_WAIT, tunnel.finished.cancelled()).await;
                if release {
                    match agents.leases.release(&tunnel.name).await {
                        Ok(ports) => {
                            for port in &ports {
                                agents.ports.close(*port);
                            }
                            agents.leases.persist_or_warn().await;
                            tracing::info!(?ports, "tunnel unregistered; leases released");
                        }
                        Err(e) => tracing::warn!(
                            "tunnel unregistered, but its leases could not be released (they age instead): {e}"
                        ),
                    }
                } else {
                    tracing::info!("tunnel unregistered; lease kept");
                }
                drop((turn, op));
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` would return, without calling it.
    fn returned_size<A, R>(_: &impl FnOnce(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every live tunnel holds its registration task for as long as it runs, so its size is
    /// part of the relay's memory per tunnel (issue 28: no more than per agent). Placement is
    /// boxed out of it.
    #[test]
    fn the_task_of_a_live_tunnel_stays_small() {
        let task = returned_size(&|(host, id, tunnel, held, turn): (
            Arc<Host>,
            u64,
            TunnelHello,
            HeldTunnel,
            OpTurn,
        )| { host.register_and_run(id, tunnel, held, turn) });
        eprintln!("tunnel task future: {task} bytes");
        assert!(
            task <= 2 * 1024,
            "a tunnel's task future is {task} bytes: box what it awaits only once (placement, lease store calls)"
        );
    }
}
