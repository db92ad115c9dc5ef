//! The table's unit and property tests: placement, renewal, expiry, holders and restore, and
//! that in-place attempts with their undo log behave exactly as the clone-based plan they replaced.

use proptest::prelude::*;

use super::{LeaseKey, LeaseTable};
use crate::grant::{AllocError, Attempt, Grant, GrantKind, ServiceAsk};
use crate::range::PortRange;
use crate::snapshot::{LeaseRecord, LeaseSnapshot};

fn ask(service: &str) -> ServiceAsk {
    ServiceAsk {
        service: service.into(),
        preferred: None,
        strict: false,
    }
}

fn prefer(service: &str, port: u16, strict: bool) -> ServiceAsk {
    ServiceAsk {
        service: service.into(),
        preferred: Some(port),
        strict,
    }
}

fn all(_: u16) -> bool {
    true
}

fn table(lo: u16, hi: u16) -> LeaseTable {
    LeaseTable::new(PortRange::new(lo, hi).unwrap(), 100)
}

#[test]
fn exhausted_range_names_the_range_and_usage() {
    let mut t = table(10000, 10001);
    t.acquire("a", &[ask("ssh")], 1, &mut all).unwrap();
    t.acquire("b", &[ask("ssh")], 1, &mut all).unwrap();
    let err = t.acquire("c", &[ask("ssh")], 1, &mut all).unwrap_err();
    assert_eq!(
        err.to_string(),
        "port range 10000-10001 exhausted (2 in use)"
    );
}

#[test]
fn reconnect_renews_the_same_port() {
    let mut t = table(10, 20);
    let first = t.acquire("a", &[ask("ssh")], 1, &mut all).unwrap();
    t.deactivate_agent("a", 5);
    t.acquire("b", &[ask("ssh")], 6, &mut all).unwrap();
    let again = t.acquire("a", &[ask("ssh")], 7, &mut all).unwrap();
    assert_eq!(again[0].port, first[0].port);
    assert_eq!(again[0].kind, GrantKind::Renewed);
}

#[test]
fn unbindable_ports_are_skipped() {
    let mut t = table(10, 12);
    let g = t
        .acquire("a", &[ask("ssh")], 1, &mut |p| p != 10 && p != 11)
        .unwrap();
    assert_eq!(g[0].port, 12);
    assert!(t.acquire("b", &[ask("ssh")], 1, &mut |p| p == 12).is_err());
}

#[test]
fn renewal_moves_when_old_port_was_taken_by_another_process() {
    let mut t = table(10, 12);
    t.acquire("a", &[ask("ssh")], 1, &mut all).unwrap();
    t.deactivate_agent("a", 2);
    let g = t.acquire("a", &[ask("ssh")], 3, &mut |p| p != 10).unwrap();
    assert_eq!(g[0].port, 11);
    assert!(g[0].note.as_deref().unwrap().contains("port 10"));
}

#[test]
fn preferred_port_granted_taken_and_strict() {
    let mut t = table(10, 20);
    let g = t
        .acquire("a", &[prefer("ssh", 15, false)], 1, &mut all)
        .unwrap();
    assert_eq!((g[0].port, g[0].kind), (15, GrantKind::Preferred));
    let g = t
        .acquire("b", &[prefer("ssh", 15, false)], 1, &mut all)
        .unwrap();
    assert_ne!(g[0].port, 15);
    assert!(g[0]
        .note
        .as_deref()
        .unwrap()
        .contains("leased to another agent"));
    let err = t
        .acquire("c", &[prefer("ssh", 15, true)], 1, &mut all)
        .unwrap_err();
    assert!(matches!(
        err,
        AllocError::PreferredUnavailable { port: 15, .. }
    ));
    let err = t
        .acquire("c", &[prefer("ssh", 99, true)], 1, &mut all)
        .unwrap_err();
    assert!(err
        .to_string()
        .contains("outside the relay's port range 10-20"));
}

#[test]
fn failure_leaves_table_unchanged() {
    let mut t = table(10, 11);
    let before = t.snapshot(0);
    let err = t.acquire("a", &[ask("ssh"), ask("web"), ask("x")], 1, &mut all);
    assert!(err.is_err());
    assert_eq!(t.snapshot(0), before);
    assert_eq!(t.free_count(), 2);
}

#[test]
fn expired_ports_are_reused_last() {
    let mut t = table(10, 12);
    t.acquire("a", &[ask("ssh")], 1, &mut all).unwrap(); // 10
    t.deactivate_agent("a", 1);
    assert!(t.expire(100).is_empty(), "not yet: last seen 1 + ttl 100");
    assert_eq!(t.expire(101), vec![(LeaseKey::new("a", "ssh"), 10)]);
    let ports: Vec<u16> = ["b", "c", "d"]
        .iter()
        .map(|n| t.acquire(n, &[ask("ssh")], 102, &mut all).unwrap()[0].port)
        .collect();
    assert_eq!(ports, vec![11, 12, 10]);
}

