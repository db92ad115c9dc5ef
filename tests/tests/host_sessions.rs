//! Host sessions, relay side (issue 28): the real relay-server binary and a hand-driven host
//! agent (TLS, the v3 hello with `host`, yamux, the control stream) registering tunnels, each
//! with its own credential, lease and port.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::time::Duration;

use jumpgate_proto::tunnel::{TunnelHello, TunnelReply};
use jumpgate_proto::{
    Accepted, Control, Refusal, RelayHello, Secret, ServiceRequest, StreamOpen, StreamReply,
    PREFACE,
};
use jumpgate_tests::*;
use jumpgate_transport::frame_io::{read_frame, write_frame};
use jumpgate_transport::mux::{Mode, MuxSettings, Session};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

const UP: Duration = Duration::from_secs(30);
const ANSWER: Duration = Duration::from_secs(15);

/// A runtime whose tasks (the host's yamux driver, control stream and echo service) run in the
/// background while the test blocks on the relay's processes.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A host agent spoken by hand: its session's control frames, and an echo service for every
/// stream the relay opens, which first writes the tunnel the stream's `StreamOpen` named.
struct HostClient {
    out: mpsc::UnboundedSender<Control>,
    frames: mpsc::UnboundedReceiver<Control>,
    held: VecDeque<Control>,
    stop: CancellationToken,
    next_id: u64,
}

