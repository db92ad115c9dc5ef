//! Wire tests of the messages: version negotiation, refusal texts, and that every message
//! round-trips and stays readable by older peers.

use serde::{Deserialize, Serialize};

use super::*;
use crate::frame::{decode, encode, FRAME_HEADER_LEN};
use crate::secret::Secret;
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
        let tunnel = TunnelHello {
            name: reason.clone(), token: Some(Secret::new("t")),
            services: vec![], jump_keys: vec![],
        };
        for c in [
            Control::Register { id: seq, tunnel },
            Control::Registered { id: seq, reply: TunnelReply::Accepted {
                services: vec![Allocation { name: "ssh".into(), port: seq as u16, note: None }] } },
            Control::Registered { id: seq, reply: TunnelReply::Refused(Refusal::Unauthorized) },
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
