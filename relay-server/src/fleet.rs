//! The fleet's membership as this relay tells its agents: every relay agents should keep a
//! session with, and where they dial it.
//!
//! [`Fleet`] owns a `watch` of the current list. Sessions read it for their
//! [`Accepted`](jumpgate_proto::Accepted) and push [`Control::Members`](jumpgate_proto::Control)
//! when it changes. The list is this relay (`advertise`), its static `peers` (both reloaded on
//! SIGHUP) and whatever the [`MemberSource`] says, polled every [`POLL_INTERVAL`]: a shared lease
//! store's registry of live relays plugs in there; without one the source is empty and the fleet
//! is what the configuration says.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jumpgate_proto::display::MAX_FIELD_LEN;
use jumpgate_proto::member::MAX_ID_LEN;
use jumpgate_proto::{sanitize, RelayMember, MAX_MEMBERS};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::net::rate_limited_warn;

/// How often the [`MemberSource`] is asked: joins and leaves reach agents within this.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// What a [`MemberSource`] returns: the live relays, or why they could not be read (the last
/// list then stays in force).
pub(crate) type MembersFuture =
    Pin<Box<dyn Future<Output = Result<Vec<RelayMember>, String>> + Send>>;

/// Where the fleet's dynamic members come from, asked every [`POLL_INTERVAL`]: e.g. a closure
/// around a shared lease store's `members()`, mapping each live relay to
/// `RelayMember { id, addr: agent_addr }`.
pub(crate) type MemberSource = Arc<dyn Fn() -> MembersFuture + Send + Sync>;

/// A [`MemberSource`] from an async closure. Wiring a store's registry of live relays is one
/// expression:
///
/// ```ignore
/// Fleet::new(&config, bound_port, Some(fleet::source(move || {
///     let store = store.clone();
///     async move {
///         let live = store.members().await.map_err(|e| e.to_string())?;
///         Ok(live.into_iter().map(|m| RelayMember { id: m.id, addr: m.agent_addr }).collect())
///     }
/// })))
/// ```
pub(crate) fn source<F, Fut>(poll: F) -> MemberSource
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<RelayMember>, String>> + Send + 'static,
{
    Arc::new(move || Box::pin(poll()))
}

/// The relay's view of the fleet; shared by every session.
pub(crate) struct Fleet {
    /// This relay and its configured peers, in that order.
    configured: Mutex<Vec<RelayMember>>,
    /// The latest list from the source.
    dynamic: Mutex<Vec<RelayMember>>,
    source: Option<MemberSource>,
    current: watch::Sender<Arc<Vec<RelayMember>>>,
    /// Poked by a reload, so a changed peer list goes out at once.
    refresh: Notify,
    /// The port the agent listener is bound to, for the default `advertise`.
    bound_port: u16,
    /// Told apart from every other relay process: the id of this relay's own entry.
    instance: String,
}

impl Fleet {
    /// A fleet of this relay (its agent listener bound to `bound_port`) and its configured
    /// peers, plus `source` when there is one.
    pub(crate) fn new(config: &RelayConfig, bound_port: u16, source: Option<MemberSource>) -> Self {
        let instance = format!("{:016x}", rand::random::<u64>());
        let configured = configured_members(config, bound_port, &instance);
        let (current, _) = watch::channel(Arc::new(merge(&configured, &[])));
        Self {
            configured: Mutex::new(configured),
            dynamic: Mutex::new(Vec::new()),
            source,
            current,
            refresh: Notify::new(),
            bound_port,
            instance,
        }
    }

    /// This relay as the list names it (where agents dial it).
    pub(crate) fn itself(&self) -> RelayMember {
        let configured = self.configured.lock().unwrap_or_else(|p| p.into_inner());
        configured.first().cloned().unwrap_or_else(|| RelayMember {
            id: String::new(),
            addr: String::new(),
            ws: None,
        })
    }

