//! The yamux session driver.
//!
//! yamux does all socket I/O inside `Connection::poll_next_inbound`, so the connection must be
//! polled continuously by exactly one task. [`Session::start`] returns that task's future (the
//! [`Driver`]), a cloneable [`Opener`] that asks the driver for new outbound streams, and a
//! channel of inbound streams. Dropping the receiver makes the driver reset inbound streams, so a
//! side that never expects them (the relay, after the control stream) stays safe.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use crate::budget::{Budgeted, Spent};
use crate::coalesce::Coalesce;

pub use yamux::Mode;

/// A multiplexed stream with tokio's I/O traits.
pub type MuxStream = Compat<yamux::Stream>;

/// Small frames (headers, window updates, interactive data) gathered into one TLS write.
const COALESCE_CAP: usize = 16 * 1024;

/// How long a closing session waits for the peer to acknowledge before giving up.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a session or a stream open failed.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// The session is gone (closed, failed or shutting down).
    #[error("session closed")]
    Closed,
    /// yamux reported a protocol or I/O error.
    #[error("multiplexer error: {0}")]
    Yamux(#[from] yamux::ConnectionError),
}

/// yamux's initial (and minimum) receive window of every stream.
const STREAM_CREDIT: usize = 256 * 1024;

/// Session tuning shared by both ends; both must use the same stream limit, because exceeding
/// the peer's `max_num_streams` kills the whole connection.
#[derive(Debug, Clone, Copy)]
pub struct MuxSettings {
    /// Most streams open at once on one session.
    pub max_streams: usize,
    /// Largest yamux data frame sent at once.
    pub split_send_size: usize,
    /// How far, in total, this side lets the receive windows of its streams grow beyond their
    /// initial 256 KiB. yamux doubles a stream's window whenever the sender used half of it
    /// within two round trips, so a stream that is read quickly across a long path grows towards
    /// the path's bandwidth-delay product; this budget bounds what one session can make its peer
    /// send ahead of a reader (and so what it may have to buffer). See
    /// [`MuxSettings::for_round_trip`].
    pub window_headroom: usize,
}

/// The rate, in bytes per second, that window headroom is sized for: one round trip of it.
const HEADROOM_RATE: f64 = 4e9 / 8.0;
/// Least headroom, whatever the round trip: a 2.25 MiB window carries 1 Gbit/s at 18 ms.
const HEADROOM_MIN: usize = 2 << 20;
/// Most headroom: a 16.25 MiB window carries 1.6 Gbit/s at 80 ms, more than a TCP connection
/// with the default 4 MiB send buffer can.
const HEADROOM_MAX: usize = 16 << 20;

impl Default for MuxSettings {
    fn default() -> Self {
        Self {
            max_streams: 4096,
            split_send_size: 64 * 1024,
            window_headroom: HEADROOM_MAX,
        }
    }
}

impl MuxSettings {
    /// Settings for a connection whose unloaded round trip is `rtt` (measured while it was set
    /// up): windows may grow to one round trip of 4 Gbit/s, between 2 and 16 MiB of headroom.
    /// Windows then follow the path's bandwidth-delay product and not the CPU: on a short path
    /// a transfer limited by the processes' CPU cannot queue megabytes in socket buffers (yamux
    /// measures the round trip with its own pings, which wait behind queued data and would
    /// otherwise keep growing the windows).
    pub fn for_round_trip(rtt: Duration) -> Self {
        let headroom = (rtt.as_secs_f64() * HEADROOM_RATE) as usize;
        Self {
            window_headroom: headroom.clamp(HEADROOM_MIN, HEADROOM_MAX),
            ..Self::default()
        }
    }

    fn yamux_config(&self) -> yamux::Config {
        let mut cfg = yamux::Config::default();
        // yamux reserves 256 KiB per possible stream out of the connection window and lets
        // windows grow only into what is left above that reservation: the headroom. Set the
        // window before the stream limit, whose assertion checks it covers the reservation.
        let window = self
            .max_streams
            .saturating_mul(STREAM_CREDIT)
            .saturating_add(self.window_headroom);
        cfg.set_max_connection_receive_window(Some(window));
        cfg.set_max_num_streams(self.max_streams);
        cfg.set_split_send_size(self.split_send_size);
        cfg
    }
}

type OpenReply = oneshot::Sender<Result<yamux::Stream, MuxError>>;

/// Asks the driver for new outbound streams. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Opener {
    requests: mpsc::Sender<OpenReply>,
}

