//! One host agent at scale (issue 28): 20 tunnels registered with the real `worker-agent tunnel`
//! CLI, each to its own sshd (four of them inside their own network namespace, one of those on
//! the namespace's loopback only), each on its own port; removing one leaves a transfer through
//! another and the other 18 untouched; kill -9 of the host agent and then of the relay brings
//! all 20 back on their ports. A fleet of two relays sharing PostgreSQL: one host agent given
//! one relay holds a host session with both, and each tunnel has one port on both.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(60);

const HOST: &str = "host-token-0123456789abcdef";
/// Tunnels on the one host agent.
const N: usize = 20;
/// The last `IN_NS` tunnels' sshds run in their own network namespace; the very last listens on
/// that namespace's loopback only.
const IN_NS: usize = 4;

fn job_name(i: usize) -> String {
    format!("vh-{i:02}")
}

fn job_token(i: usize) -> String {
    format!("job-{i:02}-token-0123456789abcdef")
}

/// A tokens file: the host token holds host sessions (names `gpu-*`), each job's token claims
/// its own name only.
fn tokens(dir: &Path, jobs: usize) -> PathBuf {
    let owned: Vec<(String, String)> = (0..jobs).map(|i| (job_name(i), job_token(i))).collect();
    let mut entries = vec![("hosts", HOST, "gpu-*")];
    entries.extend(
        owned
            .iter()
            .map(|(name, token)| (name.as_str(), token.as_str(), name.as_str())),
    );
    tokens_file(dir, &entries)
}

/// The host agent: host mode, its API socket and state directory in `dir`, its own status file.
fn host_agent(dir: &Path) -> AgentBuilder {
    let token = dir.join("host.token");
    write_secret(&token, HOST);
    Agent::builder(dir, "gpu-1")
        .token_file(&token)
        .host_mode(dir)
}

