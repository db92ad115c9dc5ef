//! The agent's settings: each declared once ([`RunArgs`]) for the command line and the TOML file,
//! the flags laid over the file, then one validation pass ([`AgentConfig::from_args`]).
//!
//! Every flag has a key of the same name (dashes become underscores) in the file; a flag given on
//! the command line wins over the file, the file over the defaults.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use jumpgate_config::layer::one_or_many;
use jumpgate_config::secret_file::check_private;
use jumpgate_config::{
    credential, layered, or_credential, parse_list, read_secret_file, ConfigError,
};
use jumpgate_daemon::LogFormat;
use jumpgate_proto::{validate_name, Cidr, Secret};
use jumpgate_transport::tls::Fingerprint;
use serde::Deserialize;

use crate::service::split_host_port;
pub use crate::service::ServiceSpec;

/// Command line of `worker-agent`.
#[derive(Debug, Parser)]
#[command(
    name = "worker-agent",
    version,
    about = "jumpgate agent: dials out to a relay and makes local services (sshd) reachable on a public port",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; without one, run the agent.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings for running the agent.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands of `worker-agent`.
// Parsed once at start-up; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and print it (secrets masked), without connecting.
    CheckConfig(RunArgs),
    /// Print the endpoints from a running agent's status file.
    Status {
        /// The status file (default: the one in --config).
        #[arg(long, value_name = "FILE")]
        status_file: Option<PathBuf>,
        /// The agent's config file, to find its status file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Add, remove, list or show a host agent's tunnels through its local API.
    Tunnel(crate::cli::TunnelArgs),
}

