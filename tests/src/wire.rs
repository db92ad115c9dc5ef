//! Plain TCP as a test sees it from outside: whether a peer closed a connection, and what it
//! sent back up to a marker.

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

/// Whether the peer closed or reset `c` within `limit` (reading nothing): `Err` says what it
/// did instead (sent bytes, or kept it open past `limit`: a timeout is not a close).
pub fn closed_within(c: &mut TcpStream, limit: Duration) -> Result<(), String> {
    c.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 8];
    match c.read(&mut buf) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("it sent {n} bytes")),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(format!("still open after {limit:?} ({e})")),
    }
}

/// What `s` sends until it closes, its read timeout passes, or what came holds `marker`.
pub fn read_until(s: &mut TcpStream, marker: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&got).contains(marker) {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}
