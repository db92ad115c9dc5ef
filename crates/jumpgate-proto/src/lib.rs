//! The jumpgate wire protocol, with no I/O: what the agent and the relay both speak.
//!
//! Everything here is pure: no sockets, no clocks, no randomness. Callers pass bytes in and get
//! messages out. That keeps the wire format testable with property tests and a fuzzer, while the
//! transport and the binaries own every side effect. The relay's port leases, which only the relay
//! keeps, are in `jumpgate-lease`.
//!
//! The conversation between a worker agent and a relay is:
//! 1. TLS 1.3, then the agent writes [`PREFACE`] and one framed [`AgentHello`].
//! 2. The relay answers with one framed [`RelayHello`]: the port allocation or a [`Refusal`].
//! 3. Both sides switch the same TLS stream to yamux. The agent opens the first stream, the
//!    control stream, which carries [`Control`] frames (heartbeats, going-away, release, and
//!    from version 2 the fleet's [`member`] list when it changes, and from version 3 a host
//!    agent's [`tunnel`] registrations).
//! 4. For every user connection the relay opens a stream, writes a [`StreamOpen`] frame and waits
//!    for the agent's [`StreamReply`]; after `Connected` the stream carries raw bytes.

pub mod cidr;
pub mod display;
pub mod frame;
pub mod member;
pub mod message;
pub mod name;
pub mod secret;
pub mod tunnel;

pub use cidr::{Cidr, CidrError};
pub use display::sanitize;
pub use frame::{decode, encode, FrameDecoder, FrameError, FRAME_HEADER_LEN, MAX_FRAME_LEN};
pub use member::{check_members, RelayMember, MAX_MEMBERS, MEMBERS_SINCE};
pub use message::{
    negotiate_version, Accepted, AgentHello, Allocation, Control, LaneGrant, Refusal, RelayHello,
    ServiceRequest, StreamOpen, StreamReply, VersionProbe, MAX_JUMP_KEYS, MAX_JUMP_KEY_LEN,
    PREFACE, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
pub use name::{validate_name, NameError};
pub use secret::Secret;
pub use tunnel::{TunnelHello, TunnelReply, HOST_SINCE, MAX_TUNNELS_PER_HOST};
