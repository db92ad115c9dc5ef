//! The measurements: echo latency, connection rate, held connections, iperf3 throughput.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts a TCP echo server on loopback (on the given runtime) and returns its address.
pub fn echo_server(rt: &tokio::runtime::Runtime) -> Result<SocketAddr> {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
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
fn pct(sorted: &[f64], p: f64) -> f64 {
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

/// iperf3 client through `port` for `secs` with `streams` parallel streams: bits per second.
/// The server runs one test at a time and may still be finishing the previous one: retry then.
pub fn iperf(port: u16, secs: u64, streams: u32) -> Result<f64> {
    let mut attempt = 0;
    loop {
        match iperf_once(port, secs, streams) {
            Err(e) if attempt < 5 && e.to_string().contains("busy") => {
                attempt += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

fn iperf_once(port: u16, secs: u64, streams: u32) -> Result<f64> {
    let out = Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .output()
        .context("running iperf3")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
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
