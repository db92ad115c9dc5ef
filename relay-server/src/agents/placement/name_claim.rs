//! A name's claim on its ports, shared by an agent's hello and a tunnel registered over a host
//! session: under the name's turn, only the identity holding the name takes it over, the
//! session it replaces ends first, the credential's caps are checked, every service gets a
//! leased port with a bound listener, and the session is registered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jumpgate_lease::{AllocError, GrantKind, ServiceAsk};
use jumpgate_proto::{Allocation, Refusal, ServiceRequest};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::agents::lanes::Lanes;
use crate::agents::registry::{AgentSession, NameTurn, ServiceEndpoint, SessionSlot, TunnelOf};
use crate::agents::Agents;
use crate::guard::TokenBucket;
use crate::leases::{PlaceError, StoreError};
use crate::net::rate_limited_warn;
use crate::policy::Credential;

/// The listener of a granted port.
pub(crate) enum PortSocket {
    /// Bound for this session.
    Fresh(TcpListener),
    /// Kept by the relay since the agent's last session (or the relay's start).
    Kept,
}

/// Where one service of the hello ended up.
struct ServicePlace {
    /// Public port; 0 for a service reachable only through the name router.
    port: u16,
    /// Why it is not the port the agent had or asked for.
    note: Option<String>,
    /// The service kept the port it had.
    renewed: bool,
    socket: Option<PortSocket>,
}

/// Longest a newcomer waits for the session it replaces to release its ports. Teardown is
/// bounded (control writes, the yamux close), so this is reached only if something is badly
/// wrong; the newcomer is then told to retry rather than waiting forever with its name's turn.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// A name asking for ports: an agent's hello, or a tunnel registered over a host session.
pub(crate) struct Claim<'a> {
    /// The name (validated).
    pub name: &'a str,
    /// Its services (validated).
    pub services: &'a [ServiceRequest],
    /// How it authenticated.
    pub credential: &'a Credential,
    /// For a tunnel: the id of the host session registering it, so a tunnel of that session
    /// it replaces ends without a [`jumpgate_proto::Control::TunnelClosed`].
    pub host_id: Option<u64>,
}

/// A name's ports, bound and leased, under its turn: the session gets registered next.
pub(crate) struct Claimed<'a> {
    turn: NameTurn<'a>,
    places: Vec<ServicePlace>,
    slot: SessionSlot,
}

impl<'a> Claimed<'a> {
    /// Whether any service kept the port it had.
    fn renewed(&self) -> bool {
        self.places.iter().any(|p| p.renewed)
    }

    /// What the agent is told about each service, in request order.
    pub fn allocations(&self, services: &[ServiceRequest]) -> Vec<Allocation> {
        self.places
            .iter()
            .zip(services)
            .map(|(place, req)| Allocation {
                name: req.name.clone(),
                port: place.port,
                note: place.note.clone(),
            })
            .collect()
    }

    /// The services' endpoints with their listeners, and the slot the session keeps.
    fn into_parts(
        self,
        services: &[ServiceRequest],
        agents: &Agents,
    ) -> (
        NameTurn<'a>,
        Vec<(ServiceEndpoint, Option<PortSocket>)>,
        SessionSlot,
        bool,
    ) {
        let renewed = self.renewed();
        let now = std::time::Instant::now();
        let burst = f64::from(agents.policy.current().users.max_new_conns_per_sec) * 2.0;
        let ports = self
            .places
            .into_iter()
            .zip(services)
            .map(|(place, req)| {
                let endpoint = ServiceEndpoint {
                    name: Arc::from(req.name.as_str()),
                    port: place.port,
                    target_port: req.target_port,
                    allow: Arc::from(req.allow.as_slice()),
                    stats: Arc::default(),
                    bucket: Arc::new(std::sync::Mutex::new(TokenBucket::new(burst, now))),
                    sources: Arc::default(),
                };
                (endpoint, place.socket)
            })
            .collect();
        (self.turn, ports, self.slot, renewed)
    }
}

/// What a new session needs besides its ports: built by the caller once the name is claimed.
pub(crate) struct SessionParts {
    /// The session's address as the relay sees it.
    pub remote: std::net::SocketAddr,
    /// Its connections.
    pub lanes: Arc<Lanes>,
    /// Caps its concurrent user connections.
    pub permits: Arc<Semaphore>,
    /// Fired to end it.
    pub cancel: CancellationToken,
    /// How it authenticated.
    pub credential: Credential,
    /// Its own jump keys.
    pub jump_keys: Option<Arc<[russh::keys::ssh_key::public::KeyData]>>,
    /// Set for a tunnel of a host session.
    pub tunnel: Option<TunnelOf>,
}

