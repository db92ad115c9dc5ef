//! Counting what the simulated agents report, phase by phase: the one place that turns the
//! simulator's event stream into ports, latencies and failures, for one relay or a fleet.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::results::{Percentiles, Storm};
use crate::measure::pct;
use crate::sim::Event;

/// What the simulated agents reported, phase by phase, per (relay, agent) link.
pub(crate) struct Tally {
    agents: usize,
    /// The relay whose allocations count in this phase; `None`: every relay's.
    only: Option<usize>,
    /// The port each link got first (index `relay * agents + agent`).
    first_port: Vec<Option<u16>>,
    /// The port each link got in the current phase.
    port: Vec<Option<u16>>,
    reached: usize,
    last: Option<Instant>,
    hello: Vec<f64>,
    setup: Vec<f64>,
    failures: BTreeMap<String, usize>,
}

impl Tally {
    pub(crate) fn new(agents: usize, relays: usize) -> Self {
        Self {
            agents,
            only: None,
            first_port: vec![None; agents * relays],
            port: vec![None; agents * relays],
            reached: 0,
            last: None,
            hello: Vec::new(),
            setup: Vec::new(),
            failures: BTreeMap::new(),
        }
    }

    /// Starts a phase in which only `only`'s allocations count (`None`: every relay's).
    pub(crate) fn next_phase(&mut self, only: Option<usize>) {
        self.only = only;
        self.port.iter_mut().for_each(|p| *p = None);
        self.reached = 0;
        self.last = None;
        self.hello.clear();
        self.setup.clear();
        self.failures.clear();
    }

    /// Links that must have a port for the phase to be complete.
    fn target(&self) -> usize {
        match self.only {
            Some(_) => self.agents,
            None => self.port.len(),
        }
    }

    /// Takes events until every counted link has a port in this phase (true) or `timeout`
    /// has passed since `began` (false).
    pub(crate) fn phase(
        &mut self,
        events: &Receiver<Event>,
        began: Instant,
        timeout: Duration,
    ) -> bool {
        let deadline = began + timeout;
        while self.reached < self.target() {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(event) => self.apply(event, began),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return false
                }
            }
        }
        true
    }

    fn apply(&mut self, event: Event, began: Instant) {
        match event {
            Event::Allocated {
                agent,
                relay,
                port,
                at,
                hello,
                setup,
            } if at >= began && self.only.is_none_or(|r| r == relay) => {
                let link = relay * self.agents + agent;
                let Some(slot) = self.port.get_mut(link) else {
                    return;
                };
                if slot.is_none() {
                    self.reached += 1;
                }
                *slot = Some(port);
                if let Some(first) = self.first_port.get_mut(link) {
                    first.get_or_insert(port);
                }
                self.last = Some(self.last.map_or(at, |l| l.max(at)));
                self.hello.push(hello.as_secs_f64() * 1e3);
                self.setup.push(setup.as_secs_f64() * 1e3);
            }
            Event::Allocated { .. } => {}
            Event::Failed {
                reason, permanent, ..
            } => {
                let key = if permanent {
                    format!("{reason} (agent gave up)")
                } else {
                    reason
                };
                *self.failures.entry(key).or_default() += 1;
            }
        }
    }

    pub(crate) fn storm(&mut self, began: Instant, complete: bool) -> Storm {
        let percentiles = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then(|| Percentiles {
                p50_ms: pct(v, 0.5),
                p99_ms: pct(v, 0.99),
            })
        };
        let end = match (complete, self.last) {
            (true, Some(last)) => last,
            _ => Instant::now(),
        };
        Storm {
            allocated: self.reached,
            all_allocated_secs: end.saturating_duration_since(began).as_secs_f64(),
            hello: percentiles(&mut self.hello),
            setup: percentiles(&mut self.setup),
            placement: None,
            relay_cpu_secs: 0.0,
            failures: std::mem::take(&mut self.failures),
        }
    }

    /// Links with a port in this phase that is the one they got first.
    pub(crate) fn same_port(&self) -> usize {
        self.port
            .iter()
            .zip(&self.first_port)
            .filter(|(now, first)| now.is_some() && now == first)
            .count()
    }

    /// The port `agent` got first from `relay`.
    pub(crate) fn first_port(&self, relay: usize, agent: usize) -> Option<u16> {
        self.first_port
            .get(relay * self.agents + agent)
            .copied()
            .flatten()
    }
}
