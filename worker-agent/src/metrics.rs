//! The agent's own small set of metrics on an optional local port (`--metrics 127.0.0.1:9101`):
//! link state per relay, reconnects, streams and bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jumpgate_config::prometheus::{self, Exposition, Kind};
use jumpgate_transport::counted::ByteCounts;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::status::{LinkState, StatusBoard};

/// Agent-wide counters.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Sessions established after the first one, per relay index.
    pub reconnects: Vec<AtomicU64>,
    /// Streams open now.
    pub streams_active: AtomicU64,
    /// Streams served.
    pub streams_total: AtomicU64,
    /// Bytes: `read` from local targets (to users), `written` to them (from users).
    pub bytes: Arc<ByteCounts>,
}

impl AgentStats {
    /// Counters for `relays` relays.
    pub fn new(relays: usize) -> Self {
        Self {
            reconnects: (0..relays).map(|_| AtomicU64::new(0)).collect(),
            ..Self::default()
        }
    }

    /// The agent's `/metrics` text.
    fn render(&self, status: &StatusBoard) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let states = status.states();
        let mut e = Exposition::new();
        let mut f = e.family(
            "jumpgate_agent_relay_connected",
            Kind::Gauge,
            "1 while the session with the relay is up.",
        );
        for (relay, state) in &states {
            f.sample(
                &[("relay", relay)],
                u8::from(*state == LinkState::Connected),
            );
        }
        let mut f = e.family(
            "jumpgate_agent_reconnects_total",
            Kind::Counter,
            "Sessions re-established with a relay.",
        );
        for ((relay, _), n) in states.iter().zip(&self.reconnects) {
            f.sample(&[("relay", relay)], get(n));
        }
        e.single(
            "jumpgate_agent_streams_active",
            Kind::Gauge,
            "User connections open now.",
            get(&self.streams_active),
        );
        e.single(
            "jumpgate_agent_streams_total",
            Kind::Counter,
            "User connections served.",
            get(&self.streams_total),
        );
        e.family(
            "jumpgate_agent_bytes_total",
            Kind::Counter,
            "Bytes carried, up (from users) and down (to users).",
        )
        .sample(&[("direction", "up")], get(&self.bytes.written))
        .sample(&[("direction", "down")], get(&self.bytes.read));
        e.into_string()
    }
}

/// Serves `GET /metrics` on `listener` until `stop` fires. A deliberately tiny HTTP responder:
/// one request per connection, head capped at 8 KiB and 5 s.
pub async fn serve(
    listener: TcpListener,
    stats: Arc<AgentStats>,
    status: Arc<StatusBoard>,
    stop: CancellationToken,
) {
    loop {
        let (mut conn, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (stats, status) = (stats.clone(), status.clone());
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read_head = async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), read_head)
                .await
                .is_err()
            {
                return;
            }
            let (code, body) = if head.starts_with(b"GET /metrics") {
                ("200 OK", stats.render(&status))
            } else {
                (
                    "404 Not Found",
                    "only /metrics is served here\n".to_string(),
                )
            };
            let response = format!(
                "HTTP/1.1 {code}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                prometheus::CONTENT_TYPE,
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
