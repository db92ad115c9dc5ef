//! `jumpgate-bench agents`: thousands of simulated agents ([`crate::sim`]) on one real release
//! relay. Per agent count, from a cold start: the relay's memory idle and with every agent
//! connected, how long the connect storm takes until every agent has its port, the hello's
//! latency as the agents see it and the lease operation's as the relay measures it
//! (`jumpgate_placement_seconds`); then `kill -9` of the relay, a restart on the same state dir,
//! and how long until every agent is back on the port it had. With `--relays 2`, [`crate::fleet`]
//! runs the same with a two-relay fleet.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use jumpgate_proto::Secret;
use jumpgate_transport::tls::{self, Fingerprint, ServerTrust};
use serde::Serialize;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::measure::pct;
use crate::proc::{cpu_secs, free_port, rss_kib};
use crate::sim::{self, Event, SimConfig};
use crate::systems::{JumpgateRelay, RelayFlags};

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

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

/// One phase in which every agent (re)connects: the cold start, or the return after a restart.
#[derive(Debug, Serialize)]
pub struct Storm {
    /// Agents that got a port in this phase.
    pub allocated: usize,
    /// From the phase's start to the last agent's allocation (or the timeout), seconds.
    pub all_allocated_secs: f64,
    /// Writing preface + hello to reading the allocation, as the agents see it.
    pub hello: Option<Percentiles>,
    /// TCP connect to reading the allocation (TCP, TLS, hello).
    pub setup: Option<Percentiles>,
    /// The relay's own lease operation time (`jumpgate_placement_seconds`, interpolated within
    /// its buckets), when the relay exports it.
    pub placement: Option<Percentiles>,
    /// Relay CPU seconds (user + system) spent in the phase.
    pub relay_cpu_secs: f64,
    /// Attempts that failed (agents retry them with backoff), by reason.
    pub failures: BTreeMap<String, usize>,
}

/// After `kill -9` and restart.
#[derive(Debug, Serialize)]
pub struct Restart {
    /// From the kill to the new relay logging that it listens, seconds.
    pub relay_up_secs: f64,
    /// The agents' return.
    pub storm: Storm,
    /// Agents back on the port they had before the kill.
    pub same_port: usize,
    /// Relay RSS with every agent back, KiB.
    pub relay_rss_kib: u64,
}

/// One agent count's results.
#[derive(Debug, Serialize)]
pub struct Run {
    /// Simulated agents.
    pub agents: usize,
    /// 0: each agent its own session; N: agents are tunnels, N to a host session.
    pub host_tunnels: usize,
    /// The lease store.
    pub store: Store,
    /// Relay RSS before any agent connected, KiB.
    pub relay_rss_idle_kib: u64,
    /// Relay RSS with every agent connected, KiB.
    pub relay_rss_loaded_kib: u64,
    /// (loaded - idle) / agents, KiB.
    pub relay_kib_per_agent: f64,
    /// Relay file descriptors with every agent connected.
    pub relay_fds: usize,
    /// The simulator's own RSS with every agent connected, KiB.
    pub simulator_rss_kib: u64,
    /// The cold start.
    pub cold: Storm,
    /// The restart, unless skipped or the cold start did not complete.
    pub restart: Option<Restart>,
    /// 1-minute load average before and after the run (the machine is shared).
    pub load: (f64, f64),
    /// The relay's first distinct WARN/ERROR lines, for a run that did not complete.
    pub relay_warnings: Vec<String>,
    /// Every agent got its port, and (after a restart) the same one again.
    pub complete: bool,
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

/// What the simulated agents reported, phase by phase, per (relay, agent) link.
pub(crate) struct Tally {
    agents: usize,
    /// The relay whose allocations count in this phase; `None`: every relay's.
    only: Option<usize>,
    /// The port each link got first (index `relay * agents + agent`).
    first_port: Vec<Option<u16>>,
    /// The port each link got in the current phase.
    port: Vec<Option<u16>>,
    reached: usize,
    last: Option<Instant>,
    hello: Vec<f64>,
    setup: Vec<f64>,
    failures: BTreeMap<String, usize>,
}

impl Tally {
    pub(crate) fn new(agents: usize, relays: usize) -> Self {
        Self {
            agents,
            only: None,
            first_port: vec![None; agents * relays],
            port: vec![None; agents * relays],
            reached: 0,
            last: None,
            hello: Vec::new(),
            setup: Vec::new(),
            failures: BTreeMap::new(),
        }
    }

