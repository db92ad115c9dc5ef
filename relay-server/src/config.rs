//! The relay's settings: command-line flags, an optional TOML file, and one validation pass.
//!
//! Every flag has a key of the same name (dashes become underscores) in the file; a flag given on
//! the command line wins over the file. Unknown keys and bad values are refused before anything
//! starts, naming the key and what it expects (exit code 64).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use jumpgate_config::{
    load_toml, parse_duration, parse_list, ConfigError, DurationValue, LogFormat,
};
use jumpgate_lease::PortRange;
use jumpgate_proto::Cidr;
use serde::Deserialize;

/// Default place for the relay's certificate, token and lease file (systemd's StateDirectory).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/jumpgate";

/// Command line of `relay-server`.
#[derive(Debug, Parser)]
#[command(
    name = "relay-server",
    version,
    about = "jumpgate relay: accepts worker agents over TLS and gives each of their services a public port",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; without one, run the relay.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings for running the relay.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands of `relay-server`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and print it (secrets masked), without starting.
    CheckConfig(RunArgs),
    /// Print the sha256 pin of the relay's certificate, creating the self-signed one if needed.
    Fingerprint(RunArgs),
    /// Print a table of the tunnels of the running relay (from its admin API).
    Tunnels(RunArgs),
    /// Print ~/.ssh/config `Host` blocks for every live tunnel of the running relay.
    SshConfig(SshConfigArgs),
}

/// Flags of `relay-server ssh-config`.
#[derive(Debug, Clone, Args)]
pub struct SshConfigArgs {
    /// Add `User NAME` to every block.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Print one wildcard block that reaches every agent by name through the router.
    #[arg(long)]
    pub router: bool,
    /// With --router: the Host pattern (default `*`, e.g. `vh-exec-*`).
    #[arg(long, value_name = "PATTERN", default_value = "*")]
    pub pattern: String,
    /// Where the relay is (its config file or --admin).
    #[command(flatten)]
    pub run: RunArgs,
}