/// Registers the session that claimed its name's ports, then gives the name's turn back: one
/// code path for agents and tunnels.
pub(crate) fn register(
    claimed: Claimed<'_>,
    name: &str,
    services: &[ServiceRequest],
    parts: SessionParts,
    agents: &Agents,
) -> (
    Arc<AgentSession>,
    Vec<(ServiceEndpoint, Option<PortSocket>)>,
) {
    let (turn, ports, slot, renewed) = claimed.into_parts(services, agents);
    let agent = Arc::new(AgentSession {
        id: next_session_id(),
        name: Arc::from(name),
        remote: parts.remote,
        lanes: parts.lanes,
        permits: parts.permits,
        cancel: parts.cancel,
        finished: CancellationToken::new(),
        services: ports.iter().map(|(e, _)| e.clone()).collect(),
        connected_at: SystemTime::now(),
        credential: parts.credential,
        slot: std::sync::Mutex::new(Some(slot)),
        jump_keys: parts.jump_keys,
        tunnel: parts.tunnel,
    });
    agents.registry.insert(agent.clone());
    drop(turn);
    agents.metrics.sessions.fetch_add(1, Ordering::Relaxed);
    if renewed {
        agents.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    (agent, ports)
}

/// Claims a name's ports under its turn (one admission per name at a time): only the identity
/// holding the name may take it over, the session or tunnel it replaces is ended first, the
/// credential's caps are checked, and every service gets a leased port with a bound listener.
/// Shared by agents' hellos and host sessions' registrations.
pub(crate) async fn claim<'a>(agents: &'a Agents, c: &Claim<'_>) -> Result<Claimed<'a>, Refusal> {
    let config = &agents.config;
    let name = c.name;
    // One session per name at a time: a newcomer waits here until the old one is torn down.
    let turn = agents.registry.turn(name).await;
    if agents.shutdown.is_cancelled() {
        return Err(Refusal::ShuttingDown);
    }
    // Only the identity that holds a name, live or by its leases, may take it over.
    let identity = c.credential.identity();
    let (stored_holder, previous) = agents.leases.name_state(name).await.map_err(store_down)?;
    let live = agents.registry.get(name);
    let holder = live
        .as_ref()
        .map(|s| s.credential.identity())
        .or(stored_holder);
    if let Some(holder) = holder.filter(|h| *h != identity) {
        tracing::warn!("refusing {identity} the name {name:?}: it is held by {holder}");
        return Err(Refusal::NameHeld { name: name.into() });
    }
    // The host registering a name it carries already replaces its own tunnel: no report.
    if let Some(tunnel) = live.as_ref().and_then(|s| s.tunnel.as_ref()) {
        if Some(tunnel.host_id) == c.host_id {
            tunnel.quiet.store(true, Ordering::Relaxed);
        }
    }
    drop(live);
    match agents.registry.take_over(name, TAKEOVER_WAIT).await {
        Ok(Some(old)) => {
            tracing::info!(old = %old, "new session for this agent replaces the one from {old}")
        }
        Ok(None) => {}
        Err(old) => {
            let detail = format!(
                "the agent's previous session (from {old}) did not release its ports within {TAKEOVER_WAIT:?}"
            );
            return Err(Refusal::Unavailable { detail });
        }
    }
    let caps = agents.policy.current().caps(c.credential);
    // Counted before the lease store is asked (and given back if placement fails), so a
    // credential's concurrent hellos cannot overshoot its session cap.
    let slot = match agents.registry.admit(&identity, caps.map(|c| c.sessions)) {
        Ok(slot) => slot,
        Err(cap) => {
            tracing::warn!(
                "refusing {identity} the name {name:?}: it has {cap} sessions on this relay, its maximum"
            );
            let detail = format!("{cap} sessions on this relay (stop one of its agents)");
            return Err(Refusal::CredentialFull { detail });
        }
    };
    let asks: Vec<ServiceAsk> = c
        .services
        .iter()
        .filter(|s| !s.no_port)
        .map(|s| ServiceAsk {
            service: s.name.clone(),
            preferred: s.preferred_port,
            strict: s.strict,
        })
        .collect();
    let bind_ip = config.proxy_bind;
    let lease_op = std::time::Instant::now();
    let ports = &agents.ports;
    // Out of file descriptors, every bind fails the same way: that is not "this port is taken",
    // so no other port is tried (nor logged) and the agent is told the relay's problem.
    let out_of_files = AtomicBool::new(false);
    let placement = agents.leases.place(name, &identity, caps, &asks, |port| {
        if ports.is_kept_for(port, name) {
            return Some(Socket::Kept);
        }
        if ports.is_kept(port) {
            return None; // another agent's lease, closing as it expires
        }
        if out_of_files.load(Ordering::Relaxed) {
            return None;
        }
        match std::net::TcpListener::bind((bind_ip, port)) {
            Ok(listener) => Some(Socket::Fresh(listener)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                out_of_files.store(true, Ordering::Relaxed);
                rate_limited_warn("placement out of files", || {
                    tracing::error!("cannot bind a port for an agent: {e}; each agent needs two file descriptors (its connection and its port's listener): raise LimitNOFILE")
                });
                None
            }
            Err(e) => {
                tracing::warn!(
                    port,
                    "skipping port {port}: cannot bind {bind_ip}:{port} (--proxy-bind / proxy_bind, a port of --port-range / port_range): {e}; another process holds it, or proxy_bind is not an address of this host"
                );
                None
            }
        }
    })
    .await;
    let mut placement = match placement {
        Ok(p) => p,
        Err(_) if out_of_files.load(Ordering::Relaxed) => {
            let detail = "the relay is out of file descriptors".to_string();
            return Err(Refusal::Unavailable { detail });
        }
        Err(e) => return Err(refusal_for(e, name)),
    };
    // A lease that moved (its old port taken, another port preferred) leaves its old port, and
    // so does a service the hello no longer lists (the store released its lease, or keeps it
    // for the name's live session on another relay).
    for (service, port) in previous {
        if !placement.grants.iter().any(|g| g.port == port) {
            if !asks.iter().any(|a| a.service == service) {
                tracing::info!(
                    service = %service,
                    port,
                    "the agent no longer asks for service {service:?}; its port {port} closes here (its lease ends, unless the name is live on another relay of the fleet)"
                );
            }
            ports.close(port);
        }
    }
    let mut places = Vec::with_capacity(c.services.len());
    let mut grants = placement.grants.iter();
    for req in c.services {
        if req.no_port {
            places.push(ServicePlace {
                port: 0,
                note: Some("reachable through the relay's name router only".into()),
                renewed: false,
                socket: None,
            });
            continue;
        }
        let Some(g) = grants.next() else {
            break;
        };
        if let Some(note) = &g.note {
            tracing::info!(service = %g.service, port = g.port, "{note}");
        }
        let socket = match placement.listeners.remove(&g.port) {
            None => Err(format!("port {} was granted but not bound", g.port)),
            Some(Socket::Kept) => Ok(PortSocket::Kept),
            Some(Socket::Fresh(l)) => l
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(l))
                .map(PortSocket::Fresh)
                .map_err(|e| format!("cannot listen on port {}: {e}", g.port)),
        };
        match socket {
            Ok(socket) => places.push(ServicePlace {
                port: g.port,
                note: g.note.clone(),
                renewed: g.kind == GrantKind::Renewed,
                socket: Some(socket),
            }),
            Err(detail) => {
                agents.leases.deactivate(name).await;
                return Err(Refusal::Unavailable { detail });
            }
        }
    }
    agents.leases.persist_or_warn().await;
    agents.metrics.placed(lease_op.elapsed());
    Ok(Claimed { turn, places, slot })
}

