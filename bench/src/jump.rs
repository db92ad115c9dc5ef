//! `jumpgate-bench jump`: the `ssh -J relay job` path next to the allocated-port path, with real
//! OpenSSH on both: one relay (jump listener on), one agent, one throwaway sshd as the job.
//!
//! Rows, each measured on both paths side by side (alternating, medians): the 64-byte round
//! trip of an interactive session (`ssh ... cat`, a line typed and read back), sessions per
//! second (`ssh ... true` one after another), and `scp` up and down. With `--rtt-ms`, the same
//! rows again with the *user's* leg across the userspace delay line ([`crate::delay`]): the
//! user's `ssh`/`scp` run in the line's namespace and reach the relay across it, while the relay,
//! the agent and the job stay on loopback. That leg is the one the jump's SSH channel windows
//! cover.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::delay::{DelayConfig, DelayLine};
use crate::measure::pct;
use crate::median;
use crate::proc::{free_port, Proc};
use crate::systems::{wait_status, JumpgateRelay, RelayFlags};

/// `jumpgate-bench jump` flags.
#[derive(Debug, clap::Args)]
pub struct JumpArgs {
    /// Also measure with the user's leg this long (round trip, ms; comma-separated), across
    /// the delay line (needs root and /dev/net/tun).
    #[arg(long, value_delimiter = ',')]
    rtt_ms: Vec<f64>,
    /// Also run every `--rtt-ms` with the user's leg limited to this rate, Mbit/s per
    /// direction: a real user's path, where neither end's CPU is the limit and what is left to
    /// bound a transfer is the SSH channel windows (on a 2-core host the unlimited line
    /// measures the CPU that `ssh -W` and the relay add as much as the windows).
    #[arg(long)]
    rate_mbit: Option<f64>,
    /// MiB per scp transfer.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Sessions per connection-rate measurement.
    #[arg(long, default_value_t = 20)]
    sessions: usize,
    /// Round trips per latency measurement.
    #[arg(long, default_value_t = 2000)]
    rounds: usize,
    /// Tiny sizes for CI: seconds, not minutes.
    #[arg(long)]
    smoke: bool,
    /// Where to write results-jump.md and results-jump.json.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

/// A throwaway OpenSSH server (the job), its host key and the one user key it lets in.
struct Sshd {
    _proc: Proc,
    port: u16,
}

fn keygen(path: &Path) -> Result<()> {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .context("ssh-keygen (openssh-client) is needed")?
        .success();
    ensure!(ok, "ssh-keygen failed");
    Ok(())
}

impl Sshd {
    fn start(dir: &Path, user_key: &Path) -> Result<Self> {
        let host_key = dir.join("sshd_host_key");
        keygen(&host_key)?;
        std::fs::copy(user_key.with_extension("pub"), dir.join("authorized_keys"))?;
        std::fs::create_dir_all("/run/sshd").ok();
        let port = free_port()?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/sshd_host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 PermitRootLogin prohibit-password\nPidFile none\nSubsystem sftp internal-sftp\n\
                 MaxStartups 200:30:400\n",
                d = dir.display()
            ),
        )?;
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("sshd not found: apt-get install openssh-server")?;
        let proc = Proc::spawn(
            "sshd",
            Command::new(sshd).args(["-D", "-e", "-f"]).arg(&config),
            dir,
        )?;
        crate::systems::wait_listening(([127, 0, 0, 1], port).into(), Duration::from_secs(10))?;
        Ok(Self { _proc: proc, port })
    }
}

/// The two ways a user reaches the job, as OpenSSH command lines.
struct Paths {
    /// ssh_config with a `jumphost` block and options for every hop (OpenSSH hands `-F`, not
    /// `-o`, to the jump hop's ssh).
    cfg: PathBuf,
    /// Where the user reaches the relay (127.0.0.1, or the relay's end of the delay line).
    relay_ip: IpAddr,
    /// The job's allocated port on the relay.
    port: u16,
    /// The job's sshd port (what `ssh -J ... -p` asks the jump for).
    sshd_port: u16,
    /// The network namespace the user runs in (`None`: the root namespace).
    netns: Option<String>,
}

/// Which path a measurement takes.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    Port,
    Jump,
}

