//! The relay's settings: each declared once ([`RunArgs`]) for the command line and the TOML file,
//! the flags laid over the file, then one validation pass ([`RelayConfig::load`]) that running the
//! relay, every subcommand and SIGHUP reload go through.
//!
//! Every flag has a key of the same name (dashes become underscores) in the file; a flag given on
//! the command line wins over the file, the file over the defaults. Unknown keys and bad values
//! are refused before anything starts, naming the key and what it expects (exit code 64).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use jumpgate_config::{
    credential, duration_setting as duration, layered, or_credential, parse_list, ConfigError,
    DurationValue, LogFormat,
};
use jumpgate_lease::PortRange;
use jumpgate_proto::{Cidr, Secret};
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
    Fingerprint(FingerprintArgs),
    /// Print a table of the tunnels of the running relay (from its admin API).
    Tunnels(RunArgs),
    /// Print ~/.ssh/config `Host` blocks for every live tunnel of the running relay.
    SshConfig(SshConfigArgs),
    /// Print a signed join token for one agent name (or `prefix-*`), for a job's agent.
    MintToken(MintTokenArgs),
    /// Print an OpenSSH user certificate for a user's key that reaches the named jobs through
    /// `ssh -J` (signed offline with jump_ca_key).
    SignJumpCert(SignJumpCertArgs),
}

/// Flags of `relay-server sign-jump-cert`.
#[derive(Debug, Clone, Args)]
pub struct SignJumpCertArgs {
    /// The user's OpenSSH public key file (e.g. ~/.ssh/id_ed25519.pub).
    #[arg(long, value_name = "FILE")]
    pub public_key: PathBuf,
    /// A job (agent) name the certificate reaches (repeatable).
    #[arg(long, value_name = "NAME", required = true)]
    pub name: Vec<String>,
    /// How long the certificate is valid, e.g. 8h; at most jump_cert_max_lifetime.
    #[arg(long, value_name = "DURATION")]
    pub lifetime: String,
    /// The certificate's key id, shown in audit lines (default: jumpgate: and the key's
    /// fingerprint).
    #[arg(long, value_name = "ID")]
    pub key_id: Option<String>,
    /// Where the CA key is (jump_ca_key / --config).
    #[command(flatten)]
    pub run: RunArgs,
}

