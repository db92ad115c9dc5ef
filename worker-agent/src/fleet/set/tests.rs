//! [`LinkSet`] with injected resolutions and clocks.

use super::*;
use crate::fleet::RESOLVE_EVERY;

pub(crate) fn config(servers: &[&str], grace: Duration, cap: usize) -> AgentConfig {
    use clap::Parser;
    let mut args = vec![
        "worker-agent".to_string(),
        "--name".into(),
        "a".into(),
        "--fingerprint".into(),
        format!("sha256:{}", "ab".repeat(32)),
    ];
    for s in servers {
        args.extend(["--server".to_string(), s.to_string()]);
    }
    let cli = crate::config::Cli::parse_from(args);
    std::env::set_var("JUMPGATE_TOKEN", "t");
    let mut c = AgentConfig::from_args(cli.run).unwrap();
    c.member_grace = grace;
    c.max_relays = cap;
    c
}

pub(crate) fn name(s: &str) -> ServerAddr {
    let (host, port) = s.rsplit_once(':').unwrap();
    ServerAddr {
        host: host.into(),
        port: port.parse().unwrap(),
    }
}

fn member(addr: &str) -> MemberEndpoint {
    let (host, port) = jumpgate_proto::member::parse_host_port(addr).unwrap();
    MemberEndpoint {
        id: addr.into(),
        host,
        port,
        ws: None,
    }
}

pub(crate) fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn started(changes: &[Change]) -> Vec<(u64, String, Option<SocketAddr>, String)> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Start(id, t) => Some((*id, t.server.to_string(), t.addr, t.tls_name.clone())),
            Change::Stop(_) => None,
        })
        .collect()
}

/// An injected resolver: the names this test's "DNS" knows.
fn resolve_all(set: &mut LinkSet, dns: &[(&str, &[&str])], now: Instant, reports: &Heard) {
    for n in set.names_due(now, RESOLVE_EVERY, reports) {
        let answer = dns
            .iter()
            .find(|(k, _)| name(k) == n)
            .map(|(_, v)| v.iter().map(|a| addr(a)).collect())
            .ok_or_else(|| "unknown name".to_string());
        set.resolved(n, answer, now);
    }
}

/// An agent given a `ws://` server dials members at the WebSocket URL they advertise (one
/// link per path behind one ingress), and a member without one at its agent port.
#[test]
fn members_are_dialled_as_websocket_by_an_agent_that_uses_it() {
    let t0 = Instant::now();
    let advertising = |addr: &str, url: &str| MemberEndpoint {
        ws: Some(url.into()),
        ..member(addr)
    };
    let list = vec![
        advertising("10.0.0.2:7000", "ws://10.0.0.9:80/r2"),
        advertising("10.0.0.3:7000", "ws://10.0.0.9:80/r3"),
        member("10.0.0.4:7000"),
    ];
    let mut heard = Heard::default();
    let mut set = LinkSet::new(&config(
        &["ws://10.0.0.1:8080/jumpgate"],
        Duration::from_secs(60),
        16,
    ));
    set.plan(t0, &heard);
    heard.lists.insert(0, list.clone());
    let changes = set.plan(t0, &heard);
    let routes: Vec<(String, Option<String>)> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Start(_, t) => {
                Some((t.server.to_string(), t.ws.as_ref().map(|w| w.path.clone())))
            }
            Change::Stop(_) => None,
        })
        .collect();
    assert_eq!(
        routes,
        [
            ("10.0.0.9:80".to_string(), Some("/r2".to_string())),
            ("10.0.0.9:80".to_string(), Some("/r3".to_string())),
            ("10.0.0.4:7000".to_string(), None),
        ]
    );
    // The same list to an agent that dials agent ports: the agent ports.
    let mut set = LinkSet::new(&config(&["10.0.0.1:7000"], Duration::from_secs(60), 16));
    set.plan(t0, &Heard::default());
    let changes = set.plan(t0, &heard);
    assert_eq!(
        started(&changes)
            .into_iter()
            .map(|(_, s, _, _)| s)
            .collect::<Vec<_>>(),
        ["10.0.0.2:7000", "10.0.0.3:7000", "10.0.0.4:7000"]
    );
    assert!(changes
        .iter()
        .all(|c| matches!(c, Change::Start(_, t) if t.ws.is_none())));
}

