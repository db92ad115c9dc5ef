//! The PostgreSQL store shared by a fleet of relays (not built yet: no value of this type exists).

use std::collections::HashSet;
use std::time::Duration;

use jumpgate_lease::{Attempt, LeaseKey, ServiceAsk};

use super::{LeaseView, Member, PlaceError, StoreError};

/// How often a relay heartbeats and refreshes its agents' leases.
pub(super) const HEARTBEAT_PERIOD: Duration = Duration::from_secs(5);

/// The database store.
pub(super) enum PgStore {}

#[allow(clippy::too_many_arguments)]
impl PgStore {
    pub(super) async fn attempt(
        &self,
        _relay: &str,
        _agent: &str,
        _identity: &str,
        _asks: &[ServiceAsk],
        _now: u64,
        _taken: &HashSet<u16>,
        _bound: &HashSet<u16>,
    ) -> (Result<Attempt, PlaceError>, Vec<(LeaseKey, u16)>) {
        match *self {}
    }
    pub(super) async fn deactivate(
        &self,
        _relay: &str,
        _agent: &str,
        _now: u64,
    ) -> Result<(), StoreError> {
        match *self {}
    }
    pub(super) async fn release(&self, _agent: &str, _now: u64) -> Result<Vec<u16>, StoreError> {
        match *self {}
    }
    pub(super) async fn holder(&self, _agent: &str) -> Result<Option<String>, StoreError> {
        match *self {}
    }
    pub(super) async fn ports_of(&self, _agent: &str) -> Result<Vec<(String, u16)>, StoreError> {
        match *self {}
    }
    pub(super) async fn views(&self, _now: u64) -> Result<Vec<LeaseView>, StoreError> {
        match *self {}
    }
    pub(super) async fn usage(&self) -> Result<(usize, usize), StoreError> {
        match *self {}
    }
    pub(super) async fn holdings(&self, _identity: &str) -> Result<(usize, usize), StoreError> {
        match *self {}
    }
    pub(super) async fn members(&self, _now: u64) -> Result<Vec<Member>, StoreError> {
        match *self {}
    }
    pub(super) async fn sessions_of(
        &self,
        _agent: &str,
        _now: u64,
    ) -> Result<Vec<String>, StoreError> {
        match *self {}
    }
    pub(super) async fn tick(
        &self,
        _me: &Member,
        _now: u64,
    ) -> Result<Vec<(LeaseKey, u16)>, StoreError> {
        match *self {}
    }
    pub(super) async fn leave(&self, _relay: &str) {
        match *self {}
    }
}
