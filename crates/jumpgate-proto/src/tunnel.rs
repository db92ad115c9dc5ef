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

// The messages themselves live with the others in `message` (one module for the wire's types);
// re-exported here so a host session's pieces are found in one place.
pub use crate::message::{TunnelHello, TunnelReply};

/// First protocol version with host sessions: an older relay would read a `register` frame as
/// garbage and drop the session.
pub const HOST_SINCE: u16 = 3;

/// Most tunnels one host session may hold on a relay; a registration past it is refused
/// ([`crate::Refusal::CredentialFull`]). Bounds what one connection makes the relay keep.
pub const MAX_TUNNELS_PER_HOST: usize = 4096;
