//! The agent link carried in a WebSocket (issue 24), for networks that pass only HTTP(S): an
//! ingress, an L7 load balancer, a proxy that allows nothing but port 443.
//!
//! [`WsIo`] turns a WebSocket into a byte stream so the same TLS + yamux session runs inside it
//! unchanged, the relay's certificate verified end to end even where an ingress terminates the
//! outer TLS. Each write becomes one binary message (one copy, into the frame); each received
//! message is handed out by reference-counted slices, without another copy. Pings are answered by
//! tungstenite; a close or the end of the connection reads as end of stream.

use std::io;
use std::net::{IpAddr, SocketAddr};
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

/// Most addresses of a forwarding chain looked at: a client behind more proxies than this is
/// not plausible, and a header listing thousands must not cost a loop over each.
pub const MAX_HOPS: usize = 32;

/// The client a chain of trusted proxies connected on behalf of, from the `Forwarded` header's
/// `for=` parameters (RFC 7239) or, without one, `X-Forwarded-For`: each value as the request
/// carried it, in order (repeated headers are one list). The chain is read from the right, the
/// proxy nearest the relay first; the first address `trusted` does not cover is the client (a
/// client can write anything on the left, but not past the proxies the relay trusts). When every
/// address is trusted, the left-most is the client.
///
/// `Ok(None)`: no such header. `Err`: a header that does not parse (an obfuscated or `unknown`
/// node included), the caller then keeps the TCP peer.
pub fn forwarded_client<'a>(
    forwarded: impl IntoIterator<Item = &'a [u8]>,
    x_forwarded_for: impl IntoIterator<Item = &'a [u8]>,
    trusted: impl Fn(IpAddr) -> bool,
) -> Result<Option<IpAddr>, &'static str> {
    let forwarded: Vec<&[u8]> = forwarded.into_iter().collect();
    let (values, standard) = if forwarded.is_empty() {
        (x_forwarded_for.into_iter().collect(), false)
    } else {
        (forwarded, true)
    };
    let mut chain = Vec::new();
    for value in values {
        let value = std::str::from_utf8(value).map_err(|_| "a header that is not UTF-8")?;
        for entry in value.split(',') {
            if chain.len() == MAX_HOPS {
                return Err("more forwarding hops than a client is behind");
            }
            let node = if standard {
                forwarded_for(entry)?
            } else {
                entry.trim()
            };
            chain.push(node_address(node).ok_or("an entry that is not an IP address")?);
        }
    }
    let Some(&first) = chain.first() else {
        return Ok(None);
    };
    Ok(Some(
        chain
            .iter()
            .rev()
            .copied()
            .find(|&ip| !trusted(ip))
            .unwrap_or(first),
    ))
}

/// The `for=` node of one `Forwarded` element (`for=192.0.2.1;proto=https`), unquoted.
fn forwarded_for(element: &str) -> Result<&str, &'static str> {
    for pair in element.split(';') {
        let Some((key, value)) = pair.split_once('=') else {
            return Err("a Forwarded parameter without '='");
        };
        if key.trim().eq_ignore_ascii_case("for") {
            let value = value.trim();
            return Ok(value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value));
        }
    }
    Err("a Forwarded element without for=")
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]:4711`; the port is dropped.
fn node_address(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    let v6 = node.strip_prefix('[')?.strip_suffix(']')?;
    v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
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

    fn client(
        fwd: &[&str],
        xff: &[&str],
        trusted: &[&str],
    ) -> Result<Option<String>, &'static str> {
        let trusted: Vec<IpAddr> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        forwarded_client(
            fwd.iter().map(|v| v.as_bytes()),
            xff.iter().map(|v| v.as_bytes()),
            |ip| trusted.contains(&ip),
        )
        .map(|ip| ip.map(|ip| ip.to_string()))
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_hop() {
        let some = |s: &str| Ok(Some(s.to_string()));
        assert_eq!(client(&[], &[], &[]), Ok(None));
        assert_eq!(client(&[], &["192.0.2.7"], &[]), some("192.0.2.7"));
        // A client's own X-Forwarded-For is on the left: the proxy's entry wins.
        assert_eq!(
            client(&[], &["10.9.9.9, 192.0.2.7"], &["127.0.0.1"]),
            some("192.0.2.7")
        );
        // Trusted hops (a second proxy) are skipped; repeated headers are one list.
        assert_eq!(
            client(&[], &["192.0.2.7", "10.0.0.5"], &["10.0.0.5"]),
            some("192.0.2.7")
        );
        assert_eq!(
            client(&[], &["10.0.0.5 , 10.0.0.6"], &["10.0.0.5", "10.0.0.6"]),
            some("10.0.0.5")
        );
        assert_eq!(client(&[], &["192.0.2.7:5555"], &[]), some("192.0.2.7"));
        assert_eq!(client(&[], &["[2001:db8::1]:80"], &[]), some("2001:db8::1"));
        // Forwarded wins over X-Forwarded-For; quoted IPv6 with a port, other parameters.
        assert_eq!(
            client(
                &["for=192.0.2.60;proto=http;by=203.0.113.43, For=\"[2001:db8:cafe::17]:4711\""],
                &["198.51.100.1"],
                &[]
            ),
            some("2001:db8:cafe::17")
        );
        for bad in ["unknown", "_hidden", "192.0.2.300", "", "a b"] {
            assert!(client(&[], &[bad], &[]).is_err(), "{bad:?}");
            assert!(
                client(&[&format!("for={bad}")], &[], &[]).is_err(),
                "{bad:?}"
            );
        }
        assert!(client(&["proto=https"], &[], &[]).is_err());
        assert!(client(&["for"], &[], &[]).is_err());
        let long = vec!["192.0.2.1"; MAX_HOPS + 1].join(",");
        assert!(client(&[], &[&long], &[]).is_err());
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
