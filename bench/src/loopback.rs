//! The loopback rows: every system measured in the root namespace (throughput, latency,
//! connection rate, memory), then the agent-scale test with real agent processes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cli::Args;
use crate::measure;
use crate::median;
use crate::peers::{start_systems, Peers};
use crate::proc::{cpu_secs, free_port, rss_kib, Proc};
use crate::report::{Report, Row};
use crate::systems::{JumpgateRelay, Site, System, Targets};

/// The loopback rows (everything in the root namespace) and the agent-scale test.
pub(crate) fn loopback_rows(
    args: &Args,
    bin: &Path,
    peers: &Peers,
    have_iperf: bool,
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    report: &mut Report,
) -> Result<()> {
    let echo = measure::echo_server(rt)?;
    let iperf_port = free_port()?;
    let _iperf_server = if have_iperf {
        Some(Proc::spawn(
            "iperf3-server",
            Command::new("iperf3").args(["-s", "-p", &iperf_port.to_string()]),
            dir,
        )?)
    } else {
        None
    };
    std::thread::sleep(Duration::from_millis(300));
    let targets = Targets {
        echo: echo.port(),
        iperf: iperf_port,
    };
    let systems = start_systems(bin, targets, &Site::loopback(), peers, dir)?;
    for sys in &systems {
        eprintln!("measuring {}", sys.name);
        // One system failing a measurement costs its own cells, not the whole run's.
        if let Err(e) = measure_system(sys, args, have_iperf, rt, report) {
            let note = format!("{} not measured: {e:#}", sys.name);
            eprintln!("{note}");
            report.note(note);
        }
    }
    if args.agents > 0 {
        let scale = dir.join("scale");
        std::fs::create_dir_all(&scale)?;
        agent_scale(bin, args, &scale, report)?;
    }
    Ok(())
}

