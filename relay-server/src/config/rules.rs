//! The rules that turn a setting's written value into its typed one: defaults, other sources
//! and checks, composed with [`Rule::then`] in the settings table ([`super::settings`]). Every
//! rule gets the setting's name, so an error names the key the operator wrote.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use jumpgate_config::{duration_setting, or_credential, parse_list, ConfigError, DurationValue};
use jumpgate_lease::PortRange;

/// A step from a written value `R` to a typed value `T` for the setting `key`. Every
/// `FnOnce(&'static str, R) -> Result<T, ConfigError>` is one.
pub trait Rule<R, T>: Sized {
    /// Applies the rule to the value of setting `key`.
    fn apply(self, key: &'static str, raw: R) -> Result<T, ConfigError>;

    /// This rule, then `next` on its result.
    fn then<U>(self, next: impl Rule<T, U>) -> impl Rule<R, U> {
        move |key: &'static str, raw: R| next.apply(key, self.apply(key, raw)?)
    }
}

impl<R, T, F> Rule<R, T> for F
where
    F: FnOnce(&'static str, R) -> Result<T, ConfigError>,
{
    fn apply(self, key: &'static str, raw: R) -> Result<T, ConfigError> {
        self(key, raw)
    }
}

fn invalid(key: &'static str, detail: String) -> ConfigError {
    ConfigError::Invalid { key, detail }
}

/// The value as written, unchecked (paths are checked when the relay opens them).
pub fn as_given<T>() -> impl Rule<T, T> {
    |_: &'static str, value: T| Ok(value)
}

/// `default` where neither flag nor file sets the value.
pub fn or<T>(default: T) -> impl Rule<Option<T>, T> {
    move |_: &'static str, value: Option<T>| Ok(value.unwrap_or(default))
}

/// The type's default where neither flag nor file sets the value.
pub fn or_default<T: Default>() -> impl Rule<Option<T>, T> {
    |_: &'static str, value: Option<T>| Ok(value.unwrap_or_default())
}

/// Under systemd, the `LoadCredential=` file `name` where neither flag nor file sets the value
/// (jumpgate_config::secret_file explains the convention).
pub fn credential(name: &'static str) -> impl Rule<Option<PathBuf>, Option<PathBuf>> {
    move |_: &'static str, value: Option<PathBuf>| Ok(or_credential(value, name))
}

/// A duration (`30s`, `10m`, plain seconds), `default` where it is not set.
pub fn duration(default: Duration) -> impl Rule<Option<DurationValue>, Duration> {
    move |key: &'static str, value: Option<DurationValue>| duration_setting(key, value, default)
}

/// `rule` on the value where one is set; nothing otherwise.
pub fn optional<R, T>(rule: impl Rule<R, T>) -> impl Rule<Option<R>, Option<T>> {
    move |key: &'static str, value: Option<R>| value.map(|v| rule.apply(key, v)).transpose()
}

/// Each entry of a repeatable setting parsed (CIDRs).
pub fn list<T>() -> impl Rule<Vec<String>, Vec<T>>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    |key: &'static str, texts: Vec<String>| parse_list(key, &texts)
}

/// A count or rate of which zero would turn the relay off: at least 1.
pub fn at_least_one<T: PartialEq + From<u8>>(
    key: &'static str,
    value: T,
) -> Result<T, ConfigError> {
    if value == T::from(0) {
        Err(invalid(key, "must be at least 1".into()))
    } else {
        Ok(value)
    }
}

/// An `IP:PORT` to listen on; `example` is shown when it is not one.
pub fn socket_addr(example: &'static str) -> impl Rule<String, SocketAddr> {
    move |key: &'static str, text: String| {
        text.parse::<SocketAddr>()
            .map_err(|_| invalid(key, format!("{text:?} is not IP:PORT, e.g. {example}")))
    }
}

/// An IP address to bind.
pub fn ip_address(key: &'static str, text: String) -> Result<IpAddr, ConfigError> {
    text.parse()
        .map_err(|_| invalid(key, format!("{text:?} is not an IP address, e.g. 0.0.0.0")))
}

/// `IP:PORT`, or `off` for none.
pub fn admin_address(key: &'static str, text: String) -> Result<Option<SocketAddr>, ConfigError> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse::<SocketAddr>()
        .map(Some)
        .map_err(|_| invalid(key, format!("{text:?} is not IP:PORT or \"off\"")))
}

/// A host name or IP address users can type.
pub fn host_name(key: &'static str, host: String) -> Result<String, ConfigError> {
    if host.trim().is_empty() || host.contains(char::is_whitespace) {
        return Err(invalid(
            key,
            format!("{host:?} is not a host name or IP address"),
        ));
    }
    Ok(host)
}

/// `LO-HI`.
pub fn port_range(key: &'static str, text: String) -> Result<PortRange, ConfigError> {
    text.parse::<PortRange>()
        .map_err(|e| invalid(key, e.to_string()))
}

/// A tracing filter (`info`, `info,relay_server=debug`).
pub fn log_filter(key: &'static str, filter: String) -> Result<String, ConfigError> {
    jumpgate_daemon::parse_filter(&filter).map_err(|detail| invalid(key, detail))?;
    Ok(filter)
}

/// Streams per agent: at least 1 and below the session's stream limit, which would end the
/// whole session when exceeded.
pub fn below_stream_limit(key: &'static str, value: usize) -> Result<usize, ConfigError> {
    let limit = jumpgate_transport::mux::MuxSettings::default().max_streams;
    if value == 0 || value >= limit {
        return Err(invalid(
            key,
            format!(
                "must be between 1 and {} (the session's stream limit is {limit})",
                limit - 1
            ),
        ));
    }
    Ok(value)
}

/// The path part of a URL (`/jumpgate`).
pub fn url_path(key: &'static str, path: String) -> Result<String, ConfigError> {
    if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
        return Err(invalid(
            key,
            format!("{path:?} is not a URL path; write it like /jumpgate"),
        ));
    }
    Ok(path)
}

/// `ws[s]://HOST[:PORT]/PATH` as agents accept it in `--server`, short enough to fit a member
/// list ([`jumpgate_proto::member::check_ws_url`]).
pub fn websocket_url(key: &'static str, text: String) -> Result<String, ConfigError> {
    let text = text.trim().to_string();
    if jumpgate_proto::member::check_ws_url(&text) {
        return Ok(text);
    }
    Err(invalid(
        key,
        format!(
            "{:?} is not a WebSocket URL agents can dial; write it like wss://relay.example.com/jumpgate (no user, query or fragment)",
            jumpgate_proto::sanitize(&text, jumpgate_proto::display::MAX_FIELD_LEN)
        ),
    ))
}

/// A relay id: 1-200 characters, not all blank.
pub fn relay_id(key: &'static str, id: String) -> Result<String, ConfigError> {
    if id.trim().is_empty() || id.len() > 200 {
        return Err(invalid(key, format!("{id:?} must be 1-200 characters")));
    }
    Ok(id)
}
