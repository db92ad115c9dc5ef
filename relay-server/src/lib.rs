//! jumpgate relay server.
//!
//! The relay accepts worker agents on one TLS port ([`session`]), gives each of their services a
//! public port from its range ([`leases`]), and carries every user connection on such a port to
//! the agent as a yamux stream ([`proxy`]). `main.rs` only parses the configuration and calls
//! [`run`]; tests call [`Relay::bind`] to learn the bound address first.

pub mod admin;
pub mod audit;
pub mod cli;
pub mod config;
pub mod error;
pub mod guard;
pub mod http_client;
pub mod identity;
pub mod lanes;
pub mod leases;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod registry;
pub mod router;
pub mod session;
pub mod shards;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jumpgate_transport::tls::Fingerprint;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::RelayConfig;
pub use error::RelayError;

use crate::audit::AuditLog;
use crate::guard::AuthGuard;
use crate::leases::LeaseStore;
use crate::policy::Policy;
use crate::registry::Registry;
use crate::shards::Shards;

/// State shared by every task of a running relay.
pub struct Shared {
    /// Validated settings.
    pub config: RelayConfig,
    /// TLS for the agent port.
    pub acceptor: TlsAcceptor,
    /// Credentials, allowlists and limits; swapped on reload.
    policy: RwLock<Arc<Policy>>,
    /// Bans for addresses that keep failing the handshake.
    pub auth_guard: AuthGuard,
    /// Caps handshakes in progress.
    pub handshakes: Arc<Semaphore>,
    /// One JSON line per user connection.
    pub audit: AuditLog,
    /// Event counters for `/metrics`.
    pub metrics: metrics::Metrics,
    /// Lifecycle events for the platform.
    pub webhooks: webhook::Webhooks,
    /// Port leases.
    pub leases: Arc<LeaseStore>,
    /// Connected agents.
    pub registry: Registry,
    /// Fired on SIGTERM: stop accepting, tell agents, start draining.
    pub shutdown: CancellationToken,
    /// Fired after the drain: end every agent session.
    pub close_sessions: CancellationToken,
    /// Agent sessions and port listeners.
    pub tasks: TaskTracker,
    /// User connections, waited for during the drain.
    pub user_conns: TaskTracker,
}

