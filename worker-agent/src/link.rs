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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jumpgate_proto::display::{MAX_FIELD_LEN, MAX_MESSAGE_LEN};
use jumpgate_proto::{
    sanitize, Accepted, AgentHello, Control, RelayHello, Secret, ServiceRequest, PREFACE,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
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

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::fleet::{LinkTarget, MemberReports};
use crate::metrics::AgentStats;
use crate::proxy::{DialError, Egress};
use crate::status::{Endpoint, StatusBoard};
use crate::streams::{serve_stream, Targets};

/// Time allowed for TCP connect, TLS and the hello exchange, each.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalive idle time before the relay told us its heartbeat settings.
const DEFAULT_IDLE: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);
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
}

/// Extra lanes open (or opening) for one session.
#[derive(Clone, Default)]
struct LaneCount(Arc<std::sync::atomic::AtomicU16>);

impl LaneCount {
    /// Claims up to `count` more lanes while the session stays within `max` connections (the
    /// first included); returns how many were claimed.
    fn reserve(&self, count: u16, max: u16) -> u16 {
        let extra = max.saturating_sub(1);
        let mut claimed = 0;
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                claimed = count.min(extra.saturating_sub(open));
                Some(open + claimed)
            });
        claimed
    }

    /// A lane ended.
    fn release(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connections a session may keep, the first included: what the relay granted, but never more
/// than this agent's own `--max-lanes` (a relay must not make the agent open more).
fn lane_limit(granted: u16, own: u16) -> u16 {
    granted.min(own)
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
    let mut backoff = Backoff::reconnect();
    // Separate, so that blips between verification failures do not shorten the long delays.
    let mut suspicious = Backoff::suspicious();
    let mut last_failure: Option<String> = None;
    // Ports this relay gave us before: asked for again, so a relay that lost its lease file
    // still hands them back when it can.
    let mut remembered: HashMap<String, u16> = HashMap::new();
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = establish(&server, &shared, &remembered) => r,
        };
        let delay = match attempt {
            Ok((accepted, dialed)) => {
                last_failure = None;
                suspicious.reset();
                if !remembered.is_empty() {
                    shared.status.reconnected(id);
                }
                for a in &accepted.services {
                    // Only our own services: a relay cannot grow this map with made-up names.
                    if shared.config.services.iter().any(|s| s.name == a.name) {
                        remembered.insert(a.name.clone(), a.port);
                    }
                }
                let started = Instant::now();
                let end = run_session(id, &server, &shared, accepted, dialed, &shutdown).await;
                shared.status.disconnected(id);
                shared.members.lost();
                if started.elapsed() >= STABLE_AFTER {
                    backoff.reset();
                }
                match end {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Lost {
                        reason,
                        reconnect_after: Some(after),
                    } => {
                        tracing::info!(relay = %server, "relay went away ({reason}); reconnecting in {after:?}");
                        backoff.reset();
                        after
                    }
                    SessionEnd::Lost { reason, .. } => {
                        let delay = backoff.next_delay(rand::thread_rng().gen());
                        tracing::warn!(relay = %server, "connection to relay lost: {reason}; reconnecting in {delay:.1?}");
                        delay
                    }
                }
            }
            Err(e) if e.is_permanent() => {
                let others = shared.live_links.load(Ordering::Relaxed) > 1;
                let text = e.to_string();
                if others {
                    tracing::error!(relay = %server, "giving up on this relay until the agent restarts: {text}; sessions to the other relays continue");
                } else {
                    tracing::error!(relay = %server, "giving up on this relay: {text}");
                }
                shared.status.stopped(id, &text);
                return Err(e);
            }
            Err(e) if e.is_suspicious() => {
                let delay = suspicious.next_delay(rand::thread_rng().gen());
                let text = e.to_string();
                // Every attempt, at ERROR: an operator must see an impostor or a changed
                // certificate, and at these delays the lines are few.
                tracing::error!(relay = %server, "{text}. The relay could not be authenticated: a wrong pin or CA, a relay with a new certificate, DNS spoofing or a device on the path all look like this. Not exiting; retrying in {delay:.1?} (long backoff, up to {:?})", crate::backoff::SUSPICIOUS_CAP);
                shared.status.failed(id, &text);
                last_failure = Some(text);
                delay
            }
            Err(e) => {
                let delay = backoff.next_delay(rand::thread_rng().gen());
                let text = e.to_string();
                shared.status.failed(id, &text);
                if last_failure.as_deref() != Some(text.as_str()) {
                    tracing::warn!(relay = %server, "cannot connect to relay: {text}; retrying with backoff (next in {delay:.1?})");
                    last_failure = Some(text);
                } else {
                    tracing::debug!(relay = %server, "still cannot connect: {text}; next try in {delay:.1?}");
                }
                delay
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
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

/// A hello naming this agent, without services.
fn bare_hello(shared: &AgentShared) -> AgentHello {
    AgentHello {
        min_version: PROTOCOL_VERSION_MIN,
        max_version: PROTOCOL_VERSION_MAX,
        name: shared.config.name.clone(),
        token: shared.config.token.clone(),
        services: Vec::new(),
        software: format!("worker-agent {}", env!("CARGO_PKG_VERSION")),
        max_lanes: shared.config.max_lanes,
        lane_of: None,
    }
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
    remembered: &HashMap<String, u16>,
) -> Result<(Accepted, Dialed), AgentError> {
    let mut dialed = dial(server, None, shared).await?;
    let hello = AgentHello {
        services: shared
            .config
            .services
            .iter()
            .map(|s| ServiceRequest {
                name: s.name.clone(),
                target_port: s.target_port,
                preferred_port: s
                    .preferred_port
                    .or_else(|| remembered.get(&s.name).copied()),
                strict: s.strict && s.preferred_port.is_some(),
                allow: s.allow.clone(),
                no_port: s.no_port,
            })
            .collect(),
        ..bare_hello(shared)
    };
    match exchange(&mut dialed.tls, server, &hello).await? {
        RelayHello::Accepted(accepted) => Ok((accepted, dialed)),
        RelayHello::Refused(refusal) => Err(AgentError::refused(server.to_string(), refusal)),
        RelayHello::LaneJoined => Err(transient(
            "unexpected answer from",
            server,
            &"a lane confirmation to a session hello",
        )),
    }
}

/// Opens one more lane for the session that `key` belongs to, to the same address as the
/// session's first connection (a relay name may resolve to several relays).
async fn open_lane(
    server: &LinkTarget,
    relay: Option<SocketAddr>,
    shared: &AgentShared,
    key: &Secret,
) -> Result<Dialed, AgentError> {
    let mut dialed = dial(server, relay, shared).await?;
    let hello = AgentHello {
        max_lanes: 0,
        lane_of: Some(key.clone()),
        ..bare_hello(shared)
    };
    match exchange(&mut dialed.tls, server, &hello).await? {
        RelayHello::LaneJoined => Ok(dialed),
        RelayHello::Refused(refusal) => Err(AgentError::refused(server.to_string(), refusal)),
        RelayHello::Accepted(_) => Err(transient(
            "unexpected answer from",
            server,
            &"a session acceptance to a lane hello",
        )),
    }
}

/// One extra lane: carries the streams the relay opens on it until the relay closes it (idle),
/// the connection fails, or the session it belongs to ends (`stop`).
async fn run_lane(
    server: LinkTarget,
    relay: Option<SocketAddr>,
    shared: Arc<AgentShared>,
    key: Secret,
    streams: TaskTracker,
    stop: CancellationToken,
    idle: Duration,
) {
    let Dialed { tls, rtt } = tokio::select! {
        _ = stop.cancelled() => return,
        r = open_lane(&server, relay, &shared, &key) => match r {
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

/// The endpoints an acceptance grants, for printing and the status file. Everything the relay
/// chose (host, router address, notes) is sanitized; allocations for services this agent did
/// not ask for, or repeated ones, are dropped (and counted in one log line), so a relay can
/// neither forge log lines nor print thousands of them.
fn endpoints(server: &LinkTarget, accepted: &Accepted, config: &AgentConfig) -> Vec<Endpoint> {
    let host = sanitize(&accepted.public_host, MAX_FIELD_LEN).into_owned();
    let router = accepted
        .router
        .as_deref()
        .map(|r| sanitize(r, MAX_FIELD_LEN).into_owned());
    let mut out: Vec<Endpoint> = Vec::new();
    let mut ignored = 0usize;
    for a in &accepted.services {
        let ours = config.services.iter().any(|s| s.name == a.name);
        if !ours || out.iter().any(|e| e.name == a.name) {
            ignored += 1;
            continue;
        }
        if let Some(note) = &a.note {
            let note = sanitize(note, MAX_FIELD_LEN);
            tracing::info!(relay = %server, service = %a.name, "port {}: {note}", a.port);
        }
        out.push(match (a.port, &router) {
            (0, Some(router)) => Endpoint {
                name: a.name.clone(),
                host: host.clone(),
                port: 0,
                via_router: Some(format!("{router} as {}", config.name)),
            },
            _ => Endpoint {
                name: a.name.clone(),
                host: host.clone(),
                port: a.port,
                via_router: None,
            },
        });
    }
    if ignored > 0 {
        tracing::warn!(relay = %server, "ignoring {ignored} port allocations for services this agent did not ask for (or listed twice)");
    }
    out
}

/// Runs an established session: publishes endpoints, serves streams, exchanges heartbeats.
async fn run_session(
    id: u64,
    server: &LinkTarget,
    shared: &Arc<AgentShared>,
    accepted: Accepted,
    dialed: Dialed,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let interval = Duration::from_millis(accepted.heartbeat_interval_ms.max(100));
    let timeout = Duration::from_millis(accepted.heartbeat_timeout_ms).max(interval * 2);
    let Dialed { tls, rtt } = dialed;
    let _ = socket::tune_control(tls.get_ref().0.get_ref().tcp(), timeout);
    let relay_addr = tls.get_ref().0.get_ref().relay_addr();
    tracing::info!(relay = %server, version = accepted.version, "connected to relay");
    shared
        .status
        .connected(id, endpoints(server, &accepted, &shared.config));
    shared.members.accepted(id, server, &accepted);

    let mut mux = Session::start(tls.compat(), Mode::Client, MuxSettings::for_round_trip(rtt));
    let driver_stop = CancellationToken::new();
    let session_tasks = TaskTracker::new();
    session_tasks.spawn(mux.driver.run(driver_stop.clone()));
    let streams = TaskTracker::new();
    // Extra lanes run on `session_tasks` and close with the session's driver.
    let lanes = LaneCount::default();
    // Set when the relay announces it is going away: redial after its delay, not with backoff.
    let mut reconnect_after = None;
    let end = async {
        let ctrl = mux.opener.open().await.map_err(|e| e.to_string())?;
        let (reader, mut writer) = tokio::io::split(ctrl);
        // The relay learns of the control stream from its first frame: send one at once.
        write_frame(&mut writer, &Control::Ping { seq: 0 })
            .await
            .map_err(|e| e.to_string())?;
        let mut frames = spawn_frame_reader::<_, Control>(reader, &session_tasks);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let mut last_heard = tokio::time::Instant::now();
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), write_frame(&mut writer, &Control::Release)).await;
                    return Ok(SessionEnd::Shutdown);
                }
                stream = mux.inbound.recv() => match stream {
                    Some(stream) => { streams.spawn(serve_stream(stream, shared.targets.clone(), shared.stats.clone())); }
                    None => return Err("session closed".to_string()),
                },
                _ = tick.tick() => {
                    seq += 1;
                    if let Err(e) = write_frame(&mut writer, &Control::Ping { seq }).await {
                        return Err(format!("cannot send heartbeat: {e}"));
                    }
                }
                _ = tokio::time::sleep_until(last_heard + timeout) => {
                    return Err(format!("no heartbeat answer from the relay for {timeout:?}"));
                }
                frame = frames.recv() => match frame {
                    Some(Ok(Control::Pong { .. })) => last_heard = tokio::time::Instant::now(),
                    Some(Ok(Control::GoingAway { reconnect_after_ms })) => {
                        last_heard = tokio::time::Instant::now();
                        tracing::info!(relay = %server, "relay is shutting down; open connections continue until it closes");
                        reconnect_after = Some(Duration::from_millis(reconnect_after_ms));
                    }
                    Some(Ok(Control::OpenLane { count })) => match (&accepted.lanes, relay_addr) {
                        (Some(grant), relay) => {
                            for _ in 0..lanes.reserve(count, lane_limit(grant.max, shared.config.max_lanes)) {
                                let lane = run_lane(server.clone(), relay, shared.clone(), grant.key.clone(), streams.clone(), driver_stop.clone(), timeout);
                                let done = lanes.clone();
                                session_tasks.spawn(async move { lane.await; done.release(); });
                            }
                        }
                        _ => tracing::debug!("relay asked for a lane it never offered"),
                    },
                    Some(Ok(Control::Members { relays })) => shared.members.pushed(id, server, &relays),
                    Some(Ok(other)) => tracing::debug!(?other, "ignoring unexpected control frame"),
                    Some(Err(FrameIoError::Closed)) | None => return Err("relay closed the connection".to_string()),
                    Some(Err(e)) => return Err(e.to_string()),
                },
            }
        }
    }
    .await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_cannot_grant_more_lanes_than_the_agent_allows() {
        // The relay grants 64 connections and asks for 100 lanes; the agent said --max-lanes 3.
        let lanes = LaneCount::default();
        let limit = lane_limit(64, 3);
        assert_eq!(lanes.reserve(100, limit), 2, "the first connection counts");
        assert_eq!(lanes.reserve(100, limit), 0);
        lanes.release();
        assert_eq!(lanes.reserve(100, limit), 1);
        // A smaller grant stays smaller; --max-lanes 1 opens none whatever the relay says.
        assert_eq!(lane_limit(2, 8), 2);
        assert_eq!(LaneCount::default().reserve(100, lane_limit(64, 1)), 0);
    }
}
