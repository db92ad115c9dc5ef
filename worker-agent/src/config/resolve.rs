//! The one validation pass ([`AgentConfig::from_args`]): written settings laid over their file,
//! defaults applied, secrets read and every value checked, alone and against the others, into
//! the [`AgentConfig`] the agent runs with.

use std::path::PathBuf;

use jumpgate_config::secret_file::check_private;
use jumpgate_config::{credential, or_credential, parse_list, read_secret_file, ConfigError};
use jumpgate_proto::{validate_name, Cidr};
use jumpgate_transport::tls::Fingerprint;

use super::{AgentConfig, RunArgs, ServerAddr, ServiceSetting, ServiceSpec, Trust};
use crate::service::split_host_port;

impl ServiceSetting {
    /// The service this setting describes, checked: a flag's text parsed, a table's fields
    /// validated one by one, so both spellings meet the same rules.
    fn validate(&self) -> Result<ServiceSpec, ConfigError> {
        match self {
            ServiceSetting::Spec(spec) => ServiceSpec::parse(spec),
            ServiceSetting::Table(t) => {
                let mut spec = ServiceSpec::new(&t.name, &t.target, t.preferred_port, t.strict)?;
                spec.allow = parse_list("allow_cidr", &t.allow_cidr)?;
                spec.no_port = t.no_port;
                if let Some(ns) = &t.netns {
                    spec.set_netns(ns)?;
                }
                Ok(spec)
            }
        }
    }
}

/// The machine's hostname, the default agent name.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

