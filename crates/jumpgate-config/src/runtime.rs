//! Starting the async runtime the same way in both binaries.

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::signals::stop_on_signals;

/// Runs `main` on a tokio runtime with `worker_threads` threads, handing it a token that
/// SIGTERM/SIGINT cancel. One thread means a single-threaded runtime: every task wakes another
/// on the same thread, without the cross-thread wake-ups (futex, context switch) that dominate a
/// tunnel's per-packet cost when it is not CPU-bound. Zero means one thread per CPU.
/// Returns `None` (after saying why on stderr) if the runtime cannot start.
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
        if let Err(e) = stop_on_signals(shutdown.clone()) {
            tracing::warn!("cannot install signal handlers: {e}");
        }
        main(shutdown).await
    }))
}
