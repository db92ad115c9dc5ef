//! Operator commands that talk to a running relay's admin API: `tunnels` and `ssh-config`; the
//! jump listener's own commands are in [`jump`].

pub mod jump;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, HOST};
use hyper::{Request, StatusCode};
use jumpgate_config::read_secret_file;
use jumpgate_proto::Secret;
use tokio::net::TcpStream;

use crate::admin::TunnelView;
use crate::config::{Purpose, RunArgs};
use crate::http_client::{exchange, ExchangeError};
use crate::RelayConfig;

/// Time to connect to the admin API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the whole answer once connected.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read (the tunnel list of a very busy relay is a few MiB).
const MAX_ANSWER: usize = 64 << 20;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad flags or config file.
    #[error(transparent)]
    Config(#[from] jumpgate_config::ConfigError),
    /// The admin token file is unusable.
    #[error(transparent)]
    Secret(#[from] jumpgate_config::SecretFileError),
    /// The admin endpoint is turned off.
    #[error("the admin endpoint is off (admin = \"off\"); these commands need it")]
    AdminOff,
    /// The relay could not be reached.
    #[error("cannot reach the relay's admin API at {addr}: {source}; is relay-server running, and is --admin right?")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The relay answered with an error.
    #[error("admin API answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Its message.
        body: String,
    },
    /// The answer was not the expected JSON.
    #[error("unexpected answer from the admin API: {0}")]
    Decode(String),
    /// The admin token cannot be sent in a header (it holds a line break or another control
    /// character). The message names the file, never the token.
    #[error("the admin token in {0} holds characters an HTTP header cannot carry")]
    BadToken(PathBuf),
}

/// GETs `path` from the admin API named by the relay's flags/config file. The operator commands
/// are synchronous; the request runs on a small runtime of its own.
fn get(args: &RunArgs, path: &str) -> Result<String, CliError> {
    let config = RelayConfig::load(args.clone(), Purpose::Inspect)?;
    let addr = config.admin.ok_or(CliError::AdminOff)?;
    let token = match config.settings.admin_token_file {
        Some(file) => {
            let token = read_secret_file(&file, false)?;
            Some(bearer(&token).ok_or(CliError::BadToken(file))?)
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CliError::Connect { addr, source })?;
    runtime.block_on(get_from(addr, path, token))
}

/// `Authorization: Bearer <token>`, marked sensitive so that no Debug output shows it.
fn bearer(token: &Secret) -> Option<HeaderValue> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose())).ok()?;
    value.set_sensitive(true);
    Some(value)
}

async fn get_from(
    addr: SocketAddr,
    path: &str,
    token: Option<HeaderValue>,
) -> Result<String, CliError> {
    let connect = |source| CliError::Connect { addr, source };
    let timed_out = |what: &str, limit: Duration| {
        let why = format!("no {what} within {limit:?}");
        connect(std::io::Error::new(std::io::ErrorKind::TimedOut, why))
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out("connection", CONNECT_TIMEOUT))?
        .map_err(connect)?;
    let mut request = Request::get(path).header(HOST, addr.to_string());
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, token);
    }
    let request = request
        .body(Full::default())
        .map_err(|e| CliError::Decode(e.to_string()))?;
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, exchange(tcp, request, Some(MAX_ANSWER)))
        .await
        .map_err(|_| timed_out("answer", ANSWER_TIMEOUT))?
        .map_err(|e| match e {
            ExchangeError::Http(e) if e.is_parse() => CliError::Decode(e.to_string()),
            ExchangeError::TooLarge(_) => CliError::Decode(e.to_string()),
            e => connect(std::io::Error::other(e)),
        })?;
    let body = String::from_utf8_lossy(&answer.body).into_owned();
    if answer.status != StatusCode::OK {
        return Err(CliError::Status {
            status: answer.status.as_u16(),
            body: body.trim().to_string(),
        });
    }
    Ok(body)
}

fn fetch_tunnels(args: &RunArgs) -> Result<Vec<TunnelView>, CliError> {
    let body = get(args, "/api/tunnels")?;
    serde_json::from_str(&body).map_err(|e| CliError::Decode(e.to_string()))
}

