//! The host agent's local API: HTTP/JSON on a Unix socket, for the platform that adds a job's
//! tunnel when the job starts and removes it when it ends (`worker-agent tunnel ...` is its
//! command-line client).
//!
//! | call | body / answer |
//! |---|---|
//! | `POST /v1/tunnels` | [`AddRequest`] -> 200 [`TunnelJson`] placed; 202 registered, no relay answered yet; 409 refused |
//! | `GET /v1/tunnels` | `[TunnelJson]` |
//! | `GET /v1/tunnels/NAME` | [`TunnelJson`] or 404 |
//! | `DELETE /v1/tunnels/NAME?release=true` | [`TunnelJson`] (what it was) or 404 |
//!
//! Errors are `{"error": "...", "kind": "..."}` with a status saying which (400 bad request,
//! 403 caller not allowed, 404, 409 refused by the relays, 413 body over 64 KiB, 415 not JSON,
//! 500 the state directory failed).
//!
//! Who may call: the socket is mode 0660 with group `--api-group`; on top of that every
//! connection's peer credentials (SO_PEERCRED, and SO_PEERGROUPS for supplementary groups) must
//! be root, the agent's own user or a member of that group, else 403. Each call is logged with
//! the caller's uid, gid and pid.
//!
//! Served with axum on hyper, as the relay's admin API is.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::store::{Record, Store};
use super::{HostHandle, RelayTunnel, TunnelError, TunnelSpec, TunnelView};
use crate::service::ServiceSpec;
use crate::status::Endpoint;

/// Default socket path (systemd's `RuntimeDirectory=jumpgate-agent`).
pub const DEFAULT_SOCKET: &str = "/run/jumpgate-agent/api.sock";
/// Default state directory (systemd's `StateDirectory=jumpgate-agent`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/jumpgate-agent";
/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

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
fn group_id(name: &str) -> Result<u32, String> {
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

/// A tunnel to add.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// The tunnel's name (the job's), e.g. `vh-exec-123`.
    pub name: String,
    /// Services, `NAME=HOST:PORT[@PREFERRED[!]][,netns=NS]` each.
    pub services: Vec<String>,
    /// The job's credential (normally its signed join token), inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Or a file (0600) the agent reads it from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// OpenSSH public keys that alone may reach the tunnel through `ssh -J`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jump_keys: Vec<String>,
}

/// Debug output without the credential.
impl std::fmt::Debug for AddRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddRequest")
            .field("name", &self.name)
            .field("services", &self.services)
            .field("token", &self.token.as_ref().map(|_| "<secret>"))
            .field("token_file", &self.token_file)
            .field("jump_keys", &self.jump_keys.len())
            .finish()
    }
}

/// One service of a tunnel, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceJson {
    /// Service name.
    pub name: String,
    /// Target HOST:PORT.
    pub target: String,
    /// Network namespace the target is dialled from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// A public endpoint of a service, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointJson {
    /// Service name.
    pub name: String,
    /// Relay's public host.
    pub host: String,
    /// Public port (0 when reachable only through the router).
    pub port: u16,
    /// `router host:port as agent-name`, for services without a port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_router: Option<String>,
}

impl From<&Endpoint> for EndpointJson {
    fn from(e: &Endpoint) -> Self {
        EndpointJson {
            name: e.name.clone(),
            host: e.host.clone(),
            port: e.port,
            via_router: e.via_router.clone(),
        }
    }
}

fn endpoints(list: &[Endpoint]) -> Vec<EndpointJson> {
    list.iter().map(EndpointJson::from).collect()
}

/// Where a tunnel stands on one relay, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayJson {
    /// The relay.
    pub relay: String,
    /// `registering`, `placed`, `refused`, `retrying` or `disconnected`.
    pub state: String,
    /// Its endpoints there, when placed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointJson>,
    /// Why it is not placed there, when refused or retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A tunnel as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelJson {
    /// The tunnel's name.
    pub name: String,
    /// Its services.
    pub services: Vec<ServiceJson>,
    /// Every endpoint the relays placed it on, each once.
    pub endpoints: Vec<EndpointJson>,
    /// Per relay.
    pub relays: Vec<RelayJson>,
}

