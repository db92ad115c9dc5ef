//! The agent's settings as written: each declared once ([`RunArgs`]) as a flag and as a key of
//! the `--config` file, laid flag over file, and the `[[service]]` tables. Nothing here judges a
//! value; [`super::resolve`] does, in one pass.

use std::path::PathBuf;

use clap::Args;
use jumpgate_config::layer::one_or_many;
use jumpgate_config::{layered, ConfigError};
use jumpgate_daemon::LogFormat;
use serde::Deserialize;

jumpgate_config::settings! {
    /// The agent's settings: flags for running it, each also a key of the `--config` file (with
    /// underscores). Values stay as written until [`AgentConfig::from_args`](super::AgentConfig::from_args) checks them.
    #[derive(Debug, Clone, Default, Args, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct RunArgs {
        /// TOML file with any of the settings below (flags override it).
        #[arg(long, short = 'c', value_name = "FILE")]
        #[serde(skip)]
        pub config: Option<PathBuf>,
        /// Relay agent port, HOST:PORT; or the relay's WebSocket endpoint, wss://HOST[:PORT]/PATH
        /// (ws:// without TLS to the ingress; the agent link's own TLS runs inside either).
        #[arg(long, value_name = "HOST:PORT")]
        #[serde(deserialize_with = "one_or_many")]
        pub server: Vec<String>,
        /// TLS server name to send and verify with --ca (default: the host of --server).
        #[arg(long, value_name = "NAME")]
        pub server_name: Option<String>,
        /// Agent name; the relay keys port leases by it (default: the hostname).
        #[arg(long, value_name = "NAME")]
        pub name: Option<String>,
        /// File holding the token (else the JUMPGATE_TOKEN environment variable).
        #[arg(long, value_name = "FILE")]
        pub token_file: Option<PathBuf>,
        /// CA bundle (PEM) that signed the relay's certificate.
        #[arg(long, value_name = "FILE")]
        pub ca: Option<PathBuf>,
        /// Client certificate (PEM) for relays that use mutual TLS; its DNS name must be --name.
        #[arg(long, value_name = "FILE")]
        pub client_cert: Option<PathBuf>,
        /// Private key (PEM) for --client-cert.
        #[arg(long, value_name = "FILE")]
        pub client_key: Option<PathBuf>,
        /// Pinned relay certificate, sha256:HEX (repeatable, for rotation). See `relay-server fingerprint`.
        #[arg(long, value_name = "sha256:HEX")]
        #[serde(deserialize_with = "one_or_many")]
        pub fingerprint: Vec<String>,
        /// Service to expose, NAME=HOST:PORT[@PREFERRED[!]][,netns=NS] (repeatable; default
        /// ssh=127.0.0.1:22). NS: /proc/PID/ns/net or a name under /run/netns: the target is
        /// dialled from inside that network namespace.
        /// `@12345` asks for public port 12345; `@12345!` refuses any other port. In the file:
        /// `[[service]]` tables.
        #[arg(long, value_name = "SPEC")]
        pub service: Vec<ServiceSetting>,
        /// Only these address blocks may reach this agent's services (repeatable). The relay applies
        /// it on top of its own allowlist: it narrows who gets in, never widens.
        #[arg(long, value_name = "CIDR")]
        pub allow_cidr: Vec<String>,
        /// Where to write the allocated endpoints as JSON.
        #[arg(long, value_name = "FILE")]
        pub status_file: Option<PathBuf>,
        /// Ask for no public ports: services are reachable only through the relay's name router.
        #[arg(long)]
        pub no_port: bool,
        /// Serve the agent's own metrics on this local address (e.g. 127.0.0.1:9101).
        #[arg(long, value_name = "ADDR")]
        pub metrics: Option<String>,
        /// Log filter, e.g. info or info,worker_agent=debug (RUST_LOG wins).
        #[arg(long, value_name = "FILTER")]
        pub log_level: Option<String>,
        /// Log format: text or json.
        #[arg(long, value_name = "FORMAT")]
        pub log_format: Option<LogFormat>,
        /// Runtime threads: 1 = single-threaded (default; an agent carries a few developers'
        /// connections and its CPU belongs to the job), 0 = one per CPU.
        #[arg(long, value_name = "N")]
        pub worker_threads: Option<usize>,
        /// Most TCP connections ("lanes") to keep to each relay while user connections overlap,
        /// the first included, so parallel transfers each get a socket of their own (default 8;
        /// 1 = one connection only).
        #[arg(long, value_name = "N")]
        pub max_lanes: Option<u16>,
        /// How long a relay that left the fleet (gone from every relay's member list, or from
        /// DNS) keeps its session before it is closed (default 60s), so a restarting relay is
        /// not dropped and redialled.
        #[arg(long, value_name = "DURATION")]
        pub member_grace: Option<jumpgate_config::DurationValue>,
        /// Most relays to keep a session with: those given by --server (each address a name
        /// resolves to counts) and those learned from the fleet (default 16).
        #[arg(long, value_name = "N")]
        pub max_relays: Option<usize>,
        /// Reach the relays through this proxy: http://[USER@]HOST:PORT (CONNECT), https://...,
        /// socks5://... or socks5h://... (the proxy resolves names); `none` = always direct.
        /// Default: HTTPS_PROXY / ALL_PROXY and NO_PROXY from the environment, as curl reads them.
        #[arg(long, value_name = "URL")]
        pub proxy: Option<String>,
        /// File (0600) with the proxy password for the user in --proxy (under systemd:
        /// LoadCredential=proxy-password:FILE).
        #[arg(long, value_name = "FILE")]
        pub proxy_password_file: Option<PathBuf>,
        /// CA bundle (PEM) to verify an https:// proxy (default: the system's bundle).
        #[arg(long, value_name = "FILE")]
        pub proxy_ca: Option<PathBuf>,
        /// OpenSSH public keys (one per line) that alone may reach this agent through the
        /// relay's `ssh -J` listener; re-read on every reconnect.
        #[arg(long, value_name = "FILE")]
        pub jump_authorized_keys: Option<PathBuf>,
        /// Run as a host agent (one per host): no services of its own, it carries the tunnels
        /// of many jobs, each with its own name and credential, over one session per relay.
        #[arg(long)]
        pub host_mode: bool,
        /// Host mode: directory for one status file per tunnel (NAME.json).
        #[arg(long, value_name = "DIR")]
        pub tunnel_status_dir: Option<PathBuf>,
        /// Host mode: tunnels carried from the start (`[[tunnel]]` tables of the file only; see
        /// [`crate::host::config`]).
        #[arg(skip)]
        pub tunnel: Vec<crate::host::config::TunnelTable>,
        /// Host mode: the local API's Unix socket (default /run/jumpgate-agent/api.sock).
        #[arg(long, value_name = "PATH")]
        pub api_socket: Option<PathBuf>,
        /// Host mode: group (name or gid) of the API socket, whose members may call it.
        #[arg(long, value_name = "GROUP")]
        pub api_group: Option<String>,
        /// Host mode: where registered tunnels persist (default /var/lib/jumpgate-agent).
        #[arg(long, value_name = "DIR")]
        pub state_dir: Option<PathBuf>,
    }
}

