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

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Prefix of the namespaces this module creates (followed by the pid).
const NS_PREFIX: &str = "jgb-w-";
/// Upper bound on bytes held per direction when no rate limit applies (memory guard only: at
/// 10 Gbit/s and 40 ms one way this is not reached).
const MAX_IN_FLIGHT: usize = 256 << 20;
/// Packets due within this much are written now rather than slept for (saves a wake-up per
/// packet; far below any RTT we emulate).
const EARLY_OK: Duration = Duration::from_micros(20);

/// Whether the forwarding threads already warned that they could not get precise scheduling.
static WARNED: AtomicBool = AtomicBool::new(false);
/// Namespaces alive in this process, for the signal handler.
static ACTIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

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

/// Parameters the forwarding threads read per packet; atomics so they can change while running
/// (the delay check measures the bare forwarder first, then the configured path).
struct Params {
    one_way_ns: AtomicU64,
    /// Bit/s; 0 means unlimited.
    rate_bps: AtomicU64,
    queue_bytes: AtomicU64,
}

/// Counters of one direction, to see whether the emulator itself was a limit.
#[derive(Default)]
pub struct DirStats {
    packets: AtomicU64,
    bytes: AtomicU64,
    queue_drops: AtomicU64,
    overflow_drops: AtomicU64,
    write_errors: AtomicU64,
    /// Packets written more than 200 µs after their due time.
    late: AtomicU64,
    max_late_ns: AtomicU64,
    in_flight: AtomicUsize,
}

/// A snapshot of [`DirStats`], printed after each run so the emulator is never a silent limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirSnapshot {
    /// Packets read from the source device.
    pub packets: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Dropped by the drop-tail queue (the rate limit's queue was full).
    pub queue_drops: u64,
    /// Dropped because the forwarder held too much (should stay 0).
    pub overflow_drops: u64,
    /// Failed writes into the destination device.
    pub write_errors: u64,
    /// Packets written more than 200 µs late.
    pub late: u64,
    /// Worst lateness, µs.
    pub max_late_us: f64,
}

impl DirStats {
    fn snapshot(&self) -> DirSnapshot {
        DirSnapshot {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            queue_drops: self.queue_drops.load(Ordering::Relaxed),
            overflow_drops: self.overflow_drops.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            late: self.late.load(Ordering::Relaxed),
            max_late_us: self.max_late_ns.load(Ordering::Relaxed) as f64 / 1000.0,
        }
    }
}

impl std::fmt::Display for DirSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} packets, {:.1} MiB, {} queue drops, {} overflow drops, {} write errors, {} late >200µs (max {:.0} µs)",
            self.packets,
            self.bytes as f64 / f64::from(1u32 << 20),
            self.queue_drops,
            self.overflow_drops,
            self.write_errors,
            self.late,
            self.max_late_us
        )
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

/// Runs `ip ARGS` and fails with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Why the delay line cannot run here, if it cannot (not root, no /dev/net/tun, no `ip`).
pub fn unavailable() -> Option<String> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if let Err(e) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        return Some(format!("cannot open /dev/net/tun: {e}"));
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Some(format!(
                "`ip netns list` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return Some(format!("iproute2 `ip` not found: {e}")),
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        });
    if uid.as_deref() != Some("0") {
        return Some("not root (network namespaces and TUN devices need CAP_NET_ADMIN)".into());
    }
    None
}

/// Opens a TUN device (IP packets without the packet-information header) named `name` in the
/// current network namespace. The device lives as long as the returned file.
#[allow(unsafe_code)]
fn open_tun(name: &str) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    // struct ifreq: the interface name (IFNAMSIZ bytes, NUL-terminated), then a union whose first
    // member here is `short ifr_flags`.
    let mut ifr = [0u8; std::mem::size_of::<libc::ifreq>()];
    let name_len = name.len();
    if name_len >= libc::IFNAMSIZ {
        bail!("interface name {name:?} is too long");
    }
    ifr[..name_len].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    ifr[libc::IFNAMSIZ..libc::IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `ifr` is a buffer of exactly
    // `size_of::<libc::ifreq>()` bytes that outlives the call (the kernel copies it in and out,
    // no alignment needed), and the descriptor is open for as long as `file` lives.
    let rc = unsafe {
        use std::os::fd::AsRawFd;
        libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr())
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("TUNSETIFF {name}"));
    }
    Ok(file)
}

/// Deletes the namespace (after killing whatever still runs in it) on drop.
struct NsGuard(Option<String>);

impl Drop for NsGuard {
    fn drop(&mut self) {
        if let Some(ns) = self.0.take() {
            remove_netns(&ns);
            if let Ok(mut a) = ACTIVE.lock() {
                a.retain(|n| *n != ns);
            }
        }
    }
}

