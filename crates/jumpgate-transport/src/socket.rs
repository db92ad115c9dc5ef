//! TCP options for every leg of a tunnel.
//!
//! No-delay keeps interactive ssh typing snappy. Keepalive plus `TCP_USER_TIMEOUT` make a
//! connection whose peer vanished without a RST (NAT state dropped, cable cut) fail within tens of
//! seconds instead of the kernel's default of hours. `TCP_NOTSENT_LOWAT` keeps the data the kernel
//! holds but has not yet sent small on every tunnel connection (see [`tune_for_path`]), and
//! [`path_info`] reads what the kernel measured of a connection's path.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Turns on TCP_NODELAY.
pub fn set_nodelay(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)
}

/// Least unsent bytes the kernel may queue on a tunnel connection before it reports the socket
/// unwritable: 1 ms at 1 Gbit/s. Data beyond it waits in yamux, where streams take turns frame
/// by frame, instead of in one FIFO behind everything written before.
pub const TUNNEL_NOTSENT_LOWAT: u32 = 128 * 1024;

/// Most unsent bytes on a tunnel connection, whatever its round trip.
pub const TUNNEL_NOTSENT_LOWAT_MAX: u32 = 1 << 20;

/// The unsent queue follows the round trip at this rate (bytes per second, 100 Mbit/s): a
/// tenth of a round trip at 1 Gbit/s.
const NOTSENT_RATE: f64 = 100e6 / 8.0;

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

/// The unsent queue allowed on a tunnel connection whose round trip is `rtt`: one round trip
/// at 100 Mbit/s, between [`TUNNEL_NOTSENT_LOWAT`] and [`TUNNEL_NOTSENT_LOWAT_MAX`] (128 KiB up
/// to 10 ms, 250 KB at 20 ms, 1 MB at 80 ms). A small frame written behind it waits at most a
/// tenth of a round trip at 1 Gbit/s; a larger queue than the old 128 KiB on long paths leaves
/// a busy process time to refill it before the connection runs dry.
pub fn notsent_lowat(rtt: Duration) -> u32 {
    let bytes = (rtt.as_secs_f64() * NOTSENT_RATE) as u64;
    bytes.clamp(
        u64::from(TUNNEL_NOTSENT_LOWAT),
        u64::from(TUNNEL_NOTSENT_LOWAT_MAX),
    ) as u32
}

/// Tunes a tunnel socket for its path, once its round trip `rtt` is known: caps the unsent
/// queue in the kernel at [`notsent_lowat`]. Without a cap the kernel queues up to the send
/// buffer (4 MiB by default, 33 ms at 1 Gbit/s) ahead of whatever is written next, and a
/// keystroke echo on a connection that also carries a download waits behind all of it.
pub fn tune_for_path(stream: &TcpStream, rtt: Duration) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    set_notsent_lowat(stream, notsent_lowat(rtt))?;
    #[cfg(not(target_os = "linux"))]
    let _ = (stream, rtt);
    Ok(())
}

/// What the kernel knows about a connection's path (`TCP_INFO`): its round trips and what it
/// holds unsent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathInfo {
    /// Smallest round trip the kernel has measured on this connection.
    pub min_rtt: Duration,
    /// Smoothed round trip.
    pub rtt: Duration,
    /// Bytes written to the socket that the kernel has not sent yet.
    pub notsent: u32,
}

/// Reads [`PathInfo`] from the kernel (Linux only; elsewhere an `Unsupported` error), e.g. to
/// tell a loopback or data-centre path from a long one.
pub fn path_info(stream: &TcpStream) -> std::io::Result<PathInfo> {
    #[cfg(target_os = "linux")]
    {
        tcp_info(stream)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = stream;
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn tcp_info(stream: &TcpStream) -> std::io::Result<PathInfo> {
    use std::os::fd::AsRawFd;
    // SAFETY: `tcp_info` is plain old data, for which all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the descriptor is owned by `stream` and open for the duration of the call; `info`
    // is a live out-parameter and `len` its exact size (the kernel fills at most that much).
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PathInfo {
        min_rtt: Duration::from_micros(info.tcpi_min_rtt.into()),
        rtt: Duration::from_micros(info.tcpi_rtt.into()),
        notsent: info.tcpi_notsent_bytes,
    })
}

/// Sets `TCP_NOTSENT_LOWAT`.
#[cfg(target_os = "linux")]
fn set_notsent_lowat(stream: &TcpStream, bytes: u32) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    set_tcp_option(stream, libc::TCP_NOTSENT_LOWAT, value)
}

/// Acknowledges what arrives on `stream` at once instead of after the delayed-ACK timer (up to
/// 40 ms). For a connection through a proxy that leaves Nagle's algorithm on (tinyproxy and
/// microsocks do): the proxy holds a small segment until the one before it is acknowledged, so
/// every pair of small frames in a row (a new stream's open and its first bytes) would wait for
/// this side's delayed ACK. The kernel leaves quick-ACK mode by itself, so this is called after
/// every read.
pub fn quick_ack(stream: &TcpStream) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    return set_tcp_option(stream, libc::TCP_QUICKACK, 1);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = stream;
        Ok(())
    }
}

/// Sets an `IPPROTO_TCP` option that takes an `int`, which socket2 does not wrap.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_tcp_option(
    stream: &TcpStream,
    option: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is owned by `stream` and open for the duration of the call; the
    // option value points to a live `c_int` whose exact size is passed as its length.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
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

    #[cfg(target_os = "linux")]
    fn lowat_of(stream: &TcpStream) -> u32 {
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
        value as u32
    }

    #[tokio::test]
    async fn every_tunnel_path_gets_an_unsent_queue_sized_by_its_round_trip() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = || TcpStream::connect(listener.local_addr().unwrap());
        let (short, mid, long) = (
            connect().await.unwrap(),
            connect().await.unwrap(),
            connect().await.unwrap(),
        );
        tune_control(&short, Duration::from_secs(30)).unwrap();
        assert!(short.nodelay().unwrap());
        tune_for_path(&short, Duration::from_millis(1)).unwrap();
        tune_for_path(&mid, Duration::from_millis(20)).unwrap();
        tune_for_path(&long, Duration::from_millis(500)).unwrap();
        #[cfg(target_os = "linux")]
        for (stream, expected) in [
            (&short, TUNNEL_NOTSENT_LOWAT),
            (&mid, 250_000),
            (&long, TUNNEL_NOTSENT_LOWAT_MAX),
        ] {
            assert_eq!(lowat_of(stream), expected);
        }
    }

    #[tokio::test]
    async fn the_kernel_reports_a_loopback_path_as_short() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        // One exchange gives the kernel a round-trip sample beyond the handshake's.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        let info = path_info(&client).unwrap();
        assert!(info.min_rtt > Duration::ZERO, "{info:?}");
        assert!(info.min_rtt < SHORT_PATH, "{info:?}");
        assert_eq!(info.notsent, 0);
    }
}
