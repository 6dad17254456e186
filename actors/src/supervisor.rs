//! `NodeSupervisor`: spawns every local replica linked to itself and restarts
//! a replica that fails (a panic or an error in its handler) from its on-disk
//! state, after an exponential back-off. After `restart_limit` failures within
//! `restart_window` it stops trying and reports the replica failed.
//!
//! The live replicas are published in a [`Registry`] that the Raft inbox,
//! the ticker and request handlers read.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
// Shared with the dataflow host's task supervisor.
pub use runnel_client::tasks::RestartPolicy;

use crate::partition::{PartitionReplica, ReplicaArgs, ReplicaMsg};
use crate::protocol::GroupId;

/// Live replicas by Raft group.
pub type Registry = Arc<RwLock<HashMap<GroupId, ReplicaHandle>>>;

/// Ticks and Raft messages waiting in one replica's mailbox at most. ractor
/// mailboxes are unbounded; past this, new ones are dropped (Raft recovers
/// from lost messages, and a dropped tick only delays its timers).
pub const QUEUED_MAX: usize = 1024;

/// A live replica and the count of ticks and Raft messages it has queued.
#[derive(Clone)]
pub struct ReplicaHandle {
    pub actor: ActorRef<ReplicaMsg>,
    queued: Arc<AtomicUsize>,
    /// Whether the replica is passive (see [`crate::ReplicaCore`]).
    pub passive: Arc<AtomicBool>,
}

impl ReplicaHandle {
    /// Queues a tick or a Raft message unless the replica is too far behind.
    pub fn offer(&self, message: ReplicaMsg) -> bool {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= QUEUED_MAX {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        if self.actor.cast(message).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }
}

/// How a replica has fared, for `runnel status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaHealth {
    pub group: GroupId,
    pub restarts: usize,
    pub last_failure: Option<String>,
    /// Set once the restart limit was reached, or at once when its files
    /// are damaged: the replica is no longer run.
    pub failed: bool,
    /// Why its files cannot be read (they are kept as they are, for a
    /// rebuild from its peers).
    pub damaged: Option<String>,
    /// How its damaged files were repaired, last time.
    pub repaired: Option<String>,
}

pub enum SupervisorMsg {
    Start(Box<ReplicaArgs>, RpcReplyPort<Result<(), String>>),
    Stop(GroupId, RpcReplyPort<()>),
    Restart(GroupId),
    Health(RpcReplyPort<Vec<ReplicaHealth>>),
    /// The replica's damaged files were moved aside (how, in words): forget
    /// its failures, so that it can start again (empty).
    Repaired(GroupId, String),
}

pub struct SupervisorArgs {
    pub registry: Registry,
    pub policy: RestartPolicy,
}

pub struct SupervisorState {
    registry: Registry,
    policy: RestartPolicy,
    /// Which group each child actor runs.
    children: HashMap<ActorId, GroupId>,
    args: BTreeMap<GroupId, ReplicaArgs>,
    failures: BTreeMap<GroupId, VecDeque<Instant>>,
    health: BTreeMap<GroupId, ReplicaHealth>,
}

pub struct NodeSupervisor;

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            registry: args.registry,
            policy: args.policy,
            children: HashMap::new(),
            args: BTreeMap::new(),
            failures: BTreeMap::new(),
            health: BTreeMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Start(args, reply) => {
                let group = args.group;
                // A repeated start (a caller that timed out and retried) must
                // not put a second replica on the same directory.
                if state.args.contains_key(&group) {
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                // Damaged files stay as they are until repaired: reopening
                // them cannot succeed.
                if let Some(damage) = state.health.get(&group).and_then(|h| h.damaged.clone()) {
                    let _ = reply.send(Err(format!("replica of group {group} is damaged: {damage}")));
                    return Ok(());
                }
                state.args.insert(group, *args);
                let repaired = state.health.get(&group).and_then(|h| h.repaired.clone());
                state.health.insert(
                    group,
                    ReplicaHealth {
                        group,
                        repaired,
                        ..ReplicaHealth::default()
                    },
                );
                let started = state.spawn(&myself, group).await;
                if let Err(failure) = &started {
                    state.record_failure(&myself, group, failure.clone());
                }
                let _ = reply.send(started.map_err(|f| f.reason));
            }
            SupervisorMsg::Stop(group, reply) => {
                state.args.remove(&group);
                let replica = state.registry.write().unwrap_or_else(|p| p.into_inner()).remove(&group);
                if let Some(replica) = replica {
                    let _ = replica
                        .actor
                        .stop_and_wait(Some("stopped by the node".to_string()), Some(Duration::from_secs(10)))
                        .await;
                }
                let _ = reply.send(());
            }
            SupervisorMsg::Restart(group) => {
                if state.args.contains_key(&group) {
                    if let Err(failure) = state.spawn(&myself, group).await {
                        state.record_failure(&myself, group, failure);
                    }
                }
            }
            SupervisorMsg::Health(reply) => {
                let _ = reply.send(state.health.values().cloned().collect());
            }
            SupervisorMsg::Repaired(group, how) => {
                state.failures.remove(&group);
                state.health.insert(
                    group,
                    ReplicaHealth {
                        group,
                        repaired: Some(how),
                        ..ReplicaHealth::default()
                    },
                );
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason, damaged) = match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                let damaged = error
                    .downcast_ref::<crate::ActorError>()
                    .is_some_and(crate::ActorError::is_damage);
                (cell, error.to_string(), damaged)
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".to_string()), false)
            }
            _ => return Ok(()),
        };
        let Some(group) = state.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        {
            let mut registry = state.registry.write().unwrap_or_else(|p| p.into_inner());
            if registry.get(&group).is_some_and(|r| r.actor.get_id() == cell.get_id()) {
                registry.remove(&group);
            }
        }
        if state.args.contains_key(&group) {
            state.record_failure(&myself, group, SpawnFailure { reason, damaged });
        }
        Ok(())
    }
}

