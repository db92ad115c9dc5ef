//! Placing an agent's services: the loop of backend attempts and binds (see the module comment
//! of [`super`]), the ports a placement holds while it binds, and the per-credential caps both
//! backends check.

use std::collections::{HashMap, HashSet};

use jumpgate_lease::{AllocError, Attempt, Grant, ServiceAsk};

use super::{postgres, Backend, LeaseStore, StoreError};
use crate::claims::CredentialCaps;

/// Most rounds of "attempt, bind what the attempt needs" before a placement gives up. Every round
/// either succeeds or learns that at least one more port cannot be bound, so this is reached only
/// where over a thousand ports of the range are held by other processes (or are taken faster
/// than the relay can look).
const MAX_PLACEMENT_ROUNDS: usize = 1024;

/// Ports granted to one agent's services, with a listener (of the caller's kind) for each.
pub struct Placement<L> {
    /// One grant per ask, in the asks' order.
    pub grants: Vec<Grant>,
    /// The listener for every granted port.
    pub listeners: HashMap<u16, L>,
}

/// Why an agent's services got no ports.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// The table said no (range exhausted, strict preferred port unavailable).
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// Ports kept turning out unbindable; the relay's problem, not the agent's.
    #[error("ports kept being taken by other processes while the relay bound them")]
    Unsettled,
    /// The name's leases belong to another identity.
    #[error("the name's leases are held by another identity")]
    HeldByAnother,
    /// The identity holds as many names or leases as its caps allow; says which cap.
    #[error("the credential holds its maximum of {0}")]
    CredentialFull(String),
    /// The shared store says the agent holds `port`, and this relay cannot bind it: moving the
    /// agent would give it a second port in the fleet, so it is told to come back later.
    #[error("the agent's port {port} is held by another process on this relay; the fleet keeps the agent on that port")]
    LocalConflict {
        /// The agent's port.
        port: u16,
    },
    /// The store could not be reached; transient.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one agent asks of a backend: its name, who it is, what that identity may hold, and its
/// services' wishes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim<'a> {
    /// The agent name.
    pub agent: &'a str,
    /// The credential's identity, which must hold (or come to hold) the name.
    pub identity: &'a str,
    /// The identity's caps (`None`: not capped).
    pub caps: Option<CredentialCaps>,
    /// One per service that wants a port.
    pub asks: &'a [ServiceAsk],
}

/// The ports one placement has bound and not yet committed, in [`LeaseStore`]'s `binding` set
/// until the placement ends either way.
struct Binding<'a> {
    store: &'a LeaseStore,
    ports: Vec<u16>,
}

impl Binding<'_> {
    fn hold(&mut self, port: u16) {
        self.store
            .binding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port);
        self.ports.push(port);
    }
}

impl Drop for Binding<'_> {
    fn drop(&mut self) {
        let mut binding = self.store.binding.lock().unwrap_or_else(|p| p.into_inner());
        for port in &self.ports {
            binding.remove(port);
        }
    }
}

impl LeaseStore {
    /// Grants ports to all of `agent`'s services, or none, each with its listener made by
    /// `bind`, and records `identity` as the name's holder; a name whose leases another identity
    /// holds is refused, and so is a placement that would take `identity` past its `caps`.
    /// Call [`LeaseStore::persist`] before telling the agent.
    ///
    /// The backend attempts with what is known (ports bound in an earlier round, ports found
    /// taken) and keeps the attempt only if every granted port is bound (see the module
    /// comment for where binding happens); otherwise it attempts again. Decisions are the
    /// backend's own: a port another process holds is skipped exactly as if it had been probed
    /// under the lock.
    pub async fn place<L>(
        &self,
        agent: &str,
        identity: &str,
        caps: Option<CredentialCaps>,
        asks: &[ServiceAsk],
        mut bind: impl FnMut(u16) -> Option<L>,
    ) -> Result<Placement<L>, PlaceError> {
        let claim = Claim {
            agent,
            identity,
            caps,
            asks,
        };
        let mut listeners: HashMap<u16, L> = HashMap::new();
        let mut taken: HashSet<u16> = HashSet::new();
        let mut mine = Binding {
            store: self,
            ports: Vec::new(),
        };
        for _ in 0..MAX_PLACEMENT_ROUNDS {
            let now = self.now();
            let bound: HashSet<u16> = listeners.keys().copied().collect();
            // Ports other placements here are binding count as taken for this one.
            let avoid: HashSet<u16> = {
                let binding = self.binding.lock().unwrap_or_else(|p| p.into_inner());
                taken
                    .iter()
                    .chain(binding.iter().filter(|p| !bound.contains(p)))
                    .copied()
                    .collect()
            };
            // Binds `port` unless it is bound or known taken; whether it is bound now.
            let mut try_bind = |port: u16| {
                if listeners.contains_key(&port) {
                    return true;
                }
                if taken.contains(&port) {
                    return false;
                }
                match bind(port) {
                    Some(listener) => {
                        listeners.insert(port, listener);
                        mine.hold(port);
                        true
                    }
                    None => {
                        taken.insert(port);
                        false
                    }
                }
            };
            let (attempt, expired) = match &self.backend {
                Backend::File(f) => f.attempt(claim, now, &avoid, &bound),
                Backend::Postgres(p) => {
                    let ports = postgres::KnownPorts {
                        taken: &avoid,
                        bound: &bound,
                    };
                    p.attempt(&self.me.id, claim, now, ports, &mut try_bind)
                        .await
                }
            };
            self.announce(expired);
            match attempt? {
                Attempt::Committed(grants) => {
                    listeners.retain(|port, _| grants.iter().any(|g| g.port == *port));
                    return Ok(Placement { grants, listeners });
                }
                Attempt::RolledBack(grants) => {
                    for grant in &grants {
                        try_bind(grant.port);
                    }
                }
            }
        }
        Err(PlaceError::Unsettled)
    }
}

/// Whether an identity that holds `held` (names, leases), `this_name` of them under the name
/// being placed (`new_name`: a name it does not hold yet) and replaced by this placement, may
/// hold `asks` leases under that name within `caps`. Both backends count under the same lock as
/// the placement, and the placement frees the name's leases of services it no longer asks for,
/// so the name holds exactly `asks` leases afterwards; in a fleet, while the name is live on
/// another relay, those leases stay (that relay may serve them) and are left out of
/// `this_name`, so they count. A name counts whether or not it asks for ports: a live
/// `--no-port` agent holds its name as much as one with ports.
pub(crate) fn check_caps(
    caps: CredentialCaps,
    held: (usize, usize),
    this_name: usize,
    new_name: bool,
    asks: usize,
) -> Result<(), PlaceError> {
    let (names, leases) = held;
    if names + usize::from(new_name) > caps.names {
        return Err(PlaceError::CredentialFull(format!(
            "{} agent names",
            caps.names
        )));
    }
    if leases.saturating_sub(this_name) + asks > caps.leases {
        return Err(PlaceError::CredentialFull(format!(
            "{} leased ports",
            caps.leases
        )));
    }
    Ok(())
}
