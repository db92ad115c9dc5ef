//! Harness for end-to-end tests: starts the real `relay-server` and `worker-agent` binaries, a
//! throwaway OpenSSH `sshd` on loopback, and runs the real `ssh`/`scp` clients against them.
//!
//! Every process is killed when its handle drops, so a failing test leaves nothing behind.
//! Ports come from the OS (or from randomly placed ranges below the ephemeral range), so tests
//! run in parallel.

use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub mod postgres;
pub use postgres::Postgres;

/// Path of a workspace binary, next to the test executable's directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap(); // target/<profile>/deps
    let candidates = [dir.join(name), dir.parent().unwrap().join(name)];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| panic!("binary {name} not built; run the tests with `cargo nextest run --workspace` (or cargo test --workspace)"))
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A range of `width` ports below the kernel's ephemeral range, each bindable right now, placed
/// at random so parallel tests rarely collide.
pub fn port_range(width: u16) -> (u16, u16) {
    static SALT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(SALT.fetch_add(7919, Ordering::Relaxed))
        .wrapping_add(Instant::now().elapsed().subsec_nanos());
    for attempt in 0..200u32 {
        let lo = 15_000 + ((seed.wrapping_add(attempt.wrapping_mul(104_729)) % 15_000) as u16);
        let hi = lo + width - 1;
        if (lo..=hi).all(|p| TcpListener::bind(("0.0.0.0", p)).is_ok()) {
            return (lo, hi);
        }
    }
    panic!("no free port range of width {width}");
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `check` like [`wait_for`] and panics, naming `what` was awaited, if it never holds.
pub fn wait_until<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    wait_for(timeout, check)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Waits until `path` exists; panics naming `what` (the event the file marks) if it never does.
pub fn wait_file(path: &Path, what: &str, timeout: Duration) {
    wait_until(
        &format!("{what} ({} to appear)", path.display()),
        timeout,
        || path.exists().then_some(()),
    );
}

/// Whether this is a CI run (`CI=true`, as CI starts `.ci/run`). There a test that cannot run
/// here (a missing tool, no root) fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Reports that a test cannot run here because of `why`: in CI ([`in_ci`]) this panics, so the
/// test fails; elsewhere it prints `SKIPPED: {why}` and the caller returns early.
pub fn skip_unless_ci(why: &str) {
    if in_ci() {
        panic!("CI must run this test, but {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// Where the program `tool` is: the first executable of that name on `PATH`, or in `/usr/sbin`
/// and `/sbin` (where root's tools live even when `PATH` leaves them out).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Whether every `(tool, Debian package)` pair's tool is installed. If some are not, the test
/// cannot run: in CI this panics naming the packages to install (`.ci/run` must install them);
/// elsewhere it prints why the test is skipped and returns false, and the test returns early.
pub fn require_tools(tools: &[(&str, &str)]) -> bool {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| find_tool(tool).is_none())
        .map(|(tool, package)| format!("`{tool}` (Debian package {package})"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip_unless_ci(&format!(
        "not installed: {}; apt-get install the package(s)",
        missing.join(", ")
    ));
    false
}

/// [`require_tools`] for one tool: `require_tool("prlimit", "util-linux")`.
pub fn require_tool(tool: &str, package: &str) -> bool {
    require_tools(&[(tool, package)])
}

/// A child process whose stdout and stderr go to files; killed on drop.
pub struct Proc {
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Proc {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let stdout = dir.join(format!("{name}.{n}.out"));
        let stderr = dir.join(format!("{name}.{n}.log"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            stdout,
            stderr,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn out(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Waits until stderr contains `needle`; panics with the log if it never does.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        if wait_for(timeout, || self.log().contains(needle).then_some(())).is_none() {
            panic!(
                "{} never logged {needle:?}; log:\n{}",
                self.name,
                self.log()
            );
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {} failed", self.pid());
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = &mut self.child;
        wait_for(timeout, || child.try_wait().ok().flatten())
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A throwaway OpenSSH server with its own host key and one authorised user key.
/// Sessions see `JG_WHO=<tag>` in their environment, so a test can tell which sshd it reached.
pub struct Sshd {
    pub port: u16,
    pub tag: String,
    pub dir: PathBuf,
    proc: Option<Proc>,
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen not found: install openssh-client")
        .success();
    assert!(ok, "ssh-keygen failed");
}

impl Sshd {
    /// Path of the sshd binary.
    pub fn binary() -> &'static str {
        ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("sshd not found: install openssh-server")
    }

    /// Keys and directory, no process yet.
    pub fn prepare(dir: &Path, tag: &str) -> Sshd {
        let dir = dir.join(format!("sshd-{tag}"));
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all("/run/sshd").ok();
        keygen(&dir.join("host_key"));
        keygen(&dir.join("user_key"));
        fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
        Sshd {
            port: 0,
            tag: tag.to_string(),
            dir,
            proc: None,
        }
    }

    /// Writes an sshd_config for `listen:port` and returns its path.
    pub fn config(&self, port: u16, listen: &str) -> PathBuf {
        let config = format!(
            "Port {port}\nListenAddress {listen}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PermitRootLogin prohibit-password\nPidFile none\nSubsystem sftp internal-sftp\n\
             AllowTcpForwarding yes\nSetEnv JG_WHO={tag}\nMaxStartups 100:30:200\n",
            d = self.dir.display(),
            tag = self.tag
        );
        let path = self.dir.join(format!("sshd_config.{port}"));
        fs::write(&path, config).unwrap();
        path
    }

    /// Adopts a running sshd process listening on `port`.
    pub fn attach(&mut self, proc: Proc, port: u16) {
        self.proc = Some(proc);
        self.port = port;
    }

    /// Starts an sshd on 127.0.0.1 at a free port.
    pub fn start(dir: &Path, tag: &str) -> Sshd {
        let mut sshd = Sshd::prepare(dir, tag);
        for _ in 0..20 {
            let port = free_port();
            let config = sshd.config(port, "127.0.0.1");
            let mut proc = Proc::spawn(
                &format!("sshd-{tag}"),
                Command::new(Sshd::binary())
                    .args(["-D", "-e", "-f"])
                    .arg(config),
                &sshd.dir,
            );
            let up = wait_for(Duration::from_secs(5), || {
                if proc.child.try_wait().ok().flatten().is_some() {
                    return Some(false);
                }
                TcpStream::connect(("127.0.0.1", port)).ok().map(|_| true)
            });
            if up == Some(true) {
                sshd.attach(proc, port);
                return sshd;
            }
            proc.kill();
        }
        panic!("sshd did not start");
    }

    pub fn user_key(&self) -> PathBuf {
        self.dir.join("user_key")
    }

    /// A known_hosts file that trusts only this sshd, under the alias `tag`.
    pub fn known_hosts(&self) -> PathBuf {
        let path = self.dir.join("known_hosts");
        let key = fs::read_to_string(self.dir.join("host_key.pub")).unwrap();
        let line = format!("{} {}", self.tag, key);
        // Written once and atomically: ssh processes started in parallel read it meanwhile.
        if fs::read_to_string(&path).ok().as_deref() != Some(line.as_str()) {
            let tmp = self
                .dir
                .join(format!("known_hosts.{}.tmp", std::process::id()));
            fs::write(&tmp, line).unwrap();
            fs::rename(&tmp, &path).unwrap();
        }
        path
    }

    /// `ssh`/`scp`/`sftp` options that log in to this sshd (and fail on any other) at `port`.
    pub fn client_opts(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.user_key().display().to_string(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts().display()),
            "-o".into(),
            format!("HostKeyAlias={}", self.tag),
            "-o".into(),
            "ConnectTimeout=10".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    /// Runs `cmd` over ssh through `host:port`.
    pub fn ssh(&self, host: &str, port: u16, cmd: &str) -> Output {
        Command::new("ssh")
            .args(self.client_opts())
            .args(["-p", &port.to_string(), &format!("root@{host}"), cmd])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

/// A running relay-server with its state dir.
pub struct Relay {
    pub proc: Proc,
    pub listen: String,
    pub state_dir: PathBuf,
    pub range: (u16, u16),
    pub dir: PathBuf,
    pub extra: Vec<String>,
    pub wrapper: Vec<String>,
}

impl Relay {
    pub fn start(dir: &Path, range: (u16, u16), extra: &[&str]) -> Relay {
        Self::start_wrapped(dir, range, extra, &[])
    }

    /// Starts the relay under a wrapper command such as `prlimit --nofile=40`.
    pub fn start_wrapped(dir: &Path, range: (u16, u16), extra: &[&str], wrapper: &[&str]) -> Relay {
        let listen = format!("127.0.0.1:{}", free_port());
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let wrapper: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        Self::start_at(dir, range, listen, extra, wrapper)
    }

    /// Starts a relay whose agent port and public host are on loopback address `ip` (127.0.0.2
    /// for a second relay of a fleet on this machine; give it `--proxy-bind` the same `ip` so
    /// both relays can bind the same public ports).
    pub fn start_on(dir: &Path, ip: &str, range: (u16, u16), extra: &[&str]) -> Relay {
        Self::start_listening(dir, &format!("{ip}:{}", free_port()), range, extra)
    }

    /// Starts a relay whose agent port is exactly `listen` (relays at one port on several
    /// addresses, as behind a name with several addresses).
    pub fn start_listening(dir: &Path, listen: &str, range: (u16, u16), extra: &[&str]) -> Relay {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_at(dir, range, listen.to_string(), extra, Vec::new())
    }

    fn start_at(
        dir: &Path,
        range: (u16, u16),
        listen: String,
        extra: Vec<String>,
        wrapper: Vec<String>,
    ) -> Relay {
        let state_dir = dir.join("relay-state");
        // An admin token unless the test brings its own: changing the relay through the admin
        // API needs one, also on loopback.
        let admin_token: Vec<std::ffi::OsString> =
            if extra.iter().any(|a| a == "--admin-token-file") {
                vec![]
            } else {
                let path = dir.join(HARNESS_ADMIN_TOKEN_FILE);
                fs::write(&path, HARNESS_ADMIN_TOKEN).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
                vec!["--admin-token-file".into(), path.into()]
            };
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("relay-server"));
                c
            }
            None => Command::new(bin("relay-server")),
        };
        // The agent address's host is the public host unless the test names one (a fleet's).
        let public_host = match extra.iter().any(|a| a == "--public-host") {
            true => vec![],
            false => vec![
                "--public-host".to_string(),
                listen.rsplit_once(':').unwrap().0.to_string(),
            ],
        };
        let proc = Proc::spawn(
            "relay",
            cmd.args(["--listen", &listen])
                .args(&public_host)
                .args(if extra.iter().any(|a| a == "--admin") {
                    vec![]
                } else {
                    vec!["--admin", "127.0.0.1:0"]
                })
                .args(["--port-range", &format!("{}-{}", range.0, range.1)])
                .arg("--state-dir")
                .arg(&state_dir)
                .args(&admin_token)
                .args(&extra)
                .env("RUST_LOG", "info"),
            dir,
        );
        proc.wait_log("relay listening for agents", Duration::from_secs(20));
        Relay {
            proc,
            listen,
            state_dir,
            range,
            dir: dir.to_path_buf(),
            extra,
            wrapper,
        }
    }

    /// Kills the relay with SIGKILL and starts it again on the same address and state dir.
    pub fn kill_and_restart(&mut self) {
        self.proc.kill();
        let again = Self::start_at(
            &self.dir,
            self.range,
            self.listen.clone(),
            self.extra.clone(),
            self.wrapper.clone(),
        );
        *self = again;
    }

    pub fn token_file(&self) -> PathBuf {
        self.state_dir.join("token")
    }

    /// The admin API's address, from the relay's log.
    pub fn admin_addr(&self) -> String {
        let needle = "admin API listening on ";
        self.proc.wait_log(needle, Duration::from_secs(10));
        let log = self.proc.log();
        let rest = &log[log.find(needle).unwrap() + needle.len()..];
        rest.split_whitespace().next().unwrap().to_string()
    }

    /// GET (or another method) on the admin API with the relay's admin token; returns
    /// (status, body).
    pub fn admin(&self, method: &str, path: &str) -> (u16, String) {
        http(&self.admin_addr(), method, path, Some(&self.admin_token()))
    }

    pub fn fingerprint(&self) -> String {
        let out = Command::new(bin("relay-server"))
            .arg("fingerprint")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "fingerprint failed: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

/// A running worker-agent.
pub struct Agent {
    pub proc: Proc,
    pub status_file: PathBuf,
}

impl Agent {
    /// Starts an agent named `name` exposing `ssh` → `target`, trusting the relay by pin.
    pub fn start(dir: &Path, relay: &Relay, name: &str, target: u16, extra: &[&str]) -> Agent {
        let status_file = dir.join(format!("status-{name}.json"));
        let _ = fs::remove_file(&status_file);
        let mut cmd = Command::new(bin("worker-agent"));
        cmd.args(["--server", &relay.listen, "--name", name]);
        // Defaults for what the test does not override.
        if !extra.contains(&"--token-file") {
            cmd.arg("--token-file").arg(relay.token_file());
        }
        if !extra.contains(&"--fingerprint") && !extra.contains(&"--ca") {
            cmd.args(["--fingerprint", &relay.fingerprint()]);
        }
        if !extra.contains(&"--service") {
            cmd.args(["--service", &format!("ssh=127.0.0.1:{target}")]);
        }
        cmd.arg("--status-file")
            .arg(&status_file)
            .args(extra)
            .env("RUST_LOG", "info");
        let proc = Proc::spawn(&format!("agent-{name}"), &mut cmd, dir);
        Agent { proc, status_file }
    }

    /// The status file's content once it reports the agent connected to its first relay.
    pub fn status(&self) -> Option<serde_json::Value> {
        let text = fs::read_to_string(&self.status_file).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        (v["relays"][0]["state"] == "connected").then_some(v)
    }

    /// The public port of service `ssh`, once connected.
    pub fn wait_port(&self, timeout: Duration) -> u16 {
        wait_for(timeout, || {
            let v = self.status()?;
            v["services"][0]["port"].as_u64().map(|p| p as u16)
        })
        .unwrap_or_else(|| panic!("agent never connected; log:\n{}", self.proc.log()))
    }

    /// Waits until a user reaches `sshd` through this agent's `ssh` port, and returns the port.
    /// The session is then up end to end, its control stream included, which [`Agent::wait_port`]
    /// does not promise: the status file says "connected" before the first heartbeat, and an
    /// agent stopped in that gap ends its session as lost rather than as stopping.
    pub fn wait_serving(&self, sshd: &Sshd, timeout: Duration) -> u16 {
        let port = self.wait_port(timeout);
        let reached = wait_for(timeout, || {
            sshd.ssh("127.0.0.1", port, "true")
                .status
                .success()
                .then_some(())
        });
        if reached.is_none() {
            panic!(
                "no ssh session through port {port} within {timeout:?}; agent log:\n{}",
                self.proc.log()
            );
        }
        port
    }
}

/// A scratch directory for one test.
pub fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("jumpgate-e2e-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Writes `len` pseudo-random bytes to `path` and returns their SHA-256.
pub fn random_file(path: &Path, len: usize) -> String {
    let mut f = fs::File::open("/dev/urandom").unwrap();
    let mut data = vec![0u8; len];
    f.read_exact(&mut data).unwrap();
    fs::write(path, &data).unwrap();
    hex(&Sha256::digest(&data))
}

/// SHA-256 of a file's content, hex.
pub fn sha256_file(path: &Path) -> String {
    hex(&Sha256::digest(fs::read(path).unwrap()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts an ssh command succeeded and returns its stdout.
pub fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Resident memory of a process in KiB, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A line-count-free check: how many times `needle` appears in `text`.
pub fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// Runs a whitespace-separated command line, panicking with its output if it fails.
pub fn sh_words(line: &str) {
    sh(&line.split_whitespace().collect::<Vec<_>>());
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small routed network of namespaces: a NAT router joining a relay host, a user host and a
/// worker that may only dial out (MASQUERADE, inbound forwarding dropped), as behind a real NAT.
/// Everything is deleted on drop.
pub struct NatLab {
    pub relay_ns: String,
    pub user_ns: String,
    pub worker_ns: String,
    pub router_ns: String,
    pub relay_ip: &'static str,
    pub user_ip: &'static str,
    pub worker_ip: &'static str,
}

impl NatLab {
    /// Builds the lab, or returns why it cannot (not root, no `ip`/`iptables`). Tests call
    /// [`NatLab::require_tools`] first, so a missing tool fails in CI with the package to install.
    pub fn create() -> Result<NatLab, String> {
        let tag = format!("{}", std::process::id() % 100_000);
        let lab = NatLab {
            relay_ns: format!("jg{tag}-relay"),
            user_ns: format!("jg{tag}-user"),
            worker_ns: format!("jg{tag}-worker"),
            router_ns: format!("jg{tag}-router"),
            relay_ip: "10.77.1.2",
            user_ip: "10.77.2.2",
            worker_ip: "10.77.3.2",
        };
        let probe = Command::new("ip")
            .args(["netns", "add", &lab.router_ns])
            .output();
        match probe {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(format!(
                    "cannot create network namespaces: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => return Err(format!("`ip` not available (Debian package iproute2): {e}")),
        }
        if find_tool("iptables").is_none() {
            return Err("iptables not available (Debian package iptables)".into());
        }
        let r = lab.router_ns.clone();
        for ns in [&lab.relay_ns, &lab.user_ns, &lab.worker_ns] {
            sh(&["ip", "netns", "add", ns]);
        }
        for ns in [&lab.relay_ns, &lab.user_ns, &lab.worker_ns, &lab.router_ns] {
            sh_words(&format!("ip -n {ns} link set lo up"));
        }
        for (i, ns) in [(1, &lab.relay_ns), (2, &lab.user_ns), (3, &lab.worker_ns)] {
            let (inner, outer) = (format!("jg{tag}i{i}"), format!("jg{tag}o{i}"));
            sh_words(&format!("ip link add {inner} type veth peer name {outer}"));
            sh_words(&format!("ip link set {inner} netns {ns}"));
            sh_words(&format!("ip link set {outer} netns {r}"));
            sh_words(&format!("ip -n {ns} addr add 10.77.{i}.2/24 dev {inner}"));
            sh_words(&format!("ip -n {ns} link set {inner} up"));
            sh_words(&format!("ip -n {ns} route add default via 10.77.{i}.1"));
            sh_words(&format!("ip -n {r} addr add 10.77.{i}.1/24 dev {outer}"));
            sh_words(&format!("ip -n {r} link set {outer} up"));
        }
        sh_words(&format!(
            "ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1"
        ));
        // The worker's NAT: it can dial out, nothing can dial in.
        sh_words(&format!(
            "ip netns exec {r} iptables -t nat -A POSTROUTING -s 10.77.3.0/24 -j MASQUERADE"
        ));
        sh_words(&format!(
            "ip netns exec {r} iptables -A FORWARD -d 10.77.3.0/24 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
        ));
        sh_words(&format!(
            "ip netns exec {r} iptables -A FORWARD -d 10.77.3.0/24 -j DROP"
        ));
        Ok(lab)
    }

    /// The programs a lab and its checks run, with their Debian packages; see [`require_tools`].
    pub const TOOLS: &'static [(&'static str, &'static str)] = &[
        ("ip", "iproute2"),
        ("iptables", "iptables"),
        ("nc", "netcat-openbsd"),
    ];

    /// [`require_tools`] for [`NatLab::TOOLS`]: false (outside CI) when the lab cannot be built.
    pub fn require_tools() -> bool {
        require_tools(NatLab::TOOLS)
    }

    /// Silently drops every packet to and from the worker (no RST, like a dead link).
    pub fn cut_worker(&self) {
        for dir in ["-s", "-d"] {
            sh_words(&format!(
                "ip netns exec {} iptables -I FORWARD 1 {dir} 10.77.3.0/24 -j DROP",
                self.router_ns
            ));
        }
    }

    /// Undoes [`NatLab::cut_worker`].
    pub fn restore_worker(&self) {
        for dir in ["-s", "-d"] {
            sh_words(&format!(
                "ip netns exec {} iptables -D FORWARD {dir} 10.77.3.0/24 -j DROP",
                self.router_ns
            ));
        }
    }

    /// A command that runs inside namespace `ns`.
    pub fn cmd(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Whether a TCP connection from namespace `ns` to `ip:port` succeeds within 3 s.
    pub fn can_connect(ns: &str, ip: &str, port: u16) -> bool {
        // Without nc every probe would fail, and "cannot connect" would pass for the wrong reason.
        assert!(
            find_tool("nc").is_some(),
            "nc not installed (Debian package netcat-openbsd)"
        );
        NatLab::cmd(ns, "nc")
            .args(["-z", "-w", "3", ip, &port.to_string()])
            .stdin(Stdio::null())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for ns in [
            &self.relay_ns,
            &self.user_ns,
            &self.worker_ns,
            &self.router_ns,
        ] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A hand-driven agent-port client, for speaking broken or hostile protocol to the relay.
pub mod raw {
    use std::time::Duration;

    use jumpgate_proto::{AgentHello, RelayHello, Secret, ServiceRequest, PREFACE};
    use jumpgate_transport::frame_io::{read_frame, write_frame};
    use jumpgate_transport::tls::{self, Fingerprint, ServerTrust};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;

    /// A TLS connection to the relay's agent port, pinned like a real agent.
    pub async fn tls(addr: &str, pin: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
        let pin: Fingerprint = pin.parse().unwrap();
        let config = tls::client_config(ServerTrust::Pinned(vec![pin]), None).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        TlsConnector::from(config)
            .connect(tls::server_name("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// A hello for `name` with `token`, one ssh service.
    pub fn hello(name: &str, token: &str, versions: (u16, u16)) -> AgentHello {
        AgentHello {
            min_version: versions.0,
            max_version: versions.1,
            name: name.into(),
            token: Some(Secret::new(token)),
            services: vec![ServiceRequest {
                name: "ssh".into(),
                target_port: 22,
                preferred_port: None,
                strict: false,
                allow: vec![],
                no_port: false,
            }],
            software: "raw-test".into(),
            max_lanes: 0,
            lane_of: None,
        }
    }

    /// Sends a hello and returns the relay's answer.
    pub async fn exchange(addr: &str, pin: &str, hello: &AgentHello) -> RelayHello {
        let mut s = tls(addr, pin).await;
        s.write_all(PREFACE).await.unwrap();
        write_frame(&mut s, hello).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s))
            .await
            .expect("relay did not answer")
            .unwrap()
    }

    /// Writes `bytes` after TLS and reports whether the relay then closed the connection.
    pub async fn send_after_tls(addr: &str, pin: &str, bytes: &[u8]) -> bool {
        let mut s = tls(addr, pin).await;
        let _ = s.write_all(bytes).await;
        let _ = s.flush().await;
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

/// A tokio runtime for the async helpers in [`raw`].
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// An interactive ssh session running `cat`, checked line by line: proves a session survives
/// whatever else happens and loses no byte.
pub struct EchoSession {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    reader: Option<std::thread::JoinHandle<Vec<String>>>,
    sent: Vec<String>,
}

impl EchoSession {
    pub fn start(sshd: &Sshd, port: u16) -> EchoSession {
        Self::start_via(sshd, "127.0.0.1", port)
    }

    /// The same through `host` (one relay of a fleet on its own loopback address).
    pub fn start_via(sshd: &Sshd, host: &str, port: u16) -> EchoSession {
        let mut child = Command::new("ssh")
            .args(sshd.client_opts())
            .args(["-p", &port.to_string(), &format!("root@{host}"), "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect()
        });
        let mut s = EchoSession {
            child,
            stdin,
            reader: Some(reader),
            sent: Vec::new(),
        };
        s.send(64);
        s
    }

    /// Sends `n` numbered lines of varied content.
    pub fn send(&mut self, n: usize) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().unwrap();
        for _ in 0..n {
            let i = self.sent.len();
            let line = format!(
                "{i:06} {}",
                "abcdefghijklmnopqrstuvwxyz0123456789".repeat(1 + i % 7)
            );
            stdin.write_all(line.as_bytes()).unwrap();
            stdin.write_all(b"\n").unwrap();
            self.sent.push(line);
        }
        stdin.flush().unwrap();
    }

    /// Closes stdin and checks every line came back, in order, and ssh exited cleanly.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let got = self.reader.take().unwrap().join().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "ssh session failed: {status:?}");
        assert_eq!(got.len(), self.sent.len(), "lost lines");
        assert!(got == self.sent, "echoed bytes differ");
    }
}

/// A throwaway certificate authority for mutual-TLS tests.
pub struct TestCa {
    pub cert_path: PathBuf,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(dir: &Path, tag: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("test CA {tag}"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let cert_path = dir.join(format!("ca-{tag}.pem"));
        fs::write(&cert_path, issuer.pem()).unwrap();
        TestCa { cert_path, issuer }
    }

    /// Issues a server certificate for `name` (a DNS name or an IP address); returns (cert,
    /// key) paths.
    pub fn issue_server(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (dir.join("server.crt"), dir.join("server.key"));
        fs::write(&c, cert.pem()).unwrap();
        fs::write(&k, key.serialize_pem()).unwrap();
        fs::set_permissions(&k, fs::Permissions::from_mode(0o600)).unwrap();
        (c, k)
    }

    /// Issues a client certificate for DNS name `name`; returns (cert, key) paths.
    pub fn issue(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        fs::write(&c, cert.pem()).unwrap();
        fs::write(&k, key.serialize_pem()).unwrap();
        fs::set_permissions(&k, fs::Permissions::from_mode(0o600)).unwrap();
        (c, k)
    }
}

/// A minimal HTTP/1.1 request; returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    use std::io::Write;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// Writes a relay tokens file (0600) with one `[[token]]` per `(label, token, agent pattern)`.
pub fn tokens_file(dir: &Path, entries: &[(&str, &str, &str)]) -> PathBuf {
    let path = dir.join("tokens.toml");
    let body: String = entries
        .iter()
        .map(|(label, token, agents)| {
            format!(
                "[[token]]\nlabel = \"{label}\"\ntoken = \"{token}\"\nagents = [\"{agents}\"]\n\n"
            )
        })
        .collect();
    write_secret(&path, &body);
    path
}

/// The admin token `Relay::start` gives a relay whose test does not pass `--admin-token-file`.
pub const HARNESS_ADMIN_TOKEN: &str = "harness-admin-token-0123456789";
/// Its file, in the test's directory.
pub const HARNESS_ADMIN_TOKEN_FILE: &str = "relay-admin.token";

impl Relay {
    /// The relay's admin token file: the test's `--admin-token-file`, else the harness's.
    pub fn admin_token_file(&self) -> PathBuf {
        self.extra
            .iter()
            .position(|a| a == "--admin-token-file")
            .and_then(|i| self.extra.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_else(|| self.dir.join(HARNESS_ADMIN_TOKEN_FILE))
    }

    /// The relay's admin token.
    pub fn admin_token(&self) -> String {
        fs::read_to_string(self.admin_token_file())
            .unwrap()
            .trim()
            .to_string()
    }
}

/// Writes a secret file the way both binaries require it: readable by its owner only.
pub fn write_secret(path: &Path, content: &str) {
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}
