//! Why a connection attempt failed, and whether trying again makes sense.

use jumpgate_config::{ConfigError, ExitStatus};
use jumpgate_proto::Refusal;
use jumpgate_transport::frame_io::FrameIoError;
use jumpgate_transport::mux::MuxError;
use jumpgate_transport::tls::TlsError;

/// An agent error. Only [`AgentError::is_permanent`] ones end the process.
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
        /// Why.
        refusal: Refusal,
    },
    /// The relay's certificate is not the one this agent trusts.
    #[error("relay {server} failed verification: {detail}; check --fingerprint / --ca against `relay-server fingerprint`")]
    Certificate {
        /// Which relay.
        server: String,
        /// What rustls said.
        detail: String,
    },
    /// The relay could not be reached or the connection broke during setup.
    #[error("{0}")]
    Transient(String),
}

impl AgentError {
    /// Whether retrying cannot help: the agent exits instead of hammering the relay.
    pub fn is_permanent(&self) -> bool {
        match self {
            AgentError::Config(_) | AgentError::Tls(_) | AgentError::Certificate { .. } => true,
            AgentError::Refused { refusal, .. } => refusal.is_permanent(),
            AgentError::Transient(_) => false,
        }
    }

    /// The process exit status this error maps to.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            AgentError::Config(_) | AgentError::Tls(_) => ExitStatus::Usage,
            AgentError::Certificate { .. } => ExitStatus::NoPerm,
            AgentError::Refused { refusal, .. } => match refusal {
                Refusal::Unauthorized | Refusal::NameNotAllowed { .. } => ExitStatus::NoPerm,
                _ => ExitStatus::Failure,
            },
            AgentError::Transient(_) => ExitStatus::Failure,
        }
    }
}

impl From<FrameIoError> for AgentError {
    fn from(e: FrameIoError) -> Self {
        AgentError::Transient(format!("handshake failed: {e}"))
    }
}

impl From<MuxError> for AgentError {
    fn from(e: MuxError) -> Self {
        AgentError::Transient(e.to_string())
    }
}
