//! The persisted form of the table: what the relay writes to disk and reads back after a
//! restart, so agents get their ports back. Plain data with serde; the table converts to and
//! from it in `table::persist`.

use serde::{Deserialize, Serialize};

/// A lease as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Agent name.
    pub agent: String,
    /// Service name.
    pub service: String,
    /// Leased port.
    pub port: u16,
    /// Unix seconds the agent was last connected.
    pub last_seen: u64,
}

/// Everything needed to rebuild a [`LeaseTable`](crate::LeaseTable) after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSnapshot {
    /// Live leases.
    pub leases: Vec<LeaseRecord>,
    /// Free ports that were once leased, with the Unix second they were freed: they keep their
    /// place at the back of the free queue across restarts.
    #[serde(default)]
    pub freed: Vec<(u16, u64)>,
    /// Who holds each agent name that has leases: `(agent, identity)`. Missing in files written
    /// before identities were recorded; such names go to the next identity allowed to claim them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<(String, String)>,
}

/// Why a snapshot could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// Two leases claim the same port, or one key appears twice.
    #[error("lease for {agent}/{service} on port {port} conflicts with another lease")]
    Conflict {
        /// Agent name.
        agent: String,
        /// Service name.
        service: String,
        /// Port.
        port: u16,
    },
}
