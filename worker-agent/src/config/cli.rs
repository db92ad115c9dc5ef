//! The `worker-agent` command line: the subcommands around the agent's settings ([`RunArgs`]),
//! which are declared once in [`super::settings`] for flags and file alike.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::RunArgs;

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
