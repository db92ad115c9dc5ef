//! The host agent's local API and CLI (issue 28): tunnels added with the real
//! `worker-agent tunnel` CLI get their own ports and carry real ssh; after kill -9 the restarted
//! host agent brings every persisted tunnel back on the same port; the socket keeps out users
//! outside its group and answers garbage and huge bodies with clear errors.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

const HOST: &str = "host-token-0123456789abcdef";
const A: &str = "job-a-token-0123456789abcdef";
const B: &str = "job-b-token-0123456789abcdef";

/// A relay that lets the host credential hold a session (names `gpu-*`) and each job's token
/// claim its own name only.
fn relay(dir: &Path) -> Relay {
    let file = tokens_file(
        dir,
        &[
            ("hosts", HOST, "gpu-*"),
            ("job-a", A, "vh-a"),
            ("job-b", B, "vh-b"),
        ],
    );
    Relay::start(
        dir,
        port_range(6),
        &["--tokens-file", file.to_str().unwrap()],
    )
}

/// The host agent's command: host mode, its API socket and state directory in `dir`.
fn host_agent(dir: &Path, relay: &Relay, extra: &[&str]) -> AgentBuilder {
    let token = dir.join("host.token");
    write_secret(&token, HOST);
    Agent::builder(dir, "gpu-1")
        .relay(relay)
        .token_file(&token)
        .host_mode(dir)
        .args(extra)
}

/// `worker-agent tunnel --api-socket SOCK ARGS`.
fn cli(dir: &Path, args: &[&str]) -> Output {
    cli_command(dir, args).output().unwrap()
}

fn cli_command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = tunnel_cli(&host_api_socket(dir));
    cmd.args(args);
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Adds tunnel `name` -> `ssh=127.0.0.1:target` with the token `token` (from a 0600 file);
/// returns its port from the CLI's `ssh enabled on HOST:PORT` line.
fn add(dir: &Path, name: &str, target: u16, token: &str) -> u16 {
    let file = dir.join(format!("{name}.token"));
    write_secret(&file, token);
    let service = format!("ssh=127.0.0.1:{target}");
    let out = cli(
        dir,
        &[
            "add",
            name,
            "--service",
            &service,
            "--join-token-file",
            file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "add {name}: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = stdout.lines().next().unwrap_or_default();
    assert!(
        line.starts_with("ssh enabled on 127.0.0.1:"),
        "add {name}: {}",
        text(&out)
    );
    line.rsplit(':').next().unwrap().parse().unwrap()
}

/// `tunnel ls --json`, parsed: (name, port of its ssh endpoint) per tunnel.
fn listed(dir: &Path) -> Vec<(String, Option<u16>)> {
    let out = cli(dir, &["ls", "--json"]);
    assert!(out.status.success(), "ls: {}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ls --json is not JSON ({e}): {}", text(&out)));
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let port = t["endpoints"]
                .as_array()
                .and_then(|e| e.first())
                .and_then(|e| e["port"].as_u64())
                .map(|p| p as u16);
            (t["name"].as_str().unwrap().to_string(), port)
        })
        .collect()
}

