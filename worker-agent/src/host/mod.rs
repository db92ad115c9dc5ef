//! Host mode (issue 28): one agent per host carrying the tunnels of many jobs over one host
//! session per relay of the fleet.
//!
//! `worker-agent --host-mode` (or `host_mode = true` in its file) runs the ordinary agent with
//! every relay, fleet, trust, proxy and credential option unchanged: its own name and
//! credential only buy it its sessions, it offers no services of its own, and it carries the
//! tunnels added to it, each with its job's name, services and credential. A flag rather than a
//! subcommand, so the same unit file, config file and options serve both modes and the
//! settings layering (flag over file over default) stays one code path.
//!
//! Files, one job each: this one is the interface ([`HostHandle`]: add, remove, list, get;
//! what the local API and the `[[tunnel]]` tables of the config file call), [`table`] the
//! shared tunnel table every relay link's session reads and reports into (and the per-tunnel
//! status files), [`config`] the `[[tunnel]]` tables, [`reload`] re-reads them on SIGHUP.
//! On a relay older than host sessions each tunnel gets a session of its own
//! ([`crate::link::fallback`]). The links themselves are the ordinary agent's
//! ([`crate::link`], [`crate::fleet`]) with a host hello; the protocol is the session core's
//! ([`jumpgate_session::Session::new_host`]).

pub mod api;
pub mod config;
pub mod reload;
pub mod store;
pub mod table;

use std::sync::Arc;
use std::time::Duration;

use jumpgate_proto::{validate_name, Secret};

use crate::service::ServiceSpec;
use crate::status::Endpoint;

pub use table::Table;

/// How long [`HostHandle::add`] waits for the connected relays to answer.
pub const ADD_TIMEOUT: Duration = Duration::from_secs(10);

/// One job's tunnel as the platform asks for it.
#[derive(Clone)]
pub struct TunnelSpec {
    /// The tunnel's name (the job's, e.g. `vh-exec-123`): leases and routing are keyed by it.
    pub name: String,
    /// Services to expose, as `--service` takes them (target, preferred/strict port, allowlist).
    pub services: Vec<ServiceSpec>,
    /// The job's credential (normally its signed join token); `None`: the host's own, which a
    /// relay accepts only for names its operator let the host's credential claim. Never logged
    /// nor printed by Debug.
    pub credential: Option<Secret>,
    /// OpenSSH public keys that alone may reach this tunnel through a relay's `ssh -J`
    /// listener (empty: the relay's own jump policy).
    pub jump_keys: Vec<String>,
}

/// Debug output without the credential's value (and without the keys, which are long).
impl std::fmt::Debug for TunnelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelSpec")
            .field("name", &self.name)
            .field("services", &self.services)
            .field("credential", &self.credential.as_ref().map(|_| "<secret>"))
            .field("jump_keys", &self.jump_keys.len())
            .finish()
    }
}

/// Where one tunnel stands on one relay (serialized as `{"state": "placed", "endpoints": [...]}`
/// and so on, for the local API).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RelayTunnel {
    /// Registered, no answer yet.
    Registering,
    /// Placed: its endpoints on this relay.
    Placed {
        /// One per service (sanitized).
        endpoints: Vec<Endpoint>,
    },
    /// Refused for good on this session (sanitized reason); registered again with the next
    /// session to this relay.
    Refused {
        /// Why.
        reason: String,
    },
    /// Refused or closed for a reason that may pass; registered again after a backoff.
    Retrying {
        /// Why it is out now.
        reason: String,
    },
    /// The session to this relay is lost; the tunnel is registered again (same ports) when it
    /// is back.
    Disconnected,
}

/// One relay's view of a tunnel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RelayView {
    /// The relay (as the link names it, e.g. `relay.example.com:7000`).
    pub relay: String,
    /// Where the tunnel stands there.
    #[serde(flatten)]
    pub state: RelayTunnel,
}

/// What the host knows of one tunnel: for `tunnel ls` / `show` and the answer to an add.
#[derive(Debug, Clone)]
pub struct TunnelView {
    /// The tunnel's name.
    pub name: String,
    /// Its services as asked for.
    pub services: Vec<ServiceSpec>,
    /// Per relay link, where it stands.
    pub relays: Vec<RelayView>,
    /// The public host users connect to (the first relay's that placed it), if placed anywhere.
    pub public_host: Option<String>,
}

impl TunnelView {
    /// Every endpoint the relays placed it on, each once (a fleet with one public host grants
    /// the same endpoint on every relay).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = Vec::new();
        for r in &self.relays {
            if let RelayTunnel::Placed { endpoints } = &r.state {
                for ep in endpoints {
                    if !out.contains(ep) {
                        out.push(ep.clone());
                    }
                }
            }
        }
        out
    }
}

