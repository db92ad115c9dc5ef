//! The tunnels a host session carries (issue 28; [`jumpgate_proto::tunnel`] is the design):
//! each registered with its own identity on the control stream, answered one by one, closed
//! by the relay or removed by the agent, and registered again after a backoff when the relay
//! ended it for a reason that may pass.
//!
//! Part of [`Session`](crate::Session) (its `add_tunnel` / `remove_tunnel` calls and tunnel
//! events); this file is the bookkeeping. Invariants the property tests check: a tunnel the
//! session holds has exactly one outstanding `Register` or its answer; a removed tunnel is
//! never registered again; every `Register` of a session has its own id.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use jumpgate_proto::tunnel::{TunnelHello, TunnelReply};
use jumpgate_proto::{Allocation, Control, Refusal};

use crate::backoff::Backoff;
use crate::event::{Event, Purpose};

/// Where one tunnel stands on this session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelState {
    /// A `Register` with this id is out, unanswered.
    Registering {
        /// The id of the outstanding `Register`.
        id: u64,
    },
    /// The relay placed it: its ports, one per requested service.
    Placed(Vec<Allocation>),
    /// The relay refused it for good (or closed it for good) on this session.
    Refused(Refusal),
    /// Refused or closed for a reason that may pass: registered again at `until`.
    Waiting {
        /// When the next `Register` goes out.
        until: Instant,
        /// Why it is out now.
        why: Refusal,
    },
}

#[derive(Debug)]
struct Entry {
    hello: TunnelHello,
    state: TunnelState,
    backoff: Backoff,
}

/// The tunnels of one host session.
#[derive(Debug, Default)]
pub(crate) struct Tunnels {
    entries: BTreeMap<String, Entry>,
    /// The id of the next `Register` (ids are unique within a session).
    next_id: u64,
}

/// A number in [0, 1) from `id`, for a backoff's jitter: the core has no randomness of its own,
/// and tunnels closed together (a revoked credential shared by many, a relay hiccup) have
/// different ids, so their retries spread.
fn jitter(id: u64) -> f64 {
    let mixed = id.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    mixed as f64 / (1u64 << 53) as f64
}

type Transmits = VecDeque<(Control, Purpose)>;

impl Tunnels {
    fn register(&mut self, name: &str, transmits: &mut Transmits) -> Option<u64> {
        let entry = self.entries.get_mut(name)?;
        self.next_id += 1;
        let id = self.next_id;
        entry.state = TunnelState::Registering { id };
        transmits.push_back((
            Control::Register {
                id,
                tunnel: entry.hello.clone(),
            },
            Purpose::Tunnel,
        ));
        Some(id)
    }

    /// Holds `hello` (replacing a tunnel of the same name) and registers it.
    pub(crate) fn add(&mut self, hello: TunnelHello, transmits: &mut Transmits) {
        let name = hello.name.clone();
        match self.entries.get_mut(&name) {
            Some(entry) => entry.hello = hello,
            None => {
                self.entries.insert(
                    name.clone(),
                    Entry {
                        hello,
                        state: TunnelState::Refused(Refusal::Unauthorized),
                        backoff: Backoff::reconnect(),
                    },
                );
            }
        }
        self.register(&name, transmits);
    }

    /// Drops `name` and tells the relay; false when the session did not hold it.
    pub(crate) fn remove(&mut self, name: &str, release: bool, transmits: &mut Transmits) -> bool {
        if self.entries.remove(name).is_none() {
            return false;
        }
        transmits.push_back((
            Control::Unregister {
                name: name.to_string(),
                release,
            },
            Purpose::Tunnel,
        ));
        true
    }

    /// A `Registered` frame: false when it answers no outstanding `Register` (a stale or
    /// made-up id).
    pub(crate) fn registered(
        &mut self,
        id: u64,
        reply: TunnelReply,
        now: Instant,
        events: &mut VecDeque<Event>,
    ) -> bool {
        let Some((name, entry)) = self
            .entries
            .iter_mut()
            .find(|(_, e)| e.state == TunnelState::Registering { id })
        else {
            return false;
        };
        let name = name.clone();
        match reply {
            TunnelReply::Accepted { services } => {
                entry.backoff.reset();
                // Ask for the same ports at the next registration of this session (after a
                // close): a service without a configured port remembers the one it got.
                for request in &mut entry.hello.services {
                    if request.preferred_port.is_none() {
                        request.preferred_port = services
                            .iter()
                            .find(|a| a.name == request.name && a.port != 0)
                            .map(|a| a.port);
                    }
                }
                entry.state = TunnelState::Placed(services.clone());
                events.push_back(Event::TunnelPlaced { name, services });
            }
            TunnelReply::Refused(refusal) => {
                let retry_in = Self::out(entry, refusal.clone(), id, now);
                events.push_back(Event::TunnelRefused {
                    name,
                    refusal,
                    retry_in,
                });
            }
        }
        true
    }

    /// Marks `entry` out for `why`: waiting for a retry (returned) unless `why` is permanent.
    fn out(entry: &mut Entry, why: Refusal, id: u64, now: Instant) -> Option<Duration> {
        if why.is_permanent() {
            entry.state = TunnelState::Refused(why);
            None
        } else {
            let delay = entry.backoff.next_delay(jitter(id));
            entry.state = TunnelState::Waiting {
                until: now + delay,
                why,
            };
            Some(delay)
        }
    }

    /// A `TunnelClosed` frame: false when it names no placed tunnel (unknown, removed, or one
    /// with a `Register` out, whose answer decides).
    pub(crate) fn closed(
        &mut self,
        name: &str,
        reason: Refusal,
        now: Instant,
        events: &mut VecDeque<Event>,
    ) -> bool {
        let id = self.next_id;
        let Some(entry) = self.entries.get_mut(name) else {
            return false;
        };
        if !matches!(entry.state, TunnelState::Placed(_)) {
            return false;
        }
        let retry_in = Self::out(entry, reason.clone(), id, now);
        events.push_back(Event::TunnelClosed {
            name: name.to_string(),
            reason,
            retry_in,
        });
        true
    }

    /// Registers again every tunnel whose wait is over.
    pub(crate) fn handle_timeout(&mut self, now: Instant, transmits: &mut Transmits) {
        let due: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.state, TunnelState::Waiting { until, .. } if until <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.register(&name, transmits);
        }
    }

    /// The earliest retry due.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|e| match e.state {
                TunnelState::Waiting { until, .. } => Some(until),
                _ => None,
            })
            .min()
    }

    /// Where `name` stands, if the session holds it.
    pub(crate) fn state(&self, name: &str) -> Option<&TunnelState> {
        self.entries.get(name).map(|e| &e.state)
    }

    /// Every tunnel held, by name.
    pub(crate) fn states(&self) -> impl Iterator<Item = (&str, &TunnelState)> {
        self.entries.iter().map(|(n, e)| (n.as_str(), &e.state))
    }
}
