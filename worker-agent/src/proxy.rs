//! Egress through a proxy: workers that may only leave through an HTTP or SOCKS5 proxy.
//!
//! [`Proxy`] is the validated setting (`--proxy URL`, or curl's environment variables when no
//! setting is given); [`dial`] opens the TCP path to a relay, directly or through the proxy, and
//! the caller runs TLS to the relay over it as usual. So the relay's certificate is verified end
//! to end, and a TLS-inspecting proxy fails the pin like any impostor would.
//!
//! - `http://` asks with `CONNECT host:port` (Basic auth when a user is given); the answer's head
//!   is parsed with httparse.
//! - `https://` is the same over TLS to the proxy (verified against `--proxy-ca`, else the
//!   system's CA bundle).
//! - `socks5://` resolves the relay's name here, `socks5h://` lets the proxy resolve it
//!   (tokio-socks; username/password auth when a user is given).
//!
//! The password never appears in the URL (such a URL is refused): it comes from a file or the
//! systemd credential `proxy-password`, and [`Proxy`]'s Display and Debug show the user only.
//! A proxy's refusal names the proxy and what it said (status line, SOCKS reply), so an operator
//! can take it to the network team.

use std::fmt;
use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use jumpgate_proto::display::MAX_MESSAGE_LEN;
use jumpgate_proto::{sanitize, Cidr, Secret};
use jumpgate_transport::ws::{tokio_tungstenite, WsIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{pki_types::ServerName, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// The systemd credential (`LoadCredential=proxy-password:FILE`) that stands in for
/// `proxy_password_file`.
pub const PASSWORD_CREDENTIAL: &str = "proxy-password";

/// Longest CONNECT answer head accepted from a proxy.
const MAX_HEAD: usize = 16 * 1024;

/// CA bundles tried, in order, for an `https://` proxy without `--proxy-ca` (Debian, Fedora).
const SYSTEM_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// How the agent talks to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// HTTP CONNECT over plain TCP.
    Http,
    /// HTTP CONNECT over TLS to the proxy.
    Https,
    /// SOCKS5, the relay's name resolved by the agent.
    Socks5,
    /// SOCKS5, the relay's name resolved by the proxy.
    Socks5h,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Socks5 => "socks5",
            Scheme::Socks5h => "socks5h",
        }
    }
}

/// A proxy URL as parsed: never with a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Protocol spoken to the proxy.
    pub scheme: Scheme,
    /// The proxy's host name or IP (IPv6 without brackets).
    pub host: String,
    /// The proxy's port.
    pub port: u16,
    /// User name for the proxy, percent-decoded.
    pub user: Option<String>,
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme.name())?;
        if let Some(user) = &self.user {
            write!(f, "{}@", sanitize(user, 64))?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Decodes `%XX` escapes (user names in URLs); `None` on a malformed escape or non-UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl ProxyUrl {
    /// Parses `SCHEME://[USER@]HOST[:PORT][/]` as curl does: no scheme means `http://`, the port
    /// defaults to 1080 (443 for `https://`). A password in the URL is refused: it would show in
    /// `ps`, logs and config dumps.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (scheme, rest) = match text.split_once("://") {
            Some((s, rest)) => {
                let scheme = match s.to_ascii_lowercase().as_str() {
                    "http" => Scheme::Http,
                    "https" => Scheme::Https,
                    "socks5" => Scheme::Socks5,
                    "socks5h" => Scheme::Socks5h,
                    other => {
                        return Err(format!(
                            "unsupported proxy scheme {:?}; use http://, https://, socks5:// or socks5h://",
                            sanitize(other, 32)
                        ))
                    }
                };
                (scheme, rest)
            }
            None => (Scheme::Http, text),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err("a proxy URL has no path: SCHEME://[USER@]HOST[:PORT]".into());
        }
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                if userinfo.contains(':') {
                    return Err(format!(
                        "the proxy URL carries a password; remove it and put the password in a 0600 file \
                         named by proxy_password_file (or the systemd credential {PASSWORD_CREDENTIAL})"
                    ));
                }
                let user = percent_decode(userinfo)
                    .filter(|u| !u.is_empty())
                    .ok_or("the proxy URL's user name is empty or badly escaped")?;
                // An escaped ':' would smuggle a password into the user name (and the logs).
                if user.contains(':') {
                    return Err("the proxy URL's user name contains ':'; put the password in proxy_password_file".into());
                }
                (Some(user), hostport)
            }
            None => (None, rest),
        };
        let default_port = match scheme {
            Scheme::Https => 443,
            _ => 1080,
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or("unclosed '[' in the proxy address")?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err("junk after the proxy's IPv6 address".into()),
            };
            (host, port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the proxy URL names no host: SCHEME://[USER@]HOST[:PORT]".into());
        }
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("bad proxy port {:?}", sanitize(p, 16)))?,
        };
        Ok(Self {
            scheme,
            host: host.to_string(),
            port,
            user,
        })
    }
}

