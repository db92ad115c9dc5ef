//! An accepted session, run as the agent runs it: yamux, the control stream driven by the
//! session core, a host's tunnels registered over it, and every stream the relay opens echoed.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use jumpgate_proto::{Control, Secret, StreamOpen, StreamReply};
use jumpgate_session::{tunnel_hello, Session as SessionCore};
use jumpgate_transport::frame_io::{read_frame, spawn_frame_reader, write_frame};
use jumpgate_transport::mux::{Mode, MuxSettings, MuxStream, Session};
use jumpgate_transport::socket;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dial::Established;
use super::{identity, Event, MAX_LANES, SETUP_TIMEOUT};

/// How a session ended.
pub(super) enum SessionEnd {
    /// `stop` fired.
    Shutdown,
    /// The session broke; `reconnect_after` is set when the relay announced it was going away.
    Lost { reconnect_after: Option<Duration> },
}

/// A host session's tunnels: the agents it registers, and where their placements are reported.
pub(super) struct HostTunnels<'a> {
    pub(super) agents: Range<usize>,
    pub(super) token: &'a Secret,
    pub(super) remembered: &'a mut HashMap<usize, HashMap<String, u16>>,
    pub(super) events: &'a mpsc::Sender<Event>,
    pub(super) relay: usize,
    /// The host session's own setup, reported as each tunnel's.
    pub(super) setup: Duration,
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
pub(super) async fn run_session(
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
