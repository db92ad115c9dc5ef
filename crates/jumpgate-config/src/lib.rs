//! How both jumpgate binaries read their configuration, so `relay-server` and `worker-agent`
//! word the same mistakes the same way: how a TOML file is read and its errors worded, how
//! secrets are read from files (and systemd credentials) and checked for safe permissions, how
//! each setting is declared once for flags and file and the two layered, and how durations are
//! written. The process edge (logging, signals, exit codes, `/metrics`) is `jumpgate-daemon`.

pub mod duration;
pub mod file;
pub mod layer;
pub mod secret_file;

pub use duration::{duration_setting, parse_duration, DurationValue};
pub use file::{load_toml, parse_list, write_atomic, ConfigError};
pub use layer::{layered, Merge};
pub use secret_file::{
    credential, credentials_directory, env_token, or_credential, read_secret_file, SecretFileError,
};
