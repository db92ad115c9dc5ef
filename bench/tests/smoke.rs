//! The benchmark runs end to end in smoke mode (tiny sizes, no thresholds): CI exercises it
//! without timing anything.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn smoke_run_writes_results() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_jumpgate-bench"));
    let bin_dir = bench.parent().unwrap().to_path_buf();
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(&bench)
        .args(["--smoke", "--agents", "3", "--out"])
        .arg(out.path())
        .env("JUMPGATE_BIN_DIR", &bin_dir)
        .env_remove("FRPS")
        .env_remove("FRPC")
        .env_remove("RATHOLE")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    let rows = json["results"].as_array().unwrap();
    let value = |metric: &str| {
        rows.iter()
            .find(|r| r["metric"] == metric)
            .and_then(|r| r["values"]["jumpgate"].as_f64())
            .unwrap_or_else(|| panic!("no jumpgate value for {metric}: {json}"))
    };
    assert!(value("connections/s (connect+echo+close)") > 0.0);
    assert!(value("echo RTT p50 (64 B)") > 0.0);
    assert_eq!(value("agents back after restart"), 3.0);
    if Command::new("iperf3").arg("--version").output().is_ok() {
        assert!(value("throughput, 1 stream(s)") > 0.0);
    } else {
        // CI installs iperf3 (.ci/run): there the throughput row must not go unchecked.
        assert!(
            !jumpgate_tests::in_ci(),
            "CI must have iperf3 (Debian package iperf3) for the throughput row"
        );
        eprintln!("skipped the throughput check: iperf3 (Debian package iperf3) not installed");
    }
    assert!(std::fs::read_to_string(out.path().join("results.md"))
        .unwrap()
        .contains("| jumpgate |"));
}

/// Why the WAN delay line cannot run here (it needs root, /dev/net/tun and iproute2), if so.
fn wan_unavailable() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false);
    if !root {
        return Some("not root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if Command::new("ip").args(["netns", "list"]).output().is_err() {
        return Some("iproute2 `ip` is missing".into());
    }
    None
}

/// The WAN rows run end to end across the delay line in smoke mode, the path really has the
/// configured RTT, and the run leaves no namespace behind.
#[test]
fn smoke_wan_rows_across_the_delay_line() {
    if let Some(why) = wan_unavailable() {
        assert!(
            !jumpgate_tests::in_ci(),
            "CI must be able to run the WAN delay line: {why}"
        );
        eprintln!("skipped: the WAN delay line cannot run here: {why}");
        return;
    }
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_jumpgate-bench"));
    let bin_dir = bench.parent().unwrap().to_path_buf();
    let out = tempfile::tempdir().unwrap();
    let child = Command::new(&bench)
        .args(["--smoke", "--only-wan", "--wan", "20", "--out"])
        .arg(out.path())
        .env("JUMPGATE_BIN_DIR", &bin_dir)
        .env_remove("FRPS")
        .env_remove("FRPC")
        .env_remove("RATHOLE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let run = child.wait_with_output().unwrap();
    assert!(
        run.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        !std::path::Path::new(&format!("/run/netns/jgb-w-{pid}")).exists(),
        "the worker namespace was left behind"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    let rows = json["results"].as_array().unwrap();
    let value = |metric: &str, system: &str| {
        rows.iter()
            .find(|r| r["metric"] == metric)
            .and_then(|r| r["values"][system].as_f64())
            .unwrap_or_else(|| panic!("no {system} value for {metric}: {json}"))
    };
    for system in ["direct", "jumpgate"] {
        let rtt = value("WAN 20 ms, echo RTT p50 (64 B), idle", system);
        assert!(
            (19.5..200.0).contains(&rtt),
            "{system}: echo RTT {rtt} ms across a 20 ms delay line"
        );
    }
    if Command::new("iperf3").arg("--version").output().is_ok() {
        assert!(value("WAN 20 ms, upload, 1 stream(s)", "jumpgate") > 0.0);
        assert!(value("WAN 20 ms, download, 4 stream(s)", "direct") > 0.0);
    }
}

/// The agent simulator puts 50 real agent sessions on a relay, every one gets a port (and a
/// listener: the relay holds a connection and a socket per agent), the relay reports its lease
/// operations, and after `kill -9` and a restart on the same state dir every agent is back on the
/// port it had.
#[test]
fn simulated_agents_get_ports_and_keep_them_across_a_relay_kill() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_jumpgate-bench"));
    let bin_dir = bench.parent().unwrap().to_path_buf();
    let out = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    // A range nothing else here listens in (tests run in parallel), so every agent can get the
    // port it had back.
    let (lo, hi) = jumpgate_tests::port_range(100);
    let range = format!("{lo}-{hi}");
    let run = Command::new(&bench)
        .args(["agents", "--count", "50", "--timeout-secs", "60"])
        .args(["--port-range", &range, "--out"])
        .arg(out.path())
        .env("JUMPGATE_BIN_DIR", &bin_dir)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "simulator failed: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    eprintln!("simulator run took {:?}", started.elapsed());
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("agents.json")).unwrap()).unwrap();
    let r = &json["runs"][0];
    assert_eq!(r["agents"], 50, "{json}");
    assert_eq!(r["cold"]["allocated"], 50, "{json}");
    assert!(r["relay_fds"].as_u64().unwrap() >= 100, "{json}");
    assert!(
        r["cold"]["hello"]["p50_ms"].as_f64().unwrap() > 0.0,
        "{json}"
    );
    assert!(
        r["cold"]["placement"]["p99_ms"].as_f64().unwrap() > 0.0,
        "{json}"
    );
    let restart = &r["restart"];
    assert_eq!(restart["storm"]["allocated"], 50, "{json}");
    assert_eq!(restart["same_port"], 50, "{json}");
    assert!(
        restart["storm"]["placement"]["p50_ms"].as_f64().unwrap() > 0.0,
        "{json}"
    );
    assert_eq!(r["complete"], true, "{json}");
    assert!(std::fs::read_to_string(out.path().join("agents.md"))
        .unwrap()
        .contains("| kill -9: back / on the same port | 50 / 50 |"));
}

