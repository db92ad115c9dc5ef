//! The agent side of a jumpgate session, sans-IO: what `worker-agent` and the benchmark's
//! simulated agents (`jumpgate-bench`, `bench/src/sim.rs`) both speak, written once.
//!
//! No sockets, no clocks, no randomness, no tokio: time comes in as an argument (`now`), the
//! jitter of a backoff as a number in [0, 1), frames as decoded [`jumpgate_proto`] messages. The
//! drivers own every side effect: dialling, TLS, yamux, timers, logging, the status file. So the
//! protocol logic can be property-tested and fuzzed, and a protocol change reaches the real agent
//! and the simulator that the scale figures are measured with at once.
//!
//! The parts, in the order a session lives them:
//! - [`hello`]: the agent's [`Identity`] (name, credential, services, `--max-lanes`) and the one
//!   function that builds a session's hello from it, [`session_hello`] (a lane's:
//!   [`lane_hello`]); reading the relay's answer ([`session_answer`], [`lane_answer`]) and what
//!   an acceptance grants this agent ([`Placement`]: its own services' ports, sanitized).
//! - [`link`]: one relay's [`Link`] across sessions: the ports it remembers for the next hello,
//!   and the retry decision after a failure ([`Link::failed`]: give up on a permanent refusal,
//!   the long backoff after a relay that could not be authenticated, else the ordinary
//!   backoff) or a lost session ([`Link::session_ended`]: the relay's own delay after it
//!   announced going away, a reset after a stable session).
//! - [`session`]: one accepted session's control loop ([`Session`]): the opening ping, a ping
//!   every heartbeat interval, the heartbeat timeout, lane requests clamped to `--max-lanes`,
//!   member lists, going-away and the release at shutdown.
//! - [`host`]: a host session's tunnels (issue 28): registered with their own identities
//!   ([`tunnel_hello`]) on a session whose hello said `host`, answered, closed, retried.
//! - [`backoff`]: the jittered exponential delays both use.
//!
//! Why this shape: the session is a poll-style state machine like quinn-proto's `Connection`
//! (`handle_control` / `handle_timeout(now)` in, `poll_transmit` / `poll_event` /
//! `poll_timeout` out), because its driver is a `select!` over a timer, the frame reader and
//! lane endings, and a queue lets one input produce several outputs (a late timer: a burst of
//! pings) without the core knowing about the driver. The link's decisions are plain method
//! calls that return what to do: they happen once per attempt, between sessions, and a return
//! value is the simplest thing a driver can match on. Everything a session says is built from an
//! [`Identity`]; a host agent carrying several names over one session (issue 28) adds
//! identities to a session, not a second copy of this code.

pub mod backoff;
pub mod event;
pub mod hello;
pub mod host;
pub mod link;
pub mod session;

pub use backoff::Backoff;
pub use event::{Event, Purpose};
pub use hello::{
    lane_answer, lane_hello, session_answer, session_hello, tunnel_hello, AnswerError, Identity,
    Placed, Placement, Service,
};
pub use host::TunnelState;
pub use link::{Failure, Link, Retry, STABLE_AFTER};
pub use session::{heartbeat, lane_limit, Session, MIN_HEARTBEAT_INTERVAL};
