//! The agent's side of one relay: dial, handshake, serve the session, and redial after any loss.
//!
//! State changes are logged once each (connected, lost, a new kind of failure), not on every
//! retry. A relay that fails verification (certificate mismatch, an alert before it proved who
//! it is) is retried with a long backoff and an ERROR on every attempt: it may be an impostor,
//! but it may equally be a brief DNS spoof that must not become a permanent outage. A permanent
//! failure that the authenticated relay reports itself (bad token, name not allowed) stops this
//! relay's link instead of hammering the relay; links to other relays carry on.
//!
//! Whatever the relay sends that the agent logs or publishes (public host, router address,
//! refusal details, notes, service names) is escaped and cut first
//! ([`jumpgate_proto::sanitize`]), so a relay cannot forge log lines or flood the logs.
//!
//! The protocol itself (the hello, reading the answer, retry decisions, heartbeats, lanes, member
//! lists) is the sans-IO core in `jumpgate-session`, which the benchmark's simulated agents drive
//! too; this file is its driver: sockets, TLS, yamux, timers, logs and the status file. A host
//! agent's link to a relay older than host sessions runs one such link per tunnel instead
//! ([`fallback`]).
//!
//! The files, by job: this one keeps one link alive (redial, backoff, what each failure means);
//! `dial.rs` reaches the relay and exchanges hellos, `session.rs` runs an established session,
//! `lane.rs` one extra connection of it, and `fallback.rs` the per-tunnel links of a host agent.

mod dial;
pub mod fallback;
mod lane;
mod session;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use jumpgate_session::{Failure, Identity, Link, Retry};
use rand::Rng;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::fleet::members::MemberReports;
use crate::fleet::set::LinkTarget;
use crate::metrics::AgentStats;
use crate::service::ServiceSpec;
use crate::status::StatusBoard;
use crate::streams::Targets;
use dial::establish;
use session::{run_session, SessionEnd};

/// What the agent needs for every relay.
pub struct AgentShared {
    /// Settings.
    pub config: AgentConfig,
    /// TLS client configuration.
    pub connector: TlsConnector,
    /// Local targets by service name.
    pub targets: Targets,
    /// Published endpoints.
    pub status: Arc<StatusBoard>,
    /// Counters for the metrics endpoint.
    pub stats: Arc<AgentStats>,
    /// The fleet's member lists as each relay last sent them.
    pub members: Arc<MemberReports>,
    /// Links running now and not refused for good, for log wording.
    pub live_links: AtomicUsize,
    /// Host mode: the tunnels every session carries ([`crate::host`]).
    pub host: Option<Arc<crate::host::Table>>,
}

/// Keeps a session with the relay of link `id` until `shutdown` fires (Ok) or the relay turns
/// the agent away permanently (Err, after logging it and marking the relay stopped in the status
/// file).
pub async fn supervise(
    id: u64,
    server: LinkTarget,
    shared: Arc<AgentShared>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let mut identity = identity(&shared.config);
    let mut link = Link::new();
    loop {
        // The jump keys file is read before every session: an edit reaches the relay on the next
        // reconnect, and a broken file keeps the agent away rather than open to every key.
        let attempt = match crate::jump_keys::read(shared.config.jump_authorized_keys.as_deref()) {
            Ok(keys) => {
                identity.jump_keys = keys;
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = establish(&server, &shared, link.hello(&identity)) => r,
                }
            }
            Err(e) => Err(AgentError::transient(format!(
                "{e}; not connecting until it is fixed"
            ))),
        };
        let delay = match attempt {
            Ok((accepted, dialed)) => {
                if link.accepted(&accepted, &identity, Instant::now()) {
                    shared.status.reconnected(id);
                }
                let end =
                    run_session(id, &server, &shared, &identity, accepted, dialed, &shutdown).await;
                shared.status.disconnected(id);
                shared.members.lost();
                let (reason, reconnect_after) = match end {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Lost {
                        reason,
                        reconnect_after,
                    } => (reason, reconnect_after),
                };
                let delay =
                    link.session_ended(Instant::now(), reconnect_after, rand::thread_rng().gen());
                match reconnect_after {
                    Some(_) => {
                        tracing::info!(relay = %server, "relay went away ({reason}); reconnecting in {delay:?}")
                    }
                    None => {
                        tracing::warn!(relay = %server, "connection to relay lost: {reason}; reconnecting in {delay:.1?}")
                    }
                }
                delay
            }
            Err(e) => {
                let kind = if e.is_permanent() {
                    Failure::Permanent
                } else if e.is_suspicious() {
                    Failure::Suspicious
                } else {
                    Failure::Transient
                };
                let text = e.to_string();
                match link.failed(kind, &text, rand::thread_rng().gen()) {
                    Retry::GiveUp => {
                        let others = shared.live_links.load(Ordering::Relaxed) > 1;
                        if others {
                            tracing::error!(relay = %server, "giving up on this relay until the agent restarts: {text}; sessions to the other relays continue");
                        } else {
                            tracing::error!(relay = %server, "giving up on this relay: {text}");
                        }
                        shared.status.stopped(id, &text);
                        return Err(e);
                    }
                    Retry::Suspicious { delay } => {
                        // Every attempt, at ERROR: an operator must see an impostor or a changed
                        // certificate, and at these delays the lines are few.
                        tracing::error!(relay = %server, "{text}. The relay could not be authenticated: a wrong pin or CA, a relay with a new certificate, DNS spoofing or a device on the path all look like this. Not exiting; retrying in {delay:.1?} (long backoff, up to {:?})", jumpgate_session::backoff::SUSPICIOUS_CAP);
                        shared.status.failed(id, &text);
                        delay
                    }
                    Retry::After { delay, repeated } => {
                        shared.status.failed(id, &text);
                        if repeated {
                            tracing::debug!(relay = %server, "still cannot connect: {text}; next try in {delay:.1?}");
                        } else {
                            tracing::warn!(relay = %server, "cannot connect to relay: {text}; retrying with backoff (next in {delay:.1?})");
                        }
                        delay
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The agent as every hello describes it, from its settings: the one place the settings become
/// protocol (the hello itself is built by [`jumpgate_session::session_hello`]).
pub fn identity(config: &AgentConfig) -> Identity {
    Identity {
        name: config.name.clone(),
        token: config.token.clone(),
        software: format!("worker-agent {}", env!("CARGO_PKG_VERSION")),
        max_lanes: config.max_lanes,
        services: config.services.iter().map(ServiceSpec::request).collect(),
        jump_keys: Vec::new(),
        host: config.host.is_some(),
    }
}
