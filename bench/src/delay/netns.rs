//! Where the delay line lives: the worker namespace and the TUN devices, made with `ip` and
//! the TUN ioctl, and their removal on every exit path (drop, a killed earlier run, a signal).

use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Prefix of the namespaces this module creates (followed by the pid).
pub(super) const NS_PREFIX: &str = "jgb-w-";
/// Namespaces alive in this process, for the signal handler.
pub(super) static ACTIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Runs `ip ARGS` and fails with its stderr.
pub(super) fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// Runs `program ARGS` and fails with its stderr, so a setup step that fails says why.
pub(super) fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Why the delay line cannot run here, if it cannot (not root, no /dev/net/tun, no `ip`).
pub fn unavailable() -> Option<String> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if let Err(e) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        return Some(format!("cannot open /dev/net/tun: {e}"));
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Some(format!(
                "`ip netns list` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return Some(format!("iproute2 `ip` not found: {e}")),
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        });
    if uid.as_deref() != Some("0") {
        return Some("not root (network namespaces and TUN devices need CAP_NET_ADMIN)".into());
    }
    None
}

/// Opens a TUN device (IP packets without the packet-information header) named `name` in the
/// current network namespace. The device lives as long as the returned file.
#[allow(unsafe_code)]
pub(super) fn open_tun(name: &str) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    // struct ifreq: the interface name (IFNAMSIZ bytes, NUL-terminated), then a union whose first
    // member here is `short ifr_flags`.
    let mut ifr = [0u8; std::mem::size_of::<libc::ifreq>()];
    let name_len = name.len();
    if name_len >= libc::IFNAMSIZ {
        bail!("interface name {name:?} is too long");
    }
    ifr[..name_len].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    ifr[libc::IFNAMSIZ..libc::IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `ifr` is a buffer of exactly
    // `size_of::<libc::ifreq>()` bytes that outlives the call (the kernel copies it in and out,
    // no alignment needed), and the descriptor is open for as long as `file` lives.
    let rc = unsafe {
        use std::os::fd::AsRawFd;
        libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr())
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("TUNSETIFF {name}"));
    }
    Ok(file)
}

/// Deletes the namespace (after killing whatever still runs in it) on drop.
pub(super) struct NsGuard(pub(super) Option<String>);

impl Drop for NsGuard {
    fn drop(&mut self) {
        if let Some(ns) = self.0.take() {
            remove_netns(&ns);
            if let Ok(mut a) = ACTIVE.lock() {
                a.retain(|n| *n != ns);
            }
        }
    }
}

/// SIGKILLs every process in `ns` and deletes it (best effort; used on every exit path).
fn remove_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !pids.is_empty() {
            let _ = Command::new("kill").arg("-9").args(&pids).output();
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Removes namespaces left by runs that were killed before they could clean up (their pid is
/// gone or is no longer this benchmark).
pub(super) fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let alive = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().starts_with("jumpgate-bench"))
            .unwrap_or(false);
        if !alive {
            eprintln!("removing stale namespace {name}");
            remove_netns(&name);
        }
    }
}

/// Root-namespace IPv4 addresses, to pick a /30 nobody uses.
pub(super) fn used_v4() -> Vec<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet")?;
            w.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// On SIGINT or SIGTERM, kills the benchmark's child processes, removes the namespaces of live
/// delay lines and exits (the TUN devices go with the process), so an interrupted run leaves
/// nothing behind.
pub fn install_signal_cleanup(rt: &tokio::runtime::Runtime) {
    rt.spawn(async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        crate::proc::kill_all();
        let names: Vec<String> = ACTIVE.lock().map(|a| a.clone()).unwrap_or_default();
        for ns in names {
            eprintln!("interrupted: removing namespace {ns}");
            remove_netns(&ns);
        }
        std::process::exit(130);
    });
}
