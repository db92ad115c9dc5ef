//! Carrying one admitted user connection: a yamux stream on one of the agent's lanes, the
//! service named in a header, the agent's reply, then bytes both ways, counted for metrics and
//! the audit log.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use jumpgate_proto::display::shown;
use jumpgate_proto::{StreamOpen, StreamReply};
use jumpgate_transport::bridge::{bridge, copy_half};
use jumpgate_transport::counted::{ByteCounts, Counted};
use jumpgate_transport::frame_io::{read_frame, write_frame, FrameIoError};
use jumpgate_transport::mux::{MuxError, MuxStream};
use jumpgate_transport::socket;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::agents::lanes::LaneLease;
use crate::agents::registry::{AgentSession, ServiceEndpoint};
use crate::audit::{timestamp, Outcome, Record};

use super::admission::Admitted;
use super::{http_status, Greeting, Users};

/// Time an agent has to open a stream and reach its local target.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Carries an admitted user connection on a task the drain waits for; `admitted` keeps its
/// places in the port's and the agent's caps until the connection ends.
pub(crate) fn spawn_carry(
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    agent: &Arc<AgentSession>,
    service: &ServiceEndpoint,
    users: &Arc<Users>,
    greeting: Greeting,
) {
    let _ = socket::set_nodelay(&tcp);
    let span = tracing::info_span!("user", agent = %agent.name, service = %service.name, %peer);
    let task = carry(
        tcp,
        peer,
        admitted,
        agent.clone(),
        service.clone(),
        users.clone(),
        (greeting, None),
    );
    users.conns.spawn(task.instrument(span));
}

/// Carries an admitted connection that is not a TCP socket of its own (an `ssh -J` channel) as
/// a raw TCP user's, its audit record naming `who` (the jump user's key).
pub(crate) fn spawn_carry_stream<S>(
    stream: S,
    peer: SocketAddr,
    admitted: Admitted,
    agent: &Arc<AgentSession>,
    service: &ServiceEndpoint,
    users: &Arc<Users>,
    who: String,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!("user", agent = %agent.name, service = %service.name, %peer);
    let task = carry(
        stream,
        peer,
        admitted,
        agent.clone(),
        service.clone(),
        users.clone(),
        (Greeting::None, Some(who)),
    );
    users.conns.spawn(task.instrument(span));
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

    /// What an HTTP CONNECT user is told: generic, since users are not authenticated here and
    /// the agent's reason can name its internal target (`target 127.0.0.1:5432 unreachable`).
    /// The detail goes to the relay's log and audit record.
    fn for_user(&self) -> &'static str {
        match self {
            OpenError::Refused(_) => "the agent could not reach its service",
            OpenError::Timeout => "the agent did not answer in time",
            OpenError::Mux(_) | OpenError::Frame(_) => "the agent is unavailable",
        }
    }
}

/// Opens a stream on `lane` and names the service, the user and (for a tunnel) the tunnel; the agent's reply is read
/// separately.
async fn open_stream(
    lane: &LaneLease,
    agent: &AgentSession,
    service: &str,
    peer: SocketAddr,
) -> Result<MuxStream, OpenError> {
    let mut stream = lane.opener.open().await?;
    let open = StreamOpen {
        service: service.to_string(),
        peer: peer.to_string(),
        // A tunnel of a host session: the host learns whose service this is.
        tunnel: agent.tunnel.as_ref().map(|_| agent.name.to_string()),
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
        // The agent's words: escaped and cut short before they reach a log line or the audit.
        Ok(Ok(StreamReply::Refused { reason })) => Err(OpenError::Refused(shown(&reason))),
    }
}

/// Carries one user connection to the agent and back, counting bytes for metrics and audit;
/// `who` names an authenticated user in the audit record.
async fn carry<S>(
    tcp: S,
    peer: SocketAddr,
    admitted: Admitted,
    agent: Arc<AgentSession>,
    service: ServiceEndpoint,
    users: Arc<Users>,
    (greeting, who): (Greeting, Option<String>),
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (start_wall, started) = (SystemTime::now(), Instant::now());
    let own = Arc::new(ByteCounts::default());
    // A connection still open when the drain ends is cut with the sessions, and still audited.
    let (outcome, detail) = tokio::select! {
        ended = carry_counted(tcp, peer, &agent, &service, own.clone(), &users, greeting) => ended,
        _ = users.close.cancelled() => {
            (Outcome::Error, Some("cut short: the relay shut down".into()))
        }
    };
    drop(admitted);
    users.audit.record(Record {
        start: timestamp(start_wall),
        src: peer.to_string(),
        relay_port: service.port,
        agent: agent.name.to_string(),
        service: service.name.to_string(),
        bytes_up: own.read.load(Ordering::Relaxed),
        bytes_down: own.written.load(Ordering::Relaxed),
        duration_ms: started.elapsed().as_millis() as u64,
        outcome,
        detail,
        user: who,
    });
}

/// Why a carried connection ended early.
#[derive(Debug, thiserror::Error)]
enum CarryError {
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

async fn carry_counted<S>(
    mut tcp: S,
    peer: SocketAddr,
    agent: &AgentSession,
    service: &ServiceEndpoint,
    own: Arc<ByteCounts>,
    users: &Users,
    greeting: Greeting,
) -> (Outcome, Option<String>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    let deadline = started + STREAM_OPEN_TIMEOUT;
    // Held until the connection ends: the lane counts it as busy meanwhile.
    let lane = agent.lanes.pick();
    // The connection's bytes count towards its own audit record, its service and its lane.
    let counts = vec![own, service.stats.bytes.clone(), lane.bytes.clone()];
    let opened = match tokio::time::timeout_at(
        deadline.into(),
        open_stream(&lane, agent, &service.name, peer),
    )
    .await
    {
        Ok(opened) => opened,
        Err(_) => Err(OpenError::Timeout),
    };
    let result = match opened {
        Ok(mut stream) if greeting == Greeting::HttpConnect => {
            match read_reply(&mut stream, deadline).await {
                Ok(()) => {
                    users.metrics.stream_opened(started.elapsed());
                    connect_established(tcp, stream, counts).await
                }
                Err(e) => {
                    http_status(&mut tcp, greeting, e.http_status(), e.for_user()).await;
                    Err(e.into())
                }
            }
        }
        Ok(stream) => {
            let mut user = Counted::new(tcp, counts);
            pipelined(&mut user, stream, deadline, || {
                users.metrics.stream_opened(started.elapsed());
            })
            .await
        }
        Err(e) => {
            http_status(&mut tcp, greeting, e.http_status(), e.for_user()).await;
            Err(e.into())
        }
    };
    match result {
        Ok(()) => (Outcome::Closed, None),
        // Escaped and cut short: a malformed reply's decoder error quotes the agent's bytes.
        Err(CarryError::Open(e)) => {
            let why = shown(&e);
            tracing::warn!("closing user connection: {why}");
            (e.outcome(), Some(why))
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
async fn pipelined<S: AsyncRead + AsyncWrite + Unpin>(
    user: &mut Counted<S>,
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
async fn connect_established<S: AsyncRead + AsyncWrite + Unpin>(
    mut tcp: S,
    mut stream: MuxStream,
    counts: Vec<Arc<ByteCounts>>,
) -> Result<(), CarryError> {
    tcp.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    let mut user = Counted::new(tcp, counts);
    bridge(&mut user, &mut stream).await?;
    Ok(())
}
