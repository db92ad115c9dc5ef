//! Proxy URLs as curl reads them (`SCHEME://[USER@]HOST[:PORT]`), never with a password.

use std::fmt;

use jumpgate_proto::sanitize;

use super::PASSWORD_CREDENTIAL;

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
    pub(super) fn name(self) -> &'static str {
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
}
