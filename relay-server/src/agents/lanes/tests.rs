use super::*;
use jumpgate_transport::mux::{Mode, MuxSettings, Session};
use tokio_util::compat::TokioAsyncReadCompatExt;

/// An opener whose session is never driven: lanes only hand openers out.
fn opener() -> Opener {
    let (a, _b) = tokio::io::duplex(64);
    Session::start(a.compat(), Mode::Server, MuxSettings::default()).opener
}

fn lanes(max: usize) -> Arc<Lanes> {
    let session = CancellationToken::new();
    Arc::new(Lanes::new(
        opener(),
        Secret::new("k"),
        max,
        Duration::from_millis(10),
        &session,
    ))
}

fn requested(lanes: &Lanes) -> usize {
    lanes.to_request.load(Ordering::Relaxed)
}

#[tokio::test(start_paused = true)]
async fn a_connection_while_every_lane_is_busy_is_carried_at_once_and_the_next_gets_a_new_lane() {
    let lanes = lanes(4);
    let first = lanes.pick();
    assert_eq!(requested(&lanes), 1, "a spare is asked for ahead of need");
    let started = Instant::now();
    let second = lanes.pick(); // the spare has not arrived: share, and ask for one more
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(Arc::ptr_eq(&second.streams, &first.streams));
    assert_eq!(requested(&lanes), 2);
    assert_eq!(lanes.wanted().await, 2, "the relay asks the agent for both");
    let joined = lanes.join(opener()).unwrap();
    assert_eq!((joined.id, lanes.count()), (1, 2));
    let third = lanes.pick(); // the lane that arrived
    assert!(Arc::ptr_eq(&third.streams, &lanes.lock().extra[0].streams));
    drop((first, second, third));
}

#[tokio::test(start_paused = true)]
async fn taking_the_last_idle_lane_asks_for_a_spare() {
    let lanes = lanes(3);
    let first = lanes.pick();
    assert_eq!(requested(&lanes), 1);
    lanes.join(opener()).unwrap();
    let second = lanes.pick(); // the spare: a new spare is asked for
    assert!(!Arc::ptr_eq(&first.streams, &second.streams));
    assert_eq!(requested(&lanes), 2);
    drop((first, second));
}

