//! Rules for agent and service names.
//!
//! Names end up in log lines, file names, JSON, metrics labels and `Host` blocks of an ssh config,
//! so they are restricted to characters that are safe in all of those.

/// Longest accepted agent or service name.
pub const MAX_NAME_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{what} name is empty")]
    Empty {
        /// "agent" or "service".
        what: &'static str,
    },
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("{what} name is {len} characters long; at most {MAX_NAME_LEN} are allowed")]
    TooLong {
        /// "agent" or "service".
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// The name has a character outside `[A-Za-z0-9._-]` or does not start with a letter/digit.
    #[error("{what} name {name:?} may only contain letters, digits, '.', '_' and '-', and must start with a letter or digit")]
    BadChar {
        /// "agent" or "service".
        what: &'static str,
        /// The offending name (names are not secret).
        name: String,
    },
}

/// Checks an agent or service name; `what` says which, for the error message.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            what,
            len: name.len(),
        });
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let starts_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if !starts_ok || !name.chars().all(ok_char) {
        return Err(NameError::BadChar {
            what,
            name: name.chars().take(MAX_NAME_LEN).collect(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_typical_names() {
        for n in ["vh-exec-123", "worker.eu-1", "ssh", "a", "A_b.c-9"] {
            assert_eq!(validate_name("agent", n), Ok(()), "{n}");
        }
    }

    #[test]
    fn refuses_unsafe_names() {
        for n in ["", "-lead", ".hidden", "a b", "a/b", "ä", "x\n"] {
            assert!(validate_name("agent", n).is_err(), "{n:?}");
        }
        assert!(matches!(
            validate_name("agent", &"a".repeat(65)),
            Err(NameError::TooLong { len: 65, .. })
        ));
    }
}
