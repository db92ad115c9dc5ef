//! The messages agents and relays exchange.
//!
//! Optional fields carry `#[serde(default)]` so a newer peer can add them without breaking an
//! older one; anything that changes meaning bumps [`PROTOCOL_VERSION_MAX`].
//!
//! One module per stage of the conversation: `version` (the preface and the version both
//! sides speak), `hello` (the agent's hello and the relay's answer), `refusal` (why a relay
//! turns an agent or a tunnel away), `control` (the control stream's frames, host tunnels
//! included) and `stream` (the frames that open a user's data stream). Everything is
//! re-exported here, so `message::X` names every message.

mod control;
mod hello;
mod refusal;
mod stream;
mod version;

pub use control::{Control, TunnelHello, TunnelReply};
pub use hello::{
    Accepted, AgentHello, Allocation, LaneGrant, RelayHello, ServiceRequest, MAX_JUMP_KEYS,
    MAX_JUMP_KEY_LEN,
};
pub use refusal::Refusal;
pub use stream::{StreamOpen, StreamReply};
pub use version::{
    negotiate_version, VersionProbe, PREFACE, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};

#[cfg(test)]
mod tests;