/// Flags of `relay-server mint-token`.
#[derive(Debug, Clone, Args)]
pub struct MintTokenArgs {
    /// Ed25519 private key (PEM, PKCS#8), e.g. from `openssl genpkey -algorithm ed25519`.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The agent name the token may claim, or a `prefix-*` pattern.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// How long the token is accepted for new connections (e.g. 24h); at most the relay's
    /// join_max_lifetime.
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    pub ttl: String,
    /// The relay's join_audience (`aud`); default: the one in --config's relay settings.
    #[arg(long, value_name = "TEXT")]
    pub audience: Option<String>,
    /// The relay's join_issuer (`iss`); default: the one in --config's relay settings.
    #[arg(long, value_name = "TEXT")]
    pub issuer: Option<String>,
    /// The relay's configuration file, for its join_audience, join_issuer and join_max_lifetime.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Flags of `relay-server fingerprint`.
#[derive(Debug, Clone, Args)]
pub struct FingerprintArgs {
    /// Print the `ssh -J` listener's host key as a known_hosts line instead of the TLS pin.
    #[arg(long)]
    pub jump: bool,
    /// Where the relay's state and settings are.
    #[command(flatten)]
    pub run: RunArgs,
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
    /// Print one wildcard block that reaches every agent by name through `ssh -J`.
    #[arg(long, conflicts_with = "router")]
    pub jump: bool,
    /// With --router or --jump: the Host pattern (default `*`, e.g. `vh-exec-*`).
    #[arg(long, value_name = "PATTERN", default_value = "*")]
    pub pattern: String,
    /// Where the relay is (its config file or --admin).
    #[command(flatten)]
    pub run: RunArgs,
}

jumpgate_config::settings! {
    /// The relay's settings: flags for running it, each also a key of the `--config` file (with
    /// underscores). Values stay as written until [`RelayConfig::load`] checks them.
    #[derive(Debug, Clone, Default, Args, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct RunArgs {
        /// TOML file with any of the settings below (flags override it).
        #[arg(long, short = 'c', value_name = "FILE")]
        #[serde(skip)]
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
        pub heartbeat_interval: Option<DurationValue>,
        /// Silence after which a session is considered dead (e.g. 30s).
        #[arg(long, value_name = "DURATION")]
        pub heartbeat_timeout: Option<DurationValue>,
        /// How long a port stays reserved for an agent after it was last seen (e.g. 24h).
        #[arg(long, value_name = "DURATION")]
        pub lease_ttl: Option<DurationValue>,
        /// How long open user connections may keep going after SIGTERM (e.g. 10s).
        #[arg(long, value_name = "DURATION")]
        pub drain_timeout: Option<DurationValue>,
        /// Most concurrent user connections carried to one agent.
        #[arg(long, value_name = "N")]
        pub max_streams_per_agent: Option<usize>,
        /// Most TCP connections ("lanes") one agent may keep while user connections overlap, the
        /// first included (default 8; 1 turns extra lanes off).
        #[arg(long, value_name = "N")]
        pub max_lanes_per_agent: Option<usize>,
        /// Extra lanes only for agents whose connection's round trip is at least this (default 0:
        /// on every path): below it (loopback, a data centre) one connection carries everything
        /// at less CPU than several. Off by default because the relay sees the round trip to
        /// whatever connects to it: a worker far away behind a proxy next to the relay looks
        /// near.
        #[arg(long, value_name = "DURATION")]
        pub lanes_min_rtt: Option<DurationValue>,
        /// TOML file of per-agent tokens, each limited to agent names or `prefix-*` patterns.
        #[arg(long, value_name = "FILE")]
        pub tokens_file: Option<PathBuf>,
        /// CA bundle (PEM) for agents' client certificates (mutual TLS); the certificate's DNS name
        /// is then the only agent name it may claim.
        #[arg(long, value_name = "FILE")]
        pub client_ca: Option<PathBuf>,
        /// Ed25519 public key (PEM) that signs per-job join tokens (JWT, EdDSA); a token's `sub`
        /// is the only name (or `prefix-*`) it may claim. See `relay-server mint-token`.
        #[arg(long, value_name = "FILE")]
        pub join_key_file: Option<PathBuf>,
        /// The `aud` every join token must carry, naming this fleet (default
        /// `jumpgate:PUBLIC_HOST`); the same on every relay of a fleet.
        #[arg(long, value_name = "TEXT")]
        pub join_audience: Option<String>,
        /// The `iss` every join token must carry (default: not checked).
        #[arg(long, value_name = "TEXT")]
        pub join_issuer: Option<String>,
        /// Longest lifetime (`exp` minus `iat`/`nbf`) of an accepted join token (default 7d).
        #[arg(long, value_name = "DURATION")]
        pub join_max_lifetime: Option<DurationValue>,
        /// Most agent names one credential (a tokens-file entry, a certificate, a signed token's
        /// subject) may hold, with a lease or a live session (`--no-port` ones too); the shared
        /// token is not capped (default 64).
        #[arg(long, value_name = "N")]
        pub max_names_per_credential: Option<usize>,
        /// Most leased ports one such credential may hold over all its names (default 256).
        #[arg(long, value_name = "N")]
        pub max_leases_per_credential: Option<usize>,
        /// Most agent sessions one such credential may have on this relay at once (default 64).
        #[arg(long, value_name = "N")]
        pub max_sessions_per_credential: Option<usize>,
        /// Address block allowed to connect to allocated ports (repeatable; default: everyone).
        #[arg(long, value_name = "CIDR")]
        pub allow_cidr: Vec<String>,
        /// Most concurrent user connections on one allocated port.
        #[arg(long, value_name = "N")]
        pub max_conns_per_port: Option<usize>,
        /// Most new user connections per second on one allocated port (bursts of twice that).
        #[arg(long, value_name = "N")]
        pub max_new_conns_per_sec: Option<u32>,
        /// Most concurrent user connections one source address (IPv6: its /64) may hold on one
        /// allocated port, so one user cannot take all of the port's slots (default 64).
        #[arg(long, value_name = "N")]
        pub max_conns_per_source: Option<usize>,
        /// Failed agent handshakes from one IP within a minute before it is banned.
        #[arg(long, value_name = "N")]
        pub auth_failure_limit: Option<u32>,
        /// How long such a ban lasts (e.g. 5m).
        #[arg(long, value_name = "DURATION")]
        pub auth_ban: Option<DurationValue>,
        /// Address block never banned for failed agent handshakes (repeatable), e.g. the NAT
        /// address your workers share.
        #[arg(long, value_name = "CIDR")]
        pub ban_exempt_cidr: Vec<String>,
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
        /// Also accept agents as WebSocket on this address (plain HTTP, for an ingress or load
        /// balancer in front that may terminate TLS; the agent link's own TLS runs inside).
        #[arg(long, value_name = "ADDR")]
        pub ws_listen: Option<String>,
        /// Path of the WebSocket endpoint (default /jumpgate).
        #[arg(long, value_name = "PATH")]
        pub ws_path: Option<String>,
        /// Address block of an ingress in front of the WebSocket port (repeatable): connections
        /// from it are taken to come from the client its X-Forwarded-For / Forwarded names.
        #[arg(long, value_name = "CIDR")]
        pub ws_trusted_proxies: Vec<String>,
        /// The WebSocket URL agents reach this relay at (wss://HOST[:PORT]/PATH), told to agents
        /// with the fleet's members so WebSocket-only workers reach every relay.
        #[arg(long, value_name = "URL")]
        pub ws_public_url: Option<String>,
        /// SSH jump listener for `ssh -J relay job-name` (off by default), e.g. 0.0.0.0:2222.
        #[arg(long, value_name = "ADDR")]
        pub jump_listen: Option<String>,
        /// OpenSSH private host key of the jump listener (default: one generated in the state dir).
        #[arg(long, value_name = "FILE")]
        pub jump_host_key_file: Option<PathBuf>,
        /// Only these public keys may jump (authorized_keys format; default: any key).
        #[arg(long, value_name = "FILE")]
        pub jump_authorized_keys_file: Option<PathBuf>,
        /// CA public keys whose user certificates may jump (TrustedUserCAKeys format).
        #[arg(long, value_name = "FILE")]
        pub jump_trusted_user_ca_keys: Option<PathBuf>,
        /// OpenSSH host certificate of the jump host key (signed by your host CA), so users
        /// trust it with one `@cert-authority` known_hosts line for the whole fleet.
        #[arg(long, value_name = "FILE")]
        pub jump_host_certificate: Option<PathBuf>,
        /// SSH CA private key (0600) that signs short-lived jump certificates for job names
        /// (POST /api/jump/certificates, sign-jump-cert); or the systemd credential jump-ca-key.
        #[arg(long, value_name = "FILE")]
        pub jump_ca_key: Option<PathBuf>,
        /// Longest lifetime of a certificate signed with jump_ca_key (default 24h).
        #[arg(long, value_name = "DURATION")]
        pub jump_cert_max_lifetime: Option<DurationValue>,
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
        /// Where agents dial this relay, HOST:PORT, as other relays list it to agents (default:
        /// public_host and the port of listen). Set it when public_host is the fleet's shared name.
        #[arg(long, value_name = "HOST:PORT")]
        pub advertise: Option<String>,
        /// Static fleet membership for small fleets without a shared lease store: the other
        /// relays' agent addresses (HOST:PORT, repeatable), listed to every agent so it keeps a
        /// session with each; "HOST:PORT wss://HOST/PATH" adds the peer's WebSocket URL, which
        /// agents that reach the fleet over WebSocket dial. Reloaded on SIGHUP.
        #[arg(long, value_name = "HOST:PORT")]
        #[serde(deserialize_with = "jumpgate_config::layer::one_or_many")]
        pub peers: Vec<String>,
        /// Session threads: 1 = everything on one thread (default; fastest on small jump hosts);
        /// N > 1 = agent sessions spread over N single-threaded runtimes; 0 = one per CPU, for a
        /// many-core host carrying several agents' bulk transfers at once. Needs a restart.
        #[arg(long, value_name = "N")]
        pub worker_threads: Option<usize>,
        /// Where leases live: "file" (default; leases.json in the state dir, one relay) or
        /// "postgres" (a database shared by a fleet of relays; see lease_store_url).
        #[arg(long, value_name = "KIND")]
        pub lease_store: Option<String>,
        /// PostgreSQL connection URL for lease_store = "postgres", e.g.
        /// postgres://jumpgate@db.example:5432/jumpgate, without a password.
        #[arg(long, value_name = "URL")]
        pub lease_store_url: Option<String>,
        /// File (0600) with the database password (else JUMPGATE_LEASE_STORE_PASSWORD).
        #[arg(long, value_name = "FILE")]
        pub lease_store_password_file: Option<PathBuf>,
        /// TLS to the database: "require" or "disable" (default: require, except for a loopback
        /// host or a Unix socket).
        #[arg(long, value_name = "MODE")]
        pub lease_store_tls: Option<String>,
        /// CA bundle (PEM) for the database's certificate (default: the system bundle).
        #[arg(long, value_name = "FILE")]
        pub lease_store_ca: Option<PathBuf>,
        /// This relay's id in a fleet (default: HOSTNAME/LISTEN-ADDRESS); unique per relay.
        #[arg(long, value_name = "ID")]
        pub relay_id: Option<String>,
    }
}

