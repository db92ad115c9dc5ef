//! The agent comes back by itself after the relay dies, on the same port.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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

/// Two session threads: the three agents' sessions are spread over both (round robin), each
/// thread does the work of the sessions it carries (its CPU time grows while bulk data crosses
/// them), an agent that comes back lands on either and works, and on SIGTERM a session that is
/// still open keeps moving data for the whole drain timeout, then is closed and the relay exits 0.
#[test]
fn sharded_relay_carries_sessions_on_every_thread_and_drains_on_sigterm() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "shard");
    let drain = Duration::from_secs(5);
    let mut relay = Relay::start(
        dir.path(),
        port_range(10),
        &["--worker-threads", "2", "--drain-timeout", "5s"],
    );
    // One connection per agent (no extra lanes): agent N's session is the relay's Nth agent
    // connection, so s0 and s2 land on one thread and s1 on the other.
    let mut agents: Vec<Agent> = ["s0", "s1", "s2"]
        .iter()
        .map(|name| {
            let agent = Agent::start(dir.path(), &relay, name, sshd.port, &["--max-lanes", "1"]);
            agent.wait_port(UP);
            agent
        })
        .collect();
    let ports: Vec<u16> = agents.iter().map(|a| a.wait_port(UP)).collect();
    let pid = relay.proc.pid();
    let shards = ["jg-shard-0", "jg-shard-1"].map(|shard| {
        thread_named(pid, shard).unwrap_or_else(|| panic!("no thread {shard} in the relay"))
    });
    let mut sessions: Vec<EchoSession> = ports
        .iter()
        .map(|&port| EchoSession::start(&sshd, port))
        .collect();
    for s in &mut sessions {
        s.send(200);
    }
    // Bulk data through every agent's port: each thread's CPU time grows, so each carries
    // sessions (a relay that put every session on one thread leaves the other idle).
    let before = shards.map(|tid| thread_ticks(pid, tid));
    for &port in &ports {
        let out = sshd.ssh("127.0.0.1", port, "head -c 64000000 /dev/zero");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(out.stdout.len(), 64_000_000);
    }
    let spent: Vec<u64> = (0..2)
        .map(|i| thread_ticks(pid, shards[i]) - before[i])
        .collect();
    eprintln!("CPU ticks per session thread while 3 x 64 MB crossed: {spent:?}");
    for (i, ticks) in spent.iter().enumerate() {
        assert!(
            *ticks >= 4,
            "jg-shard-{i} spent {ticks} ticks while bulk data crossed every session: it carries none ({spent:?})"
        );
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
    let ticker = Ticker::start(&sshd, ports[1]);
    for s in sessions {
        s.finish();
    }

    // SIGTERM with the ticker's session open: it keeps echoing through the drain timeout, then
    // the relay closes it and exits.
    let term = Instant::now();
    relay.proc.signal("TERM");
    relay
        .proc
        .wait_log("no longer accepting; draining open connections", UP);
    let mut last_echo = None;
    loop {
        match ticker.echoes.recv_timeout(UP) {
            Ok(at) => last_echo = Some(at.saturating_duration_since(term)),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the session neither moved nor ended for {UP:?} after SIGTERM")
            }
        }
    }
    let ended = term.elapsed();
    let last_echo = last_echo.expect("no echo after SIGTERM");
    eprintln!(
        "after SIGTERM: last echo at {last_echo:?}, session closed at {ended:?} (drain {drain:?})"
    );
    assert!(
        last_echo >= drain - Duration::from_secs(1),
        "the session stopped moving data {last_echo:?} after SIGTERM, before the {drain:?} drain ended"
    );
    // 3 s of margin: the relay's close reaches ssh through the agent and sshd.
    assert!(
        ended < drain + Duration::from_secs(3),
        "the session was still open {ended:?} after SIGTERM (drain {drain:?})"
    );
    assert_eq!(relay.proc.wait_exit(UP).and_then(|s| s.code()), Some(0));
    let log = relay.proc.log();
    assert!(
        log.contains("drain period over; closing remaining connections"),
        "{log}"
    );
    assert!(log.contains("relay stopped"), "{log}");
    drop(ticker);
    drop(agents);
}

/// The id of `pid`'s thread named `name`.
fn thread_named(pid: u32, name: &str) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| t.ok())
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|t| t.file_name().to_str()?.parse().ok())
}

/// utime + stime of one thread, in clock ticks.
fn thread_ticks(pid: u32, tid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// An ssh session running `cat` that sends a line every 100 ms and reports when each comes back,
/// until the connection ends (then `echoes` disconnects).
struct Ticker {
    child: Child,
    echoes: mpsc::Receiver<Instant>,
}

impl Ticker {
    fn start(sshd: &Sshd, port: u16) -> Ticker {
        let mut child = Command::new("ssh")
            .args(sshd.client_opts())
            .args(["-p", &port.to_string(), "root@127.0.0.1", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, echoes) = mpsc::channel();
        std::thread::spawn(move || {
            for (i, line) in BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .enumerate()
            {
                assert_eq!(
                    line,
                    format!("tick {i}"),
                    "the session lost or reordered bytes"
                );
                if tx.send(Instant::now()).is_err() {
                    return;
                }
            }
        });
        std::thread::spawn(move || {
            for i in 0.. {
                if writeln!(stdin, "tick {i}")
                    .and_then(|()| stdin.flush())
                    .is_err()
                {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let ticker = Ticker { child, echoes };
        ticker
            .echoes
            .recv_timeout(UP)
            .expect("the ticking session never echoed");
        ticker
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
