//! Why a connection attempt failed, and whether trying again makes sense.
//!
//! Three kinds, by what the failure proves:
//! - Transient ([`AgentError::Transient`]): the network or the relay had a problem; retry soon.
//! - Suspicious ([`AgentError::is_suspicious`]): TLS failed before the relay proved who it is (a
//!   certificate that matches no pin or CA, an alert during the handshake). A misconfigured pin
//!   and a DNS spoof look the same from here, so this proves nothing: retry, slowly and loudly.
//! - Permanent ([`AgentError::is_permanent`]): the authenticated relay itself turned the agent
//!   away (wrong token, name not allowed, client certificate rejected), or the settings are
//!   invalid. Retrying cannot help; that relay's link stops.
//!
//! Every string that came from the relay (or from a decoder quoting what the relay sent) is
//! sanitized when the error is built, so logging or printing an `AgentError` is always safe.

use jumpgate_config::ConfigError;
use jumpgate_daemon::ExitStatus;
use jumpgate_proto::display::MAX_MESSAGE_LEN;
use jumpgate_proto::{sanitize, Refusal};
use jumpgate_transport::frame_io::FrameIoError;
use jumpgate_transport::mux::MuxError;
use jumpgate_transport::tls::TlsError;

/// An agent error. Only [`AgentError::is_permanent`] ones stop a relay's link.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Settings are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The relay turned the agent away.
    #[error("relay {server} refused this agent: {refusal}")]
    Refused {
        /// Which relay.
        server: String,
        /// Why, with the relay's text sanitized.
        refusal: Refusal,
    },
    /// The relay's certificate is not the one this agent trusts (pin or CA). Suspicious, not
    /// permanent: see the module documentation.
    #[error("relay {server} failed verification: {detail}; check --fingerprint / --ca against `relay-server fingerprint`")]
    Certificate {
        /// Which relay.
        server: String,
        /// What rustls said, naming the fingerprint seen and the ones expected.
        detail: String,
    },
    /// The TLS handshake failed at the protocol level (an alert, a malformed message) before the
    /// relay proved who it is. Suspicious, not permanent: anyone on the path can send an alert.
    #[error("TLS handshake with {server} failed before the relay was authenticated: {detail}")]
    Handshake {
        /// Which relay.
        server: String,
        /// What rustls said.
        detail: String,
    },
    /// The relay, after proving who it is, rejected this agent's client certificate: as final
    /// as a wrong token.
    #[error("relay {server}: {detail}")]
    ClientCertificate {
        /// Which relay.
        server: String,
        /// What failed and what to check.
        detail: String,
    },
    /// Every relay's link ended permanently (the agent had several relays); in configuration
    /// order.
    #[error("every relay turned this agent away: {}", join(.0))]
    AllStopped(Vec<AgentError>),
    /// The relay could not be reached or the connection broke during setup.
    #[error("{0}")]
    Transient(String),
}

fn join(errors: &[AgentError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl AgentError {
    /// A transient error whose text may quote the relay: sanitized here.
    pub fn transient(text: impl AsRef<str>) -> Self {
        AgentError::Transient(sanitize(text.as_ref(), MAX_MESSAGE_LEN).into_owned())
    }

    /// The relay's refusal, its free-text fields sanitized.
    pub fn refused(server: impl Into<String>, refusal: Refusal) -> Self {
        AgentError::Refused {
            server: server.into(),
            refusal: jumpgate_proto::Refusal::sanitized(refusal),
        }
    }

    /// The end of the agent once every relay's link ended permanently: a single relay's error
    /// stays as it is (same text, same exit status).
    pub fn all_stopped(mut errors: Vec<AgentError>) -> Self {
        match errors.len() {
            1 => errors.remove(0),
            _ => AgentError::AllStopped(errors),
        }
    }

    /// Whether retrying cannot help: that relay's link stops instead of hammering the relay.
    pub fn is_permanent(&self) -> bool {
        match self {
            AgentError::Config(_)
            | AgentError::Tls(_)
            | AgentError::ClientCertificate { .. }
            | AgentError::AllStopped(_) => true,
            AgentError::Refused { refusal, .. } => refusal.is_permanent(),
            AgentError::Certificate { .. }
            | AgentError::Handshake { .. }
            | AgentError::Transient(_) => false,
        }
    }

    /// Whether the relay could not be authenticated: retried, but loudly and with a long
    /// backoff, since it may be an impostor.
    pub fn is_suspicious(&self) -> bool {
        matches!(
            self,
            AgentError::Certificate { .. } | AgentError::Handshake { .. }
        )
    }

    /// The process exit status this error maps to. With several relays all turned away, the
    /// status they share, else 1 (a restart may help with one of them).
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            AgentError::Config(_) | AgentError::Tls(_) => ExitStatus::Usage,
            AgentError::ClientCertificate { .. } => ExitStatus::NoPerm,
            AgentError::Refused { refusal, .. } => match refusal {
                Refusal::Unauthorized
                | Refusal::TokenRejected { .. }
                | Refusal::NameNotAllowed { .. } => ExitStatus::NoPerm,
                _ => ExitStatus::Failure,
            },
            AgentError::AllStopped(errors) => {
                let mut statuses = errors.iter().map(AgentError::exit_status);
                let first = statuses.next().unwrap_or(ExitStatus::Failure);
                if statuses.all(|s| s == first) {
                    first
                } else {
                    ExitStatus::Failure
                }
            }
            AgentError::Certificate { .. }
            | AgentError::Handshake { .. }
            | AgentError::Transient(_) => ExitStatus::Failure,
        }
    }
}