/// Flags for running the relay. Each can also be set in the `--config` file.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML file with any of the settings below (flags override it).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address agents connect to, e.g. 0.0.0.0:7000.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Host name or IP users connect to; shown to agents in their "enabled on" line.
    #[arg(long, value_name = "HOST")]
    pub public_host: Option<String>,
    /// Ports handed to agents' services, e.g. 10000-50000.
    #[arg(long, value_name = "LO-HI")]
    pub port_range: Option<String>,
    /// Address the allocated ports listen on (default 0.0.0.0).
    #[arg(long, value_name = "IP")]
    pub proxy_bind: Option<String>,
    /// File holding the agents' shared token (else JUMPGATE_TOKEN, else one generated in the state dir).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM certificate chain for the agent port (else a self-signed one in the state dir).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Directory for the generated certificate and token and the lease file.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// How often agents send heartbeats (e.g. 10s).
    #[arg(long, value_name = "DURATION")]
    pub heartbeat_interval: Option<String>,
    /// Silence after which a session is considered dead (e.g. 30s).
    #[arg(long, value_name = "DURATION")]
    pub heartbeat_timeout: Option<String>,
    /// How long a port stays reserved for an agent after it was last seen (e.g. 24h).
    #[arg(long, value_name = "DURATION")]
    pub lease_ttl: Option<String>,
    /// How long open user connections may keep going after SIGTERM (e.g. 10s).
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    /// Most concurrent user connections carried to one agent.
    #[arg(long, value_name = "N")]
    pub max_streams_per_agent: Option<usize>,
    /// Most TCP connections ("lanes") one agent may keep while user connections overlap, the
    /// first included (default 8; 1 turns extra lanes off).
    #[arg(long, value_name = "N")]
    pub max_lanes_per_agent: Option<usize>,
    /// TOML file of per-agent tokens, each limited to agent names or `prefix-*` patterns.
    #[arg(long, value_name = "FILE")]
    pub tokens_file: Option<PathBuf>,
    /// CA bundle (PEM) for agents' client certificates (mutual TLS); the certificate's DNS name
    /// is then the only agent name it may claim.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Address block allowed to connect to allocated ports (repeatable; default: everyone).
    #[arg(long, value_name = "CIDR")]
    pub allow_cidr: Vec<String>,
    /// Most concurrent user connections on one allocated port.
    #[arg(long, value_name = "N")]
    pub max_conns_per_port: Option<usize>,
    /// Most new user connections per second on one allocated port (bursts of twice that).
    #[arg(long, value_name = "N")]
    pub max_new_conns_per_sec: Option<u32>,
    /// Failed agent handshakes from one IP within a minute before it is banned.
    #[arg(long, value_name = "N")]
    pub auth_failure_limit: Option<u32>,
    /// How long such a ban lasts (e.g. 5m).
    #[arg(long, value_name = "DURATION")]
    pub auth_ban: Option<String>,
    /// Most agent handshakes in progress at once; more are closed at once.
    #[arg(long, value_name = "N")]
    pub max_handshakes: Option<usize>,
    /// File receiving one JSON line per user connection ("-" for stdout, e.g. journald).
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// URL (http:// or https://) that receives a JSON POST per tunnel lifecycle event.
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,
    /// File with the HMAC-SHA256 key that signs webhook bodies (X-Jumpgate-Signature).
    #[arg(long, value_name = "FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// CA bundle (PEM) for an https webhook (default: the system bundle).
    #[arg(long, value_name = "FILE")]
    pub webhook_ca: Option<PathBuf>,
    /// HTTP CONNECT router reaching agents by name through one port (off by default).
    #[arg(long, value_name = "ADDR")]
    pub router_listen: Option<String>,
    /// Admin HTTP endpoint (health, metrics, API), or "off" (default 127.0.0.1:7001).
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Bearer token file for the admin endpoint; required when it is not on loopback.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Log filter, e.g. info or info,relay_server=debug (RUST_LOG wins; reloaded on SIGHUP).
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Session threads: 1 = everything on one thread (default; fastest on small jump hosts);
    /// N > 1 = agent sessions spread over N single-threaded runtimes; 0 = one per CPU, for a
    /// many-core host carrying several agents' bulk transfers at once. Needs a restart.
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,
}

impl RunArgs {
    /// The `--config` file's settings, or none when no file is given.
    fn file(&self) -> Result<FileConfig, ConfigError> {
        match &self.config {
            Some(path) => load_toml(path),
            None => Ok(FileConfig::default()),
        }
    }
}

/// The config file's shape: the same settings as [`RunArgs`], with underscores.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    public_host: Option<String>,
    port_range: Option<String>,
    proxy_bind: Option<String>,
    token_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    heartbeat_interval: Option<DurationValue>,
    heartbeat_timeout: Option<DurationValue>,
    lease_ttl: Option<DurationValue>,
    drain_timeout: Option<DurationValue>,
    max_streams_per_agent: Option<usize>,
    max_lanes_per_agent: Option<usize>,
    tokens_file: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    allow_cidr: Option<Vec<String>>,
    max_conns_per_port: Option<usize>,
    max_new_conns_per_sec: Option<u32>,
    auth_failure_limit: Option<u32>,
    auth_ban: Option<DurationValue>,
    max_handshakes: Option<usize>,
    audit_log: Option<PathBuf>,
    admin: Option<String>,
    admin_token_file: Option<PathBuf>,
    router_listen: Option<String>,
    webhook_url: Option<String>,
    webhook_secret_file: Option<PathBuf>,
    webhook_ca: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    worker_threads: Option<usize>,
}

/// Where the relay's TLS identity comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// Operator-provided certificate chain and key.
    Files {
        /// PEM certificate chain.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
    },
    /// A self-signed certificate generated once in the state dir.
    SelfSigned,
}

