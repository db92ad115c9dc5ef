//! The API's bodies as JSON: the request to add a tunnel, a tunnel as answers show it, and the
//! error answer every failure becomes (with the status that says which).

use std::path::PathBuf;

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::BODY_LIMIT;
use crate::host::{RelayTunnel, TunnelView};
use crate::service::ServiceSpec;
use crate::status::Endpoint;

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

pub(super) fn error(status: StatusCode, kind: &str, text: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorJson {
            error: text.into(),
            kind: kind.into(),
        }),
    )
        .into_response()
}

pub(super) fn bad_request(text: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", text)
}

/// A JSON extractor rejection as a JSON error naming what is wrong.
pub(super) fn rejection(r: JsonRejection) -> Response {
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
