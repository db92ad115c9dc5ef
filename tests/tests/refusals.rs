//! Each way an agent can be turned away gives its specific, plain-worded error.

use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(20);

#[test]
fn wrong_token_stops_the_agent_with_a_clear_error() {
    let dir = scratch();
    let relay = Relay::start(dir.path(), port_range(3), &[]);
    let bad = dir.path().join("bad-token");
    write_secret(&bad, "not-the-token\n");
    let mut agent = Agent::start(
        dir.path(),
        &relay,
        "intruder",
        22,
        &["--token-file", bad.to_str().unwrap()],
    );
    let status = agent
        .proc
        .wait_exit(UP)
        .expect("agent kept running with a wrong token");
    assert_eq!(status.code(), Some(77));
    let log = agent.proc.log();
    assert!(log.contains("authentication failed"), "{log}");
    assert!(!log.contains("not-the-token"));
    relay
        .proc
        .wait_log("agent refused: authentication failed", UP);
}

// A wrong fingerprint no longer stops the agent: it is retried with a long backoff, see
// agent_resilience.rs.

#[test]
fn exhausted_range_is_reported_not_hung() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "x");
    let range = port_range(2);
    let relay = Relay::start(dir.path(), range, &[]);
    let a = Agent::start(dir.path(), &relay, "first", sshd.port, &[]);
    let b = Agent::start(dir.path(), &relay, "second", sshd.port, &[]);
    a.wait_port(UP);
    b.wait_port(UP);
    let c = Agent::start(dir.path(), &relay, "third", sshd.port, &[]);
    let msg = format!("port range {}-{} exhausted (2 in use)", range.0, range.1);
    c.proc.wait_log(&msg, UP);
    relay.proc.wait_log(&msg, UP);
}
