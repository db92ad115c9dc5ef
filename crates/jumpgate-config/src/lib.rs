//! Plumbing both jumpgate binaries share at their edge, so `relay-server` and `worker-agent`
//! behave the same way: how a TOML file is read and its errors worded, how secrets are read from
//! files and checked for safe permissions, how durations are written, how logs are set up, which
//! signals stop the process and which exit codes mean what.

pub mod duration;
pub mod exit;
pub mod file;
pub mod logging;
pub mod notify;
pub mod runtime;
pub mod secret_file;
pub mod signals;

pub use duration::{parse_duration, DurationValue};
pub use exit::ExitStatus;
pub use file::{load_toml, parse_list, write_atomic, ConfigError};
pub use logging::{init_logging, parse_filter, LogFormat, LogHandle};
pub use notify::sd_notify;
pub use runtime::run_until_signalled;
pub use secret_file::{read_secret_file, SecretFileError};
pub use signals::stop_on_signals;