fn measure_system(
    sys: &System,
    args: &Args,
    have_iperf: bool,
    rt: &tokio::runtime::Runtime,
    report: &mut Report,
) -> Result<()> {
    let pids: Vec<u32> = [&sys.relay, &sys.agent]
        .iter()
        .filter_map(|p| p.as_ref().map(Proc::pid))
        .collect();
    let cpu = || pids.iter().map(|p| cpu_secs(*p)).sum::<f64>();
    if have_iperf {
        for streams in [1u32, 4] {
            let mut gbps = Vec::new();
            let mut cpu_per_gib = Vec::new();
            for _ in 0..args.repeat {
                let before = cpu();
                let bps = measure::iperf(sys.iperf, args.iperf_secs, streams)?;
                let gib = bps * args.iperf_secs as f64 / 8.0 / f64::from(1u32 << 30);
                gbps.push(bps / 1e9);
                cpu_per_gib.push((cpu() - before) / gib.max(1e-9));
            }
            report.set(
                Row::new(&format!("throughput, {streams} stream(s)"), "Gbit/s", true),
                sys.name,
                median(gbps),
            );
            if !pids.is_empty() {
                report.set(
                    Row::new(
                        &format!("CPU s per GiB (relay+agent), {streams} stream(s)"),
                        "s/GiB",
                        false,
                    ),
                    sys.name,
                    median(cpu_per_gib),
                );
            }
        }
    }
    if have_iperf {
        // p50/p99 of 50 new connections (5 at once) while 4 streams download, per repetition.
        let (mut f50, mut f99) = (Vec::new(), Vec::new());
        for _ in 0..args.repeat {
            let transfer = measure::IperfRun {
                addr: sys.iperf,
                secs: if args.smoke { 3 } else { 10 },
                streams: 4,
                reverse: true,
            };
            let s = measure::first_byte_under_load(sys.echo, transfer, 50, 5)?;
            f50.push(measure::pct(&s, 0.5));
            f99.push(measure::pct(&s, 0.99));
        }
        let row = "new connection's first byte during a 4-stream download";
        report.set(
            Row::new(&format!("{row} p50"), "µs", false),
            sys.name,
            median(f50),
        );
        report.set(
            Row::new(&format!("{row} p99"), "µs", false),
            sys.name,
            median(f99),
        );
    }
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for _ in 0..args.repeat {
        let (a, b) = measure::latency(sys.echo, if args.smoke { 200 } else { 5000 })?;
        p50.push(a);
        p99.push(b);
    }
    report.set(
        Row::new("echo RTT p50 (64 B)", "µs", false),
        sys.name,
        median(p50),
    );
    report.set(
        Row::new("echo RTT p99 (64 B)", "µs", false),
        sys.name,
        median(p99),
    );
    let (mut rate, mut c50, mut c99) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeat {
        let (r, a, b) = measure::connect_rate(sys.echo, if args.smoke { 50 } else { 1000 })?;
        rate.push(r);
        c50.push(a);
        c99.push(b);
    }
    report.set(
        Row::new("connections/s (connect+echo+close)", "conn/s", true),
        sys.name,
        median(rate),
    );
    report.set(
        Row::new("connection setup p50", "µs", false),
        sys.name,
        median(c50),
    );
    report.set(
        Row::new("connection setup p99", "µs", false),
        sys.name,
        median(c99),
    );

    if let (Some(relay), Some(agent)) = (&sys.relay, &sys.agent) {
        std::thread::sleep(Duration::from_millis(500));
        report.set(
            Row::new("relay RSS idle", "MiB", false),
            sys.name,
            rss_kib(relay.pid()) as f64 / 1024.0,
        );
        report.set(
            Row::new("agent RSS idle", "MiB", false),
            sys.name,
            rss_kib(agent.pid()) as f64 / 1024.0,
        );
        let held = measure::hold(rt, sys.echo, args.conns)
            .with_context(|| format!("{}: holding {} connections", sys.name, args.conns))?;
        std::thread::sleep(Duration::from_millis(500));
        report.set(
            Row::new(
                &format!("relay RSS, {} conns held", args.conns),
                "MiB",
                false,
            ),
            sys.name,
            rss_kib(relay.pid()) as f64 / 1024.0,
        );
        report.set(
            Row::new(
                &format!("agent RSS, {} conns held", args.conns),
                "MiB",
                false,
            ),
            sys.name,
            rss_kib(agent.pid()) as f64 / 1024.0,
        );
        report.set(
            Row::new(
                &format!("{} conns held, all echoed", args.conns),
                "ok",
                true,
            ),
            sys.name,
            held.len() as f64 / args.conns as f64,
        );
        drop(held);
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// M real agents on one relay: the relay's memory per idle agent, and how fast all are back after
/// the relay is killed and restarted.
fn agent_scale(
    bin: &std::path::Path,
    args: &Args,
    dir: &std::path::Path,
    report: &mut Report,
) -> Result<()> {
    let n = args.agents;
    eprintln!("agent scale: {n} agents");
    let mut relay = JumpgateRelay::start(bin, dir, (n as u16).saturating_add(10))?;
    std::thread::sleep(Duration::from_millis(300));
    let base = rss_kib(relay.proc.pid());
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        let status = dir.join(format!("status-{i}.json"));
        agents.push(relay.agent(
            &format!("scale-{i}"),
            &["ssh=127.0.0.1:9".to_string()],
            &status,
            dir,
        )?);
    }
    let tunnels =
        |relay: &JumpgateRelay| relay.proc.log_text().matches("new tunnel [scale-").count();
    let deadline = Instant::now() + Duration::from_secs(120);
    while tunnels(&relay) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::ensure!(
        tunnels(&relay) == n,
        "only {} of {n} agents connected",
        tunnels(&relay)
    );
    std::thread::sleep(Duration::from_secs(1));
    let loaded = rss_kib(relay.proc.pid());
    report.set(
        Row::new(
            &format!("relay RSS above idle, {n} idle agents"),
            "MiB",
            false,
        ),
        "jumpgate",
        (loaded.saturating_sub(base)) as f64 / 1024.0,
    );
    let started = Instant::now();
    relay.restart(dir)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while tunnels(&relay) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let back = tunnels(&relay);
    report.set(
        Row::new(
            &format!("all {n} agents back after relay kill -9 + restart"),
            "s",
            false,
        ),
        "jumpgate",
        started.elapsed().as_secs_f64(),
    );
    report.set(
        Row::new("agents back after restart", "count", true),
        "jumpgate",
        back as f64,
    );
    drop(agents);
    Ok(())
}