/// Where the relay keeps its leases.
#[derive(Debug, Clone)]
pub enum LeaseStoreConfig {
    /// `leases.json` in the state dir.
    File,
    /// A PostgreSQL database shared by the fleet.
    Postgres(crate::leases::PgSettings),
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
    /// The shared token from the environment (JUMPGATE_TOKEN), when no `token_file` is set.
    pub env_token: Option<Secret>,
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
    /// Round trip below which a session is never asked to open extra lanes.
    pub lanes_min_rtt: Duration,
    /// Time allowed for TLS plus the jumpgate handshake on a new agent connection.
    pub handshake_timeout: Duration,
    /// Per-agent tokens file.
    pub tokens_file: Option<PathBuf>,
    /// CA for agents' client certificates.
    pub client_ca: Option<PathBuf>,
    /// Public key of signed join tokens.
    pub join_key_file: Option<PathBuf>,
    /// What a join token must say: audience, issuer, longest lifetime.
    pub join: crate::join::JoinRules,
    /// Names one credential may hold (tokens-file entries may set their own).
    pub max_names_per_credential: usize,
    /// Leases one credential may hold (tokens-file entries may set their own).
    pub max_leases_per_credential: usize,
    /// Live sessions one credential may have on this relay (tokens-file entries may set their
    /// own).
    pub max_sessions_per_credential: usize,
    /// Who may connect to allocated ports (empty: everyone).
    pub allow_cidr: Vec<Cidr>,
    /// Concurrent user connections per allocated port.
    pub max_conns_per_port: usize,
    /// New user connections per second per allocated port.
    pub max_new_conns_per_sec: u32,
    /// Concurrent user connections per source address per allocated port.
    pub max_conns_per_source: usize,
    /// Failed handshakes per IP per minute before a ban.
    pub auth_failure_limit: u32,
    /// Ban length.
    pub auth_ban: Duration,
    /// Addresses never banned.
    pub ban_exempt_cidr: Vec<Cidr>,
    /// Concurrent handshakes.
    pub max_handshakes: usize,
    /// Audit log destination.
    pub audit_log: Option<PathBuf>,
    /// Webhook destination, its signing key file and CA bundle.
    pub webhook: Option<(crate::webhook::Target, PathBuf, Option<PathBuf>)>,
    /// Router listener address; `None` when off.
    pub router_listen: Option<SocketAddr>,
    /// WebSocket agent endpoint address; `None` when off.
    pub ws_listen: Option<SocketAddr>,
    /// Path of the WebSocket agent endpoint.
    pub ws_path: String,
    /// Ingresses whose X-Forwarded-For / Forwarded header names a WebSocket agent's address.
    pub ws_trusted_proxies: Vec<Cidr>,
    /// Where agents reach this relay as WebSocket, told to them in the member list.
    pub ws_public_url: Option<String>,
    /// The `ssh -J` listener; `None` when off.
    pub jump: Option<crate::jump::settings::JumpConfig>,
    /// Signing jump certificates; `None` without a CA key.
    pub jump_signing: Option<crate::jump::settings::SigningConfig>,
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
    /// Where agents dial this relay (`host:port`), as listed to them; `None`: `public_host` and
    /// the port `listen` is bound to ([`RelayConfig::advertised`]).
    pub advertise: Option<String>,
    /// Other relays of a statically configured fleet (`host:port` each).
    pub peers: Vec<String>,
    /// The WebSocket URLs of those `peers` that gave one (`HOST:PORT wss://HOST/PATH`).
    pub peer_ws: std::collections::HashMap<String, String>,
    /// Where leases live.
    pub lease_store: LeaseStoreConfig,
    /// The database password's file (flag, file or the `lease-store-password` credential);
    /// read only with `lease_store = "postgres"`.
    pub lease_store_password_file: Option<PathBuf>,
    /// This relay's id among the fleet's members.
    pub relay_id: String,
    /// The flags this was built from, so a reload can re-read the same file with the same
    /// overrides.
    pub source: RunArgs,
}