impl From<&TunnelView> for TunnelJson {
    fn from(view: &TunnelView) -> Self {
        TunnelJson {
            name: view.name.clone(),
            services: view.services.iter().map(service_json).collect(),
            endpoints: endpoints(&view.endpoints()),
            relays: view
                .relays
                .iter()
                .map(|r| {
                    let (state, endpoints, reason) = match &r.state {
                        RelayTunnel::Registering => ("registering", vec![], None),
                        RelayTunnel::Placed { endpoints: list } => {
                            ("placed", endpoints(list), None)
                        }
                        RelayTunnel::Refused { reason } => {
                            ("refused", vec![], Some(reason.clone()))
                        }
                        RelayTunnel::Retrying { reason } => {
                            ("retrying", vec![], Some(reason.clone()))
                        }
                        RelayTunnel::Disconnected => ("disconnected", vec![], None),
                    };
                    RelayJson {
                        relay: r.relay.clone(),
                        state: state.into(),
                        endpoints,
                        reason,
                    }
                })
                .collect(),
        }
    }
}

fn service_json(s: &ServiceSpec) -> ServiceJson {
    ServiceJson {
        name: s.name.clone(),
        target: s.target.clone(),
        netns: s.netns.as_ref().map(|p| p.display().to_string()),
    }
}

/// An error answer: `{"error": ..., "kind": ...}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorJson {
    /// What is wrong and what to do.
    pub error: String,
    /// A word for programs: `bad_request`, `forbidden`, `not_found`, `refused`, `too_large`, ...
    pub kind: String,
}

fn error(status: StatusCode, kind: &str, text: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorJson {
            error: text.into(),
            kind: kind.into(),
        }),
    )
        .into_response()
}

fn bad_request(text: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", text)
}

/// A JSON extractor rejection as a JSON error naming what is wrong.
fn rejection(r: JsonRejection) -> Response {
    let status = r.status();
    let kind = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "not_json",
        _ => "bad_request",
    };
    let text = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("request body over {BODY_LIMIT} bytes; a tunnel request is a few hundred")
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            "send the body as JSON with Content-Type: application/json".to_string()
        }
        _ => format!(
            "{}; expected {{\"name\": \"vh-exec-123\", \"services\": [\"ssh=172.17.0.5:22\"], \"token\": \"...\" or \"token_file\": \"/path\", \"jump_keys\": [...]}}",
            r.body_text()
        ),
    };
    // 422 (well-formed JSON of the wrong shape) is still the caller's bad request.
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    error(status, kind, text)
}

#[derive(Clone)]
struct ApiState {
    handle: HostHandle,
    store: Arc<Store>,
    policy: Policy,
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

/// The agent's effective uid (the owner of its /proc entry), for [`Policy::own_uid`].
pub fn own_uid() -> u32 {
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

/// Serves the API on `listener` until `stop` fires.
pub async fn serve(
    listener: UnixListener,
    handle: HostHandle,
    store: Arc<Store>,
    policy: Policy,
    stop: CancellationToken,
) {
    let state = ApiState {
        handle,
        store,
        policy,
    };
    let app = Router::new()
        .route("/v1/tunnels", get(list).post(add))
        .route("/v1/tunnels/{name}", get(show).delete(remove))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such API path; the API is /v1/tunnels and /v1/tunnels/NAME",
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), check_caller))
        .with_state(state);
    let app = app.into_make_service_with_connect_info::<Caller>();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!("local API stopped: {e}");
    }
}