/// Why a tunnel call failed. The texts name the tunnel and say what to do; none holds a
/// credential.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The name is not a valid agent name.
    #[error("invalid tunnel name: {0}")]
    InvalidName(String),
    /// The services are not usable (none, or one given twice).
    #[error("invalid tunnel {name:?}: {detail}")]
    InvalidSpec {
        /// The tunnel.
        name: String,
        /// What is wrong and how to fix it.
        detail: String,
    },
    /// Every relay that answered refused it; the tunnel is not kept.
    #[error("tunnel {name:?} refused: {}", reasons.iter().map(|(r, why)| format!("{r}: {why}")).collect::<Vec<_>>().join("; "))]
    Refused {
        /// The tunnel.
        name: String,
        /// Per relay, why (sanitized).
        reasons: Vec<(String, String)>,
    },
    /// No relay placed it within the time allowed (none connected, or none answered): the
    /// tunnel is kept and registered as relays come.
    #[error("tunnel {name:?} not placed on any relay within {after:?} (no relay connected or none answered); it stays registered and is placed when a relay is back")]
    Timeout {
        /// The tunnel.
        name: String,
        /// The time waited.
        after: Duration,
        /// Where it stands now.
        view: Box<TunnelView>,
    },
    /// No tunnel of that name.
    #[error("no tunnel named {0:?} on this host agent")]
    NotFound(String),
}

/// The host agent's tunnels, for whoever adds and removes them (the local API, the
/// `[[tunnel]]` tables at start-up, tests). Cheap to clone; every clone is the same agent.
#[derive(Clone)]
pub struct HostHandle {
    table: Arc<Table>,
}

impl HostHandle {
    /// A handle on `table` (the one the agent's links carry).
    pub fn new(table: Arc<Table>) -> Self {
        Self { table }
    }

    /// The table behind the handle.
    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    /// Adds `spec` (replacing a tunnel of the same name: its services and credential change
    /// on every relay) and waits until every connected relay answered (or [`ADD_TIMEOUT`]).
    /// Ok once at least one relay placed it; [`TunnelError::Refused`] when every relay that
    /// answered refused it (it is then not kept); [`TunnelError::Timeout`] when none answered
    /// in time (it is kept and placed when a relay is back).
    pub async fn add(&self, spec: TunnelSpec) -> Result<TunnelView, TunnelError> {
        self.add_within(spec, ADD_TIMEOUT).await
    }

    /// [`add`](Self::add) with its own time limit.
    pub async fn add_within(
        &self,
        spec: TunnelSpec,
        timeout: Duration,
    ) -> Result<TunnelView, TunnelError> {
        validate(&spec)?;
        self.table.add(spec, timeout).await
    }

    /// Removes tunnel `name` from every relay (`release`: its ports are freed for others at
    /// once; else they stay leased to the name for a while, as an agent's do). Returns what it
    /// was.
    pub fn remove(&self, name: &str, release: bool) -> Result<TunnelView, TunnelError> {
        self.table.remove(name, release)
    }

    /// Every tunnel, by name.
    pub fn list(&self) -> Vec<TunnelView> {
        self.table.list()
    }

    /// Tunnel `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<TunnelView> {
        self.table.get(name)
    }
}

