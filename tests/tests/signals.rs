//! A second SIGTERM cuts the relay's drain short without skipping its audit log: the connection
//! still open is closed at once, recorded, and the relay exits 0 (it used to `exit(1)` on the
//! spot, losing the record).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

#[test]
fn second_sigterm_cuts_the_drain_short_and_still_flushes_the_audit_log() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "hurry");
    let audit = dir.path().join("audit.jsonl");
    let mut relay = Relay::start(
        dir.path(),
        port_range(3),
        &[
            "--drain-timeout",
            "120s",
            "--audit-log",
            audit.to_str().unwrap(),
        ],
    );
    let agent = Agent::start(dir.path(), &relay, "hurried", sshd.port, &[]);
    let port = agent.wait_port(UP);

    // A user session that would keep the drain waiting for two minutes.
    let mut ssh = Command::new("ssh")
        .args(sshd.client_opts())
        .args([
            "-p",
            &port.to_string(),
            "root@127.0.0.1",
            "echo up; sleep 120",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(ssh.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "up");

    relay.proc.signal("TERM");
    relay
        .proc
        .wait_log("no longer accepting; draining open connections", UP);
    let hurried = Instant::now();
    relay.proc.signal("TERM");
    let code = relay.proc.wait_exit(UP).and_then(|s| s.code());
    let _ = ssh.kill();
    let _ = ssh.wait();
    let log = relay.proc.log();
    assert_eq!(code, Some(0), "log:\n{log}");
    assert!(
        hurried.elapsed() < Duration::from_secs(20),
        "took {:?}",
        hurried.elapsed()
    );
    assert!(log.contains("drain cut short"), "{log}");
    assert!(log.contains("relay stopped"), "{log}");
    let records = std::fs::read_to_string(&audit).unwrap_or_default();
    assert!(
        records.contains("\"agent\":\"hurried\""),
        "the cut connection must be audited; audit log: {records:?}\nrelay log:\n{log}"
    );
}
