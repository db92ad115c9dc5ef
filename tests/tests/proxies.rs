//! Workers that can only leave through a proxy (issue 24): the worker's namespace may reach the
//! relay only through a real proxy in its NAT router (tinyproxy for HTTP CONNECT with Basic
//! auth, microsocks for SOCKS5 with a username and password); iptables drops its direct
//! connections to the relay. Through each: the agent connects, ssh and scp both ways keep every
//! byte, parallel transfers open lanes, a proxy restart is survived on the same port. A wrong
//! password is a clear error, retried with backoff; the password shows nowhere. On loopback:
//! HTTPS_PROXY and NO_PROXY from the environment, `--proxy none`, a URL with a password refused;
//! squid as an HTTPS proxy (TLS to the proxy, checked against --proxy-ca).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);
const PROXY_PASSWORD: &str = "pr0xy-pass-0f-alice";
/// The proxy's address as the worker sees it: the router's side of the worker's link.
const PROXY_IP: &str = "10.77.3.1";
const RELAY_PORT: u16 = 7000;

/// The proxies' tools and the lab's, with their Debian packages.
const TOOLS: &[(&str, &str)] = &[
    ("tinyproxy", "tinyproxy"),
    ("microsocks", "microsocks"),
    ("ss", "iproute2"),
];

/// A NAT lab whose worker reaches the relay only through a proxy in the router, with a relay
/// and the worker's sshd running.
struct ProxyLab {
    lab: NatLab,
    relay: Relay,
    state: PathBuf,
    pin: String,
    sshd: Sshd,
}

impl ProxyLab {
    fn create(dir: &Path) -> Option<ProxyLab> {
        if !NatLab::require_tools() || !require_tools(TOOLS) {
            return None;
        }
        let lab = match NatLab::create() {
            Ok(lab) => lab,
            Err(why) => {
                skip_unless_ci(&format!("{why} (run as root to include this test)"));
                return None;
            }
        };
        // The worker may not reach the relay's network except through the router's proxy.
        sh_words(&format!(
            "ip netns exec {} iptables -I FORWARD 1 -s 10.77.3.0/24 -d 10.77.1.0/24 -j DROP",
            lab.router_ns
        ));
        let sshd_dir = dir.join("w");
        std::fs::create_dir_all(&sshd_dir).unwrap();
        let sshd = Sshd::start_in(&lab.worker_ns, &sshd_dir, "proxied");
        let relay = Relay::builder(dir)
            .wrapper(&["ip", "netns", "exec", &lab.relay_ns])
            .listen(&format!("{}:{RELAY_PORT}", lab.relay_ip))
            .range((12000, 12010))
            .args(["--heartbeat-interval", "1s", "--heartbeat-timeout", "4s"])
            .start();
        let state = relay.state_dir.clone();
        let pin = relay.fingerprint();
        Some(ProxyLab {
            lab,
            relay,
            state,
            pin,
            sshd,
        })
    }

    /// An agent in the worker's namespace with `extra` flags (the proxy among them).
    fn agent(&self, dir: &Path, name: &str, extra: &[&str]) -> (Proc, PathBuf) {
        let agent = Agent::builder(dir, name)
            .wrapper(&["ip", "netns", "exec", &self.lab.worker_ns])
            .server(&format!("{}:{RELAY_PORT}", self.lab.relay_ip))
            .token_file(&self.state.join("token"))
            .fingerprint(&self.pin)
            .target(self.sshd.port)
            .args(extra)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .start();
        (agent.proc, agent.status_file)
    }

    /// The public port from an agent's first `ssh enabled on HOST:PORT` line.
    fn port(&self, agent: &Proc) -> u16 {
        let port = enabled_port(agent);
        assert_eq!(
            agent.out().lines().next().unwrap(),
            format!("ssh enabled on {}:{port}", self.lab.relay_ip)
        );
        port
    }

