//! Where the agent tells the platform and the user how to reach it: one stdout line per endpoint
//! (`ssh enabled on 54.123.45.67:12345`) and a JSON status file rewritten atomically.
//!
//! Relays come and go as the fleet changes ([`StatusBoard::add`], [`StatusBoard::remove`]). An
//! endpoint that several relays grant alike (a fleet with one `public_host` and one port per
//! agent on every relay) is printed once and listed once in the file's `services`; each relay's
//! entry still lists what it granted.

use std::path::PathBuf;
use std::sync::Mutex;

use jumpgate_config::write_atomic;
use jumpgate_proto::display::MAX_MESSAGE_LEN;
use jumpgate_proto::sanitize;
use serde::Serialize;

/// One public endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Service name.
    pub name: String,
    /// Relay's public host.
    pub host: String,
    /// Public port (0 when reachable only through the router).
    pub port: u16,
    /// `router host:port as agent-name`, for services without a port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via_router: Option<String>,
}

/// State of the session with one relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// Not connected yet.
    Connecting,
    /// Session up; endpoints reachable.
    Connected,
    /// Session lost; redialling. Endpoints are expected back unchanged.
    Reconnecting,
    /// The relay turned this agent away for good (wrong token, name not allowed): no more
    /// attempts to it until the agent restarts. Its endpoints are gone; other relays carry on.
    Stopped,
}

#[derive(Debug, Clone, Serialize)]
struct RelayEntry {
    #[serde(skip)]
    id: u64,
    server: String,
    /// Learned from another relay's member list rather than configured.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    learned: bool,
    /// Sessions established after the first one.
    #[serde(skip)]
    reconnects: u64,
    state: LinkState,
    services: Vec<Endpoint>,
    /// Why the last attempt failed (sanitized), until a session is up again.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct StatusFile<'a> {
    relay: &'a str,
    services: Vec<&'a Endpoint>,
    relays: &'a [RelayEntry],
}

/// The agent's published state, one entry per relay link, keyed by the link's id.
pub struct StatusBoard {
    file: Option<PathBuf>,
    relays: Mutex<Vec<RelayEntry>>,
    /// A host agent's tunnel: printed lines name it (`vh-exec-123: ssh enabled on ...`).
    tunnel: Option<String>,
    /// Told the link id after every change (never called with the board locked).
    observer: Option<tokio::sync::mpsc::UnboundedSender<(String, u64)>>,
}

impl StatusBoard {
    /// An empty board; links are [`added`](Self::add) as they start.
    pub fn new(file: Option<PathBuf>) -> Self {
        Self {
            file,
            relays: Mutex::new(Vec::new()),
            tunnel: None,
            observer: None,
        }
    }

