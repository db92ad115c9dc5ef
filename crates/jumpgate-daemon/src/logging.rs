//! Log setup: human-readable lines by default, JSON lines for log shippers, `RUST_LOG` filtering,
//! and changing the level without restarting (SIGHUP).

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// What changes the running filter.
struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set: it wins over the config file, also on reload.
    pinned_by_env: bool,
}

/// The handle of the subscriber [`init_logging`] installed. Process-wide like the subscriber
/// itself, so a library reloading its configuration can change the level without the binary
/// threading a handle through `run(config, shutdown)`.
static HANDLE: OnceLock<LogHandle> = OnceLock::new();

/// Applies `level` (e.g. `info` or `info,relay_server=debug`) to the running logger, unless
/// `RUST_LOG` is set. Does nothing in a process whose logging [`init_logging`] did not set up
/// (tests running a relay in-process).
pub fn set_level(level: &str) -> Result<(), String> {
    let Some(log) = HANDLE.get() else {
        return Ok(());
    };
    if log.pinned_by_env {
        return Ok(());
    }
    let filter = parse_filter(level)?;
    log.handle.reload(filter).map_err(|e| e.to_string())
}

/// Builds a filter from directives; yamux and rustls are quieted to warnings unless named.
pub fn parse_filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(format!("yamux=warn,rustls=warn,{level}")).map_err(|e| {
        format!("{level:?} is not a log filter ({e}); use e.g. info or info,relay_server=debug")
    })
}

/// Installs the global subscriber, writing to stderr. `RUST_LOG` overrides `level`.
/// yamux and rustls log through `log`; the log bridge picks them up.
pub fn init_logging(format: LogFormat, level: &str) {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok());
    let pinned_by_env = from_env.is_some();
    let filter = from_env
        .or_else(|| parse_filter(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let layer = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    };
    if tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .is_ok()
    {
        let _ = HANDLE.set(LogHandle {
            handle,
            pinned_by_env,
        });
    }
}
