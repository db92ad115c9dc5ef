//! One agent connection, from TLS accept to the release of its ports.
//!
//! TLS, then the preface and hello (both under the handshake timeout), authentication, takeover
//! of an older session with the same name, port allocation, the reply, and only then yamux.
//! While the session runs, the control stream carries heartbeats; silence longer than the
//! heartbeat timeout ends it. However it ends, its listeners are closed and its leases start
//! ageing before anything else may claim its name.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use jumpgate_proto::{
    negotiate_version, validate_name, Accepted, AgentHello, Allocation, Control, Grant, GrantKind,
    LaneGrant, Refusal, RelayHello, Secret, ServiceAsk, VersionProbe, PREFACE,
};
use jumpgate_transport::frame_io::{read_payload, spawn_frame_reader, write_frame, FrameIoError};
use jumpgate_transport::mux::{Inbound, Mode, MuxSettings, Session};
use jumpgate_transport::readahead::ReadAhead;
use jumpgate_transport::{socket, tls};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::guard::TokenBucket;
use crate::lanes::{Lanes, LANE_IDLE};
use crate::leases::now_secs;
use crate::metrics::HandshakeFailure;
use crate::policy::Credential;
use crate::proxy::serve_port;
use crate::registry::{AgentSession, ServiceEndpoint};
use crate::webhook::Event;
use crate::{RelayConfig, Shared};

type TlsStream = tokio_rustls::server::TlsStream<ReadAhead<TcpStream>>;

/// Most services one agent may expose.
const MAX_SERVICES: usize = 16;

/// Why a connection on the agent port did not become a session.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("handshake timed out")]
    Timeout,
    #[error("not a jumpgate agent (bad preface)")]
    Preface,
    #[error("{0}")]
    Frame(#[from] FrameIoError),
    #[error("refused: {0}")]
    Refused(Refusal),
}

/// Serves one connection on the agent port; logs its outcome. `handshake` is the slot this
/// connection holds among the handshakes in progress, given back once it is a session.
pub async fn handle_agent(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    handshake: OwnedSemaphorePermit,
) {
    let span = tracing::info_span!("agent", addr = %peer, name = tracing::field::Empty);
    async move {
        let Err(e) = serve_agent(tcp, peer, &shared, handshake).await else {
            return;
        };
        match &e {
            HandshakeError::Refused(r) => tracing::warn!("agent refused: {r}"),
            HandshakeError::Timeout => {
                tracing::info!("agent connection dropped during handshake: {e}")
            }
            e => tracing::warn!("agent connection dropped during handshake: {e}"),
        }
        shared.metrics.handshake_failed(e.metric());
        if e.counts_as_failure() {
            if let Some(ban) = shared
                .auth_guard
                .record_failure(peer.ip(), std::time::Instant::now())
            {
                tracing::warn!(
                    ip = %peer.ip(),
                    "banning {} for {ban:?} after {} failed agent handshakes within a minute",
                    peer.ip(),
                    shared.config.auth_failure_limit
                );
            }
        }
    }
    .instrument(span)
    .await
}

impl HandshakeError {
    /// The metric label for this failure.
    fn metric(&self) -> HandshakeFailure {
        match self {
            HandshakeError::Tls(_) => HandshakeFailure::Tls,
            HandshakeError::Timeout => HandshakeFailure::Timeout,
            HandshakeError::Preface | HandshakeError::Frame(_) => HandshakeFailure::Protocol,
            HandshakeError::Refused(r) => match r {
                Refusal::Unauthorized => HandshakeFailure::Unauthorized,
                Refusal::NameNotAllowed { .. } => HandshakeFailure::NameNotAllowed,
                Refusal::UnsupportedVersion { .. } => HandshakeFailure::Version,
                Refusal::BadRequest { .. } => HandshakeFailure::BadRequest,
                Refusal::RangeExhausted { .. }
                | Refusal::PreferredPortUnavailable { .. }
                | Refusal::Unavailable { .. } => HandshakeFailure::Allocation,
                Refusal::ShuttingDown | Refusal::LaneUnavailable { .. } => {
                    HandshakeFailure::Overload
                }
            },
        }
    }