jumpgate_config::settings! {
    /// The agent's settings: flags for running it, each also a key of the `--config` file (with
    /// underscores). Values stay as written until [`AgentConfig::from_args`] checks them.
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

impl ServiceSetting {
    fn validate(&self) -> Result<ServiceSpec, ConfigError> {
        match self {
            ServiceSetting::Spec(spec) => ServiceSpec::parse(spec),
            ServiceSetting::Table(t) => {
                let mut spec = ServiceSpec::new(&t.name, &t.target, t.preferred_port, t.strict)?;
                spec.allow = parse_list("allow_cidr", &t.allow_cidr)?;
                spec.no_port = t.no_port;
                if let Some(ns) = &t.netns {
                    spec.set_netns(ns)?;
                }
                Ok(spec)
            }
        }
    }
}

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

/// The machine's hostname, the default agent name.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

impl AgentConfig {
    /// The one path from flags and file to a configuration: lays `args` over their `--config`
    /// file, applies defaults, loads the token and validates every setting.
    pub fn from_args(args: RunArgs) -> Result<Self, ConfigError> {
        let s = args.layered()?;
        let invalid = |key: &'static str, detail: String| ConfigError::Invalid { key, detail };
        if s.server.is_empty() {
            return Err(ConfigError::Missing {
                key: "server",
                hint: "pass --server HOST:PORT with the relay's agent port (e.g. relay.example.com:7000)",
            });
        }
        let mut websocket = Vec::new();
        let mut servers = Vec::new();
        for text in &s.server {
            let ws = crate::proxy::WsServer::parse(text)
                .map_err(|e| invalid("server", format!("{text:?}: {e}")))?;
            let server = match ws {
                Some((host, port, ws)) => {
                    let server = ServerAddr { host, port };
                    websocket.push((server.clone(), ws));
                    server
                }
                None => split_host_port(text)
                    .map(|(host, port)| ServerAddr { host, port })
                    .ok_or_else(|| {
                        invalid(
                            "server",
                            format!("{text:?} is not HOST:PORT (e.g. relay.example.com:7000) or wss://HOST[:PORT]/PATH"),
                        )
                    })?,
            };
            servers.push(server);
        }

        let name = s.name.or_else(hostname).ok_or(ConfigError::Missing {
            key: "name",
            hint: "pass --name (the hostname could not be read)",
        })?;
        validate_name("agent", &name)
            .map_err(|e| invalid("name", format!("{e}; pass --name with a valid name")))?;

        // Under systemd, `LoadCredential=` files stand in for the secret settings given neither
        // as a flag nor in the file (jumpgate_config::secret_file explains the convention).
        let token_file = or_credential(s.token_file, credential::TOKEN);
        let client_cert = or_credential(s.client_cert, credential::CLIENT_CERT);
        let client_key = or_credential(s.client_key, credential::CLIENT_KEY);
        let client_identity = match (client_cert, client_key) {
            (Some(cert), Some(key)) => {
                check_private(&key).map_err(|e| invalid("client_key", e.to_string()))?;
                Some((cert, key))
            }
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "client_cert/client_key",
                    "give both --client-cert and --client-key, or neither".into(),
                ))
            }
        };
        let token = match token_file {
            Some(path) => Some(
                read_secret_file(&path, true).map_err(|e| invalid("token_file", e.to_string()))?,
            ),
            None => match jumpgate_config::env_token() {
                Some(token) => Some(token),
                None if client_identity.is_some() => None,
                None => return Err(ConfigError::Missing {
                    key: "token",
                    hint: "pass --token-file FILE or set JUMPGATE_TOKEN (the relay's token, e.g. its state dir's token file), or under systemd LoadCredential=token:FILE, or use --client-cert/--client-key",
                }),
            },
        };

        let pins: Vec<Fingerprint> = parse_list("fingerprint", &s.fingerprint)?;
        let trust = match (s.ca, pins.is_empty()) {
            (Some(ca), true) => Trust::Ca(ca),
            (None, false) => Trust::Pins(pins),
            (Some(_), false) => {
                return Err(invalid(
                    "ca/fingerprint",
                    "give either --ca or --fingerprint, not both".into(),
                ))
            }
            (None, true) => return Err(ConfigError::Missing {
                key: "ca/fingerprint",
                hint: "the agent must verify the relay: pass --fingerprint sha256:HEX (print it with `relay-server fingerprint`) or --ca FILE",
            }),
        };

        let mut services = s
            .service
            .iter()
            .map(ServiceSetting::validate)
            .collect::<Result<Vec<_>, _>>()?;
        let host = crate::host::config::settings(
            s.host_mode,
            s.config.clone(),
            s.tunnel_status_dir,
            &s.tunnel,
            !services.is_empty(),
        )?;
        let agent_allow: Vec<Cidr> = parse_list("allow_cidr", &s.allow_cidr)?;
        for spec in &mut services {
            if spec.allow.is_empty() {
                spec.allow = agent_allow.clone();
            }
            spec.no_port |= s.no_port;
        }
        if services.is_empty() && host.is_none() {
            services.push(ServiceSpec::parse("ssh=127.0.0.1:22")?);
        }
        let mut names = std::collections::HashSet::new();
        if let Some(dup) = services.iter().find(|s| !names.insert(s.name.as_str())) {
            return Err(invalid(
                "service",
                format!("service {:?} is given twice", dup.name),
            ));
        }
        for spec in &services {
            if let Some(ns) = &spec.netns {
                crate::netns::check(ns)
                    .map_err(|e| invalid("service", format!("service {:?}: {e}", spec.name)))?;
            }
        }

        let metrics = match s.metrics {
            Some(text) => Some(text.parse().map_err(|_| {
                invalid(
                    "metrics",
                    format!("{text:?} is not IP:PORT, e.g. 127.0.0.1:9101"),
                )
            })?),
            None => None,
        };
        let log_level = s.log_level.unwrap_or_else(|| "info".into());
        jumpgate_daemon::parse_filter(&log_level).map_err(|detail| invalid("log_level", detail))?;
        let max_lanes = match s.max_lanes.unwrap_or(8) {
            0 => {
                return Err(invalid(
                    "max_lanes",
                    "must be at least 1 (1: a single connection per relay)".into(),
                ))
            }
            n => n,
        };
        let member_grace = jumpgate_config::duration_setting(
            "member_grace",
            s.member_grace,
            std::time::Duration::from_secs(60),
        )?;
        let max_relays = match s.max_relays.unwrap_or(16) {
            0 => return Err(invalid("max_relays", "must be at least 1".into())),
            n => n,
        };
        let proxy = proxy_setting(s.proxy, s.proxy_password_file, s.proxy_ca.as_deref())?;
        crate::jump_keys::read(s.jump_authorized_keys.as_deref())?;
        let api = match (&host, s.api_socket, s.api_group, s.state_dir) {
            (Some(_), socket, group, state_dir) => Some(
                crate::host::api::ApiSettings::new(socket, group, state_dir)
                    .map_err(|e| invalid("api_group", e))?,
            ),
            (None, None, None, None) => None,
            (None, ..) => {
                return Err(invalid(
                    "api_socket",
                    "api_socket, api_group and state_dir are host mode's; add --host-mode".into(),
                ))
            }
        };
        Ok(Self {
            api,
            host,
            jump_authorized_keys: s.jump_authorized_keys,
            proxy,
            websocket,
            member_grace,
            max_relays,
            servers,
            server_name: s.server_name,
            name,
            token,
            trust,
            client_identity,
            services,
            status_file: s.status_file,
            metrics,
            log_level,
            log_format: s.log_format.unwrap_or_default(),
            worker_threads: s.worker_threads.unwrap_or(1),
            max_lanes,
        })
    }
}

