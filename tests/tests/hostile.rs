//! Hostile and broken input at the relay: each gets its specific, clear error, and none of it
//! disturbs an established ssh session through another agent or loses a byte of it.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use jumpgate_proto::{Refusal, RelayHello, PREFACE};
use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

#[test]
fn hostile_input_gets_clear_errors_and_disturbs_nothing() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "victim");
    let team_a = "team-a-token-0123456789abcdef";
    let tokens = tokens_file(dir.path(), &[("team-a", team_a, "team-a-*")]);
    let range = port_range(20);
    let mut relay = Relay::start(
        dir.path(),
        range,
        &[
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--allow-cidr",
            "127.0.0.1/32",
            "--auth-failure-limit",
            "100000",
        ],
    );
    let token_file = dir.path().join("team-a.token");
    write_secret(&token_file, team_a);
    let agent = Agent::start(
        dir.path(),
        &relay,
        "team-a-1",
        sshd.port,
        &["--token-file", token_file.to_str().unwrap()],
    );
    let port = agent.wait_port(UP);
    let mut session = EchoSession::start(&sshd, port);
    let (addr, pin) = (relay.listen.clone(), relay.fingerprint());

    // Random bytes on the agent port: not TLS.
    {
        use std::io::Write;
        let mut s = TcpStream::connect(&addr).unwrap();
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let _ = s.write_all(&noise);
    }
    relay.proc.wait_log("TLS handshake failed", UP);
    session.send(16);

    // A valid TLS handshake followed by garbage.
    assert!(block_on(raw::send_after_tls(
        &addr,
        &pin,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    )));
    relay
        .proc
        .wait_log("not a jumpgate agent (bad preface)", UP);

    // The preface and then a frame header announcing 4 GiB.
    let mut oversize = PREFACE.to_vec();
    oversize.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(block_on(raw::send_after_tls(&addr, &pin, &oversize)));
    relay.proc.wait_log("exceeds the 65536-byte limit", UP);
    session.send(16);

    // An unknown protocol version: both ranges are named.
    let reply = block_on(raw::exchange(
        &addr,
        &pin,
        &raw::hello("team-a-2", team_a, (7, 9)),
    ));
    assert!(
        matches!(
            reply,
            RelayHello::Refused(Refusal::UnsupportedVersion {
                agent_min: 7,
                agent_max: 9,
                ..
            })
        ),
        "{reply:?}"
    );
    relay
        .proc
        .wait_log("the relay speaks versions 1-3, this agent speaks 7-9", UP);

    // A wrong token, and a valid token claiming a name it may not.
    let reply = block_on(raw::exchange(
        &addr,
        &pin,
        &raw::hello("team-a-3", "wrong-token-wrong-token", (1, 1)),
    ));
    assert_eq!(reply, RelayHello::Refused(Refusal::Unauthorized));
    let reply = block_on(raw::exchange(
        &addr,
        &pin,
        &raw::hello("team-b-7", team_a, (1, 1)),
    ));
    assert_eq!(
        reply,
        RelayHello::Refused(Refusal::NameNotAllowed {
            name: "team-b-7".into()
        })
    );
    relay.proc.wait_log("may not use the name \"team-b-7\"", UP);
    session.send(16);

    // 1000 connections that open and do nothing.
    let idle: Vec<TcpStream> = (0..1000)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    assert!(idle.len() >= 900, "could only open {}", idle.len());
    session.send(16);
    // A port scan across the whole range while they sit there.
    for p in range.0..=range.1 {
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], p)),
            Duration::from_millis(200),
        );
    }
    drop(idle);
    session.send(16);

    // A user from outside the allowlist: bound to 127.0.0.2 against 127.0.0.1/32.
    let outsider = std::process::Command::new("nc")
        .args(["-s", "127.0.0.2", "-w", "3", "127.0.0.1", &port.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&outsider.stdout).contains("SSH-2.0"),
        "outsider got a banner"
    );
    relay.proc.wait_log(
        "refused user connection: source address not in the relay's allowlist",
        UP,
    );
    assert!(
        relay.proc.log().contains("peer=127.0.0.2:"),
        "source address not logged"
    );

    // After all that: the session is intact, new users and new agents still get in.
    session.send(64);
    session.finish();
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo still-fine")).trim(),
        "still-fine"
    );
    let late = Agent::start(
        dir.path(),
        &relay,
        "team-a-9",
        sshd.port,
        &["--token-file", token_file.to_str().unwrap()],
    );
    late.wait_port(UP);
    assert!(relay.proc.child.try_wait().unwrap().is_none(), "relay died");
}

