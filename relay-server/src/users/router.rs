//! Name routing: an HTTP CONNECT listener that reaches an agent's service by name instead of by
//! port, so the jump host needs one open port however many jobs run.
//!
//! The rule for `CONNECT HOST:PORT`:
//! 1. `HOST` is a connected agent's name: its service whose local target port is `PORT`
//!    (`vh-exec-123:22` reaches the agent's sshd).
//! 2. Otherwise `HOST` is `SERVICE.AGENT`: that agent's service by name; `PORT` is ignored
//!    (`ssh.vh-exec-123:0`).
//!
//! Users need only OpenSSH and netcat:
//! `ssh -o ProxyCommand='nc -X connect -x relay:7443 %h %p' user@vh-exec-123`.
//! Unknown names, disconnected agents and malformed requests get an HTTP status and a one-line
//! reason; the same allowlists, limits and audit log apply as on allocated ports.
//!
//! Users here are unauthenticated, so the router gives them as little as it can: an address
//! outside the relay's allowlist is answered at accept, before its head is read; one source
//! address (an IPv6 /64) holds at most a share of the slots for unfinished heads; a name is
//! looked up only among this relay's live sessions (no store round trip, and "unknown" reads
//! the same as "not connected now"); and what went wrong on the agent's side is logged, not
//! told.
//!
//! - [`head`]: reading the CONNECT request head.
//! - [`names`]: the live session and service a target names.

mod head;
mod names;

pub(crate) use names::resolve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use jumpgate_proto::Cidr;

use crate::agents::registry::Registry;
use crate::guard::{PerSource, SourceSlot};
use crate::net::{accept_backoff, rate_limited_warn};

use super::carry::spawn_carry;
use super::{http_status, Greeting, Users};

use self::head::read_head;

/// After a failure answer: how long to read and discard input before closing (see [`fail`]).
const LINGER: Duration = Duration::from_secs(1);
/// After a failure answer: how many input bytes at most to read and discard before closing.
const LINGER_BYTES: usize = 64 * 1024;
/// Most connections from outside the allowlist answered at once (with a [`LINGER`]) at a time.
const MAX_LINGERING_REFUSALS: usize = 256;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the router needs: the public side, to admit and carry, and where names are looked up.
pub(crate) struct Router {
    /// Admission and carrying, as on allocated ports.
    pub users: Arc<Users>,
    /// Live agents by name.
    pub registry: Arc<Registry>,
    /// Caps connections that have not finished their request head.
    pub heads: Arc<Semaphore>,
    /// Caps unfinished heads per source address (IPv6: /64), so one address cannot take
    /// every head slot and lock everybody else out.
    pub heads_per_source: Arc<PerSource>,
    /// Most unfinished heads one source may hold: [`share_per_source`] of the head cap.
    pub max_heads_per_source: usize,
}

/// One source's share of `heads` slots for unfinished request heads: an eighth, at least one,
/// at most 128 (the agent port allows a quarter), so at least eight sources must collude to fill the cap
/// while a NAT full of developers still opens many connections at once (a head takes one
/// round trip).
pub(crate) fn share_per_source(heads: usize) -> usize {
    (heads / 8).clamp(1, 128)
}

/// A connection's places among unfinished heads: globally and for its source.
struct HeadSlot {
    _global: OwnedSemaphorePermit,
    _source: SourceSlot,
}

/// Accepts CONNECT requests until shutdown.
pub(crate) async fn serve(listener: TcpListener, router: Arc<Router>) {
    let refusals = Arc::new(Semaphore::new(MAX_LINGERING_REFUSALS));
    loop {
        let accepted = tokio::select! {
            _ = router.users.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let allow = &router.users.policy.current().users.allow;
                if !Cidr::allows(allow, peer.ip()) {
                    // Answered without reading anything: the allowlist costs no head slot.
                    router
                        .users
                        .metrics
                        .refused(crate::metrics::RefusedBy::Allowlist);
                    let refused = (
                        "403 Forbidden",
                        "source address not in the relay's allowlist".to_string(),
                    );
                    // Answered and closed gently while few are; past that, closed at once, so a
                    // flood from outside the allowlist cannot pile up lingering tasks.
                    if let Ok(lingering) = refusals.clone().try_acquire_owned() {
                        router.users.conns.spawn(async move {
                            let mut tcp = tcp;
                            fail(&mut tcp, peer, refused).await;
                            drop(lingering);
                        });
                    }
                    continue;
                }
                let Some(source) = router
                    .heads_per_source
                    .try_take(peer.ip(), router.max_heads_per_source)
                else {
                    rate_limited_warn(
                        "router heads per source",
                        || tracing::warn!(%peer, "router: too many unfinished requests from {}; closing its new connections", peer.ip()),
                    );
                    continue;
                };
                let Ok(global) = router.heads.clone().try_acquire_owned() else {
                    rate_limited_warn(
                        "router heads",
                        || tracing::warn!(%peer, "router: too many unfinished requests; closing new connections"),
                    );
                    continue;
                };
                let slot = HeadSlot {
                    _global: global,
                    _source: source,
                };
                let task = route(tcp, peer, router.clone(), slot);
                router.users.conns.spawn(task);
            }
            Err(e) => accept_backoff("router port", e).await,
        }
    }
}

/// A routing failure: status line and reason.
pub(crate) type Failure = (&'static str, String);

async fn route(mut tcp: TcpStream, peer: SocketAddr, router: Arc<Router>, permit: HeadSlot) {
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut tcp)).await;
    // The head is read: failures below are answered without holding a head slot.
    drop(permit);
    let target = match head {
        Ok(Ok(target)) => target,
        Ok(Err(f)) => return fail(&mut tcp, peer, f).await,
        Err(_) => {
            return fail(
                &mut tcp,
                peer,
                ("408 Request Timeout", "no request head within 10s".into()),
            )
            .await
        }
    };
    let (agent, service) = match resolve(&router.registry, &target) {
        Ok(found) => found,
        Err(f) => return fail(&mut tcp, peer, f).await,
    };
    let users = &router.users;
    match users.admit(peer, &agent.name, &agent.permits, &service) {
        Ok(admitted) => spawn_carry(
            tcp,
            peer,
            admitted,
            &agent,
            &service,
            users,
            Greeting::HttpConnect,
        ),
        Err(refused) => fail(&mut tcp, peer, (refused.http_status, refused.why.into())).await,
    }
}

/// Answers a failed request and closes the connection gently: after the answer, the write side
/// is shut and unread input (the rest of an oversized head, bytes sent behind the head) is read
/// and discarded for a moment. Closing a socket with unread input sends a reset, and a reset
/// can destroy the answer before the client has read it.
async fn fail(tcp: &mut TcpStream, peer: SocketAddr, (status, why): Failure) {
    tracing::info!(%peer, "router: {status}: {why}");
    http_status(tcp, Greeting::HttpConnect, status, &why).await;
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left = LINGER_BYTES;
    let drain = async {
        while left > 0 {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests;