    /// Starts a phase in which only `only`'s allocations count (`None`: every relay's).
    pub(crate) fn next_phase(&mut self, only: Option<usize>) {
        self.only = only;
        self.port.iter_mut().for_each(|p| *p = None);
        self.reached = 0;
        self.last = None;
        self.hello.clear();
        self.setup.clear();
        self.failures.clear();
    }

    /// Links that must have a port for the phase to be complete.
    fn target(&self) -> usize {
        match self.only {
            Some(_) => self.agents,
            None => self.port.len(),
        }
    }

    /// Takes events until every counted link has a port in this phase (true) or `timeout`
    /// has passed since `began` (false).
    pub(crate) fn phase(
        &mut self,
        events: &Receiver<Event>,
        began: Instant,
        timeout: Duration,
    ) -> bool {
        let deadline = began + timeout;
        while self.reached < self.target() {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(event) => self.apply(event, began),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return false
                }
            }
        }
        true
    }

    fn apply(&mut self, event: Event, began: Instant) {
        match event {
            Event::Allocated {
                agent,
                relay,
                port,
                at,
                hello,
                setup,
            } if at >= began && self.only.is_none_or(|r| r == relay) => {
                let link = relay * self.agents + agent;
                let Some(slot) = self.port.get_mut(link) else {
                    return;
                };
                if slot.is_none() {
                    self.reached += 1;
                }
                *slot = Some(port);
                if let Some(first) = self.first_port.get_mut(link) {
                    first.get_or_insert(port);
                }
                self.last = Some(self.last.map_or(at, |l| l.max(at)));
                self.hello.push(hello.as_secs_f64() * 1e3);
                self.setup.push(setup.as_secs_f64() * 1e3);
            }
            Event::Allocated { .. } => {}
            Event::Failed {
                reason, permanent, ..
            } => {
                let key = if permanent {
                    format!("{reason} (agent gave up)")
                } else {
                    reason
                };
                *self.failures.entry(key).or_default() += 1;
            }
        }
    }

    pub(crate) fn storm(&mut self, began: Instant, complete: bool) -> Storm {
        let percentiles = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then(|| Percentiles {
                p50_ms: pct(v, 0.5),
                p99_ms: pct(v, 0.99),
            })
        };
        let end = match (complete, self.last) {
            (true, Some(last)) => last,
            _ => Instant::now(),
        };
        Storm {
            allocated: self.reached,
            all_allocated_secs: end.saturating_duration_since(began).as_secs_f64(),
            hello: percentiles(&mut self.hello),
            setup: percentiles(&mut self.setup),
            placement: None,
            relay_cpu_secs: 0.0,
            failures: std::mem::take(&mut self.failures),
        }
    }

    /// Links with a port in this phase that is the one they got first.
    pub(crate) fn same_port(&self) -> usize {
        self.port
            .iter()
            .zip(&self.first_port)
            .filter(|(now, first)| now.is_some() && now == first)
            .count()
    }

    /// The port `agent` got first from `relay`.
    pub(crate) fn first_port(&self, relay: usize, agent: usize) -> Option<u16> {
        self.first_port
            .get(relay * self.agents + agent)
            .copied()
            .flatten()
    }
}

/// Raises this process's open-files limit to its hard limit (the relay inherits it); returns
/// (soft, hard) as they are afterwards.
#[allow(unsafe_code)]
fn raise_nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the valid, exclusively borrowed `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (0, 0);
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the valid `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    (lim.rlim_cur, lim.rlim_max)
}

