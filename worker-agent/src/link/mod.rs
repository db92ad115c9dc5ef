//! The agent's side of one relay: dial, handshake, serve the session, and redial after any loss.
//!
//! State changes are logged once each (connected, lost, a new kind of failure), not on every
//! retry. A relay that fails verification (certificate mismatch, an alert before it proved who
//! it is) is retried with a long backoff and an ERROR on every attempt: it may be an impostor,
//! but it may equally be a brief DNS spoof that must not become a permanent outage. A permanent
//! failure that the authenticated relay reports itself (bad token, name not allowed) stops this
//! relay's link instead of hammering the relay; links to other relays carry on.
//!
//! Whatever the relay sends that the agent logs or publishes (public host, router address,
//! refusal details, notes, service names) is escaped and cut first
//! ([`jumpgate_proto::sanitize`]), so a relay cannot forge log lines or flood the logs.
//!
//! The protocol itself (the hello, reading the answer, retry decisions, heartbeats, lanes, member
//! lists) is the sans-IO core in `jumpgate-session`, which the benchmark's simulated agents drive
//! too; this file is its driver: sockets, TLS, yamux, timers, logs and the status file. A host
//! agent's link to a relay older than host sessions runs one such link per tunnel instead
//! ([`fallback`]).

pub mod fallback;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jumpgate_proto::display::MAX_MESSAGE_LEN;
use jumpgate_proto::{sanitize, Accepted, AgentHello, Control, RelayHello, Secret, PREFACE};
use jumpgate_session::{
    lane_answer, lane_hello, session_answer, AnswerError, Event, Failure, Identity, Link,
    Placement, Purpose, Retry, Session as SessionCore,
};
use jumpgate_transport::frame_io::{read_frame, spawn_frame_reader, write_frame, FrameIoError};
use jumpgate_transport::mux::{Mode, MuxSettings, Session};
use jumpgate_transport::readahead::ReadAhead;
use jumpgate_transport::{socket, tls};
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio_rustls::{rustls, TlsConnector};
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::fleet::members::MemberReports;
use crate::fleet::set::LinkTarget;
use crate::metrics::AgentStats;
use crate::proxy::{DialError, Egress};
use crate::service::ServiceSpec;
use crate::status::{Endpoint, StatusBoard};
use crate::streams::{serve_stream, Targets};

/// Time allowed for TCP connect, TLS and the hello exchange, each.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalive idle time before the relay told us its heartbeat settings.
const DEFAULT_IDLE: Duration = Duration::from_secs(30);
/// How long a lost session waits for its user connections to notice: their yamux streams fail
/// as soon as the driver stops, so this only bounds a local target that stopped reading.
const STREAMS_GRACE: Duration = Duration::from_secs(2);

/// What the agent needs for every relay.
pub struct AgentShared {
    /// Settings.
    pub config: AgentConfig,
    /// TLS client configuration.
    pub connector: TlsConnector,
    /// Local targets by service name.
    pub targets: Targets,
    /// Published endpoints.
    pub status: Arc<StatusBoard>,
    /// Counters for the metrics endpoint.
    pub stats: Arc<AgentStats>,
    /// The fleet's member lists as each relay last sent them.
    pub members: Arc<MemberReports>,
    /// Links running now and not refused for good, for log wording.
    pub live_links: AtomicUsize,
    /// Host mode: the tunnels every session carries ([`crate::host`]).
    pub host: Option<Arc<crate::host::Table>>,
}

/// How a session that was established came to an end.
enum SessionEnd {
    /// The agent is stopping.
    Shutdown,
    /// The session broke; `reconnect_after` is set when the relay announced it was going away.
    Lost {
        reason: String,
        reconnect_after: Option<Duration>,
    },
}

