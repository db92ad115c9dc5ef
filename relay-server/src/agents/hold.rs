//! What every registered session does first and last, an agent's and a host's tunnel's alike:
//! its ports are served, and in the end its hold on its name is given up. Below both the
//! session loop and host sessions, which both start and end sessions.

use std::sync::Arc;

use crate::users::ports::Attached;
use crate::webhook::Event;

use super::placement::PortSocket;
use super::registry::{AgentSession, ServiceEndpoint};
use super::Agents;

/// Serves a newly registered session's ports (an agent's or a tunnel's): their listeners are
/// kept by the relay and attached to the session, and the platform is told.
pub(crate) fn serve_ports(
    agent: &Arc<AgentSession>,
    ports: Vec<(ServiceEndpoint, Option<PortSocket>)>,
    agents: &Agents,
) {
    let config = &agents.config;
    for (service, socket) in ports {
        agents.webhooks.emit(Event::TunnelUp {
            agent: agent.name.to_string(),
            service: service.name.to_string(),
            host: config.public_host.clone(),
            port: service.port,
        });
        let Some(socket) = socket else {
            tracing::info!(
                "new tunnel [{}] {} via the router",
                agent.name,
                service.name
            );
            continue;
        };
        tracing::info!(host = %config.public_host, "new tunnel [{}] {} on :{}", agent.name, service.name, service.port);
        let (port, name) = (service.port, service.name.clone());
        let attached = Attached {
            agent: agent.clone(),
            service,
        };
        match socket {
            PortSocket::Fresh(listener) => {
                agents
                    .ports
                    .keep(listener, port, &agent.name, &name, Some(attached))
            }
            PortSocket::Kept => {
                if !agents.ports.attach(port, attached) {
                    tracing::warn!(port, "port {port} was closed while the session was placed; its users cannot reach it until the agent reconnects");
                }
            }
        }
    }
}

/// Ends a session's hold on its name (an agent's or a tunnel's): its ports stay bound but
/// detached, it leaves the registry, its leases start ageing, its credential slot is given back
/// and `finished` fires, so a takeover finds its ports free; the platform is told why.
pub(crate) async fn end_session(agent: &AgentSession, agents: &Agents, reason: &str) {
    agent.cancel.cancel();
    for service in &agent.services {
        agents.ports.detach(service.port, agent.id);
    }
    agents.registry.remove(&agent.name, agent.id);
    // Boxed: with PostgreSQL this is a transaction (4 KiB of future); inline, it would size the
    // session's future, held by every idle session, for a call made once at its end.
    Box::pin(agents.leases.deactivate(&agent.name)).await;
    drop(agent.slot.lock().unwrap_or_else(|p| p.into_inner()).take());
    agent.finished.cancel();
    for service in &agent.services {
        agents.webhooks.emit(Event::TunnelDown {
            agent: agent.name.to_string(),
            service: service.name.to_string(),
            port: service.port,
            reason: reason.to_string(),
        });
    }
}
