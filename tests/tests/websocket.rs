//! The agent link as WebSocket (issue 24): the relay behind a real nginx that carries only
//! WebSocket, plain (`ws://`) and with TLS terminated at nginx (`wss://`); inside, the relay's own
//! TLS, verified by pin end to end. ssh, scp both ways, a relay kill -9 and back on the same
//! port; hostile input on the WebSocket port is capped and timed out without harm. The relay
//! sees a WebSocket agent at its own address (the TCP peer, or the client a trusted ingress
//! names), so bans hit a guesser and not the workers beside it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

/// nginx in front of the relay's WebSocket port: `plain` carries `ws://`, `tls` terminates TLS
/// for `wss://` with `cert`/`key`. Only `/jumpgate` is forwarded.
fn nginx(dir: &Path, upstream: u16, plain: u16, tls: u16, cert: &Path, key: &Path) -> Proc {
    let root = dir.join("nginx");
    std::fs::create_dir_all(&root).unwrap();
    let location = format!(
        "location = /jumpgate {{ proxy_pass http://127.0.0.1:{upstream}; proxy_http_version 1.1; \
         proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\"; \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; \
         proxy_read_timeout 300s; proxy_send_timeout 300s; proxy_buffering off; }}\n\
         location / {{ return 404; }}\n"
    );
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {r}/nginx.pid;\nerror_log {r}/error.log info;\n\
         events {{ worker_connections 512; }}\n\
         http {{\n access_log off;\n client_body_temp_path {r}/body;\n proxy_temp_path {r}/proxy;\n\
         fastcgi_temp_path {r}/fcgi;\n uwsgi_temp_path {r}/uwsgi;\n scgi_temp_path {r}/scgi;\n\
         server {{ listen 127.0.0.1:{plain}; {location} }}\n\
         server {{ listen 127.0.0.1:{tls} ssl; ssl_certificate {c}; ssl_certificate_key {k}; {location} }}\n}}\n",
        r = root.display(),
        c = cert.display(),
        k = key.display(),
    );
    let path = root.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let proc = Proc::spawn(
        "nginx",
        Command::new(find_tool("nginx").unwrap())
            .arg("-p")
            .arg(&root)
            .arg("-c")
            .arg(&path),
        dir,
    );
    let up = wait_for(UP, || {
        (TcpStream::connect(("127.0.0.1", plain)).is_ok()
            && TcpStream::connect(("127.0.0.1", tls)).is_ok())
        .then_some(())
    });
    assert!(
        up.is_some(),
        "nginx did not start: {}{}",
        proc.log(),
        std::fs::read_to_string(root.join("error.log")).unwrap_or_default()
    );
    proc
}

/// Connects to `127.0.0.1:port` from the loopback address `source` (127.0.0.2, ...), as a
/// machine of its own would.
async fn connect_from(source: Ipv4Addr, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
}

/// A port on 127.0.0.1 whose connections are carried to `127.0.0.1:target` from `source`: an
/// agent dialling it reaches the relay (or nginx) from an address of its own. Runs until the
/// test ends.
fn forward_from(source: Ipv4Addr, target: u16) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(mut out) = connect_from(source, target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        })
    });
    port
}