    /// Whether this failure looks like guessing or garbage, and so counts towards a ban.
    /// Timeouts do not: idle connections are dealt with by the timeout and the handshake cap,
    /// and a flaky link must not get a NAT full of workers banned.
    fn counts_as_failure(&self) -> bool {
        match self {
            HandshakeError::Timeout => false,
            HandshakeError::Refused(r) => matches!(
                r,
                Refusal::Unauthorized | Refusal::NameNotAllowed { .. } | Refusal::BadRequest { .. }
            ),
            HandshakeError::Tls(_) | HandshakeError::Preface | HandshakeError::Frame(_) => true,
        }
    }
}

async fn serve_agent(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    handshake: OwnedSemaphorePermit,
) -> Result<(), HandshakeError> {
    let accepted_at = Instant::now();
    let Handshaken {
        mut tls,
        hello,
        version,
        credential,
    } = Box::pin(handshake_agent(tcp, shared)).await?; // boxed: its TLS state ends here
                                                       // From accept to a hello is one round trip (TLS 1.3) plus the handshake's CPU time.
    let handshake_time = accepted_at.elapsed();
    let _ = socket::tune_for_path(tls.get_ref().0.get_ref(), handshake_time);
    let mux_settings = MuxSettings::for_round_trip(handshake_time);
    if let Some(key) = &hello.lane_of {
        // Boxed: inline, a lane's connection state would size every session's future.
        return Box::pin(join_lane(
            tls,
            &hello.name,
            key,
            shared,
            handshake,
            mux_settings,
        ))
        .await;
    }

    // One session per name at a time: a newcomer waits here until the old one is torn down.
    let admission = shared.registry.admission(&hello.name);
    let admitted = admission.lock().await;
    if shared.shutdown.is_cancelled() {
        return Err(refuse(&mut tls, Refusal::ShuttingDown).await);
    }
    if let Some(old) = shared.registry.take_over(&hello.name).await {
        tracing::info!(old = %old, "new session for this agent replaces the one from {old}");
    }
    let mut placed = match allocate(shared, &hello) {
        Ok(ok) => ok,
        Err(r) => return Err(refuse(&mut tls, r).await),
    };
    shared.leases.persist_or_warn().await;
    let max_lanes = usize::from(hello.max_lanes).min(shared.config.max_lanes_per_agent);
    let lane_key = Secret::new(random_hex(16));
    let mut accepted = accepted_reply(&shared.config, &hello, &placed, version);
    if max_lanes > 1 {
        accepted.lanes = Some(LaneGrant {
            key: lane_key.clone(),
            max: max_lanes as u16,
        });
    }
    if let Err(e) = write_frame(&mut tls, &RelayHello::Accepted(accepted)).await {
        shared
            .leases
            .update(|t| t.deactivate_agent(&hello.name, now_secs()));
        return Err(e.into());
    }

    let mux = Session::start(tls.compat(), Mode::Server, mux_settings);
    let services = endpoints(shared, &hello, &placed);
    let cancel = shared.close_sessions.child_token();
    let agent = Arc::new(AgentSession {
        id: next_session_id(),
        name: Arc::from(hello.name.as_str()),
        remote: peer,
        lanes: Lanes::new(mux.opener, lane_key, max_lanes, handshake_time, &cancel),
        permits: Arc::new(Semaphore::new(shared.config.max_streams_per_agent)),
        cancel,
        finished: CancellationToken::new(),
        services: services.clone(),
        connected_at: SystemTime::now(),
        credential,
    });
    shared.registry.insert(agent.clone());
    drop(admitted);
    drop(handshake);
    shared.metrics.sessions.fetch_add(1, Ordering::Relaxed);
    if placed.iter().any(|p| p.renewed) {
        shared.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    let ports: Vec<String> = services
        .iter()
        .map(|s| format!("{}={}", s.name, s.port))
        .collect();
    tracing::info!(software = %hello.software, ports = %ports.join(","), credential = %agent.credential, "agent connected");
    let port_tasks = open_ports(&agent, services, &mut placed, shared);

    let started = Instant::now();
    let session_tasks = TaskTracker::new();
    let driver_stop = CancellationToken::new();
    session_tasks.spawn(mux.driver.run(driver_stop.clone()));
    session_tasks.close();
    let end = run_control(mux.inbound, &agent, shared, &session_tasks).await;
    if matches!(end, SessionEnd::HeartbeatTimeout(_)) {
        shared
            .metrics
            .heartbeat_timeouts
            .fetch_add(1, Ordering::Relaxed);
    }

    // Teardown: stop the ports first, so a takeover waiting on `finished` can bind them.
    agent.cancel.cancel();
    port_tasks.wait().await;
    shared.registry.remove(&agent.name, agent.id);
    shared
        .leases
        .update(|t| t.deactivate_agent(&agent.name, now_secs()));
    agent.finished.cancel();
    for service in &agent.services {
        shared.webhooks.emit(Event::TunnelDown {
            agent: agent.name.to_string(),
            service: service.name.to_string(),
            port: service.port,
            reason: end.to_string(),
        });
    }
    driver_stop.cancel();
    session_tasks.wait().await;
    shared.leases.persist_or_warn().await;
    tracing::info!(reason = %end, after = ?started.elapsed(), "agent disconnected; lease kept");
    Ok(())
}

/// An agent that completed TLS and sent an acceptable hello.
struct Handshaken {
    tls: TlsStream,
    hello: AgentHello,
    version: u16,
    credential: Credential,
}

/// TLS, preface, hello and authentication, all under the handshake timeout. A refusal is sent
/// to the agent before the error is returned.
async fn handshake_agent(tcp: TcpStream, shared: &Shared) -> Result<Handshaken, HandshakeError> {
    let config = &shared.config;
    let _ = socket::tune_control(&tcp, config.heartbeat_timeout);
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    let mut tls = tokio::time::timeout_at(deadline, shared.acceptor.accept(ReadAhead::new(tcp)))
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(HandshakeError::Tls)?;
    let hello = tokio::time::timeout_at(deadline, read_hello(&mut tls))
        .await
        .map_err(|_| HandshakeError::Timeout)?;
    let (hello, version) = match hello {
        Ok(ok) => ok,
        Err(HandshakeError::Refused(r)) => return Err(refuse(&mut tls, r).await),
        Err(e) => return Err(e),
    };
    tracing::Span::current().record("name", hello.name.as_str());
    let cert_names: Vec<String> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(tls::certificate_dns_names)
        .unwrap_or_default();
    match check_hello(&hello, &cert_names, shared) {
        Ok(credential) => Ok(Handshaken {
            tls,
            hello,
            version,
            credential,
        }),
        Err(r) => Err(refuse(&mut tls, r).await),
    }
}

/// The relay's answer to an admitted agent: its ports and the session's timing.
fn accepted_reply(
    config: &RelayConfig,
    hello: &AgentHello,
    placed: &[Placed],
    version: u16,
) -> Accepted {
    Accepted {
        version,
        public_host: config.public_host.clone(),
        services: placed
            .iter()
            .zip(&hello.services)
            .map(|(p, req)| Allocation {
                name: req.name.clone(),
                port: p.port,
                note: p.note.clone(),
            })
            .collect(),
        heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64,
        heartbeat_timeout_ms: config.heartbeat_timeout.as_millis() as u64,
        router: config
            .router_listen
            .map(|r| format!("{}:{}", config.public_host, r.port())),
        lanes: None,
    }
}

/// The session's services as the proxy and the registry see them, with fresh limits.
fn endpoints(shared: &Shared, hello: &AgentHello, placed: &[Placed]) -> Vec<ServiceEndpoint> {
    let now = std::time::Instant::now();
    let burst = f64::from(shared.policy().max_new_conns_per_sec) * 2.0;
    placed
        .iter()
        .zip(&hello.services)
        .map(|(p, req)| ServiceEndpoint {
            name: Arc::from(req.name.as_str()),
            port: p.port,
            target_port: req.target_port,
            allow: Arc::from(req.allow.as_slice()),
            stats: Arc::default(),
            bucket: Arc::new(std::sync::Mutex::new(TokenBucket::new(burst, now))),
        })
        .collect()
}

/// Announces every tunnel and starts accepting users on each allocated port; the returned
/// tracker (closed) ends when the session's cancel token fires.
fn open_ports(
    agent: &Arc<AgentSession>,
    services: Vec<ServiceEndpoint>,
    placed: &mut [Placed],
    shared: &Arc<Shared>,
) -> TaskTracker {
    let config = &shared.config;
    let port_tasks = TaskTracker::new();
    for (service, place) in services.into_iter().zip(placed) {
        shared.webhooks.emit(Event::TunnelUp {
            agent: agent.name.to_string(),
            service: service.name.to_string(),
            host: config.public_host.clone(),
            port: service.port,
        });
        let Some(listener) = place.listener.take() else {
            tracing::info!(
                "new tunnel [{}] {} via the router",
                agent.name,
                service.name
            );
            continue;
        };
        tracing::info!(host = %config.public_host, "new tunnel [{}] {} on :{}", agent.name, service.name, service.port);
        port_tasks.spawn(serve_port(listener, agent.clone(), service, shared.clone()));
    }
    port_tasks.close();
    port_tasks
}

/// Reads the preface and hello; a version mismatch is reported before the rest is parsed.
async fn read_hello(tls: &mut TlsStream) -> Result<(AgentHello, u16), HandshakeError> {
    let mut preface = [0u8; PREFACE.len()];
    tls.read_exact(&mut preface)
        .await
        .map_err(|_| HandshakeError::Preface)?;
    if &preface != PREFACE {
        return Err(HandshakeError::Preface);
    }
    let payload = read_payload(tls).await?;
    let probe: VersionProbe = jumpgate_proto::decode(&payload).map_err(|e| {
        HandshakeError::Refused(Refusal::BadRequest {
            detail: format!("hello has no version fields: {e}"),
        })
    })?;
    let version = negotiate_version(probe).map_err(HandshakeError::Refused)?;
    let hello: AgentHello = jumpgate_proto::decode(&payload).map_err(|e| {
        HandshakeError::Refused(Refusal::BadRequest {
            detail: format!("malformed hello: {e}"),
        })
    })?;
    Ok((hello, version))
}

/// Authenticates and validates a hello; says which credential let it in.
fn check_hello(
    hello: &AgentHello,
    cert_names: &[String],
    shared: &Shared,
) -> Result<Credential, Refusal> {
    let credential = shared
        .policy()
        .authorize(hello.token.as_ref(), cert_names, &hello.name)?;
    let bad = |detail: String| Refusal::BadRequest { detail };
    validate_name("agent", &hello.name).map_err(|e| bad(e.to_string()))?;
    if hello.lane_of.is_some() {
        return Ok(credential); // a lane exposes nothing of its own
    }
    if hello.services.is_empty() || hello.services.len() > MAX_SERVICES {
        return Err(bad(format!(
            "an agent must expose between 1 and {MAX_SERVICES} services, not {}",
            hello.services.len()
        )));
    }
    let mut seen = HashSet::new();
    for s in &hello.services {
        validate_name("service", &s.name).map_err(|e| bad(e.to_string()))?;
        if !seen.insert(s.name.as_str()) {
            return Err(bad(format!("service {:?} is listed twice", s.name)));
        }
    }
    Ok(credential)
}

/// A service's place on the relay: its public port (0 for router-only services) and listener.
struct Placed {
    port: u16,
    note: Option<String>,
    renewed: bool,
    listener: Option<tokio::net::TcpListener>,
}

/// Leases a port for every service that wants one and binds it; all or nothing. Results are in
/// the hello's service order.
fn allocate(shared: &Shared, hello: &AgentHello) -> Result<Vec<Placed>, Refusal> {
    if hello.services.iter().any(|s| s.no_port) && shared.config.router_listen.is_none() {
        return Err(Refusal::BadRequest {
            detail: "a service asked for no port, but this relay has no name router (router_listen); drop --no-port".into(),
        });
    }
    let bind_ip = shared.config.proxy_bind;
    let mut bound: HashMap<u16, std::net::TcpListener> = HashMap::new();
    let mut probe = |port: u16| {
        if bound.contains_key(&port) {
            return true;
        }
        match std::net::TcpListener::bind((bind_ip, port)) {
            Ok(l) => {
                bound.insert(port, l);
                true
            }
            Err(e) => {
                tracing::warn!(
                    port,
                    "skipping port {port}: cannot bind {bind_ip}:{port}: {e}"
                );
                false
            }
        }
    };
    let asks: Vec<ServiceAsk> = hello
        .services
        .iter()
        .filter(|s| !s.no_port)
        .map(|s| ServiceAsk {
            service: s.name.clone(),
            preferred: s.preferred_port,
            strict: s.strict,
        })
        .collect();
    let grants = shared.leases.update(|t| {
        // Collect expired leases first, so their ports count as free exactly when they expire.
        for (key, port) in t.expire(now_secs()) {
            crate::leases::log_expired(&key, port);
            shared.webhooks.emit(Event::LeaseExpired {
                agent: key.agent,
                service: key.service,
                port,
            });
        }
        t.acquire(&hello.name, &asks, now_secs(), &mut probe)
    })?;
    let mut by_name: HashMap<&str, &Grant> =
        grants.iter().map(|g| (g.service.as_str(), g)).collect();
    let mut placed = Vec::with_capacity(hello.services.len());
    for req in &hello.services {
        let Some(g) = by_name.remove(req.name.as_str()) else {
            placed.push(Placed {
                port: 0,
                note: Some("reachable through the relay's name router only".into()),
                renewed: false,
                listener: None,
            });
            continue;
        };
        if let Some(note) = &g.note {
            tracing::info!(service = %g.service, port = g.port, "{note}");
        }
        let listener = bound
            .remove(&g.port)
            .ok_or_else(|| Refusal::Unavailable {
                detail: format!("port {} was granted but not bound", g.port),
            })
            .and_then(|l| {
                l.set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpListener::from_std(l))
                    .map_err(|e| Refusal::Unavailable {
                        detail: format!("cannot listen on port {}: {e}", g.port),
                    })
            });
        match listener {
            Ok(l) => placed.push(Placed {
                port: g.port,
                note: g.note.clone(),
                renewed: g.kind == GrantKind::Renewed,
                listener: Some(l),
            }),
            Err(r) => {
                shared
                    .leases
                    .update(|t| t.deactivate_agent(&hello.name, now_secs()));
                return Err(r);
            }
        }
    }
    Ok(placed)
}

