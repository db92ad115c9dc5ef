//! The relay as one process: its listeners bound, its layers built from one configuration,
//! served until shutdown and drained, and re-configured live on SIGHUP.
//!
//! - [`listeners`]: the ports the configuration asks for, bound before anything else is built.
//! - [`store`]: the lease store as the relay opens it, and the restored leases' ports.
//! - [`bind`]: [`Relay::bind`], which loads what the layers need and wires them together.
//! - [`serve`]: [`Relay::serve`], the accept loops and the drain at shutdown.
//! - [`reload`]: [`Reloader`] and the SIGHUP task that applies a re-read configuration.

mod bind;
mod listeners;
mod reload;
mod serve;
mod store;

pub use reload::Reloader;

use std::net::SocketAddr;
use std::sync::Arc;

use jumpgate_transport::tls::Fingerprint;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::Operator;
use crate::agents::Agents;
use crate::jump;
use crate::shards::Shards;
use crate::users::router::Router;

/// A relay whose agent port is bound but not yet serving.
pub struct Relay {
    agents: Arc<Agents>,
    /// The admin API's handle; crate-visible so the admin module's tests can reach a bound
    /// relay's shared parts, as they could when `Relay` sat at the crate root.
    pub(crate) operator: Arc<Operator>,
    webhook: (CancellationToken, Option<JoinHandle<()>>),
    listener: TcpListener,
    admin: Option<(TcpListener, Option<jumpgate_proto::Secret>)>,
    router: Option<(TcpListener, Arc<Router>)>,
    ws: Option<TcpListener>,
    jump: Option<(TcpListener, Arc<jump::server::Jump>)>,
    fingerprint: Fingerprint,
    shards: Option<Shards>,
}

impl Relay {
    /// Address the agent port is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Pin of the relay's certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}