/// One WebSocket connection from `source` to `port` that upgrades (with the `extra` header
/// lines) and then sends garbage where the agent link's TLS belongs. Whether the upgrade was
/// accepted; the relay's answer to the garbage is awaited (it closes).
fn garbage_over_ws(source: Ipv4Addr, port: u16, extra: &str) -> bool {
    let mut s = block_on(async {
        let s = connect_from(source, port)
            .await
            .unwrap()
            .into_std()
            .unwrap();
        s.set_nonblocking(false).unwrap();
        s
    });
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let request = format!(
        "GET /jumpgate HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let head = read_until(&mut s, "\r\n\r\n");
    if !head.starts_with("HTTP/1.1 101") {
        return false;
    }
    // One masked binary frame (mask 0): a TLS record header announcing garbage.
    let payload = b"\x16\x03\x01\x00\x10not a client hello";
    let mut frame = vec![0x82, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    let _ = s.write_all(&frame);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    true
}

/// The address `/api/agents` shows for agent `name`.
fn remote_of(relay: &Relay, name: &str) -> String {
    let (status, body) = relay.admin("GET", "/api/agents");
    assert_eq!(status, 200, "{body}");
    let agents: serde_json::Value = serde_json::from_str(&body).unwrap();
    agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no agent {name} in {body}"))["remote"]
        .as_str()
        .unwrap()
        .to_string()
}

/// An agent reaching the relay at `server` (a ws:// or wss:// URL), trusting it by pin.
fn ws_agent(
    dir: &Path,
    relay: &Relay,
    sshd: &Sshd,
    name: &str,
    server: &str,
    ca: Option<&Path>,
) -> Proc {
    let mut agent = Agent::builder(dir, name)
        .server(server)
        .token_file(&relay.token_file())
        .fingerprint(&relay.fingerprint())
        .target(sshd.port)
        .args(["--proxy", "none"]);
    if let Some(ca) = ca {
        agent = agent.env("SSL_CERT_FILE", ca);
    }
    agent.start().proc
}

/// scp of `size` bytes up to the worker and back down through `port`, hashes compared.
fn scp_both_ways(dir: &Path, sshd: &Sshd, port: u16, size: usize, tag: &str) {
    let src = dir.join(format!("{tag}-src.bin"));
    let hash = random_file(&src, size);
    let up: PathBuf = dir.join(format!("{tag}-up.bin"));
    let down = dir.join(format!("{tag}-down.bin"));
    let started = Instant::now();
    for (from, to) in [
        (
            src.display().to_string(),
            format!("root@127.0.0.1:{}", up.display()),
        ),
        (
            format!("root@127.0.0.1:{}", up.display()),
            down.display().to_string(),
        ),
    ] {
        ok_stdout(
            &Command::new("scp")
                .args(sshd.client_opts())
                .args(["-P", &port.to_string(), &from, &to])
                .output()
                .unwrap(),
        );
    }
    eprintln!(
        "{tag}: scp of {} MiB up and down in {:?}",
        size >> 20,
        started.elapsed()
    );
    assert_eq!(sha256_file(&up), hash);
    assert_eq!(sha256_file(&down), hash);
}

#[test]
fn agents_reach_a_relay_behind_nginx_over_websocket_and_survive_its_restart() {
    if !require_tool("nginx", "nginx-light") {
        return;
    }
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "ws");
    let ws_port = free_port();
    let mut relay = Relay::start(
        dir.path(),
        port_range(4),
        &[
            "--ws-listen",
            &format!("127.0.0.1:{ws_port}"),
            "--heartbeat-interval",
            "1s",
            "--heartbeat-timeout",
            "4s",
        ],
    );
    relay.proc.wait_log(
        &format!("agents accepted as WebSocket on http://127.0.0.1:{ws_port}/jumpgate"),
        UP,
    );
    let ca = TestCa::new(dir.path(), "ingress");
    let (cert, key) = ca.issue_server(dir.path(), "localhost");
    let (plain, tls) = (free_port(), free_port());
    let _nginx = nginx(dir.path(), ws_port, plain, tls, &cert, &key);

    // ws:// through nginx, which sees HTTP only.
    let a = ws_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-ws",
        &format!("ws://127.0.0.1:{plain}/jumpgate"),
        None,
    );
    let port = enabled_port(&a);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo over-ws")).trim(),
        "over-ws"
    );
    scp_both_ways(dir.path(), &sshd, port, 64 << 20, "ws");

    // wss:// with TLS terminated at nginx (its certificate from the test CA, trusted through
    // SSL_CERT_FILE); the relay's own certificate is still checked by pin inside.
    let b = ws_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-wss",
        &format!("wss://localhost:{tls}/jumpgate"),
        Some(&ca.cert_path),
    );
    let port_b = enabled_port(&b);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port_b, "echo over-wss")).trim(),
        "over-wss"
    );
    scp_both_ways(dir.path(), &sshd, port_b, 8 << 20, "wss");

    // A wrong path is a clear error naming the endpoint.
    let c = ws_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-ws-path",
        &format!("ws://127.0.0.1:{plain}/nothing"),
        None,
    );
    c.wait_log(&format!("WebSocket endpoint ws://127.0.0.1:{plain}/nothing: refused the WebSocket upgrade: HTTP 404"), UP);

    // kill -9 and back on the same ports: both agents return to their ports.
    relay.kill_and_restart();
    for (agent, port, name) in [(&a, port, "vh-ws"), (&b, port_b, "vh-wss")] {
        relay
            .proc
            .wait_log(&format!("new tunnel [{name}] ssh on :{port}"), UP);
        let back = wait_for(UP, || {
            sshd.ssh("127.0.0.1", port, "echo back")
                .status
                .success()
                .then_some(())
        });
        assert!(
            back.is_some(),
            "{name} never came back on :{port}: {}",
            agent.log()
        );
    }
}

