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

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::{accept_backoff, check_admission, http_status, spawn_carry, Greeting};
use crate::registry::{AgentSession, ServiceEndpoint};
use crate::Shared;

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Most header lines accepted in a request head (CONNECT clients send two or three).
const MAX_HEADERS: usize = 32;
/// After a failure answer: how long to read and discard input before closing (see [`fail`]).
const LINGER: Duration = Duration::from_secs(1);
/// After a failure answer: how many input bytes at most to read and discard before closing.
const LINGER_BYTES: usize = 64 * 1024;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts CONNECT requests until shutdown.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
                    continue;
                };
                let shared2 = shared.clone();
                shared.user_conns.spawn(async move {
                    route(tcp, peer, &shared2, permit).await;
                });
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
    shared: &Arc<Shared>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut tcp)).await;
    // The head is read: failures below are answered without holding a handshake slot.
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
    let (agent, service) = match resolve(shared, &target) {
        Ok(found) => found,
        Err(f) => return fail(&mut tcp, peer, f).await,
    };
    if let Err(why) = check_admission(peer, &agent, &service, shared) {
        return fail(&mut tcp, peer, ("403 Forbidden", why.to_string())).await;
    }
    spawn_carry(tcp, peer, &agent, &service, shared, Greeting::HttpConnect);
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

/// Reads the request head and returns the CONNECT target.
///
/// Only the head is taken off the socket: each chunk is peeked and parsed, and consumed up to
/// the end of the head at most, so bytes a client sent right behind the head (an eager client's
/// first payload) stay in the socket and go through the tunnel like every later byte. A chunk
/// that does not finish the head is consumed whole, so the next peek waits for new bytes.
async fn read_head(tcp: &mut TcpStream) -> Result<String, Failure> {
    let closed = || {
        (
            "400 Bad Request",
            "connection closed before the request head ended".to_string(),
        )
    };
    let mut buf = vec![0u8; MAX_HEAD];
    // `buf[..consumed]` has been read off the socket; all of it is head.
    let mut consumed = 0;
    loop {
        let peeked = match tcp.peek(&mut buf[consumed..]).await {
            Ok(0) | Err(_) => return Err(closed()),
            Ok(n) => n,
        };
        let seen = consumed + peeked;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        // How far the head reaches into what was seen, and the answer once there is one.
        let (head_end, answer) = match request.parse(&buf[..seen]) {
            Ok(httparse::Status::Complete(end)) => (end, Some(connect_target(&request))),
            Ok(httparse::Status::Partial) if seen >= MAX_HEAD => (
                seen,
                Some(Err(too_large(format!(
                    "request head over {MAX_HEAD} bytes"
                )))),
            ),
            Ok(httparse::Status::Partial) => (seen, None),
            Err(httparse::Error::TooManyHeaders) => (
                seen,
                Some(Err(too_large(format!("over {MAX_HEADERS} header lines")))),
            ),
            Err(_) => (seen, Some(Err(malformed()))),
        };
        // Those bytes are in the socket already (they were peeked): this read does not wait.
        if tcp.read_exact(&mut buf[consumed..head_end]).await.is_err() {
            return Err(closed());
        }
        consumed = head_end;
        if let Some(answer) = answer {
            return answer;
        }
    }
}

/// The target of a complete request head, or why it is not a CONNECT request.
fn connect_target(request: &httparse::Request<'_, '_>) -> Result<String, Failure> {
    match (request.method, request.path) {
        (Some("CONNECT"), Some(target)) => Ok(target.to_string()),
        (Some(method), _) => Err((
            "405 Method Not Allowed",
            format!("only CONNECT is supported here, not {method}"),
        )),
        _ => Err(malformed()),
    }
}

fn malformed() -> Failure {
    (
        "400 Bad Request",
        "expected `CONNECT agent:port HTTP/1.1`".into(),
    )
}

fn too_large(why: String) -> Failure {
    ("431 Request Header Fields Too Large", why)
}

