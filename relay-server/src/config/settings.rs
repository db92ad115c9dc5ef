//! Every relay setting, declared once: the table at the end of this file.
//!
//! One entry is one setting:
//!
//! ```text
//! /// Help text: the flag's `--help`, the file key's meaning and the typed field's doc.
//! pub max_conns_per_port: Option<usize> ["N"] => usize = or(256).then(at_least_one), live;
//! ```
//!
//! - the name is the flag (`--max-conns-per-port`) and the file key (`max_conns_per_port`);
//! - the written type is what the flag and the file hold (`Option<T>`, or `Vec<String>` for a
//!   repeatable flag), laid flag over file by [`jumpgate_config::layered`]; `["N"]` is the
//!   flag's value name in `--help`;
//! - the typed type and the rule turn the written value into the value the relay uses: the
//!   default (`or(256)`, `duration(..)`), other sources (`credential(..)`: a systemd credential
//!   when neither layer sets it) and the validation (`at_least_one`, `socket_addr(..)`); the rules
//!   are in [`super::rules`], and a rule's error names the setting;
//! - `live` when SIGHUP applies a new value to the running relay, `restart` when only a restart
//!   does (a reload that sees one change logs that it waits for a restart).
//!
//! `settings!` below makes [`RunArgs`] (the written settings, for clap and serde), [`Settings`]
//! (the typed ones, read by [`Settings::read`]) and [`Settings::restart_only_changes`] from it.
//! A setting that needs others to make sense (the TLS pair, the webhook, the lease store, the
//! jump listener) also has a step in [`super::load`], where [`super::RelayConfig`] is assembled.
//! Entries marked `pub(super)` are inputs of such a step only: the relay reads its result.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use jumpgate_config::{credential as cred, ConfigError, DurationValue};
use jumpgate_daemon::LogFormat;
use jumpgate_lease::PortRange;
use jumpgate_proto::Cidr;

use super::rules::*;
use super::{DEFAULT_ADMIN, DEFAULT_LISTEN, DEFAULT_STATE_DIR};

