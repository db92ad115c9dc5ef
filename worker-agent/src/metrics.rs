//! The agent's own small set of metrics on an optional local port (`--metrics 127.0.0.1:9101`):
//! link state per relay, reconnects, streams and bytes.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

    fn render(&self, status: &StatusBoard) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP jumpgate_agent_relay_connected 1 while the session with the relay is up.\n# TYPE jumpgate_agent_relay_connected gauge");
        for (relay, state) in status.states() {
            let _ = writeln!(
                out,
                "jumpgate_agent_relay_connected{{relay=\"{relay}\"}} {}",
                u8::from(state == LinkState::Connected)
            );
        }
        let _ = writeln!(out, "# HELP jumpgate_agent_reconnects_total Sessions re-established with a relay.\n# TYPE jumpgate_agent_reconnects_total counter");
        for ((relay, _), n) in status.states().into_iter().zip(&self.reconnects) {
            let _ = writeln!(
                out,
                "jumpgate_agent_reconnects_total{{relay=\"{relay}\"}} {}",
                get(n)
            );
        }
        let _ = writeln!(out, "# HELP jumpgate_agent_streams_active User connections open now.\n# TYPE jumpgate_agent_streams_active gauge\njumpgate_agent_streams_active {}", get(&self.streams_active));
        let _ = writeln!(out, "# HELP jumpgate_agent_streams_total User connections served.\n# TYPE jumpgate_agent_streams_total counter\njumpgate_agent_streams_total {}", get(&self.streams_total));
        let _ = writeln!(out, "# HELP jumpgate_agent_bytes_total Bytes carried, up (from users) and down (to users).\n# TYPE jumpgate_agent_bytes_total counter");
        let _ = writeln!(
            out,
            "jumpgate_agent_bytes_total{{direction=\"up\"}} {}",
            get(&self.bytes.written)
        );
        let _ = writeln!(
            out,
            "jumpgate_agent_bytes_total{{direction=\"down\"}} {}",
            get(&self.bytes.read)
        );
        out
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
                "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
