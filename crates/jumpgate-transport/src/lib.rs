//! jumpgate's transport: everything between a socket and a protocol message.
//!
//! - [`tls`]: rustls configuration for both ends, self-signed certificates, fingerprints and
//!   certificate pinning.
//! - [`mux`]: the yamux session driver, one task per connection that owns all of its socket I/O.
//! - [`budget`]: a per-poll byte budget so one busy connection's driver cannot hog its thread.
//! - [`coalesce`]: gathers yamux's many small writes into one TLS record and one syscall.
//! - [`counted`]: byte counters on a stream, for metrics and the audit log.
//! - [`frame_io`]: reading and writing `jumpgate-proto` frames on async streams.
//! - [`readahead`]: large socket reads under TLS, so rustls's 4 KiB reads come from memory.
//! - [`bridge`]: copying bytes both ways between a user socket and a stream, half-close included.
//! - [`socket`]: TCP options (no-delay, keepalive, user timeout, a short unsent queue) every leg
//!   gets.
//! - [`stall`]: since when a connection has taken no bytes, to end a session whose peer stopped
//!   reading.
//! - [`ws`]: a WebSocket as a byte stream, for the agent link through HTTP-only networks.

pub mod bridge;
pub mod budget;
pub mod coalesce;
pub mod counted;
pub mod frame_io;
pub mod mux;
pub mod readahead;
pub mod socket;
pub mod stall;
pub mod tap;
pub mod tls;
pub mod ws;
