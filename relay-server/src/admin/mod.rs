//! The operators' HTTP endpoint: health, readiness, Prometheus metrics and a JSON API over the
//! live tunnels. Bound to loopback by default; anywhere else it requires a bearer token.
//! Endpoints that change the relay (anything but GET and HEAD, e.g. `DELETE /api/agents/NAME`)
//! always require the token, also on loopback: every local user can reach 127.0.0.1.

mod scrape;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use jumpgate_daemon::prometheus;
use jumpgate_proto::Secret;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agents::registry::Registry;
use crate::audit::{timestamp, AuditLog};
use crate::leases::{LeaseStore, StoreError};
use crate::metrics::Metrics;
use crate::users::ports::Ports;
use crate::webhook::Webhooks;

/// What the operator API needs: read access to sessions, leases and counters, and the two
/// actions it offers (disconnect, release).
pub(crate) struct Operator {
    /// Live sessions.
    pub registry: Arc<Registry>,
    /// Leases.
    pub leases: Arc<LeaseStore>,
    /// Kept ports, closed when their lease is released.
    pub ports: Arc<Ports>,
    /// Event counters.
    pub metrics: Arc<Metrics>,
    /// For its dropped-record count.
    pub audit: Arc<AuditLog>,
    /// For its dropped-event count.
    pub webhooks: Arc<Webhooks>,
    /// The host users connect to, shown with every tunnel.
    pub public_host: String,
    /// Fired on SIGTERM: readiness turns false.
    pub shutdown: CancellationToken,
    /// Signs short-lived jump certificates (`POST /api/jump/certificates`), with `jump_ca_key`.
    pub jump_signer: Arc<crate::jump::SignerSlot>,
    /// Whether the last scrape could not read the per-credential gauges, so a failing store is
    /// logged once per streak, not once per scrape.
    pub credential_gauges_failing: std::sync::atomic::AtomicBool,
}

/// One agent as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentView {
    /// Agent name.
    pub name: String,
    /// Its address as the relay sees it.
    pub remote: String,
    /// When the session began (RFC 3339).
    pub connected_since: String,
    /// How it authenticated.
    pub credential: String,
    /// Its services.
    pub services: Vec<ServiceView>,
    /// For a tunnel registered over a host session: the host agent's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// A service of a connected agent.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceView {
    /// Service name.
    pub name: String,
    /// Public port.
    pub port: u16,
    /// Port of the target behind the agent.
    pub target_port: u16,
}

/// One tunnel (a leased port), live or waiting for its agent.
#[derive(Debug, Serialize, Deserialize)]
pub struct TunnelView {
    /// Agent name.
    pub agent: String,
    /// Service name.
    pub service: String,
    /// Host users connect to.
    pub host: String,
    /// Public port.
    pub port: u16,
    /// Whether the agent is connected now.
    pub connected: bool,
    /// The agent's address, while connected.
    pub remote: Option<String>,
    /// Since when, while connected.
    pub connected_since: Option<String>,
    /// User connections open now.
    pub active_streams: usize,
    /// User connections carried in this session.
    pub total_streams: u64,
    /// Bytes from users, this session.
    pub bytes_up: u64,
    /// Bytes to users, this session.
    pub bytes_down: u64,
    /// When the lease expires if the agent stays away (RFC 3339); none while connected.
    pub lease_expires_at: Option<String>,
    /// The fleet's relays holding a session with the agent now (ids; with the file store, this
    /// relay while the agent is connected to it).
    #[serde(default)]
    pub relays: Vec<String>,
    /// For a tunnel registered over a host session, while connected: the host agent's name
    /// (`host` is taken by the address users connect to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_agent: Option<String>,
}

/// Answer to `DELETE /api/agents/{agent}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DisconnectView {
    /// Agent name.
    pub agent: String,
    /// Whether a live session was closed.
    pub disconnected: bool,
    /// Ports released back to the pool (with `?release=true`).
    pub released_ports: Vec<u16>,
}

#[derive(Clone)]
struct AdminState {
    shared: Arc<Operator>,
    token: Option<Arc<Secret>>,
}

