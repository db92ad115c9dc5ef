//! Reaching a relay: the connection (direct or through the proxy, TCP or WebSocket), TLS with
//! the relay's certificate verified, and the hello exchange; and what each way of failing
//! means for the retry (transient, suspicious, or the relay's own final word).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use jumpgate_proto::display::MAX_MESSAGE_LEN;
use jumpgate_proto::{sanitize, Accepted, AgentHello, RelayHello, PREFACE};
use jumpgate_session::{session_answer, AnswerError};
use jumpgate_transport::frame_io::{read_frame, write_frame, FrameIoError};
use jumpgate_transport::readahead::ReadAhead;
use jumpgate_transport::{socket, tls};
use tokio::io::AsyncWriteExt;
use tokio_rustls::rustls;

use super::AgentShared;
use crate::error::AgentError;
use crate::fleet::set::LinkTarget;
use crate::proxy::{DialError, Egress};

/// Time allowed for TCP connect, TLS and the hello exchange, each.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalive idle time before the relay told us its heartbeat settings.
const DEFAULT_IDLE: Duration = Duration::from_secs(30);

pub(super) type TlsStream = tokio_rustls::client::TlsStream<ReadAhead<Egress>>;

/// A verified TLS connection to the relay, and the round trip its TCP handshake took.
pub(super) struct Dialed {
    pub(super) tls: TlsStream,
    pub(super) rtt: Duration,
}

/// Dials the relay (at `resolved`, when given, instead of resolving its name again) and
/// completes TLS, verifying the relay's certificate.
pub(super) async fn dial(
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
pub(super) async fn exchange(
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
pub(super) async fn establish(
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
pub(super) fn answer_error(server: &LinkTarget, e: AnswerError) -> AgentError {
    match e {
        AnswerError::Refused(refusal) => AgentError::refused(server.to_string(), refusal),
        AnswerError::Unexpected(what) => transient("unexpected answer from", server, &what),
    }
}
