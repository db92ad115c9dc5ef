//! The agent's settings: each declared once ([`RunArgs`]) for the command line and the TOML file,
//! the flags laid over the file, then one validation pass ([`AgentConfig::from_args`]).
//!
//! Every flag has a key of the same name (dashes become underscores) in the file; a flag given on
//! the command line wins over the file, the file over the defaults.
//!
//! The files, by job (as the relay's `config/` is laid out):
//! - `settings.rs`: the settings as written, flag and file key alike ([`RunArgs`], the
//!   `[[service]]` tables);
//! - `resolve.rs`: the one validation pass, from written settings to an [`AgentConfig`];
//! - `cli.rs`: the command line around them (subcommands).
//!
//! This file holds what the rest of the agent reads: the validated [`AgentConfig`] and its parts.

use std::path::PathBuf;

use jumpgate_daemon::LogFormat;
use jumpgate_proto::Secret;
use jumpgate_transport::tls::Fingerprint;

mod cli;
mod resolve;
mod settings;
#[cfg(test)]
mod tests;

pub use crate::service::ServiceSpec;
pub use cli::{Cli, Command};
pub use settings::{RunArgs, ServiceSetting, ServiceTable};

/// A relay to dial.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    /// Host name or IP.
    pub host: String,
    /// Agent port.
    pub port: u16,
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How the agent verifies the relay.
#[derive(Debug, Clone)]
pub enum Trust {
    /// CA bundle file.
    Ca(PathBuf),
    /// Certificate pins.
    Pins(Vec<Fingerprint>),
}

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Relays to keep a session with.
    pub servers: Vec<ServerAddr>,
    /// TLS server name override.
    pub server_name: Option<String>,
    /// Agent name.
    pub name: String,
    /// The token (masked in Debug output); optional with a client certificate.
    pub token: Option<Secret>,
    /// Relay verification.
    pub trust: Trust,
    /// Client certificate and key files for mutual TLS.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// Services to expose.
    pub services: Vec<ServiceSpec>,
    /// Status file path.
    pub status_file: Option<PathBuf>,
    /// Local metrics endpoint.
    pub metrics: Option<std::net::SocketAddr>,
    /// Log filter directives.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Runtime threads (1 = single-threaded, 0 = one per CPU).
    pub worker_threads: usize,
    /// TCP connections per relay at most, the first included.
    pub max_lanes: u16,
    /// How long a relay that left the fleet keeps its session.
    pub member_grace: std::time::Duration,
    /// Most relay sessions at once.
    pub max_relays: usize,
    /// The proxy relays are reached through (`None`: direct).
    pub proxy: Option<crate::proxy::Proxy>,
    /// Relays given as `ws://` / `wss://` URLs, reached as WebSocket.
    pub websocket: Vec<(ServerAddr, crate::proxy::WsServer)>,
    /// The `ssh -J` keys file ([`crate::jump_keys`]), re-read before every session hello.
    pub jump_authorized_keys: Option<PathBuf>,
    /// Host mode's settings ([`crate::host`]); `None`: an ordinary agent.
    pub host: Option<crate::host::config::HostSettings>,
    /// Host mode's local API and tunnel store ([`crate::host::api`]).
    pub api: Option<crate::host::api::ApiSettings>,
}

impl AgentConfig {
    /// The WebSocket endpoint of `server`, when it was given as a `ws://` / `wss://` URL.
    pub fn websocket_for(&self, server: &ServerAddr) -> Option<&crate::proxy::WsServer> {
        self.websocket
            .iter()
            .find(|(s, _)| s == server)
            .map(|(_, ws)| ws)
    }
}