#[test]
fn active_leases_never_expire() {
    let mut t = table(10, 12);
    t.acquire("a", &[ask("ssh")], 1, &mut all).unwrap();
    assert!(t.expire(u64::MAX).is_empty());
    assert_eq!(t.expires_at(&LeaseKey::new("a", "ssh")), None);
}

#[test]
fn snapshot_restores_leases_and_free_order() {
    let mut t = table(10, 13);
    t.acquire("a", &[ask("ssh")], 1, &mut all).unwrap(); // 10
    t.acquire("b", &[ask("ssh")], 1, &mut all).unwrap(); // 11
    t.deactivate_agent("a", 2);
    t.expire(1000);
    let snap = t.snapshot(50);
    let (mut r, dropped) = LeaseTable::restore(t.range(), 100, snap).unwrap();
    assert!(dropped.is_empty());
    assert_eq!(r.port_of(&LeaseKey::new("b", "ssh")), Some(11));
    let ports: Vec<u16> = ["c", "d", "e"]
        .iter()
        .map(|n| r.acquire(n, &[ask("ssh")], 60, &mut all).unwrap()[0].port)
        .collect();
    assert_eq!(ports, vec![12, 13, 10]);
    assert_eq!(
        r.acquire("b", &[ask("ssh")], 61, &mut all).unwrap()[0].port,
        11
    );
}

#[test]
fn a_names_holder_lives_exactly_as_long_as_its_leases_and_survives_a_restart() {
    let mut t = table(10, 19);
    t.set_holder("a", "token:team-a");
    assert_eq!(t.holder("a"), None, "no leases, no holder");
    t.acquire("a", &[ask("ssh"), ask("web")], 1, &mut all)
        .unwrap();
    t.set_holder("a", "token:team-a");
    assert_eq!(t.holder("a"), Some("token:team-a"));
    let (restored, _) = LeaseTable::restore(t.range(), 100, t.snapshot(5)).unwrap();
    assert_eq!(restored.holder("a"), Some("token:team-a"));
    t.deactivate_agent("a", 10);
    assert_eq!(t.expire(50).len(), 0);
    assert_eq!(t.holder("a"), Some("token:team-a"), "still leased");
    assert_eq!(t.expire(111).len(), 2);
    assert_eq!(t.holder("a"), None, "expired with its leases");
    t.acquire("b", &[ask("ssh")], 200, &mut all).unwrap();
    t.set_holder("b", "cert:b");
    t.release_agent("b", 201);
    assert_eq!(t.holder("b"), None, "released with its leases");
}

#[test]
fn services_a_placement_no_longer_asks_for_give_their_ports_back() {
    let mut t = table(10, 19);
    t.acquire("a", &[ask("a1"), ask("a2")], 1, &mut all)
        .unwrap();
    t.hold("a", "token:team");
    for (round, services) in [["b1", "b2"], ["c1", "c2"], ["d1", "d2"]]
        .iter()
        .enumerate()
    {
        t.deactivate_agent("a", 2 + round as u64);
        let asks: Vec<ServiceAsk> = services.iter().map(|s| ask(s)).collect();
        t.acquire("a", &asks, 3 + round as u64, &mut all).unwrap();
        t.hold("a", "token:team");
        let held: Vec<&str> = t.leases_of("a").map(|(s, _)| s).collect();
        assert_eq!(held, services.to_vec());
        assert_eq!(t.in_use(), 2);
        assert_eq!(t.holdings("token:team"), (1, 2));
    }
    // A refused attempt keeps what the name had.
    let before = t.snapshot(9);
    let err = t.acquire("a", &[prefer("x", 99, true)], 9, &mut all);
    assert!(err.is_err());
    assert_eq!(t.snapshot(9), before);
}

#[test]
fn a_live_name_without_leases_is_held_until_its_session_ends() {
    let mut t = table(10, 19);
    t.acquire("np", &[], 1, &mut all).unwrap();
    t.hold("np", "token:team");
    assert_eq!(t.holder("np"), Some("token:team"));
    assert_eq!(t.holdings("token:team"), (1, 0));
    // Not persisted: a restarted relay has no live session.
    assert!(t.snapshot(2).holders.is_empty());
    t.deactivate_agent("np", 3);
    assert_eq!(t.holder("np"), None, "the session ended, nothing is held");
    assert_eq!(t.holdings("token:team"), (0, 0));
    // A live name that drops its last service keeps its holder; releasing drops it.
    t.acquire("b", &[ask("ssh")], 4, &mut all).unwrap();
    t.hold("b", "cert:b");
    t.acquire("b", &[], 5, &mut all).unwrap();
    assert_eq!((t.holder("b"), t.in_use()), (Some("cert:b"), 0));
    t.release_agent("b", 6);
    assert_eq!(t.holder("b"), None);
}

