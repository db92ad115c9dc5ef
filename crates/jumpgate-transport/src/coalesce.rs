//! Write coalescing under the yamux session.
//!
//! yamux writes each frame's 12-byte header and its body separately; straight into TLS, each
//! would become its own record and often its own syscall. [`Coalesce`] gathers small writes until
//! yamux flushes, and hands a large body to TLS in one vectored write together with whatever is
//! pending (its header), so bulk data is not copied once more just to sit next to its header.
//! Unlike a plain `BufWriter` it holds no buffer while the session is quiet: an idle agent's
//! session (heartbeats only) costs no buffer, which matters at thousands of agents per relay.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::{AsyncRead, AsyncWrite};

/// Flushes that carried less than this release the buffer: the session has gone quiet.
const QUIET_FLUSH: usize = 1024;
/// Writes at least this large are not copied into the buffer.
const DIRECT_WRITE: usize = 4 * 1024;

/// A write-coalescing wrapper; see the module documentation.
pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed to `inner`.
    written: usize,
    cap: usize,
}

impl<T> Coalesce<T> {
    /// Coalesces small writes of up to `cap` bytes in total; large writes go straight through.
    pub fn new(inner: T, cap: usize) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
            cap,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Hands everything buffered to the inner writer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.reset();
        Poll::Ready(Ok(()))
    }

    /// Empties the buffer after everything in it was written, releasing it if it was small.
    fn reset(&mut self) {
        let flushed = self.buf.len();
        self.buf.clear();
        self.written = 0;
        if flushed < QUIET_FLUSH {
            self.buf = Vec::new();
        }
    }

    /// Writes the buffered bytes and (part of) `data` with one vectored write; returns how much
    /// of `data` was taken.
    fn poll_write_behind_pending(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        while self.written < self.buf.len() {
            let pending = &self.buf[self.written..];
            let parts = [IoSlice::new(pending), IoSlice::new(data)];
            let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &parts))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            let pending_len = pending.len();
            if n < pending_len {
                self.written += n;
                continue;
            }
            self.reset();
            if n > pending_len {
                return Poll::Ready(Ok(n - pending_len));
            }
        }
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if data.len() >= DIRECT_WRITE.min(this.cap) {
            return this.poll_write_behind_pending(cx, data);
        }
        if this.buf.len() + data.len() > this.cap {
            ready!(this.poll_drain(cx))?;
        }
        if this.buf.capacity() == 0 {
            this.buf.reserve_exact(this.cap);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::{AsyncWriteExt, Cursor};

    #[tokio::test]
    async fn writes_arrive_in_order_and_quiet_sessions_hold_no_buffer() {
        let mut w = Coalesce::new(Cursor::new(Vec::new()), 64);
        w.write_all(b"head").await.unwrap();
        w.write_all(b"body").await.unwrap();
        assert_eq!(w.inner.get_ref().len(), 0, "buffered until flush");
        w.flush().await.unwrap();
        assert_eq!(w.inner.get_ref(), b"headbody");
        assert_eq!(w.buf.capacity(), 0, "a small flush releases the buffer");

        let big = vec![7u8; 100];
        w.write_all(b"x").await.unwrap();
        w.write_all(&big).await.unwrap();
        w.write_all(&[1u8; 60]).await.unwrap();
        w.close().await.unwrap();
        let mut expect = b"headbodyx".to_vec();
        expect.extend_from_slice(&big);
        expect.extend_from_slice(&[1u8; 60]);
        assert_eq!(w.inner.get_ref(), &expect);
    }

    /// Accepts at most five bytes per write, so every partial-write path is taken.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = data.len().min(5);
            self.0.extend_from_slice(&data[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_large_body_follows_its_pending_header_through_partial_writes() {
        let mut w = Coalesce::new(Trickle(Vec::new()), 16 * 1024);
        let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        w.write_all(b"header-12by").await.unwrap();
        w.write_all(&body).await.unwrap();
        w.write_all(b"tail").await.unwrap();
        w.flush().await.unwrap();
        let mut expect = b"header-12by".to_vec();
        expect.extend_from_slice(&body);
        expect.extend_from_slice(b"tail");
        assert!(w.inner.0 == expect);
    }
}
