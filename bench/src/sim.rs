//! Simulated agents: many real agent sessions from one process.
//!
//! Each simulated agent runs the agent's own session core (`jumpgate-session`, which
//! `worker-agent/src/link/` drives too): TCP, TLS 1.3 verified against the relay's pin, the
//! preface and the core's hello asking for one `ssh` service (with the port it had before, once
//! it had one), yamux, the control stream driven by the core (the opening ping, a ping every
//! heartbeat interval, the heartbeat timeout, going-away), and a redial after any loss with the
//! core's retry decisions and jittered exponential backoff ([`jumpgate_session::Link`]). The
//! relay cannot tell these sessions from real agents; one 2-core machine can hold 10,000 of
//! them, where 10,000 agent processes would not fit.
//!
//! What differs, on purpose: no status file, no metrics endpoint, no local targets (a stream the
//! relay opens for a user is answered by an echo, so a benchmark can tell a working tunnel from
//! a broken one), and a bound on how many handshakes run at once, so the simulator's own CPU
//! does not decide the result. Given several relays, each agent keeps a session with each, as
//! `worker-agent --server A --server B` does.
//!
//! With [`SimConfig::tunnels_per_host`] set, the same agents are played by host agents instead
//! (`worker-agent --host-mode`): each simulated host keeps one host session per relay and
//! registers that many of the agents as tunnels over it, through the same session core
//! (`Session::new_host`, `add_tunnel`). Every tunnel is reported as its agent would be, so a
//! scale run measures tunnels exactly as it measures agents.

mod dial;
mod session;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jumpgate_proto::Secret;
use jumpgate_session::{Identity, Link, Retry, Service};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use dial::{establish, AttemptError};
use session::{run_session, HostTunnels, SessionEnd};

/// Time allowed for TCP connect, TLS and the hello exchange, each (as in the agent).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lanes a simulated agent offers: none besides its first connection, as it opens none. (It
/// used to offer the agent's default of 8: the relay then asked for lanes that never came, and
/// a user connection arriving while another was carried waited 1.2-1.5 s for one, a wait no
/// real agent causes.)
const MAX_LANES: u16 = 1;

/// What every simulated agent shares.
pub struct SimConfig {
    /// The relays' agent ports: each agent keeps a session with every one.
    pub relays: Vec<SocketAddr>,
    /// TLS client configuration trusting the relay's pin.
    pub connector: TlsConnector,
    /// The server name sent in TLS (the host part of `--server`).
    pub server_name: String,
    /// The relay's shared token.
    pub token: Secret,
    /// Local addresses the agents' connections come from, agent `i` from `sources[i % len]`:
    /// the relay allows 128 handshakes in progress per source address.
    pub sources: Vec<IpAddr>,
    /// Handshakes (connect, TLS, hello) in progress at once, over all agents.
    pub in_flight: Arc<Semaphore>,
    /// 0: every agent is a session of its own. N: agents are tunnels, N to a host session.
    pub tunnels_per_host: usize,
}

/// What happened to a simulated agent, in the order it happened.
#[derive(Debug)]
pub enum Event {
    /// The relay accepted a hello and allocated a port.
    Allocated {
        /// Agent index (its name is [`agent_name`]).
        agent: usize,
        /// Which relay (index into [`SimConfig::relays`]).
        relay: usize,
        /// The port allocated to its `ssh` service.
        port: u16,
        /// When the allocation arrived.
        at: Instant,
        /// From writing the preface and hello to reading the relay's answer (a tunnel: from
        /// its Register to the answer).
        hello: Duration,
        /// From the TCP connect to reading the relay's answer (TCP, TLS and hello).
        setup: Duration,
    },
    /// An attempt failed (the agent retries with backoff unless `permanent`).
    Failed {
        /// What went wrong.
        reason: String,
        /// The agent gave up, as `worker-agent` does on a refusal retrying cannot fix.
        permanent: bool,
    },
}

/// The name of simulated host `h`: `simhost-00001` for 0.
fn host_name(h: usize) -> String {
    format!("simhost-{:05}", h + 1)
}

/// The name of simulated agent `i`: `sim-00001` for 0.
pub fn agent_name(i: usize) -> String {
    format!("sim-{:05}", i + 1)
}

