//! The relay's configuration: every setting declared once, in the table of [`settings`] (its
//! flag, file key, written and typed type, default and other sources, validation rule, and
//! whether SIGHUP applies it or only a restart does), then one loading pass
//! ([`RelayConfig::load`]) that running the relay, every subcommand and SIGHUP reload go through.
//!
//! Every flag has a key of the same name (dashes become underscores) in the file; a flag given on
//! the command line wins over the file, the file over the defaults. Unknown keys and bad values
//! are refused before anything starts, naming the key and what it expects (exit code 64).
//!
//! The files, by job:
//! - `settings.rs`: the table; adding a setting is one entry there (and, when it only makes
//!   sense together with others, a step in `load.rs`);
//! - `rules.rs`: defaults, sources and checks a table entry composes;
//! - `load.rs`: the layering and the checks that span settings, assembling [`RelayConfig`];
//! - `cli.rs`: subcommands and their own flags.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jumpgate_lease::PortRange;
use jumpgate_proto::Secret;

mod cli;
mod load;
mod rules;
mod settings;
#[cfg(test)]
mod tests;

pub use cli::{Cli, Command, FingerprintArgs, MintTokenArgs, SignJumpCertArgs, SshConfigArgs};
pub use settings::{RunArgs, Settings};

/// Default place for the relay's certificate, token and lease file (systemd's StateDirectory).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/jumpgate";

/// `public_host` of an inspected configuration that does not set it; `ssh-config --router`
/// prints it for the operator to replace.
pub const UNKNOWN_PUBLIC_HOST: &str = "RELAY-HOST";

pub use crate::defaults::{DEFAULT_ADMIN, DEFAULT_LISTEN};

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

/// Validated relay settings: each setting of the table (through [`Deref`] to [`Settings`], so
/// `config.lease_ttl` reads it), and what the relay makes of settings that go together.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Every setting, typed and checked on its own.
    pub settings: Settings,
    /// What users type after `ssh -p PORT`.
    pub public_host: String,
    /// Ports to allocate.
    pub port_range: PortRange,
    /// The shared token from the environment (JUMPGATE_TOKEN), when no `token_file` is set.
    pub env_token: Option<Secret>,
    /// TLS identity.
    pub tls: TlsSource,
    /// Time allowed for TLS plus the jumpgate handshake on a new agent connection.
    pub handshake_timeout: Duration,
    /// What a join token must say: audience, issuer, longest lifetime.
    pub join: crate::join::JoinRules,
    /// Webhook destination, its signing key file and CA bundle.
    pub webhook: Option<(crate::webhook::Target, PathBuf, Option<PathBuf>)>,
    /// The `ssh -J` listener; `None` when off.
    pub jump: Option<crate::jump::settings::JumpConfig>,
    /// Signing jump certificates; `None` without a CA key.
    pub jump_signing: Option<crate::jump::settings::SigningConfig>,
    /// Where agents dial this relay (`host:port`), as listed to them; `None`: `public_host` and
    /// the port `listen` is bound to ([`RelayConfig::advertised`]).
    pub advertise: Option<String>,
    /// Other relays of a statically configured fleet (`host:port` each).
    pub peers: Vec<String>,
    /// The WebSocket URLs of those `peers` that gave one (`HOST:PORT wss://HOST/PATH`).
    pub peer_ws: std::collections::HashMap<String, String>,
    /// Where leases live.
    pub lease_store: LeaseStoreConfig,
    /// This relay's id among the fleet's members.
    pub relay_id: String,
    /// The flags this was built from, so a reload can re-read the same file with the same
    /// overrides.
    pub source: RunArgs,
}

/// The settings read as fields of the configuration (`config.max_conns_per_port`); the fields of
/// [`RelayConfig`] itself are those assembled from several settings.
impl Deref for RelayConfig {
    type Target = Settings;

    fn deref(&self) -> &Settings {
        &self.settings
    }
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

impl RelayConfig {
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

    /// The settings whose change a reload cannot apply, by name (the table marks them
    /// `restart`), so the reload can say they wait for a restart.
    pub fn restart_only_changes(&self, new: &RelayConfig) -> Vec<&'static str> {
        self.settings.restart_only_changes(&new.settings)
    }
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