/// `worker-agent tunnel --api-socket SOCK ARGS`.
fn cli(dir: &Path, args: &[&str]) -> Output {
    tunnel_cli(&host_api_socket(dir))
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `tunnel add NAME --service SERVICE --join-token-file F` for job `i`; the CLI's output.
fn add(dir: &Path, i: usize, service: &str) -> Output {
    let file = dir.join(format!("{}.token", job_name(i)));
    write_secret(&file, &job_token(i));
    let out = cli(
        dir,
        &[
            "add",
            &job_name(i),
            "--service",
            service,
            "--join-token-file",
            file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "add {}: {}", job_name(i), text(&out));
    out
}

/// The port of the CLI's first `ssh enabled on 127.0.0.1:PORT` line.
fn added_port(out: &Output) -> u16 {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("ssh enabled on 127.0.0.1:"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no `ssh enabled on` line: {}", text(out)))
}

/// `tunnel ls --json` as (name, port) pairs, sorted; None while the API does not answer.
fn listed(dir: &Path) -> Option<Vec<(String, Option<u16>)>> {
    let out = cli(dir, &["ls", "--json"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut all: Vec<(String, Option<u16>)> = v
        .as_array()?
        .iter()
        .map(|t| {
            let port = t["endpoints"][0]["port"].as_u64().map(|p| p as u16);
            (t["name"].as_str().unwrap_or_default().to_string(), port)
        })
        .collect();
    all.sort();
    Some(all)
}

/// The SSH banner through `port`: proof that the port is served by the relay and the tunnel
/// reaches an sshd.
fn banner(port: u16) -> Option<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") && line.len() < 256 {
        s.read_exact(&mut byte).ok()?;
        line.push(byte[0]);
    }
    line.starts_with(b"SSH-2.0-").then_some(())
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

/// A named network namespace, deleted on drop: loopback up and, unless `lonely`, an
/// interface with 10.77.`k`.1 (an address that exists only inside it).
struct Ns {
    name: String,
}

impl Ns {
    fn create(k: usize, lonely: bool) -> Result<Ns, String> {
        let name = format!("jghs{}-{k}", std::process::id() % 100_000);
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("`ip` not available (Debian package iproute2): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot create network namespaces: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let ns = Ns { name };
        sh_words(&format!("ip -n {} link set lo up", ns.name));
        if !lonely {
            // No `dummy` module here: a veth pair with both ends inside does the same.
            sh_words(&format!(
                "ip -n {} link add d0 type veth peer name d1",
                ns.name
            ));
            sh_words(&format!("ip -n {} addr add 10.77.{k}.1/24 dev d0", ns.name));
            sh_words(&format!("ip -n {} link set d0 up", ns.name));
            sh_words(&format!("ip -n {} link set d1 up", ns.name));
        }
        Ok(ns)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// An sshd inside `ns` listening on `listen`, reached from inside at `ip`.
fn sshd_in(ns: &str, listen: &str, ip: &str, dir: &Path, tag: &str) -> Sshd {
    let mut sshd = Sshd::prepare(dir, tag);
    let port = free_port();
    let config = sshd.config(port, listen);
    let proc = Proc::spawn(
        &format!("sshd-{tag}"),
        NatLab::cmd(ns, Sshd::binary())
            .args(["-D", "-e", "-f"])
            .arg(config),
        dir,
    );
    let up = wait_for(UP, || NatLab::can_connect(ns, ip, port).then_some(()));
    assert!(up.is_some(), "sshd in {ns} did not start: {}", proc.log());
    sshd.attach(proc, port);
    sshd
}

/// One job's target: its sshd and the `--service` that reaches it.
struct Target {
    sshd: Sshd,
    service: String,
}

/// Twenty sshds started in parallel: the first 16 on the host's loopback, three in namespaces
/// on a dummy interface's address, the last on its namespace's loopback only.
fn targets(dir: &Path, namespaces: &[Ns]) -> Vec<Target> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                s.spawn(move || {
                    let tag = format!("job-{i:02}");
                    match i.checked_sub(N - IN_NS) {
                        None => {
                            let sshd = Sshd::start(dir, &tag);
                            let service = format!("ssh=127.0.0.1:{}", sshd.port);
                            Target { sshd, service }
                        }
                        Some(k) => {
                            let ns = &namespaces[k].name;
                            let ip = if k == IN_NS - 1 {
                                "127.0.0.1".to_string()
                            } else {
                                format!("10.77.{k}.1")
                            };
                            let listen = if k == IN_NS - 1 {
                                "127.0.0.1"
                            } else {
                                "0.0.0.0"
                            };
                            let sshd = sshd_in(ns, listen, &ip, dir, &tag);
                            let service = format!("ssh={ip}:{},netns={ns}", sshd.port);
                            Target { sshd, service }
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn twenty_cli_tunnels_survive_a_removal_and_kill_9_of_agent_and_relay() {
    if !require_tools(&[
        ("sshd", "openssh-server"),
        ("ssh", "openssh-client"),
        ("scp", "openssh-client"),
        ("ip", "iproute2"),
    ]) {
        return;
    }
    let namespaces: Vec<Ns> = match (0..IN_NS)
        .map(|k| Ns::create(k, k == IN_NS - 1))
        .collect::<Result<_, _>>()
    {
        Ok(all) => all,
        Err(why) => {
            skip_unless_ci(&format!("{why} (run as root to include this test)"));
            return;
        }
    };
    let dir = scratch();
    let dir = dir.path();
    let tokens = tokens(dir, N);
    let mut relay = Relay::start(
        dir,
        port_range(N as u16 + 4),
        &["--tokens-file", tokens.to_str().unwrap()],
    );
    let targets = targets(dir, &namespaces);
    // The lonely namespace's sshd is not reachable from the host: only the netns dial works.
    assert!(
        TcpStream::connect(("127.0.0.1", targets[N - 1].sshd.port)).is_err(),
        "port {} is open outside the namespace: the test would prove nothing",
        targets[N - 1].sshd.port
    );
    let builder = host_agent(dir).relay(&relay);
    let mut agent = builder.clone().start();
    wait_file(&host_api_socket(dir), "the API socket", UP);

    // Twenty adds through the CLI, each its own port, each reaching its own sshd.
    let ports: Vec<u16> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| added_port(&add(dir, i, &t.service)))
        .collect();
    assert_eq!(
        ports.iter().collect::<BTreeSet<_>>().len(),
        N,
        "ports shared between tunnels: {ports:?}"
    );
    for (t, port) in targets.iter().zip(&ports) {
        assert_eq!(
            ok_stdout(&t.sshd.ssh("127.0.0.1", *port, "echo $JG_WHO")).trim(),
            t.sshd.tag,
            "through port {port}"
        );
    }
    // And scp through each (at once): a file lands whole through every tunnel.
    let small = dir.join("small.bin");
    let small_hash = random_file(&small, 256 << 10);
    std::thread::scope(|s| {
        for (i, (t, port)) in targets.iter().zip(&ports).enumerate() {
            let (small, small_hash) = (&small, &small_hash);
            s.spawn(move || {
                let landed = dir.join(format!("small-{i}.bin"));
                let out = Command::new("scp")
                    .args(t.sshd.client_opts())
                    .args(["-P", &port.to_string()])
                    .arg(small)
                    .arg(format!("root@127.0.0.1:{}", landed.display()))
                    .stdin(Stdio::null())
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "scp through port {port}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert_eq!(&sha256_file(&landed), small_hash, "through port {port}");
            });
        }
    });
    let all: Vec<(String, Option<u16>)> = {
        let mut v: Vec<_> = (0..N).map(|i| (job_name(i), Some(ports[i]))).collect();
        v.sort();
        v
    };
    assert_eq!(listed(dir).as_ref(), Some(&all));

    // A slow scp through vh-01 (about 6 s at 40 Mbit/s) while vh-00 is removed.
    let src = dir.join("up.bin");
    let hash = random_file(&src, 32 << 20);
    let remote = dir.join("remote.bin");
    let scp = Command::new("scp")
        .args(targets[1].sshd.client_opts())
        .args(["-l", "40000", "-P", &ports[1].to_string()])
        .arg(&src)
        .arg(format!("root@127.0.0.1:{}", remote.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut scp = scp;
    wait_until("the transfer to start", UP, || {
        std::fs::metadata(&remote)
            .ok()
            .filter(|m| m.len() > 1 << 20)
            .map(|_| ())
    });
    let out = cli(dir, &["rm", &job_name(0)]);
    assert!(out.status.success(), "rm: {}", text(&out));
    relay.proc.wait_log("tunnel unregistered; lease kept", UP);
    wait_until("vh-00's port to stop serving", UP, || {
        banner(ports[0]).is_none().then_some(())
    });
    // Still running (a transfer that failed already is reported below with scp's stderr).
    assert!(
        scp.try_wait().unwrap().is_none_or(|s| !s.success()),
        "the transfer ended before the removal; make it slower"
    );
    let out = scp.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "scp through vh-01 failed across vh-00's removal: {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.proc.log()
    );
    assert_eq!(sha256_file(&remote), hash);
    // The other 18 (and vh-01) still answer, at the first try: none of them was closed and
    // placed again.
    for (t, port) in targets.iter().zip(&ports).skip(1) {
        let out = t.sshd.ssh("127.0.0.1", *port, "echo $JG_WHO");
        assert_eq!(
            ok_stdout(&out).trim(),
            t.sshd.tag,
            "through port {port} after vh-00's removal; agent log:\n{}",
            agent.proc.log()
        );
    }
    // Nor did the relay end any of them on the way (a closed tunnel is placed again within a
    // backoff, so the answers above alone would not show it).
    let relay_log = relay.proc.log();
    assert!(
        !relay_log.contains("tunnel closed by the relay"),
        "removing vh-00 ended other tunnels:\n{relay_log}"
    );
    // Added again, vh-00 gets its port back (the lease was kept).
    assert_eq!(added_port(&add(dir, 0, &targets[0].service)), ports[0]);
    assert_eq!(listed(dir).as_ref(), Some(&all));

    // kill -9 of the host agent: the restarted one (same state dir) re-adds all 20 on their
    // ports without any CLI call.
    agent.proc.kill();
    let agent = builder.start();
    wait_until(
        "all 20 listed on their ports after the agent's kill -9",
        UP,
        || (listed(dir)? == all).then_some(()),
    );
    let sample = [0, 7, N - 2, N - 1];
    let check_all = |what: &str, agent: &Agent| {
        for port in &ports {
            if wait_for(UP, || banner(*port)).is_none() {
                panic!(
                    "port {port} not serving after {what}; agent log:\n{}",
                    agent.proc.log()
                );
            }
        }
        for i in sample {
            serving(&targets[i].sshd, ports[i], agent);
        }
    };
    check_all("the agent's kill -9", &agent);

    // kill -9 of the relay, restarted with the same state dir (and lease file): all 20 back on
    // their ports.
    relay.kill_and_restart();
    check_all("the relay's kill -9", &agent);
    wait_until(
        "all 20 listed on their ports after the relay's kill -9",
        UP,
        || (listed(dir)? == all).then_some(()),
    );
    let log = agent.proc.log();
    assert!(!log.contains(&job_token(3)), "a job's token was logged");
}

/// `tunnel show NAME --json`: the ssh port on each relay, once placed on `n` relays.
fn ports_on_relays(dir: &Path, name: &str, n: usize) -> Option<Vec<u16>> {
    let out = cli(dir, &["show", name, "--json"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let relays = v["relays"].as_array()?;
    if relays.len() != n || relays.iter().any(|r| r["state"] != "placed") {
        return None;
    }
    relays
        .iter()
        .map(|r| r["endpoints"][0]["port"].as_u64().map(|p| p as u16))
        .collect()
}

#[test]
fn a_fleet_of_two_relays_gives_each_cli_tunnel_one_port_on_both() {
    if !Postgres::available() || !require_tool("ssh", "openssh-client") {
        return;
    }
    const JOBS: usize = 3;
    let dir = scratch();
    let dir = dir.path();
    let pg = Postgres::start(dir);
    let tokens = tokens(dir, JOBS);
    let range = port_range(8);
    let ips = ["127.0.0.1", "127.0.0.2"];
    let relays: Vec<Relay> = ips
        .iter()
        .map(|ip| {
            Relay::builder(&dir.join(format!("relay-{ip}")))
                .listen(&format!("{ip}:{}", free_port()))
                .range(range)
                .store_postgres(&pg)
                .args(["--proxy-bind", ip, "--tokens-file"])
                .arg(&tokens)
                .args(["--relay-id", &format!("relay-{ip}")])
                .start()
        })
        .collect();
    let sshds: Vec<Sshd> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..JOBS)
            .map(|i| s.spawn(move || Sshd::start(dir, &format!("job-{i:02}"))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Given only the first relay, the host agent finds the second through the store.
    let agent = relays
        .iter()
        .fold(host_agent(dir), |a, r| a.fingerprint_of(&r.state_dir))
        .server(&relays[0].listen)
        .start();
    wait_file(&host_api_socket(dir), "the API socket", UP);
    wait_until("a host session with both relays", UP, || {
        let v = agent.status()?;
        let relays = v["relays"].as_array()?;
        (relays.len() == 2 && relays.iter().all(|r| r["state"] == "connected")).then_some(())
    });

    for (i, sshd) in sshds.iter().enumerate() {
        let name = job_name(i);
        add(dir, i, &format!("ssh=127.0.0.1:{}", sshd.port));
        let ports = wait_for(UP, || ports_on_relays(dir, &name, 2)).unwrap_or_else(|| {
            panic!(
                "{name} not placed on both relays: {}\nagent log:\n{}",
                text(&cli(dir, &["show", &name, "--json"])),
                agent.proc.log()
            )
        });
        assert_eq!(ports[0], ports[1], "{name}: one port across the fleet");
        let port = ports[0];
        // Each relay's admin API: the tunnel, its port, held by both relays.
        for relay in &relays {
            let row = wait_for(UP, || {
                let (code, body) = relay.admin("GET", "/api/tunnels");
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                let row = v
                    .as_array()?
                    .iter()
                    .find(|r| r["agent"] == name.as_str())?
                    .clone();
                (code == 200 && row["relays"].as_array()?.len() == 2).then_some(row)
            })
            .unwrap_or_else(|| {
                panic!(
                    "{name} not held by both relays in {}'s admin API: {:?}",
                    relay.listen,
                    relay.admin("GET", "/api/tunnels")
                )
            });
            assert_eq!(row["port"].as_u64(), Some(u64::from(port)), "{row}");
            assert_eq!(
                row["relays"],
                serde_json::json!(["relay-127.0.0.1", "relay-127.0.0.2"]),
                "{row}"
            );
        }
        for host in ips {
            let out = sshd.ssh(host, port, "echo $JG_WHO");
            assert_eq!(ok_stdout(&out).trim(), sshd.tag, "{name} via {host}");
        }
    }
    // One lease per tunnel in the database.
    assert_eq!(
        pg.psql("SELECT count(*) FROM jumpgate_ports WHERE agent LIKE 'vh-%'")
            .trim(),
        JOBS.to_string()
    );
}
