//! WAN rows: every system side by side across the userspace delay line ([`crate::delay`]), and
//! the `delay-check` subcommand that validates the delay line itself.
//!
//! Topology: the relay-side processes and the user (iperf3 client, echo client) stay in the root
//! namespace on loopback; the worker side (agent, frpc, rathole client, `iperf3 -s`, an echo
//! server) runs in the delay line's namespace and dials the relay across the line. "direct" is the
//! user talking to the worker namespace across the line without a tunnel.

mod check;
mod sampler;
mod site;

use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub use check::{delay_check, CheckArgs};
use sampler::RssSampler;
use site::WanSite;

use crate::delay::{self, DelayConfig, DelayLine};
use crate::measure::{self, IperfRun};
use crate::median;
use crate::peers::Peers;
use crate::report::{Report, Row};
use crate::systems::System;

/// What the WAN rows run.
pub struct Opts {
    /// Round-trip times, ms.
    pub rtts_ms: Vec<f64>,
    /// Rate of the rate-limited variant, Mbit/s (`None`: only the unlimited one).
    pub rate_mbit: Option<f64>,
    /// Drop-tail queue in ms of the rate (`None`: one bandwidth-delay product).
    pub queue_ms: Option<f64>,
    /// TUN MTU.
    pub mtu: u32,
    /// iperf3 seconds per run.
    pub iperf_secs: u64,
    /// Repetitions (median).
    pub repeat: usize,
    /// Tiny sizes.
    pub smoke: bool,
    /// Only the echo rows (idle and during a transfer), for quick A/B runs of loaded latency.
    pub only_loaded: bool,
}

fn config(
    rtt_ms: f64,
    rate_mbit: Option<f64>,
    queue_ms: Option<f64>,
    mtu: u32,
) -> Result<DelayConfig> {
    if !(0.0..=10_000.0).contains(&rtt_ms) {
        bail!("RTT {rtt_ms} ms is not between 0 and 10000");
    }
    if let Some(r) = rate_mbit {
        if !(r.is_finite() && r > 0.0) {
            bail!("rate {r} Mbit/s must be positive");
        }
    }
    if !(576..=65_000).contains(&mtu) {
        bail!("MTU {mtu} is not between 576 and 65000");
    }
    let rate_bps = rate_mbit.map(|m| m * 1e6);
    let queue_bytes = match (rate_bps, queue_ms) {
        (Some(r), Some(q)) => {
            let b = (r * q / 1e3 / 8.0) as usize;
            if b < mtu as usize {
                bail!("a {q} ms queue at {r} bit/s holds less than one {mtu}-byte packet");
            }
            Some(b)
        }
        _ => None,
    };
    Ok(DelayConfig {
        rtt: Duration::from_secs_f64(rtt_ms / 1e3),
        rate_bps,
        queue_bytes,
        mtu,
    })
}

/// The WAN rows for every RTT, unlimited and (with a rate) rate-limited.
pub fn run(
    opts: &Opts,
    bin: &Path,
    peers: &Peers,
    have_iperf: bool,
    dir: &Path,
    report: &mut Report,
) -> Result<()> {
    if let Some(why) = delay::unavailable() {
        bail!("--wan needs a delay line, which cannot run here: {why}");
    }
    let mut rates = vec![None];
    if let Some(r) = opts.rate_mbit {
        rates.push(Some(r));
    }
    let mut n = 0;
    for &rtt in &opts.rtts_ms {
        for &rate in &rates {
            n += 1;
            let cfg = config(rtt, rate, opts.queue_ms, opts.mtu)?;
            let label = match rate {
                None => format!("WAN {rtt} ms"),
                Some(r) => format!("WAN {rtt} ms, {r} Mbit/s"),
            };
            let cdir = dir.join(format!("wan-{n}"));
            std::fs::create_dir_all(&cdir)?;
            let started = Instant::now();
            let wan = WanSite::start(cfg, have_iperf, &cdir)?;
            eprintln!(
                "{label}: delay line {} ({} <-> {} in {})",
                wan.line.describe(),
                wan.line.relay_ip,
                wan.line.worker_ip,
                wan.line.netns
            );
            let systems = crate::peers::start_systems(bin, wan.targets, &wan.site, peers, &cdir)?;
            for sys in &systems {
                eprintln!("{label}: measuring {}", sys.name);
                // One system failing a measurement costs its own cells, not the whole run's.
                if let Err(e) = measure_wan(sys, &wan.line, &label, opts, have_iperf, report) {
                    let note = format!("{label}: {} not measured: {e:#}", sys.name);
                    eprintln!("{note}");
                    report.note(note);
                }
            }
            let (to_w, to_r) = wan.line.stats();
            let note = format!(
                "{label}: delay line {}; to worker: {to_w}; to relay: {to_r}",
                wan.line.describe()
            );
            eprintln!("{note} ({:.0} s)", started.elapsed().as_secs_f64());
            report.note(note);
            drop(systems);
            drop(wan);
        }
    }
    Ok(())
}