/// Lets only allowed callers through; logs every call with who made it.
async fn check_caller(
    State(state): State<ApiState>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    request: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let path = jumpgate_proto::sanitize(&path, 200).into_owned();
    if !state.policy.allows(&caller) {
        tracing::warn!(uid = ?caller.uid, gid = ?caller.gid, pid = ?caller.pid, %method, %path, "local API call refused: caller is not root, the agent's user nor in its API group");
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this user may not use the host agent's API: run as root, as the agent's user, or as a member of its --api-group",
        );
    }
    tracing::info!(uid = ?caller.uid, gid = ?caller.gid, pid = ?caller.pid, %method, %path, "local API call");
    next.run(request).await
}

async fn list(State(state): State<ApiState>) -> Json<Vec<TunnelJson>> {
    Json(state.handle.list().iter().map(TunnelJson::from).collect())
}

async fn show(State(state): State<ApiState>, UrlPath(name): UrlPath<String>) -> Response {
    match state.handle.get(&name) {
        Some(view) => Json(TunnelJson::from(&view)).into_response(),
        None => not_found(&name),
    }
}

fn not_found(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        TunnelError::NotFound(jumpgate_proto::sanitize(name, 100).into_owned()).to_string(),
    )
}

/// `?release=true`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    #[serde(default)]
    release: bool,
}

async fn remove(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    query: Result<Query<RemoveQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return bad_request("the only query parameter is release=true|false");
    };
    if jumpgate_proto::validate_name("tunnel", &name).is_err() {
        return not_found(&name);
    }
    let removed = state.handle.remove(&name, query.release);
    // The record goes whatever the table said: a tunnel that is not there must not come back.
    if let Err(e) = state.store.remove(&name) {
        tracing::error!(tunnel = %name, "{e}");
        return error(StatusCode::INTERNAL_SERVER_ERROR, "state", e.to_string());
    }
    match removed {
        Ok(view) => {
            tracing::info!(tunnel = %name, release = query.release, "tunnel removed");
            Json(TunnelJson::from(&view)).into_response()
        }
        Err(_) => not_found(&name),
    }
}

/// Turns a request into the tunnel to add and the record to keep, or a 400 saying why.
async fn prepare(request: AddRequest) -> Result<(TunnelSpec, Record), Response> {
    let token = match (request.token, &request.token_file) {
        (Some(_), Some(_)) => {
            return Err(bad_request(
                "give the credential as token or as token_file, not both",
            ))
        }
        (Some(t), None) if t.trim().is_empty() => return Err(bad_request("token is empty")),
        (Some(t), None) => Some(t.trim().to_string()),
        (None, Some(path)) => match jumpgate_config::read_secret_file(path, true) {
            Ok(secret) => Some(secret.expose().to_string()),
            Err(e) => return Err(bad_request(format!("token_file: {e}"))),
        },
        (None, None) => None,
    };
    let record = Record {
        name: request.name,
        services: request.services,
        token,
        jump_keys: request.jump_keys,
    };
    let spec = record.spec().map_err(bad_request)?;
    super::validate(&spec).map_err(|e| bad_request(e.to_string()))?;
    // A namespace that is not there, or that the agent may not enter, is refused now rather
    // than on the first user's connection.
    for service in &spec.services {
        if let Some(ns) = service.netns.clone() {
            let checked = tokio::task::spawn_blocking(move || crate::netns::check(&ns)).await;
            match checked {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(bad_request(format!("service {:?}: {e}", service.name))),
                Err(e) => return Err(bad_request(format!("netns check failed: {e}"))),
            }
        }
    }
    Ok((spec, record))
}

