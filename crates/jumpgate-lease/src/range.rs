//! The public port range the relay hands ports out of, as configured (`LO-HI`) and checked
//! once, so the table never has to ask whether its range is empty or starts at port 0.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An inclusive range of public ports the relay may hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    lo: u16,
    hi: u16,
}

/// Why a port range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// Not of the form `LO-HI`.
    #[error("expected LO-HI with ports 1-65535, e.g. 10000-50000; got {0:?}")]
    Syntax(String),
    /// LO is greater than HI, or LO is 0.
    #[error("port range {lo}-{hi} is empty or starts at 0; LO must be 1 or more and at most HI")]
    Empty {
        /// First port.
        lo: u16,
        /// Last port.
        hi: u16,
    },
}

impl PortRange {
    /// A range from `lo` to `hi`, both included.
    pub fn new(lo: u16, hi: u16) -> Result<Self, PortRangeError> {
        if lo == 0 || lo > hi {
            return Err(PortRangeError::Empty { lo, hi });
        }
        Ok(Self { lo, hi })
    }

    /// First port.
    pub fn lo(&self) -> u16 {
        self.lo
    }

    /// Last port.
    pub fn hi(&self) -> u16 {
        self.hi
    }

    /// Whether `port` is inside.
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        usize::from(self.hi - self.lo) + 1
    }

    /// Always false: a range has at least one port. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Every port, in order.
    pub fn ports(&self) -> impl Iterator<Item = u16> {
        self.lo..=self.hi
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || PortRangeError::Syntax(s.to_string());
        let (lo, hi) = s.trim().split_once('-').ok_or_else(syntax)?;
        let lo = lo.trim().parse().map_err(|_| syntax())?;
        let hi = hi.trim().parse().map_err(|_| syntax())?;
        Self::new(lo, hi)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

#[cfg(test)]
mod tests;
