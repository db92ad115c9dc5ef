//! Ports that stay put: across agent restarts, relay crashes, takeovers, and until a lease expires.

use std::process::Command;
use std::time::{Duration, Instant};

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

#[test]
fn restarted_agent_gets_the_same_port() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "s");
    let relay = Relay::start(dir.path(), port_range(10), &[]);
    let mut first = Agent::start(dir.path(), &relay, "vh-exec-7", sshd.port, &[]);
    let port = first.wait_port(UP);
    // Another agent takes a port meanwhile, so "same port" is not luck of the pool order.
    let other = Agent::start(dir.path(), &relay, "other", sshd.port, &[]);
    let other_port = other.wait_port(UP);
    first.proc.kill();
    relay.proc.wait_log("agent disconnected; lease kept", UP);
    let again = Agent::start(dir.path(), &relay, "vh-exec-7", sshd.port, &[]);
    assert_eq!(again.wait_port(UP), port);
    assert_ne!(other_port, port);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo back")).trim(),
        "back"
    );
}

#[test]
fn relay_killed_during_scp_keeps_every_lease() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "k");
    let mut relay = Relay::start(dir.path(), port_range(10), &[]);
    let agents: Vec<Agent> = ["k1", "k2", "k3"]
        .iter()
        .map(|n| Agent::start(dir.path(), &relay, n, sshd.port, &[]))
        .collect();
    let ports: Vec<u16> = agents.iter().map(|a| a.wait_port(UP)).collect();
    let port = ports[0];

    let src = dir.path().join("big.bin");
    let hash = random_file(&src, 32 << 20);
    let dst = dir.path().join("copy.bin");
    // Rate-limited so the copy is still running when the relay dies.
    let mut scp = Command::new("scp")
        .args(sshd.client_opts())
        .args(["-l", "40000", "-P", &port.to_string()])
        .arg(&src)
        .arg(format!("root@127.0.0.1:{}", dst.display()))
        .spawn()
        .unwrap();
    // The copy is under way once its first bytes have landed at the destination.
    wait_until("scp's first bytes at the destination", UP, || {
        let landed = std::fs::metadata(&dst).is_ok_and(|m| m.len() > 0);
        (landed || scp.try_wait().unwrap().is_some()).then_some(())
    });
    assert!(
        scp.try_wait().unwrap().is_none(),
        "scp finished before the crash; slow it down"
    );
    relay.kill_and_restart();
    let status = scp.wait().unwrap();
    assert!(
        !status.success(),
        "scp cannot survive the relay dying mid-copy"
    );

    for (agent, port) in agents.iter().zip(&ports) {
        let name = agent.proc.name.trim_start_matches("agent-").to_string();
        relay
            .proc
            .wait_log(&format!("new tunnel [{name}] ssh on :{port}"), UP);
    }
    let out = wait_for(UP, || {
        let out = Command::new("scp")
            .args(sshd.client_opts())
            .args(["-P", &port.to_string()])
            .arg(&src)
            .arg(format!("root@127.0.0.1:{}", dst.display()))
            .output()
            .unwrap();
        out.status.success().then_some(out)
    });
    assert!(out.is_some(), "scp never worked again");
    assert_eq!(sha256_file(&dst), hash);
}

#[test]
fn takeover_replaces_a_hung_session_at_once() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "h");
    // Long heartbeat timeout: the takeover must not wait for it.
    let relay = Relay::start(
        dir.path(),
        port_range(10),
        &["--heartbeat-interval", "20s", "--heartbeat-timeout", "60s"],
    );
    let old = Agent::start(dir.path(), &relay, "vh-exec-5", sshd.port, &[]);
    let port = old.wait_port(UP);
    old.proc.signal("STOP"); // frozen: its connection stays open but nothing answers
    let started = Instant::now();
    let new = Agent::start(dir.path(), &relay, "vh-exec-5", sshd.port, &[]);
    assert_eq!(new.wait_port(UP), port);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "takeover took {:?}",
        started.elapsed()
    );
    relay
        .proc
        .wait_log("new session for this agent replaces the one from", UP);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo taken-over")).trim(),
        "taken-over"
    );
}

#[test]
fn preferred_port_granted_taken_and_strict() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "p");
    let range = port_range(10);
    let relay = Relay::start(dir.path(), range, &[]);
    let want = range.0 + 7;
    let svc = |suffix: &str| format!("ssh=127.0.0.1:{}@{want}{suffix}", sshd.port);

    let a = Agent::start(dir.path(), &relay, "pref-a", 0, &["--service", &svc("")]);
    assert_eq!(a.wait_port(UP), want, "a free preferred port is granted");

    let b = Agent::start(dir.path(), &relay, "pref-b", 0, &["--service", &svc("")]);
    let got = b.wait_port(UP);
    assert_ne!(got, want);
    b.proc.wait_log(
        &format!("preferred port {want} is leased to another agent"),
        UP,
    );

    let mut c = Agent::start(dir.path(), &relay, "pref-c", 0, &["--service", &svc("!")]);
    let status = c
        .proc
        .wait_exit(UP)
        .expect("a strict agent must stop when its port is taken");
    assert!(!status.success());
    assert!(
        c.proc.log().contains(&format!(
            "asked strictly for port {want}, which is leased to another agent"
        )),
        "{}",
        c.proc.log()
    );
}

#[test]
fn expired_lease_frees_the_port_only_after_the_ttl() {
    // The newcomer must ask while the lease still stands: a TTL long enough for that on a busy
    // host (an agent starts and says hello in well under a second on an idle one).
    const TTL: u64 = 10;
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "e");
    let range = port_range(1);
    let relay = Relay::start(dir.path(), range, &["--lease-ttl", &format!("{TTL}s")]);
    let mut first = Agent::start(dir.path(), &relay, "leaver", sshd.port, &[]);
    // Up end to end before it is stopped, so that it stops rather than gets lost.
    let port = first.wait_serving(&sshd, UP);
    first.proc.signal("TERM");
    first
        .proc
        .wait_exit(UP)
        .expect("agent did not stop on SIGTERM");
    let left = Instant::now();
    wait_for(UP, || {
        relay.proc.log().contains("agent is stopping").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "relay never logged \"agent is stopping\"; relay log:\n{}\nagent log:\n{}",
            relay.proc.log(),
            first.proc.log()
        )
    });

    let second = Agent::start(dir.path(), &relay, "newcomer", sshd.port, &[]);
    // It asked before expiry, so it is turned away first, with the range's state.
    let refused = format!("port range {}-{} exhausted (1 in use)", range.0, range.1);
    second.proc.wait_log(&refused, UP);
    assert_eq!(second.wait_port(UP), port);
    let waited = left.elapsed();
    // Leases age in whole seconds, so a lease can end just over TTL - 1 s after the agent left.
    assert!(
        waited >= Duration::from_secs(TTL - 1),
        "port reused after {waited:?}, before the {TTL}s lease ran out"
    );
    relay
        .proc
        .wait_log("lease expired; port returns to the pool", UP);
}