impl Opener {
    /// Opens a stream. The peer learns of it with the first write, so write a header at once.
    pub async fn open(&self) -> Result<MuxStream, MuxError> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(tx).await.map_err(|_| MuxError::Closed)?;
        let stream = rx.await.map_err(|_| MuxError::Closed)??;
        Ok(stream.compat())
    }
}

/// Streams the peer opened, in order.
///
/// Boxed in the channel: a channel allocates its slots 32 at a time, and 32 unboxed streams
/// would cost every session (a relay holds thousands, nearly all idle) 3 KiB up front.
#[derive(Debug)]
pub struct Inbound(mpsc::Receiver<Box<MuxStream>>);

impl Inbound {
    /// The next stream; `None` once the session is gone. Cancel-safe, like `mpsc::Receiver::recv`.
    pub async fn recv(&mut self) -> Option<MuxStream> {
        self.0.recv().await.map(|s| *s)
    }
}

/// The driver of a session over `T`, as [`Session::start`] builds it.
pub type SessionDriver<T> = Driver<Coalesce<Budgeted<T>>>;

/// A started session: the pieces returned by [`Session::start`].
pub struct Session<T> {
    /// Opens outbound streams.
    pub opener: Opener,
    /// Streams the peer opened.
    pub inbound: Inbound,
    /// The future that runs the connection; spawn it.
    pub driver: SessionDriver<T>,
}

impl<T> Session<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// Wraps an established, authenticated byte stream in a yamux session.
    pub fn start(io: T, mode: Mode, settings: MuxSettings) -> Self {
        let (requests, open_rx) = mpsc::channel(64);
        let (inbound_tx, inbound) = mpsc::channel(settings.max_streams.max(1));
        let spent = Spent::default();
        let io = Coalesce::new(Budgeted::new(io, spent.clone()), COALESCE_CAP);
        Self {
            opener: Opener { requests },
            inbound: Inbound(inbound),
            driver: Driver {
                conn: yamux::Connection::new(io, settings.yamux_config(), mode),
                spent,
                open_rx,
                pending_open: None,
                inbound_tx,
            },
        }
    }
}

/// Owns a yamux connection and performs all of its I/O, a bounded amount per poll
/// ([`crate::budget`]).
pub struct Driver<T> {
    conn: yamux::Connection<T>,
    spent: Spent,
    open_rx: mpsc::Receiver<OpenReply>,
    pending_open: Option<OpenReply>,
    inbound_tx: mpsc::Sender<Box<MuxStream>>,
}