#[test]
fn hostile_input_on_the_websocket_port_is_capped_and_timed_out() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "wshostile");
    let ws_port = free_port();
    let relay = Relay::start(
        dir.path(),
        port_range(2),
        &["--ws-listen", &format!("127.0.0.1:{ws_port}")],
    );
    relay.proc.wait_log("agents accepted as WebSocket", UP);
    let addr = format!("127.0.0.1:{ws_port}");

    // Garbage instead of an HTTP request: closed (with an HTTP error at most).
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&[
        0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3, b'\r', b'\n', b'\r', b'\n',
    ])
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("101"),
        "{answer:?}"
    );

    // An upgrade at the wrong path: 404.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(
        b"GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 404");

    // A flood of slow upgrades (half a request line each): beyond the cap new connections are
    // closed at once; every slow one is closed by the handshake timeout (10 s).
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /jumpgate HTTP/1.1\r\nHo").unwrap();
            s
        })
        .collect();
    let mut closed_at_once = 0;
    for s in slow.iter_mut().rev().take(40) {
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => closed_at_once += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed_at_once += 1,
            _ => {}
        }
    }
    eprintln!("of the last 40 slow upgrades, {closed_at_once} were closed at once");
    // One source holds at most 128 handshakes (a quarter of max_handshakes, at most 128): the
    // last 40 of 300 are all over that cap.
    assert_eq!(
        closed_at_once, 40,
        "the cap on upgrades in progress did not hold"
    );
    // Every slow upgrade is read to its end, not just the first few: the relay starts each
    // one's timeout when it accepts it, and on a loaded machine accepting 300 connections takes
    // a while. One this side dropped before its timeout counts as a client that gave up (a
    // health check), not as a timed-out upgrade, and the ban below would depend on the race.
    for s in slow.iter_mut() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 64];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    let took = started.elapsed();
    eprintln!("slow upgrades closed after {took:?}");
    assert!(
        took < Duration::from_secs(20),
        "slow upgrades held for {took:?}"
    );
    drop(slow);
    // Failed and timed-out upgrades count towards a ban as failed agent handshakes do: the
    // flooder (past the timeouts forgiven) is banned.
    relay.proc.wait_log("banning 127.0.0.1 for", UP);

    // The relay still serves a WebSocket agent from another address and its log shows no panic.
    let via_worker = forward_from(Ipv4Addr::new(127, 0, 0, 2), ws_port);
    let a = ws_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-ws-after",
        &format!("ws://127.0.0.1:{via_worker}/jumpgate"),
        None,
    );
    let port = enabled_port(&a);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo fine")).trim(),
        "fine"
    );
    assert!(
        !relay.proc.log().contains("panicked"),
        "{}",
        relay.proc.log()
    );
}

