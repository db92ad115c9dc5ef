//! `jumpgate-bench`: jumpgate side by side with the direct path and, when their binaries are
//! given (FRPS/FRPC, RATHOLE), frp and rathole, all on loopback, in one run; with `--wan`, also
//! across an emulated WAN (see `delay.rs`); `agents` puts thousands of simulated agents on one
//! relay (see `scale.rs`); `host` measures one host agent's tunnels (see `host.rs`). See BENCHMARKS.md.
//!
//! This file only orders a run: `cli.rs` parses the command line, `peers.rs` starts the systems
//! compared, `loopback.rs` and `wan.rs` measure them, `report.rs` writes the results.

mod cli;
mod delay;
mod egress;
mod fleet;
mod host;
mod jump;
mod loopback;
mod measure;
mod peers;
mod proc;
mod report;
mod scale;
mod sim;
mod systems;
mod wan;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use clap::Parser;

use crate::cli::{Args, Cmd};
use crate::peers::Peers;
use crate::report::Report;

/// Where relay-server and worker-agent are: `JUMPGATE_BIN_DIR`, or next to this binary.
fn bin_dir() -> Result<PathBuf> {
    std::env::var_os("JUMPGATE_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok()?.parent().map(PathBuf::from))
        .context("cannot find the jumpgate binaries; set JUMPGATE_BIN_DIR")
}

/// The median of repeated measurements (the upper middle one of an even count; 0 for none).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(Cmd::Jump(j)) = &mut args.cmd {
        return jump::run(j, &bin_dir()?);
    }
    match &args.cmd {
        Some(Cmd::EchoServer { listen }) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            measure::echo_server_on(&rt, *listen)?;
            rt.block_on(std::future::pending::<()>());
            return Ok(());
        }
        Some(Cmd::DelayCheck(c)) => return wan::delay_check(c),
        // Two relays share a lease store (bench/src/fleet.rs); one is bench/src/scale.rs.
        Some(Cmd::Agents(a)) if a.relays == 2 => return fleet::run(a, &bin_dir()?),
        Some(Cmd::Agents(a)) => return scale::run(a, &bin_dir()?),
        Some(Cmd::Host(h)) => return host::run(h, &bin_dir()?),
        Some(Cmd::Jump(_)) | None => {}
    }
    if args.smoke {
        args.repeat = 1;
        args.iperf_secs = 1;
        args.conns = 50;
        args.agents = args.agents.min(5);
    }
    let bin = bin_dir()?;
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    delay::install_signal_cleanup(&rt);
    let have_iperf = Command::new("iperf3").arg("--version").output().is_ok();
    if !have_iperf {
        eprintln!("iperf3 not found: throughput rows are skipped (apt-get install iperf3)");
    }
    let peers = Peers::from_env(args.egress);
    let mut report = Report::new(peers.names());
    if !args.only_wan {
        loopback::loopback_rows(
            &args,
            &bin,
            &peers,
            have_iperf,
            &rt,
            dir.path(),
            &mut report,
        )?;
    }
    if !args.wan.is_empty() {
        let opts = wan::Opts {
            rtts_ms: args.wan.clone(),
            rate_mbit: args.wan_rate,
            queue_ms: args.wan_queue_ms,
            mtu: args.wan_mtu,
            iperf_secs: args.iperf_secs,
            repeat: args.repeat,
            smoke: args.smoke,
            only_loaded: args.only_loaded,
        };
        wan::run(&opts, &bin, &peers, have_iperf, dir.path(), &mut report)?;
    }
    report.print();
    report.write(&args.out)?;
    eprintln!("results written to {}", args.out.display());
    Ok(())
}
