//! The file store and the PostgreSQL store decide alike: the same random operations (placements
//! of zero to three services, zero being a `--no-port` session, with services renamed between
//! placements, with and without a preferred or strict port, by the name's holder or another
//! identity, with and without caps on what one identity holds, ends of sessions, releases,
//! expiry as time advances, by maintenance or by a placement itself) at the same times give the
//! same grants, refusals, expiries, holders and tables.
//!
//! It needs the harness's PostgreSQL: outside CI a machine without one skips it with a reason,
//! under `CI=true` it fails. It runs fixed sequences (past failures among them), replays the
//! seeds of the checked-in regressions file, and prints how many sequences ran (how many of
//! them seeds) and how many placements each refusal kind answered.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jumpgate_lease::{LeaseKey, PortRange, ServiceAsk};
use jumpgate_tests::Postgres;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use relay_server::leases::{Clock, LeaseStore, Member, PgSettings, StoreTls};
use relay_server::CredentialCaps;

const LO: u16 = 30000;
const HI: u16 = 30011;
const TTL: Duration = Duration::from_secs(100);
/// Seeds of shrunk failures; a seed only replays the case it was found with while [`op`] and
/// [`Op`] keep their shape, so each also goes into the fixed sequences in the current shape.
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/store_equivalence.proptest-regressions"
);

/// The services a placement may ask for; a placement's mask picks some (none: `--no-port`).
const SERVICES: [&str; 3] = ["ssh", "web", "db"];

#[derive(Debug, Clone)]
enum Op {
    /// Agent, identity, preferred port of the first service, strict, which of [`SERVICES`]
    /// (bit i: `SERVICES[i]`; 0: a `--no-port` session).
    Place(u8, u8, Option<u16>, bool, u8),
    Leave(u8),
    Release(u8),
    /// Seconds to let pass, and whether the next placement runs without maintenance first (so
    /// it expires due leases itself, whatever it decides).
    Wait(u64, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..6, 0u8..4, proptest::option::of(LO - 2..HI + 2), any::<bool>(), 0u8..8)
            .prop_map(|(a, i, p, s, m)| Op::Place(a, i, p, s, m)),
        2 => (0u8..6).prop_map(Op::Leave),
        1 => (0u8..6).prop_map(Op::Release),
        2 => (1u64..80, any::<bool>()).prop_map(|(s, quiet)| Op::Wait(s, quiet)),
    ]
}

type Announced = Arc<Mutex<Vec<(LeaseKey, u16)>>>;

fn recorder() -> (Announced, relay_server::leases::OnExpired) {
    let seen: Announced = Arc::default();
    let sink = seen.clone();
    (
        seen,
        Box::new(move |key: &LeaseKey, port| sink.lock().unwrap().push((key.clone(), port))),
    )
}

/// What one store answered to an operation, in comparable form.
async fn apply(store: &LeaseStore, op: &Op) -> String {
    match op {
        Op::Place(a, i, preferred, strict, mask) => {
            let asks: Vec<ServiceAsk> = SERVICES
                .iter()
                .enumerate()
                .filter(|(bit, _)| mask & (1 << bit) != 0)
                .enumerate()
                .map(|(n, (_, service))| ServiceAsk {
                    service: service.to_string(),
                    preferred: preferred.filter(|_| n == 0),
                    strict: *strict && n == 0,
                })
                .collect();
            // Two identities per name's holder: 0 and 1 are one identity, 2 and 3 another.
            let identity = format!("token:{}", i / 2);
            // Identity 1 is capped (tightly enough to be reached), identity 0 is not.
            let caps = (i / 2 == 1).then_some(CredentialCaps {
                names: 2,
                leases: 3,
                sessions: 64,
            });
            match store
                .place(&format!("agent{a}"), &identity, caps, &asks, |_| Some(()))
                .await
            {
                Ok(p) => format!("{:?}", p.grants),
                Err(e) => format!("refused: {e}"),
            }
        }
        Op::Leave(a) => {
            store.deactivate(&format!("agent{a}")).await;
            String::new()
        }
        Op::Release(a) => format!("{:?}", store.release(&format!("agent{a}")).await.unwrap()),
        Op::Wait(..) => String::new(),
    }
}