/// What a configuration is loaded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Running the relay (and reloading it): every required setting must be given.
    Run,
    /// An operator subcommand (`fingerprint`, `tunnels`, `ssh-config`) reading a few settings of
    /// a relay configured elsewhere. Everything given is checked exactly as for [`Purpose::Run`],
    /// but the two settings only a running relay needs may be missing: `port_range` then stands
    /// for every port and `public_host` for [`UNKNOWN_PUBLIC_HOST`].
    Inspect,
}

/// `public_host` of an inspected configuration that does not set it; `ssh-config --router`
/// prints it for the operator to replace.
pub const UNKNOWN_PUBLIC_HOST: &str = "RELAY-HOST";

pub use crate::defaults::{DEFAULT_ADMIN, DEFAULT_LISTEN};

impl RelayConfig {
    /// Loads and validates the configuration for running the relay.
    pub fn from_args(args: RunArgs) -> Result<Self, ConfigError> {
        Self::load(args, Purpose::Run)
    }

    /// The one path from flags and file to a configuration: lays `args` over their `--config`
    /// file, applies defaults and validates every setting. Running the relay, SIGHUP reload and
    /// every subcommand come through here, so they all accept and refuse the same settings.
    pub fn load(args: RunArgs, purpose: Purpose) -> Result<Self, ConfigError> {
        let mut s = layered(args.clone(), args.config.as_deref())?;
        // Under systemd, `LoadCredential=` files stand in for the secret settings given neither
        // as a flag nor in the file (jumpgate_config::secret_file explains the convention).
        s.token_file = or_credential(s.token_file, credential::TOKEN);
        s.tokens_file = or_credential(s.tokens_file, credential::TOKENS);
        s.admin_token_file = or_credential(s.admin_token_file, credential::ADMIN_TOKEN);
        s.webhook_secret_file = or_credential(s.webhook_secret_file, credential::WEBHOOK_SECRET);
        s.tls_cert = or_credential(s.tls_cert, credential::TLS_CERT);
        s.tls_key = or_credential(s.tls_key, credential::TLS_KEY);
        s.join_key_file = or_credential(s.join_key_file, credential::JOIN_KEY);
        s.lease_store_password_file = or_credential(
            s.lease_store_password_file,
            credential::LEASE_STORE_PASSWORD,
        );
        let invalid = |key: &'static str, detail: String| ConfigError::Invalid { key, detail };
        let at_least_one = |key: &'static str, v: usize| {
            if v == 0 {
                Err(invalid(key, "must be at least 1".into()))
            } else {
                Ok(v)
            }
        };
        let socket_addr = |key: &'static str, text: String, example: &str| {
            text.parse::<SocketAddr>()
                .map_err(|_| invalid(key, format!("{text:?} is not IP:PORT, e.g. {example}")))
        };

        let listen = socket_addr(
            "listen",
            s.listen.unwrap_or_else(|| DEFAULT_LISTEN.into()),
            DEFAULT_LISTEN,
        )?;
        let range_text = match (s.port_range, purpose) {
            (Some(text), _) => text,
            (None, Purpose::Inspect) => "1-65535".into(),
            (None, Purpose::Run) => return Err(ConfigError::Missing {
                key: "port_range",
                hint: "pass --port-range LO-HI (e.g. 10000-50000) or set port_range in the config file",
            }),
        };
        let port_range = range_text
            .parse::<PortRange>()
            .map_err(|e| invalid("port_range", e.to_string()))?;
        let proxy_bind_text = s.proxy_bind.unwrap_or_else(|| "0.0.0.0".into());
        let proxy_bind = proxy_bind_text.parse().map_err(|_| {
            invalid(
                "proxy_bind",
                format!("{proxy_bind_text:?} is not an IP address, e.g. 0.0.0.0"),
            )
        })?;
        let public_host = match s.public_host {
            Some(h) if h.trim().is_empty() || h.contains(char::is_whitespace) => {
                return Err(invalid(
                    "public_host",
                    format!("{h:?} is not a host name or IP address"),
                ))
            }
            Some(h) => h,
            None if !listen.ip().is_unspecified() => listen.ip().to_string(),
            None if purpose == Purpose::Inspect => UNKNOWN_PUBLIC_HOST.into(),
            None => return Err(ConfigError::Missing {
                key: "public_host",
                hint: "pass --public-host with the address users connect to (e.g. the jump host's public IP)",
            }),
        };
        let tls =
            match (s.tls_cert, s.tls_key) {
                (Some(cert), Some(key)) => TlsSource::Files { cert, key },
                (None, None) => TlsSource::SelfSigned,
                _ => return Err(invalid(
                    "tls_cert/tls_key",
                    "give both --tls-cert and --tls-key, or neither for a self-signed certificate"
                        .into(),
                )),
            };
        let heartbeat_interval = duration(
            "heartbeat_interval",
            s.heartbeat_interval,
            Duration::from_secs(10),
        )?;
        let heartbeat_timeout = duration(
            "heartbeat_timeout",
            s.heartbeat_timeout,
            Duration::from_secs(30),
        )?;
        if heartbeat_interval.is_zero() || heartbeat_timeout <= heartbeat_interval {
            return Err(invalid(
                "heartbeat_timeout",
                format!(
                    "must be longer than heartbeat_interval (got interval {heartbeat_interval:?}, timeout {heartbeat_timeout:?}); a timeout of 3 intervals is usual"
                ),
            ));
        }
        let max_streams_per_agent = s.max_streams_per_agent.unwrap_or(2048);
        let limit = jumpgate_transport::mux::MuxSettings::default().max_streams;
        if max_streams_per_agent == 0 || max_streams_per_agent >= limit {
            return Err(invalid(
                "max_streams_per_agent",
                format!(
                    "must be between 1 and {} (the session's stream limit is {limit})",
                    limit - 1
                ),
            ));
        }
        let admin = match s.admin.unwrap_or_else(|| DEFAULT_ADMIN.into()) {
            off if off.eq_ignore_ascii_case("off") => None,
            text => Some(
                text.parse::<SocketAddr>()
                    .map_err(|_| invalid("admin", format!("{text:?} is not IP:PORT or \"off\"")))?,
            ),
        };
        if let Some(addr) = admin {
            if !addr.ip().is_loopback() && s.admin_token_file.is_none() {
                return Err(invalid(
                    "admin",
                    format!(
                        "{addr} is reachable beyond this machine; set admin_token_file (--admin-token-file) or bind it to 127.0.0.1"
                    ),
                ));
            }
        }
        let log_level = s.log_level.unwrap_or_else(|| "info".into());
        jumpgate_config::parse_filter(&log_level).map_err(|detail| invalid("log_level", detail))?;
        let router_listen = s
            .router_listen
            .map(|text| socket_addr("router_listen", text, "0.0.0.0:7443"))
            .transpose()?;
        let ws_listen = s
            .ws_listen
            .map(|text| socket_addr("ws_listen", text, "127.0.0.1:8080"))
            .transpose()?;
        let ws_path = s.ws_path.unwrap_or_else(|| "/jumpgate".into());
        if !ws_path.starts_with('/') || ws_path.contains(['?', '#', ' ']) {
            return Err(invalid(
                "ws_path",
                format!("{ws_path:?} is not a URL path; write it like /jumpgate"),
            ));
        }
        let ws_public_url = s.ws_public_url.map(ws_public_url).transpose()?;
        let webhook = match (s.webhook_url, s.webhook_secret_file) {
            (None, None) => None,
            (Some(url), Some(secret)) => {
                let target = crate::webhook::Target::parse(&url)
                    .map_err(|detail| invalid("webhook_url", detail))?;
                Some((target, secret, s.webhook_ca))
            }
            (Some(_), None) => return Err(ConfigError::Missing {
                key: "webhook_secret_file",
                hint: "webhooks are signed: set webhook_secret_file (--webhook-secret-file) to a file with the HMAC key",
            }),
            (None, Some(_)) => return Err(ConfigError::Missing {
                key: "webhook_url",
                hint: "webhook_secret_file (or the systemd credential webhook-secret) is set but webhook_url is not",
            }),
        };
        let member_addr = |key: &'static str, text: &str| {
            jumpgate_proto::member::parse_host_port(text.trim())
                .map(|(host, port)| jumpgate_proto::member::MemberEndpoint {
                    id: String::new(),
                    host,
                    port,
                    ws: None,
                }
                .to_string())
                .ok_or_else(|| {
                    invalid(
                        key,
                        format!("{text:?} is not HOST:PORT ([IPv6]:PORT), e.g. relay-2.example.com:7000"),
                    )
                })
        };
        let advertise = match &s.advertise {
            Some(text) => Some(member_addr("advertise", text)?),
            None => {
                // The default takes the port `listen` is bound to; any port checks the host.
                let text = advertised(&public_host, listen.port().max(1));
                member_addr("advertise", &text).map_err(|_| {
                    invalid(
                        "advertise",
                        format!("the default (public_host {public_host:?} and the port of listen) is not HOST:PORT; set advertise to where agents dial this relay"),
                    )
                })?;
                None
            }
        };
        let itself = advertise
            .clone()
            .or_else(|| (listen.port() != 0).then(|| advertised(&public_host, listen.port())));
        let mut peers = Vec::new();
        let mut peer_ws = std::collections::HashMap::new();
        for text in &s.peers {
            let (text, ws) = match text.trim().split_once(char::is_whitespace) {
                Some((addr, ws)) => (addr, Some(ws.trim())),
                None => (text.as_str(), None),
            };
            let peer = member_addr("peers", text)?;
            if let Some(ws) = ws {
                if !jumpgate_proto::member::check_ws_url(ws) {
                    let shown =
                        jumpgate_proto::sanitize(ws, jumpgate_proto::display::MAX_FIELD_LEN);
                    return Err(invalid(
                        "peers",
                        format!("{peer}: {shown:?} is not a WebSocket URL agents can dial; write \"HOST:PORT wss://HOST/PATH\""),
                    ));
                }
                peer_ws.insert(peer.clone(), ws.to_string());
            }
            if Some(&peer) != itself.as_ref() && !peers.contains(&peer) {
                peers.push(peer);
            }
        }
        if peers.len() + 1 > jumpgate_proto::MAX_MEMBERS {
            return Err(invalid(
                "peers",
                format!(
                    "{} relays in all; agents keep at most {} sessions",
                    peers.len() + 1,
                    jumpgate_proto::MAX_MEMBERS
                ),
            ));
        }
        let lease_store = match s.lease_store.as_deref().unwrap_or("file") {
            "file" => {
                if s.lease_store_url.is_some() {
                    return Err(invalid(
                        "lease_store_url",
                        "is set but lease_store is \"file\"; set lease_store = \"postgres\" to use it".into(),
                    ));
                }
                LeaseStoreConfig::File
            }
            "postgres" => {
                let Some(url) = s.lease_store_url else {
                    return Err(ConfigError::Missing {
                        key: "lease_store_url",
                        hint: "lease_store = \"postgres\" needs lease_store_url, e.g. postgres://jumpgate@db.example:5432/jumpgate",
                    });
                };
                let default_tls = crate::leases::PgSettings::check_url(&url)
                    .map_err(|detail| invalid("lease_store_url", detail))?;
                let tls = match s.lease_store_tls.as_deref() {
                    None => default_tls,
                    Some("require") => crate::leases::StoreTls::Require,
                    Some("disable") => crate::leases::StoreTls::Disable,
                    Some(other) => {
                        return Err(invalid(
                            "lease_store_tls",
                            format!("{other:?} is not \"require\" or \"disable\""),
                        ))
                    }
                };
                LeaseStoreConfig::Postgres(crate::leases::PgSettings {
                    url,
                    password_file: s.lease_store_password_file.clone(),
                    tls,
                    ca: s.lease_store_ca,
                })
            }
            other => {
                return Err(invalid(
                    "lease_store",
                    format!("{other:?} is not \"file\" or \"postgres\""),
                ))
            }
        };
        let relay_id = match s.relay_id {
            Some(id) if id.trim().is_empty() || id.len() > 200 => {
                return Err(invalid(
                    "relay_id",
                    format!("{id:?} must be 1-200 characters"),
                ))
            }
            Some(id) => id,
            None => format!("{}/{listen}", hostname()),
        };
        let env_token = match s.token_file {
            Some(_) => None,
            None => jumpgate_config::env_token(),
        };
        let join = crate::join::JoinRules::new(
            s.join_audience,
            s.join_issuer,
            duration(
                "join_max_lifetime",
                s.join_max_lifetime,
                crate::join::DEFAULT_MAX_LIFETIME,
            )?,
            &public_host,
        )?;
        Ok(Self {
            listen,
            public_host,
            port_range,
            proxy_bind,
            token_file: s.token_file,
            env_token,
            tls,
            state_dir: s
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            heartbeat_interval,
            heartbeat_timeout,
            lease_ttl: duration("lease_ttl", s.lease_ttl, Duration::from_secs(86400))?,
            drain_timeout: duration("drain_timeout", s.drain_timeout, Duration::from_secs(10))?,
            max_streams_per_agent,
            max_lanes_per_agent: at_least_one(
                "max_lanes_per_agent",
                s.max_lanes_per_agent.unwrap_or(8),
            )?,
            lanes_min_rtt: duration("lanes_min_rtt", s.lanes_min_rtt, Duration::ZERO)?,
            handshake_timeout: Duration::from_secs(10),
            tokens_file: s.tokens_file,
            client_ca: s.client_ca,
            join_key_file: s.join_key_file,
            join,
            max_names_per_credential: at_least_one(
                "max_names_per_credential",
                s.max_names_per_credential.unwrap_or(64),
            )?,
            max_leases_per_credential: at_least_one(
                "max_leases_per_credential",
                s.max_leases_per_credential.unwrap_or(256),
            )?,
            max_sessions_per_credential: at_least_one(
                "max_sessions_per_credential",
                s.max_sessions_per_credential.unwrap_or(64),
            )?,
            allow_cidr: parse_list("allow_cidr", &s.allow_cidr)?,
            max_conns_per_port: at_least_one(
                "max_conns_per_port",
                s.max_conns_per_port.unwrap_or(256),
            )?,
            max_new_conns_per_sec: at_least_one(
                "max_new_conns_per_sec",
                s.max_new_conns_per_sec.unwrap_or(100) as usize,
            )? as u32,
            max_conns_per_source: at_least_one(
                "max_conns_per_source",
                s.max_conns_per_source.unwrap_or(64),
            )?,
            auth_failure_limit: at_least_one(
                "auth_failure_limit",
                s.auth_failure_limit.unwrap_or(10) as usize,
            )? as u32,
            auth_ban: duration("auth_ban", s.auth_ban, Duration::from_secs(300))?,
            ban_exempt_cidr: parse_list("ban_exempt_cidr", &s.ban_exempt_cidr)?,
            max_handshakes: at_least_one("max_handshakes", s.max_handshakes.unwrap_or(1024))?,
            audit_log: s.audit_log,
            webhook,
            router_listen,
            ws_listen,
            ws_path,
            ws_trusted_proxies: parse_list("ws_trusted_proxies", &s.ws_trusted_proxies)?,
            ws_public_url,
            jump: crate::jump::settings::JumpConfig::from_settings(
                s.jump_listen,
                s.jump_host_key_file,
                s.jump_authorized_keys_file,
                s.jump_trusted_user_ca_keys,
                s.jump_host_certificate,
            )?,
            jump_signing: crate::jump::settings::SigningConfig::from_settings(
                s.jump_ca_key,
                s.jump_cert_max_lifetime,
            )?,
            admin,
            admin_token_file: s.admin_token_file,
            log_level,
            log_format: s.log_format.unwrap_or_default(),
            worker_threads: s.worker_threads.unwrap_or(1),
            advertise,
            peers,
            peer_ws,
            lease_store,
            lease_store_password_file: s.lease_store_password_file,
            relay_id,
            source: args,
        })
    }

    /// Where agents dial this relay: `advertise`, else `public_host` and `bound_port` (the
    /// port `listen` was bound to, which differs from its port when that is 0).
    pub fn advertised(&self, bound_port: u16) -> String {
        match &self.advertise {
            Some(addr) => addr.clone(),
            None => advertised(&self.public_host, bound_port),
        }
    }

    /// Path of the lease file.
    pub fn lease_file(&self) -> PathBuf {
        self.state_dir.join("leases.json")
    }

    /// Path of the generated token.
    pub fn generated_token_file(&self) -> PathBuf {
        self.state_dir.join("token")
    }

    /// Where users reach the router (`HOST:PORT` for `nc -X connect -x`), if it is on.
    pub fn router_address(&self) -> Option<String> {
        let port = self.router_listen?.port();
        Some(if self.public_host.contains(':') {
            format!("[{}]:{port}", self.public_host)
        } else {
            format!("{}:{port}", self.public_host)
        })
    }
}

