//! A further connection of a live session (a lane): it joins the session by the session's lane
//! key, presented with the same identity the session authenticated as, and carries some of its
//! streams until it idles out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use jumpgate_proto::{Refusal, RelayHello, Secret};
use jumpgate_transport::frame_io::write_frame;
use jumpgate_transport::mux::{Mode, MuxSettings, Session};
use subtle::ConstantTimeEq;
use tokio_util::compat::TokioAsyncReadCompatExt;

use super::handshake::{refuse, HandshakeError, TlsStream};
use super::lanes::LANE_IDLE;
use super::{Agents, HandshakeSlot};
use crate::policy::Credential;

/// Who asks to join which session as a lane.
pub(crate) struct Joiner<'a> {
    /// The session's agent name.
    pub name: &'a str,
    /// The lane key the session was given.
    pub key: &'a Secret,
    /// How the joining connection authenticated: it must be the session's identity.
    pub credential: &'a Credential,
    /// Where it comes from; spared from bans once the lane is joined.
    pub peer: SocketAddr,
}

/// Adds a connection to the live session it names as one more lane, and carries that session's
/// streams on it until the lane idles out, the session ends or the connection is lost. The lane
/// key alone is not enough: the connection must have authenticated as the session's identity
/// (another credential allowed the same name must not receive the agent's user streams).
pub(crate) async fn join_lane(
    mut tls: TlsStream,
    joiner: Joiner<'_>,
    agents: &Arc<Agents>,
    handshake: HandshakeSlot,
    mux_settings: MuxSettings,
) -> Result<(), HandshakeError> {
    let Joiner {
        name,
        key,
        credential,
        peer,
    } = joiner;
    let live = agents.registry.get(name).filter(|s| {
        bool::from(
            s.lanes
                .key()
                .expose()
                .as_bytes()
                .ct_eq(key.expose().as_bytes()),
        )
    });
    if let Some(s) = &live {
        if s.credential.identity() != credential.identity() {
            tracing::warn!(
                "refusing a lane of {name:?} to {credential}: the session is {}'s",
                s.credential
            );
            let refusal = Refusal::LaneUnavailable {
                detail: "a lane must authenticate as its session does".into(),
            };
            return Err(refuse(&mut tls, refusal).await);
        }
    }
    let session = match live {
        Some(s) if s.lanes.count() < s.lanes.max() => s,
        found => {
            let detail = match found {
                None => {
                    "no live session of this agent with that lane key (it ended or was replaced)"
                }
                Some(_) => "the session has all the lanes it may have",
            };
            let refusal = Refusal::LaneUnavailable {
                detail: detail.into(),
            };
            return Err(refuse(&mut tls, refusal).await);
        }
    };
    write_frame(&mut tls, &RelayHello::LaneJoined).await?;
    let mux = Session::start(tls.compat(), Mode::Server, mux_settings);
    let Some(lane) = session.lanes.join(mux.opener) else {
        tracing::debug!("lane refused: the session has all the lanes it may have");
        return Ok(()); // dropping the session's driver closes the connection
    };
    drop(handshake);
    agents.guard.record_success(peer.ip(), Instant::now());
    drop(mux.inbound); // the agent opens no streams on a lane
    tracing::debug!(lane = lane.id, lanes = session.lanes.count(), "lane joined");
    let driver = mux.driver.run(lane.close.clone());
    let idle = async {
        loop {
            tokio::time::sleep(LANE_IDLE / 4).await;
            if session.lanes.close_if_idle(lane.id) {
                tracing::debug!(
                    lane = lane.id,
                    "lane closed after {LANE_IDLE:?} without streams"
                );
            }
        }
    };
    tokio::select! {
        end = driver => if let Err(e) = end {
            tracing::debug!(lane = lane.id, "lane lost: {e}");
        },
        () = idle => {}
    }
    session.lanes.remove(lane.id);
    Ok(())
}
