//! The packet pump: one reader and one writer thread per direction, moving packets between the
//! two TUN devices through a timestamped FIFO, with the bottleneck's rate and drop-tail queue
//! applied as each packet is read.

use std::fs::File;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::stats::DirStats;

/// Upper bound on bytes held per direction when no rate limit applies (memory guard only: at
/// 10 Gbit/s and 40 ms one way this is not reached).
const MAX_IN_FLIGHT: usize = 256 << 20;
/// Packets due within this much are written now rather than slept for (saves a wake-up per
/// packet; far below any RTT we emulate).
const EARLY_OK: Duration = Duration::from_micros(20);

/// Whether the forwarding threads already warned that they could not get precise scheduling.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Parameters the forwarding threads read per packet; atomics so they can change while running
/// (the delay check measures the bare forwarder first, then the configured path).
pub(super) struct Params {
    pub(super) one_way_ns: AtomicU64,
    /// Bit/s; 0 means unlimited.
    pub(super) rate_bps: AtomicU64,
    pub(super) queue_bytes: AtomicU64,
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

/// Reads packets from `src` and queues them with their due time.
pub(super) fn reader(
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
pub(super) fn writer(
    dst: &File,
    rx: &mpsc::Receiver<(Instant, Vec<u8>)>,
    st: &DirStats,
    stop: &AtomicBool,
) {
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
