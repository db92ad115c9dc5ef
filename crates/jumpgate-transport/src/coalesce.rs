//! Write coalescing under the yamux session.
//!
//! yamux writes each frame's 12-byte header and its body separately; straight into TLS, each
//! would become its own record and often its own syscall. [`Coalesce`] gathers writes until yamux
//! flushes. Unlike a plain `BufWriter` it holds no buffer while the session is quiet: an idle
//! agent's session (heartbeats only) costs no bulk-sized buffer, which matters at thousands of
//! agents per relay.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::{AsyncRead, AsyncWrite};

/// Flushes that carried less than this release the buffer: the session has gone quiet.
const QUIET_FLUSH: usize = 1024;

/// A write-coalescing wrapper; see the module documentation.
pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed to `inner`.
    written: usize,
    cap: usize,
}

impl<T> Coalesce<T> {
    /// Coalesces writes of up to `cap` bytes in total; larger writes go straight through.
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
        let flushed = self.buf.len();
        self.buf.clear();
        self.written = 0;
        if flushed < QUIET_FLUSH {
            self.buf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() + data.len() > this.cap {
            ready!(this.poll_drain(cx))?;
        }
        if data.len() >= this.cap {
            return Pin::new(&mut this.inner).poll_write(cx, data);
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
}
