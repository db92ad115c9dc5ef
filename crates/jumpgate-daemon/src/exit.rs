//! Exit codes, following sysexits(3) so that systemd units and scripts can tell a broken config
//! (do not restart) from a transient failure (restart).

use std::process::ExitCode;

/// Why a jumpgate process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Clean stop.
    Ok,
    /// Runtime failure that a restart may fix.
    Failure,
    /// Bad flags or config file (EX_USAGE).
    Usage,
    /// A data file (lease file) is corrupt (EX_DATAERR).
    DataErr,
    /// A file or port the process needs is unavailable (EX_UNAVAILABLE... used for bind errors).
    Unavailable,
    /// Credentials refused or the peer's identity rejected (EX_NOPERM).
    NoPerm,
    /// A service the process needs (the lease store's database) is down for now; try again
    /// later (EX_TEMPFAIL), which systemd's `Restart=on-failure` does.
    TempFail,
}

impl ExitStatus {
    /// The numeric code.
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Ok => 0,
            ExitStatus::Failure => 1,
            ExitStatus::Usage => 64,
            ExitStatus::DataErr => 65,
            ExitStatus::Unavailable => 69,
            ExitStatus::TempFail => 75,
            ExitStatus::NoPerm => 77,
        }
    }
}

impl From<ExitStatus> for ExitCode {
    fn from(s: ExitStatus) -> Self {
        ExitCode::from(s.code())
    }
}

/// Parses command-line arguments with clap, but exits with [`ExitStatus::Usage`] (64) on bad
/// flags instead of clap's 2, so every configuration mistake has the same code.
pub fn parse_args<T: clap::Parser>() -> T {
    T::try_parse().unwrap_or_else(|e| {
        let code = if e.use_stderr() {
            ExitStatus::Usage.code()
        } else {
            0
        };
        let _ = e.print();
        std::process::exit(i32::from(code));
    })
}
