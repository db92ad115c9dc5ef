//! Where the local API listens: its settings (socket, group, state directory), checked at
//! start-up, and binding the socket with the mode and group that let the group's members in.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use tokio::net::UnixListener;

use super::{DEFAULT_SOCKET, DEFAULT_STATE_DIR};

/// The API's validated settings.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// The socket to listen on.
    pub socket: PathBuf,
    /// The group (name, gid) the socket belongs to and whose members may call.
    pub group: Option<(String, u32)>,
    /// Where registered tunnels persist.
    pub state_dir: PathBuf,
}

impl ApiSettings {
    /// Settings from the flags, resolving the group name (or number) now so a typo stops the
    /// agent at start-up.
    pub fn new(
        socket: Option<PathBuf>,
        group: Option<String>,
        state_dir: Option<PathBuf>,
    ) -> Result<Self, String> {
        let group = match group {
            Some(name) => Some((name.clone(), group_id(&name)?)),
            None => None,
        };
        Ok(Self {
            socket: socket.unwrap_or_else(|| DEFAULT_SOCKET.into()),
            group,
            state_dir: state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        })
    }
}

/// The gid of group `name` (a number is taken as a gid), through the system's NSS.
pub(super) fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let unknown = || {
        format!("no group named {name:?} on this host; create it (groupadd {name}) or give an existing group or gid")
    };
    let cname = std::ffi::CString::new(name).map_err(|_| unknown())?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: getgrnam_r writes only into `grp` and `buf` (whose length it is given) and sets
    // `result` to null or to `&grp`; nothing is read from them unless it returned 0 with a
    // non-null result.
    #[allow(unsafe_code)]
    let gid = unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        (rc == 0 && !result.is_null()).then_some(grp.gr_gid)
    };
    gid.ok_or_else(unknown)
}

/// Binds the API socket: its directory created if missing, a stale socket replaced, mode 0660
/// and group `settings.group`.
pub fn bind(settings: &ApiSettings) -> Result<UnixListener, String> {
    let path = &settings.socket;
    let fail =
        |what: &str, e: std::io::Error| format!("API socket {}: {what}: {e}", path.display());
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| fail("cannot create its directory", e))?;
            // Reachable by the group's members whatever the umask; the socket's own mode and
            // the peer check decide who may call.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| fail("cannot set its directory's mode", e))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path).map_err(|e| fail("cannot replace the stale socket", e))?;
        }
        Ok(_) => {
            return Err(format!(
                "API socket {}: a file that is not a socket is in the way; remove it or pick another --api-socket",
                path.display()
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| fail("cannot listen", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| fail("cannot set its mode", e))?;
    if let Some((name, gid)) = &settings.group {
        std::os::unix::fs::chown(path, None, Some(*gid))
            .map_err(|e| fail(&format!("cannot give it to group {name}"), e))?;
    }
    Ok(listener)
}
