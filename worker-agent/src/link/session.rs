//! One established session with a relay: its endpoints published, user streams served, and
//! the session core's control loop driven (heartbeats, lanes, member lists, a host's tunnels,
//! going-away) until it ends.

use std::sync::Arc;
use std::time::Duration;

use jumpgate_proto::display::MAX_MESSAGE_LEN;
use jumpgate_proto::{sanitize, Accepted, Control};
use jumpgate_session::{Event, Identity, Placement, Purpose, Session as SessionCore};
use jumpgate_transport::frame_io::{spawn_frame_reader, write_frame, FrameIoError};
use jumpgate_transport::mux::{Mode, MuxSettings, Session};
use jumpgate_transport::socket;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dial::Dialed;
use super::lane::run_lane;
use super::{fallback, AgentShared};
use crate::config::AgentConfig;
use crate::fleet::set::LinkTarget;
use crate::status::Endpoint;
use crate::streams::serve_stream;

/// How long a lost session waits for its user connections to notice: their yamux streams fail
/// as soon as the driver stops, so this only bounds a local target that stopped reading.
const STREAMS_GRACE: Duration = Duration::from_secs(2);

/// How a session that was established came to an end.
pub(super) enum SessionEnd {
    /// The agent is stopping.
    Shutdown,
    /// The session broke; `reconnect_after` is set when the relay announced it was going away.
    Lost {
        reason: String,
        reconnect_after: Option<Duration>,
    },
}

/// The endpoints an acceptance grants, for printing and the status file. The placement is
/// already sanitized and holds only this agent's services, each once; the relay's notes are
/// logged, and the allocations it dropped counted in one line, so a relay can neither forge log
/// lines nor print thousands of them.
fn endpoints(server: &LinkTarget, placement: &Placement, config: &AgentConfig) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = Vec::new();
    for p in &placement.ports {
        if let Some(note) = &p.note {
            tracing::info!(relay = %server, service = %p.name, "port {}: {note}", p.port);
        }
        let via_router = match (p.port, &placement.router) {
            (0, Some(router)) => Some(format!("{router} as {}", config.name)),
            _ => None,
        };
        out.push(Endpoint {
            name: p.name.clone(),
            host: placement.public_host.clone(),
            port: p.port,
            via_router,
        });
    }
    if placement.ignored > 0 {
        tracing::warn!(relay = %server, "ignoring {} port allocations for services this agent did not ask for (or listed twice)", placement.ignored);
    }
    out
}