impl From<FrameIoError> for AgentError {
    fn from(e: FrameIoError) -> Self {
        AgentError::transient(format!("handshake failed: {e}"))
    }
}

impl From<MuxError> for AgentError {
    fn from(e: MuxError) -> Self {
        AgentError::transient(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unauthorized(server: &str) -> AgentError {
        AgentError::refused(server, Refusal::Unauthorized)
    }

    #[test]
    fn kinds() {
        let cert = AgentError::Certificate {
            server: "r:7000".into(),
            detail: "pin".into(),
        };
        assert!(cert.is_suspicious() && !cert.is_permanent());
        let alert = AgentError::Handshake {
            server: "r:7000".into(),
            detail: "received fatal alert: BadCertificate".into(),
        };
        assert!(alert.is_suspicious() && !alert.is_permanent());
        let client = AgentError::ClientCertificate {
            server: "r:7000".into(),
            detail: "rejected".into(),
        };
        assert!(client.is_permanent() && !client.is_suspicious());
        assert_eq!(client.exit_status(), ExitStatus::NoPerm);
        assert!(unauthorized("r").is_permanent());
        assert_eq!(unauthorized("r").exit_status(), ExitStatus::NoPerm);
        let busy = AgentError::refused("r", Refusal::ShuttingDown);
        assert!(!busy.is_permanent() && !busy.is_suspicious());
    }

    #[test]
    fn all_stopped_keeps_a_single_error_and_agrees_on_a_shared_status() {
        let one = AgentError::all_stopped(vec![unauthorized("a:1")]);
        assert!(matches!(one, AgentError::Refused { .. }));
        let both = AgentError::all_stopped(vec![unauthorized("a:1"), unauthorized("b:2")]);
        assert!(both.is_permanent());
        assert_eq!(both.exit_status(), ExitStatus::NoPerm);
        let text = both.to_string();
        assert!(text.contains("relay a:1 refused") && text.contains("relay b:2 refused"));
        let strict = AgentError::refused(
            "b:2",
            Refusal::PreferredPortUnavailable {
                service: "ssh".into(),
                port: 1,
                why: "is taken".into(),
            },
        );
        let mixed = AgentError::all_stopped(vec![unauthorized("a:1"), strict]);
        assert_eq!(mixed.exit_status(), ExitStatus::Failure);
    }

    #[test]
    fn relay_text_is_sanitized() {
        let e = AgentError::refused(
            "r:7000",
            Refusal::BadRequest {
                detail: format!("x\nERROR forged\x1b[31m{}", "A".repeat(60_000)),
            },
        );
        let text = e.to_string();
        assert!(!text.contains('\n') && !text.contains('\x1b'), "{text}");
        assert!(text.len() < 400, "{}", text.len());
        assert!(text.contains("x\\nERROR forged\\u{1b}[31m"));
        let t = AgentError::transient(format!("bad frame: {}", "\r\n".repeat(10_000)));
        assert!(t.to_string().len() <= MAX_MESSAGE_LEN);
        assert!(!t.to_string().contains('\n'));
    }
}
