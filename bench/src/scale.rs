//! `jumpgate-bench agents`: thousands of simulated agents ([`crate::sim`]) on one real release
//! relay. Per agent count, from a cold start: the relay's memory idle and with every agent
//! connected, how long the connect storm takes until every agent has its port, the hello's
//! latency as the agents see it and the lease operation's as the relay measures it
//! (`jumpgate_placement_seconds`); then `kill -9` of the relay, a restart on the same state dir,
//! and how long until every agent is back on the port it had. With `--relays 2`, [`crate::fleet`]
//! runs the same with a two-relay fleet.

mod machine;
mod observe;
mod results;
mod table;
mod tally;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use jumpgate_proto::Secret;
use jumpgate_transport::tls::{self, Fingerprint, ServerTrust};
use serde::Serialize;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proc::{cpu_secs, free_port, rss_kib};
use crate::sim::{self, SimConfig};
use crate::systems::{JumpgateRelay, RelayFlags};

// The fleet's run (`crate::fleet`) shares these with this one.
pub(crate) use machine::loadavg;
use machine::raise_nofile;
pub(crate) use observe::{placement, warnings};
pub use results::{Percentiles, Restart, Run, Storm};
use table::markdown;
pub(crate) use table::{pair, Columns};
pub(crate) use tally::Tally;

/// The lease store the relay runs with, for the report (and the flag it needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    /// The lease file in the state dir (the relay's default; no flag is added).
    File,
    /// PostgreSQL: adds `--lease-store postgres`; give the URL with
    /// `--relay-arg=--lease-store-url=...` (its password from the environment or a file).
    Postgres,
}

