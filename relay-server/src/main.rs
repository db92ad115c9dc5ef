//! `relay-server`: parse the configuration, then hand over to the library.

use std::process::ExitCode;

use jumpgate_daemon::exit::parse_args;
use jumpgate_daemon::{init_logging, run_until_signalled, ExitStatus};
use relay_server::cli::{self, CliError};
use relay_server::config::{Cli, Command, Purpose, RunArgs};
use relay_server::{identity, RelayConfig, RelayError};

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
        Some(Command::CheckConfig(args)) => match RelayConfig::from_args(args)
            .map_err(RelayError::from)
            .and_then(|config| cli::check_files(&config).map(|()| config))
        {
            Ok(config) => {
                println!("configuration is valid:\n{config:#?}");
                ExitStatus::Ok.into()
            }
            Err(e) => fail(e),
        },
        Some(Command::Fingerprint(args)) if args.jump => {
            print(relay_server::cli::jump::fingerprint(&args.run))
        }
        Some(Command::Fingerprint(args)) => match RelayConfig::load(args.run, Purpose::Inspect)
            .map_err(RelayError::from)
            .and_then(|config| identity::fingerprint(&config))
        {
            Ok(pin) => {
                println!("{pin}");
                ExitStatus::Ok.into()
            }
            Err(e) => fail(e),
        },
        Some(Command::Tunnels(args)) => print(cli::tunnels(&args)),
        Some(Command::SshConfig(args)) if args.router => print(cli::ssh_config_router(
            &args.run,
            &args.pattern,
            args.user.as_deref(),
        )),
        Some(Command::SshConfig(args)) if args.jump => print(relay_server::cli::jump::ssh_config(
            &args.run,
            &args.pattern,
            args.user.as_deref(),
        )),
        Some(Command::SshConfig(args)) => print(cli::ssh_config(&args.run, args.user.as_deref())),
        Some(Command::MintToken(args)) => print(cli::mint_token(&args)),
        Some(Command::SignJumpCert(args)) => print(relay_server::cli::jump::sign_cert(&args)),
    }
}

fn print(result: Result<String, CliError>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitStatus::Ok.into()
        }
        Err(e) => {
            eprintln!("relay-server: {e}");
            match e {
                CliError::Config(_)
                | CliError::Secret(_)
                | CliError::BadToken(_)
                | CliError::AdminOff => ExitStatus::Usage,
                _ => ExitStatus::Unavailable,
            }
            .into()
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = match RelayConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => return fail(e.into()),
    };
    init_logging(config.log_format, &config.log_level);
    // The main thread: accept loop, admin, router; sessions may go to shard threads.
    let Some(result) = run_until_signalled("relay-server", 1, |shutdown| {
        relay_server::run(config, shutdown)
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

fn fail(e: RelayError) -> ExitCode {
    eprintln!("relay-server: {e}");
    e.exit_status().into()
}