/// Declares the relay's settings from one table (see the module doc).
macro_rules! settings {
    (@restart restart, $old:ident, $new:ident, $key:ident, $changed:ident) => {
        if $old.$key != $new.$key {
            $changed.push(stringify!($key));
        }
    };
    (@restart live, $old:ident, $new:ident, $key:ident, $changed:ident) => {};
    ($(
        $(#[doc = $doc:expr])*
        $vis:vis $key:ident : $written:ty [$value_name:literal] => $typed:ty = $rule:expr,
            $when:ident $(, serde($($serde:tt)*))?;
    )*) => {
        jumpgate_config::settings! {
            /// The relay's settings as written: flags for running it, each also a key of the
            /// `--config` file (with underscores). Values stay as written until
            /// [`RelayConfig::load`](super::RelayConfig::load) checks them.
            #[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
            #[serde(default, deny_unknown_fields)]
            pub struct RunArgs {
                /// TOML file with any of the settings below (flags override it).
                #[arg(long, short = 'c', value_name = "FILE")]
                #[serde(skip)]
                pub config: Option<PathBuf>,
                $(
                    $(#[doc = $doc])*
                    #[arg(long, value_name = $value_name)]
                    $(#[serde($($serde)*)])?
                    pub $key: $written,
                )*
            }
        }

        /// The relay's settings with their defaults applied and each checked on its own; what
        /// the relay reads through [`RelayConfig`](super::RelayConfig).
        #[derive(Debug, Clone)]
        pub struct Settings {
            $(
                $(#[doc = $doc])*
                $vis $key: $typed,
            )*
        }

        impl Settings {
            /// Applies every setting's rule to its written value, in table order.
            pub(super) fn read(written: RunArgs) -> Result<Self, ConfigError> {
                Ok(Self {
                    $( $key: Rule::apply($rule, stringify!($key), written.$key)?, )*
                })
            }

            /// The settings marked `restart` whose value differs in `new`: a reload cannot
            /// apply them.
            pub fn restart_only_changes(&self, new: &Self) -> Vec<&'static str> {
                let mut changed = Vec::new();
                $( settings!(@restart $when, self, new, $key, changed); )*
                changed
            }
        }
    };
}

settings! {
    /// Address agents connect to, e.g. 0.0.0.0:7000.
    pub listen: Option<String> ["ADDR"] => SocketAddr =
        or(DEFAULT_LISTEN.to_string()).then(socket_addr(DEFAULT_LISTEN)), restart;
    /// Host name or IP users connect to; shown to agents in their "enabled on" line.
    pub(super) public_host: Option<String> ["HOST"] => Option<String> = optional(host_name), restart;
    /// Ports handed to agents' services, e.g. 10000-50000.
    pub(super) port_range: Option<String> ["LO-HI"] => Option<PortRange> =
        optional(port_range), restart;
    /// Address the allocated ports listen on (default 0.0.0.0).
    pub proxy_bind: Option<String> ["IP"] => IpAddr =
        or("0.0.0.0".to_string()).then(ip_address), restart;
    /// File holding the agents' shared token (else JUMPGATE_TOKEN, else one generated in the state dir).
    pub token_file: Option<PathBuf> ["FILE"] => Option<PathBuf> = credential(cred::TOKEN), live;
    /// PEM certificate chain for the agent port (else a self-signed one in the state dir).
    pub(super) tls_cert: Option<PathBuf> ["FILE"] => Option<PathBuf> =
        credential(cred::TLS_CERT), restart;
    /// PEM private key for --tls-cert.
    pub(super) tls_key: Option<PathBuf> ["FILE"] => Option<PathBuf> =
        credential(cred::TLS_KEY), restart;
    /// Directory for the generated certificate and token and the lease file.
    pub state_dir: Option<PathBuf> ["DIR"] => PathBuf = or(PathBuf::from(DEFAULT_STATE_DIR)), restart;
    /// How often agents send heartbeats (e.g. 10s).
    pub heartbeat_interval: Option<DurationValue> ["DURATION"] => Duration =
        duration(Duration::from_secs(10)), restart;
    /// Silence after which a session is considered dead (e.g. 30s).
    pub heartbeat_timeout: Option<DurationValue> ["DURATION"] => Duration =
        duration(Duration::from_secs(30)), restart;
    /// How long a port stays reserved for an agent after it was last seen (e.g. 24h).
    pub lease_ttl: Option<DurationValue> ["DURATION"] => Duration =
        duration(Duration::from_secs(86400)), restart;
    /// How long open user connections may keep going after SIGTERM (e.g. 10s).
    pub drain_timeout: Option<DurationValue> ["DURATION"] => Duration =
        duration(Duration::from_secs(10)), restart;
    /// Most concurrent user connections carried to one agent.
    pub max_streams_per_agent: Option<usize> ["N"] => usize = or(2048).then(below_stream_limit), restart;
    /// Most TCP connections ("lanes") one agent may keep while user connections overlap, the
    /// first included (default 8; 1 turns extra lanes off).
    pub max_lanes_per_agent: Option<usize> ["N"] => usize = or(8).then(at_least_one), restart;
    /// Extra lanes only for agents whose connection's round trip is at least this (default 0:
    /// on every path): below it (loopback, a data centre) one connection carries everything
    /// at less CPU than several. Off by default because the relay sees the round trip to
    /// whatever connects to it: a worker far away behind a proxy next to the relay looks
    /// near.
    pub lanes_min_rtt: Option<DurationValue> ["DURATION"] => Duration = duration(Duration::ZERO), restart;
    /// TOML file of per-agent tokens, each limited to agent names or `prefix-*` patterns.
    pub tokens_file: Option<PathBuf> ["FILE"] => Option<PathBuf> = credential(cred::TOKENS), live;
    /// CA bundle (PEM) for agents' client certificates (mutual TLS); the certificate's DNS name
    /// is then the only agent name it may claim.
    pub client_ca: Option<PathBuf> ["FILE"] => Option<PathBuf> = as_given(), restart;
    /// Ed25519 public key (PEM) that signs per-job join tokens (JWT, EdDSA); a token's `sub`
    /// is the only name (or `prefix-*`) it may claim. See `relay-server mint-token`.
    pub join_key_file: Option<PathBuf> ["FILE"] => Option<PathBuf> = credential(cred::JOIN_KEY), live;
    /// The `aud` every join token must carry, naming this fleet (default
    /// `jumpgate:PUBLIC_HOST`); the same on every relay of a fleet.
    pub(super) join_audience: Option<String> ["TEXT"] => Option<String> = as_given(), live;
    /// The `iss` every join token must carry (default: not checked).
    pub(super) join_issuer: Option<String> ["TEXT"] => Option<String> = as_given(), live;
    /// Longest lifetime (`exp` minus `iat`/`nbf`) of an accepted join token (default 7d).
    pub(super) join_max_lifetime: Option<DurationValue> ["DURATION"] => Duration =
        duration(crate::join::DEFAULT_MAX_LIFETIME), live;
    /// Most agent names one credential (a tokens-file entry, a certificate, a signed token's
    /// subject) may hold, with a lease or a live session (`--no-port` ones too); the shared
    /// token is not capped (default 64).
    pub max_names_per_credential: Option<usize> ["N"] => usize = or(64).then(at_least_one), live;
    /// Most leased ports one such credential may hold over all its names (default 256).
    pub max_leases_per_credential: Option<usize> ["N"] => usize = or(256).then(at_least_one), live;
    /// Most agent sessions one such credential may have on this relay at once (default 64).
    pub max_sessions_per_credential: Option<usize> ["N"] => usize = or(64).then(at_least_one), live;
    /// Address block allowed to connect to allocated ports (repeatable; default: everyone).
    pub allow_cidr: Vec<String> ["CIDR"] => Vec<Cidr> = list(), live;
    /// Most concurrent user connections on one allocated port.
    pub max_conns_per_port: Option<usize> ["N"] => usize = or(256).then(at_least_one), live;
    /// Most new user connections per second on one allocated port (bursts of twice that).
    pub max_new_conns_per_sec: Option<u32> ["N"] => u32 = or(100).then(at_least_one), live;
    /// Most concurrent user connections one source address (IPv6: its /64) may hold on one
    /// allocated port, so one user cannot take all of the port's slots (default 64).
    pub max_conns_per_source: Option<usize> ["N"] => usize = or(64).then(at_least_one), live;
    /// Failed agent handshakes from one IP within a minute before it is banned.
    pub auth_failure_limit: Option<u32> ["N"] => u32 = or(10).then(at_least_one), restart;
    /// How long such a ban lasts (e.g. 5m).
    pub auth_ban: Option<DurationValue> ["DURATION"] => Duration =
        duration(Duration::from_secs(300)), restart;
    /// Address block never banned for failed agent handshakes (repeatable), e.g. the NAT
    /// address your workers share.
    pub ban_exempt_cidr: Vec<String> ["CIDR"] => Vec<Cidr> = list(), live;
    /// Most agent handshakes in progress at once; more are closed at once.
    pub max_handshakes: Option<usize> ["N"] => usize = or(1024).then(at_least_one), restart;
    /// File receiving one JSON line per user connection ("-" for stdout, e.g. journald).
    pub audit_log: Option<PathBuf> ["FILE"] => Option<PathBuf> = as_given(), restart;
    /// URL (http:// or https://) that receives a JSON POST per tunnel lifecycle event.
    pub(super) webhook_url: Option<String> ["URL"] => Option<String> = as_given(), restart;
    /// File with the HMAC-SHA256 key that signs webhook bodies (X-Jumpgate-Signature).
    pub(super) webhook_secret_file: Option<PathBuf> ["FILE"] => Option<PathBuf> =
        credential(cred::WEBHOOK_SECRET), restart;
    /// CA bundle (PEM) for an https webhook (default: the system bundle).
    pub(super) webhook_ca: Option<PathBuf> ["FILE"] => Option<PathBuf> = as_given(), restart;
    /// HTTP CONNECT router reaching agents by name through one port (off by default).
    pub router_listen: Option<String> ["ADDR"] => Option<SocketAddr> =
        optional(socket_addr("0.0.0.0:7443")), restart;
    /// Also accept agents as WebSocket on this address (plain HTTP, for an ingress or load
    /// balancer in front that may terminate TLS; the agent link's own TLS runs inside).
    pub ws_listen: Option<String> ["ADDR"] => Option<SocketAddr> =
        optional(socket_addr("127.0.0.1:8080")), restart;
    /// Path of the WebSocket endpoint (default /jumpgate).
    pub ws_path: Option<String> ["PATH"] => String = or("/jumpgate".to_string()).then(url_path), restart;
    /// Address block of an ingress in front of the WebSocket port (repeatable): connections
    /// from it are taken to come from the client its X-Forwarded-For / Forwarded names.
    pub ws_trusted_proxies: Vec<String> ["CIDR"] => Vec<Cidr> = list(), restart;
    /// The WebSocket URL agents reach this relay at (wss://HOST[:PORT]/PATH), told to agents
    /// with the fleet's members so WebSocket-only workers reach every relay.
    pub ws_public_url: Option<String> ["URL"] => Option<String> = optional(websocket_url), live;
    /// SSH jump listener for `ssh -J relay job-name` (off by default), e.g. 0.0.0.0:2222.
    pub(super) jump_listen: Option<String> ["ADDR"] => Option<String> = as_given(), restart;
    /// OpenSSH private host key of the jump listener (default: one generated in the state dir).
    pub(super) jump_host_key_file: Option<PathBuf> ["FILE"] => Option<PathBuf> = as_given(), restart;
    /// Only these public keys may jump (authorized_keys format; default: any key).
    pub(super) jump_authorized_keys_file: Option<PathBuf> ["FILE"] => Option<PathBuf> =
        as_given(), live;
    /// CA public keys whose user certificates may jump (TrustedUserCAKeys format).
    pub(super) jump_trusted_user_ca_keys: Option<PathBuf> ["FILE"] => Option<PathBuf> =
        as_given(), live;
    /// OpenSSH host certificate of the jump host key (signed by your host CA), so users
    /// trust it with one `@cert-authority` known_hosts line for the whole fleet.
    pub(super) jump_host_certificate: Option<PathBuf> ["FILE"] => Option<PathBuf> =
        as_given(), live;
    /// SSH CA private key (0600) that signs short-lived jump certificates for job names
    /// (POST /api/jump/certificates, sign-jump-cert); or the systemd credential jump-ca-key.
    pub(super) jump_ca_key: Option<PathBuf> ["FILE"] => Option<PathBuf> = as_given(), live;
    /// Longest lifetime of a certificate signed with jump_ca_key (default 24h).
    pub(super) jump_cert_max_lifetime: Option<DurationValue> ["DURATION"] =>
        Option<DurationValue> = as_given(), live;
    /// Admin HTTP endpoint (health, metrics, API), or "off" (default 127.0.0.1:7001).
    pub admin: Option<String> ["ADDR"] => Option<SocketAddr> =
        or(DEFAULT_ADMIN.to_string()).then(admin_address), restart;
    /// Bearer token file for the admin endpoint; required when it is not on loopback.
    pub admin_token_file: Option<PathBuf> ["FILE"] => Option<PathBuf> =
        credential(cred::ADMIN_TOKEN), restart;
    /// Log filter, e.g. info or info,relay_server=debug (RUST_LOG wins; reloaded on SIGHUP).
    pub log_level: Option<String> ["FILTER"] => String = or("info".to_string()).then(log_filter), live;
    /// Log format: text or json.
    pub log_format: Option<LogFormat> ["FORMAT"] => LogFormat = or_default(), restart;
    /// Where agents dial this relay, HOST:PORT, as other relays list it to agents (default:
    /// public_host and the port of listen). Set it when public_host is the fleet's shared name.
    pub(super) advertise: Option<String> ["HOST:PORT"] => Option<String> = as_given(), live;
    /// Static fleet membership for small fleets without a shared lease store: the other
    /// relays' agent addresses (HOST:PORT, repeatable), listed to every agent so it keeps a
    /// session with each; "HOST:PORT wss://HOST/PATH" adds the peer's WebSocket URL, which
    /// agents that reach the fleet over WebSocket dial. Reloaded on SIGHUP.
    pub(super) peers: Vec<String> ["HOST:PORT"] => Vec<String> = as_given(), live,
        serde(deserialize_with = "jumpgate_config::layer::one_or_many");
    /// Session threads: 1 = everything on one thread (default; fastest on small jump hosts);
    /// N > 1 = agent sessions spread over N single-threaded runtimes; 0 = one per CPU, for a
    /// many-core host carrying several agents' bulk transfers at once. Needs a restart.
    pub worker_threads: Option<usize> ["N"] => usize = or(1), restart;
    /// Where leases live: "file" (default; leases.json in the state dir, one relay) or
    /// "postgres" (a database shared by a fleet of relays; see lease_store_url).
    pub(super) lease_store: Option<String> ["KIND"] => Option<String> = as_given(), restart;
    /// PostgreSQL connection URL for lease_store = "postgres", e.g.
    /// postgres://jumpgate@db.example:5432/jumpgate, without a password.
    pub(super) lease_store_url: Option<String> ["URL"] => Option<String> = as_given(), restart;
    /// File (0600) with the database password (else JUMPGATE_LEASE_STORE_PASSWORD).
    pub lease_store_password_file: Option<PathBuf> ["FILE"] => Option<PathBuf> =
        credential(cred::LEASE_STORE_PASSWORD), restart;
    /// TLS to the database: "require" or "disable" (default: require, except for a loopback
    /// host or a Unix socket).
    pub(super) lease_store_tls: Option<String> ["MODE"] => Option<String> = as_given(), restart;
    /// CA bundle (PEM) for the database's certificate (default: the system bundle).
    pub(super) lease_store_ca: Option<PathBuf> ["FILE"] => Option<PathBuf> = as_given(), restart;
    /// This relay's id in a fleet (default: HOSTNAME/LISTEN-ADDRESS); unique per relay.
    pub(super) relay_id: Option<String> ["ID"] => Option<String> = optional(relay_id), restart;
}

#[cfg(test)]
mod tests {
    use super::super::RelayConfig;
    use super::RunArgs;

    fn load(extra: impl FnOnce(&mut RunArgs)) -> RelayConfig {
        let mut args = RunArgs {
            port_range: Some("10000-10010".into()),
            public_host: Some("relay.example".into()),
            ..RunArgs::default()
        };
        extra(&mut args);
        RelayConfig::from_args(args).unwrap()
    }

    #[test]
    fn a_reload_names_the_settings_marked_restart_and_only_those() {
        let old = load(|_| ());
        let same = load(|_| ());
        assert!(old.restart_only_changes(&same).is_empty());

        // Applied live: no restart needed.
        let live = load(|a| {
            a.max_conns_per_port = Some(3);
            a.allow_cidr = vec!["10.0.0.0/8".into()];
            a.log_level = Some("debug".into());
        });
        assert!(old.restart_only_changes(&live).is_empty());

        let moved = load(|a| {
            a.listen = Some("0.0.0.0:7100".into());
            a.port_range = Some("10000-10020".into());
            a.heartbeat_interval = Some("5s".parse().unwrap());
            a.max_conns_per_port = Some(3);
        });
        assert_eq!(
            old.restart_only_changes(&moved),
            ["listen", "port_range", "heartbeat_interval"]
        );
    }
}
