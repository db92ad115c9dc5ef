//! Reading and writing protocol frames on async byte streams.

use jumpgate_proto::{FrameDecoder, FrameError};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::task::TaskTracker;

/// Why a frame could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    /// The peer closed the stream before a whole frame arrived.
    #[error("connection closed by peer")]
    Closed,
    /// The socket failed.
    #[error(transparent)]
    Io(std::io::Error),
    /// The frame is oversized, empty or not the expected message.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl From<std::io::Error> for FrameIoError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameIoError::Closed
        } else {
            FrameIoError::Io(e)
        }
    }
}

/// Writes one message as a frame and flushes it.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameIoError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let buf = jumpgate_proto::encode(msg)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame's payload through the (fuzzed) [`FrameDecoder`]. Reads exactly the frame,
/// never past it, so raw bytes that follow on the same stream stay unread. The size limit is
/// checked from the header, before the payload is allocated.
pub async fn read_payload<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, FrameIoError> {
    let mut decoder = FrameDecoder::new();
    let mut piece = Vec::new();
    loop {
        if let Some(payload) = decoder.next_frame()? {
            return Ok(payload);
        }
        piece.resize(decoder.wanted()?, 0);
        r.read_exact(&mut piece).await?;
        decoder.push(&piece)?;
    }
}

/// Reads one frame and decodes it as a `T`.
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, FrameIoError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let payload = read_payload(r).await?;
    Ok(jumpgate_proto::decode(&payload)?)
}

/// Reads frames on a background task and hands them over a channel, so a caller can wait for the
/// next frame inside `select!` without losing a half-read frame when another branch wins.
/// The task, on `tasks`, stops after the first error (which it delivers) or when the receiver is
/// dropped.
pub fn spawn_frame_reader<R, T>(
    mut reader: R,
    tasks: &TaskTracker,
) -> tokio::sync::mpsc::Receiver<Result<T, FrameIoError>>
where
    R: AsyncRead + Unpin + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tasks.spawn(async move {
        loop {
            let frame = tokio::select! {
                _ = tx.closed() => return,
                f = read_frame::<_, T>(&mut reader) => f,
            };
            let failed = frame.is_err();
            if tx.send(frame).await.is_err() || failed {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use jumpgate_proto::Control;

    #[tokio::test]
    async fn frame_then_raw_bytes_stay_separate() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &Control::Ping { seq: 7 })
            .await
            .unwrap();
        a.write_all(b"raw").await.unwrap();
        let got: Control = read_frame(&mut b).await.unwrap();
        assert_eq!(got, Control::Ping { seq: 7 });
        let mut rest = [0u8; 3];
        b.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"raw");
    }

    #[tokio::test]
    async fn oversize_header_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = read_frame::<_, Control>(&mut b).await.unwrap_err();
        assert!(matches!(
            err,
            FrameIoError::Frame(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn eof_mid_frame_is_closed() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[0, 0, 0, 9, b'{']).await.unwrap();
        drop(a);
        let err = read_frame::<_, Control>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameIoError::Closed));
    }
}
