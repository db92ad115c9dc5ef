//! Large socket reads under TLS.
//!
//! rustls reads the socket at most 4 KiB at a time, so a bulk transfer through a session costs
//! four or more `read` syscalls per 16 KiB record; on loopback those syscalls, not the
//! cryptography, bound throughput. [`ReadAhead`] notices bulk arrival (a read that fills the
//! caller's whole buffer) and from then on reads the socket in 64 KiB chunks, serving rustls's
//! small reads from memory. Handshakes, heartbeats and typing never allocate the buffer, and it
//! is released as soon as a read comes back short, so a thousand idle sessions hold none.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of one socket read while data arrives in bulk.
pub const READ_AHEAD: usize = 64 * 1024;

/// A socket read that returned less than this means the peer is not sending in bulk: once the
/// buffered bytes are consumed, the buffer is released and reads go straight to the caller.
const BULK_READ: usize = 8 * 1024;

/// A direct read that filled at least this much of the caller's buffer, all of it, suggests
/// more is waiting: switch to reading ahead.
const BULK_HINT: usize = 4 * 1024;

/// Serves small reads from one large read of the inner stream; writes pass straight through.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    /// Either empty (quiet) or `READ_AHEAD` initialised bytes.
    buf: Vec<u8>,
    /// The unconsumed bytes are `buf[pos..end]`.
    pos: usize,
    end: usize,
    /// Whether the last socket read was a bulk one: read ahead, and keep the buffer.
    bulk: bool,
}

impl<T> ReadAhead<T> {
    /// Wraps a stream, typically a freshly connected or accepted `TcpStream`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            bulk: false,
        }
    }

    /// The wrapped stream, for socket options and addresses.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Hands out up to `out.remaining()` buffered bytes; releases the buffer once it is drained
    /// after a small read.
    fn serve(&mut self, out: &mut ReadBuf<'_>) {
        let n = (self.end - self.pos).min(out.remaining());
        out.put_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
            if !self.bulk {
                self.buf = Vec::new();
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.end {
            this.serve(out);
            return Poll::Ready(Ok(()));
        }
        // Not in bulk, or a caller that asks for a bulk-sized read: no copy through the buffer.
        if !this.bulk || out.remaining() >= READ_AHEAD {
            let wanted = out.remaining();
            let before = out.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            let n = out.filled().len() - before;
            this.bulk = n == wanted && n >= BULK_HINT;
            return Poll::Ready(Ok(()));
        }
        if this.buf.is_empty() {
            this.buf = vec![0; READ_AHEAD];
        }
        let mut fill = ReadBuf::new(&mut this.buf);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut fill))?;
        let n = fill.filled().len();
        this.end = n;
        this.bulk = n >= BULK_READ;
        this.serve(out);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
    async fn small_reads_see_every_byte_in_order_and_a_quiet_stream_holds_no_buffer() {
        let (mut tx, rx) = tokio::io::duplex(256 * 1024);
        let mut rx = ReadAhead::new(rx);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        tx.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        let mut at = 0;
        while at < got.len() {
            let end = (at + 4096).min(got.len());
            at += rx.read(&mut got[at..end]).await.unwrap();
        }
        assert!(got == data);
        assert_eq!(
            rx.buf.len(),
            READ_AHEAD,
            "bulk arrival switched to reading ahead"
        );

        tx.write_all(b"ping").await.unwrap();
        let mut small = [0u8; 16];
        let n = rx.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"ping");
        assert_eq!(rx.buf.capacity(), 0, "a small read releases the buffer");

        drop(tx);
        assert_eq!(rx.read(&mut small).await.unwrap(), 0, "EOF passes through");
    }
}
