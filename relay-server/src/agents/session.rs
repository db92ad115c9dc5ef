//! Phase three of an agent connection: the running session. Its ports are served, the control
//! stream carries heartbeats, and silence longer than the heartbeat timeout ends it. However it
//! ends, its listeners are closed and its leases start ageing before anything else may claim its
//! name.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use jumpgate_proto::display::shown;
use jumpgate_proto::tunnel::TunnelReply;
use jumpgate_proto::{Control, Refusal};
use jumpgate_transport::frame_io::{spawn_frame_reader, write_frame, FrameIoError};
use jumpgate_transport::mux::{Inbound, MuxStream};
use jumpgate_transport::stall::StallWatch;
use tokio::io::WriteHalf;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::hold::{end_session, serve_ports};
use super::host::{Host, HostOutbox};
use super::placement::{MembersWatch, Placed};
use super::registry::AgentSession;
use super::Agents;

/// Runs a placed session until it ends, then tears it down.
pub(crate) async fn run(placed: Placed, agents: &Arc<Agents>) {
    let Placed {
        agent,
        ports,
        driver,
        stall,
        inbound,
        software,
        members,
        host,
    } = placed;
    let summary: Vec<String> = agent
        .services
        .iter()
        .map(|s| format!("{}={}", s.name, s.port))
        .collect();
    // The agent's words: escaped and cut short, so they cannot forge or flood log lines.
    let software = shown(&software);
    if host {
        tracing::info!(software = %software, ports = %summary.join(","), credential = %agent.credential, "host agent connected");
    } else {
        tracing::info!(software = %software, ports = %summary.join(","), credential = %agent.credential, "agent connected");
    }
    serve_ports(&agent, ports, agents);

    let started = Instant::now();
    let session_tasks = TaskTracker::new();
    let driver_stop = CancellationToken::new();
    let driver_task = session_tasks.spawn(driver.run(driver_stop.clone()));
    session_tasks.close();
    let host = host.then(|| super::host::Host::new(agent.clone(), agents.clone()));
    let end = run_control(
        inbound,
        &agent,
        agents,
        &session_tasks,
        members,
        &stall,
        host,
    )
    .await;
    if matches!(
        end,
        SessionEnd::HeartbeatTimeout(_) | SessionEnd::Stalled(_)
    ) {
        agents
            .metrics
            .heartbeat_timeouts
            .fetch_add(1, Ordering::Relaxed);
    }

    // Teardown: the ports stay bound, answering users at once, until the agent is back or its
    // lease ends. A host's tunnels end with it (their tokens are children of its own).
    end_session(&agent, agents, &end.to_string()).await;
    if matches!(end, SessionEnd::Stalled(_) | SessionEnd::NotReading(_)) {
        // A peer that does not read would hold a proper close (yamux's GoAway behind the full
        // socket) until its timeout or the kernel's: drop the connection instead.
        driver_task.abort();
    } else {
        driver_stop.cancel();
    }
    session_tasks.wait().await;
    agents.leases.persist_or_warn().await;
    tracing::info!(reason = %end, after = ?started.elapsed(), "agent disconnected; lease kept");
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    ClosedByRelay,
    ShuttingDown,
    Replaced,
    NoControlStream(String),
    HeartbeatTimeout(std::time::Duration),
    AgentStopping,
    ClosedByAgent,
    Lost(String),
    NotReading(std::time::Duration),
    Stalled(std::time::Duration),
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::ClosedByRelay => f.write_str("closed by relay"),
            SessionEnd::ShuttingDown => f.write_str("relay shutting down"),
            SessionEnd::Replaced => {
                f.write_str("replaced by a new session or disconnected by the operator")
            }
            SessionEnd::NoControlStream(why) => write!(f, "{why}"),
            SessionEnd::HeartbeatTimeout(t) => {
                write!(f, "heartbeat timeout: nothing from the agent for {t:?}")
            }
            SessionEnd::AgentStopping => f.write_str("agent is stopping"),
            SessionEnd::ClosedByAgent => f.write_str("connection closed by agent"),
            SessionEnd::Lost(why) => write!(f, "connection lost: {why}"),
            SessionEnd::NotReading(t) => write!(
                f,
                "agent stopped reading: a control frame could not be written within {t:?}"
            ),
            SessionEnd::Stalled(t) => write!(
                f,
                "agent stopped reading: its connection took no bytes for {t:?}"
            ),
        }
    }
}

