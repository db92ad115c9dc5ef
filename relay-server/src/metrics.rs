//! The relay's `/metrics`: the event counters it keeps, and the scrape that adds the live gauges.
//!
//! Gauges (agents, ports, active connections) are read from the live registry and lease table at
//! scrape time; only events are counted here. The text is written by the renderer both binaries
//! share ([`jumpgate_config::prometheus`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jumpgate_config::metric_labels;
use jumpgate_config::prometheus::{Exposition, Histogram, Kind, LabeledCounter};

use crate::admin::Operator;

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
    fn render(&self, e: &mut Exposition) {
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

/// The whole `/metrics` text of a running relay.
pub(crate) async fn scrape(shared: &Operator) -> String {
    let mut e = Exposition::new();
    // A store that cannot be read leaves both gauges at 0 for this scrape; the log says why.
    let (in_use, free) = shared.leases.usage().await.unwrap_or_default();
    let sessions = shared.registry.all();
    for (name, help, v) in [
        (
            "jumpgate_agents_connected",
            "Agents connected now.",
            shared.registry.len(),
        ),
        (
            "jumpgate_agent_lanes",
            "TCP connections from agents carrying their sessions (one per agent, more while user connections overlap).",
            sessions.iter().map(|s| s.lanes.count()).sum(),
        ),
        (
            "jumpgate_ports_allocated",
            "Ports leased (connected or awaiting their agent).",
            in_use,
        ),
        (
            "jumpgate_ports_free",
            "Ports of the range free to allocate.",
            free,
        ),
    ] {
        e.single(name, Kind::Gauge, help, v);
    }
    let services = || {
        sessions
            .iter()
            .flat_map(|s| s.services.iter().map(move |e| (&*s.name, e)))
    };
    let mut f = e.family(
        "jumpgate_user_connections_active",
        Kind::Gauge,
        "User connections open now.",
    );
    for (agent, svc) in services() {
        let active = svc.stats.active.load(Ordering::Relaxed);
        f.sample(&[("agent", agent), ("service", &*svc.name)], active);
    }
    let mut f = e.family(
        "jumpgate_user_connections_total",
        Kind::Counter,
        "User connections carried this session.",
    );
    for (agent, svc) in services() {
        let total = svc.stats.total.load(Ordering::Relaxed);
        f.sample(&[("agent", agent), ("service", &*svc.name)], total);
    }
    let mut f = e.family(
        "jumpgate_bytes_total",
        Kind::Counter,
        "Bytes carried this session, up (from users) and down (to users).",
    );
    for (agent, svc) in services() {
        for (direction, v) in [
            ("up", &svc.stats.bytes.read),
            ("down", &svc.stats.bytes.written),
        ] {
            let labels = [
                ("agent", agent),
                ("service", &*svc.name),
                ("direction", direction),
            ];
            f.sample(&labels, v.load(Ordering::Relaxed));
        }
    }
    // Per credential (identity as the relay names it: `token:LABEL`, `cert:NAME`,
    // `signed:SUBJECT`, `shared-token`): what its caps count, so an operator sees who is near
    // theirs. Names and leases are fleet-wide (the store's view), sessions this relay's.
    let held = shared
        .leases
        .holdings_by_identity()
        .await
        .unwrap_or_default();
    let mut f = e.family(
        "jumpgate_credential_names",
        Kind::Gauge,
        "Agent names a credential holds (with leases, or a live session: --no-port agents count), fleet-wide; capped by max_names.",
    );
    for (identity, names, _) in &held {
        f.sample(&[("credential", identity.as_str())], *names);
    }
    let mut f = e.family(
        "jumpgate_credential_leases",
        Kind::Gauge,
        "Leased ports a credential holds, fleet-wide; capped by max_leases.",
    );
    for (identity, _, leases) in &held {
        f.sample(&[("credential", identity.as_str())], *leases);
    }
    let mut f = e.family(
        "jumpgate_credential_sessions",
        Kind::Gauge,
        "Agent sessions a credential has on this relay (placed or being placed); capped by max_sessions.",
    );
    for (identity, n) in shared.registry.sessions_by_identity() {
        f.sample(&[("credential", identity.as_str())], n);
    }
    shared.metrics.render(&mut e);
    e.single(
        "jumpgate_audit_dropped_total",
        Kind::Counter,
        "Audit records dropped because the writer fell behind.",
        shared.audit.dropped(),
    );
    e.single(
        "jumpgate_webhook_events_dropped_total",
        Kind::Counter,
        "Webhook events dropped because the delivery queue was full.",
        shared.webhooks.dropped(),
    );
    e.family("jumpgate_build_info", Kind::Gauge, "Version of this relay.")
        .sample(&[("version", env!("CARGO_PKG_VERSION"))], 1);
    e.into_string()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::RunArgs;
    use crate::webhook::{Event, QUEUE};
    use crate::{Relay, RelayConfig};

    #[tokio::test]
    async fn scrape_exports_webhook_events_dropped_on_a_full_queue() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("webhook.secret");
        std::fs::write(&secret, "k").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let args = RunArgs {
            listen: Some("127.0.0.1:0".into()),
            public_host: Some("relay.example".into()),
            port_range: Some("10000-10010".into()),
            state_dir: Some(dir.path().join("state")),
            admin: Some("off".into()),
            // Nothing listens there: the sender is stuck retrying its first event.
            webhook_url: Some("http://127.0.0.1:9/hook".into()),
            webhook_secret_file: Some(secret),
            ..RunArgs::default()
        };
        let relay = Relay::bind(
            RelayConfig::from_args(args).unwrap(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let shared = &relay.operator;
        assert!(scrape(shared)
            .await
            .contains("\njumpgate_webhook_events_dropped_total 0\n"));
        // No await in between: the sender takes nothing off the queue meanwhile.
        for port in 0..QUEUE + 7 {
            shared.webhooks.emit(Event::LeaseExpired {
                agent: "a".into(),
                service: "ssh".into(),
                port: port as u16,
            });
        }
        assert_eq!(shared.webhooks.dropped(), 7);
        let text = scrape(shared).await;
        assert!(
            text.contains(
                "# TYPE jumpgate_webhook_events_dropped_total counter\njumpgate_webhook_events_dropped_total 7\n"
            ),
            "{text}"
        );
    }

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
