//! The agent port: where worker agents connect, and what becomes of each connection.
//!
//! A connection goes through three phases, each its own module with a type between them:
//! [`handshake`] (TLS, hello, authentication → [`handshake::Handshaken`]), [`placement`] (takeover,
//! leased and bound ports, the reply, registration → [`placement::Placed`]) and [`session`] (ports
//! served, heartbeats, teardown). A connection that presents a live session's lane key joins that
//! session instead ([`lane`]). Live sessions are found by name in the [`registry`]; a session's
//! connections are its [`lanes`]. A host session (protocol version 3) also carries the tunnels
//! of many jobs, each registered on its control stream with its own credential, placed by the
//! same [`placement::claim`] and kept in the registry as a session of its own that shares the
//! host's lanes ([`host`]).

pub(crate) mod handshake;
pub(crate) mod hold;
pub(crate) mod host;
pub(crate) mod io;
pub(crate) mod lane;
pub(crate) mod lanes;
pub(crate) mod placement;
pub(crate) mod registry;
pub(crate) mod session;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jumpgate_transport::mux::MuxSettings;
use jumpgate_transport::socket;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::RelayConfig;
use crate::fleet::Fleet;
use crate::guard::{AuthGuard, PerSource, SourceSlot};
use crate::leases::LeaseStore;
use crate::metrics::{HandshakeFailure, Metrics};
use crate::net::{accept_backoff, rate_limited_warn};
use crate::policy::PolicyCell;
use crate::shards::Shards;
use crate::users::ports::Ports;
use crate::users::Users;
use crate::webhook::Webhooks;

use self::handshake::HandshakeError;
use self::io::AgentIo;
use self::registry::Registry;

/// Most agent handshakes one source address (an IPv6 /64) may have in progress, given the
/// global cap `max_handshakes`: a quarter of it, at least one, at most 128 (the default cap of
/// 1,024 gives 128). Far above what a NAT full of workers reconnecting at once needs (a
/// handshake takes milliseconds, and an agent refused here retries), and a fraction of the
/// global cap whatever it is set to, so one address holding idle connections cannot keep agents
/// from elsewhere out. A quarter rather than the router's eighth: workers behind one NAT
/// reconnect in bursts after a relay restart.
pub(crate) fn handshakes_per_source(max_handshakes: usize) -> usize {
    (max_handshakes / 4).clamp(1, 128)
}

/// What the agent port needs: everything a session touches from handshake to teardown.
pub(crate) struct Agents {
    /// Validated settings.
    pub config: Arc<RelayConfig>,
    /// TLS for the agent port.
    pub acceptor: TlsAcceptor,
    /// Credentials, swapped on reload.
    pub policy: Arc<PolicyCell>,
    /// Bans for addresses that keep failing the handshake.
    pub guard: AuthGuard,
    /// Caps handshakes in progress.
    pub handshakes: Arc<Semaphore>,
    /// Caps handshakes in progress per source address, below the global cap.
    pub handshakes_per_source: Arc<PerSource>,
    /// Most handshakes one source may have in progress ([`handshakes_per_source`]).
    pub max_handshakes_per_source: usize,
    /// Event counters.
    pub metrics: Arc<Metrics>,
    /// Lifecycle events for the platform.
    pub webhooks: Arc<Webhooks>,
    /// Port leases.
    pub leases: Arc<LeaseStore>,
    /// Live sessions by name.
    pub registry: Arc<Registry>,
    /// The public side, which serves a session's ports.
    pub users: Arc<Users>,
    /// The allocated ports the relay keeps bound.
    pub ports: Arc<Ports>,
    /// Fired on SIGTERM: stop accepting, tell agents to go elsewhere.
    pub shutdown: CancellationToken,
    /// Fired after the drain: end every session.
    pub close_sessions: CancellationToken,
    /// Agent connections, waited for at the end of the drain.
    pub tasks: TaskTracker,
    /// The relays agents are told to keep a session with.
    pub fleet: Arc<Fleet>,
}

impl Agents {
    /// Whether the operator exempted `ip` from bans (`ban_exempt_cidr`).
    fn ban_exempt(&self, ip: IpAddr) -> bool {
        self.policy
            .current()
            .ban_exempt
            .iter()
            .any(|c| c.contains(ip))
    }
}

