//! Why a relay turns an agent (or one of a host's tunnels) away: the refusal travels on the wire,
//! its text is what the agent logs, and whether it is permanent decides if the agent retries.

use serde::{Deserialize, Serialize};

/// Why a relay turned an agent away. The `Display` text is what the agent logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Refusal {
    /// The credential is wrong, missing or revoked.
    #[error("authentication failed: the relay rejected this agent's token or certificate; check --token-file / JUMPGATE_TOKEN against the relay's token")]
    Unauthorized,
    /// The credential is valid but may not claim this agent name.
    #[error("this agent's credential may not use the name {name:?}")]
    NameNotAllowed {
        /// The name that was claimed.
        name: String,
    },
    /// A signed join token was presented and refused (expired, wrongly signed, malformed).
    #[error("the relay rejected this agent's signed join token: {detail}")]
    TokenRejected {
        /// Why, in words an operator can act on.
        detail: String,
    },
    /// The name is held, live or by a lease, by another identity (another token entry,
    /// certificate or signed-token subject). Not permanent: the hold ends when that lease expires
    /// or an operator releases it.
    #[error("the name {name:?} is held by another identity (a different token entry, certificate or signed token); it frees when that agent's lease expires or an operator releases it (DELETE /api/agents/{name}?release=true)")]
    NameHeld {
        /// The name that was claimed.
        name: String,
    },
    /// The agent's credential already holds as many names or leases as the relay allows one
    /// credential. Not permanent: its other names' leases expire or are released.
    #[error("this agent's credential holds its maximum of {detail}; release names it no longer needs (DELETE /api/agents/NAME?release=true) or ask the operator to raise the cap; retrying")]
    CredentialFull {
        /// Which cap, with its value.
        detail: String,
    },
    /// No protocol version in common.
    #[error("protocol version mismatch: the relay speaks versions {relay_min}-{relay_max}, this agent speaks {agent_min}-{agent_max}; upgrade the older side")]
    UnsupportedVersion {
        /// Oldest version the relay speaks.
        relay_min: u16,
        /// Newest version the relay speaks.
        relay_max: u16,
        /// Oldest version the agent speaks.
        agent_min: u16,
        /// Newest version the agent speaks.
        agent_max: u16,
    },
    /// Every port in the range is leased.
    #[error("port range {lo}-{hi} exhausted ({in_use} in use)")]
    RangeExhausted {
        /// First port of the range.
        lo: u16,
        /// Last port of the range.
        hi: u16,
        /// Ports currently leased.
        in_use: usize,
    },
    /// A strictly preferred port could not be granted.
    #[error("service {service:?} asked strictly for port {port}, which {why}")]
    PreferredPortUnavailable {
        /// Service name.
        service: String,
        /// The port it insisted on.
        port: u16,
        /// Why not.
        why: String,
    },
    /// The hello itself is invalid.
    #[error("bad request: {detail}")]
    BadRequest {
        /// What is wrong.
        detail: String,
    },
    /// Something on the relay failed that has nothing to do with the agent (a port it granted
    /// could not be bound, file descriptors ran out); the same hello may work a moment later.
    #[error("the relay cannot serve this agent right now: {detail}; retrying")]
    Unavailable {
        /// What failed.
        detail: String,
    },
    /// The relay is stopping.
    #[error("the relay is shutting down")]
    ShuttingDown,
    /// A lane could not join its session (it ended, or has all the lanes it may have).
    #[error("lane not joined: {detail}")]
    LaneUnavailable {
        /// Why not.
        detail: String,
    },
}

impl Refusal {
    /// This refusal with every free-text field escaped and cut to
    /// [`MAX_FIELD_LEN`](crate::display::MAX_FIELD_LEN): what a relay sends and logs, and what an
    /// agent logs of what it received, so neither side echoes 60 KB or injects log lines.
    pub fn sanitized(self) -> Refusal {
        let clean = |s: String| crate::sanitize(&s, crate::display::MAX_FIELD_LEN).into_owned();
        match self {
            Refusal::NameNotAllowed { name } => Refusal::NameNotAllowed { name: clean(name) },
            Refusal::NameHeld { name } => Refusal::NameHeld { name: clean(name) },
            Refusal::CredentialFull { detail } => Refusal::CredentialFull {
                detail: clean(detail),
            },
            Refusal::TokenRejected { detail } => Refusal::TokenRejected {
                detail: clean(detail),
            },
            Refusal::PreferredPortUnavailable { service, port, why } => {
                Refusal::PreferredPortUnavailable {
                    service: clean(service),
                    port,
                    why: clean(why),
                }
            }
            Refusal::BadRequest { detail } => Refusal::BadRequest {
                detail: clean(detail),
            },
            Refusal::Unavailable { detail } => Refusal::Unavailable {
                detail: clean(detail),
            },
            Refusal::LaneUnavailable { detail } => Refusal::LaneUnavailable {
                detail: clean(detail),
            },
            r @ (Refusal::Unauthorized
            | Refusal::UnsupportedVersion { .. }
            | Refusal::RangeExhausted { .. }
            | Refusal::ShuttingDown) => r,
        }
    }

    /// Whether retrying the same hello can ever succeed. An agent stops on a permanent refusal
    /// instead of hammering the relay.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Refusal::Unauthorized
                | Refusal::TokenRejected { .. }
                | Refusal::NameNotAllowed { .. }
                | Refusal::UnsupportedVersion { .. }
                | Refusal::PreferredPortUnavailable { .. }
                | Refusal::BadRequest { .. }
        )
    }
}