    /// A board that also tells `observer` which link changed (with the tunnel's name): a host
    /// agent's tunnel served by a session of its own on an older relay reports its placement
    /// this way.
    pub fn observed(mut self, observer: tokio::sync::mpsc::UnboundedSender<(String, u64)>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Link `id`'s state, endpoints and last error.
    pub fn entry(&self, id: u64) -> Option<(LinkState, Vec<Endpoint>, Option<String>)> {
        let relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        relays
            .iter()
            .find(|r| r.id == id)
            .map(|r| (r.state, r.services.clone(), r.error.clone()))
    }

    fn observe(&self, id: u64) {
        if let Some(observer) = &self.observer {
            let _ = observer.send((self.tunnel.clone().unwrap_or_default(), id));
        }
    }

    /// The board of a host agent's tunnel `name`: the same file format, one file per tunnel.
    pub fn for_tunnel(file: Option<PathBuf>, name: &str) -> Self {
        Self {
            tunnel: Some(name.to_string()),
            ..Self::new(file)
        }
    }

    /// A new link `id` to `server`, connecting; listed after the existing ones.
    pub fn add(&self, id: u64, server: String, learned: bool) {
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        relays.retain(|r| r.id != id);
        relays.push(RelayEntry {
            id,
            server,
            learned,
            reconnects: 0,
            state: LinkState::Connecting,
            services: Vec::new(),
            error: None,
        });
        self.write(&relays);
    }

    /// Link `id` is gone (its relay left the fleet): its entry and endpoints too.
    pub fn remove(&self, id: u64) {
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        relays.retain(|r| r.id != id);
        self.write(&relays);
    }

    /// Counts a session re-established by link `id`.
    pub fn reconnected(&self, id: u64) {
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = relays.iter_mut().find(|r| r.id == id) {
            entry.reconnects += 1;
        }
    }

    /// Records link `id`'s endpoints; prints the ones that are new or changed and that no other
    /// relay already granted alike, and returns the lines printed.
    pub fn connected(&self, id: u64, endpoints: Vec<Endpoint>) -> Vec<String> {
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        let Some(at) = relays.iter().position(|r| r.id == id) else {
            return Vec::new();
        };
        let elsewhere = |ep: &Endpoint| {
            relays
                .iter()
                .enumerate()
                .any(|(i, r)| i != at && r.services.contains(ep))
        };
        let lines: Vec<String> = endpoints
            .iter()
            .filter(|ep| !relays[at].services.contains(ep) && !elsewhere(ep))
            .map(|ep| {
                let line = match &ep.via_router {
                    Some(via) => format!("{} enabled via router {via}", ep.name),
                    None => format!("{} enabled on {}:{}", ep.name, ep.host, ep.port),
                };
                match &self.tunnel {
                    Some(tunnel) => format!("{tunnel}: {line}"),
                    None => line,
                }
            })
            .collect();
        let entry = &mut relays[at];
        for line in &lines {
            println!("{line}");
            tracing::info!(relay = %entry.server, "{line}");
        }
        entry.services = endpoints;
        entry.state = LinkState::Connected;
        entry.error = None;
        self.write(&relays);
        drop(relays);
        self.observe(id);
        lines
    }

    /// Records why the latest attempt of link `id` failed; the file is rewritten only when the
    /// reason changes. `reason` must already be sanitized (an [`crate::AgentError`]'s text is).
    pub fn failed(&self, id: u64, reason: &str) {
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = relays.iter_mut().find(|r| r.id == id) else {
            return;
        };
        if entry.error.as_deref() == Some(reason) {
            return;
        }
        entry.error = Some(reason.to_string());
        self.write(&relays);
        drop(relays);
        self.observe(id);
    }

    /// Marks link `id` as given up for good, with why; its endpoints are dropped.
    pub fn stopped(&self, id: u64, reason: &str) {
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = relays.iter_mut().find(|r| r.id == id) {
            entry.state = LinkState::Stopped;
            entry.services.clear();
            entry.error = Some(reason.to_string());
        }
        self.write(&relays);
        drop(relays);
        self.observe(id);
    }

    /// Marks link `id` as reconnecting; its endpoints stay listed.
    pub fn disconnected(&self, id: u64) {
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = relays.iter_mut().find(|r| r.id == id) {
            entry.state = LinkState::Reconnecting;
        }
        self.write(&relays);
        drop(relays);
        self.observe(id);
    }

    /// Each relay's address, link state and reconnect count, configured relays first.
    pub fn states(&self) -> Vec<(String, LinkState, u64)> {
        let relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        relays
            .iter()
            .map(|r| (r.server.clone(), r.state, r.reconnects))
            .collect()
    }

    fn write(&self, relays: &[RelayEntry]) {
        let Some(path) = &self.file else { return };
        let doc = StatusFile {
            relay: relays.first().map(|r| r.server.as_str()).unwrap_or(""),
            services: distinct(relays.iter().flat_map(|r| &r.services)),
            relays,
        };
        let result = serde_json::to_vec_pretty(&doc)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomic(path, &bytes, 0o644));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), "cannot write status file: {e}");
        }
    }
}

/// Each endpoint once, in first-seen order.
fn distinct<'a>(all: impl Iterator<Item = &'a Endpoint>) -> Vec<&'a Endpoint> {
    let mut out: Vec<&Endpoint> = Vec::new();
    for ep in all {
        if !out.contains(&ep) {
            out.push(ep);
        }
    }
    out
}

