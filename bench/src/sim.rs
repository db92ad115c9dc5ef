//! Simulated agents: many real agent sessions from one process.
//!
//! Each simulated agent runs the agent's own session core (`jumpgate-session`, which
//! `worker-agent/src/link.rs` drives too): TCP, TLS 1.3 verified against the relay's pin, the
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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jumpgate_proto::{AgentHello, Control, RelayHello, Secret, StreamOpen, StreamReply, PREFACE};
use jumpgate_session::{
    session_answer, tunnel_hello, AnswerError, Identity, Link, Placement, Retry, Service,
    Session as SessionCore,
};
use jumpgate_transport::frame_io::{read_frame, spawn_frame_reader, write_frame, FrameIoError};
use jumpgate_transport::mux::{Mode, MuxSettings, MuxStream, Session};
use jumpgate_transport::readahead::ReadAhead;
use jumpgate_transport::{socket, tls};
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Time allowed for TCP connect, TLS and the hello exchange, each (as in the agent).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalive idle time before the relay told us its heartbeat settings (as in the agent).
const DEFAULT_IDLE: Duration = Duration::from_secs(30);
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

type TlsStream = tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>;

/// A session the relay accepted.
struct Established {
    tls: TlsStream,
    rtt: Duration,
    port: u16,
    accepted: jumpgate_proto::Accepted,
}

/// Why an attempt failed, and what that proves (as the agent classifies it).
struct AttemptError {
    reason: String,
    kind: jumpgate_session::Failure,
}

impl AttemptError {
    fn transient(reason: impl std::fmt::Display) -> Self {
        Self {
            reason: reason.to_string(),
            kind: jumpgate_session::Failure::Transient,
        }
    }
}

/// How a session ended.
enum SessionEnd {
    /// `stop` fired.
    Shutdown,
    /// The session broke; `reconnect_after` is set when the relay announced it was going away.
    Lost { reconnect_after: Option<Duration> },
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

/// Dials from `source`, verifies the relay, sends `hello`: the session, how long the hello took
/// and how long the whole setup took.
async fn establish(
    config: &SimConfig,
    relay: usize,
    source: IpAddr,
    hello: AgentHello,
    identity: &Identity,
) -> Result<(Established, Duration, Duration), AttemptError> {
    let began = Instant::now();
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| AttemptError::transient(format!("socket: {e}")))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| AttemptError::transient(format!("cannot bind {source}: {e}")))?;
    let addr = config.relays[relay];
    let tcp = tokio::time::timeout(SETUP_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| AttemptError::transient("connect timed out"))?
        .map_err(|e| AttemptError::transient(format!("cannot connect: {e}")))?;
    let rtt = began.elapsed();
    let _ = socket::tune_control(&tcp, DEFAULT_IDLE);
    let _ = socket::tune_for_path(&tcp, rtt);
    let server_name = tls::server_name(&config.server_name).map_err(AttemptError::transient)?;
    let mut tls = tokio::time::timeout(
        SETUP_TIMEOUT,
        config.connector.connect(server_name, ReadAhead::new(tcp)),
    )
    .await
    .map_err(|_| AttemptError::transient("TLS handshake timed out"))?
    .map_err(|e| AttemptError::transient(format!("TLS handshake failed: {e}")))?;
    let hello_sent = Instant::now();
    let exchange = async {
        tls.write_all(PREFACE).await.map_err(FrameIoError::from)?;
        write_frame(&mut tls, &hello).await?;
        read_frame::<_, RelayHello>(&mut tls).await
    };
    let reply = tokio::time::timeout(SETUP_TIMEOUT, exchange)
        .await
        .map_err(|_| AttemptError::transient("hello timed out"))?
        .map_err(|e| AttemptError::transient(format!("hello failed: {e}")))?;
    let took = (hello_sent.elapsed(), began.elapsed());
    let accepted = session_answer(reply).map_err(|e| match e {
        AnswerError::Refused(refusal) => AttemptError {
            kind: jumpgate_session::Failure::of_refusal(&refusal),
            reason: format!(
                "refused: {}",
                jumpgate_proto::sanitize(&refusal.to_string(), 200)
            ),
        },
        AnswerError::Unexpected(what) => AttemptError::transient(what),
    })?;
    let port = match Placement::of(&accepted, identity).port_of("ssh") {
        Some(port) => port,
        None if identity.host => 0,
        None => {
            return Err(AttemptError::transient(
                "accepted without an ssh allocation",
            ))
        }
    };
    Ok((
        Established {
            tls,
            rtt,
            port,
            accepted,
        },
        took.0,
        took.1,
    ))
}

/// A host session's tunnels: the agents it registers, and where their placements are reported.
struct HostTunnels<'a> {
    agents: Range<usize>,
    token: &'a Secret,
    remembered: &'a mut HashMap<usize, HashMap<String, u16>>,
    events: &'a mpsc::Sender<Event>,
    relay: usize,
    /// The host session's own setup, reported as each tunnel's.
    setup: Duration,
}

