//! Graceful drain, per-agent stream caps, and file-descriptor exhaustion.

use std::io::Read;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

#[test]
fn sigterm_drains_open_sessions_and_agents_reconnect_quickly() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "d");
    let mut relay = Relay::start(dir.path(), port_range(5), &["--drain-timeout", "20s"]);
    let agent = Agent::start(dir.path(), &relay, "drainee", sshd.port, &[]);
    let port = agent.wait_port(UP);
    // The session marks that its command runs, then stays open until the test releases it (or
    // a minute passes), so it is surely open while the relay drains, however slow the host.
    let (started, release) = (dir.path().join("started"), dir.path().join("release"));
    let command = format!(
        "touch {s}; for _ in $(seq 600); do [ -e {r} ] && break; sleep 0.1; done; echo drained-ok",
        s = started.display(),
        r = release.display()
    );
    let session = Command::new("ssh")
        .args(sshd.client_opts())
        .args(["-p", &port.to_string(), "root@127.0.0.1", &command])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_file(&started, "the ssh session's command to start", UP);
    let stopped = Instant::now();
    relay.proc.signal("TERM");
    relay
        .proc
        .wait_log("no longer accepting; draining open connections", UP);
    agent.proc.wait_log("relay is shutting down", UP);
    assert!(
        relay.proc.child.try_wait().unwrap().is_none(),
        "relay exited with a session still open:\n{}",
        relay.proc.log()
    );
    std::fs::write(&release, "").unwrap();
    let out = session.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "drained-ok");
    let code = relay.proc.wait_exit(UP).and_then(|s| s.code());
    assert_eq!(code, Some(0));
    // It left as soon as the last session ended, not after the whole drain period.
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "{:?}",
        stopped.elapsed()
    );

    relay.kill_and_restart();
    agent.proc.wait_log("relay went away", UP);
    relay
        .proc
        .wait_log(&format!("new tunnel [drainee] ssh on :{port}"), UP);
    assert!(
        !agent.proc.log().contains("retrying with backoff (next in"),
        "{}",
        agent.proc.log()
    );
}

#[test]
fn per_agent_stream_cap_refuses_extra_connections_only() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "c");
    let relay = Relay::start(dir.path(), port_range(5), &["--max-streams-per-agent", "3"]);
    let agent = Agent::start(dir.path(), &relay, "capped", sshd.port, &[]);
    let port = agent.wait_port(UP);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut banner = [0u8; 8];
        c.read_exact(&mut banner).unwrap();
        assert_eq!(&banner, b"SSH-2.0-");
        held.push(c);
    }
    let mut extra = TcpStream::connect(("127.0.0.1", port)).unwrap();
    if let Err(what) = closed_within(&mut extra, Duration::from_secs(1)) {
        panic!("the fourth connection was not closed at once: {what}");
    }
    relay.proc.wait_log("maximum of concurrent connections", UP);
    drop(held);
    let out = wait_for(UP, || {
        let out = sshd.ssh("127.0.0.1", port, "echo room-again");
        out.status.success().then_some(out)
    });
    assert!(out.is_some(), "slots were not given back");
}

#[test]
fn running_out_of_file_descriptors_backs_off_and_recovers() {
    if !require_tool("prlimit", "util-linux") {
        return;
    }
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "f");
    // Few descriptors: the agent link, its listener and a handful of users fit, a flood does not.
    let mut relay = Relay::builder(dir.path())
        .range(port_range(5))
        .wrapper(&["prlimit", "--nofile=48:48"])
        .start();
    let agent = Agent::start(dir.path(), &relay, "fd-starved", sshd.port, &[]);
    let port = agent.wait_port(UP);
    let flood: Vec<TcpStream> = (0..80)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    relay.proc.wait_log("pausing accepts briefly", UP);
    let cpu_before = cpu_ticks(relay.proc.pid());
    // Not a wait for an event: the relay is out of descriptors now, and these 2 s are the window
    // in which its CPU use is measured.
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(relay.proc.pid()) - cpu_before;
    assert!(
        spent < 100,
        "relay burnt {spent} ticks in 2 s while out of descriptors: spinning"
    );
    drop(flood);
    let out = wait_for(UP, || {
        let out = sshd.ssh("127.0.0.1", port, "echo recovered");
        out.status.success().then_some(out)
    });
    assert!(
        out.is_some(),
        "relay did not recover:\n{}",
        relay.proc.log()
    );
    assert!(relay.proc.child.try_wait().unwrap().is_none(), "relay died");
    relay.proc.kill();
}