/// Sends a refusal (best effort) and returns the error to log.
async fn refuse(tls: &mut TlsStream, refusal: Refusal) -> HandshakeError {
    let _ = write_frame(tls, &RelayHello::Refused(refusal.clone())).await;
    let _ = tls.shutdown().await;
    HandshakeError::Refused(refusal)
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    ClosedByRelay,
    ShuttingDown,
    Replaced,
    NoControlStream(String),
    HeartbeatTimeout(std::time::Duration),
    AgentStopping,
    ClosedByAgent,
    Lost(String),
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::ClosedByRelay => f.write_str("closed by relay"),
            SessionEnd::ShuttingDown => f.write_str("relay shutting down"),
            SessionEnd::Replaced => {
                f.write_str("replaced by a new session or disconnected by the operator")
            }
            SessionEnd::NoControlStream(why) => write!(f, "{why}"),
            SessionEnd::HeartbeatTimeout(t) => {
                write!(f, "heartbeat timeout: nothing from the agent for {t:?}")
            }
            SessionEnd::AgentStopping => f.write_str("agent is stopping"),
            SessionEnd::ClosedByAgent => f.write_str("connection closed by agent"),
            SessionEnd::Lost(why) => write!(f, "connection lost: {why}"),
        }
    }
}

/// Runs the control stream until the session should end; says why. Its frame reader runs on
/// `tasks`, which teardown waits on.
async fn run_control(
    mut inbound: Inbound,
    agent: &AgentSession,
    shared: &Shared,
    tasks: &TaskTracker,
) -> SessionEnd {
    let timeout = shared.config.heartbeat_timeout;
    let first = tokio::select! {
        _ = agent.cancel.cancelled() => return SessionEnd::ClosedByRelay,
        s = tokio::time::timeout(timeout, inbound.recv()) => s,
    };
    let ctrl = match first {
        Ok(Some(s)) => s,
        Ok(None) => {
            return SessionEnd::NoControlStream(
                "connection closed before the control stream opened".into(),
            )
        }
        Err(_) => {
            return SessionEnd::NoControlStream(format!("no control stream within {timeout:?}"))
        }
    };
    // Any further stream from the agent is unexpected: drop the receiver so they are reset.
    drop(inbound);
    let (reader, mut writer) = tokio::io::split(ctrl);
    let mut frames = spawn_frame_reader::<_, Control>(reader, tasks);
    let mut told_going_away = false;
    loop {
        let frame = tokio::select! {
            _ = agent.cancel.cancelled() => {
                return if shared.shutdown.is_cancelled() { SessionEnd::ShuttingDown } else { SessionEnd::Replaced };
            }
            count = agent.lanes.wanted(), if agent.lanes.max() > 1 => {
                let ask = Control::OpenLane { count: u16::try_from(count).unwrap_or(u16::MAX) };
                if let Err(e) = write_frame(&mut writer, &ask).await {
                    return SessionEnd::Lost(e.to_string());
                }
                continue;
            }
            _ = shared.shutdown.cancelled(), if !told_going_away => {
                told_going_away = true;
                let bye = Control::GoingAway { reconnect_after_ms: 1000 };
                if let Err(e) = write_frame(&mut writer, &bye).await {
                    return SessionEnd::Lost(e.to_string());
                }
                continue;
            }
            f = tokio::time::timeout(timeout, frames.recv()) => f,
        };
        match frame {
            Err(_) => return SessionEnd::HeartbeatTimeout(timeout),
            Ok(Some(Ok(Control::Ping { seq }))) => {
                if let Err(e) = write_frame(&mut writer, &Control::Pong { seq }).await {
                    return SessionEnd::Lost(e.to_string());
                }
            }
            Ok(Some(Ok(Control::Release))) => return SessionEnd::AgentStopping,
            Ok(Some(Ok(other))) => tracing::debug!(?other, "ignoring unexpected control frame"),
            Ok(None | Some(Err(FrameIoError::Closed))) => return SessionEnd::ClosedByAgent,
            Ok(Some(Err(e))) => return SessionEnd::Lost(e.to_string()),
        }
    }
}

