//! One WAN site: a delay line with the targets (an echo server, `iperf3 -s`) started behind it
//! in the worker namespace, so the rows and the delay check measure across the same setup.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::delay::{DelayConfig, DelayLine};
use crate::measure;
use crate::proc::{free_port, Proc};
use crate::systems::{Site, Targets};

/// A delay line with the targets running behind it: an echo server and (optionally) `iperf3 -s`
/// in the worker namespace. Fields drop in order: targets first, the line (and namespace) last.
pub(super) struct WanSite {
    _echo: Proc,
    _iperf: Option<Proc>,
    pub(super) targets: Targets,
    pub(super) site: Site,
    pub(super) line: DelayLine,
}

impl WanSite {
    /// Starts the line, then the targets behind it, and waits until the echo answers across it.
    pub(super) fn start(cfg: DelayConfig, have_iperf: bool, dir: &Path) -> Result<Self> {
        let line = DelayLine::start(cfg)?;
        let site = Site {
            netns: Some(line.netns.clone()),
            relay_ip: line.relay_ip.into(),
            worker_ip: line.worker_ip.into(),
        };
        // The namespace is new and empty, so any port is free in it.
        let targets = Targets {
            echo: free_port()?,
            iperf: free_port()?,
        };
        let exe = std::env::current_exe().context("own executable")?;
        let echo = Proc::spawn(
            "echo-server",
            site.worker_command(&exe).args([
                "echo-server",
                "--listen",
                &format!("0.0.0.0:{}", targets.echo),
            ]),
            dir,
        )?;
        let iperf = if have_iperf {
            let p = Proc::spawn(
                "iperf3-server",
                site.worker_command("iperf3").args([
                    "-s",
                    "-p",
                    &targets.iperf.to_string(),
                    "--forceflush",
                ]),
                dir,
            )?;
            wait_out(&p, "Server listening", Duration::from_secs(10))?;
            Some(p)
        } else {
            None
        };
        measure::wait_echo(
            SocketAddr::new(site.worker_ip, targets.echo),
            Duration::from_secs(10),
        )
        .context("echo across the delay line")?;
        Ok(Self {
            _echo: echo,
            _iperf: iperf,
            targets,
            site,
            line,
        })
    }
}

/// Waits until `p`'s stdout contains `needle`.
fn wait_out(p: &Proc, needle: &str, timeout: Duration) -> Result<()> {
    let out = p.log.with_extension("out");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains(needle)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{} never printed {needle:?}", out.display())
}
