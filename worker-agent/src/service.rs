//! One service an agent exposes, as configured (`NAME=HOST:PORT[@PREFERRED[!]][,netns=NS]` or
//! a `[[service]]` table) and as the relay is asked for it. Below the settings, the host's
//! tunnels and the link, which all hold services.

use std::path::PathBuf;

use jumpgate_config::ConfigError;
use jumpgate_proto::{validate_name, Cidr};
use jumpgate_session::Service;

/// Splits HOST:PORT (IPv6 as [ADDR]:PORT).
pub(crate) fn split_host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.trim().rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse().ok().filter(|&p| p != 0)?;
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// One service to expose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service name, e.g. `ssh`.
    pub name: String,
    /// Local target, HOST:PORT.
    pub target: String,
    /// Port of the target.
    pub target_port: u16,
    /// Public port to ask for.
    pub preferred_port: Option<u16>,
    /// Refuse any other public port.
    pub strict: bool,
    /// Who may reach this service (empty: whoever the relay allows).
    pub allow: Vec<Cidr>,
    /// Reachable only through the relay's router, without a public port.
    pub no_port: bool,
    /// Network namespace file the target is dialled from (a container's own network), if any.
    pub netns: Option<PathBuf>,
}

impl ServiceSpec {
    /// Parses `NAME=HOST:PORT[@PREFERRED[!]][,netns=NS]`.
    pub fn parse(full: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| {
            ConfigError::Invalid {
            key: "service",
            detail: format!("{full:?}: {why}; expected NAME=HOST:PORT[@PREFERRED[!]][,netns=NS], e.g. ssh=127.0.0.1:22@12345 or ssh=127.0.0.1:22,netns=/proc/4242/ns/net"),
        }
        };
        let mut parts = full.split(',');
        let spec = parts.next().unwrap_or_default();
        let mut netns = None;
        for option in parts {
            match option.trim().split_once('=') {
                Some(("netns", value)) if netns.is_none() => netns = Some(value),
                Some(("netns", _)) => return Err(bad("netns is given twice")),
                _ => return Err(bad(&format!("unknown option {option:?} (known: netns=)"))),
            }
        }
        let (name, rest) = spec.split_once('=').ok_or_else(|| bad("missing '='"))?;
        let (target, preferred) = match rest.rsplit_once('@') {
            Some((t, p)) => (t, Some(p)),
            None => (rest, None),
        };
        let (preferred_port, strict) = match preferred {
            None => (None, false),
            Some(p) => {
                let (p, strict) = p.strip_suffix('!').map_or((p, false), |p| (p, true));
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| bad("bad preferred port"))?;
                (Some(port), strict)
            }
        };
        let mut parsed = Self::new(name, target, preferred_port, strict);
        if let (Ok(spec), Some(ns)) = (&mut parsed, netns) {
            if let Err(e) = spec.set_netns(ns) {
                parsed = Err(e);
            }
        }
        parsed.map_err(|e| match e {
            ConfigError::Invalid { detail, .. } => bad(&detail),
            other => other,
        })
    }

    /// Sets the namespace the target is dialled from. Such a target must be an IP address:
    /// a name would be resolved in the agent's own network, not the namespace's.
    pub(crate) fn set_netns(&mut self, value: &str) -> Result<(), ConfigError> {
        let invalid = |detail: String| ConfigError::Invalid {
            key: "service",
            detail,
        };
        let path = crate::netns::resolve(value).map_err(invalid)?;
        if self.target.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(format!(
                "target {:?} of a netns service must be IP:PORT (names would be resolved outside the namespace)",
                self.target
            )));
        }
        self.netns = Some(path);
        Ok(())
    }

    /// A service without options (allowlist, namespace, router-only), checked.
    pub(crate) fn new(
        name: &str,
        target: &str,
        preferred_port: Option<u16>,
        strict: bool,
    ) -> Result<Self, ConfigError> {
        let invalid = |detail: String| ConfigError::Invalid {
            key: "service",
            detail,
        };
        validate_name("service", name).map_err(|e| invalid(e.to_string()))?;
        let (_, target_port) = split_host_port(target)
            .ok_or_else(|| invalid(format!("target {target:?} is not HOST:PORT")))?;
        Ok(Self {
            name: name.to_string(),
            target: target.trim().to_string(),
            target_port,
            preferred_port,
            strict,
            allow: Vec::new(),
            no_port: false,
            netns: None,
        })
    }

    /// This service as the session core asks the relay for it (an agent's own, or a host's
    /// tunnel's).
    pub fn request(&self) -> Service {
        Service {
            name: self.name.clone(),
            target_port: self.target_port,
            preferred_port: self.preferred_port,
            strict: self.strict,
            allow: self.allow.clone(),
            no_port: self.no_port,
        }
    }
}
