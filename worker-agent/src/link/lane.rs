//! Extra lanes: more TCP connections to the same relay for one session, so parallel transfers
//! each get a socket of their own; each carries the streams the relay opens on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jumpgate_proto::Secret;
use jumpgate_session::{lane_answer, lane_hello, Identity};
use jumpgate_transport::mux::{Mode, MuxSettings, Session};
use jumpgate_transport::socket;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dial::{answer_error, dial, exchange, Dialed};
use super::AgentShared;
use crate::error::AgentError;
use crate::fleet::set::LinkTarget;
use crate::streams::serve_stream;

/// Opens one more lane for the session that `key` belongs to, to the same address as the
/// session's first connection (a relay name may resolve to several relays).
async fn open_lane(
    server: &LinkTarget,
    relay: Option<SocketAddr>,
    shared: &AgentShared,
    identity: &Identity,
    key: &Secret,
) -> Result<Dialed, AgentError> {
    let mut dialed = dial(server, relay, shared).await?;
    let reply = exchange(&mut dialed.tls, server, &lane_hello(identity, key)).await?;
    lane_answer(reply).map_err(|e| answer_error(server, e))?;
    Ok(dialed)
}

/// One extra lane: carries the streams the relay opens on it until the relay closes it (idle),
/// the connection fails, or the session it belongs to ends (`stop`).
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_lane(
    server: LinkTarget,
    relay: Option<SocketAddr>,
    shared: Arc<AgentShared>,
    identity: Arc<Identity>,
    key: Secret,
    streams: TaskTracker,
    stop: CancellationToken,
    idle: Duration,
) {
    let Dialed { tls, rtt } = tokio::select! {
        _ = stop.cancelled() => return,
        r = open_lane(&server, relay, &shared, &identity, &key) => match r {
            Ok(dialed) => dialed,
            Err(e) => {
                tracing::warn!(relay = %server, "cannot open an extra lane: {e}; transfers share the lanes already open");
                return;
            }
        },
    };
    let _ = socket::tune_control(tls.get_ref().0.get_ref().tcp(), idle);
    tracing::debug!(relay = %server, "lane open");
    let mut mux = Session::start(tls.compat(), Mode::Client, MuxSettings::for_round_trip(rtt));
    let driver = mux.driver.run(stop.clone());
    tokio::pin!(driver);
    loop {
        tokio::select! {
            end = &mut driver => {
                if let Err(e) = end {
                    tracing::debug!(relay = %server, "lane lost: {e}");
                }
                break;
            }
            stream = mux.inbound.recv() => match stream {
                Some(stream) => {
                    streams.spawn(serve_stream(stream, shared.targets.clone(), shared.stats.clone()));
                }
                None => break,
            },
        }
    }
    tracing::debug!(relay = %server, "lane closed");
}
