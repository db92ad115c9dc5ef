//! A userspace WAN delay line, because this kernel has no `sch_netem`: two TUN devices, one in the
//! root namespace (the relay side) and one moved into a fresh network namespace (the worker
//! side). Threads copy IP packets between the two file descriptors; per direction every packet
//! waits in a timestamped FIFO for RTT/2, optionally behind a rate-limited bottleneck with a
//! drop-tail queue. TCP stays end to end between the two kernels, so it sees the real RTT, slow
//! start, window limits and losses.
//!
//! Everything is named after the process id (`jgr<pid>`, `jgw<pid>`, `jgb-w-<pid>`) so parallel
//! runs do not collide, and removed on drop (also on error paths, and on SIGINT/SIGTERM through
//! [`install_signal_cleanup`]); a namespace left behind by a killed run is removed by the next.

mod netns;
mod pump;
mod stats;

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

pub use netns::{install_signal_cleanup, unavailable};
use netns::{ip, open_tun, run, sweep_stale, used_v4, NsGuard, ACTIVE, NS_PREFIX};
use pump::{reader, writer, Params};
pub use stats::DirSnapshot;
use stats::DirStats;

/// What the emulated path looks like.
#[derive(Debug, Clone, Copy)]
pub struct DelayConfig {
    /// Round-trip time added (half per direction).
    pub rtt: Duration,
    /// Bottleneck rate per direction in bit/s (`None`: as fast as the forwarder goes).
    pub rate_bps: Option<f64>,
    /// Drop-tail queue in front of the bottleneck, bytes (`None`: one bandwidth-delay product,
    /// at least 32 packets of the MTU). Only used with a rate.
    pub queue_bytes: Option<usize>,
    /// MTU of both TUN devices: large, so the per-packet cost of the forwarder is not the limit.
    pub mtu: u32,
}

impl DelayConfig {
    /// Queue limit in bytes for `rate_bps`.
    fn queue_for(&self, rate_bps: f64) -> usize {
        self.queue_bytes.unwrap_or_else(|| {
            let bdp = (rate_bps * self.rtt.as_secs_f64() / 8.0) as usize;
            bdp.max(32 * self.mtu as usize)
        })
    }
}

/// A running delay line between the root namespace and a worker namespace.
pub struct DelayLine {
    /// The worker namespace.
    pub netns: String,
    /// Address of the root-namespace end (where relays listen for agents).
    pub relay_ip: Ipv4Addr,
    /// Address of the worker-namespace end (where the direct path connects to).
    pub worker_ip: Ipv4Addr,
    /// Configuration it was started with.
    pub config: DelayConfig,
    root_dev: String,
    ns_dev: String,
    params: Arc<Params>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    to_worker: Arc<DirStats>,
    to_relay: Arc<DirStats>,
    _ns_guard: NsGuard,
}

