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
//!
//! The pieces, one job each: [`url`] parses proxy URLs, [`env`] reads curl's environment
//! variables and `NO_PROXY`, [`tls`] builds the TLS settings for an `https://` proxy or a
//! `wss://` ingress, [`http_connect`] and [`socks5`] speak to the proxy, [`ws`] parses a
//! WebSocket relay's URL, [`dial`] opens the path and [`egress`] is the stream it returns.

mod dial;
mod egress;
mod env;
mod http_connect;
mod socks5;
mod tls;
mod url;
mod ws;

use std::fmt;
use std::sync::Arc;

use jumpgate_proto::Secret;
use tokio_rustls::rustls::ClientConfig;

pub use dial::{ask_proxy, dial, DialError};
pub use egress::Egress;
pub use env::{Choice, NoProxy, NO_PROXY_VARS, PROXY_VARS};
pub(crate) use tls::web_tls;
pub use url::{ProxyUrl, Scheme};
pub use ws::WsServer;

/// The systemd credential (`LoadCredential=proxy-password:FILE`) that stands in for
/// `proxy_password_file`.
pub const PASSWORD_CREDENTIAL: &str = "proxy-password";

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

impl Proxy {
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
