//! Which relays the agent keeps a session with, as the fleet changes.
//!
//! The set is: every address each `--server` resolves to (a name behind DNS round robin counts
//! as several relays), plus every relay another relay lists as a member of its fleet. Members
//! are learned from any relay and verified as the relay they were learned from (same CA or
//! pins, same TLS server name). Addresses are deduplicated, so a member that is also a
//! configured server is not dialled twice.
//!
//! A relay's listing of itself does not count: a relay that left the fleet must not keep itself
//! in the agent's set. Each relay names its own entry, so a member that is a relay the agent
//! already reaches at another address (a private one, say) is not dialled a second time: two
//! sessions of one agent on one relay would keep taking each other over. For the same reason,
//! when two of the agent's links turn out to reach one relay (a name with an A and an AAAA
//! record for one host), the one that holds the session stays and the other address is parked
//! while it does; and a name whose relay is older than member lists (protocol version 1, which
//! names no relay) is dialled by name again, one session, as before fleets. A link that is no longer wanted (gone from every list, or from DNS) is
//! closed after a grace period, so a relay that restarts, or a DNS answer that rotates, does not
//! flap sessions. Configured servers are never dropped while their name resolves to nothing:
//! their link then dials the name itself. The set is capped ([`AgentConfig::max_relays`]).
//!
//! A relay's member list is not trusted to cost the agent much: only its first names are looked
//! up ([`LinkSet::names_due`]), a batch at a time, concurrently under one deadline, in the
//! background of the planning loop ([`run`]), which keeps reacting to lists, losses and shutdown.
//!
//! [`LinkSet`] is the pure bookkeeping (tested with injected resolutions and clocks); [`run`]
//! drives it: resolves names, starts and cancels link tasks.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jumpgate_proto::member::{check_members, MemberEndpoint};
use jumpgate_proto::RelayMember;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AgentConfig, ServerAddr};
use crate::error::AgentError;
use crate::link::{supervise, AgentShared};

/// How often names are resolved again, and members' names too.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(60);
/// Soonest names are resolved again after a link lost its session (its relay may have moved).
const RESOLVE_AFTER_LOSS: Duration = Duration::from_secs(5);
/// Time allowed for a batch of name lookups, which run at once: a name that has not answered
/// by then counts as unresolved until the next round.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most names looked up in one batch; the rest are due in the next one. With
/// [`LinkSet::names_due`]'s cap per member list, this bounds the lookups a relay (or whoever can
/// write a fleet's member registry) can make every agent do.
const MAX_LOOKUPS_AT_ONCE: usize = 16;
/// Most host names taken from one relay's member list (and never more than `--max-relays`):
/// names past them are not looked up, so not dialled.
const MAX_NAMES_PER_LIST: usize = 16;

/// Which relay a link dials: an address, or a configured name that did not resolve yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LinkKey {
    /// A resolved (or literal) address.
    Addr(SocketAddr),
    /// A learned relay's WebSocket endpoint: its address and path (relays behind one ingress
    /// differ by path).
    Ws(SocketAddr, String),
    /// A configured server whose name could not be resolved; dialled by name.
    Name(ServerAddr),
}

/// Everything a link needs to reach and verify its relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkTarget {
    /// The relay as configured or learned (`host:port`).
    pub server: ServerAddr,
    /// The address to dial; `None`: resolve `server` at every dial.
    pub addr: Option<SocketAddr>,
    /// The TLS server name sent and verified.
    pub tls_name: String,
    /// Learned from a member list rather than configured.
    pub learned: bool,
    /// A learned relay's WebSocket endpoint, dialled instead of its agent port (an agent that
    /// reaches its relays as WebSocket, a relay that advertises `ws_public_url`). Configured
    /// servers find theirs in the configuration.
    pub ws: Option<crate::proxy::WsServer>,
}

impl std::fmt::Display for LinkTarget {
    /// `host:port`, with the address when the host is a name: one name may stand for several
    /// relays.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(addr) if self.server.host.parse::<IpAddr>().is_err() => {
                write!(f, "{} ({addr})", self.server)
            }
            _ => write!(f, "{}", self.server),
        }
    }
}

/// One link of the set.
#[derive(Debug)]
struct Link {
    id: u64,
    key: LinkKey,
    target: LinkTarget,
    /// Since when no configuration, DNS answer or member list wants it.
    unwanted_since: Option<Instant>,
    /// The relay refused this agent for good: not restarted, not counted as live.
    stopped: bool,
}

/// What the relays said, by link id: each one's member list and its own entry in it.
#[derive(Debug, Clone, Default)]
pub struct Heard {
    /// The member list each link's relay sent last.
    pub lists: HashMap<u64, Vec<MemberEndpoint>>,
    /// Each link's relay as its fleet lists it.
    pub itself: HashMap<u64, MemberEndpoint>,
    /// When each link's relay last accepted it, as an increasing count: of two links to one
    /// relay, the later holds the session (the relay replaced the earlier).
    pub accepted: HashMap<u64, u64>,
    /// Links whose relay speaks a protocol version without member lists.
    pub legacy: std::collections::HashSet<u64>,
}

/// Whether two entries name the same relay: the same address, or the same id.
fn same_relay(a: &MemberEndpoint, b: &MemberEndpoint) -> bool {
    (a.host == b.host && a.port == b.port) || (!a.id.is_empty() && a.id == b.id)
}

/// What the driver must do after [`LinkSet::plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Start a link with this id.
    Start(u64, LinkTarget),
    /// Cancel the link with this id: its relay left.
    Stop(u64),
}

/// The set of relay links and why each is there. No I/O: names are resolved by the caller and
/// handed in with [`LinkSet::resolved`].
#[derive(Debug)]
pub struct LinkSet {
    configured: Vec<ServerAddr>,
    tls_override: Option<String>,
    grace: Duration,
    cap: usize,
    names: HashMap<ServerAddr, (Vec<SocketAddr>, Instant)>,
    /// Names looked up without an answer, and when, so they are not asked again at once.
    unresolved: HashMap<ServerAddr, Instant>,
    /// Names last looked up before this are due at once.
    forced: Option<Instant>,
    links: Vec<Link>,
    next_id: u64,
    /// How many wanted relays the cap left out at the last plan (warned about once).
    capped: usize,
    /// Addresses not dialled while the link (by id) that reaches the relay they lead to is in
    /// the set.
    parked: Vec<(LinkKey, u64)>,
    /// Configured names with several addresses whose relay names no relay (version 1): dialled
    /// by name, one session, since their addresses may all be that one relay.
    legacy: std::collections::HashSet<ServerAddr>,
    /// Whether the agent reaches its relays as WebSocket (a `--server ws[s]://`), so members
    /// are dialled at their advertised WebSocket URL; with TLS settings for `wss://` ones (or
    /// why there are none).
    websocket: Option<Result<Arc<tokio_rustls::rustls::ClientConfig>, String>>,
    /// Members dialled at their agent port although the agent uses WebSocket (said once each).
    told_no_ws: std::collections::HashSet<ServerAddr>,
}

