//! The command line: the loopback and WAN comparison's flags, and the subcommands that run
//! other measurements; parsing kept apart from running so `main` reads as the run's order.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{host, jump, scale, wan};

/// The command line: with no subcommand, the side-by-side comparison these flags shape.
#[derive(Debug, Parser)]
#[command(
    name = "jumpgate-bench",
    about = "Benchmark jumpgate against the direct path, frp and rathole"
)]
pub(crate) struct Args {
    #[command(subcommand)]
    pub(crate) cmd: Option<Cmd>,
    /// Tiny sizes for CI: seconds, not minutes; no thresholds.
    #[arg(long)]
    pub(crate) smoke: bool,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub(crate) repeat: usize,
    /// iperf3 duration per run, seconds.
    #[arg(long, default_value_t = 5)]
    pub(crate) iperf_secs: u64,
    /// Connections held open at once.
    #[arg(long, default_value_t = 2000)]
    pub(crate) conns: usize,
    /// Agents connected at once for the agent-scale test (0 skips it).
    #[arg(long, default_value_t = 1000)]
    pub(crate) agents: usize,
    /// Where to write results.json and results.md.
    #[arg(long, default_value = "bench-results")]
    pub(crate) out: PathBuf,
    /// WAN rows at these round-trip times in ms (comma-separated, e.g. 1,20,80), across a
    /// userspace delay line into a worker network namespace (needs root and /dev/net/tun).
    #[arg(long, value_delimiter = ',')]
    pub(crate) wan: Vec<f64>,
    /// Also run every WAN RTT with this bottleneck rate, Mbit/s per direction.
    #[arg(long)]
    pub(crate) wan_rate: Option<f64>,
    /// Drop-tail queue of the rate-limited WAN in ms of its rate (default: one RTT, i.e. one
    /// bandwidth-delay product, at least 32 packets).
    #[arg(long)]
    pub(crate) wan_queue_ms: Option<f64>,
    /// MTU of the delay line's TUN devices.
    #[arg(long, default_value_t = 9000)]
    pub(crate) wan_mtu: u32,
    /// Only the WAN rows: skip the loopback rows and the agent-scale test.
    #[arg(long)]
    pub(crate) only_wan: bool,
    /// Also measure the agent link's egress paths: through an HTTP CONNECT proxy (tinyproxy), a
    /// SOCKS5 proxy (microsocks), as WebSocket through nginx, and frp's websocket transport.
    #[arg(long)]
    pub(crate) egress: bool,
    /// WAN rows: only the echo rows, idle and during a 4-stream transfer (quick A/B runs).
    #[arg(long)]
    pub(crate) only_loaded: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Cmd {
    /// Validates the delay line on its own: RTT, slow start, a window-limited transfer, and what
    /// the forwarder can carry.
    DelayCheck(wan::CheckArgs),
    /// Thousands of simulated agents (real TLS + yamux sessions from this one process) on one
    /// relay: its memory per agent, the connect storm, and the return of every agent to its port
    /// after kill -9 and restart.
    Agents(scale::AgentsArgs),
    /// `ssh -J relay job` next to `ssh -p PORT relay` with real OpenSSH: a session's 64-byte
    /// round trip, sessions per second and scp both ways, on loopback and with the user's leg
    /// long (`--rtt-ms 20`).
    Jump(jump::JumpArgs),
    /// Issue 28: N tunnels on one host agent (`worker-agent --host-mode`) registered through the
    /// real `tunnel add` CLI (register latency, agent and relay RSS per tunnel) against N
    /// ordinary agent processes, one per tunnel.
    Host(host::HostArgs),
    /// TCP echo server until killed (the WAN rows run it inside the worker namespace).
    #[command(hide = true)]
    EchoServer {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
}
