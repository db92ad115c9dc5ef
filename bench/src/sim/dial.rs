//! Dialling a relay as the agent does: TCP from the agent's source address, TLS against the
//! pin, the preface and hello, and the relay's answer classified as the agent classifies it.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use jumpgate_proto::{AgentHello, RelayHello, PREFACE};
use jumpgate_session::{session_answer, AnswerError, Identity, Placement};
use jumpgate_transport::frame_io::{read_frame, write_frame, FrameIoError};
use jumpgate_transport::readahead::ReadAhead;
use jumpgate_transport::{socket, tls};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use super::{SimConfig, SETUP_TIMEOUT};

/// Keepalive idle time before the relay told us its heartbeat settings (as in the agent).
const DEFAULT_IDLE: Duration = Duration::from_secs(30);

/// The agent side of a relay connection: TLS over TCP with the read-ahead the agent uses too.
pub(super) type TlsStream = tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>;

/// A session the relay accepted.
pub(super) struct Established {
    pub(super) tls: TlsStream,
    pub(super) rtt: Duration,
    pub(super) port: u16,
    pub(super) accepted: jumpgate_proto::Accepted,
}

/// Why an attempt failed, and what that proves (as the agent classifies it).
pub(super) struct AttemptError {
    pub(super) reason: String,
    pub(super) kind: jumpgate_session::Failure,
}

impl AttemptError {
    /// A failure the agent retries with backoff.
    pub(super) fn transient(reason: impl std::fmt::Display) -> Self {
        Self {
            reason: reason.to_string(),
            kind: jumpgate_session::Failure::Transient,
        }
    }
}

/// Dials from `source`, verifies the relay, sends `hello`: the session, how long the hello took
/// and how long the whole setup took.
pub(super) async fn establish(
    config: &SimConfig,
    relay: usize,
    source: IpAddr,
    hello: AgentHello,
    identity: &Identity,
) -> Result<(Established, Duration, Duration), AttemptError> {
    let began = Instant::now();
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| AttemptError::transient(format!("socket: {e}")))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| AttemptError::transient(format!("cannot bind {source}: {e}")))?;
    let addr = config.relays[relay];
    let tcp = tokio::time::timeout(SETUP_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| AttemptError::transient("connect timed out"))?
        .map_err(|e| AttemptError::transient(format!("cannot connect: {e}")))?;
    let rtt = began.elapsed();
    let _ = socket::tune_control(&tcp, DEFAULT_IDLE);
    let _ = socket::tune_for_path(&tcp, rtt);
    let server_name = tls::server_name(&config.server_name).map_err(AttemptError::transient)?;
    let mut tls = tokio::time::timeout(
        SETUP_TIMEOUT,
        config.connector.connect(server_name, ReadAhead::new(tcp)),
    )
    .await
    .map_err(|_| AttemptError::transient("TLS handshake timed out"))?
    .map_err(|e| AttemptError::transient(format!("TLS handshake failed: {e}")))?;
    let hello_sent = Instant::now();
    let exchange = async {
        tls.write_all(PREFACE).await.map_err(FrameIoError::from)?;
        write_frame(&mut tls, &hello).await?;
        read_frame::<_, RelayHello>(&mut tls).await
    };
    let reply = tokio::time::timeout(SETUP_TIMEOUT, exchange)
        .await
        .map_err(|_| AttemptError::transient("hello timed out"))?
        .map_err(|e| AttemptError::transient(format!("hello failed: {e}")))?;
    let took = (hello_sent.elapsed(), began.elapsed());
    let accepted = session_answer(reply).map_err(|e| match e {
        AnswerError::Refused(refusal) => AttemptError {
            kind: jumpgate_session::Failure::of_refusal(&refusal),
            reason: format!(
                "refused: {}",
                jumpgate_proto::sanitize(&refusal.to_string(), 200)
            ),
        },
        AnswerError::Unexpected(what) => AttemptError::transient(what),
    })?;
    let port = match Placement::of(&accepted, identity).port_of("ssh") {
        Some(port) => port,
        None if identity.host => 0,
        None => {
            return Err(AttemptError::transient(
                "accepted without an ssh allocation",
            ))
        }
    };
    Ok((
        Established {
            tls,
            rtt,
            port,
            accepted,
        },
        took.0,
        took.1,
    ))
}