async fn add(
    State(state): State<ApiState>,
    body: Result<Json<AddRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(r)) => r,
        Err(r) => return rejection(r),
    };
    let (spec, record) = match prepare(request).await {
        Ok(ok) => ok,
        Err(answer) => return answer,
    };
    let name = spec.name.clone();
    // Persisted before any relay hears of it, so the answer never promises a tunnel a crash
    // would lose.
    if let Err(e) = state.store.save(&record) {
        tracing::error!(tunnel = %name, "{e}");
        return error(StatusCode::INTERNAL_SERVER_ERROR, "state", e.to_string());
    }
    match state.handle.add(spec).await {
        Ok(view) => {
            tracing::info!(tunnel = %name, "tunnel added");
            Json(TunnelJson::from(&view)).into_response()
        }
        Err(TunnelError::Timeout { view, .. }) => {
            tracing::warn!(tunnel = %name, "tunnel registered; no relay placed it yet");
            (StatusCode::ACCEPTED, Json(TunnelJson::from(view.as_ref()))).into_response()
        }
        Err(e) => {
            // Refused (or invalid): not kept, so not persisted either.
            if let Err(e) = state.store.remove(&name) {
                tracing::error!(tunnel = %name, "{e}");
            }
            let (status, kind) = match &e {
                TunnelError::Refused { .. } => (StatusCode::CONFLICT, "refused"),
                TunnelError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
                _ => (StatusCode::BAD_REQUEST, "bad_request"),
            };
            tracing::warn!(tunnel = %name, "{e}");
            error(status, kind, e.to_string())
        }
    }
}

/// Re-adds every persisted tunnel (at start-up), each in its own task so that one relay's
/// slowness delays none of the others; a record every relay refuses for good is dropped.
pub fn restore(handle: &HostHandle, store: &Arc<Store>, stop: &CancellationToken) -> usize {
    let records = match store.load_all() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot restore tunnels: {e}");
            return 0;
        }
    };
    let mut n = 0;
    for record in records {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e}");
                continue;
            }
        };
        let spec = match record.spec() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(tunnel = %record.name, "persisted tunnel not restored: {e}");
                continue;
            }
        };
        n += 1;
        let (handle, store, stop) = (handle.clone(), store.clone(), stop.clone());
        tokio::spawn(async move {
            let name = spec.name.clone();
            tokio::select! {
                _ = stop.cancelled() => {}
                r = handle.add(spec) => match r {
                    Ok(_) => tracing::info!(tunnel = %name, "tunnel restored"),
                    Err(TunnelError::Timeout { .. }) => {
                        tracing::info!(tunnel = %name, "tunnel restored; placed once a relay answers");
                    }
                    Err(e) => {
                        tracing::warn!(tunnel = %name, "persisted tunnel dropped: {e}");
                        if let Err(e) = store.remove(&name) {
                            tracing::error!(tunnel = %name, "{e}");
                        }
                    }
                },
            }
        });
    }
    n
}

/// The state directory's tunnel store.
pub fn open_store(state_dir: &Path) -> Result<Arc<Store>, String> {
    Store::open(state_dir)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, gid: u32, groups: &[u32]) -> Caller {
        Caller {
            uid: Some(uid),
            gid: Some(gid),
            pid: Some(1),
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn only_root_the_agent_and_the_group_may_call() {
        let policy = Policy {
            own_uid: 990,
            group: Some(4242),
        };
        assert!(policy.allows(&caller(0, 0, &[])));
        assert!(policy.allows(&caller(990, 990, &[])));
        assert!(policy.allows(&caller(1000, 4242, &[])));
        assert!(policy.allows(&caller(1000, 1000, &[27, 4242])));
        assert!(!policy.allows(&caller(1000, 1000, &[27])));
        assert!(!policy.allows(&Caller::default()));
        let no_group = Policy {
            own_uid: 990,
            group: None,
        };
        assert!(!no_group.allows(&caller(1000, 4242, &[4242])));
    }

    #[test]
    fn groups_resolve_by_name_and_number() {
        assert_eq!(group_id("root"), Ok(0));
        assert_eq!(group_id("4242"), Ok(4242));
        let e = group_id("jumpgate-no-such-group").unwrap_err();
        assert!(e.contains("groupadd"), "{e}");
    }

    #[test]
    fn requests_hide_their_token() {
        let r: AddRequest = serde_json::from_str(
            r#"{"name":"vh-1","services":["ssh=127.0.0.1:22"],"token":"s3cret"}"#,
        )
        .unwrap();
        assert!(!format!("{r:?}").contains("s3cret"));
    }
}