    /// Follows membership changes; the receiver's current value is the list right now.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Vec<RelayMember>>> {
        self.current.subscribe()
    }

    /// Takes `advertise` and `peers` from a reloaded configuration.
    pub(crate) fn reconfigure(&self, config: &RelayConfig) {
        let configured = configured_members(config, self.bound_port, &self.instance);
        *self.configured.lock().unwrap_or_else(|p| p.into_inner()) = configured;
        self.publish();
        self.refresh.notify_one();
    }

    /// Asks the source every [`POLL_INTERVAL`] (and after a reload) until `stop`.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let Some(source) = self.source.clone() else {
            return;
        };
        let mut failing = false;
        loop {
            let polled = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(POLL_INTERVAL, source()) => r,
            };
            match polled {
                Ok(Ok(members)) => {
                    if failing {
                        tracing::info!("fleet membership readable again");
                        failing = false;
                    }
                    *self.dynamic.lock().unwrap_or_else(|p| p.into_inner()) = members;
                    self.publish();
                }
                Ok(Err(e)) if !failing => {
                    failing = true;
                    tracing::warn!(
                        "cannot read the fleet's members: {e}; agents keep the last list"
                    );
                }
                Err(_) if !failing => {
                    failing = true;
                    tracing::warn!("reading the fleet's members took longer than {POLL_INTERVAL:?}; agents keep the last list");
                }
                _ => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = self.refresh.notified() => {}
            }
        }
    }

    /// Recomputes the list; subscribers hear of it only when it changed.
    fn publish(&self) {
        let list = {
            let configured = self.configured.lock().unwrap_or_else(|p| p.into_inner());
            let dynamic = self.dynamic.lock().unwrap_or_else(|p| p.into_inner());
            merge(&configured, &dynamic)
        };
        self.current.send_if_modified(|current| {
            if **current == list {
                return false;
            }
            let ids: Vec<&str> = list.iter().map(|m| m.addr.as_str()).collect();
            tracing::info!(members = %ids.join(","), "fleet membership changed");
            *current = Arc::new(list);
            true
        });
    }
}

/// This relay, then its static peers (each with its WebSocket URL when the configuration gave
/// one, for agents that reach the fleet over WebSocket). This relay's id is a random instance number and its
/// address (`INSTANCE@HOST:PORT`): unique even where several relays advertise one shared name,
/// so an agent can tell that two of its sessions reach one relay process. A peer's id is its
/// address.
fn configured_members(config: &RelayConfig, bound_port: u16, instance: &str) -> Vec<RelayMember> {
    let me = config.advertised(bound_port);
    let itself = RelayMember {
        id: format!("{instance}@{me}"),
        addr: me,
        ws: config.ws_public_url.clone(),
    };
    let peers = config.peers.iter().map(|addr| RelayMember {
        id: addr.clone(),
        addr: addr.clone(),
        ws: config.peer_ws.get(addr).cloned(),
    });
    std::iter::once(itself).chain(peers).collect()
}

