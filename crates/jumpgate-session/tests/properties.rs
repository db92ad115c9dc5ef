//! Property tests of the agent session core: arbitrary relay frames, timer wake-ups, lane
//! endings and shutdowns, checked against a model of what the agent does.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jumpgate_proto::{Accepted, Allocation, Control, LaneGrant, Refusal, RelayMember, Secret};
use jumpgate_session::{
    heartbeat, Event, Failure, Identity, Link, Placement, Purpose, Retry, Service, Session,
    TunnelState,
};
use proptest::prelude::*;

fn accepted(interval_ms: u64, timeout_ms: u64, grant: Option<u16>) -> Accepted {
    Accepted {
        version: 2,
        public_host: "relay.example".into(),
        services: vec![],
        heartbeat_interval_ms: interval_ms,
        heartbeat_timeout_ms: timeout_ms,
        router: None,
        lanes: grant.map(|max| LaneGrant {
            key: Secret::new("lane-key"),
            max,
        }),
        members: vec![],
        relay: None,
    }
}

#[derive(Debug, Clone)]
enum Input {
    Frame(Control),
    /// Time passes (ms) and the driver's timer fires.
    Wait(u64),
    /// Time passes (ms) and a frame arrives.
    FrameAfter(u64, Control),
    LaneClosed,
    Close,
}

fn arb_control() -> impl Strategy<Value = Control> {
    prop_oneof![
        any::<u64>().prop_map(|seq| Control::Ping { seq }),
        any::<u64>().prop_map(|seq| Control::Pong { seq }),
        (0u64..100_000).prop_map(|ms| Control::GoingAway {
            reconnect_after_ms: ms
        }),
        Just(Control::Release),
        any::<u16>().prop_map(|count| Control::OpenLane { count }),
        (0u16..8).prop_map(|count| Control::OpenLane { count }),
        proptest::collection::vec(("[a-z]{0,4}", "[a-z0-9.:]{0,12}"), 0..3).prop_map(|m| {
            Control::Members {
                relays: m
                    .into_iter()
                    .map(|(id, addr)| RelayMember { id, addr, ws: None })
                    .collect(),
            }
        }),
    ]
}

fn arb_input() -> impl Strategy<Value = Input> {
    prop_oneof![
        4 => arb_control().prop_map(Input::Frame),
        4 => (0u64..40_000).prop_map(Input::Wait),
        4 => (0u64..40_000, arb_control()).prop_map(|(ms, c)| Input::FrameAfter(ms, c)),
        2 => Just(Input::LaneClosed),
        1 => Just(Input::Close),
    ]
}

/// What the test saw come out of the session.
#[derive(Default)]
struct Seen {
    pings: Vec<u64>,
    releases: usize,
    timed_out: usize,
}

