//! jumpgate relay server.
//!
//! The folder listing is the architecture: `agents` is the agent port (handshake, placement,
//! running session, lanes, the registry of live sessions); `users` is the public side (where a
//! user connection is admitted, carried, and the name router); `leases` is where leases live;
//! `admin` is the operator API; `net` holds what every accept loop shares. `main.rs` only parses
//! the configuration and calls [`run`]; tests call [`Relay::bind`] to learn the bound address.
//!
//! Each layer gets a handle with what it needs and nothing else: `agents::Agents`,
//! `users::Users`, `users::router::Router` and `admin::Operator` share the parts (leases,
//! registry, counters) they have in common by `Arc`.

mod admin;
mod agents;
mod audit;
mod claims;
pub mod cli;
pub mod config;
mod defaults;
pub mod error;
mod fleet;
mod guard;
mod http_client;
pub mod identity;
mod join;
pub mod jump;
pub mod leases;
mod metrics;
mod net;
mod policy;
mod shards;
mod users;
mod webhook;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jumpgate_transport::tls::Fingerprint;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use claims::CredentialCaps;
pub use config::RelayConfig;
pub use error::RelayError;

use crate::admin::Operator;
use crate::agents::registry::Registry;
use crate::agents::Agents;
use crate::audit::AuditLog;
use crate::config::LeaseStoreConfig;
use crate::error::Listener;
use crate::fleet::Fleet;
use crate::guard::AuthGuard;
use crate::leases::{LeaseStore, StoreError};
use crate::metrics::Metrics;
use crate::policy::{Policy, PolicyCell};
use crate::shards::Shards;
use crate::users::ports::Ports;
use crate::users::router::Router;
use crate::users::Users;
use crate::webhook::{Event, Webhooks};

