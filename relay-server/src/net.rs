//! What every accept loop of the relay shares: surviving accept errors and logging floods at a
//! bounded rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Runs `log` at most once a second per `key`, so a scan or flood cannot flood the log too.
pub(crate) fn rate_limited_warn(key: &'static str, log: impl FnOnce()) {
    static LAST: Mutex<Option<HashMap<&'static str, Instant>>> = Mutex::new(None);
    let now = Instant::now();
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    let map = last.get_or_insert_with(HashMap::new);
    match map.get(key) {
        Some(t) if now.duration_since(*t) < Duration::from_secs(1) => {}
        _ => {
            map.insert(key, now);
            drop(last);
            log();
        }
    }
}

/// Handles an accept error. Running out of file descriptors or memory must neither spin the CPU
/// nor kill the listener: pause briefly and log at a limited rate.
pub(crate) async fn accept_backoff(what: &'static str, e: std::io::Error) {
    let resource = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if !resource {
        tracing::debug!("accept on {what} failed: {e}");
        return;
    }
    rate_limited_warn(what, || {
        tracing::warn!("accept on {what} failed: {e}; pausing accepts briefly (raise LimitNOFILE if this repeats)")
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
}
