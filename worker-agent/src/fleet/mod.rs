//! Which relays the agent keeps a session with, as the fleet changes.
//!
//! The set is: every address each `--server` resolves to (a name behind DNS round robin counts
//! as several relays), plus every relay another relay lists as a member of its fleet. Members
//! are learned from any relay and verified as the relay they were learned from (same CA or
//! pins, same TLS server name). Addresses are deduplicated, so a member that is also a
//! configured server is not dialled twice.
//!
//! A relay's listing of itself does not count: a relay that left the fleet must not keep itself
//! in the agent's set. Each relay names its own entry, so a member that is a relay the agent
//! already reaches at another address (a private one, say) is not dialled a second time: two
//! sessions of one agent on one relay would keep taking each other over. For the same reason,
//! when two of the agent's links turn out to reach one relay (a name with an A and an AAAA
//! record for one host), the one that holds the session stays and the other address is parked
//! while it does; and a name whose relay is older than member lists (protocol version 1, which
//! names no relay) is dialled by name again, one session, as before fleets. A link that is no longer wanted (gone from every list, or from DNS) is
//! closed after a grace period, so a relay that restarts, or a DNS answer that rotates, does not
//! flap sessions. Configured servers are never dropped while their name resolves to nothing:
//! their link then dials the name itself. The set is capped ([`AgentConfig::max_relays`]).
//!
//! A relay's member list is not trusted to cost the agent much: only its first names are looked
//! up ([`LinkSet::names_due`]), a batch at a time, concurrently under one deadline, in the
//! background of the planning loop ([`run`]), which keeps reacting to lists, losses and shutdown.
//!
//! [`LinkSet`] is the pure bookkeeping (tested with injected resolutions and clocks); [`run`]
//! drives it: resolves names, starts and cancels link tasks.
//!
//! Files: [`set`] is that bookkeeping, [`members`] what the relays said of the fleet (reported
//! by the links, read by the driver), and this file the driver.

pub mod members;
pub mod set;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerAddr;
use crate::error::AgentError;
use crate::link::{supervise, AgentShared};

pub use members::MemberReports;
pub use set::{Change, Heard, LinkKey, LinkSet, LinkTarget};

/// How often names are resolved again, and members' names too.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(60);
/// Soonest names are resolved again after a link lost its session (its relay may have moved).
const RESOLVE_AFTER_LOSS: Duration = Duration::from_secs(5);
/// Time allowed for a batch of name lookups, which run at once: a name that has not answered
/// by then counts as unresolved until the next round.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most names looked up in one batch; the rest are due in the next one. With
/// [`LinkSet::names_due`]'s cap per member list, this bounds the lookups a relay (or whoever can
/// write a fleet's member registry) can make every agent do.
const MAX_LOOKUPS_AT_ONCE: usize = 16;

/// A lookup's answer: addresses, or why there are none.
type Answer = (ServerAddr, Result<Vec<SocketAddr>, String>);

/// Looks up `name`'s addresses.
async fn lookup(name: ServerAddr) -> Result<Vec<SocketAddr>, String> {
    tokio::net::lookup_host((name.host.as_str(), name.port))
        .await
        .map(|addrs| addrs.collect())
        .map_err(|e| e.to_string())
}

/// Looks up `names` all at once, for at most `deadline` in all: a name without an answer by
/// then gets an error, whatever the others do. One slow name costs one deadline, not one each.
async fn resolve_batch<F, Fut>(names: Vec<ServerAddr>, deadline: Duration, lookup: F) -> Vec<Answer>
where
    F: Fn(ServerAddr) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<SocketAddr>, String>> + Send + 'static,
{
    let mut lookups = tokio::task::JoinSet::new();
    for name in &names {
        let answer = lookup(name.clone());
        let name = name.clone();
        lookups.spawn(async move { (name, answer.await) });
    }
    let mut answers: Vec<Answer> = Vec::with_capacity(names.len());
    let _ = tokio::time::timeout(deadline, async {
        while let Some(done) = lookups.join_next().await {
            if let Ok(answer) = done {
                answers.push(answer);
            }
        }
    })
    .await;
    // Dropping the set abandons the lookups still running.
    for name in names {
        if !answers.iter().any(|(n, _)| *n == name) {
            answers.push((name, Err(format!("no answer within {deadline:?}"))));
        }
    }
    answers
}

