//! WAN rows: every system side by side across the userspace delay line ([`crate::delay`]), and
//! the `delay-check` subcommand that validates the delay line itself.
//!
//! Topology: the relay-side processes and the user (iperf3 client, echo client) stay in the root
//! namespace on loopback; the worker side (agent, frpc, rathole client, `iperf3 -s`, an echo
//! server) runs in the delay line's namespace and dials the relay across the line. "direct" is the
//! user talking to the worker namespace across the line without a tunnel.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::delay::{self, DelayConfig, DelayLine};
use crate::measure::{self, IperfRun};
use crate::proc::{free_port, rss_kib, Proc};
use crate::report::{Report, Row};
use crate::systems::{Site, System, Targets};
use crate::{median, Peers};

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

/// `jumpgate-bench delay-check` flags.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Round-trip time to emulate, ms.
    #[arg(long, default_value_t = 80.0)]
    rtt_ms: f64,
    /// Bottleneck rate, Mbit/s (default: none).
    #[arg(long)]
    rate_mbit: Option<f64>,
    /// Drop-tail queue in ms of the rate (default: one bandwidth-delay product, at least 32
    /// packets).
    #[arg(long)]
    queue_ms: Option<f64>,
    /// TUN MTU.
    #[arg(long, default_value_t = 9000)]
    mtu: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Socket buffer for the window-limited run (iperf3 -w).
    #[arg(long, default_value = "256K")]
    window: String,
    /// iperf3 report interval for the slow-start run, seconds (0.1 shows it per RTT or two).
    #[arg(long, default_value_t = 0.5)]
    interval: f64,
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

/// A delay line with the targets running behind it: an echo server and (optionally) `iperf3 -s`
/// in the worker namespace. Fields drop in order: targets first, the line (and namespace) last.
struct WanSite {
    _echo: Proc,
    _iperf: Option<Proc>,
    targets: Targets,
    site: Site,
    line: DelayLine,
}

impl WanSite {
    fn start(cfg: DelayConfig, have_iperf: bool, dir: &Path) -> Result<Self> {
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

/// Samples the largest VmRSS of a set of processes every 100 ms until dropped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    max: Arc<[AtomicU64; 2]>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pids: [u32; 2]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let (s, m) = (Arc::clone(&stop), Arc::clone(&max));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (i, pid) in pids.iter().enumerate() {
                    m[i].fetch_max(rss_kib(*pid), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            max,
            thread: Some(thread),
        }
    }

