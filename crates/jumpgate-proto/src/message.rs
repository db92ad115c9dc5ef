//! The messages agents and relays exchange.
//!
//! Optional fields carry `#[serde(default)]` so a newer peer can add them without breaking an
//! older one; anything that changes meaning bumps [`PROTOCOL_VERSION_MAX`].

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Bytes an agent writes right after the TLS handshake. A relay that does not see them is talking
/// to something that is not a jumpgate agent and hangs up without parsing anything further.
pub const PREFACE: &[u8; 8] = b"JUMPGATE";

/// Oldest protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// Newest protocol version this build speaks. 2: relays list the fleet's members
/// ([`Accepted::members`], [`Control::Members`]); a version-1 agent gets neither. 3: host
/// sessions carry the tunnels of many jobs ([`AgentHello::host`], [`crate::tunnel`]).
pub const PROTOCOL_VERSION_MAX: u16 = 3;

/// The part of an [`AgentHello`] every version agrees on. A relay decodes this first, so it can
/// name the versions on both sides even when the rest of the hello is in a format it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionProbe {
    /// Oldest version the agent speaks.
    pub min_version: u16,
    /// Newest version the agent speaks.
    pub max_version: u16,
}

/// Picks the newest version both sides speak, or refuses with both ranges named.
pub fn negotiate_version(agent: VersionProbe) -> Result<u16, Refusal> {
    let best = agent.max_version.min(PROTOCOL_VERSION_MAX);
    if agent.min_version <= agent.max_version && best >= agent.min_version.max(PROTOCOL_VERSION_MIN)
    {
        Ok(best)
    } else {
        Err(Refusal::UnsupportedVersion {
            relay_min: PROTOCOL_VERSION_MIN,
            relay_max: PROTOCOL_VERSION_MAX,
            agent_min: agent.min_version,
            agent_max: agent.max_version,
        })
    }
}

/// First message from agent to relay: who it is, how it proves it, what it wants exposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    /// Oldest version the agent speaks.
    pub min_version: u16,
    /// Newest version the agent speaks.
    pub max_version: u16,
    /// Agent name; leases are keyed by it, so a restarted agent gets its ports back.
    pub name: String,
    /// Shared or per-agent token. `None` when the agent proves itself with a client certificate.
    #[serde(default)]
    pub token: Option<Secret>,
    /// Services to expose.
    pub services: Vec<ServiceRequest>,
    /// The agent's software version, for the relay's logs.
    #[serde(default)]
    pub software: String,
    /// Most connections ("lanes") the agent will keep to this relay when asked to, counting
    /// the first. All streams of one connection share its TCP send buffer (4 MiB by default:
    /// ~400 Mbit/s at 80 ms in all) and stall together on a lost packet; extra lanes, opened
    /// only while user connections overlap, give parallel transfers a socket each. 0 or 1:
    /// this agent opens no lanes (older agents send nothing and get none).
    #[serde(default)]
    pub max_lanes: u16,
    /// Set instead of services when this connection joins the agent's live session as one
    /// more lane: the key the relay handed out in [`Accepted::lanes`].
    #[serde(default)]
    pub lane_of: Option<Secret>,
    /// The OpenSSH public keys (`TYPE BASE64`, no options or comment) that alone may reach this
    /// agent through the relay's `ssh -J` listener, on top of the relay's own jump policy; empty:
    /// the relay's policy alone. Sent only when set, so older relays never see it (they would
    /// ignore it anyway); at most [`MAX_JUMP_KEYS`] of at most [`MAX_JUMP_KEY_LEN`] bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jump_keys: Vec<String>,
    /// This session is a host agent's, from version [`HOST_SINCE`](crate::tunnel::HOST_SINCE):
    /// it carries the tunnels registered on its control stream
    /// ([`Control::Register`]), and its name and credential grant no tunnel by themselves.
    /// Sent only when set; a relay that negotiated an older version refuses such a hello.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host: bool,
}

/// Most keys an agent may bring in [`AgentHello::jump_keys`] (the whole hello is one frame of
/// at most 64 KiB).
pub const MAX_JUMP_KEYS: usize = 32;
/// Longest key line in [`AgentHello::jump_keys`], in bytes (an RSA-4096 key is ~720).
pub const MAX_JUMP_KEY_LEN: usize = 1024;

