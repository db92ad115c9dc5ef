//! Host sessions: one agent session carrying the tunnels of many jobs (protocol version
//! [`HOST_SINCE`] on).
//!
//! A host agent says so in its hello ([`AgentHello::host`](crate::AgentHello::host)). Its own
//! name and credential only buy it the session (its connections, lanes and heartbeats): they
//! grant no tunnel name. Each job's tunnel is then registered on the control stream with that
//! job's own credential ([`Control::Register`](crate::Control::Register)), and the relay
//! authenticates, caps, leases, bans, audits and revokes it exactly as it would a session of its
//! own with the same hello, answering with [`Control::Registered`](crate::Control::Registered).
//! User connections to a tunnel's ports arrive as streams of the host session whose
//! [`StreamOpen::tunnel`](crate::StreamOpen::tunnel) names it. A tunnel ends when the agent
//! removes it ([`Control::Unregister`](crate::Control::Unregister)), when the relay ends it
//! (revocation, an operator's disconnect, a takeover: [`Control::TunnelClosed`](crate::Control::TunnelClosed)),
//! or with the host session, after which its leases age as any agent's do.
//!
//! An agent whose relay negotiated an older version opens one session per tunnel instead, with
//! the tunnel's name, credential and services in an ordinary hello.

use serde::{Deserialize, Serialize};

use crate::message::{Allocation, Refusal, ServiceRequest};
use crate::secret::Secret;

/// First protocol version with host sessions: an older relay would read a `register` frame as
/// garbage and drop the session.
pub const HOST_SINCE: u16 = 3;

/// Most tunnels one host session may hold on a relay; a registration past it is refused
/// ([`Refusal::CredentialFull`]). Bounds what one connection makes the relay keep.
pub const MAX_TUNNELS_PER_HOST: usize = 4096;

/// One job's tunnel, as a host agent registers it: what an [`AgentHello`](crate::AgentHello)
/// of its own would have said, without the connection-level fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelHello {
    /// The tunnel's name (the job's, e.g. `vh-exec-123`); leases and routing are keyed by it
    /// exactly as for an agent of that name.
    pub name: String,
    /// The job's credential (normally its signed join token). `None`: the host session's own
    /// credential, which the relay accepts for a tunnel name only where its operator allowed
    /// that credential to claim the name.
    #[serde(default)]
    pub token: Option<Secret>,
    /// Services to expose, as in a hello.
    pub services: Vec<ServiceRequest>,
    /// As [`AgentHello::jump_keys`](crate::AgentHello::jump_keys), for this tunnel alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jump_keys: Vec<String>,
}

/// The relay's answer to one [`Control::Register`](crate::Control::Register).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum TunnelReply {
    /// The tunnel is in: its ports are listening on this relay.
    Accepted {
        /// One entry per requested service, in request order.
        services: Vec<Allocation>,
    },
    /// The tunnel is out, and why; the host session and its other tunnels carry on.
    Refused(Refusal),
}