/// `worker-agent status`: the endpoints a status file lists, one line each.
pub fn describe(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read status file {}: {e}; is worker-agent running with --status-file?",
            path.display()
        )
    })?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("status file {} is not valid JSON: {e}", path.display()))?;
    let mut out = String::new();
    // Each endpoint once, with every relay that grants it: (name, host, port) -> relays.
    let mut endpoints: Vec<((String, String, String), Vec<String>)> = Vec::new();
    for relay in doc["relays"].as_array().into_iter().flatten() {
        let state = relay["state"].as_str().unwrap_or("unknown");
        let server = relay["server"].as_str().unwrap_or("?");
        let services = relay["services"].as_array().cloned().unwrap_or_default();
        let error = relay["error"]
            .as_str()
            .map(|e| sanitize(e, MAX_MESSAGE_LEN));
        match (state, &error) {
            ("stopped", Some(e)) => out.push_str(&format!("relay {server}: stopped: {e}\n")),
            (_, Some(e)) if services.is_empty() => out.push_str(&format!(
                "relay {server}: {state}, no endpoint yet (last error: {e})\n"
            )),
            _ if services.is_empty() => {
                out.push_str(&format!("relay {server}: {state}, no endpoint yet\n"))
            }
            _ => {}
        }
        for s in services {
            let key = (
                s["name"].as_str().unwrap_or("?").to_string(),
                s["host"].as_str().unwrap_or("?").to_string(),
                s["port"].to_string(),
            );
            let by = format!("{server}, {state}");
            match endpoints.iter_mut().find(|(k, _)| *k == key) {
                Some((_, relays)) => relays.push(by),
                None => endpoints.push((key, vec![by])),
            }
        }
    }
    for ((name, host, port), relays) in endpoints {
        let relays = match relays.len() {
            1 => format!("relay {}", relays[0]),
            _ => format!("relays {}", relays.join("; ")),
        };
        out.push_str(&format!("{name} enabled on {host}:{port} ({relays})\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_file_lists_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        let board = StatusBoard::new(Some(path.clone()));
        board.add(0, "relay:7000".into(), false);
        let ep = Endpoint {
            name: "ssh".into(),
            host: "1.2.3.4".into(),
            port: 12345,
            via_router: None,
        };
        board.connected(0, vec![ep]);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["relay"], "relay:7000");
        assert_eq!(v["services"][0]["port"], 12345);
        assert_eq!(v["relays"][0]["state"], "connected");
        board.disconnected(0);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["relays"][0]["state"], "reconnecting");
        assert_eq!(v["services"][0]["host"], "1.2.3.4");
    }

    #[test]
    fn a_stopped_relay_says_why_and_the_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        let board = StatusBoard::new(Some(path.clone()));
        board.add(0, "good:7000".into(), false);
        board.add(1, "bad:7000".into(), false);
        let ep = |host: &str| Endpoint {
            name: "ssh".into(),
            host: host.into(),
            port: 12345,
            via_router: None,
        };
        board.connected(0, vec![ep("1.2.3.4")]);
        board.connected(1, vec![ep("5.6.7.8")]);
        board.failed(1, "connection refused");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["relays"][1]["error"], "connection refused");
        board.stopped(
            1,
            "relay bad:7000 refused this agent: authentication failed",
        );
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["relays"][0]["state"], "connected");
        assert!(v["relays"][0].get("error").is_none());
        assert_eq!(v["relays"][1]["state"], "stopped");
        assert_eq!(v["services"].as_array().unwrap().len(), 1);
        let text = describe(&path).unwrap();
        assert!(
            text.contains("ssh enabled on 1.2.3.4:12345 (relay good:7000, connected)"),
            "{text}"
        );
        assert!(
            text.contains("relay bad:7000: stopped: relay bad:7000 refused"),
            "{text}"
        );
        assert_eq!(board.states()[1].1, LinkState::Stopped);
    }

    /// A fleet with one public host and the same port on every relay: one endpoint in the file's
    /// `services` and in `worker-agent status`, though each relay lists it; a relay granting
    /// another port is listed apart. Removing a relay removes its entry.
    #[test]
    fn one_endpoint_granted_by_several_relays_is_listed_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        let board = StatusBoard::new(Some(path.clone()));
        let ep = |port| Endpoint {
            name: "ssh".into(),
            host: "fleet.example.com".into(),
            port,
            via_router: None,
        };
        board.add(1, "10.0.0.1:7000".into(), false);
        board.add(2, "10.0.0.2:7000".into(), true);
        assert_eq!(
            board.connected(1, vec![ep(12345)]),
            ["ssh enabled on fleet.example.com:12345"]
        );
        assert!(
            board.connected(2, vec![ep(12345)]).is_empty(),
            "printed once for the fleet"
        );
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["services"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["relays"].as_array().unwrap().len(), 2, "{v}");
        assert_eq!(v["relays"][1]["learned"], true);
        assert!(v["relays"][0].get("learned").is_none());
        let text = describe(&path).unwrap();
        assert_eq!(
            text,
            "ssh enabled on fleet.example.com:12345 (relays 10.0.0.1:7000, connected; 10.0.0.2:7000, connected)\n"
        );
        board.add(3, "10.0.0.3:7000".into(), true);
        assert_eq!(
            board.connected(3, vec![ep(23456)]),
            ["ssh enabled on fleet.example.com:23456"]
        );
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["services"].as_array().unwrap().len(), 2, "{v}");
        board.remove(2);
        board.remove(3);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["relays"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(
            describe(&path).unwrap(),
            "ssh enabled on fleet.example.com:12345 (relay 10.0.0.1:7000, connected)\n",
            "a single relay's line keeps its format"
        );
    }
}
