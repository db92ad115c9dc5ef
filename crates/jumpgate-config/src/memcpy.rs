//! Keeps glibc's `memcpy` fast for the large copies a tunnel makes.
//!
//! glibc copies 2 KiB and more with `rep movsb` on x86-64 CPUs that advertise fast string moves.
//! On AMD Zen that instruction falls from about 90 GB/s to 3 GB/s when the destination sits 8 to
//! 48 bytes past the source modulo 4 KiB, and glibc's allocator, which aligns chunks to 16 bytes
//! behind a 16-byte header, produces such pairs all the time. In a bulk transfer one copy of
//! every byte (rustls' received plaintext, yamux's outgoing frame) ran at that speed: 16% of the
//! agent's CPU and 13% of the relay's (BENCHMARKS.md). Vector loops have no such cliff.
//!
//! glibc reads its tunables only when a process starts, so the daemon re-executes itself once,
//! first thing, with `glibc.cpu.x86_rep_movsb_threshold` raised past any size. Whoever sets that
//! tunable in `GLIBC_TUNABLES` keeps their value and no re-execution happens, which is also how to
//! run the binary under a tool such as valgrind: set the tunable yourself. The re-executed process
//! carries a marker so that it never execs again, even where glibc drops the tunable (a binary
//! with file capabilities runs in secure mode, which ignores tunables).

use std::ffi::{OsStr, OsString};

/// The tunable that picks the size from which `memcpy` uses `rep movsb`.
const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";
/// A threshold no copy reaches: vector loops at every size.
const NEVER: &str = "0xffffffffffffffff";
/// Set in the re-executed process's environment.
const MARKER: &str = "JUMPGATE_REEXECUTED";

/// The `GLIBC_TUNABLES` value to re-execute with, or `None` when this process is the re-executed
/// one (`marker` set) or `current` already chooses a threshold (the operator's choice).
#[cfg_attr(
    not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")),
    allow(dead_code)
)]
fn tunables_for_vector_copies(current: Option<&OsStr>, marker: Option<&OsStr>) -> Option<OsString> {
    if marker.is_some() {
        return None;
    }
    let mut value = OsString::new();
    if let Some(current) = current.filter(|c| !c.is_empty()) {
        if current.to_string_lossy().contains(TUNABLE) {
            return None;
        }
        value.push(current);
        value.push(":");
    }
    value.push(format!("{TUNABLE}={NEVER}"));
    Some(value)
}

/// Re-executes the running binary with the same arguments and `rep movsb` turned off, unless
/// `GLIBC_TUNABLES` already chooses a threshold. Call it before reading any file or socket.
/// Returns only when nothing was re-executed, or when that failed (the process then goes on with
/// glibc's defaults: slower copies on some CPUs, nothing else changes).
#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
pub fn reexec_with_vector_copies() {
    use std::os::unix::process::CommandExt;

    let current = std::env::var_os("GLIBC_TUNABLES");
    let marker = std::env::var_os(MARKER);
    let Some(tunables) = tunables_for_vector_copies(current.as_deref(), marker.as_deref()) else {
        return;
    };
    // The resolved path, not /proc/self/exe, so that the process keeps its name (`comm`).
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    // `exec` returns only if it failed.
    let _failed = command
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .env(MARKER, "memcpy")
        .exec();
}

/// Nothing to do where glibc's x86-64 `memcpy` is not in use.
#[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
pub fn reexec_with_vector_copies() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_threshold_to_whatever_is_set() {
        let want = format!("{TUNABLE}={NEVER}");
        assert_eq!(
            tunables_for_vector_copies(None, None),
            Some(want.clone().into())
        );
        assert_eq!(
            tunables_for_vector_copies(Some(OsStr::new("")), None),
            Some(want.clone().into())
        );
        assert_eq!(
            tunables_for_vector_copies(Some(OsStr::new("glibc.malloc.arena_max=2")), None),
            Some(format!("glibc.malloc.arena_max=2:{want}").into())
        );
    }

    #[test]
    fn keeps_a_threshold_already_chosen() {
        let mine = format!("glibc.malloc.arena_max=2:{TUNABLE}=4096");
        assert_eq!(
            tunables_for_vector_copies(Some(OsStr::new(&mine)), None),
            None
        );
    }

    #[test]
    fn never_execs_twice_even_if_glibc_dropped_the_tunable() {
        assert_eq!(
            tunables_for_vector_copies(None, Some(OsStr::new("memcpy"))),
            None
        );
    }
}
