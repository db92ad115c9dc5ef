//! Starting the async runtime the same way in both binaries.

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::signals::stop_on_signals;

/// Runs `main` on a multi-threaded tokio runtime, handing it a token that SIGTERM/SIGINT cancel.
/// Returns `None` (after saying why on stderr) if the runtime cannot start.
pub fn run_until_signalled<F: Future>(
    program: &str,
    main: impl FnOnce(CancellationToken) -> F,
) -> Option<F::Output> {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