/// A WebSocket agent is seen at its own address (admin API), not at loopback; a guesser sending
/// garbage TLS inside WebSocket upgrades from another address is banned, and closed before any
/// upgrade from then on, while workers from other addresses keep connecting over WebSocket.
#[test]
fn websocket_agents_are_seen_at_their_address_and_a_guesser_is_banned_alone() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "wsaddr");
    let ws_port = free_port();
    let relay = Relay::start(
        dir.path(),
        port_range(4),
        &[
            "--ws-listen",
            &format!("127.0.0.1:{ws_port}"),
            "--auth-failure-limit",
            "3",
        ],
    );
    relay.proc.wait_log("agents accepted as WebSocket", UP);
    let worker = Ipv4Addr::new(127, 0, 0, 2);
    let guesser = Ipv4Addr::new(127, 0, 0, 3);
    let via_worker = forward_from(worker, ws_port);

    let a = ws_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-ws-addr",
        &format!("ws://127.0.0.1:{via_worker}/jumpgate"),
        None,
    );
    let port = enabled_port(&a);
    let remote = remote_of(&relay, "vh-ws-addr");
    assert!(remote.starts_with("127.0.0.2:"), "seen at {remote}");
    assert!(
        relay.proc.log().contains("via=\"websocket\"")
            || relay.proc.log().contains("via=websocket"),
        "the session's log lines do not say it came over WebSocket: {}",
        relay.proc.log()
    );

    let mut upgrades = 0;
    let banned = wait_for(UP, || {
        if !garbage_over_ws(guesser, ws_port, "") {
            return Some(());
        }
        upgrades += 1;
        None
    });
    assert!(banned.is_some(), "the guesser was never refused an upgrade");
    eprintln!("the guesser was refused after {upgrades} upgrades with garbage inside");
    assert!(upgrades >= 3, "refused after {upgrades} upgrades");
    relay
        .proc
        .wait_log("banning 127.0.0.3 for", Duration::from_secs(5));
    assert!(
        !relay.proc.log().contains("banning 127.0.0.1 ")
            && !relay.proc.log().contains("banning 127.0.0.2 "),
        "{}",
        relay.proc.log()
    );

    // The worker's session lives on, and a new worker from another address connects.
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo still")).trim(),
        "still"
    );
    let b = ws_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-ws-addr-b",
        &format!("ws://127.0.0.1:{via_worker}/jumpgate"),
        None,
    );
    let port_b = enabled_port(&b);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port_b, "echo after-ban")).trim(),
        "after-ban"
    );
}

/// Behind nginx: with `ws_trusted_proxies` naming nginx, the relay sees the client nginx names
/// in X-Forwarded-For (the right-most untrusted entry, so a client's own header cannot choose
/// the address that is banned); without it, nginx's own address, whatever the header says.
#[test]
fn behind_a_trusted_ingress_the_forwarded_address_is_seen() {
    if !require_tool("nginx", "nginx-light") {
        return;
    }
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "wsfwd");
    let ca = TestCa::new(dir.path(), "ingress");
    let (cert, key) = ca.issue_server(dir.path(), "localhost");
    let worker = Ipv4Addr::new(127, 0, 0, 2);
    let guesser = Ipv4Addr::new(127, 0, 0, 3);

    for trusted in [true, false] {
        let sub = dir
            .path()
            .join(if trusted { "trusted" } else { "untrusted" });
        std::fs::create_dir_all(&sub).unwrap();
        let ws_port = free_port();
        let mut flags = vec![
            "--ws-listen".to_string(),
            format!("127.0.0.1:{ws_port}"),
            "--auth-failure-limit".into(),
            "3".into(),
        ];
        if trusted {
            flags.extend(["--ws-trusted-proxies".into(), "127.0.0.1/32".into()]);
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let relay = Relay::start(&sub, port_range(2), &flags);
        relay.proc.wait_log("agents accepted as WebSocket", UP);
        let (plain, tls) = (free_port(), free_port());
        let _nginx = nginx(&sub, ws_port, plain, tls, &cert, &key);
        let via_worker = forward_from(worker, plain);
        let name = if trusted { "vh-fwd-t" } else { "vh-fwd-u" };
        let a = ws_agent(
            &sub,
            &relay,
            &sshd,
            name,
            &format!("ws://127.0.0.1:{via_worker}/jumpgate"),
            None,
        );
        let port = enabled_port(&a);
        assert_eq!(
            ok_stdout(&sshd.ssh("127.0.0.1", port, "echo fwd")).trim(),
            "fwd"
        );
        let remote = remote_of(&relay, name);
        eprintln!("trusted={trusted}: the agent is seen at {remote}");
        if trusted {
            assert_eq!(remote, "127.0.0.2:0");
        } else {
            assert!(remote.starts_with("127.0.0.1:"), "seen at {remote}");
        }
        if !trusted {
            continue;
        }
        // A guesser through nginx writing its own X-Forwarded-For: nginx appends the address it
        // saw, and that one is banned, not the one the guesser wrote.
        let via_guesser = forward_from(guesser, plain);
        for _ in 0..3 {
            assert!(garbage_over_ws(
                Ipv4Addr::LOCALHOST,
                via_guesser,
                "X-Forwarded-For: 10.9.9.9\r\n"
            ));
        }
        relay.proc.wait_log("banning 127.0.0.3 for", UP);
        assert!(
            !relay.proc.log().contains("banning 10.9.9.9"),
            "{}",
            relay.proc.log()
        );
        // The worker behind the same ingress is not touched by that ban.
        assert_eq!(
            ok_stdout(&sshd.ssh("127.0.0.1", port, "echo spared")).trim(),
            "spared"
        );
    }
}