impl LinkSet {
    /// A set for `config`'s servers, empty until the first [`plan`](Self::plan).
    pub fn new(config: &AgentConfig) -> Self {
        Self {
            configured: config.servers.clone(),
            tls_override: config.server_name.clone(),
            grace: config.member_grace,
            cap: config.max_relays,
            names: HashMap::new(),
            unresolved: HashMap::new(),
            forced: None,
            links: Vec::new(),
            next_id: 0,
            capped: 0,
            parked: Vec::new(),
            legacy: std::collections::HashSet::new(),
            websocket: websocket_members(config),
            told_no_ws: std::collections::HashSet::new(),
        }
    }

    /// Where a learned member is dialled: its advertised WebSocket endpoint when the agent
    /// reaches its relays as WebSocket and the member has a usable one, else its agent port.
    fn route(&self, m: &MemberEndpoint) -> (ServerAddr, Option<crate::proxy::WsServer>) {
        let direct = || ServerAddr {
            host: m.host.clone(),
            port: m.port,
        };
        let (Some(tls), Some(url)) = (&self.websocket, &m.ws) else {
            return (direct(), None);
        };
        let Ok(Some((host, port, secure, path))) = crate::proxy::WsServer::split_url(url) else {
            return (direct(), None);
        };
        let tls = match (secure, tls) {
            (false, _) => None,
            (true, Ok(tls)) => Some(tls.clone()),
            (true, Err(_)) => return (direct(), None),
        };
        (
            ServerAddr { host, port },
            Some(crate::proxy::WsServer { path, tls }),
        )
    }

    /// Names (configured and learned) to look up now: never resolved, or last resolved more
    /// than `every` ago. IP addresses need no lookup. Only the first host names of each member
    /// list count (at most [`MAX_NAMES_PER_LIST`] and `--max-relays`): a list of 64 names
    /// cannot make the agent look up 64 names.
    pub fn names_due(&self, now: Instant, every: Duration, heard: &Heard) -> Vec<ServerAddr> {
        let per_list = self.cap.min(MAX_NAMES_PER_LIST);
        let learned = heard.lists.values().flat_map(|list| {
            let mut names: Vec<ServerAddr> = Vec::new();
            for m in list {
                let (name, _) = self.route(m);
                if name.host.parse::<IpAddr>().is_err() && !names.contains(&name) {
                    names.push(name);
                }
            }
            names.truncate(per_list);
            names
        });
        let mut due: Vec<ServerAddr> = Vec::new();
        for name in self.configured.iter().cloned().chain(learned) {
            if name.host.parse::<IpAddr>().is_ok() || due.contains(&name) {
                continue;
            }
            let last = self
                .names
                .get(&name)
                .map(|(_, at)| *at)
                .into_iter()
                .chain(self.unresolved.get(&name).copied())
                .max();
            let stale = |at: Instant| {
                now.saturating_duration_since(at) >= every || self.forced.is_some_and(|f| at < f)
            };
            if last.is_none_or(stale) {
                due.push(name);
            }
        }
        due
    }

    /// Records a lookup's answer. A failed or empty answer keeps the previous one: DNS trouble
    /// must not close working sessions.
    pub fn resolved(
        &mut self,
        name: ServerAddr,
        answer: Result<Vec<SocketAddr>, String>,
        now: Instant,
    ) {
        match answer {
            Ok(addrs) if !addrs.is_empty() => {
                let mut distinct: Vec<SocketAddr> = Vec::new();
                for a in addrs {
                    if !distinct.contains(&a) {
                        distinct.push(a);
                    }
                }
                self.unresolved.remove(&name);
                self.names.insert(name, (distinct, now));
            }
            _ => {
                self.unresolved.insert(name, now);
            }
        }
    }

    /// Makes every name looked up before `now` due again (after a lost session: its relay may
    /// have moved).
    pub fn expire_names(&mut self, now: Instant) {
        self.forced = Some(now);
    }

    /// The addresses `name` stands for, as far as known.
    fn addrs_of(&self, name: &ServerAddr) -> Option<Vec<SocketAddr>> {
        match name.host.parse::<IpAddr>() {
            Ok(ip) => Some(vec![SocketAddr::new(ip, name.port)]),
            Err(_) => self.names.get(name).map(|(a, _)| a.clone()),
        }
    }

    /// The links wanted now, configured ones first.
    fn wanted(&self, heard: &Heard) -> Vec<(LinkKey, LinkTarget)> {
        let mut wanted: Vec<(LinkKey, LinkTarget)> = Vec::new();
        let mut push = |key: LinkKey, target: LinkTarget| {
            if !wanted.iter().any(|(k, _)| *k == key) {
                wanted.push((key, target));
            }
        };
        for server in &self.configured {
            let tls_name = self
                .tls_override
                .clone()
                .unwrap_or_else(|| server.host.clone());
            let addrs = match self.legacy.contains(server) {
                true => None,
                false => self.addrs_of(server),
            };
            match addrs {
                Some(addrs) => {
                    for addr in addrs {
                        let target = LinkTarget {
                            server: server.clone(),
                            addr: Some(addr),
                            tls_name: tls_name.clone(),
                            learned: false,
                            ws: None,
                        };
                        push(LinkKey::Addr(addr), target);
                    }
                }
                None => {
                    let target = LinkTarget {
                        server: server.clone(),
                        addr: None,
                        tls_name,
                        learned: false,
                        ws: None,
                    };
                    push(LinkKey::Name(server.clone()), target);
                }
            }
        }
        // Members, in the order of the links that listed them.
        for link in &self.links {
            let Some(members) = heard.lists.get(&link.id) else {
                continue;
            };
            let itself = heard.itself.get(&link.id);
            for m in members {
                if itself.is_some_and(|me| same_relay(me, m)) {
                    continue;
                }
                // A relay the agent already reaches, at whatever address: that link stays.
                let reached = self.links.iter().find(|other| {
                    heard
                        .itself
                        .get(&other.id)
                        .is_some_and(|them| same_relay(them, m))
                });
                if let Some(other) = reached {
                    push(other.key.clone(), other.target.clone());
                    continue;
                }
                let (server, ws) = self.route(m);
                let Some(addrs) = self.addrs_of(&server) else {
                    continue;
                };
                for addr in addrs {
                    let key = match &ws {
                        Some(ws) => LinkKey::Ws(addr, ws.path.clone()),
                        None => LinkKey::Addr(addr),
                    };
                    // A relay's word about itself does not keep it in the set.
                    let itself = key == link.key || link.key == LinkKey::Name(server.clone());
                    if itself {
                        continue;
                    }
                    let target = LinkTarget {
                        server: server.clone(),
                        addr: Some(addr),
                        tls_name: link.target.tls_name.clone(),
                        learned: true,
                        ws: ws.clone(),
                    };
                    push(key, target);
                }
            }
        }
        wanted
    }