/// Accepts agents until shutdown. Banned addresses and connections beyond the handshake cap are
/// closed before any TLS work is spent on them; sessions run on `shards` when there are any.
pub(crate) async fn accept(agents: Arc<Agents>, listener: TcpListener, shards: Option<&Shards>) {
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    loop {
        let accepted = tokio::select! {
            _ = agents.shutdown.cancelled() => return,
            _ = sweep.tick() => {
                agents.guard.sweep(Instant::now());
                continue;
            }
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(ok) => ok,
            Err(e) => {
                accept_backoff("agent port", e).await;
                continue;
            }
        };
        let Some(permit) = take_handshake_slot(&agents, peer) else {
            continue;
        };
        let connection = {
            let agents = agents.clone();
            move |tcp| serve_connection(AgentIo::Tcp(tcp), peer, agents, permit)
        };
        match shards {
            Some(shards) => shards.spawn(&agents.tasks, tcp, connection),
            None => {
                agents.tasks.spawn(connection(tcp));
            }
        }
    }
}

/// Admits a new connection from `peer` to the handshake, or says why not (logged, counted):
/// a banned address, or its share or the whole of the handshakes in progress taken. The agent
/// port asks at accept, the WebSocket port once it knows the client's address.
pub(crate) fn take_handshake_slot(agents: &Agents, peer: SocketAddr) -> Option<HandshakeSlot> {
    if agents.guard.is_banned(peer.ip(), Instant::now()) && !agents.ban_exempt(peer.ip()) {
        tracing::debug!(%peer, "closing connection from banned address");
        agents.metrics.handshake_failed(HandshakeFailure::Banned);
        return None;
    }
    let Some(source) = agents
        .handshakes_per_source
        .try_take(peer.ip(), agents.max_handshakes_per_source)
    else {
        agents.metrics.handshake_failed(HandshakeFailure::Overload);
        rate_limited_warn(
            "handshakes per source",
            || tracing::warn!(%peer, "too many agent handshakes in progress from {}; closing its new connections", peer.ip()),
        );
        return None;
    };
    let Ok(global) = agents.handshakes.clone().try_acquire_owned() else {
        agents.metrics.handshake_failed(HandshakeFailure::Overload);
        rate_limited_warn(
            "handshakes",
            || tracing::warn!(%peer, "too many agent handshakes in progress; closing new connections"),
        );
        return None;
    };
    Some(HandshakeSlot {
        _global: global,
        _source: source,
    })
}

/// A connection's place among handshakes in progress, globally and for its source address.
pub(crate) struct HandshakeSlot {
    _global: OwnedSemaphorePermit,
    _source: SourceSlot,
}

/// Serves one connection on the agent port and logs its outcome; failures that look like
/// guessing or garbage count towards a ban of the address. `handshake` is the connection's slot
/// among handshakes in progress, given back once it is authenticated.
pub(crate) async fn serve_connection(
    io: AgentIo,
    peer: SocketAddr,
    agents: Arc<Agents>,
    handshake: HandshakeSlot,
) {
    let span = tracing::info_span!(
        "agent",
        addr = %peer,
        via = io.transport(),
        name = tracing::field::Empty
    );
    async move {
        let Err(e) = phases(io, peer, &agents, handshake).await else {
            return;
        };
        // Escaped and cut short: a decoder's or TLS library's message can quote the peer.
        let shown = jumpgate_proto::display::shown(&e);
        match &e {
            // Sanitized when it was sent (handshake::refuse).
            HandshakeError::Refused(r) => tracing::warn!("agent refused: {r}"),
            HandshakeError::Timeout => {
                tracing::info!("agent connection dropped during handshake: {shown}")
            }
            _ => tracing::warn!("agent connection dropped during handshake: {shown}"),
        }
        agents.metrics.handshake_failed(e.metric());
        if agents.ban_exempt(peer.ip()) {
            return;
        }
        let now = Instant::now();
        let ban = match &e {
            // Forgiven up to a point: past it, idle connections holding slots count too.
            HandshakeError::Timeout => agents.guard.record_timeout(peer.ip(), now),
            e if e.counts_as_failure() => agents.guard.record_failure(peer.ip(), now),
            _ => return,
        };
        if let Some(ban) = ban {
            tracing::warn!(
                ip = %peer.ip(),
                "banning {} for {ban:?} after {} failed agent handshakes within a minute \
                 (IPv6: its /64; handshake timeouts count past {} a minute); exempt an address with ban_exempt_cidr",
                peer.ip(),
                agents.config.auth_failure_limit,
                crate::guard::TIMEOUTS_FORGIVEN
            );
        }
    }
    .instrument(span)
    .await
}

