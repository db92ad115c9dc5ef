//! Noticing a peer that stopped reading, from the moment its socket stopped taking bytes.
//!
//! A session's writers see a stalled peer late: yamux, the coalescing buffer and TLS accept
//! frames into memory long after the socket stopped draining, so a control write that is timed
//! out on its own may start (and its clock with it) well into the stall. [`WriteStall`] sits on
//! the connection itself and remembers when a write or flush first found it unwritable, until
//! the connection has taken [`DRAINED`] bytes since or was flushed: a peer that stopped reading
//! still takes a trickle (its kernel frees a few bytes of receive buffer now and then), which
//! must not restart the clock. [`StallWatch::stalled_for`] fires once a stall has lasted a
//! given time.

use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use crate::tap::{Observe, Tap};

/// Bytes a blocked stream must take before it counts as draining again: 64 KiB, more than a
/// stalled peer's kernel trickles in (a few KiB) and less than a live one takes in a round trip.
pub const DRAINED: u64 = 64 * 1024;

/// A stall in progress: when it began and what the stream took since.
#[derive(Debug, Default)]
struct Stall {
    since: Option<Instant>,
    taken: u64,
}

impl Stall {
    /// The stream could not take a write or flush: a stall begins now, unless one is on.
    fn begin(&mut self) {
        if self.since.is_none() {
            *self = Stall {
                since: Some(Instant::now()),
                taken: 0,
            };
        }
    }
}

/// What a [`WriteStall`] records into: the stall its [`StallWatch`] reads.
pub struct Recorder {
    stall: Arc<Mutex<Stall>>,
}

/// A stream that records since when its writes have made (next to) no progress.
pub type WriteStall<S> = Tap<S, Recorder>;

/// Reads how long a [`WriteStall`]'s stream has been unwritable. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct StallWatch {
    stall: Arc<Mutex<Stall>>,
}

impl<S> WriteStall<S> {
    /// Wraps `inner`; the watch reports on it.
    pub fn new(inner: S) -> (Self, StallWatch) {
        let stall = Arc::new(Mutex::new(Stall::default()));
        let watch = StallWatch {
            stall: stall.clone(),
        };
        (Tap::with_observer(inner, Recorder { stall }), watch)
    }
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Stall> {
        self.stall.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Observe for Recorder {
    /// A write: `Pending` begins a stall, enough bytes taken end it.
    fn wrote(&self, result: &Poll<std::io::Result<usize>>) {
        let mut stall = self.lock();
        match result {
            Poll::Pending => stall.begin(),
            Poll::Ready(Ok(n)) if stall.since.is_some() => {
                stall.taken += *n as u64;
                if stall.taken >= DRAINED {
                    *stall = Stall::default();
                }
            }
            _ => {}
        }
    }

    /// A flush: `Pending` begins a stall, completing one ends it (nothing is left to write).
    fn flushed(&self, result: &Poll<std::io::Result<()>>) {
        let mut stall = self.lock();
        match result {
            Poll::Pending => stall.begin(),
            Poll::Ready(Ok(())) => *stall = Stall::default(),
            _ => {}
        }
    }
}

impl StallWatch {
    /// Since when the stream has taken fewer than [`DRAINED`] bytes although it was given
    /// more; `None` while it drains (or has nothing to write).
    pub fn blocked_since(&self) -> Option<Instant> {
        self.stall.lock().unwrap_or_else(|p| p.into_inner()).since
    }

    /// Completes once the stream has taken no bytes for `limit` while it had some to write.
    /// Checks at least every `limit / 8` (and never less often than every second) for a stall
    /// to begin, then wakes exactly when it would reach `limit`.
    pub async fn stalled_for(&self, limit: Duration) {
        let check = (limit / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            match self.blocked_since() {
                Some(since) if since.elapsed() >= limit => return,
                Some(since) => tokio::time::sleep_until(since + limit).await,
                None => tokio::time::sleep(check).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_is_seen_from_the_first_blocked_write() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (mut near, watch) = WriteStall::new(near);
        near.write_all(&[1; 512]).await.unwrap();
        assert_eq!(
            watch.blocked_since(),
            None,
            "a draining stream is not stalled"
        );

        // The peer reads nothing: the next write blocks, and the stall dates from then.
        let stalled_at = Instant::now();
        let writer = tokio::spawn(async move {
            near.write_all(&[2; 4096]).await.unwrap();
            near
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(watch.blocked_since(), Some(stalled_at));
        let limit = Duration::from_secs(4);
        watch.stalled_for(limit).await;
        assert_eq!(stalled_at.elapsed(), limit, "fires exactly at the limit");

        // A trickle does not end the stall: reading again does once the writer is done.
        let mut sink = vec![0; 8192];
        let _ = far.read(&mut sink[..100]).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(watch.blocked_since(), Some(stalled_at));
        while !writer.is_finished() {
            let _ = far.read(&mut sink).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut near = writer.await.unwrap();
        near.flush().await.unwrap();
        assert_eq!(watch.blocked_since(), None);
    }
}
