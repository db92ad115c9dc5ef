//! Start-up: everything a relay needs is loaded and wired together before it serves, so a bad
//! certificate, a token file that cannot be read or a taken port fails the start, not the first
//! connection.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Operator;
use crate::agents::registry::Registry;
use crate::agents::{self, Agents};
use crate::audit::AuditLog;
use crate::fleet::Fleet;
use crate::guard::AuthGuard;
use crate::metrics::Metrics;
use crate::policy::{Policy, PolicyCell};
use crate::shards::Shards;
use crate::users::ports::Ports;
use crate::users::router::Router;
use crate::users::Users;
use crate::webhook::Webhooks;
use crate::{identity, jump, RelayConfig, RelayError};

use super::{listeners, store, Relay};

impl Relay {
    /// Loads the identity, token and leases, and binds the agent port.
    pub async fn bind(
        config: RelayConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, RelayError> {
        let config = Arc::new(config);
        let (tls, fingerprint) = identity::server_tls(&config)?;
        let policy = Arc::new(PolicyCell::new(Policy::load(&config)?));
        identity::ensure_state_dir(&config.state_dir)?;
        let audit = AuditLog::open(config.audit_log.as_deref())
            .await
            .map_err(|source| RelayError::StateDir {
                path: config.audit_log.clone().unwrap_or_default(),
                source,
            })?;
        let listeners::Listeners {
            agent: listener,
            admin,
            router: router_listener,
            ws,
        } = listeners::bind(&config).await?;
        let bound_port = listener
            .local_addr()
            .map_or(config.listen.port(), |a| a.port());
        let webhook_stop = CancellationToken::new();
        let (webhooks, webhook_task) = start_webhooks(&config, &webhook_stop)?;
        let webhooks = Arc::new(webhooks);
        let metrics = Arc::new(Metrics::default());
        let audit = Arc::new(audit);
        let registry = Arc::new(Registry::default());
        let handshakes = Arc::new(Semaphore::new(config.max_handshakes));
        let close_sessions = CancellationToken::new();
        let users = Arc::new(Users {
            policy: policy.clone(),
            metrics: metrics.clone(),
            audit: audit.clone(),
            conns: TaskTracker::new(),
            shutdown: shutdown.clone(),
            close: close_sessions.clone(),
        });
        let ports = Arc::new(Ports::new(users.clone()));
        let leases = Arc::new(store::open(&config, bound_port, &webhooks, &ports).await?);
        store::keep_leased_ports(&leases, &ports, config.proxy_bind)
            .await
            .map_err(RelayError::from)?;
        let router = router_listener.map(|listener| {
            let router = Router {
                users: users.clone(),
                registry: registry.clone(),
                // Its own cap: a flood of idle CONNECT clients must not hold agents' handshake slots.
                heads: Arc::new(Semaphore::new(config.max_handshakes)),
                heads_per_source: Arc::default(),
                max_heads_per_source: crate::users::router::share_per_source(config.max_handshakes),
            };
            (listener, Arc::new(router))
        });
        let jump = jump::bind(&config, users.clone(), registry.clone()).await?;
        let operator = Arc::new(Operator {
            registry: registry.clone(),
            leases: leases.clone(),
            ports: ports.clone(),
            metrics: metrics.clone(),
            audit,
            webhooks: webhooks.clone(),
            public_host: config.public_host.clone(),
            shutdown: shutdown.clone(),
            credential_gauges_failing: Default::default(),
            jump_signer: Arc::new(jump::SignerSlot::new(jump::signer(&config)?)),
        });
        // A shared store's registry of live relays adds them to what agents are told.
        let members = store::members(&leases);
        let fleet = Arc::new(Fleet::new(&config, bound_port, members));
        let agents = Arc::new(Agents {
            acceptor: TlsAcceptor::from(tls),
            policy,
            guard: AuthGuard::new(config.auth_failure_limit, config.auth_ban),
            handshakes,
            handshakes_per_source: Arc::default(),
            max_handshakes_per_source: agents::handshakes_per_source(config.max_handshakes),
            metrics,
            webhooks,
            leases,
            registry,
            users,
            ports,
            shutdown,
            close_sessions,
            tasks: TaskTracker::new(),
            fleet,
            config,
        });
        let shards = match session_threads(agents.config.worker_threads) {
            0 => None,
            count => {
                Some(Shards::start(count).map_err(|source| RelayError::Threads { count, source })?)
            }
        };
        Ok(Self {
            agents,
            operator,
            webhook: (webhook_stop, webhook_task),
            listener,
            admin,
            router,
            ws,
            jump,
            fingerprint,
            shards,
        })
    }
}

/// How many session threads `worker_threads` asks for beside the main thread: none for 1 (all
/// on the main thread), one per CPU for 0.
fn session_threads(worker_threads: usize) -> usize {
    let count = match worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    if count <= 1 {
        0
    } else {
        count
    }
}

/// Starts delivering webhook events when `webhook_url` is set (its secret read, its CA bundle
/// loaded for HTTPS), or a sink that drops them. `stop` ends the delivery task's retries.
fn start_webhooks(
    config: &RelayConfig,
    stop: &CancellationToken,
) -> Result<(Webhooks, Option<JoinHandle<()>>), RelayError> {
    Ok(match &config.webhook {
        Some((target, secret_file, ca)) => {
            let secret = jumpgate_config::read_secret_file(secret_file, true)?;
            let tls = if target.https {
                let bundle = ca
                    .clone()
                    .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
                let roots = jumpgate_transport::tls::load_certs(&bundle)?;
                let config = jumpgate_transport::tls::client_config(
                    jumpgate_transport::tls::ServerTrust::Roots(roots),
                    None,
                )?;
                Some(tokio_rustls::TlsConnector::from(config))
            } else {
                None
            };
            let (hooks, task) = Webhooks::start(target.clone(), secret, tls, stop.clone());
            (hooks, Some(task))
        }
        None => (Webhooks::default(), None),
    })
}
