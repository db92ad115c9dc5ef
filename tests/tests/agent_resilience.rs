//! The agent under attack: a relay it cannot authenticate is retried slowly and loudly, never
//! given up on for good; a relay that turns it away only stops its own link; a wrong token is
//! still final.

use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(20);
/// The first retry after a verification failure comes 15-30 s later (`SUSPICIOUS_BASE` with
/// jitter); this leaves room for a busy machine.
const SLOW_RETRY: Duration = Duration::from_secs(60);
const MISMATCH: &str = "matches none of the pinned fingerprints";

/// An impostor answers at the relay's address (a DNS spoof, an on-path box): the agent logs the
/// mismatch at ERROR with both pins, keeps running, does not hammer, and connects once the real
/// relay is back at that address.
#[test]
fn certificate_mismatch_is_retried_slowly_and_recovers() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "spoofed");
    let real = dir.path().join("real-identity");
    let real_pin = Relay::fingerprint_of(&real);
    let mut relay = Relay::start(dir.path(), port_range(3), &[]);
    let impostor_pin = relay.fingerprint();
    assert_ne!(real_pin, impostor_pin);

    let mut agent = Agent::start(
        dir.path(),
        &relay,
        "spoofed",
        sshd.port,
        &["--fingerprint", &real_pin],
    );
    agent.proc.wait_log(MISMATCH, UP);
    assert!(
        agent.proc.wait_exit(Duration::from_secs(5)).is_none(),
        "the agent exited on a certificate mismatch:\n{}",
        agent.proc.log()
    );
    let log = agent.proc.log();
    let line = log
        .lines()
        .find(|l| l.contains(MISMATCH))
        .unwrap()
        .to_string();
    assert!(line.contains("ERROR"), "not logged loudly: {line}");
    assert!(
        line.contains(&impostor_pin),
        "should name the pin seen: {line}"
    );
    assert!(
        line.contains(&real_pin),
        "should name the pin expected: {line}"
    );
    assert!(line.contains("Not exiting; retrying in"), "{line}");
    // Long backoff: one attempt in the first seconds, not a reconnect storm.
    assert_eq!(count(&log, MISMATCH), 1, "{log}");
    let status = status_json(&agent.status_file).expect("status file");
    assert_eq!(status["relays"][0]["state"], "connecting", "{status}");
    assert!(
        status["relays"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains(MISMATCH)),
        "{status}"
    );

    // The interference ends: the real relay (same address, same token) answers again.
    for file in ["tls-cert.pem", "tls-key.pem"] {
        std::fs::copy(real.join(file), relay.state_dir.join(file)).unwrap();
    }
    relay.kill_and_restart();
    assert_eq!(relay.fingerprint(), real_pin);
    let port = agent.wait_port(SLOW_RETRY);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo recovered")).trim(),
        "recovered"
    );
    assert!(agent.proc.child.try_wait().unwrap().is_none());
}

/// Two relays; the second does not accept this agent's token. The tunnel through the first keeps
/// working, the second is marked stopped and is not retried, and the agent keeps running.
#[test]
fn a_relay_that_refuses_the_token_does_not_stop_the_others() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "two");
    let (d1, d2) = (dir.path().join("good"), dir.path().join("bad"));
    let good = Relay::start(&d1, port_range(3), &[]);
    let bad = Relay::start(&d2, port_range(3), &[]);
    let (good_pin, bad_pin) = (good.fingerprint(), bad.fingerprint());
    let mut agent = Agent::start(
        dir.path(),
        &good,
        "two",
        sshd.port,
        &[
            "--server",
            &bad.listen,
            "--fingerprint",
            &good_pin,
            "--fingerprint",
            &bad_pin,
        ],
    );
    let port = agent.wait_port(UP);
    bad.proc
        .wait_log("agent refused: authentication failed", UP);
    agent
        .proc
        .wait_log("sessions to the other relays continue", UP);
    let status = wait_for(UP, || {
        let v = status_json(&agent.status_file)?;
        (v["relays"][1]["state"] == "stopped").then_some(v)
    })
    .unwrap_or_else(|| panic!("relay 2 never marked stopped:\n{}", agent.proc.log()));
    assert_eq!(status["relays"][0]["state"], "connected", "{status}");
    assert!(
        status["relays"][1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("authentication failed")),
        "{status}"
    );
    assert_eq!(status["services"].as_array().unwrap().len(), 1, "{status}");

    assert!(
        agent.proc.wait_exit(Duration::from_secs(3)).is_none(),
        "one relay's refusal ended the agent:\n{}",
        agent.proc.log()
    );
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo still-here")).trim(),
        "still-here"
    );
    // The refusing relay is not hammered: one attempt only.
    assert_eq!(
        count(&bad.proc.log(), "agent refused: authentication failed"),
        1,
        "{}",
        bad.proc.log()
    );
    let out = agent.status_cli();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("relay {}: stopped: ", bad.listen)),
        "{text}"
    );
    assert!(
        text.contains(&format!("ssh enabled on 127.0.0.1:{port}")),
        "{text}"
    );
}

/// A wrong token is final: alone it ends the agent with 77, and so it does when every relay
/// refuses it.
#[test]
fn a_wrong_token_everywhere_still_ends_the_agent_with_77() {
    let dir = scratch();
    let (d1, d2) = (dir.path().join("r1"), dir.path().join("r2"));
    let r1 = Relay::start(&d1, port_range(3), &[]);
    let r2 = Relay::start(&d2, port_range(3), &[]);
    let bad = dir.path().join("bad-token");
    write_secret(&bad, "not-the-token\n");

    let mut single = Agent::start(
        dir.path(),
        &r1,
        "single",
        22,
        &["--token-file", bad.to_str().unwrap()],
    );
    let status = single.proc.wait_exit(UP).expect("agent kept running");
    assert_eq!(status.code(), Some(77), "{}", single.proc.log());
    assert!(single.proc.log().contains("authentication failed"));

    let (p1, p2) = (r1.fingerprint(), r2.fingerprint());
    let mut both = Agent::start(
        dir.path(),
        &r1,
        "both",
        22,
        &[
            "--server",
            &r2.listen,
            "--fingerprint",
            &p1,
            "--fingerprint",
            &p2,
            "--token-file",
            bad.to_str().unwrap(),
        ],
    );
    let status = both.proc.wait_exit(UP).expect("agent kept running");
    assert_eq!(status.code(), Some(77), "{}", both.proc.log());
    let log = both.proc.log();
    assert!(log.contains("every relay turned this agent away"), "{log}");
    assert!(!log.contains("not-the-token"));
}
