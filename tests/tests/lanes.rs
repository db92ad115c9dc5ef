//! Extra lanes: while user connections overlap, an agent carries them over more than one TCP
//! connection to the relay, so parallel transfers do not share one socket's buffer.

use std::process::Command;
use std::time::Duration;

use jumpgate_proto::{Refusal, RelayHello, Secret};
use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(20);

/// The relay's `jumpgate_agent_lanes` gauge.
fn lanes(relay: &Relay) -> u64 {
    let (code, body) = relay.admin("GET", "/metrics");
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("jumpgate_agent_lanes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no lane gauge in:\n{body}"))
}

/// Copies `count` files of `size` bytes up and down at once with scp while `1 + held`
/// interactive sessions stay open (so at least `1 + held` user connections overlap whatever the
/// transfers' speed); checks every byte and returns the most lanes the relay's gauge showed
/// while they were open (sampled every 20 ms from another thread, not read afterwards).
fn parallel_scp(
    relay: &Relay,
    sshd: &Sshd,
    port: u16,
    held: usize,
    count: usize,
    size: usize,
) -> u64 {
    let dir = relay.dir.join(format!("scp-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(lanes(relay));
                std::thread::sleep(Duration::from_millis(20));
            }
            most.max(lanes(relay))
        });
        let sessions: Vec<EchoSession> =
            (0..held).map(|_| EchoSession::start(sshd, port)).collect();
        transfer(sshd, port, &dir, count, size);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let most = sampler.join().unwrap();
        for s in sessions {
            s.finish();
        }
        most
    })
}

/// The transfers of [`parallel_scp`], beside one more interactive session.
fn transfer(sshd: &Sshd, port: u16, dir: &std::path::Path, count: usize, size: usize) {
    let mut typing = EchoSession::start(sshd, port);
    let scp = |from: String, to: String| {
        Command::new("scp")
            .args(sshd.client_opts())
            .args(["-P", &port.to_string(), &from, &to])
            .spawn()
            .unwrap()
    };
    let mut jobs = Vec::new();
    for i in 0..count {
        let src = dir.join(format!("src-{i}.bin"));
        let hash = random_file(&src, size);
        let (from, to, copy) = if i % 2 == 0 {
            let copy = dir.join(format!("up-{i}.bin"));
            let to = format!("root@127.0.0.1:{}", copy.display());
            (src.display().to_string(), to, copy)
        } else {
            let copy = dir.join(format!("down-{i}.bin"));
            let from = format!("root@127.0.0.1:{}", src.display());
            (from, copy.display().to_string(), copy)
        };
        jobs.push((scp(from, to), hash, copy));
    }
    for (child, hash, copy) in jobs {
        typing.send(16);
        ok_stdout(&child.wait_with_output().unwrap());
        assert_eq!(sha256_file(&copy), hash, "{} differs", copy.display());
    }
    typing.finish();
}

#[test]
fn overlapping_transfers_get_lanes_of_their_own_and_lose_nothing() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "lanes");
    let relay = Relay::start(dir.path(), port_range(5), &[]);
    let agent = Agent::start(dir.path(), &relay, "vh-lanes", sshd.port, &[]);
    let port = agent.wait_port(UP);
    assert_eq!(lanes(&relay), 1, "an idle agent keeps a single connection");
    // One ssh session takes that lane; a spare is opened ahead of the next user.
    let mut first = EchoSession::start(&sshd, port);
    assert_eq!(wait_for(UP, || (lanes(&relay) == 2).then_some(2)), Some(2));
    first.send(8);
    first.finish();

    // Eleven overlapping ssh connections (six held sessions, the typing one and four scp):
    // more than the lanes allowed, so the lanes reach the limit of 8 (the agent's and the
    // relay's default) and never pass it; the session is still the same one.
    let most = parallel_scp(&relay, &sshd, port, 6, 4, 8 << 20);
    assert_eq!(
        most,
        8,
        "eleven overlapping ssh connections should have used exactly the 8 lanes allowed\n{}",
        relay.proc.log()
    );
    assert_eq!(count(&relay.proc.log(), "agent connected"), 1);
}

#[test]
fn one_lane_when_either_side_says_so() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "onelane");
    let relay = Relay::start(dir.path(), port_range(5), &[]);
    let agent = Agent::start(
        dir.path(),
        &relay,
        "vh-one",
        sshd.port,
        &["--max-lanes", "1"],
    );
    let port = agent.wait_port(UP);
    assert_eq!(parallel_scp(&relay, &sshd, port, 2, 3, 8 << 20), 1);
    drop(agent);

    let dir2 = scratch();
    let relay2 = Relay::start(dir2.path(), port_range(5), &["--max-lanes-per-agent", "2"]);
    let agent2 = Agent::start(dir2.path(), &relay2, "vh-two", sshd.port, &[]);
    let port2 = agent2.wait_port(UP);
    // Six overlapping connections, two lanes allowed by the relay: exactly two.
    assert_eq!(parallel_scp(&relay2, &sshd, port2, 2, 3, 8 << 20), 2);
}

#[test]
fn a_loopback_agent_is_not_asked_for_lanes_below_lanes_min_rtt() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "shortpath");
    // No extra lanes on a path whose round trip is under 1 ms, which loopback's is by far.
    let relay = Relay::start(dir.path(), port_range(5), &["--lanes-min-rtt", "1ms"]);
    let agent = Agent::start(dir.path(), &relay, "vh-short", sshd.port, &[]);
    let port = agent.wait_port(UP);
    // Six overlapping connections that would get lanes of their own on a longer path.
    assert_eq!(parallel_scp(&relay, &sshd, port, 2, 3, 8 << 20), 1);
    assert_eq!(count(&relay.proc.log(), "agent connected"), 1);
}

#[test]
fn a_lane_without_the_session_key_is_refused_and_disturbs_nothing() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "lanekey");
    let relay = Relay::start(dir.path(), port_range(5), &[]);
    let agent = Agent::start(dir.path(), &relay, "vh-key", sshd.port, &[]);
    let port = agent.wait_port(UP);
    let mut typing = EchoSession::start(&sshd, port);
    // The session took the only lane, so the relay asked for a spare: wait until it is there.
    let before = wait_for(UP, || (lanes(&relay) == 2).then_some(2)).expect("a spare lane");

    let token = std::fs::read_to_string(relay.token_file()).unwrap();
    let pin = relay.fingerprint();
    let mut hello = raw::hello("vh-key", token.trim(), (1, 1));
    hello.services.clear();
    hello.lane_of = Some(Secret::new("0123456789abcdef0123456789abcdef"));
    match block_on(raw::exchange(&relay.listen, &pin, &hello)) {
        RelayHello::Refused(Refusal::LaneUnavailable { detail }) => {
            assert!(detail.contains("no live session"), "{detail}")
        }
        other => panic!("a lane with a made-up key must be refused, got {other:?}"),
    }
    // A lane for an agent that is not connected at all is refused the same way.
    hello.name = "vh-nobody".into();
    assert!(matches!(
        block_on(raw::exchange(&relay.listen, &pin, &hello)),
        RelayHello::Refused(Refusal::LaneUnavailable { .. })
    ));
    typing.send(32);
    typing.finish();
    assert_eq!(lanes(&relay), before, "refused lanes are not counted");
    assert_eq!(count(&relay.proc.log(), "agent connected"), 1);
}
