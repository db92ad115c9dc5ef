//! The relay's listeners, bound at start before the layers are built: a port that is taken
//! fails the start with the listener's name, before the lease store is opened or anything runs.

use tokio::net::TcpListener;

use crate::error::Listener;
use crate::{RelayConfig, RelayError};

/// The ports the configuration asks for, bound and not yet accepting.
pub(super) struct Listeners {
    /// The agent port (always on).
    pub agent: TcpListener,
    /// The admin API, with its bearer token when `admin_token_file` is set.
    pub admin: Option<(TcpListener, Option<jumpgate_proto::Secret>)>,
    /// The HTTP CONNECT name router.
    pub router: Option<TcpListener>,
    /// The WebSocket port for agents behind an HTTP ingress.
    pub ws: Option<TcpListener>,
}

/// Binds the agent port, then the admin API (reading its token file), the router and the
/// WebSocket port, in that order.
pub(super) async fn bind(config: &RelayConfig) -> Result<Listeners, RelayError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(RelayError::bind(config.listen, Listener::AgentPort))?;
    let admin = match config.admin {
        Some(addr) => {
            let token = match &config.admin_token_file {
                Some(path) => Some(jumpgate_config::read_secret_file(path, true)?),
                None => None,
            };
            let listener = TcpListener::bind(addr)
                .await
                .map_err(RelayError::bind(addr, Listener::Admin))?;
            Some((listener, token))
        }
        None => None,
    };
    let router_listener = match config.router_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(RelayError::bind(addr, Listener::Router))?,
        ),
        None => None,
    };
    let ws = match config.ws_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(RelayError::bind(addr, Listener::WebSocket))?,
        ),
        None => None,
    };
    Ok(Listeners {
        agent: listener,
        admin,
        router: router_listener,
        ws,
    })
}