/// The proxy setting: `--proxy` (or `none`), else curl's environment variables; the password
/// from its file or the systemd credential `proxy-password`.
fn proxy_setting(
    url: Option<String>,
    password_file: Option<PathBuf>,
    proxy_ca: Option<&std::path::Path>,
) -> Result<Option<crate::proxy::Proxy>, ConfigError> {
    use crate::proxy::{Choice, Proxy};
    let invalid = |key: &'static str, detail: String| ConfigError::Invalid { key, detail };
    let choice = match url {
        Some(text) => Choice::Url(text),
        None => Choice::FromEnv,
    };
    let password_file = or_credential(password_file, crate::proxy::PASSWORD_CREDENTIAL);
    let password = match password_file {
        Some(path) => Some(
            read_secret_file(&path, true)
                .map_err(|e| invalid("proxy_password_file", e.to_string()))?,
        ),
        None => None,
    };
    Proxy::resolve(choice, |var| std::env::var(var).ok(), password, proxy_ca)
        .map_err(|detail| invalid("proxy", detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn netns_service_specs() {
        let s = ServiceSpec::parse("ssh=127.0.0.1:22@12345!,netns=job7").unwrap();
        assert_eq!(s.netns.as_deref(), Some(Path::new("/run/netns/job7")));
        assert_eq!((s.preferred_port, s.strict), (Some(12345), true));
        let s = ServiceSpec::parse("ssh=10.0.0.5:22,netns=/proc/42/ns/net").unwrap();
        assert_eq!(s.netns.as_deref(), Some(Path::new("/proc/42/ns/net")));
        for (bad, says) in [
            ("ssh=127.0.0.1:22,netns=", "netns is empty"),
            ("ssh=127.0.0.1:22,netns=a,netns=b", "twice"),
            ("ssh=127.0.0.1:22,color=red", "unknown option"),
            ("ssh=sshd.local:22,netns=job7", "must be IP:PORT"),
            ("ssh=127.0.0.1:22,netns=proc/1/ns/net", "absolute"),
        ] {
            let e = ServiceSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("netns=NS"), "{bad}: {e}");
        }
    }

    #[test]
    fn service_specs() {
        let s = ServiceSpec::parse("ssh=127.0.0.1:22@12345!").unwrap();
        assert_eq!(
            (s.target_port, s.preferred_port, s.strict),
            (22, Some(12345), true)
        );
        let s = ServiceSpec::parse("web=[::1]:8080").unwrap();
        assert_eq!((s.target_port, s.preferred_port), (8080, None));
        for bad in [
            "ssh",
            "ssh=host",
            "ssh=h:0",
            "-x=h:1",
            "ssh=h:22@x",
            "ssh=h:22@0",
        ] {
            let e = ServiceSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("NAME=HOST:PORT"), "{bad}: {e}");
        }
    }

    /// A token file as it should be: readable by its owner only.
    fn token(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join("token");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// Like the relay, the agent refuses a token others can read, and says how to fix it.
    #[test]
    fn a_token_file_others_can_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tok = token(&dir, "tok-secret-value\n");
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = AgentConfig::from_args(RunArgs {
            token_file: Some(tok.clone()),
            ..args()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("invalid token_file")
                && e.contains(&format!("chmod 600 {}", tok.display())),
            "{e}"
        );
        assert!(!e.contains("tok-secret-value"));
    }

    fn args() -> RunArgs {
        RunArgs {
            server: vec!["relay:7000".into()],
            name: Some("w1".into()),
            fingerprint: vec![format!("sha256:{}", "ab".repeat(32))],
            ..RunArgs::default()
        }
    }

    #[test]
    fn trust_is_required_and_token_masked() {
        let dir = tempfile::tempdir().unwrap();
        let tok = token(&dir, "tok-secret-value\n");
        let mut a = args();
        a.token_file = Some(tok);
        let c = AgentConfig::from_args(a.clone()).unwrap();
        assert_eq!(c.services[0].target, "127.0.0.1:22");
        assert!(!format!("{c:?}").contains("tok-secret-value"));
        a.fingerprint.clear();
        let e = AgentConfig::from_args(a).unwrap_err().to_string();
        assert!(e.contains("--fingerprint"), "{e}");
    }

    #[test]
    fn fleet_settings_have_defaults_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args();
        a.token_file = Some(token(&dir, "t\n"));
        let c = AgentConfig::from_args(a.clone()).unwrap();
        assert_eq!(c.member_grace, std::time::Duration::from_secs(60));
        assert_eq!(c.max_relays, 16);
        a.member_grace = Some("2s".parse().unwrap());
        a.max_relays = Some(3);
        let c = AgentConfig::from_args(a.clone()).unwrap();
        assert_eq!(c.member_grace, std::time::Duration::from_secs(2));
        assert_eq!(c.max_relays, 3);
        a.max_relays = Some(0);
        let e = AgentConfig::from_args(a).unwrap_err().to_string();
        assert!(e.contains("max_relays"), "{e}");
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let tok = token(&dir, "t\n");
        let mut a = args();
        a.server.clear();
        a.token_file = Some(tok);
        a.config = Some(write(
            &dir,
            "server = [\"r1:7000\", \"r2:7000\"]\nname = \"from-file\"\nmax_lanes = 3\n\
             log_level = \"debug\"\nno_port = true\n\
             [[service]]\nname = \"web\"\ntarget = \"127.0.0.1:80\"\nallow_cidr = [\"10.0.0.0/8\"]\n",
        ));
        a.max_lanes = Some(5);
        let c = AgentConfig::from_args(a.clone()).unwrap();
        // Flag over file.
        assert_eq!(c.name, "w1");
        assert_eq!(c.max_lanes, 5);
        // File over default.
        assert_eq!(c.servers.len(), 2);
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.services.len(), 1);
        assert_eq!(
            (c.services[0].name.as_str(), c.services[0].no_port),
            ("web", true)
        );
        assert_eq!(c.services[0].allow.len(), 1);
        // Default where neither says.
        assert_eq!((c.worker_threads, c.log_format), (1, LogFormat::Text));
        // Flag lists replace the file's.
        a.service = vec!["ssh=127.0.0.1:2222".parse().unwrap()];
        a.server = vec!["r3:7000".into()];
        let c = AgentConfig::from_args(a).unwrap();
        assert_eq!(
            c.servers,
            [ServerAddr {
                host: "r3".into(),
                port: 7000
            }]
        );
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].target_port, 2222);
        let c = AgentConfig::from_args(RunArgs {
            token_file: c.token.is_some().then(|| dir.path().join("token")),
            ..args()
        })
        .unwrap();
        assert_eq!(c.log_level, "info");
        assert_eq!(c.max_lanes, 8);
    }

    #[test]
    fn unknown_keys_are_named_also_in_service_tables() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args();
        a.config = Some(write(&dir, "servr = \"r:1\"\n"));
        let e = AgentConfig::from_args(a.clone()).unwrap_err().to_string();
        assert!(e.contains("servr"), "{e}");
        a.config = Some(write(
            &dir,
            "[[service]]\nname = \"ssh\"\ntarget = \"127.0.0.1:22\"\nprefered_port = 1\n",
        ));
        let e = AgentConfig::from_args(a.clone()).unwrap_err().to_string();
        assert!(e.contains("prefered_port"), "{e}");
        let tok = token(&dir, "t\n");
        a.token_file = Some(tok);
        a.config = Some(write(&dir, "log_level = \"info,worker_agent=loud\"\n"));
        let e = AgentConfig::from_args(a).unwrap_err().to_string();
        assert!(e.starts_with("invalid log_level"), "{e}");
    }
}
