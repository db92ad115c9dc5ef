//! What a session asks of its driver: the events it acts on and why each frame goes out. A
//! module of its own, below both the session loop and a host session's tunnels, which both
//! raise them.

use std::time::Duration;

use jumpgate_proto::{Allocation, Control, Refusal, RelayMember, Secret};

/// Something the driver acts on (logs, opens lanes, hands member lists on, ends the session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The relay is stopping; redial after `reconnect_after` once the session ends.
    GoingAway {
        /// The relay's suggested delay.
        reconnect_after: Duration,
    },
    /// Open `count` more lanes joining this session with `key` (already counted against the
    /// limit: report each one's end with [`Session::lane_closed`](crate::Session::lane_closed)).
    OpenLanes {
        /// How many (at least one).
        count: u16,
        /// The session's lane key.
        key: Secret,
    },
    /// The relay asked for a lane it never offered (no lane grant in its acceptance).
    LaneNotOffered,
    /// The relay pushed the fleet's whole new member list (unchecked: the driver checks it).
    Members(Vec<RelayMember>),
    /// A frame that has no meaning from the relay here.
    Ignored(Control),
    /// Nothing arrived from the relay for `after`: the session is over.
    TimedOut {
        /// The heartbeat timeout.
        after: Duration,
    },
    /// A host session's relay negotiated `version`, older than host sessions
    /// ([`HOST_SINCE`](jumpgate_proto::tunnel::HOST_SINCE)): it holds no tunnels, and the driver falls back to one ordinary
    /// session per tunnel on this relay.
    HostUnsupported {
        /// The version the relay chose.
        version: u16,
    },
    /// The relay placed a registered tunnel (unsanitized: see
    /// [`Placement::of_allocations`](crate::Placement::of_allocations)).
    TunnelPlaced {
        /// The tunnel.
        name: String,
        /// Its ports, as the relay sent them.
        services: Vec<Allocation>,
    },
    /// The relay refused a tunnel's registration.
    TunnelRefused {
        /// The tunnel.
        name: String,
        /// Why (unsanitized).
        refusal: Refusal,
        /// Registered again after this delay; `None`: not on this session (a permanent refusal).
        retry_in: Option<Duration>,
    },
    /// The relay ended a placed tunnel (revocation, an operator's disconnect, a takeover).
    TunnelClosed {
        /// The tunnel.
        name: String,
        /// Why (unsanitized).
        reason: Refusal,
        /// Registered again after this delay; `None`: not on this session.
        retry_in: Option<Duration>,
    },
}

/// Why a frame goes out, so the driver can word a failed write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The first frame, which tells the relay which stream is the control stream.
    Opening,
    /// A heartbeat.
    Heartbeat,
    /// The agent is stopping: the relay closes its listeners and keeps its leases.
    Release,
    /// A host session's tunnel registered or removed.
    Tunnel,
}
