//! The fleet's members as a relay tells its agents: which relays exist and where agents dial
//! them, so an agent given one relay keeps a session with every relay of the fleet.
//!
//! A relay sends the list in [`Accepted::members`](crate::Accepted::members) and pushes
//! [`Control::Members`](crate::Control::Members) when it changes, from protocol version
//! [`MEMBERS_SINCE`] on. Both sides bound and check it here ([`check_members`]): an agent dials
//! what it learns, so a relay (or anyone able to forge its frames) must not make it dial a
//! thousand addresses or log a forged line.

use serde::{Deserialize, Serialize};

use crate::display::MAX_FIELD_LEN;

/// First protocol version in which relays send member lists: older agents could not decode
/// [`Control::Members`](crate::Control::Members) and would drop the session.
pub const MEMBERS_SINCE: u16 = 2;

/// Most relays one member list may name; entries past it are ignored. A fleet is a handful of
/// jump hosts, and an agent keeps one session with each.
pub const MAX_MEMBERS: usize = 64;

/// Longest host name in a member address (DNS allows 253 bytes).
pub const MAX_HOST_LEN: usize = 253;

/// Longest member id kept (escaped): a host name or a UUID fits, and a full list of
/// [`MAX_MEMBERS`] stays well inside one frame.
pub const MAX_ID_LEN: usize = 128;

/// One relay of the fleet, as agents should reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelayMember {
    /// The relay's name in the fleet, for logs and the status file.
    pub id: String,
    /// Where agents dial the relay: `host:port`, `[v6-address]:port` for IPv6.
    pub addr: String,
}

/// A member whose address passed [`check_members`]: safe to dial and to log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemberEndpoint {
    /// The relay's id, escaped and cut for logging.
    pub id: String,
    /// Host name or IP address, without brackets.
    pub host: String,
    /// Agent port.
    pub port: u16,
}

impl std::fmt::Display for MemberEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What [`check_members`] kept of a list and what it dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckedMembers {
    /// Valid members, in the order received, each address once.
    pub valid: Vec<MemberEndpoint>,
    /// Entries dropped for a malformed address (escaped, for one log line).
    pub rejected: Vec<String>,
    /// Entries ignored past [`MAX_MEMBERS`].
    pub over_limit: usize,
}

/// Splits `host:port` (`[v6]:port`). The host must be a plausible DNS name or IP address: no
/// whitespace, control characters, slashes or `@`, at most [`MAX_HOST_LEN`] bytes; the port is
/// not 0. `None` when it is not.
pub fn parse_host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    let port = port.parse::<u16>().ok().filter(|&p| p != 0)?;
    let plausible = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
    if host.is_empty() || host.len() > MAX_HOST_LEN || !host.chars().all(plausible) {
        return None;
    }
    Some((host.to_string(), port))
}

