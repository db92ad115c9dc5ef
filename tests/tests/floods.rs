//! Floods and bans that do not lock out the workers: one address holding a thousand idle
//! connections does not delay an agent from elsewhere, and garbage from an address real agents
//! use does not get that address banned.

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use jumpgate_proto::{Refusal, RelayHello};
use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

/// Lets this test process (and the relay it starts) hold a few thousand sockets; `false` when
/// prlimit is missing outside CI (the test is then skipped, with the reason printed).
fn raise_fd_limit() -> bool {
    if !require_tool("prlimit", "util-linux") {
        return false;
    }
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            "--nofile=8192:8192",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "prlimit failed: {out:?}");
    true
}

#[test]
fn idle_connections_from_one_address_do_not_delay_agents_from_another() {
    if !raise_fd_limit() {
        return;
    }
    let dir = scratch();
    let relay = Relay::start(dir.path(), port_range(4), &[]);
    let token = std::fs::read_to_string(relay.token_file()).unwrap();
    let addr: std::net::SocketAddr = relay.listen.parse().unwrap();

    // 1,100 connections from 127.0.0.2 that never send a byte. Past 128 of them its own
    // per-source cap closes the rest at once (the global cap of 1,024 is never reached here:
    // `the_global_handshake_cap_holds_across_source_addresses` is about that one).
    let slowloris = block_on(async move {
        let mut held = Vec::new();
        for _ in 0..1100 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            if let Ok(s) = socket.connect(addr).await {
                held.push(s.into_std().unwrap());
            }
        }
        held
    });
    assert!(
        slowloris.len() > 1024,
        "only {} connections",
        slowloris.len()
    );
    relay
        .proc
        .wait_log("too many agent handshakes in progress from 127.0.0.2", UP);

    let began = Instant::now();
    let reply = block_on(raw::exchange(
        &relay.listen,
        &relay.fingerprint(),
        &raw::hello("elsewhere-1", token.trim(), (1, 1)),
    ));
    let took = began.elapsed();
    assert!(matches!(reply, RelayHello::Accepted(_)), "{reply:?}");
    assert!(
        took < Duration::from_secs(1),
        "an agent from another address waited {took:?}"
    );
    drop(slowloris);
}

/// With `--max-handshakes 8`, eight idle connections spread over four addresses (two each, far
/// under the per-source cap) fill the relay's handshakes in progress: a ninth, from a fifth
/// address, is closed at once, by the global cap. Once they leave, agents get in again.
#[test]
fn the_global_handshake_cap_holds_across_source_addresses() {
    let dir = scratch();
    let relay = Relay::start(dir.path(), port_range(4), &["--max-handshakes", "8"]);
    let token = std::fs::read_to_string(relay.token_file()).unwrap();
    let addr: std::net::SocketAddr = relay.listen.parse().unwrap();
    let connect_from = move |source: &str| -> TcpStream {
        let source: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
        block_on(async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(source).unwrap();
            let s = socket.connect(addr).await.unwrap().into_std().unwrap();
            s.set_nonblocking(false).unwrap();
            s
        })
    };
    let held: Vec<TcpStream> = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
        .iter()
        .flat_map(|ip| [connect_from(ip), connect_from(ip)])
        .collect();
    // The relay accepts in order, so the eight are its handshakes in progress when it takes
    // this one; a relay without the global cap would wait 10 s for its TLS hello instead.
    let mut ninth = connect_from("127.0.0.6");
    if let Err(what) = closed_within(&mut ninth, Duration::from_secs(1)) {
        panic!(
            "a ninth handshake was not closed at once: {what}\n{}",
            relay.proc.log()
        );
    }
    relay.proc.wait_log(
        "too many agent handshakes in progress; closing new connections",
        UP,
    );
    assert_eq!(
        count(
            &relay.proc.log(),
            "too many agent handshakes in progress from"
        ),
        0,
        "the per-source cap closed it, not the global one:\n{}",
        relay.proc.log()
    );
    // The held connections keep their slots meanwhile (none was closed by the cap).
    for (i, c) in held.iter().enumerate() {
        let mut c = c.try_clone().unwrap();
        assert!(
            closed_within(&mut c, Duration::from_millis(100)).is_err(),
            "held connection {i} was closed"
        );
    }
    drop(held);
    wait_until("the relay to take handshakes again", UP, || {
        let mut probe = connect_from("127.0.0.6");
        closed_within(&mut probe, Duration::from_millis(300))
            .is_err()
            .then_some(())
    });
    let reply = block_on(raw::exchange(
        &relay.listen,
        &relay.fingerprint(),
        &raw::hello("after-the-flood", token.trim(), (1, 1)),
    ));
    assert!(matches!(reply, RelayHello::Accepted(_)), "{reply:?}");
}

#[test]
fn garbage_from_a_shared_nat_address_does_not_lock_its_workers_out() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "nat-ban");
    let relay = Relay::start(
        dir.path(),
        port_range(6),
        &["--auth-failure-limit", "3", "--auth-ban", "60s"],
    );
    // A real worker behind the "NAT" (everything here comes from 127.0.0.1).
    let worker = Agent::start(dir.path(), &relay, "nat-1", sshd.port, &[]);
    let port = worker.wait_port(UP);
    let mut session = EchoSession::start(&sshd, port);

    // Another job on the same address guesses tokens.
    guess_tokens(&relay, 10);
    assert_eq!(
        count(&relay.proc.log(), "banning 127.0.0.1"),
        0,
        "{}",
        relay.proc.log()
    );

    // A new worker from that address still gets in, quickly.
    let began = Instant::now();
    let newcomer = Agent::start(dir.path(), &relay, "nat-2", sshd.port, &[]);
    newcomer.wait_port(Duration::from_secs(15));
    eprintln!(
        "new worker behind the noisy address connected after {:?}",
        began.elapsed()
    );
    session.send(32);
    session.finish();
}

/// Addresses the operator lists in `--ban-exempt-cidr` are never banned, even before any agent
/// authenticated from them (a worker NAT whose first connections are a misbehaving job's).
#[test]
fn an_exempt_address_is_never_banned() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "exempt");
    let relay = Relay::start(
        dir.path(),
        port_range(4),
        &[
            "--auth-failure-limit",
            "3",
            "--auth-ban",
            "60s",
            "--ban-exempt-cidr",
            "127.0.0.0/8",
        ],
    );
    guess_tokens(&relay, 10);
    assert_eq!(
        count(&relay.proc.log(), "banning"),
        0,
        "{}",
        relay.proc.log()
    );
    let worker = Agent::start(dir.path(), &relay, "first-worker", sshd.port, &[]);
    worker.wait_port(Duration::from_secs(15));
}

/// `times` hellos with a guessed token from 127.0.0.1, each refused as unauthorized.
fn guess_tokens(relay: &Relay, times: usize) {
    let (addr, pin) = (relay.listen.clone(), relay.fingerprint());
    for i in 0..times {
        let reply = block_on(raw::exchange(
            &addr,
            &pin,
            &raw::hello(&format!("guess-{i}"), "guessed-token-xxxxxx", (1, 1)),
        ));
        assert_eq!(reply, RelayHello::Refused(Refusal::Unauthorized));
    }
}
