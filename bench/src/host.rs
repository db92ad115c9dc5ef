//! `jumpgate-bench host`: issue 28's numbers. One host agent (`worker-agent --host-mode`) on a
//! real relay gets N tunnels registered one at a time through the real `worker-agent tunnel add`
//! CLI, each with its own credential (a tokens-file entry per tunnel, as the relay caps names per
//! credential); each call is timed from the CLI's start to its exit 0 (it exits once the relay
//! bound the tunnel's port). Then, on a fresh relay with the same credentials, N ordinary agent
//! processes (one per tunnel, as before host mode) connect at once. Reported: register latency,
//! the agent's and the relay's RSS per tunnel against the agents' and the relay's RSS per agent,
//! beside the targets.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand::Rng;
use serde::Serialize;

use crate::measure::pct;
use crate::proc::{rss_kib, Proc};
use crate::systems::{JumpgateRelay, RelayFlags};

/// Issue 28: a registration's p99 on loopback, ms.
const REGISTER_P99_MS: f64 = 100.0;

/// Issue 28: the host agent's RSS above idle with [`TARGET_TUNNELS`] tunnels, KiB.
const AGENT_ABOVE_IDLE_KIB: f64 = 5.0 * 1024.0;

/// The tunnel count the agent RSS target is stated for.
const TARGET_TUNNELS: f64 = 200.0;

/// Where every tunnel forwards: nothing is dialled, the bench measures placement and memory.
const SERVICE: &str = "ssh=127.0.0.1:9";

/// How long processes are left alone before their RSS is read.
const SETTLE: Duration = Duration::from_secs(1);

/// Command line of `jumpgate-bench host`.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// Tunnels registered on the host agent (and ordinary agents started for the comparison).
    #[arg(long, default_value_t = 200)]
    pub tunnels: usize,
    /// The relay's port range, LO-HI (each relay in turn leases one port per tunnel from it).
    #[arg(long, default_value = "10000-50000")]
    pub port_range: String,
    /// Longest wait for the host agent's session and for all ordinary agents to connect, s.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Where to write host.json and host.md.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

/// Register latency percentiles, ms.
#[derive(Debug, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

/// One host-mode run and its comparison with one agent per tunnel.
#[derive(Debug, Serialize)]
pub struct HostRun {
    /// Tunnels (and, for the comparison, agent processes).
    pub tunnels: usize,
    /// `tunnel add` from start to exit 0, per call.
    pub register: Latency,
    /// All N `tunnel add` calls, one after another, s.
    pub register_all_secs: f64,
    /// The host agent's RSS with its session up and no tunnel, KiB.
    pub agent_idle_kib: u64,
    /// The host agent's RSS with N tunnels, KiB.
    pub agent_loaded_kib: u64,
    /// The relay's RSS before the host agent connected, KiB.
    pub relay_idle_kib: u64,
    /// The relay's RSS with the host agent's session up and no tunnel, KiB.
    pub relay_session_kib: u64,
    /// The relay's RSS with the host agent and its N tunnels, KiB.
    pub relay_host_kib: u64,
    /// The second relay's RSS before any ordinary agent connected, KiB.
    pub relay2_idle_kib: u64,
    /// The second relay's RSS with N ordinary agents, KiB.
    pub relay2_agents_kib: u64,
    /// The N ordinary agents' RSS, summed, KiB (pages they share, such as the binary's text,
    /// counted once per process).
    pub agents_sum_kib: u64,
    /// The N ordinary agents' PSS, summed, KiB (shared pages split between their sharers).
    pub agents_pss_sum_kib: u64,
    /// From starting the first ordinary agent until all N had their port, s.
    pub agents_all_connected_secs: f64,
}

