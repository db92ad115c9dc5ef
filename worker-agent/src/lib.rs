//! jumpgate worker agent.
//!
//! The agent dials out to one or more relays over TLS ([`link`]), is given a public port per
//! service, publishes it ([`status`]), and bridges every stream the relay opens to the local
//! service it names ([`streams`]). Which relays it keeps a session with follows DNS and the
//! fleet's membership ([`fleet`]). `main.rs` only parses the configuration and calls [`run`].

pub mod cli;
pub mod config;
pub mod error;
pub mod fleet;
pub mod host;
pub mod jump_keys;
pub mod link;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod service;
pub mod status;
pub mod streams;

use std::sync::Arc;

use jumpgate_transport::tls::{self, ServerTrust};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::AgentConfig;
pub use error::AgentError;

use crate::config::Trust;
use crate::link::AgentShared;
use crate::metrics::AgentStats;
use crate::status::StatusBoard;

/// Builds the TLS client configuration from the configured trust.
fn connector(config: &AgentConfig) -> Result<TlsConnector, AgentError> {
    let trust = match &config.trust {
        Trust::Ca(path) => ServerTrust::Roots(tls::load_certs(path)?),
        Trust::Pins(pins) => ServerTrust::Pinned(pins.clone()),
    };
    let identity = match &config.client_identity {
        Some((cert, key)) => Some((tls::load_certs(cert)?, tls::load_key(key)?)),
        None => None,
    };
    Ok(TlsConnector::from(tls::client_config(trust, identity)?))
}

/// Runs the agent until `shutdown` fires (Ok) or every relay has refused it permanently (Err).
/// A relay that refuses it permanently while others remain only stops its own link.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let connector = connector(&config)?;
    if let Some(dir) = config.host.as_ref().and_then(|h| h.status_dir.as_ref()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            AgentError::Transient(format!(
                "cannot create the tunnel status directory {}: {e}",
                dir.display()
            ))
        })?;
    }
    let host = config
        .host
        .as_ref()
        .map(|h| Arc::new(host::Table::new(h.status_dir.clone())));
    let targets = match &host {
        Some(table) => streams::Targets::host(table.targets()),
        None => streams::Targets::own(
            config
                .services
                .iter()
                .map(|s| (s.name.clone(), streams::Target::from(s)))
                .collect(),
        ),
    };
    let status = Arc::new(StatusBoard::new(config.status_file.clone()));
    let stats = Arc::new(AgentStats::default());
    let metrics_stop = CancellationToken::new();
    let metrics_task = if let Some(addr) = config.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::Transient(format!("cannot serve metrics on {addr}: {e}")))?;
        tracing::info!("agent metrics on http://{addr}/metrics");
        Some(tokio::spawn(metrics::serve(
            listener,
            stats.clone(),
            status.clone(),
            metrics_stop.clone(),
        )))
    } else {
        None
    };
    tracing::info!(name = %config.name, relays = config.servers.len(), "worker agent starting");
    if let Some(proxy) = &config.proxy {
        tracing::info!("{}", proxy.describe());
    }
    let (static_tunnels, config_file) = config
        .host
        .as_ref()
        .map(|h| (h.tunnels.clone(), h.file.clone()))
        .unwrap_or_default();
    let shared = Arc::new(AgentShared {
        host: host.clone(),
        config,
        connector,
        targets,
        status,
        stats,
        members: Arc::default(),
        live_links: Default::default(),
    });
    let stop = shutdown.child_token();
    let tasks = TaskTracker::new();
    let mut api_task = None;
    if let (Some(table), Some(api)) = (&host, &shared.config.api) {
        let handle = host::HostHandle::new(table.clone());
        // Config errors of the operator's making (exit 64): a socket or state directory the
        // agent cannot use.
        let store = host::api::open_store(&api.state_dir).map_err(|e| {
            AgentError::Config(jumpgate_config::ConfigError::Invalid {
                key: "state_dir",
                detail: e,
            })
        })?;
        let listener = host::api::bind(api).map_err(|e| {
            AgentError::Config(jumpgate_config::ConfigError::Invalid {
                key: "api_socket",
                detail: e,
            })
        })?;
        let restored = host::api::restore(&handle, &store, &stop);
        tracing::info!(socket = %api.socket.display(), restored, "local API listening");
        let policy = host::api::Policy {
            own_uid: host::api::own_uid(),
            group: api.group.as_ref().map(|(_, gid)| *gid),
        };
        api_task = Some(tokio::spawn(host::api::serve(
            listener,
            handle,
            store,
            policy,
            stop.clone(),
        )));
    }
    if let Some(table) = &host {
        let handle = host::HostHandle::new(table.clone());
        tokio::spawn(table.clone().follow_fallbacks(stop.clone()));
        tokio::spawn(host::reload::watch(
            handle.clone(),
            config_file,
            static_tunnels.clone(),
            stop.clone(),
        ));
        // The config file's tunnels: added beside the links, each logging its own outcome.
        for spec in static_tunnels {
            let (handle, stop) = (handle.clone(), stop.clone());
            tokio::spawn(async move {
                let name = spec.name.clone();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    r = handle.add(spec) => if let Err(e) = r {
                        tracing::warn!(tunnel = %name, "{e}");
                    },
                }
            });
        }
    }
    jumpgate_daemon::sd_notify("READY=1");
    // Runs until shutdown, or until every relay has refused the agent for good.
    let outcome = fleet::run(shared.clone(), stop.clone(), &tasks).await;
    tasks.close();
    stop.cancel();
    // A second SIGTERM/SIGINT stops waiting for sessions to release their ports and connections.
    let hurry = jumpgate_daemon::signals::hurry();
    tokio::select! {
        () = tasks.wait() => {}
        _ = hurry.cancelled() => {
            tracing::warn!("not waiting for open connections any longer");
        }
    }
    metrics_stop.cancel();
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    if let Some(task) = api_task {
        let _ = task.await;
    }
    outcome
}
