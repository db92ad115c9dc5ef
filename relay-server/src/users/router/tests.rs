use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use jumpgate_proto::{Cidr, Secret, StreamOpen, StreamReply};
use jumpgate_transport::frame_io::{read_frame, write_frame};
use jumpgate_transport::mux::{Mode, MuxSettings, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::head::{MAX_HEAD, MAX_HEADERS};
use super::*;
use crate::agents::lanes::Lanes;
use crate::agents::registry::{AgentSession, ServiceEndpoint};
use crate::audit::AuditLog;
use crate::guard::TokenBucket;
use crate::metrics::Metrics;
use crate::policy::{Credential, Policy, PolicyCell, UserLimits};

/// A relay's public side with one connected agent, `vh-1`, whose `ssh` service (target port
/// 22) echoes after answering `Connected`.
struct World {
    router: Arc<Router>,
    agent: Arc<AgentSession>,
    opened: tokio::sync::mpsc::UnboundedReceiver<StreamOpen>,
    stop: CancellationToken,
}

fn limits(max_conns_per_port: usize, allow: Vec<Cidr>) -> UserLimits {
    UserLimits {
        allow,
        max_conns_per_port,
        max_new_conns_per_sec: 1000,
        max_conns_per_source: 1000,
    }
}

async fn world(limits: UserLimits) -> World {
    let stop = CancellationToken::new();
    let (relay_io, agent_io) = tokio::io::duplex(256 * 1024);
    let relay = Session::start(relay_io.compat(), Mode::Server, MuxSettings::default());
    let mut agent = Session::start(agent_io.compat(), Mode::Client, MuxSettings::default());
    tokio::spawn(relay.driver.run(stop.clone()));
    tokio::spawn(agent.driver.run(stop.clone()));
    let (opened_tx, opened) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(mut stream) = agent.inbound.recv().await {
            let opened_tx = opened_tx.clone();
            tokio::spawn(async move {
                let open: StreamOpen = read_frame(&mut stream).await.unwrap();
                let _ = opened_tx.send(open);
                write_frame(&mut stream, &StreamReply::Connected)
                    .await
                    .unwrap();
                let (mut r, mut w) = tokio::io::split(stream);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });

    let cancel = CancellationToken::new();
    let service = ServiceEndpoint {
        name: Arc::from("ssh"),
        port: 40001,
        target_port: 22,
        allow: Arc::from(Vec::new()),
        stats: Arc::default(),
        bucket: Arc::new(std::sync::Mutex::new(TokenBucket::new(
            1000.0,
            Instant::now(),
        ))),
        sources: Arc::default(),
    };
    let agent = Arc::new(AgentSession {
        id: 1,
        name: Arc::from("vh-1"),
        remote: "127.0.0.1:9".parse().unwrap(),
        lanes: Arc::new(Lanes::new(
            relay.opener,
            Secret::new("k"),
            1,
            Duration::ZERO,
            &cancel,
        )),
        permits: Arc::new(Semaphore::new(16)),
        cancel,
        finished: CancellationToken::new(),
        services: vec![service],
        connected_at: SystemTime::now(),
        credential: Credential::Certificate("vh-1".into()),
        slot: Default::default(),
        jump_keys: None,
        tunnel: None,
    });
    let registry = Registry::default();
    registry.insert(agent.clone());
    let users = Users {
        policy: Arc::new(PolicyCell::new(Policy::with_user_limits(limits))),
        metrics: Arc::new(Metrics::default()),
        audit: Arc::new(AuditLog::default()),
        conns: TaskTracker::new(),
        shutdown: CancellationToken::new(),
        close: CancellationToken::new(),
    };
    let router = Arc::new(Router {
        users: Arc::new(users),
        registry: Arc::new(registry),
        heads: Arc::new(Semaphore::new(8)),
        heads_per_source: Arc::default(),
        max_heads_per_source: share_per_source(8),
    });
    World {
        router,
        agent,
        opened,
        stop,
    }
}

fn status(r: Result<(Arc<AgentSession>, ServiceEndpoint), Failure>) -> String {
    match r {
        Ok((agent, service)) => format!("{}/{}", agent.name, service.name),
        Err((status, why)) => format!("{status}: {why}"),
    }
}

#[tokio::test]
async fn names_resolve_to_a_session_and_a_service_or_say_why_not() {
    let w = world(limits(8, vec![])).await;
    let registry = &w.router.registry;
    let resolve = |target| async move { status(resolve(registry, target)) };
    assert_eq!(resolve("vh-1:22").await, "vh-1/ssh");
    assert_eq!(resolve("ssh.vh-1:0").await, "vh-1/ssh");
    assert!(resolve("vh-1:80")
        .await
        .starts_with("404 Not Found: agent \"vh-1\" has no service on port 80"));
    assert!(resolve("web.vh-1:0")
        .await
        .starts_with("404 Not Found: agent \"vh-1\" has no service named \"web\""));
    // A name without a live session here reads as unknown (whatever the store holds for
    // it): nothing is looked up for an unauthenticated user, and nothing tells a stranger
    // whether the name exists.
    assert!(resolve("gone:22")
        .await
        .starts_with("404 Not Found: no agent named \"gone\" is connected"));
    assert!(resolve("nobody:22")
        .await
        .starts_with("404 Not Found: no agent named \"nobody\""));
    assert!(resolve("vh-1").await.starts_with("400 Bad Request"));
    assert!(resolve("vh-1:http").await.starts_with("400 Bad Request"));
    w.stop.cancel();
}

/// Serves `w`'s router on a loopback port.
async fn serve_router(w: &World) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(serve(listener, w.router.clone())))
}

