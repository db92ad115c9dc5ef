//! A relay reached as WebSocket: its `ws://` / `wss://` URL.

use std::fmt;
use std::sync::Arc;

use jumpgate_proto::sanitize;
use tokio_rustls::rustls::ClientConfig;

use super::tls::web_tls;

/// A relay reached as WebSocket: `ws://HOST[:PORT]/PATH` or `wss://...`.
#[derive(Clone)]
pub struct WsServer {
    /// The URL path of the endpoint.
    pub path: String,
    /// TLS to the ingress (`wss://`), verified against the system's CA bundle
    /// (or `SSL_CERT_FILE`).
    pub tls: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for WsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsServer")
            .field("path", &self.path)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Two endpoints are the same when their paths are and both or neither use TLS (the TLS
/// settings come from one place, the system's CA bundle or `SSL_CERT_FILE`).
impl PartialEq for WsServer {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.tls.is_some() == other.tls.is_some()
    }
}

impl Eq for WsServer {}

impl WsServer {
    /// Parses `ws://HOST[:PORT][/PATH]` / `wss://...` into the address to dial and the
    /// endpoint; `Ok(None)` when `text` is not a WebSocket URL.
    pub fn parse(text: &str) -> Result<Option<(String, u16, Self)>, String> {
        let Some((host, port, secure, path)) = Self::split_url(text)? else {
            return Ok(None);
        };
        let tls = if secure { Some(web_tls(None)?) } else { None };
        Ok(Some((host, port, WsServer { path, tls })))
    }

    /// The parts of a `ws://` / `wss://` URL: host, port, whether it is `wss://`, path; without
    /// building TLS settings. `Ok(None)` when `text` is not a WebSocket URL.
    pub fn split_url(text: &str) -> Result<Option<(String, u16, bool, String)>, String> {
        let text = text.trim();
        let lower = text.to_ascii_lowercase();
        let (secure, rest) = if lower.starts_with("wss://") {
            (true, &text[6..])
        } else if lower.starts_with("ws://") {
            (false, &text[5..])
        } else {
            return Ok(None);
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if hostport.contains('@') || path.contains(['?', '#', ' ']) {
            return Err(
                "a WebSocket relay is ws[s]://HOST[:PORT]/PATH (no user, query or fragment)".into(),
            );
        }
        let default_port = if secure { 443 } else { 80 };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("unclosed '['")?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("bad port {:?}", sanitize(p, 16)))?,
        };
        if host.is_empty() {
            return Err("a WebSocket relay URL names no host".into());
        }
        Ok(Some((host.to_string(), port, secure, path.to_string())))
    }

    /// The endpoint's URL for `host:port`.
    pub fn url(&self, host: &str, port: u16) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        if host.contains(':') {
            format!("{scheme}://[{host}]:{port}{}", self.path)
        } else {
            format!("{scheme}://{host}:{port}{}", self.path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_relays_parse_with_default_ports_and_paths() {
        let (host, port, ws) = WsServer::parse("ws://relay.example.com/jumpgate")
            .unwrap()
            .unwrap();
        assert_eq!(
            (host.as_str(), port, ws.path.as_str()),
            ("relay.example.com", 80, "/jumpgate")
        );
        assert!(ws.tls.is_none());
        assert_eq!(ws.url(&host, port), "ws://relay.example.com:80/jumpgate");
        let (host, port, ws) = WsServer::parse("ws://[::1]:8080").unwrap().unwrap();
        assert_eq!((host.as_str(), port, ws.path.as_str()), ("::1", 8080, "/"));
        assert_eq!(ws.url(&host, port), "ws://[::1]:8080/");
        assert!(WsServer::parse("relay:7000").unwrap().is_none());
        for bad in [
            "ws://",
            "ws://h:0/x",
            "ws://u@h/x",
            "ws://h/x?y",
            "wss://h:99999/",
        ] {
            assert!(WsServer::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
