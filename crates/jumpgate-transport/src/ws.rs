//! The agent link carried in a WebSocket (issue 24), for networks that pass only HTTP(S): an
//! ingress, an L7 load balancer, a proxy that allows nothing but port 443.
//!
//! [`WsIo`] turns a WebSocket into a byte stream so the same TLS + yamux session runs inside it
//! unchanged, the relay's certificate verified end to end even where an ingress terminates the
//! outer TLS. Each write becomes one binary message (one copy, into the frame); each received
//! message is handed out by reference-counted slices, without another copy. Pings are answered by
//! tungstenite; a close or the end of the connection reads as end of stream.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

pub use tokio_tungstenite;

/// Largest message either side accepts: TLS records are at most ~16 KiB, and [`WsIo`] writes
/// at most [`MAX_WRITE`] per message, so anything bigger is garbage or an attack.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Most bytes one write puts in one message.
const MAX_WRITE: usize = 256 * 1024;

/// WebSocket limits for the agent link: frames and messages capped at [`MAX_MESSAGE`], a
/// bounded write buffer.
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .write_buffer_size(128 * 1024)
        .max_write_buffer_size(4 * MAX_MESSAGE)
}

/// A WebSocket as a byte stream: binary messages in both directions.
#[derive(Debug)]
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last message received.
    pending: Bytes,
}

impl<S> WsIo<S> {
    /// Wraps an upgraded WebSocket.
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
        }
    }

    /// The stream the WebSocket runs on.
    pub fn get_ref(&self) -> &S
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.ws.get_ref()
    }
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text message on the agent link (binary only)",
                    )))
                }
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    return Poll::Ready(Ok(()))
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut ws = Pin::new(&mut self.ws);
        ready!(ws.as_mut().poll_ready(cx)).map_err(to_io)?;
        let n = buf.len().min(MAX_WRITE);
        ws.start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// Bytes written on one side arrive whole and in order on the other, across message
    /// boundaries and small reads; shutdown reads as end of stream.
    #[tokio::test]
    async fn bytes_cross_a_websocket_in_order_and_shutdown_is_eof() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, Some(config())).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, Some(config())).await;
        let (mut client, mut server) = (WsIo::new(client), WsIo::new(server));
        let data: Vec<u8> = (0..600_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(70_001) {
                client.write_all(chunk).await.unwrap();
            }
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        loop {
            let n = server.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes differ");
        drop(writer.await.unwrap());
    }

    /// A text message is not part of the tunnel: the read fails instead of passing it on.
    #[tokio::test]
    async fn a_text_message_is_refused() {
        use futures::SinkExt;
        let (a, b) = tokio::io::duplex(4096);
        let mut client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, Some(config())).await;
        let mut server = WsIo::new(server);
        client.send(Message::text("hello")).await.unwrap();
        let mut buf = [0u8; 16];
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
