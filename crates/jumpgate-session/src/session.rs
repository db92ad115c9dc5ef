//! One accepted session's control loop: heartbeats and their timeout, lane requests, member
//! lists, the relay's going-away and the agent's release.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use jumpgate_proto::tunnel::{TunnelHello, HOST_SINCE};
use jumpgate_proto::{Accepted, Control, LaneGrant};

use crate::event::{Event, Purpose};
use crate::host::{TunnelState, Tunnels};

/// Shortest heartbeat interval the agent keeps, whatever the relay asks.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);

/// The control loop of one session. Sans-IO: the driver writes what [`poll_transmit`]
/// returns on the control stream, feeds frames in with [`handle_control`], wakes it at
/// [`poll_timeout`] with [`handle_timeout`], and acts on [`poll_event`].
///
/// [`poll_transmit`]: Session::poll_transmit
/// [`handle_control`]: Session::handle_control
/// [`poll_timeout`]: Session::poll_timeout
/// [`handle_timeout`]: Session::handle_timeout
/// [`poll_event`]: Session::poll_event
#[derive(Debug)]
pub struct Session {
    interval: Duration,
    timeout: Duration,
    next_ping: Instant,
    last_heard: Instant,
    seq: u64,
    grant: Option<LaneGrant>,
    own_max_lanes: u16,
    /// Extra lanes open or opening (the first connection not counted).
    lanes_open: u16,
    reconnect_after: Option<Duration>,
    transmits: VecDeque<(Control, Purpose)>,
    events: VecDeque<Event>,
    /// Timed out or released: no more frames out, inputs ignored.
    ended: bool,
    /// A host session on a relay that supports them: its tunnels.
    tunnels: Option<Tunnels>,
}

/// The heartbeat interval and timeout the agent keeps for `accepted`: the relay's, but at least
/// [`MIN_HEARTBEAT_INTERVAL`] apart and a timeout of at least two intervals.
pub fn heartbeat(accepted: &Accepted) -> (Duration, Duration) {
    let interval =
        Duration::from_millis(accepted.heartbeat_interval_ms).max(MIN_HEARTBEAT_INTERVAL);
    let timeout = Duration::from_millis(accepted.heartbeat_timeout_ms).max(interval * 2);
    (interval, timeout)
}

/// Connections a session may keep, the first included: what the relay granted, but never more
/// than the agent's own `--max-lanes` (a relay must not make the agent open more).
pub fn lane_limit(granted: u16, own: u16) -> u16 {
    granted.min(own)
}

impl Session {
    /// A session the relay accepted at `now`; `own_max_lanes` is the agent's `--max-lanes`. The
    /// first frame (a ping) is queued at once: the relay learns of the control stream from it.
    pub fn new(accepted: &Accepted, own_max_lanes: u16, now: Instant) -> Self {
        let (interval, timeout) = heartbeat(accepted);
        let mut transmits = VecDeque::new();
        transmits.push_back((Control::Ping { seq: 0 }, Purpose::Opening));
        Self {
            interval,
            timeout,
            next_ping: now + interval,
            last_heard: now,
            seq: 0,
            grant: accepted.lanes.clone(),
            own_max_lanes,
            lanes_open: 0,
            reconnect_after: None,
            transmits,
            events: VecDeque::new(),
            ended: false,
            tunnels: None,
        }
    }

    /// A host agent's session (its hello said [`host`](jumpgate_proto::AgentHello::host)):
    /// as [`new`](Self::new), and holding tunnels ([`add_tunnel`](Self::add_tunnel)). A relay
    /// that negotiated a version before [`HOST_SINCE`] gets no tunnel frames; the driver hears
    /// [`Event::HostUnsupported`] at once.
    pub fn new_host(accepted: &Accepted, own_max_lanes: u16, now: Instant) -> Self {
        let mut session = Self::new(accepted, own_max_lanes, now);
        if accepted.version >= HOST_SINCE {
            session.tunnels = Some(Tunnels::default());
        } else {
            session.events.push_back(Event::HostUnsupported {
                version: accepted.version,
            });
        }
        session
    }