#[test]
fn restore_reports_out_of_range_and_rejects_conflicts() {
    let rec = |agent: &str, port| LeaseRecord {
        agent: agent.into(),
        service: "ssh".into(),
        port,
        last_seen: 1,
    };
    let range = PortRange::new(10, 20).unwrap();
    let snap = LeaseSnapshot {
        leases: vec![rec("a", 10), rec("b", 99)],
        freed: vec![],
        holders: vec![],
    };
    let (_, dropped) = LeaseTable::restore(range, 5, snap).unwrap();
    assert_eq!(dropped, vec![rec("b", 99)]);
    let snap = LeaseSnapshot {
        leases: vec![rec("a", 10), rec("b", 10)],
        freed: vec![],
        holders: vec![],
    };
    assert!(LeaseTable::restore(range, 5, snap).is_err());
}

#[derive(Debug, Clone)]
enum Op {
    Acquire(u8, Option<u16>, bool),
    Leave(u8),
    Release(u8),
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..12, proptest::option::of(0u16..40), any::<bool>())
            .prop_map(|(a, p, s)| Op::Acquire(a, p, s)),
        (0u8..12).prop_map(Op::Leave),
        (0u8..12).prop_map(Op::Release),
        Just(Op::Expire),
    ]
}

/// The clone-based placement that `try_acquire` replaced: plan on a copy, keep the copy.
fn plan_by_clone(
    t: &LeaseTable,
    agent: &str,
    asks: &[ServiceAsk],
    now: u64,
    bindable: &mut dyn FnMut(u16) -> bool,
) -> Result<(LeaseTable, Vec<Grant>), AllocError> {
    let mut work = t.clone();
    work.retire_unasked(agent, asks, now);
    let grants = asks
        .iter()
        .map(|ask| work.acquire_one(agent, ask, now, bindable))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((work, grants))
}

/// Every field but the (idle) undo log.
fn state(t: &LeaseTable) -> impl PartialEq + std::fmt::Debug {
    let mut freed: Vec<_> = t.freed_at.iter().map(|(p, a)| (*p, *a)).collect();
    freed.sort_unstable();
    let mut owners: Vec<_> = t.owners.iter().map(|(p, k)| (*p, k.clone())).collect();
    owners.sort_unstable();
    let mut holders: Vec<_> = t.holders.clone().into_iter().collect();
    holders.sort_unstable();
    let leases: Vec<_> = t
        .leases
        .iter()
        .map(|(k, l)| (k.clone(), l.port, l.active, l.last_seen))
        .collect();
    assert!(t.undo.is_none(), "undo log left behind");
    (leases, owners, t.free.clone(), freed, holders)
}

/// What [`LeaseTable::expire`] must return at `now`, by looking at every lease (what it did
/// on every call before it kept `next_due`): the due ones, oldest first.
fn due_by_walking(t: &LeaseTable, now: u64) -> Vec<(LeaseKey, u16)> {
    let mut due: Vec<(u64, LeaseKey, u16)> = t
        .leases
        .iter()
        .filter(|(_, l)| !l.active && l.last_seen + t.ttl_secs <= now)
        .map(|(k, l)| (l.last_seen, k.clone(), l.port))
        .collect();
    due.sort();
    due.into_iter().map(|(_, k, port)| (k, port)).collect()
}

#[derive(Debug, Clone)]
enum TxOp {
    /// Agent, preferred port of "ssh", strict, whether the caller accepts the grants, and
    /// the second service ("web" or "db": a placement may rename it, freeing the other).
    Acquire(u8, Option<u16>, bool, bool, bool),
    Leave(u8),
    Release(u8),
    Expire,
}

fn tx_op() -> impl Strategy<Value = TxOp> {
    prop_oneof![
        4 => (0u8..10, proptest::option::of(5u16..35), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(a, p, s, ok, web)| TxOp::Acquire(a, p, s, ok, web)),
        1 => (0u8..10).prop_map(TxOp::Leave),
        1 => (0u8..10).prop_map(TxOp::Release),
        1 => Just(TxOp::Expire),
    ]
}