impl Drop for HostClient {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A host hello for `name` with `token`, versions `versions`, no services of its own.
fn host_hello(name: &str, token: &str, versions: (u16, u16)) -> jumpgate_proto::AgentHello {
    let mut hello = raw::hello(name, token, versions);
    hello.host = true;
    hello.services.clear();
    hello
}

/// Connects a host session whose streams are echoed; `Err`: the relay's refusal.
async fn connect_host(relay: &Relay, name: &str, token: &str) -> Result<HostClient, Refusal> {
    connect_host_to(relay, name, token, None).await
}

/// Connects a host session; its streams go to `127.0.0.1:target` (a real agent's target), or
/// to the echo service without one.
async fn connect_host_to(
    relay: &Relay,
    name: &str,
    token: &str,
    target: Option<u16>,
) -> Result<HostClient, Refusal> {
    let mut s = raw::tls(&relay.listen, &relay.fingerprint()).await;
    s.write_all(PREFACE).await.unwrap();
    write_frame(&mut s, &host_hello(name, token, (1, 3)))
        .await
        .unwrap();
    let reply: RelayHello = tokio::time::timeout(ANSWER, read_frame(&mut s))
        .await
        .expect("relay did not answer the hello")
        .unwrap();
    let accepted: Accepted = match reply {
        RelayHello::Accepted(a) => a,
        RelayHello::Refused(r) => return Err(r),
        other => panic!("unexpected answer to a host hello: {other:?}"),
    };
    assert_eq!(accepted.version, 3);
    let mux = Session::start(s.compat(), Mode::Client, MuxSettings::default());
    let stop = CancellationToken::new();
    tokio::spawn(mux.driver.run(stop.clone()));
    let ctrl = mux.opener.open().await.unwrap();
    let (mut reader, mut writer) = tokio::io::split(ctrl);
    let (out, mut out_rx) = mpsc::unbounded_channel::<Control>();
    let (frames_tx, frames) = mpsc::unbounded_channel();
    // The control writer: a ping at once (the stream opens with its first bytes), then every
    // second, and whatever the test sends.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut seq = 0;
        loop {
            let frame = tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    Control::Ping { seq }
                }
                f = out_rx.recv() => match f {
                    Some(f) => f,
                    None => return,
                },
            };
            if write_frame(&mut writer, &frame).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok(frame) = read_frame::<_, Control>(&mut reader).await {
            if !matches!(frame, Control::Pong { .. }) && frames_tx.send(frame).is_err() {
                return;
            }
        }
    });
    let mut inbound = mux.inbound;
    tokio::spawn(async move {
        while let Some(mut stream) = inbound.recv().await {
            tokio::spawn(async move {
                let open: StreamOpen = read_frame(&mut stream).await.unwrap();
                if let Some(target) = target {
                    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", target))
                        .await
                        .unwrap();
                    write_frame(&mut stream, &StreamReply::Connected)
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                    return;
                }
                write_frame(&mut stream, &StreamReply::Connected)
                    .await
                    .unwrap();
                let tag = format!("{}:", open.tunnel.as_deref().unwrap_or("-"));
                stream.write_all(tag.as_bytes()).await.unwrap();
                let (mut r, mut w) = tokio::io::split(stream);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(HostClient {
        out,
        frames,
        held: VecDeque::new(),
        stop,
        next_id: 1,
    })
}

fn ssh_service() -> ServiceRequest {
    ServiceRequest {
        name: "ssh".into(),
        target_port: 22,
        preferred_port: None,
        strict: false,
        allow: vec![],
        no_port: false,
    }
}

impl HostClient {
    /// Registers tunnel `name` with `token` (one ssh service) and waits for the answer.
    async fn register(&mut self, name: &str, token: Option<&str>) -> TunnelReply {
        let id = self.next_id;
        self.next_id += 1;
        let tunnel = TunnelHello {
            name: name.into(),
            token: token.map(Secret::new),
            services: vec![ssh_service()],
            jump_keys: vec![],
        };
        self.out.send(Control::Register { id, tunnel }).unwrap();
        self.wait_for(|f| match f {
            Control::Registered { id: got, reply } if *got == id => Some(reply.clone()),
            _ => None,
        })
        .await
    }

    /// Registers and returns the tunnel's port; panics on a refusal.
    async fn port_of(&mut self, name: &str, token: &str) -> u16 {
        match self.register(name, Some(token)).await {
            TunnelReply::Accepted { services } => services[0].port,
            TunnelReply::Refused(r) => panic!("tunnel {name} refused: {r:?}"),
        }
    }

    fn unregister(&self, name: &str, release: bool) {
        self.out
            .send(Control::Unregister {
                name: name.into(),
                release,
            })
            .unwrap();
    }

    /// The next `TunnelClosed` from the relay.
    async fn closed(&mut self) -> (String, Refusal) {
        self.wait_for(|f| match f {
            Control::TunnelClosed { name, reason } => Some((name.clone(), reason.clone())),
            _ => None,
        })
        .await
    }

    /// Whether a `TunnelClosed` arrived within `wait`.
    async fn closed_within(&mut self, wait: Duration) -> Option<(String, Refusal)> {
        tokio::time::timeout(wait, self.closed()).await.ok()
    }

    async fn wait_for<T>(&mut self, mut pick: impl FnMut(&Control) -> Option<T>) -> T {
        if let Some(i) = self.held.iter().position(|f| pick(f).is_some()) {
            let frame = self.held.remove(i).unwrap();
            return pick(&frame).unwrap();
        }
        loop {
            let frame = tokio::time::timeout(ANSWER, self.frames.recv())
                .await
                .expect("no answer from the relay")
                .expect("the relay closed the host session");
            match pick(&frame) {
                Some(t) => return t,
                None => self.held.push_back(frame),
            }
        }
    }
}

/// What a user connecting to `port` and sending a line gets back within a few seconds: the
/// tunnel's tag and the echo through a live tunnel, nothing when nobody carries the port.
fn through(port: u16) -> String {
    let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = tcp.write_all(b"hello\n");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"\n") {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Relay with a tokens file: the hosts' entry (names `gpu-*`) and one entry per
/// `(label, token, pattern)`; returns the hosts' token.
fn relay_with(
    dir: &std::path::Path,
    width: u16,
    tokens: &[(&str, &str, &str)],
    extra: &[&str],
) -> (Relay, String) {
    let file = write_tokens(dir, tokens);
    let mut args = vec!["--tokens-file", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let relay = Relay::start(dir, port_range(width), &args);
    (relay, HOST.to_string())
}

/// The tokens file: the hosts' entry and `tokens`.
fn write_tokens(dir: &std::path::Path, tokens: &[(&str, &str, &str)]) -> std::path::PathBuf {
    let mut all = vec![("hosts", HOST, "gpu-*")];
    all.extend_from_slice(tokens);
    tokens_file(dir, &all)
}

const HOST: &str = "host-token-0123456789abcdef";

const A: &str = "job-a-token-0123456789abcdef";
const B: &str = "job-b-token-0123456789abcdef";

#[test]
fn tunnels_over_one_host_session_each_get_their_own_port_and_credential() {
    let dir = scratch();
    let (relay, host_token) = relay_with(
        dir.path(),
        4,
        &[("job-a", A, "vh-a"), ("job-b", B, "vh-b")],
        &[],
    );
    let rt = runtime();
    let mut host = rt
        .block_on(connect_host(&relay, "gpu-1", &host_token))
        .unwrap();
    let a = rt.block_on(host.port_of("vh-a", A));
    let b = rt.block_on(host.port_of("vh-b", B));
    assert_ne!(a, b);
    assert_eq!(through(a), "vh-a:hello\n");
    assert_eq!(through(b), "vh-b:hello\n");

    // A token for another name, or none, is refused; the other tunnels carry on.
    let refused = rt.block_on(host.register("vh-c", Some(A)));
    assert!(
        matches!(&refused, TunnelReply::Refused(Refusal::NameNotAllowed { name }) if name == "vh-c"),
        "{refused:?}"
    );
    match rt.block_on(host.register("vh-c", None)) {
        TunnelReply::Refused(Refusal::BadRequest { detail }) => {
            assert!(detail.contains("each tunnel needs its own"), "{detail}")
        }
        other => panic!("a tunnel without a credential was let in: {other:?}"),
    }
    // A tunnel cannot take the host session's own name.
    let taken = rt.block_on(host.register("gpu-1", Some(&host_token)));
    assert!(
        matches!(taken, TunnelReply::Refused(Refusal::BadRequest { .. })),
        "{taken:?}"
    );
    assert_eq!(through(a), "vh-a:hello\n");
    relay
        .proc
        .wait_log("refusing tunnel \"vh-c\" registered by host \"gpu-1\"", UP);
    assert!(!relay.proc.log().contains(A), "a tunnel's token was logged");

    // The admin API lists tunnels as agents, marked with their host.
    let (status, body) = relay.admin("GET", "/api/agents");
    assert_eq!(status, 200, "{body}");
    let agents: serde_json::Value = serde_json::from_str(&body).unwrap();
    let host_of = |name: &str| {
        agents
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .map(|a| a["host"].clone())
    };
    assert_eq!(host_of("vh-a"), Some(serde_json::json!("gpu-1")), "{body}");
    assert_eq!(host_of("vh-b"), Some(serde_json::json!("gpu-1")), "{body}");
    assert_eq!(host_of("gpu-1"), Some(serde_json::Value::Null), "{body}");

    // An operator's disconnect ends that tunnel only, and its host is told why.
    let (status, body) = relay.admin("DELETE", "/api/agents/vh-b");
    assert_eq!(status, 200, "{body}");
    let (name, reason) = rt.block_on(host.closed());
    assert_eq!(name, "vh-b");
    assert!(
        matches!(&reason, Refusal::Unavailable { detail } if detail.contains("operator")),
        "{reason:?}"
    );
    assert_eq!(through(b), "");
    assert_eq!(through(a), "vh-a:hello\n");
}

#[test]
fn revoking_one_tunnels_token_closes_that_tunnel_only() {
    let dir = scratch();
    let (relay, host_token) = relay_with(
        dir.path(),
        4,
        &[("job-a", A, "vh-a"), ("job-b", B, "vh-b")],
        &[],
    );
    let rt = runtime();
    let mut host = rt
        .block_on(connect_host(&relay, "gpu-1", &host_token))
        .unwrap();
    let a = rt.block_on(host.port_of("vh-a", A));
    let b = rt.block_on(host.port_of("vh-b", B));
    write_tokens(dir.path(), &[("job-a", A, "vh-a")]);
    relay.proc.signal("HUP");
    relay.proc.wait_log("configuration reloaded", UP);
    let (name, reason) = rt.block_on(host.closed());
    assert_eq!((name.as_str(), &reason), ("vh-b", &Refusal::Unauthorized));
    assert!(reason.is_permanent());
    assert_eq!(through(b), "", "the revoked tunnel's port still carries");
    assert_eq!(through(a), "vh-a:hello\n");
    assert_eq!(
        rt.block_on(host.closed_within(Duration::from_secs(2))),
        None
    );
    // And it cannot come back with the revoked token.
    let again = rt.block_on(host.register("vh-b", Some(B)));
    assert!(
        matches!(again, TunnelReply::Refused(Refusal::Unauthorized)),
        "{again:?}"
    );
}

#[test]
fn unregister_keeps_the_lease_unless_released() {
    let dir = scratch();
    // One port: whoever holds its lease keeps everybody else out.
    let (relay, host_token) = relay_with(
        dir.path(),
        1,
        &[("job-a", A, "vh-a"), ("job-b", B, "vh-b")],
        &[],
    );
    let rt = runtime();
    let mut host = rt
        .block_on(connect_host(&relay, "gpu-1", &host_token))
        .unwrap();
    let port = rt.block_on(host.port_of("vh-a", A));
    host.unregister("vh-a", false);
    // Done (the log line is the same with or without its leases) before vh-b asks.
    relay.proc.wait_log("tunnel unregistered", UP);
    assert_eq!(through(port), "");
    let refused = rt.block_on(host.register("vh-b", Some(B)));
    assert!(
        matches!(
            refused,
            TunnelReply::Refused(Refusal::RangeExhausted { .. })
        ),
        "the unregistered tunnel's lease was given away: {refused:?}"
    );
    assert_eq!(
        rt.block_on(host.closed_within(Duration::from_secs(1))),
        None
    );

    // After the host reconnects, the tunnel gets its port back; released, the port is free.
    drop(host);
    let mut host = rt
        .block_on(connect_host(&relay, "gpu-1", &host_token))
        .unwrap();
    assert_eq!(rt.block_on(host.port_of("vh-a", A)), port);
    assert_eq!(through(port), "vh-a:hello\n");
    host.unregister("vh-a", true);
    let b = wait_until("vh-b gets the released port", UP, || {
        match rt.block_on(host.register("vh-b", Some(B))) {
            TunnelReply::Accepted { services } => Some(services[0].port),
            TunnelReply::Refused(_) => None,
        }
    });
    assert_eq!(b, port);
    assert_eq!(through(port), "vh-b:hello\n");
    assert_eq!(
        rt.block_on(host.closed_within(Duration::from_secs(1))),
        None
    );
}

#[test]
fn ending_the_host_session_closes_all_its_tunnels_and_their_leases_age() {
    let dir = scratch();
    let (relay, host_token) = relay_with(
        dir.path(),
        4,
        &[("job-a", A, "vh-a"), ("job-b", B, "vh-b")],
        &[],
    );
    let rt = runtime();
    let mut host = rt
        .block_on(connect_host(&relay, "gpu-1", &host_token))
        .unwrap();
    let a = rt.block_on(host.port_of("vh-a", A));
    let b = rt.block_on(host.port_of("vh-b", B));
    drop(host);
    wait_until("both tunnels are down", UP, || {
        (through(a).is_empty() && through(b).is_empty()).then_some(())
    });
    wait_until("the admin API no longer lists them", UP, || {
        let (_, body) = relay.admin("GET", "/api/agents");
        (!body.contains("vh-a") && !body.contains("vh-b")).then_some(())
    });
    let mut host = rt
        .block_on(connect_host(&relay, "gpu-2", &host_token))
        .unwrap();
    assert_eq!(rt.block_on(host.port_of("vh-b", B)), b);
    assert_eq!(rt.block_on(host.port_of("vh-a", A)), a);
    assert_eq!(through(a), "vh-a:hello\n");
}

#[test]
fn only_the_same_identity_takes_a_tunnel_from_another_host() {
    let dir = scratch();
    let other = "other-token-0123456789abcdef";
    let (relay, host_token) = relay_with(
        dir.path(),
        4,
        &[("job-a", A, "vh-a"), ("other", other, "vh-*")],
        &[],
    );
    let rt = runtime();
    let mut first = rt
        .block_on(connect_host(&relay, "gpu-1", &host_token))
        .unwrap();
    let mut second = rt
        .block_on(connect_host(&relay, "gpu-2", &host_token))
        .unwrap();
    let port = rt.block_on(first.port_of("vh-a", A));
    let held = rt.block_on(second.register("vh-a", Some(other)));
    assert!(
        matches!(&held, TunnelReply::Refused(Refusal::NameHeld { name }) if name == "vh-a"),
        "another identity took the tunnel: {held:?}"
    );
    assert_eq!(through(port), "vh-a:hello\n");
    assert_eq!(
        rt.block_on(first.closed_within(Duration::from_secs(1))),
        None
    );

    // The same identity takes it over: same port, and the first host is told.
    assert_eq!(rt.block_on(second.port_of("vh-a", A)), port);
    let (name, reason) = rt.block_on(first.closed());
    assert_eq!(name, "vh-a");
    assert!(
        matches!(&reason, Refusal::Unavailable { detail } if detail.contains("taken over")),
        "{reason:?}"
    );
    assert_eq!(through(port), "vh-a:hello\n");

    // Registering a name it carries again replaces the tunnel without a closure.
    assert_eq!(rt.block_on(second.port_of("vh-a", A)), port);
    assert_eq!(
        rt.block_on(second.closed_within(Duration::from_secs(1))),
        None
    );
    assert_eq!(through(port), "vh-a:hello\n");
}

#[test]
fn a_host_guessing_credentials_is_slowed_without_losing_its_tunnels() {
    let dir = scratch();
    let (relay, host_token) = relay_with(
        dir.path(),
        4,
        &[("job-a", A, "vh-a"), ("job-b", B, "vh-b")],
        &["--auth-failure-limit", "3"],
    );
    let rt = runtime();
    let mut host = rt
        .block_on(connect_host(&relay, "gpu-1", &host_token))
        .unwrap();
    let a = rt.block_on(host.port_of("vh-a", A));
    for guess in 0..3 {
        let token = format!("guess-{guess}-0123456789abcdef");
        let reply = rt.block_on(host.register("vh-b", Some(&token)));
        assert!(
            matches!(reply, TunnelReply::Refused(Refusal::Unauthorized)),
            "{reply:?}"
        );
    }
    // Even the right token waits now; the live tunnel is untouched.
    match rt.block_on(host.register("vh-b", Some(B))) {
        TunnelReply::Refused(Refusal::Unavailable { detail }) => {
            assert!(detail.contains("failed authentication"), "{detail}")
        }
        other => panic!("guessing went on unchecked: {other:?}"),
    }
    assert_eq!(through(a), "vh-a:hello\n");
}

#[test]
fn a_host_hello_below_version_3_is_refused() {
    let dir = scratch();
    let relay = Relay::start(dir.path(), port_range(2), &[]);
    let token = std::fs::read_to_string(relay.token_file()).unwrap();
    let hello = host_hello("gpu-1", token.trim(), (1, 2));
    let reply = block_on(raw::exchange(&relay.listen, &relay.fingerprint(), &hello));
    match reply {
        RelayHello::Refused(Refusal::BadRequest { detail }) => {
            assert!(detail.contains("protocol version 3"), "{detail}")
        }
        other => panic!("a version-2 host hello was accepted: {other:?}"),
    }
    // At version 3 the same host is in, with no services of its own.
    let rt = runtime();
    assert!(rt
        .block_on(connect_host(&relay, "gpu-1", token.trim()))
        .is_ok());
}

#[test]
fn a_jobs_signed_join_token_registers_its_own_name_only() {
    let dir = scratch();
    let (private, public) = key_pair(dir.path(), "join");
    let (relay, host_token) = relay_with(
        dir.path(),
        4,
        &[],
        &["--join-key-file", public.to_str().unwrap()],
    );
    let mint = |name: &str| {
        let out = std::process::Command::new(bin("relay-server"))
            .args(["mint-token", "--key"])
            .arg(&private)
            .args(["--name", name, "--ttl", "1h"])
            .args(["--audience", "jumpgate:127.0.0.1"])
            .output()
            .unwrap();
        ok_stdout(&out).trim().to_string()
    };
    let rt = runtime();
    let mut host = rt
        .block_on(connect_host(&relay, "gpu-1", &host_token))
        .unwrap();
    let job = mint("vh-exec-1");
    let port = rt.block_on(host.port_of("vh-exec-1", &job));
    assert_eq!(through(port), "vh-exec-1:hello\n");
    match rt.block_on(host.register("vh-exec-2", Some(&job))) {
        TunnelReply::Refused(r) => assert!(r.is_permanent(), "{r:?}"),
        other => panic!("a job's token registered another name: {other:?}"),
    }
    relay
        .proc
        .wait_log("credential=signed token for vh-exec-1", UP);
    assert_eq!(through(port), "vh-exec-1:hello\n");
}

#[test]
fn openssh_reaches_two_tunnels_of_one_host_session() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "host");
    let (relay, host_token) = relay_with(
        dir.path(),
        4,
        &[("job-a", A, "vh-a"), ("job-b", B, "vh-b")],
        &[],
    );
    let rt = runtime();
    let mut host = rt
        .block_on(connect_host_to(
            &relay,
            "gpu-1",
            &host_token,
            Some(sshd.port),
        ))
        .unwrap();
    let a = rt.block_on(host.port_of("vh-a", A));
    let b = rt.block_on(host.port_of("vh-b", B));
    let mut session = EchoSession::start(&sshd, a);
    for (port, word) in [(a, "via-a"), (b, "via-b")] {
        let out = sshd.ssh("127.0.0.1", port, &format!("echo {word}"));
        assert_eq!(ok_stdout(&out).trim(), word);
    }
    // Removing one tunnel leaves the other's live ssh session alone.
    host.unregister("vh-b", true);
    relay.proc.wait_log("tunnel unregistered", UP);
    session.send(64);
    session.finish();
    assert_eq!(through(b), "", "the removed tunnel still carries");
}
