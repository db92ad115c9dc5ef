//! Agents over WebSocket (`ws_listen`, issue 24): for workers whose network passes only HTTP(S),
//! with the relay behind an ingress or L7 load balancer that carries WebSocket.
//!
//! A separate listener rather than sniffing the agent port: the agent port stays raw TLS that no
//! HTTP parser touches, and an ingress is pointed at its own port. Each upgraded connection is
//! handed, in process, to the agent port's own connection path
//! ([`agents::serve_connection`]): inside the WebSocket runs the same TLS + yamux session as on
//! the agent port, with the same handshake limits, timeouts, bans and policy, and the relay's
//! certificate is verified by the agent end to end even when the ingress terminates the outer
//! TLS.
//!
//! The address those limits, bans, allow lists, audit lines and the admin API see is the
//! client's: the TCP peer, or, when the TCP peer is an ingress listed in `ws_trusted_proxies`,
//! the client it names in `Forwarded: for=` or `X-Forwarded-For` (the right-most address not
//! itself trusted; [`jumpgate_transport::ws::forwarded_client`]). A header that does not parse
//! leaves the TCP peer (logged at debug, once per connection). A peer outside
//! `ws_trusted_proxies` cannot name another address: its headers are ignored.
//!
//! Hostile input meets the same limits as the TLS port: a banned address, or one already holding
//! its share of the handshakes in progress, is closed at accept (for an ingress, once the
//! upgrade named the client); at most [`MAX_UPGRADES`] upgrades in progress (beyond that new
//! connections are closed at once), each bounded by the handshake timeout and by tungstenite's
//! request-size limit, a wrong path answered 404, frames and messages capped at
//! [`jumpgate_transport::ws::MAX_MESSAGE`]. A failed upgrade (a wrong path, not an upgrade, a bad
//! key, garbage, a timeout) and garbage inside the WebSocket (a failed TLS handshake, a bad hello)
//! count towards a ban of the client's address as a failed handshake on the agent port does;
//! behind a trusted ingress, of the client it names (never the ingress's own address).
//! Sessions run on the session threads ([`Shards`]) like the agent port's.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use jumpgate_proto::Cidr;
use jumpgate_transport::ws::tokio_tungstenite::tungstenite;
use jumpgate_transport::ws::tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request, Response,
};
use jumpgate_transport::ws::tokio_tungstenite::tungstenite::http::{HeaderMap, StatusCode};
use jumpgate_transport::ws::{self, tokio_tungstenite, WsIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::agents::io::AgentIo;
use crate::agents::{self, Agents, HandshakeSlot};
use crate::net::accept_backoff;
use crate::shards::Shards;

/// WebSocket upgrades in progress at most; connections beyond are closed at once.
pub const MAX_UPGRADES: usize = 256;

/// What the WebSocket endpoint needs besides the agent port's state.
pub(crate) struct Endpoint {
    /// The URL path agents upgrade at.
    pub path: Arc<str>,
    /// Ingresses whose forwarding headers are believed.
    pub trusted: Arc<[Cidr]>,
}

/// Serves WebSocket agents on `listener` until the agent port stops accepting (shutdown); each
/// upgraded connection becomes an agent connection like the agent port's, on `shards` when
/// there are any.
pub(crate) async fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    agents: Arc<Agents>,
    shards: Option<&Shards>,
) {
    let upgrades = Arc::new(Semaphore::new(MAX_UPGRADES));
    let endpoint = Arc::new(endpoint);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = agents.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(ok) => ok,
                Err(e) => {
                    accept_backoff("WebSocket port", e).await;
                    continue;
                }
            },
        };
        let via_proxy = trusted(&endpoint.trusted, peer.ip());
        // A direct client is known now: its bans and handshake share apply before any HTTP or
        // TLS work. Behind an ingress they wait for the address the upgrade names.
        let slot = if via_proxy {
            None
        } else {
            match agents::take_handshake_slot(&agents, peer) {
                Some(slot) => Some(slot),
                None => continue,
            }
        };
        let Ok(upgrade) = upgrades.clone().try_acquire_owned() else {
            crate_rate_limited_warn();
            continue;
        };
        let connection = {
            let (agents, endpoint) = (agents.clone(), endpoint.clone());
            move |tcp: TcpStream| async move {
                let Some((socket, client, slot)) =
                    upgraded(tcp, peer, slot, &endpoint, &agents).await
                else {
                    return;
                };
                drop(upgrade);
                let io = AgentIo::Ws(Box::new(WsIo::new(socket)));
                agents::serve_connection(io, client, agents, slot).await;
            }
        };
        match shards {
            Some(shards) => shards.spawn(&agents.tasks, tcp, connection),
            None => {
                agents.tasks.spawn(connection(tcp));
            }
        }
    }
}

