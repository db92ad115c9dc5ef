//! Byte counting on a stream, for live metrics and the audit log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use crate::tap::{Observe, Tap};

/// Running totals of one direction pair; shared so others can read them while bytes flow.
#[derive(Debug, Default)]
pub struct ByteCounts {
    /// Bytes read from the wrapped stream.
    pub read: AtomicU64,
    /// Bytes written to the wrapped stream.
    pub written: AtomicU64,
}

/// The counters a [`Counted`] stream adds to.
pub struct Counters(Vec<Arc<ByteCounts>>);

impl Observe for Counters {
    fn read(&self, n: usize) {
        for c in &self.0 {
            c.read.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn wrote(&self, result: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = result {
            for c in &self.0 {
                c.written.fetch_add(*n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// A stream that adds every byte it reads or writes to one or more [`ByteCounts`] (the
/// connection's own and, say, its service's totals).
pub type Counted<S> = Tap<S, Counters>;

impl<S> Counted<S> {
    /// Wraps `inner`, counting into each of `counts`.
    pub fn new(inner: S, counts: Vec<Arc<ByteCounts>>) -> Self {
        Tap::with_observer(inner, Counters(counts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_directions_into_every_counter() {
        let (a, mut b) = tokio::io::duplex(64);
        let (own, total) = (
            Arc::new(ByteCounts::default()),
            Arc::new(ByteCounts::default()),
        );
        let mut counted = Counted::new(a, vec![own.clone(), total.clone()]);
        counted.write_all(b"hello").await.unwrap();
        b.write_all(b"abc").await.unwrap();
        let mut buf = [0u8; 3];
        counted.read_exact(&mut buf).await.unwrap();
        for c in [&own, &total] {
            assert_eq!(c.written.load(Ordering::Relaxed), 5);
            assert_eq!(c.read.load(Ordering::Relaxed), 3);
        }
    }
}