    /// Whether this session can hold tunnels (a host session on a relay that supports them).
    pub fn holds_tunnels(&self) -> bool {
        self.tunnels.is_some()
    }

    /// Registers `tunnel` on this session (replacing one of the same name: the relay replaces
    /// its services). Returns false, and does nothing, on a session that holds no tunnels or
    /// is over.
    pub fn add_tunnel(&mut self, tunnel: TunnelHello) -> bool {
        match (&mut self.tunnels, self.ended) {
            (Some(tunnels), false) => {
                tunnels.add(tunnel, &mut self.transmits);
                true
            }
            _ => false,
        }
    }

    /// Removes tunnel `name` (`release`: the relay frees its ports at once). It is never
    /// registered again on this session. Returns whether the session held it.
    pub fn remove_tunnel(&mut self, name: &str, release: bool) -> bool {
        match (&mut self.tunnels, self.ended) {
            (Some(tunnels), false) => tunnels.remove(name, release, &mut self.transmits),
            _ => false,
        }
    }

    /// Where tunnel `name` stands on this session, if it holds it.
    pub fn tunnel(&self, name: &str) -> Option<&TunnelState> {
        self.tunnels.as_ref().and_then(|t| t.state(name))
    }

    /// Every tunnel this session holds, by name, and where it stands.
    pub fn tunnels(&self) -> Vec<(&str, &TunnelState)> {
        self.tunnels
            .as_ref()
            .map(|t| t.states().collect())
            .unwrap_or_default()
    }

    /// The heartbeat timeout in force (also the keepalive the driver sets on its socket).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Set once the relay announced it is going away: the delay before redialling.
    pub fn reconnect_after(&self) -> Option<Duration> {
        self.reconnect_after
    }

    /// Extra lanes open or opening now.
    pub fn lanes_open(&self) -> u16 {
        self.lanes_open
    }

