//! Phase two of an agent connection: where a session is placed. Under the agent name's turn
//! (one admission per name at a time), an older session with the same name is taken over, every
//! service gets a leased port with a bound listener, the agent is told its ports, and the session
//! is registered. What comes out is a live session ready to run; its ports are not served yet.
//!
//! The name's claim on its ports ([`claim`], in [`name_claim`]) is shared with host sessions' tunnels; what is
//! left here is what only an agent's own connection has: the reply, its lanes, its first
//! connection's driver.

mod name_claim;

pub(crate) use name_claim::{claim, register, Claim, PortSocket, SessionParts};

use std::sync::Arc;
use std::time::Duration;

use jumpgate_proto::{Accepted, LaneGrant, RelayHello, Secret};
use jumpgate_transport::frame_io::write_frame;
use jumpgate_transport::mux::{Inbound, Mode, MuxSettings, Session, SessionDriver};
use jumpgate_transport::socket;
use jumpgate_transport::stall::{StallWatch, WriteStall};
use tokio::sync::Semaphore;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use super::handshake::{refuse, HandshakeError, Handshaken, TlsStream};
use super::io::AgentIo;
use super::lanes::Lanes;
use super::registry::{AgentSession, ServiceEndpoint};
use super::Agents;

/// The yamux driver of a session's first connection.
pub(crate) type FirstDriver = SessionDriver<Compat<WriteStall<TlsStream>>>;

/// A session that has its ports and is registered, ready to run.
pub(crate) struct Placed {
    /// The registered session.
    pub agent: Arc<AgentSession>,
    /// The services' endpoints with their port's listener; router-only services have none.
    pub ports: Vec<(ServiceEndpoint, Option<PortSocket>)>,
    /// The first connection's yamux driver.
    pub driver: FirstDriver,
    /// Since when the first connection has taken no bytes: a peer that stopped reading.
    pub stall: StallWatch,
    /// Streams the agent opens (the control stream first).
    pub inbound: Inbound,
    /// The software the agent reported, for the log.
    pub software: String,
    /// Membership changes to push; `None` for agents older than
    /// [`MEMBERS_SINCE`](jumpgate_proto::MEMBERS_SINCE), which could not read them.
    pub members: Option<MembersWatch>,
    /// A host session (issue 28): it registers tunnels on its control stream.
    pub host: bool,
}

/// The fleet's member list as it changes.
pub(crate) type MembersWatch = tokio::sync::watch::Receiver<Arc<Vec<jumpgate_proto::RelayMember>>>;

/// Places an authenticated agent: its name's ports ([`claim`]), the reply, registration.
pub(crate) async fn place(
    handshaken: Handshaken,
    peer: std::net::SocketAddr,
    agents: &Agents,
    handshake_time: Duration,
    mux_settings: MuxSettings,
) -> Result<Placed, HandshakeError> {
    let Handshaken {
        mut tls,
        hello,
        version,
        credential,
        jump_keys,
    } = handshaken;
    let config = &agents.config;
    let claim_of = Claim {
        name: &hello.name,
        services: &hello.services,
        credential: &credential,
        host_id: None,
    };
    let claimed = match claim(agents, &claim_of).await {
        Ok(claimed) => claimed,
        Err(r) => return Err(refuse(&mut tls, r).await),
    };

    let max_lanes = usize::from(hello.max_lanes).min(config.max_lanes_per_agent);
    // The kernel's round trip of the first connection (the TLS handshake gave it samples): on a
    // shorter path than `lanes_min_rtt` the agent is never asked for extra lanes. A WebSocket's
    // TCP connection ends at the ingress in front of the relay, whose round trip says nothing
    // about the worker's: those agents keep their lanes.
    let io = tls.get_ref().0.get_ref();
    let short_path = matches!(io, AgentIo::Tcp(_))
        && socket::path_info(io.tcp()).is_ok_and(|p| p.min_rtt < config.lanes_min_rtt);
    let lane_key = Secret::new(random_hex(16));
    // Subscribed before the list is read, so a change after the reply is pushed, not missed.
    let mut members = (version >= jumpgate_proto::MEMBERS_SINCE).then(|| agents.fleet.subscribe());
    let accepted = Accepted {
        members: members
            .as_mut()
            .map(|m| m.borrow_and_update().to_vec())
            .unwrap_or_default(),
        relay: members.as_ref().map(|_| agents.fleet.itself()),
        version,
        public_host: config.public_host.clone(),
        services: claimed.allocations(&hello.services),
        heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64,
        heartbeat_timeout_ms: config.heartbeat_timeout.as_millis() as u64,
        router: config
            .router_listen
            .map(|r| format!("{}:{}", config.public_host, r.port())),
        lanes: (max_lanes > 1).then(|| LaneGrant {
            key: lane_key.clone(),
            max: max_lanes as u16,
        }),
    };
    if let Err(e) = write_frame(&mut tls, &RelayHello::Accepted(accepted)).await {
        agents.leases.deactivate(&hello.name).await;
        return Err(e.into());
    }

    let (tls, stall) = WriteStall::new(tls);
    let mux = Session::start(tls.compat(), Mode::Server, mux_settings);
    let cancel = agents.close_sessions.child_token();
    let lanes = Lanes::new(mux.opener, lane_key, max_lanes, handshake_time, &cancel);
    let parts = SessionParts {
        remote: peer,
        lanes: Arc::new(if short_path {
            lanes.without_asking()
        } else {
            lanes
        }),
        permits: Arc::new(Semaphore::new(config.max_streams_per_agent)),
        cancel,
        credential,
        jump_keys,
        tunnel: None,
    };
    let (agent, ports) = register(claimed, &hello.name, &hello.services, parts, agents);
    Ok(Placed {
        agent,
        ports,
        driver: mux.driver,
        stall,
        inbound: mux.inbound,
        software: hello.software,
        members,
        host: hello.host,
    })
}

/// `bytes` random bytes as hex.
fn random_hex(bytes: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}
