//! The agent's session core on what a relay may send: the first bytes are read as the relay's
//! answer to a hello (decoded or garbage), the rest as control frames cut by the frame decoder,
//! each preceded by a byte of elapsed time. Never a panic; never a frame after the session
//! ended; heartbeats numbered up by one; never more lanes than the agent's --max-lanes allows;
//! the timeout only after that much silence; and what the placement keeps is the agent's own,
//! once each. With data[0] >= 128 it is a host session (issue 28) that also adds and removes
//! tunnels between frames: it holds exactly the tunnels added and not removed, registers only
//! those, each `Register` with its own id, and a registering tunnel waits for its latest one.
#![no_main]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use jumpgate_proto::frame::FrameDecoder;
use jumpgate_proto::tunnel::TunnelHello;
use jumpgate_proto::{decode, Control, LaneGrant, RelayHello, Secret, ServiceRequest};
use jumpgate_session::{
    lane_answer, session_answer, Event, Identity, Link, Placement, Purpose, Service, Session,
    TunnelState,
};
use libfuzzer_sys::fuzz_target;

fn identity(max_lanes: u16) -> Identity {
    Identity {
        name: "fuzz".into(),
        token: Some(Secret::new("t")),
        software: "fuzz".into(),
        max_lanes,
        services: ["ssh", "web"]
            .iter()
            .map(|n| Service {
                name: (*n).into(),
                target_port: 22,
                preferred_port: None,
                strict: false,
                allow: vec![],
                no_port: false,
            })
            .collect(),
        jump_keys: Vec::new(),
        host: false,
    }
}

fn tunnel(n: u8) -> TunnelHello {
    TunnelHello {
        name: format!("t{n}"),
        token: Some(Secret::new("job")),
        services: vec![ServiceRequest {
            name: "ssh".into(),
            target_port: 22,
            preferred_port: None,
            strict: false,
            allow: vec![],
            no_port: false,
        }],
        jump_keys: vec![],
    }
}

fuzz_target!(|data: &[u8]| {
    // data[0]: the agent's --max-lanes; data[1]: the answer's length; data[2]: the lane grant
    // when the answer is not an acceptance.
    if data.len() < 3 {
        return;
    }
    let own = u16::from(data[0] % 10);
    let split = usize::from(data[1]).min(data.len() - 3);
    let (answer, rest) = data[3..].split_at(split);
    let id = identity(own);
    let mut link = Link::new();
    let _ = link.hello(&id);
    let start = Instant::now();
    let reply = decode::<RelayHello>(answer);
    if let Ok(r) = &reply {
        let _ = lane_answer(r.clone());
    }
    let accepted = match reply.map(session_answer) {
        Ok(Ok(a)) => a,
        _ => jumpgate_proto::Accepted {
            version: 2,
            public_host: "h".into(),
            services: vec![],
            heartbeat_interval_ms: u64::from(data[0]) * 7,
            heartbeat_timeout_ms: u64::from(data[2]) * 13,
            router: None,
            lanes: Some(LaneGrant { key: Secret::new("k"), max: u16::from(data[2]) }),
            members: vec![],
            relay: None,
        },
    };
    let placement = Placement::of(&accepted, &id);
    assert_eq!(placement.ports.len() + placement.ignored, accepted.services.len());
    for (i, p) in placement.ports.iter().enumerate() {
        assert!(id.offers(&p.name) && !placement.ports[..i].iter().any(|q| q.name == p.name));
    }
    link.accepted(&accepted, &id, start);
    let hello = link.hello(&id);
    assert!(hello.services.iter().all(|s| id.offers(&s.name)));

    let limit = accepted.lanes.as_ref().map_or(0, |g| g.max.min(own).saturating_sub(1));
    let host = data[0] >= 128;
    let mut accepted = accepted;
    let mut s = if host {
        accepted.version = accepted.version.max(3);
        Session::new_host(&accepted, own, start)
    } else {
        Session::new(&accepted, own, start)
    };
    let mut held: BTreeSet<String> = BTreeSet::new();
    let mut ids: HashSet<u64> = HashSet::new();
    let mut latest: HashMap<String, u64> = HashMap::new();
    for n in 0..2 {
        if host {
            assert!(s.add_tunnel(tunnel(n)));
            held.insert(format!("t{n}"));
        }
    }
    let timeout = s.timeout();
    let mut now = start;
    let mut heard = start;
    let mut pings: Vec<u64> = Vec::new();
    let mut lanes = 0u32;
    let mut ended = false;
    let mut dec = FrameDecoder::new();
    let mut input = rest;
    loop {
        while let Some((frame, purpose)) = s.poll_transmit() {
            assert!(!ended || purpose == Purpose::Release || matches!(frame, Control::Unregister { .. }));
            match frame {
                Control::Ping { seq } => {
                    assert_eq!(seq, pings.len() as u64);
                    pings.push(seq);
                }
                Control::Register { id, tunnel } => {
                    assert!(host && ids.insert(id), "id {id} twice");
                    assert!(held.contains(&tunnel.name), "{} registered after its removal", tunnel.name);
                    latest.insert(tunnel.name, id);
                }
                Control::Unregister { name, .. } => assert!(!held.contains(&name)),
                _ => {}
            }
        }
        if host && !ended {
            let names: Vec<&str> = s.tunnels().iter().map(|(n, _)| *n).collect();
            assert!(names.iter().copied().eq(held.iter().map(String::as_str)));
            for (name, state) in s.tunnels() {
                if let TunnelState::Registering { id } = state {
                    assert_eq!(latest.get(name), Some(id));
                }
            }
        }
        while let Some(e) = s.poll_event() {
            match e {
                Event::OpenLanes { count, .. } => {
                    lanes += u32::from(count);
                    assert!(lanes <= u32::from(limit));
                }
                Event::TimedOut { after } => {
                    assert!(now >= heard + after);
                    ended = true;
                }
                _ => {}
            }
        }
        if ended {
            s.handle_control(Control::Pong { seq: 0 }, now);
            assert!(s.poll_transmit().is_none() && s.poll_timeout().is_none());
            return;
        }
        let Some((&step, more)) = input.split_first() else { return };
        input = more;
        match step {
            0..=199 => now += Duration::from_millis(u64::from(step) * 50),
            200..=219 => {
                s.lane_closed();
                lanes = lanes.saturating_sub(1);
                continue;
            }
            220 => {
                s.close();
                ended = true;
                continue;
            }
            221..=228 if host => {
                let n = step % 4;
                assert!(s.add_tunnel(tunnel(n)));
                held.insert(format!("t{n}"));
                continue;
            }
            229..=236 if host => {
                let name = format!("t{}", step % 4);
                assert_eq!(s.remove_tunnel(&name, step % 2 == 0), held.remove(&name));
                continue;
            }
            _ => {}
        }
        if s.poll_timeout().is_some_and(|t| t <= now) {
            s.handle_timeout(now);
            if now >= heard + timeout {
                assert!(matches!(s.poll_event(), Some(Event::TimedOut { .. })));
                ended = true;
                continue;
            }
        }
        // Then one frame, if the bytes so far make one.
        let Ok(taken) = dec.push(input) else { return };
        input = &input[taken..];
        match dec.next_frame() {
            Ok(Some(payload)) => match decode::<Control>(&payload) {
                Ok(frame) => {
                    if matches!(frame, Control::Pong { .. } | Control::GoingAway { .. }) {
                        heard = now;
                    }
                    s.handle_control(frame, now);
                }
                // The driver ends the session on a frame it cannot decode.
                Err(_) => return,
            },
            Ok(None) => {}
            Err(_) => return,
        }
    }
});
