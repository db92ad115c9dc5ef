//! Loading: the written settings laid flag over file, each read by its rule
//! ([`Settings::read`]), then the checks and values that span several settings, giving a
//! [`RelayConfig`].

use std::collections::HashMap;
use std::time::Duration;

use jumpgate_config::{layered, ConfigError};
use jumpgate_lease::PortRange;

use super::{
    advertised, LeaseStoreConfig, Purpose, RelayConfig, RunArgs, Settings, TlsSource,
    UNKNOWN_PUBLIC_HOST,
};

fn invalid(key: &'static str, detail: String) -> ConfigError {
    ConfigError::Invalid { key, detail }
}

impl RelayConfig {
    /// Loads and validates the configuration for running the relay.
    pub fn from_args(args: RunArgs) -> Result<Self, ConfigError> {
        Self::load(args, Purpose::Run)
    }

    /// The one path from flags and file to a configuration: lays `args` over their `--config`
    /// file, applies defaults and validates every setting. Running the relay, SIGHUP reload and
    /// every subcommand come through here, so they all accept and refuse the same settings.
    pub fn load(args: RunArgs, purpose: Purpose) -> Result<Self, ConfigError> {
        let s = Settings::read(layered(args.clone(), args.config.as_deref())?)?;
        let port_range = match (s.port_range, purpose) {
            (Some(range), _) => range,
            (None, Purpose::Inspect) => PortRange::new(1, 65535)
                .map_err(|e| invalid("port_range", e.to_string()))?,
            (None, Purpose::Run) => return Err(ConfigError::Missing {
                key: "port_range",
                hint: "pass --port-range LO-HI (e.g. 10000-50000) or set port_range in the config file",
            }),
        };
        let public_host = match s.public_host.clone() {
            Some(h) => h,
            None if !s.listen.ip().is_unspecified() => s.listen.ip().to_string(),
            None if purpose == Purpose::Inspect => UNKNOWN_PUBLIC_HOST.into(),
            None => return Err(ConfigError::Missing {
                key: "public_host",
                hint: "pass --public-host with the address users connect to (e.g. the jump host's public IP)",
            }),
        };
        let tls =
            match (s.tls_cert.clone(), s.tls_key.clone()) {
                (Some(cert), Some(key)) => TlsSource::Files { cert, key },
                (None, None) => TlsSource::SelfSigned,
                _ => return Err(invalid(
                    "tls_cert/tls_key",
                    "give both --tls-cert and --tls-key, or neither for a self-signed certificate"
                        .into(),
                )),
            };
        heartbeats(s.heartbeat_interval, s.heartbeat_timeout)?;
        if let Some(addr) = s.admin {
            if !addr.ip().is_loopback() && s.admin_token_file.is_none() {
                return Err(invalid(
                    "admin",
                    format!(
                        "{addr} is reachable beyond this machine; set admin_token_file (--admin-token-file) or bind it to 127.0.0.1"
                    ),
                ));
            }
        }
        let webhook = webhook(&s)?;
        let (advertise, peers, peer_ws) = members(&s, &public_host)?;
        let lease_store = lease_store(&s)?;
        let relay_id = s
            .relay_id
            .clone()
            .unwrap_or_else(|| format!("{}/{}", hostname(), s.listen));
        let env_token = match s.token_file {
            Some(_) => None,
            None => jumpgate_config::env_token(),
        };
        let join = crate::join::JoinRules::new(
            s.join_audience.clone(),
            s.join_issuer.clone(),
            s.join_max_lifetime,
            &public_host,
        )?;
        let jump = crate::jump::settings::JumpConfig::from_settings(
            s.jump_listen.clone(),
            s.jump_host_key_file.clone(),
            s.jump_authorized_keys_file.clone(),
            s.jump_trusted_user_ca_keys.clone(),
            s.jump_host_certificate.clone(),
        )?;
        let jump_signing = crate::jump::settings::SigningConfig::from_settings(
            s.jump_ca_key.clone(),
            s.jump_cert_max_lifetime.clone(),
        )?;
        Ok(Self {
            settings: s,
            public_host,
            port_range,
            env_token,
            tls,
            handshake_timeout: Duration::from_secs(10),
            join,
            webhook,
            jump,
            jump_signing,
            advertise,
            peers,
            peer_ws,
            lease_store,
            relay_id,
            source: args,
        })
    }
}

/// A session ends after `timeout` without a heartbeat, so it must be longer than the interval.
fn heartbeats(interval: Duration, timeout: Duration) -> Result<(), ConfigError> {
    if interval.is_zero() || timeout <= interval {
        return Err(invalid(
            "heartbeat_timeout",
            format!(
                "must be longer than heartbeat_interval (got interval {interval:?}, timeout {timeout:?}); a timeout of 3 intervals is usual"
            ),
        ));
    }
    Ok(())
}

/// The webhook: its URL and signing key go together, its CA is optional.
#[allow(clippy::type_complexity)]
fn webhook(
    s: &Settings,
) -> Result<
    Option<(
        crate::webhook::Target,
        std::path::PathBuf,
        Option<std::path::PathBuf>,
    )>,
    ConfigError,
