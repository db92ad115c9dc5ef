//! Single-threaded runtimes that agent sessions are spread over.
//!
//! A tunnel's cost is mostly wake-ups between a session's tasks (user sockets, the bridge, the
//! yamux driver, the TLS socket). On one thread those are cheap; across the threads of a
//! work-stealing runtime they are futex calls and context switches: on 2 vCPUs a relay on one
//! thread per CPU moved 4 streams at 0.55x the rate of a single-threaded one (BENCHMARKS.md).
//! Shards keep every task of an agent session on one thread (its TLS socket, driver, port
//! listeners and user connections, all registered with that thread's reactor) and spread
//! sessions over threads, so a many-core jump host still uses its cores. The main runtime keeps
//! the agent port's accept loop, the admin API and the router.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long shutdown waits for a shard thread to finish once its sessions are gone.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Session shards: one thread with a single-threaded runtime each.
#[derive(Debug)]
pub struct Shards {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Shards {
    /// Starts `count` shard threads.
    pub fn start(count: usize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("jg-shard-{i}")) // comm shows 15 characters
                // Runs until shutdown; dropping the runtime here ends whatever is left on it.
                .spawn(move || runtime.block_on(stop.cancelled()))?;
            threads.push(thread);
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            stop,
            threads,
        })
    }

    /// Runs `session(tcp)` on the next shard (round robin), tracked by `tasks`. The socket is
    /// moved to that shard's reactor, so its readiness wakes that thread and no other.
    pub fn spawn<F>(
        &self,
        tasks: &TaskTracker,
        tcp: TcpStream,
        session: impl FnOnce(TcpStream) -> F + Send + 'static,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        let std_tcp = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot hand an agent connection to a session thread: {e}");
                return;
            }
        };
        let shard = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        let run = async move {
            match TcpStream::from_std(std_tcp) {
                Ok(tcp) => session(tcp).await,
                Err(e) => tracing::warn!("cannot register an agent connection: {e}"),
            }
        };
        tasks.spawn_on(run, &self.handles[shard]);
    }

    /// Stops the shard threads once their sessions are over; waits a little for them.
    pub async fn stop(self) {
        self.stop.cancel();
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        if tokio::time::timeout(STOP_TIMEOUT, joined).await.is_err() {
            tracing::warn!("session threads did not stop within {STOP_TIMEOUT:?}");
        }
    }
}
