//! `jumpgate-bench`: jumpgate side by side with the direct path and, when their binaries are
//! given (FRPS/FRPC, RATHOLE), frp and rathole, all on loopback, in one run; with `--wan`, also
//! across an emulated WAN (see `delay.rs`); `agents` puts thousands of simulated agents on one
//! relay (see `scale.rs`); `host` measures one host agent's tunnels (see `host.rs`). See BENCHMARKS.md.

mod delay;
mod egress;
mod fleet;
mod host;
mod jump;
mod measure;
mod proc;
mod report;
mod scale;
mod sim;
mod systems;
mod wan;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::proc::{cpu_secs, free_port, rss_kib, Proc};
use crate::report::{Report, Row};
use crate::systems::{JumpgateRelay, Site, System, Targets};

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "jumpgate-bench",
    about = "Benchmark jumpgate against the direct path, frp and rathole"
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Tiny sizes for CI: seconds, not minutes; no thresholds.
    #[arg(long)]
    smoke: bool,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// iperf3 duration per run, seconds.
    #[arg(long, default_value_t = 5)]
    iperf_secs: u64,
    /// Connections held open at once.
    #[arg(long, default_value_t = 2000)]
    conns: usize,
    /// Agents connected at once for the agent-scale test (0 skips it).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Where to write results.json and results.md.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// WAN rows at these round-trip times in ms (comma-separated, e.g. 1,20,80), across a
    /// userspace delay line into a worker network namespace (needs root and /dev/net/tun).
    #[arg(long, value_delimiter = ',')]
    wan: Vec<f64>,
    /// Also run every WAN RTT with this bottleneck rate, Mbit/s per direction.
    #[arg(long)]
    wan_rate: Option<f64>,
    /// Drop-tail queue of the rate-limited WAN in ms of its rate (default: one RTT, i.e. one
    /// bandwidth-delay product, at least 32 packets).
    #[arg(long)]
    wan_queue_ms: Option<f64>,
    /// MTU of the delay line's TUN devices.
    #[arg(long, default_value_t = 9000)]
    wan_mtu: u32,
    /// Only the WAN rows: skip the loopback rows and the agent-scale test.
    #[arg(long)]
    only_wan: bool,
    /// Also measure the agent link's egress paths: through an HTTP CONNECT proxy (tinyproxy), a
    /// SOCKS5 proxy (microsocks), as WebSocket through nginx, and frp's websocket transport.
    #[arg(long)]
    egress: bool,
    /// WAN rows: only the echo rows, idle and during a 4-stream transfer (quick A/B runs).
    #[arg(long)]
    only_loaded: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Validates the delay line on its own: RTT, slow start, a window-limited transfer, and what
    /// the forwarder can carry.
    DelayCheck(wan::CheckArgs),
    /// Thousands of simulated agents (real TLS + yamux sessions from this one process) on one
    /// relay: its memory per agent, the connect storm, and the return of every agent to its port
    /// after kill -9 and restart.
    Agents(scale::AgentsArgs),
    /// `ssh -J relay job` next to `ssh -p PORT relay` with real OpenSSH: a session's 64-byte
    /// round trip, sessions per second and scp both ways, on loopback and with the user's leg
    /// long (`--rtt-ms 20`).
    Jump(jump::JumpArgs),
    /// Issue 28: N tunnels on one host agent (`worker-agent --host-mode`) registered through the
    /// real `tunnel add` CLI (register latency, agent and relay RSS per tunnel) against N
    /// ordinary agent processes, one per tunnel.
    Host(host::HostArgs),
    /// TCP echo server until killed (the WAN rows run it inside the worker namespace).
    #[command(hide = true)]
    EchoServer {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
}

/// The peers found in the environment (FRPS/FRPC, RATHOLE), and whether the egress paths are
/// measured too.
pub struct Peers {
    frp: Option<(PathBuf, PathBuf)>,
    rathole: Option<PathBuf>,
    egress: bool,
}

impl Peers {
    fn from_env(egress: bool) -> Self {
        let frp = match (std::env::var_os("FRPS"), std::env::var_os("FRPC")) {
            (Some(s), Some(c)) => Some((PathBuf::from(s), PathBuf::from(c))),
            _ => {
                eprintln!("FRPS/FRPC not set: frp is not measured");
                None
            }
        };
        let rathole = std::env::var_os("RATHOLE").map(PathBuf::from);
        if rathole.is_none() {
            eprintln!("RATHOLE not set: rathole is not measured");
        }
        Self {
            frp,
            rathole,
            egress,
        }
    }

