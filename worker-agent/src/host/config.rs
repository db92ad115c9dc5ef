//! Host mode's settings: `host_mode`, `tunnel_status_dir` and the `[[tunnel]]` tables of the
//! config file, the tunnels a host agent carries from its start (static setups; a platform
//! adds and removes the others at run time).
//!
//! ```toml
//! host_mode = true
//! tunnel_status_dir = "/run/jumpgate-agent/tunnels"
//!
//! [[tunnel]]
//! name = "vh-exec-123"
//! token_file = "/etc/jumpgate/jobs/vh-exec-123.token"   # 0600; absent: the host's own credential
//! service = ["ssh=172.17.0.5:22"]                       # as --service takes them
//! jump_authorized_keys = "/etc/jumpgate/jobs/vh-exec-123.keys"
//! ```

use std::path::PathBuf;

use jumpgate_config::{read_secret_file, ConfigError};
use serde::Deserialize;

use super::TunnelSpec;
use crate::service::ServiceSpec;

/// A `[[tunnel]]` table of the config file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelTable {
    /// The tunnel's name.
    pub name: String,
    /// File (0600) holding the tunnel's credential; absent: the host's own.
    pub token_file: Option<PathBuf>,
    /// Services, `NAME=HOST:PORT[@PREFERRED[!]]` each.
    pub service: Vec<String>,
    /// OpenSSH public keys that alone may reach this tunnel through `ssh -J`.
    pub jump_authorized_keys: Option<PathBuf>,
}

/// Validated host-mode settings.
#[derive(Debug, Clone)]
pub struct HostSettings {
    /// Where each tunnel's status file (`NAME.json`) goes.
    pub status_dir: Option<PathBuf>,
    /// The tunnels from the config file.
    pub tunnels: Vec<TunnelSpec>,
    /// The config file, read again for its tunnels on SIGHUP.
    pub file: Option<PathBuf>,
}

/// The host settings from the layered values: `None` unless `host_mode`. `services_given`: the
/// settings name services of the agent's own, which a host agent does not have.
pub fn settings(
    host_mode: bool,
    file: Option<PathBuf>,
    status_dir: Option<PathBuf>,
    tables: &[TunnelTable],
    services_given: bool,
) -> Result<Option<HostSettings>, ConfigError> {
    let invalid = |key: &'static str, detail: String| ConfigError::Invalid { key, detail };
    if !host_mode {
        if !tables.is_empty() || status_dir.is_some() {
            return Err(invalid(
                "tunnel",
                "[[tunnel]] tables and tunnel_status_dir need host mode; add host_mode = true (or --host-mode)".into(),
            ));
        }
        return Ok(None);
    }
    if services_given {
        return Err(invalid(
            "service",
            "a host agent has no services of its own: give each job's services in its tunnel ([[tunnel]] or `worker-agent tunnel add`), or drop --host-mode".into(),
        ));
    }
    let mut tunnels: Vec<TunnelSpec> = Vec::new();
    for t in tables {
        let bad = |detail: String| invalid("tunnel", format!("tunnel {:?}: {detail}", t.name));
        let services = t
            .service
            .iter()
            .map(|s| ServiceSpec::parse(s).map_err(|e| bad(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let credential = match &t.token_file {
            Some(path) => Some(read_secret_file(path, true).map_err(|e| bad(e.to_string()))?),
            None => None,
        };
        let jump_keys = crate::jump_keys::read(t.jump_authorized_keys.as_deref())
            .map_err(|e| bad(e.to_string()))?;
        let spec = TunnelSpec {
            name: t.name.clone(),
            services,
            credential,
            jump_keys,
        };
        super::validate(&spec).map_err(|e| invalid("tunnel", e.to_string()))?;
        if tunnels.iter().any(|o| o.name == spec.name) {
            return Err(bad("given twice".into()));
        }
        tunnels.push(spec);
    }
    Ok(Some(HostSettings {
        status_dir,
        tunnels,
        file,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, services: &[&str]) -> TunnelTable {
        TunnelTable {
            name: name.into(),
            token_file: None,
            service: services.iter().map(|s| s.to_string()).collect(),
            jump_authorized_keys: None,
        }
    }

    /// Host mode's settings are refused where they make no sense, naming the fix.
    #[test]
    fn host_settings_are_checked() {
        let e = settings(
            false,
            None,
            None,
            &[table("vh-1", &["ssh=127.0.0.1:22"])],
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("host_mode = true"), "{e}");
        let e = settings(true, None, None, &[], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no services of its own"), "{e}");
        let e = settings(true, None, None, &[table("vh-1", &["ssh"])], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"vh-1\"") && e.contains("NAME=HOST:PORT"),
            "{e}"
        );
        let twice = [
            table("vh-1", &["ssh=127.0.0.1:22"]),
            table("vh-1", &["ssh=127.0.0.1:23"]),
        ];
        let e = settings(true, None, None, &twice, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
        let ok = settings(
            true,
            None,
            None,
            &[table("vh-1", &["ssh=127.0.0.1:22@2222!"])],
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(ok.tunnels[0].services[0].preferred_port, Some(2222));
        assert!(settings(false, None, None, &[], false).unwrap().is_none());
    }
}
