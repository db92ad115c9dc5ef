//! Starting the async runtime the same way in both binaries.

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::signals::StopSignals;

/// Runs `main` on a tokio runtime with `worker_threads` threads, handing it a token that the first
/// SIGTERM/SIGINT cancels (a second one cancels [`crate::signals::hurry`]). One thread means a
/// single-threaded runtime: every task wakes another on the same thread, without the cross-thread
/// wake-ups (futex, context switch) that dominate a tunnel's per-packet cost when it is not
/// CPU-bound. Zero means one thread per CPU.
///
/// The signal watcher runs beside `main` in the same future, not as a spawned task: when `main`
/// returns, it is dropped with it. Returns `None` (after saying why on stderr) if the runtime
/// cannot start.
pub fn run_until_signalled<F: Future>(
    program: &str,
    worker_threads: usize,
    main: impl FnOnce(CancellationToken) -> F,
) -> Option<F::Output> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            return None;
        }
    };
    Some(runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = StopSignals::install()
            .map_err(|e| tracing::warn!("cannot install signal handlers: {e}"))
            .ok();
        let main = main(shutdown.clone());
        match signals {
            Some(signals) => {
                tokio::select! {
                    out = main => out,
                    never = signals.watch(shutdown) => match never {},
                }
            }
            None => main.await,
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use super::*;

    fn kill(signal: &str) {
        let pid = std::process::id().to_string();
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// The first signal cancels the token handed to `main`; the second cancels `hurry`, and
    /// `main` still runs to its end (where the relay flushes its audit log) instead of the
    /// process exiting under it.
    #[test]
    fn first_signal_stops_second_hurries_and_main_finishes() {
        let out = run_until_signalled("test", 1, |shutdown| async move {
            let hurry = crate::signals::hurry();
            kill("-TERM");
            tokio::time::timeout(Duration::from_secs(10), shutdown.cancelled())
                .await
                .expect("first signal did not cancel the shutdown token");
            assert!(!hurry.is_cancelled(), "one signal must not hurry");
            kill("-INT");
            tokio::time::timeout(Duration::from_secs(10), hurry.cancelled())
                .await
                .expect("second signal did not cancel hurry");
            "finished"
        });
        assert_eq!(out, Some("finished"));
    }
}
