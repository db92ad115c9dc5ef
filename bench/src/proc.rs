//! Child processes of the benchmark and what /proc says about them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Pids of live [`Proc`]s, so a signal handler can kill them before exiting (drops do not run
/// then).
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// SIGKILLs every live [`Proc`] (on SIGINT/SIGTERM, before the process exits without unwinding).
pub fn kill_all() {
    let pids: Vec<String> = LIVE
        .lock()
        .map(|l| l.iter().map(u32::to_string).collect())
        .unwrap_or_default();
    if !pids.is_empty() {
        let _ = Command::new("kill").arg("-9").args(&pids).output();
    }
}

/// A child process killed on drop, its stderr in a file.
pub struct Proc {
    child: Child,
    /// Its stderr.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout/stderr to files named after `name` in `dir`.
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = dir.join(format!("{name}.out"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out)?)
            .stderr(fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        if let Ok(mut l) = LIVE.lock() {
            l.push(child.id());
        }
        Ok(Proc { child, log })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stderr so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its stderr contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "{} never logged {needle:?}:\n{}",
            self.log.display(),
            self.log_text()
        )
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let id = self.child.id();
        if let Ok(mut l) = LIVE.lock() {
            l.retain(|p| *p != id);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

// The /proc readings and free ports: the test harness's file, so the benchmark and the tests
// measure and pick ports one way.
#[path = "../../tests/src/procfs.rs"]
mod procfs;
pub use procfs::{cpu_secs, rss_kib, try_free_port as free_port};