> {
    match (&s.webhook_url, &s.webhook_secret_file) {
        (None, None) => Ok(None),
        (Some(url), Some(secret)) => {
            let target = crate::webhook::Target::parse(url)
                .map_err(|detail| invalid("webhook_url", detail))?;
            Ok(Some((target, secret.clone(), s.webhook_ca.clone())))
        }
        (Some(_), None) => Err(ConfigError::Missing {
            key: "webhook_secret_file",
            hint: "webhooks are signed: set webhook_secret_file (--webhook-secret-file) to a file with the HMAC key",
        }),
        (None, Some(_)) => Err(ConfigError::Missing {
            key: "webhook_url",
            hint: "webhook_secret_file (or the systemd credential webhook-secret) is set but webhook_url is not",
        }),
    }
}

/// `advertise` (checked, `None` for the default of `public_host` and the port of `listen`)
/// and `peers` as listed to agents: each once, this relay left out, with the WebSocket URLs of
/// those that gave one.
type Members = (Option<String>, Vec<String>, HashMap<String, String>);

/// `advertise` and `peers` read and checked ([`Members`]).
fn members(s: &Settings, public_host: &str) -> Result<Members, ConfigError> {
    let member_addr = |key: &'static str, text: &str| {
        jumpgate_proto::member::parse_host_port(text.trim())
            .map(|(host, port)| {
                jumpgate_proto::member::MemberEndpoint {
                    id: String::new(),
                    host,
                    port,
                    ws: None,
                }
                .to_string()
            })
            .ok_or_else(|| {
                invalid(
                    key,
                    format!(
                        "{text:?} is not HOST:PORT ([IPv6]:PORT), e.g. relay-2.example.com:7000"
                    ),
                )
            })
    };
    let listen = s.listen;
    let advertise = match &s.advertise {
        Some(text) => Some(member_addr("advertise", text)?),
        None => {
            // The default takes the port `listen` is bound to; any port checks the host.
            let text = advertised(public_host, listen.port().max(1));
            member_addr("advertise", &text).map_err(|_| {
                invalid(
                    "advertise",
                    format!("the default (public_host {public_host:?} and the port of listen) is not HOST:PORT; set advertise to where agents dial this relay"),
                )
            })?;
            None
        }
    };
    let itself = advertise
        .clone()
        .or_else(|| (listen.port() != 0).then(|| advertised(public_host, listen.port())));
    let mut peers = Vec::new();
    let mut peer_ws = HashMap::new();
    for text in &s.peers {
        let (text, ws) = match text.trim().split_once(char::is_whitespace) {
            Some((addr, ws)) => (addr, Some(ws.trim())),
            None => (text.as_str(), None),
        };
        let peer = member_addr("peers", text)?;
        if let Some(ws) = ws {
            if !jumpgate_proto::member::check_ws_url(ws) {
                let shown = jumpgate_proto::sanitize(ws, jumpgate_proto::display::MAX_FIELD_LEN);
                return Err(invalid(
                    "peers",
                    format!("{peer}: {shown:?} is not a WebSocket URL agents can dial; write \"HOST:PORT wss://HOST/PATH\""),
                ));
            }
            peer_ws.insert(peer.clone(), ws.to_string());
        }
        if Some(&peer) != itself.as_ref() && !peers.contains(&peer) {
            peers.push(peer);
        }
    }
    if peers.len() + 1 > jumpgate_proto::MAX_MEMBERS {
        return Err(invalid(
            "peers",
            format!(
                "{} relays in all; agents keep at most {} sessions",
                peers.len() + 1,
                jumpgate_proto::MAX_MEMBERS
            ),
        ));
    }
    Ok((advertise, peers, peer_ws))
}

/// The lease store: the file, or PostgreSQL with its URL, TLS mode and CA.
fn lease_store(s: &Settings) -> Result<LeaseStoreConfig, ConfigError> {
    match s.lease_store.as_deref().unwrap_or("file") {
        "file" => {
            if s.lease_store_url.is_some() {
                return Err(invalid(
                    "lease_store_url",
                    "is set but lease_store is \"file\"; set lease_store = \"postgres\" to use it"
                        .into(),
                ));
            }
            Ok(LeaseStoreConfig::File)
        }
        "postgres" => {
            let Some(url) = s.lease_store_url.clone() else {
                return Err(ConfigError::Missing {
                    key: "lease_store_url",
                    hint: "lease_store = \"postgres\" needs lease_store_url, e.g. postgres://jumpgate@db.example:5432/jumpgate",
                });
            };
            let default_tls = crate::leases::PgSettings::check_url(&url)
                .map_err(|detail| invalid("lease_store_url", detail))?;
            let tls = match s.lease_store_tls.as_deref() {
                None => default_tls,
                Some("require") => crate::leases::StoreTls::Require,
                Some("disable") => crate::leases::StoreTls::Disable,
                Some(other) => {
                    return Err(invalid(
                        "lease_store_tls",
                        format!("{other:?} is not \"require\" or \"disable\""),
                    ))
                }
            };
            Ok(LeaseStoreConfig::Postgres(crate::leases::PgSettings {
                url,
                password_file: s.lease_store_password_file.clone(),
                tls,
                ca: s.lease_store_ca.clone(),
            }))
        }
        other => Err(invalid(
            "lease_store",
            format!("{other:?} is not \"file\" or \"postgres\""),
        )),
    }
}

/// This machine's host name, for the default `relay_id`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".into())
}
