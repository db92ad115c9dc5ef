//! The relay: one builder ([`Relay::builder`]) for every way a test starts `relay-server`, the
//! running relay's handle, and its admin API.

use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::{bin, free_port, write_secret, CommandLine, Launch, Postgres, Proc};

/// A running relay-server with its state dir.
pub struct Relay {
    pub proc: Proc,
    pub listen: String,
    pub state_dir: PathBuf,
    pub range: (u16, u16),
    pub dir: PathBuf,
    /// The test's own flags (not the harness's defaults).
    pub extra: Vec<String>,
    /// How it was started, so [`Relay::kill_and_restart`] starts it the same way.
    builder: RelayBuilder,
}

/// How to start one `relay-server`: the harness's defaults (a free loopback agent port, its
/// host as the public host, an admin API on a free loopback port with the harness's admin
/// token, `relay-state/` in the test's directory, `RUST_LOG=info`) plus the test's flags. A
/// default is left out when the test's flags give that flag; [`RelayBuilder::bare`] leaves them
/// all out, for tests that pin every flag (a relay meant to refuse its configuration).
#[derive(Clone)]
pub struct RelayBuilder {
    dir: PathBuf,
    name: String,
    range: Option<(u16, u16)>,
    listen: Option<String>,
    state_dir: Option<PathBuf>,
    line: CommandLine,
    bare: bool,
}

impl Launch for RelayBuilder {
    fn line(&mut self) -> &mut CommandLine {
        &mut self.line
    }
}

impl RelayBuilder {
    /// Its public port range (`--port-range lo-hi`).
    pub fn range(mut self, range: (u16, u16)) -> Self {
        self.range = Some(range);
        self
    }

    /// Its agent port is exactly `listen` (relays at one port on several addresses, as behind
    /// a name with several addresses).
    pub fn listen(mut self, listen: &str) -> Self {
        self.listen = Some(listen.to_string());
        self
    }

    /// Its agent port and public host are on loopback address `ip` (127.0.0.2 for a second
    /// relay of a fleet on this machine; give it `--proxy-bind` the same `ip` so both relays can
    /// bind the same public ports), at a free port.
    pub fn on(self, ip: &str) -> Self {
        let listen = format!("{ip}:{}", free_port());
        self.listen(&listen)
    }

    /// Its state directory, instead of `relay-state/` in the test's directory.
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_path_buf());
        self
    }

    /// Its leases in the PostgreSQL server `pg` (its `--lease-store` flags).
    pub fn store_postgres(self, pg: &Postgres) -> Self {
        self.args(pg.relay_flags())
    }

    /// The name of its log files (`relay` unless given).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// No harness defaults: only the flags, range, listen address and state directory given.
    pub fn bare(mut self) -> Self {
        self.bare = true;
        self
    }

    fn has(&self, flag: &str) -> bool {
        self.line.has(flag)
    }

    /// Fixes the listen address a default would pick, so a restart reuses it.
    fn resolved(mut self) -> Self {
        if self.listen.is_none() && !self.bare && !self.has("--listen") {
            self.listen = Some(format!("127.0.0.1:{}", free_port()));
        }
        self
    }

    /// The command line, harness defaults included; writes the harness's admin token file when
    /// it is one of them.
    pub fn command(&self) -> Command {
        let mut cmd = self.line.command(&bin("relay-server"));
        if let Some(listen) = &self.listen {
            cmd.args(["--listen", listen]);
        }
        if !self.bare {
            // The agent address's host is the public host unless the test names one (a fleet's).
            if let Some(listen) = &self.listen {
                if !self.has("--public-host") {
                    let host = listen.rsplit_once(':').map_or(listen.as_str(), |(h, _)| h);
                    cmd.args(["--public-host", host]);
                }
            }
            if !self.has("--admin") {
                cmd.args(["--admin", "127.0.0.1:0"]);
            }
        }
        if let Some((lo, hi)) = self.range {
            cmd.args(["--port-range", &format!("{lo}-{hi}")]);
        }
        if let Some(state) = self.state_path() {
            cmd.arg("--state-dir").arg(state);
        }
        // An admin token unless the test brings its own: changing the relay through the admin
        // API needs one, also on loopback.
        if !self.bare && !self.has("--admin-token-file") {
            let path = self.dir.join(HARNESS_ADMIN_TOKEN_FILE);
            write_secret(&path, HARNESS_ADMIN_TOKEN);
            cmd.arg("--admin-token-file").arg(path);
        }
        cmd.args(self.line.args());
        if !self.bare && !self.line.has_env("RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        cmd
    }

    fn state_path(&self) -> Option<PathBuf> {
        match (&self.state_dir, self.bare) {
            (Some(dir), _) => Some(dir.clone()),
            (None, false) => Some(self.dir.join("relay-state")),
            (None, true) => None,
        }
    }

    /// Starts it (creating its directory) and returns at once, without waiting for it to
    /// listen.
    pub fn spawn(&self) -> Proc {
        fs::create_dir_all(&self.dir).unwrap();
        Proc::spawn(&self.name, &mut self.command(), &self.dir)
    }

    /// Starts it and waits until it listens for agents.
    pub fn start(self) -> Relay {
        let builder = self.resolved();
        let proc = builder.spawn();
        proc.wait_log("relay listening for agents", Duration::from_secs(20));
        Relay {
            proc,
            listen: builder.listen.clone().unwrap_or_default(),
            state_dir: builder.state_path().unwrap_or_default(),
            range: builder.range.unwrap_or_default(),
            dir: builder.dir.clone(),
            extra: builder.line.args().to_vec(),
            builder,
        }
    }

    /// Starts a relay that must stop by itself (a configuration it refuses, a store it cannot
    /// reach) and returns how it exited and its log; panics if it is still running after
    /// `timeout`.
    pub fn exit_within(&self, timeout: Duration) -> (ExitStatus, String) {
        let mut proc = self.spawn();
        let status = proc
            .wait_exit(timeout)
            .unwrap_or_else(|| panic!("relay kept running:\n{}", proc.log()));
        (status, proc.log())
    }
}