fn direction(reverse: bool) -> &'static str {
    if reverse {
        "download"
    } else {
        "upload"
    }
}

/// One system's WAN rows under `label`.
fn measure_wan(
    sys: &System,
    line: &DelayLine,
    label: &str,
    opts: &Opts,
    have_iperf: bool,
    report: &mut Report,
) -> Result<()> {
    let sampler = match (&sys.relay, &sys.agent) {
        (Some(r), Some(a)) => Some(RssSampler::start([r.pid(), a.pid()])),
        _ => None,
    };
    let secs = opts.iperf_secs;
    if have_iperf && !opts.only_loaded {
        for reverse in [false, true] {
            for streams in [1u32, 4] {
                let mut mbps = Vec::new();
                for _ in 0..opts.repeat {
                    line.forget_tcp_metrics();
                    let bps = measure::iperf_run(IperfRun {
                        addr: sys.iperf,
                        secs,
                        streams,
                        reverse,
                    })?;
                    mbps.push(bps / 1e6);
                }
                report.set(
                    Row::new(
                        &format!("{label}, {}, {streams} stream(s)", direction(reverse)),
                        "Mbit/s",
                        true,
                    ),
                    sys.name,
                    median(mbps),
                );
            }
        }
    }
    let idle = if opts.smoke {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(2)
    };
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for _ in 0..opts.repeat {
        let mut s = TcpStream::connect(sys.echo)?;
        let (a, b, _) = measure::latency_for(&mut s, idle, 10)?;
        p50.push(a / 1e3);
        p99.push(b / 1e3);
    }
    report.set(
        Row::new(&format!("{label}, echo RTT p50 (64 B), idle"), "ms", false),
        sys.name,
        median(p50),
    );
    report.set(
        Row::new(&format!("{label}, echo RTT p99 (64 B), idle"), "ms", false),
        sys.name,
        median(p99),
    );
    if have_iperf {
        for reverse in [false, true] {
            let dir = direction(reverse);
            let (mut p50, mut p99, mut mbps) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..opts.repeat {
                let (a, b, bps) = measure::iperf_retrying(|| {
                    line.forget_tcp_metrics();
                    // The echo connection is set up while idle; only its round trips overlap
                    // the transfer, from 0.5 s after its start to 0.5 s before its end.
                    let mut s = TcpStream::connect(sys.echo)?;
                    let child = measure::iperf_spawn(IperfRun {
                        addr: sys.iperf,
                        secs,
                        streams: 4,
                        reverse,
                    })?;
                    let window = Duration::from_secs(secs).saturating_sub(Duration::from_secs(1));
                    std::thread::sleep(Duration::from_millis(500));
                    let lat = measure::latency_for(&mut s, window, 5);
                    let bps = measure::iperf_wait(child)?;
                    let (a, b, _) = lat?;
                    Ok((a, b, bps))
                })?;
                p50.push(a / 1e3);
                p99.push(b / 1e3);
                mbps.push(bps / 1e6);
            }
            report.set(
                Row::new(
                    &format!("{label}, echo RTT p50 (64 B), during 4-stream {dir}"),
                    "ms",
                    false,
                ),
                sys.name,
                median(p50),
            );
            report.set(
                Row::new(
                    &format!("{label}, echo RTT p99 (64 B), during 4-stream {dir}"),
                    "ms",
                    false,
                ),
                sys.name,
                median(p99),
            );
            report.set(
                Row::new(
                    &format!("{label}, {dir}, 4 stream(s), while echoing"),
                    "Mbit/s",
                    true,
                ),
                sys.name,
                median(mbps),
            );
        }
    }
    if let Some(s) = sampler {
        let [relay, agent] = s.finish();
        report.set(
            Row::new(&format!("{label}, relay RSS max"), "MiB", false),
            sys.name,
            relay,
        );
        report.set(
            Row::new(&format!("{label}, agent RSS max"), "MiB", false),
            sys.name,
            agent,
        );
    }
    Ok(())
}
