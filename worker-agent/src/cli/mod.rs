//! `worker-agent tunnel ...`: the host agent's local API from a shell or a platform's job
//! hooks. Credentials come from files only, never from argv.
//!
//! Exit codes: 0 done; 1 refused by the relays, or no such tunnel; 64 bad arguments or a
//! request the API rejected; 69 the API socket cannot be reached (no host agent running);
//! 75 registered but no relay placed it yet (it stays registered and is placed when a relay
//! answers); 77 this user may not use the API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use jumpgate_daemon::ExitStatus;

use crate::host::api::{AddRequest, ErrorJson, TunnelJson, DEFAULT_SOCKET};

/// `worker-agent tunnel`: add, remove, list and show a host agent's tunnels.
#[derive(Debug, Args)]
pub struct TunnelArgs {
    /// The host agent's API socket.
    #[arg(long, value_name = "PATH", env = "JUMPGATE_AGENT_API", default_value = DEFAULT_SOCKET, global = true)]
    pub api_socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub action: TunnelAction,
}

/// The tunnel calls.
#[derive(Debug, Subcommand)]
pub enum TunnelAction {
    /// Register a job's tunnel; prints `SERVICE enabled on HOST:PORT` once the relays placed it.
    Add {
        /// The tunnel's name (the job's), e.g. vh-exec-123.
        name: String,
        /// Service, NAME=HOST:PORT[@PREFERRED[!]][,netns=NS] (repeatable).
        #[arg(long, required = true, value_name = "SPEC")]
        service: Vec<String>,
        /// File holding the job's join token (read here and sent over the socket).
        #[arg(long, value_name = "FILE")]
        join_token_file: Option<PathBuf>,
        /// OpenSSH public keys (one per line) that alone may reach the tunnel through `ssh -J`.
        #[arg(long, value_name = "FILE")]
        jump_authorized_keys: Option<PathBuf>,
    },
    /// Remove a tunnel from every relay.
    #[command(alias = "remove")]
    Rm {
        /// The tunnel's name.
        name: String,
        /// Free its ports at once (else they stay leased to the name for a while).
        #[arg(long)]
        release: bool,
    },
    /// List the tunnels (a table; --json for programs).
    #[command(alias = "list")]
    Ls {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one tunnel, per relay.
    Show {
        /// The tunnel's name.
        name: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A failed call: what to print and the exit status.
struct Failed(ExitStatus, String);

/// Runs a `tunnel` command and returns the process's exit code.
pub fn run(args: TunnelArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("worker-agent: cannot start: {e}");
            return ExitStatus::Failure.into();
        }
    };
    match runtime.block_on(call(&args)) {
        Ok(()) => ExitStatus::Ok.into(),
        Err(Failed(status, text)) => {
            eprintln!("worker-agent: {text}");
            status.into()
        }
    }
}

async fn call(args: &TunnelArgs) -> Result<(), Failed> {
    let socket = &args.api_socket;
    match &args.action {
        TunnelAction::Add {
            name,
            service,
            join_token_file,
            jump_authorized_keys,
        } => {
            let token = match join_token_file {
                Some(path) => Some(read_token(path)?),
                None => None,
            };
            let jump_keys = crate::jump_keys::read(jump_authorized_keys.as_deref())
                .map_err(|e| Failed(ExitStatus::Usage, e.to_string()))?;
            let body = AddRequest {
                name: name.clone(),
                services: service.clone(),
                token,
                token_file: None,
                jump_keys,
            };
            let body = serde_json::to_vec(&body)
                .map_err(|e| Failed(ExitStatus::Failure, e.to_string()))?;
            let (status, bytes) = request(socket, Method::POST, "/v1/tunnels", Some(body)).await?;
            let tunnel: TunnelJson = parse(status, &bytes)?;
            for ep in &tunnel.endpoints {
                match &ep.via_router {
                    Some(router) if ep.port == 0 => println!("{} enabled via {router}", ep.name),
                    _ => println!("{} enabled on {}:{}", ep.name, host_port(&ep.host), ep.port),
                }
            }
            if status == StatusCode::ACCEPTED {
                return Err(Failed(
                    ExitStatus::TempFail,
                    format!("tunnel {name:?} is registered but no relay placed it yet (none connected or none answered); it is placed when a relay answers: see `worker-agent tunnel show {name}`"),
                ));
            }
            Ok(())
        }
        TunnelAction::Rm { name, release } => {
            let path = format!("/v1/tunnels/{name}?release={release}");
            let (status, bytes) = request(socket, Method::DELETE, &path, None).await?;
            let _: TunnelJson = parse(status, &bytes)?;
            println!("tunnel {name} removed");
            Ok(())
        }
        TunnelAction::Ls { json } => {
            let (status, bytes) = request(socket, Method::GET, "/v1/tunnels", None).await?;
            let tunnels: Vec<TunnelJson> = parse(status, &bytes)?;
            if *json {
                print_json(&tunnels);
            } else {
                print!("{}", table(&tunnels));
            }
            Ok(())
        }
        TunnelAction::Show { name, json } => {
            let path = format!("/v1/tunnels/{name}");
            let (status, bytes) = request(socket, Method::GET, &path, None).await?;
            let tunnel: TunnelJson = parse(status, &bytes)?;
            if *json {
                print_json(&tunnel);
            } else {
                print!("{}", describe(&tunnel));
            }
            Ok(())
        }
    }
}

fn read_token(path: &Path) -> Result<String, Failed> {
    jumpgate_config::read_secret_file(path, true)
        .map(|s| s.expose().to_string())
        .map_err(|e| Failed(ExitStatus::Usage, format!("--join-token-file: {e}")))
}

fn host_port(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("worker-agent: {e}"),
    }
}

