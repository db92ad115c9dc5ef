//! Targets inside another network namespace, e.g. a container's own network (even
//! `--network none` with sshd on the container's loopback).
//!
//! A socket keeps the network namespace it was created in. So each dial runs a short-lived
//! dedicated thread that enters the namespace (`setns(CLONE_NEWNET)`), creates the socket there
//! and hands it back; tokio then connects it from the agent's own threads. A tokio worker thread
//! never switches namespace, and no thread outlives its dial, so the agent holds no reference to
//! a namespace between connections (a finished container's namespace can go away).

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use tokio::net::{TcpSocket, TcpStream};

/// Where named namespaces live (`ip netns add NAME`).
pub const NAMED_DIR: &str = "/run/netns";

/// Why a network namespace cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path does not exist or cannot be opened.
    #[error(
        "network namespace {path}: {source} (give a named namespace from `ip netns list`, or \
         /proc/PID/ns/net of a running process in the container)"
    )]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// Why opening it failed.
        source: io::Error,
    },
    /// The file is some other kind of file or namespace.
    #[error(
        "{path} is not a network namespace (expected /proc/PID/ns/net or a file under {NAMED_DIR})"
    )]
    NotNetns {
        /// The file.
        path: PathBuf,
    },
    /// The agent lacks the privilege to enter it.
    #[error(
        "the agent may not enter network namespace {path}: entering another process's network \
         namespace needs CAP_SYS_ADMIN (run the agent as root, or grant it with \
         AmbientCapabilities=CAP_SYS_ADMIN and CapabilityBoundingSet=CAP_SYS_ADMIN in its systemd \
         unit; for /proc/PID/ns/net of another user's process also CAP_SYS_PTRACE)"
    )]
    Denied {
        /// The namespace file.
        path: PathBuf,
    },
    /// Anything else setns or the dial thread reported.
    #[error("cannot enter network namespace {path}: {source}")]
    Other {
        /// The namespace file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

impl From<NetnsError> for io::Error {
    fn from(e: NetnsError) -> Self {
        let kind = match &e {
            NetnsError::Open { source, .. } => source.kind(),
            NetnsError::Denied { .. } => io::ErrorKind::PermissionDenied,
            NetnsError::NotNetns { .. } => io::ErrorKind::InvalidInput,
            NetnsError::Other { source, .. } => source.kind(),
        };
        io::Error::new(kind, e.to_string())
    }
}

/// Turns a service's `netns=` value into the namespace file: a value with a `/` is a path
/// (`/proc/PID/ns/net`), anything else the name of a namespace under [`NAMED_DIR`].
pub fn resolve(value: &str) -> Result<PathBuf, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err("netns is empty; give /proc/PID/ns/net or the name of a namespace".into());
    }
    if value.contains('/') {
        if !value.starts_with('/') {
            return Err(format!("netns path {value:?} must be absolute"));
        }
        return Ok(PathBuf::from(value));
    }
    if value == "." || value == ".." {
        return Err(format!("{value:?} is not a namespace name"));
    }
    Ok(Path::new(NAMED_DIR).join(value))
}

/// Enters the network namespace at `path` on the calling thread. Only ever called on a thread
/// that exists for this purpose.
fn enter(path: &Path) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::PermissionDenied => NetnsError::Denied {
            path: path.to_path_buf(),
        },
        _ => NetnsError::Open {
            path: path.to_path_buf(),
            source,
        },
    })?;
    // SAFETY: setns only reads the descriptor, which `file` keeps open for the call; it changes
    // the calling thread's network namespace, and only dedicated threads call this.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::EPERM) => NetnsError::Denied {
            path: path.to_path_buf(),
        },
        Some(libc::EINVAL) => NetnsError::NotNetns {
            path: path.to_path_buf(),
        },
        _ => NetnsError::Other {
            path: path.to_path_buf(),
            source: err,
        },
    })
}

/// Runs `work` on a fresh thread inside the namespace at `path` and returns its result.
fn in_namespace<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> std::thread::Result<Result<T, NetnsError>> {
    let owned = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("netns-dial".into())
        .spawn(move || {
            enter(&owned)?;
            work().map_err(|source| NetnsError::Other {
                path: owned.clone(),
                source,
            })
        });
    match spawned {
        Ok(handle) => handle.join(),
        Err(source) => Ok(Err(NetnsError::Other {
            path: path.to_path_buf(),
            source,
        })),
    }
}

/// Checks at startup that `path` exists, is a network namespace and that the agent may enter it.
pub fn check(path: &Path) -> Result<(), NetnsError> {
    match in_namespace(path, || Ok(())) {
        Ok(result) => result,
        Err(_) => Err(NetnsError::Other {
            path: path.to_path_buf(),
            source: io::Error::other("the namespace check thread panicked"),
        }),
    }
}

/// Connects to `addr` from inside the network namespace at `path`: the socket is created on a
/// dedicated thread inside the namespace, then connected here on the runtime.
pub async fn connect(path: &Path, addr: SocketAddr) -> io::Result<TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let owned = path.to_path_buf();
    // The thread blocks only for open + setns + socket, all local system calls; it is not a
    // runtime thread, so the runtime never runs in the wrong namespace.
    let spawned = std::thread::Builder::new()
        .name("netns-dial".into())
        .spawn(move || {
            let made = enter(&owned).map_err(io::Error::from).and_then(|()| {
                if addr.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
            });
            let _ = tx.send(made);
        });
    if let Err(e) = spawned {
        return Err(io::Error::other(format!(
            "cannot start a netns dial thread: {e}"
        )));
    }
    let socket = rx
        .await
        .map_err(|_| io::Error::other("the netns dial thread ended without an answer"))??;
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_resolve_to_namespace_files() {
        assert_eq!(
            resolve("/proc/42/ns/net").unwrap(),
            PathBuf::from("/proc/42/ns/net")
        );
        assert_eq!(resolve("job7").unwrap(), PathBuf::from("/run/netns/job7"));
        for bad in ["", "  ", "..", "proc/1/ns/net"] {
            assert!(resolve(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn missing_and_wrong_files_are_named() {
        let e = check(Path::new("/run/netns/jumpgate-no-such-namespace")).unwrap_err();
        assert!(matches!(e, NetnsError::Open { .. }), "{e}");
        assert!(e.to_string().contains("jumpgate-no-such-namespace"), "{e}");
        // A file that is not a namespace: setns says EINVAL (or EPERM without the capability).
        let e = check(Path::new("/proc/self/status")).unwrap_err();
        assert!(
            matches!(e, NetnsError::NotNetns { .. } | NetnsError::Denied { .. }),
            "{e}"
        );
    }
}