/// A relay whose agent port is bound but not yet serving.
pub struct Relay {
    agents: Arc<Agents>,
    operator: Arc<Operator>,
    webhook: (CancellationToken, Option<JoinHandle<()>>),
    listener: TcpListener,
    admin: Option<(TcpListener, Option<jumpgate_proto::Secret>)>,
    router: Option<(TcpListener, Arc<Router>)>,
    ws: Option<TcpListener>,
    jump: Option<(TcpListener, Arc<jump::server::Jump>)>,
    fingerprint: Fingerprint,
    shards: Option<Shards>,
}

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
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(RelayError::bind(config.listen, Listener::AgentPort))?;
        let bound_port = listener
            .local_addr()
            .map_or(config.listen.port(), |a| a.port());
        let admin = match config.admin {
            Some(addr) => {
                let token = match &config.admin_token_file {
                    Some(path) => Some(jumpgate_config::read_secret_file(path, true)?),
                    None => None,
                };
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(RelayError::bind(addr, Listener::Admin))?;
                Some((listener, token))
            }
            None => None,
        };
        let router_listener = match config.router_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(RelayError::bind(addr, Listener::Router))?,
            ),
            None => None,
        };
        let ws = match config.ws_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(RelayError::bind(addr, Listener::WebSocket))?,
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
                    Webhooks::start(target.clone(), secret, tls, webhook_stop.clone());
                (hooks, Some(task))
            }
            None => (Webhooks::default(), None),
        };
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
        let on_expired: leases::OnExpired = {
            let (webhooks, ports) = (webhooks.clone(), ports.clone());
            Box::new(move |key, port| {
                ports.close(port);
                webhooks.emit(Event::LeaseExpired {
                    agent: key.agent.clone(),
                    service: key.service.clone(),
                    port,
                })
            })
        };
        let me = leases::Member {
            id: config.relay_id.clone(),
            agent_addr: config.advertised(bound_port),
            public_host: config.public_host.clone(),
            ws_url: config.ws_public_url.clone(),
        };
        let leases = Arc::new(match &config.lease_store {
            LeaseStoreConfig::File => LeaseStore::open(
                &config.lease_file(),
                config.port_range,
                config.lease_ttl,
                on_expired,
            )?
            .with_member(me),
            LeaseStoreConfig::Postgres(settings) => {
                LeaseStore::connect(
                    settings,
                    config.port_range,
                    config.lease_ttl,
                    on_expired,
                    me,
                    Arc::new(leases::now_secs),
                )
                .await?
                // A lease that ended elsewhere: stop keeping its port here (its webhook event
                // came from the relay that ended it).
                .with_on_gone({
                    let ports = ports.clone();
                    Box::new(move |key, port| {
                        if ports.is_kept_for(port, &key.agent) {
                            ports.close(port);
                        }
                    })
                })
            }
        });
        keep_leased_ports(&leases, &ports, config.proxy_bind)
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
        let members = leases.is_shared().then(|| {
            let leases = leases.clone();
            fleet::source(move || {
                let leases = leases.clone();
                async move {
                    let live = leases.members().await.map_err(|e| e.to_string())?;
                    Ok(live
                        .into_iter()
                        .map(|m| jumpgate_proto::RelayMember {
                            id: m.id,
                            addr: m.agent_addr,
                            ws: m.ws_url,
                        })
                        .collect())
                }
            })
        });
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
            agents: self.agents.clone(),
            jump: self.jump.as_ref().map(|(_, jump)| jump.clone()),
            signer: self.operator.jump_signer.clone(),
        }
    }

    /// Serves agents until the shutdown token fires, then drains and stops.
    pub async fn serve(self) -> Result<(), RelayError> {
        let Relay {
            agents,
            operator,
            webhook,
            listener,
            admin,
            router,
            ws: ws_listener,
            jump,
            fingerprint,
            shards,
        } = self;
        let config = agents.config.clone();
        // Everything but the agent sessions, which the drain ends separately.
        let services = TaskTracker::new();
        let services_stop = CancellationToken::new();
        if let Some((router_listener, router)) = router {
            if let Ok(addr) = router_listener.local_addr() {
                tracing::info!("router listening for CONNECT requests on {addr}");
            }
            services.spawn(users::router::serve(router_listener, router));
        }
        if let Some((listener, jump)) = jump {
            services.spawn(jump::serve(listener, jump));
        }
        if let Some((admin_listener, token)) = admin {
            if let Ok(addr) = admin_listener.local_addr() {
                tracing::info!("admin API listening on {addr}");
            }
            services.spawn(admin::serve(
                admin_listener,
                operator,
                token,
                services_stop.clone(),
            ));
        }
        let addr = listener.local_addr().ok();
        tracing::info!(
            listen = ?addr,
            public_host = %config.public_host,
            port_range = %config.port_range,
            fingerprint = %fingerprint,
            advertise = %agents.fleet.itself().addr,
            "relay listening for agents"
        );
        if !config.peers.is_empty() {
            tracing::info!(peers = %config.peers.join(","), "static fleet members");
        }
        jumpgate_daemon::sd_notify("READY=1\nSTATUS=serving agents");
        services.spawn(agents.leases.clone().maintain(services_stop.clone()));
        services.spawn(agents.fleet.clone().run(services_stop.clone()));
        services.close();
        warn_if_ephemeral_overlap(config.port_range);

        // The WebSocket port hands its agents to the agent port's connection path, in process:
        // both stop accepting at shutdown, and their sessions drain together.
        let websocket = async {
            let Some(ws_listener) = ws_listener else {
                return;
            };
            if let Ok(addr) = ws_listener.local_addr() {
                tracing::info!(
                    "agents accepted as WebSocket on http://{addr}{}",
                    config.ws_path
                );
            }
            let endpoint = ws::Endpoint {
                path: config.ws_path.as_str().into(),
                trusted: config.ws_trusted_proxies.as_slice().into(),
            };
            ws::serve(ws_listener, endpoint, agents.clone(), shards.as_ref()).await;
        };
        tokio::join!(
            agents::accept(agents.clone(), listener, shards.as_ref()),
            websocket
        );
        jumpgate_daemon::sd_notify("STOPPING=1\nSTATUS=draining");

        tracing::info!(
            drain = ?config.drain_timeout,
            "no longer accepting; draining open connections"
        );
        // A second SIGTERM/SIGINT (`hurry`) cuts the waits short; the audit log is still flushed.
        let hurry = jumpgate_daemon::signals::hurry();
        let users = &agents.users;
        users.conns.close();
        tokio::select! {
            drained = tokio::time::timeout(config.drain_timeout, users.conns.wait()) => {
                if drained.is_err() {
                    tracing::info!("drain period over; closing remaining connections");
                }
            }
            _ = hurry.cancelled() => tracing::warn!("drain cut short; closing remaining connections"),
        }
        agents.close_sessions.cancel();
        agents.tasks.close();
        tokio::select! {
            closed = tokio::time::timeout(Duration::from_secs(10), agents.tasks.wait()) => {
                if closed.is_err() {
                    tracing::warn!("some agent sessions did not close within 10s");
                }
            }
            _ = hurry.cancelled() => {}
        }
        // Connections cut with their sessions end at once; give them a moment to be audited.
        let _ = tokio::time::timeout(Duration::from_secs(1), users.conns.wait()).await;
        // The lease file's final write, the admin API and the router end here, and the kept
        // ports are closed.
        services_stop.cancel();
        services.wait().await;
        agents.ports.tasks.close();
        agents.ports.tasks.wait().await;
        users.audit.close().await;
        // Let queued webhook events go out for a few seconds, then stop retrying.
        agents.webhooks.close();
        if let (stop, Some(mut task)) = webhook {
            let sent = tokio::select! {
                sent = tokio::time::timeout(Duration::from_secs(5), &mut task) => sent.is_ok(),
                _ = hurry.cancelled() => false,
            };
            if !sent {
                tracing::warn!("webhook events still queued at shutdown are dropped");
                stop.cancel();
                let _ = task.await;
            }
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
    agents: Arc<Agents>,
    /// The jump listener, whose access files a reload re-reads.
    jump: Option<Arc<jump::server::Jump>>,
    /// The certificate signer, whose CA key a reload re-reads.
    signer: Arc<jump::SignerSlot>,
}

impl Reloader {
    /// Reloads; on error the running policy stays in force. Returns the new configuration, for
    /// the settings the caller owns (the log level).
    pub fn reload(&self) -> Result<RelayConfig, RelayError> {
        let agents = &self.agents;
        let new = RelayConfig::from_args(agents.config.source.clone())?;
        let policy = Arc::new(Policy::load(&new)?);
        // The jump listener's access files, read before anything is applied (a bad file keeps
        // the running configuration); users already in keep their sessions.
        let jump_access = match (&self.jump, &new.jump) {
            (Some(j), Some(settings)) => Some((
                jump::load_access(settings)?,
                jump::host_certificate(settings, j.host_key())?,
            )),
            _ => None,
        };
        let signer = jump::signer(&new)?;
        for key in agents.config.restart_only_changes(&new) {
            tracing::warn!("reload: {key} changed, but takes effect only after a restart");
        }
        agents.policy.replace(policy.clone());
        if let (Some(jump), Some((access, certificate))) = (&self.jump, jump_access) {
            jump.replace_access(access);
            jump.replace_certificate(certificate);
        }
        self.signer.replace(signer);
        agents.fleet.reconfigure(&new);
        let mut revoked = 0;
        for session in agents.registry.all() {
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

/// Runs a relay with `config` until `shutdown` fires, re-reading the configuration on SIGHUP.
pub async fn run(config: RelayConfig, shutdown: CancellationToken) -> Result<(), RelayError> {
    let relay = Relay::bind(config, shutdown).await?;
    relay.reload_on_sighup();
    relay.serve().await
}

impl Relay {
    /// Re-reads the configuration on every SIGHUP (`systemctl reload`), as a task of the relay
    /// that ends when it shuts down. Installed before [`Relay::serve`] announces readiness, so a
    /// reload request never meets SIGHUP's default action (which would kill the relay).
    pub fn reload_on_sighup(&self) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(hup) => hup,
            Err(e) => return tracing::warn!("cannot install the SIGHUP handler: {e}"),
        };
        let reloader = self.reloader();
        let shutdown = self.agents.shutdown.clone();
        self.agents.tasks.spawn(async move {
            while tokio::select! {
                _ = shutdown.cancelled() => None,
                hup = hup.recv() => hup,
            }
            .is_some()
            {
                tracing::info!("SIGHUP received, reloading configuration");
                let monotonic = jumpgate_daemon::notify::monotonic_usec();
                jumpgate_daemon::sd_notify(&format!("RELOADING=1\nMONOTONIC_USEC={monotonic}"));
                match reloader.reload() {
                    Ok(config) => {
                        if let Err(e) = jumpgate_daemon::logging::set_level(&config.log_level) {
                            tracing::error!("reload: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::error!("reload failed, keeping the running configuration: {e}")
                    }
                }
                jumpgate_daemon::sd_notify("READY=1");
            }
        });
    }
}

/// Warns when the allocation range overlaps the kernel's ephemeral port range: outgoing
/// connections on the jump host would then take ports the relay means to hand out.
fn warn_if_ephemeral_overlap(range: jumpgate_lease::PortRange) {
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

/// Binds and keeps the port of every lease restored from the state dir, so its agent finds it
/// again and no other process takes it while the relay restarts its sessions.
async fn keep_leased_ports(
    leases: &LeaseStore,
    ports: &Ports,
    bind_ip: std::net::IpAddr,
) -> Result<(), StoreError> {
    for lease in leases.views().await? {
        let bound = std::net::TcpListener::bind((bind_ip, lease.port)).and_then(|l| {
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)
        });
        match bound {
            Ok(listener) => ports.keep(
                listener,
                lease.port,
                &lease.key.agent,
                &lease.key.service,
                None,
            ),
            Err(e) => tracing::warn!(
                agent = %lease.key.agent, service = %lease.key.service, port = lease.port,
                "cannot keep the port of a restored lease on {bind_ip}:{} (--proxy-bind / proxy_bind): {e}; the agent gets another port if it is still taken when it reconnects", lease.port
            ),
        }
    }
    Ok(())
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
