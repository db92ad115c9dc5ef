//! The jump listener's accept loop and its per-connection SSH handler.
//!
//! Strangers get as little as on the agent port: an address outside the relay's allowlist is
//! closed at accept; unauthenticated connections hold a place in a global cap and in their
//! source's share of it (an IPv6 /64 counts once) and must authenticate within
//! [`AUTH_TIMEOUT`]. Once in, a connection may only open `direct-tcpip` channels; everything
//! else is refused with a reason OpenSSH prints.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use jumpgate_proto::Cidr;
use russh::keys::{Certificate, PrivateKey};
use russh::server::{
    Auth, ChannelOpenHandle, Config, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelOpenFailure, Disconnect, MethodKind, MethodSet, SshId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::agents::registry::Registry;
use crate::guard::{AuthGuard, PerSource, SourceSlot};
use crate::net::{accept_backoff, rate_limited_warn};
use crate::users::carry::spawn_carry_stream;
use crate::users::router::{resolve, share_per_source};
use crate::users::Users;

use super::auth::{Access, JumpUser};

/// Time from accept to a successful authentication.
pub(crate) const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// SSH_OPEN_ADMINISTRATIVELY_PROHIBITED: OpenSSH prints "administratively prohibited: REASON".
const PROHIBITED: u32 = 1;
/// SSH_OPEN_CONNECT_FAILED: OpenSSH prints "connect failed: REASON".
const CONNECT_FAILED: u32 = 2;

/// What the jump listener needs: the public side (admission, carrying, audit), the live
/// agents, who may jump, and the SSH server's settings.
pub(crate) struct Jump {
    /// Admission and carrying, as on allocated ports and the router.
    pub users: Arc<Users>,
    /// Live agents by name.
    pub registry: Arc<Registry>,
    /// Who may jump; swapped whole by a reload (SIGHUP), read once per authentication.
    access: std::sync::RwLock<Arc<Access>>,
    /// russh's settings (host key, host certificate, algorithms, windows); swapped whole when a
    /// reload brings a new host certificate, read once per connection.
    ssh: std::sync::RwLock<Arc<Config>>,
    /// The host key, kept to rebuild [`Jump::ssh`] with a new certificate and to check one.
    host_key: PrivateKey,
    /// Caps connections that have not authenticated yet.
    pub handshakes: Arc<Semaphore>,
    /// Caps unauthenticated connections per source address.
    pub per_source: Arc<PerSource>,
    /// Most unauthenticated connections one source may hold.
    pub max_per_source: usize,
    /// Bans sources whose connections keep failing to authenticate. Its own, so a flood on
    /// the jump port can never ban the workers' addresses from the agent port.
    pub guard: AuthGuard,
}

impl Jump {
    /// Builds the listener's state; `max_handshakes` caps unauthenticated connections as on
    /// the agent port.
    pub fn new(
        users: Arc<Users>,
        registry: Arc<Registry>,
        access: Access,
        host_key: PrivateKey,
        host_certificate: Option<Certificate>,
        max_handshakes: usize,
        guard: AuthGuard,
    ) -> Self {
        Self {
            users,
            registry,
            access: std::sync::RwLock::new(Arc::new(access)),
            ssh: std::sync::RwLock::new(Arc::new(ssh_config(host_key.clone(), host_certificate))),
            host_key,
            handshakes: Arc::new(Semaphore::new(max_handshakes)),
            per_source: Arc::default(),
            max_per_source: share_per_source(max_handshakes),
            guard,
        }
    }
}

impl Jump {
    /// Who may jump now.
    pub fn access(&self) -> Arc<Access> {
        self.access
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts re-read access files in force for new authentications and for every channel
    /// opened from now on (also on connections that authenticated before).
    pub fn replace_access(&self, access: Access) {
        *self.access.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(access);
    }

    /// The SSH settings new connections get.
    fn ssh(&self) -> Arc<Config> {
        self.ssh.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The host key, for checking a host certificate against it.
    pub fn host_key(&self) -> &PrivateKey {
        &self.host_key
    }

    /// Presents `certificate` (or none) to connections from now on (a reload that brought a
    /// renewed `jump_host_certificate`); connections already in keep what they saw.
    pub fn replace_certificate(&self, certificate: Option<Certificate>) {
        let config = Arc::new(ssh_config(self.host_key.clone(), certificate));
        *self.ssh.write().unwrap_or_else(|p| p.into_inner()) = config;
    }
}

/// russh's settings for the jump listener: `host_key`, offered with `host_certificate` to
/// clients that trust its CA.
fn ssh_config(host_key: PrivateKey, host_certificate: Option<Certificate>) -> Config {
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    Config {
        server_id: SshId::Standard(Cow::Borrowed("SSH-2.0-jumpgate")),
        methods,
        keys: vec![host_key],
        // Offered to clients that ask for certificates (an @cert-authority known_hosts).
        certificates: host_certificate.into_iter().collect(),
        // OpenSSH probes with "none" first: answer that at once; wrong keys cost a moment.
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        max_auth_attempts: 6,
        // A quiet interactive session is fine; a dead peer is found by keepalives.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        // Windows for a long user leg. The client may send this much before the relay says
        // "more": russh tops it up once half is used, so in flight is between half and all of
        // it. At 2 MiB (russh's default) that is 1-2 MiB per round trip, below the 2 MiB the
        // job's own sshd allows the session inside, so `scp -J` ran at 0.46x the port path's
        // with the user 20 ms away; 8 MiB keeps at least 4 MiB in flight (1 Gbit/s x 20 ms is
        // 2.5 MB). It costs no memory: what the relay has not passed on waits in at most
        // `channel_buffer_size` packets (32 x 32 KiB = 1 MiB per channel, not russh's 3.2 MiB),
        // then the connection stops reading and TCP holds the rest.
        window_size: 8 << 20,
        channel_buffer_size: 32,
        // Packets on their way out to the user (the client's window, 2 MiB for OpenSSH,
        // bounds them too): 32 x 32 KiB between the copy and the socket, not 10.
        event_buffer_size: 32,
        ..Config::default()
    }
}

/// An unauthenticated connection's places in the caps, given back once it authenticates.
struct HandshakeSlot {
    _global: OwnedSemaphorePermit,
    _source: SourceSlot,
}

/// Accepts jump connections until shutdown.
pub(crate) async fn serve(listener: TcpListener, jump: Arc<Jump>) {
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    loop {
        let accepted = tokio::select! {
            _ = jump.users.shutdown.cancelled() => return,
            _ = sweep.tick() => {
                jump.guard.sweep(Instant::now());
                continue;
            }
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_backoff("jump port", e).await;
                continue;
            }
        };
        if !Cidr::allows(&jump.users.policy.current().users.allow, peer.ip()) {
            jump.users
                .metrics
                .refused(crate::metrics::RefusedBy::Allowlist);
            continue;
        }
        // `ban_exempt_cidr` (live, as on the agent port) spares addresses from bans.
        let exempt = |ip| {
            jump.users
                .policy
                .current()
                .ban_exempt
                .iter()
                .any(|c: &Cidr| c.contains(ip))
        };
        if jump.guard.is_banned(peer.ip(), Instant::now()) && !exempt(peer.ip()) {
            rate_limited_warn(
                "jump banned",
                || tracing::warn!(%peer, "jump: closing a connection from banned {}", peer.ip()),
            );
            continue;
        }
        let Some(source) = jump.per_source.try_take(peer.ip(), jump.max_per_source) else {
            rate_limited_warn(
                "jump handshakes per source",
                || tracing::warn!(%peer, "jump: too many unauthenticated connections from {}; closing its new ones", peer.ip()),
            );
            continue;
        };
        let Ok(global) = jump.handshakes.clone().try_acquire_owned() else {
            rate_limited_warn(
                "jump handshakes",
                || tracing::warn!(%peer, "jump: too many unauthenticated connections; closing new ones"),
            );
            continue;
        };
        let slot = HandshakeSlot {
            _global: global,
            _source: source,
        };
        jump.users
            .conns
            .spawn(connection(tcp, peer, jump.clone(), slot));
    }
}

/// Runs one SSH connection: authentication within [`AUTH_TIMEOUT`] while holding `slot`, then
/// until the client leaves or the relay closes.
async fn connection(tcp: TcpStream, peer: SocketAddr, jump: Arc<Jump>, slot: HandshakeSlot) {
    let _ = tcp.set_nodelay(true);
    let (authed_tx, authed_rx) = oneshot::channel();
    let rejected = Arc::new(AtomicU32::new(0));
    let handler = Conn {
        jump: jump.clone(),
        peer,
        user: None,
        credential: None,
        authed: Some(authed_tx),
        rejected: rejected.clone(),
    };
    // Counts a connection that ends unauthenticated towards a ban of its source: one that was
    // refused a key as a failure, a silent or slow one as a timeout (forgiven up to a point).
    let unauthenticated = |timed_out: bool| {
        let now = Instant::now();
        let banned = if rejected.load(Ordering::Relaxed) > 0 {
            jump.guard.record_failure(peer.ip(), now)
        } else if timed_out {
            jump.guard.record_timeout(peer.ip(), now)
        } else {
            None
        };
        if let Some(ban) = banned {
            tracing::warn!(%peer, "jump: banning {} for {ban:?} after repeated failed authentications", peer.ip());
        }
    };
    let deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
    let started = tokio::time::timeout_at(
        deadline,
        russh::server::run_stream(jump.ssh(), tcp, handler),
    )
    .await;
    let session = match started {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            unauthenticated(false);
            return tracing::debug!(%peer, "jump: handshake failed: {e}");
        }
        Err(_) => {
            unauthenticated(true);
            return tracing::debug!(%peer, "jump: no SSH banner within {AUTH_TIMEOUT:?}");
        }
    };
    let handle = session.handle();
    let mut session = std::pin::pin!(session);
    tokio::select! {
        ended = &mut session => {
            if let Err(e) = ended {
                tracing::debug!(%peer, "jump: connection ended before authentication: {e}");
            }
            unauthenticated(false);
            return;
        }
        authed = tokio::time::timeout_at(deadline, authed_rx) => {
            // The handler is gone: the connection ended before authenticating.
            if matches!(authed, Ok(Err(_))) {
                unauthenticated(false);
                return;
            }
            if authed.is_err() {
                unauthenticated(true);
                tracing::info!(%peer, "jump: no authentication within {AUTH_TIMEOUT:?}; closing");
                let _ = handle
                    .disconnect(
                        Disconnect::ByApplication,
                        format!("authenticate within {AUTH_TIMEOUT:?}"),
                        String::new(),
                    )
                    .await;
                return;
            }
        }
    }
    drop(slot);
    tokio::select! {
        ended = &mut session => {
            if let Err(e) = ended {
                tracing::debug!(%peer, "jump: connection ended: {e}");
            }
        }
        _ = jump.users.close.cancelled() => {
            let _ = handle
                .disconnect(Disconnect::ByApplication, "the relay is shutting down".into(), String::new())
                .await;
        }
    }
}

/// What a connection authenticated with.
enum Credential {
    Key(russh::keys::PublicKey),
    Certificate(Box<Certificate>),
}

/// One SSH connection's state.
struct Conn {
    jump: Arc<Jump>,
    peer: SocketAddr,
    /// Set once authenticated.
    user: Option<JumpUser>,
    /// The key or certificate it authenticated with, checked again against the access files
    /// in force at every channel open: a reload that removes it stops new channels on
    /// connections (a ControlMaster's) that are already in.
    credential: Option<Credential>,
    /// Fired once authenticated, which ends the handshake deadline.
    authed: Option<oneshot::Sender<()>>,
    /// Keys and certificates refused so far.
    rejected: Arc<AtomicU32>,
}

impl Conn {
    fn accepted(
        &mut self,
        login: &str,
        credential: Credential,
        checked: Result<JumpUser, String>,
    ) -> Auth {
        match checked {
            Ok(user) => {
                tracing::info!(peer = %self.peer, "jump: {} authenticated", user.audit());
                self.user = Some(user);
                self.credential = Some(credential);
                Auth::Accept
            }
            Err(why) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %self.peer, login = %jumpgate_proto::sanitize(login, 64), "jump: refused: {why}");
                Auth::reject()
            }
        }
    }

    /// An audit record for a user the agent's rules keep out, naming the user's key.
    fn audit_refused(
        &self,
        agent: &str,
        service: &crate::agents::registry::ServiceEndpoint,
        user: &JumpUser,
        why: &str,
    ) {
        self.jump.users.audit.record(crate::audit::Record {
            start: crate::audit::timestamp(SystemTime::now()),
            src: self.peer.to_string(),
            relay_port: service.port,
            agent: agent.to_string(),
            service: service.name.to_string(),
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            outcome: crate::audit::Outcome::RefusedUser,
            detail: Some(why.to_string()),
            user: Some(user.audit()),
        });
    }

    /// Why a `direct-tcpip` open to `host:port` is refused, or the place it takes.
    fn route(
        &self,
        host: &str,
        port: u32,
    ) -> Result<
        (
            crate::users::admission::Admitted,
            Arc<crate::agents::registry::AgentSession>,
            crate::agents::registry::ServiceEndpoint,
            String,
        ),
        ChannelOpenFailure,
    > {
        let refuse = |code, reason: String| ChannelOpenFailure::Other { code, reason };
        let (Some(user), Some(credential)) = (&self.user, &self.credential) else {
            return Err(refuse(PROHIBITED, "not authenticated".into()));
        };
        let port = u16::try_from(port)
            .map_err(|_| refuse(CONNECT_FAILED, format!("port {port} is out of range")))?;
        let (agent, service) = resolve(&self.jump.registry, &format!("{host}:{port}"))
            .map_err(|(_, why)| refuse(CONNECT_FAILED, why))?;
        // The access files in force now, not those the connection authenticated against.
        let access = self.jump.access();
        let current = match credential {
            Credential::Key(key) => access.check_key(key),
            Credential::Certificate(cert) => access.check_certificate(cert, SystemTime::now()),
        };
        let refused_user = if let Err(why) = current {
            Some(format!(
                "{} is no longer admitted by the jump host ({why}); connect again with a key it admits",
                user.audit()
            ))
        } else if !user.may_reach(&agent.name) {
            Some(format!(
                "your certificate's principals do not include {:?}",
                &*agent.name
            ))
        } else if !user.admitted_by(agent.jump_keys.as_deref()) {
            Some(format!(
                "{:?} admits only the keys in its jump_authorized_keys; yours ({}) is not one of them",
                &*agent.name, user.fingerprint
            ))
        } else {
            None
        };
        if let Some(why) = refused_user {
            self.audit_refused(&agent.name, &service, user, &why);
            return Err(refuse(PROHIBITED, why));
        }
        let users = &self.jump.users;
        let admitted = users
            .admit(self.peer, &agent.name, &agent.permits, &service)
            .map_err(|refused| refuse(PROHIBITED, refused.why.to_string()))?;
        Ok((admitted, agent, service, user.audit()))
    }
}

