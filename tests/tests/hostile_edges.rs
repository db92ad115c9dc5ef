//! Hostile input at the relay's edges (issue 23): what an unauthenticated user or a stranger on
//! the agent port can do with idle sockets, what a second credential can do with a lane key, what
//! the router tells users, and what an agent's own strings can do to the relay's log. Each test
//! is named after what it proves, and each fails on the relay before these fixes.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use jumpgate_proto::{
    AgentHello, Control, Refusal, RelayHello, Secret, StreamOpen, StreamReply, PREFACE,
};
use jumpgate_tests::*;
use jumpgate_transport::frame_io::{read_frame, write_frame};
use jumpgate_transport::mux::{Mode, MuxSettings, Session};
use jumpgate_transport::tls::{self, Fingerprint, ServerTrust};
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsConnector;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

const UP: Duration = Duration::from_secs(30);

/// A TCP connection to `addr` from loopback address `src` (127.0.0.0/8 is all this host's, so
/// each 127.0.0.x is a different source to the relay).
async fn tcp_from(src: &str, addr: &str) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{src}:0").parse().unwrap())?;
    socket.connect(addr.parse().unwrap()).await
}

/// Blocking [`tcp_from`], for holding idle connections open.
fn idle_from(src: &str, addr: &str) -> TcpStream {
    let tcp = block_on(tcp_from(src, addr)).unwrap();
    let tcp = tcp.into_std().unwrap();
    tcp.set_nonblocking(false).unwrap();
    tcp
}

/// A TLS connection to the agent port from `src`, pinned like a real agent; an error when the
/// relay closes it before or during TLS (as it does for a banned source).
async fn tls_from(
    src: &str,
    addr: &str,
    pin: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let pin: Fingerprint = pin.parse().unwrap();
    let config = tls::client_config(ServerTrust::Pinned(vec![pin]), None).unwrap();
    let tcp = tcp_from(src, addr).await?;
    tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(config).connect(tls::server_name("localhost").unwrap(), tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// Sends `hello` from `src` and returns the relay's answer, with the connection (kept open for
/// a session); `Err` when the relay closed the connection before answering.
async fn hello_from(
    src: &str,
    addr: &str,
    pin: &str,
    hello: &AgentHello,
) -> std::io::Result<(
    RelayHello,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
)> {
    let mut s = tls_from(src, addr, pin).await?;
    s.write_all(PREFACE).await?;
    write_frame(&mut s, hello)
        .await
        .map_err(std::io::Error::other)?;
    let reply = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s))
        .await
        .map_err(|_| std::io::Error::other("no answer"))?
        .map_err(std::io::Error::other)?;
    Ok((reply, s))
}

/// A target for agents' services: answers every connection with a banner.
fn banner_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"BANNER-OK\r\n");
        }
    });
    port
}

/// Sends a CONNECT request from `src` and returns what comes back within `wait` (everything
/// up to the banner, or until the relay closes).
fn connect_from(src: &str, router: &str, request: &str, wait: Duration) -> String {
    let mut s = idle_from(src, router);
    s.set_read_timeout(Some(wait)).unwrap();
    if !request.is_empty() {
        s.write_all(request.as_bytes()).unwrap();
    }
    read_until(&mut s, "BANNER-OK")
}

