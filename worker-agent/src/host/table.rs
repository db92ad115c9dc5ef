//! The host agent's shared tunnel table: what every relay link's session registers, what each
//! relay answered, the targets streams are bridged to, and one status file per tunnel.
//!
//! A link's session [`attach`](Table::attach)es when the relay accepted its host hello: it
//! gets every tunnel's registration at once and a channel for later additions and removals
//! (both handed out under one lock, so no change falls between them), reports each answer
//! ([`placed`](Table::placed), [`refused`](Table::refused)) and
//! [`detach`](Table::detach)es when the session ends. Every change wakes the callers of
//! [`add`](Table::add) waiting for their answers.
//!
//! A relay older than host sessions is attached as a fallback instead, each tunnel running a
//! session of its own there: that side of the table is in `table/fallback.rs`.

mod fallback;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jumpgate_proto::display::{MAX_FIELD_LEN, MAX_MESSAGE_LEN};
use jumpgate_proto::tunnel::TunnelHello;
use jumpgate_proto::{sanitize, Allocation, Refusal};
use jumpgate_session::{tunnel_hello, Identity, Placement};
use tokio::sync::{mpsc, watch};

use super::{RelayTunnel, RelayView, TunnelError, TunnelSpec, TunnelView};
use crate::status::{Endpoint, StatusBoard};
use crate::streams::TunnelTargets;

/// A change a live session applies to its relay.
pub enum Change {
    /// Register (or re-register) this tunnel.
    Add(TunnelHello),
    /// Start a session of this tunnel's own (a relay older than host sessions).
    Start {
        /// The tunnel.
        spec: TunnelSpec,
        /// Its status board.
        board: Arc<StatusBoard>,
    },
    /// Unregister this tunnel (or stop its own session).
    Remove {
        /// The tunnel.
        name: String,
        /// Free its ports at once.
        release: bool,
    },
}

/// One tunnel's state on one relay link.
struct PerRelay {
    server: String,
    state: RelayTunnel,
    /// Ports this relay gave the tunnel's services, asked for again at the next registration.
    remembered: HashMap<String, u16>,
    public_host: Option<String>,
}

struct Tunnel {
    spec: TunnelSpec,
    identity: Identity,
    relays: BTreeMap<u64, PerRelay>,
    board: Arc<StatusBoard>,
}

/// A live session of one relay link.
struct Attached {
    server: String,
    public_host: String,
    router: Option<String>,
    changes: mpsc::UnboundedSender<Change>,
    /// A relay older than host sessions: each tunnel runs a session of its own there.
    fallback: bool,
}

#[derive(Default)]
struct Inner {
    tunnels: BTreeMap<String, Tunnel>,
    links: BTreeMap<u64, Attached>,
}

/// The tunnels of a host agent and where each stands on each relay.
pub struct Table {
    inner: Mutex<Inner>,
    /// Bumped on every answer, attachment and detachment.
    changed: watch::Sender<u64>,
    status_dir: Option<PathBuf>,
    software: String,
    targets: Arc<TunnelTargets>,
    /// Boards that changed, (tunnel, link): fallback sessions report placements this way.
    observed: mpsc::UnboundedSender<(String, u64)>,
    observations: Mutex<Option<mpsc::UnboundedReceiver<(String, u64)>>>,
}

impl Table {
    /// An empty table; `status_dir`: where each tunnel's status file (`NAME.json`) goes.
    pub fn new(status_dir: Option<PathBuf>) -> Self {
        let (observed, observations) = mpsc::unbounded_channel();
        Self {
            observed,
            observations: Mutex::new(Some(observations)),
            inner: Mutex::default(),
            changed: watch::channel(0).0,
            status_dir,
            software: format!("worker-agent {}", env!("CARGO_PKG_VERSION")),
            targets: Arc::default(),
        }
    }

