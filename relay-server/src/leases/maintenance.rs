//! Keeping leases current: expiring them, writing the file, and (database) the relay's fleet
//! heartbeat and the leases that ended on other relays.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jumpgate_lease::LeaseKey;
use tokio_util::sync::CancellationToken;

use super::{postgres, Backend, LeaseStore, StoreError};

/// Longest interval between collecting expired leases and writing active leases' last-seen times.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(60);

impl LeaseStore {
    pub(super) fn announce(&self, expired: Vec<(LeaseKey, u16)>) {
        for (key, port) in expired {
            tracing::info!(agent = %key.agent, service = %key.service, port, "lease expired; port returns to the pool");
            (self.on_expired)(&key, port);
        }
    }

    /// Makes every change so far durable. Concurrent callers share one write. (The database
    /// store commits each change as it makes it.)
    pub async fn persist(&self) -> std::io::Result<()> {
        match &self.backend {
            Backend::File(f) => f.persist(self.now()).await,
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Persists and logs on failure: the relay keeps serving with leases in memory.
    pub async fn persist_or_warn(&self) {
        if let Backend::File(f) = &self.backend {
            if let Err(e) = f.persist(self.now()).await {
                tracing::error!(path = %f.path().display(), "cannot write lease file: {e}; leases will not survive a restart until this is fixed");
            }
        }
    }

    /// One maintenance round: expire leases, and (database) heartbeat this relay and refresh the
    /// leases of the agents it holds sessions with.
    pub async fn tick(&self) -> Result<(), StoreError> {
        let now = self.now();
        match &self.backend {
            Backend::File(f) => {
                self.announce(f.expire(now));
                Ok(())
            }
            Backend::Postgres(p) => {
                let expired = p.tick(&self.me, now).await?;
                let current: HashMap<LeaseKey, u16> = p
                    .views(now)
                    .await?
                    .into_iter()
                    .map(|v| (v.key, v.port))
                    .collect();
                let gone: Vec<(LeaseKey, u16)> = {
                    let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                    let old = std::mem::replace(&mut *seen, current);
                    old.into_iter()
                        .filter(|(key, port)| seen.get(key) != Some(port))
                        .filter(|(key, port)| !expired.iter().any(|(k, p)| k == key && p == port))
                        .collect()
                };
                self.announce(expired);
                if let Some(on_gone) = &self.on_gone {
                    for (key, port) in gone {
                        tracing::info!(agent = %key.agent, service = %key.service, port, "lease ended on another relay of the fleet");
                        on_gone(&key, port);
                    }
                }
                Ok(())
            }
        }
    }

    /// Expires leases and refreshes the file (or the relay's membership and its agents' leases
    /// in the database) periodically until `stop` fires, then a final time.
    pub async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let period = match &self.backend {
            Backend::File(_) => (self.ttl / 4).clamp(Duration::from_secs(1), MAINTENANCE_PERIOD),
            Backend::Postgres(_) => postgres::HEARTBEAT_PERIOD,
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            match self.tick().await {
                Ok(()) => {
                    if warned.take().is_some() {
                        tracing::info!("lease store reachable again");
                    }
                }
                // One line a minute while the store is away, not one per tick.
                Err(e) => {
                    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!("lease maintenance skipped: {e}; tunnels keep working, new agents are asked to retry");
                        warned = Some(tokio::time::Instant::now());
                    }
                }
            }
            self.persist_or_warn().await;
        }
        match &self.backend {
            Backend::File(_) => {
                let _ = self.tick().await;
                self.persist_or_warn().await;
            }
            Backend::Postgres(p) => p.leave(&self.me.id, self.now()).await,
        }
    }
}
