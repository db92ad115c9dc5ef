//! The agent comes back by itself after the relay dies, on the same port.

use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

#[test]
fn agent_reconnects_after_relay_is_killed_and_restarted() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "r");
    let mut relay = Relay::start(dir.path(), port_range(10), &[]);
    let agent = Agent::start(dir.path(), &relay, "vh-exec-9", sshd.port, &[]);
    let port = agent.wait_port(UP);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo one")).trim(),
        "one"
    );

    relay.kill_and_restart();
    // The restarted relay restored the lease and the agent redialled on its own.
    relay.proc.wait_log("agent connected", UP);
    relay
        .proc
        .wait_log(&format!("new tunnel [vh-exec-9] ssh on :{port}"), UP);
    let out = wait_for(UP, || {
        let out = sshd.ssh("127.0.0.1", port, "echo two");
        out.status.success().then_some(out)
    })
    .expect("ssh never worked again after the relay restart");
    assert_eq!(ok_stdout(&out).trim(), "two");
    agent.proc.wait_log("connection to relay lost", UP);
    // Still one "enabled" line: the endpoint did not change.
    assert_eq!(
        agent.proc.out().matches("ssh enabled on").count(),
        1,
        "{}",
        agent.proc.out()
    );
}

#[test]
fn sigterm_stops_relay_and_agent_cleanly() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "t");
    let mut relay = Relay::start(dir.path(), port_range(5), &["--drain-timeout", "1s"]);
    let mut agent = Agent::start(dir.path(), &relay, "stopper", sshd.port, &[]);
    // Up end to end before it is stopped, so that it stops rather than gets lost.
    agent.wait_serving(&sshd, UP);
    agent.proc.signal("TERM");
    assert_eq!(agent.proc.wait_exit(UP).and_then(|s| s.code()), Some(0));
    relay.proc.wait_log("agent is stopping", UP);
    relay.proc.signal("TERM");
    assert_eq!(relay.proc.wait_exit(UP).and_then(|s| s.code()), Some(0));
    assert!(relay.proc.log().contains("relay stopped"));
}

#[test]
fn sharded_relay_carries_sessions_on_every_thread_and_drains_on_sigterm() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "shard");
    // Two session threads: three agents land on both of them (round robin).
    let mut relay = Relay::start(
        dir.path(),
        port_range(10),
        &["--worker-threads", "2", "--drain-timeout", "5s"],
    );
    let mut agents: Vec<Agent> = ["s0", "s1", "s2"]
        .iter()
        .map(|name| Agent::start(dir.path(), &relay, name, sshd.port, &[]))
        .collect();
    let ports: Vec<u16> = agents.iter().map(|a| a.wait_port(UP)).collect();
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", relay.proc.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    for shard in ["jg-shard-0", "jg-shard-1"] {
        assert!(
            threads.iter().any(|t| t == shard),
            "{shard} missing in {threads:?}"
        );
    }
    let mut sessions: Vec<EchoSession> = ports
        .iter()
        .map(|&port| EchoSession::start(&sshd, port))
        .collect();
    for s in &mut sessions {
        s.send(200);
    }
    // One agent stops and comes back (on whichever thread it lands) on the same port; its ssh
    // session ends with it, the other two are untouched.
    let mut first = agents.remove(0);
    first.proc.signal("TERM");
    assert_eq!(first.proc.wait_exit(UP).and_then(|s| s.code()), Some(0));
    drop(sessions.remove(0));
    let again = Agent::start(dir.path(), &relay, "s0", sshd.port, &[]);
    assert_eq!(again.wait_port(UP), ports[0]);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", ports[0], "echo $JG_WHO")).trim(),
        "shard"
    );
    for s in sessions {
        s.finish();
    }
    relay.proc.signal("TERM");
    assert_eq!(relay.proc.wait_exit(UP).and_then(|s| s.code()), Some(0));
    assert!(relay.proc.log().contains("relay stopped"));
    drop(agents);
}
