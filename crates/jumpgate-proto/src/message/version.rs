//! What is settled before a hello is read: the preface that marks a jumpgate agent, and the
//! protocol version both sides speak, read from a probe every version's hello decodes to.

use serde::{Deserialize, Serialize};

use super::refusal::Refusal;

/// Bytes an agent writes right after the TLS handshake. A relay that does not see them is talking
/// to something that is not a jumpgate agent and hangs up without parsing anything further.
pub const PREFACE: &[u8; 8] = b"JUMPGATE";

/// Oldest protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// Newest protocol version this build speaks. 2: relays list the fleet's members
/// ([`Accepted::members`](crate::Accepted::members), [`Control::Members`](crate::Control::Members)); a version-1 agent gets neither. 3: host
/// sessions carry the tunnels of many jobs ([`AgentHello::host`](crate::AgentHello::host), [`crate::tunnel`]).
pub const PROTOCOL_VERSION_MAX: u16 = 3;

/// The part of an [`AgentHello`](crate::AgentHello) every version agrees on. A relay decodes this first, so it can
/// name the versions on both sides even when the rest of the hello is in a format it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionProbe {
    /// Oldest version the agent speaks.
    pub min_version: u16,
    /// Newest version the agent speaks.
    pub max_version: u16,
}

/// Picks the newest version both sides speak, or refuses with both ranges named.
pub fn negotiate_version(agent: VersionProbe) -> Result<u16, Refusal> {
    let best = agent.max_version.min(PROTOCOL_VERSION_MAX);
    if agent.min_version <= agent.max_version && best >= agent.min_version.max(PROTOCOL_VERSION_MIN)
    {
        Ok(best)
    } else {
        Err(Refusal::UnsupportedVersion {
            relay_min: PROTOCOL_VERSION_MIN,
            relay_max: PROTOCOL_VERSION_MAX,
            agent_min: agent.min_version,
            agent_max: agent.max_version,
        })
    }
}
