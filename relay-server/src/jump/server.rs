//! The jump listener's SSH server: its state ([`Jump`]: who may jump, the host key and
//! certificate, the caps), swapped in part by a reload, and russh's settings for it.
//!
//! Strangers get as little as on the agent port: an address outside the relay's allowlist is
//! closed at accept; unauthenticated connections hold a place in a global cap and in their
//! source's share of it (an IPv6 /64 counts once) and must authenticate within
//! [`AUTH_TIMEOUT`](accept::AUTH_TIMEOUT). Once in, a connection may only open `direct-tcpip` channels; everything
//! else is refused with a reason OpenSSH prints.
//!
//! - [`accept`]: the accept loop (allowlist, bans, caps) and one connection's life, with its
//!   authentication deadline.
//! - [`handler`]: russh's per-connection handler: which keys and certificates authenticate,
//!   which channels open.
//! - [`route`]: where a `direct-tcpip` channel goes, and whether this user may go there.

mod accept;
mod handler;
mod route;

pub(crate) use accept::serve;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{Certificate, PrivateKey};
use russh::server::Config;
use russh::{MethodKind, MethodSet, SshId};
use tokio::sync::Semaphore;

use crate::agents::registry::Registry;
use crate::guard::{AuthGuard, PerSource};
use crate::users::router::share_per_source;
use crate::users::Users;

use super::auth::Access;

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