/// The 1-minute load average.
pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// The relay's `/metrics` text (HTTP/1.0, so the body is neither chunked nor kept alive).
fn scrape(admin: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no HTTP header in the metrics answer")?;
    anyhow::ensure!(head.contains(" 200 "), "metrics: {head}");
    Ok(body.to_string())
}

/// p50/p99 of the relay's `jumpgate_placement_seconds`, if it exports it.
pub(crate) fn placement(admin: SocketAddr) -> Option<Percentiles> {
    let text = scrape(admin)
        .inspect_err(|e| eprintln!("cannot read the relay's metrics: {e:#}"))
        .ok()?;
    let buckets = histogram(&text, "jumpgate_placement_seconds");
    Some(Percentiles {
        p50_ms: quantile(&buckets, 0.5)? * 1e3,
        p99_ms: quantile(&buckets, 0.99)? * 1e3,
    })
}

/// A histogram's cumulative buckets (upper bound in seconds, count), `+Inf` last.
fn histogram(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut out: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The `q` quantile of cumulative `buckets`, interpolated linearly within the bucket it falls
/// in (as Prometheus' `histogram_quantile`); the last finite bound if it falls in `+Inf`.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let width = count - below;
            let within = if width > 0.0 {
                (rank - below) / width
            } else {
                1.0
            };
            return Some(lower + (bound - lower) * within);
        }
        (lower, below) = (bound, count);
    }
    Some(lower)
}

/// The first distinct WARN/ERROR messages of a relay log (timestamps cut), with their counts.
pub(crate) fn warnings(log: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut order = Vec::new();
    for line in log.lines() {
        let Some(at) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
            continue;
        };
        let message: String = line[at..].chars().take(300).collect();
        let count = seen.entry(message.clone()).or_default();
        if *count == 0 && order.len() < 8 {
            order.push(message);
        }
        *count += 1;
    }
    // Errors first: they say why a run stalled; warnings may be a flood of consequences.
    order.sort_by_key(|m| !m.trim_start().starts_with("ERROR"));
    order
        .into_iter()
        .map(|m| format!("{}x {}", seen.get(&m).copied().unwrap_or(0), m.trim()))
        .collect()
}

/// A Markdown table with one column per run, as both agent reports print them.
pub(crate) struct Columns<'a, T> {
    runs: &'a [T],
    out: String,
}

impl<'a, T> Columns<'a, T> {
    /// The header: `title`, then `heading` of each run.
    pub(crate) fn new(title: &str, runs: &'a [T], heading: impl Fn(&T) -> String) -> Self {
        let mut out = format!("| {title} |");
        for r in runs {
            let _ = write!(out, " {} |", heading(r));
        }
        out.push_str("\n|---|");
        out.push_str(&"---:|".repeat(runs.len()));
        out.push('\n');
        Self { runs, out }
    }

    /// One row: `name`, then `cell` of each run.
    pub(crate) fn row(&mut self, name: &str, cell: &dyn Fn(&T) -> String) {
        let _ = write!(self.out, "| {name} |");
        for r in self.runs {
            let _ = write!(self.out, " {} |", cell(r));
        }
        self.out.push('\n');
    }

    /// The table's text.
    pub(crate) fn finish(self) -> String {
        self.out
    }
}

/// p50 / p99 for a table cell.
pub(crate) fn pair(p: Option<Percentiles>) -> String {
    p.map_or("–".into(), |p| {
        format!("{:.2} / {:.2}", p.p50_ms, p.p99_ms)
    })
}

