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
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::Request;
use jumpgate_proto::Secret;
use serde::Serialize;
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::audit::timestamp;
use crate::http_client::exchange;

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
        let uri: hyper::Uri = url.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad()),
        };
        let authority = uri.authority().ok_or_else(bad)?;
        if authority.as_str().contains('@') {
            return Err(format!("{url:?}: credentials in the URL are not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") => "/",
            Some(p) => p,
        };
        Ok(Self {
            https,
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
            path: path.to_string(),
        })
    }

    /// The `Host` header: the host, and the port unless it is the scheme's default.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.https, self.port) {
            (true, 443) | (false, 80) => host,
            (_, port) => format!("{host}:{port}"),
        }
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
        // The connector comes configured like the agent link, offering ALPN "jumpgate/1"; a web
        // server that checks ALPN refuses a protocol it does not know, so offer what is spoken.
        let tls = tls.map(|connector| {
            let mut config = (**connector.config()).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            TlsConnector::from(Arc::new(config))
        });
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

    /// Events dropped because the queue was full (`jumpgate_webhook_events_dropped_total`).
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
            Ok(b) => Bytes::from(b),
            Err(_) => continue,
        };
        let sig = signature(&secret, &body);
        let mut delay = Duration::from_millis(500);
        for attempt in 1..=ATTEMPTS {
            let sent = tokio::time::timeout(
                REQUEST_TIMEOUT,
                post(&target, tls.as_ref(), event.name(), &sig, body.clone()),
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

/// One delivery attempt; the answer's status.
async fn post(
    target: &Target,
    tls: Option<&TlsConnector>,
    event: &str,
    sig: &str,
    body: Bytes,
) -> std::io::Result<u16> {
    let request = Request::post(target.path.as_str())
        .header(HOST, target.authority())
        .header(CONTENT_TYPE, "application/json")
        .header("x-jumpgate-event", event)
        .header("x-jumpgate-signature", format!("sha256={sig}"))
        .header(
            USER_AGENT,
            concat!("jumpgate-relay/", env!("CARGO_PKG_VERSION")),
        )
        .header(CONNECTION, "close")
        .body(Full::new(body))
        .map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
    let answer = match (target.https, tls) {
        (true, Some(tls)) => {
            let name = jumpgate_transport::tls::server_name(&target.host)
                .map_err(std::io::Error::other)?;
            let stream = tls.connect(name, tcp).await?;
            exchange(stream, request, None).await
        }
        (true, None) => return Err(std::io::Error::other("https webhook without TLS roots")),
        (false, _) => exchange(tcp, request, None).await,
    };
    answer
        .map(|a| a.status.as_u16())
        .map_err(std::io::Error::other)
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
        assert!(Target::parse("http://user:pw@h/").is_err());
        assert!(Target::parse("http://h/a b").is_err());
        let t = Target::parse("https://[::1]:8443/x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8443));
        assert_eq!(t.authority(), "[::1]:8443");
        assert_eq!(Target::parse("http://h:80").unwrap().authority(), "h");
    }

    /// Reads one request (head and Content-Length body) and answers `status`.
    async fn answer_one<S>(mut s: S, status: &str) -> (String, Vec<u8>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).await.unwrap(), 1);
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        s.write_all(answer.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        (head, body)
    }

    #[tokio::test]
    async fn https_delivery_trusts_the_ca_bundle_speaks_http_1_1_and_signs() {
        use jumpgate_transport::tls;
        let dir = tempfile::tempdir().unwrap();
        let own = tls::generate_self_signed(&["localhost".into()]).unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &own.cert_pem).unwrap();
        std::fs::write(&key, &own.key_pem).unwrap();
        let certs = tls::load_certs(&cert).unwrap();
        let mut server = (*tls::server_config(certs.clone(), tls::load_key(&key).unwrap(), None)
            .unwrap())
        .clone();
        // Like a web server that checks ALPN: only HTTP/1.1 is accepted.
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hook = tokio::spawn(async move {
            let mut got = Vec::new();
            // The first attempt is answered 503: the event comes again.
            for status in ["503 Service Unavailable", "200 OK"] {
                let (tcp, _) = listener.accept().await.unwrap();
                got.push(answer_one(acceptor.accept(tcp).await.unwrap(), status).await);
            }
            got
        });

        // As the relay builds it: the CA bundle's roots, the agent link's client config.
        let connector =
            TlsConnector::from(tls::client_config(tls::ServerTrust::Roots(certs), None).unwrap());
        let target = Target::parse(&format!("https://localhost:{port}/hook?x=1")).unwrap();
        let secret = Secret::new("hook-secret");
        let stop = CancellationToken::new();
        let (hooks, task) = Webhooks::start(target, secret.clone(), Some(connector), stop);
        hooks.emit(Event::TunnelUp {
            agent: "a".into(),
            service: "ssh".into(),
            host: "relay.example".into(),
            port: 10001,
        });
        let got = tokio::time::timeout(Duration::from_secs(20), hook)
            .await
            .unwrap()
            .unwrap();
        hooks.close();
        task.await.unwrap();
        assert_eq!(got[0].1, got[1].1, "the retry carries the same event");
        let (head, body) = &got[1];
        assert!(head.starts_with("POST /hook?x=1 HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains(&format!("\r\nHost: localhost:{port}\r\n")),
            "{head}"
        );
        assert!(
            head.contains("\r\nContent-Type: application/json\r\n"),
            "{head}"
        );
        assert!(
            head.contains("\r\nX-Jumpgate-Event: tunnel_up\r\n"),
            "{head}"
        );
        let sig = format!(
            "\r\nX-Jumpgate-Signature: sha256={}\r\n",
            signature(&secret, body)
        );
        assert!(head.contains(&sig), "{head}");
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            (v["event"].as_str(), v["port"].as_u64()),
            (Some("tunnel_up"), Some(10001))
        );
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