/// One service an agent wants reachable through the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRequest {
    /// Service name, unique within the agent (e.g. `ssh`).
    pub name: String,
    /// Port of the local target on the agent's side; lets name routing pick a service by port.
    #[serde(default)]
    pub target_port: u16,
    /// A public port the agent would like, e.g. the one it had before.
    #[serde(default)]
    pub preferred_port: Option<u16>,
    /// Refuse the whole hello rather than accept another port than `preferred_port`.
    #[serde(default)]
    pub strict: bool,
    /// Who may connect to this service. The relay applies it on top of its own allowlist, so an
    /// agent can narrow who reaches it but never widen it. Empty means "whoever the relay allows".
    #[serde(default)]
    pub allow: Vec<crate::cidr::Cidr>,
    /// Reachable only through the relay's name router: no public port is allocated.
    #[serde(default)]
    pub no_port: bool,
}

/// The relay's answer to an [`AgentHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RelayHello {
    /// The agent is in; its ports are listening.
    Accepted(Accepted),
    /// The agent is out, and why.
    Refused(Refusal),
    /// A lane hello was accepted: the connection now carries streams of the session it joined.
    LaneJoined,
}

/// What the agent got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// Negotiated protocol version.
    pub version: u16,
    /// The host users connect to (the relay's `--public-host`).
    pub public_host: String,
    /// One entry per requested service, in request order.
    pub services: Vec<Allocation>,
    /// How often the agent must send a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// Silence after which either side gives the session up.
    pub heartbeat_timeout_ms: u64,
    /// Where the relay's name router listens for users (`host:port`), if it has one.
    #[serde(default)]
    pub router: Option<String>,
    /// Present when the relay may ask this agent for extra lanes ([`Control::OpenLane`]).
    #[serde(default)]
    pub lanes: Option<LaneGrant>,
    /// The relays of the fleet (this one included), where agents should keep a session each;
    /// sent from version [`MEMBERS_SINCE`](crate::member::MEMBERS_SINCE). Empty from older
    /// relays, which are fleets of one.
    #[serde(default)]
    pub members: Vec<crate::member::RelayMember>,
    /// This relay's own entry of [`members`](Self::members), its id unique to this relay
    /// process: an agent that reached it at another address (a private one, the second address
    /// of a dual-stack name) knows it already has a session with it, and keeps one, not two
    /// that would take each other over.
    #[serde(default)]
    pub relay: Option<crate::member::RelayMember>,
}

/// What an agent needs to open extra lanes for its session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneGrant {
    /// Proves a lane belongs to this session (and not to an older one with the same name).
    pub key: Secret,
    /// Most connections the session may have at once, counting the first.
    pub max: u16,
}

/// A service's public endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Service name, as requested.
    pub name: String,
    /// Public port on the relay.
    pub port: u16,
    /// Why the port differs from the one the agent preferred, if it does.
    #[serde(default)]
    pub note: Option<String>,
}