#[test]
fn one_address_cannot_lock_the_router_out() {
    let dir = scratch();
    let target = banner_server();
    let router = format!("127.0.0.1:{}", free_port());
    // 16 slots for unfinished heads: one source may hold 2 of them.
    let relay = Relay::start(
        dir.path(),
        port_range(4),
        &[
            "--router-listen",
            &router,
            "--max-handshakes",
            "16",
            "--allow-cidr",
            "127.0.0.0/30",
        ],
    );
    let agent = Agent::start(dir.path(), &relay, "rt-lock", target, &[]);
    agent.wait_port(UP);
    let gone = Agent::start(dir.path(), &relay, "rt-gone", target, &[]);
    gone.wait_port(UP);

    // One address opens many idle connections: more than all the head slots.
    let idle: Vec<TcpStream> = (0..64).map(|_| idle_from("127.0.0.2", &router)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let reply = connect_from(
        "127.0.0.1",
        &router,
        &format!("CONNECT rt-lock:{target} HTTP/1.1\r\n\r\n"),
        Duration::from_secs(5),
    );
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.contains("BANNER-OK"),
        "64 idle sockets from 127.0.0.2 kept a user from elsewhere out: {reply:?}\n{}",
        relay.proc.log()
    );
    relay
        .proc
        .wait_log("too many unfinished requests from 127.0.0.2", UP);
    drop(idle);

    // Outside the allowlist: answered at once, before any head, holding no head slot.
    let started = Instant::now();
    let reply = connect_from("127.0.0.5", &router, "", Duration::from_secs(5));
    assert!(
        reply.starts_with("HTTP/1.1 403 Forbidden") && reply.contains("allowlist"),
        "an address outside allow_cidr waited for its head: {reply:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A name whose agent left (its lease kept) reads as unknown: no store lookup, no hint
    // that the name exists.
    let mut gone = gone;
    gone.proc.kill();
    relay.proc.wait_log("agent disconnected; lease kept", UP);
    let away = connect_from(
        "127.0.0.1",
        &router,
        &format!("CONNECT rt-gone:{target} HTTP/1.1\r\n\r\n"),
        Duration::from_secs(5),
    );
    let unknown = connect_from(
        "127.0.0.1",
        &router,
        &format!("CONNECT rt-nope:{target} HTTP/1.1\r\n\r\n"),
        Duration::from_secs(5),
    );
    assert!(away.starts_with("HTTP/1.1 404 Not Found"), "{away:?}");
    assert!(unknown.starts_with("HTTP/1.1 404 Not Found"), "{unknown:?}");
    assert_eq!(
        away.replace("rt-gone", "NAME"),
        unknown.replace("rt-nope", "NAME"),
        "an away agent and an unknown name must read the same"
    );
}

#[test]
fn idle_handshakes_cannot_hold_the_agent_port() {
    let dir = scratch();
    let target = banner_server();
    let relay = Relay::start(dir.path(), port_range(4), &[]);
    let pin = relay.fingerprint();
    // 64 idle connections from one source: within its share of handshake slots, past the
    // timeouts a source is forgiven (32 a minute) plus auth_failure_limit (10).
    let idle: Vec<TcpStream> = (0..64)
        .map(|_| idle_from("127.0.0.2", &relay.listen))
        .collect();
    relay
        .proc
        .wait_log("banning 127.0.0.2", Duration::from_secs(25));
    drop(idle);
    let banned = block_on(tls_from("127.0.0.2", &relay.listen, &pin));
    assert!(
        banned.is_err(),
        "a source whose idle connections all timed out is still let in"
    );
    // Agents from elsewhere are untouched.
    let agent = Agent::start(dir.path(), &relay, "after-idle", target, &[]);
    agent.wait_port(UP);
}

/// A hello asking to join `name`'s session as a lane.
fn lane_hello(name: &str, token: &str, key: &Secret) -> AgentHello {
    let mut hello = raw::hello(name, token, (1, 2));
    hello.services.clear();
    hello.lane_of = Some(key.clone());
    hello
}

#[test]
fn a_lane_needs_the_sessions_identity() {
    let dir = scratch();
    let (owner, other) = (
        "owner-token-0123456789abcdef",
        "other-token-0123456789abcdef",
    );
    let tokens = tokens_file(
        dir.path(),
        &[("owner", owner, "job-1"), ("ci", other, "job-*")],
    );
    let relay = Relay::start(
        dir.path(),
        port_range(4),
        &["--tokens-file", tokens.to_str().unwrap()],
    );
    let pin = relay.fingerprint();
    let addr = relay.listen.clone();
    block_on(async {
        let mut hello = raw::hello("job-1", owner, (1, 2));
        hello.max_lanes = 4;
        let (reply, _session) = hello_from("127.0.0.1", &addr, &pin, &hello).await.unwrap();
        let RelayHello::Accepted(accepted) = reply else {
            panic!("the owner's session was refused: {reply:?}");
        };
        let key = accepted.lanes.expect("a lane grant").key;

        // Another credential allowed the same name, with the right key: refused.
        let (reply, _) = hello_from("127.0.0.1", &addr, &pin, &lane_hello("job-1", other, &key))
            .await
            .unwrap();
        match reply {
            RelayHello::Refused(Refusal::LaneUnavailable { detail }) => {
                assert!(detail.contains("authenticate as its session"), "{detail}")
            }
            other => panic!("a lane of another identity was let in: {other:?}"),
        }
        // The session's own identity joins.
        let (reply, _lane) =
            hello_from("127.0.0.1", &addr, &pin, &lane_hello("job-1", owner, &key))
                .await
                .unwrap();
        assert!(matches!(reply, RelayHello::LaneJoined), "{reply:?}");
    });
    relay
        .proc
        .wait_log("refusing a lane of \"job-1\" to token \"ci\"", UP);
}

#[test]
fn a_valid_credential_refused_its_lane_buys_no_ban_exemption() {
    let dir = scratch();
    let relay = Relay::start(dir.path(), port_range(4), &["--auth-failure-limit", "3"]);
    let pin = relay.fingerprint();
    let token = std::fs::read_to_string(relay.token_file()).unwrap();
    let addr = relay.listen.clone();
    block_on(async {
        // A valid token, then refused: no session was placed from 127.0.0.3.
        let made_up = Secret::new("0123456789abcdef0123456789abcdef");
        let (reply, _) = hello_from(
            "127.0.0.3",
            &addr,
            &pin,
            &lane_hello("vh-x", token.trim(), &made_up),
        )
        .await
        .unwrap();
        assert!(
            matches!(reply, RelayHello::Refused(Refusal::LaneUnavailable { .. })),
            "{reply:?}"
        );
        // Guessing from the same address is then banned as from any other.
        for guess in 0..3 {
            let hello = raw::hello("vh-x", &format!("guess-{guess}-0123456789abcdef"), (1, 2));
            let (reply, _) = hello_from("127.0.0.3", &addr, &pin, &hello).await.unwrap();
            assert!(
                matches!(reply, RelayHello::Refused(Refusal::Unauthorized)),
                "{reply:?}"
            );
        }
        assert!(
            tls_from("127.0.0.3", &addr, &pin).await.is_err(),
            "an address that only showed a valid credential guessed on unbanned"
        );
    });
    relay.proc.wait_log("banning 127.0.0.3", UP);
}

#[test]
fn the_router_never_tells_users_an_agents_target() {
    let dir = scratch();
    // Nothing listens on port 1: the agent cannot reach its target.
    let router = format!("127.0.0.1:{}", free_port());
    let relay = Relay::start(dir.path(), port_range(4), &["--router-listen", &router]);
    let agent = Agent::start(
        dir.path(),
        &relay,
        "rt-leak",
        1,
        &["--service", "db=127.0.0.1:1", "--no-port"],
    );
    relay
        .proc
        .wait_log("new tunnel [rt-leak] db via the router", UP);
    let reply = connect_from(
        "127.0.0.1",
        &router,
        "CONNECT rt-leak:1 HTTP/1.1\r\n\r\n",
        Duration::from_secs(15),
    );
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply:?}");
    assert!(
        !reply.contains("127.0.0.1") && !reply.contains(":1 "),
        "the router told an unauthenticated user the agent's target: {reply:?}"
    );
    // The detail stays with the operator.
    relay.proc.wait_log("target 127.0.0.1:1 unreachable", UP);
    drop(agent);
}

