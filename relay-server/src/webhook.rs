//! Lifecycle webhooks: the relay POSTs a JSON event when a tunnel comes up (after its port is
//! bound), goes down, or its lease expires, so a platform can show "SSH enabled on host:port"
//! without scraping logs.
//!
//! Events are queued and sent in order by one task, with retries and backoff; the data path never
//! waits for them. Each request carries `X-Jumpgate-Signature: sha256=<hex HMAC-SHA256 of the
//! body>` keyed with the secret file, and `X-Jumpgate-Event`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use jumpgate_proto::Secret;
use serde::Serialize;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::audit::timestamp;

/// Attempts per event before it is dropped (logged).
const ATTEMPTS: u32 = 6;
/// Per-request time limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Events waiting for delivery; beyond this [`Webhooks::emit`] drops them (and counts them) so
/// an unreachable platform costs bounded memory.
pub const QUEUE: usize = 10_000;

/// What happened.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A tunnel's port is bound and accepting users.
    TunnelUp {
        /// Agent name.
        agent: String,
        /// Service name.
        service: String,
        /// Host users connect to.
        host: String,
        /// Public port (0 for router-only services).
        port: u16,
    },
    /// A tunnel stopped accepting users (agent gone; lease kept).
    TunnelDown {
        /// Agent name.
        agent: String,
        /// Service name.
        service: String,
        /// Public port.
        port: u16,
        /// Why the session ended.
        reason: String,
    },
    /// A lease ran out; the port returned to the pool.
    LeaseExpired {
        /// Agent name.
        agent: String,
        /// Service name.
        service: String,
        /// The freed port.
        port: u16,
    },
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::TunnelUp { .. } => "tunnel_up",
            Event::TunnelDown { .. } => "tunnel_down",
            Event::LeaseExpired { .. } => "lease_expired",
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(flatten)]
    event: &'a Event,
    at: String,
    seq: u64,
}

/// Where and how to deliver.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http` or `https`.
    pub https: bool,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query.
    pub path: String,
}

impl Target {
    /// Parses `http(s)://host[:port]/path`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = || format!("{url:?} is not an http:// or https:// URL");
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse().map_err(|_| bad())?,
            ),
            _ => (authority, if https { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            https,
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

/// The webhook sender handle; a no-op without a configured URL.
#[derive(Default)]
pub struct Webhooks {
    tx: std::sync::Mutex<Option<mpsc::Sender<Event>>>,
    dropped: AtomicU64,
}

impl Webhooks {
    /// Starts the delivery task for `target`, signing with `secret`; `tls` is used for https.
    pub fn start(
        target: Target,
        secret: Secret,
        tls: Option<TlsConnector>,
        stop: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(deliver(rx, target, Arc::new(secret), tls, stop));
        (
            Self {
                tx: std::sync::Mutex::new(Some(tx)),
                dropped: AtomicU64::new(0),
            },
            task,
        )
    }

    /// Queues an event without waiting.
    pub fn emit(&self, event: Event) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(tx) = tx {
            if tx.try_send(event).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Accepts no more events; the sender finishes what is queued and ends.
    pub fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Events dropped because the queue was full (`jumpgate_webhook_dropped_total`).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// HMAC-SHA256 of `body` under `secret`, hex.
pub fn signature(secret: &Secret, body: &[u8]) -> String {
    // `new_from_slice` only fails for MACs with a fixed key size; HMAC takes keys of any length.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose().as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn deliver(
    mut rx: mpsc::Receiver<Event>,
    target: Target,
    secret: Arc<Secret>,
    tls: Option<TlsConnector>,
    stop: CancellationToken,
) {
    let mut seq = 0u64;
    while let Some(event) = rx.recv().await {
        seq += 1;
        let body = match serde_json::to_vec(&Envelope {
            event: &event,
            at: timestamp(SystemTime::now()),
            seq,
        }) {
            Ok(b) => b,
            Err(_) => continue,
        };
        let sig = signature(&secret, &body);
        let mut delay = Duration::from_millis(500);
        for attempt in 1..=ATTEMPTS {
            let sent = tokio::time::timeout(
                REQUEST_TIMEOUT,
                post(&target, tls.as_ref(), event.name(), &sig, &body),
            )
            .await;
            match sent {
                Ok(Ok(status)) if (200..300).contains(&status) => break,
                other => {
                    let why = match other {
                        Ok(Ok(status)) => format!("HTTP {status}"),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "timed out".into(),
                    };
                    if attempt == ATTEMPTS {
                        tracing::error!(
                            event = event.name(),
                            "webhook delivery failed {ATTEMPTS} times ({why}); dropping the event"
                        );
                        break;
                    }
                    tracing::warn!(
                        event = event.name(),
                        "webhook delivery failed ({why}); retrying in {delay:?}"
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

async fn post(
    target: &Target,
    tls: Option<&TlsConnector>,
    event: &str,
    sig: &str,
    body: &[u8],
) -> std::io::Result<u16> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
    match (target.https, tls) {
        (true, Some(tls)) => {
            let name = jumpgate_transport::tls::server_name(&target.host)
                .map_err(std::io::Error::other)?;
            let stream = tls.connect(name, tcp).await?;
            exchange(stream, target, event, sig, body).await
        }
        (true, None) => Err(std::io::Error::other("https webhook without TLS roots")),
        (false, _) => exchange(tcp, target, event, sig, body).await,
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    target: &Target,
    event: &str,
    sig: &str,
    body: &[u8],
) -> std::io::Result<u16> {
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Jumpgate-Event: {event}\r\nX-Jumpgate-Signature: sha256={sig}\r\nUser-Agent: jumpgate-relay/{}\r\nConnection: close\r\n\r\n",
        target.path,
        target.host,
        body.len(),
        env!("CARGO_PKG_VERSION")
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await?;
    let mut buf = vec![0u8; 1024];
    let mut got = 0;
    while got < 12 {
        let n = s.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let line = String::from_utf8_lossy(&buf[..got]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status in the webhook's answer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("https://hooks.example.com/jumpgate?x=1").unwrap();
        assert!(
            t.https && t.port == 443 && t.path == "/jumpgate?x=1" && t.host == "hooks.example.com"
        );
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 8080, "/")
        );
        assert!(Target::parse("ftp://x").is_err());
        assert!(Target::parse("http://:80/").is_err());
    }

    #[test]
    fn signature_is_rfc_4231_hmac_sha256() {
        // RFC 4231 test case 2.
        let sig = signature(&Secret::new("Jefe"), b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
