//! The public side: user connections on allocated ports and through the name router.
//!
//! Every user connection is admitted once ([`admission`]), which takes its place in the port's and
//! the agent's caps, and is then carried as one yamux stream to its agent ([`carry`]). Ports are
//! kept and served by [`ports`], names by [`router`].

pub(crate) mod admission;
pub(crate) mod carry;
pub(crate) mod ports;
pub(crate) mod router;

use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::policy::PolicyCell;

/// What the public side needs, and nothing of the agent port: the live policy, the counters, the
/// audit log, and the tracker the drain waits on.
pub(crate) struct Users {
    /// Allowlists and limits, swapped on reload.
    pub policy: Arc<PolicyCell>,
    /// Refusals and stream set-up times.
    pub metrics: Arc<Metrics>,
    /// One record per user connection.
    pub audit: Arc<AuditLog>,
    /// Carried connections, waited for during the drain.
    pub conns: TaskTracker,
    /// Fired on SIGTERM: listeners stop accepting.
    pub shutdown: CancellationToken,
    /// Fired after the drain: connections still open are cut (and audited).
    pub close: CancellationToken,
}

/// How the user side learns whether the agent reached its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Greeting {
    /// Raw TCP: a failure just closes the connection.
    None,
    /// An HTTP CONNECT client: `200 Connection established`, or an error status with the reason.
    HttpConnect,
}

/// Answers an HTTP CONNECT client with an error status and a one-line reason; raw TCP users just
/// see the connection close.
pub(crate) async fn http_status<W: AsyncWrite + Unpin>(
    tcp: &mut W,
    greeting: Greeting,
    status: &str,
    why: &str,
) {
    if greeting == Greeting::HttpConnect {
        let body = format!("{why}\n");
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tcp.write_all(response.as_bytes()).await;
    }
}
