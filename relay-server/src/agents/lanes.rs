//! The connections ("lanes") of one agent session, and which one carries a new user connection.
//!
//! Every stream of a yamux session shares one TCP connection: its send buffer (4 MiB by default,
//! ~400 Mbit/s at 80 ms in all) caps all of an agent's transfers together, one lost packet stalls
//! every stream, and a keystroke queues behind another user's bulk data. An agent that supports
//! it therefore keeps more connections to the relay, but only while user connections overlap:
//! a new user connection takes a lane that carries nothing. Nothing on the connect path waits
//! for a lane: when every lane is busy the connection is carried at once on the lane that has
//! moved the fewest bytes, and the relay asks the agent for one more
//! ([`jumpgate_proto::Control::OpenLane`]) for the connections that come after it. Whenever a
//! connection takes the last idle lane, one more is asked for ahead of need, so a user who
//! connects while a transfer saturates the path (when a new connection's handshake may wait
//! behind full queues or lose its SYN) finds a lane ready instead of queueing behind the
//! transfer. Lanes other than the first close after a minute without streams, so an idle agent
//! costs one connection, as before.
//!
//! Where a connection shares a lane is decided by what the lanes' connections did lately, not by
//! when they arrived or what they moved in all: a newcomer that must share goes to a lane
//! without bulk (under [`BULK_BYTES`] in the last second), an extra lane before the first, the
//! one with the fewest connections; only when every lane carries bulk, to the one that moved
//! least. A typing user who connected first is then not joined by a burst of transfers that
//! arrives before their lanes do (a lane whose transfer has just begun has moved as little as
//! the typing user's), and
//! whoever does share a lane with a transfer waits behind at most one frame of it in yamux plus
//! the small unsent queue the kernel keeps ([`jumpgate_transport::socket::tune_for_path`]).
//!
//! On a short path (the first connection's round trip below the relay's `lanes_min_rtt`, off by
//! default) no extra lane is asked for: one connection carries every stream there at less CPU
//! than several, and no send buffer limits it.

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
/// A requested lane that has not arrived after this long (or six handshake times, if longer) is
/// given up: its SYN may have been lost behind a full queue, which costs a 1 s retransmission.
const REQUEST_EXPIRY: Duration = Duration::from_secs(4);
/// After a requested lane was given up, share busy lanes for this long instead of making users
/// wait again (the agent may be unable to open more connections).
const FAILED_PAUSE: Duration = Duration::from_secs(10);
/// A lane whose connections moved at least this much within the last [`ACTIVITY_WINDOW`]
/// carries bulk; below it, interactive users (a keystroke, a screen update) or nothing.
pub const BULK_BYTES: u64 = 256 * 1024;
/// How far back a lane's recent bytes reach.
const ACTIVITY_WINDOW: Duration = Duration::from_secs(1);

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
    /// What its connections moved lately, for telling bulk from interactive.
    activity: Mutex<Activity>,
}

/// A lane's bytes in the current and the previous [`ACTIVITY_WINDOW`].
#[derive(Debug, Clone, Copy)]
struct Activity {
    /// The lane's byte total when the current window began.
    mark: u64,
    /// When the current window began.
    since: Instant,
    /// Bytes moved in the previous window.
    previous: u64,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Self {
            mark: 0,
            since: now,
            previous: 0,
        }
    }
}

impl Lane {
    fn new(id: u64, opener: Opener, close: CancellationToken, last_used_ms: u64) -> Self {
        Self {
            id,
            opener,
            streams: Arc::default(),
            bytes: Arc::default(),
            last_used_ms: Arc::new(AtomicU64::new(last_used_ms)),
            close,
            activity: Mutex::new(Activity::new(Instant::now())),
        }
    }

    fn moved(&self) -> u64 {
        self.bytes.read.load(Ordering::Relaxed) + self.bytes.written.load(Ordering::Relaxed)
    }

    /// Bytes moved in the last one to two [`ACTIVITY_WINDOW`]s.
    fn recent(&self, now: Instant) -> u64 {
        let moved = self.moved();
        let mut a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        let age = now.saturating_duration_since(a.since);
        if age >= ACTIVITY_WINDOW * 2 {
            // Nothing looked for two windows: what moved since is spread over all of it.
            let windows = (age.as_secs_f64() / ACTIVITY_WINDOW.as_secs_f64()).max(1.0);
            a.previous = ((moved - a.mark.min(moved)) as f64 / windows) as u64;
            a.mark = moved;
            a.since = now;
        } else if age >= ACTIVITY_WINDOW {
            a.previous = moved - a.mark.min(moved);
            a.mark = moved;
            a.since = now;
        }
        a.previous.max(moved - a.mark.min(moved))
    }

    fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }
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
    /// Woken when lanes should be requested; `to_request` says how many.
    wanted: Notify,
    to_request: AtomicUsize,
    /// Proof a joining connection belongs to this session.
    key: Secret,
    /// Most lanes at once, the first included; 1 disables extra lanes.
    max: usize,
    /// Whether to ask the agent for extra lanes (not on a short path).
    ask: bool,
    /// How long a requested lane may take to arrive before it is given up.
    expiry: Duration,
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
    /// which scales how long a requested lane may take to arrive.
    pub fn new(
        first: Opener,
        key: Secret,
        max: usize,
        handshake: Duration,
        session: &CancellationToken,
    ) -> Self {
        let began = Instant::now();
        Self {
            first: Lane::new(0, first, session.child_token(), 0),
            set: Mutex::new(LaneSet {
                next_id: 1,
                ..LaneSet::default()
            }),
            wanted: Notify::new(),
            to_request: AtomicUsize::new(0),
            key,
            max: max.max(1),
            ask: true,
            expiry: (handshake * 6).max(REQUEST_EXPIRY),
            began,
        }
    }

    /// Never asks the agent for extra lanes: for a session on a short path, where one
    /// connection carries everything at less CPU than several. Lanes the agent offers anyway
    /// (it never does unasked) are still taken.
    pub fn without_asking(mut self) -> Self {
        self.ask = false;
        self
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
        set.extra
            .push(Lane::new(id, opener, close.clone(), elapsed_ms(self.began)));
        drop(set);
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

    /// The lane for a new user connection, at once: one that carries nothing if there is one
    /// (the first lane first), otherwise one shared as the module documentation says.
    /// Taking the last idle lane, or sharing a busy one, asks the agent for one more lane, which
    /// the connections after this one take.
    pub fn pick(&self) -> LaneLease {
        let mut set = self.lock();
        let now = Instant::now();
        let before = set.pending.len();
        let expiry = self.expiry;
        set.pending.retain(|at| now.duration_since(*at) < expiry);
        if set.pending.len() < before {
            set.failed_at = Some(now);
        }
        let free = {
            let mut idle = std::iter::once(&self.first)
                .chain(&set.extra)
                .filter(|l| l.streams() == 0);
            idle.next()
                .map(|lane| (self.lease(lane), idle.next().is_none()))
        };
        match free {
            Some((lease, was_last)) => {
                if was_last {
                    self.request(&mut set, now); // a spare for whoever comes next
                }
                lease
            }
            None => {
                self.request(&mut set, now);
                self.shared(&set, now)
            }
        }
    }

    /// Asks the agent for one more lane, unless the session has (or awaits) all it may have or
    /// lanes recently failed to arrive; says whether it asked.
    fn request(&self, set: &mut LaneSet, now: Instant) -> bool {
        let paused = set
            .failed_at
            .is_some_and(|t| now.duration_since(t) < FAILED_PAUSE);
        if !self.ask || paused || 1 + set.extra.len() + set.pending.len() >= self.max {
            return false;
        }
        set.pending.push(now);
        self.to_request.fetch_add(1, Ordering::Relaxed);
        self.wanted.notify_one();
        true
    }

    /// The busy lane a newcomer shares. Among lanes that carry no bulk (quiet users, or
    /// connections too new to tell), an extra lane before the first, then the one with the
    /// fewest connections: a burst of newcomers spreads over the lanes opened for it and leaves
    /// the first lane, whose user connected before the burst, alone, where counting bytes ranks
    /// a lane whose transfer has just begun below a typing user's. When every lane carries
    /// bulk, the one that moved least lately.
    fn shared(&self, set: &LaneSet, now: Instant) -> LaneLease {
        let lanes: Vec<(&Lane, u64)> = set
            .extra
            .iter()
            .chain(std::iter::once(&self.first))
            .map(|l| (l, l.recent(now)))
            .collect();
        let quiet = lanes
            .iter()
            .filter(|(_, recent)| *recent < BULK_BYTES)
            .min_by_key(|(l, _)| (l.id == 0, l.streams()));
        let lane = quiet
            .or_else(|| lanes.iter().min_by_key(|(_, recent)| *recent))
            .map_or(&self.first, |(l, _)| l);
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
mod tests;