/// The same run played by host agents (issue 28): 50 tunnels, 10 per host session, each placed,
/// and back on its port after the relay's kill -9, over five connections instead of fifty.
#[test]
fn the_simulator_plays_host_agents_whose_tunnels_survive_a_relay_restart() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_jumpgate-bench"));
    let bin_dir = bench.parent().unwrap().to_path_buf();
    let out = tempfile::tempdir().unwrap();
    let (lo, hi) = jumpgate_tests::port_range(100);
    let range = format!("{lo}-{hi}");
    let run = Command::new(&bench)
        .args(["agents", "--count", "50", "--host-tunnels", "10"])
        .args(["--timeout-secs", "60", "--port-range", &range, "--out"])
        .arg(out.path())
        .env("JUMPGATE_BIN_DIR", &bin_dir)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "simulator failed: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("agents.json")).unwrap()).unwrap();
    let r = &json["runs"][0];
    assert_eq!(r["host_tunnels"], 10, "{json}");
    assert_eq!(r["cold"]["allocated"], 50, "{json}");
    // 50 listeners and 5 host connections (50 sessions would need 100 descriptors and more).
    let fds = r["relay_fds"].as_u64().unwrap();
    assert!((55..100).contains(&fds), "{fds} descriptors: {json}");
    let restart = &r["restart"];
    assert_eq!(restart["storm"]["allocated"], 50, "{json}");
    assert_eq!(restart["same_port"], 50, "{json}");
    assert_eq!(r["complete"], true, "{json}");
    assert!(std::fs::read_to_string(out.path().join("agents.md"))
        .unwrap()
        .contains("50 tunnels, 10 per host"));
}

/// The two-relay fleet run: 20 simulated agents each hold a session with two relays sharing a
/// real PostgreSQL store, every agent has the same port on both, and while one relay is killed
/// -9, stays down two seconds and is restarted, user connections through the other keep echoing
/// and new ones get through while it is down; every agent comes back to the restarted relay on
/// its port.
#[test]
fn a_two_relay_fleet_keeps_users_connected_through_a_relay_kill() {
    use jumpgate_tests::postgres::Postgres;
    if !Postgres::available() {
        return;
    }
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_jumpgate-bench"));
    let bin_dir = bench.parent().unwrap().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path());
    let flags = pg.relay_flags();
    let store_flags: Vec<String> = flags
        .chunks(2)
        .filter(|f| f[0] != "--lease-store")
        .map(|f| format!("--relay-arg={}={}", f[0], f[1]))
        .collect();
    let out = tempfile::tempdir().unwrap();
    let (lo, hi) = jumpgate_tests::port_range(60);
    let run = Command::new(&bench)
        .args(["agents", "--relays", "2", "--store", "postgres"])
        .args(["--count", "20", "--timeout-secs", "60"])
        .args(["--port-range", &format!("{lo}-{hi}")])
        .args(&store_flags)
        .arg("--out")
        .arg(out.path())
        .env("JUMPGATE_BIN_DIR", &bin_dir)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "fleet simulation failed: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("agents-fleet.json")).unwrap())
            .unwrap();
    let r = &json["runs"][0];
    assert_eq!(r["cold"]["allocated"], 40, "{json}");
    assert_eq!(r["same_port_on_both"], 20, "{json}");
    assert_eq!(r["restart"]["storm"]["allocated"], 20, "{json}");
    assert_eq!(r["restart"]["same_port"], 20, "{json}");
    let users = &r["users"];
    eprintln!("users through the surviving relay: {users}");
    assert_eq!(users["sessions"], 20, "{json}");
    assert_eq!(users["sessions_broken"], 0, "{json}");
    // Counted while the killed relay was down (not the rounds before the kill): its 2 s down
    // is ten 200 ms rounds, so at least one full round of the 20 connections, and one new one.
    assert!(users["down_secs"].as_f64().unwrap() >= 2.0, "{json}");
    assert!(users["echoes_while_down"].as_u64().unwrap() >= 20, "{json}");
    assert!(users["new_while_down"].as_u64().unwrap() >= 1, "{json}");
    assert_eq!(users["new_failed"], 0, "{json}");
    assert_eq!(r["complete"], true, "{json}");
}