fn drain(s: &mut Session, seen: &mut Seen, ended_before: bool) -> Vec<Event> {
    while let Some((frame, purpose)) = s.poll_transmit() {
        assert!(!ended_before, "a frame after the session ended: {frame:?}");
        match (frame, purpose) {
            (Control::Ping { seq }, Purpose::Opening) => {
                assert_eq!(seq, 0);
                assert!(seen.pings.is_empty(), "the opening ping comes first");
                seen.pings.push(seq);
            }
            (Control::Ping { seq }, Purpose::Heartbeat) => {
                assert_eq!(Some(&(seq - 1)), seen.pings.last(), "pings count up by one");
                seen.pings.push(seq);
            }
            (Control::Release, Purpose::Release) => seen.releases += 1,
            other => panic!("the agent never sends {other:?}"),
        }
    }
    let mut events = Vec::new();
    while let Some(e) = s.poll_event() {
        if matches!(e, Event::TimedOut { .. }) {
            seen.timed_out += 1;
        }
        events.push(e);
    }
    events
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever the relay sends and whenever the timer fires: no panic; the timeout fires iff
    /// nothing counting as heard (a pong, a going-away) came for the timeout, exactly once;
    /// heartbeats go out once per interval since the start, numbered from 0; no frame after the
    /// end; one release after a shutdown; lanes never past min(grant, --max-lanes) - 1 extra.
    #[test]
    fn the_control_loop_keeps_its_invariants(
        interval_ms in 0u64..5_000,
        timeout_ms in 0u64..20_000,
        grant in proptest::option::of(any::<u16>()),
        own in any::<u16>(),
        inputs in proptest::collection::vec(arb_input(), 0..60),
    ) {
        let start = Instant::now();
        let acc = accepted(interval_ms, timeout_ms, grant);
        let (interval, timeout) = heartbeat(&acc);
        prop_assert!(interval >= Duration::from_millis(100) && timeout >= interval * 2);
        let mut s = Session::new(&acc, own, start);
        let mut seen = Seen::default();
        drain(&mut s, &mut seen, false);
        prop_assert_eq!(&seen.pings, &vec![0]);
        let mut now = start;
        let mut ticked = start;
        let mut heard = start;
        let mut ended = false;
        let mut closed = false;
        let mut lanes: u32 = 0;
        let limit = grant.map(|g| u32::from(g.min(own)).saturating_sub(1));
        let mut reconnect_after = None;
        for input in inputs {
            let ended_before = ended;
            match input {
                Input::Frame(c) | Input::FrameAfter(0, c) => {
                    feed(&mut s, c, now, &mut heard, ended, &mut reconnect_after);
                }
                Input::Wait(ms) => {
                    now += Duration::from_millis(ms);
                    s.handle_timeout(now);
                    if !ended && now >= heard + timeout {
                        ended = true;
                    }
                    if !ended {
                        ticked = now;
                    }
                }
                Input::FrameAfter(ms, c) => {
                    // The driver wakes at every deadline before the frame arrives.
                    let target = now + Duration::from_millis(ms);
                    while let Some(at) = s.poll_timeout().filter(|at| *at <= target) {
                        prop_assert!(at >= now, "a deadline in the past");
                        now = at;
                        s.handle_timeout(now);
                        if now >= heard + timeout {
                            ended = true;
                        } else {
                            ticked = now;
                        }
                        let next = s.poll_timeout();
                        prop_assert!(next.is_none_or(|t| t > now), "the timer does not move on: {:?}", next);
                        let events = drain(&mut s, &mut seen, ended_before);
                        let only_timeouts = events.iter().all(|e| matches!(e, Event::TimedOut { .. }));
                        prop_assert!(only_timeouts, "{:?}", events);
                    }
                    now = target;
                    feed(&mut s, c, now, &mut heard, ended, &mut reconnect_after);
                }
                Input::LaneClosed => {
                    s.lane_closed();
                    lanes = lanes.saturating_sub(1);
                }
                Input::Close => {
                    s.close();
                    if !ended { closed = true; }
                    ended = true;
                }
            }
            for e in drain(&mut s, &mut seen, ended_before) {
                match e {
                    Event::OpenLanes { count, .. } => {
                        prop_assert!(count >= 1);
                        lanes += u32::from(count);
                        prop_assert!(lanes <= limit.unwrap_or(0), "{} lanes past {:?}", lanes, limit);
                    }
                    Event::LaneNotOffered => prop_assert!(grant.is_none()),
                    Event::TimedOut { after } => {
                        prop_assert_eq!(after, timeout);
                        prop_assert!(now >= heard + timeout, "timed out too early");
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(s.is_ended(), ended);
            prop_assert_eq!(u32::from(s.lanes_open()), lanes);
            prop_assert_eq!(s.reconnect_after(), reconnect_after);
            if !ended {
                // Not timed out: less than the timeout since last heard, and the timer is set
                // for a moment in the future, no later than the timeout.
                prop_assert!(now < heard + timeout);
                let next = s.poll_timeout();
                prop_assert!(next.is_some_and(|t| t > now && t <= heard + timeout), "{:?}", next);
                prop_assert_eq!(seen.timed_out, 0);
                // One heartbeat per interval up to the last wake-up, after the opening ping.
                let due = ticked.duration_since(start).as_nanos() / interval.as_nanos();
                prop_assert_eq!(seen.pings.len() as u128, 1 + due);
            } else {
                prop_assert!(s.poll_timeout().is_none());
            }
        }
        prop_assert!(seen.timed_out <= 1);
        prop_assert_eq!(seen.releases, usize::from(closed));
    }

    /// A late driver (one timer wake-up after a long gap) sends every heartbeat it missed at
    /// once, as tokio's interval does, unless the gap passed the timeout.
    #[test]
    fn a_late_timer_sends_the_missed_heartbeats_in_a_burst(
        interval_ms in 100u64..2_000, late in 0u64..10_000,
    ) {
        let start = Instant::now();
        let acc = accepted(interval_ms, interval_ms * 100, None);
        let mut s = Session::new(&acc, 8, start);
        let _ = s.poll_transmit();
        s.handle_timeout(start + Duration::from_millis(late));
        let mut n = 0;
        while let Some((frame, _)) = s.poll_transmit() {
            n += 1;
            prop_assert_eq!(frame, Control::Ping { seq: n });
        }
        prop_assert_eq!(n, late / interval_ms);
    }

    /// A refusal the agent treats as final is never retried, whatever came before; others
    /// always are, with delays in their backoff's bounds. A relay's announced delay is used as
    /// it is and starts the backoff over.
    #[test]
    fn final_refusals_are_never_retried_and_delays_stay_in_bounds(
        steps in proptest::collection::vec((0usize..12, 0.0f64..1.0, any::<bool>(), 0u64..200_000), 1..40),
    ) {
        let refusals = refusals();
        let identity = identity(&[("ssh", None)]);
        let mut link = Link::new();
        let start = Instant::now();
        for (i, unit, end_session, ms) in steps {
            let refusal = &refusals[i];
            let kind = Failure::of_refusal(refusal);
            prop_assert_eq!(kind == Failure::Permanent, refusal.is_permanent());
            match link.failed(kind, &refusal.to_string(), unit) {
                Retry::GiveUp => prop_assert!(refusal.is_permanent(), "{:?} given up", refusal),
                Retry::After { delay, .. } => {
                    prop_assert!(!refusal.is_permanent(), "{:?} retried", refusal);
                    prop_assert!(delay >= Duration::from_millis(250) && delay <= Duration::from_secs(30));
                }
                Retry::Suspicious { .. } => prop_assert!(false, "a refusal is no TLS failure"),
            }
            let slow = link.failed(Failure::Suspicious, "pin", unit);
            let in_bounds = matches!(slow,
                Retry::Suspicious { delay } if delay >= Duration::from_secs(15) && delay <= Duration::from_secs(300));
            prop_assert!(in_bounds, "{:?}", slow);
            if end_session {
                link.accepted(&accepted(1000, 2000, None), &identity, start);
                let after = Duration::from_millis(ms);
                prop_assert_eq!(link.session_ended(start + Duration::from_secs(1), Some(after), unit), after);
                let Retry::After { delay, repeated } = link.failed(Failure::Transient, "x", 1.0) else {
                    unreachable!()
                };
                prop_assert_eq!(delay, Duration::from_millis(500), "the backoff started over");
                prop_assert!(!repeated, "an acceptance forgets the last failure");
            }
        }
    }

    /// The hello asks each configured service for its configured port, else the port this
    /// relay placed it on last; a relay's made-up services never reach the hello; strict only
    /// with a configured port. The placement keeps only the agent's own services, once each,
    /// and nothing in it can break a log line.
    #[test]
    fn hellos_ask_for_remembered_ports_of_own_services_only(
        configured in proptest::collection::vec(("[a-c]", proptest::option::of(1u16..), any::<bool>()), 0..4),
        rounds in proptest::collection::vec(
            proptest::collection::vec(("[a-e]", any::<u16>(), proptest::option::of("\\PC{0,8}[\n\x1b]?")), 0..6), 1..5),
    ) {
        let mut services: Vec<Service> = Vec::new();
        for (name, port, strict) in configured {
            if !services.iter().any(|s| s.name == name) {
                services.push(Service { name, target_port: 22, preferred_port: port, strict, allow: vec![], no_port: false });
            }
        }
        let id = Identity { name: "job-1".into(), token: Some(Secret::new("t")), software: "x".into(), max_lanes: 8, services, jump_keys: Vec::new(), host: false };
        let mut link = Link::new();
        let mut last: HashMap<String, u16> = HashMap::new();
        for (i, allocations) in rounds.into_iter().enumerate() {
            let hello = link.hello(&id);
            prop_assert_eq!(hello.services.len(), id.services.len());
            prop_assert_eq!(hello.lane_of, None);
            for (req, s) in hello.services.iter().zip(&id.services) {
                prop_assert_eq!(&req.name, &s.name);
                prop_assert_eq!(req.preferred_port, s.preferred_port.or(last.get(&s.name).copied()));
                prop_assert_eq!(req.strict, s.strict && s.preferred_port.is_some());
            }
            let mut acc = accepted(1000, 2000, None);
            acc.services = allocations.iter().map(|(name, port, note)| Allocation { name: name.clone(), port: *port, note: note.clone() }).collect();
            let reconnected = link.accepted(&acc, &id, Instant::now());
            prop_assert_eq!(reconnected, !last.is_empty());
            for a in &acc.services {
                if id.offers(&a.name) {
                    last.insert(a.name.clone(), a.port);
                }
            }
            prop_assert_eq!(link.remembered(), &last, "round {}", i);
            let placement = Placement::of(&acc, &id);
            prop_assert_eq!(placement.ports.len() + placement.ignored, acc.services.len());
            for (n, p) in placement.ports.iter().enumerate() {
                prop_assert!(id.offers(&p.name));
                prop_assert!(!placement.ports[..n].iter().any(|q| q.name == p.name));
                prop_assert!(p.note.as_deref().is_none_or(|t| !t.contains('\n') && !t.contains('\x1b')));
            }
        }
    }
}

/// Applies a frame to the session and the model.
fn feed(
    s: &mut Session,
    c: Control,
    now: Instant,
    heard: &mut Instant,
    ended: bool,
    reconnect_after: &mut Option<Duration>,
) {
    if !ended {
        match &c {
            Control::Pong { .. } => *heard = now,
            Control::GoingAway { reconnect_after_ms } => {
                *heard = now;
                *reconnect_after = Some(Duration::from_millis(*reconnect_after_ms));
            }
            _ => {}
        }
    }
    s.handle_control(c, now);
}

fn identity(services: &[(&str, Option<u16>)]) -> Identity {
    Identity {
        name: "agent".into(),
        token: None,
        software: "test".into(),
        max_lanes: 8,
        services: services
            .iter()
            .map(|(name, port)| Service {
                name: (*name).into(),
                target_port: 22,
                preferred_port: *port,
                strict: false,
                allow: vec![],
                no_port: false,
            })
            .collect(),
        jump_keys: Vec::new(),
        host: false,
    }
}

/// One refusal of every kind.
fn refusals() -> Vec<Refusal> {
    let detail = || "d".to_string();
    vec![
        Refusal::Unauthorized,
        Refusal::NameNotAllowed { name: detail() },
        Refusal::TokenRejected { detail: detail() },
        Refusal::NameHeld { name: detail() },
        Refusal::CredentialFull { detail: detail() },
        Refusal::UnsupportedVersion {
            relay_min: 1,
            relay_max: 2,
            agent_min: 3,
            agent_max: 4,
        },
        Refusal::RangeExhausted {
            lo: 1,
            hi: 2,
            in_use: 2,
        },
        Refusal::PreferredPortUnavailable {
            service: detail(),
            port: 1,
            why: detail(),
        },
        Refusal::BadRequest { detail: detail() },
        Refusal::Unavailable { detail: detail() },
        Refusal::ShuttingDown,
        Refusal::LaneUnavailable { detail: detail() },
    ]
}

/// What a host agent and its relay do to a host session's tunnels.
#[derive(Debug, Clone)]
enum HostInput {
    /// The agent adds (or replaces) tunnel `t{n}`.
    Add(u8),
    /// The agent removes tunnel `t{n}`.
    Remove(u8, bool),
    /// The relay answers an outstanding `Register` (picked by index), or a made-up id.
    Answer {
        pick: usize,
        made_up: bool,
        refusal: Option<usize>,
    },
    /// The relay closes tunnel `t{n}`.
    Close(u8, usize),
    /// Time passes (ms) and the timer fires.
    Wait(u64),
}

fn arb_host_input() -> impl Strategy<Value = HostInput> {
    prop_oneof![
        3 => (0u8..5).prop_map(HostInput::Add),
        2 => (0u8..5, any::<bool>()).prop_map(|(n, r)| HostInput::Remove(n, r)),
        5 => (any::<usize>(), proptest::bool::weighted(0.1), proptest::option::of(0usize..12))
            .prop_map(|(pick, made_up, refusal)| HostInput::Answer { pick, made_up, refusal }),
        2 => (0u8..5, 0usize..12).prop_map(|(n, r)| HostInput::Close(n, r)),
        2 => (0u64..40_000).prop_map(HostInput::Wait),
    ]
}

fn tunnel(name: &str, port: Option<u16>) -> jumpgate_proto::tunnel::TunnelHello {
    jumpgate_proto::tunnel::TunnelHello {
        name: name.into(),
        token: Some(Secret::new("job-token")),
        services: vec![jumpgate_proto::ServiceRequest {
            name: "ssh".into(),
            target_port: 22,
            preferred_port: port,
            strict: false,
            allow: vec![],
            no_port: false,
        }],
        jump_keys: vec![],
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever order the agent adds and removes tunnels and the relay answers, closes or makes
    /// ids up, and whenever the timer fires: the session holds exactly the tunnels added and not
    /// removed; each has exactly one outstanding `Register` (the latest for its name) or an
    /// answer, never both; a removed tunnel is never registered again until added again; an
    /// `Unregister` goes out once per removal of a held tunnel; every `Register` has its own
    /// id; permanent refusals are not retried and the others are, after a delay.
    #[test]
    fn host_sessions_keep_one_registration_per_tunnel(
        heartbeat_ms in 100u64..2_000,
        inputs in proptest::collection::vec(arb_host_input(), 0..80),
    ) {
        let start = Instant::now();
        let mut acc = accepted(heartbeat_ms, heartbeat_ms * 1_000, None);
        acc.version = 3;
        let mut s = Session::new_host(&acc, 8, start);
        prop_assert!(s.holds_tunnels());
        let refusals = refusals();
        let mut now = start;
        let mut held: HashMap<String, ()> = HashMap::new();
        // Register ids sent, all time; the latest unanswered one per name.
        let mut ids: std::collections::HashSet<u64> = Default::default();
        let mut latest: HashMap<String, u64> = HashMap::new();
        let mut unanswered: Vec<(u64, String)> = Vec::new();
        let mut unregisters_expected = 0usize;
        let mut unregisters_seen = 0usize;
        for input in inputs {
            match input {
                HostInput::Add(n) => {
                    let name = format!("t{n}");
                    prop_assert!(s.add_tunnel(tunnel(&name, None)));
                    held.insert(name, ());
                }
                HostInput::Remove(n, release) => {
                    let name = format!("t{n}");
                    let was = held.remove(&name).is_some();
                    prop_assert_eq!(s.remove_tunnel(&name, release), was);
                    if was {
                        unregisters_expected += 1;
                        latest.remove(&name);
                    }
                }
                HostInput::Answer { pick, made_up, refusal } => {
                    let id = if made_up || unanswered.is_empty() {
                        u64::MAX - pick as u64 % 1000
                    } else {
                        unanswered.remove(pick % unanswered.len()).0
                    };
                    let reply = match refusal {
                        None => jumpgate_proto::tunnel::TunnelReply::Accepted {
                            services: vec![Allocation { name: "ssh".into(), port: 20_000, note: None }],
                        },
                        Some(i) => jumpgate_proto::tunnel::TunnelReply::Refused(refusals[i].clone()),
                    };
                    let live = latest.iter().find(|(_, l)| **l == id).map(|(n, _)| n.clone());
                    s.handle_control(Control::Registered { id, reply: reply.clone() }, now);
                    let events: Vec<Event> = std::iter::from_fn(|| s.poll_event()).collect();
                    match live {
                        // The answer to a tunnel's latest Register: it settles it.
                        Some(name) => {
                            latest.remove(&name);
                            prop_assert_eq!(events.len(), 1);
                            match (&events[0], reply) {
                                (Event::TunnelPlaced { name: n, .. }, jumpgate_proto::tunnel::TunnelReply::Accepted { .. }) => prop_assert_eq!(n, &name),
                                (Event::TunnelRefused { name: n, refusal, retry_in }, jumpgate_proto::tunnel::TunnelReply::Refused(r)) => {
                                    prop_assert_eq!(n, &name);
                                    prop_assert_eq!(refusal, &r);
                                    prop_assert_eq!(retry_in.is_none(), r.is_permanent());
                                }
                                other => prop_assert!(false, "{:?}", other),
                            }
                        }
                        // Stale, superseded or made up: ignored.
                        None => {
                            let ignored = matches!(events.as_slice(), [Event::Ignored(Control::Registered { .. })]);
                            prop_assert!(ignored, "{:?}", events);
                        }
                    }
                }
                HostInput::Close(n, r) => {
                    let name = format!("t{n}");
                    let placed = matches!(s.tunnel(&name), Some(TunnelState::Placed(_)));
                    s.handle_control(Control::TunnelClosed { name: name.clone(), reason: refusals[r].clone() }, now);
                    let events: Vec<Event> = std::iter::from_fn(|| s.poll_event()).collect();
                    if placed {
                        let ok = matches!(&events[..], [Event::TunnelClosed { name: n, retry_in, .. }]
                            if *n == name && retry_in.is_none() == refusals[r].is_permanent());
                        prop_assert!(ok, "{:?}", events);
                    } else {
                        let ok = matches!(&events[..], [Event::Ignored(Control::TunnelClosed { .. })]);
                        prop_assert!(ok, "{:?}", events);
                    }
                }
                HostInput::Wait(ms) => {
                    // The relay keeps answering heartbeats: only tunnels' timers matter here.
                    now += Duration::from_millis(ms);
                    s.handle_control(Control::Pong { seq: 0 }, now);
                    s.handle_timeout(now);
                }
            }
            while let Some((frame, purpose)) = s.poll_transmit() {
                match frame {
                    Control::Register { id, tunnel } => {
                        prop_assert_eq!(purpose, Purpose::Tunnel);
                        prop_assert!(ids.insert(id), "id {} used twice", id);
                        prop_assert!(held.contains_key(&tunnel.name), "{} registered after its removal", tunnel.name);
                        latest.insert(tunnel.name.clone(), id);
                        unanswered.push((id, tunnel.name));
                    }
                    Control::Unregister { name, .. } => {
                        prop_assert!(!held.contains_key(&name));
                        unregisters_seen += 1;
                    }
                    Control::Ping { .. } => {}
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            // Events of the timer (none but tunnels' are expected: the timeout is far off).
            while let Some(e) = s.poll_event() {
                prop_assert!(false, "unexpected event {:?}", e);
            }
            prop_assert_eq!(unregisters_seen, unregisters_expected);
            let names: Vec<&str> = s.tunnels().iter().map(|(n, _)| *n).collect();
            let mut want: Vec<&str> = held.keys().map(String::as_str).collect();
            want.sort();
            prop_assert_eq!(names, want);
            for (name, state) in s.tunnels() {
                match state {
                    TunnelState::Registering { id } => prop_assert_eq!(latest.get(name), Some(id), "{} waits for a Register that is not its latest", name),
                    TunnelState::Placed(_) | TunnelState::Refused(_) => prop_assert!(!latest.contains_key(name), "{} answered and registering", name),
                    TunnelState::Waiting { until, why } => {
                        prop_assert!(!latest.contains_key(name));
                        prop_assert!(*until > now && !why.is_permanent());
                        prop_assert!(s.poll_timeout().is_some_and(|t| t <= *until));
                    }
                }
            }
        }
    }

    /// A host hello answered by a relay older than host sessions: the driver hears it at once,
    /// and the session never registers a tunnel.
    #[test]
    fn an_older_relay_gets_no_tunnel_frames(version in 1u16..3, adds in 0usize..4) {
        let mut acc = accepted(1000, 3000, None);
        acc.version = version;
        let mut s = Session::new_host(&acc, 8, Instant::now());
        prop_assert_eq!(s.poll_event(), Some(Event::HostUnsupported { version }));
        for n in 0..adds {
            let added = s.add_tunnel(tunnel(&format!("t{n}"), Some(1)));
            prop_assert!(!added);
        }
        while let Some((frame, _)) = s.poll_transmit() {
            prop_assert!(matches!(frame, Control::Ping { .. }), "{:?}", frame);
        }
    }
}