impl Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        _offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Checked once the key's possession is proven (auth_publickey / certificate).
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        login: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let checked = self.jump.access().check_key(key.public_key);
        Ok(self.accepted(login, Credential::Key(key.public_key.clone()), checked))
    }

    async fn auth_openssh_certificate(
        &mut self,
        login: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let checked = self
            .jump
            .access()
            .check_certificate(certificate, SystemTime::now());
        Ok(self.accepted(
            login,
            Credential::Certificate(Box::new(certificate.clone())),
            checked,
        ))
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(authed) = self.authed.take() {
            let _ = authed.send(());
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::Other {
                code: PROHIBITED,
                reason: "this relay is a jump host and has no shell: use `ssh -J relay job-name`"
                    .into(),
            })
            .await;
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::Other {
                code: PROHIBITED,
                reason: "X11 forwarding is not available on the jump host".into(),
            })
            .await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.route(host_to_connect, port_to_connect) {
            Ok((admitted, agent, service, who)) => {
                tracing::info!(peer = %self.peer, "jump: {who} to {}/{}", agent.name, service.name);
                reply.accept().await;
                spawn_carry_stream(
                    channel.into_stream(),
                    self.peer,
                    admitted,
                    &agent,
                    &service,
                    &self.jump.users,
                    who,
                );
            }
            Err(refused) => {
                if let ChannelOpenFailure::Other { reason, .. } = &refused {
                    tracing::info!(peer = %self.peer, "jump: refused a channel to {}:{port_to_connect}: {reason}", jumpgate_proto::sanitize(host_to_connect, 64));
                }
                reply.reject(refused).await;
            }
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        _port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let _ = session.debug(
            true,
            "remote forwarding (-R) is not available on the jump host",
            "",
        );
        Ok(false)
    }
}
