//! What operators see: health, metrics and the API against a live relay with two agents and
//! open ssh sessions; the `tunnels` and `ssh-config` commands; the agent's own metrics and status.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_api_and_operator_commands_reflect_live_tunnels() {
    let dir = scratch();
    let (sa, sb) = (
        Sshd::start(dir.path(), "ops-a"),
        Sshd::start(dir.path(), "ops-b"),
    );
    let relay = Relay::start(dir.path(), port_range(10), &[]);
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let a = Agent::start(
        dir.path(),
        &relay,
        "ops-a",
        sa.port,
        &["--metrics", &agent_metrics],
    );
    let b = Agent::start(dir.path(), &relay, "ops-b", sb.port, &[]);
    let (pa, pb) = (a.wait_port(UP), b.wait_port(UP));
    let admin = relay.admin_addr();

    assert_eq!(relay.admin("GET", "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(relay.admin("GET", "/readyz").0, 200);

    let (code, body) = relay.admin("GET", "/api/agents");
    assert_eq!(code, 200);
    let agents: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ops-a", "ops-b"]);

    // An open session through ops-a: counts and bytes must move as data moves.
    let mut session = EchoSession::start(&sa, pa);
    let tunnel_a = || {
        let (code, body) = relay.admin("GET", "/api/tunnels/ops-a");
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v[0].clone()
    };
    let before = wait_for(UP, || {
        let t = tunnel_a();
        (t["active_streams"] == 1 && t["bytes_down"].as_u64()? > 0).then_some(t)
    })
    .expect("the open session does not show in /api/tunnels");
    assert_eq!(before["port"], pa);
    assert_eq!(before["connected"], true);
    session.send(500);
    let after = wait_for(UP, || {
        let t = tunnel_a();
        (t["bytes_up"].as_u64()? > before["bytes_up"].as_u64()? + 10_000).then_some(t)
    })
    .expect("bytes_up did not grow with the data sent");
    assert!(after["bytes_down"].as_u64().unwrap() > before["bytes_down"].as_u64().unwrap());

    let (code, body) = relay.admin("GET", "/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        metric(&body, "jumpgate_agents_connected"),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "jumpgate_user_connections_active{agent=\"ops-a\",service=\"ssh\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &body,
            "jumpgate_user_connections_active{agent=\"ops-b\",service=\"ssh\"}"
        ),
        Some(0.0)
    );
    let up = metric(
        &body,
        "jumpgate_bytes_total{agent=\"ops-a\",service=\"ssh\",direction=\"up\"}",
    )
    .unwrap();
    assert!(up > 10_000.0, "{up}");
    assert_eq!(metric(&body, "jumpgate_ports_allocated"), Some(2.0));
    assert_eq!(metric(&body, "jumpgate_ports_free"), Some(8.0));
    assert!(metric(&body, "jumpgate_stream_open_seconds_count").unwrap() >= 1.0);
    assert!(body.contains("jumpgate_handshake_failures_total{reason=\"unauthorized\"} 0"));

    // The agent's own metrics.
    let (code, body) = http(&agent_metrics, "GET", "/metrics", None);
    assert_eq!(code, 200);
    assert_eq!(
        metric(
            &body,
            &format!(
                "jumpgate_agent_relay_connected{{relay=\"{}\"}}",
                relay.listen
            )
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(metric(&body, "jumpgate_agent_streams_active"), Some(1.0));
    assert!(metric(&body, "jumpgate_agent_bytes_total{direction=\"up\"}").unwrap() > 10_000.0);

    // `relay-server tunnels` and `ssh-config`, used for real.
    let tunnels = Command::new(bin("relay-server"))
        .args(["tunnels", "--admin", &admin, "--admin-token-file"])
        .arg(relay.admin_token_file())
        .output()
        .unwrap();
    let table = ok_stdout(&tunnels);
    assert!(
        table.contains("ops-a") && table.contains(&pa.to_string()) && table.contains("connected"),
        "{table}"
    );
    assert!(
        table.contains("ops-b") && table.contains(&pb.to_string()),
        "{table}"
    );
    let cfg = Command::new(bin("relay-server"))
        .args([
            "ssh-config",
            "--admin",
            &admin,
            "--user",
            "root",
            "--admin-token-file",
        ])
        .arg(relay.admin_token_file())
        .output()
        .unwrap();
    let cfg_text = ok_stdout(&cfg);
    assert!(
        cfg_text.contains(&format!(
            "Host ops-a\n    HostName 127.0.0.1\n    Port {pa}\n    User root"
        )),
        "{cfg_text}"
    );
    let cfg_file = dir.path().join("ssh_config");
    std::fs::write(&cfg_file, cfg_text).unwrap();
    for (sshd, host) in [(&sa, "ops-a"), (&sb, "ops-b")] {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(&cfg_file)
            .args(sshd.client_opts())
            .args([host, "echo $JG_WHO"])
            .output()
            .unwrap();
        assert_eq!(ok_stdout(&out).trim(), host);
    }

    // `worker-agent status`.
    let status = a.status_cli();
    assert!(ok_stdout(&status).contains(&format!("ssh enabled on 127.0.0.1:{pa}")));

    // Operator disconnect with release: the port goes back to the pool; unknown agents are 404.
    assert_eq!(relay.admin("DELETE", "/api/agents/nobody").0, 404);
    assert_eq!(relay.admin("GET", "/api/tunnels/nobody").0, 404);
    let (code, body) = relay.admin("DELETE", "/api/agents/ops-b?release=true");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["disconnected"], true);
    assert_eq!(v["released_ports"][0], pb);
    relay
        .proc
        .wait_log("leases released on operator request", UP);

    session.finish();
}

#[test]
fn admin_api_beyond_loopback_requires_a_token() {
    let dir = scratch();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "admin-token-for-tests-0123\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Without a token file, a non-loopback admin address is a configuration error.
    let out = Command::new(bin("relay-server"))
        .args([
            "check-config",
            "--port-range",
            "20000-20001",
            "--public-host",
            "h",
            "--admin",
            "0.0.0.0:7001",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin_token_file"));

    let admin = format!("127.0.0.1:{}", free_port());
    let relay = Relay::start(
        dir.path(),
        port_range(3),
        &[
            "--admin",
            &admin,
            "--admin-token-file",
            token.to_str().unwrap(),
        ],
    );
    assert_eq!(http(&relay.admin_addr(), "GET", "/healthz", None).0, 200);
    assert_eq!(http(&admin, "GET", "/metrics", None).0, 401);
    assert_eq!(http(&admin, "GET", "/api/tunnels", Some("wrong")).0, 401);
    assert_eq!(
        http(
            &admin,
            "GET",
            "/metrics",
            Some("admin-token-for-tests-0123")
        )
        .0,
        200
    );
    let tunnels = Command::new(bin("relay-server"))
        .args([
            "tunnels",
            "--admin",
            &admin,
            "--admin-token-file",
            token.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(ok_stdout(&tunnels).starts_with("AGENT"));
}

/// Every local user can reach the admin API on loopback, so changing the relay needs the token
/// there too: without a token configured a DELETE is refused (403, saying what to set); with one,
/// a DELETE without it is refused (401). Either way the agent stays connected; with the token
/// the DELETE goes through.
#[test]
fn mutating_admin_endpoints_need_the_token_also_on_loopback() {
    let dir = scratch();
    // A relay without an admin token (Relay::start would give it one).
    let relay = Relay::builder(dir.path())
        .bare()
        .on("127.0.0.1")
        .args(["--public-host", "127.0.0.1"])
        .args(["--admin", "127.0.0.1:0"])
        .range(port_range(2))
        .state_dir(&dir.path().join("relay-state"))
        .start();
    let agent = Agent::start(dir.path(), &relay, "keep-me", free_port(), &[]);
    let port = agent.wait_port(UP);
    let admin = relay.admin_addr();
    let (code, body) = http(&admin, "DELETE", "/api/agents/keep-me?release=true", None);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("admin_token_file"), "{body}");
    // Reading stays open on loopback.
    let (code, body) = http(&admin, "GET", "/api/agents", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("keep-me"), "{body}");
    assert!(!relay.proc.log().contains("on operator request"));
    assert_eq!(agent.wait_port(UP), port);
    drop(agent);
    drop(relay);

    // With a token: refused without it, done with it.
    let dir = scratch();
    let relay = Relay::start(dir.path(), port_range(2), &[]);
    let agent = Agent::start(dir.path(), &relay, "keep-me", free_port(), &[]);
    agent.wait_port(UP);
    let admin = relay.admin_addr();
    for bearer in [None, Some("wrong-token")] {
        let (code, body) = http(&admin, "DELETE", "/api/agents/keep-me", bearer);
        assert_eq!(code, 401, "{body}");
    }
    assert!(!relay.proc.log().contains("on operator request"));
    assert!(agent.status().is_some(), "{}", agent.proc.log());
    let (code, body) = relay.admin("DELETE", "/api/agents/keep-me");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["disconnected"], true);
}

/// Both daemons allocate with mimalloc (their `#[global_allocator]`, see BENCHMARKS.md,
/// "Allocator"), without transparent huge pages, and carry a tunnel so; nothing re-executes them
/// or edits their environment.
#[test]
fn daemons_allocate_with_mimalloc() {
    // mimalloc reports itself on stderr when asked to; glibc's malloc ignores the variable.
    let verbose = ["env", "MIMALLOC_VERBOSE=1"];
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "alloc");
    let relay = Relay::builder(dir.path())
        .range(port_range(3))
        .wrapper(&verbose)
        .start();
    let agent = Agent::builder(dir.path(), "alloc")
        .relay(&relay)
        .target(sshd.port)
        .env("MIMALLOC_VERBOSE", "1")
        .start();
    let port = agent.wait_port(UP);
    let out = sshd.ssh("127.0.0.1", port, "echo $JG_WHO");
    assert_eq!(ok_stdout(&out).trim(), "alloc");

    // With THP in "madvise" mode (the common default) only a process that asks gets huge pages.
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    for (proc, name) in [(&relay.proc, "relay-server"), (&agent.proc, "worker-agent")] {
        assert!(
            proc.log().contains("mimalloc: process init"),
            "{name} does not allocate with mimalloc:\n{}",
            proc.log()
        );
        let environ = std::fs::read(format!("/proc/{}/environ", proc.pid())).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        assert!(!environ.contains("GLIBC_TUNABLES"), "{name}: {environ}");
        if thp.contains("[madvise]") {
            let rollup =
                std::fs::read_to_string(format!("/proc/{}/smaps_rollup", proc.pid())).unwrap();
            let huge = rollup
                .lines()
                .find_map(|l| l.strip_prefix("AnonHugePages:"))
                .map(str::trim);
            assert_eq!(huge, Some("0 kB"), "{name} holds huge pages:\n{rollup}");
        }
    }
}