/// Records a batch's answers in `set`.
fn record(set: &mut LinkSet, answers: Vec<Answer>) {
    let now = Instant::now();
    for (name, answer) in answers {
        if let Err(e) = &answer {
            tracing::warn!(relay = %name, "cannot resolve relay name: {e}");
        }
        set.resolved(name, answer, now);
    }
}

/// Keeps the link set in step with configuration, DNS and the fleet until `stop` fires (Ok) or
/// every link was refused for good (Err, all their errors in link order).
pub async fn run(
    shared: Arc<AgentShared>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), AgentError> {
    run_with(shared, stop, tasks, lookup).await
}

/// [`run`] with the name lookup given (tests inject a slow or hostile DNS).
async fn run_with<F, Fut>(
    shared: Arc<AgentShared>,
    stop: CancellationToken,
    tasks: &TaskTracker,
    lookup: F,
) -> Result<(), AgentError>
where
    F: Fn(ServerAddr) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<SocketAddr>, String>> + Send + 'static,
{
    let mut set = LinkSet::new(&shared.config);
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, AgentError)>();
    let mut cancels: HashMap<u64, CancellationToken> = HashMap::new();
    let mut failures: HashMap<u64, AgentError> = HashMap::new();
    let mut last_forced: Option<Instant> = None;
    let mut ticker = tokio::time::interval(RESOLVE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Lookups run beside the loop, one batch at a time, so a slow or hostile name never holds
    // up planning, member-list changes, failed links or shutdown. Only the first batch (the configured
    // names, before any link exists) is waited for, so a name is not dialled by name and then
    // replaced by its addresses a moment later.
    let mut lookups: tokio::task::JoinSet<Vec<Answer>> = tokio::task::JoinSet::new();
    let mut first = true;
    loop {
        let now = Instant::now();
        let reports = shared.members.snapshot();
        if lookups.is_empty() {
            let mut due = set.names_due(now, RESOLVE_EVERY, &reports);
            due.truncate(MAX_LOOKUPS_AT_ONCE);
            if !due.is_empty() {
                lookups.spawn(resolve_batch(due, RESOLVE_TIMEOUT, lookup.clone()));
            }
        }
        if std::mem::take(&mut first) {
            let done = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                done = lookups.join_next() => done,
            };
            if let Some(Ok(answers)) = done {
                record(&mut set, answers);
            }
        }
        for change in set.plan(Instant::now(), &reports) {
            match change {
                Change::Start(id, target) => {
                    shared.status.add(id, target.to_string(), target.learned);
                    let cancel = stop.child_token();
                    cancels.insert(id, cancel.clone());
                    let (shared, failed_tx) = (shared.clone(), failed_tx.clone());
                    tasks.spawn(async move {
                        if let Err(e) = supervise(id, target, shared, cancel).await {
                            let _ = failed_tx.send((id, e));
                        }
                    });
                }
                Change::Stop(id) => {
                    if let Some(cancel) = cancels.remove(&id) {
                        cancel.cancel();
                    }
                    shared.members.forget(id);
                    shared.status.remove(id);
                    failures.remove(&id);
                }
            }
        }
        shared.members.keep_only(&set.ids());
        shared.live_links.store(
            cancels.len().saturating_sub(failures.len()),
            std::sync::atomic::Ordering::Relaxed,
        );
        let expiry = set.next_expiry().map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = shared.members.changed.notified() => {}
            _ = shared.members.lost.notified() => {
                if last_forced.is_none_or(|t| t.elapsed() >= RESOLVE_AFTER_LOSS) {
                    last_forced = Some(Instant::now());
                    set.expire_names(Instant::now());
                }
            }
            _ = ticker.tick() => {}
            Some(done) = lookups.join_next() => {
                if let Ok(answers) = done {
                    record(&mut set, answers);
                }
            }
            _ = async {
                match expiry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
            Some((id, e)) = failed_rx.recv() => {
                set.mark_stopped(id);
                failures.insert(id, e);
                if set.all_stopped() {
                    let mut errors = Vec::new();
                    for id in set.ids() {
                        if let Some(e) = failures.remove(&id) {
                            errors.push(e);
                        }
                    }
                    return Err(AgentError::all_stopped(errors));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::set::tests::{addr, config, name};
    use super::*;
    use jumpgate_proto::RelayMember;

    #[tokio::test(start_paused = true)]
    async fn a_batch_of_slow_names_costs_one_deadline_and_keeps_fast_answers() {
        let names: Vec<ServerAddr> = (0..MAX_LOOKUPS_AT_ONCE)
            .map(|i| name(&format!("slow-{i}.example:7000")))
            .chain([name("fast.example:7000")])
            .collect();
        let slow_dns = |n: ServerAddr| async move {
            if n.host == "fast.example" {
                Ok(vec![addr("10.0.0.7:7000")])
            } else {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(vec![addr("10.0.0.8:7000")])
            }
        };
        let started = tokio::time::Instant::now();
        let answers = resolve_batch(names.clone(), RESOLVE_TIMEOUT, slow_dns).await;
        assert_eq!(
            started.elapsed(),
            RESOLVE_TIMEOUT,
            "one deadline for the whole batch"
        );
        assert_eq!(answers.len(), names.len());
        for (n, answer) in answers {
            match n.host.as_str() {
                "fast.example" => assert_eq!(answer, Ok(vec![addr("10.0.0.7:7000")])),
                _ => assert!(answer.unwrap_err().contains("no answer within"), "{n}"),
            }
        }
    }

    /// A relay lists names whose lookups never answer, and a relay at an address: the loop
    /// connects to the address at once instead of waiting out the lookups one by one (16 x 5 s
    /// before), and stops promptly while they hang.
    #[tokio::test(start_paused = true)]
    async fn slow_member_names_never_hold_up_planning() {
        let config = config(&["127.0.0.1:1"], Duration::from_secs(60), 16);
        let shared = Arc::new(AgentShared {
            connector: crate::connector(&config).unwrap(),
            targets: Default::default(),
            host: None,
            status: Arc::new(crate::status::StatusBoard::new(None)),
            stats: Arc::default(),
            members: Arc::default(),
            live_links: Default::default(),
            config,
        });
        let hanging_dns = |_: ServerAddr| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Err::<Vec<SocketAddr>, String>("never".into())
        };
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let driver = tokio::spawn({
            let (shared, stop, tasks) = (shared.clone(), stop.clone(), tasks.clone());
            async move { run_with(shared, stop, &tasks, hanging_dns).await }
        });
        let links = || shared.status.states().len();
        while links() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let list: Vec<RelayMember> = (0..16)
            .map(|i| RelayMember {
                id: format!("slow-{i}"),
                addr: format!("slow-{i}.example:7000"),
                ws: None,
            })
            .chain([RelayMember {
                id: "by-address".into(),
                addr: "127.0.0.2:1".into(),
                ws: None,
            }])
            .collect();
        let pushed = tokio::time::Instant::now();
        shared.members.pushed(0, &"127.0.0.1:1", &list);
        while links() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            pushed.elapsed() < RESOLVE_TIMEOUT,
            "the member at an address waited {:?} for the lookups",
            pushed.elapsed()
        );
        let stopping = tokio::time::Instant::now();
        stop.cancel();
        driver.await.unwrap().unwrap();
        assert!(
            stopping.elapsed() < RESOLVE_TIMEOUT,
            "{:?}",
            stopping.elapsed()
        );
        tasks.close();
        tasks.wait().await;
    }
}
