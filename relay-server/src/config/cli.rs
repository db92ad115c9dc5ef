//! The command line of `relay-server`: its subcommands and their own flags. The settings of a
//! relay, which every subcommand also takes, are in [`super::settings`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::RunArgs;

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