#[tokio::test(start_paused = true)]
async fn without_room_or_answer_connections_share_the_lane_that_moved_least() {
    let one = lanes(1);
    let a = one.pick();
    let b = one.pick(); // no room for a lane: same lane, nothing asked
    assert_eq!(requested(&one), 0);
    assert_eq!(a.streams.load(Ordering::Relaxed), 2);
    drop((a, b));

    let two = lanes(2);
    let bulk = two.pick();
    two.join(opener()).unwrap();
    let typing = two.pick();
    bulk.bytes.read.store(1 << 30, Ordering::Relaxed);
    typing.bytes.written.store(4096, Ordering::Relaxed);
    let third = two.pick(); // full: shares with the interactive lane
    assert!(Arc::ptr_eq(&third.streams, &typing.streams));
    drop((bulk, typing, third));

    let lanes = lanes(4);
    let held = lanes.pick();
    let shared = lanes.pick(); // asks twice, nobody answers
    assert!(Arc::ptr_eq(&shared.streams, &held.streams));
    assert_eq!(requested(&lanes), 2);
    // Requests are given up after a while, and then none are made for a time.
    tokio::time::advance(REQUEST_EXPIRY).await;
    let third = lanes.pick();
    assert_eq!(
        requested(&lanes),
        2,
        "no new request while lanes fail to arrive"
    );
    tokio::time::advance(FAILED_PAUSE).await;
    let fourth = lanes.pick();
    assert_eq!(requested(&lanes), 3, "asked again after the pause");
    drop((held, shared, third, fourth));
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_newcomers_leaves_the_first_user_alone() {
    let lanes = lanes(4);
    let typing = lanes.pick(); // the first lane; a spare is asked for
    typing.bytes.written.store(2048, Ordering::Relaxed);
    lanes.join(opener()).unwrap();
    let transfer = lanes.pick(); // the spare
                                 // A burst before more lanes arrive. The transfer has just begun (more bytes than the
                                 // typing user, not yet bulk): counting bytes would put the newcomers on the typing
                                 // user's lane; they share the extra lane instead.
    transfer.bytes.read.store(64 * 1024, Ordering::Relaxed);
    let burst: Vec<LaneLease> = (0..3).map(|_| lanes.pick()).collect();
    for lease in &burst {
        assert!(Arc::ptr_eq(&lease.streams, &transfer.streams));
    }
    assert_eq!(typing.streams.load(Ordering::Relaxed), 1);
    // A lane that arrived later takes the next one, then the fewest connections decide.
    lanes.join(opener()).unwrap();
    let next = lanes.pick();
    assert!(Arc::ptr_eq(&next.streams, &lanes.lock().extra[1].streams));
    let after = lanes.pick();
    assert!(Arc::ptr_eq(&after.streams, &next.streams));
    drop((typing, transfer, burst, next, after));
}

#[tokio::test(start_paused = true)]
async fn bulk_is_what_a_lane_moved_lately_not_in_all() {
    let lanes = lanes(2);
    let old = lanes.pick();
    lanes.join(opener()).unwrap();
    let busy = lanes.pick();
    assert!(!Arc::ptr_eq(&old.streams, &busy.streams));
    // The first lane moved a gigabyte long ago, the other one a megabyte just now: the
    // newcomer shares the first, whose transfer is over.
    old.bytes.read.store(1 << 30, Ordering::Relaxed);
    lanes.first.recent(Instant::now());
    tokio::time::advance(ACTIVITY_WINDOW * 3).await;
    lanes.first.recent(Instant::now());
    lanes.lock().extra[0].recent(Instant::now());
    tokio::time::advance(ACTIVITY_WINDOW * 3 / 2).await;
    busy.bytes.read.store(1 << 20, Ordering::Relaxed);
    let newcomer = lanes.pick();
    assert!(Arc::ptr_eq(&newcomer.streams, &old.streams));
    drop((old, busy, newcomer));
}

#[tokio::test(start_paused = true)]
async fn a_session_on_a_short_path_asks_for_no_lanes() {
    let session = CancellationToken::new();
    let lanes = Lanes::new(
        opener(),
        Secret::new("k"),
        8,
        Duration::from_millis(1),
        &session,
    )
    .without_asking();
    let held: Vec<LaneLease> = (0..4).map(|_| lanes.pick()).collect();
    assert_eq!(requested(&lanes), 0);
    assert_eq!(lanes.count(), 1);
    assert_eq!(held[0].streams.load(Ordering::Relaxed), 4);
}

#[tokio::test(start_paused = true)]
async fn extra_lanes_close_only_after_a_minute_without_streams() {
    let lanes = lanes(3);
    let first = lanes.pick();
    lanes.wanted().await;
    let lane = lanes.join(opener()).unwrap();
    let lease = lanes.pick();
    assert!(!Arc::ptr_eq(&lease.streams, &first.streams));
    tokio::time::advance(LANE_IDLE * 2).await;
    assert!(!lanes.close_if_idle(lane.id), "busy lanes stay");
    drop(lease);
    tokio::time::advance(LANE_IDLE / 2).await;
    assert!(!lanes.close_if_idle(lane.id), "recently used lanes stay");
    tokio::time::advance(LANE_IDLE).await;
    assert!(lanes.close_if_idle(lane.id));
    assert!(lane.close.is_cancelled());
    assert_eq!(lanes.count(), 1);
    assert!(!lanes.close_if_idle(0), "the first lane never idles out");
    drop(first);
}

#[test]
fn a_full_session_refuses_more_lanes() {
    let lanes = lanes(2);
    assert!(lanes.join(opener()).is_some());
    assert!(lanes.join(opener()).is_none());
    assert_eq!(lanes.count(), 2);
}
