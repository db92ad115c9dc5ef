//! The relay's connections to the database: settings to a pool, then the schema checked and
//! this relay registered before the store is handed out.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use jumpgate_lease::PortRange;
use jumpgate_proto::Secret;
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;

use super::url_tls::{self, PgSettings, StoreTls, PASSWORD_ENV};
use super::{chain, secs, timed, PgStore, OP_TIMEOUT, SCHEMA};
use crate::error::RelayError;
use crate::leases::{Member, StoreError};

/// Connections the relay keeps to the database.
const POOL_SIZE: usize = 8;

/// Longest a new connection, or a check of a pooled one, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle time after which TCP keepalives probe a connection.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

impl PgStore {
    /// Connects, migrates the schema, checks the fleet's port range and registers `me`.
    pub(in crate::leases) async fn connect(
        settings: &PgSettings,
        range: PortRange,
        ttl_secs: u64,
        me: &Member,
        now: u64,
    ) -> Result<Self, RelayError> {
        let mut config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e| RelayError::StoreConfig(format!("lease_store_url: {e}")))?;
        let password = match &settings.password_file {
            Some(path) => Some(jumpgate_config::read_secret_file(path, true)?),
            None => std::env::var(PASSWORD_ENV)
                .ok()
                .filter(|p| !p.is_empty())
                .map(Secret::new),
        };
        if let Some(password) = &password {
            config.password(password.expose());
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        config.keepalives_idle(KEEPALIVE_IDLE);
        config.application_name("jumpgate-relay");
        let target: Arc<str> = PgSettings::describe(&config).into();
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match settings.tls {
            StoreTls::Disable => {
                config.ssl_mode(SslMode::Disable);
                Manager::from_config(config, NoTls, manager_config)
            }
            StoreTls::Require => {
                config.ssl_mode(SslMode::Require);
                let tls = url_tls::client_config(settings.ca.as_ref())?;
                Manager::from_config(
                    config,
                    tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                    manager_config,
                )
            }
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(OP_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| RelayError::StoreConfig(e.to_string()))?;
        let store = Self {
            pool,
            range,
            ttl_secs: secs(ttl_secs),
            target: target.clone(),
        };
        let unreachable = |e: StoreError| {
            RelayError::Store(StoreError::Unavailable(format!(
                "cannot use the lease store {target}: {e}"
            )))
        };
        match timed(store.migrate(range)).await.map_err(unreachable)? {
            Ok(()) => {}
            Err(fleet) => {
                return Err(RelayError::StoreConfig(format!(
                    "this relay's port_range {range} differs from the fleet's {fleet} (in the lease store {target}); \
                     every relay of a fleet must use the same range"
                )))
            }
        }
        timed(store.register(me, now)).await.map_err(unreachable)?;
        tracing::info!(store = %target, relay = %me.id, "lease store ready (PostgreSQL, schema version {})", SCHEMA.len());
        Ok(store)
    }

    /// A connection from the pool.
    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| {
            StoreError::Unavailable(format!("cannot reach {}: {}", self.target, chain(&e)))
        })
    }
}