impl DelayLine {
    /// Creates the namespace and devices and starts forwarding.
    pub fn start(config: DelayConfig) -> Result<Self> {
        sweep_stale();
        let pid = std::process::id();
        let netns = format!("{NS_PREFIX}{pid}");
        // Interface names have at most 15 characters; pids at most 7 digits.
        let root_dev = format!("jgr{pid}");
        let ns_dev = format!("jgw{pid}");
        // A /30 in 10.203.0.0/16 chosen by pid, skipping any that is in use here.
        let used = used_v4();
        let (relay_ip, worker_ip) = (0..16_384u32)
            .map(|i| (pid + i) % 16_384)
            .map(|i| {
                let base = u32::from(Ipv4Addr::new(10, 203, 0, 0)) + i * 4;
                (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
            })
            .find(|(a, b)| !used.contains(a) && !used.contains(b))
            .context("no free /30 in 10.203.0.0/16")?;

        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        ip(&["netns", "add", &netns])?;
        let _ns_guard = NsGuard(Some(netns.clone()));
        if let Ok(mut a) = ACTIVE.lock() {
            a.push(netns.clone());
        }
        let root_file = Arc::new(open_tun(&root_dev)?);
        let ns_file = Arc::new(open_tun(&ns_dev)?);
        // Both devices vanish when their files close, so an error below leaves nothing behind
        // but the namespace, which `_ns_guard` removes.
        ip(&["link", "set", &ns_dev, "netns", &netns])?;
        let mtu = config.mtu.to_string();
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{root_dev}/disable_ipv6"),
            "1",
        );
        ip(&["addr", "add", &format!("{relay_ip}/30"), "dev", &root_dev])?;
        ip(&[
            "link",
            "set",
            &root_dev,
            "mtu",
            &mtu,
            "txqueuelen",
            "10000",
            "up",
        ])?;
        let sysctl = |kv: &str| run("ip", &["netns", "exec", &netns, "sysctl", "-qw", kv]);
        sysctl(&format!("net.ipv6.conf.{ns_dev}.disable_ipv6=1"))?;
        // A fresh namespace per run already starts without cached metrics; this keeps one run's
        // connections from setting the next one's initial ssthresh.
        sysctl("net.ipv4.tcp_no_metrics_save=1")?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{worker_ip}/30"),
            "dev",
            &ns_dev,
        ])?;
        ip(&[
            "-n",
            &netns,
            "link",
            "set",
            &ns_dev,
            "mtu",
            &mtu,
            "txqueuelen",
            "10000",
            "up",
        ])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &relay_ip.to_string(),
        ])?;

        let params = Arc::new(Params {
            one_way_ns: AtomicU64::new(0),
            rate_bps: AtomicU64::new(0),
            queue_bytes: AtomicU64::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let to_worker = Arc::new(DirStats::default());
        let to_relay = Arc::new(DirStats::default());
        let mut line = DelayLine {
            netns,
            relay_ip,
            worker_ip,
            config,
            root_dev,
            ns_dev,
            params,
            stop,
            threads: Vec::new(),
            to_worker,
            to_relay,
            _ns_guard,
        };
        line.set(config);
        line.forget_tcp_metrics();
        for (src, dst, st, name) in [
            (&root_file, &ns_file, &line.to_worker, "to-worker"),
            (&ns_file, &root_file, &line.to_relay, "to-relay"),
        ] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (src, p, s, stop) = (
                Arc::clone(src),
                Arc::clone(&line.params),
                Arc::clone(st),
                Arc::clone(&line.stop),
            );
            line.threads.push(
                std::thread::Builder::new()
                    .name(format!("delay-rd-{name}"))
                    .spawn(move || reader(&src, &tx, &p, &s, &stop))?,
            );
            let (dst, s, stop) = (Arc::clone(dst), Arc::clone(st), Arc::clone(&line.stop));
            line.threads.push(
                std::thread::Builder::new()
                    .name(format!("delay-wr-{name}"))
                    .spawn(move || writer(&dst, &rx, &s, &stop))?,
            );
        }
        Ok(line)
    }

    /// Changes delay, rate and queue while running.
    pub fn set(&mut self, c: DelayConfig) {
        self.config = c;
        self.params
            .one_way_ns
            .store(c.rtt.as_nanos() as u64 / 2, Ordering::Relaxed);
        let rate = c.rate_bps.unwrap_or(0.0);
        self.params.rate_bps.store(rate as u64, Ordering::Relaxed);
        self.params
            .queue_bytes
            .store(c.queue_for(rate.max(1.0)) as u64, Ordering::Relaxed);
    }

    /// Forgets what the root namespace's TCP learned about the worker address (initial ssthresh
    /// and RTT), so every measurement starts cold like the first one.
    pub fn forget_tcp_metrics(&self) {
        let _ = Command::new("ip")
            .args(["tcp_metrics", "delete", &self.worker_ip.to_string()])
            .output();
    }

    /// Counters (to the worker, to the relay).
    pub fn stats(&self) -> (DirSnapshot, DirSnapshot) {
        (self.to_worker.snapshot(), self.to_relay.snapshot())
    }

    /// Zeroes the counters (not the packets in flight), to count one phase on its own.
    pub fn reset_stats(&self) {
        for st in [&self.to_worker, &self.to_relay] {
            for c in [
                &st.packets,
                &st.bytes,
                &st.queue_drops,
                &st.overflow_drops,
                &st.write_errors,
                &st.late,
                &st.max_late_ns,
            ] {
                c.store(0, Ordering::Relaxed);
            }
        }
    }

    /// A short description, e.g. "20 ms RTT, 1000 Mbit/s, queue 2.4 MiB".
    pub fn describe(&self) -> String {
        let c = &self.config;
        let mut s = format!("{} ms RTT", c.rtt.as_secs_f64() * 1e3);
        if let Some(r) = c.rate_bps {
            let _ = std::fmt::Write::write_fmt(
                &mut s,
                format_args!(
                    ", {:.0} Mbit/s, drop-tail queue {:.2} MiB",
                    r / 1e6,
                    c.queue_for(r) as f64 / f64::from(1u32 << 20)
                ),
            );
        }
        let _ = std::fmt::Write::write_fmt(&mut s, format_args!(", MTU {}", c.mtu));
        s
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Deleting a device wakes a reader blocked on its file with an error; the writers end
        // when their reader drops the channel.
        let _ = Command::new("ip")
            .args(["-n", &self.netns, "link", "del", &self.ns_dev])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_dev])
            .output();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.forget_tcp_metrics();
        // `_ns_guard`, dropped after this, kills leftovers in the namespace and deletes it.
    }
}
