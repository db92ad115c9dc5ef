//! The jump port's accept loop and one connection's life: who is closed at accept (outside the
//! allowlist, banned, over a cap), the deadline to authenticate, and the ban a connection that
//! never authenticates counts towards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jumpgate_proto::Cidr;
use russh::Disconnect;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::guard::SourceSlot;
use crate::net::{accept_backoff, rate_limited_warn};

use super::handler::Conn;
use super::Jump;

/// Time from accept to a successful authentication.
pub(crate) const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// An unauthenticated connection's places in the caps, given back once it authenticates.
struct HandshakeSlot {
    _global: OwnedSemaphorePermit,
    _source: SourceSlot,
}

/// Accepts jump connections until shutdown.
pub(crate) async fn serve(listener: TcpListener, jump: Arc<Jump>) {
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    loop {
        let accepted = tokio::select! {
            _ = jump.users.shutdown.cancelled() => return,
            _ = sweep.tick() => {
                jump.guard.sweep(Instant::now());
                continue;
            }
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_backoff("jump port", e).await;
                continue;
            }
        };
        if !Cidr::allows(&jump.users.policy.current().users.allow, peer.ip()) {
            jump.users
                .metrics
                .refused(crate::metrics::RefusedBy::Allowlist);
            continue;
        }
        // `ban_exempt_cidr` (live, as on the agent port) spares addresses from bans.
        let exempt = |ip| {
            jump.users
                .policy
                .current()
                .ban_exempt
                .iter()
                .any(|c: &Cidr| c.contains(ip))
        };
        if jump.guard.is_banned(peer.ip(), Instant::now()) && !exempt(peer.ip()) {
            rate_limited_warn(
                "jump banned",
                || tracing::warn!(%peer, "jump: closing a connection from banned {}", peer.ip()),
            );
            continue;
        }
        let Some(source) = jump.per_source.try_take(peer.ip(), jump.max_per_source) else {
            rate_limited_warn(
                "jump handshakes per source",
                || tracing::warn!(%peer, "jump: too many unauthenticated connections from {}; closing its new ones", peer.ip()),
            );
            continue;
        };
        let Ok(global) = jump.handshakes.clone().try_acquire_owned() else {
            rate_limited_warn(
                "jump handshakes",
                || tracing::warn!(%peer, "jump: too many unauthenticated connections; closing new ones"),
            );
            continue;
        };
        let slot = HandshakeSlot {
            _global: global,
            _source: source,
        };
        jump.users
            .conns
            .spawn(connection(tcp, peer, jump.clone(), slot));
    }
}

/// Runs one SSH connection: authentication within [`AUTH_TIMEOUT`] while holding `slot`, then
/// until the client leaves or the relay closes.
async fn connection(tcp: TcpStream, peer: SocketAddr, jump: Arc<Jump>, slot: HandshakeSlot) {
    let _ = tcp.set_nodelay(true);
    let (authed_tx, authed_rx) = oneshot::channel();
    let rejected = Arc::new(AtomicU32::new(0));
    let handler = Conn {
        jump: jump.clone(),
        peer,
        user: None,
        credential: None,
        authed: Some(authed_tx),
        rejected: rejected.clone(),
    };
    // Counts a connection that ends unauthenticated towards a ban of its source: one that was
    // refused a key as a failure, a silent or slow one as a timeout (forgiven up to a point).
    let unauthenticated = |timed_out: bool| {
        let now = Instant::now();
        let banned = if rejected.load(Ordering::Relaxed) > 0 {
            jump.guard.record_failure(peer.ip(), now)
        } else if timed_out {
            jump.guard.record_timeout(peer.ip(), now)
        } else {
            None
        };
        if let Some(ban) = banned {
            tracing::warn!(%peer, "jump: banning {} for {ban:?} after repeated failed authentications", peer.ip());
        }
    };
    let deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
    let started = tokio::time::timeout_at(
        deadline,
        russh::server::run_stream(jump.ssh(), tcp, handler),
    )
    .await;
    let session = match started {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            unauthenticated(false);
            return tracing::debug!(%peer, "jump: handshake failed: {e}");
        }
        Err(_) => {
            unauthenticated(true);
            return tracing::debug!(%peer, "jump: no SSH banner within {AUTH_TIMEOUT:?}");
        }
    };
    let handle = session.handle();
    let mut session = std::pin::pin!(session);
    tokio::select! {
        ended = &mut session => {
            if let Err(e) = ended {
                tracing::debug!(%peer, "jump: connection ended before authentication: {e}");
            }
            unauthenticated(false);
            return;
        }
        authed = tokio::time::timeout_at(deadline, authed_rx) => {
            // The handler is gone: the connection ended before authenticating.
            if matches!(authed, Ok(Err(_))) {
                unauthenticated(false);
                return;
            }
            if authed.is_err() {
                unauthenticated(true);
                tracing::info!(%peer, "jump: no authentication within {AUTH_TIMEOUT:?}; closing");
                let _ = handle
                    .disconnect(
                        Disconnect::ByApplication,
                        format!("authenticate within {AUTH_TIMEOUT:?}"),
                        String::new(),
                    )
                    .await;
                return;
            }
        }
    }
    drop(slot);
    tokio::select! {
        ended = &mut session => {
            if let Err(e) = ended {
                tracing::debug!(%peer, "jump: connection ended: {e}");
            }
        }
        _ = jump.users.close.cancelled() => {
            let _ = handle
                .disconnect(Disconnect::ByApplication, "the relay is shutting down".into(), String::new())
                .await;
        }
    }
}