/// Everything a store shows about its leases.
async fn table(store: &LeaseStore) -> String {
    let mut views: Vec<_> = store
        .views()
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.key.agent, v.key.service, v.port, v.expires_at))
        .collect();
    views.sort();
    let mut holders = Vec::new();
    for a in 0..6 {
        holders.push(store.holder(&format!("agent{a}")).await.unwrap());
    }
    let holdings = (
        store.holdings("token:0").await.unwrap(),
        store.holdings("token:1").await.unwrap(),
        store.holdings_by_identity().await.unwrap(),
    );
    format!(
        "{views:?} {holders:?} {:?} {holdings:?}",
        store.usage().await.unwrap()
    )
}

/// How many placements each refusal kind answered, over the whole run (both stores answer
/// alike, so the file store's answers are counted).
static REFUSALS: Mutex<BTreeMap<&'static str, usize>> = Mutex::new(BTreeMap::new());

fn count_refusal(answer: &str) {
    let Some(why) = answer.strip_prefix("refused: ") else {
        return;
    };
    let kind = [
        ("agent names", "names cap"),
        ("leased ports", "leases cap"),
        ("held by another identity", "name held"),
        ("exhausted", "range exhausted"),
        ("asked strictly", "strict port"),
    ]
    .iter()
    .find(|(needle, _)| why.contains(needle))
    .map_or("other", |(_, kind)| kind);
    *REFUSALS.lock().unwrap().entry(kind).or_default() += 1;
}

/// Places `a` as identity `i` asking for `mask`'s services, nothing preferred.
fn place(a: u8, i: u8, mask: u8) -> Op {
    Op::Place(a, i, None, false, mask)
}

#[test]
fn file_and_postgres_stores_decide_alike() {
    // Never skipped in CI: `in_scratch` fails the test there when PostgreSQL is missing.
    let Some((dir, pg)) = Postgres::in_scratch() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let settings = PgSettings {
        url: pg.url(),
        password_file: Some(pg.password_file.clone()),
        tls: StoreTls::Disable,
        ca: None,
    };
    let range = PortRange::new(LO, HI).unwrap();
    let case = std::sync::atomic::AtomicUsize::new(0);
    let config = ProptestConfig {
        cases: 32,
        max_shrink_iters: 16,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    };
    let fixed: [&[Op]; 5] = [
        // The first shrunk failure (once a seed in the regressions file, recorded for the
        // 4-field `Place` that always asked for ssh and web): one placement of two services.
        &[place(0, 0, 3)],
        // A placement refused right after a quiet wait, while a lease is due: the refusal must
        // not undo the expiry it made (the file store keeps it).
        &[
            place(0, 0, 1),
            Op::Leave(0),
            Op::Wait(80, false),
            Op::Wait(21, true),
            Op::Place(2, 2, Some(HI + 1), true, 3),
        ],
        // Each cap refuses: a third name (one service each), then a fourth lease.
        &[
            place(0, 2, 1),
            place(1, 3, 1),
            place(2, 2, 1),
            place(0, 2, 7),
            place(0, 2, 3),
        ],
        // Renamed services give their ports back: the capped identity renames its two services
        // over and over, never holding more than its 3 leases (before: refused, or ports piled
        // up).
        &[
            place(0, 2, 3),
            Op::Leave(0),
            place(0, 2, 6),
            Op::Leave(0),
            place(0, 2, 5),
            place(1, 2, 1),
            place(1, 2, 4),
        ],
        // A `--no-port` session holds its name and counts as a name while it lasts, and leaves
        // nothing behind: the other identity may claim the name after it left.
        &[
            place(3, 2, 0),
            place(4, 3, 0),
            place(5, 2, 0),
            place(3, 0, 1),
            Op::Leave(3),
            place(3, 0, 1),
            place(5, 2, 0),
            Op::Release(4),
            place(4, 0, 0),
        ],
    ];
    let reset = || {
        pg.psql(
            "DROP TABLE IF EXISTS jumpgate_schema, jumpgate_settings, jumpgate_ports, \
             jumpgate_holders, jumpgate_relays, jumpgate_sessions",
        )
    };
    for (n, ops) in fixed.iter().enumerate() {
        reset();
        let path = dir.path().join(format!("leases-fixed-{n}.json"));
        rt.block_on(compare(&settings, range, &path, ops)).unwrap();
    }
    proptest!(config, |(ops in proptest::collection::vec(op(), 1..60))| {
        let n = case.fetch_add(1, Ordering::Relaxed);
        reset();
        rt.block_on(compare(&settings, range, &dir.path().join(format!("leases-{n}.json")), &ops))?;
    });
    let refusals = REFUSALS.lock().unwrap().clone();
    // Proptest replays each seed of the file before generating: those runs count as generated.
    let seeds = std::fs::read_to_string(REGRESSIONS)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("cc "))
        .count();
    println!(
        "store_equivalence: {} fixed and {} generated sequences ran ({seeds} of them replayed from the regressions file); refusals by kind: {refusals:?}",
        fixed.len(),
        case.load(Ordering::Relaxed),
    );
    for kind in ["names cap", "leases cap", "name held"] {
        assert!(
            refusals.get(kind).is_some_and(|n| *n > 0),
            "no placement was refused by {kind}: the comparison never reached it ({refusals:?})"
        );
    }
}