/// Runs the control stream until the session should end; says why. Its frame reader runs on
/// `tasks`, which teardown waits on.
async fn run_control(
    mut inbound: Inbound,
    agent: &AgentSession,
    agents: &Agents,
    tasks: &TaskTracker,
    mut members: Option<MembersWatch>,
    stall: &StallWatch,
    host: Option<(Arc<Host>, HostOutbox)>,
) -> SessionEnd {
    let (host, mut outbox) = match host {
        Some((host, outbox)) => (Some(host), Some(outbox)),
        None => (None, None),
    };
    let timeout = agents.config.heartbeat_timeout;
    let first = tokio::select! {
        _ = agent.cancel.cancelled() => return SessionEnd::ClosedByRelay,
        s = tokio::time::timeout(timeout, inbound.recv()) => s,
    };
    let ctrl = match first {
        Ok(Some(s)) => s,
        Ok(None) => {
            return SessionEnd::NoControlStream(
                "connection closed before the control stream opened".into(),
            )
        }
        Err(_) => {
            return SessionEnd::NoControlStream(format!("no control stream within {timeout:?}"))
        }
    };
    // Any further stream from the agent is unexpected: drop the receiver so they are reset.
    drop(inbound);
    let (reader, mut writer) = tokio::io::split(ctrl);
    let mut frames = spawn_frame_reader::<_, Control>(reader, tasks);
    let mut told_going_away = false;
    let cancelled = || {
        if agents.shutdown.is_cancelled() {
            SessionEnd::ShuttingDown
        } else {
            SessionEnd::Replaced
        }
    };
    loop {
        let frame = tokio::select! {
            _ = agent.cancel.cancelled() => return cancelled(),
            // Timed from when the connection stopped taking bytes, not from a control write
            // that may begin well into the stall (buffers accept frames long after the socket
            // stopped draining): the session ends one heartbeat timeout after the stall.
            () = stall.stalled_for(timeout) => return SessionEnd::Stalled(timeout),
            count = agent.lanes.wanted(), if agent.lanes.max() > 1 => {
                let ask = Control::OpenLane { count: u16::try_from(count).unwrap_or(u16::MAX) };
                if let Err(end) = send(&mut writer, ask, agent, stall, timeout).await {
                    return end.unwrap_or_else(cancelled);
                }
                continue;
            }
            Some(frame) = next_out(&mut outbox) => {
                // A host's tunnels: registration answers and closures, in the order made.
                if let Err(end) = send(&mut writer, frame, agent, stall, timeout).await {
                    return end.unwrap_or_else(cancelled);
                }
                continue;
            }
            changed = changed(&mut members) => {
                let Some(relays) = changed else {
                    members = None;
                    continue;
                };
                if let Err(end) = send(&mut writer, Control::Members { relays }, agent, stall, timeout).await {
                    return end.unwrap_or_else(cancelled);
                }
                continue;
            }
            _ = agents.shutdown.cancelled(), if !told_going_away => {
                told_going_away = true;
                let bye = Control::GoingAway { reconnect_after_ms: 1000 };
                if let Err(end) = send(&mut writer, bye, agent, stall, timeout).await {
                    return end.unwrap_or_else(cancelled);
                }
                continue;
            }
            f = tokio::time::timeout(timeout, frames.recv()) => f,
        };
        match frame {
            Err(_) => return SessionEnd::HeartbeatTimeout(timeout),
            Ok(Some(Ok(Control::Ping { seq }))) => {
                if let Err(end) =
                    send(&mut writer, Control::Pong { seq }, agent, stall, timeout).await
                {
                    return end.unwrap_or_else(cancelled);
                }
            }
            Ok(Some(Ok(Control::Release))) => return SessionEnd::AgentStopping,
            Ok(Some(Ok(Control::Register { id, tunnel }))) => match &host {
                Some(host) => host.register(id, tunnel, tasks),
                None => {
                    let detail = "this session is not a host session: a hello with `host` set (protocol version 3 or newer) may register tunnels".to_string();
                    let reply = Control::Registered {
                        id,
                        reply: TunnelReply::Refused(Refusal::BadRequest { detail }),
                    };
                    if let Err(end) = send(&mut writer, reply, agent, stall, timeout).await {
                        return end.unwrap_or_else(cancelled);
                    }
                }
            },
            Ok(Some(Ok(Control::Unregister { name, release }))) => {
                if let Some(host) = &host {
                    host.unregister(name, release, tasks);
                }
            }
            Ok(Some(Ok(other))) => tracing::debug!(?other, "ignoring unexpected control frame"),
            Ok(None | Some(Err(FrameIoError::Closed))) => return SessionEnd::ClosedByAgent,
            // A decoder's message can quote what the agent sent.
            Ok(Some(Err(e))) => return SessionEnd::Lost(shown(&e)),
        }
    }
}

/// The next frame a host's tunnels want sent; never, for other sessions.
async fn next_out(outbox: &mut Option<HostOutbox>) -> Option<Control> {
    match outbox {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The member list once it changed; `None` when it never will again (no watch, or the fleet is
/// gone), so the caller stops asking.
async fn changed(members: &mut Option<MembersWatch>) -> Option<Vec<jumpgate_proto::RelayMember>> {
    let rx = match members {
        Some(rx) => rx,
        None => std::future::pending().await,
    };
    rx.changed().await.ok()?;
    Some(rx.borrow_and_update().to_vec())
}

/// Writes one control frame within `limit`, or says why the session ends (`None`: it was
/// cancelled meanwhile; the connection took no bytes for `limit`, counted from before the write
/// began if it was stalled already). Every write is bounded: an agent that stops reading must neither keep
/// its session alive by pinging nor keep it from noticing a revocation, an operator's disconnect
/// or shutdown.
async fn send(
    writer: &mut WriteHalf<MuxStream>,
    frame: Control,
    agent: &AgentSession,
    stall: &StallWatch,
    limit: std::time::Duration,
) -> Result<(), Option<SessionEnd>> {
    tokio::select! {
        _ = agent.cancel.cancelled() => Err(None),
        () = stall.stalled_for(limit) => Err(Some(SessionEnd::Stalled(limit))),
        written = tokio::time::timeout(limit, write_frame(writer, &frame)) => match written {
            Err(_) => Err(Some(SessionEnd::NotReading(limit))),
            Ok(Err(e)) => Err(Some(SessionEnd::Lost(shown(&e)))),
            Ok(Ok(())) => Ok(()),
        },
    }
}