/// Keeps a session with the relay of link `id` until `shutdown` fires (Ok) or the relay turns
/// the agent away permanently (Err, after logging it and marking the relay stopped in the status
/// file).
pub async fn supervise(
    id: u64,
    server: LinkTarget,
    shared: Arc<AgentShared>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let mut identity = identity(&shared.config);
    let mut link = Link::new();
    loop {
        // The jump keys file is read before every session: an edit reaches the relay on the next
        // reconnect, and a broken file keeps the agent away rather than open to every key.
        let attempt = match crate::jump_keys::read(shared.config.jump_authorized_keys.as_deref()) {
            Ok(keys) => {
                identity.jump_keys = keys;
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = establish(&server, &shared, link.hello(&identity)) => r,
                }
            }
            Err(e) => Err(AgentError::transient(format!(
                "{e}; not connecting until it is fixed"
            ))),
        };
        let delay = match attempt {
            Ok((accepted, dialed)) => {
                if link.accepted(&accepted, &identity, Instant::now()) {
                    shared.status.reconnected(id);
                }
                let end =
                    run_session(id, &server, &shared, &identity, accepted, dialed, &shutdown).await;
                shared.status.disconnected(id);
                shared.members.lost();
                let (reason, reconnect_after) = match end {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Lost {
                        reason,
                        reconnect_after,
                    } => (reason, reconnect_after),
                };
                let delay =
                    link.session_ended(Instant::now(), reconnect_after, rand::thread_rng().gen());
                match reconnect_after {
                    Some(_) => {
                        tracing::info!(relay = %server, "relay went away ({reason}); reconnecting in {delay:?}")
                    }
                    None => {
                        tracing::warn!(relay = %server, "connection to relay lost: {reason}; reconnecting in {delay:.1?}")
                    }
                }
                delay
            }
            Err(e) => {
                let kind = if e.is_permanent() {
                    Failure::Permanent
                } else if e.is_suspicious() {
                    Failure::Suspicious
                } else {
                    Failure::Transient
                };
                let text = e.to_string();
                match link.failed(kind, &text, rand::thread_rng().gen()) {
                    Retry::GiveUp => {
                        let others = shared.live_links.load(Ordering::Relaxed) > 1;
                        if others {
                            tracing::error!(relay = %server, "giving up on this relay until the agent restarts: {text}; sessions to the other relays continue");
                        } else {
                            tracing::error!(relay = %server, "giving up on this relay: {text}");
                        }
                        shared.status.stopped(id, &text);
                        return Err(e);
                    }
                    Retry::Suspicious { delay } => {
                        // Every attempt, at ERROR: an operator must see an impostor or a changed
                        // certificate, and at these delays the lines are few.
                        tracing::error!(relay = %server, "{text}. The relay could not be authenticated: a wrong pin or CA, a relay with a new certificate, DNS spoofing or a device on the path all look like this. Not exiting; retrying in {delay:.1?} (long backoff, up to {:?})", jumpgate_session::backoff::SUSPICIOUS_CAP);
                        shared.status.failed(id, &text);
                        delay
                    }
                    Retry::After { delay, repeated } => {
                        shared.status.failed(id, &text);
                        if repeated {
                            tracing::debug!(relay = %server, "still cannot connect: {text}; next try in {delay:.1?}");
                        } else {
                            tracing::warn!(relay = %server, "cannot connect to relay: {text}; retrying with backoff (next in {delay:.1?})");
                        }
                        delay
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The agent as every hello describes it, from its settings: the one place the settings become
/// protocol (the hello itself is built by [`jumpgate_session::session_hello`]).
pub fn identity(config: &AgentConfig) -> Identity {
    Identity {
        name: config.name.clone(),
        token: config.token.clone(),
        software: format!("worker-agent {}", env!("CARGO_PKG_VERSION")),
        max_lanes: config.max_lanes,
        services: config.services.iter().map(ServiceSpec::request).collect(),
        jump_keys: Vec::new(),
        host: config.host.is_some(),
    }
}

type TlsStream = tokio_rustls::client::TlsStream<ReadAhead<Egress>>;

/// A verified TLS connection to the relay, and the round trip its TCP handshake took.
struct Dialed {
    tls: TlsStream,
    rtt: Duration,
}

/// Dials the relay (at `resolved`, when given, instead of resolving its name again) and
/// completes TLS, verifying the relay's certificate.
async fn dial(
    server: &LinkTarget,
    resolved: Option<SocketAddr>,
    shared: &AgentShared,
) -> Result<Dialed, AgentError> {
    let started = Instant::now();
    let egress = crate::proxy::dial(
        shared.config.proxy.as_ref(),
        server
            .ws
            .as_ref()
            .or_else(|| shared.config.websocket_for(&server.server)),
        &server.server.host,
        server.server.port,
        resolved.or(server.addr),
        SETUP_TIMEOUT,
    )
    .await
    .map_err(|e| match e {
        DialError::DirectTimeout => timed_out("connecting to", server),
        DialError::Direct(e) => transient("cannot connect to", server, &e),
        DialError::Proxy(text) => {
            AgentError::transient(format!("cannot reach {server} through {text}"))
        }
    })?;
    let rtt = started.elapsed();
    let tcp = egress.tcp();
    let _ = socket::tune_control(tcp, DEFAULT_IDLE);
    let _ = socket::tune_for_path(tcp, rtt);
    let proxied = egress.proxied();
    let server_name = tls::server_name(&server.tls_name)?;
    match tokio::time::timeout(
        SETUP_TIMEOUT,
        shared
            .connector
            .connect(server_name, ReadAhead::new(egress)),
    )
    .await
    {
        Err(_) => Err(timed_out("TLS handshake with", server)),
        Ok(Err(e)) => Err(match handshake_failure(server, &e) {
            AgentError::Certificate { server, detail } if proxied => AgentError::Certificate {
                server,
                detail: format!("{detail}; {}", crate::proxy::INSPECTION_HINT),
            },
            other => other,
        }),
        Ok(Ok(tls)) => Ok(Dialed { tls, rtt }),
    }
}

/// Classifies a failed TLS handshake. Until the handshake completes the relay has not proven
/// who it is, so whatever TLS itself reports (our verifier rejecting its certificate, an alert,
/// a malformed message) may come from anyone on the path: suspicious, never permanent. A
/// socket error (reset, closed) is an ordinary transient failure.
fn handshake_failure(server: &LinkTarget, e: &std::io::Error) -> AgentError {
    let Some(rustls_err) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return transient("TLS handshake failed with", server, e);
    };
    let detail = match rustls_err {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            let detail = tls::certificate_rejection(e).unwrap_or_else(|| rustls_err.to_string());
            return AgentError::Certificate {
                server: server.to_string(),
                detail: sanitize(&detail, MAX_MESSAGE_LEN).into_owned(),
            };
        }
        other => other.to_string(),
    };
    AgentError::Handshake {
        server: server.to_string(),
        detail: sanitize(&detail, MAX_MESSAGE_LEN).into_owned(),
    }
}

fn transient(what: &str, server: &LinkTarget, e: &dyn std::fmt::Display) -> AgentError {
    AgentError::transient(format!("{what} {server}: {e}"))
}

fn timed_out(what: &str, server: &LinkTarget) -> AgentError {
    AgentError::transient(format!("{what} {server} timed out after {SETUP_TIMEOUT:?}"))
}

/// Sends the preface and `hello`, and reads the relay's answer.
async fn exchange(
    tls: &mut TlsStream,
    server: &LinkTarget,
    hello: &AgentHello,
) -> Result<RelayHello, AgentError> {
    let exchange = async {
        tls.write_all(PREFACE).await.map_err(FrameIoError::from)?;
        write_frame(tls, hello).await?;
        read_frame::<_, RelayHello>(tls).await
    };
    tokio::time::timeout(SETUP_TIMEOUT, exchange)
        .await
        .map_err(|_| timed_out("handshake with", server))?
        .map_err(|e| match &e {
            // Under TLS 1.3 a rejected client certificate surfaces on the first read, after the
            // handshake: the alert is encrypted under keys only the relay we verified holds, so
            // it is the authenticated relay's word, as final as a wrong token.
            FrameIoError::Io(io) => match tls::certificate_rejection(io) {
                Some(detail) => AgentError::ClientCertificate {
                    server: server.to_string(),
                    detail: sanitize(&detail, MAX_MESSAGE_LEN).into_owned(),
                },
                None => e.into(),
            },
            _ => e.into(),
        })
}

/// Dials, verifies the relay, and exchanges hellos.
async fn establish(
    server: &LinkTarget,
    shared: &AgentShared,
    hello: AgentHello,
) -> Result<(Accepted, Dialed), AgentError> {
    let mut dialed = dial(server, None, shared).await?;
    let reply = exchange(&mut dialed.tls, server, &hello).await?;
    let accepted = session_answer(reply).map_err(|e| answer_error(server, e))?;
    Ok((accepted, dialed))
}

/// An answer that is not the one the hello wanted, as an agent error.
fn answer_error(server: &LinkTarget, e: AnswerError) -> AgentError {
    match e {
        AnswerError::Refused(refusal) => AgentError::refused(server.to_string(), refusal),
        AnswerError::Unexpected(what) => transient("unexpected answer from", server, &what),
    }
}

/// Opens one more lane for the session that `key` belongs to, to the same address as the
/// session's first connection (a relay name may resolve to several relays).
async fn open_lane(
    server: &LinkTarget,
    relay: Option<SocketAddr>,
    shared: &AgentShared,
    identity: &Identity,
    key: &Secret,
) -> Result<Dialed, AgentError> {
    let mut dialed = dial(server, relay, shared).await?;
    let reply = exchange(&mut dialed.tls, server, &lane_hello(identity, key)).await?;
    lane_answer(reply).map_err(|e| answer_error(server, e))?;
    Ok(dialed)
}

/// One extra lane: carries the streams the relay opens on it until the relay closes it (idle),
/// the connection fails, or the session it belongs to ends (`stop`).
#[allow(clippy::too_many_arguments)]
async fn run_lane(
    server: LinkTarget,
    relay: Option<SocketAddr>,
    shared: Arc<AgentShared>,
    identity: Arc<Identity>,
    key: Secret,
    streams: TaskTracker,
    stop: CancellationToken,
    idle: Duration,
) {
    let Dialed { tls, rtt } = tokio::select! {
        _ = stop.cancelled() => return,
        r = open_lane(&server, relay, &shared, &identity, &key) => match r {
            Ok(dialed) => dialed,
            Err(e) => {
                tracing::warn!(relay = %server, "cannot open an extra lane: {e}; transfers share the lanes already open");
                return;
            }
        },
    };
    let _ = socket::tune_control(tls.get_ref().0.get_ref().tcp(), idle);
    tracing::debug!(relay = %server, "lane open");
    let mut mux = Session::start(tls.compat(), Mode::Client, MuxSettings::for_round_trip(rtt));
    let driver = mux.driver.run(stop.clone());
    tokio::pin!(driver);
    loop {
        tokio::select! {
            end = &mut driver => {
                if let Err(e) = end {
                    tracing::debug!(relay = %server, "lane lost: {e}");
                }
                break;
            }
            stream = mux.inbound.recv() => match stream {
                Some(stream) => {
                    streams.spawn(serve_stream(stream, shared.targets.clone(), shared.stats.clone()));
                }
                None => break,
            },
        }
    }
    tracing::debug!(relay = %server, "lane closed");
}

/// The endpoints an acceptance grants, for printing and the status file. The placement is
/// already sanitized and holds only this agent's services, each once; the relay's notes are
/// logged, and the allocations it dropped counted in one line, so a relay can neither forge log
/// lines nor print thousands of them.
fn endpoints(server: &LinkTarget, placement: &Placement, config: &AgentConfig) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = Vec::new();
    for p in &placement.ports {
        if let Some(note) = &p.note {
            tracing::info!(relay = %server, service = %p.name, "port {}: {note}", p.port);
        }
        let via_router = match (p.port, &placement.router) {
            (0, Some(router)) => Some(format!("{router} as {}", config.name)),
            _ => None,
        };
        out.push(Endpoint {
            name: p.name.clone(),
            host: placement.public_host.clone(),
            port: p.port,
            via_router,
        });
    }
    if placement.ignored > 0 {
        tracing::warn!(relay = %server, "ignoring {} port allocations for services this agent did not ask for (or listed twice)", placement.ignored);
    }
    out
}

/// Runs an established session: publishes endpoints, serves streams, and drives the session
/// core's control loop (heartbeats, lanes, member lists, going-away).
async fn run_session(
    id: u64,
    server: &LinkTarget,
    shared: &Arc<AgentShared>,
    identity: &Identity,
    accepted: Accepted,
    dialed: Dialed,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let now = || tokio::time::Instant::now().into_std();
    let mut core = match &shared.host {
        Some(_) => SessionCore::new_host(&accepted, shared.config.max_lanes, now()),
        None => SessionCore::new(&accepted, shared.config.max_lanes, now()),
    };
    // A host session registers every tunnel at once, then follows the table's changes.
    let (_, mut changes) = tokio::sync::mpsc::unbounded_channel::<crate::host::table::Change>();
    let host = shared.host.as_ref().filter(|_| core.holds_tunnels());
    if let Some(table) = host {
        let (hellos, rx) = table.attach(
            id,
            &server.to_string(),
            &accepted.public_host,
            accepted.router.as_deref(),
        );
        for hello in hellos {
            core.add_tunnel(hello);
        }
        changes = rx;
    }
    let timeout = core.timeout();
    let Dialed { tls, rtt } = dialed;
    let _ = socket::tune_control(tls.get_ref().0.get_ref().tcp(), timeout);
    let relay_addr = tls.get_ref().0.get_ref().relay_addr();
    tracing::info!(relay = %server, version = accepted.version, "connected to relay");
    let placement = Placement::of(&accepted, identity);
    shared
        .status
        .connected(id, endpoints(server, &placement, &shared.config));
    shared.members.accepted(id, server, &accepted);

    let mut mux = Session::start(tls.compat(), Mode::Client, MuxSettings::for_round_trip(rtt));
    let driver_stop = CancellationToken::new();
    let session_tasks = TaskTracker::new();
    session_tasks.spawn(mux.driver.run(driver_stop.clone()));
    let streams = TaskTracker::new();
    // Extra lanes run on `session_tasks` and close with the session's driver; each reports its
    // end, so the core can count it.
    let (lane_done, mut lanes_done) = tokio::sync::mpsc::unbounded_channel::<()>();
    let identity = Arc::new(identity.clone());
    let end = async {
        let ctrl = mux.opener.open().await.map_err(|e| e.to_string())?;
        let (reader, mut writer) = tokio::io::split(ctrl);
        let mut frames = spawn_frame_reader::<_, Control>(reader, &session_tasks);
        loop {
            // What the core wants written: first the opening ping (the relay learns of the
            // control stream from its first frame), then heartbeats.
            while let Some((frame, purpose)) = core.poll_transmit() {
                if let Err(e) = write_frame(&mut writer, &frame).await {
                    return Err(match purpose {
                        Purpose::Heartbeat => format!("cannot send heartbeat: {e}"),
                        Purpose::Tunnel => format!("cannot send a tunnel registration: {e}"),
                        Purpose::Opening | Purpose::Release => e.to_string(),
                    });
                }
            }
            while let Some(event) = core.poll_event() {
                match event {
                    Event::TimedOut { after } => {
                        return Err(format!("no heartbeat answer from the relay for {after:?}"));
                    }
                    Event::GoingAway { .. } => {
                        tracing::info!(relay = %server, "relay is shutting down; open connections continue until it closes");
                    }
                    Event::OpenLanes { count, key } => {
                        for _ in 0..count {
                            let lane = run_lane(server.clone(), relay_addr, shared.clone(), identity.clone(), key.clone(), streams.clone(), driver_stop.clone(), timeout);
                            let done = lane_done.clone();
                            session_tasks.spawn(async move {
                                lane.await;
                                let _ = done.send(());
                            });
                        }
                    }
                    Event::LaneNotOffered => tracing::debug!("relay asked for a lane it never offered"),
                    Event::Members(relays) => shared.members.pushed(id, server, &relays),
                    Event::Ignored(other) => tracing::debug!(?other, "ignoring unexpected control frame"),
                    Event::HostUnsupported { version } => {
                        tracing::warn!(relay = %server, "relay speaks protocol version {version}, older than host sessions: each tunnel gets a session of its own there");
                        if let Some(table) = &shared.host {
                            let (tunnels, rx) = table.attach_fallback(id, &server.to_string());
                            session_tasks.spawn(fallback::run(id, server.clone(), shared.clone(), tunnels, rx, driver_stop.clone()));
                        }
                    }
                    Event::TunnelPlaced { name, services } => {
                        if let Some(table) = host {
                            table.placed(id, &name, &services);
                        }
                    }
                    Event::TunnelRefused { name, refusal, retry_in } => {
                        if let Some(table) = host {
                            table.refused(id, &name, &refusal, retry_in.is_some(), false);
                        }
                    }
                    Event::TunnelClosed { name, reason, retry_in } => {
                        if let Some(table) = host {
                            table.refused(id, &name, &reason, retry_in.is_some(), true);
                        }
                    }
                }
            }
            let wake = core.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = shutdown.cancelled() => {
                    core.close();
                    // Removals already asked for, then the release.
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while let Some((frame, _)) = core.poll_transmit() {
                            write_frame(&mut writer, &frame).await?;
                        }
                        Ok::<(), FrameIoError>(())
                    })
                    .await;
                    return Ok(SessionEnd::Shutdown);
                }
                stream = mux.inbound.recv() => match stream {
                    Some(stream) => { streams.spawn(serve_stream(stream, shared.targets.clone(), shared.stats.clone())); }
                    None => return Err("session closed".to_string()),
                },
                Some(()) = lanes_done.recv() => core.lane_closed(),
                Some(change) = changes.recv() => match change {
                    crate::host::table::Change::Add(hello) => { core.add_tunnel(hello); }
                    crate::host::table::Change::Remove { name, release } => { core.remove_tunnel(&name, release); }
                    crate::host::table::Change::Start { .. } => {}
                },
                _ = sleep_until(wake) => core.handle_timeout(now()),
                frame = frames.recv() => match frame {
                    Some(Ok(frame)) => core.handle_control(frame, now()),
                    Some(Err(FrameIoError::Closed)) | None => return Err("relay closed the connection".to_string()),
                    Some(Err(e)) => return Err(e.to_string()),
                },
            }
        }
    }
    .await;
    if let Some(table) = &shared.host {
        table.detach(id);
    }
    let reconnect_after = core.reconnect_after();
    driver_stop.cancel();
    session_tasks.close();
    session_tasks.wait().await;
    streams.close();
    if tokio::time::timeout(STREAMS_GRACE, streams.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            relay = %server,
            open = streams.len(),
            "user connections still open {STREAMS_GRACE:?} after the session ended; leaving them to finish"
        );
    }
    match end {
        Ok(end) => end,
        Err(reason) => SessionEnd::Lost {
            // A decoder error may quote what the relay sent.
            reason: sanitize(&reason, MAX_MESSAGE_LEN).into_owned(),
            reconnect_after,
        },
    }
}

/// Sleeps until `at`, or forever without a deadline.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