/// The admin token `Relay::start` gives a relay whose test does not pass `--admin-token-file`.
pub const HARNESS_ADMIN_TOKEN: &str = "harness-admin-token-0123456789";
/// Its file, in the test's directory.
pub const HARNESS_ADMIN_TOKEN_FILE: &str = "relay-admin.token";

impl Relay {
    /// The jump listener's host key as `relay-server fingerprint --jump` prints it for users to
    /// pin (`jump`: the listener's address), written to `dir/relay_known_hosts`.
    pub fn pin_jump_host(&self, jump: &str, dir: &Path) -> PathBuf {
        let printed = Command::new(bin("relay-server"))
            .args(["fingerprint", "--jump", "--jump-listen", jump])
            .args(["--public-host", "127.0.0.1", "--state-dir"])
            .arg(&self.state_dir)
            .output()
            .unwrap();
        let known_hosts = dir.join("relay_known_hosts");
        fs::write(&known_hosts, crate::ok_stdout(&printed)).unwrap();
        known_hosts
    }

    /// A relay to start in `dir` (its log files and, by default, its state directory), which
    /// is created if need be.
    pub fn builder(dir: &Path) -> RelayBuilder {
        RelayBuilder {
            dir: dir.to_path_buf(),
            name: "relay".into(),
            range: None,
            listen: None,
            state_dir: None,
            line: CommandLine::default(),
            bare: false,
        }
    }

    /// The common case: `Relay::builder(dir).range(range).args(extra).start()`.
    pub fn start(dir: &Path, range: (u16, u16), extra: &[&str]) -> Relay {
        Relay::builder(dir).range(range).args(extra).start()
    }

    /// Kills the relay with SIGKILL and starts it again on the same address and state dir.
    pub fn kill_and_restart(&mut self) {
        self.proc.kill();
        *self = self.builder.clone().start();
    }

    /// The shared agent token the relay writes into its state directory.
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

    /// The pin of this relay's TLS identity.
    pub fn fingerprint(&self) -> String {
        Relay::fingerprint_of(&self.state_dir)
    }

    /// The pin of the TLS identity in `state_dir`, which `relay-server fingerprint` creates
    /// when there is none yet.
    pub fn fingerprint_of(state_dir: &Path) -> String {
        let out = Command::new(bin("relay-server"))
            .arg("fingerprint")
            .arg("--state-dir")
            .arg(state_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "fingerprint failed: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

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