/// Why a relay turned an agent away. The `Display` text is what the agent logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Refusal {
    /// The credential is wrong, missing or revoked.
    #[error("authentication failed: the relay rejected this agent's token or certificate; check --token-file / JUMPGATE_TOKEN against the relay's token")]
    Unauthorized,
    /// The credential is valid but may not claim this agent name.
    #[error("this agent's credential may not use the name {name:?}")]
    NameNotAllowed {
        /// The name that was claimed.
        name: String,
    },
    /// A signed join token was presented and refused (expired, wrongly signed, malformed).
    #[error("the relay rejected this agent's signed join token: {detail}")]
    TokenRejected {
        /// Why, in words an operator can act on.
        detail: String,
    },
    /// The name is held, live or by a lease, by another identity (another token entry,
    /// certificate or signed-token subject). Not permanent: the hold ends when that lease expires
    /// or an operator releases it.
    #[error("the name {name:?} is held by another identity (a different token entry, certificate or signed token); it frees when that agent's lease expires or an operator releases it (DELETE /api/agents/{name}?release=true)")]
    NameHeld {
        /// The name that was claimed.
        name: String,
    },
    /// The agent's credential already holds as many names or leases as the relay allows one
    /// credential. Not permanent: its other names' leases expire or are released.
    #[error("this agent's credential holds its maximum of {detail}; release names it no longer needs (DELETE /api/agents/NAME?release=true) or ask the operator to raise the cap; retrying")]
    CredentialFull {
        /// Which cap, with its value.
        detail: String,
    },
    /// No protocol version in common.
    #[error("protocol version mismatch: the relay speaks versions {relay_min}-{relay_max}, this agent speaks {agent_min}-{agent_max}; upgrade the older side")]
    UnsupportedVersion {
        /// Oldest version the relay speaks.
        relay_min: u16,
        /// Newest version the relay speaks.
        relay_max: u16,
        /// Oldest version the agent speaks.
        agent_min: u16,
        /// Newest version the agent speaks.
        agent_max: u16,
    },
    /// Every port in the range is leased.
    #[error("port range {lo}-{hi} exhausted ({in_use} in use)")]
    RangeExhausted {
        /// First port of the range.
        lo: u16,
        /// Last port of the range.
        hi: u16,
        /// Ports currently leased.
        in_use: usize,
    },
    /// A strictly preferred port could not be granted.
    #[error("service {service:?} asked strictly for port {port}, which {why}")]
    PreferredPortUnavailable {
        /// Service name.
        service: String,
        /// The port it insisted on.
        port: u16,
        /// Why not.
        why: String,
    },
    /// The hello itself is invalid.
    #[error("bad request: {detail}")]
    BadRequest {
        /// What is wrong.
        detail: String,
    },
    /// Something on the relay failed that has nothing to do with the agent (a port it granted
    /// could not be bound, file descriptors ran out); the same hello may work a moment later.
    #[error("the relay cannot serve this agent right now: {detail}; retrying")]
    Unavailable {
        /// What failed.
        detail: String,
    },
    /// The relay is stopping.
    #[error("the relay is shutting down")]
    ShuttingDown,
    /// A lane could not join its session (it ended, or has all the lanes it may have).
    #[error("lane not joined: {detail}")]
    LaneUnavailable {
        /// Why not.
        detail: String,
    },
}

impl Refusal {
    /// This refusal with every free-text field escaped and cut to
    /// [`MAX_FIELD_LEN`](crate::display::MAX_FIELD_LEN): what a relay sends and logs, and what an
    /// agent logs of what it received, so neither side echoes 60 KB or injects log lines.
    pub fn sanitized(self) -> Refusal {
        let clean = |s: String| crate::sanitize(&s, crate::display::MAX_FIELD_LEN).into_owned();
        match self {
            Refusal::NameNotAllowed { name } => Refusal::NameNotAllowed { name: clean(name) },
            Refusal::NameHeld { name } => Refusal::NameHeld { name: clean(name) },
            Refusal::CredentialFull { detail } => Refusal::CredentialFull {
                detail: clean(detail),
            },
            Refusal::TokenRejected { detail } => Refusal::TokenRejected {
                detail: clean(detail),
            },
            Refusal::PreferredPortUnavailable { service, port, why } => {
                Refusal::PreferredPortUnavailable {
                    service: clean(service),
                    port,
                    why: clean(why),
                }
            }
            Refusal::BadRequest { detail } => Refusal::BadRequest {
                detail: clean(detail),
            },
            Refusal::Unavailable { detail } => Refusal::Unavailable {
                detail: clean(detail),
            },
            Refusal::LaneUnavailable { detail } => Refusal::LaneUnavailable {
                detail: clean(detail),
            },
            r @ (Refusal::Unauthorized
            | Refusal::UnsupportedVersion { .. }
            | Refusal::RangeExhausted { .. }
            | Refusal::ShuttingDown) => r,
        }
    }

    /// Whether retrying the same hello can ever succeed. An agent stops on a permanent refusal
    /// instead of hammering the relay.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Refusal::Unauthorized
                | Refusal::TokenRejected { .. }
                | Refusal::NameNotAllowed { .. }
                | Refusal::UnsupportedVersion { .. }
                | Refusal::PreferredPortUnavailable { .. }
                | Refusal::BadRequest { .. }
        )
    }
}

