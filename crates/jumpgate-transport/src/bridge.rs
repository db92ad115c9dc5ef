//! Copying bytes both ways between two streams.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First buffer per direction. Interactive sessions (ssh keystrokes, prompts) never need more, so
/// an idle or typing connection costs one page per direction, not a bulk-sized buffer.
pub const BRIDGE_BUF_MIN: usize = 2 * 1024;
/// Largest buffer per direction, reached after reads that keep filling the buffer (bulk copies);
/// it matches yamux's split size, so one read becomes one frame and one vectored TLS write.
pub const BRIDGE_BUF_MAX: usize = 64 * 1024;

/// Bytes moved by a finished bridge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the first stream to the second.
    pub a_to_b: u64,
    /// From the second stream to the first.
    pub b_to_a: u64,
}

/// Copies until both directions are done. When one side reaches EOF the other side's write half
/// is shut down and the opposite direction keeps flowing: `scp` and `ssh host 'cat > file'` need
/// that half-close to finish. An error in either direction ends both.
pub async fn bridge<A, B>(a: &mut A, b: &mut B) -> std::io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let (a_to_b, b_to_a) = tokio::try_join!(
        copy_half(&mut a_read, &mut b_write),
        copy_half(&mut b_read, &mut a_write)
    )?;
    Ok(Transferred { a_to_b, b_to_a })
}

/// One direction: read, write, grow the buffer while reads fill it, shut the writer down on EOF.
/// Public for callers that must do something on one direction before it starts (see the
/// relay's pipelined stream open); [`bridge`] is two of these.
pub async fn copy_half<R, W>(from: &mut R, to: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BRIDGE_BUF_MIN];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
        if n == buf.len() && buf.len() < BRIDGE_BUF_MAX {
            buf.resize((buf.len() * 4).min(BRIDGE_BUF_MAX), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn half_close_propagates_and_reverse_direction_continues() {
        let (mut user, mut relay_a) = tokio::io::duplex(1024);
        let (mut relay_b, mut target) = tokio::io::duplex(1024);
        let bridge = tokio::spawn(async move { bridge(&mut relay_a, &mut relay_b).await });

        user.write_all(b"upload").await.unwrap();
        user.shutdown().await.unwrap();
        let mut got = Vec::new();
        target.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"upload");

        target.write_all(b"ack").await.unwrap();
        target.shutdown().await.unwrap();
        let mut back = Vec::new();
        user.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"ack");

        let t = bridge.await.unwrap().unwrap();
        assert_eq!(
            t,
            Transferred {
                a_to_b: 6,
                b_to_a: 3
            }
        );
    }

    #[tokio::test]
    async fn bulk_data_arrives_intact_while_the_buffer_grows() {
        let (mut user, mut relay_a) = tokio::io::duplex(64 * 1024);
        let (mut relay_b, mut target) = tokio::io::duplex(64 * 1024);
        let bridge = tokio::spawn(async move { bridge(&mut relay_a, &mut relay_b).await });
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            user.write_all(&sent).await.unwrap();
            user.shutdown().await.unwrap();
            user
        });
        let mut got = Vec::new();
        target.read_to_end(&mut got).await.unwrap();
        assert!(got == data);
        target.shutdown().await.unwrap();
        drop(writer.await.unwrap());
        assert_eq!(bridge.await.unwrap().unwrap().a_to_b, 1_000_000);
    }
}
