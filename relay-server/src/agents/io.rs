//! What an agent connection runs on: a TCP connection accepted on the agent port, or a
//! WebSocket upgraded on the WebSocket port ([`crate::ws`]). Both go through the same TLS
//! handshake, limits, bans and session code; only the bytes' carrier differs.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use jumpgate_transport::ws::WsIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// An agent connection's byte stream.
#[derive(Debug)]
pub(crate) enum AgentIo {
    /// Raw TLS on the agent port.
    Tcp(TcpStream),
    /// TLS inside binary WebSocket messages. Boxed: the WebSocket's state is far larger than a
    /// socket, and every session's task holds this value.
    Ws(Box<WsIo<TcpStream>>),
}

impl AgentIo {
    /// The TCP connection underneath, for socket options (keepalive, `TCP_NOTSENT_LOWAT`).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            AgentIo::Tcp(tcp) => tcp,
            AgentIo::Ws(ws) => ws.get_ref(),
        }
    }

    /// How the agent reached the relay, as logs and the span name it: `tls` or `websocket`.
    pub fn transport(&self) -> &'static str {
        match self {
            AgentIo::Tcp(_) => "tls",
            AgentIo::Ws(_) => "websocket",
        }
    }
}

impl AsyncRead for AgentIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentIo::Tcp(s) => {
                let before = buf.filled().len();
                let read = Pin::new(&mut *s).poll_read(cx, buf);
                if buf.filled().len() > before {
                    let _ = jumpgate_transport::socket::quick_ack(s);
                }
                read
            }
            AgentIo::Ws(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AgentIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AgentIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            AgentIo::Ws(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AgentIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            AgentIo::Ws(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            AgentIo::Tcp(s) => s.is_write_vectored(),
            AgentIo::Ws(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            AgentIo::Ws(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            AgentIo::Ws(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