/// Checks a member list from the other side: at most [`MAX_MEMBERS`] entries are looked at,
/// malformed addresses are dropped (and reported escaped), repeated addresses kept once, ids
/// escaped and cut to [`MAX_ID_LEN`].
pub fn check_members(list: &[RelayMember]) -> CheckedMembers {
    let mut out = CheckedMembers {
        over_limit: list.len().saturating_sub(MAX_MEMBERS),
        ..CheckedMembers::default()
    };
    for m in list.iter().take(MAX_MEMBERS) {
        let Some((host, port)) = parse_host_port(&m.addr) else {
            out.rejected
                .push(crate::sanitize(&m.addr, MAX_FIELD_LEN).into_owned());
            continue;
        };
        if out.valid.iter().any(|v| v.host == host && v.port == port) {
            continue;
        }
        out.valid.push(MemberEndpoint {
            id: crate::sanitize(&m.id, MAX_ID_LEN).into_owned(),
            host,
            port,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member(id: &str, addr: &str) -> RelayMember {
        RelayMember {
            id: id.into(),
            addr: addr.into(),
        }
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            parse_host_port("relay-1.example.com:7000"),
            Some(("relay-1.example.com".into(), 7000))
        );
        assert_eq!(
            parse_host_port("127.0.0.2:7000"),
            Some(("127.0.0.2".into(), 7000))
        );
        assert_eq!(parse_host_port("[::1]:7000"), Some(("::1".into(), 7000)));
        for bad in [
            "",
            "host",
            "host:0",
            "host:70000",
            ":7000",
            "::1:7000",
            "[::1:7000",
            "a b:7000",
            "evil\n:7000",
            "user@host:7000",
            "http://x:7000",
            "[]:7000",
        ] {
            assert_eq!(parse_host_port(bad), None, "{bad:?}");
        }
        assert_eq!(parse_host_port(&format!("{}:1", "a".repeat(254))), None);
    }

    #[test]
    fn lists_are_bounded_checked_and_deduplicated() {
        let mut list: Vec<RelayMember> = (0..70)
            .map(|i| member(&format!("r{i}"), &format!("10.0.0.{i}:7000")))
            .collect();
        list[1] = member("bad\nline", "not an address\n");
        list[2] = member("again", "10.0.0.0:7000");
        list[3].id = "id\u{1b}[2J".into();
        let checked = check_members(&list);
        assert_eq!(checked.over_limit, 6);
        assert_eq!(checked.valid.len(), MAX_MEMBERS - 2);
        assert_eq!(checked.rejected, vec!["not an address\\n".to_string()]);
        assert_eq!(checked.valid[1].id, "id\\u{1b}[2J");
        assert_eq!(checked.valid[0].to_string(), "10.0.0.0:7000");
        let v6 = check_members(&[member("six", "[fd00::1]:7000")]);
        assert_eq!(v6.valid[0].to_string(), "[fd00::1]:7000");
    }

    /// The largest list a relay sends (every member at the longest id and host) fits one frame
    /// with room for the rest of an acceptance.
    #[test]
    fn a_full_list_fits_one_frame() {
        let host = format!("{}.example", "h".repeat(MAX_HOST_LEN - 8));
        let relays: Vec<RelayMember> = (0..MAX_MEMBERS)
            .map(|i| RelayMember {
                id: format!("{i:0>width$}", width = MAX_ID_LEN),
                addr: format!("{host}:{}", 10000 + i),
            })
            .collect();
        assert_eq!(check_members(&relays).valid.len(), MAX_MEMBERS);
        let frame = crate::encode(&crate::Control::Members { relays }).unwrap();
        println!("full member list: {} bytes", frame.len());
        assert!(frame.len() < crate::MAX_FRAME_LEN / 2, "{}", frame.len());
    }

    proptest! {
        #[test]
        fn whatever_is_kept_is_safe_to_dial_and_log(
            list in proptest::collection::vec(("\\PC{0,30}|.{0,300}", "\\PC{0,40}|[a-z.]{1,20}:[0-9]{1,5}"), 0..80)
        ) {
            let list: Vec<RelayMember> = list.into_iter().map(|(id, addr)| RelayMember { id, addr }).collect();
            let checked = check_members(&list);
            prop_assert!(checked.valid.len() <= MAX_MEMBERS);
            prop_assert_eq!(checked.over_limit, list.len().saturating_sub(MAX_MEMBERS));
            prop_assert!(checked.valid.len() + checked.rejected.len() <= list.len().min(MAX_MEMBERS));
            let distinct: std::collections::HashSet<_> = checked.valid.iter().map(|m| (&m.host, m.port)).collect();
            prop_assert_eq!(distinct.len(), checked.valid.len());
            for m in &checked.valid {
                prop_assert!(m.port != 0 && !m.host.is_empty() && m.host.len() <= MAX_HOST_LEN);
                prop_assert!(m.id.len() <= MAX_ID_LEN && !m.id.contains('\n'));
                // What is kept reads back the same.
                prop_assert_eq!(parse_host_port(&m.to_string()), Some((m.host.clone(), m.port)));
            }
        }
    }
}