/// Validated relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Agent listener address.
    pub listen: SocketAddr,
    /// What users type after `ssh -p PORT`.
    pub public_host: String,
    /// Ports to allocate.
    pub port_range: PortRange,
    /// Where allocated ports listen.
    pub proxy_bind: IpAddr,
    /// Shared token file; `None` means JUMPGATE_TOKEN or a generated token.
    pub token_file: Option<PathBuf>,
    /// TLS identity.
    pub tls: TlsSource,
    /// State directory.
    pub state_dir: PathBuf,
    /// Heartbeat period announced to agents.
    pub heartbeat_interval: Duration,
    /// Silence that ends a session.
    pub heartbeat_timeout: Duration,
    /// Lease lifetime after the agent was last seen.
    pub lease_ttl: Duration,
    /// Grace period for open connections on shutdown.
    pub drain_timeout: Duration,
    /// Concurrent user connections per agent (below the yamux stream limit).
    pub max_streams_per_agent: usize,
    /// TCP connections per agent session, the first included.
    pub max_lanes_per_agent: usize,
    /// Time allowed for TLS plus the jumpgate handshake on a new agent connection.
    pub handshake_timeout: Duration,
    /// Per-agent tokens file.
    pub tokens_file: Option<PathBuf>,
    /// CA for agents' client certificates.
    pub client_ca: Option<PathBuf>,
    /// Who may connect to allocated ports (empty: everyone).
    pub allow_cidr: Vec<Cidr>,
    /// Concurrent user connections per allocated port.
    pub max_conns_per_port: usize,
    /// New user connections per second per allocated port.
    pub max_new_conns_per_sec: u32,
    /// Failed handshakes per IP per minute before a ban.
    pub auth_failure_limit: u32,
    /// Ban length.
    pub auth_ban: Duration,
    /// Concurrent handshakes.
    pub max_handshakes: usize,
    /// Audit log destination.
    pub audit_log: Option<PathBuf>,
    /// Webhook destination, its signing key file and CA bundle.
    pub webhook: Option<(crate::webhook::Target, PathBuf, Option<PathBuf>)>,
    /// Router listener address; `None` when off.
    pub router_listen: Option<SocketAddr>,
    /// Admin endpoint address; `None` when turned off.
    pub admin: Option<SocketAddr>,
    /// Admin bearer token file.
    pub admin_token_file: Option<PathBuf>,
    /// Log filter directives.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Session threads (1 = all on the main thread, 0 = one per CPU).
    pub worker_threads: usize,
    /// The flags this was built from, so a reload can re-read the same file with the same
    /// overrides.
    pub source: RunArgs,
}

fn pick<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
    flag.or(file)
}

fn duration(
    key: &'static str,
    flag: Option<String>,
    file: Option<DurationValue>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let parsed = match (flag, file) {
        (Some(text), _) => parse_duration(&text),
        (None, Some(v)) => v.to_duration(),
        (None, None) => return Ok(default),
    };
    parsed.map_err(|detail| ConfigError::Invalid { key, detail })
}