#[test]
fn a_name_with_several_addresses_is_several_relays() {
    let t0 = Instant::now();
    let mut set = LinkSet::new(&config(
        &["fleet.example:7000"],
        Duration::from_secs(60),
        16,
    ));
    let none = Heard::default();
    let dns: &[(&str, &[&str])] = &[(
        "fleet.example:7000",
        &["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.1:7000"],
    )];
    resolve_all(&mut set, dns, t0, &none);
    let changes = set.plan(t0, &none);
    assert_eq!(
        started(&changes),
        [
            (
                0,
                "fleet.example:7000".into(),
                Some(addr("10.0.0.1:7000")),
                "fleet.example".into()
            ),
            (
                1,
                "fleet.example:7000".into(),
                Some(addr("10.0.0.2:7000")),
                "fleet.example".into()
            ),
        ],
        "one link per distinct address, verified as the name"
    );
    // DNS drops one address: its link stays for the grace period, then goes.
    let t1 = t0 + RESOLVE_EVERY;
    let dns: &[(&str, &[&str])] = &[("fleet.example:7000", &["10.0.0.1:7000", "10.0.0.3:7000"])];
    resolve_all(&mut set, dns, t1, &none);
    let changes = set.plan(t1, &none);
    assert_eq!(started(&changes).len(), 1, "{changes:?}");
    assert!(!changes.contains(&Change::Stop(1)));
    assert_eq!(set.next_expiry(), Some(t1 + Duration::from_secs(60)));
    assert_eq!(set.plan(t1 + Duration::from_secs(59), &none), []);
    assert_eq!(
        set.plan(t1 + Duration::from_secs(60), &none),
        [Change::Stop(1)]
    );
    // A failed lookup keeps what was known.
    let t2 = t1 + RESOLVE_EVERY * 2;
    resolve_all(&mut set, &[], t2, &none);
    assert_eq!(set.plan(t2 + Duration::from_secs(600), &none), []);
    assert_eq!(set.ids(), [0, 2]);
}

#[test]
fn an_unresolvable_name_is_dialled_by_name_until_it_resolves() {
    let t0 = Instant::now();
    let mut set = LinkSet::new(&config(
        &["relay.example:7000"],
        Duration::from_secs(60),
        16,
    ));
    let none = Heard::default();
    resolve_all(&mut set, &[], t0, &none);
    let changes = set.plan(t0, &none);
    assert_eq!(
        started(&changes),
        [(0, "relay.example:7000".into(), None, "relay.example".into())]
    );
    assert!(
        set.names_due(t0, RESOLVE_EVERY, &none).is_empty(),
        "not asked again at once"
    );
    let t1 = t0 + Duration::from_secs(5);
    set.expire_names(t1);
    let dns: &[(&str, &[&str])] = &[("relay.example:7000", &["10.0.0.9:7000"])];
    resolve_all(&mut set, dns, t1, &none);
    assert!(
        set.names_due(t1, RESOLVE_EVERY, &none).is_empty(),
        "answered since"
    );
    let changes = set.plan(t1, &none);
    assert_eq!(
        changes[0],
        Change::Stop(0),
        "replaced at once, not after the grace"
    );
    assert_eq!(
        started(&changes),
        [(
            1,
            "relay.example:7000".into(),
            Some(addr("10.0.0.9:7000")),
            "relay.example".into()
        )]
    );
}