/// Human-readable byte counts.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

/// What `check-config` checks beyond the settings themselves: the credential files they name
/// (tokens file, join key: contents and modes), as a start would, without creating anything.
pub fn check_files(config: &RelayConfig) -> Result<(), crate::RelayError> {
    crate::policy::Policy::check_files(config)?;
    crate::jump::check_files(config)?;
    Ok(())
}

/// `relay-server tunnels`: a table of every leased port.
pub fn tunnels(args: &RunArgs) -> Result<String, CliError> {
    let rows = fetch_tunnels(args)?;
    let mut out = format!(
        "{:<24} {:<10} {:>6}  {:<10} {:<25} {:>7} {:>10} {:>10}  RELAYS\n",
        "AGENT", "SERVICE", "PORT", "STATE", "SINCE / LEASE UNTIL", "STREAMS", "UP", "DOWN"
    );
    for t in rows {
        let (state, when) = if t.connected {
            ("connected", t.connected_since.unwrap_or_default())
        } else {
            ("away", t.lease_expires_at.unwrap_or_default())
        };
        out.push_str(&format!(
            "{:<24} {:<10} {:>6}  {:<10} {:<25} {:>7} {:>10} {:>10}  {}\n",
            t.agent,
            t.service,
            t.port,
            state,
            when,
            t.active_streams,
            bytes(t.bytes_up),
            bytes(t.bytes_down),
            t.relays.join(",")
        ));
    }
    Ok(out)
}

/// `relay-server ssh-config --router`: one block that reaches agents by name via the router.
pub fn ssh_config_router(
    args: &RunArgs,
    pattern: &str,
    user: Option<&str>,
) -> Result<String, CliError> {
    let router = RelayConfig::load(args.clone(), Purpose::Inspect)?
        .router_address()
        .ok_or(CliError::Config(jumpgate_config::ConfigError::Missing {
            key: "router_listen",
            hint:
                "the relay has no router; set router_listen (--router-listen) to use name routing",
        }))?;
    let mut out = format!(
        "# Generated by `relay-server ssh-config --router`: reach any agent by name.\n\
         Host {pattern}\n    ProxyCommand nc -X connect -x {router} %h %p\n"
    );
    if let Some(user) = user {
        out.push_str(&format!("    User {user}\n"));
    }
    Ok(out)
}

/// `relay-server ssh-config`: `Host` blocks for every live tunnel, ready for `Include` in
/// ~/.ssh/config. A service named `ssh` is `Host <agent>`; others are `Host <agent>.<service>`.
pub fn ssh_config(args: &RunArgs, user: Option<&str>) -> Result<String, CliError> {
    let mut out =
        String::from("# Generated by `relay-server ssh-config`; live jumpgate tunnels.\n");
    for t in fetch_tunnels(args)?.into_iter().filter(|t| t.connected) {
        let host = if t.service == "ssh" {
            t.agent.clone()
        } else {
            format!("{}.{}", t.agent, t.service)
        };
        out.push_str(&format!(
            "\nHost {host}\n    HostName {}\n    Port {}\n",
            t.host, t.port
        ));
        if let Some(user) = user {
            out.push_str(&format!("    User {user}\n"));
        }
    }
    Ok(out)
}

