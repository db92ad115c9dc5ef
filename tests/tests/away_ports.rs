//! While a job's agent is away, the relay keeps its port: users are answered at once (closed,
//! with an audit line saying the job is away) and no other process on the jump host can take the
//! port, also across a relay restart, until the lease expires or is released.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

/// Connects to `port` and returns how long the relay took to close the connection.
fn answered_in(port: u16) -> Duration {
    let began = Instant::now();
    let mut user = TcpStream::connect(("127.0.0.1", port)).expect("the away port must accept");
    user.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = user.read(&mut buf).unwrap_or(usize::MAX);
    assert_eq!(n, 0, "an away port closes the connection without a byte");
    began.elapsed()
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn an_away_jobs_port_stays_reserved_and_answers_at_once() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "away");
    let audit = dir.path().join("audit.jsonl");
    let mut relay = Relay::start(
        dir.path(),
        port_range(20),
        &["--audit-log", audit.to_str().unwrap()],
    );
    let mut agent = Agent::start(dir.path(), &relay, "vh-away", sshd.port, &[]);
    let port = agent.wait_port(UP);

    agent.proc.kill();
    relay.proc.wait_log("agent disconnected; lease kept", UP);
    assert!(
        !port_is_free(port),
        "another process could take the away job's port"
    );
    let took = answered_in(port);
    assert!(
        took < Duration::from_secs(2),
        "an away port answered after {took:?}"
    );
    let line = wait_for(UP, || {
        std::fs::read_to_string(&audit)
            .ok()?
            .lines()
            .find(|l| l.contains("\"outcome\":\"agent_away\""))
            .map(str::to_string)
    })
    .expect("no audit line for the user who came while the job was away");
    assert!(line.contains("\"agent\":\"vh-away\""), "{line}");
    assert!(line.contains("is away"), "{line}");

    // The job comes back to the same port, which works again.
    let agent = Agent::start(dir.path(), &relay, "vh-away", sshd.port, &[]);
    assert_eq!(agent.wait_port(UP), port);
    let out = sshd.ssh("127.0.0.1", port, "echo back");
    assert_eq!(ok_stdout(&out).trim(), "back");
    drop(agent);

    // A restarted relay keeps the ports of the leases it restores.
    relay.kill_and_restart();
    assert!(
        !port_is_free(port),
        "the restarted relay left the leased port open to others"
    );
    assert!(answered_in(port) < Duration::from_secs(2));

    // Released by the operator, the port is free again.
    let (status, body) = relay.admin("DELETE", "/api/agents/vh-away?release=true");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&port.to_string()), "{body}");
    assert!(
        wait_for(UP, || port_is_free(port).then_some(())).is_some(),
        "a released port stays bound"
    );
}
