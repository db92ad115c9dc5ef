//! The proxy setting's sources: `--proxy`, else curl's environment variables (`HTTPS_PROXY`,
//! `ALL_PROXY`, ...) and the `NO_PROXY` bypass list.

use std::net::IpAddr;
use std::path::Path;

use jumpgate_proto::{Cidr, Secret};

use super::tls::web_tls;
use super::url::{ProxyUrl, Scheme};
use super::{Proxy, Source};

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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
