//! The connections ("lanes") of one agent session, and which one carries a new user connection.
//!
//! Every stream of a yamux session shares one TCP connection: its send buffer (4 MiB by default,
//! ~400 Mbit/s at 80 ms in all) caps all of an agent's transfers together, one lost packet stalls
//! every stream, and a keystroke queues behind another user's bulk data. An agent that supports
//! it therefore keeps more connections to the relay, but only while user connections overlap:
//! a new user connection takes a lane that carries nothing; when every lane is busy the relay
//! asks the agent for one more ([`jumpgate_proto::Control::OpenLane`]) and waits for it (it
//! normally arrives within a few round trips; the wait lasts 1.2-3 s at most) before sharing
//! the lane that has moved the fewest bytes. Whenever a connection
//! takes the last idle lane, one more is asked for ahead of need, so a user who connects while
//! a transfer saturates the path (when a new connection's handshake may wait behind full queues
//! or lose its SYN) finds a lane ready instead of queueing behind the transfer. Lanes other than
//! the first close after a minute without streams, so an idle agent costs one connection, as
//! before.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jumpgate_proto::Secret;
use jumpgate_transport::counted::ByteCounts;
use jumpgate_transport::mux::Opener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A lane other than the first closes after this long without streams.
pub const LANE_IDLE: Duration = Duration::from_secs(60);
/// Shortest and longest wait for a requested lane before sharing a busy one. A lane normally
/// arrives within three handshake times; the floor covers one lost SYN (retransmitted after
/// 1 s), which is common when the transfers that made the lane necessary fill the path's
/// queues. Sharing a lane with a transfer would cost the user more than that, for as long as
/// the connection lasts. The wait applies only while every lane is busy.
const WAIT_MIN: Duration = Duration::from_millis(1200);
const WAIT_MAX: Duration = Duration::from_secs(3);
/// A requested lane that has not arrived after this long (or twice the wait, if longer) is
/// given up: its SYN may have been lost behind a full queue, which costs a 1 s retransmission.
const REQUEST_EXPIRY: Duration = Duration::from_secs(4);
/// After a requested lane was given up, share busy lanes for this long instead of making users
/// wait again (the agent may be unable to open more connections).
const FAILED_PAUSE: Duration = Duration::from_secs(10);

/// One connection of the session.
struct Lane {
    id: u64,
    opener: Opener,
    streams: Arc<AtomicUsize>,
    /// Bytes its user connections moved, to tell a bulk lane from an interactive one.
    bytes: Arc<ByteCounts>,
    /// Milliseconds since the session began when the lane last had a stream (for idling out).
    last_used_ms: Arc<AtomicU64>,
    close: CancellationToken,
}

/// The lanes besides the first, and the bookkeeping of lanes asked for.
#[derive(Default)]
struct LaneSet {
    extra: Vec<Lane>,
    /// Lanes asked of the agent and not yet arrived, by when they were asked.
    pending: Vec<Instant>,
    /// When a requested lane last failed to arrive.
    failed_at: Option<Instant>,
    next_id: u64,
}

/// The lanes of one agent session.
pub struct Lanes {
    /// The session's first connection, which also carries its control stream.
    first: Lane,
    set: Mutex<LaneSet>,
    /// Woken when a lane joins.
    joined: Notify,
    /// Woken when lanes should be requested; `to_request` says how many.
    wanted: Notify,
    to_request: AtomicUsize,
    /// Proof a joining connection belongs to this session.
    key: Secret,
    /// Most lanes at once, the first included; 1 disables extra lanes.
    max: usize,
    /// How long a new user connection waits for a requested lane.
    wait: Duration,
    began: Instant,
}

/// A user connection's claim on a lane; the lane counts it as busy until this is dropped.
pub struct LaneLease {
    /// Opens the user connection's stream on this lane.
    pub opener: Opener,
    /// Counts the user connection's bytes towards the lane's.
    pub bytes: Arc<ByteCounts>,
    streams: Arc<AtomicUsize>,
    last_used_ms: Arc<AtomicU64>,
    began: Instant,
}