/// `jumpgate-bench agents`.
#[derive(Debug, clap::Args)]
pub struct AgentsArgs {
    /// Agents per run, comma-separated: one cold start (and restart) each, e.g. 1000,5000,10000.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub count: Vec<usize>,
    /// Handshakes (connect, TLS, hello) the simulator runs at once.
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
    /// Source addresses (127.0.0.2 onwards) the agents' connections come from; the relay allows
    /// 128 handshakes in progress per source address.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..=250))]
    pub sources: u8,
    /// The relay's port range.
    #[arg(long, default_value = "10000-50000")]
    pub port_range: String,
    /// Lease store of the relay (a label in the report; `postgres` adds its flag).
    #[arg(long, value_enum, default_value_t = Store::File)]
    pub store: Store,
    /// One more relay flag (repeatable), e.g. `--relay-arg=--lease-store-url=postgres://...`.
    #[arg(long = "relay-arg", allow_hyphen_values = true, value_name = "ARG")]
    pub relay_args: Vec<String>,
    /// Skip the kill -9 and restart.
    #[arg(long)]
    pub no_restart: bool,
    /// Relays: 1, or 2 for a fleet sharing the PostgreSQL store (every agent on both; one is
    /// killed while users connect through the other).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub relays: u8,
    /// Longest wait, per phase, for every agent to get its port (seconds).
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Threads running the simulated agents (the relay runs its default: one).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Play host agents instead (`worker-agent --host-mode`): every N agents are tunnels
    /// registered over one host session per relay, so the figures are per tunnel. 0: one
    /// session per agent.
    #[arg(long, default_value_t = 0)]
    pub host_tunnels: usize,
    /// Where to write agents.json and agents.md.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

/// The start of every agents run, one relay or two: raises the open-files limit (and says
/// what it is), then parses the port range. Returns the soft limit and the range.
pub(crate) fn prepare(args: &AgentsArgs) -> Result<(u64, (u16, u16))> {
    let (soft, hard) = raise_nofile();
    eprintln!("open files limit: {soft} (hard {hard})");
    Ok((soft, parse_range(&args.port_range)?))
}

/// Runs the agent-scale measurement against one relay (`--relays 2` is [`crate::fleet::run`])
/// for every count in `args`, prints the table and writes it.
pub fn run(args: &AgentsArgs, bin: &Path) -> Result<()> {
    let (soft, range) = prepare(args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    for &n in &args.count {
        // The relay needs a connection and a listener per agent, plus a few of its own.
        let need = 2 * n as u64 + 64;
        if need > soft {
            eprintln!(
                "warning: {n} agents need about {need} file descriptors in the relay, above the limit of {soft}; expect the relay to run out near {} agents",
                soft.saturating_sub(64) / 2
            );
        }
        eprintln!("agents: {n} simulated agents, {:?} store", args.store);
        let dir = tempfile::tempdir()?;
        let r = one_run(n, args, range, bin, dir.path(), &rt)?;
        eprintln!("{}", serde_json::to_string(&r)?);
        runs.push(r);
    }
    let md = markdown(&runs, args);
    println!("{md}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("agents.md"), &md)?;
    std::fs::write(
        args.out.join("agents.json"),
        serde_json::to_vec_pretty(&serde_json::json!({ "runs": runs }))?,
    )?;
    eprintln!("results written to {}", args.out.display());
    if let Some(r) = runs.iter().find(|r| !r.complete) {
        bail!(
            "the run with {} agents did not complete: {} of them got a port{}",
            r.agents,
            r.cold.allocated,
            r.restart
                .as_ref()
                .map(|x| format!(
                    ", {} came back, {} on the same port",
                    x.storm.allocated, x.same_port
                ))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn parse_range(text: &str) -> Result<(u16, u16)> {
    let (lo, hi) = text
        .split_once('-')
        .context("--port-range must be LO-HI, e.g. 10000-50000")?;
    Ok((lo.trim().parse()?, hi.trim().parse()?))
}

/// One cold start with `n` agents, then (unless skipped) kill -9 and restart.
fn one_run(
    n: usize,
    args: &AgentsArgs,
    range: (u16, u16),
    bin: &Path,
    dir: &Path,
    rt: &tokio::runtime::Runtime,
) -> Result<Run> {
    let load_before = loadavg();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut extra = Vec::new();
    if args.store == Store::Postgres {
        extra.extend(["--lease-store".to_string(), "postgres".to_string()]);
    }
    extra.extend(args.relay_args.iter().cloned());
    let flags = RelayFlags {
        range,
        admin: admin.to_string(),
        // The relay's own bound on handshakes in progress (1024), as in production.
        max_handshakes: None,
        // Leased ports listen on 127.0.0.1 only, so they never collide with the simulated
        // agents' own ephemeral ports (the range overlaps the kernel's, and the agents connect
        // from 127.0.0.2 onwards): a collision would move an agent to another port for a reason
        // that has nothing to do with the relay.
        proxy_bind: Some("127.0.0.1".into()),
        extra,
    };
    let mut relay = JumpgateRelay::start_with(bin, dir, flags)?;
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(relay.proc.pid());

    let pin: Fingerprint = relay
        .pin()
        .parse()
        .map_err(|e| anyhow::anyhow!("relay fingerprint: {e:?}"))?;
    let token = std::fs::read_to_string(relay.token_file()).context("relay token")?;
    let config = Arc::new(SimConfig {
        relays: vec![relay.listen().parse()?],
        connector: TlsConnector::from(tls::client_config(ServerTrust::Pinned(vec![pin]), None)?),
        server_name: "127.0.0.1".into(),
        token: Secret::new(token.trim().to_string()),
        sources: (0..args.sources)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
            .collect(),
        in_flight: Arc::new(tokio::sync::Semaphore::new(args.in_flight.max(1))),
        tunnels_per_host: args.host_tunnels,
    });
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut tally = Tally::new(n, 1);

    let cpu0 = cpu_secs(relay.proc.pid());
    let began = Instant::now();
    let events = {
        let _rt = rt.enter();
        sim::spawn(n, config, &stop, &tasks)
    };
    let reached = tally.phase(&events, began, timeout);
    let mut cold = tally.storm(began, reached);
    cold.relay_cpu_secs = cpu_secs(relay.proc.pid()) - cpu0;
    cold.placement = placement(admin);
    // Let the last sessions settle (control streams, first heartbeats) before measuring.
    std::thread::sleep(Duration::from_secs(2));
    let loaded = rss_kib(relay.proc.pid());
    let fds = std::fs::read_dir(format!("/proc/{}/fd", relay.proc.pid()))
        .map(|d| d.count())
        .unwrap_or(0);
    let simulator = rss_kib(std::process::id());

    let mut restart = None;
    if reached && !args.no_restart {
        let killed = Instant::now();
        tally.next_phase(None);
        relay.restart(dir)?;
        let relay_up_secs = killed.elapsed().as_secs_f64();
        let cpu0 = cpu_secs(relay.proc.pid());
        let back = tally.phase(&events, killed, timeout);
        let mut storm = tally.storm(killed, back);
        storm.relay_cpu_secs = cpu_secs(relay.proc.pid()) - cpu0;
        storm.placement = placement(admin);
        std::thread::sleep(Duration::from_secs(2));
        restart = Some(Restart {
            relay_up_secs,
            same_port: tally.same_port(),
            relay_rss_kib: rss_kib(relay.proc.pid()),
            storm,
        });
    }
    let complete = reached
        && restart
            .as_ref()
            .is_none_or(|r| r.storm.allocated == n && r.same_port == n);
    let relay_warnings = if complete {
        Vec::new()
    } else {
        warnings(&relay.proc.log_text())
    };
    relay.proc.kill();
    stop.cancel();
    tasks.close();
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(30), tasks.wait()).await;
    });
    Ok(Run {
        agents: n,
        host_tunnels: args.host_tunnels,
        store: args.store,
        relay_rss_idle_kib: idle,
        relay_rss_loaded_kib: loaded,
        relay_kib_per_agent: loaded.saturating_sub(idle) as f64 / n.max(1) as f64,
        relay_fds: fds,
        simulator_rss_kib: simulator,
        cold,
        restart,
        load: (load_before, loadavg()),
        relay_warnings,
        complete,
    })
}
