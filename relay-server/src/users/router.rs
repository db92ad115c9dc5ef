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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::agents::registry::{AgentSession, Registry, ServiceEndpoint};
use crate::leases::LeaseStore;
use crate::net::accept_backoff;

use super::carry::spawn_carry;
use super::{http_status, Greeting, Users};

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the router needs: the public side, to admit and carry, and where names are looked up.
pub(crate) struct Router {
    /// Admission and carrying, as on allocated ports.
    pub users: Arc<Users>,
    /// Live agents by name.
    pub registry: Arc<Registry>,
    /// Leases, to tell "not connected right now" from "unknown".
    pub leases: Arc<LeaseStore>,
    /// Caps connections that have not finished their request head.
    pub heads: Arc<Semaphore>,
}

/// Accepts CONNECT requests until shutdown.
pub(crate) async fn serve(listener: TcpListener, router: Arc<Router>) {
    loop {
        let accepted = tokio::select! {
            _ = router.users.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Ok(permit) = router.heads.clone().try_acquire_owned() else {
                    continue;
                };
                let task = route(tcp, peer, router.clone(), permit);
                router.users.conns.spawn(task);
            }
            Err(e) => accept_backoff("router port", e).await,
        }
    }
}

/// A routing failure: status line and reason.
type Failure = (&'static str, String);

async fn route(
    mut tcp: TcpStream,
    peer: SocketAddr,
    router: Arc<Router>,
    permit: OwnedSemaphorePermit,
) {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut tcp)).await {
        Ok(Ok(head)) => head,
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
    drop(permit);
    let target = head;
    let (agent, service) = match resolve(&router.registry, &router.leases, &target) {
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

async fn fail(tcp: &mut TcpStream, peer: SocketAddr, (status, why): Failure) {
    tracing::info!(%peer, "router: {status}: {why}");
    http_status(tcp, Greeting::HttpConnect, status, &why).await;
}

/// Reads the request head and returns the CONNECT target.
async fn read_head(tcp: &mut TcpStream) -> Result<String, Failure> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    // Byte by byte: nothing past the head is consumed, so bytes sent early stay in the socket.
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= MAX_HEAD {
            return Err((
                "431 Request Header Fields Too Large",
                format!("request head over {MAX_HEAD} bytes"),
            ));
        }
        match tcp.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => {
                return Err((
                    "400 Bad Request",
                    "connection closed before the request head ended".into(),
                ))
            }
        }
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    match (method, target, version) {
        (Some("CONNECT"), Some(target), Some(v)) if v.starts_with("HTTP/1.") => {
            Ok(target.to_string())
        }
        (Some(m), Some(_), Some(_)) if m != "CONNECT" => Err((
            "405 Method Not Allowed",
            format!("only CONNECT is supported here, not {m}"),
        )),
        _ => Err((
            "400 Bad Request",
            "expected `CONNECT agent:port HTTP/1.1`".into(),
        )),
    }
}

/// Finds the agent session and service a CONNECT target names.
fn resolve(
    registry: &Registry,
    leases: &LeaseStore,
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
    if leases.knows_agent(host) {
        Err((
            "503 Service Unavailable",
            format!("agent {host:?} is not connected right now"),
        ))
    } else {
        Err((
            "404 Not Found",
            format!("no agent named {host:?} is connected to this relay"),
        ))
    }
}
