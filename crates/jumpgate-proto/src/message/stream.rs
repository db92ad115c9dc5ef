//! The frames that open a data stream: which service the user wants, and whether the agent
//! reached it; after that the stream carries raw bytes.

use serde::{Deserialize, Serialize};

/// First frame on a data stream, from the relay: which service the user wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOpen {
    /// Service name.
    pub service: String,
    /// The user's address as the relay saw it, for the agent's logs.
    pub peer: String,
    /// On a host session: the registered tunnel whose service this is. `None`: the session's
    /// own services (every session before version [`HOST_SINCE`](crate::tunnel::HOST_SINCE)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<String>,
}

/// The agent's answer on a data stream; after `Connected` the stream carries raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StreamReply {
    /// The local target accepted the connection.
    Connected,
    /// The local target could not be reached.
    Refused {
        /// What went wrong, e.g. "connection refused by 127.0.0.1:22".
        reason: String,
    },
}
