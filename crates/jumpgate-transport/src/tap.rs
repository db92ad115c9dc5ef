//! A stream passed through unchanged while an observer hears what its reads, writes and
//! flushes did: the one wrapper behind byte counting ([`crate::counted`]) and stall watching
//! ([`crate::stall`]), so each says only what it does with the results.

use std::io::{IoSlice, Result};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a [`Tap`] tells its observer; each has a default that ignores it.
pub trait Observe {
    /// A read returned `n > 0` bytes.
    fn read(&self, _n: usize) {}
    /// A write (plain or vectored) returned `result`.
    fn wrote(&self, _result: &Poll<Result<usize>>) {}
    /// A flush returned `result`.
    fn flushed(&self, _result: &Poll<Result<()>>) {}
}

/// `inner`, with every read, write and flush told to an [`Observe`]r.
pub struct Tap<S, O> {
    inner: S,
    observer: O,
}

impl<S, O> Tap<S, O> {
    /// Wraps `inner` for `observer`.
    pub fn with_observer(inner: S, observer: O) -> Self {
        Self { inner, observer }
    }
}

impl<S: AsyncRead + Unpin, O: Observe + Unpin> AsyncRead for Tap<S, O> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.observer.read(n);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin, O: Observe + Unpin> AsyncWrite for Tap<S, O> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.observer.wrote(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.observer.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.observer.flushed(&result);
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
