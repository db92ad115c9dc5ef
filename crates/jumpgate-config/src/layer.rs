//! One definition per setting, for flags and file alike.
//!
//! Each binary declares its settings once, with [`settings!`](crate::settings): one struct that
//! clap fills from the command line and serde from the TOML file (same names; the file uses
//! underscores where flags use dashes). [`layered`] lays the flags over the file, and the binary's
//! one validation pass turns the result into its typed configuration, applying a default where
//! neither layer set a value. Values stay as written until that pass, so a bad value is reported
//! the same way, naming its key, whether it came from a flag or from the file.

use std::path::Path;

use serde::de::{DeserializeOwned, Deserializer};
use serde::Deserialize;

use crate::file::{load_toml, ConfigError};

/// A layer of settings that can be laid over a lower one: whatever this layer sets wins.
pub trait Merge {
    /// `self` over `lower`.
    fn merge(self, lower: Self) -> Self;
}

/// A single value: set in this layer, or else whatever the lower layer says.
impl<T> Merge for Option<T> {
    fn merge(self, lower: Self) -> Self {
        self.or(lower)
    }
}

/// A repeatable setting: a layer that gives any entries replaces the lower layer's whole list
/// (`--allow-cidr` on the command line replaces the file's list rather than adding to it).
impl<T> Merge for Vec<T> {
    fn merge(self, lower: Self) -> Self {
        if self.is_empty() {
            lower
        } else {
            self
        }
    }
}

/// A switch (a flag without a value, such as `--no-port`): on in either layer is on.
impl Merge for bool {
    fn merge(self, lower: Self) -> Self {
        self || lower
    }
}

/// The settings in `flags` laid over those of the TOML `file`, if one is named. Unknown keys in
/// the file are refused (the struct should use `deny_unknown_fields`), naming the key.
pub fn layered<T>(flags: T, file: Option<&Path>) -> Result<T, ConfigError>
where
    T: Merge + DeserializeOwned + Default,
{
    let file = match file {
        Some(path) => load_toml(path)?,
        None => T::default(),
    };
    Ok(flags.merge(file))
}

/// Declares a settings struct exactly as written and implements [`Merge`] for it, field by
/// field, so that adding a setting is one field in one place (its flag, its file key and its
/// layering come with it).
///
/// ```
/// jumpgate_config::settings! {
///     /// Example settings.
///     #[derive(Debug, Default, serde::Deserialize)]
///     pub struct Example {
///         /// A value.
///         pub listen: Option<String>,
///         /// A list.
///         pub allow: Vec<String>,
///     }
/// }
/// use jumpgate_config::layer::Merge;
/// let flags = Example { listen: Some("flag".into()), allow: vec![] };
/// let file = Example { listen: Some("file".into()), allow: vec!["x".into()] };
/// let merged = flags.merge(file);
/// assert_eq!((merged.listen.as_deref(), merged.allow.len()), (Some("flag"), 1));
/// ```
#[macro_export]
macro_rules! settings {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                $field_vis:vis $field:ident : $ty:ty
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $(
                $(#[$field_meta])*
                $field_vis $field : $ty,
            )*
        }

        impl $crate::layer::Merge for $name {
            fn merge(self, lower: Self) -> Self {
                Self {
                    $( $field: $crate::layer::Merge::merge(self.$field, lower.$field), )*
                }
            }
        }
    };
}

/// Reads a setting that the file may give as one string or as a list of them (`server`,
/// `fingerprint`), for `#[serde(deserialize_with = "...")]`.
pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::settings! {
        /// Settings of a made-up binary.
        #[derive(Debug, Default, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        struct Sample {
            #[serde(skip)]
            config: Option<std::path::PathBuf>,
            listen: Option<String>,
            lease_ttl: Option<u64>,
            #[serde(deserialize_with = "one_or_many")]
            server: Vec<String>,
            no_port: bool,
        }
    }

    fn file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn flag_beats_file_beats_nothing() {
        let (_dir, p) =
            file("listen = \"file\"\nlease_ttl = 7\nserver = \"a:1\"\nno_port = true\n");
        let flags = Sample {
            listen: Some("flag".into()),
            ..Sample::default()
        };
        let s = layered(flags, Some(&p)).unwrap();
        assert_eq!(s.listen.as_deref(), Some("flag"));
        assert_eq!(s.lease_ttl, Some(7));
        assert_eq!(s.server, ["a:1"]);
        assert!(s.no_port);

        let flags = Sample {
            server: vec!["b:2".into(), "c:3".into()],
            ..Sample::default()
        };
        let s = layered(flags, Some(&p)).unwrap();
        assert_eq!(s.server, ["b:2", "c:3"], "a flag list replaces the file's");
        assert_eq!(s.listen.as_deref(), Some("file"));

        let s = layered(Sample::default(), None).unwrap();
        assert_eq!((s.listen, s.lease_ttl, s.no_port), (None, None, false));
    }

    #[test]
    fn unknown_and_flag_only_keys_are_named() {
        let (_dir, p) = file("listne = \"x\"\n");
        let err = layered(Sample::default(), Some(&p))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listne") && err.contains("c.toml"), "{err}");
        // `config` is a flag only: a file cannot name another file.
        let (_dir, p) = file("config = \"other.toml\"\n");
        let err = layered(Sample::default(), Some(&p))
            .unwrap_err()
            .to_string();
        assert!(err.contains("config"), "{err}");
    }

    #[test]
    fn lists_take_one_string_or_many() {
        let (_dir, p) = file("server = [\"a:1\", \"b:2\"]\n");
        let s = layered(Sample::default(), Some(&p)).unwrap();
        assert_eq!(s.server, ["a:1", "b:2"]);
    }
}
