//! jumpgate relay server.
//!
//! The folder listing is the architecture: `agents` is the agent port (handshake, placement,
//! running session, lanes, the registry of live sessions); `users` is the public side (where a
//! user connection is admitted, carried, and the name router); `leases` is where leases live;
//! `admin` is the operator API; `net` holds what every accept loop shares; `relay` binds the
//! listeners, wires the layers together, serves, drains and reloads. `main.rs` only parses the
//! configuration and calls [`run`]; tests call [`Relay::bind`] to learn the bound address.
//!
//! Each layer gets a handle with what it needs and nothing else: `agents::Agents`,
//! `users::Users`, `users::router::Router` and `admin::Operator` share the parts (leases,
//! registry, counters) they have in common by `Arc`.

mod admin;
mod agents;
mod audit;
mod claims;
pub mod cli;
pub mod config;
mod defaults;
pub mod error;
mod fleet;
mod guard;
mod http_client;
pub mod identity;
mod join;
pub mod jump;
pub mod leases;
mod metrics;
mod net;
mod policy;
mod relay;
mod shards;
mod users;
mod webhook;
mod ws;

use tokio_util::sync::CancellationToken;

pub use claims::CredentialCaps;
pub use config::RelayConfig;
pub use error::RelayError;
pub use relay::{Relay, Reloader};

/// Runs a relay with `config` until `shutdown` fires, re-reading the configuration on SIGHUP.
pub async fn run(config: RelayConfig, shutdown: CancellationToken) -> Result<(), RelayError> {
    let relay = Relay::bind(config, shutdown).await?;
    relay.reload_on_sighup();
    relay.serve().await
}