/// Frames on the control stream, in either direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Heartbeat from the agent; the relay echoes it as `Pong`.
    Ping {
        /// Echoed back, so a late pong is recognisable.
        seq: u64,
    },
    /// Heartbeat answer from the relay.
    Pong {
        /// The ping's sequence number.
        seq: u64,
    },
    /// The relay is stopping: reconnect after the given delay instead of backing off.
    GoingAway {
        /// Suggested delay before redialling.
        reconnect_after_ms: u64,
    },
    /// The agent is stopping: close its listeners now, keep its leases.
    Release,
    /// From the relay: user connections overlap and every lane carries one already; open
    /// `count` more lanes (within [`LaneGrant::max`]).
    OpenLane {
        /// How many lanes to open.
        count: u16,
    },
    /// From the relay, version [`MEMBERS_SINCE`](crate::member::MEMBERS_SINCE) on: the fleet's
    /// members changed; this is the whole new list (as in [`Accepted::members`]).
    Members {
        /// Every relay of the fleet, this one included.
        relays: Vec<crate::member::RelayMember>,
    },
    /// From a host agent, version [`HOST_SINCE`](crate::tunnel::HOST_SINCE) on: expose this
    /// job's tunnel over this session. Answered by [`Control::Registered`] with the same `id`.
    /// Registering a name the session holds already replaces that tunnel (new services,
    /// credential or keys) as a takeover by the same identity would.
    Register {
        /// Chosen by the agent, echoed in the answer.
        id: u64,
        /// The tunnel.
        tunnel: TunnelHello,
    },
    /// From the relay: the answer to [`Control::Register`] `id`.
    Registered {
        /// The registration's id.
        id: u64,
        /// The tunnel's ports, or why not.
        reply: TunnelReply,
    },
    /// From a host agent: close this tunnel's ports now. `release`: give up its leases too
    /// (the job ended); otherwise they age as a departed agent's do, so a re-registration
    /// gets the same ports.
    Unregister {
        /// The tunnel's name.
        name: String,
        /// Free the tunnel's ports for others at once.
        release: bool,
    },
    /// From the relay: it ended this tunnel (revoked credential, an operator's disconnect, a
    /// takeover by the same identity elsewhere); the host session and its other tunnels carry
    /// on. The agent registers it again unless `reason` is permanent.
    TunnelClosed {
        /// The tunnel's name.
        name: String,
        /// Why.
        reason: Refusal,
    },
}

/// One job's tunnel, as a host agent registers it: what an [`AgentHello`]
/// of its own would have said, without the connection-level fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelHello {
    /// The tunnel's name (the job's, e.g. `vh-exec-123`); leases and routing are keyed by it
    /// exactly as for an agent of that name.
    pub name: String,
    /// The job's credential (normally its signed join token). `None`: the host session's own
    /// credential, which the relay accepts for a tunnel name only where its operator allowed
    /// that credential to claim the name.
    #[serde(default)]
    pub token: Option<Secret>,
    /// Services to expose, as in a hello.
    pub services: Vec<ServiceRequest>,
    /// As [`AgentHello::jump_keys`](AgentHello::jump_keys), for this tunnel alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jump_keys: Vec<String>,
}

/// The relay's answer to one [`Control::Register`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum TunnelReply {
    /// The tunnel is in: its ports are listening on this relay.
    Accepted {
        /// One entry per requested service, in request order.
        services: Vec<Allocation>,
    },
    /// The tunnel is out, and why; the host session and its other tunnels carry on.
    Refused(Refusal),
}

/// First frame on a data stream, from the relay: which service the user wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOpen {
    /// Service name.
    pub service: String,
    /// The user's address as the relay saw it, for the agent's logs.
    pub peer: String,
    /// On a host session: the registered tunnel whose service this is. `None`: the session's
    /// own services (every session before version [`HOST_SINCE`](crate::tunnel::HOST_SINCE)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<String>,
}