    /// Report columns, in the order [`start_systems`] returns them.
    fn names(&self) -> Vec<&'static str> {
        let mut n = vec!["direct", "jumpgate"];
        if self.egress {
            n.extend(egress::Egress::ALL.map(egress::Egress::name));
        }
        if self.frp.is_some() {
            n.push("frp");
            if self.egress {
                n.push(egress::FRP_WS);
            }
        }
        if self.rathole.is_some() {
            n.push("rathole");
        }
        n
    }
}

/// Starts every system (direct, jumpgate and the peers given) forwarding to `targets` on the
/// worker side of `site`; each gets a subdirectory of `dir` for its configuration and logs.
pub fn start_systems(
    bin: &Path,
    targets: Targets,
    site: &Site,
    peers: &Peers,
    dir: &Path,
) -> Result<Vec<System>> {
    let sub = |name: &str| -> Result<PathBuf> {
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    };
    let mut systems: Vec<System> = vec![systems::direct(targets, site)];
    systems.push(systems::jumpgate(bin, targets, &sub("jumpgate")?, site)?);
    if peers.egress {
        for (i, e) in egress::Egress::ALL.into_iter().enumerate() {
            let d = sub(&format!("jumpgate-egress-{i}"))?;
            systems.push(egress::jumpgate(bin, targets, &d, site, e)?);
        }
    }
    if let Some((frps, frpc)) = &peers.frp {
        systems.push(systems::frp(frps, frpc, targets, &sub("frp")?, site)?);
        if peers.egress {
            let d = sub("frp-websocket")?;
            systems.push(egress::frp_websocket(frps, frpc, targets, &d, site)?);
        }
    }
    if let Some(rathole) = &peers.rathole {
        systems.push(systems::rathole(rathole, targets, &sub("rathole")?, site)?);
    }
    Ok(systems)
}

/// Where relay-server and worker-agent are: `JUMPGATE_BIN_DIR`, or next to this binary.
fn bin_dir() -> Result<PathBuf> {
    std::env::var_os("JUMPGATE_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok()?.parent().map(PathBuf::from))
        .context("cannot find the jumpgate binaries; set JUMPGATE_BIN_DIR")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(Cmd::Jump(j)) = &mut args.cmd {
        return jump::run(j, &bin_dir()?);
    }
    match &args.cmd {
        Some(Cmd::EchoServer { listen }) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            measure::echo_server_on(&rt, *listen)?;
            rt.block_on(std::future::pending::<()>());
            return Ok(());
        }
        Some(Cmd::DelayCheck(c)) => return wan::delay_check(c),
        // Two relays share a lease store (bench/src/fleet.rs); one is bench/src/scale.rs.
        Some(Cmd::Agents(a)) if a.relays == 2 => return fleet::run(a, &bin_dir()?),
        Some(Cmd::Agents(a)) => return scale::run(a, &bin_dir()?),
        Some(Cmd::Host(h)) => return host::run(h, &bin_dir()?),
        Some(Cmd::Jump(_)) | None => {}
    }
    if args.smoke {
        args.repeat = 1;
        args.iperf_secs = 1;
        args.conns = 50;
        args.agents = args.agents.min(5);
    }
    let bin = bin_dir()?;
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    delay::install_signal_cleanup(&rt);
    let have_iperf = Command::new("iperf3").arg("--version").output().is_ok();
    if !have_iperf {
        eprintln!("iperf3 not found: throughput rows are skipped (apt-get install iperf3)");
    }
    let peers = Peers::from_env(args.egress);
    let mut report = Report::new(peers.names());
    if !args.only_wan {
        loopback_rows(
            &args,
            &bin,
            &peers,
            have_iperf,
            &rt,
            dir.path(),
            &mut report,
        )?;
    }
    if !args.wan.is_empty() {
        let opts = wan::Opts {
            rtts_ms: args.wan.clone(),
            rate_mbit: args.wan_rate,
            queue_ms: args.wan_queue_ms,
            mtu: args.wan_mtu,
            iperf_secs: args.iperf_secs,
            repeat: args.repeat,
            smoke: args.smoke,
            only_loaded: args.only_loaded,
        };
        wan::run(&opts, &bin, &peers, have_iperf, dir.path(), &mut report)?;
    }
    report.print();
    report.write(&args.out)?;
    eprintln!("results written to {}", args.out.display());
    Ok(())
}

/// The loopback rows (everything in the root namespace) and the agent-scale test.
fn loopback_rows(
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