/// Hosts that bypass the proxy, as curl reads `NO_PROXY`: a comma (or space) separated list of
/// host names, domain suffixes (`.corp` and `corp` both match `corp` and `x.corp`), IP
/// addresses, CIDR blocks, or `*` for everything. Names compare case-insensitively; a `:PORT`
/// after an entry is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    all: bool,
    domains: Vec<String>,
    blocks: Vec<Cidr>,
}

impl NoProxy {
    /// Parses a `NO_PROXY` value; entries that are neither names nor addresses are ignored, as
    /// curl does.
    pub fn parse(text: &str) -> Self {
        let mut out = NoProxy::default();
        for entry in text
            .split([',', ' '])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            if entry == "*" {
                out.all = true;
                continue;
            }
            let unbracketed = entry.trim_start_matches('[');
            let bare = match unbracketed.split_once(']') {
                Some((v6, _)) => v6,
                None => entry,
            };
            if let Ok(block) = bare.parse::<Cidr>() {
                out.blocks.push(block);
                continue;
            }
            // host:port (a name, or an IPv4 address with a port).
            let name = match bare.rsplit_once(':') {
                Some((h, p)) if p.parse::<u16>().is_ok() && !h.contains(':') => h,
                _ => bare,
            };
            if let Ok(block) = name.parse::<Cidr>() {
                out.blocks.push(block);
                continue;
            }
            let name = name.trim_start_matches('.').trim_end_matches('.');
            if !name.is_empty() {
                out.domains.push(name.to_ascii_lowercase());
            }
        }
        out
    }

    /// Whether a relay at `host` (as configured or learned), dialled at `addr` when known, goes
    /// direct.
    pub fn matches(&self, host: &str, addr: Option<IpAddr>) -> bool {
        if self.all {
            return true;
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let ips = host.parse::<IpAddr>().ok().into_iter().chain(addr);
        for ip in ips {
            if self.blocks.iter().any(|b| b.contains(ip)) {
                return true;
            }
        }
        self.domains.iter().any(|d| {
            host == *d
                || host
                    .strip_suffix(d.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        })
    }

    /// Whether nothing bypasses the proxy.
    pub fn is_empty(&self) -> bool {
        !self.all && self.domains.is_empty() && self.blocks.is_empty()
    }
}

/// Added to a failed certificate check when the relay was reached through a proxy.
pub const INSPECTION_HINT: &str = "the relay was reached through a proxy: a TLS-inspecting proxy re-signs certificates, so pins, the relay's CA and client certificates cannot pass it; ask the network team to exempt the relay's host and port from inspection";

/// Where the proxy setting came from, for the start-up line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--proxy` or `proxy` in the file.
    Setting,
    /// The named environment variable.
    Env(&'static str),
}

/// The validated proxy setting: where to go, how to authenticate, what bypasses it.
#[derive(Clone)]
pub struct Proxy {
    /// The proxy, without password.
    pub url: ProxyUrl,
    /// The password (from a file or credential), when a user is given.
    password: Option<Secret>,
    /// Relays that go direct.
    pub no_proxy: NoProxy,
    /// Where the setting came from.
    pub source: Source,
    /// TLS to an `https://` proxy.
    tls: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("url", &self.url.to_string())
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("no_proxy", &self.no_proxy)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.url)
    }
}