impl<T> Driver<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// Runs the session until the peer closes it, it fails, or `cancel` fires; on cancel it sends
    /// a proper close (bounded by a timeout) so the peer sees a clean end, not a reset.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), MuxError> {
        let cancelled = {
            let mut cancelled = pin!(cancel.cancelled());
            poll_fn(|cx| {
                self.spent.reset();
                if cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(true));
                }
                self.poll_step(cx).map(|r| r.map(|()| false))
            })
            .await?
        };
        if cancelled {
            let close = poll_fn(|cx| {
                self.spent.reset();
                self.conn.poll_close(cx)
            });
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
        }
        Ok(())
    }

    /// Serves open requests and inbound streams; `Ready(Ok)` when the peer closed the session.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), MuxError>> {
        loop {
            let reply = match self.pending_open.take() {
                Some(reply) => reply,
                None => match self.open_rx.poll_recv(cx) {
                    Poll::Ready(Some(reply)) => reply,
                    Poll::Ready(None) | Poll::Pending => break,
                },
            };
            if reply.is_closed() {
                continue; // the requester gave up waiting
            }
            match self.conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    let _ = reply.send(Ok(stream));
                }
                Poll::Ready(Err(e)) => {
                    let _ = reply.send(Err(MuxError::Closed));
                    return Poll::Ready(Err(e.into()));
                }
                Poll::Pending => {
                    self.pending_open = Some(reply);
                    break;
                }
            }
        }
        loop {
            match self.conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    if self.inbound_tx.try_send(Box::new(stream.compat())).is_err() {
                        tracing::debug!("inbound stream refused: nobody accepts streams here");
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    fn pair() -> (
        Session<impl AsyncRead + AsyncWrite + Unpin>,
        Session<impl AsyncRead + AsyncWrite + Unpin>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let settings = MuxSettings::default();
        (
            Session::start(a.compat(), Mode::Client, settings),
            Session::start(b.compat(), Mode::Server, settings),
        )
    }

    #[tokio::test]
    async fn streams_flow_both_ways_with_half_close() {
        let (client, mut server) = pair();
        let cancel = CancellationToken::new();
        tokio::spawn(client.driver.run(cancel.clone()));
        tokio::spawn(server.driver.run(cancel.clone()));

        let mut s = client.opener.open().await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.shutdown().await.unwrap();

        let mut peer = server.inbound.recv().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The other direction still works after the client half-closed.
        peer.write_all(b"world").await.unwrap();
        peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world");
        cancel.cancel();
    }

    /// Moves bytes from `from` to `to` `delay` later, like one direction of a long path, and
    /// records the most bytes ever in transit.
    async fn delay_line<R, W>(mut from: R, mut to: W, delay: Duration, most: Arc<AtomicUsize>)
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let in_transit = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let counted = in_transit.clone();
        tokio::spawn(async move {
            while let Some((due, bytes)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if to.write_all(&bytes).await.is_err() {
                    return;
                }
                counted.fetch_sub(bytes.len(), Ordering::Relaxed);
            }
        });
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                return;
            }
            let now = in_transit.fetch_add(n, Ordering::Relaxed) + n;
            most.fetch_max(now, Ordering::Relaxed);
            let due = tokio::time::Instant::now() + delay;
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    }

    #[tokio::test]
    async fn stream_windows_grow_past_the_initial_256_kib_on_a_long_path() {
        // 40 ms round trip: a stream whose window never grows keeps at most 256 KiB in transit
        // (6.5 MB/s), whatever the path could carry.
        let (client_io, client_far) = tokio::io::duplex(8 << 20);
        let (server_io, server_far) = tokio::io::duplex(8 << 20);
        let (cr, cw) = tokio::io::split(client_far);
        let (sr, sw) = tokio::io::split(server_far);
        let most = Arc::new(AtomicUsize::new(0));
        let one_way = Duration::from_millis(20);
        tokio::spawn(delay_line(cr, sw, one_way, most.clone()));
        tokio::spawn(delay_line(sr, cw, one_way, Arc::default()));
        let settings = MuxSettings::for_round_trip(one_way * 2);
        let client = Session::start(client_io.compat(), Mode::Client, settings);
        let mut server = Session::start(server_io.compat(), Mode::Server, settings);
        let cancel = CancellationToken::new();
        tokio::spawn(client.driver.run(cancel.clone()));
        tokio::spawn(server.driver.run(cancel.clone()));

        let total = 24usize << 20;
        let mut s = client.opener.open().await.unwrap();
        let send = tokio::spawn(async move {
            let chunk = vec![9u8; 256 * 1024];
            for _ in 0..total / chunk.len() {
                s.write_all(&chunk).await.unwrap();
            }
            s.shutdown().await.unwrap();
        });
        let mut peer = server.inbound.recv().await.unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = peer.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        send.await.unwrap();
        assert_eq!(got, total);
        let most = most.load(Ordering::Relaxed);
        assert!(
            most > 2 << 20,
            "at most {most} bytes were ever in transit: the stream window did not grow"
        );
        cancel.cancel();
    }

    #[test]
    fn headroom_follows_the_round_trip_within_bounds() {
        let headroom = |ms| MuxSettings::for_round_trip(Duration::from_millis(ms)).window_headroom;
        assert_eq!(headroom(0), HEADROOM_MIN);
        assert_eq!(headroom(1), HEADROOM_MIN);
        assert_eq!(headroom(20), 10_000_000);
        assert_eq!(headroom(80), HEADROOM_MAX);
        assert_eq!(headroom(10_000), HEADROOM_MAX);
    }

    #[tokio::test]
    async fn cancel_closes_the_session_for_the_peer() {
        let (client, server) = pair();
        let cancel_client = CancellationToken::new();
        let client_task = tokio::spawn(client.driver.run(cancel_client.clone()));
        let server_task = tokio::spawn(server.driver.run(CancellationToken::new()));
        cancel_client.cancel();
        client_task.await.unwrap().unwrap();
        // The server's driver ends because the peer went away, although nobody cancelled it.
        tokio::time::timeout(Duration::from_secs(5), server_task)
            .await
            .expect("peer's driver must notice the close")
            .unwrap()
            .ok();
        assert!(client.opener.open().await.is_err());
    }
}