/// The results as a Markdown table, one column per agent count.
fn markdown(runs: &[Run], args: &AgentsArgs) -> String {
    let title = format!("metric ({:?} store)", args.store);
    let mut table = Columns::new(&title, runs, |r| match r.host_tunnels {
        0 => format!("{} agents", r.agents),
        per => format!("{} tunnels, {per} per host", r.agents),
    });
    let mut row = |name: &str, cell: &dyn Fn(&Run) -> String| table.row(name, cell);
    let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    let restart =
        |r: &Run, f: &dyn Fn(&Restart) -> String| r.restart.as_ref().map_or("–".into(), f);
    row("relay RSS idle, MiB", &|r| mib(r.relay_rss_idle_kib));
    row("relay RSS above idle, all connected, MiB", &|r| {
        mib(r.relay_rss_loaded_kib.saturating_sub(r.relay_rss_idle_kib))
    });
    row("relay RSS per agent, KiB", &|r| {
        format!("{:.1}", r.relay_kib_per_agent)
    });
    row("relay open files, all connected", &|r| {
        r.relay_fds.to_string()
    });
    row("cold start: agents with a port", &|r| {
        r.cold.allocated.to_string()
    });
    row("cold start: until all have a port, s", &|r| {
        format!("{:.2}", r.cold.all_allocated_secs)
    });
    row("cold start: hello -> allocation p50 / p99, ms", &|r| {
        pair(r.cold.hello)
    });
    row("cold start: connect -> allocation p50 / p99, ms", &|r| {
        pair(r.cold.setup)
    });
    row(
        "cold start: relay lease operation p50 / p99, ms (jumpgate_placement_seconds)",
        &|r| pair(r.cold.placement),
    );
    row("cold start: relay CPU, s", &|r| {
        format!("{:.2}", r.cold.relay_cpu_secs)
    });
    row("kill -9: relay listening again after, s", &|r| {
        restart(r, &|x| format!("{:.2}", x.relay_up_secs))
    });
    row("kill -9: until all are back, s", &|r| {
        restart(r, &|x| format!("{:.2}", x.storm.all_allocated_secs))
    });
    row("kill -9: back / on the same port", &|r| {
        restart(r, &|x| format!("{} / {}", x.storm.allocated, x.same_port))
    });
    row("kill -9: hello -> allocation p50 / p99, ms", &|r| {
        restart(r, &|x| pair(x.storm.hello))
    });
    row("kill -9: relay lease operation p50 / p99, ms", &|r| {
        restart(r, &|x| pair(x.storm.placement))
    });
    row("kill -9: relay CPU, s", &|r| {
        restart(r, &|x| format!("{:.2}", x.storm.relay_cpu_secs))
    });
    row("relay RSS above idle after the restart, MiB", &|r| {
        restart(r, &|x| {
            mib(x.relay_rss_kib.saturating_sub(r.relay_rss_idle_kib))
        })
    });
    row("simulator RSS, MiB", &|r| mib(r.simulator_rss_kib));
    row("load average (1 min) before / after", &|r| {
        format!("{:.2} / {:.2}", r.load.0, r.load.1)
    });
    let mut out = table.finish();
    let mut notes = String::new();
    for r in runs {
        let failures = r
            .cold
            .failures
            .iter()
            .chain(r.restart.iter().flat_map(|x| x.storm.failures.iter()));
        for (reason, count) in failures {
            let _ = writeln!(
                notes,
                "- {} agents: {count} failed attempts (retried): {reason}",
                r.agents
            );
        }
        for w in &r.relay_warnings {
            let _ = writeln!(notes, "- {} agents, relay log: {w}", r.agents);
        }
    }
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let text = "x_bucket{le=\"0.001\"} 50\nx_bucket{le=\"0.01\"} 90\n\
                    x_bucket{le=\"0.1\"} 100\nx_bucket{le=\"+Inf\"} 100\nx_count 100\n";
        let b = histogram(text, "x");
        assert_eq!(b.len(), 4);
        assert!((quantile(&b, 0.5).unwrap() - 0.001).abs() < 1e-12);
        // 99th: 9 of the 10 observations between 0.01 and 0.1.
        assert!((quantile(&b, 0.99).unwrap() - 0.091).abs() < 1e-9);
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[(f64::INFINITY, 0.0)], 0.5), None);
    }

    #[test]
    fn warnings_are_counted_once_each() {
        let log = "t1  WARN a: x\nt2  INFO b\nt3  WARN a: x\nt4 ERROR c\n";
        assert_eq!(warnings(log), vec!["1x ERROR c", "2x WARN a: x"]);
    }
}
