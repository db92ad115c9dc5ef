//! Relays older than host sessions (protocol version < 3): each tunnel gets an ordinary session
//! of its own there, with the tunnel's name, credential and services in its hello, exactly as
//! an agent per job would have. These sessions are the ordinary agent's
//! ([`super::supervise`]) with the tunnel's settings; they publish on the tunnel's status
//! board, which the table follows ([`crate::host::Table::follow_fallbacks`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{supervise, AgentShared};
use crate::fleet::set::LinkTarget;
use crate::host::table::Change;
use crate::host::TunnelSpec;
use crate::status::StatusBoard;
use crate::streams::Targets;

/// The agent settings of a tunnel's own session: the host's, with the tunnel's name, credential
/// (the host's own when it has none) and services, and no file of its own.
fn tunnel_shared(
    host: &AgentShared,
    spec: &TunnelSpec,
    board: Arc<StatusBoard>,
) -> Arc<AgentShared> {
    let mut config = host.config.clone();
    config.name = spec.name.clone();
    config.token = spec
        .credential
        .clone()
        .or_else(|| host.config.token.clone());
    config.services = spec.services.clone();
    config.host = None;
    config.status_file = None;
    config.metrics = None;
    config.jump_authorized_keys = None;
    Arc::new(AgentShared {
        targets: Targets::own(
            spec.services
                .iter()
                .map(|s| (s.name.clone(), crate::streams::Target::from(s)))
                .collect(),
        ),
        connector: host.connector.clone(),
        status: board,
        stats: host.stats.clone(),
        members: Arc::default(),
        live_links: AtomicUsize::new(1),
        host: None,
        config,
    })
}

/// Runs one session per tunnel on link `id`'s relay (`server`), following the table's changes,
/// until `stop` (the host session there ended). Boxed: the host session that starts it is
/// itself a [`supervise`] future, which this one contains.
pub fn run(
    id: u64,
    server: LinkTarget,
    host: Arc<AgentShared>,
    tunnels: Vec<(TunnelSpec, Arc<StatusBoard>)>,
    changes: mpsc::UnboundedReceiver<Change>,
    stop: CancellationToken,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(follow(id, server, host, tunnels, changes, stop))
}

async fn follow(
    id: u64,
    server: LinkTarget,
    host: Arc<AgentShared>,
    tunnels: Vec<(TunnelSpec, Arc<StatusBoard>)>,
    mut changes: mpsc::UnboundedReceiver<Change>,
    stop: CancellationToken,
) {
    let tasks = TaskTracker::new();
    let mut running: HashMap<String, CancellationToken> = HashMap::new();
    let start = |running: &mut HashMap<String, CancellationToken>,
                 spec: TunnelSpec,
                 board: Arc<StatusBoard>| {
        let cancel = stop.child_token();
        if let Some(old) = running.insert(spec.name.clone(), cancel.clone()) {
            old.cancel();
        }
        let shared = tunnel_shared(&host, &spec, board);
        let (server, name) = (server.clone(), spec.name.clone());
        tasks.spawn(async move {
            if let Err(e) = supervise(id, server, shared, cancel).await {
                tracing::error!(tunnel = %name, "the tunnel's own session stopped: {e}");
            }
        });
    };
    tracing::info!(relay = %server, tunnels = tunnels.len(), "relay is older than host sessions: one session per tunnel there");
    for (spec, board) in tunnels {
        start(&mut running, spec, board);
    }
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => break,
            change = changes.recv() => match change {
                Some(change) => change,
                None => break,
            },
        };
        match change {
            Change::Start { spec, board } => start(&mut running, spec, board),
            Change::Remove { name, .. } => {
                if let Some(cancel) = running.remove(&name) {
                    cancel.cancel();
                }
            }
            Change::Add(_) => {}
        }
    }
    for cancel in running.values() {
        cancel.cancel();
    }
    tasks.close();
    tasks.wait().await;
}