#[test]
fn members_are_learned_deduplicated_and_dropped_after_the_grace() {
    let t0 = Instant::now();
    let grace = Duration::from_secs(2);
    let mut set = LinkSet::new(&config(&["127.0.0.1:7000"], grace, 16));
    let mut reports = Heard::default();
    assert_eq!(started(&set.plan(t0, &reports)).len(), 1);
    // Relay 0 lists itself (by another spelling of its address), B and a name.
    reports.lists.insert(
        0,
        vec![
            member("127.0.0.1:7000"),
            member("127.0.0.2:7000"),
            member("relay-c.example:7000"),
        ],
    );
    let dns: &[(&str, &[&str])] = &[("relay-c.example:7000", &["10.0.0.3:7000"])];
    resolve_all(&mut set, dns, t0, &reports);
    let changes = set.plan(t0, &reports);
    assert_eq!(
        started(&changes),
        [
            (
                1,
                "127.0.0.2:7000".into(),
                Some(addr("127.0.0.2:7000")),
                "127.0.0.1".into()
            ),
            (
                2,
                "relay-c.example:7000".into(),
                Some(addr("10.0.0.3:7000")),
                "127.0.0.1".into()
            ),
        ],
        "learned relays are verified as the relay they were learned from; itself is not doubled"
    );
    // B and C list each other and themselves; relay 0 stops listing C: B still does.
    reports.lists.insert(
        1,
        vec![member("127.0.0.2:7000"), member("relay-c.example:7000")],
    );
    reports
        .lists
        .insert(0, vec![member("127.0.0.1:7000"), member("127.0.0.2:7000")]);
    assert_eq!(set.plan(t0 + grace * 5, &reports), []);
    // Nobody but C itself lists C: dropped after the grace, not before.
    reports.lists.insert(1, vec![member("127.0.0.2:7000")]);
    reports
        .lists
        .insert(2, vec![member("relay-c.example:7000")]);
    let t1 = t0 + grace * 10;
    assert_eq!(set.plan(t1, &reports), []);
    assert_eq!(set.plan(t1 + grace / 2, &reports), []);
    assert_eq!(set.plan(t1 + grace, &reports), [Change::Stop(2)]);
    // A member that is a configured server is not doubled; B comes back before its grace.
    reports.lists.insert(0, vec![member("127.0.0.1:7000")]);
    let t2 = t1 + grace * 2;
    assert_eq!(set.plan(t2, &reports), []);
    reports.lists.insert(0, vec![member("127.0.0.2:7000")]);
    assert_eq!(set.plan(t2 + grace / 2, &reports), []);
    assert_eq!(
        set.plan(t2 + grace * 3, &reports),
        [],
        "B was wanted again in time"
    );
    assert_eq!(set.ids(), [0, 1]);
}

/// The agent reaches relay A at a private address; A names itself by its public one, which
/// relay B lists too. A is not dialled a second time at that address (the two sessions would
/// keep taking each other over), and B, learned at the address it names itself by, stays.
#[test]
fn a_relay_reached_at_another_address_is_not_dialled_twice() {
    let t0 = Instant::now();
    let grace = Duration::from_secs(2);
    let mut set = LinkSet::new(&config(&["10.0.0.1:7000"], grace, 16));
    let mut heard = Heard::default();
    set.plan(t0, &heard);
    heard.itself.insert(0, member("54.1.2.3:7000"));
    heard
        .lists
        .insert(0, vec![member("54.1.2.3:7000"), member("10.0.0.2:7000")]);
    let changes = set.plan(t0, &heard);
    assert_eq!(
        started(&changes),
        [(
            1,
            "10.0.0.2:7000".into(),
            Some(addr("10.0.0.2:7000")),
            "10.0.0.1".into()
        )]
    );
    heard.itself.insert(1, member("10.0.0.2:7000"));
    heard
        .lists
        .insert(1, vec![member("54.1.2.3:7000"), member("10.0.0.2:7000")]);
    for later in 1..5 {
        assert_eq!(set.plan(t0 + grace * later, &heard), []);
    }
    assert_eq!(set.ids(), [0, 1]);
    // Relay ids count as well as addresses.
    let mut renamed = member("relay-a.example:7000");
    renamed.id = "54.1.2.3:7000".into();
    heard
        .lists
        .insert(1, vec![renamed, member("10.0.0.2:7000")]);
    set.resolved(
        name("relay-a.example:7000"),
        Ok(vec![addr("10.0.0.9:7000")]),
        t0,
    );
    assert_eq!(set.plan(t0 + grace * 6, &heard), []);
    heard.itself.insert(0, member("10.0.0.1:7000"));
    let addrs: Vec<Option<SocketAddr>> = started(&set.plan(t0 + grace * 7, &heard))
        .into_iter()
        .map(|(_, _, a, _)| a)
        .collect();
    assert_eq!(
        addrs,
        [Some(addr("54.1.2.3:7000")), Some(addr("10.0.0.9:7000"))],
        "once A no longer claims them, that address and that id are other relays"
    );
}

