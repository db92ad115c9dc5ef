//! `relay-server`: parse the configuration, then hand over to the library.

use std::process::ExitCode;

use jumpgate_config::exit::parse_args;
use jumpgate_config::{init_logging, run_until_signalled, ExitStatus};
use relay_server::config::{tls_settings, Cli, Command};
use relay_server::{identity, RelayConfig};

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
        Some(Command::CheckConfig(args)) => match RelayConfig::from_args(args) {
            Ok(config) => {
                println!("configuration is valid:\n{config:#?}");
                ExitStatus::Ok.into()
            }
            Err(e) => fail(e.into()),
        },
        Some(Command::Fingerprint(args)) => fingerprint(&args),
        Some(Command::Tunnels(args)) => print(relay_server::cli::tunnels(&args)),
        Some(Command::SshConfig(args)) if args.router => print(
            relay_server::cli::ssh_config_router(&args.run, &args.pattern, args.user.as_deref()),
        ),
        Some(Command::SshConfig(args)) => print(relay_server::cli::ssh_config(
            &args.run,
            args.user.as_deref(),
        )),
    }
}

fn print(result: Result<String, relay_server::cli::CliError>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitStatus::Ok.into()
        }
        Err(e) => {
            eprintln!("relay-server: {e}");
            match e {
                relay_server::cli::CliError::Config(_) | relay_server::cli::CliError::Secret(_) => {
                    ExitStatus::Usage
                }
                relay_server::cli::CliError::AdminOff => ExitStatus::Usage,
                _ => ExitStatus::Unavailable,
            }
            .into()
        }
    }
}

fn run(args: relay_server::config::RunArgs) -> ExitCode {
    let config = match RelayConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => return fail(e.into()),
    };
    let log = init_logging(config.log_format, &config.log_level);
    let Some(result) = run_until_signalled(
        "relay-server",
        1, // the main thread: accept loop, admin, router; sessions may go to shard threads
        |shutdown| async move {
            let relay = relay_server::Relay::bind(config, shutdown).await?;
            reload_on_sighup(relay.reloader(), log);
            relay.serve().await
        },
    ) else {
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

/// SIGHUP re-reads the configuration (systemctl reload).
fn reload_on_sighup(reloader: relay_server::Reloader, log: jumpgate_config::LogHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP received, reloading configuration");
                    let monotonic = jumpgate_config::notify::monotonic_usec();
                    jumpgate_config::sd_notify(&format!("RELOADING=1\nMONOTONIC_USEC={monotonic}"));
                    match reloader.reload() {
                        Ok(config) => {
                            if let Err(e) = log.set_level(&config.log_level) {
                                tracing::error!("reload: {e}");
                            }
                        }
                        Err(e) => {
                            tracing::error!("reload failed, keeping the running configuration: {e}")
                        }
                    }
                    jumpgate_config::sd_notify("READY=1");
                }
            });
        }
        Err(e) => tracing::warn!("cannot install the SIGHUP handler: {e}"),
    }
}

fn fingerprint(args: &relay_server::config::RunArgs) -> ExitCode {
    let result = tls_settings(args)
        .map_err(relay_server::RelayError::from)
        .and_then(|(state_dir, source)| {
            identity::load_certificate(&state_dir, &source, &["localhost".to_string()])
        });
    match result {
        Ok((certs, _key)) => {
            println!("{}", jumpgate_transport::tls::Fingerprint::of(&certs[0]));
            ExitStatus::Ok.into()
        }
        Err(e) => fail(e),
    }
}

fn fail(e: relay_server::RelayError) -> ExitCode {
    eprintln!("relay-server: {e}");
    e.exit_status().into()
}
