//! Serving: the accept loops of every listener until the shutdown token fires, then the drain
//! that lets user connections finish, ends the agent sessions, flushes the audit log and the
//! queued webhook events, and stops.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::RelayError;
use crate::{admin, agents, jump, users, ws};

use super::store::warn_if_ephemeral_overlap;
use super::Relay;

impl Relay {
    /// Serves agents until the shutdown token fires, then drains and stops.
    pub async fn serve(self) -> Result<(), RelayError> {
        let Relay {
            agents,
            operator,
            webhook,
            listener,
            admin,
            router,
            ws: ws_listener,
            jump,
            fingerprint,
            shards,
        } = self;
        let config = agents.config.clone();
        // Everything but the agent sessions, which the drain ends separately.
        let services = TaskTracker::new();
        let services_stop = CancellationToken::new();
        if let Some((router_listener, router)) = router {
            if let Ok(addr) = router_listener.local_addr() {
                tracing::info!("router listening for CONNECT requests on {addr}");
            }
            services.spawn(users::router::serve(router_listener, router));
        }
        if let Some((listener, jump)) = jump {
            services.spawn(jump::serve(listener, jump));
        }
        if let Some((admin_listener, token)) = admin {
            if let Ok(addr) = admin_listener.local_addr() {
                tracing::info!("admin API listening on {addr}");
            }
            services.spawn(admin::serve(
                admin_listener,
                operator,
                token,
                services_stop.clone(),
            ));
        }
        let addr = listener.local_addr().ok();
        tracing::info!(
            listen = ?addr,
            public_host = %config.public_host,
            port_range = %config.port_range,
            fingerprint = %fingerprint,
            advertise = %agents.fleet.itself().addr,
            "relay listening for agents"
        );
        if !config.peers.is_empty() {
            tracing::info!(peers = %config.peers.join(","), "static fleet members");
        }
        jumpgate_daemon::sd_notify("READY=1\nSTATUS=serving agents");
        services.spawn(agents.leases.clone().maintain(services_stop.clone()));
        services.spawn(agents.fleet.clone().run(services_stop.clone()));
        services.close();
        warn_if_ephemeral_overlap(config.port_range);

        // The WebSocket port hands its agents to the agent port's connection path, in process:
        // both stop accepting at shutdown, and their sessions drain together.
        let websocket = async {
            let Some(ws_listener) = ws_listener else {
                return;
            };
            if let Ok(addr) = ws_listener.local_addr() {
                tracing::info!(
                    "agents accepted as WebSocket on http://{addr}{}",
                    config.ws_path
                );
            }
            let endpoint = ws::Endpoint {
                path: config.ws_path.as_str().into(),
                trusted: config.ws_trusted_proxies.as_slice().into(),
            };
            ws::serve(ws_listener, endpoint, agents.clone(), shards.as_ref()).await;
        };
        tokio::join!(
            agents::accept(agents.clone(), listener, shards.as_ref()),
            websocket
        );
        jumpgate_daemon::sd_notify("STOPPING=1\nSTATUS=draining");

        tracing::info!(
            drain = ?config.drain_timeout,
            "no longer accepting; draining open connections"
        );
        // A second SIGTERM/SIGINT (`hurry`) cuts the waits short; the audit log is still flushed.
        let hurry = jumpgate_daemon::signals::hurry();
        let users = &agents.users;
        users.conns.close();
        tokio::select! {
            drained = tokio::time::timeout(config.drain_timeout, users.conns.wait()) => {
                if drained.is_err() {
                    tracing::info!("drain period over; closing remaining connections");
                }
            }
            _ = hurry.cancelled() => tracing::warn!("drain cut short; closing remaining connections"),
        }
        agents.close_sessions.cancel();
        agents.tasks.close();
        tokio::select! {
            closed = tokio::time::timeout(Duration::from_secs(10), agents.tasks.wait()) => {
                if closed.is_err() {
                    tracing::warn!("some agent sessions did not close within 10s");
                }
            }
            _ = hurry.cancelled() => {}
        }
        // Connections cut with their sessions end at once; give them a moment to be audited.
        let _ = tokio::time::timeout(Duration::from_secs(1), users.conns.wait()).await;
        // The lease file's final write, the admin API and the router end here, and the kept
        // ports are closed.
        services_stop.cancel();
        services.wait().await;
        agents.ports.tasks.close();
        agents.ports.tasks.wait().await;
        users.audit.close().await;
        // Let queued webhook events go out for a few seconds, then stop retrying.
        agents.webhooks.close();
        if let (stop, Some(mut task)) = webhook {
            let sent = tokio::select! {
                sent = tokio::time::timeout(Duration::from_secs(5), &mut task) => sent.is_ok(),
                _ = hurry.cancelled() => false,
            };
            if !sent {
                tracing::warn!("webhook events still queued at shutdown are dropped");
                stop.cancel();
                let _ = task.await;
            }
        }
        if let Some(shards) = shards {
            shards.stop().await;
        }
        tracing::info!("relay stopped");
        Ok(())
    }
}
