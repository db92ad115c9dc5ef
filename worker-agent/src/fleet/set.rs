//! The set of relay links and why each is there: pure bookkeeping, no I/O. Names are resolved
//! by the driver ([`super::run`]) and handed in; what the relays said of the fleet comes in as
//! [`Heard`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jumpgate_proto::member::MemberEndpoint;

use crate::config::{AgentConfig, ServerAddr};

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

#[cfg(test)]
pub(super) mod tests;
