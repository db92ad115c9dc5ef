//! A string that must never be printed.

use serde::{Deserialize, Serialize};

/// A credential (token) that travels in the hello but never appears in logs or `Debug` output.
///
/// It has no `Display`; the only way to the bytes is [`Secret::expose`], which makes every use
/// site easy to audit.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for comparison or sending; never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the credential is empty (an empty token file is a configuration error).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_the_value() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert!(!format!("{:?}", Some(&s)).contains("hunter2"));
    }
}