    /// Whether the session is over (timed out or released).
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next: the next heartbeat or
    /// the heartbeat timeout, whichever is first. `None` once the session is over.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retry = self.tunnels.as_ref().and_then(Tunnels::poll_timeout);
        (!self.ended).then(|| {
            let beat = self.next_ping.min(self.last_heard + self.timeout);
            retry.map_or(beat, |r| r.min(beat))
        })
    }

    /// Time passed: ends the session when nothing was heard for the timeout, else queues the
    /// heartbeats due (every one missed, as a burst, when the driver was late) and the tunnel
    /// registrations whose retry is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        if now >= self.last_heard + self.timeout {
            self.ended = true;
            self.transmits.clear();
            self.events.push_back(Event::TimedOut {
                after: self.timeout,
            });
            return;
        }
        while self.next_ping <= now {
            self.seq += 1;
            self.transmits
                .push_back((Control::Ping { seq: self.seq }, Purpose::Heartbeat));
            self.next_ping += self.interval;
        }
        if let Some(tunnels) = &mut self.tunnels {
            tunnels.handle_timeout(now, &mut self.transmits);
        }
    }

    /// A frame from the relay arrived at `now`. Pongs and a going-away count as heard from the
    /// relay; other frames do not keep the session alive.
    pub fn handle_control(&mut self, frame: Control, now: Instant) {
        if self.ended {
            return;
        }
        match frame {
            Control::Pong { .. } => self.last_heard = now,
            Control::GoingAway { reconnect_after_ms } => {
                self.last_heard = now;
                let after = Duration::from_millis(reconnect_after_ms);
                self.reconnect_after = Some(after);
                self.events.push_back(Event::GoingAway {
                    reconnect_after: after,
                });
            }
            Control::OpenLane { count } => match &self.grant {
                Some(grant) => {
                    let extra = lane_limit(grant.max, self.own_max_lanes).saturating_sub(1);
                    let claimed = count.min(extra.saturating_sub(self.lanes_open));
                    self.lanes_open += claimed;
                    if claimed > 0 {
                        self.events.push_back(Event::OpenLanes {
                            count: claimed,
                            key: grant.key.clone(),
                        });
                    }
                }
                None => self.events.push_back(Event::LaneNotOffered),
            },
            Control::Members { relays } => self.events.push_back(Event::Members(relays)),
            Control::Registered { id, reply } => {
                let known = match &mut self.tunnels {
                    Some(t) => t.registered(id, reply.clone(), now, &mut self.events),
                    None => false,
                };
                if !known {
                    self.events
                        .push_back(Event::Ignored(Control::Registered { id, reply }));
                }
            }
            Control::TunnelClosed { name, reason } => {
                let known = match &mut self.tunnels {
                    Some(t) => t.closed(&name, reason.clone(), now, &mut self.events),
                    None => false,
                };
                if !known {
                    self.events
                        .push_back(Event::Ignored(Control::TunnelClosed { name, reason }));
                }
            }
            other @ (Control::Ping { .. }
            | Control::Release
            | Control::Register { .. }
            | Control::Unregister { .. }) => self.events.push_back(Event::Ignored(other)),
        }
    }

    /// A lane opened for [`Event::OpenLanes`] ended (or never opened).
    pub fn lane_closed(&mut self) {
        self.lanes_open = self.lanes_open.saturating_sub(1);
    }

    /// The agent is stopping: queues the release (dropping heartbeats not yet written) and ends
    /// the session.
    pub fn close(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        // Removals already asked for still reach the relay; heartbeats and registrations not.
        self.transmits
            .retain(|(frame, _)| matches!(frame, Control::Unregister { .. }));
        self.transmits
            .push_back((Control::Release, Purpose::Release));
    }

    /// The next frame to write on the control stream, and why.
    pub fn poll_transmit(&mut self) -> Option<(Control, Purpose)> {
        self.transmits.pop_front()
    }

    /// The next thing the driver must act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jumpgate_proto::Secret;

    fn accepted(grant: Option<u16>) -> Accepted {
        Accepted {
            version: 2,
            public_host: "h".into(),
            services: vec![],
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 3000,
            router: None,
            lanes: grant.map(|max| LaneGrant {
                key: Secret::new("k"),
                max,
            }),
            members: vec![],
            relay: None,
        }
    }

    fn opened(s: &mut Session, count: u16) -> u16 {
        s.handle_control(Control::OpenLane { count }, Instant::now());
        let mut n = 0;
        while let Some(e) = s.poll_event() {
            if let Event::OpenLanes { count, .. } = e {
                n += count;
            }
        }
        n
    }

    #[test]
    fn a_relay_cannot_grant_more_lanes_than_the_agent_allows() {
        // The relay grants 64 connections and asks for 100 lanes; the agent said --max-lanes 3.
        let mut s = Session::new(&accepted(Some(64)), 3, Instant::now());
        assert_eq!(opened(&mut s, 100), 2, "the first connection counts");
        assert_eq!(opened(&mut s, 100), 0);
        s.lane_closed();
        assert_eq!(opened(&mut s, 100), 1);
        // A smaller grant stays smaller; --max-lanes 1 opens none whatever the relay says.
        assert_eq!(lane_limit(2, 8), 2);
        let mut one = Session::new(&accepted(Some(64)), 1, Instant::now());
        assert_eq!(opened(&mut one, 100), 0);
        // No grant: nothing opens, and the driver hears of it.
        let mut none = Session::new(&accepted(None), 8, Instant::now());
        none.handle_control(Control::OpenLane { count: 1 }, Instant::now());
        assert_eq!(none.poll_event(), Some(Event::LaneNotOffered));
    }
}