/// This machine's host name, for the default `relay_id`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".into())
}

/// Checks `ws_public_url`: `ws[s]://HOST[:PORT]/PATH` as agents accept it in `--server`, short
/// enough to fit a member list ([`jumpgate_proto::member::check_ws_url`]).
fn ws_public_url(text: String) -> Result<String, ConfigError> {
    let text = text.trim().to_string();
    if jumpgate_proto::member::check_ws_url(&text) {
        return Ok(text);
    }
    Err(ConfigError::Invalid {
        key: "ws_public_url",
        detail: format!(
            "{:?} is not a WebSocket URL agents can dial; write it like wss://relay.example.com/jumpgate (no user, query or fragment)",
            jumpgate_proto::sanitize(&text, jumpgate_proto::display::MAX_FIELD_LEN)
        ),
    })
}

/// Paths of the generated certificate and key inside a state dir.
pub fn self_signed_paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    (
        state_dir.join("tls-cert.pem"),
        state_dir.join("tls-key.pem"),
    )
}

/// `host:port`, with an IPv6 host in brackets.
fn advertised(host: &str, port: u16) -> String {
    jumpgate_proto::member::MemberEndpoint {
        id: String::new(),
        host: host.to_string(),
        port,
        ws: None,
    }
    .to_string()
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
        // Loopback and data-centre agents keep one connection.
        assert_eq!(c.lanes_min_rtt, Duration::ZERO);
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

    #[test]
    fn websocket_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args();
        a.config = Some(write(
            &dir,
            "ws_trusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1/32\"]\nws_public_url = \"wss://relay.example.com/jumpgate\"\n",
        ));
        let c = RelayConfig::from_args(a.clone()).unwrap();
        assert_eq!(c.ws_trusted_proxies.len(), 2);
        assert_eq!(
            c.ws_public_url.as_deref(),
            Some("wss://relay.example.com/jumpgate")
        );
        let c = RelayConfig::from_args(args()).unwrap();
        assert!(c.ws_trusted_proxies.is_empty() && c.ws_public_url.is_none());
        for bad in [
            "https://relay.example.com/j",
            "wss://u@relay/j",
            "wss://relay/j?x",
        ] {
            let mut a = args();
            a.ws_public_url = Some(bad.into());
            let err = RelayConfig::from_args(a).unwrap_err().to_string();
            assert!(err.contains("ws_public_url"), "{err}");
        }
        let mut a = args();
        a.ws_trusted_proxies = vec!["nginx".into()];
        let err = RelayConfig::from_args(a).unwrap_err().to_string();
        assert!(err.contains("ws_trusted_proxies"), "{err}");
    }

    #[test]
    fn advertise_and_peers_are_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args();
        a.config = Some(write(
            &dir,
            "peers = [\"relay-b.example:7000\", \" [fd00::2]:7000\", \"relay.example:7000\", \"relay-b.example:7000\"]\n",
        ));
        let c = RelayConfig::from_args(a.clone()).unwrap();
        assert_eq!(c.advertise, None);
        assert_eq!(c.advertised(7000), "relay.example:7000");
        assert_eq!(
            c.peers,
            ["relay-b.example:7000", "[fd00::2]:7000"],
            "itself and repeats dropped"
        );
        a.peers = vec!["relay-c.example:7000  wss://relay-c.example/jumpgate".into()];
        let c = RelayConfig::from_args(a.clone()).unwrap();
        assert_eq!(c.peers, ["relay-c.example:7000"]);
        assert_eq!(
            c.peer_ws.get("relay-c.example:7000").map(String::as_str),
            Some("wss://relay-c.example/jumpgate")
        );
        a.peers = vec!["relay-c.example:7000 https://relay-c.example/".into()];
        let err = RelayConfig::from_args(a.clone()).unwrap_err().to_string();
        assert!(err.contains("HOST:PORT wss://HOST/PATH"), "{err}");
        a.peers = Vec::new();
        a.advertise = Some("relay-a.example:7100".into());
        assert_eq!(
            RelayConfig::from_args(a.clone()).unwrap().advertised(7000),
            "relay-a.example:7100"
        );
        for (key, bad) in [("advertise", "relay-a.example"), ("peers", "x y:7000")] {
            let mut b = args();
            match key {
                "advertise" => b.advertise = Some(bad.into()),
                _ => b.peers = vec![bad.into()],
            }
            let err = RelayConfig::from_args(b).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key),
                "{err}"
            );
        }
        let mut b = args();
        b.public_host = Some("bad/host".into());
        assert!(RelayConfig::from_args(b)
            .unwrap_err()
            .to_string()
            .contains("advertise"));
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let p = dir.path().join("relay.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args();
        a.config = Some(write(
            &dir,
            "drain_timeout = 20\nheartbeat_interval = \"5s\"\nallow_cidr = [\"10.0.0.0/8\"]\n\
             max_conns_per_port = 7\nlog_level = \"debug\"\nworker_threads = 2\n",
        ));
        a.drain_timeout = Some("3s".into());
        a.max_conns_per_port = Some(9);
        let c = RelayConfig::from_args(a.clone()).unwrap();
        // Flag over file.
        assert_eq!(c.drain_timeout, Duration::from_secs(3));
        assert_eq!(c.max_conns_per_port, 9);
        // File over default (a duration may be plain seconds or text).
        assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.allow_cidr, vec!["10.0.0.0/8".parse::<Cidr>().unwrap()]);
        assert_eq!((c.log_level.as_str(), c.worker_threads), ("debug", 2));
        // Default where neither says.
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(30));
        assert_eq!(c.max_handshakes, 1024);
        assert_eq!(c.admin, Some(DEFAULT_ADMIN.parse().unwrap()));
        // A repeated flag replaces the file's list.
        a.allow_cidr = vec!["192.0.2.0/24".into(), "198.51.100.0/24".into()];
        let c = RelayConfig::from_args(a).unwrap();
        assert_eq!(c.allow_cidr.len(), 2);
        assert_eq!(c.allow_cidr[0], "192.0.2.0/24".parse::<Cidr>().unwrap());
        // The file's integer seconds are read as such.
        let mut b = args();
        b.config = Some(write(&dir, "drain_timeout = 20\n"));
        assert_eq!(
            RelayConfig::from_args(b).unwrap().drain_timeout,
            Duration::from_secs(20)
        );
    }

    #[test]
    fn bad_values_name_their_key_from_flag_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args();
        a.lease_ttl = Some("soon".into());
        let from_flag = RelayConfig::from_args(a).unwrap_err().to_string();
        let mut a = args();
        a.config = Some(write(&dir, "lease_ttl = \"soon\"\n"));
        let from_file = RelayConfig::from_args(a).unwrap_err().to_string();
        assert!(from_flag.starts_with("invalid lease_ttl: "), "{from_flag}");
        assert_eq!(from_flag, from_file);

        let mut a = args();
        a.config = Some(write(&dir, "max_handshakes = \"many\"\n"));
        let err = RelayConfig::from_args(a).unwrap_err().to_string();
        assert!(err.contains("max_handshakes"), "{err}");
        // A key that exists only as a flag is unknown in the file.
        let mut a = args();
        a.config = Some(write(&dir, "config = \"other.toml\"\n"));
        let err = RelayConfig::from_args(a).unwrap_err().to_string();
        assert!(err.contains("unknown field `config`"), "{err}");
    }

    /// Every purpose (and so every subcommand, and reload, which re-runs `from_args`) refuses a
    /// certificate without its key, with the same message, whether flag or file gave it.
    #[test]
    fn a_certificate_without_key_is_refused_for_every_purpose() {
        let dir = tempfile::tempdir().unwrap();
        let expected = RelayConfig::from_args(RunArgs {
            tls_cert: Some("c.pem".into()),
            ..args()
        })
        .unwrap_err()
        .to_string();
        assert!(
            expected.contains("give both --tls-cert and --tls-key"),
            "{expected}"
        );
        let from_file = RunArgs {
            config: Some(write(&dir, "tls_cert = \"c.pem\"\n")),
            ..RunArgs::default()
        };
        let key_only = RunArgs {
            tls_key: Some("k.pem".into()),
            ..RunArgs::default()
        };
        for args in [from_file.clone(), key_only] {
            let err = RelayConfig::load(args, Purpose::Inspect).unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
        let mut run = args();
        run.config = from_file.config;
        assert_eq!(
            RelayConfig::from_args(run).unwrap_err().to_string(),
            expected
        );
    }

    #[test]
    fn lease_store_settings_refuse_a_password_in_the_url_and_pick_tls_by_host() {
        let pg = |url: &str, tls: Option<&str>| {
            RelayConfig::from_args(RunArgs {
                lease_store: Some("postgres".into()),
                lease_store_url: Some(url.into()),
                lease_store_tls: tls.map(str::to_string),
                ..args()
            })
        };
        let err = pg("postgres://jg:hunter2@db.example/jumpgate", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lease_store_password_file"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = pg("host=db.example user=jg password=hunter2", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("carries a password") && !err.contains("hunter2"),
            "{err}"
        );
        let tls_of = |c: RelayConfig| match c.lease_store {
            LeaseStoreConfig::Postgres(s) => s.tls,
            LeaseStoreConfig::File => panic!("file store"),
        };
        use crate::leases::StoreTls;
        assert_eq!(
            tls_of(pg("postgres://jg@db.example/jumpgate", None).unwrap()),
            StoreTls::Require
        );
        assert_eq!(
            tls_of(pg("postgres://jg@127.0.0.1:5432/jumpgate", None).unwrap()),
            StoreTls::Disable
        );
        assert_eq!(
            tls_of(pg("postgres://jg@127.0.0.1/jumpgate", Some("require")).unwrap()),
            StoreTls::Require
        );
        assert!(pg("postgres://jg@db.example/jumpgate", Some("maybe"))
            .unwrap_err()
            .to_string()
            .contains("lease_store_tls"));
        let err = RelayConfig::from_args(RunArgs {
            lease_store: Some("postgres".into()),
            ..args()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("lease_store_url"), "{err}");
        let c = RelayConfig::from_args(RunArgs {
            listen: Some("127.0.0.2:7000".into()),
            ..args()
        })
        .unwrap();
        assert!(matches!(c.lease_store, LeaseStoreConfig::File));
        assert!(c.relay_id.ends_with("/127.0.0.2:7000"), "{}", c.relay_id);
        assert_eq!(c.advertised(7000), "relay.example:7000");
    }

    #[test]
    fn inspecting_needs_no_port_range_or_public_host() {
        let c = RelayConfig::load(RunArgs::default(), Purpose::Inspect).unwrap();
        assert_eq!(c.public_host, UNKNOWN_PUBLIC_HOST);
        assert_eq!(c.tls, TlsSource::SelfSigned);
        assert_eq!(c.router_address(), None);
        let c = RelayConfig::load(
            RunArgs {
                router_listen: Some("0.0.0.0:7443".into()),
                public_host: Some("relay.example".into()),
                ..RunArgs::default()
            },
            Purpose::Inspect,
        )
        .unwrap();
        assert_eq!(c.router_address().as_deref(), Some("relay.example:7443"));
        // Running still requires them.
        let err = RelayConfig::from_args(RunArgs::default()).unwrap_err();
        assert!(err.to_string().contains("port_range"), "{err}");
    }
}
