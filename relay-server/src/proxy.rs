//! The public side: a listener per allocated port, and one yamux stream per user connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jumpgate_proto::{StreamOpen, StreamReply};
use jumpgate_transport::bridge::bridge;
use jumpgate_transport::frame_io::{read_frame, write_frame, FrameIoError};
use jumpgate_transport::mux::{MuxError, MuxStream};
use jumpgate_transport::socket;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

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
                let span = tracing::info_span!("user", agent = %agent.name, service = %service.name, %peer);
                shared
                    .user_conns
                    .spawn(carry(tcp, peer, agent.clone(), service.name.clone()).instrument(span));
            }
            Err(e) => accept_backoff("allocated port", e).await,
        }
    }
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
}

async fn open_stream(
    agent: &AgentSession,
    service: &str,
    peer: SocketAddr,
) -> Result<MuxStream, OpenError> {
    let mut stream = agent.opener.open().await?;
    let open = StreamOpen {
        service: service.to_string(),
        peer: peer.to_string(),
    };
    write_frame(&mut stream, &open).await?;
    match read_frame(&mut stream).await? {
        StreamReply::Connected => Ok(stream),
        StreamReply::Refused { reason } => Err(OpenError::Refused(reason)),
    }
}

/// Carries one user connection to the agent and back.
async fn carry(mut tcp: TcpStream, peer: SocketAddr, agent: Arc<AgentSession>, service: Arc<str>) {
    let _ = socket::set_nodelay(&tcp);
    let Ok(_permit) = agent.permits.clone().try_acquire_owned() else {
        tracing::warn!(
            "refusing user connection: agent already carries its maximum of concurrent connections"
        );
        return;
    };
    let started = Instant::now();
    let mut stream = match tokio::time::timeout(
        STREAM_OPEN_TIMEOUT,
        open_stream(&agent, &service, peer),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::warn!("closing user connection: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(
                "closing user connection: agent did not answer within {STREAM_OPEN_TIMEOUT:?}"
            );
            return;
        }
    };
    tracing::debug!(setup = ?started.elapsed(), "user connection carried to agent");
    match bridge(&mut tcp, &mut stream).await {
        Ok(t) => {
            tracing::debug!(up = t.a_to_b, down = t.b_to_a, duration = ?started.elapsed(), "user connection closed")
        }
        Err(e) => tracing::debug!(duration = ?started.elapsed(), "user connection ended: {e}"),
    }
}

/// Handles an accept error. Running out of file descriptors or memory must neither spin the CPU
/// nor kill the listener: pause briefly and log at most once every few seconds.
pub async fn accept_backoff(what: &str, e: std::io::Error) {
    static LAST_WARNED: AtomicU64 = AtomicU64::new(0);
    let resource = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if !resource {
        tracing::debug!("accept on {what} failed: {e}");
        return;
    }
    let now = crate::leases::now_secs();
    let last = LAST_WARNED.load(Ordering::Relaxed);
    if now >= last + 5
        && LAST_WARNED
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!("accept on {what} failed: {e}; pausing accepts briefly (raise LimitNOFILE if this repeats)");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}
