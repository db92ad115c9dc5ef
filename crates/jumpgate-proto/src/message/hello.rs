//! The handshake: the agent's hello (who it is, its credential, the services it wants
//! reachable) and the relay's answer (the ports it got, or why not).

use serde::{Deserialize, Serialize};

use super::refusal::Refusal;
use crate::secret::Secret;

/// First message from agent to relay: who it is, how it proves it, what it wants exposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    /// Oldest version the agent speaks.
    pub min_version: u16,
    /// Newest version the agent speaks.
    pub max_version: u16,
    /// Agent name; leases are keyed by it, so a restarted agent gets its ports back.
    pub name: String,
    /// Shared or per-agent token. `None` when the agent proves itself with a client certificate.
    #[serde(default)]
    pub token: Option<Secret>,
    /// Services to expose.
    pub services: Vec<ServiceRequest>,
    /// The agent's software version, for the relay's logs.
    #[serde(default)]
    pub software: String,
    /// Most connections ("lanes") the agent will keep to this relay when asked to, counting
    /// the first. All streams of one connection share its TCP send buffer (4 MiB by default:
    /// ~400 Mbit/s at 80 ms in all) and stall together on a lost packet; extra lanes, opened
    /// only while user connections overlap, give parallel transfers a socket each. 0 or 1:
    /// this agent opens no lanes (older agents send nothing and get none).
    #[serde(default)]
    pub max_lanes: u16,
    /// Set instead of services when this connection joins the agent's live session as one
    /// more lane: the key the relay handed out in [`Accepted::lanes`].
    #[serde(default)]
    pub lane_of: Option<Secret>,
    /// The OpenSSH public keys (`TYPE BASE64`, no options or comment) that alone may reach this
    /// agent through the relay's `ssh -J` listener, on top of the relay's own jump policy; empty:
    /// the relay's policy alone. Sent only when set, so older relays never see it (they would
    /// ignore it anyway); at most [`MAX_JUMP_KEYS`] of at most [`MAX_JUMP_KEY_LEN`] bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jump_keys: Vec<String>,
    /// This session is a host agent's, from version [`HOST_SINCE`](crate::tunnel::HOST_SINCE):
    /// it carries the tunnels registered on its control stream
    /// ([`Control::Register`](crate::Control::Register)), and its name and credential grant no tunnel by themselves.
    /// Sent only when set; a relay that negotiated an older version refuses such a hello.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host: bool,
}

/// Most keys an agent may bring in [`AgentHello::jump_keys`] (the whole hello is one frame of
/// at most 64 KiB).
pub const MAX_JUMP_KEYS: usize = 32;
/// Longest key line in [`AgentHello::jump_keys`], in bytes (an RSA-4096 key is ~720).
pub const MAX_JUMP_KEY_LEN: usize = 1024;

/// One service an agent wants reachable through the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRequest {
    /// Service name, unique within the agent (e.g. `ssh`).
    pub name: String,
    /// Port of the local target on the agent's side; lets name routing pick a service by port.
    #[serde(default)]
    pub target_port: u16,
    /// A public port the agent would like, e.g. the one it had before.
    #[serde(default)]
    pub preferred_port: Option<u16>,
    /// Refuse the whole hello rather than accept another port than `preferred_port`.
    #[serde(default)]
    pub strict: bool,
    /// Who may connect to this service. The relay applies it on top of its own allowlist, so an
    /// agent can narrow who reaches it but never widen it. Empty means "whoever the relay allows".
    #[serde(default)]
    pub allow: Vec<crate::cidr::Cidr>,
    /// Reachable only through the relay's name router: no public port is allocated.
    #[serde(default)]
    pub no_port: bool,
}

/// The relay's answer to an [`AgentHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RelayHello {
    /// The agent is in; its ports are listening.
    Accepted(Accepted),
    /// The agent is out, and why.
    Refused(Refusal),
    /// A lane hello was accepted: the connection now carries streams of the session it joined.
    LaneJoined,
}

/// What the agent got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// Negotiated protocol version.
    pub version: u16,
    /// The host users connect to (the relay's `--public-host`).
    pub public_host: String,
    /// One entry per requested service, in request order.
    pub services: Vec<Allocation>,
    /// How often the agent must send a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// Silence after which either side gives the session up.
    pub heartbeat_timeout_ms: u64,
    /// Where the relay's name router listens for users (`host:port`), if it has one.
    #[serde(default)]
    pub router: Option<String>,
    /// Present when the relay may ask this agent for extra lanes ([`Control::OpenLane`](crate::Control::OpenLane)).
    #[serde(default)]
    pub lanes: Option<LaneGrant>,
    /// The relays of the fleet (this one included), where agents should keep a session each;
    /// sent from version [`MEMBERS_SINCE`](crate::member::MEMBERS_SINCE). Empty from older
    /// relays, which are fleets of one.
    #[serde(default)]
    pub members: Vec<crate::member::RelayMember>,
    /// This relay's own entry of [`members`](Self::members), its id unique to this relay
    /// process: an agent that reached it at another address (a private one, the second address
    /// of a dual-stack name) knows it already has a session with it, and keeps one, not two
    /// that would take each other over.
    #[serde(default)]
    pub relay: Option<crate::member::RelayMember>,
}

/// What an agent needs to open extra lanes for its session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneGrant {
    /// Proves a lane belongs to this session (and not to an older one with the same name).
    pub key: Secret,
    /// Most connections the session may have at once, counting the first.
    pub max: u16,
}

/// A service's public endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Service name, as requested.
    pub name: String,
    /// Public port on the relay.
    pub port: u16,
    /// Why the port differs from the one the agent preferred, if it does.
    #[serde(default)]
    pub note: Option<String>,
}
