//! The control stream's frames: heartbeats, going-away and release, extra lanes, the fleet's
//! members, and a host agent's tunnel registrations with the relay's answers.

use serde::{Deserialize, Serialize};

use super::hello::{Allocation, ServiceRequest};
use super::refusal::Refusal;
use crate::secret::Secret;

/// Frames on the control stream, in either direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Heartbeat from the agent; the relay echoes it as `Pong`.
    Ping {
        /// Echoed back, so a late pong is recognisable.
        seq: u64,
    },
    /// Heartbeat answer from the relay.
    Pong {
        /// The ping's sequence number.
        seq: u64,
    },
    /// The relay is stopping: reconnect after the given delay instead of backing off.
    GoingAway {
        /// Suggested delay before redialling.
        reconnect_after_ms: u64,
    },
    /// The agent is stopping: close its listeners now, keep its leases.
    Release,
    /// From the relay: user connections overlap and every lane carries one already; open
    /// `count` more lanes (within [`LaneGrant::max`](crate::LaneGrant::max)).
    OpenLane {
        /// How many lanes to open.
        count: u16,
    },
    /// From the relay, version [`MEMBERS_SINCE`](crate::member::MEMBERS_SINCE) on: the fleet's
    /// members changed; this is the whole new list (as in [`Accepted::members`](crate::Accepted::members)).
    Members {
        /// Every relay of the fleet, this one included.
        relays: Vec<crate::member::RelayMember>,
    },
    /// From a host agent, version [`HOST_SINCE`](crate::tunnel::HOST_SINCE) on: expose this
    /// job's tunnel over this session. Answered by [`Control::Registered`] with the same `id`.
    /// Registering a name the session holds already replaces that tunnel (new services,
    /// credential or keys) as a takeover by the same identity would.
    Register {
        /// Chosen by the agent, echoed in the answer.
        id: u64,
        /// The tunnel.
        tunnel: TunnelHello,
    },
    /// From the relay: the answer to [`Control::Register`] `id`.
    Registered {
        /// The registration's id.
        id: u64,
        /// The tunnel's ports, or why not.
        reply: TunnelReply,
    },
    /// From a host agent: close this tunnel's ports now. `release`: give up its leases too
    /// (the job ended); otherwise they age as a departed agent's do, so a re-registration
    /// gets the same ports.
    Unregister {
        /// The tunnel's name.
        name: String,
        /// Free the tunnel's ports for others at once.
        release: bool,
    },
    /// From the relay: it ended this tunnel (revoked credential, an operator's disconnect, a
    /// takeover by the same identity elsewhere); the host session and its other tunnels carry
    /// on. The agent registers it again unless `reason` is permanent.
    TunnelClosed {
        /// The tunnel's name.
        name: String,
        /// Why.
        reason: Refusal,
    },
}

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

/// The relay's answer to one [`Control::Register`].
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