/// The environment variables curl reads for an `https://` destination, in its order.
pub const PROXY_VARS: [&str; 4] = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"];
/// The bypass list's variables, in curl's order.
pub const NO_PROXY_VARS: [&str; 2] = ["no_proxy", "NO_PROXY"];

/// What the proxy setting says before validation.
pub enum Choice {
    /// `--proxy none`: always direct, whatever the environment says.
    Off,
    /// `--proxy URL`.
    Url(String),
    /// No setting: look at the environment.
    FromEnv,
}

impl Proxy {
    /// Builds the proxy setting from the choice, the environment (`env`, injected for tests),
    /// the password (read by the caller from its file, when one is named) and the CA bundle
    /// for an `https://` proxy. `Ok(None)`: go direct.
    pub fn resolve(
        choice: Choice,
        env: impl Fn(&str) -> Option<String>,
        password: Option<Secret>,
        proxy_ca: Option<&Path>,
    ) -> Result<Option<Self>, String> {
        let non_empty = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let (text, source) = match choice {
            Choice::Off => return Ok(None),
            Choice::Url(text) if text.trim().eq_ignore_ascii_case("none") => return Ok(None),
            Choice::Url(text) => (text, Source::Setting),
            Choice::FromEnv => match PROXY_VARS
                .iter()
                .find_map(|&var| non_empty(var).map(|v| (v, Source::Env(var))))
            {
                Some(found) => found,
                None => return Ok(None),
            },
        };
        let url = ProxyUrl::parse(&text).map_err(|e| match &source {
            Source::Env(var) => {
                format!("{e} (from the environment variable {var}; pass --proxy none to ignore it)")
            }
            Source::Setting => e,
        })?;
        let no_proxy = NO_PROXY_VARS
            .iter()
            .find_map(|&var| env(var))
            .map(|v| NoProxy::parse(&v))
            .unwrap_or_default();
        if password.is_some() && url.user.is_none() {
            return Err(format!(
                "a proxy password is given but the proxy URL names no user; write it as {}://USER@{}:{}",
                url.scheme.name(),
                url.host,
                url.port
            ));
        }
        let tls = match url.scheme {
            Scheme::Https => Some(web_tls(proxy_ca)?),
            _ => None,
        };
        Ok(Some(Self {
            url,
            password,
            no_proxy,
            source,
            tls,
        }))
    }

    /// The start-up line: the proxy (never its password), where it came from, what bypasses it.
    pub fn describe(&self) -> String {
        let from = match &self.source {
            Source::Setting => "from the proxy setting".to_string(),
            Source::Env(var) => format!("from the environment variable {var}"),
        };
        let auth = match (&self.url.user, &self.password) {
            (Some(_), Some(_)) => ", with a password",
            (Some(_), None) => ", without a password",
            _ => "",
        };
        let bypass = if self.no_proxy.is_empty() {
            String::new()
        } else {
            "; relays matching NO_PROXY go direct".to_string()
        };
        format!(
            "relay connections go through the proxy {} ({from}{auth}){bypass}",
            self.url
        )
    }
}

