//! The public side: a listener per allocated port, and one yamux stream per user connection.
//!
//! Before a user connection costs the agent anything it must pass the relay's and the agent's
//! allowlists, the port's new-connection rate, the port's concurrent cap and the agent's stream
//! cap. Refusals close the socket at once, are counted, logged at a limited rate, and audited.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use jumpgate_proto::{Cidr, StreamOpen, StreamReply};
use jumpgate_transport::bridge::{bridge, copy_half};
use jumpgate_transport::counted::{ByteCounts, Counted};
use jumpgate_transport::frame_io::{read_frame, write_frame, FrameIoError};
use jumpgate_transport::mux::{MuxError, MuxStream};
use jumpgate_transport::socket;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::audit::{timestamp, Outcome, Record};
use crate::lanes::LaneLease;
use crate::metrics::RefusedBy;
use crate::registry::{AgentSession, ServiceEndpoint};
use crate::Shared;

/// Time an agent has to open a stream and reach its local target.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts users on one allocated port until the session ends or the relay shuts down.
pub async fn serve_port(
    listener: TcpListener,
    agent: Arc<AgentSession>,
    service: ServiceEndpoint,
    shared: Arc<Shared>,
) {
    loop {
        let accepted = tokio::select! {
            _ = agent.cancel.cancelled() => return,
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                if check_admission(peer, &agent, &service, &shared).is_ok() {
                    spawn_carry(tcp, peer, &agent, &service, &shared, Greeting::None);
                }
            }
            Err(e) => accept_backoff("allocated port", e).await,
        }
    }
}

/// How the user side learns whether the agent reached its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// Raw TCP: a failure just closes the connection.
    None,
    /// An HTTP CONNECT client: `200 Connection established`, or a 502/504 with the reason.
    HttpConnect,
}

/// Applies the relay's and the agent's allowlists and the port's limits to a new user
/// connection. A refusal is counted, logged at a limited rate and audited; the caller closes.
pub fn check_admission(
    peer: SocketAddr,
    agent: &AgentSession,
    service: &ServiceEndpoint,
    shared: &Shared,
) -> Result<(), &'static str> {
    let policy = shared.policy();
    let refusal = if !Cidr::allows(&policy.user_allow, peer.ip()) {
        Some((
            RefusedBy::Allowlist,
            "source address not in the relay's allowlist",
        ))
    } else if !Cidr::allows(&service.allow, peer.ip()) {
        Some((
            RefusedBy::Allowlist,
            "source address not in the agent's allowlist for this service",
        ))
    } else if !service
        .bucket
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .try_take(
            f64::from(policy.max_new_conns_per_sec),
            f64::from(policy.max_new_conns_per_sec) * 2.0,
            Instant::now(),
        )
    {
        Some((
            RefusedBy::Rate,
            "new-connection rate limit of this port reached",
        ))
    } else if service.stats.active.load(Ordering::Relaxed) >= policy.max_conns_per_port {
        Some((
            RefusedBy::PortLimit,
            "concurrent connection limit of this port reached",
        ))
    } else {
        None
    };
    let Some((reason, why)) = refusal else {
        return Ok(());
    };
    service.stats.refused.fetch_add(1, Ordering::Relaxed);
    shared.metrics.refused(reason);
    rate_limited_warn(
        why,
        || tracing::warn!(agent = %agent.name, service = %service.name, port = service.port, %peer, "refused user connection: {why}"),
    );
    let outcome = match reason {
        RefusedBy::Allowlist => Outcome::RefusedAllowlist,
        _ => Outcome::RefusedLimit,
    };
    let now = (SystemTime::now(), Instant::now());
    audit(
        shared,
        agent,
        service,
        peer,
        now.0,
        now.1,
        &ByteCounts::default(),
        outcome,
        Some(why.into()),
    );
    Err(why)
}

/// Carries an admitted user connection on a tracked task.
pub fn spawn_carry(
    tcp: TcpStream,
    peer: SocketAddr,
    agent: &Arc<AgentSession>,
    service: &ServiceEndpoint,
    shared: &Arc<Shared>,
    greeting: Greeting,
) {
    let span = tracing::info_span!("user", agent = %agent.name, service = %service.name, %peer);
    let task = carry(
        tcp,
        peer,
        agent.clone(),
        service.clone(),
        shared.clone(),
        greeting,
    );
    shared.user_conns.spawn(task.instrument(span));
}

