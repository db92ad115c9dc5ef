//! One agent's link with one relay across sessions: what it remembers between them (the ports it
//! was given) and when it dials again after a failure or a lost session.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jumpgate_proto::{Accepted, AgentHello, Refusal};

use crate::backoff::Backoff;
use crate::hello::{session_hello, Identity};

/// A session that lasted this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// What a failed attempt proves, as the driver classifies it (it knows TLS and sockets; the core
/// does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The network or the relay had a problem: retry with the ordinary backoff.
    Transient,
    /// TLS failed before the relay proved who it is (pin or CA mismatch, an alert): retry with
    /// the long backoff, loudly.
    Suspicious,
    /// The authenticated relay turned the agent away for good, or the settings are invalid:
    /// never retried.
    Permanent,
}

impl Failure {
    /// How a refusal counts: permanent when retrying the same hello can never succeed
    /// ([`Refusal::is_permanent`]), else transient.
    pub fn of_refusal(refusal: &Refusal) -> Self {
        if refusal.is_permanent() {
            Failure::Permanent
        } else {
            Failure::Transient
        }
    }
}

/// What the driver does after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Stop this relay's link: retrying cannot help.
    GiveUp,
    /// Dial again after `delay`; `repeated`: the same failure as the attempt before (log it
    /// quietly).
    After {
        /// How long to wait.
        delay: Duration,
        /// The failure's text equals the previous failure's.
        repeated: bool,
    },
    /// Dial again after the long `delay` of a relay that could not be authenticated.
    Suspicious {
        /// How long to wait.
        delay: Duration,
    },
}

/// One relay's link, between and across sessions. Time and randomness come in as arguments.
#[derive(Debug, Clone)]
pub struct Link {
    /// Ports this relay gave the agent's services, asked for again at the next hello.
    remembered: HashMap<String, u16>,
    backoff: Backoff,
    /// Separate, so that blips between verification failures do not shorten the long delays.
    suspicious: Backoff,
    last_failure: Option<String>,
    /// When the current session was accepted.
    started: Option<Instant>,
}

impl Default for Link {
    fn default() -> Self {
        Self::new()
    }
}

impl Link {
    /// A link that has not dialled yet.
    pub fn new() -> Self {
        Self {
            remembered: HashMap::new(),
            backoff: Backoff::reconnect(),
            suspicious: Backoff::suspicious(),
            last_failure: None,
            started: None,
        }
    }

    /// The hello for the next attempt.
    pub fn hello(&self, identity: &Identity) -> AgentHello {
        session_hello(identity, &self.remembered)
    }

    /// The ports this relay gave before, by service.
    pub fn remembered(&self) -> &HashMap<String, u16> {
        &self.remembered
    }

    /// The relay accepted the hello at `now`. Returns whether this is a reconnection (the relay
    /// placed this agent before). Only the agent's own services are remembered: a relay cannot
    /// grow the map with made-up names.
    pub fn accepted(&mut self, accepted: &Accepted, identity: &Identity, now: Instant) -> bool {
        self.last_failure = None;
        self.suspicious.reset();
        let reconnected = !self.remembered.is_empty();
        for a in &accepted.services {
            if identity.offers(&a.name) {
                self.remembered.insert(a.name.clone(), a.port);
            }
        }
        self.started = Some(now);
        reconnected
    }

    /// The session ended at `now` (not by shutdown): how long to wait before dialling again. A
    /// relay that announced its going away (`reconnect_after`) is redialled after its delay and
    /// the backoff starts over; otherwise the backoff grows, unless the session was stable.
    /// `unit` is a random number in [0, 1) for the jitter.
    pub fn session_ended(
        &mut self,
        now: Instant,
        reconnect_after: Option<Duration>,
        unit: f64,
    ) -> Duration {
        let started = self.started.take().unwrap_or(now);
        if now.saturating_duration_since(started) >= STABLE_AFTER {
            self.backoff.reset();
        }
        match reconnect_after {
            Some(after) => {
                self.backoff.reset();
                after
            }
            None => self.backoff.next_delay(unit),
        }
    }

    /// An attempt failed (`text`: the error as the driver reports it). `unit` is a random
    /// number in [0, 1) for the jitter.
    pub fn failed(&mut self, kind: Failure, text: &str, unit: f64) -> Retry {
        match kind {
            Failure::Permanent => Retry::GiveUp,
            Failure::Suspicious => {
                let delay = self.suspicious.next_delay(unit);
                self.last_failure = Some(text.to_string());
                Retry::Suspicious { delay }
            }
            Failure::Transient => {
                let delay = self.backoff.next_delay(unit);
                let repeated = self.last_failure.as_deref() == Some(text);
                if !repeated {
                    self.last_failure = Some(text.to_string());
                }
                Retry::After { delay, repeated }
            }
        }
    }
}
