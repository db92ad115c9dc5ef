//! The table's side of relays older than host sessions: there each tunnel runs a session of
//! its own ([`crate::link::fallback`]), which publishes on the tunnel's status board, and the
//! table follows those boards to know where each tunnel stands, as it hears it directly from a
//! host session elsewhere.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{registering, Attached, Change, Table};
use crate::host::{RelayTunnel, TunnelSpec};
use crate::status::{LinkState, StatusBoard};

impl Table {
    /// Link `id`'s relay is older than host sessions: each tunnel gets a session of its own
    /// there. Returns every tunnel and the channel of later changes ([`Change::Start`],
    /// [`Change::Remove`]).
    pub fn attach_fallback(
        &self,
        id: u64,
        server: &str,
    ) -> (
        Vec<(TunnelSpec, Arc<StatusBoard>)>,
        mpsc::UnboundedReceiver<Change>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        inner.links.insert(
            id,
            Attached {
                server: server.to_string(),
                public_host: String::new(),
                router: None,
                changes: tx,
                fallback: true,
            },
        );
        let tunnels = inner
            .tunnels
            .values_mut()
            .map(|t| {
                registering(t, id, server);
                (t.spec.clone(), t.board.clone())
            })
            .collect();
        drop(inner);
        self.bump();
        (tunnels, rx)
    }

    /// Follows what fallback sessions publish on their tunnels' boards until `stop`, so the
    /// table (and [`add`](Self::add)'s callers) see their placements.
    pub async fn follow_fallbacks(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let Some(mut rx) = self
            .observations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        loop {
            let (name, id) = tokio::select! {
                _ = stop.cancelled() => return,
                got = rx.recv() => match got {
                    Some(got) => got,
                    None => return,
                },
            };
            let board = {
                let inner = self.lock();
                if !inner.links.get(&id).is_some_and(|l| l.fallback) {
                    continue;
                }
                match inner.tunnels.get(&name) {
                    Some(t) => t.board.clone(),
                    None => continue,
                }
            };
            // Read the board unlocked: the table's lock is taken before a board's elsewhere.
            let Some((state, endpoints, error)) = board.entry(id) else {
                continue;
            };
            let state = match (state, error) {
                (LinkState::Connected, _) => RelayTunnel::Placed { endpoints },
                (LinkState::Stopped, reason) => RelayTunnel::Refused {
                    reason: reason.unwrap_or_default(),
                },
                (LinkState::Reconnecting, _) => RelayTunnel::Disconnected,
                (LinkState::Connecting, Some(reason)) => RelayTunnel::Retrying { reason },
                (LinkState::Connecting, None) => RelayTunnel::Registering,
            };
            let mut inner = self.lock();
            if let Some(r) = inner
                .tunnels
                .get_mut(&name)
                .and_then(|t| t.relays.get_mut(&id))
            {
                if let RelayTunnel::Placed { endpoints } = &state {
                    r.public_host = endpoints.first().map(|e| e.host.clone());
                }
                r.state = state;
            }
            drop(inner);
            self.bump();
        }
    }
}
