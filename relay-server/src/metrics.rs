//! The relay's event counters for `/metrics` (the scrape that adds the live gauges is the
//! admin API's, `admin/scrape.rs`).
//!
//! Gauges (agents, ports, active connections) are read from the live registry and lease table at
//! scrape time; only events are counted here. The text is written by the renderer both binaries
//! share ([`jumpgate_daemon::prometheus`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jumpgate_daemon::metric_labels;
use jumpgate_daemon::prometheus::{Exposition, Histogram, Kind, LabeledCounter};

metric_labels! {
    /// Why an agent handshake failed, as a metric label.
    pub enum HandshakeFailure {
        /// TLS failed (not TLS, bad client certificate, ...).
        Tls => "tls",
        /// Not a jumpgate agent, or a malformed frame.
        Protocol => "protocol",
        /// Wrong token.
        Unauthorized => "unauthorized",
        /// Credential may not claim the name.
        NameNotAllowed => "name_not_allowed",
        /// No common protocol version.
        Version => "version",
        /// Invalid hello.
        BadRequest => "bad_request",
        /// Took longer than the handshake timeout.
        Timeout => "timeout",
        /// No port could be allocated.
        Allocation => "allocation",
        /// The source address is banned.
        Banned => "banned",
        /// Too many handshakes in progress.
        Overload => "overload",
    }
}

metric_labels! {
    /// Why a user connection was refused, as a metric label.
    pub enum RefusedBy {
        /// Relay or agent allowlist.
        Allowlist => "allowlist",
        /// New-connection rate of the port.
        Rate => "rate",
        /// Concurrent connections of the port.
        PortLimit => "port_limit",
        /// Concurrent connections of one source address on the port.
        SourceLimit => "source_limit",
        /// Concurrent streams of the agent.
        AgentLimit => "agent_limit",
    }
}

/// Upper bounds (seconds) of the stream-open latency histogram.
const OPEN_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Upper bounds (seconds) of the placement latency histogram: a lease decision in memory takes
/// microseconds, a durable write or a database round trip milliseconds, and a relay swamped by
/// a reconnect storm seconds.
const PLACEMENT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Event counters.
#[derive(Debug)]
pub struct Metrics {
    handshake_failures: LabeledCounter<HandshakeFailure>,
    refused: LabeledCounter<RefusedBy>,
    /// Sessions established.
    pub sessions: AtomicU64,
    /// Sessions that renewed an existing lease (an agent coming back).
    pub reconnects: AtomicU64,
    /// Sessions ended by heartbeat timeout.
    pub heartbeat_timeouts: AtomicU64,
    stream_open: Histogram,
    placement: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            handshake_failures: LabeledCounter::default(),
            refused: LabeledCounter::default(),
            sessions: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            heartbeat_timeouts: AtomicU64::new(0),
            stream_open: Histogram::new(OPEN_BUCKETS),
            placement: Histogram::new(PLACEMENT_BUCKETS),
        }
    }
}

impl Metrics {
    /// Counts a failed agent handshake.
    pub fn handshake_failed(&self, why: HandshakeFailure) {
        self.handshake_failures.inc(why);
    }

    /// Counts a refused user connection.
    pub fn refused(&self, why: RefusedBy) {
        self.refused.inc(why);
    }

    /// Records how long opening a stream to an agent took.
    pub fn stream_opened(&self, took: Duration) {
        self.stream_open.observe(took);
    }

    /// Records how long a hello waited for its ports (the lease store's decision, binding the
    /// ports, and the write that makes the leases durable): the cost of a lease operation, which
    /// a fleet sizing its store needs to see.
    pub fn placed(&self, took: Duration) {
        self.placement.observe(took);
    }

    /// Appends the event counters.
    pub(crate) fn render(&self, e: &mut Exposition) {
        e.family(
            "jumpgate_handshake_failures_total",
            Kind::Counter,
            "Failed agent handshakes by reason.",
        )
        .labeled("reason", &self.handshake_failures);
        e.family(
            "jumpgate_refused_connections_total",
            Kind::Counter,
            "User connections refused by reason.",
        )
        .labeled("reason", &self.refused);
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
            e.single(name, Kind::Counter, help, v.load(Ordering::Relaxed));
        }
        e.family(
            "jumpgate_stream_open_seconds",
            Kind::Histogram,
            "Time to open a stream to an agent and reach its target.",
        )
        .histogram(&self.stream_open);
        e.family(
            "jumpgate_placement_seconds",
            Kind::Histogram,
            "Time an agent's hello waited for its ports: lease decision, binding and durable write.",
        )
        .histogram(&self.placement);
    }
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
        m.placed(Duration::from_micros(700));
        let mut e = Exposition::new();
        m.render(&mut e);
        let out = e.into_string();
        assert!(out.contains("jumpgate_handshake_failures_total{reason=\"unauthorized\"} 1"));
        assert!(out.contains("jumpgate_handshake_failures_total{reason=\"overload\"} 0"));
        assert!(out.contains("jumpgate_refused_connections_total{reason=\"allowlist\"} 1"));
        assert!(out.contains("jumpgate_refused_connections_total{reason=\"agent_limit\"} 0"));
        assert!(out.contains("jumpgate_stream_open_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(out.contains("jumpgate_stream_open_seconds_bucket{le=\"0.005\"} 1"));
        assert!(out.contains("jumpgate_stream_open_seconds_bucket{le=\"+Inf\"} 1"));
        assert!(out.contains("jumpgate_stream_open_seconds_sum 0.003\n"));
        assert!(out.contains("jumpgate_stream_open_seconds_count 1"));
        assert!(out.contains("jumpgate_placement_seconds_bucket{le=\"0.0005\"} 0"));
        assert!(out.contains("jumpgate_placement_seconds_bucket{le=\"0.001\"} 1"));
        assert!(out.contains("jumpgate_placement_seconds_count 1"));
    }
}
