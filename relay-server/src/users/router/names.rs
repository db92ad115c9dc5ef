//! Name lookup for the router (and the jump listener, which follows the same rule): which live
//! session and service a `HOST:PORT` target names.

use std::sync::Arc;

use crate::agents::registry::{AgentSession, Registry, ServiceEndpoint};

use super::Failure;

/// Finds the agent session and service a CONNECT target names, among this relay's live
/// sessions only: an unauthenticated user costs no store round trip, and learns nothing about
/// names that are not connected here (unknown and away read the same).
pub(crate) fn resolve(
    registry: &Registry,
    target: &str,
) -> Result<(Arc<AgentSession>, ServiceEndpoint), Failure> {
    let bad = || ("400 Bad Request", format!("{target:?} is not HOST:PORT"));
    let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if let Some(agent) = registry.get(host) {
        let service = agent
            .services
            .iter()
            .find(|s| s.target_port == port)
            .cloned();
        return match service {
            Some(s) => Ok((agent, s)),
            None => Err((
                "404 Not Found",
                format!("agent {host:?} has no service on port {port}; use SERVICE.{host}:0 to pick one by name"),
            )),
        };
    }
    if let Some((service_name, agent_name)) = host.split_once('.') {
        if let Some(agent) = registry.get(agent_name) {
            let service = agent
                .services
                .iter()
                .find(|s| &*s.name == service_name)
                .cloned();
            return match service {
                Some(s) => Ok((agent, s)),
                None => Err((
                    "404 Not Found",
                    format!("agent {agent_name:?} has no service named {service_name:?}"),
                )),
            };
        }
    }
    Err((
        "404 Not Found",
        format!("no agent named {host:?} is connected to this relay"),
    ))
}
