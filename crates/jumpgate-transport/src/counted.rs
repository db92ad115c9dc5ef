//! Byte counting on a stream, for live metrics and the audit log.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Running totals of one direction pair; shared so others can read them while bytes flow.
#[derive(Debug, Default)]
pub struct ByteCounts {
    /// Bytes read from the wrapped stream.
    pub read: AtomicU64,
    /// Bytes written to the wrapped stream.
    pub written: AtomicU64,
}

/// A stream that adds every byte it reads or writes to one or more [`ByteCounts`] (the
/// connection's own and, say, its service's totals).
pub struct Counted<S> {
    inner: S,
    counts: Vec<Arc<ByteCounts>>,
}

impl<S> Counted<S> {
    /// Wraps `inner`, counting into each of `counts`.
    pub fn new(inner: S, counts: Vec<Arc<ByteCounts>>) -> Self {
        Self { inner, counts }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            for c in &self.counts {
                c.read.fetch_add(n, Ordering::Relaxed);
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            for c in &self.counts {
                c.written.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
