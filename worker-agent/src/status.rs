//! Where the agent tells the platform and the user how to reach it: one stdout line per endpoint
//! (`ssh enabled on 54.123.45.67:12345`) and a JSON status file rewritten atomically.

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
    server: String,
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

/// The agent's published state, one entry per relay.
pub struct StatusBoard {
    file: Option<PathBuf>,
    relays: Mutex<Vec<RelayEntry>>,
}

impl StatusBoard {
    /// A board for these relays, all connecting.
    pub fn new(file: Option<PathBuf>, servers: Vec<String>) -> Self {
        let relays = servers
            .into_iter()
            .map(|server| RelayEntry {
                server,
                state: LinkState::Connecting,
                services: Vec::new(),
                error: None,
            })
            .collect();
        Self {
            file,
            relays: Mutex::new(relays),
        }
    }

    /// Records relay `idx`'s endpoints; prints the ones that are new or changed.
    pub fn connected(&self, idx: usize, endpoints: Vec<Endpoint>) {
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = relays.get_mut(idx) else {
            return;
        };
        for ep in &endpoints {
            if !entry.services.contains(ep) {
                let line = match &ep.via_router {
                    Some(via) => format!("{} enabled via router {via}", ep.name),
                    None => format!("{} enabled on {}:{}", ep.name, ep.host, ep.port),
                };
                println!("{line}");
                tracing::info!(relay = %entry.server, "{line}");
            }
        }
        entry.services = endpoints;
        entry.state = LinkState::Connected;
        entry.error = None;
        self.write(&relays);
    }

    /// Records why the latest attempt to reach relay `idx` failed; the file is rewritten only
    /// when the reason changes. `reason` must already be sanitized (an [`crate::AgentError`]'s
    /// text is).
    pub fn failed(&self, idx: usize, reason: &str) {
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = relays.get_mut(idx) else {
            return;
        };
        if entry.error.as_deref() == Some(reason) {
            return;
        }
        entry.error = Some(reason.to_string());
        self.write(&relays);
    }

    /// Marks relay `idx` as given up for good, with why; its endpoints are dropped.
    pub fn stopped(&self, idx: usize, reason: &str) {
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = relays.get_mut(idx) {
            entry.state = LinkState::Stopped;
            entry.services.clear();
            entry.error = Some(reason.to_string());
        }
        self.write(&relays);
    }

    /// Marks relay `idx` as reconnecting; its endpoints stay listed.
    pub fn disconnected(&self, idx: usize) {
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = relays.get_mut(idx) {
            entry.state = LinkState::Reconnecting;
        }
        self.write(&relays);
    }

    /// Each relay's address and link state, in configuration order.
    pub fn states(&self) -> Vec<(String, LinkState)> {
        let relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        relays.iter().map(|r| (r.server.clone(), r.state)).collect()
    }

    fn write(&self, relays: &[RelayEntry]) {
        let Some(path) = &self.file else { return };
        let doc = StatusFile {
            relay: relays.first().map(|r| r.server.as_str()).unwrap_or(""),
            services: relays.iter().flat_map(|r| &r.services).collect(),
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
            out.push_str(&format!(
                "{} enabled on {}:{} (relay {server}, {state})\n",
                s["name"].as_str().unwrap_or("?"),
                s["host"].as_str().unwrap_or("?"),
                s["port"]
            ));
        }
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
        let board = StatusBoard::new(Some(path.clone()), vec!["relay:7000".into()]);
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
        let board = StatusBoard::new(
            Some(path.clone()),
            vec!["good:7000".into(), "bad:7000".into()],
        );
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
}