/// TLS client settings for an `https://` proxy or a `wss://` ingress: its certificate is
/// checked against `ca` or the system's bundle (neither is the relay: the relay's pins do not
/// apply to them; the relay's own TLS runs inside).
pub(crate) fn web_tls(ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let path = match ca {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("SSL_CERT_FILE")
            .map(std::path::PathBuf::from)
            .into_iter()
            .chain(SYSTEM_BUNDLES.iter().map(std::path::PathBuf::from))
            .find(|p| p.is_file())
            .ok_or("an https:// proxy or a wss:// relay needs a CA bundle to verify it (no system bundle found): pass --proxy-ca FILE, or set SSL_CERT_FILE")?,
    };
    let certs = jumpgate_transport::tls::load_certs(&path).map_err(|e| e.to_string())?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "no usable CA certificate in {} for the https:// proxy",
            path.display()
        ));
    }
    let config = ClientConfig::builder_with_provider(jumpgate_transport::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The byte stream to the relay, before the relay's TLS: a socket, or TLS to an `https://`
/// proxy carrying the CONNECT tunnel; and which relay address it reaches.
#[derive(Debug)]
pub struct Egress {
    stream: Stream,
    relay: Option<SocketAddr>,
    proxied: bool,
}

#[derive(Debug)]
enum Stream {
    /// Direct, or through an HTTP / SOCKS5 proxy.
    Tcp(TcpStream),
    /// Through an `https://` proxy.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// TLS to a `wss://` ingress, over any of the above.
    WssTls(Box<tokio_rustls::client::TlsStream<Stream>>),
    /// A WebSocket (`ws://`, or `wss://` over `WssTls`).
    Ws(Box<WsIo<Stream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.get_ref().0,
            Stream::WssTls(s) => s.get_ref().0.tcp(),
            Stream::Ws(s) => s.get_ref().tcp(),
        }
    }
}

impl Egress {
    /// The socket underneath, for keepalive and buffer tuning.
    pub fn tcp(&self) -> &TcpStream {
        self.stream.tcp()
    }

    /// The relay's address, for lanes that must reach the same relay; `None` when a proxy was
    /// asked for the relay by name (lanes then ask for the name again).
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay
    }

    /// Whether the path goes through a proxy (a failed pin may then be an inspecting proxy).
    pub fn proxied(&self) -> bool {
        self.proxied
    }
}

/// Delegates to whichever stream `$s` is.
macro_rules! each {
    ($s:expr, $inner:ident => $body:expr) => {
        match $s {
            Stream::Tcp($inner) => $body,
            Stream::Tls($inner) => $body,
            Stream::WssTls($inner) => $body,
            Stream::Ws($inner) => $body,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

impl AsyncRead for Egress {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if this.proxied && buf.filled().len() > before {
            // Proxies that leave Nagle on hold a small frame until the one before it is
            // acknowledged: acknowledge at once (measured: connections/s through tinyproxy).
            let _ = jumpgate_transport::socket::quick_ack(this.stream.tcp());
        }
        read
    }
}

impl AsyncWrite for Egress {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

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

/// Why the path to a relay could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// A direct connection failed.
    #[error("{0}")]
    Direct(std::io::Error),
    /// A direct connection did not complete in time.
    #[error("timed out")]
    DirectTimeout,
    /// The proxy could not be reached, refused, or did not answer: the text names the proxy
    /// and what it said.
    #[error("{0}")]
    Proxy(String),
}

/// Opens the path to the relay at `host:port` (dialled at `addr` when the agent resolved it):
/// through `proxy` unless the relay matches its NO_PROXY list, then, for a `ws://` or `wss://`
/// relay, the WebSocket upgrade. Each step is bounded by `timeout`.
pub async fn dial(
    proxy: Option<&Proxy>,
    ws: Option<&WsServer>,
    host: &str,
    port: u16,
    addr: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Egress, DialError> {
    let egress = open_path(proxy, host, port, addr, timeout).await?;
    let Some(ws) = ws else {
        return Ok(egress);
    };
    let Egress {
        stream,
        relay,
        proxied,
    } = egress;
    let url = ws.url(host, port);
    let fail = |what: String| DialError::Proxy(format!("WebSocket endpoint {url}: {what}"));
    let upgrade = async {
        let stream = match &ws.tls {
            Some(config) => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| format!("bad TLS name: {e}"))?;
                let tls = TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS to the ingress failed: {e}"))?;
                Stream::WssTls(Box::new(tls))
            }
            None => stream,
        };
        let (socket, _) = tokio_tungstenite::client_async_with_config(
            url.as_str(),
            stream,
            Some(jumpgate_transport::ws::config()),
        )
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(response) => format!(
                "refused the WebSocket upgrade: HTTP {}{}",
                response.status(),
                match response.status().as_u16() {
                    404 => " (check the path in --server and the relay's ws_path)",
                    502..=504 => " (the ingress cannot reach the relay's ws_listen)",
                    _ => "",
                }
            ),
            other => format!("WebSocket upgrade failed: {other}"),
        })?;
        Ok::<_, String>(Stream::Ws(Box::new(WsIo::new(socket))))
    };
    match tokio::time::timeout(timeout, upgrade).await {
        Err(_) => Err(fail(format!("no upgrade within {timeout:?}"))),
        Ok(Err(e)) => Err(fail(e)),
        Ok(Ok(stream)) => Ok(Egress {
            stream,
            relay,
            proxied,
        }),
    }
}

