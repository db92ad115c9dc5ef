//! The API's routes: the router with its body limit and caller check, and the handlers that
//! add, list, show and remove tunnels through the host's table and persist them in its store.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::caller::{Caller, Policy};
use super::json::{bad_request, error, rejection, AddRequest, TunnelJson};
use super::BODY_LIMIT;
use crate::host::store::{Record, Store};
use crate::host::{HostHandle, TunnelError, TunnelSpec};

#[derive(Clone)]
struct ApiState {
    handle: HostHandle,
    store: Arc<Store>,
    policy: Policy,
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
    crate::host::validate(&spec).map_err(|e| bad_request(e.to_string()))?;
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
