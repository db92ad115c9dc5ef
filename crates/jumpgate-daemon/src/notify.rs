//! systemd readiness notification (`Type=notify`): a datagram to `$NOTIFY_SOCKET`, without
//! linking libsystemd. Outside systemd the variable is unset and this does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=...`) to systemd.
/// Failures are logged at debug level only: notification is best effort.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            abstract_send(&sock, name, state.as_bytes())
        } else {
            sock.send_to(state.as_bytes(), &path).map(|_| ())
        }
    });
    if let Err(e) = result {
        tracing::debug!("sd_notify({state:?}) failed: {e}");
    }
}

#[cfg(target_os = "linux")]
fn abstract_send(sock: &UnixDatagram, name: &[u8], msg: &[u8]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(msg, &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn abstract_send(_: &UnixDatagram, _: &[u8], _: &[u8]) -> std::io::Result<()> {
    Err(std::io::Error::other("abstract sockets need Linux"))
}

/// Microseconds on CLOCK_MONOTONIC, which systemd wants with `RELOADING=1`.
pub fn monotonic_usec() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| {
            t.split_whitespace()
                .next()
                .and_then(|s| s.parse::<f64>().ok())
        })
        .map(|secs| (secs * 1e6) as u64)
        .unwrap_or(0)
}