/// Checks a spec before it reaches any relay.
fn validate(spec: &TunnelSpec) -> Result<(), TunnelError> {
    validate_name("tunnel", &spec.name).map_err(|e| TunnelError::InvalidName(e.to_string()))?;
    let invalid = |detail: String| TunnelError::InvalidSpec {
        name: spec.name.clone(),
        detail,
    };
    if spec.services.is_empty() {
        return Err(invalid(
            "no services; give at least one, e.g. ssh=172.17.0.5:22".into(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = spec.services.iter().find(|s| !seen.insert(s.name.as_str())) {
        return Err(invalid(format!("service {:?} is given twice", dup.name)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, services: &[&str]) -> TunnelSpec {
        TunnelSpec {
            name: name.into(),
            services: services
                .iter()
                .map(|s| ServiceSpec::parse(s).unwrap())
                .collect(),
            credential: Some(Secret::new("job-secret-token")),
            jump_keys: vec![],
        }
    }

    /// Bad names and services are refused before any relay hears of them, with what to fix;
    /// the credential shows in no error and no Debug output.
    #[tokio::test]
    async fn bad_specs_are_refused_with_the_fix_and_no_secret() {
        let handle = HostHandle::new(Arc::new(Table::new(None)));
        let e = handle
            .add(spec("-bad name", &["ssh=127.0.0.1:22"]))
            .await
            .unwrap_err();
        assert!(matches!(e, TunnelError::InvalidName(_)), "{e}");
        let e = handle.add(spec("vh-1", &[])).await.unwrap_err().to_string();
        assert!(e.contains("no services") && e.contains("ssh="), "{e}");
        let twice = spec("vh-1", &["ssh=127.0.0.1:22", "ssh=127.0.0.1:23"]);
        let e = handle.add(twice.clone()).await.unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
        assert!(!format!("{twice:?}").contains("job-secret-token"));
        assert!(handle.list().is_empty(), "nothing invalid is kept");
    }

    /// With no relay connected, an add waits its time, then says so and keeps the tunnel (it is
    /// registered as relays come); remove drops it, once.
    #[tokio::test(start_paused = true)]
    async fn an_add_without_relays_times_out_and_keeps_the_tunnel() {
        let handle = HostHandle::new(Arc::new(Table::new(None)));
        let e = handle
            .add_within(spec("vh-1", &["ssh=127.0.0.1:22"]), Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, TunnelError::Timeout { after, .. } if *after == Duration::from_secs(3)),
            "{e}"
        );
        let view = handle.get("vh-1").expect("kept");
        assert_eq!(view.services.len(), 1);
        assert!(view.relays.is_empty() && view.public_host.is_none());
        assert_eq!(handle.list().len(), 1);
        assert_eq!(handle.remove("vh-1", true).unwrap().name, "vh-1");
        assert!(matches!(
            handle.remove("vh-1", true),
            Err(TunnelError::NotFound(_))
        ));
        assert!(handle.get("vh-1").is_none());
    }

    /// An add resolves once every attached relay answered: placed on one and refused on the
    /// other is a success listing both; refused everywhere is an error and the tunnel is gone.
    #[tokio::test]
    async fn an_add_resolves_on_every_relays_answer() {
        use jumpgate_proto::{Allocation, Refusal};
        let table = Arc::new(Table::new(None));
        let handle = HostHandle::new(table.clone());
        let (_, mut one) = table.attach(1, "r1:7000", "relay.example", None);
        let (_, mut two) = table.attach(2, "r2:7000", "relay.example", None);
        let adding = tokio::spawn({
            let handle = handle.clone();
            async move { handle.add(spec("vh-1", &["ssh=127.0.0.1:22"])).await }
        });
        assert!(matches!(one.recv().await, Some(table::Change::Add(h)) if h.name == "vh-1"));
        assert!(matches!(two.recv().await, Some(table::Change::Add(_))));
        let ssh = |port| {
            vec![Allocation {
                name: "ssh".into(),
                port,
                note: None,
            }]
        };
        table.placed(1, "vh-1", &ssh(20001));
        tokio::task::yield_now().await;
        assert!(
            !adding.is_finished(),
            "resolved before the second relay answered"
        );
        table.refused(2, "vh-1", &Refusal::Unauthorized, false, false);
        let view = adding.await.unwrap().unwrap();
        assert_eq!(view.public_host.as_deref(), Some("relay.example"));
        assert_eq!(view.endpoints().len(), 1);
        assert_eq!(view.endpoints()[0].port, 20001);
        assert!(matches!(
            &view.relays[1].state,
            RelayTunnel::Refused { reason } if reason.contains("authentication failed")
        ));
        let json = serde_json::to_value(&view.relays[0]).unwrap();
        assert_eq!(json["relay"], "r1:7000");
        assert_eq!(json["state"], "placed");
        assert_eq!(json["endpoints"][0]["port"], 20001);

        // Refused by both: an error naming each relay, and nothing kept.
        let adding = tokio::spawn({
            let handle = handle.clone();
            async move { handle.add(spec("vh-2", &["ssh=127.0.0.1:22"])).await }
        });
        let _ = (one.recv().await, two.recv().await);
        let refusal = Refusal::NameNotAllowed {
            name: "vh-2".into(),
        };
        table.refused(1, "vh-2", &refusal, false, false);
        table.refused(2, "vh-2", &refusal, false, false);
        let e = adding.await.unwrap().unwrap_err().to_string();
        assert!(e.contains("r1:7000") && e.contains("r2:7000"), "{e}");
        assert!(handle.get("vh-2").is_none());
        assert!(
            matches!(one.recv().await, Some(table::Change::Remove { name, .. }) if name == "vh-2")
        );
    }
}
