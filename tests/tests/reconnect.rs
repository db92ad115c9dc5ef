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
    agent.wait_port(UP);
    agent.proc.signal("TERM");
    assert_eq!(agent.proc.wait_exit(UP).and_then(|s| s.code()), Some(0));
    relay.proc.wait_log("agent is stopping", UP);
    relay.proc.signal("TERM");
    assert_eq!(relay.proc.wait_exit(UP).and_then(|s| s.code()), Some(0));
    assert!(relay.proc.log().contains("relay stopped"));
}