/// The agent's answer on a data stream; after `Connected` the stream carries raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StreamReply {
    /// The local target accepted the connection.
    Connected,
    /// The local target could not be reached.
    Refused {
        /// What went wrong, e.g. "connection refused by 127.0.0.1:22".
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode, encode, FRAME_HEADER_LEN};
    use proptest::prelude::*;

    fn roundtrip<T>(msg: &T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let wire = encode(msg).unwrap();
        decode(&wire[FRAME_HEADER_LEN..]).unwrap()
    }

    #[test]
    fn version_negotiation_picks_highest_common() {
        let probe = |min, max| VersionProbe {
            min_version: min,
            max_version: max,
        };
        assert_eq!(
            negotiate_version(probe(1, 1)),
            Ok(1),
            "old agents keep working"
        );
        assert_eq!(negotiate_version(probe(2, 2)), Ok(2));
        assert_eq!(negotiate_version(probe(1, 9)), Ok(PROTOCOL_VERSION_MAX));
        let err = negotiate_version(probe(7, 9)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "protocol version mismatch: the relay speaks versions 1-3, this agent speaks 7-9; upgrade the older side"
        );
        assert!(negotiate_version(probe(3, 2)).is_err());
        assert!(negotiate_version(probe(4, 5)).is_err());
    }

    #[test]
    fn refusal_texts_are_plain() {
        let r = Refusal::RangeExhausted {
            lo: 10000,
            hi: 10001,
            in_use: 2,
        };
        assert_eq!(r.to_string(), "port range 10000-10001 exhausted (2 in use)");
        assert!(!r.is_permanent());
        assert!(Refusal::Unauthorized.is_permanent());
        let internal = Refusal::Unavailable {
            detail: "cannot listen on port 10001: too many open files".into(),
        };
        assert!(
            !internal.is_permanent(),
            "the relay's own failures are worth a retry"
        );
    }

    #[test]
    fn hello_debug_hides_token() {
        let hello = AgentHello {
            min_version: 1,
            max_version: 1,
            name: "a".into(),
            token: Some(Secret::new("s3cr3t-token")),
            services: vec![],
            software: String::new(),
            max_lanes: 0,
            lane_of: Some(Secret::new("lane-k3y")),
            jump_keys: vec![],
            host: false,
        };
        let text = format!("{hello:?}");
        assert!(!text.contains("s3cr3t") && !text.contains("lane-k3y"));
    }

    #[test]
    fn jump_keys_are_optional_on_the_wire_both_ways() {
        // An older agent's hello has no jump_keys: the relay reads an empty list.
        let old = br#"{"min_version":1,"max_version":2,"name":"a","services":[]}"#;
        let hello: AgentHello = decode(old).unwrap();
        assert!(hello.jump_keys.is_empty());
        // A newer agent without keys sends nothing an older relay could trip on.
        let wire = encode(&hello).unwrap();
        let text = std::str::from_utf8(&wire[FRAME_HEADER_LEN..]).unwrap();
        assert!(!text.contains("jump_keys"), "{text}");
        // With keys, an older relay's decoder (no such field, unknown fields allowed) still
        // reads the hello.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct HelloV1 {
            name: String,
            services: Vec<ServiceRequest>,
        }
        let with = AgentHello {
            jump_keys: vec!["ssh-ed25519 AAAA".into()],
            ..hello
        };
        let wire = encode(&with).unwrap();
        assert!(decode::<HelloV1>(&wire[FRAME_HEADER_LEN..]).is_ok());
        assert_eq!(roundtrip(&with).jump_keys, with.jump_keys);
    }

    #[test]
    fn probe_decodes_from_a_hello_of_unknown_shape() {
        let future = br#"{"min_version":5,"max_version":6,"name":{"nested":true},"x":[1]}"#;
        let probe: VersionProbe = decode(future).unwrap();
        assert_eq!(probe.min_version, 5);
    }

    fn arb_service() -> impl Strategy<Value = ServiceRequest> {
        (
            "[a-z]{1,8}",
            any::<u16>(),
            any::<Option<u16>>(),
            any::<bool>(),
        )
            .prop_map(
                |(name, target_port, preferred_port, strict)| ServiceRequest {
                    name,
                    target_port,
                    preferred_port,
                    strict,
                    allow: vec![],
                    no_port: false,
                },
            )
    }

    fn arb_member() -> impl Strategy<Value = crate::member::RelayMember> {
        ("\\PC{0,20}", "\\PC{0,30}").prop_map(|(id, addr)| crate::member::RelayMember {
            id,
            addr,
            ws: None,
        })
    }

    #[test]
    fn version_one_peers_interoperate() {
        // An accepted hello from a version-1 relay, as it was sent before member lists existed.
        let old = br#"{"result":"accepted","version":1,"public_host":"h","services":[],"heartbeat_interval_ms":1,"heartbeat_timeout_ms":2}"#;
        let RelayHello::Accepted(a) = decode::<RelayHello>(old).unwrap() else {
            panic!("not accepted")
        };
        assert!(a.members.is_empty());
        // A version-1 agent's decoder ignores the field it does not know: its struct lacks it.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct AcceptedV1 {
            version: u16,
            public_host: String,
        }
        let new = Accepted {
            version: 1,
            public_host: "h".into(),
            services: vec![],
            heartbeat_interval_ms: 1,
            heartbeat_timeout_ms: 2,
            router: None,
            lanes: None,
            members: vec![crate::member::RelayMember {
                id: "a".into(),
                addr: "a:7000".into(),
                ws: None,
            }],
            relay: None,
        };
        let wire = encode(&new).unwrap();
        assert!(decode::<AcceptedV1>(&wire[FRAME_HEADER_LEN..]).is_ok());
        // A control frame of a later version is an error to an older decoder: that is why a
        // relay pushes `Members` only to agents that negotiated MEMBERS_SINCE.
        let push = encode(&Control::Members { relays: vec![] }).unwrap();
        let text = std::str::from_utf8(&push[FRAME_HEADER_LEN..]).unwrap();
        assert_eq!(text, r#"{"type":"members","relays":[]}"#);
        const { assert!(crate::member::MEMBERS_SINCE <= PROTOCOL_VERSION_MAX) };
    }

    proptest! {
        #[test]
        fn hello_roundtrips(
            name in "\\PC{0,40}",
            token in proptest::option::of("\\PC{0,40}"),
            services in proptest::collection::vec(arb_service(), 0..6),
            min in any::<u16>(), max in any::<u16>(),
            lane in proptest::option::of("[0-9a-f]{0,64}"),
            keys in proptest::collection::vec("ssh-ed25519 [A-Za-z0-9+/]{4,68}", 0..3),
        ) {
            let hello = AgentHello {
                min_version: min, max_version: max, name,
                token: token.map(Secret::new), services, software: "x".into(),
                max_lanes: max, lane_of: lane.map(Secret::new),
                jump_keys: keys, host: max % 2 == 0,
            };
            prop_assert_eq!(roundtrip(&hello), hello);
        }

        #[test]
        fn replies_roundtrip(port in any::<u16>(), lo in any::<u16>(), in_use in any::<usize>(),
                             note in proptest::option::of("\\PC{0,20}"),
                             members in proptest::collection::vec(arb_member(), 0..4)) {
            let accepted = RelayHello::Accepted(Accepted {
                version: 1, public_host: "h".into(),
                services: vec![Allocation { name: "ssh".into(), port, note }],
                heartbeat_interval_ms: 1, heartbeat_timeout_ms: 2, router: None,
                lanes: Some(LaneGrant { key: Secret::new("k"), max: port }),
                members: members.clone(),
                relay: members.first().cloned(),
            });
            prop_assert_eq!(roundtrip(&accepted), accepted);
            prop_assert_eq!(roundtrip(&RelayHello::LaneJoined), RelayHello::LaneJoined);
            let refused = RelayHello::Refused(Refusal::RangeExhausted { lo, hi: port, in_use });
            prop_assert_eq!(roundtrip(&refused), refused);
        }

        #[test]
        fn control_and_stream_frames_roundtrip(seq in any::<u64>(), reason in "\\PC{0,30}",
                                               relays in proptest::collection::vec(arb_member(), 0..4)) {
            for c in [Control::Ping { seq }, Control::Pong { seq },
                      Control::GoingAway { reconnect_after_ms: seq }, Control::Release,
                      Control::OpenLane { count: seq as u16 }, Control::Members { relays: relays.clone() }] {
                prop_assert_eq!(roundtrip(&c), c);
            }
            let r = StreamReply::Refused { reason: reason.clone() };
            prop_assert_eq!(roundtrip(&r), r);
            let tunnel = crate::tunnel::TunnelHello {
                name: reason.clone(), token: Some(Secret::new("t")),
                services: vec![], jump_keys: vec![],
            };
            for c in [
                Control::Register { id: seq, tunnel },
                Control::Registered { id: seq, reply: crate::tunnel::TunnelReply::Accepted {
                    services: vec![Allocation { name: "ssh".into(), port: seq as u16, note: None }] } },
                Control::Registered { id: seq, reply: crate::tunnel::TunnelReply::Refused(Refusal::Unauthorized) },
                Control::Unregister { name: reason.clone(), release: seq % 2 == 0 },
                Control::TunnelClosed { name: reason.clone(), reason: Refusal::Unauthorized },
            ] {
                prop_assert_eq!(roundtrip(&c), c);
            }
            for tunnel in [None, Some(reason)] {
                let open = StreamOpen { service: "ssh".into(), peer: "p".into(), tunnel };
                prop_assert_eq!(roundtrip(&open), open);
            }
        }
    }
}
