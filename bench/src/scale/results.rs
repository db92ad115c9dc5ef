//! What one agents run found, as the report and agents.json carry it: kept apart from the code
//! that measures it so the two reports (one relay here, two in [`crate::fleet`]) share one shape.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Store;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

/// One phase in which every agent (re)connects: the cold start, or the return after a restart.
#[derive(Debug, Serialize)]
pub struct Storm {
    /// Agents that got a port in this phase.
    pub allocated: usize,
    /// From the phase's start to the last agent's allocation (or the timeout), seconds.
    pub all_allocated_secs: f64,
    /// Writing preface + hello to reading the allocation, as the agents see it.
    pub hello: Option<Percentiles>,
    /// TCP connect to reading the allocation (TCP, TLS, hello).
    pub setup: Option<Percentiles>,
    /// The relay's own lease operation time (`jumpgate_placement_seconds`, interpolated within
    /// its buckets), when the relay exports it.
    pub placement: Option<Percentiles>,
    /// Relay CPU seconds (user + system) spent in the phase.
    pub relay_cpu_secs: f64,
    /// Attempts that failed (agents retry them with backoff), by reason.
    pub failures: BTreeMap<String, usize>,
}

/// After `kill -9` and restart.
#[derive(Debug, Serialize)]
pub struct Restart {
    /// From the kill to the new relay logging that it listens, seconds.
    pub relay_up_secs: f64,
    /// The agents' return.
    pub storm: Storm,
    /// Agents back on the port they had before the kill.
    pub same_port: usize,
    /// Relay RSS with every agent back, KiB.
    pub relay_rss_kib: u64,
}

/// One agent count's results.
#[derive(Debug, Serialize)]
pub struct Run {
    /// Simulated agents.
    pub agents: usize,
    /// 0: each agent its own session; N: agents are tunnels, N to a host session.
    pub host_tunnels: usize,
    /// The lease store.
    pub store: Store,
    /// Relay RSS before any agent connected, KiB.
    pub relay_rss_idle_kib: u64,
    /// Relay RSS with every agent connected, KiB.
    pub relay_rss_loaded_kib: u64,
    /// (loaded - idle) / agents, KiB.
    pub relay_kib_per_agent: f64,
    /// Relay file descriptors with every agent connected.
    pub relay_fds: usize,
    /// The simulator's own RSS with every agent connected, KiB.
    pub simulator_rss_kib: u64,
    /// The cold start.
    pub cold: Storm,
    /// The restart, unless skipped or the cold start did not complete.
    pub restart: Option<Restart>,
    /// 1-minute load average before and after the run (the machine is shared).
    pub load: (f64, f64),
    /// The relay's first distinct WARN/ERROR lines, for a run that did not complete.
    pub relay_warnings: Vec<String>,
    /// Every agent got its port, and (after a restart) the same one again.
    pub complete: bool,
}
