//! The agent's own small set of metrics on an optional local port (`--metrics 127.0.0.1:9101`):
//! link state per relay, reconnects, streams and bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use jumpgate_daemon::prometheus::{self, Exposition, Kind};
use jumpgate_transport::counted::ByteCounts;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::status::{LinkState, StatusBoard};

/// Agent-wide counters.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Streams open now.
    pub streams_active: AtomicU64,
    /// Streams served.
    pub streams_total: AtomicU64,
    /// Bytes: `read` from local targets (to users), `written` to them (from users).
    pub bytes: Arc<ByteCounts>,
}

impl AgentStats {
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
        for (relay, state, _) in &states {
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
        for (relay, _, n) in &states {
            f.sample(&[("relay", relay)], *n);
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

/// Serves `GET /metrics` on `listener` until `stop` fires; any other path is 404. Connections
/// still open at `stop` finish on their own: the agent does not wait for a scraper.
pub async fn serve(
    listener: TcpListener,
    stats: Arc<AgentStats>,
    status: Arc<StatusBoard>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "only /metrics is served here\n") })
        .with_state((stats, status));
    tokio::select! {
        _ = stop.cancelled() => {}
        served = async { axum::serve(listener, app).await } => {
            if let Err(e) = served {
                tracing::warn!("agent metrics server stopped: {e}");
            }
        }
    }
}

async fn metrics(
    State((stats, status)): State<(Arc<AgentStats>, Arc<StatusBoard>)>,
) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)],
        stats.render(&status),
    )
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn serves_metrics_404s_the_rest_and_stops() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(AgentStats::default());
        stats.streams_total.fetch_add(3, Ordering::Relaxed);
        let status = Arc::new(StatusBoard::new(None));
        status.add(7, "relay.example:7000".into(), false);
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, stats, status, stop.clone()));

        let answer = get(addr, "/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.contains("content-type: text/plain; version=0.0.4\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains("\njumpgate_agent_streams_total 3\n"),
            "{answer}"
        );
        assert!(
            answer.contains("\njumpgate_agent_relay_connected{relay=\"relay.example:7000\"} 0\n")
        );
        let answer = get(addr, "/other").await;
        assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
        assert!(
            answer.ends_with("only /metrics is served here\n"),
            "{answer}"
        );

        stop.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
