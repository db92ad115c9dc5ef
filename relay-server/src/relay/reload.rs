//! Live re-configuration: what a SIGHUP (`systemctl reload`) re-reads and puts in force while
//! the relay runs, and the task that waits for the signal.

use std::sync::Arc;

use crate::agents::Agents;
use crate::jump;
use crate::policy::Policy;
use crate::{RelayConfig, RelayError};

use super::Relay;

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

impl Relay {
    /// A handle that re-reads the configuration's live parts (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader {
            agents: self.agents.clone(),
            jump: self.jump.as_ref().map(|(_, jump)| jump.clone()),
            signer: self.operator.jump_signer.clone(),
        }
    }

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
