//! Why the relay could not start or had to stop.

use std::net::SocketAddr;
use std::path::PathBuf;

use jumpgate_config::{ConfigError, SecretFileError};
use jumpgate_daemon::ExitStatus;
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
    /// A listener (agent port, admin endpoint, name router) could not be bound. The message
    /// names the setting, so an operator running two relays on one host learns which default
    /// collided (the admin API's 127.0.0.1:7001 is the usual one).
    #[error("cannot listen on {addr} for {} (--{}, `{}` in the config file): {source}; {}", listener.what(), listener.flag(), listener.key(), bind_hint(source, *listener, *addr))]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        listener: Listener,
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
    Store(#[from] StoreError),
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

/// The relay's fixed listeners, for naming the setting of one that cannot bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The agents' TLS port (`listen`).
    AgentPort,
    /// The admin API (`admin`).
    Admin,
    /// The name router (`router_listen`).
    Router,
    /// The agents' WebSocket port (`ws_listen`).
    WebSocket,
}

impl Listener {
    /// What listens there, for people.
    fn what(self) -> &'static str {
        match self {
            Listener::AgentPort => "the agent port",
            Listener::Admin => "the admin API",
            Listener::Router => "the name router",
            Listener::WebSocket => "the WebSocket agent port",
        }
    }

    /// The flag that sets it, without dashes.
    fn flag(self) -> &'static str {
        match self {
            Listener::AgentPort => "listen",
            Listener::Admin => "admin",
            Listener::Router => "router-listen",
            Listener::WebSocket => "ws-listen",
        }
    }

    /// The config file key that sets it.
    fn key(self) -> &'static str {
        match self {
            Listener::AgentPort => "listen",
            Listener::Admin => "admin",
            Listener::Router => "router_listen",
            Listener::WebSocket => "ws_listen",
        }
    }

    /// Its default address, if it has one.
    fn default_addr(self) -> Option<&'static str> {
        match self {
            Listener::AgentPort => Some(crate::defaults::DEFAULT_LISTEN),
            Listener::Admin => Some(crate::defaults::DEFAULT_ADMIN),
            Listener::Router | Listener::WebSocket => None,
        }
    }
}

/// How to fix a bind error, in words that fit its cause.
fn bind_hint(source: &std::io::Error, listener: Listener, addr: SocketAddr) -> String {
    let flag = listener.flag();
    let set = if listener.default_addr() == Some(addr.to_string().as_str()) {
        format!("this is the default; set --{flag} to another address")
    } else {
        format!("set --{flag} to another address")
    };
    match source.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "another process (another relay on this host?) listens there: stop it or {set}{}",
            if listener == Listener::Admin {
                " (or --admin off)"
            } else {
                ""
            }
        ),
        std::io::ErrorKind::AddrNotAvailable => {
            format!("that address is not on this host: {set}")
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "ports below 1024 need CAP_NET_BIND_SERVICE (AmbientCapabilities= in the unit): grant it or {set}"
        ),
        _ => set,
    }
}

impl RelayError {
    /// The error for `listener` failing to bind `addr`, for `map_err`.
    pub(crate) fn bind(
        addr: SocketAddr,
        listener: Listener,
    ) -> impl FnOnce(std::io::Error) -> Self {
        move |source| RelayError::Bind {
            addr,
            listener,
            source,
        }
    }

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

/// The lease store did not answer; the relay keeps serving what it has and callers retry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable or failed the operation.
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
}
