//! The byte stream to the relay that [`super::dial`] returns, before the relay's TLS: a
//! socket, TLS to a proxy, TLS to an ingress, a WebSocket, stacked as the path needs.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use jumpgate_transport::ws::WsIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The byte stream to the relay, before the relay's TLS: a socket, or TLS to an `https://`
/// proxy carrying the CONNECT tunnel; and which relay address it reaches.
#[derive(Debug)]
pub struct Egress {
    pub(super) stream: Stream,
    pub(super) relay: Option<SocketAddr>,
    pub(super) proxied: bool,
}

/// The layers under the relay's TLS.
#[derive(Debug)]
pub(super) enum Stream {
    /// Direct, or through an HTTP / SOCKS5 proxy.
    Tcp(TcpStream),
    /// Through an `https://` proxy.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// TLS to a `wss://` ingress, over any of the above.
    WssTls(Box<tokio_rustls::client::TlsStream<Stream>>),
    /// A WebSocket (`ws://`, or `wss://` over `WssTls`).
    Ws(Box<WsIo<Stream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.get_ref().0,
            Stream::WssTls(s) => s.get_ref().0.tcp(),
            Stream::Ws(s) => s.get_ref().tcp(),
        }
    }
}

impl Egress {
    /// The socket underneath, for keepalive and buffer tuning.
    pub fn tcp(&self) -> &TcpStream {
        self.stream.tcp()
    }

    /// The relay's address, for lanes that must reach the same relay; `None` when a proxy was
    /// asked for the relay by name (lanes then ask for the name again).
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay
    }

    /// Whether the path goes through a proxy (a failed pin may then be an inspecting proxy).
    pub fn proxied(&self) -> bool {
        self.proxied
    }
}

/// Delegates to whichever stream `$s` is.
macro_rules! each {
    ($s:expr, $inner:ident => $body:expr) => {
        match $s {
            Stream::Tcp($inner) => $body,
            Stream::Tls($inner) => $body,
            Stream::WssTls($inner) => $body,
            Stream::Ws($inner) => $body,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

impl AsyncRead for Egress {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if this.proxied && buf.filled().len() > before {
            // Proxies that leave Nagle on hold a small frame until the one before it is
            // acknowledged: acknowledge at once (measured: connections/s through tinyproxy).
            let _ = jumpgate_transport::socket::quick_ack(this.stream.tcp());
        }
        read
    }
}

impl AsyncWrite for Egress {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