/// A relay with a descriptor for an agent's connection but none for its port's listener tells
/// the agent it is out of descriptors (not that every port is taken), logs one error naming
/// LimitNOFILE and walks no ports; with descriptors back, the same agent gets its port.
#[test]
fn a_placement_out_of_descriptors_is_refused_as_such() {
    if !require_tool("prlimit", "util-linux") {
        return;
    }
    let dir = scratch();
    let relay = Relay::start(dir.path(), port_range(20), &[]);
    let token = std::fs::read_to_string(relay.token_file()).unwrap();
    let hello = raw::hello("starved", token.trim(), (1, 1));
    let pid = relay.proc.pid();
    // Exactly one descriptor number left below the limit (the lowest free one): the agent's
    // connection takes it, and binding its port finds none.
    let fds = || {
        let mut open: Vec<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        open.sort_unstable();
        open
    };
    // Counted once the relay's start-up descriptors (the readiness probe, the first lease file
    // write) are closed: the same set twice, 100 ms apart.
    let open = wait_for(UP, || {
        let before = fds();
        std::thread::sleep(Duration::from_millis(100));
        (fds() == before).then_some(before)
    })
    .unwrap();
    let first_free = (0..).find(|n| open.binary_search(n).is_err()).unwrap();
    set_soft_nofile(pid, first_free + 1);
    let reply = block_on(raw::exchange(&relay.listen, &relay.fingerprint(), &hello));
    match reply {
        jumpgate_proto::RelayHello::Refused(jumpgate_proto::Refusal::Unavailable { detail }) => {
            assert!(detail.contains("out of file descriptors"), "{detail}")
        }
        other => panic!("expected a refusal naming descriptors, got {other:?}"),
    }
    relay.proc.wait_log("raise LimitNOFILE", UP);
    assert!(
        !relay.proc.log().contains("skipping port"),
        "ports were walked:\n{}",
        relay.proc.log()
    );
    set_soft_nofile(pid, 4096);
    let reply = block_on(raw::exchange(&relay.listen, &relay.fingerprint(), &hello));
    assert!(
        matches!(reply, jumpgate_proto::RelayHello::Accepted(_)),
        "{reply:?}"
    );
}

/// Sets the soft open-files limit of a running process (the hard one stays, so it can be raised
/// again).
fn set_soft_nofile(pid: u32, soft: usize) {
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// utime + stime of a process in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// One user address may hold only `--max-conns-per-source` of a port's connections: its next one
/// is closed (and audited), while real ssh from another address still gets through, and the
/// address gets its place back when it lets one go.
#[test]
fn one_user_address_cannot_take_every_slot_of_a_port() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "per-source");
    let relay = Relay::start(dir.path(), port_range(5), &["--max-conns-per-source", "2"]);
    let agent = Agent::start(dir.path(), &relay, "shared-port", sshd.port, &[]);
    let port = agent.wait_port(UP);
    let banner = |c: &mut TcpStream| -> usize {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 8];
        c.read(&mut buf).unwrap_or(0)
    };
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            assert_eq!(banner(&mut c), 8, "held connections reach sshd");
            c
        })
        .collect();
    let mut extra = TcpStream::connect(("127.0.0.1", port)).unwrap();
    if let Err(what) = closed_within(&mut extra, Duration::from_secs(1)) {
        panic!("a third connection from 127.0.0.1 was not closed at once: {what}");
    }
    relay.proc.wait_log("limit of this source address", UP);

    // Another address (ssh binds its socket to 127.0.0.2) is not held back.
    let out = Command::new("ssh")
        .args(sshd.client_opts())
        .args(["-o", "BindAddress=127.0.0.2", "-p", &port.to_string()])
        .args(["root@127.0.0.1", "echo from-elsewhere"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("from-elsewhere"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    held.pop();
    let back = wait_for(UP, || {
        let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
        (banner(&mut c) == 8).then_some(c)
    });
    assert!(back.is_some(), "the address did not get its place back");
    let (_, metrics) = relay.admin("GET", "/metrics");
    assert!(
        metrics.contains("jumpgate_refused_connections_total{reason=\"source_limit\"} 1"),
        "no source_limit refusal counted:\n{metrics}"
    );
}
