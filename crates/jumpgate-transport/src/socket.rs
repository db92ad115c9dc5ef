//! TCP options for every leg of a tunnel.
//!
//! No-delay keeps interactive ssh typing snappy. Keepalive plus `TCP_USER_TIMEOUT` make a
//! connection whose peer vanished without a RST (NAT state dropped, cable cut) fail within tens of
//! seconds instead of the kernel's default of hours. On the tunnel leg, `TCP_NOTSENT_LOWAT`
//! keeps the data the kernel holds but has not yet sent small, so a keystroke multiplexed behind
//! another user's bulk transfer waits behind at most that much, not behind megabytes.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Turns on TCP_NODELAY.
pub fn set_nodelay(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)
}

/// Unsent bytes the kernel may queue on a tunnel socket before it reports the socket
/// unwritable: 1 ms at 1 Gbit/s. Data beyond it waits in yamux, where streams take turns frame
/// by frame, instead of in one FIFO behind everything written before.
pub const TUNNEL_NOTSENT_LOWAT: u32 = 128 * 1024;

/// Tunes a tunnel socket (agent <-> relay): TCP_NODELAY, keepalive probing after `idle` of
/// silence, a user timeout so that unacknowledged data fails the socket after about `idle` as
/// well, and a small unsent queue ([`TUNNEL_NOTSENT_LOWAT`]).
pub fn tune_control(stream: &TcpStream, idle: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    #[cfg(target_os = "linux")]
    set_notsent_lowat(stream, TUNNEL_NOTSENT_LOWAT)?;
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

/// Sets `TCP_NOTSENT_LOWAT`, which socket2 does not wrap.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_notsent_lowat(stream: &TcpStream, bytes: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is owned by `stream` and open for the duration of the call; the
    // option value points to a live `c_int` whose exact size is passed as its length.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tunnel_sockets_get_a_small_unsent_queue() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        tune_control(&stream, Duration::from_secs(30)).unwrap();
        assert!(stream.nodelay().unwrap());
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let mut value: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            #[allow(unsafe_code)]
            // SAFETY: as in `set_notsent_lowat`, with a live out-parameter and its length.
            let rc = unsafe {
                libc::getsockopt(
                    stream.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_NOTSENT_LOWAT,
                    (&mut value as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            assert_eq!(value as u32, TUNNEL_NOTSENT_LOWAT);
        }
    }
}