/// `relay-server mint-token`: a signed join token for one agent name (or `prefix-*`), printed
/// with a newline, for the platform to hand to a job's agent (`--token-file` / `JUMPGATE_TOKEN`).
/// Its audience, issuer and longest lifetime are the relay's (from `--config`), or `--audience`
/// and `--issuer`; a `--ttl` longer than the relay would accept is refused here already.
pub fn mint_token(args: &crate::config::MintTokenArgs) -> Result<String, CliError> {
    let usage = |key: &'static str, detail: String| {
        CliError::from(jumpgate_config::ConfigError::Invalid { key, detail })
    };
    let ttl = jumpgate_config::parse_duration(&args.ttl).map_err(|detail| usage("ttl", detail))?;
    // The relay's own rules when its configuration is at hand; the flags win.
    let relay = match &args.config {
        Some(file) => {
            let run = RunArgs {
                config: Some(file.clone()),
                ..RunArgs::default()
            };
            Some(RelayConfig::load(run, Purpose::Inspect)?.join)
        }
        None => None,
    };
    let unknown = crate::join::JoinRules::default_audience(crate::config::UNKNOWN_PUBLIC_HOST);
    let audience = args
        .audience
        .clone()
        .or_else(|| relay.as_ref().map(|r| r.audience.clone()))
        .filter(|a| *a != unknown)
        .ok_or(jumpgate_config::ConfigError::Missing {
            key: "audience",
            hint: "pass --audience with the relay's join_audience (by default \
                   jumpgate:PUBLIC_HOST), or --config with a relay configuration that sets \
                   join_audience or public_host",
        })?;
    let issuer = args
        .issuer
        .clone()
        .or_else(|| relay.as_ref().and_then(|r| r.issuer.clone()));
    let max_lifetime = relay
        .as_ref()
        .map_or(crate::join::DEFAULT_MAX_LIFETIME, |r| r.max_lifetime);
    let rules = crate::join::JoinRules::new(Some(audience), issuer, max_lifetime, "")?;
    match crate::join::mint(&args.key, &args.name, ttl, &rules) {
        Ok(token) => Ok(format!("{token}\n")),
        Err(crate::join::MintError::Name(detail)) => Err(usage("name", detail)),
        Err(crate::join::MintError::Key(e)) => Err(e.into()),
        Err(crate::join::MintError::Secret(e)) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot server: reads the request head, sends `answer`, returns the head.
    async fn admin_stub(answer: &'static str) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(s.read(&mut byte).await.unwrap(), 1);
                head.push(byte[0]);
            }
            s.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(head).unwrap()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn sends_the_token_and_returns_the_body_or_the_status() {
        let token = bearer(&Secret::new("tok-123")).unwrap();
        let (addr, head) = admin_stub("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n[]\n").await;
        let body = get_from(addr, "/api/tunnels", Some(token.clone()))
            .await
            .unwrap();
        assert_eq!(body, "[]\n");
        let head = head.await.unwrap();
        assert!(head.starts_with("GET /api/tunnels HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains("\r\nAuthorization: Bearer tok-123\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\nHost: {addr}\r\n")), "{head}");

        let (addr, _) = admin_stub(
            "HTTP/1.1 401 Unauthorized\r\nContent-Length: 30\r\n\r\nmissing or wrong bearer token\n",
        )
        .await;
        let err = get_from(addr, "/api/tunnels", Some(token))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "admin API answered 401: missing or wrong bearer token"
        );

        let (addr, _) = admin_stub("SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
        let err = get_from(addr, "/api/tunnels", None).await.unwrap_err();
        assert!(matches!(err, CliError::Decode(_)), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_relay_says_where_and_what_to_check() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = get_from(addr, "/api/tunnels", None).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot reach the relay's admin API at {addr}: Connection refused (os error 111); is relay-server running, and is --admin right?")
        );
    }

    #[test]
    fn the_token_never_shows() {
        let value = bearer(&Secret::new("tok-123")).unwrap();
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("tok-123"));
        // A token with a line break cannot become a header (nor smuggle one in).
        assert!(bearer(&Secret::new("tok\r\nX-Evil: 1")).is_none());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.token");
        std::fs::write(&file, "s3cret\nX-Evil: 1\n").unwrap();
        let args = RunArgs {
            admin: Some("127.0.0.1:7001".into()),
            admin_token_file: Some(file.clone()),
            ..RunArgs::default()
        };
        let err = tunnels(&args).unwrap_err();
        assert!(
            matches!(&err, CliError::BadToken(f) if *f == file),
            "{err:?}"
        );
        let (text, debug) = (err.to_string(), format!("{err:?}"));
        assert!(
            !text.contains("s3cret") && !debug.contains("s3cret"),
            "{text} {debug}"
        );
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(3 << 30), "3.0GiB");
    }
}