proptest! {
    /// Whatever happens, no port is ever leased twice, leased ports are in range, a port that
    /// cannot be bound is never granted, and every port of the range is exactly one of
    /// leased or free.
    #[test]
    fn ports_are_never_double_leased(ops in proptest::collection::vec(op(), 1..120),
                                     blocked in proptest::collection::hash_set(10u16..30, 0..5)) {
        let mut t = table(10, 29);
        let mut now = 1;
        for op in ops {
            now += 7;
            match op {
                Op::Acquire(a, pref, strict) => {
                    let asks = [ServiceAsk { service: "ssh".into(), preferred: pref, strict }, ask("web")];
                    // A port the bind probe refuses is never granted.
                    if let Ok(grants) = t.acquire(&format!("agent{a}"), &asks, now, &mut |p| !blocked.contains(&p)) {
                        for g in grants {
                            prop_assert!(!blocked.contains(&g.port), "unbindable port {} granted", g.port);
                        }
                    }
                }
                Op::Leave(a) => t.deactivate_agent(&format!("agent{a}"), now),
                Op::Release(a) => { t.release_agent(&format!("agent{a}"), now); }
                Op::Expire => {
                    let due = due_by_walking(&t, now);
                    prop_assert_eq!(t.expire(now), due);
                }
            }
            prop_assert!(t.leases.values().filter(|l| !l.active).all(|l| l.last_seen + t.ttl_secs >= t.next_due),
                "a waiting lease is due before next_due {}: {:?}", t.next_due, t.leases);
            let mut seen = std::collections::HashSet::new();
            for (_, port, _, _) in t.iter() {
                prop_assert!(seen.insert(port), "port {} leased twice", port);
                prop_assert!(t.range().contains(port));
            }
            prop_assert_eq!(t.in_use() + t.free_count(), t.range().len());
            let snap = t.snapshot(now);
            let (r, dropped) = LeaseTable::restore(t.range(), 100, snap.clone()).unwrap();
            prop_assert!(dropped.is_empty());
            prop_assert_eq!(r.snapshot(now), snap);
            // After a restart every lease waits for its agent: each expires on time.
            let later = now + 60;
            let due = due_by_walking(&r, later);
            prop_assert_eq!(r.clone().expire(later), due);
        }
    }

    /// `try_acquire` (changes in place, undone when refused or failed) gives exactly the
    /// grants, errors and table of the clone-based plan it replaced, whether the caller keeps
    /// the attempt or not; a refused attempt leaves the table as it was.
    #[test]
    fn in_place_attempts_match_the_clone_based_plan(
        ops in proptest::collection::vec(tx_op(), 1..150),
        blocked in proptest::collection::hash_set(10u16..30, 0..6),
    ) {
        let mut new = table(10, 29);
        let mut old = table(10, 29);
        let mut now = 1;
        for op in ops {
            now += 13;
            match op {
                TxOp::Acquire(a, pref, strict, ok, web) => {
                    let agent = format!("agent{a}");
                    let asks = [
                        ServiceAsk { service: "ssh".into(), preferred: pref, strict },
                        ask(if web { "web" } else { "db" }),
                    ];
                    let mut probe = |p: u16| !blocked.contains(&p);
                    let before = state(&new);
                    let got = new.try_acquire(&agent, &asks, now, &mut probe, &mut |_| ok);
                    let want = plan_by_clone(&old, &agent, &asks, now, &mut probe);
                    match (got, want) {
                        (Ok(Attempt::Committed(g)), Ok((plan, w))) if ok => {
                            prop_assert_eq!(g, w);
                            old = plan;
                            new.set_holder(&agent, "id");
                            old.set_holder(&agent, "id");
                        }
                        (Ok(Attempt::RolledBack(g)), Ok((_, w))) if !ok => {
                            prop_assert_eq!(g, w);
                            prop_assert_eq!(state(&new), before);
                        }
                        (Err(e), Err(w)) => {
                            prop_assert_eq!(e, w);
                            prop_assert_eq!(state(&new), before);
                        }
                        (g, w) => prop_assert!(false, "try_acquire {g:?} but plan {w:?}"),
                    }
                }
                TxOp::Leave(a) => {
                    new.deactivate_agent(&format!("agent{a}"), now);
                    old.deactivate_agent(&format!("agent{a}"), now);
                }
                TxOp::Release(a) => {
                    let agent = format!("agent{a}");
                    prop_assert_eq!(new.release_agent(&agent, now), old.release_agent(&agent, now));
                }
                TxOp::Expire => {
                    let due = due_by_walking(&new, now);
                    prop_assert_eq!(new.expire(now), due.clone());
                    prop_assert_eq!(old.expire(now), due);
                }
            }
            prop_assert_eq!(state(&new), state(&old));
            prop_assert_eq!(new.in_use() + new.free_count(), new.range().len());
        }
    }
}