/// Runs an established session: publishes endpoints, serves streams, and drives the session
/// core's control loop (heartbeats, lanes, member lists, going-away).
pub(super) async fn run_session(
    id: u64,
    server: &LinkTarget,
    shared: &Arc<AgentShared>,
    identity: &Identity,
    accepted: Accepted,
    dialed: Dialed,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let now = || tokio::time::Instant::now().into_std();
    let mut core = match &shared.host {
        Some(_) => SessionCore::new_host(&accepted, shared.config.max_lanes, now()),
        None => SessionCore::new(&accepted, shared.config.max_lanes, now()),
    };
    // A host session registers every tunnel at once, then follows the table's changes.
    let (_, mut changes) = tokio::sync::mpsc::unbounded_channel::<crate::host::table::Change>();
    let host = shared.host.as_ref().filter(|_| core.holds_tunnels());
    if let Some(table) = host {
        let (hellos, rx) = table.attach(
            id,
            &server.to_string(),
            &accepted.public_host,
            accepted.router.as_deref(),
        );
        for hello in hellos {
            core.add_tunnel(hello);
        }
        changes = rx;
    }
    let timeout = core.timeout();
    let Dialed { tls, rtt } = dialed;
    let _ = socket::tune_control(tls.get_ref().0.get_ref().tcp(), timeout);
    let relay_addr = tls.get_ref().0.get_ref().relay_addr();
    tracing::info!(relay = %server, version = accepted.version, "connected to relay");
    let placement = Placement::of(&accepted, identity);
    shared
        .status
        .connected(id, endpoints(server, &placement, &shared.config));
    shared.members.accepted(id, server, &accepted);

    let mut mux = Session::start(tls.compat(), Mode::Client, MuxSettings::for_round_trip(rtt));
    let driver_stop = CancellationToken::new();
    let session_tasks = TaskTracker::new();
    session_tasks.spawn(mux.driver.run(driver_stop.clone()));
    let streams = TaskTracker::new();
    // Extra lanes run on `session_tasks` and close with the session's driver; each reports its
    // end, so the core can count it.
    let (lane_done, mut lanes_done) = tokio::sync::mpsc::unbounded_channel::<()>();
    let identity = Arc::new(identity.clone());
    let end = async {
        let ctrl = mux.opener.open().await.map_err(|e| e.to_string())?;
        let (reader, mut writer) = tokio::io::split(ctrl);
        let mut frames = spawn_frame_reader::<_, Control>(reader, &session_tasks);
        loop {
            // What the core wants written: first the opening ping (the relay learns of the
            // control stream from its first frame), then heartbeats.
            while let Some((frame, purpose)) = core.poll_transmit() {
                if let Err(e) = write_frame(&mut writer, &frame).await {
                    return Err(match purpose {
                        Purpose::Heartbeat => format!("cannot send heartbeat: {e}"),
                        Purpose::Tunnel => format!("cannot send a tunnel registration: {e}"),
                        Purpose::Opening | Purpose::Release => e.to_string(),
                    });
                }
            }
            while let Some(event) = core.poll_event() {
                match event {
                    Event::TimedOut { after } => {
                        return Err(format!("no heartbeat answer from the relay for {after:?}"));
                    }
                    Event::GoingAway { .. } => {
                        tracing::info!(relay = %server, "relay is shutting down; open connections continue until it closes");
                    }
                    Event::OpenLanes { count, key } => {
                        for _ in 0..count {
                            let lane = run_lane(server.clone(), relay_addr, shared.clone(), identity.clone(), key.clone(), streams.clone(), driver_stop.clone(), timeout);
                            let done = lane_done.clone();
                            session_tasks.spawn(async move {
                                lane.await;
                                let _ = done.send(());
                            });
                        }
                    }
                    Event::LaneNotOffered => tracing::debug!("relay asked for a lane it never offered"),
                    Event::Members(relays) => shared.members.pushed(id, server, &relays),
                    Event::Ignored(other) => tracing::debug!(?other, "ignoring unexpected control frame"),
                    Event::HostUnsupported { version } => {
                        tracing::warn!(relay = %server, "relay speaks protocol version {version}, older than host sessions: each tunnel gets a session of its own there");
                        if let Some(table) = &shared.host {
                            let (tunnels, rx) = table.attach_fallback(id, &server.to_string());
                            session_tasks.spawn(fallback::run(id, server.clone(), shared.clone(), tunnels, rx, driver_stop.clone()));
                        }
                    }
                    Event::TunnelPlaced { name, services } => {
                        if let Some(table) = host {
                            table.placed(id, &name, &services);
                        }
                    }
                    Event::TunnelRefused { name, refusal, retry_in } => {
                        if let Some(table) = host {
                            table.refused(id, &name, &refusal, retry_in.is_some(), false);
                        }
                    }
                    Event::TunnelClosed { name, reason, retry_in } => {
                        if let Some(table) = host {
                            table.refused(id, &name, &reason, retry_in.is_some(), true);
                        }
                    }
                }
            }
            let wake = core.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = shutdown.cancelled() => {
                    core.close();
                    // Removals already asked for, then the release.
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while let Some((frame, _)) = core.poll_transmit() {
                            write_frame(&mut writer, &frame).await?;
                        }
                        Ok::<(), FrameIoError>(())
                    })
                    .await;
                    return Ok(SessionEnd::Shutdown);
                }
                stream = mux.inbound.recv() => match stream {
                    Some(stream) => { streams.spawn(serve_stream(stream, shared.targets.clone(), shared.stats.clone())); }
                    None => return Err("session closed".to_string()),
                },
                Some(()) = lanes_done.recv() => core.lane_closed(),
                Some(change) = changes.recv() => match change {
                    crate::host::table::Change::Add(hello) => { core.add_tunnel(hello); }
                    crate::host::table::Change::Remove { name, release } => { core.remove_tunnel(&name, release); }
                    crate::host::table::Change::Start { .. } => {}
                },
                _ = sleep_until(wake) => core.handle_timeout(now()),
                frame = frames.recv() => match frame {
                    Some(Ok(frame)) => core.handle_control(frame, now()),
                    Some(Err(FrameIoError::Closed)) | None => return Err("relay closed the connection".to_string()),
                    Some(Err(e)) => return Err(e.to_string()),
                },
            }
        }
    }
    .await;
    if let Some(table) = &shared.host {
        table.detach(id);
    }
    let reconnect_after = core.reconnect_after();
    driver_stop.cancel();
    session_tasks.close();
    session_tasks.wait().await;
    streams.close();
    if tokio::time::timeout(STREAMS_GRACE, streams.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            relay = %server,
            open = streams.len(),
            "user connections still open {STREAMS_GRACE:?} after the session ended; leaving them to finish"
        );
    }
    match end {
        Ok(end) => end,
        Err(reason) => SessionEnd::Lost {
            // A decoder error may quote what the relay sent.
            reason: sanitize(&reason, MAX_MESSAGE_LEN).into_owned(),
            reconnect_after,
        },
    }
}

/// Sleeps until `at`, or forever without a deadline.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