    /// Compares what is wanted with what runs: starts links for new relays, closes links no
    /// longer wanted for the grace period. `reports` are the member lists each link's relay
    /// sent last (by link id).
    pub fn plan(&mut self, now: Instant, heard: &Heard) -> Vec<Change> {
        let mut changes = self.one_session_per_relay(heard);
        let mut wanted = self.wanted(heard);
        // Parked addresses stay parked while the link that reaches their relay is in the set.
        let ids = self.ids();
        self.parked.retain(|(_, holder)| ids.contains(holder));
        wanted.retain(|(k, _)| !self.parked.iter().any(|(p, _)| p == k));
        let over = wanted.len().saturating_sub(self.cap);
        if over != self.capped {
            self.capped = over;
            if over > 0 {
                let left: Vec<String> = wanted[self.cap..]
                    .iter()
                    .map(|(_, t)| t.to_string())
                    .collect();
                tracing::warn!(
                    "the fleet has more relays than --max-relays {}: not connecting to {}",
                    self.cap,
                    left.join(", ")
                );
            }
        }
        wanted.truncate(self.cap);
        // A configured name dialled by name that now resolves, or a name's addresses now dialled
        // by name, is replaced at once: they are the same relays, and two sessions to one relay
        // would take each other over.
        let replaced = |link: &Link| match &link.key {
            _ if link.target.learned => false,
            LinkKey::Name(s) => !self.legacy.contains(s) && self.names.contains_key(s),
            LinkKey::Addr(_) => self.legacy.contains(&link.target.server),
            LinkKey::Ws(..) => false,
        };
        let replaced: Vec<u64> = self
            .links
            .iter()
            .filter(|l| replaced(l))
            .map(|l| l.id)
            .collect();
        let grace = self.grace;
        self.links.retain_mut(|link| {
            if wanted.iter().any(|(k, _)| *k == link.key) {
                link.unwanted_since = None;
                return true;
            }
            let since = *link.unwanted_since.get_or_insert(now);
            if replaced.contains(&link.id) || now.saturating_duration_since(since) >= grace {
                if link.target.learned {
                    tracing::info!(relay = %link.target, "relay left the fleet; closing its session");
                } else {
                    tracing::info!(relay = %link.target, "address no longer among those of {}; closing its session", link.target.server);
                }
                changes.push(Change::Stop(link.id));
                return false;
            }
            true
        });
        for (key, target) in wanted {
            if self.links.iter().any(|l| l.key == key) {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            if target.learned {
                tracing::info!(relay = %target, "relay learned from the fleet; connecting");
            }
            if target.learned
                && target.ws.is_none()
                && self.websocket.is_some()
                && self.told_no_ws.insert(target.server.clone())
            {
                tracing::info!(
                    relay = %target,
                    "this agent reaches its relays as WebSocket, but the relay advertises no usable WebSocket URL (its ws_public_url): dialling its agent port"
                );
            }
            changes.push(Change::Start(id, target.clone()));
            self.links.push(Link {
                id,
                key,
                target,
                unwanted_since: None,
                stopped: false,
            });
        }
        changes
    }

    /// Finds links that reach one relay. A version-1 relay behind a configured name with several
    /// addresses makes that name dialled by name from now on. Of links whose relays name the
    /// same entry, the one accepted last holds the session; the others are stopped at once and
    /// their addresses parked.
    fn one_session_per_relay(&mut self, heard: &Heard) -> Vec<Change> {
        for link in &self.links {
            let server = &link.target.server;
            let several = self.names.get(server).is_some_and(|(a, _)| a.len() > 1);
            if heard.legacy.contains(&link.id)
                && !link.target.learned
                && several
                && self.legacy.insert(server.clone())
            {
                tracing::info!(relay = %server, "the relay predates fleet membership (protocol version 1): dialling {server} by name, one session");
            }
        }
        let mut changes = Vec::new();
        // (extra link, the link holding the session with the same relay)
        let mut extra: Vec<(u64, u64)> = Vec::new();
        for link in &self.links {
            let Some(me) = heard.itself.get(&link.id).filter(|me| !me.id.is_empty()) else {
                continue;
            };
            let mine = heard.accepted.get(&link.id).copied().unwrap_or(0);
            // By id: relays sharing one advertised name each have an id of their own.
            let holder = self
                .links
                .iter()
                .filter(|other| other.id != link.id)
                .filter(|other| {
                    heard
                        .itself
                        .get(&other.id)
                        .is_some_and(|them| me.id == them.id)
                })
                .max_by_key(|other| heard.accepted.get(&other.id).copied().unwrap_or(0))
                .filter(|other| heard.accepted.get(&other.id).copied().unwrap_or(0) > mine);
            if let Some(holder) = holder {
                extra.push((link.id, holder.id));
            }
        }
        self.links.retain(|link| {
            let Some((_, holder)) = extra.iter().find(|(id, _)| *id == link.id) else {
                return true;
            };
            tracing::info!(relay = %link.target, "this address reaches a relay the agent already has a session with; closing the second session");
            self.parked.push((link.key.clone(), *holder));
            changes.push(Change::Stop(link.id));
            false
        });
        changes
    }

    /// When the next unwanted link's grace ends, for the driver's timer.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.links
            .iter()
            .filter_map(|l| l.unwanted_since)
            .min()
            .map(|since| since + self.grace)
    }

    /// Link `id` was refused for good: kept (not restarted) until it is no longer wanted.
    pub fn mark_stopped(&mut self, id: u64) {
        if let Some(link) = self.links.iter_mut().find(|l| l.id == id) {
            link.stopped = true;
        }
    }

