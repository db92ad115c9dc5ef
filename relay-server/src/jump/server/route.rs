//! Where a `direct-tcpip` channel goes: the agent and service its `HOST:PORT` names (the
//! router's rule), and whether the connection's user may reach them under the access files in
//! force now, the agent's own jump keys and the public side's admission.

use std::sync::Arc;
use std::time::SystemTime;

use russh::ChannelOpenFailure;

use crate::jump::auth::JumpUser;
use crate::users::router::resolve;

use super::handler::{Conn, Credential};
use super::{CONNECT_FAILED, PROHIBITED};

impl Conn {
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
    pub(super) fn route(
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