/// Adds a connection to the live session it names as one more lane, and carries that session's
/// streams on it until the lane idles out, the session ends or the connection is lost.
async fn join_lane(
    mut tls: TlsStream,
    name: &str,
    key: &Secret,
    shared: &Arc<Shared>,
    handshake: OwnedSemaphorePermit,
    mux_settings: MuxSettings,
) -> Result<(), HandshakeError> {
    let live = shared.registry.get(name).filter(|s| {
        bool::from(
            s.lanes
                .key()
                .expose()
                .as_bytes()
                .ct_eq(key.expose().as_bytes()),
        )
    });
    let session = match live {
        Some(s) if s.lanes.count() < s.lanes.max() => s,
        found => {
            let detail = match found {
                None => {
                    "no live session of this agent with that lane key (it ended or was replaced)"
                }
                Some(_) => "the session has all the lanes it may have",
            };
            let refusal = Refusal::LaneUnavailable {
                detail: detail.into(),
            };
            return Err(refuse(&mut tls, refusal).await);
        }
    };
    write_frame(&mut tls, &RelayHello::LaneJoined).await?;
    let mux = Session::start(tls.compat(), Mode::Server, mux_settings);
    let Some(lane) = session.lanes.join(mux.opener) else {
        tracing::debug!("lane refused: the session has all the lanes it may have");
        return Ok(()); // dropping the session's driver closes the connection
    };
    drop(handshake);
    drop(mux.inbound); // the agent opens no streams on a lane
    tracing::debug!(lane = lane.id, lanes = session.lanes.count(), "lane joined");
    let driver = mux.driver.run(lane.close.clone());
    let idle = async {
        loop {
            tokio::time::sleep(LANE_IDLE / 4).await;
            if session.lanes.close_if_idle(lane.id) {
                tracing::debug!(
                    lane = lane.id,
                    "lane closed after {LANE_IDLE:?} without streams"
                );
            }
        }
    };
    tokio::select! {
        end = driver => if let Err(e) = end {
            tracing::debug!(lane = lane.id, "lane lost: {e}");
        },
        () = idle => {}
    }
    session.lanes.remove(lane.id);
    Ok(())
}

/// `bytes` random bytes as hex.
fn random_hex(bytes: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

fn next_session_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_guessing_and_garbage_count_towards_a_ban() {
        let refused = |r| HandshakeError::Refused(r);
        let detail = || "x".to_string();
        assert!(refused(Refusal::Unauthorized).counts_as_failure());
        assert!(refused(Refusal::BadRequest { detail: detail() }).counts_as_failure());
        assert!(HandshakeError::Preface.counts_as_failure());
        // The relay's own failures and a lane racing its session's end are nobody's fault.
        assert!(!refused(Refusal::Unavailable { detail: detail() }).counts_as_failure());
        assert!(!refused(Refusal::LaneUnavailable { detail: detail() }).counts_as_failure());
        assert!(!HandshakeError::Timeout.counts_as_failure());
    }
}
