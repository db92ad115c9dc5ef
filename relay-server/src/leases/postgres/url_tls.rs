//! What `lease_store_*` may say: the connection URL (no password in it), TLS or not by where the
//! connection goes, and the TLS client that verifies the database's certificate.

use std::path::PathBuf;

use tokio_postgres::config::Host;

use crate::error::RelayError;

/// Whether the connection to the database is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreTls {
    /// TLS, verified against `lease_store_ca` or the system roots.
    Require,
    /// Plain TCP (or a Unix socket).
    Disable,
}

/// How to reach the shared store: the validated `lease_store_*` settings.
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// The connection URL or key=value string, without a password.
    pub url: String,
    /// File holding the password (0600), if any; else `JUMPGATE_LEASE_STORE_PASSWORD`.
    pub password_file: Option<PathBuf>,
    /// TLS or not.
    pub tls: StoreTls,
    /// CA bundle for the server's certificate; `None`: the system bundle.
    pub ca: Option<PathBuf>,
}

/// The environment variable that may hold the database password instead of a file.
pub const PASSWORD_ENV: &str = "JUMPGATE_LEASE_STORE_PASSWORD";

/// The system CA bundle (Debian's ca-certificates), used when `lease_store_ca` is not set.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl PgSettings {
    /// Checks a `lease_store_url`: it must parse, and carry no password (a flag shows in `ps`
    /// and a URL in logs). Returns the TLS default for its host: off for loopback and Unix
    /// sockets, on otherwise.
    pub fn check_url(url: &str) -> Result<StoreTls, String> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("not a PostgreSQL connection URL: {e}"))?;
        if config.get_password().is_some() {
            return Err(format!(
                "the URL carries a password; remove it and put the password in a 0600 file named by \
                 lease_store_password_file (or the systemd credential {}), or in the environment variable {PASSWORD_ENV}",
                jumpgate_config::credential::LEASE_STORE_PASSWORD
            ));
        }
        let (hosts, addrs) = (config.get_hosts().len(), config.get_hostaddrs().len());
        if hosts == 0 && addrs == 0 {
            return Err("the URL names no host".into());
        }
        if hosts > 0 && addrs > 0 && hosts != addrs {
            return Err(format!(
                "the URL names {hosts} host(s) but {addrs} hostaddr(s); give one hostaddr per host, or none"
            ));
        }
        Ok(if goes_to_this_host(&config) {
            StoreTls::Disable
        } else {
            StoreTls::Require
        })
    }

    /// Where the store is, for messages: hosts, ports, database, user; never the password.
    pub(super) fn describe(config: &tokio_postgres::Config) -> String {
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = config.get_ports().get(i).or(config.get_ports().first());
                let host = match h {
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => path.display().to_string(),
                };
                match port {
                    Some(p) => format!("{host}:{p}"),
                    None => host,
                }
            })
            .collect();
        format!(
            "postgres://{}@{}/{}",
            config.get_user().unwrap_or("?"),
            hosts.join(","),
            config.get_dbname().unwrap_or("")
        )
    }
}

/// Whether every connection the URL makes stays on this host (loopback or a Unix socket), which
/// makes plain TCP the default. Decided from where each connection really goes: a host's
/// `hostaddr`, when given, is the address dialled (`host` is then only the name TLS checks), so
/// `host=localhost hostaddr=203.0.113.5` is remote and gets TLS.
fn goes_to_this_host(config: &tokio_postgres::Config) -> bool {
    let loopback = |text: &str| {
        text.trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    };
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    (0..hosts.len().max(addrs.len())).all(|i| match (addrs.get(i), hosts.get(i)) {
        (Some(addr), _) => addr.is_loopback(),
        (None, Some(Host::Tcp(name))) => name == "localhost" || loopback(name),
        (None, Some(Host::Unix(_))) => true,
        (None, None) => false,
    })
}

/// The TLS client for a database connection: rustls with the transport's crypto provider,
/// verifying the server against `ca` or, without one, the system bundle.
pub(super) fn client_config(ca: Option<&PathBuf>) -> Result<rustls::ClientConfig, RelayError> {
    let bundle = ca.cloned().unwrap_or_else(|| PathBuf::from(SYSTEM_BUNDLE));
    let mut roots = rustls::RootCertStore::empty();
    for cert in jumpgate_transport::tls::load_certs(&bundle)? {
        roots.add(cert).map_err(|e| {
            RelayError::StoreConfig(format!("lease_store_ca {}: {e}", bundle.display()))
        })?;
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(jumpgate_transport::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| RelayError::StoreConfig(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[cfg(test)]
mod tls_default_tests {
    use super::*;

    #[test]
    fn the_tls_default_follows_where_the_connection_goes() {
        let tls = |url: &str| PgSettings::check_url(url).unwrap();
        assert_eq!(tls("postgres://j@localhost/db"), StoreTls::Disable);
        assert_eq!(tls("postgres://j@127.0.0.1:5432/db"), StoreTls::Disable);
        assert_eq!(tls("host=/run/postgresql user=j"), StoreTls::Disable);
        assert_eq!(tls("postgres://j@db.example/db"), StoreTls::Require);
        // hostaddr is what is dialled: a remote one needs TLS whatever host says.
        assert_eq!(
            tls("host=localhost hostaddr=203.0.113.5 user=j"),
            StoreTls::Require
        );
        assert_eq!(
            tls("postgres://j@localhost/db?hostaddr=203.0.113.5"),
            StoreTls::Require
        );
        assert_eq!(
            tls("host=db.example hostaddr=127.0.0.1 user=j"),
            StoreTls::Disable
        );
        assert_eq!(tls("hostaddr=::1 user=j"), StoreTls::Disable);
        assert!(PgSettings::check_url("host=a,b hostaddr=127.0.0.1 user=j")
            .unwrap_err()
            .contains("one hostaddr per host"));
        // One remote host of several is enough to need TLS.
        assert_eq!(
            tls("host=localhost,localhost hostaddr=127.0.0.1,198.51.100.7 user=j"),
            StoreTls::Require
        );
    }
}