/// The TCP path to `host:port`: direct, or through `proxy` unless NO_PROXY says otherwise.
async fn open_path(
    proxy: Option<&Proxy>,
    host: &str,
    port: u16,
    addr: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Egress, DialError> {
    let proxy = proxy.filter(|p| !p.no_proxy.matches(host, addr.map(|a| a.ip())));
    let Some(proxy) = proxy else {
        let connect = async {
            match addr {
                Some(addr) => TcpStream::connect(addr).await,
                None => TcpStream::connect((host, port)).await,
            }
        };
        return match tokio::time::timeout(timeout, connect).await {
            Err(_) => Err(DialError::DirectTimeout),
            Ok(Err(e)) => Err(DialError::Direct(e)),
            Ok(Ok(tcp)) => Ok(Egress {
                relay: tcp.peer_addr().ok().or(addr),
                stream: Stream::Tcp(tcp),
                proxied: false,
            }),
        };
    };
    // The proxy is asked for the address the agent resolved (one session per relay behind a
    // round-robin name), else for the name.
    let target = match addr {
        Some(a) => a.to_string(),
        None if host.contains(':') => format!("[{host}]:{port}"),
        None => format!("{host}:{port}"),
    };
    let fail = |what: String| DialError::Proxy(format!("proxy {}: {what}", proxy.url));
    let tcp = match tokio::time::timeout(
        timeout,
        TcpStream::connect((proxy.url.host.as_str(), proxy.url.port)),
    )
    .await
    {
        Err(_) => return Err(fail(format!("no TCP connection within {timeout:?}"))),
        Ok(Err(e)) => return Err(fail(format!("cannot connect: {e}"))),
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        match proxy.url.scheme {
            Scheme::Http | Scheme::Socks5 | Scheme::Socks5h => {
                ask_proxy(tcp, proxy, host, port, addr)
                    .await
                    .map(Stream::Tcp)
            }
            Scheme::Https => {
                let config = proxy.tls.clone().ok_or("no TLS settings for the proxy")?;
                let name = ServerName::try_from(proxy.url.host.clone())
                    .map_err(|e| format!("bad TLS name: {e}"))?;
                let mut tls = TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS to the proxy failed: {e}"))?;
                connect_http(&mut tls, proxy, &target).await?;
                Ok(Stream::Tls(Box::new(tls)))
            }
        }
    };
    match tokio::time::timeout(timeout, handshake).await {
        Err(_) => Err(fail(format!(
            "no answer to the request for {target} within {timeout:?}"
        ))),
        Ok(Err(e)) => Err(fail(e)),
        Ok(Ok(stream)) => Ok(Egress {
            stream,
            relay: addr,
            proxied: true,
        }),
    }
}

/// The request for the relay at `host:port` (at `addr` when the agent resolved it) on an open
/// connection to a plain proxy: CONNECT for `http://` (an `https://` proxy runs the same
/// exchange inside its TLS), the SOCKS5 exchange for `socks5://` / `socks5h://`. Everything the
/// proxy answers is parsed here, so the fuzz target `proxy_reply` drives this with arbitrary
/// answers. On success the stream is the tunnel, not one byte of it consumed.
pub async fn ask_proxy<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    proxy: &Proxy,
    host: &str,
    port: u16,
    addr: Option<SocketAddr>,
) -> Result<S, String> {
    match proxy.url.scheme {
        Scheme::Socks5 | Scheme::Socks5h => connect_socks(stream, proxy, host, port, addr).await,
        Scheme::Http | Scheme::Https => {
            let target = match addr {
                Some(a) => a.to_string(),
                None if host.contains(':') => format!("[{host}]:{port}"),
                None => format!("{host}:{port}"),
            };
            connect_http(&mut stream, proxy, &target).await?;
            Ok(stream)
        }
    }
}