/// Whether `ip` is an ingress listed in `ws_trusted_proxies`.
fn trusted(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

/// The WebSocket upgrade, within the handshake timeout: the socket, the client's address and
/// its handshake slot (taken now for a client behind a trusted ingress). `None` when the
/// upgrade failed or the client may not start a handshake (logged).
async fn upgraded(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Option<HandshakeSlot>,
    endpoint: &Endpoint,
    agents: &Agents,
) -> Option<(
    tokio_tungstenite::WebSocketStream<TcpStream>,
    SocketAddr,
    HandshakeSlot,
)> {
    let _ = tcp.set_nodelay(true);
    let timeout = agents.config.handshake_timeout;
    let mut headers = None;
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(
        tcp,
        Upgrade {
            path: &endpoint.path,
            headers: slot.is_none().then_some(&mut headers),
        },
        Some(ws::config()),
    );
    let upgraded = tokio::time::timeout(timeout, upgrade).await;
    // Who sent it: the TCP peer, or the client a trusted ingress named (known once the request
    // head was read; `None` when it could not be).
    let client = match &slot {
        Some(_) => Some(peer),
        None => headers
            .as_ref()
            .map(|h| client_address(peer, h, &endpoint.trusted)),
    };
    let socket = match upgraded {
        Err(_) => {
            tracing::debug!(%peer, "WebSocket upgrade not complete within {timeout:?}; closed");
            count_failed_upgrade(agents, client, &endpoint.trusted, true);
            return None;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, "WebSocket upgrade failed: {e}");
            // A connection closed before its request was complete (a TCP health check) is
            // not guessing; everything else is garbage on an agent endpoint.
            let incomplete = matches!(
                e,
                tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::HandshakeIncomplete
                )
            );
            if !incomplete {
                count_failed_upgrade(agents, client, &endpoint.trusted, false);
            }
            return None;
        }
        Ok(Ok(socket)) => socket,
    };
    let client = client.unwrap_or(peer);
    let slot = match slot {
        Some(slot) => slot,
        None => agents::take_handshake_slot(agents, client)?,
    };
    Some((socket, client, slot))
}

/// Counts a failed WebSocket upgrade (a wrong path, not an upgrade, a bad key, garbage; a
/// timeout as the agent port counts one) towards a ban of the client's address, as a failed
/// agent handshake does. The address of a trusted ingress itself is never counted: all its
/// clients would be banned with it, so when it named no client (or the request was too broken
/// to read who it forwards for) nobody is.
fn count_failed_upgrade(
    agents: &Agents,
    client: Option<SocketAddr>,
    trusted_list: &[Cidr],
    timed_out: bool,
) {
    let Some(ip) = client.map(|c| c.ip()) else {
        return;
    };
    let exempt = agents
        .policy
        .current()
        .ban_exempt
        .iter()
        .any(|c| c.contains(ip));
    if exempt || trusted(trusted_list, ip) {
        return;
    }
    let now = std::time::Instant::now();
    let ban = if timed_out {
        agents.guard.record_timeout(ip, now)
    } else {
        agents.guard.record_failure(ip, now)
    };
    if let Some(ban) = ban {
        tracing::warn!(
            %ip,
            "banning {ip} for {ban:?} after {} failed agent handshakes or WebSocket upgrades within a minute \
             (IPv6: its /64); exempt an address with ban_exempt_cidr",
            agents.config.auth_failure_limit,
        );
    }
}

/// The client a trusted ingress at `peer` connected for (port 0: not known past a proxy), or
/// `peer` itself when the request names none or names it in a way that does not parse.
fn client_address(peer: SocketAddr, headers: &HeaderMap, trusted_list: &[Cidr]) -> SocketAddr {
    let named = ws::forwarded_client(
        headers.get_all("forwarded").iter().map(|v| v.as_bytes()),
        headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes()),
        |ip| trusted(trusted_list, ip),
    );
    match named {
        Ok(Some(ip)) => SocketAddr::new(ip, 0),
        Ok(None) => {
            tracing::debug!(%peer, "the trusted proxy named no client (no Forwarded or X-Forwarded-For); taking the proxy's address");
            peer
        }
        Err(why) => {
            tracing::debug!(%peer, "the trusted proxy's forwarding header has {why}; taking the proxy's address");
            peer
        }
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

/// Accepts the upgrade only at the configured path; keeps the request's headers when asked
/// (a connection from a trusted ingress, to read who it forwards for).
struct Upgrade<'a> {
    path: &'a str,
    headers: Option<&'a mut Option<HeaderMap>>,
}

impl tokio_tungstenite::tungstenite::handshake::server::Callback for Upgrade<'_> {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        // Kept also for a refused request: a failure counts against the client it names.
        if let Some(headers) = self.headers {
            *headers = Some(request.headers().clone());
        }
        if request.uri().path() == self.path {
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

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn a_trusted_ingress_names_the_client_and_bad_headers_leave_the_ingress() {
        let ingress: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let trusted: Vec<Cidr> = vec!["10.0.0.0/24".parse().unwrap()];
        let named = client_address(
            ingress,
            &headers(&[("x-forwarded-for", "6.6.6.6, 192.0.2.9")]),
            &trusted,
        );
        assert_eq!(named, "192.0.2.9:0".parse().unwrap());
        let forwarded = client_address(
            ingress,
            &headers(&[("forwarded", "for=192.0.2.10;proto=https")]),
            &trusted,
        );
        assert_eq!(forwarded, "192.0.2.10:0".parse().unwrap());
        for bad in [
            &[("x-forwarded-for", "not-an-ip")][..],
            &[("forwarded", "for=unknown")],
            &[],
        ] {
            assert_eq!(client_address(ingress, &headers(bad), &trusted), ingress);
        }
    }
}