impl RelayConfig {
    /// Merges flags over the config file and validates the result.
    pub fn from_args(args: RunArgs) -> Result<Self, ConfigError> {
        let source = args.clone();
        let file = args.file()?;
        let listen_text =
            pick(args.listen, file.listen).unwrap_or_else(|| "0.0.0.0:7000".to_string());
        let listen: SocketAddr = listen_text.parse().map_err(|_| ConfigError::Invalid {
            key: "listen",
            detail: format!("{listen_text:?} is not IP:PORT, e.g. 0.0.0.0:7000"),
        })?;
        let range_text = pick(args.port_range, file.port_range).ok_or(ConfigError::Missing {
            key: "port_range",
            hint: "pass --port-range LO-HI (e.g. 10000-50000) or set port_range in the config file",
        })?;
        let port_range = range_text
            .parse::<PortRange>()
            .map_err(|e| ConfigError::Invalid {
                key: "port_range",
                detail: e.to_string(),
            })?;
        let proxy_bind_text =
            pick(args.proxy_bind, file.proxy_bind).unwrap_or_else(|| "0.0.0.0".to_string());
        let proxy_bind = proxy_bind_text.parse().map_err(|_| ConfigError::Invalid {
            key: "proxy_bind",
            detail: format!("{proxy_bind_text:?} is not an IP address, e.g. 0.0.0.0"),
        })?;
        let public_host = match pick(args.public_host, file.public_host) {
            Some(h) if h.trim().is_empty() || h.contains(char::is_whitespace) => {
                return Err(ConfigError::Invalid {
                    key: "public_host",
                    detail: format!("{h:?} is not a host name or IP address"),
                })
            }
            Some(h) => h,
            None if !listen.ip().is_unspecified() => listen.ip().to_string(),
            None => {
                return Err(ConfigError::Missing {
                    key: "public_host",
                    hint: "pass --public-host with the address users connect to (e.g. the jump host's public IP)",
                })
            }
        };
        let tls = match (
            pick(args.tls_cert, file.tls_cert),
            pick(args.tls_key, file.tls_key),
        ) {
            (Some(cert), Some(key)) => TlsSource::Files { cert, key },
            (None, None) => TlsSource::SelfSigned,
            _ => return Err(ConfigError::Invalid {
                key: "tls_cert/tls_key",
                detail:
                    "give both --tls-cert and --tls-key, or neither for a self-signed certificate"
                        .into(),
            }),
        };
        let heartbeat_interval = duration(
            "heartbeat_interval",
            args.heartbeat_interval,
            file.heartbeat_interval,
            Duration::from_secs(10),
        )?;
        let heartbeat_timeout = duration(
            "heartbeat_timeout",
            args.heartbeat_timeout,
            file.heartbeat_timeout,
            Duration::from_secs(30),
        )?;
        if heartbeat_interval.is_zero() || heartbeat_timeout <= heartbeat_interval {
            return Err(ConfigError::Invalid {
                key: "heartbeat_timeout",
                detail: format!(
                    "must be longer than heartbeat_interval (got interval {heartbeat_interval:?}, timeout {heartbeat_timeout:?}); a timeout of 3 intervals is usual"
                ),
            });
        }
        let lease_ttl = duration(
            "lease_ttl",
            args.lease_ttl,
            file.lease_ttl,
            Duration::from_secs(86400),
        )?;
        let drain_timeout = duration(
            "drain_timeout",
            args.drain_timeout,
            file.drain_timeout,
            Duration::from_secs(10),
        )?;
        let max_streams_per_agent =
            pick(args.max_streams_per_agent, file.max_streams_per_agent).unwrap_or(2048);
        let limit = jumpgate_transport::mux::MuxSettings::default().max_streams;
        if max_streams_per_agent == 0 || max_streams_per_agent >= limit {
            return Err(ConfigError::Invalid {
                key: "max_streams_per_agent",
                detail: format!(
                    "must be between 1 and {} (the session's stream limit is {limit})",
                    limit - 1
                ),
            });
        }
        let allow_cidr: Vec<Cidr> = parse_list("allow_cidr", args.allow_cidr, file.allow_cidr)?;
        let positive = |key: &'static str, v: usize| {
            if v == 0 {
                Err(ConfigError::Invalid {
                    key,
                    detail: "must be at least 1".into(),
                })
            } else {
                Ok(v)
            }
        };
        let max_conns_per_port = positive(
            "max_conns_per_port",
            pick(args.max_conns_per_port, file.max_conns_per_port).unwrap_or(256),
        )?;
        let max_new_conns_per_sec = positive(
            "max_new_conns_per_sec",
            pick(args.max_new_conns_per_sec, file.max_new_conns_per_sec).unwrap_or(100) as usize,
        )? as u32;
        let auth_failure_limit = positive(
            "auth_failure_limit",
            pick(args.auth_failure_limit, file.auth_failure_limit).unwrap_or(10) as usize,
        )? as u32;
        let auth_ban = duration(
            "auth_ban",
            args.auth_ban,
            file.auth_ban,
            Duration::from_secs(300),
        )?;
        let max_lanes_per_agent = positive(
            "max_lanes_per_agent",
            pick(args.max_lanes_per_agent, file.max_lanes_per_agent).unwrap_or(8),
        )?;
        let max_handshakes = positive(
            "max_handshakes",
            pick(args.max_handshakes, file.max_handshakes).unwrap_or(1024),
        )?;
        let admin_token_file = pick(args.admin_token_file, file.admin_token_file);
        let admin = parse_admin(pick(args.admin, file.admin))?;
        if let Some(addr) = admin {
            if !addr.ip().is_loopback() && admin_token_file.is_none() {
                return Err(ConfigError::Invalid {
                    key: "admin",
                    detail: format!(
                        "{addr} is reachable beyond this machine; set admin_token_file (--admin-token-file) or bind it to 127.0.0.1"
                    ),
                });
            }
        }
        let log_level = pick(args.log_level, file.log_level).unwrap_or_else(|| "info".into());
        jumpgate_config::parse_filter(&log_level).map_err(|detail| ConfigError::Invalid {
            key: "log_level",
            detail,
        })?;
        let router_listen = match pick(args.router_listen, file.router_listen) {
            Some(text) => Some(text.parse().map_err(|_| ConfigError::Invalid {
                key: "router_listen",
                detail: format!("{text:?} is not IP:PORT, e.g. 0.0.0.0:7443"),
            })?),
            None => None,
        };
        let webhook = match (pick(args.webhook_url, file.webhook_url), pick(args.webhook_secret_file, file.webhook_secret_file)) {
            (None, None) => None,
            (Some(url), Some(secret)) => {
                let target = crate::webhook::Target::parse(&url)
                    .map_err(|detail| ConfigError::Invalid { key: "webhook_url", detail })?;
                Some((target, secret, pick(args.webhook_ca, file.webhook_ca)))
            }
            (Some(_), None) => {
                return Err(ConfigError::Missing {
                    key: "webhook_secret_file",
                    hint: "webhooks are signed: set webhook_secret_file (--webhook-secret-file) to a file with the HMAC key",
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::Missing {
                    key: "webhook_url",
                    hint: "webhook_secret_file is set but webhook_url is not",
                })
            }
        };
        Ok(Self {
            webhook,
            router_listen,
            log_level,
            admin,
            admin_token_file,
            tokens_file: pick(args.tokens_file, file.tokens_file),
            client_ca: pick(args.client_ca, file.client_ca),
            allow_cidr,
            max_conns_per_port,
            max_new_conns_per_sec,
            auth_failure_limit,
            auth_ban,
            max_handshakes,
            audit_log: pick(args.audit_log, file.audit_log),
            source,
            listen,
            public_host,
            port_range,
            proxy_bind,
            token_file: pick(args.token_file, file.token_file),
            tls,
            state_dir: pick(args.state_dir, file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            heartbeat_interval,
            heartbeat_timeout,
            lease_ttl,
            drain_timeout,
            max_streams_per_agent,
            max_lanes_per_agent,
            handshake_timeout: Duration::from_secs(10),
            log_format: pick(args.log_format, file.log_format).unwrap_or_default(),
            worker_threads: pick(args.worker_threads, file.worker_threads).unwrap_or(1),
        })
    }

    /// Path of the lease file.
    pub fn lease_file(&self) -> PathBuf {
        self.state_dir.join("leases.json")
    }

    /// Path of the generated token.
    pub fn generated_token_file(&self) -> PathBuf {
        self.state_dir.join("token")
    }
}

/// Where users reach the router, for `ssh-config --router`: from the same flags and file.
pub fn router_settings(args: &RunArgs) -> Result<Option<String>, ConfigError> {
    let file = args.file()?;
    let Some(listen) = pick(args.router_listen.clone(), file.router_listen) else {
        return Ok(None);
    };
    let port = listen.rsplit(':').next().unwrap_or("7443").to_string();
    let host =
        pick(args.public_host.clone(), file.public_host).unwrap_or_else(|| "RELAY-HOST".into());
    Ok(Some(format!("{host}:{port}")))
}

/// Default admin endpoint.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7001";

/// Parses the admin address setting: an address, or "off".
fn parse_admin(text: Option<String>) -> Result<Option<SocketAddr>, ConfigError> {
    let text = text.unwrap_or_else(|| DEFAULT_ADMIN.to_string());
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| ConfigError::Invalid {
        key: "admin",
        detail: format!("{text:?} is not IP:PORT or \"off\""),
    })
}

