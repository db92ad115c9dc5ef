//! A listener per allocated port: every connection is admitted, then carried to the port's agent.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::agents::registry::{AgentSession, ServiceEndpoint};
use crate::net::accept_backoff;

use super::carry::spawn_carry;
use super::{Greeting, Users};

/// Accepts users on one allocated port until the session ends or the relay shuts down.
pub(crate) async fn serve_port(
    listener: TcpListener,
    agent: Arc<AgentSession>,
    service: ServiceEndpoint,
    users: Arc<Users>,
) {
    loop {
        let accepted = tokio::select! {
            _ = agent.cancel.cancelled() => return,
            _ = users.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                // A refused connection is dropped here, which closes it.
                if let Ok(admitted) = users.admit(peer, &agent.name, &agent.permits, &service) {
                    spawn_carry(
                        tcp,
                        peer,
                        admitted,
                        &agent,
                        &service,
                        &users,
                        Greeting::None,
                    );
                }
            }
            Err(e) => accept_backoff("allocated port", e).await,
        }
    }
}