/// Runs `ops` against a fresh file store at `path` and the (emptied) database, comparing every
/// answer, the tables after each operation and the expiries announced.
async fn compare(
    settings: &PgSettings,
    range: PortRange,
    path: &std::path::Path,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let now = Arc::new(AtomicU64::new(1_000_000));
    let clock: Clock = {
        let now = now.clone();
        Arc::new(move || now.load(Ordering::SeqCst))
    };
    let me = Member {
        id: "r1".into(),
        agent_addr: "127.0.0.1:7000".into(),
        public_host: "h".into(),
        ws_url: None,
    };
    let (file_expired, on_file) = recorder();
    let file = LeaseStore::open(path, range, TTL, on_file)
        .unwrap()
        .with_clock(clock.clone())
        .with_member(me.clone());
    let (pg_expired, on_pg) = recorder();
    let db = LeaseStore::connect(settings, range, TTL, on_pg, me, clock)
        .await
        .unwrap();
    let (mut quiet, mut unticked) = (false, 0);
    for op in ops {
        if let Op::Wait(secs, _) = op {
            now.fetch_add(*secs, Ordering::SeqCst);
            unticked += secs;
        }
        // Maintenance runs before every operation in both (heartbeat, refresh, expiry),
        // except a placement right after a quiet wait, while the relay's last heartbeat
        // is recent enough (25 s of the 30 s horizon) to count it live.
        let this_quiet = matches!(op, Op::Wait(_, true));
        let skip = (this_quiet || quiet && matches!(op, Op::Place(..))) && unticked < 25;
        quiet = this_quiet;
        if !skip {
            file.tick().await.unwrap();
            db.tick().await.unwrap();
            unticked = 0;
        }
        let (f, d) = (apply(&file, op).await, apply(&db, op).await);
        prop_assert_eq!(&f, &d, "answers to {:?} differ", op);
        count_refusal(&f);
        let (f, d) = (table(&file).await, table(&db).await);
        prop_assert_eq!(&f, &d, "tables after {:?} differ", op);
        prop_assert_eq!(&*file_expired.lock().unwrap(), &*pg_expired.lock().unwrap());
    }
    Ok(())
}