/// Where the operator CLI finds the admin API, from the same flags and file as the relay.
pub fn admin_settings(
    args: &RunArgs,
) -> Result<(Option<SocketAddr>, Option<PathBuf>), ConfigError> {
    let file = args.file()?;
    let admin = parse_admin(pick(args.admin.clone(), file.admin))?;
    Ok((
        admin,
        pick(args.admin_token_file.clone(), file.admin_token_file),
    ))
}

/// Reads only what `fingerprint` needs (state dir and TLS files), without requiring a port range.
pub fn tls_settings(args: &RunArgs) -> Result<(PathBuf, TlsSource), ConfigError> {
    let file = args.file()?;
    let state_dir = pick(args.state_dir.clone(), file.state_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let tls = match (
        pick(args.tls_cert.clone(), file.tls_cert),
        pick(args.tls_key.clone(), file.tls_key),
    ) {
        (Some(cert), Some(key)) => TlsSource::Files { cert, key },
        _ => TlsSource::SelfSigned,
    };
    Ok((state_dir, tls))
}

/// Paths of the generated certificate and key inside a state dir.
pub fn self_signed_paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    (
        state_dir.join("tls-cert.pem"),
        state_dir.join("tls-key.pem"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RunArgs {
        RunArgs {
            port_range: Some("10000-10010".into()),
            public_host: Some("relay.example".into()),
            ..RunArgs::default()
        }
    }

    #[test]
    fn defaults() {
        let c = RelayConfig::from_args(args()).unwrap();
        assert_eq!(c.listen, "0.0.0.0:7000".parse().unwrap());
        assert_eq!(c.lease_ttl, Duration::from_secs(86400));
        assert_eq!(c.tls, TlsSource::SelfSigned);
    }

    #[test]
    fn flags_override_file_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("relay.toml");
        std::fs::write(&p, "listen = \"127.0.0.1:1\"\nlease_ttl = \"2h\"\n").unwrap();
        let mut a = args();
        a.config = Some(p.clone());
        a.listen = Some("127.0.0.1:2".into());
        let c = RelayConfig::from_args(a.clone()).unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.lease_ttl, Duration::from_secs(7200));

        std::fs::write(&p, "port_rnage = \"1-2\"\n").unwrap();
        let err = RelayConfig::from_args(a).unwrap_err().to_string();
        assert!(err.contains("port_rnage"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut a = args();
        a.port_range = Some("50000-10000".into());
        assert!(RelayConfig::from_args(a)
            .unwrap_err()
            .to_string()
            .contains("port_range"));
        let mut a = args();
        a.heartbeat_timeout = Some("5s".into());
        assert!(RelayConfig::from_args(a)
            .unwrap_err()
            .to_string()
            .contains("heartbeat_timeout"));
        let mut a = args();
        a.tls_cert = Some("c.pem".into());
        assert!(RelayConfig::from_args(a)
            .unwrap_err()
            .to_string()
            .contains("tls_key"));
        let mut a = args();
        a.public_host = None;
        assert!(RelayConfig::from_args(a)
            .unwrap_err()
            .to_string()
            .contains("public_host"));
    }
}