impl HostRun {
    fn per(&self, kib: u64, base: u64) -> f64 {
        kib.saturating_sub(base) as f64 / self.tunnels.max(1) as f64
    }
    /// Host agent RSS above idle per tunnel, KiB.
    pub fn agent_per_tunnel(&self) -> f64 {
        self.per(self.agent_loaded_kib, self.agent_idle_kib)
    }
    /// Relay RSS above idle per host tunnel, the host's session included, KiB.
    pub fn relay_per_tunnel(&self) -> f64 {
        self.per(self.relay_host_kib, self.relay_idle_kib)
    }
    /// Relay RSS per host tunnel above the host's session, KiB.
    pub fn relay_per_tunnel_marginal(&self) -> f64 {
        self.per(self.relay_host_kib, self.relay_session_kib)
    }
    /// Relay RSS above idle per ordinary agent, KiB.
    pub fn relay_per_agent(&self) -> f64 {
        self.per(self.relay2_agents_kib, self.relay2_idle_kib)
    }
    /// Ordinary agents' RSS per agent (= per tunnel), KiB.
    pub fn agents_per_tunnel(&self) -> f64 {
        self.per(self.agents_sum_kib, 0)
    }
}

/// Runs the measurement, prints the table and writes host.json and host.md to `--out`.
pub fn run(args: &HostArgs, bin: &Path) -> Result<()> {
    ensure!(args.tunnels > 0, "--tunnels must be at least 1");
    let range = parse_range(&args.port_range)?;
    ensure!(
        usize::from(range.1.saturating_sub(range.0)) >= args.tunnels + 8,
        "--port-range {} is too small for {} tunnels: give it at least {} ports",
        args.port_range,
        args.tunnels,
        args.tunnels + 9
    );
    let dir = tempfile::tempdir()?;
    let r = one_run(args, range, bin, dir.path())?;
    eprintln!("{}", serde_json::to_string(&r)?);
    let md = markdown(&r);
    println!("{md}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("host.md"), &md)?;
    std::fs::write(args.out.join("host.json"), serde_json::to_vec_pretty(&r)?)?;
    eprintln!("results written to {}", args.out.display());
    Ok(())
}

fn parse_range(text: &str) -> Result<(u16, u16)> {
    let (lo, hi) = text
        .split_once('-')
        .context("--port-range must be LO-HI, e.g. 10000-50000")?;
    let lo: u16 = lo
        .trim()
        .parse()
        .context("--port-range: LO is not a port")?;
    let hi: u16 = hi
        .trim()
        .parse()
        .context("--port-range: HI is not a port")?;
    ensure!(lo <= hi, "--port-range {text}: LO is above HI");
    Ok((lo, hi))
}

/// A fresh random token.
fn token() -> String {
    let bytes: [u8; 24] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `content` readable by its owner only (both binaries refuse secrets others can read).
fn write_secret(path: &Path, content: &str) -> Result<()> {
    std::fs::write(path, content)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The tunnel (and ordinary agent) names.
fn name(i: usize) -> String {
    format!("bh-{i}")
}

/// The host's own name.
const HOST: &str = "bench-host";

/// Writes the relay's tokens file (the host's entry, then one per tunnel, each for its own name)
/// and each tunnel's token file; returns the tokens file and the host's token file.
fn credentials(n: usize, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let host = token();
    let mut body =
        format!("[[token]]\nlabel = \"host\"\ntoken = \"{host}\"\nagents = [\"{HOST}\"]\n\n");
    for i in 0..n {
        let t = token();
        body.push_str(&format!(
            "[[token]]\nlabel = \"job-{i}\"\ntoken = \"{t}\"\nagents = [\"{}\"]\n\n",
            name(i)
        ));
        write_secret(&token_file(dir, i), &t)?;
    }
    let tokens = dir.join("tokens.toml");
    write_secret(&tokens, &body)?;
    let host_file = dir.join("host.token");
    write_secret(&host_file, &host)?;
    Ok((tokens, host_file))
}

fn token_file(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("{}.token", name(i)))
}

fn relay(bin: &Path, dir: &Path, range: (u16, u16), tokens: &Path) -> Result<JumpgateRelay> {
    std::fs::create_dir_all(dir)?;
    JumpgateRelay::start_with(
        bin,
        dir,
        RelayFlags {
            range,
            admin: "off".into(),
            max_handshakes: Some(5000),
            proxy_bind: None,
            extra: vec!["--tokens-file".into(), tokens.display().to_string()],
        },
    )
}

/// Waits until `relay` logged `needle` `count` times.
fn wait_count(relay: &JumpgateRelay, needle: &str, count: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = relay.proc.log_text().matches(needle).count();
        if seen >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the relay logged {needle:?} {seen} times, not {count}, in {timeout:?}; its log: {}",
                relay.proc.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn one_run(args: &HostArgs, range: (u16, u16), bin: &Path, dir: &Path) -> Result<HostRun> {
    let n = args.tunnels;
    let timeout = Duration::from_secs(args.timeout_secs);
    let (tokens, host_token) = credentials(n, dir)?;
    let agent_bin = bin.join("worker-agent");

    // Host mode: one agent, N tunnels through its CLI.
    eprintln!("host: one host agent, {n} tunnels");
    let r1 = relay(bin, &dir.join("relay-host"), range, &tokens)?;
    std::thread::sleep(SETTLE);
    let relay_idle_kib = rss_kib(r1.proc.pid());
    let socket = dir.join("api.sock");
    let mut cmd = Command::new(&agent_bin);
    cmd.args([
        "--server",
        r1.listen(),
        "--name",
        HOST,
        "--fingerprint",
        r1.pin(),
    ])
    .arg("--token-file")
    .arg(&host_token)
    .arg("--host-mode")
    .arg("--api-socket")
    .arg(&socket)
    .arg("--state-dir")
    .arg(dir.join("host-state"))
    .env("RUST_LOG", "warn");
    let host = Proc::spawn("host-agent", &mut cmd, dir)?;
    wait_count(&r1, "host agent connected", 1, timeout)?;
    let deadline = Instant::now() + timeout;
    while !socket.exists() {
        ensure!(
            Instant::now() < deadline,
            "the host agent never created {}; its log: {}",
            socket.display(),
            host.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(SETTLE);
    let agent_idle_kib = rss_kib(host.pid());
    let relay_session_kib = rss_kib(r1.proc.pid());

    let mut took = Vec::with_capacity(n);
    let all = Instant::now();
    for i in 0..n {
        let began = Instant::now();
        let out = Command::new(&agent_bin)
            .arg("tunnel")
            .arg("--api-socket")
            .arg(&socket)
            .args(["add", &name(i), "--service", SERVICE, "--join-token-file"])
            .arg(token_file(dir, i))
            .stdin(Stdio::null())
            .output()
            .context("cannot run worker-agent tunnel add")?;
        let ms = began.elapsed().as_secs_f64() * 1e3;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.starts_with("ssh enabled on ") {
            bail!(
                "tunnel add {} failed ({}): {}{}",
                name(i),
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        took.push(ms);
    }
    let register_all_secs = all.elapsed().as_secs_f64();
    // Every tunnel has its port on the relay (the CLI said so; the relay agrees).
    wait_count(&r1, "new tunnel [bh-", n, timeout)?;
    std::thread::sleep(SETTLE);
    let agent_loaded_kib = rss_kib(host.pid());
    let relay_host_kib = rss_kib(r1.proc.pid());
    drop(host);
    drop(r1);

    // As before host mode: one agent process per tunnel, on a fresh relay (same range).
    eprintln!("host: {n} ordinary agents, one per tunnel");
    let r2 = relay(bin, &dir.join("relay-agents"), range, &tokens)?;
    std::thread::sleep(SETTLE);
    let relay2_idle_kib = rss_kib(r2.proc.pid());
    let started = Instant::now();
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        let mut cmd = Command::new(&agent_bin);
        cmd.args(["--server", r2.listen(), "--name", &name(i)])
            .args(["--fingerprint", r2.pin(), "--service", SERVICE])
            .arg("--token-file")
            .arg(token_file(dir, i))
            .arg("--status-file")
            .arg(dir.join(format!("{}.status.json", name(i))))
            .env("RUST_LOG", "warn");
        agents.push(Proc::spawn(&format!("agent-{}", name(i)), &mut cmd, dir)?);
    }
    wait_count(&r2, "new tunnel [bh-", n, timeout)?;
    let agents_all_connected_secs = started.elapsed().as_secs_f64();
    std::thread::sleep(SETTLE);
    let agents_sum_kib = agents.iter().map(|a| rss_kib(a.pid())).sum();
    let agents_pss_sum_kib = agents.iter().map(|a| pss_kib(a.pid())).sum();
    let relay2_agents_kib = rss_kib(r2.proc.pid());
    drop(agents);
    drop(r2);

    took.sort_by(f64::total_cmp);
    Ok(HostRun {
        tunnels: n,
        register: Latency {
            p50_ms: pct(&took, 0.5),
            p99_ms: pct(&took, 0.99),
            max_ms: took.last().copied().unwrap_or(0.0),
        },
        register_all_secs,
        agent_idle_kib,
        agent_loaded_kib,
        relay_idle_kib,
        relay_session_kib,
        relay_host_kib,
        relay2_idle_kib,
        relay2_agents_kib,
        agents_sum_kib,
        agents_pss_sum_kib,
        agents_all_connected_secs,
    })
}

/// A process's proportional set size (`Pss:` of /proc/PID/smaps_rollup), KiB; 0 if unreadable.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn yes(met: bool) -> &'static str {
    if met {
        "yes"
    } else {
        "**no**"
    }
}

/// The results as a Markdown table: figure, the target, whether it is met.
fn markdown(r: &HostRun) -> String {
    let n = r.tunnels;
    let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    let above = r.agent_loaded_kib.saturating_sub(r.agent_idle_kib);
    // The target is stated for 200 tunnels; other counts are held to the same per-tunnel share.
    let agent_budget = AGENT_ABOVE_IDLE_KIB / TARGET_TUNNELS * n as f64;
    let rows: Vec<(String, String, String, &str)> = vec![
        (
            "register p50 / p99 / max (`tunnel add` start to exit 0), ms".into(),
            format!(
                "{:.1} / {:.1} / {:.1}",
                r.register.p50_ms, r.register.p99_ms, r.register.max_ms
            ),
            format!("p99 < {REGISTER_P99_MS:.0}"),
            yes(r.register.p99_ms < REGISTER_P99_MS),
        ),
        (
            format!("register all {n}, one after another, s"),
            format!("{:.2}", r.register_all_secs),
            "–".into(),
            "",
        ),
        (
            "host agent RSS idle / with the tunnels, MiB".into(),
            format!("{} / {}", mib(r.agent_idle_kib), mib(r.agent_loaded_kib)),
            "–".into(),
            "",
        ),
        (
            format!("host agent RSS above idle, {n} tunnels, MiB"),
            mib(above),
            format!("< {:.2} (5 MiB per 200)", agent_budget / 1024.0),
            yes((above as f64) < agent_budget),
        ),
        (
            "host agent RSS per tunnel, KiB".into(),
            format!("{:.1}", r.agent_per_tunnel()),
            "–".into(),
            "",
        ),
        (
            "relay RSS per tunnel (host mode, its session shared out), KiB".into(),
            format!("{:.1}", r.relay_per_tunnel()),
            "<= per agent".into(),
            yes(r.relay_per_tunnel() <= r.relay_per_agent()),
        ),
        (
            "relay RSS per tunnel above the host's session, KiB".into(),
            format!("{:.1}", r.relay_per_tunnel_marginal()),
            "–".into(),
            "",
        ),
        (
            format!("{n} ordinary agents: RSS / PSS per tunnel (summed / {n}), KiB"),
            format!(
                "{:.1} / {:.1}",
                r.agents_per_tunnel(),
                r.per(r.agents_pss_sum_kib, 0)
            ),
            "–".into(),
            "",
        ),
        (
            "relay RSS per agent (one agent per tunnel), KiB".into(),
            format!("{:.1}", r.relay_per_agent()),
            "–".into(),
            "",
        ),
        (
            format!("{n} ordinary agents: all connected, s"),
            format!("{:.2}", r.agents_all_connected_secs),
            "–".into(),
            "",
        ),
    ];
    let mut out =
        format!("| metric ({n} tunnels, loopback) | value | target | met |\n|---|---:|---|---|\n");
    for (metric, value, target, met) in rows {
        out.push_str(&format!("| {metric} | {value} | {target} | {met} |\n"));
    }
    out
}