#[test]
fn client_certificates_decide_the_agent_name() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "m");
    let good_ca = TestCa::new(dir.path(), "good");
    let other_ca = TestCa::new(dir.path(), "other");
    let relay = Relay::start(
        dir.path(),
        port_range(5),
        &["--client-ca", good_ca.cert_path.to_str().unwrap()],
    );
    let (cert, key) = good_ca.issue(dir.path(), "cert-agent");
    let tls_args = |c: &std::path::Path, k: &std::path::Path| {
        vec![
            "--client-cert".to_string(),
            c.display().to_string(),
            "--client-key".to_string(),
            k.display().to_string(),
        ]
    };

    // A certificate from the configured CA is an identity: no token needed.
    let a = tls_args(&cert, &key);
    let no_token = dir.path().join("empty-token");
    write_secret(&no_token, "placeholder-token-not-valid\n");
    let mut args: Vec<&str> = a.iter().map(String::as_str).collect();
    args.extend(["--token-file", no_token.to_str().unwrap()]);
    let good = Agent::start(dir.path(), &relay, "cert-agent", sshd.port, &args);
    let port = good.wait_port(UP);
    let mut session = EchoSession::start(&sshd, port);

    // The same certificate may not claim another name.
    let mut impostor = Agent::start(dir.path(), &relay, "someone-else", sshd.port, &args);
    assert_eq!(impostor.proc.wait_exit(UP).and_then(|s| s.code()), Some(77));
    assert!(
        impostor
            .proc
            .log()
            .contains("may not use the name \"someone-else\""),
        "{}",
        impostor.proc.log()
    );

    // A certificate from another CA is rejected in the TLS handshake.
    let (bad_cert, bad_key) = other_ca.issue(dir.path(), "cert-agent-2");
    let b = tls_args(&bad_cert, &bad_key);
    let mut args: Vec<&str> = b.iter().map(String::as_str).collect();
    args.extend(["--token-file", no_token.to_str().unwrap()]);
    let mut foreign = Agent::start(dir.path(), &relay, "cert-agent-2", sshd.port, &args);
    relay.proc.wait_log("TLS handshake failed", UP);
    // The relay's alert usually arrives after the agent finished its side of the handshake: the
    // authenticated relay refused the certificate, which is final (exit 77). When it races into
    // the agent's handshake it cannot be told from an alert injected on the path, so the agent
    // retries with its long backoff instead; either way it never gets a session.
    let outcome = wait_for(UP, || {
        let log = foreign.proc.log();
        if log.contains("rejected this agent's client certificate") {
            return foreign
                .proc
                .wait_exit(UP)
                .and_then(|s| s.code())
                .map(|c| c == 77);
        }
        log.contains("failed before the relay was authenticated")
            .then_some(true)
    });
    assert_eq!(outcome, Some(true), "{}", foreign.proc.log());
    assert!(
        foreign.status().is_none(),
        "a foreign certificate got a session"
    );

    session.send(32);
    session.finish();
}

#[test]
fn repeated_failures_get_an_address_banned() {
    let dir = scratch();
    let relay = Relay::start(
        dir.path(),
        port_range(3),
        &["--auth-failure-limit", "3", "--auth-ban", "60s"],
    );
    let (addr, pin) = (relay.listen.clone(), relay.fingerprint());
    for i in 0..3 {
        let reply = block_on(raw::exchange(
            &addr,
            &pin,
            &raw::hello(&format!("guess-{i}"), "guessed-token-xxxxxx", (1, 1)),
        ));
        assert_eq!(reply, RelayHello::Refused(Refusal::Unauthorized));
    }
    relay.proc.wait_log(
        "banning 127.0.0.1 for 60s after 3 failed agent handshakes",
        UP,
    );
    // Now even the TLS handshake is refused: the connection is closed on accept.
    // Within 1 s: a relay that does not ban waits 10 s for the TLS hello instead.
    let mut s = TcpStream::connect(&addr).unwrap();
    if let Err(what) = closed_within(&mut s, Duration::from_secs(1)) {
        panic!("a banned address's connection was not closed on accept: {what}");
    }
}

#[test]
fn no_secret_reaches_logs_status_file_or_process_list() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "g");
    let relay = Relay::start(
        dir.path(),
        port_range(5),
        &[
            "--audit-log",
            dir.path().join("audit.jsonl").to_str().unwrap(),
        ],
    );
    let agent = Agent::start(dir.path(), &relay, "quiet", sshd.port, &[]);
    let port = agent.wait_port(UP);
    ok_stdout(&sshd.ssh("127.0.0.1", port, "echo hi"));
    let ps = String::from_utf8(
        std::process::Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    // A rejected agent too: its bad token must not be echoed anywhere.
    let bad = dir.path().join("bad.token");
    write_secret(&bad, "definitely-wrong-token-value\n");
    let mut rejected = Agent::start(
        dir.path(),
        &relay,
        "rejected",
        sshd.port,
        &["--token-file", bad.to_str().unwrap()],
    );
    rejected.proc.wait_exit(UP);
    relay.proc.wait_log("authentication failed", UP);

    let token = std::fs::read_to_string(relay.token_file())
        .unwrap()
        .trim()
        .to_string();
    let key = std::fs::read_to_string(relay.state_dir.join("tls-key.pem")).unwrap();
    let key_lines: Vec<&str> = key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect();
    assert!(!key_lines.is_empty());
    let mut haystacks = vec![
        ("ps", ps),
        ("relay log", relay.proc.log()),
        ("agent log", agent.proc.log()),
        ("agent stdout", agent.proc.out()),
        ("rejected agent log", rejected.proc.log()),
        (
            "status file",
            std::fs::read_to_string(&agent.status_file).unwrap(),
        ),
    ];
    haystacks.push((
        "audit log",
        std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap_or_default(),
    ));
    for (what, text) in &haystacks {
        assert!(!text.contains(&token), "token found in {what}");
        assert!(
            !text.contains("definitely-wrong-token-value"),
            "rejected token found in {what}"
        );
        for l in &key_lines {
            assert!(!text.contains(l), "key material found in {what}");
        }
    }
    // The audit log did record the connection, with bytes both ways.
    let audit = &haystacks.last().unwrap().1;
    let rec: serde_json::Value =
        serde_json::from_str(audit.lines().next().expect("no audit record")).unwrap();
    assert_eq!(rec["agent"], "quiet");
    assert_eq!(rec["relay_port"], port);
    assert!(
        rec["bytes_up"].as_u64().unwrap() > 0 && rec["bytes_down"].as_u64().unwrap() > 0,
        "{rec}"
    );
    assert_eq!(rec["outcome"], "closed");
}
