//! Processes: the workspace binaries, free ports, waiting, tools a test needs, and a child
//! process killed when its handle drops.

use std::ffi::OsStr;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::procfs::try_free_port;

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
    try_free_port().unwrap()
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
    /// Starts `cmd` with stdout and stderr in `<name>.<n>.out` / `.log` in `dir`.
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

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stderr so far (where both daemons log).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Its stdout so far.
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

    /// Sends it signal `sig` (`HUP`, `TERM`, ...) with `kill`.
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

    /// SIGKILL and reap.
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

/// A tokio runtime for the async helpers in [`raw`].
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The part of a command line a test adds to a harness process: its own flags, a wrapper
/// command it runs under, environment variables. [`Launch`] gives builders the methods.
#[derive(Clone, Default)]
pub struct CommandLine {
    args: Vec<String>,
    wrapper: Vec<String>,
    envs: Vec<(String, String)>,
}

impl CommandLine {
    /// Whether the test's flags include `flag` (the harness then leaves its default out).
    pub fn has(&self, flag: &str) -> bool {
        self.args.iter().any(|a| a == flag)
    }

    /// The test's flags.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Whether the test sets the environment variable `key`.
    pub fn has_env(&self, key: &str) -> bool {
        self.envs.iter().any(|(k, _)| k == key)
    }

    /// A command running `program` under the wrapper, with the test's environment; the caller
    /// adds the harness's flags, then [`CommandLine::args`].
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((wrapper, args)) => {
                let mut c = Command::new(wrapper);
                c.args(args).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

/// The methods a test adds to a process's command line with, shared by [`crate::RelayBuilder`]
/// and [`crate::AgentBuilder`].
pub trait Launch: Sized {
    /// Where the builder keeps the test's part of the command line.
    fn line(&mut self) -> &mut CommandLine;

    /// One more flag or value, after the harness's.
    fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        let arg = arg.as_ref().to_string_lossy().into_owned();
        self.line().args.push(arg);
        self
    }

    /// More flags and values, after the harness's.
    fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args = args
            .into_iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned());
        self.line().args.extend(args);
        self
    }

    /// Runs it under a wrapper command such as `prlimit --nofile=40` or
    /// `ip netns exec <namespace>`.
    fn wrapper(mut self, wrapper: &[&str]) -> Self {
        self.line().wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    /// An environment variable for it.
    fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        let value = value.as_ref().to_string_lossy().into_owned();
        self.line().envs.push((key.to_string(), value));
        self
    }
}
