//! The measurements: echo latency, connection rate, held connections, iperf3 throughput.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts a TCP echo server on loopback (on the given runtime) and returns its address.
pub fn echo_server(rt: &tokio::runtime::Runtime) -> Result<SocketAddr> {
    echo_server_on(rt, SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Starts a TCP echo server on `bind` (on the given runtime) and returns its address; the WAN
/// rows run it in the worker namespace through the hidden `echo-server` subcommand.
pub fn echo_server_on(rt: &tokio::runtime::Runtime, bind: SocketAddr) -> Result<SocketAddr> {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(bind))
        .with_context(|| format!("echo server cannot bind {bind}"))?;
    let addr = listener.local_addr()?;
    rt.spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Percentile of sorted microsecond samples.
pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Round trips of 64 bytes on one connection: (p50, p99) in microseconds.
pub fn latency(addr: SocketAddr, rounds: usize) -> Result<(f64, f64)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds + rounds / 10 {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if i >= rounds / 10 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok((pct(&samples, 0.5), pct(&samples, 0.99)))
}

/// Round trips of 64 bytes on one connection for about `dur` (at least `min_rounds`, after a few
/// unmeasured ones): (p50, p99, rounds) in microseconds. On long paths a fixed count would take
/// minutes, and under load the window of the competing transfer is what matters.
pub fn latency_for(
    s: &mut TcpStream,
    dur: Duration,
    min_rounds: usize,
) -> Result<(f64, f64, usize)> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    for _ in 0..3 {
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("echo")?;
    }
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < dur || samples.len() < min_rounds {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("echo")?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    Ok((pct(&samples, 0.5), pct(&samples, 0.99), samples.len()))
}

/// Sequential connect + 1-byte echo + close: (per second, p50 µs, p99 µs).
pub fn connect_rate(addr: SocketAddr, count: usize) -> Result<(f64, f64, f64)> {
    let mut samples = Vec::with_capacity(count);
    let started = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).context("echo through the tunnel")?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    samples.sort_by(f64::total_cmp);
    Ok((rate, pct(&samples, 0.5), pct(&samples, 0.99)))
}

/// New connections opened while `transfer` runs: from connect to the first echoed byte, in
/// microseconds, `count` of them (sorted) in bursts of `burst` at once, so a burst finds every
/// lane busy as a user's `ssh` login during a download would. The transfer gets a second to
/// ramp up first and must outlast the samples.
pub fn first_byte_under_load(
    addr: SocketAddr,
    transfer: IperfRun,
    count: usize,
    burst: usize,
) -> Result<Vec<f64>> {
    // The server runs one test at a time and may still be finishing the previous one.
    let mut attempt = 0;
    loop {
        match first_bytes_once(addr, transfer, count, burst) {
            Err(e) if attempt < 5 => {
                eprintln!("first bytes under load, attempt {attempt}: {e:#}; again");
                attempt += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

fn first_bytes_once(
    addr: SocketAddr,
    transfer: IperfRun,
    count: usize,
    burst: usize,
) -> Result<Vec<f64>> {
    let child = iperf_spawn(transfer)?;
    std::thread::sleep(Duration::from_secs(1));
    let mut samples = Vec::with_capacity(count);
    let sampled = (|| -> Result<()> {
        while samples.len() < count {
            let n = burst.clamp(1, count - samples.len());
            let opened: Vec<_> = (0..n)
                .map(|_| std::thread::spawn(move || first_byte(addr)))
                .collect();
            for o in opened {
                let took = o
                    .join()
                    .map_err(|_| anyhow::anyhow!("a first-byte probe panicked"))??;
                samples.push(took);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })();
    let transfer = iperf_wait(child);
    sampled?;
    transfer.context("the transfer under the new connections")?;
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

/// Connect, send one byte, read its echo: microseconds.
fn first_byte(addr: SocketAddr) -> Result<f64> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .context("first byte through the tunnel")?;
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

/// Opens `n` connections that each echo 16 bytes, and keeps them open; returns them so the caller
/// can measure memory while they are held.
pub fn hold(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<tokio::net::TcpStream>> {
    rt.block_on(async {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(tokio::net::TcpStream::connect(addr).await?);
        }
        let mut tasks = Vec::with_capacity(n);
        for mut c in conns {
            tasks.push(tokio::spawn(async move {
                c.write_all(&[5u8; 16]).await?;
                let mut b = [0u8; 16];
                tokio::time::timeout(Duration::from_secs(30), c.read_exact(&mut b))
                    .await
                    .map_err(|_| std::io::Error::other("echo timed out"))??;
                Ok::<_, std::io::Error>(c)
            }));
        }
        let mut held = Vec::with_capacity(n);
        for t in tasks {
            held.push(t.await??);
        }
        Ok(held)
    })
}

/// One iperf3 client run.
#[derive(Clone, Copy, Debug)]
pub struct IperfRun {
    /// Server (through a system).
    pub addr: SocketAddr,
    /// Seconds.
    pub secs: u64,
    /// Parallel streams (`-P`).
    pub streams: u32,
    /// Server sends (`-R`): the download direction, worker to user.
    pub reverse: bool,
}

impl IperfRun {
    fn command(&self) -> Command {
        let mut c = Command::new("iperf3");
        c.args([
            "-c",
            &self.addr.ip().to_string(),
            "-p",
            &self.addr.port().to_string(),
            "-t",
            &self.secs.to_string(),
            "-P",
            &self.streams.to_string(),
            "-J",
        ]);
        if self.reverse {
            c.arg("-R");
        }
        c
    }
}

/// iperf3 client to `addr` for `secs` with `streams` parallel streams (upload): bits per second.
pub fn iperf(addr: SocketAddr, secs: u64, streams: u32) -> Result<f64> {
    iperf_run(IperfRun {
        addr,
        secs,
        streams,
        reverse: false,
    })
}

/// Runs `run`: received bits per second.
pub fn iperf_run(run: IperfRun) -> Result<f64> {
    iperf_retrying(|| iperf_result(&run.command().output().context("running iperf3")?.stdout))
}

/// Runs `attempt`, again (up to five more times, a second apart) while iperf3 says its server is
/// busy or not listening: the server runs one test at a time and may still be finishing the
/// previous one (through a proxy its end can trail the client's by the proxy's queue), or on a
/// loaded host not be listening yet. Measurements that run a transfer in the background with
/// [`iperf_spawn`] wrap the whole measurement, so a refused transfer is measured again, not
/// reported as missing.
pub fn iperf_retrying<T>(mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let mut tries = 0;
    loop {
        match attempt() {
            Err(e)
                if tries < 5
                    && ["busy", "unable to connect"]
                        .iter()
                        .any(|m| e.to_string().contains(m)) =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Starts `run` in the background (for a measurement during a transfer); finish it with
/// [`iperf_wait`].
pub fn iperf_spawn(run: IperfRun) -> Result<Child> {
    run.command()
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3")
}

/// Waits for a background iperf3: received bits per second.
pub fn iperf_wait(child: Child) -> Result<f64> {
    let out = child.wait_with_output().context("waiting for iperf3")?;
    iperf_result(&out.stdout)
}

/// Received bits per second from iperf3's JSON output.
pub fn iperf_result(stdout: &[u8]) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_slice(stdout).context("iperf3 JSON")?;
    if let Some(err) = v["error"].as_str() {
        bail!("iperf3: {err}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no throughput")
}

/// Waits until an echo through `addr` works.
pub fn wait_echo(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = (|| -> Result<()> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"?")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            Ok(())
        })();
        if ok.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no echo through {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
