//! Harness for end-to-end tests: starts the real `relay-server` and `worker-agent` binaries, a
//! throwaway OpenSSH `sshd` on loopback, and runs the real `ssh`/`scp` clients against them.
//!
//! Every process is killed when its handle drops, so a failing test leaves nothing behind.
//! Ports come from the OS (or from randomly placed ranges below the ephemeral range), so tests
//! run in parallel.
//!
//! One module a part, one way to start each: [`Relay::builder`] and [`Agent::builder`] (with
//! `Relay::start` / `Agent::start` for the common case), [`Sshd::start`], [`Postgres::start`],
//! [`NatLab::create`]; processes and waiting in `process`, files and secrets in `files`, plain TCP in `wire`, keys and certificates in `ca`, the
//! hand-driven agent-port client in [`raw`].

mod agent;
mod ca;
mod files;
mod netns;
pub mod postgres;
mod process;
mod procfs;
pub mod raw;
mod relay;
mod sshd;
mod wire;

pub use agent::{enabled_port, host_api_socket, status_json, tunnel_cli, Agent, AgentBuilder};
pub use ca::{key_pair, unix_now, TestCa};
pub use files::*;
pub use netns::NatLab;
pub use postgres::Postgres;
pub use process::*;
pub use procfs::{cpu_secs, rss_kib, try_free_port};
pub use relay::{http, Relay, RelayBuilder, HARNESS_ADMIN_TOKEN, HARNESS_ADMIN_TOKEN_FILE};
pub use sshd::{keygen, EchoSession, Sshd};
pub use wire::{closed_within, read_until};