    /// Runs `cmd` over ssh from the user's namespace through the relay's `port`.
    fn ssh(&self, port: u16, cmd: &str) -> std::process::Output {
        NatLab::cmd(&self.lab.user_ns, "ssh")
            .args(self.sshd.client_opts())
            .args([
                "-p",
                &port.to_string(),
                &format!("root@{}", self.lab.relay_ip),
                cmd,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Waits until ssh through `port` works (after a reconnect) and returns the time it took.
    fn wait_ssh(&self, port: u16, agent: &Proc) -> Duration {
        let started = Instant::now();
        wait_for(UP, || {
            let out = self.ssh(port, "echo back");
            (out.status.success() && ok_stdout(&out).trim() == "back").then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "ssh through :{port} never worked; agent log:\n{}",
                agent.log()
            )
        });
        started.elapsed()
    }

    /// scp of a `size`-byte file from the user to the worker and back, hashes compared.
    fn scp_both_ways(&self, dir: &Path, port: u16, size: usize, tag: &str) {
        let src = dir.join(format!("{tag}-src.bin"));
        let hash = random_file(&src, size);
        let up = dir.join(format!("{tag}-up.bin"));
        let down = dir.join(format!("{tag}-down.bin"));
        let remote = |p: &Path| format!("root@{}:{}", self.lab.relay_ip, p.display());
        let started = Instant::now();
        for (from, to) in [
            (src.display().to_string(), remote(&up)),
            (remote(&up), down.display().to_string()),
        ] {
            ok_stdout(
                &self
                    .scp()
                    .args(["-P", &port.to_string(), &from, &to])
                    .output()
                    .unwrap(),
            );
        }
        eprintln!(
            "{tag}: scp of {} MiB up and down in {:?}",
            size >> 20,
            started.elapsed()
        );
        assert_eq!(sha256_file(&up), hash, "upload through the proxy differs");
        assert_eq!(
            sha256_file(&down),
            hash,
            "download through the proxy differs"
        );
    }

    fn scp(&self) -> Command {
        let mut c = NatLab::cmd(&self.lab.user_ns, "scp");
        c.args(self.sshd.client_opts()).stdin(Stdio::null());
        c
    }

    /// Agent connections (session and lanes) the relay holds, all from the proxy.
    fn relay_connections(&self) -> usize {
        let out = NatLab::cmd(&self.lab.relay_ns, "ss")
            .args(["-Htn", "state", "established"])
            .arg(format!("( sport = :{RELAY_PORT} )"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            assert!(
                line.contains("10.77.1.1:"),
                "an agent connection that did not come from the proxy: {line}"
            );
        }
        text.lines().count()
    }

    /// What every proxy must carry: an ssh command, a 64 MiB scp both ways (hashes checked),
    /// and five parallel transfers of `parallel` bytes that open extra lanes (at least three
    /// relay connections).
    fn carries_ssh_scp_and_lanes(&self, dir: &Path, port: u16, tag: &str, parallel: usize) {
        let word = format!("via-{tag}");
        assert_eq!(
            ok_stdout(&self.ssh(port, &format!("echo {word}"))).trim(),
            word
        );
        self.scp_both_ways(dir, port, 64 << 20, tag);
        let most = self.parallel_scp(dir, port, parallel);
        eprintln!("parallel transfers through {tag}: up to {most} relay connections");
        assert!(
            most >= 3,
            "five parallel transfers used only {most} connection(s)"
        );
    }

    /// After the proxy came back: ssh works through the same `port`, and `name` was placed
    /// exactly twice (before and after), so the port is the lease's, not a new one.
    fn back_on_the_same_port(&self, port: u16, agent: &Proc, name: &str) {
        let took = self.wait_ssh(port, agent);
        eprintln!("ssh through the same port {took:?} after the proxy came back");
        assert_eq!(
            count(&self.relay.proc.log(), &format!("new tunnel [{name}]")),
            2,
            "{}",
            self.relay.proc.log()
        );
    }

    /// Five scp transfers at once; returns the most relay connections seen meanwhile.
    fn parallel_scp(&self, dir: &Path, port: u16, size: usize) -> usize {
        let mut jobs = Vec::new();
        for i in 0..5 {
            let src = dir.join(format!("par-{i}.bin"));
            let hash = random_file(&src, size);
            let copy = dir.join(format!("par-{i}-copy.bin"));
            let child = self
                .scp()
                .args([
                    "-P",
                    &port.to_string(),
                    &src.display().to_string(),
                    &format!("root@{}:{}", self.lab.relay_ip, copy.display()),
                ])
                .spawn()
                .unwrap();
            jobs.push((child, hash, copy));
        }
        let mut most = self.relay_connections();
        for (child, hash, copy) in jobs {
            most = most.max(self.relay_connections());
            ok_stdout(&child.wait_with_output().unwrap());
            assert_eq!(sha256_file(&copy), hash);
        }
        most
    }

    /// Asserts the proxy password appears in no agent log, no agent's argv and no status file.
    fn assert_password_hidden(agents: &[(&Proc, &Path)]) {
        let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
        let ps = String::from_utf8_lossy(&ps.stdout);
        let agent_lines: Vec<&str> = ps.lines().filter(|l| l.contains("worker-agent")).collect();
        assert!(!agent_lines.is_empty(), "no agent in ps:\n{ps}");
        for line in agent_lines {
            assert!(!line.contains(PROXY_PASSWORD), "password in ps: {line}");
        }
        for (agent, status) in agents {
            assert!(!agent.log().contains(PROXY_PASSWORD), "{}", agent.log());
            assert!(!agent.out().contains(PROXY_PASSWORD));
            let status = std::fs::read_to_string(status).unwrap_or_default();
            assert!(!status.contains(PROXY_PASSWORD), "{status}");
        }
    }
}

/// The proxy password file, 0600 as the agent insists.
fn password_file(dir: &Path, name: &str, password: &str) -> PathBuf {
    let path = dir.join(name);
    write_secret(&path, &format!("{password}\n"));
    path
}

/// tinyproxy in namespace `ns` on `ip:port`; Basic auth required when `auth` is given.
fn tinyproxy(
    ns: Option<&str>,
    dir: &Path,
    ip: &str,
    port: u16,
    auth: Option<(&str, &str)>,
) -> Proc {
    let conf = dir.join(format!("tinyproxy-{port}.conf"));
    let mut text = format!(
        "Port {port}\nListen {ip}\nUser nobody\nGroup nogroup\nTimeout 600\nMaxClients 200\nLogLevel Connect\n"
    );
    if let Some((user, pass)) = auth {
        text.push_str(&format!("BasicAuth {user} {pass}\n"));
    }
    std::fs::write(&conf, text).unwrap();
    let mut cmd = match ns {
        Some(ns) => NatLab::cmd(ns, "tinyproxy"),
        None => Command::new("tinyproxy"),
    };
    let proc = Proc::spawn("tinyproxy", cmd.arg("-d").arg("-c").arg(&conf), dir);
    let listening = || match ns {
        Some(ns) => NatLab::can_connect(ns, ip, port),
        None => std::net::TcpStream::connect((ip, port)).is_ok(),
    };
    assert!(
        wait_for(UP, || listening().then_some(())).is_some(),
        "tinyproxy did not start: {}{}",
        proc.out(),
        proc.log()
    );
    proc
}

/// Everything tinyproxy wrote (it logs to stdout or stderr depending on the version).
fn proxy_log(p: &Proc) -> String {
    format!("{}{}", p.out(), p.log())
}

/// microsocks (SOCKS5, username/password required) in namespace `ns` on `ip:port`.
fn microsocks(ns: &str, dir: &Path, ip: &str, port: u16, user: &str, pass: &str) -> Proc {
    let proc = Proc::spawn(
        "microsocks",
        NatLab::cmd(ns, "microsocks").args([
            "-i",
            ip,
            "-p",
            &port.to_string(),
            "-u",
            user,
            "-P",
            pass,
        ]),
        dir,
    );
    assert!(
        wait_for(UP, || NatLab::can_connect(ns, ip, port).then_some(())).is_some(),
        "microsocks did not start: {}",
        proc.log()
    );
    proc
}

#[test]
fn http_connect_with_basic_auth_carries_ssh_scp_and_lanes_and_survives_a_proxy_restart() {
    let dir = scratch();
    let Some(lab) = ProxyLab::create(dir.path()) else {
        return;
    };
    assert!(
        !NatLab::can_connect(&lab.lab.worker_ns, lab.lab.relay_ip, RELAY_PORT),
        "the worker reaches the relay directly: the lab would prove nothing"
    );
    let conf_dir = dir.path().join("proxy");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let mut proxy = tinyproxy(
        Some(&lab.lab.router_ns),
        &conf_dir,
        PROXY_IP,
        3128,
        Some(("alice", PROXY_PASSWORD)),
    );
    let pw = password_file(dir.path(), "proxy-password", PROXY_PASSWORD);
    let proxy_url = format!("http://alice@{PROXY_IP}:3128");
    let (agent, status) = lab.agent(
        dir.path(),
        "vh-http-proxy",
        &[
            "--proxy",
            &proxy_url,
            "--proxy-password-file",
            pw.to_str().unwrap(),
        ],
    );
    agent.wait_log(
        &format!("relay connections go through the proxy {proxy_url} (from the proxy setting, with a password)"),
        UP,
    );
    let port = lab.port(&agent);
    assert!(
        proxy_log(&proxy).contains(&format!("CONNECT {}:{RELAY_PORT}", lab.lab.relay_ip)),
        "{}",
        proxy_log(&proxy)
    );
    lab.carries_ssh_scp_and_lanes(dir.path(), port, "http-proxy", 4 << 20);
    ProxyLab::assert_password_hidden(&[(&agent, &status)]);

    // The proxy dies mid-session and comes back on the same port: so does the agent's port.
    let mut session = NatLab::cmd(&lab.lab.user_ns, "ssh")
        .args(lab.sshd.client_opts())
        .args([
            "-p",
            &port.to_string(),
            &format!("root@{}", lab.lab.relay_ip),
            "sleep 60",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    proxy.kill();
    agent.wait_log("connection to relay lost", UP);
    let conf_dir2 = dir.path().join("proxy2");
    std::fs::create_dir_all(&conf_dir2).unwrap();
    let proxy = tinyproxy(
        Some(&lab.lab.router_ns),
        &conf_dir2,
        PROXY_IP,
        3128,
        Some(("alice", PROXY_PASSWORD)),
    );
    lab.back_on_the_same_port(port, &agent, "vh-http-proxy");
    assert!(
        proxy_log(&proxy).contains("CONNECT"),
        "{}",
        proxy_log(&proxy)
    );
    let _ = session.kill();
    let _ = session.wait();
    ProxyLab::assert_password_hidden(&[(&agent, &status)]);
}

#[test]
fn socks5_with_a_password_carries_ssh_scp_and_lanes_and_survives_a_proxy_restart() {
    let dir = scratch();
    let Some(lab) = ProxyLab::create(dir.path()) else {
        return;
    };
    let mut proxy = microsocks(
        &lab.lab.router_ns,
        dir.path(),
        PROXY_IP,
        1080,
        "bob",
        PROXY_PASSWORD,
    );
    let pw = password_file(dir.path(), "proxy-password", PROXY_PASSWORD);
    let (agent, status) = lab.agent(
        dir.path(),
        "vh-socks",
        &[
            "--proxy",
            &format!("socks5h://bob@{PROXY_IP}:1080"),
            "--proxy-password-file",
            pw.to_str().unwrap(),
        ],
    );
    let port = lab.port(&agent);
    lab.carries_ssh_scp_and_lanes(dir.path(), port, "socks5", 2 << 20);

    proxy.kill();
    agent.wait_log("connection to relay lost", UP);
    let _proxy = microsocks(
        &lab.lab.router_ns,
        dir.path(),
        PROXY_IP,
        1080,
        "bob",
        PROXY_PASSWORD,
    );
    lab.back_on_the_same_port(port, &agent, "vh-socks");
    ProxyLab::assert_password_hidden(&[(&agent, &status)]);
}

#[test]
fn a_wrong_proxy_password_is_a_clear_error_retried_with_backoff() {
    let dir = scratch();
    let Some(lab) = ProxyLab::create(dir.path()) else {
        return;
    };
    let proxy = tinyproxy(
        Some(&lab.lab.router_ns),
        dir.path(),
        PROXY_IP,
        3128,
        Some(("alice", PROXY_PASSWORD)),
    );
    let _socks = microsocks(
        &lab.lab.router_ns,
        dir.path(),
        PROXY_IP,
        1080,
        "bob",
        PROXY_PASSWORD,
    );
    let wrong = "not-the-".to_string() + PROXY_PASSWORD;
    let pw = password_file(dir.path(), "wrong-password", &wrong);
    let (http, http_status) = lab.agent(
        dir.path(),
        "vh-wrong-http",
        &[
            "--proxy",
            &format!("http://alice@{PROXY_IP}:3128"),
            "--proxy-password-file",
            pw.to_str().unwrap(),
        ],
    );
    let (socks, socks_status) = lab.agent(
        dir.path(),
        "vh-wrong-socks",
        &[
            "--proxy",
            &format!("socks5://bob@{PROXY_IP}:1080"),
            "--proxy-password-file",
            pw.to_str().unwrap(),
        ],
    );
    http.wait_log(
        &format!("through proxy http://alice@{PROXY_IP}:3128: refused CONNECT to {}:{RELAY_PORT}: 401 Unauthorized; the proxy wants other credentials", lab.lab.relay_ip),
        UP,
    );
    socks.wait_log(
        &format!("through proxy socks5://bob@{PROXY_IP}:1080: rejected the user name and password"),
        UP,
    );
    // Retried, with backoff: a handful of attempts in eight seconds, not a busy loop.
    let before = count(&proxy_log(&proxy), "Request (file descriptor");
    std::thread::sleep(Duration::from_secs(8));
    let attempts = count(&proxy_log(&proxy), "Request (file descriptor") - before;
    eprintln!("attempts with a wrong password in 8 s: {attempts}");
    assert!(
        (1..=8).contains(&attempts),
        "{attempts} attempts in 8 s:\n{}",
        http.log()
    );
    // Logged once, not on every retry.
    assert_eq!(count(&http.log(), "401 Unauthorized"), 1, "{}", http.log());
    // The status file says why.
    for (status, needle) in [
        (&http_status, "401 Unauthorized"),
        (&socks_status, "rejected the user name and password"),
    ] {
        let text = std::fs::read_to_string(status).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let error = v["relays"][0]["error"].as_str().unwrap_or_default();
        assert!(error.contains(needle), "{text}");
    }
    for p in [&http, &socks] {
        assert!(!p.log().contains(&wrong), "{}", p.log());
    }
    ProxyLab::assert_password_hidden(&[(&http, &http_status), (&socks, &socks_status)]);
    assert!(
        lab.relay
            .proc
            .log()
            .lines()
            .all(|l| !l.contains("vh-wrong")),
        "{}",
        lab.relay.proc.log()
    );
}

/// An agent on loopback with its environment set by the test (no inherited proxy variables).
fn env_agent(
    dir: &Path,
    relay: &Relay,
    sshd: &Sshd,
    name: &str,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Proc {
    let mut agent = Agent::builder(dir, name)
        .relay(relay)
        .target(sshd.port)
        .args(extra);
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        agent = agent.env_remove(var);
    }
    for (k, v) in env {
        agent = agent.env(k, v);
    }
    agent.start().proc
}

#[test]
fn https_proxy_and_no_proxy_from_the_environment_are_honoured() {
    if !require_tool("tinyproxy", "tinyproxy") {
        return;
    }
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "envproxy");
    let relay = Relay::start(dir.path(), port_range(4), &[]);
    let proxy_port = free_port();
    let proxy = tinyproxy(None, dir.path(), "127.0.0.1", proxy_port, None);
    let proxy_url = format!("http://127.0.0.1:{proxy_port}");

    // HTTPS_PROXY alone: through the proxy, said once at start.
    let a = env_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-env-proxy",
        &[("HTTPS_PROXY", &proxy_url)],
        &[],
    );
    let port = enabled_port(&a);
    assert_eq!(
        count(&a.log(), &format!("relay connections go through the proxy {proxy_url} (from the environment variable HTTPS_PROXY)")),
        1,
        "{}",
        a.log()
    );
    assert!(
        proxy_log(&proxy).contains(&format!("CONNECT {}", relay.listen)),
        "{}",
        proxy_log(&proxy)
    );
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo env-proxy")).trim(),
        "env-proxy"
    );

    // A dead proxy in the environment, but the relay is in NO_PROXY: direct.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let b = env_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-no-proxy",
        &[
            ("https_proxy", &dead),
            ("NO_PROXY", "localhost,127.0.0.0/8"),
        ],
        &[],
    );
    let port_b = enabled_port(&b);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port_b, "echo direct")).trim(),
        "direct"
    );
    // `--proxy none` ignores the environment's dead proxy.
    let c = env_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-proxy-none",
        &[("ALL_PROXY", &dead)],
        &["--proxy", "none"],
    );
    enabled_port(&c);
    assert!(!c.log().contains("through the proxy"), "{}", c.log());
    // Without NO_PROXY the dead proxy is named in the error.
    let d = env_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-dead-proxy",
        &[("ALL_PROXY", &dead)],
        &[],
    );
    d.wait_log(&format!("through proxy {dead}: cannot connect"), UP);

    // A proxy URL with a password is refused before anything starts, the password unsaid.
    let out = Agent::builder(dir.path(), "x")
        .subcommand("check-config")
        .relay(&relay)
        .args(["--proxy", "http://alice:hunter2@127.0.0.1:3128"])
        .no_log_env()
        .command()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("carries a password") && !stderr.contains("hunter2"),
        "{stderr}"
    );
}

