//! What the agent says first and how it reads the relay's answer: the one place a hello is built.
//!
//! [`session_hello`] is the hello that opens a session (identity, services, ports asked for);
//! [`lane_hello`] the one that joins an extra lane to it. [`session_answer`] / [`lane_answer`]
//! read the relay's [`RelayHello`], and [`Placement`] is what an acceptance grants this agent:
//! only its own services, each once, every string the relay chose sanitized for logs and the
//! status file.

use std::collections::HashMap;

use jumpgate_proto::display::MAX_FIELD_LEN;
use jumpgate_proto::tunnel::TunnelHello;
use jumpgate_proto::{
    sanitize, Accepted, AgentHello, Allocation, Cidr, Refusal, RelayHello, Secret, ServiceRequest,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};

/// Who the agent is and what it offers: everything a hello says. One per agent today; a host
/// agent carrying several names (issue 28) will hold one per name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Agent name; leases are keyed by it.
    pub name: String,
    /// The credential, `None` with a client certificate. Masked in Debug output ([`Secret`]).
    pub token: Option<Secret>,
    /// Software and version, for the relay's logs (`worker-agent 0.1.0`).
    pub software: String,
    /// Most connections the agent keeps to one relay, the first included (`--max-lanes`).
    pub max_lanes: u16,
    /// Services to expose, in configuration order.
    pub services: Vec<Service>,
    /// OpenSSH public keys that alone may reach this agent through the relay's jump listener
    /// (`--jump-authorized-keys`); empty leaves it to the relay's own jump policy.
    pub jump_keys: Vec<String>,
    /// A host agent's own identity (issue 28): its session carries tunnels registered with
    /// their own identities ([`tunnel_hello`]) and offers no services of its own.
    pub host: bool,
}

/// One service as the agent asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Service name, e.g. `ssh`.
    pub name: String,
    /// Port of the local target (lets name routing pick a service by port).
    pub target_port: u16,
    /// The public port configured for it, if any.
    pub preferred_port: Option<u16>,
    /// Refuse any other port than `preferred_port` (only meaningful with one).
    pub strict: bool,
    /// Who may connect (empty: whoever the relay allows).
    pub allow: Vec<Cidr>,
    /// Only through the relay's name router, no public port.
    pub no_port: bool,
}

impl Identity {
    /// Whether `service` is one this agent asked for.
    pub fn offers(&self, service: &str) -> bool {
        self.services.iter().any(|s| s.name == service)
    }
}

/// The hello opening a session. A service without a configured port asks for the port this
/// relay gave it before (`remembered`), so a relay that lost its lease file still hands it back
/// when it can; `strict` is sent only with a configured port.
pub fn session_hello(identity: &Identity, remembered: &HashMap<String, u16>) -> AgentHello {
    AgentHello {
        services: service_requests(identity, remembered),
        jump_keys: identity.jump_keys.clone(),
        host: identity.host,
        ..bare_hello(identity)
    }
}

/// What a host session registers for one job's tunnel (`identity`: the tunnel's name,
/// credential, services and jump keys; its software and lanes are the host session's): the
/// same requests a session hello of that identity would make, so a tunnel and an agent of its
/// own ask for ports alike.
pub fn tunnel_hello(identity: &Identity, remembered: &HashMap<String, u16>) -> TunnelHello {
    TunnelHello {
        name: identity.name.clone(),
        token: identity.token.clone(),
        services: service_requests(identity, remembered),
        jump_keys: identity.jump_keys.clone(),
    }
}

/// The service requests of a hello: a service without a configured port asks for the one this
/// relay gave before.
fn service_requests(identity: &Identity, remembered: &HashMap<String, u16>) -> Vec<ServiceRequest> {
    identity
        .services
        .iter()
        .map(|s| ServiceRequest {
            name: s.name.clone(),
            target_port: s.target_port,
            preferred_port: s
                .preferred_port
                .or_else(|| remembered.get(&s.name).copied()),
            strict: s.strict && s.preferred_port.is_some(),
            allow: s.allow.clone(),
            no_port: s.no_port,
        })
        .collect()
}

