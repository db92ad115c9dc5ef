//! The core promise: standard OpenSSH through relay-server and worker-agent, with the real
//! binaries, real TLS and a real sshd.

use std::process::{Command, Stdio};
use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(20);

#[test]
fn ssh_echo_scp_sftp_and_port_forward_work_through_the_tunnel() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "alpha");
    let relay = Relay::start(dir.path(), port_range(10), &[]);
    let agent = Agent::start(dir.path(), &relay, "vh-exec-1", sshd.port, &[]);
    let port = agent.wait_port(UP);
    assert!((relay.range.0..=relay.range.1).contains(&port));
    // The line platforms scrape, on stdout.
    assert!(
        agent
            .proc
            .out()
            .contains(&format!("ssh enabled on 127.0.0.1:{port}")),
        "{}",
        agent.proc.out()
    );
    relay
        .proc
        .wait_log(&format!("new tunnel [vh-exec-1] ssh on :{port}"), UP);

    // A plain command.
    let out = sshd.ssh("127.0.0.1", port, "echo hello-$JG_WHO");
    assert_eq!(ok_stdout(&out).trim(), "hello-alpha");

    // 64 MiB each way with scp; half-close must carry EOF for scp to finish.
    let up_src = dir.path().join("up.bin");
    let up_hash = random_file(&up_src, 64 << 20);
    let remote = dir.path().join("remote.bin");
    let scp = |from: String, to: String| {
        Command::new("scp")
            .args(sshd.client_opts())
            .args(["-P", &port.to_string(), &from, &to])
            .output()
            .unwrap()
    };
    ok_stdout(&scp(
        up_src.display().to_string(),
        format!("root@127.0.0.1:{}", remote.display()),
    ));
    assert_eq!(sha256_file(&remote), up_hash);
    let down_src = dir.path().join("down-src.bin");
    let down_hash = random_file(&down_src, 64 << 20);
    let down = dir.path().join("down.bin");
    ok_stdout(&scp(
        format!("root@127.0.0.1:{}", down_src.display()),
        down.display().to_string(),
    ));
    assert_eq!(sha256_file(&down), down_hash);

    // `ssh host 'cat > file'` ends only if the relay passes the client's EOF on.
    let piped = dir.path().join("piped.txt");
    let status = Command::new("ssh")
        .args(sshd.client_opts())
        .args([
            "-p",
            &port.to_string(),
            "root@127.0.0.1",
            &format!("cat > {}", piped.display()),
        ])
        .stdin(std::fs::File::open(&up_src).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(sha256_file(&piped), up_hash);

    // sftp in batch mode.
    let batch = dir.path().join("sftp.batch");
    let sftp_copy = dir.path().join("sftp-copy.bin");
    std::fs::write(
        &batch,
        format!("get {} {}\n", up_src.display(), sftp_copy.display()),
    )
    .unwrap();
    let out = Command::new("sftp")
        .args(sshd.client_opts())
        .args(["-P", &port.to_string(), "-b"])
        .arg(&batch)
        .arg("root@127.0.0.1")
        .output()
        .unwrap();
    ok_stdout(&out);
    assert_eq!(sha256_file(&sftp_copy), up_hash);

    // ssh -L: reach a service next to sshd (here sshd itself) through the tunnel.
    let local = free_port();
    let mut fwd = Command::new("ssh")
        .args(sshd.client_opts())
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("127.0.0.1:{local}:127.0.0.1:{}", sshd.port))
        .args(["-p", &port.to_string(), "root@127.0.0.1"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let banner = wait_for(UP, || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", local)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).ok()?;
        (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    let _ = fwd.kill();
    let _ = fwd.wait();
    assert!(
        banner.unwrap_or_default().starts_with("SSH-2.0-"),
        "no sshd banner through -L"
    );
}

#[test]
fn two_agents_get_different_ports_and_reach_their_own_sshd() {
    let dir = scratch();
    let a = Sshd::start(dir.path(), "a");
    let b = Sshd::start(dir.path(), "b");
    // Both runtime flavours carry sessions: a multi-threaded relay (the default is one thread),
    // and one agent on a multi-threaded runtime beside one on the default single thread.
    let relay = Relay::start(dir.path(), port_range(10), &["--worker-threads", "2"]);
    let agent_a = Agent::start(
        dir.path(),
        &relay,
        "worker-a",
        a.port,
        &["--worker-threads", "2"],
    );
    let agent_b = Agent::start(dir.path(), &relay, "worker-b", b.port, &[]);
    let (pa, pb) = (agent_a.wait_port(UP), agent_b.wait_port(UP));
    assert_ne!(pa, pb);
    assert_eq!(
        ok_stdout(&a.ssh("127.0.0.1", pa, "echo $JG_WHO")).trim(),
        "a"
    );
    assert_eq!(
        ok_stdout(&b.ssh("127.0.0.1", pb, "echo $JG_WHO")).trim(),
        "b"
    );
    // Each sshd's known_hosts trusts only itself: crossing the ports must fail.
    assert!(!a.ssh("127.0.0.1", pb, "true").status.success());
}

#[test]
fn unreachable_target_closes_the_user_connection_promptly() {
    let dir = scratch();
    let relay = Relay::start(dir.path(), port_range(5), &[]);
    let dead = free_port(); // nothing listens here
    let agent = Agent::start(dir.path(), &relay, "no-sshd", dead, &[]);
    let port = agent.wait_port(UP);
    let started = std::time::Instant::now();
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // A client that speaks first: its bytes are already on their way to the agent (the relay
    // does not wait for the agent's reply to forward them) when the agent refuses.
    std::io::Write::write_all(&mut conn, b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut conn, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the relay to close the connection");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    relay.proc.wait_log("agent could not reach its target", UP);
    agent
        .proc
        .wait_log(&format!("cannot reach local target 127.0.0.1:{dead}"), UP);
}

#[test]
fn readme_quick_start_brings_up_a_working_tunnel() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let bin_dir = bin("relay-server").parent().unwrap().to_path_buf();
    let out = Command::new("bash")
        .arg(root.join("examples/quickstart.sh"))
        .arg("--once")
        .env("JUMPGATE_BIN_DIR", &bin_dir)
        .output()
        .unwrap();
    let stdout = ok_stdout(&out);
    assert!(stdout.contains("ssh enabled on 127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("hello from"), "{stdout}");
    // The second line reaches the job by name through the jump listener, proven once too.
    assert!(
        stdout.contains("  ssh -F ") && stdout.contains(" -J 127.0.0.1:"),
        "{stdout}"
    );
    assert!(stdout.contains("via ssh -J, sshd sees you as"), "{stdout}");
}
