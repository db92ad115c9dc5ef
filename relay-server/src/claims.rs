//! What a credential may claim and hold: agent-name patterns (a tokens-file entry's `agents`,
//! a signed join token's subject) and caps on names, leases and sessions. The policy grants
//! them, join tokens carry them and the lease store enforces the caps; all three use this
//! module, which uses none of them.

use jumpgate_proto::validate_name;

/// A name an agent credential may claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NamePattern {
    Exact(String),
    Prefix(String),
}

impl NamePattern {
    /// An exact agent name, or `prefix-*`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let (body, prefix) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        if prefix && body.is_empty() {
            return Ok(NamePattern::Prefix(String::new()));
        }
        validate_name("agent", body).map_err(|e| format!("pattern {text:?}: {e}"))?;
        Ok(if prefix {
            NamePattern::Prefix(body.to_string())
        } else {
            NamePattern::Exact(body.to_string())
        })
    }

    /// Whether `name` is this name or starts with this prefix.
    pub(crate) fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(n) => n == name,
            NamePattern::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

/// How much one credential may hold, so a job (or a team token) cannot hoard the port range,
/// the names or the relay: names (with leases, or a live session, `--no-port` ones included),
/// leases over all those names, and live sessions on this relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialCaps {
    /// Agent names, fleet-wide.
    pub names: usize,
    /// Leased ports, fleet-wide.
    pub leases: usize,
    /// Live agent sessions on this relay.
    pub sessions: usize,
}
