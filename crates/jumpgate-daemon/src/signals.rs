//! SIGTERM and SIGINT: the first starts a graceful stop, the second cuts it short.
//!
//! Both are turned into cancellations rather than exits, so that whatever must not be lost on the
//! way out (the relay's audit log) is still written when the operator is impatient.

use std::sync::OnceLock;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

static HURRY: OnceLock<CancellationToken> = OnceLock::new();

/// Cancelled by a second SIGTERM/SIGINT: a drain in progress stops waiting (for open user
/// connections, sessions, queued webhooks) and finishes only what must not be lost. Process-wide,
/// like the signals themselves, so that a library's drain can honour it without a second token
/// in every `run(config, shutdown)`. Never cancelled in a process without [`StopSignals`] (tests
/// running a relay in-process).
pub fn hurry() -> CancellationToken {
    HURRY.get_or_init(CancellationToken::new).clone()
}

/// Listeners for SIGTERM and SIGINT. Installed before the program announces readiness, so a stop
/// request is never lost to the default action (which would skip the drain).
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Takes over SIGTERM and SIGINT; needs a tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    /// Cancels `shutdown` on the first signal and [`hurry`] on the second; later ones are only
    /// logged. Never returns: run it beside the program (`select!`) and drop it when the program
    /// ends, so it cannot outlive the runtime.
    pub async fn watch(mut self, shutdown: CancellationToken) -> std::convert::Infallible {
        let name = self.next().await;
        tracing::info!("{name} received, shutting down");
        shutdown.cancel();
        let name = self.next().await;
        tracing::warn!("second signal ({name}) received: cutting the shutdown short");
        hurry().cancel();
        loop {
            self.next().await;
            tracing::warn!(
                "already stopping as fast as possible; SIGKILL ends the process at once"
            );
        }
    }
}