impl Drop for LaneLease {
    fn drop(&mut self) {
        self.last_used_ms
            .store(elapsed_ms(self.began), Ordering::Relaxed);
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A joined lane: closes when `close` fires (idle, or the session ended).
pub struct JoinedLane {
    /// Lane number within the session (the first is 0).
    pub id: u64,
    /// Fired when the lane should close.
    pub close: CancellationToken,
}

fn elapsed_ms(began: Instant) -> u64 {
    began.elapsed().as_millis() as u64
}

impl Lanes {
    /// The lanes of a session whose first connection is `first`; extra lanes close with
    /// `session`. `handshake` is how long the first connection took from accept to hello,
    /// which scales the wait for a requested lane.
    pub fn new(
        first: Opener,
        key: Secret,
        max: usize,
        handshake: Duration,
        session: &CancellationToken,
    ) -> Self {
        let began = Instant::now();
        Self {
            first: Lane {
                id: 0,
                opener: first,
                streams: Arc::default(),
                bytes: Arc::default(),
                last_used_ms: Arc::default(),
                close: session.child_token(),
            },
            set: Mutex::new(LaneSet {
                next_id: 1,
                ..LaneSet::default()
            }),
            joined: Notify::new(),
            wanted: Notify::new(),
            to_request: AtomicUsize::new(0),
            key,
            max: max.max(1),
            wait: (handshake * 3 + WAIT_MIN).clamp(WAIT_MIN, WAIT_MAX),
            began,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LaneSet> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key a joining connection must present.
    pub fn key(&self) -> &Secret {
        &self.key
    }

    /// Most lanes at once, the first included.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Lanes open now, the first included.
    pub fn count(&self) -> usize {
        1 + self.lock().extra.len()
    }

    /// Adds a connection that presented the right key; `None` when the session already has
    /// all the lanes it may have.
    pub fn join(&self, opener: Opener) -> Option<JoinedLane> {
        let mut set = self.lock();
        if 1 + set.extra.len() >= self.max {
            return None;
        }
        set.pending.pop();
        let id = set.next_id;
        set.next_id += 1;
        let close = self.first.close.child_token();
        set.extra.push(Lane {
            id,
            opener,
            streams: Arc::default(),
            bytes: Arc::default(),
            last_used_ms: Arc::new(AtomicU64::new(elapsed_ms(self.began))),
            close: close.clone(),
        });
        drop(set);
        self.joined.notify_waiters();
        Some(JoinedLane { id, close })
    }

    /// Forgets a lane whose connection ended.
    pub fn remove(&self, id: u64) {
        self.lock().extra.retain(|l| l.id != id);
    }

    /// Closes lane `id` if it has carried nothing for [`LANE_IDLE`]; says whether it did. The
    /// first lane never idles out. Checked under the lock that [`Lanes::pick`] takes, so a lane
    /// is never closed under a connection that just picked it.
    pub fn close_if_idle(&self, id: u64) -> bool {
        let now = elapsed_ms(self.began);
        let mut set = self.lock();
        let idle = set.extra.iter().position(|l| {
            l.id == id
                && l.streams.load(Ordering::Relaxed) == 0
                && now.saturating_sub(l.last_used_ms.load(Ordering::Relaxed))
                    >= LANE_IDLE.as_millis() as u64
        });
        match idle {
            Some(i) => {
                set.extra.remove(i).close.cancel();
                true
            }
            None => false,
        }
    }

    /// Waits until lanes are wanted and says how many to ask the agent for.
    pub async fn wanted(&self) -> usize {
        loop {
            let n = self.to_request.swap(0, Ordering::Relaxed);
            if n > 0 {
                return n;
            }
            self.wanted.notified().await;
        }
    }

    /// The lane for a new user connection: one that carries nothing if there is one; otherwise
    /// a lane asked of the agent, waited for a few round trips; otherwise the lane that has
    /// moved the fewest bytes. Taking the last idle lane asks for a spare one.
    pub async fn pick(&self) -> LaneLease {
        let deadline = Instant::now() + self.wait;
        let mut asked = false;
        loop {
            let joined = self.joined.notified();
            {
                let mut set = self.lock();
                let now = Instant::now();
                let expiry = (self.wait * 2).max(REQUEST_EXPIRY);
                let before = set.pending.len();
                set.pending.retain(|at| now.duration_since(*at) < expiry);
                if set.pending.len() < before {
                    set.failed_at = Some(now);
                }
                let free = {
                    let mut idle = self
                        .lanes(&set)
                        .filter(|l| l.streams.load(Ordering::Relaxed) == 0);
                    idle.next()
                        .map(|lane| (self.lease(lane), idle.next().is_none()))
                };
                if let Some((lease, was_last)) = free {
                    if was_last {
                        self.request(&mut set, now); // a spare for whoever comes next
                    }
                    return lease;
                }
                if !asked {
                    asked = self.request(&mut set, now);
                }
                if !asked || now >= deadline {
                    return self.least_busy(&set);
                }
            }
            if tokio::time::timeout_at(deadline, joined).await.is_err() {
                return self.least_busy(&self.lock());
            }
        }
    }

    /// Asks the agent for one more lane, unless the session has (or awaits) all it may have or
    /// lanes recently failed to arrive; says whether it asked.
    fn request(&self, set: &mut LaneSet, now: Instant) -> bool {
        let paused = set
            .failed_at
            .is_some_and(|t| now.duration_since(t) < FAILED_PAUSE);
        if paused || 1 + set.extra.len() + set.pending.len() >= self.max {
            return false;
        }
        set.pending.push(now);
        self.to_request.fetch_add(1, Ordering::Relaxed);
        self.wanted.notify_one();
        true
    }

    /// Every lane, the first one first.
    fn lanes<'a>(&'a self, set: &'a LaneSet) -> impl Iterator<Item = &'a Lane> {
        std::iter::once(&self.first).chain(&set.extra)
    }

    /// The lane whose connections moved the fewest bytes: an interactive user then shares a
    /// lane with other interactive users rather than with a transfer.
    fn least_busy(&self, set: &LaneSet) -> LaneLease {
        let moved = |l: &Lane| {
            l.bytes.read.load(Ordering::Relaxed) + l.bytes.written.load(Ordering::Relaxed)
        };
        let lane = self
            .lanes(set)
            .min_by_key(|l| moved(l))
            .unwrap_or(&self.first);
        self.lease(lane)
    }

    fn lease(&self, lane: &Lane) -> LaneLease {
        lane.streams.fetch_add(1, Ordering::Relaxed);
        LaneLease {
            opener: lane.opener.clone(),
            bytes: lane.bytes.clone(),
            streams: lane.streams.clone(),
            last_used_ms: lane.last_used_ms.clone(),
            began: self.began,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jumpgate_transport::mux::{Mode, MuxSettings, Session};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    /// An opener whose session is never driven: lanes only hand openers out.
    fn opener() -> Opener {
        let (a, _b) = tokio::io::duplex(64);
        Session::start(a.compat(), Mode::Server, MuxSettings::default()).opener
    }

    /// A user connection waiting for a lane in the background.
    fn spawn_pick(lanes: &Arc<Lanes>) -> tokio::task::JoinHandle<LaneLease> {
        let lanes = lanes.clone();
        tokio::spawn(async move { lanes.pick().await })
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

    #[tokio::test(start_paused = true)]
    async fn a_busy_lane_makes_the_next_connection_ask_for_and_take_a_new_one() {
        let lanes = lanes(4);
        let first = lanes.pick().await;
        let waiting = spawn_pick(&lanes);
        assert!(
            lanes.wanted().await >= 1,
            "the relay asks the agent for a lane"
        );
        let joined = lanes.join(opener()).unwrap();
        let second = waiting.await.unwrap();
        assert!(Arc::ptr_eq(&second.streams, &lanes.lock().extra[0].streams));
        assert_eq!((joined.id, lanes.count()), (1, 2));
        drop((first, second));
    }

    #[tokio::test(start_paused = true)]
    async fn taking_the_last_idle_lane_asks_for_a_spare() {
        let lanes = lanes(3);
        let first = lanes.pick().await;
        assert_eq!(lanes.to_request.load(Ordering::Relaxed), 1);
        lanes.join(opener()).unwrap();
        let second = lanes.pick().await; // the spare: no wait, and a new spare is asked for
        assert!(!Arc::ptr_eq(&first.streams, &second.streams));
        assert_eq!(lanes.to_request.load(Ordering::Relaxed), 2);
        drop((first, second));
    }

    #[tokio::test(start_paused = true)]
    async fn without_room_or_answer_connections_share_the_lane_that_moved_least() {
        let one = lanes(1);
        let a = one.pick().await;
        let b = one.pick().await; // no room for a lane: no wait, same lane
        assert_eq!(one.to_request.load(Ordering::Relaxed), 0);
        assert_eq!(a.streams.load(Ordering::Relaxed), 2);
        drop((a, b));

        let two = lanes(2);
        let bulk = two.pick().await;
        two.join(opener()).unwrap();
        let typing = two.pick().await;
        bulk.bytes.read.store(1 << 30, Ordering::Relaxed);
        typing.bytes.written.store(4096, Ordering::Relaxed);
        let third = two.pick().await; // full: shares with the interactive lane
        assert!(Arc::ptr_eq(&third.streams, &typing.streams));
        drop((bulk, typing, third));

        let lanes = lanes(4);
        let held = lanes.pick().await;
        let started = Instant::now();
        let shared = lanes.pick().await; // asks, nobody answers: shares after the wait
        assert!(started.elapsed() >= WAIT_MIN);
        assert!(Arc::ptr_eq(&shared.streams, &held.streams));
        // Requests are given up after a while, and then users stop waiting for a time.
        tokio::time::advance(REQUEST_EXPIRY).await;
        let again = Instant::now();
        let third = lanes.pick().await;
        assert_eq!(again.elapsed(), Duration::ZERO);
        drop((held, shared, third));
    }

    #[tokio::test(start_paused = true)]
    async fn extra_lanes_close_only_after_a_minute_without_streams() {
        let lanes = lanes(3);
        let first = lanes.pick().await;
        let waiting = spawn_pick(&lanes);
        lanes.wanted().await;
        let lane = lanes.join(opener()).unwrap();
        let lease = waiting.await.unwrap();
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
}
