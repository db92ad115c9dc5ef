//! Host mode, agent side (issue 28): the real worker-agent run with `--host-mode`, carrying the
//! tunnels of several jobs (each its own name, token, sshd and port) over one host session to
//! the real relay-server; real OpenSSH through each. Tunnels come from the config file's
//! `[[tunnel]]` tables and are added and removed by rewriting it and sending SIGHUP.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(60);

const HOST: &str = "host-token-0123456789abcdef";
const JOBS: [(&str, &str); 3] = [
    ("vh-a", "job-a-token-0123456789abcdef"),
    ("vh-b", "job-b-token-0123456789abcdef"),
    ("vh-c", "job-c-token-0123456789abcdef"),
];

/// A relay whose tokens file lets the host token hold host sessions (names `gpu-*`) and each
/// job's token claim that job's name only.
fn relay(dir: &Path) -> Relay {
    let mut entries = vec![("hosts", HOST, "gpu-*")];
    entries.extend(JOBS.iter().map(|(name, token)| (*name, *token, *name)));
    let file = tokens_file(dir, &entries);
    Relay::start(
        dir,
        port_range(8),
        &["--tokens-file", file.to_str().unwrap()],
    )
}

/// The host agent's config file with a `[[tunnel]]` table for each of `tunnels` (name, sshd).
fn write_config(dir: &Path, tunnels: &[(&str, &Sshd)]) -> PathBuf {
    let mut text = String::from("host_mode = true\n");
    for (name, sshd) in tunnels {
        let token = JOBS.iter().find(|(n, _)| n == name).unwrap().1;
        let token_file = dir.join(format!("{name}.token"));
        write_secret(&token_file, token);
        text.push_str(&format!(
            "\n[[tunnel]]\nname = \"{name}\"\ntoken_file = \"{}\"\nservice = [\"ssh=127.0.0.1:{}\"]\n",
            token_file.display(),
            sshd.port
        ));
    }
    let path = dir.join("host.toml");
    // Atomic, so a reload never reads half a file.
    let tmp = dir.join("host.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn start_host(dir: &Path, relay: &Relay, config: &Path) -> Agent {
    let host_token = dir.join("host.token");
    write_secret(&host_token, HOST);
    Agent::builder(dir, "gpu-1")
        .relay(relay)
        .token_file(&host_token)
        .args(&[
            "--host-mode",
            "-c",
            config.to_str().unwrap(),
            "--tunnel-status-dir",
            dir.join("tunnels").to_str().unwrap(),
        ])
        .start()
}

/// Tunnel `name`'s port from its status file, once its relay placed it.
fn tunnel_port(dir: &Path, name: &str) -> Option<u16> {
    let v = status_json(&dir.join("tunnels").join(format!("{name}.json")))?;
    (v["relays"][0]["state"] == "connected").then_some(())?;
    v["services"][0]["port"].as_u64().map(|p| p as u16)
}

/// Waits until `sshd` answers as itself through `port`.
fn serving(sshd: &Sshd, port: u16, agent: &Agent) {
    let reached = wait_for(UP, || {
        let out = sshd.ssh("127.0.0.1", port, "echo $JG_WHO");
        (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == sshd.tag)
            .then_some(())
    });
    if reached.is_none() {
        panic!(
            "no ssh to {} through port {port}; agent log:\n{}",
            sshd.tag,
            agent.proc.log()
        );
    }
}

fn have_tools() -> bool {
    require_tools(&[
        ("sshd", "openssh-server"),
        ("ssh", "openssh-client"),
        ("scp", "openssh-client"),
    ])
}

#[test]
fn three_tunnels_each_their_own_port_and_removing_one_leaves_a_transfer_intact() {
    if !have_tools() {
        return;
    }
    let dir = scratch();
    let relay = relay(dir.path());
    let sshds: Vec<Sshd> = JOBS
        .iter()
        .map(|(name, _)| Sshd::start(dir.path(), name))
        .collect();
    let all: Vec<(&str, &Sshd)> = JOBS.iter().map(|(n, _)| *n).zip(sshds.iter()).collect();
    let config = write_config(dir.path(), &all);
    let agent = start_host(dir.path(), &relay, &config);

    // Each tunnel on a port of its own, reaching its own sshd.
    let ports: Vec<u16> = JOBS
        .iter()
        .map(|(name, _)| {
            wait_for(UP, || tunnel_port(dir.path(), name))
                .unwrap_or_else(|| panic!("tunnel {name} never placed; log:\n{}", agent.proc.log()))
        })
        .collect();
    let mut distinct = ports.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{ports:?}");
    for (sshd, port) in sshds.iter().zip(&ports) {
        serving(sshd, *port, &agent);
    }
    agent.proc.wait_log("vh-a: ssh enabled on", UP);
    // One host session: one connected relay in the host's own status file, no services.
    let own = status_json(&agent.status_file).unwrap();
    assert_eq!(own["services"].as_array().map(Vec::len), Some(0), "{own}");

    // A slow scp through vh-b (about 6 s at 40 Mbit/s), running while vh-a is removed.
    let src = dir.path().join("up.bin");
    let hash = random_file(&src, 32 << 20);
    let remote = dir.path().join("remote.bin");
    let mut scp = Command::new("scp")
        .args(sshds[1].client_opts())
        .args(["-l", "40000", "-P", &ports[1].to_string()])
        .arg(&src)
        .arg(format!("root@127.0.0.1:{}", remote.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the transfer to start", UP, || {
        std::fs::metadata(&remote)
            .ok()
            .filter(|m| m.len() > 1 << 20)
            .map(|_| ())
    });

    write_config(dir.path(), &[all[1], all[2]]);
    agent.proc.signal("HUP");
    wait_until("vh-a's status file to go", UP, || {
        (!dir.path().join("tunnels/vh-a.json").exists()).then_some(())
    });
    wait_until("vh-a's port to close", UP, || {
        (!sshds[0].ssh("127.0.0.1", ports[0], "true").status.success()).then_some(())
    });
    assert!(
        scp.try_wait().unwrap().is_none(),
        "the transfer ended before the removal; make it slower"
    );
    let out = scp.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "scp through vh-b failed across vh-a's removal: {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.proc.log()
    );
    assert_eq!(sha256_file(&remote), hash);
    // The others are untouched; vh-a comes back on its port when the file lists it again.
    serving(&sshds[2], ports[2], &agent);
    write_config(dir.path(), &all);
    agent.proc.signal("HUP");
    serving(&sshds[0], ports[0], &agent);
    assert!(
        !agent.proc.log().contains(JOBS[0].1),
        "a job's token was logged"
    );
}

#[test]
fn after_a_relay_kill_every_tunnel_comes_back_on_its_port() {
    if !have_tools() {
        return;
    }
    let dir = scratch();
    let mut relay = relay(dir.path());
    let sshds: Vec<Sshd> = JOBS
        .iter()
        .map(|(name, _)| Sshd::start(dir.path(), name))
        .collect();
    let all: Vec<(&str, &Sshd)> = JOBS.iter().map(|(n, _)| *n).zip(sshds.iter()).collect();
    let config = write_config(dir.path(), &all);
    let agent = start_host(dir.path(), &relay, &config);
    let ports: Vec<u16> = JOBS
        .iter()
        .map(|(name, _)| wait_for(UP, || tunnel_port(dir.path(), name)).unwrap())
        .collect();
    for (sshd, port) in sshds.iter().zip(&ports) {
        serving(sshd, *port, &agent);
    }

    relay.kill_and_restart();
    for (sshd, port) in sshds.iter().zip(&ports) {
        serving(sshd, *port, &agent);
    }
    for ((name, _), port) in JOBS.iter().zip(&ports) {
        assert_eq!(
            wait_for(UP, || tunnel_port(dir.path(), name)),
            Some(*port),
            "{name}"
        );
    }
}
