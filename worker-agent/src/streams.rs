//! Incoming streams: each is one user connection, bridged to the local target it names.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jumpgate_proto::display::{MAX_FIELD_LEN, MAX_MESSAGE_LEN};
use jumpgate_proto::{sanitize, StreamOpen, StreamReply};
use std::sync::atomic::Ordering;

use jumpgate_transport::bridge::bridge;
use jumpgate_transport::counted::Counted;
use jumpgate_transport::frame_io::{read_frame, write_frame};
use jumpgate_transport::mux::MuxStream;
use jumpgate_transport::socket;
use tokio::net::TcpStream;

use crate::metrics::AgentStats;
use crate::service::ServiceSpec;

/// Time the relay has to name the service after opening a stream.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the local target has to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where one service's connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// HOST:PORT as configured.
    pub addr: String,
    /// Network namespace to dial from (then `addr` is an IP address), else the agent's own.
    pub netns: Option<PathBuf>,
}

impl From<&ServiceSpec> for Target {
    fn from(spec: &ServiceSpec) -> Self {
        Target {
            addr: spec.target.clone(),
            netns: spec.netns.clone(),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.netns {
            Some(ns) => write!(f, "{} in network namespace {}", self.addr, ns.display()),
            None => f.write_str(&self.addr),
        }
    }
}

impl Target {
    /// Connects to the target, from inside its namespace if it names one.
    async fn connect(&self) -> std::io::Result<TcpStream> {
        match &self.netns {
            None => TcpStream::connect(self.addr.as_str()).await,
            Some(ns) => {
                let addr: SocketAddr = self.addr.parse().map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{} is not IP:PORT", self.addr),
                    )
                })?;
                crate::netns::connect(ns, addr).await
            }
        }
    }
}

/// A host agent's targets: per tunnel, by service name (kept by [`crate::host::Table`]).
pub type TunnelTargets = std::sync::RwLock<HashMap<String, HashMap<String, Target>>>;

/// Where streams go: an ordinary agent's own services, or a host agent's tunnels' (a stream's
/// [`StreamOpen::tunnel`] names the tunnel).
#[derive(Clone, Default)]
pub struct Targets {
    own: Arc<HashMap<String, Target>>,
    tunnels: Option<Arc<TunnelTargets>>,
}

impl Targets {
    /// An ordinary agent's: its services' targets by name.
    pub fn own(targets: HashMap<String, Target>) -> Self {
        Self {
            own: Arc::new(targets),
            tunnels: None,
        }
    }

    /// A host agent's: the tunnels' targets, as they are added and removed.
    pub fn host(tunnels: Arc<TunnelTargets>) -> Self {
        Self {
            own: Arc::default(),
            tunnels: Some(tunnels),
        }
    }

    /// The target of `service` (of `tunnel`, on a host session), or why there is none.
    pub fn lookup(&self, tunnel: Option<&str>, service: &str) -> Result<Target, String> {
        match (tunnel, &self.tunnels) {
            (None, _) => self
                .own
                .get(service)
                .cloned()
                .ok_or_else(|| format!("this agent has no service named {service:?}")),
            (Some(tunnel), Some(tunnels)) => {
                let tunnels = tunnels.read().unwrap_or_else(|p| p.into_inner());
                let Some(services) = tunnels.get(tunnel) else {
                    return Err(format!("this host agent has no tunnel named {tunnel:?}"));
                };
                services
                    .get(service)
                    .cloned()
                    .ok_or_else(|| format!("tunnel {tunnel:?} has no service named {service:?}"))
            }
            (Some(tunnel), None) => Err(format!(
                "this agent carries no tunnels (asked for tunnel {tunnel:?}); it is not a host agent"
            )),
        }
    }
}

/// Serves one stream from the relay until both directions are closed.
pub async fn serve_stream(mut stream: MuxStream, targets: Targets, stats: Arc<AgentStats>) {
    let open: StreamOpen = match tokio::time::timeout(
        HEADER_TIMEOUT,
        read_frame::<_, StreamOpen>(&mut stream),
    )
    .await
    {
        // The fields are the relay's words and end up in log lines: escaped and cut first.
        Ok(Ok(open)) => StreamOpen {
            service: sanitize(&open.service, MAX_FIELD_LEN).into_owned(),
            peer: sanitize(&open.peer, MAX_FIELD_LEN).into_owned(),
            tunnel: open
                .tunnel
                .map(|t| sanitize(&t, MAX_FIELD_LEN).into_owned()),
        },
        Ok(Err(e)) => {
            let e = sanitize(&e.to_string(), MAX_MESSAGE_LEN).into_owned();
            tracing::debug!("stream without a valid header: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("stream without a header after {HEADER_TIMEOUT:?}");
            return;
        }
    };
    let target = match targets.lookup(open.tunnel.as_deref(), &open.service) {
        Ok(target) => target,
        Err(reason) => {
            tracing::warn!(peer = %open.peer, "{reason}");
            let _ = write_frame(&mut stream, &StreamReply::Refused { reason }).await;
            return;
        }
    };
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, target.connect()).await;
    let tcp = match connected {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return refuse(&mut stream, &open, &target, e.to_string()).await,
        Err(_) => {
            let why = format!("no answer within {CONNECT_TIMEOUT:?}");
            return refuse(&mut stream, &open, &target, why).await;
        }
    };
    let _ = socket::set_nodelay(&tcp);
    if write_frame(&mut stream, &StreamReply::Connected)
        .await
        .is_err()
    {
        return;
    }
    tracing::debug!(tunnel = open.tunnel.as_deref().unwrap_or(""), service = %open.service, peer = %open.peer, "user connected");
    stats.streams_active.fetch_add(1, Ordering::Relaxed);
    stats.streams_total.fetch_add(1, Ordering::Relaxed);
    let mut tcp = Counted::new(tcp, vec![stats.bytes.clone()]);
    let result = bridge(&mut stream, &mut tcp).await;
    stats.streams_active.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(t) => {
            tracing::debug!(service = %open.service, peer = %open.peer, up = t.a_to_b, down = t.b_to_a, "user disconnected")
        }
        Err(e) => {
            tracing::debug!(service = %open.service, peer = %open.peer, "user connection ended: {e}")
        }
    }
}

async fn refuse(stream: &mut MuxStream, open: &StreamOpen, target: &Target, why: String) {
    tracing::warn!(service = %open.service, peer = %open.peer, "cannot reach local target {target}: {why}");
    let reason = format!("{} target {target} unreachable: {why}", open.service);
    let _ = write_frame(stream, &StreamReply::Refused { reason }).await;
}