/// `tunnel ls`: one line per tunnel.
fn table(tunnels: &[TunnelJson]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "SERVICES".to_string(),
        "ENDPOINTS".to_string(),
        "RELAYS".to_string(),
    ]];
    for t in tunnels {
        let services: Vec<String> = t
            .services
            .iter()
            .map(|s| format!("{}={}", s.name, s.target))
            .collect();
        let endpoints: Vec<String> = t
            .endpoints
            .iter()
            .map(|e| format!("{}={}:{}", e.name, host_port(&e.host), e.port))
            .collect();
        let placed = t.relays.iter().filter(|r| r.state == "placed").count();
        rows.push([
            t.name.clone(),
            services.join(","),
            if endpoints.is_empty() {
                "-".into()
            } else {
                endpoints.join(",")
            },
            format!("{placed}/{} placed", t.relays.len()),
        ]);
    }
    let widths: Vec<usize> = (0..4)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `tunnel show`: the tunnel per relay.
fn describe(t: &TunnelJson) -> String {
    let mut out = format!("tunnel {}\n", t.name);
    for s in &t.services {
        let ns = s
            .netns
            .as_ref()
            .map(|n| format!(" (network namespace {n})"))
            .unwrap_or_default();
        out.push_str(&format!("  service {} -> {}{ns}\n", s.name, s.target));
    }
    for r in &t.relays {
        out.push_str(&format!("  relay {}: {}", r.relay, r.state));
        for e in &r.endpoints {
            out.push_str(&format!(
                ", {} on {}:{}",
                e.name,
                host_port(&e.host),
                e.port
            ));
        }
        if let Some(reason) = &r.reason {
            out.push_str(&format!(" ({reason})"));
        }
        out.push('\n');
    }
    out
}

/// The answer's JSON when the status is a success, else the API's error as a [`Failed`].
fn parse<T: serde::de::DeserializeOwned>(status: StatusCode, bytes: &[u8]) -> Result<T, Failed> {
    if status.is_success() {
        return serde_json::from_slice(bytes).map_err(|e| {
            Failed(
                ExitStatus::Failure,
                format!("unexpected answer from the host agent: {e}"),
            )
        });
    }
    let text = serde_json::from_slice::<ErrorJson>(bytes)
        .map(|e| e.error)
        .unwrap_or_else(|_| {
            format!(
                "HTTP {status}: {}",
                jumpgate_proto::sanitize(&String::from_utf8_lossy(bytes), 300)
            )
        });
    let exit = match status {
        StatusCode::FORBIDDEN => ExitStatus::NoPerm,
        StatusCode::CONFLICT | StatusCode::NOT_FOUND => ExitStatus::Failure,
        s if s.is_client_error() => ExitStatus::Usage,
        _ => ExitStatus::Failure,
    };
    Err(Failed(exit, text))
}

/// One HTTP/1.1 request on the API socket.
async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), Failed> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied => return Failed(
                    ExitStatus::NoPerm,
                    format!("may not use the host agent's API at {}: {e}; run as root, as the agent's user or as a member of its --api-group", socket.display()),
                ),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    "is the host agent (worker-agent --host-mode) running? pass --api-socket if it listens elsewhere"
                }
                _ => "pass --api-socket if the host agent listens elsewhere",
            };
            Failed(
                ExitStatus::Unavailable,
                format!("cannot reach the host agent's API at {}: {e}; {hint}", socket.display()),
            )
        })?;
    let unavailable = |e: &dyn std::fmt::Display| {
        Failed(
            ExitStatus::Unavailable,
            format!("the host agent's API at {} failed: {e}", socket.display()),
        )
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unavailable(&e))?;
    tokio::spawn(conn);
    let has_body = body.is_some();
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost");
    if has_body {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| Failed(ExitStatus::Usage, format!("bad request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unavailable(&e))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| unavailable(&e))?
        .to_bytes();
    Ok((status, bytes))
}