/// squid as an HTTPS forward proxy (TLS to the proxy, then CONNECT): its certificate is checked
/// against `--proxy-ca`, the relay's by pin inside the tunnel.
#[test]
fn an_https_proxy_carries_the_agent_link() {
    if !require_tool("squid", "squid") {
        return;
    }
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "httpsproxy");
    let relay = Relay::start(dir.path(), port_range(2), &[]);
    let ca = TestCa::new(dir.path(), "proxy");
    let (cert, key) = ca.issue_server(dir.path(), "localhost");
    // squid reads its key as root, but a test key may be readable.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let logs = dir.path().join("squid-logs");
    std::fs::create_dir_all(&logs).unwrap();
    sh(&["chown", "proxy", logs.to_str().unwrap()]);
    let port = free_port();
    let conf = dir.path().join("squid.conf");
    std::fs::write(
        &conf,
        format!(
            "https_port 127.0.0.1:{port} tls-cert={} tls-key={}\nhttp_access allow all\ncache deny all\n\
             pid_filename {l}/squid.pid\naccess_log stdio:{l}/access.log\ncache_log {l}/cache.log\n\
             coredump_dir {l}\nlogfile_rotate 0\nshutdown_lifetime 0 seconds\n",
            cert.display(),
            key.display(),
            l = logs.display()
        ),
    )
    .unwrap();
    let squid = Proc::spawn(
        "squid",
        Command::new("squid").arg("-N").arg("-f").arg(&conf),
        dir.path(),
    );
    let up = wait_for(UP, || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok()
            .then_some(())
    });
    assert!(
        up.is_some(),
        "squid did not start: {}{}",
        squid.out(),
        squid.log()
    );

    let proxy_url = format!("https://localhost:{port}");
    let a = env_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-https-proxy",
        &[],
        &[
            "--proxy",
            &proxy_url,
            "--proxy-ca",
            ca.cert_path.to_str().unwrap(),
        ],
    );
    let p = enabled_port(&a);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", p, "echo via-https-proxy")).trim(),
        "via-https-proxy"
    );
    // squid logs a tunnel when it ends: stop the agent, then look.
    let mut a = a;
    a.kill();
    let needle = format!("CONNECT {}", relay.listen);
    let logged = wait_for(UP, || {
        std::fs::read_to_string(logs.join("access.log"))
            .ok()
            .filter(|l| l.contains(&needle))
    });
    assert!(
        logged.is_some(),
        "squid never carried the agent: {}",
        std::fs::read_to_string(logs.join("access.log")).unwrap_or_default()
    );
    // Without the proxy's CA (only the system bundle) the agent refuses the proxy and says so.
    let b = env_agent(
        dir.path(),
        &relay,
        &sshd,
        "vh-https-proxy-untrusted",
        &[],
        &["--proxy", &proxy_url],
    );
    b.wait_log(
        &format!("through proxy {proxy_url}: TLS to the proxy failed: invalid peer certificate"),
        UP,
    );
}
