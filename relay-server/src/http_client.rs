//! One HTTP/1.1 request on a connection the caller opened, plain or TLS, spoken by hyper. The
//! webhook sender and the operator commands' admin-API client share it, so neither writes request
//! lines or parses status lines by hand, and TLS stays the caller's (its rustls configuration,
//! its CA bundle).

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection failed, or what came back was not an HTTP answer.
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The answer's body was larger than the caller accepts.
    #[error("the answer's body is over {0} bytes")]
    TooLarge(usize),
}

/// What came back.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The body, if the caller asked for it.
    pub body: Bytes,
}

/// Sends `request` on `io` and waits for the answer. With `body_limit`, also reads the body, up
/// to that many bytes; without, the body is left unread and the connection dropped. Header names
/// go out in Title-Case, as the hand-written clients sent them, for receivers that compare them
/// case-sensitively.
///
/// Dropping the returned future closes the connection: nothing is left running (callers put a
/// time limit around it).
pub async fn exchange<S>(
    io: S,
    request: Request<Full<Bytes>>,
    body_limit: Option<usize>,
) -> Result<Answer, ExchangeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .title_case_headers(true)
        .handshake(TokioIo::new(io))
        .await?;
    let talk = async move {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = match body_limit {
            None => Bytes::new(),
            Some(limit) => Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map_err(|e| match e.downcast::<hyper::Error>() {
                    Ok(e) => ExchangeError::Http(*e),
                    Err(_) => ExchangeError::TooLarge(limit),
                })?
                .to_bytes(),
        };
        Ok(Answer { status, body })
    };
    let mut talk = std::pin::pin!(talk);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        answer = &mut talk => return answer,
        _ = &mut conn => {}
    }
    // The connection ended first (say, the server closed it right after answering): the answer,
    // or the error that explains its absence, is already waiting.
    talk.await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Runs `exchange` against a server that reads the request head and sends `answer`.
    async fn against(
        answer: &'static [u8],
        body_limit: Option<usize>,
    ) -> (String, Result<Answer, ExchangeError>) {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if server.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            server.write_all(answer).await.unwrap();
            server.shutdown().await.unwrap();
            String::from_utf8(head).unwrap()
        });
        let request = Request::get("/api/x")
            .header(hyper::header::HOST, "relay:7001")
            .header("x-jumpgate-event", "tunnel_up")
            .body(Full::default())
            .unwrap();
        let answer = exchange(client, request, body_limit).await;
        (server.await.unwrap(), answer)
    }

    #[tokio::test]
    async fn sends_title_case_headers_and_reads_status_and_body() {
        let (head, answer) = against(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\nConnection: close\r\n\r\nnope\n",
            Some(1024),
        )
        .await;
        assert!(head.starts_with("GET /api/x HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains("\r\nX-Jumpgate-Event: tunnel_up\r\n"),
            "{head}"
        );
        let answer = answer.unwrap();
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert_eq!(&answer.body[..], b"nope\n");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_and_a_non_http_answer_are_errors() {
        let (_, answer) = against(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789",
            Some(4),
        )
        .await;
        assert!(
            matches!(answer, Err(ExchangeError::TooLarge(4))),
            "{answer:?}"
        );
        let (_, answer) = against(b"SSH-2.0-OpenSSH\r\n\r\n", Some(4)).await;
        assert!(matches!(answer, Err(ExchangeError::Http(_))), "{answer:?}");
        // Without a body limit only the status matters.
        let (_, answer) = against(b"HTTP/1.1 204 No Content\r\n\r\n", None).await;
        assert_eq!(answer.unwrap().status, StatusCode::NO_CONTENT);
    }
}