/// Handshake, then either a lane of a live session or a new session: placement, then running.
async fn phases(
    io: AgentIo,
    peer: SocketAddr,
    agents: &Arc<Agents>,
    handshake: HandshakeSlot,
) -> Result<(), HandshakeError> {
    // Boxed: the handshake, the hello and placement (or a lane) end here. Inline, their state
    // (TLS handshake, the handshaken connection, the lease store's futures) would size the
    // future every session holds for as long as it runs.
    let Some(placed) = Box::pin(admit(io, peer, agents, handshake)).await? else {
        return Ok(());
    };
    session::run(placed, agents).await;
    Ok(())
}

/// Handshake, then a lane of a live session (served here until it closes: `None`) or the new
/// session's placement.
async fn admit(
    io: AgentIo,
    peer: SocketAddr,
    agents: &Arc<Agents>,
    handshake: HandshakeSlot,
) -> Result<Option<placement::Placed>, HandshakeError> {
    let accepted_at = Instant::now();
    // Boxed: the TLS handshake's state ends here and must not size a lane's future.
    let handshaken = Box::pin(handshake::handshake(io, agents)).await?;
    // A valid credential alone does not spare the address from bans: only a placed session or
    // a joined lane does (below), so a credential refused its name or lane cannot buy its
    // address an hour of free guessing.
    // From accept to a hello is one round trip (TLS 1.3) plus the handshake's CPU time.
    let handshake_time = accepted_at.elapsed();
    let _ = socket::tune_for_path(handshaken.tls.get_ref().0.get_ref().tcp(), handshake_time);
    let mux_settings = MuxSettings::for_round_trip(handshake_time);
    if let Some(key) = handshaken.hello.lane_of.clone() {
        let name = handshaken.hello.name.clone();
        // Boxed: only lanes need a lane's state; placements need not carry it.
        Box::pin(lane::join_lane(
            handshaken.tls,
            lane::Joiner {
                name: &name,
                key: &key,
                credential: &handshaken.credential,
                peer,
            },
            agents,
            handshake,
            mux_settings,
        ))
        .await?;
        return Ok(None);
    }
    // Authenticated: the connection no longer counts among handshakes in progress, so waiting
    // for its name's turn or a takeover holds no slot an unauthenticated flood competes for.
    drop(handshake);
    // Boxed: placement awaits the lease store (a PostgreSQL transaction's state is kilobytes);
    // inline, it would size the future of every lane.
    let placed = Box::pin(placement::place(
        handshaken,
        peer,
        agents,
        handshake_time,
        mux_settings,
    ))
    .await?;
    agents.guard.record_success(peer.ip(), Instant::now());
    Ok(Some(placed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_gets_a_quarter_of_the_handshake_cap_whatever_it_is_set_to() {
        // A small cap must not leave one address a fixed 128 slots, i.e. all of them.
        assert_eq!(handshakes_per_source(8), 2);
        assert_eq!(handshakes_per_source(64), 16);
        assert_eq!(handshakes_per_source(1), 1);
        assert_eq!(handshakes_per_source(3), 1);
        // The default cap keeps the figure the scale runs were measured with.
        assert_eq!(handshakes_per_source(1024), 128);
        assert_eq!(handshakes_per_source(100_000), 128);
    }

    /// The size of the future `f` would return, without calling it.
    fn returned_size<A, R>(_: &impl FnOnce(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every connected agent holds one such task for as long as its session runs, so its size
    /// is part of the relay's memory per idle agent (issue 17: <= 30 KB per agent). Setup and
    /// the lease store's calls are boxed out of it: inline, the handshaken connection and the
    /// PostgreSQL store's futures made it 10.8 KB (debug and release alike); now it is 3.2 KB.
    /// The bound leaves room for small additions, not for another inlined store call (the
    /// PostgreSQL `deactivate` alone is 4.2 KB).
    #[test]
    fn the_task_of_an_idle_session_stays_small() {
        let task = returned_size(&|(io, peer, agents, slot): (
            AgentIo,
            SocketAddr,
            Arc<Agents>,
            HandshakeSlot,
        )| { serve_connection(io, peer, agents, slot) });
        let run = returned_size(
            &|(placed, agents): (placement::Placed, &'static Arc<Agents>)| {
                session::run(placed, agents)
            },
        );
        eprintln!("connection task future: {task} bytes; session::run future: {run} bytes");
        assert!(
            task <= 6 * 1024,
            "the connection task's future is {task} bytes (session::run: {run}): \
             box what it awaits only once (placement, lease store calls) so idle sessions do not carry it"
        );
    }
}
