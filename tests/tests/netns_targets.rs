//! Targets in a container's own network namespace: a service with `netns=` is dialled from
//! inside that namespace, so a container that publishes no port (like `--network none`, with
//! sshd on its own loopback only) is reachable through the relay; an agent without the
//! privilege to enter the namespace refuses to start and says what it needs.

use std::process::Command;
use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("sshd", "openssh-server"),
    ("ssh", "openssh-client"),
    ("nc", "netcat-openbsd"),
    ("setpriv", "util-linux"),
];

/// A named network namespace with only loopback up (no veth: nothing outside reaches in), as
/// `docker run --network none` gives a container. Deleted on drop.
struct LonelyNs {
    name: String,
}

impl LonelyNs {
    fn create(tag: &str) -> Result<LonelyNs, String> {
        let name = format!("jgnt{}-{tag}", std::process::id() % 100_000);
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
        sh_words(&format!("ip -n {name} link set lo up"));
        Ok(LonelyNs { name })
    }
}

impl Drop for LonelyNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// An sshd inside `ns` listening on the namespace's 127.0.0.1 only, and its pid.
fn sshd_on_loopback_of(ns: &str, dir: &std::path::Path, tag: &str) -> (Sshd, u32) {
    let mut sshd = Sshd::prepare(dir, tag);
    let port = free_port();
    let config = sshd.config(port, "127.0.0.1");
    let proc = Proc::spawn(
        &format!("sshd-{tag}"),
        NatLab::cmd(ns, Sshd::binary())
            .args(["-D", "-e", "-f"])
            .arg(config),
        dir,
    );
    let up = wait_for(UP, || {
        NatLab::can_connect(ns, "127.0.0.1", port).then_some(())
    });
    assert!(up.is_some(), "sshd in {ns} did not start: {}", proc.log());
    // `ip netns exec` execs the program: this pid is sshd's, inside the namespace.
    let pid = proc.pid();
    sshd.attach(proc, port);
    (sshd, pid)
}

fn namespace_or_skip(tag: &str) -> Option<LonelyNs> {
    if !require_tools(TOOLS) {
        return None;
    }
    match LonelyNs::create(tag) {
        Ok(ns) => Some(ns),
        Err(why) => {
            skip_unless_ci(&format!("{why} (run as root to include this test)"));
            None
        }
    }
}

#[test]
fn sshd_on_a_namespace_loopback_is_reachable_by_name_and_by_proc_path() {
    let Some(ns) = namespace_or_skip("ok") else {
        return;
    };
    let dir = scratch();
    let (sshd, sshd_pid) = sshd_on_loopback_of(&ns.name, dir.path(), "lonely");
    // /proc/PID/ns/net of a process inside is the container-style way to name the namespace.
    let link = |p: &str| std::fs::read_link(p).unwrap();
    assert_ne!(
        link(&format!("/proc/{sshd_pid}/ns/net")),
        link("/proc/self/ns/net"),
        "sshd is not in its own network namespace"
    );
    // Nothing listens on that port in the agent's (the host's) own network.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", sshd.port)).is_err(),
        "port {} is open outside the namespace: the test would prove nothing",
        sshd.port
    );

    let relay = Relay::start(dir.path(), port_range(4), &[]);
    let agent = Agent::builder(dir.path(), "vh-exec-netns")
        .relay(&relay)
        .args([
            "--service",
            &format!("ssh=127.0.0.1:{},netns={}", sshd.port, ns.name),
            "--service",
            &format!("alt=127.0.0.1:{},netns=/proc/{sshd_pid}/ns/net", sshd.port),
        ])
        .start();
    let status = wait_until("both services enabled", UP, || {
        let v = agent.status()?;
        let services = v["services"].as_array()?;
        (services.len() == 2).then(|| v.clone())
    });
    for service in status["services"].as_array().unwrap() {
        let port = service["port"].as_u64().unwrap() as u16;
        let out = sshd.ssh("127.0.0.1", port, "echo $JG_WHO; cat /proc/net/dev | wc -l");
        let text = ok_stdout(&out);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("lonely"), "{}: {text}", service["name"]);
        // Inside the namespace only `lo` exists: /proc/net/dev holds two header lines and lo.
        assert_eq!(lines.next(), Some("3"), "{}: {text}", service["name"]);
    }
}