/// A name with an A and an AAAA record for one relay: both addresses are dialled, the relay
/// names itself alike on both, so the session accepted first (which the second replaced) is
/// closed and its address parked while the other link is there, restarts of the relay
/// included.
#[test]
fn two_addresses_of_one_relay_get_one_session() {
    let t0 = Instant::now();
    let mut set = LinkSet::new(&config(
        &["relay.example:7000"],
        Duration::from_secs(60),
        16,
    ));
    let mut heard = Heard::default();
    let dns: &[(&str, &[&str])] = &[("relay.example:7000", &["127.0.0.1:7000", "[::1]:7000"])];
    resolve_all(&mut set, dns, t0, &heard);
    assert_eq!(started(&set.plan(t0, &heard)).len(), 2);
    let mut me = member("relay.example:7000");
    me.id = "1a2b@relay.example:7000".into();
    heard.itself.insert(0, me.clone());
    heard.accepted.insert(0, 1);
    assert_eq!(set.plan(t0, &heard), [], "one session is no duplicate");
    heard.itself.insert(1, me.clone());
    heard.accepted.insert(1, 2);
    assert_eq!(set.plan(t0, &heard), [Change::Stop(0)]);
    assert_eq!(set.ids(), [1]);
    // The relay restarts (a new instance id) and link 1 reconnects: 0 stays parked.
    me.id = "3c4d@relay.example:7000".into();
    heard.itself.insert(1, me);
    heard.accepted.insert(1, 3);
    for later in 1..5 {
        assert_eq!(set.plan(t0 + RESOLVE_EVERY * later, &heard), []);
    }
    // Two relays sharing one advertised name are two relays: their ids differ.
    let mut set = LinkSet::new(&config(
        &["fleet.example:7000"],
        Duration::from_secs(60),
        16,
    ));
    let dns: &[(&str, &[&str])] = &[("fleet.example:7000", &["10.0.0.1:7000", "10.0.0.2:7000"])];
    let mut heard = Heard::default();
    resolve_all(&mut set, dns, t0, &heard);
    set.plan(t0, &heard);
    for (link, id) in [(0, "aa@fleet.example:7000"), (1, "bb@fleet.example:7000")] {
        let mut me = member("fleet.example:7000");
        me.id = id.into();
        heard.itself.insert(link, me.clone());
        heard.accepted.insert(link, link + 1);
        heard.lists.insert(link, vec![me]);
    }
    assert_eq!(set.plan(t0, &heard), []);
    assert_eq!(set.ids(), [0, 1]);
}

