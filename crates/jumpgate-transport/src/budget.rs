//! A per-poll byte budget for the session driver, so one busy connection cannot hog its thread.
//!
//! yamux reads and writes its socket in a loop until the socket would block. A connection that
//! carries a bulk transfer faster than the process can handle it never blocks, so a single poll
//! of its driver can move megabytes (tokio's cooperative budget allows 128 socket reads of 64 KiB)
//! while every other task on the thread waits: another lane's keystroke echo then waits for each
//! busy lane's turn, on the relay and again on the agent. [`Budgeted`] ends a poll once it has
//! moved [`POLL_BUDGET`] bytes: the I/O reports "not ready" after waking the task, so the driver
//! goes to the back of the run queue and the other tasks take their turn first.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};

/// Bytes read plus written through one connection per poll of its driver: one 64 KiB frame,
/// 65 µs of a 1 GB/s transfer. Measured at 1 ms RTT with four bulk streams (BENCHMARKS.md):
/// 64 KiB kept a keystroke echo on another lane at 14-21 ms p50 where 256 KiB gave 19-35 ms,
/// at the same throughput.
pub const POLL_BUDGET: usize = 64 * 1024;

/// What the driver has moved in its current poll; reset by the driver when a poll begins.
#[derive(Debug, Clone, Default)]
pub struct Spent(Arc<AtomicUsize>);

impl Spent {
    /// Starts a new poll with the whole budget.
    pub fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// Runs one read or write unless the budget is spent (then: wake the task to be polled
    /// again, and report "not ready"), and charges what it moved.
    fn charge(
        &self,
        cx: &mut Context<'_>,
        io: impl FnOnce(&mut Context<'_>) -> Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        if self.0.load(Ordering::Relaxed) >= POLL_BUDGET {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let moved = io(cx);
        if let Poll::Ready(Ok(n)) = &moved {
            self.0.fetch_add(*n, Ordering::Relaxed);
        }
        moved
    }
}

/// I/O that stops moving bytes, until the next poll, once `spent` reaches the budget.
pub struct Budgeted<T> {
    inner: T,
    spent: Spent,
}

impl<T> Budgeted<T> {
    /// Wraps `inner`; the owner resets `spent` at the start of every poll.
    pub fn new(inner: T, spent: Spent) -> Self {
        Self { inner, spent }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Budgeted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let Self { inner, spent } = &mut *self;
        spent.charge(cx, |cx| Pin::new(inner).poll_read(cx, buf))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Budgeted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let Self { inner, spent } = &mut *self;
        spent.charge(cx, |cx| Pin::new(inner).poll_write(cx, data))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let Self { inner, spent } = &mut *self;
        spent.charge(cx, |cx| Pin::new(inner).poll_write_vectored(cx, bufs))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};
    use std::future::poll_fn;

    #[tokio::test]
    async fn a_poll_stops_at_the_budget_and_the_next_one_goes_on() {
        let data = vec![1u8; POLL_BUDGET * 3];
        let spent = Spent::default();
        let mut io = Budgeted::new(futures::io::Cursor::new(data), spent.clone());
        let mut buf = vec![0u8; 64 * 1024];
        // One poll: reads succeed until the budget is spent, then the I/O is "not ready".
        let moved = poll_fn(|cx| {
            let mut moved = 0;
            loop {
                match Pin::new(&mut io).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(n)) => moved += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Ready(Ok(moved)),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(moved, POLL_BUDGET);
        spent.reset();
        assert!(
            io.read(&mut buf).await.unwrap() > 0,
            "a new poll has a new budget"
        );

        let spent = Spent::default();
        let mut sink = Budgeted::new(futures::io::Cursor::new(Vec::new()), spent.clone());
        sink.write_all(&vec![2u8; POLL_BUDGET]).await.unwrap();
        let blocked = poll_fn(|cx| Poll::Ready(Pin::new(&mut sink).poll_write(cx, b"x"))).await;
        assert!(blocked.is_pending());
        spent.reset();
        sink.write_all(b"x").await.unwrap();
    }
}
