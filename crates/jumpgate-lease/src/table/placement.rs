//! Placement: granting ports to an agent's services, all or none. The rule: renew an existing
//! lease, else the preferred port if it is in range, not leased to another and bindable, else
//! the least recently freed bindable port. An attempt runs in place and is undone through the
//! [`undo`](super::undo) log when the caller refuses it or it fails.

use super::undo::UndoLog;
use super::{LeaseKey, LeaseTable};
use crate::grant::{AllocError, Attempt, Grant, GrantKind, ServiceAsk};

impl LeaseTable {
    /// Grants ports to all of `agent`'s services, or none of them.
    ///
    /// `bindable` is asked before any port is promised. An existing lease is renewed; a preferred
    /// port is granted when it is in range, not leased to someone else and bindable; otherwise a
    /// free port is taken, least recently freed first. On error the table is unchanged.
    pub fn acquire(
        &mut self,
        agent: &str,
        asks: &[ServiceAsk],
        now: u64,
        bindable: &mut dyn FnMut(u16) -> bool,
    ) -> Result<Vec<Grant>, AllocError> {
        match self.try_acquire(agent, asks, now, bindable, &mut |_| true)? {
            Attempt::Committed(grants) | Attempt::RolledBack(grants) => Ok(grants),
        }
    }

    /// [`LeaseTable::acquire`], kept only if `accept` says yes to the grants; otherwise (and on
    /// error) the table is left exactly as it was. Every port `bindable` answered `true` for is
    /// granted, so a caller that answers `true` for ports it has not bound yet learns which ports
    /// to bind, refuses, binds them, and tries again, all without copying the table.
    pub fn try_acquire(
        &mut self,
        agent: &str,
        asks: &[ServiceAsk],
        now: u64,
        bindable: &mut dyn FnMut(u16) -> bool,
        accept: &mut dyn FnMut(&[Grant]) -> bool,
    ) -> Result<Attempt, AllocError> {
        self.undo = Some(UndoLog::default());
        self.retire_unasked(agent, asks, now);
        let grants = asks
            .iter()
            .map(|ask| self.acquire_one(agent, ask, now, bindable))
            .collect::<Result<Vec<_>, _>>();
        let log = self.undo.take().unwrap_or_default();
        match grants {
            Ok(grants) if accept(&grants) => Ok(Attempt::Committed(grants)),
            Ok(grants) => {
                self.roll_back(log);
                Ok(Attempt::RolledBack(grants))
            }
            Err(e) => {
                self.roll_back(log);
                Err(e)
            }
        }
    }

    /// Frees the leases of `agent`'s services that `asks` no longer lists: a name's services are
    /// the ones its latest placement asks for, so renaming services cannot pile up ports (each
    /// would otherwise wait out the TTL, uncounted by the credential's lease cap). Returns the
    /// freed ports.
    pub fn retire_unasked(&mut self, agent: &str, asks: &[ServiceAsk], now: u64) -> Vec<u16> {
        let dropped: Vec<LeaseKey> = self
            .leases_of(agent)
            .filter(|(service, _)| !asks.iter().any(|a| a.service == *service))
            .map(|(service, _)| LeaseKey::new(agent, service))
            .collect();
        dropped
            .iter()
            .filter_map(|key| self.remove_lease(key, now))
            .collect()
    }

    /// One service's grant, changing the table in place (recorded in the undo log).
    pub(super) fn acquire_one(
        &mut self,
        agent: &str,
        ask: &ServiceAsk,
        now: u64,
        bindable: &mut dyn FnMut(u16) -> bool,
    ) -> Result<Grant, AllocError> {
        let key = LeaseKey::new(agent, ask.service.clone());
        let current = self.leases.get(&key).map(|l| l.port);
        let grant = |port, kind, note| Grant {
            service: ask.service.clone(),
            port,
            kind,
            note,
        };

        // A preferred port that differs from the current lease moves the lease when possible.
        if let Some(want) = ask.preferred.filter(|&p| Some(p) != current) {
            match self.why_not(want, &key, bindable) {
                None => {
                    self.remove_lease(&key, now);
                    self.insert_lease(key, want);
                    return Ok(grant(want, GrantKind::Preferred, None));
                }
                Some(why) if ask.strict => {
                    return Err(AllocError::PreferredUnavailable {
                        service: ask.service.clone(),
                        port: want,
                        why,
                    });
                }
                Some(why) => {
                    let note = format!("preferred port {want} {why}");
                    return self
                        .renew_or_fresh(key, current, now, bindable, Some(note))
                        .map(|(port, kind, note)| grant(port, kind, note));
                }
            }
        }
        self.renew_or_fresh(key, current, now, bindable, None)
            .map(|(port, kind, note)| grant(port, kind, note))
    }

    /// Renews `current` if it is still bindable, else leases a fresh port.
    fn renew_or_fresh(
        &mut self,
        key: LeaseKey,
        current: Option<u16>,
        now: u64,
        bindable: &mut dyn FnMut(u16) -> bool,
        note: Option<String>,
    ) -> Result<(u16, GrantKind, Option<String>), AllocError> {
        if let Some(port) = current {
            if bindable(port) {
                self.set_active(&key, true, now);
                return Ok((port, GrantKind::Renewed, note));
            }
            // Another process took the port while the agent was away: move on.
            self.remove_lease(&key, now);
            let note = Some(format!(
                "previous port {port} is in use by another process on the relay"
            ));
            return self
                .fresh(key, bindable)
                .map(|p| (p, GrantKind::Fresh, note));
        }
        self.fresh(key, bindable)
            .map(|p| (p, GrantKind::Fresh, note))
    }

    /// Why `port` cannot be granted to `key`, or `None` if it can (and has been probed bindable).
    fn why_not(
        &self,
        port: u16,
        key: &LeaseKey,
        bindable: &mut dyn FnMut(u16) -> bool,
    ) -> Option<String> {
        if !self.range.contains(port) {
            return Some(format!("is outside the relay's port range {}", self.range));
        }
        match self.owners.get(&port) {
            Some(owner) if owner != key => return Some("is leased to another agent".into()),
            _ => {}
        }
        if !bindable(port) {
            return Some("is in use by another process on the relay".into());
        }
        None
    }

    fn fresh(
        &mut self,
        key: LeaseKey,
        bindable: &mut dyn FnMut(u16) -> bool,
    ) -> Result<u16, AllocError> {
        let port = self
            .free
            .iter()
            .map(|&(_, p)| p)
            .find(|&p| bindable(p))
            .ok_or(AllocError::Exhausted {
                lo: self.range.lo(),
                hi: self.range.hi(),
                in_use: self.owners.len(),
            })?;
        self.insert_lease(key, port);
        Ok(port)
    }
}