impl Shared {
    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A relay whose agent port is bound but not yet serving.
pub struct Relay {
    shared: Arc<Shared>,
    webhook: (CancellationToken, Option<tokio::task::JoinHandle<()>>),
    listener: TcpListener,
    admin: Option<(TcpListener, Option<jumpgate_proto::Secret>)>,
    router: Option<TcpListener>,
    fingerprint: Fingerprint,
    shards: Option<Shards>,
}

impl Relay {
    /// Loads the identity, token and leases, and binds the agent port.
    pub async fn bind(
        config: RelayConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, RelayError> {
        let (tls, fingerprint) = identity::server_tls(&config)?;
        let policy = Policy::load(&config)?;
        identity::ensure_state_dir(&config.state_dir)?;
        let audit = AuditLog::open(config.audit_log.as_deref())
            .await
            .map_err(|source| RelayError::StateDir {
                path: config.audit_log.clone().unwrap_or_default(),
                source,
            })?;
        let leases = Arc::new(LeaseStore::open(
            &config.lease_file(),
            config.port_range,
            config.lease_ttl,
        )?);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| RelayError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let admin = match config.admin {
            Some(addr) => {
                let token = match &config.admin_token_file {
                    Some(path) => Some(jumpgate_config::read_secret_file(path, true)?),
                    None => None,
                };
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| RelayError::Bind { addr, source })?;
                Some((listener, token))
            }
            None => None,
        };
        let router = match config.router_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| RelayError::Bind { addr, source })?,
            ),
            None => None,
        };
        let webhook_stop = CancellationToken::new();
        let (webhooks, webhook_task) = match &config.webhook {
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
                let (hooks, task) =
                    webhook::Webhooks::start(target.clone(), secret, tls, webhook_stop.clone());
                (hooks, Some(task))
            }
            None => (webhook::Webhooks::default(), None),
        };
        let shared = Arc::new(Shared {
            webhooks,
            auth_guard: AuthGuard::new(config.auth_failure_limit, config.auth_ban),
            handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
            policy: RwLock::new(Arc::new(policy)),
            audit,
            metrics: metrics::Metrics::default(),
            config,
            acceptor: TlsAcceptor::from(tls),
            leases,
            registry: Registry::default(),
            shutdown,
            close_sessions: CancellationToken::new(),
            tasks: TaskTracker::new(),
            user_conns: TaskTracker::new(),
        });
        let shards = match session_threads(shared.config.worker_threads) {
            0 => None,
            count => {
                Some(Shards::start(count).map_err(|source| RelayError::Threads { count, source })?)
            }
        };
        Ok(Self {
            shared,
            webhook: (webhook_stop, webhook_task),
            listener,
            admin,
            router,
            fingerprint,
            shards,
        })
    }

    /// Address the agent port is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Pin of the relay's certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// A handle that re-reads the configuration's live parts (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader {
            shared: self.shared.clone(),
        }
    }

    /// Serves agents until the shutdown token fires, then drains and stops.
    pub async fn serve(self) -> Result<(), RelayError> {
        let Relay {
            shared,
            webhook,
            listener,
            admin,
            router,
            fingerprint,
            shards,
        } = self;
        if let Some(router_listener) = router {
            if let Ok(addr) = router_listener.local_addr() {
                tracing::info!("router listening for CONNECT requests on {addr}");
            }
            shared
                .tasks
                .spawn(router::serve(router_listener, shared.clone()));
        }
        let admin_stop = CancellationToken::new();
        let admin_task = admin.map(|(admin_listener, token)| {
            if let Ok(addr) = admin_listener.local_addr() {
                tracing::info!("admin API listening on {addr}");
            }
            tokio::spawn(admin::serve(
                admin_listener,
                shared.clone(),
                token,
                admin_stop.clone(),
            ))
        });
        let addr = listener.local_addr().ok();
        tracing::info!(
            listen = ?addr,
            public_host = %shared.config.public_host,
            port_range = %shared.config.port_range,
            fingerprint = %fingerprint,
            "relay listening for agents"
        );
        jumpgate_config::sd_notify("READY=1\nSTATUS=serving agents");
        let maintenance_stop = CancellationToken::new();
        let maintenance = tokio::spawn(shared.leases.clone().maintain(
            shared.config.lease_ttl,
            maintenance_stop.clone(),
            {
                let shared = shared.clone();
                move |key, port| {
                    shared.webhooks.emit(webhook::Event::LeaseExpired {
                        agent: key.agent.clone(),
                        service: key.service.clone(),
                        port,
                    })
                }
            },
        ));
        warn_if_ephemeral_overlap(shared.config.port_range);

        accept_agents(&shared, listener, shards.as_ref()).await;
        jumpgate_config::sd_notify("STOPPING=1\nSTATUS=draining");

        tracing::info!(
            drain = ?shared.config.drain_timeout,
            "no longer accepting; draining open connections"
        );
        shared.user_conns.close();
        if tokio::time::timeout(shared.config.drain_timeout, shared.user_conns.wait())
            .await
            .is_err()
        {
            tracing::info!("drain period over; closing remaining connections");
        }
        shared.close_sessions.cancel();
        shared.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some agent sessions did not close within 10s");
        }
        maintenance_stop.cancel();
        let _ = maintenance.await;
        shared.audit.close().await;
        // Let queued webhook events go out for a few seconds, then stop retrying.
        shared.webhooks.close();
        if let (stop, Some(mut task)) = webhook {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                tracing::warn!("webhook events still queued at shutdown are dropped");
                stop.cancel();
                let _ = task.await;
            }
        }
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        if let Some(shards) = shards {
            shards.stop().await;
        }
        tracing::info!("relay stopped");
        Ok(())
    }
}

/// Re-reads the configuration on request and applies what can change live: tokens (revoking
/// sessions whose credential is gone), allowlists and connection limits. Settings that need a
/// restart are reported, not silently ignored.
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
}

