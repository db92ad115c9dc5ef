//! Why the relay could not start or had to stop.

use std::net::SocketAddr;
use std::path::PathBuf;

use jumpgate_config::{ConfigError, ExitStatus, SecretFileError};
use jumpgate_transport::tls::TlsError;

/// A fatal relay error. Messages name the file or address involved and never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Settings are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A token or key file is unreadable, empty or too open.
    #[error(transparent)]
    Secret(#[from] SecretFileError),
    /// The TLS identity could not be loaded or generated.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The state directory or a file in it could not be created or written.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The path involved.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A listener (agent port or admin endpoint) could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The session threads (`worker_threads`) could not be started.
    #[error("cannot start {count} session threads: {source}; lower worker_threads")]
    Threads {
        /// How many were asked for.
        count: usize,
        /// Why.
        source: std::io::Error,
    },
    /// The lease store could not be reached or prepared at start; systemd retries (exit 75).
    #[error(transparent)]
    Store(#[from] crate::leases::StoreError),
    /// The lease store's settings do not fit the store (another fleet's port range, a bad CA).
    #[error("lease store: {0}")]
    StoreConfig(String),
    /// The lease file exists but cannot be used.
    #[error("lease file {path} is unusable: {detail}; fix or move it aside to start with no leases (every agent then gets a new port)")]
    LeaseFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
}

impl RelayError {
    /// The process exit status this error maps to.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            RelayError::Config(_)
            | RelayError::Secret(_)
            | RelayError::Tls(_)
            | RelayError::StoreConfig(_) => ExitStatus::Usage,
            RelayError::LeaseFile { .. } => ExitStatus::DataErr,
            RelayError::Bind { .. } => ExitStatus::Unavailable,
            RelayError::Store(_) => ExitStatus::TempFail,
            RelayError::StateDir { .. } | RelayError::Threads { .. } => ExitStatus::Failure,
        }
    }
}
