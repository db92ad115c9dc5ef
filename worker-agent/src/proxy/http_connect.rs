//! HTTP CONNECT to a proxy (`http://`, and `https://` inside TLS): the request with Basic auth,
//! the answer's head parsed with httparse, a refusal explained.

use base64::Engine;
use jumpgate_proto::display::MAX_MESSAGE_LEN;
use jumpgate_proto::sanitize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Proxy;

/// Longest CONNECT answer head accepted from a proxy.
const MAX_HEAD: usize = 16 * 1024;

/// The request head of an HTTP CONNECT for `target`, with Basic auth when a user is given.
fn connect_request(proxy: &Proxy, target: &str) -> Vec<u8> {
    let mut head = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: worker-agent/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(user) = &proxy.url.user {
        let pass = proxy.password.as_ref().map_or("", |p| p.expose());
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        head.push_str("Proxy-Authorization: Basic ");
        head.push_str(&token);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// What an HTTP proxy's refusal means for the operator.
fn refusal_hint(code: u16) -> &'static str {
    match code {
        // 407 asks for credentials; some proxies (tinyproxy) answer wrong ones with 401.
        401 | 407 => "; the proxy wants other credentials: check the user in the proxy URL and the password in proxy_password_file",
        403 => "; the proxy's policy forbids this destination: ask for CONNECT to the relay's port to be allowed",
        502..=504 => "; the proxy could not reach the relay",
        _ => "",
    }
}

/// Asks an HTTP proxy to CONNECT to `target` and reads its answer's head. Reads byte by byte,
/// so not one byte of the tunnel (the relay speaks only after the agent anyway) is consumed.
pub(super) async fn connect_http<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    proxy: &Proxy,
    target: &str,
) -> Result<(), String> {
    stream
        .write_all(&connect_request(proxy, target))
        .await
        .map_err(|e| format!("cannot send CONNECT: {e}"))?;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(format!(
                "answer to CONNECT longer than {MAX_HEAD} bytes without ending"
            ));
        }
        let byte = stream.read_u8().await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "closed the connection without answering CONNECT".to_string()
            } else {
                format!("failed while answering CONNECT: {e}")
            }
        })?;
        head.push(byte);
    }
    check_connect_answer(&head, target)
}

/// Checks a proxy's complete answer head to CONNECT: a 2xx opens the tunnel.
fn check_connect_answer(head: &[u8], target: &str) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete answer to CONNECT".into()),
        Err(e) => {
            return Err(format!(
                "answered CONNECT with something that is not HTTP ({e})"
            ))
        }
    }
    let code = response.code.unwrap_or(0);
    if (200..300).contains(&code) {
        return Ok(());
    }
    let reason = sanitize(response.reason.unwrap_or(""), MAX_MESSAGE_LEN);
    Err(format!(
        "refused CONNECT to {target}: {code} {reason}{}",
        refusal_hint(code)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Choice;
    use jumpgate_proto::Secret;

    fn env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_password_shows_nowhere_but_in_the_request() {
        let p = Proxy::resolve(
            Choice::Url("http://alice@proxy:3128".into()),
            env,
            Some(Secret::new("s3cret-pw")),
            None,
        )
        .unwrap()
        .unwrap();
        for text in [format!("{p}"), format!("{p:?}"), p.describe()] {
            assert!(!text.contains("s3cret-pw"), "{text}");
        }
        let req = String::from_utf8(connect_request(&p, "10.0.0.1:7000")).unwrap();
        // base64("alice:s3cret-pw")
        assert!(
            req.contains("Proxy-Authorization: Basic YWxpY2U6czNjcmV0LXB3\r\n"),
            "{req}"
        );
        assert!(req.starts_with("CONNECT 10.0.0.1:7000 HTTP/1.1\r\nHost: 10.0.0.1:7000\r\n"));
        let e = Proxy::resolve(
            Choice::Url("http://proxy:3128".into()),
            env,
            Some(Secret::new("x")),
            None,
        )
        .err()
        .unwrap();
        assert!(e.contains("names no user"), "{e}");
    }

    #[test]
    fn connect_answers_are_checked_and_refusals_explained() {
        assert!(
            check_connect_answer(b"HTTP/1.1 200 Connection established\r\n\r\n", "r:1").is_ok()
        );
        assert!(check_connect_answer(b"HTTP/1.0 200 OK\r\nVia: x\r\n\r\n", "r:1").is_ok());
        let e = check_connect_answer(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
            "r:1",
        )
        .unwrap_err();
        assert!(
            e.contains("407 Proxy Authentication Required") && e.contains("credentials"),
            "{e}"
        );
        let e = check_connect_answer(b"HTTP/1.1 403 Forbidden\r\n\r\n", "r:1").unwrap_err();
        assert!(e.contains("403 Forbidden") && e.contains("policy"), "{e}");
        let e = check_connect_answer(b"SSH-2.0-OpenSSH\r\n\r\n", "r:1").unwrap_err();
        assert!(e.contains("not HTTP"), "{e}");
        let e = check_connect_answer(b"HTTP/1.1 500 \x1b[31mred\r\n\r\n", "r:1").unwrap_err();
        assert!(!e.contains('\x1b'), "{e:?}");
    }
}