#[test]
fn cli_tunnels_get_ports_carry_ssh_and_come_back_after_kill_9() {
    if !require_tools(&[("sshd", "openssh-server"), ("ssh", "openssh-client")]) {
        return;
    }
    let dir = scratch();
    let dir = dir.path();
    let relay = relay(dir);
    let sshd_a = Sshd::start(dir, "job-a");
    let sshd_b = Sshd::start(dir, "job-b");
    let builder = host_agent(dir, &relay, &[]);
    let mut agent = builder.clone().start();
    wait_file(&host_api_socket(dir), "the API socket", UP);

    let pa = add(dir, "vh-a", sshd_a.port, A);
    let pb = add(dir, "vh-b", sshd_b.port, B);
    assert_ne!(pa, pb);
    assert_eq!(
        ok_stdout(&sshd_a.ssh("127.0.0.1", pa, "echo $JG_WHO")).trim(),
        "job-a"
    );
    assert_eq!(
        ok_stdout(&sshd_b.ssh("127.0.0.1", pb, "echo $JG_WHO")).trim(),
        "job-b"
    );

    // A token for another name is refused, with the relay's reason and exit 1, and not kept.
    let wrong = dir.join("wrong.token");
    write_secret(&wrong, A);
    let out = cli(
        dir,
        &[
            "add",
            "vh-b2",
            "--service",
            "ssh=127.0.0.1:22",
            "--join-token-file",
            wrong.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vh-b2"),
        "{}",
        text(&out)
    );

    // ls: the table names both; --json parses and gives the same ports.
    let table = cli(dir, &["ls"]);
    let table_text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table_text.starts_with("NAME")
            && table_text.contains("vh-a")
            && table_text.contains("vh-b"),
        "{}",
        text(&table)
    );
    let mut before = listed(dir);
    before.sort();
    assert_eq!(
        before,
        vec![("vh-a".into(), Some(pa)), ("vh-b".into(), Some(pb))]
    );
    // Persisted privately, one file per tunnel; the refused one is not there.
    for name in ["vh-a", "vh-b"] {
        let file = dir.join(format!("state/tunnels/{name}.json"));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    assert!(!dir.join("state/tunnels/vh-b2.json").exists());

    // kill -9 and start again: every tunnel back on its port, without any CLI call.
    agent.proc.kill();
    let agent = builder.start();
    wait_until("both tunnels back on their ports", UP, || {
        let mut now = listed_quietly(dir)?;
        now.sort();
        (now == before).then_some(())
    });
    for (sshd, port, who) in [(&sshd_a, pa, "job-a"), (&sshd_b, pb, "job-b")] {
        let back = wait_for(UP, || {
            let out = sshd.ssh("127.0.0.1", port, "echo $JG_WHO");
            (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == who)
                .then_some(())
        });
        assert!(
            back.is_some(),
            "no ssh to {who} on port {port} after the restart; log:\n{}",
            agent.proc.log()
        );
    }

    // rm: gone from the list and from the state directory; the other stays.
    let out = cli(dir, &["rm", "vh-b", "--release"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!dir.join("state/tunnels/vh-b.json").exists());
    assert_eq!(listed(dir), vec![("vh-a".into(), Some(pa))]);
    let out = cli(dir, &["rm", "vh-b"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no tunnel named \"vh-b\""),
        "{}",
        text(&out)
    );
    let show = cli(dir, &["show", "vh-a"]);
    assert!(
        show.status.success() && String::from_utf8_lossy(&show.stdout).contains(&format!(":{pa}")),
        "{}",
        text(&show)
    );
}

/// `tunnel ls --json` once the API answers again (None while the agent restarts).
fn listed_quietly(dir: &Path) -> Option<Vec<(String, Option<u16>)>> {
    let out = cli(dir, &["ls", "--json"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v.as_array()?
            .iter()
            .map(|t| {
                let port = t["endpoints"][0]["port"].as_u64().map(|p| p as u16);
                (t["name"].as_str().unwrap_or_default().to_string(), port)
            })
            .collect(),
    )
}

/// One raw HTTP exchange on the API socket; returns the whole answer.
fn raw(dir: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(host_api_socket(dir)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer (and close) before it read all of a huge body.
    let _ = s.write_all(request);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn post(body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /v1/tunnels HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[test]
fn the_api_socket_keeps_out_other_users_and_answers_bad_requests_clearly() {
    if !require_tool("setpriv", "util-linux") {
        return;
    }
    let dir = scratch();
    let dir = dir.path();
    // Others must be able to reach the socket's directory for the socket's own mode to decide.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let relay = relay(dir);
    // The API group: nogroup (65534), whose member `nobody` plays the platform.
    let agent = host_agent(dir, &relay, &["--api-group", "65534"]).start();
    wait_file(&host_api_socket(dir), "the API socket", UP);
    let meta = std::fs::metadata(host_api_socket(dir)).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 65534);

    let as_user = |uid: u32, gid: u32| {
        let inner = cli_command(dir, &["ls", "--json"]);
        Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg("--")
            .arg(inner.get_program())
            .args(inner.get_args())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // A member of the group may list...
    let out = as_user(65534, 65534);
    assert!(out.status.success(), "group member refused: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    // ...a user outside it may not, and is told why (exit 77, EX_NOPERM).
    let out = as_user(65533, 65533);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--api-group"),
        "{}",
        text(&out)
    );

    // Even with the socket's mode opened up (an operator's mistake), the peer credentials
    // keep the outsider out: 403 from the API, logged with the caller's uid.
    std::fs::set_permissions(host_api_socket(dir), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_user(65533, 65533);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("this user may not use the host agent's API"),
        "{}",
        text(&out)
    );
    wait_until("the refusal logged", UP, || {
        let log = agent.proc.log();
        log.lines()
            .any(|l| l.contains("local API call refused") && l.contains("65533"))
            .then_some(())
    });
    std::fs::set_permissions(host_api_socket(dir), std::fs::Permissions::from_mode(0o660)).unwrap();

    // Garbage instead of HTTP: hyper's 400, and the agent lives on.
    let answer = raw(dir, b"\x16\x03\x01garbage\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    // Not JSON, the wrong shape, a bad service: 400 with a JSON error saying what is wrong.
    for (body, says) in [
        (&b"{not json"[..], "expected"),
        (&br#"{"name":"vh-a"}"#[..], "services"),
        (
            &br#"{"name":"vh-a","services":["ssh=nowhere"]}"#[..],
            "NAME=HOST:PORT",
        ),
        (
            &br#"{"name":"vh-a","services":["ssh=127.0.0.1:22"],"token":"x","token_file":"/x"}"#[..],
            "not both",
        ),
    ] {
        let answer = raw(dir, &post(body));
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
        let json = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {answer:?}"));
        assert!(
            v["error"].as_str().unwrap_or_default().contains(says),
            "{answer:?}"
        );
    }
    // A huge body: 413 with a JSON error.
    let huge = vec![b' '; 1 << 20];
    let answer = raw(dir, &post(&huge));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert!(answer.contains("\"kind\":\"too_large\""), "{answer:?}");
    // Still serving.
    let out = cli(dir, &["ls"]);
    assert!(out.status.success(), "{}", text(&out));
}