/// Why a replica did not start.
#[derive(Clone, Debug)]
struct SpawnFailure {
    reason: String,
    /// Its files are damaged ([`crate::ActorError::is_damage`]).
    damaged: bool,
}

/// A failure to open the replica: damage when its opening error says so.
fn spawn_failure(group: GroupId, error: ractor::SpawnErr) -> SpawnFailure {
    let damaged = match &error {
        ractor::SpawnErr::StartupFailed(inner) => inner
            .downcast_ref::<crate::ActorError>()
            .is_some_and(crate::ActorError::is_damage),
        _ => false,
    };
    let reason = match &error {
        ractor::SpawnErr::StartupFailed(inner) => inner.to_string(),
        other => other.to_string(),
    };
    SpawnFailure {
        reason: format!("starting the replica of group {group}: {reason}"),
        damaged,
    }
}

impl SupervisorState {
    async fn spawn(&mut self, myself: &ActorRef<SupervisorMsg>, group: GroupId) -> Result<(), SpawnFailure> {
        let mut args = self.args.get(&group).cloned().ok_or_else(|| SpawnFailure {
            reason: format!("no replica of group {group} is configured"),
            damaged: false,
        })?;
        let queued = Arc::new(AtomicUsize::new(0));
        args.queued = queued.clone();
        let passive = Arc::new(AtomicBool::new(false));
        args.passive = passive.clone();
        let (replica, _) = Actor::spawn_linked(None, PartitionReplica, args, myself.get_cell())
            .await
            .map_err(|e| spawn_failure(group, e))?;
        self.children.insert(replica.get_id(), group);
        self.registry.write().unwrap_or_else(|p| p.into_inner()).insert(
            group,
            ReplicaHandle {
                actor: replica,
                queued,
                passive,
            },
        );
        Ok(())
    }

    /// Schedules a restart with back-off, or gives up past the limit or at
    /// once when the replica's files are damaged.
    fn record_failure(&mut self, myself: &ActorRef<SupervisorMsg>, group: GroupId, failure: SpawnFailure) {
        let SpawnFailure { reason, damaged } = failure;
        if damaged {
            self.args.remove(&group);
            let health = self.health.entry(group).or_insert_with(|| ReplicaHealth {
                group,
                ..ReplicaHealth::default()
            });
            health.failed = true;
            health.last_failure = Some(format!("damaged files (kept for repair): {reason}"));
            health.damaged = Some(reason.clone());
            tracing::error!(partition = %group.named(), reason, "replica files are damaged; not restarting it");
            return;
        }
        let now = Instant::now();
        let window = self.policy.restart_window;
        let failures = self.failures.entry(group).or_default();
        failures.push_back(now);
        while failures.front().is_some_and(|t| now.duration_since(*t) > window) {
            failures.pop_front();
        }
        let recent = failures.len();
        let health = self.health.entry(group).or_insert_with(|| ReplicaHealth {
            group,
            ..ReplicaHealth::default()
        });
        health.last_failure = Some(reason.clone());
        if recent > self.policy.restart_limit {
            health.failed = true;
            self.args.remove(&group);
            tracing::error!(
                partition = %group.named(),
                failures = recent,
                reason,
                "replica failed too often; no longer restarting it"
            );
            return;
        }
        health.restarts += 1;
        let backoff = self.policy.backoff(recent);
        tracing::warn!(
            partition = %group.named(),
            reason,
            backoff_ms = backoff.as_millis() as u64,
            "replica crashed; restarting it from disk"
        );
        myself.send_after(backoff, move || SupervisorMsg::Restart(group));
    }
}