#[test]
fn an_agent_without_the_privilege_refuses_and_names_it() {
    let Some(ns) = namespace_or_skip("priv") else {
        return;
    };
    let dir = scratch();
    let relay = Relay::start(dir.path(), port_range(2), &[]);
    let builder = Agent::builder(dir.path(), "vh-exec-nopriv")
        .relay(&relay)
        .args(["--service", &format!("ssh=127.0.0.1:22,netns={}", ns.name)]);
    // Still root, but with every capability dropped (bounding, inheritable and ambient sets
    // empty), as an agent started by an unprivileged unit would be.
    let agent = builder.command();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--",
    ])
    .arg(agent.get_program())
    .args(agent.get_args());
    let (code, stderr) = exit_of(Proc::spawn("agent-nopriv", &mut cmd, dir.path()));
    assert_eq!(code, Some(64), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("/run/netns/{}", ns.name))
            && stderr.contains("CAP_SYS_ADMIN")
            && stderr.contains("AmbientCapabilities"),
        "unclear refusal: {stderr}"
    );
    // A namespace that does not exist is named as such (and exits 64 too).
    let mut cmd = Agent::builder(dir.path(), "vh-exec-nons")
        .relay(&relay)
        .args(["--service", "ssh=127.0.0.1:22,netns=jg-no-such-namespace"])
        .command();
    let (code, stderr) = exit_of(Proc::spawn("agent-nons", &mut cmd, dir.path()));
    assert_eq!(code, Some(64), "stderr: {stderr}");
    assert!(
        stderr.contains("/run/netns/jg-no-such-namespace") && stderr.contains("ip netns list"),
        "unclear refusal: {stderr}"
    );
}

/// The exit code and stderr of an agent that should refuse to start (killed after 20 s if it
/// does start).
fn exit_of(mut agent: Proc) -> (Option<i32>, String) {
    let status = agent.wait_exit(Duration::from_secs(20));
    (status.and_then(|s| s.code()), agent.log())
}

#[test]
fn a_host_agent_tunnel_added_by_the_cli_reaches_a_namespace_loopback() {
    let Some(ns) = namespace_or_skip("host") else {
        return;
    };
    let dir = scratch();
    let dir = dir.path();
    let (sshd, _) = sshd_on_loopback_of(&ns.name, dir, "lonely-job");
    const HOST: &str = "host-token-0123456789abcdef";
    const JOB: &str = "job-token-0123456789abcdef";
    let tokens = tokens_file(dir, &[("hosts", HOST, "gpu-*"), ("job", JOB, "vh-ns")]);
    let relay = Relay::start(
        dir,
        port_range(2),
        &["--tokens-file", tokens.to_str().unwrap()],
    );
    let (host_token, job_token) = (dir.join("host.token"), dir.join("job.token"));
    write_secret(&host_token, HOST);
    write_secret(&job_token, JOB);
    let socket = host_api_socket(dir);
    let _agent = Agent::builder(dir, "gpu-ns")
        .relay(&relay)
        .token_file(&host_token)
        .host_mode(dir)
        .start();
    wait_file(&socket, "the API socket", UP);
    let out = tunnel_cli(&socket)
        .args(["add", "vh-ns"])
        .args([
            "--service",
            &format!("ssh=127.0.0.1:{},netns={}", sshd.port, ns.name),
            "--join-token-file",
            job_token.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port: u16 = stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("ssh enabled on 127.0.0.1:"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no `ssh enabled on` line: {stdout}"));
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo $JG_WHO")).trim(),
        "lonely-job"
    );
    // A namespace that is not there is refused at `tunnel add` (64), naming it.
    let out = tunnel_cli(&socket)
        .args(["add", "vh-ns"])
        .args([
            "--service",
            "ssh=127.0.0.1:22,netns=jg-no-such-namespace",
            "--join-token-file",
            job_token.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("/run/netns/jg-no-such-namespace"),
        "{stderr}"
    );
}
