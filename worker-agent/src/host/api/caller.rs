//! Who is at the other end of an API connection (the kernel's peer credentials) and whether
//! they may call: the check on top of the socket's own mode and group.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use axum::serve::IncomingStream;
use tokio::net::{UnixListener, UnixStream};

/// The supplementary groups of the process at the other end of `stream` (SO_PEERGROUPS, as
/// they were when it connected).
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `groups` and stores the length used.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
    groups
}

/// Who is at the other end of a connection (SO_PEERCRED, SO_PEERGROUPS).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// User id; `None` when the kernel would not say.
    pub uid: Option<u32>,
    /// Primary group id.
    pub gid: Option<u32>,
    /// Process id.
    pub pid: Option<i32>,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, UnixListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        let io = stream.io();
        match io.peer_cred() {
            Ok(cred) => Caller {
                uid: Some(cred.uid()),
                gid: Some(cred.gid()),
                pid: cred.pid(),
                groups: peer_groups(io),
            },
            Err(_) => Caller::default(),
        }
    }
}

/// Who may call: root, the agent's own user, members of the API group.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The agent's effective uid.
    pub own_uid: u32,
    /// The API group's gid.
    pub group: Option<u32>,
}

impl Policy {
    /// Whether `caller` may use the API.
    pub fn allows(&self, caller: &Caller) -> bool {
        let Some(uid) = caller.uid else {
            return false;
        };
        if uid == 0 || uid == self.own_uid {
            return true;
        }
        match self.group {
            Some(g) => caller.gid == Some(g) || caller.groups.contains(&g),
            None => false,
        }
    }
}

/// The agent's effective uid (the owner of its /proc entry), for [`Policy::own_uid`].
pub fn own_uid() -> u32 {
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}
