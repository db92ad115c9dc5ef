//! Agents over WebSocket (`ws_listen`, issue 24): for workers whose network passes only HTTP(S),
//! with the relay behind an ingress or L7 load balancer that carries WebSocket.
//!
//! A separate listener rather than sniffing the agent port: the agent port stays raw TLS that no
//! HTTP parser touches, and an ingress is pointed at its own port. Each upgraded connection is
//! bridged to the relay's own agent port on loopback, so inside the WebSocket runs the same TLS +
//! yamux session as on the agent port, with the same handshake limits, timeouts and policy, and
//! the relay's certificate is verified by the agent end to end even when the ingress terminates
//! the outer TLS.
//!
//! Hostile input meets the same kind of limits as the TLS port: at most
//! [`MAX_UPGRADES`] upgrades in progress (beyond that new connections are closed at once), each
//! bounded by the handshake timeout and by tungstenite's request-size limit, a wrong path
//! answered 404, frames and messages capped at [`jumpgate_transport::ws::MAX_MESSAGE`]. Because
//! every WebSocket agent reaches the agent port from loopback, the agent port's per-address
//! limits and bans see loopback: list `127.0.0.1/32` in `ban_exempt_cidr` so a guesser on the
//! WebSocket port cannot ban the workers using it (docs/operations.md, "Relay behind an
//! ingress").

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use jumpgate_transport::ws::tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request, Response,
};
use jumpgate_transport::ws::tokio_tungstenite::tungstenite::http::StatusCode;
use jumpgate_transport::ws::{self, tokio_tungstenite, WsIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// WebSocket upgrades in progress at most; connections beyond are closed at once.
pub const MAX_UPGRADES: usize = 256;

/// Where the WebSocket endpoint sends upgraded connections: the agent port, on loopback when it
/// listens on every address.
pub fn agent_port_target(agent_listen: SocketAddr) -> SocketAddr {
    let ip = match agent_listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, agent_listen.port())
}

/// Serves WebSocket agents on `listener` at `path` until `stop` fires, bridging each to
/// `agent_port`; an upgrade must complete within `timeout`.
pub async fn serve(
    listener: TcpListener,
    path: Arc<str>,
    agent_port: SocketAddr,
    timeout: Duration,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let upgrades = Arc::new(Semaphore::new(MAX_UPGRADES));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(ok) => ok,
                Err(e) => {
                    tracing::warn!("WebSocket port: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = upgrades.clone().try_acquire_owned() else {
            crate_rate_limited_warn();
            continue;
        };
        let path = path.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let _ = tcp.set_nodelay(true);
            let upgrade = tokio_tungstenite::accept_hdr_async_with_config(
                tcp,
                PathCheck(&path),
                Some(ws::config()),
            );
            let socket = match tokio::time::timeout(timeout, upgrade).await {
                Err(_) => {
                    tracing::debug!(%peer, "WebSocket upgrade not complete within {timeout:?}; closed");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "WebSocket upgrade failed: {e}");
                    return;
                }
                Ok(Ok(socket)) => socket,
            };
            drop(slot);
            let mut inner = match TcpStream::connect(agent_port).await {
                Ok(inner) => inner,
                Err(e) => {
                    tracing::warn!(%peer, "WebSocket agent: cannot reach the agent port {agent_port}: {e}");
                    return;
                }
            };
            let _ = inner.set_nodelay(true);
            let mut outer = WsIo::new(socket);
            tokio::select! {
                _ = stop.cancelled() => {}
                r = tokio::io::copy_bidirectional(&mut outer, &mut inner) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "WebSocket agent connection ended: {e}");
                    }
                }
            }
        });
    }
}

/// Warns at most once a minute that upgrades are being shed.
fn crate_rate_limited_warn() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            "too many WebSocket upgrades in progress ({MAX_UPGRADES}); closing new connections"
        );
    }
}

/// Accepts the upgrade only at the configured path.
struct PathCheck<'a>(&'a str);

impl tokio_tungstenite::tungstenite::handshake::server::Callback for PathCheck<'_> {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        if request.uri().path() == self.0 {
            return Ok(response);
        }
        let mut refusal = ErrorResponse::new(Some("no jumpgate endpoint at this path\n".into()));
        *refusal.status_mut() = StatusCode::NOT_FOUND;
        Err(refusal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_agent_address_is_reached_on_loopback() {
        assert_eq!(
            agent_port_target("0.0.0.0:7000".parse().unwrap()),
            "127.0.0.1:7000".parse().unwrap()
        );
        assert_eq!(
            agent_port_target("[::]:7000".parse().unwrap()),
            "[::1]:7000".parse().unwrap()
        );
        assert_eq!(
            agent_port_target("10.1.2.3:7000".parse().unwrap()),
            "10.1.2.3:7000".parse().unwrap()
        );
    }
}