impl RunArgs {
    /// These flags laid over their `--config` file, unvalidated: for `worker-agent status -c`,
    /// which only looks for the status file and must work for whoever may read the config file,
    /// even without access to the token the full validation reads.
    pub fn layered(self) -> Result<Self, ConfigError> {
        let file = self.config.clone();
        layered(self, file.as_deref())
    }
}

/// One service to expose, as given: a `--service NAME=HOST:PORT[@PREFERRED[!]]` flag or a
/// `[[service]]` table of the file. Checked by the validation pass like every other setting.
#[derive(Debug, Clone)]
pub enum ServiceSetting {
    /// A flag's `NAME=HOST:PORT[@PREFERRED[!]]`.
    Spec(String),
    /// A `[[service]]` table.
    Table(ServiceTable),
}

/// A `[[service]]` table of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceTable {
    /// Service name, e.g. `ssh`.
    pub name: String,
    /// Local target, HOST:PORT.
    pub target: String,
    /// Public port to ask for.
    pub preferred_port: Option<u16>,
    /// Refuse any other public port.
    #[serde(default)]
    pub strict: bool,
    /// Who may reach this service (default: the agent's `allow_cidr`).
    #[serde(default)]
    pub allow_cidr: Vec<String>,
    /// Reachable only through the relay's router.
    #[serde(default)]
    pub no_port: bool,
    /// Network namespace to dial the target from: /proc/PID/ns/net or a name under /run/netns.
    pub netns: Option<String>,
}

/// A flag's text, kept as written until validation.
impl std::str::FromStr for ServiceSetting {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ServiceSetting::Spec(s.to_string()))
    }
}

/// The file holds services as tables only.
impl<'de> Deserialize<'de> for ServiceSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ServiceTable::deserialize(d).map(ServiceSetting::Table)
    }
}