    /// Each tunnel's targets by service, for the streams the relays open.
    pub fn targets(&self) -> Arc<TunnelTargets> {
        self.targets.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn status_file(&self, name: &str) -> Option<PathBuf> {
        self.status_dir
            .as_ref()
            .map(|dir| dir.join(format!("{name}.json")))
    }

    /// Link `id`'s session to `server` was accepted by a relay that holds tunnels: returns every
    /// tunnel's registration and the channel of later changes.
    pub fn attach(
        &self,
        id: u64,
        server: &str,
        public_host: &str,
        router: Option<&str>,
    ) -> (Vec<TunnelHello>, mpsc::UnboundedReceiver<Change>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        inner.links.insert(
            id,
            Attached {
                server: server.to_string(),
                public_host: public_host.to_string(),
                router: router.map(str::to_string),
                changes: tx,
                fallback: false,
            },
        );
        let hellos = inner
            .tunnels
            .values_mut()
            .map(|t| registering(t, id, server))
            .collect();
        drop(inner);
        self.bump();
        (hellos, rx)
    }

    /// Link `id`'s session ended: its tunnels wait for the next one.
    pub fn detach(&self, id: u64) {
        let mut inner = self.lock();
        inner.links.remove(&id);
        for t in inner.tunnels.values_mut() {
            if let Some(r) = t.relays.get_mut(&id) {
                r.state = RelayTunnel::Disconnected;
                t.board.disconnected(id);
            }
        }
        drop(inner);
        self.bump();
    }

    /// Link `id`'s relay placed tunnel `name` on `allocations` (the relay's words: only the
    /// tunnel's own services are kept, sanitized).
    pub fn placed(&self, id: u64, name: &str, allocations: &[Allocation]) {
        let mut inner = self.lock();
        let Inner { tunnels, links } = &mut *inner;
        let (Some(t), Some(link)) = (tunnels.get_mut(name), links.get(&id)) else {
            return;
        };
        let placement = Placement::of_allocations(
            &link.public_host,
            link.router.as_deref(),
            allocations,
            &t.identity,
        );
        let endpoints: Vec<Endpoint> = placement
            .ports
            .iter()
            .map(|p| Endpoint {
                name: p.name.clone(),
                host: placement.public_host.clone(),
                port: p.port,
                via_router: match (p.port, &placement.router) {
                    (0, Some(router)) => Some(format!("{router} as {name}")),
                    _ => None,
                },
            })
            .collect();
        if placement.ignored > 0 {
            tracing::warn!(relay = %link.server, tunnel = %name, "ignoring {} port allocations for services this tunnel did not ask for (or listed twice)", placement.ignored);
        }
        let Some(r) = t.relays.get_mut(&id) else {
            return;
        };
        for p in &placement.ports {
            if p.port != 0 {
                r.remembered.insert(p.name.clone(), p.port);
            }
        }
        r.public_host = Some(placement.public_host.clone());
        r.state = RelayTunnel::Placed {
            endpoints: endpoints.clone(),
        };
        t.board.connected(id, endpoints);
        drop(inner);
        self.bump();
    }

    /// Link `id`'s relay refused tunnel `name` (`retry`: registered again after a backoff), or
    /// closed it (`closed`).
    pub fn refused(&self, id: u64, name: &str, refusal: &Refusal, retry: bool, closed: bool) {
        let reason = sanitize(&refusal.to_string(), MAX_MESSAGE_LEN).into_owned();
        let mut inner = self.lock();
        let Some(t) = inner.tunnels.get_mut(name) else {
            return;
        };
        let Some(r) = t.relays.get_mut(&id) else {
            return;
        };
        let what = if closed { "closed" } else { "refused" };
        if retry {
            tracing::warn!(relay = %r.server, tunnel = %name, "relay {what} the tunnel: {reason}; registering it again with backoff");
            r.state = RelayTunnel::Retrying {
                reason: reason.clone(),
            };
            t.board.failed(id, &reason);
        } else {
            tracing::error!(relay = %r.server, tunnel = %name, "relay {what} the tunnel for good: {reason}");
            r.state = RelayTunnel::Refused {
                reason: reason.clone(),
            };
            t.board.stopped(id, &reason);
        }
        drop(inner);
        self.bump();
    }

    /// Adds (or replaces) `spec` and waits up to `timeout` for the connected relays' answers.
    pub(super) async fn add(
        &self,
        spec: TunnelSpec,
        timeout: Duration,
    ) -> Result<TunnelView, TunnelError> {
        let name = spec.name.clone();
        let mut changed = self.changed.subscribe();
        {
            let mut inner = self.lock();
            let identity = Identity {
                name: spec.name.clone(),
                token: spec.credential.clone(),
                software: self.software.clone(),
                max_lanes: 0,
                services: spec
                    .services
                    .iter()
                    .map(crate::service::ServiceSpec::request)
                    .collect(),
                jump_keys: spec.jump_keys.clone(),
                host: false,
            };
            let targets = spec
                .services
                .iter()
                .map(|s| (s.name.clone(), crate::streams::Target::from(s)))
                .collect();
            self.targets
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone(), targets);
            let Inner { tunnels, links } = &mut *inner;
            let tunnel = match tunnels.remove(&name) {
                Some(mut old) => {
                    old.spec = spec;
                    old.identity = identity;
                    old
                }
                None => Tunnel {
                    spec,
                    identity,
                    relays: BTreeMap::new(),
                    board: Arc::new(
                        StatusBoard::for_tunnel(self.status_file(&name), &name)
                            .observed(self.observed.clone()),
                    ),
                },
            };
            let tunnel = tunnels.entry(name.clone()).or_insert(tunnel);
            for (id, link) in links.iter() {
                let hello = registering(tunnel, *id, &link.server);
                let change = if link.fallback {
                    Change::Start {
                        spec: tunnel.spec.clone(),
                        board: tunnel.board.clone(),
                    }
                } else {
                    Change::Add(hello)
                };
                let _ = link.changes.send(change);
            }
            tracing::info!(tunnel = %name, relays = links.len(), "tunnel added");
        }
        let wait = async {
            loop {
                {
                    let inner = self.lock();
                    let Some(t) = inner.tunnels.get(&name) else {
                        return;
                    };
                    let answered = inner.links.keys().all(|id| {
                        t.relays
                            .get(id)
                            .is_some_and(|r| r.state != RelayTunnel::Registering)
                    });
                    if answered && !inner.links.is_empty() {
                        return;
                    }
                }
                if changed.changed().await.is_err() {
                    return;
                }
            }
        };
        let timed_out = tokio::time::timeout(timeout, wait).await.is_err();
        let view = self
            .get(&name)
            .ok_or_else(|| TunnelError::NotFound(name.clone()))?;
        if view
            .relays
            .iter()
            .any(|r| matches!(r.state, RelayTunnel::Placed { .. }))
        {
            return Ok(view);
        }
        let reasons: Vec<(String, String)> = view
            .relays
            .iter()
            .filter_map(|r| match &r.state {
                RelayTunnel::Refused { reason } | RelayTunnel::Retrying { reason } => {
                    Some((r.relay.clone(), reason.clone()))
                }
                _ => None,
            })
            .collect();
        if timed_out || reasons.is_empty() {
            return Err(TunnelError::Timeout {
                name,
                after: timeout,
                view: Box::new(view),
            });
        }
        // Refused everywhere it was answered: not kept, so the platform can fix and add again.
        let _ = self.remove(&name, false);
        Err(TunnelError::Refused { name, reasons })
    }