/// SIGKILLs every process in `ns` and deletes it (best effort; used on every exit path).
fn remove_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !pids.is_empty() {
            let _ = Command::new("kill").arg("-9").args(&pids).output();
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Removes namespaces left by runs that were killed before they could clean up (their pid is
/// gone or is no longer this benchmark).
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let alive = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().starts_with("jumpgate-bench"))
            .unwrap_or(false);
        if !alive {
            eprintln!("removing stale namespace {name}");
            remove_netns(&name);
        }
    }
}

/// Root-namespace IPv4 addresses, to pick a /30 nobody uses.
fn used_v4() -> Vec<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet")?;
            w.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// This thread's kernel id.
fn thread_id() -> Option<String> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Makes this forwarding thread precise on a busy machine (best effort): timer slack 1 µs, so
/// sub-millisecond sleeps wake on time (the default 50 µs is 10% of half a 1 ms RTT), and
/// SCHED_FIFO priority 1, so a compile or the systems under test do not delay a packet by a
/// scheduler tick. The threads block in read or sleep between packets, and the kernel's RT
/// throttling still caps them, so they cannot starve the machine.
fn precise_thread(warned: &AtomicBool) {
    let Some(tid) = thread_id() else { return };
    let _ = std::fs::write(format!("/proc/{tid}/timerslack_ns"), "1");
    let ok = Command::new("chrt")
        .args(["-f", "-p", "1", &tid])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok && !warned.swap(true, Ordering::Relaxed) {
        eprintln!("delay line: cannot make the forwarding threads SCHED_FIFO (chrt); timing may be off on a busy machine");
    }
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

/// Reads packets from `src` and queues them with their due time.
fn reader(
    src: &File,
    tx: &mpsc::Sender<(Instant, Vec<u8>)>,
    p: &Params,
    st: &DirStats,
    stop: &AtomicBool,
) {
    precise_thread(&WARNED);
    let mut buf = vec![0u8; 65_536];
    let mut link_free = Instant::now();
    let mut src = src;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        st.packets.fetch_add(1, Ordering::Relaxed);
        st.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let rate = p.rate_bps.load(Ordering::Relaxed) as f64;
        let leaves = if rate > 0.0 {
            // Serialization at the bottleneck: the packet starts when the link is free and its
            // last bit leaves size/rate later; whatever waits for the link is the queue.
            let start = link_free.max(now);
            let backlog = (start - now).as_secs_f64() * rate / 8.0;
            if backlog + n as f64 > p.queue_bytes.load(Ordering::Relaxed) as f64 {
                st.queue_drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            link_free = start + Duration::from_secs_f64(n as f64 * 8.0 / rate);
            link_free
        } else {
            now
        };
        if st.in_flight.load(Ordering::Relaxed) + n > MAX_IN_FLIGHT {
            st.overflow_drops.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        st.in_flight.fetch_add(n, Ordering::Relaxed);
        let due = leaves + Duration::from_nanos(p.one_way_ns.load(Ordering::Relaxed));
        if tx.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
}

/// Writes queued packets into `dst` when they are due.
fn writer(dst: &File, rx: &mpsc::Receiver<(Instant, Vec<u8>)>, st: &DirStats, stop: &AtomicBool) {
    precise_thread(&WARNED);
    let mut dst = dst;
    let mut failures = 0u32;
    while let Ok((due, pkt)) = rx.recv() {
        let now = Instant::now();
        if due > now + EARLY_OK {
            std::thread::sleep(due - now);
        }
        let late = Instant::now().saturating_duration_since(due);
        if late > Duration::from_micros(200) {
            st.late.fetch_add(1, Ordering::Relaxed);
        }
        st.max_late_ns
            .fetch_max(late.as_nanos() as u64, Ordering::Relaxed);
        st.in_flight.fetch_sub(pkt.len(), Ordering::Relaxed);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match dst.write(&pkt) {
            // A TUN write takes the whole packet or fails.
            Ok(n) if n == pkt.len() => failures = 0,
            Ok(_) | Err(_) => {
                st.write_errors.fetch_add(1, Ordering::Relaxed);
                failures += 1;
                if failures > 1000 {
                    break;
                }
            }
        }
    }
}

/// On SIGINT or SIGTERM, kills the benchmark's child processes, removes the namespaces of live
/// delay lines and exits (the TUN devices go with the process), so an interrupted run leaves
/// nothing behind.
pub fn install_signal_cleanup(rt: &tokio::runtime::Runtime) {
    rt.spawn(async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        crate::proc::kill_all();
        let names: Vec<String> = ACTIVE.lock().map(|a| a.clone()).unwrap_or_default();
        for ns in names {
            eprintln!("interrupted: removing namespace {ns}");
            remove_netns(&ns);
        }
        std::process::exit(130);
    });
}
