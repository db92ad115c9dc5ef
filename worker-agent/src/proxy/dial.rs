//! Opening the path to a relay: direct, or through the proxy unless `NO_PROXY` says otherwise,
//! then the WebSocket upgrade for a `ws://` / `wss://` relay; each step bounded in time.

use std::net::SocketAddr;
use std::time::Duration;

use jumpgate_transport::ws::{tokio_tungstenite, WsIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::egress::{Egress, Stream};
use super::http_connect::connect_http;
use super::socks5::connect_socks;
use super::url::Scheme;
use super::ws::WsServer;
use super::Proxy;

/// Why the path to a relay could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// A direct connection failed.
    #[error("{0}")]
    Direct(std::io::Error),
    /// A direct connection did not complete in time.
    #[error("timed out")]
    DirectTimeout,
    /// The proxy could not be reached, refused, or did not answer: the text names the proxy
    /// and what it said.
    #[error("{0}")]
    Proxy(String),
}

/// Opens the path to the relay at `host:port` (dialled at `addr` when the agent resolved it):
/// through `proxy` unless the relay matches its NO_PROXY list, then, for a `ws://` or `wss://`
/// relay, the WebSocket upgrade. Each step is bounded by `timeout`.
pub async fn dial(
    proxy: Option<&Proxy>,
    ws: Option<&WsServer>,
    host: &str,
    port: u16,
    addr: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Egress, DialError> {
    let egress = open_path(proxy, host, port, addr, timeout).await?;
    let Some(ws) = ws else {
        return Ok(egress);
    };
    let Egress {
        stream,
        relay,
        proxied,
    } = egress;
    let url = ws.url(host, port);
    let fail = |what: String| DialError::Proxy(format!("WebSocket endpoint {url}: {what}"));
    let upgrade = async {
        let stream = match &ws.tls {
            Some(config) => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| format!("bad TLS name: {e}"))?;
                let tls = TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS to the ingress failed: {e}"))?;
                Stream::WssTls(Box::new(tls))
            }
            None => stream,
        };
        let (socket, _) = tokio_tungstenite::client_async_with_config(
            url.as_str(),
            stream,
            Some(jumpgate_transport::ws::config()),
        )
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(response) => format!(
                "refused the WebSocket upgrade: HTTP {}{}",
                response.status(),
                match response.status().as_u16() {
                    404 => " (check the path in --server and the relay's ws_path)",
                    502..=504 => " (the ingress cannot reach the relay's ws_listen)",
                    _ => "",
                }
            ),
            other => format!("WebSocket upgrade failed: {other}"),
        })?;
        Ok::<_, String>(Stream::Ws(Box::new(WsIo::new(socket))))
    };
    match tokio::time::timeout(timeout, upgrade).await {
        Err(_) => Err(fail(format!("no upgrade within {timeout:?}"))),
        Ok(Err(e)) => Err(fail(e)),
        Ok(Ok(stream)) => Ok(Egress {
            stream,
            relay,
            proxied,
        }),
    }
}

/// The TCP path to `host:port`: direct, or through `proxy` unless NO_PROXY says otherwise.
async fn open_path(
    proxy: Option<&Proxy>,
    host: &str,
    port: u16,
    addr: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Egress, DialError> {
    let proxy = proxy.filter(|p| !p.no_proxy.matches(host, addr.map(|a| a.ip())));
    let Some(proxy) = proxy else {
        let connect = async {
            match addr {
                Some(addr) => TcpStream::connect(addr).await,
                None => TcpStream::connect((host, port)).await,
            }
        };
        return match tokio::time::timeout(timeout, connect).await {
            Err(_) => Err(DialError::DirectTimeout),
            Ok(Err(e)) => Err(DialError::Direct(e)),
            Ok(Ok(tcp)) => Ok(Egress {
                relay: tcp.peer_addr().ok().or(addr),
                stream: Stream::Tcp(tcp),
                proxied: false,
            }),
        };
    };
    // The proxy is asked for the address the agent resolved (one session per relay behind a
    // round-robin name), else for the name.
    let target = match addr {
        Some(a) => a.to_string(),
        None if host.contains(':') => format!("[{host}]:{port}"),
        None => format!("{host}:{port}"),
    };
    let fail = |what: String| DialError::Proxy(format!("proxy {}: {what}", proxy.url));
    let tcp = match tokio::time::timeout(
        timeout,
        TcpStream::connect((proxy.url.host.as_str(), proxy.url.port)),
    )
    .await
    {
        Err(_) => return Err(fail(format!("no TCP connection within {timeout:?}"))),
        Ok(Err(e)) => return Err(fail(format!("cannot connect: {e}"))),
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        match proxy.url.scheme {
            Scheme::Http | Scheme::Socks5 | Scheme::Socks5h => {
                ask_proxy(tcp, proxy, host, port, addr)
                    .await
                    .map(Stream::Tcp)
            }
            Scheme::Https => {
                let config = proxy.tls.clone().ok_or("no TLS settings for the proxy")?;
                let name = ServerName::try_from(proxy.url.host.clone())
                    .map_err(|e| format!("bad TLS name: {e}"))?;
                let mut tls = TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS to the proxy failed: {e}"))?;
                connect_http(&mut tls, proxy, &target).await?;
                Ok(Stream::Tls(Box::new(tls)))
            }
        }
    };
    match tokio::time::timeout(timeout, handshake).await {
        Err(_) => Err(fail(format!(
            "no answer to the request for {target} within {timeout:?}"
        ))),
        Ok(Err(e)) => Err(fail(e)),
        Ok(Ok(stream)) => Ok(Egress {
            stream,
            relay: addr,
            proxied: true,
        }),
    }
}

/// The request for the relay at `host:port` (at `addr` when the agent resolved it) on an open
/// connection to a plain proxy: CONNECT for `http://` (an `https://` proxy runs the same
/// exchange inside its TLS), the SOCKS5 exchange for `socks5://` / `socks5h://`. Everything the
/// proxy answers is parsed here, so the fuzz target `proxy_reply` drives this with arbitrary
/// answers. On success the stream is the tunnel, not one byte of it consumed.
pub async fn ask_proxy<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    proxy: &Proxy,
    host: &str,
    port: u16,
    addr: Option<SocketAddr>,
) -> Result<S, String> {
    match proxy.url.scheme {
        Scheme::Socks5 | Scheme::Socks5h => connect_socks(stream, proxy, host, port, addr).await,
        Scheme::Http | Scheme::Https => {
            let target = match addr {
                Some(a) => a.to_string(),
                None if host.contains(':') => format!("[{host}]:{port}"),
                None => format!("{host}:{port}"),
            };
            connect_http(&mut stream, proxy, &target).await?;
            Ok(stream)
        }
    }
}