/// Why a stream to the agent could not be set up.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("{0}")]
    Mux(#[from] MuxError),
    #[error("{0}")]
    Frame(#[from] FrameIoError),
    #[error("agent could not reach its target: {0}")]
    Refused(String),
    #[error("agent did not answer within {STREAM_OPEN_TIMEOUT:?}")]
    Timeout,
}

impl OpenError {
    fn outcome(&self) -> Outcome {
        match self {
            OpenError::Refused(_) => Outcome::TargetUnreachable,
            _ => Outcome::AgentUnavailable,
        }
    }

    fn http_status(&self) -> &'static str {
        match self {
            OpenError::Timeout => "504 Gateway Timeout",
            _ => "502 Bad Gateway",
        }
    }
}

/// Opens a stream on `lane` and names the service and the user; the agent's reply is read
/// separately.
async fn open_stream(
    lane: &LaneLease,
    service: &str,
    peer: SocketAddr,
) -> Result<MuxStream, OpenError> {
    let mut stream = lane.opener.open().await?;
    let open = StreamOpen {
        service: service.to_string(),
        peer: peer.to_string(),
    };
    write_frame(&mut stream, &open).await?;
    Ok(stream)
}

/// Waits (until `deadline`) for the agent to say whether it reached its target.
async fn read_reply<R>(stream: &mut R, deadline: Instant) -> Result<(), OpenError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    match tokio::time::timeout_at(deadline.into(), read_frame(stream)).await {
        Err(_) => Err(OpenError::Timeout),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(StreamReply::Connected)) => Ok(()),
        Ok(Ok(StreamReply::Refused { reason })) => Err(OpenError::Refused(reason)),
    }
}

/// Carries one user connection to the agent and back, counting bytes for metrics and audit.
async fn carry(
    tcp: TcpStream,
    peer: SocketAddr,
    agent: Arc<AgentSession>,
    service: ServiceEndpoint,
    shared: Arc<Shared>,
    greeting: Greeting,
) {
    let (start_wall, started) = (SystemTime::now(), Instant::now());
    let own = Arc::new(ByteCounts::default());
    let stats = &service.stats;
    stats.active.fetch_add(1, Ordering::Relaxed);
    stats.total.fetch_add(1, Ordering::Relaxed);
    // A connection still open when the drain ends is cut with the sessions, and still audited.
    let (outcome, detail) = tokio::select! {
        ended = carry_counted(tcp, peer, &agent, &service, own.clone(), &shared, greeting) => ended,
        _ = shared.close_sessions.cancelled() => {
            (Outcome::Error, Some("cut short: the relay shut down".into()))
        }
    };
    stats.active.fetch_sub(1, Ordering::Relaxed);
    audit(
        &shared, &agent, &service, peer, start_wall, started, &own, outcome, detail,
    );
}