/// The request head of an HTTP CONNECT for `target`, with Basic auth when a user is given.
fn connect_request(proxy: &Proxy, target: &str) -> Vec<u8> {
    let mut head = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: worker-agent/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(user) = &proxy.url.user {
        let pass = proxy.password.as_ref().map_or("", |p| p.expose());
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        head.push_str("Proxy-Authorization: Basic ");
        head.push_str(&token);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// What an HTTP proxy's refusal means for the operator.
fn refusal_hint(code: u16) -> &'static str {
    match code {
        // 407 asks for credentials; some proxies (tinyproxy) answer wrong ones with 401.
        401 | 407 => "; the proxy wants other credentials: check the user in the proxy URL and the password in proxy_password_file",
        403 => "; the proxy's policy forbids this destination: ask for CONNECT to the relay's port to be allowed",
        502..=504 => "; the proxy could not reach the relay",
        _ => "",
    }
}

/// Asks an HTTP proxy to CONNECT to `target` and reads its answer's head. Reads byte by byte,
/// so not one byte of the tunnel (the relay speaks only after the agent anyway) is consumed.
async fn connect_http<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    proxy: &Proxy,
    target: &str,
) -> Result<(), String> {
    stream
        .write_all(&connect_request(proxy, target))
        .await
        .map_err(|e| format!("cannot send CONNECT: {e}"))?;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(format!(
                "answer to CONNECT longer than {MAX_HEAD} bytes without ending"
            ));
        }
        let byte = stream.read_u8().await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "closed the connection without answering CONNECT".to_string()
            } else {
                format!("failed while answering CONNECT: {e}")
            }
        })?;
        head.push(byte);
    }
    check_connect_answer(&head, target)
}

/// Checks a proxy's complete answer head to CONNECT: a 2xx opens the tunnel.
fn check_connect_answer(head: &[u8], target: &str) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete answer to CONNECT".into()),
        Err(e) => {
            return Err(format!(
                "answered CONNECT with something that is not HTTP ({e})"
            ))
        }
    }
    let code = response.code.unwrap_or(0);
    if (200..300).contains(&code) {
        return Ok(());
    }
    let reason = sanitize(response.reason.unwrap_or(""), MAX_MESSAGE_LEN);
    Err(format!(
        "refused CONNECT to {target}: {code} {reason}{}",
        refusal_hint(code)
    ))
}