/// Two relays sharing a PostgreSQL lease store, each with a WebSocket endpoint it advertises
/// (`ws_public_url`): an agent given only relay A's `ws://` URL learns relay B from the fleet
/// and reaches it at B's WebSocket URL too. Both sessions are live (admin API of each, ssh
/// through each) and both came over WebSocket (each relay's session log says so).
#[test]
fn a_websocket_agent_reaches_every_relay_of_the_fleet_over_websocket() {
    if !Postgres::available() || !require_tool("ssh", "openssh-client") {
        return;
    }
    let dir = scratch();
    let pg = Postgres::start(dir.path());
    let sshd = Sshd::start(dir.path(), "wsfleet");
    let token = dir.path().join("fleet-token");
    write_secret(&token, "fleet-shared-token-0123456789abcdef");
    let range = port_range(4);
    let relays: Vec<(Relay, String)> = ["127.0.0.1", "127.0.0.2"]
        .iter()
        .map(|ip| {
            let ws = format!("{ip}:{}", free_port());
            let url = format!("ws://{ws}/jumpgate");
            let relay = Relay::builder(&dir.path().join(format!("relay-{ip}")))
                .listen(&format!("{ip}:{}", free_port()))
                .range(range)
                .store_postgres(&pg)
                .args(["--proxy-bind", ip, "--token-file"])
                .arg(&token)
                .args(["--relay-id", &format!("relay-{ip}")])
                .args(["--ws-listen", &ws, "--ws-public-url", &url])
                .start();
            relay.proc.wait_log("agents accepted as WebSocket", UP);
            (relay, url)
        })
        .collect();
    let agent = relays
        .iter()
        .fold(Agent::builder(dir.path(), "fleet-ws"), |a, (r, _)| {
            a.fingerprint_of(&r.state_dir)
        })
        .server(&relays[0].1)
        .args(["--proxy", "none"])
        .token_file(&token)
        .target(sshd.port)
        .start();
    for (relay, url) in &relays {
        let over_ws = wait_for(UP, || {
            relay
                .proc
                .log()
                .lines()
                .any(|l| l.contains("new tunnel [fleet-ws]") && l.contains("websocket"))
                .then_some(())
        });
        assert!(
            over_ws.is_some(),
            "no session over WebSocket on the relay at {url}: relay log:\n{}\nagent log:\n{}",
            relay.proc.log(),
            agent.proc.log()
        );
        assert!(
            !relay
                .proc
                .log()
                .lines()
                .any(|l| l.contains("new tunnel [fleet-ws]") && l.contains("\"tls\"")),
            "a session came to the agent port: {}",
            relay.proc.log()
        );
        let remote = remote_of(relay, "fleet-ws");
        eprintln!("{url}: the agent's session from {remote}");
    }
    // The agent dialled relay B at its WebSocket endpoint, learned from relay A.
    let b_endpoint = relays[1]
        .1
        .trim_start_matches("ws://")
        .trim_end_matches("/jumpgate");
    assert!(
        agent.proc.log().contains(&format!(
            "relay learned from the fleet; connecting relay={b_endpoint}"
        )),
        "{}",
        agent.proc.log()
    );
    let port = {
        let log = relays[1].0.proc.log();
        let line = log
            .lines()
            .find(|l| l.contains("new tunnel [fleet-ws] ssh on :"))
            .unwrap()
            .to_string();
        let after = line.split("ssh on :").nth(1).unwrap();
        after
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let out = wait_for(UP, || {
            let out = sshd.ssh(ip, port, &format!("echo via-{ip}"));
            out.status.success().then_some(out)
        })
        .unwrap_or_else(|| panic!("no ssh through {ip}:{port}"));
        assert_eq!(ok_stdout(&out).trim(), format!("via-{ip}"));
    }
}