/// A granted port's listener, as the placement's bind step finds it.
enum Socket {
    Fresh(std::net::TcpListener),
    Kept,
}

/// What the agent is told when its services got no ports.
fn refusal_for(e: PlaceError, name: &str) -> Refusal {
    match e {
        PlaceError::Alloc(AllocError::Exhausted { lo, hi, in_use }) => {
            Refusal::RangeExhausted { lo, hi, in_use }
        }
        PlaceError::Alloc(AllocError::PreferredUnavailable { service, port, why }) => {
            Refusal::PreferredPortUnavailable { service, port, why }
        }
        PlaceError::Unsettled => Refusal::Unavailable {
            detail: e.to_string(),
        },
        PlaceError::HeldByAnother => Refusal::NameHeld { name: name.into() },
        PlaceError::CredentialFull(detail) => Refusal::CredentialFull { detail },
        PlaceError::LocalConflict { port } => {
            tracing::error!(
                agent = name,
                port,
                "the fleet's lease store gives this agent port {port}, which another process holds on this relay; \
                 the agent keeps its port on the other relays and is asked to retry here (free the port to fix)"
            );
            Refusal::Unavailable {
                detail: e.to_string(),
            }
        }
        PlaceError::Store(e) => store_down(e),
    }
}

/// What the agent is told when the lease store cannot be reached: come back later.
fn store_down(e: StoreError) -> Refusal {
    tracing::warn!("refusing an agent for now: {e}");
    Refusal::Unavailable {
        detail: e.to_string(),
    }
}

fn next_session_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