impl HostTunnels<'_> {
    /// Registers every tunnel on `core`; returns when each was asked, by tunnel name.
    fn register(&self, core: &mut SessionCore) -> HashMap<String, (usize, Instant)> {
        let mut asked = HashMap::new();
        for agent in self.agents.clone() {
            let identity = identity(agent, self.token);
            let remembered = self.remembered.get(&agent).cloned().unwrap_or_default();
            core.add_tunnel(tunnel_hello(&identity, &remembered));
            asked.insert(identity.name, (agent, Instant::now()));
        }
        asked
    }

    /// Reports a placed tunnel as its agent's allocation and remembers its port.
    fn placed(
        &mut self,
        asked: &HashMap<String, (usize, Instant)>,
        name: &str,
        services: &[jumpgate_proto::Allocation],
    ) {
        let (Some(&(agent, at)), Some(ssh)) =
            (asked.get(name), services.iter().find(|s| s.name == "ssh"))
        else {
            return;
        };
        self.remembered
            .entry(agent)
            .or_default()
            .insert("ssh".into(), ssh.port);
        let _ = self.events.send(Event::Allocated {
            agent,
            relay: self.relay,
            port: ssh.port,
            at: Instant::now(),
            hello: at.elapsed(),
            setup: self.setup,
        });
    }
}

/// Runs an accepted session: yamux, and the control stream driven by the agent's session core;
/// streams the relay opens for users are echoed. A host session registers its tunnels first.
async fn run_session(
    est: Established,
    mut host: Option<HostTunnels<'_>>,
    stop: &CancellationToken,
) -> SessionEnd {
    let Established {
        tls, rtt, accepted, ..
    } = est;
    let now = || tokio::time::Instant::now().into_std();
    let mut core = match host {
        Some(_) => SessionCore::new_host(&accepted, MAX_LANES, now()),
        None => SessionCore::new(&accepted, MAX_LANES, now()),
    };
    let asked = host
        .as_ref()
        .map(|h| h.register(&mut core))
        .unwrap_or_default();
    let _ = socket::tune_control(tls.get_ref().0.get_ref(), core.timeout());
    let mut mux = Session::start(tls.compat(), Mode::Client, MuxSettings::for_round_trip(rtt));
    let driver_stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(mux.driver.run(driver_stop.clone()));
    let end = async {
        let ctrl = mux.opener.open().await.map_err(|_| ())?;
        let (reader, mut writer) = tokio::io::split(ctrl);
        let mut frames = spawn_frame_reader::<_, Control>(reader, &tasks);
        loop {
            while let Some((frame, _)) = core.poll_transmit() {
                write_frame(&mut writer, &frame).await.map_err(|_| ())?;
            }
            // Lanes are never offered (MAX_LANES) and member lists are not followed: one
            // session per configured relay. Only the end of the session matters here.
            while let Some(event) = core.poll_event() {
                match event {
                    jumpgate_session::Event::TimedOut { .. } => return Err(()),
                    jumpgate_session::Event::TunnelPlaced { name, services } => {
                        if let Some(host) = &mut host {
                            host.placed(&asked, &name, &services);
                        }
                    }
                    _ => {}
                }
            }
            let wake = core.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = stop.cancelled() => {
                    core.close();
                    if let Some((release, _)) = core.poll_transmit() {
                        let _ = tokio::time::timeout(Duration::from_secs(1), write_frame(&mut writer, &release)).await;
                    }
                    return Ok(SessionEnd::Shutdown);
                }
                stream = mux.inbound.recv() => match stream {
                    Some(stream) => drop(tasks.spawn(echo(stream))),
                    None => return Err(()),
                },
                _ = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => core.handle_timeout(now()),
                frame = frames.recv() => match frame {
                    Some(Ok(frame)) => core.handle_control(frame, now()),
                    Some(Err(_)) | None => return Err(()),
                },
            }
        }
    }
    .await;
    driver_stop.cancel();
    tasks.close();
    tasks.wait().await;
    match end {
        Ok(end) => end,
        Err(()) => SessionEnd::Lost {
            reconnect_after: core.reconnect_after(),
        },
    }
}

/// Answers a user connection the relay carries: accepts it as the agent does, then sends every
/// byte back.
async fn echo(mut stream: MuxStream) {
    let open = tokio::time::timeout(SETUP_TIMEOUT, read_frame::<_, StreamOpen>(&mut stream));
    if !matches!(open.await, Ok(Ok(_))) {
        return;
    }
    if write_frame(&mut stream, &StreamReply::Connected)
        .await
        .is_err()
    {
        return;
    }
    let (mut reader, mut writer) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut reader, &mut writer).await;
}