/// `host` (issue 28): three tunnels registered on one real host agent through the real
/// `worker-agent tunnel add` CLI (each exits 0 with its port, and the relay places all three),
/// then three ordinary agents on a fresh relay; every figure of the table is there.
#[test]
fn host_mode_bench_registers_tunnels_through_the_cli_and_compares_agents() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_jumpgate-bench"));
    let bin_dir = bench.parent().unwrap().to_path_buf();
    let out = tempfile::tempdir().unwrap();
    let (lo, hi) = jumpgate_tests::port_range(20);
    let run = Command::new(&bench)
        .args(["host", "--tunnels", "3", "--timeout-secs", "60"])
        .args(["--port-range", &format!("{lo}-{hi}"), "--out"])
        .arg(out.path())
        .env("JUMPGATE_BIN_DIR", &bin_dir)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "host bench failed: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("host.json")).unwrap()).unwrap();
    assert_eq!(r["tunnels"], 3, "{r}");
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("no {k}: {r}"));
    let p50 = r["register"]["p50_ms"].as_f64().unwrap();
    let max = r["register"]["max_ms"].as_f64().unwrap();
    assert!(p50 > 0.0 && max >= p50, "{r}");
    assert!(f("register_all_secs") * 1e3 >= max, "{r}");
    for k in [
        "agent_idle_kib",
        "agent_loaded_kib",
        "relay_idle_kib",
        "relay_host_kib",
        "relay2_agents_kib",
        "agents_pss_sum_kib",
        "agents_all_connected_secs",
    ] {
        assert!(f(k) > 0.0, "{k}: {r}");
    }
    // Three agent processes weigh at least three times what one idle host agent does.
    assert!(
        f("agents_sum_kib") >= 3.0 * f("agent_idle_kib") * 0.5,
        "{r}"
    );
    let md = std::fs::read_to_string(out.path().join("host.md")).unwrap();
    assert!(md.contains("| register p50 / p99 / max"), "{md}");
    assert!(md.contains("| p99 < 100 |"), "{md}");
    assert!(
        md.contains("relay RSS per agent (one agent per tunnel)"),
        "{md}"
    );
}

/// `ssh -J` next to `ssh -p` (issue 27's rows) with real OpenSSH: every row is measured on both
/// paths, the host CPU rows included, and nothing is left at zero.
#[test]
fn jump_bench_measures_both_paths_with_real_openssh() {
    if !jumpgate_tests::require_tools(&[("sshd", "openssh-server"), ("ssh", "openssh-client")]) {
        return;
    }
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_jumpgate-bench"));
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(&bench)
        .args(["jump", "--smoke", "--out"])
        .arg(out.path())
        .env("JUMPGATE_BIN_DIR", bench.parent().unwrap())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "jump bench failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results-jump.json")).unwrap())
            .unwrap();
    let rows = json.as_array().unwrap();
    let metrics: Vec<&str> = rows.iter().filter_map(|r| r["metric"].as_str()).collect();
    for metric in [
        "loopback, interactive RTT p50 (64 B, ssh -tt, raw cat)",
        "loopback, sessions/s (ssh ... true, one after another)",
        "loopback, scp 8 MiB up",
        "loopback, scp 8 MiB down",
        "loopback, scp up, host CPU per GiB (both SSH layers, relay, agent, sshd)",
        "loopback, scp down, host CPU per GiB (both SSH layers, relay, agent, sshd)",
    ] {
        assert!(metrics.contains(&metric), "no row {metric:?}: {json}");
    }
    for row in rows {
        for path in ["port", "jump"] {
            let v = row[path].as_f64().unwrap_or(0.0);
            assert!(v > 0.0, "{path} of {} is {v}: {json}", row["metric"]);
        }
    }
}