/// Why a carried connection ended early.
#[derive(Debug, thiserror::Error)]
enum CarryError {
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[allow(clippy::too_many_arguments)]
async fn carry_counted(
    mut tcp: TcpStream,
    peer: SocketAddr,
    agent: &AgentSession,
    service: &ServiceEndpoint,
    own: Arc<ByteCounts>,
    shared: &Shared,
    greeting: Greeting,
) -> (Outcome, Option<String>) {
    let _ = socket::set_nodelay(&tcp);
    let Ok(_permit) = agent.permits.clone().try_acquire_owned() else {
        let why = "agent already carries its maximum of concurrent connections";
        tracing::warn!("refusing user connection: {why}");
        service.stats.refused.fetch_add(1, Ordering::Relaxed);
        shared.metrics.refused(RefusedBy::AgentLimit);
        http_status(&mut tcp, greeting, "503 Service Unavailable", why).await;
        return (Outcome::RefusedLimit, Some(why.into()));
    };
    let started = Instant::now();
    let deadline = started + STREAM_OPEN_TIMEOUT;
    // Held until the connection ends: the lane counts it as busy meanwhile.
    let lane = agent.lanes.pick().await;
    // The connection's bytes count towards its own audit record, its service and its lane.
    let counts = vec![own, service.stats.bytes.clone(), lane.bytes.clone()];
    let opened =
        match tokio::time::timeout_at(deadline.into(), open_stream(&lane, &service.name, peer))
            .await
        {
            Ok(opened) => opened,
            Err(_) => Err(OpenError::Timeout),
        };
    let result = match opened {
        Ok(mut stream) if greeting == Greeting::HttpConnect => {
            match read_reply(&mut stream, deadline).await {
                Ok(()) => {
                    shared.metrics.stream_opened(started.elapsed());
                    connect_established(tcp, stream, counts).await
                }
                Err(e) => {
                    http_status(&mut tcp, greeting, e.http_status(), &e.to_string()).await;
                    Err(e.into())
                }
            }
        }
        Ok(stream) => {
            let mut user = Counted::new(tcp, counts);
            pipelined(&mut user, stream, deadline, || {
                shared.metrics.stream_opened(started.elapsed());
            })
            .await
        }
        Err(e) => {
            http_status(&mut tcp, greeting, e.http_status(), &e.to_string()).await;
            Err(e.into())
        }
    };
    match result {
        Ok(()) => (Outcome::Closed, None),
        Err(CarryError::Open(e)) => {
            tracing::warn!("closing user connection: {e}");
            (e.outcome(), Some(e.to_string()))
        }
        Err(CarryError::Io(e)) => {
            tracing::debug!("user connection ended: {e}");
            (Outcome::Error, Some(e.to_string()))
        }
    }
}

/// Bridges a raw TCP user while the agent is still reaching its target: the user's first bytes
/// (an ssh client's banner, a request) travel right behind the stream header instead of one
/// tunnel round trip later, and the agent's side starts once it has replied `Connected`.
async fn pipelined(
    user: &mut Counted<TcpStream>,
    stream: MuxStream,
    deadline: Instant,
    on_connected: impl FnOnce(),
) -> Result<(), CarryError> {
    let (mut user_read, mut user_write) = tokio::io::split(user);
    let (mut agent_read, mut agent_write) = tokio::io::split(stream);
    let up = async {
        copy_half(&mut user_read, &mut agent_write).await?;
        Ok::<_, CarryError>(())
    };
    let down = async {
        read_reply(&mut agent_read, deadline).await?;
        on_connected();
        copy_half(&mut agent_read, &mut user_write).await?;
        Ok::<_, CarryError>(())
    };
    tokio::try_join!(up, down).map(|_| ())
}

/// Completes an HTTP CONNECT tunnel once the agent reached its target.
async fn connect_established(
    mut tcp: TcpStream,
    mut stream: MuxStream,
    counts: Vec<Arc<ByteCounts>>,
) -> Result<(), CarryError> {
    tcp.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    let mut user = Counted::new(tcp, counts);
    bridge(&mut user, &mut stream).await?;
    Ok(())
}

/// Answers an HTTP CONNECT client with an error status and a one-line reason.
pub async fn http_status(tcp: &mut TcpStream, greeting: Greeting, status: &str, why: &str) {
    if greeting == Greeting::HttpConnect {
        let body = format!("{why}\n");
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tcp.write_all(response.as_bytes()).await;
    }
}

#[allow(clippy::too_many_arguments)]
fn audit(
    shared: &Shared,
    agent: &AgentSession,
    service: &ServiceEndpoint,
    peer: SocketAddr,
    start: SystemTime,
    started: Instant,
    bytes: &ByteCounts,
    outcome: Outcome,
    detail: Option<String>,
) {
    shared.audit.record(Record {
        start: timestamp(start),
        src: peer.to_string(),
        relay_port: service.port,
        agent: agent.name.to_string(),
        service: service.name.to_string(),
        bytes_up: bytes.read.load(Ordering::Relaxed),
        bytes_down: bytes.written.load(Ordering::Relaxed),
        duration_ms: started.elapsed().as_millis() as u64,
        outcome,
        detail,
    });
}

/// Runs `log` at most once a second per `key`, so a scan or flood cannot flood the log too.
pub fn rate_limited_warn(key: &'static str, log: impl FnOnce()) {
    static LAST: Mutex<Option<HashMap<&'static str, Instant>>> = Mutex::new(None);
    let now = Instant::now();
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    let map = last.get_or_insert_with(HashMap::new);
    match map.get(key) {
        Some(t) if now.duration_since(*t) < Duration::from_secs(1) => {}
        _ => {
            map.insert(key, now);
            drop(last);
            log();
        }
    }
}

/// Handles an accept error. Running out of file descriptors or memory must neither spin the CPU
/// nor kill the listener: pause briefly and log at a limited rate.
pub async fn accept_backoff(what: &'static str, e: std::io::Error) {
    let resource = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if !resource {
        tracing::debug!("accept on {what} failed: {e}");
        return;
    }
    rate_limited_warn(what, || {
        tracing::warn!("accept on {what} failed: {e}; pausing accepts briefly (raise LimitNOFILE if this repeats)")
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
}