/// Serves the admin API on `listener` until `stop` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Operator>,
    token: Option<Secret>,
    stop: CancellationToken,
) {
    let state = AdminState {
        shared,
        token: token.map(Arc::new),
    };
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/agents", get(agents))
        .route("/api/agents/{agent}", axum::routing::delete(disconnect))
        .route("/api/tunnels", get(tunnels))
        .route("/api/tunnels/{agent}", get(agent_tunnels))
        .route(
            "/api/jump/certificates",
            axum::routing::post(sign_jump_certificate),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(api)
        .with_state(state);
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!("admin API stopped: {e}");
    }
}

async fn require_token(
    State(state): State<AdminState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let read_only = matches!(*req.method(), Method::GET | Method::HEAD);
    match &state.token {
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())) {
                return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n")
                    .into_response();
            }
        }
        // Loopback is every local user's: reading is fine, changing the relay is not.
        None if !read_only => {
            return (
                StatusCode::FORBIDDEN,
                "changing the relay through the admin API needs a token: set admin_token_file \
                 (--admin-token-file) and send it as Authorization: Bearer TOKEN\n",
            )
                .into_response();
        }
        None => {}
    }
    next.run(req).await
}

/// `POST /api/jump/certificates`: signs {public_key, names, lifetime, key_id?} with the
/// operator's SSH CA; the answer holds the certificate. Every signing is logged with its key id,
/// names, lifetime and the caller's address.
async fn sign_jump_certificate(
    State(state): State<AdminState>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<std::net::SocketAddr>,
    body: Result<Json<crate::jump::sign::SignRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(signer) = state.shared.jump_signer.current() else {
        return (
            StatusCode::NOT_FOUND,
            "this relay signs no jump certificates: set jump_ca_key (--jump-ca-key FILE) or pass the systemd credential jump-ca-key\n",
        )
            .into_response();
    };
    let Json(request) = match body {
        Ok(body) => body,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "{}; send JSON {{\"public_key\": \"ssh-ed25519 AAAA...\", \"names\": [\"job-1\"], \"lifetime\": \"8h\", \"key_id\": \"alice\"}}\n",
                    e.body_text()
                ),
            )
                .into_response()
        }
    };
    let now = std::time::SystemTime::now();
    match signer.sign(&request, now) {
        Ok(signed) => {
            let who = format!("admin API caller {caller}");
            tracing::info!("{}", signed.audit(&who));
            state
                .shared
                .audit
                .record_certificate(signed.audit_record(&who, now));
            Json(signed).into_response()
        }
        Err(crate::jump::sign::SignError::Request(why)) => {
            tracing::info!(%caller, "jump certificate refused: {why}");
            (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response()
        }
        Err(e) => {
            tracing::error!(%caller, "jump certificate: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.shared.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

fn agent_views(shared: &Operator) -> Vec<AgentView> {
    let mut views: Vec<AgentView> = shared
        .registry
        .all()
        .iter()
        .map(|s| AgentView {
            name: s.name.to_string(),
            remote: s.remote.to_string(),
            connected_since: timestamp(s.connected_at),
            credential: s.credential.to_string(),
            host: s.tunnel.as_ref().map(|t| t.host.to_string()),
            services: s
                .services
                .iter()
                .map(|e| ServiceView {
                    name: e.name.to_string(),
                    port: e.port,
                    target_port: e.target_port,
                })
                .collect(),
        })
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    views
}

/// Every leased port, joined with its live session if there is one.
async fn tunnel_views(shared: &Operator) -> Result<Vec<TunnelView>, StoreError> {
    let host = &shared.public_host;
    let leases = shared
        .leases
        .views()
        .await?
        .into_iter()
        .map(|v| (v.key.agent, v.key.service, v.port, v.expires_at));
    let sessions = shared.leases.sessions().await?;
    let router_only: Vec<(String, String, u16, Option<u64>)> = shared
        .registry
        .all()
        .iter()
        .flat_map(|s| {
            s.services
                .iter()
                .filter(|e| e.port == 0)
                .map(|e| (s.name.to_string(), e.name.to_string(), 0, None))
                .collect::<Vec<_>>()
        })
        .collect();
    Ok(leases
        .chain(router_only)
        .map(|(agent, service, port, expires)| {
            let session = shared.registry.get(&agent);
            let endpoint = session.as_ref().and_then(|s| {
                s.services
                    .iter()
                    .find(|e| *e.name == *service && e.port == port)
            });
            let stats = endpoint.map(|e| &e.stats);
            TunnelView {
                connected: endpoint.is_some(),
                remote: endpoint.and(session.as_ref()).map(|s| s.remote.to_string()),
                connected_since: endpoint
                    .and(session.as_ref())
                    .map(|s| timestamp(s.connected_at)),
                active_streams: stats.map_or(0, |s| s.active.load(Ordering::Relaxed)),
                total_streams: stats.map_or(0, |s| s.total.load(Ordering::Relaxed)),
                bytes_up: stats.map_or(0, |s| s.bytes.read.load(Ordering::Relaxed)),
                bytes_down: stats.map_or(0, |s| s.bytes.written.load(Ordering::Relaxed)),
                lease_expires_at: expires.map(|t| timestamp(UNIX_EPOCH + Duration::from_secs(t))),
                relays: sessions.get(&agent).cloned().unwrap_or_default(),
                host_agent: endpoint
                    .and(session.as_ref())
                    .and_then(|s| s.tunnel.as_ref())
                    .map(|t| t.host.to_string()),
                agent,
                service,
                host: host.clone(),
                port,
            }
        })
        .collect())
}

/// The answer when the lease store cannot be read.
fn store_unavailable(e: StoreError) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
}

async fn agents(State(state): State<AdminState>) -> Json<Vec<AgentView>> {
    Json(agent_views(&state.shared))
}

async fn tunnels(State(state): State<AdminState>) -> Response {
    match tunnel_views(&state.shared).await {
        Ok(views) => Json(views).into_response(),
        Err(e) => store_unavailable(e),
    }
}

async fn agent_tunnels(State(state): State<AdminState>, Path(agent): Path<String>) -> Response {
    let views = match tunnel_views(&state.shared).await {
        Ok(views) => views,
        Err(e) => return store_unavailable(e),
    };
    let views: Vec<TunnelView> = views.into_iter().filter(|t| t.agent == agent).collect();
    if views.is_empty() {
        return (
            StatusCode::NOT_FOUND,
            format!("no tunnel for agent {agent:?}\n"),
        )
            .into_response();
    }
    Json(views).into_response()
}

#[derive(Deserialize)]
struct DisconnectQuery {
    #[serde(default)]
    release: bool,
}

async fn disconnect(
    State(state): State<AdminState>,
    Path(agent): Path<String>,
    Query(q): Query<DisconnectQuery>,
) -> Response {
    let shared = &state.shared;
    let has_lease = match shared.leases.knows_agent(&agent).await {
        Ok(known) => known,
        Err(e) => return store_unavailable(e),
    };
    let session = shared.registry.get(&agent);
    if session.is_none() && !has_lease {
        return (
            StatusCode::NOT_FOUND,
            format!("no agent or lease named {agent:?}\n"),
        )
            .into_response();
    }
    if let Some(s) = &session {
        tracing::info!(agent = %agent, release = q.release, "disconnecting agent on operator request");
        if let Some(tunnel) = &s.tunnel {
            tunnel.close_because(jumpgate_proto::Refusal::Unavailable {
                detail: "disconnected by the relay's operator".into(),
            });
        }
        s.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.finished.cancelled()).await;
    }
    let released_ports = if q.release {
        let ports = match shared.leases.release(&agent).await {
            Ok(ports) => ports,
            Err(e) => return store_unavailable(e),
        };
        for port in &ports {
            shared.ports.close(*port);
        }
        shared.leases.persist_or_warn().await;
        tracing::info!(agent = %agent, ?ports, "leases released on operator request");
        ports
    } else {
        Vec::new()
    };
    Json(DisconnectView {
        agent,
        disconnected: session.is_some(),
        released_ports,
    })
    .into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let text = scrape::scrape(&state.shared).await;
    ([(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)], text).into_response()
}