/// Starts `count` simulated agents on `tasks` (inside a runtime), each with a session to every
/// relay; they run until `stop` fires and report on the returned channel, which a plain thread
/// can wait on.
pub fn spawn(
    count: usize,
    config: Arc<SimConfig>,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel();
    let per_host = config.tunnels_per_host;
    let links = if per_host == 0 {
        count
    } else {
        count.div_ceil(per_host)
    };
    for agent in 0..links {
        let tunnels = (per_host > 0).then(|| agent * per_host..count.min((agent + 1) * per_host));
        for relay in 0..config.relays.len() {
            let link = LinkIds {
                agent,
                relay,
                tunnels: tunnels.clone(),
            };
            tasks.spawn(run_link(link, config.clone(), tx.clone(), stop.clone()));
        }
    }
    rx
}

/// One agent's session with one relay; a host's carries the agents of `tunnels` as tunnels.
#[derive(Clone)]
struct LinkIds {
    agent: usize,
    relay: usize,
    tunnels: Option<Range<usize>>,
}

/// Simulated agent `agent` as its hellos describe it: one `ssh` service, the shared token, no
/// lanes.
fn identity(agent: usize, token: &Secret) -> Identity {
    Identity {
        name: agent_name(agent),
        token: Some(token.clone()),
        software: format!(
            "jumpgate-bench simulated agent {}",
            env!("CARGO_PKG_VERSION")
        ),
        max_lanes: MAX_LANES,
        services: vec![Service {
            name: "ssh".into(),
            target_port: 22,
            preferred_port: None,
            strict: false,
            allow: Vec::new(),
            no_port: false,
        }],
        jump_keys: Vec::new(),
        host: false,
    }
}

/// Simulated host `h`: the shared token, no services of its own.
fn host_identity(h: usize, token: &Secret) -> Identity {
    Identity {
        name: host_name(h),
        services: Vec::new(),
        host: true,
        ..identity(h, token)
    }
}

/// One agent's link to one relay: dial, run the session, redial with the core's backoff, like
/// `worker_agent::link::supervise`.
async fn run_link(
    link: LinkIds,
    config: Arc<SimConfig>,
    events: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    let LinkIds {
        agent,
        relay,
        tunnels,
    } = link;
    let identity = match &tunnels {
        Some(_) => host_identity(agent, &config.token),
        None => identity(agent, &config.token),
    };
    // A host's tunnels ask for the ports they had, as the host agent's table remembers them.
    let mut remembered: HashMap<usize, HashMap<String, u16>> = HashMap::new();
    let source = config.sources[agent % config.sources.len()];
    // The port the relay gave us before is asked for again, as the agent does.
    let mut link = Link::new();
    loop {
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = async {
                let Ok(_permit) = config.in_flight.acquire().await else {
                    return Err(AttemptError::transient("simulator closed"));
                };
                establish(&config, relay, source, link.hello(&identity), &identity).await
            } => r,
        };
        let delay = match attempt {
            Ok((est, hello, setup)) => {
                link.accepted(&est.accepted, &identity, Instant::now());
                let host = match &tunnels {
                    Some(range) => Some(HostTunnels {
                        agents: range.clone(),
                        token: &config.token,
                        remembered: &mut remembered,
                        events: &events,
                        relay,
                        setup,
                    }),
                    None => {
                        let _ = events.send(Event::Allocated {
                            agent,
                            relay,
                            port: est.port,
                            at: Instant::now(),
                            hello,
                            setup,
                        });
                        None
                    }
                };
                match run_session(est, host, &stop).await {
                    SessionEnd::Shutdown => return,
                    SessionEnd::Lost { reconnect_after } => link.session_ended(
                        Instant::now(),
                        reconnect_after,
                        rand::thread_rng().gen(),
                    ),
                }
            }
            Err(failure) => {
                let retry = link.failed(failure.kind, &failure.reason, rand::thread_rng().gen());
                let _ = events.send(Event::Failed {
                    reason: failure.reason,
                    permanent: retry == Retry::GiveUp,
                });
                match retry {
                    Retry::GiveUp => return,
                    Retry::After { delay, .. } | Retry::Suspicious { delay } => delay,
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
