//! Copying bytes both ways between two streams.

use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer per direction. 16 KiB matches a TLS record and yamux's split size, so one read fills
/// one frame; larger buffers cost memory per connection without measurable throughput gain.
pub const BRIDGE_BUF: usize = 16 * 1024;

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
/// that half-close to finish.
pub async fn bridge<A, B>(a: &mut A, b: &mut B) -> std::io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (a_to_b, b_to_a) =
        tokio::io::copy_bidirectional_with_sizes(a, b, BRIDGE_BUF, BRIDGE_BUF).await?;
    Ok(Transferred { a_to_b, b_to_a })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
}
