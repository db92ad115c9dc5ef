//! Phase one of an agent connection: TLS, the preface, the hello and authentication, all under
//! the handshake timeout. What comes out is an agent that proved who it is and asked for
//! something well-formed; nothing has been allocated for it yet.

use std::collections::HashSet;

use jumpgate_proto::tunnel::HOST_SINCE;
use jumpgate_proto::{
    negotiate_version, validate_name, AgentHello, Refusal, RelayHello, ServiceRequest,
    VersionProbe, PREFACE,
};
use jumpgate_transport::frame_io::{read_payload, write_frame, FrameIoError};
use jumpgate_transport::readahead::ReadAhead;
use jumpgate_transport::{socket, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::metrics::HandshakeFailure;
use crate::policy::Credential;

use super::io::AgentIo;
use super::Agents;

/// An agent connection's TLS stream, over TCP or a WebSocket.
pub(crate) type TlsStream = tokio_rustls::server::TlsStream<ReadAhead<AgentIo>>;

/// Most services one agent may expose.
const MAX_SERVICES: usize = 16;

/// Why a connection on the agent port did not become a session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
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

impl HandshakeError {
    /// The metric label for this failure.
    pub fn metric(&self) -> HandshakeFailure {
        match self {
            HandshakeError::Tls(_) => HandshakeFailure::Tls,
            HandshakeError::Timeout => HandshakeFailure::Timeout,
            HandshakeError::Preface | HandshakeError::Frame(_) => HandshakeFailure::Protocol,
            HandshakeError::Refused(r) => match r {
                Refusal::Unauthorized | Refusal::TokenRejected { .. } => {
                    HandshakeFailure::Unauthorized
                }
                Refusal::NameNotAllowed { .. } | Refusal::NameHeld { .. } => {
                    HandshakeFailure::NameNotAllowed
                }
                Refusal::UnsupportedVersion { .. } => HandshakeFailure::Version,
                Refusal::BadRequest { .. } => HandshakeFailure::BadRequest,
                Refusal::RangeExhausted { .. }
                | Refusal::CredentialFull { .. }
                | Refusal::PreferredPortUnavailable { .. }
                | Refusal::Unavailable { .. } => HandshakeFailure::Allocation,
                Refusal::ShuttingDown | Refusal::LaneUnavailable { .. } => {
                    HandshakeFailure::Overload
                }
            },
        }
    }

    /// Whether this failure looks like guessing or garbage, and so counts towards a ban at once.
    /// Timeouts do not: a flaky link must not get a NAT full of workers banned. They count only
    /// past an allowance ([`AuthGuard::record_timeout`](crate::guard::AuthGuard::record_timeout)),
    /// so idle connections cannot hold the handshake slots for ever.
    pub fn counts_as_failure(&self) -> bool {
        match self {
            HandshakeError::Timeout => false,
            HandshakeError::Refused(r) => matches!(
                r,
                Refusal::Unauthorized
                    | Refusal::TokenRejected { .. }
                    | Refusal::NameNotAllowed { .. }
                    | Refusal::BadRequest { .. }
            ),
            HandshakeError::Tls(_) | HandshakeError::Preface | HandshakeError::Frame(_) => true,
        }
    }
}

/// An agent that completed TLS and sent an acceptable hello.
pub(crate) struct Handshaken {
    /// The connection, positioned right after the hello.
    pub tls: TlsStream,
    /// What it asked for.
    pub hello: AgentHello,
    /// The protocol version both sides speak.
    pub version: u16,
    /// How it authenticated.
    pub credential: Credential,
    /// The keys that alone may reach it through the jump listener, if it brought any.
    pub jump_keys: Option<std::sync::Arc<[russh::keys::ssh_key::public::KeyData]>>,
}

/// TLS, preface, hello and authentication, all under the handshake timeout. A refusal is sent
/// to the agent before the error is returned.
pub(crate) async fn handshake(io: AgentIo, agents: &Agents) -> Result<Handshaken, HandshakeError> {
    let config = &agents.config;
    let _ = socket::tune_control(io.tcp(), config.heartbeat_timeout);
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    let mut tls = tokio::time::timeout_at(deadline, agents.acceptor.accept(ReadAhead::new(io)))
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
    // Not validated yet: logged escaped and cut short.
    let shown = jumpgate_proto::sanitize(&hello.name, jumpgate_proto::display::MAX_FIELD_LEN);
    tracing::Span::current().record("name", shown.as_ref());
    let cert_names: Vec<String> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(tls::certificate_dns_names)
        .unwrap_or_default();
    let checked = check_hello(&hello, version, &cert_names, agents).and_then(|credential| {
        let keys = crate::jump::auth::agent_keys(&hello.jump_keys)
            .map_err(|detail| Refusal::BadRequest { detail })?;
        Ok((credential, keys))
    });
    match checked {
        Ok((credential, jump_keys)) => Ok(Handshaken {
            tls,
            hello,
            version,
            credential,
            jump_keys,
        }),
        Err(r) => Err(refuse(&mut tls, r).await),
    }
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
    version: u16,
    cert_names: &[String],
    agents: &Agents,
) -> Result<Credential, Refusal> {
    let bad = |detail: String| Refusal::BadRequest { detail };
    if hello.host && version < HOST_SINCE {
        return Err(bad(format!(
            "a host session needs protocol version {HOST_SINCE} or newer, and this connection negotiated {version}; \
             upgrade the relay, or run one agent per tunnel"
        )));
    }
    let credential =
        agents
            .policy
            .current()
            .authorize(hello.token.as_ref(), cert_names, &hello.name)?;
    validate_name("agent", &hello.name).map_err(|e| bad(e.to_string()))?;
    if hello.lane_of.is_some() {
        return Ok(credential); // a lane exposes nothing of its own
    }
    if hello.host && hello.services.is_empty() {
        return Ok(credential); // its tunnels bring the services
    }
    check_services(&hello.services, agents)?;
    Ok(credential)
}

/// Validates the services an agent or a tunnel asks for: how many, their names, and that a
/// router-only service has a router to reach it through.
pub(crate) fn check_services(services: &[ServiceRequest], agents: &Agents) -> Result<(), Refusal> {
    let bad = |detail: String| Refusal::BadRequest { detail };
    if services.is_empty() || services.len() > MAX_SERVICES {
        return Err(bad(format!(
            "an agent must expose between 1 and {MAX_SERVICES} services, not {}",
            services.len()
        )));
    }
    let mut seen = HashSet::new();
    for s in services {
        validate_name("service", &s.name).map_err(|e| bad(e.to_string()))?;
        if !seen.insert(s.name.as_str()) {
            return Err(bad(format!("service {:?} is listed twice", s.name)));
        }
    }
    if services.iter().any(|s| s.no_port) && agents.config.router_listen.is_none() {
        return Err(bad(
            "a service asked for no port, but this relay has no name router (router_listen); drop --no-port".into(),
        ));
    }
    Ok(())
}

/// Sends a refusal (best effort) and returns the error to log; both carry the refusal with its
/// free text escaped and cut short (a hostile hello's name or a parser's echo of it included).
pub(crate) async fn refuse(tls: &mut TlsStream, refusal: Refusal) -> HandshakeError {
    let refusal = refusal.sanitized();
    let _ = write_frame(tls, &RelayHello::Refused(refusal.clone())).await;
    let _ = tls.shutdown().await;
    HandshakeError::Refused(refusal)
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
