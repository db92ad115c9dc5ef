//! The CONNECT request head, read off the socket and no further: its target, or the status
//! that says what is wrong with it (malformed, not CONNECT, too large).

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::Failure;

/// Longest request head accepted.
pub(super) const MAX_HEAD: usize = 8 * 1024;
/// Most header lines accepted in a request head (CONNECT clients send two or three).
pub(super) const MAX_HEADERS: usize = 32;

/// Reads the request head and returns the CONNECT target.
///
/// Only the head is taken off the socket: each chunk is peeked and parsed, and consumed up to
/// the end of the head at most, so bytes a client sent right behind the head (an eager client's
/// first payload) stay in the socket and go through the tunnel like every later byte. A chunk
/// that does not finish the head is consumed whole, so the next peek waits for new bytes.
pub(super) async fn read_head(tcp: &mut TcpStream) -> Result<String, Failure> {
    let closed = || {
        (
            "400 Bad Request",
            "connection closed before the request head ended".to_string(),
        )
    };
    let mut buf = vec![0u8; MAX_HEAD];
    // `buf[..consumed]` has been read off the socket; all of it is head.
    let mut consumed = 0;
    loop {
        let peeked = match tcp.peek(&mut buf[consumed..]).await {
            Ok(0) | Err(_) => return Err(closed()),
            Ok(n) => n,
        };
        let seen = consumed + peeked;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        // How far the head reaches into what was seen, and the answer once there is one.
        let (head_end, answer) = match request.parse(&buf[..seen]) {
            Ok(httparse::Status::Complete(end)) => (end, Some(connect_target(&request))),
            Ok(httparse::Status::Partial) if seen >= MAX_HEAD => (
                seen,
                Some(Err(too_large(format!(
                    "request head over {MAX_HEAD} bytes"
                )))),
            ),
            Ok(httparse::Status::Partial) => (seen, None),
            Err(httparse::Error::TooManyHeaders) => (
                seen,
                Some(Err(too_large(format!("over {MAX_HEADERS} header lines")))),
            ),
            Err(_) => (seen, Some(Err(malformed()))),
        };
        // Those bytes are in the socket already (they were peeked): this read does not wait.
        if tcp.read_exact(&mut buf[consumed..head_end]).await.is_err() {
            return Err(closed());
        }
        consumed = head_end;
        if let Some(answer) = answer {
            return answer;
        }
    }
}

/// The target of a complete request head, or why it is not a CONNECT request.
fn connect_target(request: &httparse::Request<'_, '_>) -> Result<String, Failure> {
    match (request.method, request.path) {
        (Some("CONNECT"), Some(target)) => Ok(target.to_string()),
        (Some(method), _) => Err((
            "405 Method Not Allowed",
            format!("only CONNECT is supported here, not {method}"),
        )),
        _ => Err(malformed()),
    }
}

fn malformed() -> Failure {
    (
        "400 Bad Request",
        "expected `CONNECT agent:port HTTP/1.1`".into(),
    )
}

fn too_large(why: String) -> Failure {
    ("431 Request Header Fields Too Large", why)
}
