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
    /// Where agents that reach the fleet only as WebSocket dial the relay
    /// (`wss://HOST[:PORT]/PATH`, the relay's `ws_public_url`). Optional on the wire: absent
    /// from relays that have none or predate it, and ignored by agents that predate it (member
    /// entries are decoded without `deny_unknown_fields`), so no protocol version is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws: Option<String>,
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
    /// The relay's WebSocket URL, when it advertises one that passed [`check_ws_url`].
    pub ws: Option<String>,
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

/// Longest WebSocket URL kept in a member entry.
pub const MAX_WS_URL_LEN: usize = 200;

/// Whether `url` is a plausible WebSocket URL to dial and log: `ws://` or `wss://`, then a
/// `host[:port]` as [`parse_host_port`] accepts it (the port optional) and a path; printable
/// ASCII without spaces, user info, query or fragment, at most [`MAX_WS_URL_LEN`] bytes. The
/// agent parses it again before dialling; this only keeps junk out of lists and logs.
pub fn check_ws_url(url: &str) -> bool {
    if url.len() > MAX_WS_URL_LEN || !url.bytes().all(|b| b.is_ascii_graphic()) {
        return false;
    }
    let lower = url.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("wss://")
        .or_else(|| lower.strip_prefix("ws://"))
    else {
        return false;
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if path.contains(['?', '#']) || authority.contains('@') {
        return false;
    }
    let with_port = match authority.rsplit_once(':') {
        Some((_, port))
            if !authority.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            authority.to_string()
        }
        _ => format!("{authority}:1"),
    };
    parse_host_port(&with_port).is_some()
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
            // A bad URL costs the member its WebSocket route, not its place in the list.
            ws: m.ws.clone().filter(|url| check_ws_url(url)),
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
            ws: None,
        }
    }

    #[test]
    fn websocket_urls_are_optional_on_the_wire_and_checked() {
        // An entry from a relay that predates the field, and one an older agent reads.
        let old: RelayMember = serde_json::from_str(r#"{"id":"a","addr":"h:1"}"#).unwrap();
        assert_eq!(old.ws, None);
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"id":"a","addr":"h:1"}"#
        );
        #[derive(Deserialize)]
        struct OlderAgentsMember {
            #[allow(dead_code)]
            id: String,
            addr: String,
        }
        let new = RelayMember {
            ws: Some("wss://relay.example.com/jumpgate".into()),
            ..old
        };
        let text = serde_json::to_string(&new).unwrap();
        assert_eq!(
            serde_json::from_str::<OlderAgentsMember>(&text)
                .unwrap()
                .addr,
            "h:1"
        );
        for good in [
            "wss://relay.example.com/jumpgate",
            "ws://127.0.0.1:8080/jumpgate",
            "WSS://[fd00::1]:443/j",
            "wss://h",
        ] {
            assert!(check_ws_url(good), "{good:?}");
        }
        for bad in [
            "",
            "https://h/j",
            "wss:///j",
            "wss://u@h/j",
            "wss://h/j?x",
            "wss://h/j#x",
            "wss://h /j",
            "wss://h:0/j",
            "wss://h:99999/j",
            "wss://h/\n",
            "wss://h\n/j",
        ] {
            assert!(!check_ws_url(bad), "{bad:?}");
        }
        assert!(!check_ws_url(&format!(
            "wss://h/{}",
            "p".repeat(MAX_WS_URL_LEN)
        )));
        let checked = check_members(&[
            RelayMember {
                ws: Some("javascript:x".into()),
                ..member("a", "h:1")
            },
            RelayMember {
                ws: Some("ws://h:2/j".into()),
                ..member("b", "h:2")
            },
        ]);
        assert_eq!(checked.valid[0].ws, None);
        assert_eq!(checked.valid[1].ws.as_deref(), Some("ws://h:2/j"));
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

    /// The largest list a relay sends (every member at the longest id, host and WebSocket URL)
    /// fits one frame with room for the rest of an acceptance.
    #[test]
    fn a_full_list_fits_one_frame() {
        let host = format!("{}.example", "h".repeat(MAX_HOST_LEN - 8));
        let relays: Vec<RelayMember> = (0..MAX_MEMBERS)
            .map(|i| RelayMember {
                id: format!("{i:0>width$}", width = MAX_ID_LEN),
                addr: format!("{host}:{}", 10000 + i),
                ws: Some(format!("wss://h/{}", "p".repeat(MAX_WS_URL_LEN - 8))),
            })
            .collect();
        assert_eq!(check_members(&relays).valid.len(), MAX_MEMBERS);
        let frame = crate::encode(&crate::Control::Members { relays }).unwrap();
        println!("full member list: {} bytes", frame.len());
        assert!(
            frame.len() < crate::MAX_FRAME_LEN * 3 / 4,
            "{}",
            frame.len()
        );
    }

    proptest! {
        #[test]
        fn whatever_is_kept_is_safe_to_dial_and_log(
            list in proptest::collection::vec(("\\PC{0,30}|.{0,300}", "\\PC{0,40}|[a-z.]{1,20}:[0-9]{1,5}"), 0..80)
        ) {
            let list: Vec<RelayMember> = list.into_iter().map(|(id, addr)| RelayMember { id, addr, ws: None }).collect();
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
