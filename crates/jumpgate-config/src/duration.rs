//! Durations in config files and flags: `30s`, `10m`, `24h`, `2d`, `500ms`, or a plain number of
//! seconds.

use std::convert::Infallible;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::file::ConfigError;

/// Parses a human duration; the error says what forms are accepted.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("{text:?} is not a duration; use e.g. 500ms, 30s, 10m, 24h or 2d");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs).ok_or_else(bad);
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => Err(bad()),
    }
}

/// A duration as TOML may hold it: an integer (seconds) or a string with a unit. A flag's text is
/// kept as written ([`FromStr`] never fails) and checked with the file's values in the validation
/// pass, so a bad duration is reported the same way, naming its key, wherever it came from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    /// Whole seconds.
    Seconds(u64),
    /// Text such as `24h`.
    Text(String),
}

impl DurationValue {
    /// The duration, or a message naming the bad value.
    pub fn to_duration(&self) -> Result<Duration, String> {
        match self {
            DurationValue::Seconds(s) => Ok(Duration::from_secs(*s)),
            DurationValue::Text(t) => parse_duration(t),
        }
    }
}

/// A flag's value, kept as text until validation.
impl FromStr for DurationValue {
    type Err = Infallible;

    fn from_str(s: &str) -> Result<Self, Infallible> {
        Ok(DurationValue::Text(s.to_string()))
    }
}

/// Text, as a flag would give it (for building settings in code and tests).
impl From<&str> for DurationValue {
    fn from(s: &str) -> Self {
        DurationValue::Text(s.to_string())
    }
}

/// The duration set for `key`, or `default` when no layer set one; a bad value names `key`.
pub fn duration_setting(
    key: &'static str,
    value: Option<DurationValue>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    value.map_or(Ok(default), |v| {
        v.to_duration()
            .map_err(|detail| ConfigError::Invalid { key, detail })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172800)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn settings_default_and_name_their_key() {
        let d = Duration::from_secs(5);
        assert_eq!(duration_setting("k", None, d).unwrap(), d);
        let v = Some(DurationValue::Seconds(7));
        assert_eq!(duration_setting("k", v, d).unwrap(), Duration::from_secs(7));
        let v = Some("2m".parse().unwrap());
        assert_eq!(
            duration_setting("k", v, d).unwrap(),
            Duration::from_secs(120)
        );
        let err = duration_setting("lease_ttl", Some("soon".into()), d).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid lease_ttl: \"soon\""),
            "{err}"
        );
    }
}