/// The hello of one more lane joining the live session `key` belongs to: no services, no lanes.
pub fn lane_hello(identity: &Identity, key: &Secret) -> AgentHello {
    AgentHello {
        max_lanes: 0,
        lane_of: Some(key.clone()),
        ..bare_hello(identity)
    }
}

/// A hello naming the agent, without services.
fn bare_hello(identity: &Identity) -> AgentHello {
    AgentHello {
        min_version: PROTOCOL_VERSION_MIN,
        max_version: PROTOCOL_VERSION_MAX,
        name: identity.name.clone(),
        token: identity.token.clone(),
        services: Vec::new(),
        software: identity.software.clone(),
        max_lanes: identity.max_lanes,
        lane_of: None,
        jump_keys: Vec::new(),
        host: false,
    }
}

/// Why the relay's answer is not the one the hello wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerError {
    /// The relay turned the agent away (its text unsanitized: the driver sanitizes as it
    /// reports; see [`Refusal::sanitized`]).
    Refused(Refusal),
    /// An answer that belongs to the other kind of hello; the text says which.
    Unexpected(&'static str),
}

/// Reads the answer to a [`session_hello`].
pub fn session_answer(reply: RelayHello) -> Result<Accepted, AnswerError> {
    match reply {
        RelayHello::Accepted(accepted) => Ok(accepted),
        RelayHello::Refused(refusal) => Err(AnswerError::Refused(refusal)),
        RelayHello::LaneJoined => Err(AnswerError::Unexpected(
            "a lane confirmation to a session hello",
        )),
    }
}

/// Reads the answer to a [`lane_hello`].
pub fn lane_answer(reply: RelayHello) -> Result<(), AnswerError> {
    match reply {
        RelayHello::LaneJoined => Ok(()),
        RelayHello::Refused(refusal) => Err(AnswerError::Refused(refusal)),
        RelayHello::Accepted(_) => Err(AnswerError::Unexpected(
            "a session acceptance to a lane hello",
        )),
    }
}

/// A port the relay placed one of this agent's services on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The service (one this agent asked for).
    pub name: String,
    /// Its public port; 0 for a service reachable only through the router.
    pub port: u16,
    /// Why the port differs from the one asked for, sanitized.
    pub note: Option<String>,
}

/// What an acceptance grants this agent, safe to log and publish: the relay cannot forge log
/// lines (every string sanitized) nor print thousands of them (allocations for services the
/// agent did not ask for, or repeated ones, are dropped and only counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The host users connect to.
    pub public_host: String,
    /// The relay's name router (`host:port`), if it has one.
    pub router: Option<String>,
    /// This agent's services with their ports, in the relay's order, each once.
    pub ports: Vec<Placed>,
    /// Allocations dropped: not this agent's services, or listed twice.
    pub ignored: usize,
}

impl Placement {
    /// The placement `accepted` grants `identity`.
    pub fn of(accepted: &Accepted, identity: &Identity) -> Self {
        Self::of_allocations(
            &accepted.public_host,
            accepted.router.as_deref(),
            &accepted.services,
            identity,
        )
    }

    /// The placement a relay (`public_host`, `router`: its acceptance's) grants `identity` with
    /// `allocations`: a session's own, or a registered tunnel's
    /// ([`TunnelReply::Accepted`](jumpgate_proto::tunnel::TunnelReply::Accepted)).
    pub fn of_allocations(
        public_host: &str,
        router: Option<&str>,
        allocations: &[Allocation],
        identity: &Identity,
    ) -> Self {
        let mut ports: Vec<Placed> = Vec::new();
        let mut ignored = 0usize;
        for a in allocations {
            if !identity.offers(&a.name) || ports.iter().any(|p| p.name == a.name) {
                ignored += 1;
                continue;
            }
            ports.push(Placed {
                name: a.name.clone(),
                port: a.port,
                note: a
                    .note
                    .as_deref()
                    .map(|n| sanitize(n, MAX_FIELD_LEN).into_owned()),
            });
        }
        Placement {
            public_host: sanitize(public_host, MAX_FIELD_LEN).into_owned(),
            router: router.map(|r| sanitize(r, MAX_FIELD_LEN).into_owned()),
            ports,
            ignored,
        }
    }

    /// The port of `service`, if the relay placed it.
    pub fn port_of(&self, service: &str) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == service)
            .map(|p| p.port)
    }
}
