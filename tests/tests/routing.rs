//! Beyond port ranges: reaching agents by name through the HTTP CONNECT router, and one agent
//! keeping sessions with several relays at once.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

/// Sends a raw CONNECT request and returns what comes back within a moment.
fn connect_raw(router: &str, request: &str) -> String {
    let mut s = TcpStream::connect(router).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    read_until(&mut s, "SSH-2.0")
}

#[test]
fn ssh_by_name_through_the_router() {
    let dir = scratch();
    let (sa, sb) = (
        Sshd::start(dir.path(), "rt-a"),
        Sshd::start(dir.path(), "rt-b"),
    );
    let router = format!("127.0.0.1:{}", free_port());
    let relay = Relay::start(
        dir.path(),
        port_range(5),
        &["--router-listen", &router, "--allow-cidr", "127.0.0.1/32"],
    );
    let a = Agent::start(dir.path(), &relay, "rt-a", sa.port, &[]);
    let b = Agent::start(dir.path(), &relay, "rt-b", sb.port, &["--no-port"]);
    a.wait_port(UP);
    b.proc.wait_log("ssh enabled via router", UP);
    assert!(
        b.proc.out().contains(&format!(
            "ssh enabled via router 127.0.0.1:{} as rt-b",
            router.rsplit(':').next().unwrap()
        )),
        "{}",
        b.proc.out()
    );
    relay
        .proc
        .wait_log("new tunnel [rt-b] ssh via the router", UP);

    // Real ssh with nc -X connect, to two different agents by name.
    for (sshd, name) in [(&sa, "rt-a"), (&sb, "rt-b")] {
        let out = Command::new("ssh")
            .args(sshd.client_opts())
            .args([
                "-o",
                &format!("ProxyCommand=nc -X connect -x {router} %h %p"),
            ])
            .args([
                "-p",
                &sshd.port.to_string(),
                &format!("root@{name}"),
                "echo $JG_WHO",
            ])
            .output()
            .unwrap();
        assert_eq!(ok_stdout(&out).trim(), name);
    }

    // The generated config block works as is.
    let cfg = Command::new(bin("relay-server"))
        .args([
            "ssh-config",
            "--router",
            "--pattern",
            "rt-*",
            "--router-listen",
            &router,
            "--public-host",
            "127.0.0.1",
        ])
        .output()
        .unwrap();
    let cfg_text = ok_stdout(&cfg);
    assert!(
        cfg_text.contains("Host rt-*\n    ProxyCommand nc -X connect -x 127.0.0.1:"),
        "{cfg_text}"
    );
    let cfg_file = dir.path().join("router_ssh_config");
    std::fs::write(&cfg_file, cfg_text).unwrap();
    let out = Command::new("ssh")
        .arg("-F")
        .arg(&cfg_file)
        .args(sb.client_opts())
        .args(["-p", &sb.port.to_string(), "root@rt-b", "echo $JG_WHO"])
        .output()
        .unwrap();
    assert_eq!(ok_stdout(&out).trim(), "rt-b");

    // By service name: SERVICE.AGENT, port ignored.
    let reply = connect_raw(
        &router,
        "CONNECT ssh.rt-b:0 HTTP/1.1\r\nHost: ssh.rt-b:0\r\n\r\n",
    );
    assert!(
        reply.starts_with("HTTP/1.1 200 Connection established\r\n\r\nSSH-2.0-"),
        "{reply}"
    );

    // Errors: proper statuses and a one-line reason, never a hang.
    let reply = connect_raw(&router, "CONNECT nobody:22 HTTP/1.1\r\n\r\n");
    assert!(
        reply.starts_with("HTTP/1.1 404 Not Found") && reply.contains("no agent named \"nobody\""),
        "{reply}"
    );
    let reply = connect_raw(&router, "CONNECT rt-a:9 HTTP/1.1\r\n\r\n");
    assert!(
        reply.starts_with("HTTP/1.1 404") && reply.contains("no service on port 9"),
        "{reply}"
    );
    let reply = connect_raw(&router, "GET / HTTP/1.1\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
    let reply = connect_raw(&router, "garbage\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");

    // The relay's allowlist applies to the router too.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "printf 'CONNECT rt-a:{} HTTP/1.1\\r\\n\\r\\n' | nc -s 127.0.0.2 -w 3 127.0.0.1 {}",
            sa.port,
            router.rsplit(':').next().unwrap()
        ))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("HTTP/1.1 403"),
        "{:?}",
        out
    );
}