/// Asks a SOCKS5 proxy for the relay; `socks5://` resolves the name here first.
async fn connect_socks<S: AsyncRead + AsyncWrite + Unpin>(
    tcp: S,
    proxy: &Proxy,
    host: &str,
    port: u16,
    addr: Option<SocketAddr>,
) -> Result<S, String> {
    use tokio_socks::tcp::Socks5Stream;
    use tokio_socks::TargetAddr;
    let target: TargetAddr<'_> = match (addr, proxy.url.scheme) {
        (Some(a), _) => TargetAddr::Ip(a),
        (None, Scheme::Socks5) => {
            let a = tokio::net::lookup_host((host, port))
                .await
                .ok()
                .and_then(|mut it| it.next())
                .ok_or_else(|| {
                    format!("cannot resolve {host} here (socks5h:// lets the proxy resolve it)")
                })?;
            TargetAddr::Ip(a)
        }
        (None, _) => match host.parse::<IpAddr>() {
            Ok(ip) => TargetAddr::Ip(SocketAddr::new(ip, port)),
            Err(_) => TargetAddr::Domain(host.into(), port),
        },
    };
    let shown = match &target {
        TargetAddr::Ip(a) => a.to_string(),
        TargetAddr::Domain(d, p) => format!("{d}:{p}"),
    };
    let result = match &proxy.url.user {
        Some(user) => {
            let pass = proxy.password.as_ref().map_or("", |p| p.expose());
            Socks5Stream::connect_with_password_and_socket(tcp, target, user, pass).await
        }
        None => Socks5Stream::connect_with_socket(tcp, target).await,
    };
    match result {
        Ok(stream) => Ok(stream.into_inner()),
        Err(tokio_socks::Error::PasswordAuthFailure(code)) => Err(format!(
            "rejected the user name and password (SOCKS5 status {code}): check the user in the proxy URL and the password in proxy_password_file"
        )),
        Err(tokio_socks::Error::NoAcceptableAuthMethods) => Err(
            "accepts none of the offered authentication methods: give the user in the proxy URL and a password file".into(),
        ),
        Err(e) => Err(format!("refused to connect to {shown}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_like_curl_and_passwords_are_refused() {
        let u = ProxyUrl::parse("http://proxy.corp:3128").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.user),
            (Scheme::Http, "proxy.corp", 3128, None)
        );
        let u = ProxyUrl::parse("proxy.corp").unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Http, 1080));
        let u = ProxyUrl::parse("HTTPS://proxy/").unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Https, 443));
        let u = ProxyUrl::parse("socks5h://al%40ce@[::1]:1080").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.user.as_deref()),
            (Scheme::Socks5h, "::1", 1080, Some("al@ce"))
        );
        assert_eq!(u.to_string(), "socks5h://al@ce@[::1]:1080");
        let u = ProxyUrl::parse("socks5://bob@10.0.0.1:9050").unwrap();
        assert_eq!(u.to_string(), "socks5://bob@10.0.0.1:9050");

        let e = ProxyUrl::parse("http://bob%3Ahunter2@proxy:3128").unwrap_err();
        assert!(e.contains("contains ':'") && !e.contains("hunter2"), "{e}");
        let e = ProxyUrl::parse("http://bob:hunter2@proxy:3128").unwrap_err();
        assert!(
            e.contains("carries a password") && e.contains("proxy_password_file"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        for bad in [
            "ftp://proxy:21",
            "http://",
            "http://proxy:0",
            "http://proxy:99999",
            "http://proxy:3128/path",
            "http://@proxy",
            "http://[::1",
        ] {
            assert!(ProxyUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

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

    #[test]
    fn no_proxy_matches_names_suffixes_addresses_and_blocks() {
        let n = NoProxy::parse(
            "localhost, .corp,example.org , 10.0.0.0/8,192.168.1.7,[::1],relay.lan:7000",
        );
        assert!(n.matches("localhost", None));
        assert!(n.matches("LOCALHOST.", None));
        assert!(n.matches("corp", None));
        assert!(n.matches("relay.corp", None));
        assert!(n.matches("a.b.example.org", None));
        assert!(n.matches("example.org", None));
        assert!(!n.matches("badexample.org", None));
        assert!(!n.matches("corp.evil", None));
        assert!(n.matches("10.1.2.3", None));
        assert!(n.matches("relay.example.com", Some("10.9.9.9".parse().unwrap())));
        assert!(n.matches("192.168.1.7", None));
        assert!(!n.matches("192.168.1.8", None));
        assert!(n.matches("::1", None));
        assert!(n.matches("[::1]", None));
        assert!(n.matches("relay.lan", None));
        assert!(!n.matches("relay.example.com", Some("1.2.3.4".parse().unwrap())));
        // A leading-dot-free suffix matches subdomains too (curl).
        assert!(NoProxy::parse("corp").matches("x.corp", None));
        assert!(NoProxy::parse("*").matches("anything", None));
        assert!(NoProxy::parse("").is_empty());
        assert!(!NoProxy::parse("").matches("x", None));
    }

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_environment_is_read_in_curls_order_and_none_turns_it_off() {
        let vars: &[(&str, &str)] = &[
            ("ALL_PROXY", "socks5://all:1080"),
            ("HTTPS_PROXY", "http://upper:3128"),
            ("https_proxy", ""),
            ("NO_PROXY", ".corp"),
        ];
        let p = Proxy::resolve(Choice::FromEnv, env(vars), None, None)
            .unwrap()
            .unwrap();
        assert_eq!(p.url.host, "upper");
        assert_eq!(p.source, Source::Env("HTTPS_PROXY"));
        assert!(p.no_proxy.matches("r.corp", None));
        assert!(p.describe().contains("HTTPS_PROXY"), "{}", p.describe());
        let p = Proxy::resolve(
            Choice::FromEnv,
            env(&[("ALL_PROXY", "socks5://all:1080")]),
            None,
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.url.scheme, Scheme::Socks5);
        assert!(Proxy::resolve(Choice::FromEnv, env(&[]), None, None)
            .unwrap()
            .is_none());
        assert!(Proxy::resolve(Choice::Off, env(vars), None, None)
            .unwrap()
            .is_none());
        assert!(
            Proxy::resolve(Choice::Url("none".into()), env(vars), None, None)
                .unwrap()
                .is_none()
        );
        let e = Proxy::resolve(
            Choice::FromEnv,
            env(&[("HTTPS_PROXY", "http://u:pw@p:1")]),
            None,
            None,
        )
        .err()
        .unwrap();
        assert!(e.contains("HTTPS_PROXY") && e.contains("--proxy none") && !e.contains("pw@"));
    }

    #[test]
    fn the_password_shows_nowhere_but_in_the_request() {
        let p = Proxy::resolve(
            Choice::Url("http://alice@proxy:3128".into()),
            env(&[]),
            Some(Secret::new("s3cret-pw")),
            None,
        )
        .unwrap()
        .unwrap();
        for text in [format!("{p}"), format!("{p:?}"), p.describe()] {
            assert!(!text.contains("s3cret-pw"), "{text}");
        }
        let req = String::from_utf8(connect_request(&p, "10.0.0.1:7000")).unwrap();
        // base64("alice:s3cret-pw")
        assert!(
            req.contains("Proxy-Authorization: Basic YWxpY2U6czNjcmV0LXB3\r\n"),
            "{req}"
        );
        assert!(req.starts_with("CONNECT 10.0.0.1:7000 HTTP/1.1\r\nHost: 10.0.0.1:7000\r\n"));
        let e = Proxy::resolve(
            Choice::Url("http://proxy:3128".into()),
            env(&[]),
            Some(Secret::new("x")),
            None,
        )
        .err()
        .unwrap();
        assert!(e.contains("names no user"), "{e}");
    }

    #[test]
    fn connect_answers_are_checked_and_refusals_explained() {
        assert!(
            check_connect_answer(b"HTTP/1.1 200 Connection established\r\n\r\n", "r:1").is_ok()
        );
        assert!(check_connect_answer(b"HTTP/1.0 200 OK\r\nVia: x\r\n\r\n", "r:1").is_ok());
        let e = check_connect_answer(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
            "r:1",
        )
        .unwrap_err();
        assert!(
            e.contains("407 Proxy Authentication Required") && e.contains("credentials"),
            "{e}"
        );
        let e = check_connect_answer(b"HTTP/1.1 403 Forbidden\r\n\r\n", "r:1").unwrap_err();
        assert!(e.contains("403 Forbidden") && e.contains("policy"), "{e}");
        let e = check_connect_answer(b"SSH-2.0-OpenSSH\r\n\r\n", "r:1").unwrap_err();
        assert!(e.contains("not HTTP"), "{e}");
        let e = check_connect_answer(b"HTTP/1.1 500 \x1b[31mred\r\n\r\n", "r:1").unwrap_err();
        assert!(!e.contains('\x1b'), "{e:?}");
    }
}