    /// Removes tunnel `name` from every relay and the table.
    pub(super) fn remove(&self, name: &str, release: bool) -> Result<TunnelView, TunnelError> {
        let mut inner = self.lock();
        let Some(t) = inner.tunnels.remove(name) else {
            return Err(TunnelError::NotFound(name.to_string()));
        };
        let view = view(&t);
        for link in inner.links.values() {
            let _ = link.changes.send(Change::Remove {
                name: name.to_string(),
                release,
            });
        }
        drop(inner);
        self.targets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(path) = self.status_file(name) {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), "cannot remove the tunnel's status file: {e}");
                }
            }
        }
        tracing::info!(tunnel = %name, release, "tunnel removed");
        self.bump();
        Ok(view)
    }

    /// Every tunnel, by name.
    pub(super) fn list(&self) -> Vec<TunnelView> {
        self.lock().tunnels.values().map(view).collect()
    }

    /// Tunnel `name`.
    pub(super) fn get(&self, name: &str) -> Option<TunnelView> {
        self.lock().tunnels.get(name).map(view)
    }
}

/// Marks `t` registering on link `id` and returns its registration there.
fn registering(t: &mut Tunnel, id: u64, server: &str) -> TunnelHello {
    let r = t.relays.entry(id).or_insert_with(|| {
        t.board.add(id, server.to_string(), false);
        PerRelay {
            server: server.to_string(),
            state: RelayTunnel::Registering,
            remembered: HashMap::new(),
            public_host: None,
        }
    });
    r.state = RelayTunnel::Registering;
    tunnel_hello(&t.identity, &r.remembered)
}

fn view(t: &Tunnel) -> TunnelView {
    TunnelView {
        name: t.spec.name.clone(),
        services: t.spec.services.clone(),
        relays: t
            .relays
            .values()
            .map(|r| RelayView {
                relay: r.server.clone(),
                state: r.state.clone(),
            })
            .collect(),
        public_host: t
            .relays
            .values()
            .filter(|r| matches!(r.state, RelayTunnel::Placed { .. }))
            .find_map(|r| r.public_host.clone())
            .map(|h| sanitize(&h, MAX_FIELD_LEN).into_owned()),
    }
}