/// Sends `request` and reads until the response head ends (or the connection closes).
async fn ask(addr: SocketAddr, request: &str) -> (TcpStream, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut byte).await.unwrap() {
            0 => break,
            _ => head.push(byte[0]),
        }
    }
    (tcp, String::from_utf8_lossy(&head).into_owned())
}

#[tokio::test]
async fn connect_carries_bytes_sent_with_the_head_and_the_drain_waits_for_it() {
    let mut w = world(limits(8, vec![])).await;
    let (addr, server) = serve_router(&w).await;
    let (mut tcp, head) = ask(addr, "CONNECT vh-1:22 HTTP/1.1\r\nHost: vh-1\r\n\r\nearly").await;
    assert!(
        head.starts_with("HTTP/1.1 200 Connection established"),
        "{head}"
    );
    let open = tokio::time::timeout(Duration::from_secs(5), w.opened.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(open.service, "ssh");
    let mut echo = [0u8; 5];
    tcp.read_exact(&mut echo).await.unwrap();
    assert_eq!(
        &echo, b"early",
        "bytes sent right after the head reach the agent"
    );
    tcp.write_all(b" later").await.unwrap();
    let mut more = [0u8; 6];
    tcp.read_exact(&mut more).await.unwrap();
    assert_eq!(&more, b" later");
    let stats = &w.agent.services[0].stats;
    assert_eq!(stats.active.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Shutdown stops the listener, but the open connection is carried until it ends.
    let users = w.router.users.clone();
    users.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    users.conns.close();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), users.conns.wait())
            .await
            .is_err(),
        "the drain must wait for the open connection"
    );
    drop(tcp);
    tokio::time::timeout(Duration::from_secs(5), users.conns.wait())
        .await
        .expect("the drain ends once the user's connection is closed");
    assert_eq!(stats.active.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(stats.total.load(std::sync::atomic::Ordering::SeqCst), 1);
    w.stop.cancel();
}

#[tokio::test]
async fn the_router_applies_the_same_admission_as_allocated_ports() {
    let w = world(limits(1, vec![])).await;
    let (addr, _server) = serve_router(&w).await;
    let (_held, head) = ask(addr, "CONNECT vh-1:22 HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (mut refused, head) = ask(addr, "CONNECT ssh.vh-1:0 HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 403 Forbidden"), "{head}");
    let mut body = String::new();
    refused.read_to_string(&mut body).await.unwrap();
    assert!(body.contains("concurrent connection limit"), "{body}");
    assert_eq!(
        w.agent.services[0]
            .stats
            .refused
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    let lan_only = world(limits(8, vec!["10.0.0.0/8".parse().unwrap()])).await;
    let (addr, _server) = serve_router(&lan_only).await;
    let (mut refused, head) = ask(addr, "CONNECT vh-1:22 HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 403 Forbidden"), "{head}");
    let mut body = String::new();
    refused.read_to_string(&mut body).await.unwrap();
    assert!(body.contains("relay's allowlist"), "{body}");
    w.stop.cancel();
    lan_only.stop.cancel();
}

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