impl Reloader {
    /// Reloads; on error the running policy stays in force. Returns the new configuration, for
    /// the settings the caller owns (the log level).
    pub fn reload(&self) -> Result<RelayConfig, RelayError> {
        let shared = &self.shared;
        let new = RelayConfig::from_args(shared.config.source.clone())?;
        let policy = Arc::new(Policy::load(&new)?);
        for (key, changed) in restart_only_changes(&shared.config, &new) {
            if changed {
                tracing::warn!("reload: {key} changed, but takes effect only after a restart");
            }
        }
        *shared.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.clone();
        let mut revoked = 0;
        for session in shared.registry.all() {
            if !policy.still_allows(&session.credential, &session.name) {
                tracing::warn!(agent = %session.name, "disconnecting agent: its credential ({}) was revoked", session.credential);
                session.cancel.cancel();
                revoked += 1;
            }
        }
        tracing::info!(revoked, allow_cidr = ?new.allow_cidr, "configuration reloaded");
        Ok(new)
    }
}

fn restart_only_changes(old: &RelayConfig, new: &RelayConfig) -> [(&'static str, bool); 8] {
    [
        ("listen", old.listen != new.listen),
        ("port_range", old.port_range != new.port_range),
        ("proxy_bind", old.proxy_bind != new.proxy_bind),
        ("public_host", old.public_host != new.public_host),
        ("tls_cert/tls_key", old.tls != new.tls),
        ("client_ca", old.client_ca != new.client_ca),
        ("state_dir", old.state_dir != new.state_dir),
        ("audit_log", old.audit_log != new.audit_log),
    ]
}

/// Runs a relay with `config` until `shutdown` fires.
pub async fn run(config: RelayConfig, shutdown: CancellationToken) -> Result<(), RelayError> {
    Relay::bind(config, shutdown).await?.serve().await
}

/// Warns when the allocation range overlaps the kernel's ephemeral port range: outgoing
/// connections on the jump host would then take ports the relay means to hand out.
fn warn_if_ephemeral_overlap(range: jumpgate_proto::PortRange) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut parts = text
        .split_whitespace()
        .filter_map(|p| p.parse::<u16>().ok());
    let (Some(lo), Some(hi)) = (parts.next(), parts.next()) else {
        return;
    };
    let (from, to) = (range.lo().max(lo), range.hi().min(hi));
    if from <= to {
        tracing::warn!(
            "port range {range} overlaps the kernel's ephemeral range {lo}-{hi}: outgoing connections may take ports \
             the relay hands out. Reserve them with: sysctl -w net.ipv4.ip_local_reserved_ports={from}-{to} \
             (persist it in /etc/sysctl.d/), or move the range below {lo}"
        );
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

async fn accept_agents(shared: &Arc<Shared>, listener: TcpListener, shards: Option<&Shards>) {
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = sweep.tick() => {
                shared.auth_guard.sweep(Instant::now());
                continue;
            }
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                // Banned addresses and connections beyond the handshake cap are closed before
                // any TLS work is spent on them.
                if shared.auth_guard.is_banned(peer.ip(), Instant::now()) {
                    tracing::debug!(%peer, "closing connection from banned address");
                    shared
                        .metrics
                        .handshake_failed(metrics::HandshakeFailure::Banned);
                    continue;
                }
                let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
                    shared
                        .metrics
                        .handshake_failed(metrics::HandshakeFailure::Overload);
                    proxy::rate_limited_warn(
                        "handshakes",
                        || tracing::warn!(%peer, "too many agent handshakes in progress; closing new connections"),
                    );
                    continue;
                };
                let session = {
                    let shared = shared.clone();
                    move |tcp| session::handle_agent(tcp, peer, shared, permit)
                };
                match shards {
                    Some(shards) => shards.spawn(&shared.tasks, tcp, session),
                    None => {
                        shared.tasks.spawn(session(tcp));
                    }
                }
            }
            Err(e) => proxy::accept_backoff("agent port", e).await,
        }
    }
}
