//! Where a user connection is admitted: one step that checks the relay's and the agent's
//! allowlists and the port's new-connection rate, and takes the connection's place in the port's
//! and the agent's concurrent caps. The [`Admitted`] it returns is moved into the connection's
//! task and gives both places back when the connection ends, so a burst can never exceed a cap.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use jumpgate_proto::Cidr;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::agents::registry::{ServiceEndpoint, ServiceStats};
use crate::audit::{Outcome, Record};
use crate::guard::SourceSlot;
use crate::metrics::RefusedBy;
use crate::net::rate_limited_warn;
use crate::policy::UserLimits;

use super::Users;

/// A user connection let in. Holds its place in the port's and the agent's caps until dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    _source: SourceSlot,
    _port: PortSlot,
    _agent: OwnedSemaphorePermit,
}

/// Why a user connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    /// The metric label.
    pub by: RefusedBy,
    /// One line for the log, the audit record and an HTTP CONNECT client.
    pub why: &'static str,
    /// The status an HTTP CONNECT client gets.
    pub http_status: &'static str,
}

/// One connection's place among a port's concurrent connections; counted in the port's `active`
/// gauge, which is the cap's only counter.
#[derive(Debug)]
struct PortSlot(Arc<ServiceStats>);

impl PortSlot {
    /// Takes a place if fewer than `max` are taken, atomically.
    fn take(stats: &Arc<ServiceStats>, max: usize) -> Option<Self> {
        stats
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| PortSlot(stats.clone()))
    }
}

impl Drop for PortSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The checks, in order, with nothing counted or logged: which connections get in.
pub(crate) fn decide(
    peer: SocketAddr,
    service: &ServiceEndpoint,
    agent_streams: &Arc<Semaphore>,
    limits: &UserLimits,
    now: Instant,
) -> Result<Admitted, Refused> {
    let refused = |by, why, http_status| Refused {
        by,
        why,
        http_status,
    };
    if !Cidr::allows(&limits.allow, peer.ip()) {
        return Err(refused(
            RefusedBy::Allowlist,
            "source address not in the relay's allowlist",
            "403 Forbidden",
        ));
    }
    if !Cidr::allows(&service.allow, peer.ip()) {
        return Err(refused(
            RefusedBy::Allowlist,
            "source address not in the agent's allowlist for this service",
            "403 Forbidden",
        ));
    }
    let rate = f64::from(limits.max_new_conns_per_sec);
    let fresh = service
        .bucket
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .try_take(rate, rate * 2.0, now);
    if !fresh {
        return Err(refused(
            RefusedBy::Rate,
            "new-connection rate limit of this port reached",
            "403 Forbidden",
        ));
    }
    let Some(source) = service
        .sources
        .try_take(peer.ip(), limits.max_conns_per_source)
    else {
        return Err(refused(
            RefusedBy::SourceLimit,
            "concurrent connection limit of this source address on this port reached",
            "429 Too Many Requests",
        ));
    };
    let Some(port) = PortSlot::take(&service.stats, limits.max_conns_per_port) else {
        return Err(refused(
            RefusedBy::PortLimit,
            "concurrent connection limit of this port reached",
            "403 Forbidden",
        ));
    };
    let Ok(agent) = agent_streams.clone().try_acquire_owned() else {
        return Err(refused(
            RefusedBy::AgentLimit,
            "agent already carries its maximum of concurrent connections",
            "503 Service Unavailable",
        ));
    };
    Ok(Admitted {
        _source: source,
        _port: port,
        _agent: agent,
    })
}

