//! A further connection of a live session (a lane): it joins the session by the session's lane
//! key and carries some of its streams until it idles out.

use std::sync::Arc;

use jumpgate_proto::{Refusal, RelayHello, Secret};
use jumpgate_transport::frame_io::write_frame;
use jumpgate_transport::mux::{Mode, MuxSettings, Session};
use subtle::ConstantTimeEq;
use tokio_util::compat::TokioAsyncReadCompatExt;

use super::handshake::{refuse, HandshakeError, TlsStream};
use super::lanes::LANE_IDLE;
use super::{Agents, HandshakeSlot};

/// Adds a connection to the live session it names as one more lane, and carries that session's
/// streams on it until the lane idles out, the session ends or the connection is lost.
pub(crate) async fn join_lane(
    mut tls: TlsStream,
    name: &str,
    key: &Secret,
    agents: &Arc<Agents>,
    handshake: HandshakeSlot,
    mux_settings: MuxSettings,
) -> Result<(), HandshakeError> {
    let live = agents.registry.get(name).filter(|s| {
        bool::from(
            s.lanes
                .key()
                .expose()
                .as_bytes()
                .ct_eq(key.expose().as_bytes()),
        )
    });
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
