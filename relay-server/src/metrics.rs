//! Counters the relay keeps for `/metrics`, and their Prometheus text rendering.
//!
//! Gauges (agents, ports, active connections) are read from the live registry and lease table at
//! scrape time; only events are counted here.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why an agent handshake failed, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// TLS failed (not TLS, bad client certificate, ...).
    Tls,
    /// Not a jumpgate agent, or a malformed frame.
    Protocol,
    /// Wrong token.
    Unauthorized,
    /// Credential may not claim the name.
    NameNotAllowed,
    /// No common protocol version.
    Version,
    /// Invalid hello.
    BadRequest,
    /// Took longer than the handshake timeout.
    Timeout,
    /// No port could be allocated.
    Allocation,
    /// The source address is banned.
    Banned,
    /// Too many handshakes in progress.
    Overload,
}

const HANDSHAKE_LABELS: [(HandshakeFailure, &str); 10] = [
    (HandshakeFailure::Tls, "tls"),
    (HandshakeFailure::Protocol, "protocol"),
    (HandshakeFailure::Unauthorized, "unauthorized"),
    (HandshakeFailure::NameNotAllowed, "name_not_allowed"),
    (HandshakeFailure::Version, "version"),
    (HandshakeFailure::BadRequest, "bad_request"),
    (HandshakeFailure::Timeout, "timeout"),
    (HandshakeFailure::Allocation, "allocation"),
    (HandshakeFailure::Banned, "banned"),
    (HandshakeFailure::Overload, "overload"),
];

/// Why a user connection was refused, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedBy {
    /// Relay or agent allowlist.
    Allowlist,
    /// New-connection rate of the port.
    Rate,
    /// Concurrent connections of the port.
    PortLimit,
    /// Concurrent streams of the agent.
    AgentLimit,
}

const REFUSED_LABELS: [(RefusedBy, &str); 4] = [
    (RefusedBy::Allowlist, "allowlist"),
    (RefusedBy::Rate, "rate"),
    (RefusedBy::PortLimit, "port_limit"),
    (RefusedBy::AgentLimit, "agent_limit"),
];

/// Upper bounds (seconds) of the stream-open latency histogram.
const OPEN_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Event counters.
#[derive(Debug, Default)]
pub struct Metrics {
    handshake_failures: [AtomicU64; 10],
    refused: [AtomicU64; 4],
    /// Sessions established.
    pub sessions: AtomicU64,
    /// Sessions that renewed an existing lease (an agent coming back).
    pub reconnects: AtomicU64,
    /// Sessions ended by heartbeat timeout.
    pub heartbeat_timeouts: AtomicU64,
    open_buckets: [AtomicU64; 12],
    open_count: AtomicU64,
    open_sum_micros: AtomicU64,
}

fn index_of<T: PartialEq + Copy, const N: usize>(labels: &[(T, &str); N], key: T) -> usize {
    labels.iter().position(|(k, _)| *k == key).unwrap_or(0)
}

impl Metrics {
    /// Counts a failed agent handshake.
    pub fn handshake_failed(&self, why: HandshakeFailure) {
        self.handshake_failures[index_of(&HANDSHAKE_LABELS, why)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused user connection.
    pub fn refused(&self, why: RefusedBy) {
        self.refused[index_of(&REFUSED_LABELS, why)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long opening a stream to an agent took.
    pub fn stream_opened(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (i, bound) in OPEN_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.open_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.open_count.fetch_add(1, Ordering::Relaxed);
        self.open_sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Appends the counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        family(
            out,
            "jumpgate_handshake_failures_total",
            "counter",
            "Failed agent handshakes by reason.",
        );
        for (i, (_, label)) in HANDSHAKE_LABELS.iter().enumerate() {
            let _ = writeln!(
                out,
                "jumpgate_handshake_failures_total{{reason=\"{label}\"}} {}",
                get(&self.handshake_failures[i])
            );
        }
        family(
            out,
            "jumpgate_refused_connections_total",
            "counter",
            "User connections refused by reason.",
        );
        for (i, (_, label)) in REFUSED_LABELS.iter().enumerate() {
            let _ = writeln!(
                out,
                "jumpgate_refused_connections_total{{reason=\"{label}\"}} {}",
                get(&self.refused[i])
            );
        }
        for (name, help, v) in [
            (
                "jumpgate_sessions_total",
                "Agent sessions established.",
                &self.sessions,
            ),
            (
                "jumpgate_reconnects_total",
                "Agent sessions that renewed an existing lease.",
                &self.reconnects,
            ),
            (
                "jumpgate_heartbeat_timeouts_total",
                "Agent sessions ended by heartbeat timeout.",
                &self.heartbeat_timeouts,
            ),
        ] {
            family(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", get(v));
        }
        family(
            out,
            "jumpgate_stream_open_seconds",
            "histogram",
            "Time to open a stream to an agent and reach its target.",
        );
        for (i, bound) in OPEN_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "jumpgate_stream_open_seconds_bucket{{le=\"{bound}\"}} {}",
                get(&self.open_buckets[i])
            );
        }
        let count = get(&self.open_count);
        let _ = writeln!(
            out,
            "jumpgate_stream_open_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "jumpgate_stream_open_seconds_sum {}",
            get(&self.open_sum_micros) as f64 / 1e6
        );
        let _ = writeln!(out, "jumpgate_stream_open_seconds_count {count}");
    }
}

/// Writes a metric family's HELP and TYPE lines.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.handshake_failed(HandshakeFailure::Unauthorized);
        m.refused(RefusedBy::Allowlist);
        m.stream_opened(Duration::from_millis(3));
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("jumpgate_handshake_failures_total{reason=\"unauthorized\"} 1"));
        assert!(out.contains("jumpgate_refused_connections_total{reason=\"allowlist\"} 1"));
        assert!(out.contains("jumpgate_stream_open_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(out.contains("jumpgate_stream_open_seconds_bucket{le=\"0.005\"} 1"));
        assert!(out.contains("jumpgate_stream_open_seconds_count 1"));
    }
}