/// Finds the agent session and service a CONNECT target names.
fn resolve(shared: &Shared, target: &str) -> Result<(Arc<AgentSession>, ServiceEndpoint), Failure> {
    let bad = || ("400 Bad Request", format!("{target:?} is not HOST:PORT"));
    let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if let Some(agent) = shared.registry.get(host) {
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
        if let Some(agent) = shared.registry.get(agent_name) {
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
    let known = shared
        .leases
        .read(|t| t.iter().any(|(k, ..)| k.agent == host));
    if known {
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A connected pair: (client, relay side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    async fn head_of(bytes: &[u8]) -> Result<String, Failure> {
        let (mut client, mut server) = pair().await;
        client.write_all(bytes).await.unwrap();
        client.shutdown().await.unwrap();
        read_head(&mut server).await
    }

    #[tokio::test]
    async fn bytes_behind_the_head_stay_for_the_tunnel() {
        let (mut client, mut server) = pair().await;
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut sent = b"CONNECT vh-1:22 HTTP/1.1\r\nHost: vh-1:22\r\n\r\n".to_vec();
        sent.extend_from_slice(&payload);
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        assert_eq!(read_head(&mut server).await, Ok("vh-1:22".to_string()));
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest == payload, "{} bytes after the head", rest.len());
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_head_arriving_in_pieces_is_put_together() {
        let (mut client, mut server) = pair().await;
        let reader = tokio::spawn(async move {
            let target = read_head(&mut server).await;
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            (target, rest)
        });
        for piece in [
            &b"CONN"[..],
            b"ECT ssh.vh-2:0 HTTP/1.0\r",
            b"\nHost: x\r\n",
            b"\r\nSSH-2.0-x",
        ] {
            client.write_all(piece).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        client.shutdown().await.unwrap();
        let (target, rest) = reader.await.unwrap();
        assert_eq!(target, Ok("ssh.vh-2:0".to_string()));
        assert_eq!(rest, b"SSH-2.0-x");
    }

    #[tokio::test]
    async fn oversized_heads_are_431_and_a_head_of_exactly_the_limit_is_not() {
        let head = |len: usize| {
            let start = "CONNECT a:22 HTTP/1.1\r\nX-Pad: ";
            let pad = "p".repeat(len - start.len() - 4);
            format!("{start}{pad}\r\n\r\n").into_bytes()
        };
        assert_eq!(head_of(&head(MAX_HEAD)).await, Ok("a:22".to_string()));
        let (status, why) = head_of(&head(MAX_HEAD + 1)).await.unwrap_err();
        assert_eq!(status, "431 Request Header Fields Too Large");
        assert_eq!(why, "request head over 8192 bytes");
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let (status, why) = head_of(format!("CONNECT a:22 HTTP/1.1\r\n{many}\r\n").as_bytes())
            .await
            .unwrap_err();
        assert_eq!(status, "431 Request Header Fields Too Large");
        assert_eq!(why, "over 32 header lines");
    }

    #[tokio::test]
    async fn other_methods_garbage_and_early_close_keep_their_statuses() {
        let (status, why) = head_of(b"GET / HTTP/1.1\r\n\r\n").await.unwrap_err();
        assert_eq!(status, "405 Method Not Allowed");
        assert_eq!(why, "only CONNECT is supported here, not GET");
        for garbage in [&b"garbage\r\n\r\n"[..], b"CONNECT a:22 HTTP/2.0\r\n\r\n"] {
            let (status, why) = head_of(garbage).await.unwrap_err();
            assert_eq!(status, "400 Bad Request");
            assert_eq!(why, "expected `CONNECT agent:port HTTP/1.1`");
        }
        let (status, why) = head_of(b"CONNECT a:22 HTTP/1.1\r\nHost").await.unwrap_err();
        assert_eq!(status, "400 Bad Request");
        assert_eq!(why, "connection closed before the request head ended");
        // A bare LF ends lines too, as before.
        assert_eq!(
            head_of(b"CONNECT b:22 HTTP/1.1\n\n").await,
            Ok("b:22".to_string())
        );
    }
}