/// A relay older than fleet membership behind a name with several addresses: nothing tells
/// whether they are one relay, so the name is dialled by name again, one session.
#[test]
fn a_version_one_relay_behind_several_addresses_is_dialled_by_name() {
    let t0 = Instant::now();
    let mut set = LinkSet::new(&config(
        &["relay.example:7000", "10.0.0.9:7000"],
        Duration::from_secs(60),
        16,
    ));
    let mut heard = Heard::default();
    let dns: &[(&str, &[&str])] = &[("relay.example:7000", &["10.0.0.1:7000", "10.0.0.2:7000"])];
    resolve_all(&mut set, dns, t0, &heard);
    assert_eq!(started(&set.plan(t0, &heard)).len(), 3);
    heard.legacy.insert(1);
    heard.legacy.insert(2);
    let changes = set.plan(t0, &heard);
    assert_eq!(
        changes[..2],
        [Change::Stop(0), Change::Stop(1)],
        "{changes:?}"
    );
    assert_eq!(
        started(&changes),
        [(3, "relay.example:7000".into(), None, "relay.example".into())]
    );
    assert_eq!(
        set.ids(),
        [2, 3],
        "an address, or a name with one, stays as it is"
    );
    assert_eq!(set.plan(t0 + RESOLVE_EVERY * 3, &heard), []);
}

#[test]
fn links_are_capped_configured_first() {
    let t0 = Instant::now();
    let mut set = LinkSet::new(&config(
        &["10.0.0.1:7000", "10.0.0.2:7000"],
        Duration::from_secs(60),
        3,
    ));
    let mut reports = Heard::default();
    set.plan(t0, &reports);
    reports.lists.insert(
        0,
        (3..10)
            .map(|i| member(&format!("10.0.0.{i}:7000")))
            .collect(),
    );
    let changes = set.plan(t0, &reports);
    assert_eq!(started(&changes).len(), 1);
    assert_eq!(set.ids(), [0, 1, 2]);
}

#[test]
fn the_agent_stops_only_when_every_link_is_refused() {
    let t0 = Instant::now();
    let mut set = LinkSet::new(&config(
        &["10.0.0.1:7000", "10.0.0.2:7000"],
        Duration::from_secs(60),
        16,
    ));
    let none = Heard::default();
    set.plan(t0, &none);
    assert!(!set.all_stopped());
    set.mark_stopped(0);
    assert!(!set.all_stopped());
    set.mark_stopped(1);
    assert!(set.all_stopped());
    // A stopped link is not restarted by later plans.
    assert_eq!(set.plan(t0, &none), []);
}

#[test]
fn targets_name_their_address_when_the_host_is_a_name() {
    let t = |host: &str, a: Option<&str>| LinkTarget {
        server: name(&format!("{host}:7000")),
        addr: a.map(addr),
        tls_name: host.into(),
        learned: false,
        ws: None,
    };
    assert_eq!(
        t("127.0.0.1", Some("127.0.0.1:7000")).to_string(),
        "127.0.0.1:7000"
    );
    assert_eq!(
        t("fleet", Some("10.0.0.1:7000")).to_string(),
        "fleet:7000 (10.0.0.1:7000)"
    );
    assert_eq!(t("fleet", None).to_string(), "fleet:7000");
}

#[test]
fn a_member_list_of_many_names_costs_a_bounded_number_of_lookups() {
    let t0 = Instant::now();
    let set = LinkSet::new(&config(&["10.0.0.1:7000"], Duration::from_secs(60), 16));
    let mut heard = Heard::default();
    let list: Vec<MemberEndpoint> = (0..64)
        .map(|i| member(&format!("relay-{i}.example:7000")))
        .chain([member("10.0.0.9:7000")])
        .collect();
    heard.lists.insert(0, list.clone());
    let due = set.names_due(t0, RESOLVE_EVERY, &heard);
    assert_eq!(due.len(), MAX_NAMES_PER_LIST, "{due:?}");
    assert_eq!(due[0], name("relay-0.example:7000"));
    // Two relays sending the same list: still the same names.
    heard.lists.insert(1, list);
    assert_eq!(
        set.names_due(t0, RESOLVE_EVERY, &heard).len(),
        MAX_NAMES_PER_LIST
    );
    // --max-relays lower than that lowers it.
    let set = LinkSet::new(&config(&["10.0.0.1:7000"], Duration::from_secs(60), 3));
    assert_eq!(set.names_due(t0, RESOLVE_EVERY, &heard).len(), 3);
}
