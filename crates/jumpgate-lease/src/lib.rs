//! Port leases: which public port belongs to which (agent, service), and for how long.
//!
//! A lease outlives the session that created it, so an agent that reconnects (network blip, agent
//! restart, relay restart with the table restored from a [`LeaseSnapshot`]) gets the same port back.
//! A lease expires a configurable time after its agent was last seen. Free ports are handed out
//! least-recently-freed first, so a port that just expired is the last one given to someone else
//! while its old user may still have it in an ssh config.
//!
//! The table decides; it does not bind. The caller answers a probe for each candidate port from
//! what it knows (bound by it, or known to be taken), and [`LeaseTable::try_acquire`] keeps its
//! changes only if the caller accepts the grants (it holds every granted port), undoing them
//! otherwise, so the caller can bind the ports it was granted without holding its lock and try
//! again. Nothing is copied: an attempt records what it changes in a small undo log. Only the relay keeps this table; the agent never sees it, which is why
//! it lives outside the wire protocol crate.

mod grant;
mod range;
mod snapshot;
mod table;

pub use grant::{AllocError, Attempt, Grant, GrantKind, ServiceAsk};
pub use range::{PortRange, PortRangeError};
pub use snapshot::{LeaseRecord, LeaseSnapshot, RestoreError};
pub use table::{LeaseKey, LeaseTable};
