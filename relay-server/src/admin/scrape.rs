//! The whole `/metrics` page of a running relay: the live gauges read at scrape time from the
//! registry and the lease store, then the event counters of [`crate::metrics::Metrics`].

use std::cmp::Reverse;
use std::sync::atomic::Ordering;

use jumpgate_daemon::prometheus::{Exposition, Kind};

use super::Operator;
use crate::agents::registry::ServiceStats;

/// A per-service metric family: name, kind, help, and how a service's sample is read.
type ServiceFamily = (&'static str, Kind, &'static str, fn(&ServiceStats) -> u64);

/// The whole `/metrics` text of a running relay.
pub(super) async fn scrape(shared: &Operator) -> String {
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
            // A host session's tunnels share its lanes: counted once, with the host.
            sessions
                .iter()
                .filter(|s| s.tunnel.is_none())
                .map(|s| s.lanes.count())
                .sum(),
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
    let per_service: [ServiceFamily; 2] = [
        (
            "jumpgate_user_connections_active",
            Kind::Gauge,
            "User connections open now.",
            |s| s.active.load(Ordering::Relaxed) as u64,
        ),
        (
            "jumpgate_user_connections_total",
            Kind::Counter,
            "User connections carried this session.",
            |s| s.total.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, value) in per_service {
        let mut f = e.family(name, kind, help);
        for (agent, svc) in services() {
            f.sample(
                &[("agent", agent), ("service", &*svc.name)],
                value(&svc.stats),
            );
        }
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
    credential_gauges(shared, &mut e).await;
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

/// How many credentials get series of their own in each per-credential family: signed tokens
/// (`signed:SUBJECT`) can mean one credential per job, and a series per credential would grow
/// without bound. The ones holding most are the ones near their caps; the rest are counted in
/// `jumpgate_credentials_held` only.
pub(super) const CREDENTIAL_SERIES: usize = 100;

/// Per credential (identity as the relay names it: `token:LABEL`, `cert:NAME`,
/// `signed:SUBJECT`, `shared-token`): what its caps count, so an operator sees who is near
/// theirs. Names and leases are fleet-wide (the store's view), sessions this relay's; each
/// family holds the [`CREDENTIAL_SERIES`] credentials holding most. A store that cannot be read
/// gives `jumpgate_credential_gauges_up 0` and no names or leases series, logged once per
/// streak of failed scrapes.
async fn credential_gauges(shared: &Operator, e: &mut Exposition) {
    let held = match shared.leases.holdings_by_identity().await {
        Ok(held) => {
            if shared
                .credential_gauges_failing
                .swap(false, Ordering::Relaxed)
            {
                tracing::info!("per-credential gauges: the lease store answers again");
            }
            Some(held)
        }
        Err(err) => {
            if !shared
                .credential_gauges_failing
                .swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    "per-credential gauges left out of /metrics (jumpgate_credential_gauges_up 0) until the lease store answers: {err}"
                );
            }
            None
        }
    };
    e.single(
        "jumpgate_credential_gauges_up",
        Kind::Gauge,
        "1 if the lease store answered for the per-credential names and leases gauges, 0 if they are missing from this scrape (the log says why).",
        u8::from(held.is_some()),
    );
    let held = held.unwrap_or_default();
    e.single(
        "jumpgate_credentials_held",
        Kind::Gauge,
        "Credentials holding an agent name, fleet-wide (the per-credential families show the 100 holding most).",
        held.len(),
    );
    let held = holding_most(held, |(_, names, leases)| (*leases, *names));
    credential_family(
        e,
        "jumpgate_credential_names",
        "Agent names a credential holds (with leases, or a live session: --no-port agents count), fleet-wide; capped by max_names.",
        held.iter().map(|(identity, names, _)| (identity, *names)),
    );
    credential_family(
        e,
        "jumpgate_credential_leases",
        "Leased ports a credential holds, fleet-wide; capped by max_leases.",
        held.iter().map(|(identity, _, leases)| (identity, *leases)),
    );
    let sessions = holding_most(shared.registry.sessions_by_identity(), |(_, n)| *n);
    credential_family(
        e,
        "jumpgate_credential_sessions",
        "Agent sessions a credential has on this relay (placed or being placed), for the 100 credentials with most; capped by max_sessions.",
        sessions.iter().map(|(identity, n)| (identity, *n)),
    );
}

/// The [`CREDENTIAL_SERIES`] rows holding most (by `most`; ties by identity), in identity
/// order. Rows start with the identity, so sorting them sorts by it.
fn holding_most<T: Ord, K: Ord>(mut rows: Vec<T>, most: impl Fn(&T) -> K) -> Vec<T> {
    rows.sort();
    // Stable: rows holding as much stay in identity order.
    rows.sort_by_key(|row| Reverse(most(row)));
    rows.truncate(CREDENTIAL_SERIES);
    rows.sort();
    rows
}

/// One per-credential gauge family: a `credential` label and a count per row.
fn credential_family<'a>(
    e: &mut Exposition,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (&'a String, usize)>,
) {
    let mut f = e.family(name, Kind::Gauge, help);
    for (identity, n) in rows {
        f.sample(&[("credential", identity.as_str())], n);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::RunArgs;
    use crate::webhook::{Event, QUEUE};
    use crate::{Relay, RelayConfig};

    /// A relay bound on loopback with `ports`, its state in `dir`, no admin endpoint, and the
    /// settings of `args`.
    async fn relay(dir: &tempfile::TempDir, ports: &str, args: RunArgs) -> Relay {
        let args = RunArgs {
            listen: Some("127.0.0.1:0".into()),
            public_host: Some("relay.example".into()),
            port_range: Some(ports.into()),
            state_dir: Some(dir.path().join("state")),
            admin: Some("off".into()),
            ..args
        };
        let config = RelayConfig::from_args(args).unwrap();
        Relay::bind(config, CancellationToken::new()).await.unwrap()
    }

    /// 101 credentials (one per job, as signed tokens give): the per-credential families
    /// carry the 100 holding most (the one with two leases kept, the last of the one-lease
    /// credentials by name left out), the count says 101, the gauges are up.
    #[tokio::test]
    async fn per_credential_series_are_bounded_to_the_credentials_holding_most() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay(&dir, "10000-10200", RunArgs::default()).await;
        let shared = &relay.operator;
        let ask = |service: &str| jumpgate_lease::ServiceAsk {
            service: service.into(),
            preferred: None,
            strict: false,
        };
        for job in 0..=CREDENTIAL_SERIES {
            let asks = if job == CREDENTIAL_SERIES {
                vec![ask("ssh"), ask("web")]
            } else {
                vec![ask("ssh")]
            };
            let identity = format!("signed:job-{job:03}");
            shared
                .leases
                .place(&format!("job-{job:03}"), &identity, None, &asks, |_| {
                    Some(())
                })
                .await
                .unwrap();
        }
        let text = scrape(shared).await;
        let series = |family: &str| {
            text.lines()
                .filter(|l| l.starts_with(&format!("{family}{{")))
                .count()
        };
        assert_eq!(
            series("jumpgate_credential_leases"),
            CREDENTIAL_SERIES,
            "{text}"
        );
        assert_eq!(
            series("jumpgate_credential_names"),
            CREDENTIAL_SERIES,
            "{text}"
        );
        assert!(text.contains("\njumpgate_credentials_held 101\n"), "{text}");
        assert!(
            text.contains("\njumpgate_credential_gauges_up 1\n"),
            "{text}"
        );
        assert!(
            text.contains("\njumpgate_credential_leases{credential=\"signed:job-100\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("\njumpgate_credential_leases{credential=\"signed:job-000\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("signed:job-099"), "{text}");
    }

    #[tokio::test]
    async fn scrape_exports_webhook_events_dropped_on_a_full_queue() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("webhook.secret");
        std::fs::write(&secret, "k").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let args = RunArgs {
            // Nothing listens there: the sender is stuck retrying its first event.
            webhook_url: Some("http://127.0.0.1:9/hook".into()),
            webhook_secret_file: Some(secret),
            ..RunArgs::default()
        };
        let relay = relay(&dir, "10000-10010", args).await;
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
}
