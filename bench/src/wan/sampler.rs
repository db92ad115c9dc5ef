//! The peak memory of a relay and its agent during a system's WAN rows: sampled on a thread,
//! because the peak comes and goes within a transfer and a reading after it would miss it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::proc::rss_kib;

/// Samples the largest VmRSS of a set of processes every 100 ms until dropped.
pub(super) struct RssSampler {
    stop: Arc<AtomicBool>,
    max: Arc<[AtomicU64; 2]>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    /// Starts sampling `pids` (relay, agent).
    pub(super) fn start(pids: [u32; 2]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let (s, m) = (Arc::clone(&stop), Arc::clone(&max));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (i, pid) in pids.iter().enumerate() {
                    m[i].fetch_max(rss_kib(*pid), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            max,
            thread: Some(thread),
        }
    }

    /// Max RSS seen per process, MiB.
    pub(super) fn finish(mut self) -> [f64; 2] {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        [0, 1].map(|i| self.max[i].load(Ordering::Relaxed) as f64 / 1024.0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
