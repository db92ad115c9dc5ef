//! `jumpgate-bench agents --relays 2`: a two-relay fleet sharing one PostgreSQL lease store,
//! every simulated agent holding a session with both relays (as `worker-agent --server A
//! --server B` does). After the cold start it checks that every agent has the same port on
//! both, opens user connections through relay B, then kills relay A with `kill -9` and restarts
//! it after [`DOWN_FOR`]. Measured: how long until every agent is back on A (and on which
//! port), and whether users lost the tunnel meanwhile: the open connections through B keep
//! echoing, and new connections through B keep getting through, every 200 ms until the agents
//! are back; what they did while A was down is counted apart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use jumpgate_proto::Secret;
use jumpgate_transport::tls::{self, Fingerprint, ServerTrust};
use rand::Rng;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::measure::pct;
use crate::proc::{cpu_secs, free_port, rss_kib};
use crate::scale::{
    loadavg, pair, placement, prepare, warnings, AgentsArgs, Columns, Percentiles, Restart, Store,
    Storm, Tally,
};
use crate::sim::{self, SimConfig};
use crate::systems::{JumpgateRelay, RelayFlags};

/// Where each relay's leased ports listen: apart from each other (both relays bind every
/// agent's port) and from the simulated agents' source addresses (127.0.0.2 onwards).
const PROXY_BIND: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 1, 1)];

/// User connections held open through the surviving relay while the other is killed.
const USER_SESSIONS: usize = 64;

/// How often the user side echoes on every open connection and opens a new one.
const PROBE_EVERY: Duration = Duration::from_millis(200);

/// How long relay A stays down after its `kill -9` before it is started again (systemd's
/// `RestartSec` plays this part in production): ten probe rounds, so what users see while A is
/// down is measured, not only what they see while it restarts, and new connections begin
/// while A is down.
const DOWN_FOR: Duration = Duration::from_secs(2);

/// Longest an echo may take before the connection counts as broken.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);

/// What users saw through the surviving relay while the other was down and its agents came
/// back.
#[derive(Debug, Default, Serialize)]
pub struct UserSide {
    /// Connections open through the surviving relay when the other was killed.
    pub sessions: usize,
    /// Of those, connections that stopped echoing or closed.
    pub sessions_broken: usize,
    /// Echo round trips on the open connections.
    pub echoes: usize,
    /// Slowest echo on an open connection, ms.
    pub echo_max_ms: f64,
    /// New connections (connect, echo, close) attempted through the surviving relay.
    pub new_connections: usize,
    /// Of those, the ones that failed.
    pub new_failed: usize,
    /// Connect to echo for the new connections.
    pub new_latency: Option<Percentiles>,
    /// How long A was down (from its kill until it listened again), s.
    pub down_secs: f64,
    /// Echo round trips on the open connections that began while A was down.
    pub echoes_while_down: usize,
    /// New connections that began while A was down and got through.
    pub new_while_down: usize,
}

/// When the probes happened, for counting what users saw in a window (while A was down).
#[derive(Default)]
struct Timeline {
    /// Per round: when it began and how many echoes on open connections succeeded.
    rounds: Vec<(Instant, usize)>,
    /// Per new connection: when it began and whether it got through.
    fresh: Vec<(Instant, bool)>,
}

/// One fleet run.
#[derive(Debug, Serialize)]
pub struct FleetRun {
    /// Simulated agents (each with a session to both relays).
    pub agents: usize,
    /// Per relay: RSS before any agent connected, KiB.
    pub relay_rss_idle_kib: [u64; 2],
    /// Per relay: RSS with every agent connected, KiB.
    pub relay_rss_loaded_kib: [u64; 2],
    /// The simulator's own RSS with every session up, KiB.
    pub simulator_rss_kib: u64,
    /// Cold start, until every agent has its port on both relays (relay CPU: both relays').
    pub cold: Storm,
    /// Agents whose port is the same on both relays.
    pub same_port_on_both: usize,
    /// Relay A killed and restarted; the return of the agents to A.
    pub restart: Option<Restart>,
    /// What users saw through relay B meanwhile.
    pub users: UserSide,
    /// 1-minute load average before and after.
    pub load: (f64, f64),
    /// The relays' first distinct WARN/ERROR lines, for a run that did not complete.
    pub relay_warnings: Vec<String>,
    /// Every agent got the same port on both relays, came back to A on it, and users lost
    /// nothing.
    pub complete: bool,
}

