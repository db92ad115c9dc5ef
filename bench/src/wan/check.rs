//! `jumpgate-bench delay-check`: the delay line checked on its own, before any row trusts it
//! (RTT, slow start, a window-limited transfer, the forwarder's own capacity).

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::site::WanSite;
use super::{config, direction};
use crate::delay;
use crate::measure::{self, IperfRun};
use crate::median;

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
