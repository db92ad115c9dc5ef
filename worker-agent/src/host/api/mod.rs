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
//!
//! The files, by job:
//! - `socket.rs`: where the API listens ([`ApiSettings`]) and binding that socket;
//! - `caller.rs`: who is calling (peer credentials) and whether they may ([`Policy`]);
//! - `json.rs`: the request and answer bodies, and how errors become answers;
//! - `routes.rs`: the router, the caller check and the handlers ([`serve`]);
//! - `restore.rs`: the persisted tunnels, re-added at start-up ([`restore`]).

mod caller;
mod json;
mod restore;
mod routes;
mod socket;
#[cfg(test)]
mod tests;

pub use caller::{own_uid, Caller, Policy};
pub use json::{AddRequest, EndpointJson, ErrorJson, RelayJson, ServiceJson, TunnelJson};
pub use restore::{open_store, restore};
pub use routes::serve;
pub use socket::{bind, ApiSettings};

/// Default socket path (systemd's `RuntimeDirectory=jumpgate-agent`).
pub const DEFAULT_SOCKET: &str = "/run/jumpgate-agent/api.sock";
/// Default state directory (systemd's `StateDirectory=jumpgate-agent`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/jumpgate-agent";
/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;
