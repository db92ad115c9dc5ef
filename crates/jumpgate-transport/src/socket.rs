//! TCP options for every leg of a tunnel.
//!
//! No-delay keeps interactive ssh typing snappy. Keepalive plus `TCP_USER_TIMEOUT` make a
//! connection whose peer vanished without a RST (NAT state dropped, cable cut) fail within tens of
//! seconds instead of the kernel's default of hours.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Turns on TCP_NODELAY.
pub fn set_nodelay(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)
}

/// Turns on TCP_NODELAY, keepalive probing after `idle` of silence, and a user timeout so that
/// unacknowledged data fails the socket after about `idle` as well.
pub fn tune_control(stream: &TcpStream, idle: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    let interval = (idle / 3).max(Duration::from_secs(1));
    let keepalive = TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(3);
    sock.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(Some(idle))?;
    Ok(())
}