impl Paths {
    fn command(&self, tool: &str) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, tool]);
                c
            }
            None => Command::new(tool),
        };
        c.arg("-F").arg(&self.cfg);
        c
    }

    /// `ssh`/`scp` reaching the job via `via`; `port_flag` is `-p` or `-P`; returns the command
    /// and the `user@host` to append.
    fn to_job(&self, tool: &str, port_flag: &str, via: Via) -> (Command, String) {
        let mut c = self.command(tool);
        match via {
            Via::Port => {
                c.args([port_flag, &self.port.to_string()]);
                (c, format!("root@{}", self.relay_ip))
            }
            Via::Jump => {
                c.args(["-J", "jumphost", port_flag, &self.sshd_port.to_string()]);
                (c, "root@bench-job".to_string())
            }
        }
    }

    /// Round trips of 64 bytes through an interactive session (`ssh -tt JOB`, the terminal in
    /// raw mode running `cat`, as a user typing): (p50, p99) in µs.
    fn session_rtt(&self, via: Via, rounds: usize) -> Result<(f64, f64)> {
        let (mut c, dest) = self.to_job("ssh", "-p", via);
        let mut child = c
            .args(["-tt", &dest, "stty raw -echo; echo READY; exec cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().context("ssh stdin")?;
        let mut stdout = child.stdout.take().context("ssh stdout")?;
        // The terminal is raw (no echo, no output processing) once READY arrives.
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"READY\n") && !seen.ends_with(b"READY\r\n") {
            stdout
                .read_exact(&mut byte)
                .context("the session's READY line")?;
            seen.push(byte[0]);
        }
        let line = [b'x'; 64];
        let mut back = [0u8; 64];
        let mut samples = Vec::with_capacity(rounds);
        for i in 0..rounds + rounds / 10 {
            let t = Instant::now();
            stdin.write_all(&line)?;
            stdin.flush()?;
            stdout.read_exact(&mut back).context("the session's echo")?;
            ensure!(back == line, "the session echoed something else");
            // A tenth warm up.
            if i >= rounds / 10 {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        drop(stdin);
        let _ = child.kill();
        let _ = child.wait();
        samples.sort_by(f64::total_cmp);
        Ok((pct(&samples, 0.5), pct(&samples, 0.99)))
    }

    /// `ssh JOB true`, `n` one after another: sessions per second.
    fn session_rate(&self, via: Via, n: usize) -> Result<f64> {
        let started = Instant::now();
        for _ in 0..n {
            let (mut c, dest) = self.to_job("ssh", "-p", via);
            let out = c.args([&dest, "true"]).stdin(Stdio::null()).output()?;
            ensure!(
                out.status.success(),
                "ssh true failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(n as f64 / started.elapsed().as_secs_f64())
    }

    /// One scp of `file` (`mib` MiB) to the job (`up`) or from it: MiB/s by the wall clock as
    /// the user sees it, and CPU seconds per GiB the whole host spent meanwhile (logins included
    /// in both).
    fn scp(&self, via: Via, file: &Path, mib: usize, up: bool) -> Result<(f64, f64)> {
        let (mut c, dest) = self.to_job("scp", "-P", via);
        let remote = format!("{dest}:{}", file.display());
        if up {
            c.arg(file).arg(format!("{dest}:/dev/null"));
        } else {
            c.arg(&remote).arg("/dev/null");
        }
        let (started, busy) = (Instant::now(), host_busy()?);
        let out = c.stdin(Stdio::null()).output()?;
        let (took, cpu) = (started.elapsed(), host_busy()? - busy);
        ensure!(
            out.status.success(),
            "scp failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let gib = mib as f64 / 1024.0;
        Ok((mib as f64 / took.as_secs_f64(), cpu / gib))
    }
}

/// CPU seconds the whole host has spent busy since boot (`/proc/stat`: user, nice, system, irq
/// and softirq of every core). Around one scp on a quiet host, what both SSH layers, the relay,
/// the agent, the job's sshd and the delay line cost together: unlike the MiB/s, it does not
/// depend on how the two cores were shared.
fn host_busy() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    ensure!(fields.len() >= 7, "/proc/stat's cpu line is short: {line}");
    // user, nice, system; then idle and iowait (skipped); irq, softirq.
    let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6];
    // SAFETY: sysconf only reads a constant of the running system.
    #[allow(unsafe_code)]
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(ticks > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(busy / ticks as f64)
}

/// One row: the port path's value and the jump's.
struct JumpRow {
    metric: String,
    unit: &'static str,
    port: f64,
    jump: f64,
}

/// Measures `f` on both paths `repeat` times, alternating which goes first: medians.
fn both<F: FnMut(Via) -> Result<f64>>(repeat: usize, mut f: F) -> Result<(f64, f64)> {
    let (mut port, mut jump) = (Vec::new(), Vec::new());
    for i in 0..repeat {
        let order = if i % 2 == 0 {
            [Via::Port, Via::Jump]
        } else {
            [Via::Jump, Via::Port]
        };
        for via in order {
            let v = f(via)?;
            match via {
                Via::Port => port.push(v),
                Via::Jump => jump.push(v),
            }
        }
    }
    Ok((median(port), median(jump)))
}

/// Every row for one setting of the user's leg (`label`, e.g. "loopback" or "user leg 20 ms").
fn rows_for(paths: &Paths, a: &JumpArgs, label: &str, rows: &mut Vec<JumpRow>) -> Result<()> {
    let mut push = |metric: &str, unit: &'static str, (port, jump): (f64, f64)| {
        eprintln!("  {label}, {metric}: port {port:.1}, jump {jump:.1} {unit}");
        rows.push(JumpRow {
            metric: format!("{label}, {metric}"),
            unit,
            port,
            jump,
        });
    };
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for via in [Via::Port, Via::Jump] {
        let (mut a50, mut a99) = (Vec::new(), Vec::new());
        for _ in 0..a.repeat {
            let (x, y) = paths.session_rtt(via, a.rounds)?;
            a50.push(x);
            a99.push(y);
        }
        p50.push(median(a50));
        p99.push(median(a99));
    }
    let unit = if paths.netns.is_some() { "ms" } else { "µs" };
    let scale = if paths.netns.is_some() { 1e-3 } else { 1.0 };
    push(
        "interactive RTT p50 (64 B, ssh -tt, raw cat)",
        unit,
        (p50[0] * scale, p50[1] * scale),
    );
    push(
        "interactive RTT p99 (64 B, ssh -tt, raw cat)",
        unit,
        (p99[0] * scale, p99[1] * scale),
    );
    push(
        "sessions/s (ssh ... true, one after another)",
        "sessions/s",
        both(a.repeat, |via| paths.session_rate(via, a.sessions))?,
    );
    let file = paths.cfg.with_file_name("payload.bin");
    for (up, dir) in [(true, "up"), (false, "down")] {
        let (mut port_cpu, mut jump_cpu) = (Vec::new(), Vec::new());
        let rate = both(a.repeat, |via| {
            let (rate, cpu) = paths.scp(via, &file, a.mib, up)?;
            match via {
                Via::Port => port_cpu.push(cpu),
                Via::Jump => jump_cpu.push(cpu),
            }
            Ok(rate)
        })?;
        push(&format!("scp {} MiB {dir}", a.mib), "MiB/s", rate);
        push(
            &format!("scp {dir}, host CPU per GiB (both SSH layers, relay, agent, sshd)"),
            "s/GiB",
            (median(port_cpu), median(jump_cpu)),
        );
    }
    Ok(())
}

/// Writes `mib` MiB of incompressible bytes to `path`.
fn payload(path: &Path, mib: usize) -> Result<()> {
    let mut f = std::fs::File::create(path)?;
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..mib {
        for b in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    Ok(())
}

/// The table: metric, unit, port path, jump, jump/port.
fn markdown(rows: &[JumpRow], notes: &[String]) -> String {
    let mut out = String::from(
        "| metric | unit | ssh -p PORT (port path) | ssh -J (jump) | jump/port |\n|---|---|---:|---:|---:|\n",
    );
    for r in rows {
        let ratio = if r.port != 0.0 { r.jump / r.port } else { 0.0 };
        out.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {ratio:.2}x |\n",
            r.metric, r.unit, r.port, r.jump
        ));
    }
    for n in notes {
        out.push_str(&format!("\n- {n}"));
    }
    out.push('\n');
    out
}

/// Runs `jumpgate-bench jump`.
pub fn run(a: &mut JumpArgs, bin: &Path) -> Result<()> {
    if a.smoke {
        a.repeat = 1;
        a.mib = a.mib.min(8);
        a.sessions = a.sessions.min(3);
        a.rounds = a.rounds.min(50);
    }
    if Command::new("ssh").arg("-V").output().is_err() {
        bail!("ssh not found: apt-get install openssh-client");
    }
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let key = d.join("user_key");
    keygen(&key)?;
    let sshd = Sshd::start(d, &key)?;
    let jump_port = free_port()?;
    let lo = 20_000 + (std::process::id() % 5_000) as u16;
    let relay = JumpgateRelay::start_with(
        bin,
        d,
        RelayFlags {
            range: (lo, lo + 3),
            admin: "off".into(),
            max_handshakes: Some(5000),
            proxy_bind: None,
            extra: vec!["--jump-listen".into(), format!("0.0.0.0:{jump_port}")],
        },
    )?;
    relay
        .proc
        .wait_log("jump listener for ssh -J on", Duration::from_secs(20))?;
    let status = d.join("status.json");
    let _agent = relay.agent(
        "bench-job",
        &[format!("ssh=127.0.0.1:{}", sshd.port)],
        &status,
        d,
    )?;
    let ports = wait_status(&status, Duration::from_secs(20))?;
    let port = ports
        .iter()
        .find(|(n, _)| n == "ssh")
        .map(|(_, p)| *p)
        .context("the agent's ssh port")?;
    payload(&d.join("payload.bin"), a.mib)?;

    let write_cfg = |relay_ip: IpAddr| -> Result<PathBuf> {
        let cfg = d.join("ssh_config");
        std::fs::write(
            &cfg,
            format!(
                "Host jumphost\n    HostName {relay_ip}\n    Port {jump_port}\n    User jumper\n\
                 Host *\n    IdentityFile {key}\n    IdentitiesOnly yes\n    BatchMode yes\n    \
                 StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n    \
                 ConnectTimeout 20\n",
                key = key.display()
            ),
        )?;
        Ok(cfg)
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let local = IpAddr::from([127, 0, 0, 1]);
    let paths = Paths {
        cfg: write_cfg(local)?,
        relay_ip: local,
        port,
        sshd_port: sshd.port,
        netns: None,
    };
    eprintln!("jump bench: loopback");
    rows_for(&paths, a, "loopback", &mut rows)?;
    let rates = std::iter::once(None).chain(a.rate_mbit.map(Some));
    let legs: Vec<(f64, Option<f64>)> = rates
        .flat_map(|rate| a.rtt_ms.iter().map(move |&rtt| (rtt, rate)))
        .collect();
    for (rtt, rate) in legs {
        if let Some(why) = crate::delay::unavailable() {
            bail!("the delay line cannot run here: {why}");
        }
        let line = DelayLine::start(DelayConfig {
            rtt: Duration::from_secs_f64(rtt / 1e3),
            rate_bps: rate.map(|mbit| mbit * 1e6),
            queue_bytes: None,
            mtu: 9000,
        })?;
        // The user is in the line's namespace; the relay's end of the line is its address.
        let relay_ip = IpAddr::from(line.relay_ip);
        let paths = Paths {
            cfg: write_cfg(relay_ip)?,
            relay_ip,
            port,
            sshd_port: sshd.port,
            netns: Some(line.netns.clone()),
        };
        let label = match rate {
            None => format!("user leg {rtt} ms"),
            Some(mbit) => format!("user leg {rtt} ms, {mbit} Mbit/s"),
        };
        eprintln!("jump bench: {label}: {}", line.describe());
        rows_for(&paths, a, &label, &mut rows)?;
        let (to_worker, to_relay) = line.stats();
        notes.push(format!(
            "{label}: delay line {} (to the user: {to_worker}; to the relay: {to_relay})",
            line.describe()
        ));
    }
    let md = markdown(&rows, &notes);
    println!("{md}");
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("results-jump.md"), &md)?;
    let json: Vec<_> = rows
        .iter()
        .map(|r| {
            serde_json::json!({"metric": r.metric, "unit": r.unit, "port": r.port, "jump": r.jump})
        })
        .collect();
    std::fs::write(
        a.out.join("results-jump.json"),
        serde_json::to_vec_pretty(&json)?,
    )?;
    eprintln!("results written to {}", a.out.display());
    Ok(())
}
