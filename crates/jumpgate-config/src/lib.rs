//! Plumbing both jumpgate binaries share at their edge, so `relay-server` and `worker-agent`
//! behave the same way: how a TOML file is read and its errors worded, how secrets are read from
//! files and checked for safe permissions, how each setting is declared once for flags and file
//! and the two layered, how durations are written, how logs are set up, which signals stop the
//! process and which exit codes mean what, and how `/metrics` is written.

pub mod duration;
pub mod exit;
pub mod file;
pub mod layer;
pub mod logging;
pub mod notify;
pub mod prometheus;
pub mod runtime;
pub mod secret_file;
pub mod signals;

pub use duration::{duration_setting, parse_duration, DurationValue};
pub use exit::ExitStatus;
pub use file::{load_toml, parse_list, write_atomic, ConfigError};
pub use layer::{layered, Merge};
pub use logging::{init_logging, parse_filter, LogFormat};
pub use notify::sd_notify;
pub use runtime::run_until_signalled;
pub use secret_file::{
    credential, credentials_directory, env_token, or_credential, read_secret_file, SecretFileError,
};
