//! `worker-agent`: parse the configuration, then hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use jumpgate_daemon::exit::parse_args;
use jumpgate_daemon::{init_logging, run_until_signalled, ExitStatus};
use worker_agent::config::{Cli, Command, RunArgs};
use worker_agent::{AgentConfig, AgentError};

/// mimalloc instead of glibc's malloc, for the whole process: a bulk transfer costs the relay
/// and agent 5-18% less CPU per GiB on one stream (glibc's malloc gives the relay's transfer
/// buffers back to the kernel and faults them in again), for 0.5-2 MiB more RSS. Measured against
/// glibc with and without its `rep movsb` tunable, and against jemalloc: BENCHMARKS.md,
/// "Allocator".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli: Cli = parse_args();
    match cli.command {
        None => run(cli.run),
        Some(Command::CheckConfig(args)) => match AgentConfig::from_args(args) {
            Ok(config) => {
                println!("configuration is valid:\n{config:#?}");
                ExitStatus::Ok.into()
            }
            Err(e) => fail(e.into()),
        },
        Some(Command::Status {
            status_file,
            config,
        }) => status(status_file, config),
        Some(Command::Tunnel(args)) => worker_agent::cli::run(args),
    }
}

fn status(status_file: Option<PathBuf>, config: Option<PathBuf>) -> ExitCode {
    let path = match status_file {
        Some(p) => Some(p),
        None => match (RunArgs {
            config,
            ..RunArgs::default()
        })
        .layered()
        {
            Ok(settings) => settings.status_file,
            Err(e) => return fail(e.into()),
        },
    };
    let Some(path) = path else {
        eprintln!("worker-agent: pass --status-file FILE, or -c CONFIG with status_file set");
        return ExitStatus::Usage.into();
    };
    match worker_agent::status::describe(&path) {
        Ok(text) => {
            print!("{text}");
            ExitStatus::Ok.into()
        }
        Err(e) => {
            eprintln!("worker-agent: {e}");
            ExitStatus::Unavailable.into()
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = match AgentConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => return fail(e.into()),
    };
    init_logging(config.log_format, &config.log_level);
    let Some(result) = run_until_signalled("worker-agent", config.worker_threads, |shutdown| {
        worker_agent::run(config, shutdown)
    }) else {
        return ExitStatus::Failure.into();
    };
    match result {
        Ok(()) => ExitStatus::Ok.into(),
        Err(e) => {
            tracing::error!("{e}");
            fail(e)
        }
    }
}

fn fail(e: AgentError) -> ExitCode {
    eprintln!("worker-agent: {e}");
    e.exit_status().into()
}