    /// Whether every link was refused for good (and there is at least one).
    pub fn all_stopped(&self) -> bool {
        !self.links.is_empty() && self.links.iter().all(|l| l.stopped)
    }

    /// Ids of the links, in order.
    pub fn ids(&self) -> Vec<u64> {
        self.links.iter().map(|l| l.id).collect()
    }
}

/// How members are dialled when a `--server` is a WebSocket URL: `Some`, with the TLS settings
/// for `wss://` members (those of a configured `wss://` server, else the system's CA bundle),
/// or why there are none (a `wss://` member is then dialled at its agent port). `None` when the
/// agent dials agent ports.
fn websocket_members(
    config: &AgentConfig,
) -> Option<Result<Arc<tokio_rustls::rustls::ClientConfig>, String>> {
    if config.websocket.is_empty() {
        return None;
    }
    let configured = config.websocket.iter().find_map(|(_, ws)| ws.tls.clone());
    Some(configured.map_or_else(|| crate::proxy::web_tls(None), Ok))
}

/// The member lists relays sent, by link id, shared between the links (which report) and the
/// driver (which reads them when told).
#[derive(Default)]
pub struct MemberReports {
    heard: Mutex<Heard>,
    changed: Notify,
    lost: Notify,
}

impl MemberReports {
    /// Link `id`'s relay accepted the agent: what it says of the fleet and of itself, if its
    /// version says anything.
    pub fn accepted(
        &self,
        id: u64,
        relay: &dyn std::fmt::Display,
        accepted: &jumpgate_proto::Accepted,
    ) {
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let legacy = accepted.version < jumpgate_proto::MEMBERS_SINCE;
        {
            let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
            heard
                .accepted
                .insert(id, COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            if legacy {
                heard.legacy.insert(id);
            } else {
                heard.legacy.remove(&id);
            }
        }
        if legacy {
            self.changed.notify_one();
        } else {
            self.report(id, relay, &accepted.members, accepted.relay.as_ref());
        }
    }

    /// Link `id`'s relay pushed a new member list.
    pub fn pushed(&self, id: u64, relay: &dyn std::fmt::Display, list: &[RelayMember]) {
        self.report(id, relay, list, None);
    }

    /// Records a member list and, with an acceptance, the relay's own entry. Malformed entries
    /// are dropped with a warning; the driver is told only if something changed (an acceptance
    /// always counts: a second session to one relay must be found at once).
    fn report(
        &self,
        id: u64,
        relay: &dyn std::fmt::Display,
        list: &[RelayMember],
        itself: Option<&RelayMember>,
    ) {
        let checked = check_members(list);
        let itself = itself.and_then(|me| check_members(std::slice::from_ref(me)).valid.pop());
        if !checked.rejected.is_empty() || checked.over_limit > 0 {
            tracing::warn!(
                relay = %relay,
                "ignoring part of the relay's member list: {} malformed address(es) ({}), {} past the limit of {}",
                checked.rejected.len(),
                checked.rejected.join(", "),
                checked.over_limit,
                jumpgate_proto::MAX_MEMBERS
            );
        }
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        if let Some(me) = itself {
            heard.itself.insert(id, me);
            changed = true;
        }
        if heard.lists.get(&id) != Some(&checked.valid) {
            tracing::debug!(relay = %relay, members = checked.valid.len(), "member list received");
            heard.lists.insert(id, checked.valid);
            changed = true;
        }
        if changed {
            self.changed.notify_one();
        }
    }

    /// Link `id` lost its session: names may deserve a fresh lookup.
    pub fn lost(&self) {
        self.lost.notify_one();
    }

    fn snapshot(&self) -> Heard {
        self.heard.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Drops what links no longer in the set said (a report can land just after its link was
    /// stopped).
    fn keep_only(&self, ids: &[u64]) {
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        heard.lists.retain(|id, _| ids.contains(id));
        heard.itself.retain(|id, _| ids.contains(id));
        heard.accepted.retain(|id, _| ids.contains(id));
        heard.legacy.retain(|id| ids.contains(id));
    }

    fn forget(&self, id: u64) {
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        heard.lists.remove(&id);
        heard.itself.remove(&id);
        heard.accepted.remove(&id);
        heard.legacy.remove(&id);
    }
}

/// A lookup's answer: addresses, or why there are none.
type Answer = (ServerAddr, Result<Vec<SocketAddr>, String>);

/// Looks up `name`'s addresses.
async fn lookup(name: ServerAddr) -> Result<Vec<SocketAddr>, String> {
    tokio::net::lookup_host((name.host.as_str(), name.port))
        .await
        .map(|addrs| addrs.collect())
        .map_err(|e| e.to_string())
}

/// Looks up `names` all at once, for at most `deadline` in all: a name without an answer by
/// then gets an error, whatever the others do. One slow name costs one deadline, not one each.
async fn resolve_batch<F, Fut>(names: Vec<ServerAddr>, deadline: Duration, lookup: F) -> Vec<Answer>
where
    F: Fn(ServerAddr) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<SocketAddr>, String>> + Send + 'static,
{
    let mut lookups = tokio::task::JoinSet::new();
    for name in &names {
        let answer = lookup(name.clone());
        let name = name.clone();
        lookups.spawn(async move { (name, answer.await) });
    }
    let mut answers: Vec<Answer> = Vec::with_capacity(names.len());
    let _ = tokio::time::timeout(deadline, async {
        while let Some(done) = lookups.join_next().await {
            if let Ok(answer) = done {
                answers.push(answer);
            }
        }
    })
    .await;
    // Dropping the set abandons the lookups still running.
    for name in names {
        if !answers.iter().any(|(n, _)| *n == name) {
            answers.push((name, Err(format!("no answer within {deadline:?}"))));
        }
    }
    answers
}

/// Records a batch's answers in `set`.
fn record(set: &mut LinkSet, answers: Vec<Answer>) {
    let now = Instant::now();
    for (name, answer) in answers {
        if let Err(e) = &answer {
            tracing::warn!(relay = %name, "cannot resolve relay name: {e}");
        }
        set.resolved(name, answer, now);
    }
}

/// Keeps the link set in step with configuration, DNS and the fleet until `stop` fires (Ok) or
/// every link was refused for good (Err, all their errors in link order).
pub async fn run(
    shared: Arc<AgentShared>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), AgentError> {
    run_with(shared, stop, tasks, lookup).await
}

/// [`run`] with the name lookup given (tests inject a slow or hostile DNS).
async fn run_with<F, Fut>(
    shared: Arc<AgentShared>,
    stop: CancellationToken,
    tasks: &TaskTracker,
    lookup: F,
) -> Result<(), AgentError>
where
    F: Fn(ServerAddr) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<SocketAddr>, String>> + Send + 'static,
{
    let mut set = LinkSet::new(&shared.config);
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, AgentError)>();
    let mut cancels: HashMap<u64, CancellationToken> = HashMap::new();
    let mut failures: HashMap<u64, AgentError> = HashMap::new();
    let mut last_forced: Option<Instant> = None;
    let mut ticker = tokio::time::interval(RESOLVE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Lookups run beside the loop, one batch at a time, so a slow or hostile name never holds
    // up planning, member-list changes, failed links or shutdown. Only the first batch (the configured
    // names, before any link exists) is waited for, so a name is not dialled by name and then
    // replaced by its addresses a moment later.
    let mut lookups: tokio::task::JoinSet<Vec<Answer>> = tokio::task::JoinSet::new();
    let mut first = true;
    loop {
        let now = Instant::now();
        let reports = shared.members.snapshot();
        if lookups.is_empty() {
            let mut due = set.names_due(now, RESOLVE_EVERY, &reports);
            due.truncate(MAX_LOOKUPS_AT_ONCE);
            if !due.is_empty() {
                lookups.spawn(resolve_batch(due, RESOLVE_TIMEOUT, lookup.clone()));
            }
        }
        if std::mem::take(&mut first) {
            let done = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                done = lookups.join_next() => done,
            };
            if let Some(Ok(answers)) = done {
                record(&mut set, answers);
            }
        }
        for change in set.plan(Instant::now(), &reports) {
            match change {
                Change::Start(id, target) => {
                    shared.status.add(id, target.to_string(), target.learned);
                    let cancel = stop.child_token();
                    cancels.insert(id, cancel.clone());
                    let (shared, failed_tx) = (shared.clone(), failed_tx.clone());
                    tasks.spawn(async move {
                        if let Err(e) = supervise(id, target, shared, cancel).await {
                            let _ = failed_tx.send((id, e));
                        }
                    });
                }
                Change::Stop(id) => {
                    if let Some(cancel) = cancels.remove(&id) {
                        cancel.cancel();
                    }
                    shared.members.forget(id);
                    shared.status.remove(id);
                    failures.remove(&id);
                }
            }
        }
        shared.members.keep_only(&set.ids());
        shared.live_links.store(
            cancels.len().saturating_sub(failures.len()),
            std::sync::atomic::Ordering::Relaxed,
        );
        let expiry = set.next_expiry().map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = shared.members.changed.notified() => {}
            _ = shared.members.lost.notified() => {
                if last_forced.is_none_or(|t| t.elapsed() >= RESOLVE_AFTER_LOSS) {
                    last_forced = Some(Instant::now());
                    set.expire_names(Instant::now());
                }
            }
            _ = ticker.tick() => {}
            Some(done) = lookups.join_next() => {
                if let Ok(answers) = done {
                    record(&mut set, answers);
                }
            }
            _ = async {
                match expiry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
            Some((id, e)) = failed_rx.recv() => {
                set.mark_stopped(id);
                failures.insert(id, e);
                if set.all_stopped() {
                    let mut errors = Vec::new();
                    for id in set.ids() {
                        if let Some(e) = failures.remove(&id) {
                            errors.push(e);
                        }
                    }
                    return Err(AgentError::all_stopped(errors));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(servers: &[&str], grace: Duration, cap: usize) -> AgentConfig {
        use clap::Parser;
        let mut args = vec![
            "worker-agent".to_string(),
            "--name".into(),
            "a".into(),
            "--fingerprint".into(),
            format!("sha256:{}", "ab".repeat(32)),
        ];
        for s in servers {
            args.extend(["--server".to_string(), s.to_string()]);
        }
        let cli = crate::config::Cli::parse_from(args);
        std::env::set_var("JUMPGATE_TOKEN", "t");
        let mut c = AgentConfig::from_args(cli.run).unwrap();
        c.member_grace = grace;
        c.max_relays = cap;
        c
    }

    fn name(s: &str) -> ServerAddr {
        let (host, port) = s.rsplit_once(':').unwrap();
        ServerAddr {
            host: host.into(),
            port: port.parse().unwrap(),
        }
    }

    fn member(addr: &str) -> MemberEndpoint {
        let (host, port) = jumpgate_proto::member::parse_host_port(addr).unwrap();
        MemberEndpoint {
            id: addr.into(),
            host,
            port,
            ws: None,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn started(changes: &[Change]) -> Vec<(u64, String, Option<SocketAddr>, String)> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Start(id, t) => {
                    Some((*id, t.server.to_string(), t.addr, t.tls_name.clone()))
                }
                Change::Stop(_) => None,
            })
            .collect()
    }

    /// An injected resolver: the names this test's "DNS" knows.
    fn resolve_all(set: &mut LinkSet, dns: &[(&str, &[&str])], now: Instant, reports: &Heard) {
        for n in set.names_due(now, RESOLVE_EVERY, reports) {
            let answer = dns
                .iter()
                .find(|(k, _)| name(k) == n)
                .map(|(_, v)| v.iter().map(|a| addr(a)).collect())
                .ok_or_else(|| "unknown name".to_string());
            set.resolved(n, answer, now);
        }
    }

    /// An agent given a `ws://` server dials members at the WebSocket URL they advertise (one
    /// link per path behind one ingress), and a member without one at its agent port.
    #[test]
    fn members_are_dialled_as_websocket_by_an_agent_that_uses_it() {
        let t0 = Instant::now();
        let advertising = |addr: &str, url: &str| MemberEndpoint {
            ws: Some(url.into()),
            ..member(addr)
        };
        let list = vec![
            advertising("10.0.0.2:7000", "ws://10.0.0.9:80/r2"),
            advertising("10.0.0.3:7000", "ws://10.0.0.9:80/r3"),
            member("10.0.0.4:7000"),
        ];
        let mut heard = Heard::default();
        let mut set = LinkSet::new(&config(
            &["ws://10.0.0.1:8080/jumpgate"],
            Duration::from_secs(60),
            16,
        ));
        set.plan(t0, &heard);
        heard.lists.insert(0, list.clone());
        let changes = set.plan(t0, &heard);
        let routes: Vec<(String, Option<String>)> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Start(_, t) => {
                    Some((t.server.to_string(), t.ws.as_ref().map(|w| w.path.clone())))
                }
                Change::Stop(_) => None,
            })
            .collect();
        assert_eq!(
            routes,
            [
                ("10.0.0.9:80".to_string(), Some("/r2".to_string())),
                ("10.0.0.9:80".to_string(), Some("/r3".to_string())),
                ("10.0.0.4:7000".to_string(), None),
            ]
        );
        // The same list to an agent that dials agent ports: the agent ports.
        let mut set = LinkSet::new(&config(&["10.0.0.1:7000"], Duration::from_secs(60), 16));
        set.plan(t0, &Heard::default());
        let changes = set.plan(t0, &heard);
        assert_eq!(
            started(&changes)
                .into_iter()
                .map(|(_, s, _, _)| s)
                .collect::<Vec<_>>(),
            ["10.0.0.2:7000", "10.0.0.3:7000", "10.0.0.4:7000"]
        );
        assert!(changes
            .iter()
            .all(|c| matches!(c, Change::Start(_, t) if t.ws.is_none())));
    }

    #[test]
    fn a_name_with_several_addresses_is_several_relays() {
        let t0 = Instant::now();
        let mut set = LinkSet::new(&config(
            &["fleet.example:7000"],
            Duration::from_secs(60),
            16,
        ));
        let none = Heard::default();
        let dns: &[(&str, &[&str])] = &[(
            "fleet.example:7000",
            &["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.1:7000"],
        )];
        resolve_all(&mut set, dns, t0, &none);
        let changes = set.plan(t0, &none);
        assert_eq!(
            started(&changes),
            [
                (
                    0,
                    "fleet.example:7000".into(),
                    Some(addr("10.0.0.1:7000")),
                    "fleet.example".into()
                ),
                (
                    1,
                    "fleet.example:7000".into(),
                    Some(addr("10.0.0.2:7000")),
                    "fleet.example".into()
                ),
            ],
            "one link per distinct address, verified as the name"
        );
        // DNS drops one address: its link stays for the grace period, then goes.
        let t1 = t0 + RESOLVE_EVERY;
        let dns: &[(&str, &[&str])] =
            &[("fleet.example:7000", &["10.0.0.1:7000", "10.0.0.3:7000"])];
        resolve_all(&mut set, dns, t1, &none);
        let changes = set.plan(t1, &none);
        assert_eq!(started(&changes).len(), 1, "{changes:?}");
        assert!(!changes.contains(&Change::Stop(1)));
        assert_eq!(set.next_expiry(), Some(t1 + Duration::from_secs(60)));
        assert_eq!(set.plan(t1 + Duration::from_secs(59), &none), []);
        assert_eq!(
            set.plan(t1 + Duration::from_secs(60), &none),
            [Change::Stop(1)]
        );
        // A failed lookup keeps what was known.
        let t2 = t1 + RESOLVE_EVERY * 2;
        resolve_all(&mut set, &[], t2, &none);
        assert_eq!(set.plan(t2 + Duration::from_secs(600), &none), []);
        assert_eq!(set.ids(), [0, 2]);
    }

    #[test]
    fn an_unresolvable_name_is_dialled_by_name_until_it_resolves() {
        let t0 = Instant::now();
        let mut set = LinkSet::new(&config(
            &["relay.example:7000"],
            Duration::from_secs(60),
            16,
        ));
        let none = Heard::default();
        resolve_all(&mut set, &[], t0, &none);
        let changes = set.plan(t0, &none);
        assert_eq!(
            started(&changes),
            [(0, "relay.example:7000".into(), None, "relay.example".into())]
        );
        assert!(
            set.names_due(t0, RESOLVE_EVERY, &none).is_empty(),
            "not asked again at once"
        );
        let t1 = t0 + Duration::from_secs(5);
        set.expire_names(t1);
        let dns: &[(&str, &[&str])] = &[("relay.example:7000", &["10.0.0.9:7000"])];
        resolve_all(&mut set, dns, t1, &none);
        assert!(
            set.names_due(t1, RESOLVE_EVERY, &none).is_empty(),
            "answered since"
        );
        let changes = set.plan(t1, &none);
        assert_eq!(
            changes[0],
            Change::Stop(0),
            "replaced at once, not after the grace"
        );
        assert_eq!(
            started(&changes),
            [(
                1,
                "relay.example:7000".into(),
                Some(addr("10.0.0.9:7000")),
                "relay.example".into()
            )]
        );
    }

    #[test]
    fn members_are_learned_deduplicated_and_dropped_after_the_grace() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(2);
        let mut set = LinkSet::new(&config(&["127.0.0.1:7000"], grace, 16));
        let mut reports = Heard::default();
        assert_eq!(started(&set.plan(t0, &reports)).len(), 1);
        // Relay 0 lists itself (by another spelling of its address), B and a name.
        reports.lists.insert(
            0,
            vec![
                member("127.0.0.1:7000"),
                member("127.0.0.2:7000"),
                member("relay-c.example:7000"),
            ],
        );
        let dns: &[(&str, &[&str])] = &[("relay-c.example:7000", &["10.0.0.3:7000"])];
        resolve_all(&mut set, dns, t0, &reports);
        let changes = set.plan(t0, &reports);
        assert_eq!(
            started(&changes),
            [
                (1, "127.0.0.2:7000".into(), Some(addr("127.0.0.2:7000")), "127.0.0.1".into()),
                (2, "relay-c.example:7000".into(), Some(addr("10.0.0.3:7000")), "127.0.0.1".into()),
            ],
            "learned relays are verified as the relay they were learned from; itself is not doubled"
        );
        // B and C list each other and themselves; relay 0 stops listing C: B still does.
        reports.lists.insert(
            1,
            vec![member("127.0.0.2:7000"), member("relay-c.example:7000")],
        );
        reports
            .lists
            .insert(0, vec![member("127.0.0.1:7000"), member("127.0.0.2:7000")]);
        assert_eq!(set.plan(t0 + grace * 5, &reports), []);
        // Nobody but C itself lists C: dropped after the grace, not before.
        reports.lists.insert(1, vec![member("127.0.0.2:7000")]);
        reports
            .lists
            .insert(2, vec![member("relay-c.example:7000")]);
        let t1 = t0 + grace * 10;
        assert_eq!(set.plan(t1, &reports), []);
        assert_eq!(set.plan(t1 + grace / 2, &reports), []);
        assert_eq!(set.plan(t1 + grace, &reports), [Change::Stop(2)]);
        // A member that is a configured server is not doubled; B comes back before its grace.
        reports.lists.insert(0, vec![member("127.0.0.1:7000")]);
        let t2 = t1 + grace * 2;
        assert_eq!(set.plan(t2, &reports), []);
        reports.lists.insert(0, vec![member("127.0.0.2:7000")]);
        assert_eq!(set.plan(t2 + grace / 2, &reports), []);
        assert_eq!(
            set.plan(t2 + grace * 3, &reports),
            [],
            "B was wanted again in time"
        );
        assert_eq!(set.ids(), [0, 1]);
    }

    /// The agent reaches relay A at a private address; A names itself by its public one, which
    /// relay B lists too. A is not dialled a second time at that address (the two sessions would
    /// keep taking each other over), and B, learned at the address it names itself by, stays.
    #[test]
    fn a_relay_reached_at_another_address_is_not_dialled_twice() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(2);
        let mut set = LinkSet::new(&config(&["10.0.0.1:7000"], grace, 16));
        let mut heard = Heard::default();
        set.plan(t0, &heard);
        heard.itself.insert(0, member("54.1.2.3:7000"));
        heard
            .lists
            .insert(0, vec![member("54.1.2.3:7000"), member("10.0.0.2:7000")]);
        let changes = set.plan(t0, &heard);
        assert_eq!(
            started(&changes),
            [(
                1,
                "10.0.0.2:7000".into(),
                Some(addr("10.0.0.2:7000")),
                "10.0.0.1".into()
            )]
        );
        heard.itself.insert(1, member("10.0.0.2:7000"));
        heard
            .lists
            .insert(1, vec![member("54.1.2.3:7000"), member("10.0.0.2:7000")]);
        for later in 1..5 {
            assert_eq!(set.plan(t0 + grace * later, &heard), []);
        }
        assert_eq!(set.ids(), [0, 1]);
        // Relay ids count as well as addresses.
        let mut renamed = member("relay-a.example:7000");
        renamed.id = "54.1.2.3:7000".into();
        heard
            .lists
            .insert(1, vec![renamed, member("10.0.0.2:7000")]);
        set.resolved(
            name("relay-a.example:7000"),
            Ok(vec![addr("10.0.0.9:7000")]),
            t0,
        );
        assert_eq!(set.plan(t0 + grace * 6, &heard), []);
        heard.itself.insert(0, member("10.0.0.1:7000"));
        let addrs: Vec<Option<SocketAddr>> = started(&set.plan(t0 + grace * 7, &heard))
            .into_iter()
            .map(|(_, _, a, _)| a)
            .collect();
        assert_eq!(
            addrs,
            [Some(addr("54.1.2.3:7000")), Some(addr("10.0.0.9:7000"))],
            "once A no longer claims them, that address and that id are other relays"
        );
    }

    /// A name with an A and an AAAA record for one relay: both addresses are dialled, the relay
    /// names itself alike on both, so the session accepted first (which the second replaced) is
    /// closed and its address parked while the other link is there, restarts of the relay
    /// included.
    #[test]
    fn two_addresses_of_one_relay_get_one_session() {
        let t0 = Instant::now();
        let mut set = LinkSet::new(&config(
            &["relay.example:7000"],
            Duration::from_secs(60),
            16,
        ));
        let mut heard = Heard::default();
        let dns: &[(&str, &[&str])] = &[("relay.example:7000", &["127.0.0.1:7000", "[::1]:7000"])];
        resolve_all(&mut set, dns, t0, &heard);
        assert_eq!(started(&set.plan(t0, &heard)).len(), 2);
        let mut me = member("relay.example:7000");
        me.id = "1a2b@relay.example:7000".into();
        heard.itself.insert(0, me.clone());
        heard.accepted.insert(0, 1);
        assert_eq!(set.plan(t0, &heard), [], "one session is no duplicate");
        heard.itself.insert(1, me.clone());
        heard.accepted.insert(1, 2);
        assert_eq!(set.plan(t0, &heard), [Change::Stop(0)]);
        assert_eq!(set.ids(), [1]);
        // The relay restarts (a new instance id) and link 1 reconnects: 0 stays parked.
        me.id = "3c4d@relay.example:7000".into();
        heard.itself.insert(1, me);
        heard.accepted.insert(1, 3);
        for later in 1..5 {
            assert_eq!(set.plan(t0 + RESOLVE_EVERY * later, &heard), []);
        }
        // Two relays sharing one advertised name are two relays: their ids differ.
        let mut set = LinkSet::new(&config(
            &["fleet.example:7000"],
            Duration::from_secs(60),
            16,
        ));
        let dns: &[(&str, &[&str])] =
            &[("fleet.example:7000", &["10.0.0.1:7000", "10.0.0.2:7000"])];
        let mut heard = Heard::default();
        resolve_all(&mut set, dns, t0, &heard);
        set.plan(t0, &heard);
        for (link, id) in [(0, "aa@fleet.example:7000"), (1, "bb@fleet.example:7000")] {
            let mut me = member("fleet.example:7000");
            me.id = id.into();
            heard.itself.insert(link, me.clone());
            heard.accepted.insert(link, link + 1);
            heard.lists.insert(link, vec![me]);
        }
        assert_eq!(set.plan(t0, &heard), []);
        assert_eq!(set.ids(), [0, 1]);
    }

    /// A relay older than fleet membership behind a name with several addresses: nothing tells
    /// whether they are one relay, so the name is dialled by name again, one session.
    #[test]
    fn a_version_one_relay_behind_several_addresses_is_dialled_by_name() {
        let t0 = Instant::now();
        let mut set = LinkSet::new(&config(
            &["relay.example:7000", "10.0.0.9:7000"],
            Duration::from_secs(60),
            16,
        ));
        let mut heard = Heard::default();
        let dns: &[(&str, &[&str])] =
            &[("relay.example:7000", &["10.0.0.1:7000", "10.0.0.2:7000"])];
        resolve_all(&mut set, dns, t0, &heard);
        assert_eq!(started(&set.plan(t0, &heard)).len(), 3);
        heard.legacy.insert(1);
        heard.legacy.insert(2);
        let changes = set.plan(t0, &heard);
        assert_eq!(
            changes[..2],
            [Change::Stop(0), Change::Stop(1)],
            "{changes:?}"
        );
        assert_eq!(
            started(&changes),
            [(3, "relay.example:7000".into(), None, "relay.example".into())]
        );
        assert_eq!(
            set.ids(),
            [2, 3],
            "an address, or a name with one, stays as it is"
        );
        assert_eq!(set.plan(t0 + RESOLVE_EVERY * 3, &heard), []);
    }

    #[test]
    fn links_are_capped_configured_first() {
        let t0 = Instant::now();
        let mut set = LinkSet::new(&config(
            &["10.0.0.1:7000", "10.0.0.2:7000"],
            Duration::from_secs(60),
            3,
        ));
        let mut reports = Heard::default();
        set.plan(t0, &reports);
        reports.lists.insert(
            0,
            (3..10)
                .map(|i| member(&format!("10.0.0.{i}:7000")))
                .collect(),
        );
        let changes = set.plan(t0, &reports);
        assert_eq!(started(&changes).len(), 1);
        assert_eq!(set.ids(), [0, 1, 2]);
    }

    #[test]
    fn the_agent_stops_only_when_every_link_is_refused() {
        let t0 = Instant::now();
        let mut set = LinkSet::new(&config(
            &["10.0.0.1:7000", "10.0.0.2:7000"],
            Duration::from_secs(60),
            16,
        ));
        let none = Heard::default();
        set.plan(t0, &none);
        assert!(!set.all_stopped());
        set.mark_stopped(0);
        assert!(!set.all_stopped());
        set.mark_stopped(1);
        assert!(set.all_stopped());
        // A stopped link is not restarted by later plans.
        assert_eq!(set.plan(t0, &none), []);
    }

    #[test]
    fn targets_name_their_address_when_the_host_is_a_name() {
        let t = |host: &str, a: Option<&str>| LinkTarget {
            server: name(&format!("{host}:7000")),
            addr: a.map(addr),
            tls_name: host.into(),
            learned: false,
            ws: None,
        };
        assert_eq!(
            t("127.0.0.1", Some("127.0.0.1:7000")).to_string(),
            "127.0.0.1:7000"
        );
        assert_eq!(
            t("fleet", Some("10.0.0.1:7000")).to_string(),
            "fleet:7000 (10.0.0.1:7000)"
        );
        assert_eq!(t("fleet", None).to_string(), "fleet:7000");
    }

    #[test]
    fn a_member_list_of_many_names_costs_a_bounded_number_of_lookups() {
        let t0 = Instant::now();
        let set = LinkSet::new(&config(&["10.0.0.1:7000"], Duration::from_secs(60), 16));
        let mut heard = Heard::default();
        let list: Vec<MemberEndpoint> = (0..64)
            .map(|i| member(&format!("relay-{i}.example:7000")))
            .chain([member("10.0.0.9:7000")])
            .collect();
        heard.lists.insert(0, list.clone());
        let due = set.names_due(t0, RESOLVE_EVERY, &heard);
        assert_eq!(due.len(), MAX_NAMES_PER_LIST, "{due:?}");
        assert_eq!(due[0], name("relay-0.example:7000"));
        // Two relays sending the same list: still the same names.
        heard.lists.insert(1, list);
        assert_eq!(
            set.names_due(t0, RESOLVE_EVERY, &heard).len(),
            MAX_NAMES_PER_LIST
        );
        // --max-relays lower than that lowers it.
        let set = LinkSet::new(&config(&["10.0.0.1:7000"], Duration::from_secs(60), 3));
        assert_eq!(set.names_due(t0, RESOLVE_EVERY, &heard).len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_of_slow_names_costs_one_deadline_and_keeps_fast_answers() {
        let names: Vec<ServerAddr> = (0..MAX_LOOKUPS_AT_ONCE)
            .map(|i| name(&format!("slow-{i}.example:7000")))
            .chain([name("fast.example:7000")])
            .collect();
        let slow_dns = |n: ServerAddr| async move {
            if n.host == "fast.example" {
                Ok(vec![addr("10.0.0.7:7000")])
            } else {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(vec![addr("10.0.0.8:7000")])
            }
        };
        let started = tokio::time::Instant::now();
        let answers = resolve_batch(names.clone(), RESOLVE_TIMEOUT, slow_dns).await;
        assert_eq!(
            started.elapsed(),
            RESOLVE_TIMEOUT,
            "one deadline for the whole batch"
        );
        assert_eq!(answers.len(), names.len());
        for (n, answer) in answers {
            match n.host.as_str() {
                "fast.example" => assert_eq!(answer, Ok(vec![addr("10.0.0.7:7000")])),
                _ => assert!(answer.unwrap_err().contains("no answer within"), "{n}"),
            }
        }
    }

    /// A relay lists names whose lookups never answer, and a relay at an address: the loop
    /// connects to the address at once instead of waiting out the lookups one by one (16 x 5 s
    /// before), and stops promptly while they hang.
    #[tokio::test(start_paused = true)]
    async fn slow_member_names_never_hold_up_planning() {
        let config = config(&["127.0.0.1:1"], Duration::from_secs(60), 16);
        let shared = Arc::new(AgentShared {
            connector: crate::connector(&config).unwrap(),
            targets: Arc::default(),
            status: Arc::new(crate::status::StatusBoard::new(None)),
            stats: Arc::default(),
            members: Arc::default(),
            live_links: Default::default(),
            config,
        });
        let hanging_dns = |_: ServerAddr| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Err::<Vec<SocketAddr>, String>("never".into())
        };
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let driver = tokio::spawn({
            let (shared, stop, tasks) = (shared.clone(), stop.clone(), tasks.clone());
            async move { run_with(shared, stop, &tasks, hanging_dns).await }
        });
        let links = || shared.status.states().len();
        while links() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let list: Vec<RelayMember> = (0..16)
            .map(|i| RelayMember {
                id: format!("slow-{i}"),
                addr: format!("slow-{i}.example:7000"),
                ws: None,
            })
            .chain([RelayMember {
                id: "by-address".into(),
                addr: "127.0.0.2:1".into(),
                ws: None,
            }])
            .collect();
        let pushed = tokio::time::Instant::now();
        shared.members.pushed(0, &"127.0.0.1:1", &list);
        while links() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            pushed.elapsed() < RESOLVE_TIMEOUT,
            "the member at an address waited {:?} for the lookups",
            pushed.elapsed()
        );
        let stopping = tokio::time::Instant::now();
        stop.cancel();
        driver.await.unwrap().unwrap();
        assert!(
            stopping.elapsed() < RESOLVE_TIMEOUT,
            "{:?}",
            stopping.elapsed()
        );
        tasks.close();
        tasks.wait().await;
    }
}