/// Sends `request` on a new connection from `source` to the WebSocket port and returns what the
/// relay answered before closing (empty: closed without a word, as a banned address is).
fn failed_upgrade(source: Ipv4Addr, port: u16, request: &str) -> String {
    let mut s = block_on(async {
        let s = connect_from(source, port)
            .await
            .unwrap()
            .into_std()
            .unwrap();
        s.set_nonblocking(false).unwrap();
        s
    });
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(request.as_bytes());
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Failed upgrades of every kind (a wrong path, not an upgrade, a bad key, garbage) count
/// towards a ban of the sender, as failed agent handshakes do: the sender is banned and closed
/// at accept, while a WebSocket agent from another address keeps working and connecting. Behind
/// a trusted ingress the client it names is banned, never the ingress itself.
#[test]
fn failed_upgrades_get_their_sender_banned_and_spare_other_addresses() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "wsfail");
    let ws_port = free_port();
    let relay = Relay::start(
        dir.path(),
        port_range(4),
        &[
            "--ws-listen",
            &format!("127.0.0.1:{ws_port}"),
            "--ws-trusted-proxies",
            "127.0.0.4/32",
            "--auth-failure-limit",
            "4",
        ],
    );
    relay.proc.wait_log("agents accepted as WebSocket", UP);
    let worker = Ipv4Addr::new(127, 0, 0, 2);
    let guesser = Ipv4Addr::new(127, 0, 0, 3);
    let ingress = Ipv4Addr::new(127, 0, 0, 4);
    let via_worker = forward_from(worker, ws_port);
    let a = ws_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-ws-fail",
        &format!("ws://127.0.0.1:{via_worker}/jumpgate"),
        None,
    );
    let port = enabled_port(&a);

    let upgrade = |path: &str, key: &str, extra: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\n{key}{extra}\r\n"
        )
    };
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let kinds = [
        upgrade("/wrong", key, ""),
        "GET /jumpgate HTTP/1.1\r\nHost: relay\r\n\r\n".to_string(),
        upgrade("/jumpgate", "", ""),
        "\x16\x03\x01\x02\x00garbage, not HTTP\r\n\r\n".to_string(),
    ];
    // Before the ban, a wrong path is answered 404; the fourth failure bans.
    assert!(failed_upgrade(guesser, ws_port, &kinds[0]).starts_with("HTTP/1.1 404"));
    for kind in &kinds[1..] {
        let answer = failed_upgrade(guesser, ws_port, kind);
        assert!(!answer.starts_with("HTTP/1.1 101"), "{answer}");
    }
    relay.proc.wait_log("banning 127.0.0.3 for", UP);
    assert_eq!(
        failed_upgrade(guesser, ws_port, &kinds[0]),
        "",
        "a banned address is closed at accept"
    );
    assert!(
        !relay.proc.log().contains("banning 127.0.0.1 ")
            && !relay.proc.log().contains("banning 127.0.0.2 "),
        "{}",
        relay.proc.log()
    );

    // The ingress names the client in X-Forwarded-For: that client is banned, not the ingress.
    let named = "X-Forwarded-For: 127.0.0.6\r\n";
    for _ in 0..4 {
        let answer = failed_upgrade(ingress, ws_port, &upgrade("/wrong", key, named));
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    }
    relay.proc.wait_log("banning 127.0.0.6 for", UP);
    // Requests too broken to name anyone count against no one (the ingress is never banned).
    for _ in 0..6 {
        failed_upgrade(ingress, ws_port, &kinds[3]);
    }
    let answer = failed_upgrade(ingress, ws_port, &upgrade("/wrong", key, ""));
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(
        !relay.proc.log().contains("banning 127.0.0.4 "),
        "{}",
        relay.proc.log()
    );

    // The worker's session lives on, and a new worker from its address connects over WebSocket.
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo still")).trim(),
        "still"
    );
    let b = ws_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-ws-fail-b",
        &format!("ws://127.0.0.1:{via_worker}/jumpgate"),
        None,
    );
    let port_b = enabled_port(&b);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port_b, "echo after-ban")).trim(),
        "after-ban"
    );
}

