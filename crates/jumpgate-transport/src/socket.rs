//! TCP options for every leg of a tunnel.
//!
//! No-delay keeps interactive ssh typing snappy. Keepalive plus `TCP_USER_TIMEOUT` make a
//! connection whose peer vanished without a RST (NAT state dropped, cable cut) fail within tens of
//! seconds instead of the kernel's default of hours. On a short tunnel leg, `TCP_NOTSENT_LOWAT`
//! keeps the data the kernel holds but has not yet sent small (see [`tune_for_path`]).

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Turns on TCP_NODELAY.
pub fn set_nodelay(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)
}

/// Unsent bytes the kernel may queue on a short tunnel connection before it reports the socket
/// unwritable: 1 ms at 1 Gbit/s. Data beyond it waits in yamux, where streams take turns frame
/// by frame, instead of in one FIFO behind everything written before.
pub const TUNNEL_NOTSENT_LOWAT: u32 = 128 * 1024;

/// Round trips below which a tunnel connection counts as short.
pub const SHORT_PATH: Duration = Duration::from_millis(5);

/// Tunes a tunnel socket (agent <-> relay): TCP_NODELAY, keepalive probing after `idle` of
/// silence, and a user timeout so that unacknowledged data fails the socket after about `idle`
/// as well.
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

/// Tunes a tunnel socket for its path, once its round trip `rtt` is known. On a short path
/// ([`SHORT_PATH`]) the processes' CPU, not the link, limits a bulk transfer, and whatever the
/// kernel queues unsent delays everything behind it: there the unsent queue is capped at
/// [`TUNNEL_NOTSENT_LOWAT`] (measured at 1 ms with four bulk streams: echo p50/p99 on another
/// lane 21/34 -> 13/19 ms downloading). On a long path the cap costs throughput (the send
/// buffer, not the window, limits a stream: 80 ms, one stream, 300 -> 245 Mbit/s) and the
/// windows, sized to the round trip, already bound what can queue, so it is left off.
pub fn tune_for_path(stream: &TcpStream, rtt: Duration) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if rtt < SHORT_PATH {
        set_notsent_lowat(stream, TUNNEL_NOTSENT_LOWAT)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (stream, rtt);
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
    async fn short_tunnel_paths_get_a_small_unsent_queue_and_long_ones_do_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = || TcpStream::connect(listener.local_addr().unwrap());
        let (short, long) = (connect().await.unwrap(), connect().await.unwrap());
        tune_control(&short, Duration::from_secs(30)).unwrap();
        assert!(short.nodelay().unwrap());
        tune_for_path(&short, Duration::from_millis(1)).unwrap();
        tune_for_path(&long, Duration::from_millis(20)).unwrap();
        #[cfg(target_os = "linux")]
        // 0: not set on the socket, the system-wide default applies.
        #[cfg(target_os = "linux")]
        for (stream, expected) in [(&short, TUNNEL_NOTSENT_LOWAT), (&long, 0)] {
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
            assert_eq!(value as u32, expected);
        }
    }
}
