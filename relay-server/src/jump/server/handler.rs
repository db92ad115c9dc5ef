//! russh's per-connection handler for the jump listener: a key or certificate the access
//! files admit authenticates; of the channels, only `direct-tcpip` opens (routed by
//! [`route`](super::route)), and sessions, X11 and remote forwards are refused with a reason
//! OpenSSH prints.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use russh::keys::Certificate;
use russh::server::{
    Auth, ChannelOpenHandle, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelOpenFailure};
use tokio::sync::oneshot;

use crate::jump::auth::JumpUser;
use crate::users::carry::spawn_carry_stream;

use super::{Jump, PROHIBITED};

/// What a connection authenticated with.
pub(super) enum Credential {
    /// A plain public key.
    Key(russh::keys::PublicKey),
    /// A user certificate from a trusted CA.
    Certificate(Box<Certificate>),
}

/// One SSH connection's state.
pub(super) struct Conn {
    /// The listener's state.
    pub(super) jump: Arc<Jump>,
    /// The client's address.
    pub(super) peer: SocketAddr,
    /// Set once authenticated.
    pub(super) user: Option<JumpUser>,
    /// The key or certificate it authenticated with, checked again against the access files
    /// in force at every channel open: a reload that removes it stops new channels on
    /// connections (a ControlMaster's) that are already in.
    pub(super) credential: Option<Credential>,
    /// Fired once authenticated, which ends the handshake deadline.
    pub(super) authed: Option<oneshot::Sender<()>>,
    /// Keys and certificates refused so far.
    pub(super) rejected: Arc<AtomicU32>,
}

impl Conn {
    /// The answer to a key or certificate the access files `checked`: accepted, it becomes the
    /// connection's user and credential; refused, it counts towards a ban of the source.
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
