//! Reachability as on a real platform: the worker sits behind a NAT that only lets it dial out.
//! Users reach its sshd through the relay and in no other way, and a silently dead link is
//! detected and healed on the same port.

use std::process::Stdio;
use std::time::{Duration, Instant};

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

#[test]
fn worker_behind_nat_is_reachable_only_through_the_relay_and_survives_a_dead_link() {
    if !NatLab::require_tools() {
        return;
    }
    let lab = match NatLab::create() {
        Ok(lab) => lab,
        Err(why) => {
            skip_unless_ci(&format!("{why} (run as root to include this test)"));
            return;
        }
    };
    let dir = scratch();

    // The worker: sshd listening on all of the worker's addresses, plus the agent.
    let sshd_dir = dir.path().join("w");
    std::fs::create_dir_all(&sshd_dir).unwrap();
    let sshd = Sshd::start_in(&lab.worker_ns, &sshd_dir, "nat");

    // The relay, in its own namespace, with a fast heartbeat so the test is quick.
    let state = dir.path().join("relay-state");
    let range = (12000, 12010);
    let relay = Relay::builder(dir.path())
        .bare()
        .wrapper(&["ip", "netns", "exec", &lab.relay_ns])
        .listen(&format!("{}:7000", lab.relay_ip))
        .args(["--public-host", lab.relay_ip])
        .range(range)
        .args(["--heartbeat-interval", "1s", "--heartbeat-timeout", "4s"])
        .state_dir(&state)
        .start();
    let agent = Agent::builder(dir.path(), "vh-exec-nat")
        .no_log_env()
        .wrapper(&["ip", "netns", "exec", &lab.worker_ns])
        .relay(&relay)
        .target(sshd.port)
        .status_file(&dir.path().join("status.json"))
        .start();
    let (relay, agent) = (&relay.proc, &agent.proc);
    agent.wait_log("ssh enabled on", UP);
    let line = agent.out();
    let port: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(
        line.trim(),
        format!("ssh enabled on {}:{port}", lab.relay_ip)
    );

    // From the user's namespace: ssh through the relay works...
    let ssh = |cmd: &str| {
        NatLab::cmd(&lab.user_ns, "ssh")
            .args(sshd.client_opts())
            .args([
                "-p",
                &port.to_string(),
                &format!("root@{}", lab.relay_ip),
                cmd,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    assert_eq!(ok_stdout(&ssh("echo through-nat")).trim(), "through-nat");
    // ...and a direct connection to the worker's sshd does not, from the user or the relay.
    assert!(
        !NatLab::can_connect(&lab.user_ns, lab.worker_ip, sshd.port),
        "worker reachable from the user directly"
    );
    assert!(
        !NatLab::can_connect(&lab.relay_ns, lab.worker_ip, sshd.port),
        "worker reachable from the relay directly"
    );
    // Sanity: the sshd does listen on that address (from inside the worker it connects).
    assert!(NatLab::can_connect(
        &lab.worker_ns,
        lab.worker_ip,
        sshd.port
    ));

    // Cut the link silently in the middle of a session: one that has logged in and runs its
    // command (`sleep 60` only keeps it open) when the link goes.
    let started = dir.path().join("session-started");
    let mut session = NatLab::cmd(&lab.user_ns, "ssh")
        .args(sshd.client_opts())
        .args([
            "-p",
            &port.to_string(),
            &format!("root@{}", lab.relay_ip),
            &format!("touch {}; sleep 60", started.display()),
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_file(&started, "the ssh session through the NAT to start", UP);
    lab.cut_worker();
    let cut = Instant::now();
    relay.wait_log("heartbeat timeout", UP);
    agent.wait_log("no heartbeat answer from the relay", UP);
    let noticed = cut.elapsed();
    eprintln!("dead link noticed by relay and agent after {noticed:?} (heartbeat 1s, timeout 4s)");
    assert!(
        noticed < Duration::from_secs(15),
        "dead link noticed only after {noticed:?}"
    );
    // While the agent is away, its port answers users at once (the relay keeps it and closes
    // the connection) instead of hanging them.
    let asked = Instant::now();
    let answer = NatLab::cmd(&lab.user_ns, "nc")
        .args(["-w", "5", lab.relay_ip, &port.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    // nc exits 0 only when it connected: a refused connection (port not kept) answers at once
    // too, with status 1.
    assert!(
        answer.status.success(),
        "the away port did not accept the connection: {answer:?}"
    );
    assert!(answer.stdout.is_empty(), "{answer:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "the away port took {:?} to answer",
        asked.elapsed()
    );
    lab.restore_worker();
    let restored = Instant::now();

    relay.wait_log(&format!("new tunnel [vh-exec-nat] ssh on :{port}"), UP);
    let out = wait_for(UP, || {
        let out = ssh("echo healed");
        out.status.success().then_some(out)
    })
    .expect("ssh never worked again after the link came back");
    assert_eq!(ok_stdout(&out).trim(), "healed");
    eprintln!(
        "ssh worked again on port {port} {:?} after the link came back",
        restored.elapsed()
    );
    let _ = session.kill();
    let _ = session.wait();
    assert_eq!(
        count(&relay.log(), "new tunnel [vh-exec-nat]"),
        2,
        "{}",
        relay.log()
    );
}