/// A static fleet (no shared store): relay A lists relay B in `peers` with B's WebSocket URL, so
/// an agent that reached A over WebSocket dials B over WebSocket too, not B's agent port.
#[test]
fn static_peers_carry_their_websocket_url_to_websocket_agents() {
    if !require_tool("ssh", "openssh-client") {
        return;
    }
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "wsstatic");
    let token = dir.path().join("fleet-token");
    write_secret(&token, "static-fleet-token-0123456789abcdef");
    let (ws_a, ws_b) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let (url_a, url_b) = (
        format!("ws://{ws_a}/jumpgate"),
        format!("ws://{ws_b}/jumpgate"),
    );
    let listen_b = format!("127.0.0.1:{}", free_port());
    let b = Relay::builder(&dir.path().join("relay-b"))
        .listen(&listen_b)
        .range(port_range(2))
        .args(["--token-file"])
        .arg(&token)
        .args(["--ws-listen", &ws_b, "--ws-public-url", &url_b])
        .start();
    let a = Relay::builder(&dir.path().join("relay-a"))
        .range(port_range(2))
        .args(["--token-file"])
        .arg(&token)
        .args(["--ws-listen", &ws_a, "--ws-public-url", &url_a])
        .args(["--peers", &format!("{listen_b} {url_b}")])
        .start();
    for relay in [&a, &b] {
        relay.proc.wait_log("agents accepted as WebSocket", UP);
    }
    let agent = Agent::builder(dir.path(), "static-ws")
        .fingerprint_of(&a.state_dir)
        .fingerprint_of(&b.state_dir)
        .server(&url_a)
        .args(["--proxy", "none"])
        .token_file(&token)
        .target(sshd.port)
        .start();
    for relay in [&a, &b] {
        let over_ws = wait_for(UP, || {
            relay
                .proc
                .log()
                .lines()
                .any(|l| l.contains("new tunnel [static-ws]") && l.contains("websocket"))
                .then_some(())
        });
        assert!(
            over_ws.is_some(),
            "no session over WebSocket: relay log:\n{}\nagent log:\n{}",
            relay.proc.log(),
            agent.proc.log()
        );
    }
    assert!(
        !b.proc
            .log()
            .lines()
            .any(|l| l.contains("new tunnel [static-ws]") && l.contains("\"tls\"")),
        "a session came to B's agent port: {}",
        b.proc.log()
    );
    assert!(
        agent.proc.log().contains(&format!(
            "relay learned from the fleet; connecting relay={ws_b}"
        )),
        "{}",
        agent.proc.log()
    );
    // ssh reaches the job through B, whose session runs over WebSocket.
    let port = {
        let log = b.proc.log();
        let line = log
            .lines()
            .find(|l| l.contains("new tunnel [static-ws] ssh on :"))
            .unwrap()
            .to_string();
        let after = line.split("ssh on :").nth(1).unwrap();
        after
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo via-b")).trim(),
        "via-b"
    );
}