impl AgentConfig {
    /// The one path from flags and file to a configuration: lays `args` over their `--config`
    /// file, applies defaults, loads the token and validates every setting.
    pub fn from_args(args: RunArgs) -> Result<Self, ConfigError> {
        let s = args.layered()?;
        let invalid = |key: &'static str, detail: String| ConfigError::Invalid { key, detail };
        if s.server.is_empty() {
            return Err(ConfigError::Missing {
                key: "server",
                hint: "pass --server HOST:PORT with the relay's agent port (e.g. relay.example.com:7000)",
            });
        }
        let mut websocket = Vec::new();
        let mut servers = Vec::new();
        for text in &s.server {
            let ws = crate::proxy::WsServer::parse(text)
                .map_err(|e| invalid("server", format!("{text:?}: {e}")))?;
            let server = match ws {
                Some((host, port, ws)) => {
                    let server = ServerAddr { host, port };
                    websocket.push((server.clone(), ws));
                    server
                }
                None => split_host_port(text)
                    .map(|(host, port)| ServerAddr { host, port })
                    .ok_or_else(|| {
                        invalid(
                            "server",
                            format!("{text:?} is not HOST:PORT (e.g. relay.example.com:7000) or wss://HOST[:PORT]/PATH"),
                        )
                    })?,
            };
            servers.push(server);
        }

        let name = s.name.or_else(hostname).ok_or(ConfigError::Missing {
            key: "name",
            hint: "pass --name (the hostname could not be read)",
        })?;
        validate_name("agent", &name)
            .map_err(|e| invalid("name", format!("{e}; pass --name with a valid name")))?;

        // Under systemd, `LoadCredential=` files stand in for the secret settings given neither
        // as a flag nor in the file (jumpgate_config::secret_file explains the convention).
        let token_file = or_credential(s.token_file, credential::TOKEN);
        let client_cert = or_credential(s.client_cert, credential::CLIENT_CERT);
        let client_key = or_credential(s.client_key, credential::CLIENT_KEY);
        let client_identity = match (client_cert, client_key) {
            (Some(cert), Some(key)) => {
                check_private(&key).map_err(|e| invalid("client_key", e.to_string()))?;
                Some((cert, key))
            }
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "client_cert/client_key",
                    "give both --client-cert and --client-key, or neither".into(),
                ))
            }
        };
        let token = match token_file {
            Some(path) => Some(
                read_secret_file(&path, true).map_err(|e| invalid("token_file", e.to_string()))?,
            ),
            None => match jumpgate_config::env_token() {
                Some(token) => Some(token),
                None if client_identity.is_some() => None,
                None => return Err(ConfigError::Missing {
                    key: "token",
                    hint: "pass --token-file FILE or set JUMPGATE_TOKEN (the relay's token, e.g. its state dir's token file), or under systemd LoadCredential=token:FILE, or use --client-cert/--client-key",
                }),
            },
        };

        let pins: Vec<Fingerprint> = parse_list("fingerprint", &s.fingerprint)?;
        let trust = match (s.ca, pins.is_empty()) {
            (Some(ca), true) => Trust::Ca(ca),
            (None, false) => Trust::Pins(pins),
            (Some(_), false) => {
                return Err(invalid(
                    "ca/fingerprint",
                    "give either --ca or --fingerprint, not both".into(),
                ))
            }
            (None, true) => return Err(ConfigError::Missing {
                key: "ca/fingerprint",
                hint: "the agent must verify the relay: pass --fingerprint sha256:HEX (print it with `relay-server fingerprint`) or --ca FILE",
            }),
        };

        let mut services = s
            .service
            .iter()
            .map(ServiceSetting::validate)
            .collect::<Result<Vec<_>, _>>()?;
        let host = crate::host::config::settings(
            s.host_mode,
            s.config.clone(),
            s.tunnel_status_dir,
            &s.tunnel,
            !services.is_empty(),
        )?;
        let agent_allow: Vec<Cidr> = parse_list("allow_cidr", &s.allow_cidr)?;
        for spec in &mut services {
            if spec.allow.is_empty() {
                spec.allow = agent_allow.clone();
            }
            spec.no_port |= s.no_port;
        }
        if services.is_empty() && host.is_none() {
            services.push(ServiceSpec::parse("ssh=127.0.0.1:22")?);
        }
        let mut names = std::collections::HashSet::new();
        if let Some(dup) = services.iter().find(|s| !names.insert(s.name.as_str())) {
            return Err(invalid(
                "service",
                format!("service {:?} is given twice", dup.name),
            ));
        }
        for spec in &services {
            if let Some(ns) = &spec.netns {
                crate::netns::check(ns)
                    .map_err(|e| invalid("service", format!("service {:?}: {e}", spec.name)))?;
            }
        }

        let metrics = match s.metrics {
            Some(text) => Some(text.parse().map_err(|_| {
                invalid(
                    "metrics",
                    format!("{text:?} is not IP:PORT, e.g. 127.0.0.1:9101"),
                )
            })?),
            None => None,
        };
        let log_level = s.log_level.unwrap_or_else(|| "info".into());
        jumpgate_daemon::parse_filter(&log_level).map_err(|detail| invalid("log_level", detail))?;
        let max_lanes = match s.max_lanes.unwrap_or(8) {
            0 => {
                return Err(invalid(
                    "max_lanes",
                    "must be at least 1 (1: a single connection per relay)".into(),
                ))
            }
            n => n,
        };
        let member_grace = jumpgate_config::duration_setting(
            "member_grace",
            s.member_grace,
            std::time::Duration::from_secs(60),
        )?;
        let max_relays = match s.max_relays.unwrap_or(16) {
            0 => return Err(invalid("max_relays", "must be at least 1".into())),
            n => n,
        };
        let proxy = proxy_setting(s.proxy, s.proxy_password_file, s.proxy_ca.as_deref())?;
        crate::jump_keys::read(s.jump_authorized_keys.as_deref())?;
        let api = match (&host, s.api_socket, s.api_group, s.state_dir) {
            (Some(_), socket, group, state_dir) => Some(
                crate::host::api::ApiSettings::new(socket, group, state_dir)
                    .map_err(|e| invalid("api_group", e))?,
            ),
            (None, None, None, None) => None,
            (None, ..) => {
                return Err(invalid(
                    "api_socket",
                    "api_socket, api_group and state_dir are host mode's; add --host-mode".into(),
                ))
            }
        };
        Ok(Self {
            api,
            host,
            jump_authorized_keys: s.jump_authorized_keys,
            proxy,
            websocket,
            member_grace,
            max_relays,
            servers,
            server_name: s.server_name,
            name,
            token,
            trust,
            client_identity,
            services,
            status_file: s.status_file,
            metrics,
            log_level,
            log_format: s.log_format.unwrap_or_default(),
            worker_threads: s.worker_threads.unwrap_or(1),
            max_lanes,
        })
    }
}

/// The proxy setting: `--proxy` (or `none`), else curl's environment variables; the password
/// from its file or the systemd credential `proxy-password`.
fn proxy_setting(
    url: Option<String>,
    password_file: Option<PathBuf>,
    proxy_ca: Option<&std::path::Path>,
) -> Result<Option<crate::proxy::Proxy>, ConfigError> {
    use crate::proxy::{Choice, Proxy};
    let invalid = |key: &'static str, detail: String| ConfigError::Invalid { key, detail };
    let choice = match url {
        Some(text) => Choice::Url(text),
        None => Choice::FromEnv,
    };
    let password_file = or_credential(password_file, crate::proxy::PASSWORD_CREDENTIAL);
    let password = match password_file {
        Some(path) => Some(
            read_secret_file(&path, true)
                .map_err(|e| invalid("proxy_password_file", e.to_string()))?,
        ),
        None => None,
    };
    Proxy::resolve(choice, |var| std::env::var(var).ok(), password, proxy_ca)
        .map_err(|detail| invalid("proxy", detail))
}