#[test]
fn agent_strings_cannot_forge_relay_log_lines() {
    let dir = scratch();
    let relay = Relay::start(dir.path(), port_range(4), &[]);
    let pin = relay.fingerprint();
    let token = std::fs::read_to_string(relay.token_file()).unwrap();
    let addr = relay.listen.clone();
    let stop = CancellationToken::new();
    block_on(async {
        let mut hello = raw::hello("forger", token.trim(), (1, 2));
        hello.software = "forger/1.0\nFORGED software line\u{1b}[31m".into();
        let (reply, tls) = hello_from("127.0.0.1", &addr, &pin, &hello).await.unwrap();
        let RelayHello::Accepted(accepted) = reply else {
            panic!("refused: {reply:?}");
        };
        let port = accepted.services[0].port;
        // Speak the session as an agent does: a control stream, then refuse every user stream
        // with a reason that tries to start a log line of its own.
        let mut mux = Session::start(tls.compat(), Mode::Client, MuxSettings::default());
        tokio::spawn(mux.driver.run(stop.clone()));
        let mut control = mux.opener.open().await.unwrap();
        write_frame(&mut control, &Control::Ping { seq: 1 })
            .await
            .unwrap();
        let agent_side = tokio::spawn(async move {
            let _control = control;
            let mut first = true;
            while let Some(mut stream) = mux.inbound.recv().await {
                let _open: StreamOpen = read_frame(&mut stream).await.unwrap();
                if std::mem::take(&mut first) {
                    let reason = "no\nFORGED refusal line\r\u{1b}[2K".to_string();
                    write_frame(&mut stream, &StreamReply::Refused { reason })
                        .await
                        .unwrap();
                } else {
                    // Not a reply at all: the relay's decoder error quotes the unknown variant.
                    let bogus = serde_json::json!({ "status": "x\nFORGED malformed line" });
                    write_frame(&mut stream, &bogus).await.unwrap();
                }
            }
        });
        let user: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for marker in ["FORGED refusal line", "FORGED malformed line"] {
            let mut tcp = tokio::net::TcpStream::connect(user).await.unwrap();
            let _ = tcp.write_all(b"SSH-2.0-user\r\n").await;
            // Waited for without blocking: this runtime's one thread also runs the agent's side.
            let deadline = Instant::now() + UP;
            while !relay.proc.log().contains(marker) {
                assert!(Instant::now() < deadline, "{}", relay.proc.log());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        agent_side.abort();
    });
    stop.cancel();
    let log = relay.proc.log();
    assert!(
        log.contains("FORGED software line"),
        "software not logged:\n{log}"
    );
    assert!(
        log.contains("FORGED refusal line"),
        "reason not logged:\n{log}"
    );
    assert!(
        log.contains("FORGED malformed line"),
        "malformed reply not logged:\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "an agent's string forged a relay log line:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "raw escape sequences reached the log"
    );
}