/// Configured members first, then the source's; each address once, at most [`MAX_MEMBERS`].
/// A source's entry whose address agents could not dial is left out, and ids are escaped and
/// cut, so the list always fits one control frame and agents drop nothing of it.
fn merge(configured: &[RelayMember], dynamic: &[RelayMember]) -> Vec<RelayMember> {
    let mut out: Vec<RelayMember> = Vec::new();
    for m in configured.iter().chain(dynamic) {
        if out.len() == MAX_MEMBERS {
            break;
        }
        if jumpgate_proto::member::parse_host_port(&m.addr).is_none() {
            rate_limited_warn("fleet member address", || {
                tracing::warn!(
                    "leaving fleet member {} out: its address {} is not HOST:PORT",
                    sanitize(&m.id, MAX_FIELD_LEN),
                    sanitize(&m.addr, MAX_FIELD_LEN)
                )
            });
            continue;
        }
        if !out.iter().any(|o| o.addr == m.addr) {
            out.push(RelayMember {
                id: sanitize(&m.id, MAX_ID_LEN).into_owned(),
                addr: m.addr.clone(),
                // Agents would drop a bad URL anyway; leaving it out keeps the frame bounded.
                ws: m
                    .ws
                    .clone()
                    .filter(|url| jumpgate_proto::member::check_ws_url(url)),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &[&str]) -> RelayConfig {
        use clap::Parser;
        let mut args = vec!["relay-server", "--port-range", "10000-10010"];
        if !extra.contains(&"--listen") {
            args.extend(["--listen", "127.0.0.1:7000"]);
        }
        args.extend_from_slice(extra);
        RelayConfig::from_args(crate::config::Cli::parse_from(args).run).unwrap()
    }

    fn addrs(rx: &watch::Receiver<Arc<Vec<RelayMember>>>) -> Vec<String> {
        rx.borrow().iter().map(|m| m.addr.clone()).collect()
    }

    #[test]
    fn the_relay_lists_itself_then_its_peers() {
        let fleet = Fleet::new(
            &config(&["--peers", "relay-b:7000", "--peers", "127.0.0.1:7000"]),
            7000,
            None,
        );
        assert_eq!(
            addrs(&fleet.subscribe()),
            ["127.0.0.1:7000", "relay-b:7000"],
            "default advertise is public_host:listen port, listed once"
        );
        let fleet = Fleet::new(&config(&["--advertise", "[::1]:7001"]), 7000, None);
        assert_eq!(addrs(&fleet.subscribe()), ["[::1]:7001"]);
        let itself = fleet.itself();
        assert!(itself.id.ends_with("@[::1]:7001"), "{itself:?}");
        let other = Fleet::new(&config(&["--advertise", "[::1]:7001"]), 7000, None);
        assert_ne!(
            other.itself().id,
            itself.id,
            "relays sharing an address differ by id"
        );
        fleet.reconfigure(&config(&["--advertise", "[::1]:7001", "--peers", "x:1"]));
        assert_eq!(fleet.itself(), itself, "a reload keeps the id");
        // Listening on port 0: the bound port is advertised.
        let fleet = Fleet::new(&config(&["--listen", "127.0.0.1:0"]), 7123, None);
        assert_eq!(addrs(&fleet.subscribe()), ["127.0.0.1:7123"]);
    }

    #[tokio::test(start_paused = true)]
    async fn source_and_reload_changes_reach_subscribers_once() {
        let list = Arc::new(Mutex::new(vec![RelayMember {
            id: "relay-c".into(),
            addr: "relay-c:7000".into(),
            ws: None,
        }]));
        let source = {
            let list = list.clone();
            source(move || {
                let list = list.lock().unwrap().clone();
                async move { Ok(list) }
            })
        };
        let fleet = Arc::new(Fleet::new(&config(&[]), 7000, Some(source)));
        let mut rx = fleet.subscribe();
        let stop = CancellationToken::new();
        let task = tokio::spawn(fleet.clone().run(stop.clone()));
        rx.changed().await.unwrap();
        assert_eq!(addrs(&rx), ["127.0.0.1:7000", "relay-c:7000"]);
        // Nothing changes: no push.
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        assert!(!rx.has_changed().unwrap());
        list.lock().unwrap().clear();
        rx.changed().await.unwrap();
        assert_eq!(addrs(&rx), ["127.0.0.1:7000"]);
        fleet.reconfigure(&config(&["--peers", "relay-b:7000"]));
        assert!(rx.has_changed().unwrap());
        assert_eq!(addrs(&rx), ["127.0.0.1:7000", "relay-b:7000"]);
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn merged_lists_are_bounded() {
        let many: Vec<RelayMember> = (0..100)
            .map(|i| RelayMember {
                id: i.to_string(),
                addr: format!("10.0.0.{i}:7000"),
                ws: None,
            })
            .collect();
        assert_eq!(merge(&many[..1], &many).len(), MAX_MEMBERS);
        // Whatever the source says, the list fits one frame and agents can dial all of it.
        let hostile: Vec<RelayMember> = (0..100)
            .map(|i| RelayMember {
                id: format!("{i}\n{}", "x".repeat(100_000)),
                addr: if i % 2 == 0 {
                    format!("10.1.0.{i}:7000")
                } else {
                    "not an address".into()
                },
                ws: Some(format!("wss://h/{}", "x".repeat(100_000))),
            })
            .collect();
        let merged = merge(&many[..1], &hostile);
        assert_eq!(merged.len(), 51);
        assert!(merged
            .iter()
            .all(|m| m.id.len() <= MAX_ID_LEN && !m.id.contains('\n') && m.ws.is_none()));
        let frame = jumpgate_proto::encode(&jumpgate_proto::Control::Members {
            relays: merged.clone(),
        });
        assert!(frame.is_ok());
        assert_eq!(
            jumpgate_proto::check_members(&merged).valid.len(),
            merged.len()
        );
    }
}