#[test]
fn agent_with_two_relays_survives_losing_one() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "multi");
    let (d1, d2) = (dir.path().join("r1"), dir.path().join("r2"));
    let mut r1 = Relay::start(&d1, port_range(5), &[]);
    let r2 = Relay::start(&d2, port_range(5), &[]);
    // One token and two pins: relay 2 accepts relay 1's token via JUMPGATE_TOKEN-style file copy.
    std::fs::copy(r1.token_file(), r2.token_file()).unwrap();
    r2.proc.signal("HUP");
    r2.proc.wait_log("configuration reloaded", UP);
    let status_file = dir.path().join("multi-status.json");
    let agent = Agent::builder(dir.path(), "multi")
        .no_log_env()
        .relay(&r1)
        .relay(&r2)
        .target(sshd.port)
        .status_file(&status_file)
        .start();
    let agent = &agent.proc;
    let ports = wait_for(UP, || {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&status_file).ok()?).ok()?;
        let relays = v["relays"].as_array()?;
        if relays.len() == 2 && relays.iter().all(|r| r["state"] == "connected") {
            Some((
                relays[0]["services"][0]["port"].as_u64()? as u16,
                relays[1]["services"][0]["port"].as_u64()? as u16,
            ))
        } else {
            None
        }
    })
    .unwrap_or_else(|| panic!("agent never connected to both relays:\n{}", agent.log()));
    assert_eq!(count(&agent.out(), "ssh enabled on"), 2, "{}", agent.out());
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", ports.0, "echo via-1")).trim(),
        "via-1"
    );
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", ports.1, "echo via-2")).trim(),
        "via-2"
    );

    // Lose the first relay: the second endpoint keeps working, and the status file says so.
    r1.proc.kill();
    agent.wait_log("connection to relay lost", UP);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", ports.1, "echo still-via-2")).trim(),
        "still-via-2"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&status_file).unwrap()).unwrap();
    assert_eq!(v["relays"][0]["state"], "reconnecting");
    assert_eq!(v["relays"][1]["state"], "connected");
}

/// A TCP echo server on loopback, for checking bytes end to end.
fn echo_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut back = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut conn, &mut back);
            });
        }
    });
    port
}

#[test]
fn bytes_sent_behind_the_connect_head_reach_the_target_intact() {
    let dir = scratch();
    let echo = echo_server();
    let router = format!("127.0.0.1:{}", free_port());
    let relay = Relay::start(dir.path(), port_range(2), &["--router-listen", &router]);
    let agent = Agent::start(dir.path(), &relay, "rt-echo", echo, &["--no-port"]);
    agent.proc.wait_log("ssh enabled via router", UP);
    relay
        .proc
        .wait_log("new tunnel [rt-echo] ssh via the router", UP);

    // The head and the first 200 KB in one write, as an eager client sends them.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut request =
        format!("CONNECT rt-echo:{echo} HTTP/1.1\r\nHost: rt-echo\r\n\r\n").into_bytes();
    request.extend_from_slice(&payload);
    let mut s = TcpStream::connect(&router).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&request).unwrap());
    let mut expect = b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec();
    expect.extend_from_slice(&payload);
    let mut got = vec![0u8; expect.len()];
    s.read_exact(&mut got).unwrap();
    sender.join().unwrap();
    assert!(
        got == expect,
        "{:?}",
        String::from_utf8_lossy(&got[..got.len().min(200)])
    );

    // A head over the limit is refused with 431, and the answer reaches the client.
    let reply = connect_raw(
        &router,
        &format!(
            "CONNECT rt-echo:{echo} HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "p".repeat(9000)
        ),
    );
    assert!(
        reply.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n")
            && reply.ends_with("request head over 8192 bytes\n"),
        "{reply}"
    );
}