/// Runs the two-relay measurement for every count in `args`, prints the table and writes it.
pub fn run(args: &AgentsArgs, bin: &Path) -> Result<()> {
    let (_, range) = prepare(args)?;
    if args.store != Store::Postgres {
        bail!("--relays 2 needs a shared lease store: add --store postgres and --relay-arg=--lease-store-url=...");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    for &n in &args.count {
        eprintln!("agents: {n} simulated agents, each on two relays sharing a PostgreSQL store");
        let dir = tempfile::tempdir()?;
        let r = one_run(n, args, range, bin, dir.path(), &rt)?;
        eprintln!("{}", serde_json::to_string(&r)?);
        runs.push(r);
    }
    let md = markdown(&runs);
    println!("{md}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("agents-fleet.md"), &md)?;
    std::fs::write(
        args.out.join("agents-fleet.json"),
        serde_json::to_vec_pretty(&serde_json::json!({ "runs": runs }))?,
    )?;
    eprintln!("results written to {}", args.out.display());
    if let Some(r) = runs.iter().find(|r| !r.complete) {
        bail!(
            "the fleet run with {} agents did not complete (same port on both: {}, users: {:?})",
            r.agents,
            r.same_port_on_both,
            r.users
        );
    }
    Ok(())
}

fn one_run(
    n: usize,
    args: &AgentsArgs,
    range: (u16, u16),
    bin: &Path,
    dir: &Path,
    rt: &tokio::runtime::Runtime,
) -> Result<FleetRun> {
    let load_before = loadavg();
    let dirs = [dir.join("a"), dir.join("b")];
    let admins = [
        SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        SocketAddr::from(([127, 0, 0, 1], free_port()?)),
    ];
    let flags = |i: usize, token: Option<&Path>| {
        let mut extra = vec!["--lease-store".to_string(), "postgres".to_string()];
        if let Some(token) = token {
            extra.push("--token-file".into());
            extra.push(token.display().to_string());
        }
        extra.extend(args.relay_args.iter().cloned());
        RelayFlags {
            range,
            admin: admins[i].to_string(),
            max_handshakes: None,
            proxy_bind: Some(PROXY_BIND[i].to_string()),
            extra,
        }
    };
    std::fs::create_dir_all(&dirs[0])?;
    std::fs::create_dir_all(&dirs[1])?;
    let mut a = JumpgateRelay::start_with(bin, &dirs[0], flags(0, None))?;
    // B accepts the token A generated, so one agent credential works on both.
    let b = JumpgateRelay::start_with(bin, &dirs[1], flags(1, Some(&a.token_file())))?;
    std::thread::sleep(Duration::from_secs(1));
    let idle = [rss_kib(a.proc.pid()), rss_kib(b.proc.pid())];

    let pins = [a.pin(), b.pin()]
        .iter()
        .map(|p| p.parse::<Fingerprint>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("relay fingerprint: {e:?}"))?;
    let token = std::fs::read_to_string(a.token_file()).context("relay token")?;
    let config = Arc::new(SimConfig {
        relays: vec![a.listen().parse()?, b.listen().parse()?],
        connector: TlsConnector::from(tls::client_config(ServerTrust::Pinned(pins), None)?),
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
    let mut tally = Tally::new(n, 2);

    let relays_cpu =
        |a: &JumpgateRelay, b: &JumpgateRelay| cpu_secs(a.proc.pid()) + cpu_secs(b.proc.pid());
    let cpu0 = relays_cpu(&a, &b);
    let began = Instant::now();
    let events = {
        let _rt = rt.enter();
        sim::spawn(n, config, &stop, &tasks)
    };
    let reached = tally.phase(&events, began, timeout);
    let mut cold = tally.storm(began, reached);
    cold.relay_cpu_secs = relays_cpu(&a, &b) - cpu0;
    cold.placement = placement(admins[0]);
    std::thread::sleep(Duration::from_secs(2));
    let loaded = [rss_kib(a.proc.pid()), rss_kib(b.proc.pid())];
    let simulator = rss_kib(std::process::id());
    let ports: Vec<Option<u16>> = (0..n).map(|i| tally.first_port(0, i)).collect();
    let same_port_on_both = (0..n)
        .filter(|&i| ports[i].is_some() && ports[i] == tally.first_port(1, i))
        .count();

    let mut restart = None;
    let mut users = UserSide::default();
    if reached {
        // Users of the agents, through B.
        let targets: Vec<SocketAddr> = ports
            .iter()
            .flatten()
            .map(|&p| SocketAddr::from((PROXY_BIND[1], p)))
            .collect();
        let probing = CancellationToken::new();
        let probe = rt.spawn(probe_users(targets, probing.clone()));
        // Let the user connections open before the kill.
        std::thread::sleep(Duration::from_secs(2));
        let killed = Instant::now();
        tally.next_phase(Some(0));
        a.proc.kill();
        std::thread::sleep(DOWN_FOR);
        let starting = Instant::now();
        a.restart(&dirs[0])?;
        let up = Instant::now();
        // From the start, not the kill: the hold is ours, not the relay's.
        let relay_up_secs = (up - starting).as_secs_f64();
        let cpu0 = cpu_secs(a.proc.pid());
        let back = tally.phase(&events, starting, timeout);
        let mut storm = tally.storm(starting, back);
        storm.relay_cpu_secs = cpu_secs(a.proc.pid()) - cpu0;
        storm.placement = placement(admins[0]);
        std::thread::sleep(Duration::from_secs(2));
        probing.cancel();
        if let Ok((mut seen, timeline)) = rt.block_on(probe) {
            let down = |at: &Instant| *at >= killed && *at < up;
            seen.down_secs = (up - killed).as_secs_f64();
            seen.echoes_while_down = timeline
                .rounds
                .iter()
                .filter(|(at, _)| down(at))
                .map(|(_, n)| n)
                .sum();
            seen.new_while_down = timeline
                .fresh
                .iter()
                .filter(|(at, ok)| down(at) && *ok)
                .count();
            users = seen;
        }
        restart = Some(Restart {
            relay_up_secs,
            same_port: tally.same_port(),
            relay_rss_kib: rss_kib(a.proc.pid()),
            storm,
        });
    }
    let complete = reached
        && same_port_on_both == n
        && users.sessions > 0
        && users.sessions_broken == 0
        && users.new_failed == 0
        && users.echoes_while_down > 0
        && users.new_while_down > 0
        && restart
            .as_ref()
            .is_some_and(|r| r.storm.allocated == n && r.same_port == n);
    let relay_warnings = if complete {
        Vec::new()
    } else {
        let mut w = warnings(&a.proc.log_text());
        w.extend(warnings(&b.proc.log_text()));
        w
    };
    a.proc.kill();
    drop(b);
    stop.cancel();
    tasks.close();
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(30), tasks.wait()).await;
    });
    Ok(FleetRun {
        agents: n,
        relay_rss_idle_kib: idle,
        relay_rss_loaded_kib: loaded,
        simulator_rss_kib: simulator,
        cold,
        same_port_on_both,
        restart,
        users,
        load: (load_before, loadavg()),
        relay_warnings,
        complete,
    })
}

/// Opens [`USER_SESSIONS`] connections to `targets` and, until `stop`, echoes on each and opens
/// one more connection every [`PROBE_EVERY`] (one at a time, as before, but on a task of their
/// own, so a slow one does not delay the echoes); also returns when each probe began, for the
/// caller to count what happened while relay A was down.
async fn probe_users(targets: Vec<SocketAddr>, stop: CancellationToken) -> (UserSide, Timeline) {
    let mut out = UserSide::default();
    let mut timeline = Timeline::default();
    if targets.is_empty() {
        return (out, timeline);
    }
    let step = (targets.len() / USER_SESSIONS).max(1);
    let mut open: Vec<TcpStream> = Vec::new();
    for addr in targets.iter().step_by(step).take(USER_SESSIONS) {
        if let Ok(mut conn) = TcpStream::connect(addr).await {
            if echo(&mut conn, 0).await.is_some() {
                open.push(conn);
            }
        }
    }
    out.sessions = open.len();
    let fresh = tokio::spawn(probe_new_connections(targets, stop.clone()));
    let mut round = 1u64;
    let mut tick = tokio::time::interval(PROBE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let began = Instant::now();
        let mut echoes = 0;
        let mut kept = Vec::with_capacity(open.len());
        for mut conn in open {
            match echo(&mut conn, round).await {
                Some(took) => {
                    out.echoes += 1;
                    echoes += 1;
                    out.echo_max_ms = out.echo_max_ms.max(took.as_secs_f64() * 1e3);
                    kept.push(conn);
                }
                None => out.sessions_broken += 1,
            }
        }
        open = kept;
        timeline.rounds.push((began, echoes));
        round += 1;
    }
    let mut latencies = Vec::new();
    for (began, took) in fresh.await.unwrap_or_default() {
        out.new_connections += 1;
        match took {
            Some(took) => latencies.push(took.as_secs_f64() * 1e3),
            None => out.new_failed += 1,
        }
        timeline.fresh.push((began, took.is_some()));
    }
    latencies.sort_by(f64::total_cmp);
    out.new_latency = (!latencies.is_empty()).then(|| Percentiles {
        p50_ms: pct(&latencies, 0.5),
        p99_ms: pct(&latencies, 0.99),
    });
    (out, timeline)
}

/// Until `stop`, every [`PROBE_EVERY`] (or as soon as the previous one is done, if it took
/// longer) connects to a random target and echoes once: when each began, and how long it took
/// (`None`: it failed or took longer than [`ECHO_TIMEOUT`]).
async fn probe_new_connections(
    targets: Vec<SocketAddr>,
    stop: CancellationToken,
) -> Vec<(Instant, Option<Duration>)> {
    let mut seen = Vec::new();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for round in 1u64.. {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let addr = targets[rand::thread_rng().gen_range(0..targets.len())];
        let began = Instant::now();
        let connect_and_echo = async {
            let mut conn = TcpStream::connect(addr).await.ok()?;
            echo(&mut conn, round).await
        };
        let ok = tokio::time::timeout(ECHO_TIMEOUT, connect_and_echo).await;
        seen.push((began, ok.ok().flatten().map(|_| began.elapsed())));
    }
    seen
}

/// Sends one numbered line and reads it back: how long that took, or `None` if the connection
/// broke, closed, answered wrong or took longer than [`ECHO_TIMEOUT`].
async fn echo(conn: &mut TcpStream, round: u64) -> Option<Duration> {
    let line = format!("round {round:012}\n");
    let began = Instant::now();
    let exchange = async {
        conn.write_all(line.as_bytes()).await.ok()?;
        let mut back = vec![0u8; line.len()];
        conn.read_exact(&mut back).await.ok()?;
        (back == line.as_bytes()).then(|| began.elapsed())
    };
    tokio::time::timeout(ECHO_TIMEOUT, exchange).await.ok()?
}

/// The results as a Markdown table, one column per agent count.
fn markdown(runs: &[FleetRun]) -> String {
    use std::fmt::Write as _;
    let mut table = Columns::new("metric (two relays, PostgreSQL store)", runs, |r| {
        format!("{} agents", r.agents)
    });
    let mut row = |name: &str, cell: &dyn Fn(&FleetRun) -> String| table.row(name, cell);
    let per_agent = |r: &FleetRun, i: usize| {
        r.relay_rss_loaded_kib[i].saturating_sub(r.relay_rss_idle_kib[i]) as f64
            / r.agents.max(1) as f64
    };
    let restart =
        |r: &FleetRun, f: &dyn Fn(&Restart) -> String| r.restart.as_ref().map_or("–".into(), f);
    row("relay RSS per agent A / B, KiB", &|r| {
        format!("{:.1} / {:.1}", per_agent(r, 0), per_agent(r, 1))
    });
    row("cold start: sessions (2 per agent) with a port", &|r| {
        r.cold.allocated.to_string()
    });
    row("cold start: until all have a port on both, s", &|r| {
        format!("{:.2}", r.cold.all_allocated_secs)
    });
    row("cold start: CPU of both relays, s", &|r| {
        format!("{:.2}", r.cold.relay_cpu_secs)
    });
    row("agents with the same port on both relays", &|r| {
        r.same_port_on_both.to_string()
    });
    row(
        "kill -9 of A, started 2 s later: listening after, s",
        &|r| restart(r, &|x| format!("{:.2}", x.relay_up_secs)),
    );
    row(
        "kill -9 of A: all agents back on A after its start, s",
        &|r| restart(r, &|x| format!("{:.2}", x.storm.all_allocated_secs)),
    );
    row("kill -9 of A: back / on the same port", &|r| {
        restart(r, &|x| format!("{} / {}", x.storm.allocated, x.same_port))
    });
    row("kill -9 of A: A's lease operation p50 / p99, ms", &|r| {
        restart(r, &|x| pair(x.storm.placement))
    });
    row("users through B: open connections / broken", &|r| {
        format!("{} / {}", r.users.sessions, r.users.sessions_broken)
    });
    row("users through B: echoes on them, slowest ms", &|r| {
        format!("{}, {:.1}", r.users.echoes, r.users.echo_max_ms)
    });
    row("users through B: new connections / failed", &|r| {
        format!("{} / {}", r.users.new_connections, r.users.new_failed)
    });
    row(
        "users through B while A was down: echoes / new connections",
        &|r| format!("{} / {}", r.users.echoes_while_down, r.users.new_while_down),
    );
    row("users through B: new connection p50 / p99, ms", &|r| {
        pair(r.users.new_latency)
    });
    row("simulator RSS, MiB", &|r| {
        format!("{:.1}", r.simulator_rss_kib as f64 / 1024.0)
    });
    row("load average (1 min) before / after", &|r| {
        format!("{:.2} / {:.2}", r.load.0, r.load.1)
    });
    let mut out = table.finish();
    for r in runs {
        for w in &r.relay_warnings {
            let _ = writeln!(out, "- {} agents, relay log: {w}", r.agents);
        }
    }
    out
}
