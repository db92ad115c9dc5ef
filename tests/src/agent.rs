//! The agent: one builder ([`Agent::builder`]) for every way a test starts `worker-agent`, and
//! the running agent's handle.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::{bin, wait_for, CommandLine, Launch, Proc, Relay, Sshd};

/// Where [`AgentBuilder::host_mode`] puts a host agent's API socket in `dir`.
pub fn host_api_socket(dir: &Path) -> PathBuf {
    dir.join("api").join("api.sock")
}

/// `worker-agent tunnel --api-socket SOCKET`, the CLI a platform calls at job start and end;
/// the test adds the subcommand (`add`, `rm`, `ls`, `show`) and its arguments.
pub fn tunnel_cli(socket: &Path) -> Command {
    let mut cmd = Command::new(bin("worker-agent"));
    cmd.arg("tunnel")
        .arg("--api-socket")
        .arg(socket)
        .stdin(std::process::Stdio::null());
    cmd
}

/// A running worker-agent.
pub struct Agent {
    pub proc: Proc,
    pub status_file: PathBuf,
}

/// Where an agent's pin comes from.
#[derive(Clone)]
enum Pin {
    /// The identity in a relay's state directory, read when the agent starts.
    Of(PathBuf),
    Is(String),
}

/// How to start one `worker-agent` named `name`: relays to dial ([`AgentBuilder::relay`] gives
/// its address, its token file and its pin), the `ssh` service's target, a status file
/// (`status-<name>.json` in the test's directory) and `RUST_LOG=info`, then the test's flags.
/// A default is left out when the test's flags give that flag (`--token-file`, `--fingerprint`
/// or `--ca`, `--service`).
#[derive(Clone)]
pub struct AgentBuilder {
    dir: PathBuf,
    name: String,
    servers: Vec<String>,
    token_file: Option<PathBuf>,
    pins: Vec<Pin>,
    target: Option<u16>,
    status_file: PathBuf,
    line: CommandLine,
    log_env: bool,
    env_removed: Vec<String>,
    subcommand: Option<String>,
}

impl Launch for AgentBuilder {
    fn line(&mut self) -> &mut CommandLine {
        &mut self.line
    }
}

impl AgentBuilder {
    /// Dials `relay`: its address, its pin and (unless another was given first) its token.
    pub fn relay(mut self, relay: &Relay) -> Self {
        self.servers.push(relay.listen.clone());
        self.pins.push(Pin::Of(relay.state_dir.clone()));
        if self.token_file.is_none() {
            self.token_file = Some(relay.token_file());
        }
        self
    }

    /// Dials `addr` (a relay's agent port, by address or name).
    pub fn server(mut self, addr: &str) -> Self {
        self.servers.push(addr.to_string());
        self
    }

    /// Trusts a relay with this pin.
    pub fn fingerprint(mut self, pin: &str) -> Self {
        self.pins.push(Pin::Is(pin.trim().to_string()));
        self
    }

    /// Trusts the relay whose state directory is `state_dir`.
    pub fn fingerprint_of(mut self, state_dir: &Path) -> Self {
        self.pins.push(Pin::Of(state_dir.to_path_buf()));
        self
    }

    /// Presents the token in `path`.
    pub fn token_file(mut self, path: &Path) -> Self {
        self.token_file = Some(path.to_path_buf());
        self
    }

    /// Exposes `ssh` -> `127.0.0.1:port`.
    pub fn target(mut self, port: u16) -> Self {
        self.target = Some(port);
        self
    }

    /// Writes its status to `path` instead of `status-<name>.json` in the test's directory.
    pub fn status_file(mut self, path: &Path) -> Self {
        self.status_file = path.to_path_buf();
        self
    }

    /// Leaves `RUST_LOG` as the test runner has it (the agent's own log level applies).
    pub fn no_log_env(mut self) -> Self {
        self.log_env = false;
        self
    }

    /// Does not inherit `key` from the test runner (a variable the test sets still applies):
    /// for the proxy variables, which would otherwise decide how the agent dials.
    pub fn env_remove(mut self, key: &str) -> Self {
        self.env_removed.push(key.to_string());
        self
    }