impl Users {
    /// Admits a user connection to `agent`'s `service`, or counts, logs (at a limited rate) and
    /// audits the refusal; the caller then closes the connection.
    pub(crate) fn admit(
        &self,
        peer: SocketAddr,
        agent: &str,
        agent_streams: &Arc<Semaphore>,
        service: &ServiceEndpoint,
    ) -> Result<Admitted, Refused> {
        let policy = self.policy.current();
        let refused = match decide(peer, service, agent_streams, &policy.users, Instant::now()) {
            Ok(admitted) => {
                service.stats.total.fetch_add(1, Ordering::Relaxed);
                return Ok(admitted);
            }
            Err(refused) => refused,
        };
        let why = refused.why;
        service.stats.refused.fetch_add(1, Ordering::Relaxed);
        self.metrics.refused(refused.by);
        rate_limited_warn(
            why,
            || tracing::warn!(agent = %agent, service = %service.name, port = service.port, %peer, "refused user connection: {why}"),
        );
        let outcome = match refused.by {
            RefusedBy::Allowlist => Outcome::RefusedAllowlist,
            _ => Outcome::RefusedLimit,
        };
        self.audit.record(Record {
            start: crate::audit::timestamp(SystemTime::now()),
            src: peer.to_string(),
            relay_port: service.port,
            agent: agent.to_string(),
            service: service.name.to_string(),
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            outcome,
            detail: Some(why.into()),
            user: None,
        });
        Err(refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::TokenBucket;

    fn service(allow: Vec<Cidr>) -> ServiceEndpoint {
        ServiceEndpoint {
            name: Arc::from("ssh"),
            port: 20000,
            target_port: 22,
            allow: Arc::from(allow),
            stats: Arc::default(),
            bucket: Arc::new(std::sync::Mutex::new(TokenBucket::new(
                1000.0,
                Instant::now(),
            ))),
            sources: Arc::default(),
        }
    }

    fn limits(max_conns_per_port: usize) -> UserLimits {
        UserLimits {
            allow: vec![],
            max_conns_per_port,
            max_new_conns_per_sec: 1000,
            max_conns_per_source: 1000,
        }
    }

    fn peer() -> SocketAddr {
        "192.0.2.7:5000".parse().unwrap()
    }

    #[test]
    fn a_burst_never_exceeds_the_port_cap_and_places_come_back() {
        let svc = service(vec![]);
        let agent = Arc::new(Semaphore::new(100));
        let now = Instant::now();
        let held: Vec<_> = (0..10)
            .map(|_| decide(peer(), &svc, &agent, &limits(4), now))
            .collect();
        assert_eq!(held.iter().filter(|r| r.is_ok()).count(), 4);
        let refused = held.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert_eq!(refused.by, RefusedBy::PortLimit);
        assert_eq!(svc.stats.active.load(Ordering::SeqCst), 4);
        assert_eq!(agent.available_permits(), 96);
        drop(held);
        assert_eq!(svc.stats.active.load(Ordering::SeqCst), 0);
        assert_eq!(agent.available_permits(), 100);
        assert!(decide(peer(), &svc, &agent, &limits(4), now).is_ok());
    }

    #[test]
    fn the_agent_cap_refuses_with_503_and_gives_back_the_port_place() {
        let svc = service(vec![]);
        let agent = Arc::new(Semaphore::new(1));
        let now = Instant::now();
        let first = decide(peer(), &svc, &agent, &limits(10), now).unwrap();
        let refused = decide(peer(), &svc, &agent, &limits(10), now).unwrap_err();
        assert_eq!(refused.by, RefusedBy::AgentLimit);
        assert_eq!(refused.http_status, "503 Service Unavailable");
        assert_eq!(svc.stats.active.load(Ordering::SeqCst), 1);
        drop(first);
        assert_eq!(svc.stats.active.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn one_source_cannot_take_every_place_of_a_port() {
        let svc = service(vec![]);
        let agent = Arc::new(Semaphore::new(100));
        let now = Instant::now();
        let mut one_source = limits(10);
        one_source.max_conns_per_source = 3;
        let held: Vec<_> = (0..5)
            .map(|_| decide(peer(), &svc, &agent, &one_source, now))
            .collect();
        assert_eq!(held.iter().filter(|r| r.is_ok()).count(), 3);
        let refused = held.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert_eq!(refused.by, RefusedBy::SourceLimit);
        // The refused ones took no place of the port's; another address still gets in.
        assert_eq!(svc.stats.active.load(Ordering::SeqCst), 3);
        let other: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        assert!(decide(other, &svc, &agent, &one_source, now).is_ok());
        drop(held);
        assert!(decide(peer(), &svc, &agent, &one_source, now).is_ok());
    }

    #[test]
    fn allowlists_refuse_before_any_place_is_taken() {
        let only_lan: Cidr = "10.0.0.0/8".parse().unwrap();
        let agent = Arc::new(Semaphore::new(1));
        let now = Instant::now();
        let svc = service(vec![only_lan]);
        let refused = decide(peer(), &svc, &agent, &limits(10), now).unwrap_err();
        assert_eq!(refused.by, RefusedBy::Allowlist);
        let mut relay_wide = limits(10);
        relay_wide.allow = vec![only_lan];
        let refused = decide(peer(), &service(vec![]), &agent, &relay_wide, now).unwrap_err();
        assert!(refused.why.contains("relay's allowlist"));
        assert_eq!(svc.stats.active.load(Ordering::SeqCst), 0);
        assert_eq!(agent.available_permits(), 1);
    }
}
