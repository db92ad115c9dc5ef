//! The delay line's counters per direction: read after every run so that the emulator is never
//! a silent limit on what it measures.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Counters of one direction, to see whether the emulator itself was a limit.
#[derive(Default)]
pub struct DirStats {
    pub(super) packets: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) queue_drops: AtomicU64,
    pub(super) overflow_drops: AtomicU64,
    pub(super) write_errors: AtomicU64,
    /// Packets written more than 200 µs after their due time.
    pub(super) late: AtomicU64,
    pub(super) max_late_ns: AtomicU64,
    pub(super) in_flight: AtomicUsize,
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
    pub(super) fn snapshot(&self) -> DirSnapshot {
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