    /// A host agent (`--host-mode`) with its API socket at [`host_api_socket`]`(dir)` and its
    /// state directory (where registered tunnels persist) at `dir/state`.
    pub fn host_mode(self, dir: &Path) -> Self {
        let socket = host_api_socket(dir);
        let state = dir.join("state");
        self.arg("--host-mode")
            .arg("--api-socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(state)
    }

    /// Runs `worker-agent <name>` with the same flags (e.g. `check-config`, which checks the
    /// configuration they make): the subcommand goes first, before every flag.
    pub fn subcommand(mut self, name: &str) -> Self {
        self.subcommand = Some(name.to_string());
        self
    }

    fn has(&self, flag: &str) -> bool {
        self.line.has(flag)
    }

    /// The command line, defaults included.
    pub fn command(&self) -> Command {
        let mut cmd = self.line.command(&bin("worker-agent"));
        if let Some(subcommand) = &self.subcommand {
            cmd.arg(subcommand);
        }
        for server in &self.servers {
            cmd.args(["--server", server]);
        }
        cmd.args(["--name", &self.name]);
        // Defaults for what the test does not override.
        if let (Some(token), false) = (&self.token_file, self.has("--token-file")) {
            cmd.arg("--token-file").arg(token);
        }
        if !self.has("--fingerprint") && !self.has("--ca") {
            for pin in &self.pins {
                let pin = match pin {
                    Pin::Of(state_dir) => Relay::fingerprint_of(state_dir),
                    Pin::Is(pin) => pin.clone(),
                };
                cmd.args(["--fingerprint", &pin]);
            }
        }
        if let (Some(target), false) = (self.target, self.has("--service")) {
            cmd.args(["--service", &format!("ssh=127.0.0.1:{target}")]);
        }
        cmd.arg("--status-file")
            .arg(&self.status_file)
            .args(self.line.args());
        if self.log_env && !self.line.has_env("RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        for key in &self.env_removed {
            if !self.line.has_env(key) {
                cmd.env_remove(key);
            }
        }
        cmd
    }

    /// Starts it (after removing a status file an earlier agent left) and returns at once; wait
    /// for it with [`Agent::wait_port`] or [`Agent::wait_serving`].
    pub fn start(self) -> Agent {
        fs::create_dir_all(&self.dir).unwrap();
        let _ = fs::remove_file(&self.status_file);
        let proc = Proc::spawn(
            &format!("agent-{}", self.name),
            &mut self.command(),
            &self.dir,
        );
        Agent {
            proc,
            status_file: self.status_file,
        }
    }
}

impl Agent {
    /// An agent named `name` to start in `dir` (its log files and status file), which is
    /// created if need be.
    pub fn builder(dir: &Path, name: &str) -> AgentBuilder {
        AgentBuilder {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            servers: Vec::new(),
            token_file: None,
            pins: Vec::new(),
            target: None,
            status_file: dir.join(format!("status-{name}.json")),
            line: CommandLine::default(),
            log_env: true,
            env_removed: Vec::new(),
            subcommand: None,
        }
    }

    /// The common case: an agent named `name` exposing `ssh` -> `target`, trusting `relay` by
    /// pin; `Agent::builder(dir, name).relay(relay).target(target).args(extra).start()`.
    pub fn start(dir: &Path, relay: &Relay, name: &str, target: u16, extra: &[&str]) -> Agent {
        Agent::builder(dir, name)
            .relay(relay)
            .target(target)
            .args(extra)
            .start()
    }

    /// `worker-agent status` on this agent's status file, as an operator runs it.
    pub fn status_cli(&self) -> Output {
        Command::new(bin("worker-agent"))
            .arg("status")
            .arg("--status-file")
            .arg(&self.status_file)
            .output()
            .unwrap()
    }

    /// The status file's content once it reports the agent connected to its first relay.
    pub fn status(&self) -> Option<serde_json::Value> {
        let v = status_json(&self.status_file)?;
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

/// An agent's status file at `path`, parsed, whatever it says; `None` until there is one.
pub fn status_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&fs::read_to_string(path).ok()?).ok()
}

/// The port in an agent process's first stdout line, `ssh enabled on HOST:PORT`, once it is
/// there: for agents a test starts by hand (with their own flags and environment).
pub fn enabled_port(agent: &Proc) -> u16 {
    agent.wait_log("ssh enabled on", Duration::from_secs(30));
    agent
        .out()
        .lines()
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
