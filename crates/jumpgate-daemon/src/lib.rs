//! How both jumpgate binaries live as processes, so `relay-server` and `worker-agent` behave the
//! same way under systemd: how logs are set up (and their level changed on reload), which signals
//! stop the process and which exit codes mean what, how readiness is reported (`sd_notify`), the
//! runtime `main` runs in, and how `/metrics` is written.

pub mod exit;
pub mod logging;
pub mod notify;
pub mod prometheus;
pub mod runtime;
pub mod signals;

pub use exit::ExitStatus;
pub use logging::{init_logging, parse_filter, LogFormat};
pub use notify::sd_notify;
pub use runtime::run_until_signalled;
