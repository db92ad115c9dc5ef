//! What a placement asks the table for and what it gets back: the services' wishes, the ports
//! granted with how each was chosen, and why a placement was refused. Kept apart from the table
//! so a caller can read the contract of [`LeaseTable::try_acquire`](crate::LeaseTable::try_acquire)
//! without its bookkeeping.

/// One service's wish, as the relay passes it to [`LeaseTable::acquire`](crate::LeaseTable::acquire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAsk {
    /// Service name.
    pub service: String,
    /// Port it would like.
    pub preferred: Option<u16>,
    /// Fail rather than take another port.
    pub strict: bool,
}

/// How a port came to be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantKind {
    /// The service's existing lease.
    Renewed,
    /// The port the service asked for.
    Preferred,
    /// A port from the free pool.
    Fresh,
}

/// A port granted to one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Service name.
    pub service: String,
    /// The port.
    pub port: u16,
    /// How it was chosen.
    pub kind: GrantKind,
    /// Why the agent did not get the port it preferred or had, if it did not.
    pub note: Option<String>,
}

/// Why a set of services could not be given ports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// No free, bindable port is left.
    #[error("port range {lo}-{hi} exhausted ({in_use} in use)")]
    Exhausted {
        /// First port of the range.
        lo: u16,
        /// Last port of the range.
        hi: u16,
        /// Ports leased.
        in_use: usize,
    },
    /// A strict preferred port could not be granted.
    #[error("service {service:?} asked strictly for port {port}, which {why}")]
    PreferredUnavailable {
        /// Service name.
        service: String,
        /// The port.
        port: u16,
        /// Why not.
        why: String,
    },
}

/// What [`LeaseTable::try_acquire`](crate::LeaseTable::try_acquire) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The caller accepted the grants; the table holds them.
    Committed(Vec<Grant>),
    /// The caller refused the grants (it does not hold every granted port yet); the table is as
    /// it was before the attempt.
    RolledBack(Vec<Grant>),
}