    /// Max RSS seen per process, MiB.
    fn finish(mut self) -> [f64; 2] {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        [0, 1].map(|i| self.max[i].load(Ordering::Relaxed) as f64 / 1024.0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
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
            let systems = crate::start_systems(bin, wan.targets, &wan.site, peers, &cdir)?;
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
                line.forget_tcp_metrics();
                // The echo connection is set up while idle; only its round trips overlap the
                // transfer, from 0.5 s after its start to 0.5 s before its end.
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

/// Runs iperf3 with extra arguments and returns its JSON.
fn iperf_json(addr: SocketAddr, extra: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("iperf3")
        .args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(extra)
        .arg("-J")
        .output()
        .context("running iperf3")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(err) = v["error"].as_str() {
        bail!("iperf3: {err}");
    }
    Ok(v)
}

fn received_mbps(v: &serde_json::Value) -> f64 {
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6
}

/// `jumpgate-bench delay-check`: shows that the delay line behaves like a path of the configured
/// RTT (connect time and echo), that TCP slow-starts across it, that a window-limited transfer
/// gets window/RTT, and what the forwarder itself carries with no delay.
pub fn delay_check(a: &CheckArgs) -> Result<()> {
    if let Some(why) = delay::unavailable() {
        bail!("the delay line cannot run here: {why}");
    }
    if Command::new("iperf3").arg("--version").output().is_err() {
        bail!("iperf3 is needed (apt-get install iperf3)");
    }
    let tmp = tempfile::tempdir()?;
    // Only for the signal handler, which its worker thread polls.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    delay::install_signal_cleanup(&rt);
    let target = config(a.rtt_ms, a.rate_mbit, a.queue_ms, a.mtu)?;
    let mut wan = WanSite::start(config(0.0, None, None, a.mtu)?, true, tmp.path())?;
    let iperf = SocketAddr::new(wan.site.worker_ip, wan.targets.iperf);
    let echo = SocketAddr::new(wan.site.worker_ip, wan.targets.echo);
    println!(
        "delay line {} <-> {} (namespace {}), MTU {}",
        wan.line.relay_ip, wan.line.worker_ip, wan.line.netns, a.mtu
    );

    println!(
        "\n1. forwarder capacity (no delay, no rate limit), {} s each:",
        3
    );
    for (streams, reverse) in [(1, false), (4, false), (1, true)] {
        let streams_arg = streams.to_string();
        let mut extra = vec!["-t", "3", "-P", &streams_arg];
        if reverse {
            extra.push("-R");
        }
        let v = iperf_json(iperf, &extra)?;
        println!(
            "   {} {streams} stream(s): {:.0} Mbit/s",
            direction(reverse),
            received_mbps(&v)
        );
    }
    let (w, r) = wan.line.stats();
    println!("   to worker: {w}\n   to relay:  {r}");

    wan.line.set(target);
    wan.line.forget_tcp_metrics();
    std::thread::sleep(Duration::from_millis(100));
    wan.line.reset_stats();
    println!("\n2. configured: {}", wan.line.describe());
    std::thread::sleep(Duration::from_millis(200));
    let mut connects = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let s = TcpStream::connect_timeout(&echo, Duration::from_secs(5))?;
        connects.push(t.elapsed().as_secs_f64() * 1e3);
        drop(s);
    }
    let mut s = TcpStream::connect(echo)?;
    let (p50, p99, n) = measure::latency_for(&mut s, Duration::from_secs(1), 20)?;
    drop(s);
    connects.sort_by(f64::total_cmp);
    println!(
        "   RTT: configured {:.1} ms; TCP connect (SYN to SYN-ACK) median {:.2} ms, min {:.2}, max {:.2}; 64-byte echo p50 {:.2} ms, p99 {:.2} ms ({n} rounds)",
        a.rtt_ms,
        median(connects.clone()),
        connects.first().copied().unwrap_or(0.0),
        connects.last().copied().unwrap_or(0.0),
        p50 / 1e3,
        p99 / 1e3
    );

    wan.line.forget_tcp_metrics();
    let interval = a.interval.to_string();
    let v = iperf_json(iperf, &["-t", &a.secs.to_string(), "-i", &interval])?;
    println!(
        "\n3. slow start: iperf3 -t {} -i {interval}, 1 stream, upload (sender's view per interval):",
        a.secs
    );
    for iv in v["intervals"].as_array().into_iter().flatten() {
        let bps = iv["sum"]["bits_per_second"].as_f64().unwrap_or(0.0);
        let cwnd = iv["streams"][0]["snd_cwnd"].as_f64().unwrap_or(0.0);
        let rtt = iv["streams"][0]["rtt"].as_f64().unwrap_or(0.0);
        println!(
            "   {:>4.1}-{:<4.1} s  {:>8.1} Mbit/s  cwnd {:>7.0} KiB  srtt {:>6.1} ms",
            iv["sum"]["start"].as_f64().unwrap_or(0.0),
            iv["sum"]["end"].as_f64().unwrap_or(0.0),
            bps / 1e6,
            cwnd / 1024.0,
            rtt / 1e3
        );
    }
    println!("   total received: {:.0} Mbit/s", received_mbps(&v));

    wan.line.forget_tcp_metrics();
    let v = iperf_json(iperf, &["-t", &a.secs.to_string(), "-w", &a.window])?;
    let window_bytes = parse_size(&a.window)?;
    let expect = window_bytes as f64 * 8.0 / (a.rtt_ms / 1e3) / 1e6;
    println!(
        "\n4. window limit: iperf3 -w {} -t {}: {:.1} Mbit/s received; {} B / {} ms = {:.1} Mbit/s",
        a.window,
        a.secs,
        received_mbps(&v),
        window_bytes,
        a.rtt_ms,
        expect
    );

    if a.rate_mbit.is_some() {
        wan.line.forget_tcp_metrics();
        let mut s = TcpStream::connect(echo)?;
        let child = measure::iperf_spawn(IperfRun {
            addr: iperf,
            secs: a.secs,
            streams: 4,
            reverse: false,
        })?;
        std::thread::sleep(Duration::from_millis(500));
        let lat = measure::latency_for(
            &mut s,
            Duration::from_secs(a.secs).saturating_sub(Duration::from_secs(1)),
            5,
        );
        let bps = measure::iperf_wait(child)?;
        let (p50, p99, _) = lat?;
        println!(
            "\n5. rate limit: iperf3 -P 4 upload {:.0} Mbit/s; echo during it p50 {:.1} ms, p99 {:.1} ms (queueing adds up to the queue size)",
            bps / 1e6,
            p50 / 1e3,
            p99 / 1e3
        );
    }
    let (w, r) = wan.line.stats();
    println!("\ndelay line since step 2:\n   to worker: {w}\n   to relay:  {r}");
    Ok(())
}

/// "256K" -> 262144 (iperf3's K/M/G are powers of 1024).
fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: f64 = num.parse().with_context(|| format!("size {s:?}"))?;
    Ok((n * mul as f64) as u64)
}
