//! The controller and the services around it, on every node.
//!
//! - [`core`]: the controller's decisions on one node, a deterministic state
//!   machine ([`ControllerCore`]) that the tokio shell here and the
//!   simulation both drive.
//! - This module is the shell: controller voters host Raft group 0, whose
//!   log holds committed [`MetadataCommand`](crate::metadata::MetadataCommand)s (one per record); every node
//!   follows that log (from its own group-0 replica, or by asking a
//!   controller node), feeds it to the core, and carries out the core's
//!   commands (host, stop, reconfigure, delete files, commit).
//! - [`leader`]: the controller RPC service (`broker.controller`) other
//!   nodes call: the log, topic and dataflow admin on the leader, group
//!   membership and passive-replica questions.
//! - [`service`]: [`BrokerService`], the typed client service, one method
//!   per request kind; the QUIC client listener (`client.broker`) is an
//!   adapter over it.

pub mod core;
mod groups;
mod leader;
pub mod service;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use runnel_cluster::{Mailbox, MemberState, NodeHandle, NodeId};
use runnel_storage::RecordBatch;
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::error::Result;
use crate::metadata::{GroupId, CONTROLLER_GROUP};
use crate::protocol::{
    decode_payload, encode_payload, BrokerError, ClientRequest, ClientResponse, ControllerRequest, ControllerResponse,
    PassiveAnswer, CLIENT_ACTOR, CONTROLLER_ACTOR,
};
use crate::tasks::TaskHost;

pub use self::core::{Command, ControllerCore, CoreConfig, GroupView, Liveness, MemberView, RepairStep};
pub use groups::{GroupDescription, GroupFailure, Subscribed};
pub use service::{BrokerService, ServiceError};

/// How often the controller leader looks for dead nodes' replicas to move,
/// and every node nudges unsettled groups.
const HEAL_INTERVAL: Duration = Duration::from_millis(500);
/// How long a catch-up waits for this node's metadata to reach the
/// controller leader's commit point, and how often it looks again.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);
const CATCH_UP_POLL: Duration = Duration::from_millis(25);
/// How often consumer groups expire silent members and check which groups
/// this node still coordinates.
const GROUP_TICK: Duration = Duration::from_millis(200);
/// How long a node waits for a group leader's configuration before it
/// asks another (the control loop waits meanwhile).
const MEMBERS_CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Controller and client requests handled at once per node; more wait.
const REQUESTS_IN_FLIGHT_MAX: usize = 256;

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Node ids of the controller voters (group 0).
    pub controllers: Vec<NodeId>,
    /// How often a node looks for new metadata.
    pub poll_interval: Duration,
    pub request_timeout: Duration,
    /// Queue of each service's inbox.
    pub inbox_capacity: usize,
    /// Accept the test-only `InjectPanic` request (never in production).
    pub test_fault_hooks: bool,
    /// A node dead this long has its replicas re-created on other nodes.
    pub replace_after: Duration,
}

impl ControllerConfig {
    pub fn new(controllers: Vec<NodeId>) -> ControllerConfig {
        ControllerConfig {
            controllers,
            poll_interval: Duration::from_millis(20),
            request_timeout: Duration::from_secs(10),
            inbox_capacity: 1024,
            test_fault_hooks: false,
            replace_after: Duration::from_secs(30),
        }
    }
}

/// What every task of the shell shares.
struct Shared {
    broker: Arc<Broker>,
    node: NodeHandle,
    config: ControllerConfig,
    /// The decisions; locked only between awaits, never across one.
    core: Mutex<ControllerCore>,
    /// This node's dataflow runtime, if its binary has one.
    tasks: Option<Arc<dyn TaskHost>>,
    /// The consumer groups this node coordinates.
    groups: crate::groups::Coordinator,
    /// Held while catching up with the controller ([`Shared::catch_up`]).
    catching_up: tokio::sync::Mutex<()>,
}

pub struct Controller {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Controller {
    /// Starts the controller machinery on a node whose broker runs.
    pub async fn start(broker: Arc<Broker>, config: ControllerConfig) -> Result<Controller> {
        Controller::start_with_tasks(broker, config, None).await
    }

    /// As [`Controller::start`], with a dataflow runtime that runs the
    /// dataflow tasks metadata places on this node.
    pub async fn start_with_tasks(
        broker: Arc<Broker>,
        config: ControllerConfig,
        tasks: Option<Arc<dyn TaskHost>>,
    ) -> Result<Controller> {
        let node = broker.node().clone();
        let me = node.id();
        if config.controllers.contains(&me) {
            broker
                .host(CONTROLLER_GROUP, Some(config.controllers.clone()), false)
                .await?;
        }
        let core = ControllerCore::new(CoreConfig {
            me,
            replace_after_ms: config.replace_after.as_millis() as u64,
            heal_interval_ms: HEAL_INTERVAL.as_millis() as u64,
            quiet_before_ms: unix_ms(),
        });
        let shared = Arc::new(Shared {
            broker,
            node: node.clone(),
            config: config.clone(),
            core: Mutex::new(core),
            tasks,
            groups: crate::groups::Coordinator::new(unix_ms() as u64 ^ u64::from(me.0) << 48),
            catching_up: tokio::sync::Mutex::new(()),
        });
        let mut handles = Vec::new();
        let follower = shared.clone();
        handles.push(tokio::spawn(async move { follower.follow().await }));
        let groups = shared.clone();
        handles.push(tokio::spawn(async move {
            let mut interval = tokio::time::interval(GROUP_TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                groups.tick_groups().await;
            }
        }));
        let inbox = node.register(CONTROLLER_ACTOR, config.inbox_capacity)?;
        handles.push(tokio::spawn(serve_inbox(
            inbox,
            shared.clone(),
            |shared, request: ControllerRequest| async move { shared.serve_controller(request).await },
            |e| ControllerResponse::Failed(BrokerError::InvalidRequest(e)),
        )));
        let inbox = node.register(CLIENT_ACTOR, config.inbox_capacity)?;
        handles.push(tokio::spawn(serve_inbox(
            inbox,
            shared.clone(),
            |shared, request: ClientRequest| async move { BrokerService::new(shared).dispatch(request).await },
            |e| ClientResponse::Failed(BrokerError::InvalidRequest(e)),
        )));
        Ok(Controller { shared, tasks: handles })
    }

    /// The typed client service of this node, for adapters other than the
    /// QUIC client listener.
    pub fn service(&self) -> BrokerService {
        BrokerService::new(self.shared.clone())
    }

    pub async fn shutdown(mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.shared.broker.shutdown().await;
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

/// Answers every call arriving in `inbox` with `serve`, at most
/// `REQUESTS_IN_FLIGHT_MAX` at once; a request that does not decode gets
/// `malformed`'s answer.
async fn serve_inbox<Req, Resp, Serve, Answer>(
    mut inbox: Mailbox,
    shared: Arc<Shared>,
    serve: Serve,
    malformed: fn(String) -> Resp,
) where
    Req: serde::de::DeserializeOwned + Send + 'static,
    Resp: serde::Serialize + Send + 'static,
    Serve: Fn(Arc<Shared>, Req) -> Answer + Copy + Send + Sync + 'static,
    Answer: std::future::Future<Output = Resp> + Send + 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    while let Some(message) = inbox.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(reply) = message.reply else { return };
            let response = match decode_payload::<Req>(&message.payload) {
                Ok(request) => serve(shared, request).await,
                Err(e) => malformed(e.to_string()),
            };
            let _ = reply.reply(encode(&response));
        });
    }
}

/// A payload for another node; every message here encodes (no maps with
/// non-string keys, no unbounded recursion), so a failure is logged and
/// sent empty, which the far side refuses by name.
fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    encode_payload(value).unwrap_or_else(|e| {
        tracing::error!(error = %e, "could not encode a payload");
        Vec::new()
    })
}

impl Shared {
    fn me(&self) -> NodeId {
        self.node.id()
    }

    fn core(&self) -> MutexGuard<'_, ControllerCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Membership as the core sees it.
    fn member_views(&self) -> Vec<MemberView> {
        self.node
            .members()
            .iter()
            .map(|m| MemberView {
                node: m.node,
                liveness: match m.state {
                    MemberState::Alive => Liveness::Alive,
                    MemberState::Suspect => Liveness::Suspect,
                    MemberState::Dead => Liveness::Dead {
                        since_ms: m.since_unix_ms,
                    },
                },
            })
            .collect()
    }

    /// Ids of the nodes membership holds alive now.
    fn alive_nodes(&self) -> Vec<NodeId> {
        core::alive_nodes(&self.member_views())
    }

    /// The configuration the local replica of `group` sees, if it runs.
    async fn group_view(&self, group: GroupId) -> Option<GroupView> {
        let status = self.broker.status(group).await?;
        Some(GroupView {
            voters: status.voters,
            learners: status.learners,
        })
    }

    async fn follow(&self) {
        let mut interval = tokio::time::interval(self.config.poll_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The controller-log offset the log lines' partition names follow.
        let mut named_at = None;
        loop {
            interval.tick().await;
            if let Err(reason) = self.pull_and_apply().await {
                tracing::debug!(reason, "controller log not reachable yet");
            }
            // Replicas follow the metadata as soon as it changes; otherwise
            // (a failed hosting to retry, a moved-off replica whose group
            // has let it go) every heal interval: walking a thousand
            // groups every poll was a fifth of an idle node's CPU.
            let applied = self.core().meta().applied_offset;
            if named_at != Some(applied) {
                named_at = Some(applied);
                runnel_client::protocol::name_groups(self.core().meta().metadata.group_names());
            }
            let due = self.core().due(unix_ms() as u64);
            if due.reconcile {
                self.reconcile().await;
            }
            if due.prefer {
                let commands = self.core().preferred_leaders(&self.member_views());
                self.execute(commands).await;
                let commands = self.core().retention();
                self.execute(commands).await;
            }
            self.reconcile_tasks();
            if due.heal {
                self.settle_membership().await;
                self.heal().await;
                self.report_failed_replicas().await;
                self.repair_damaged_replicas().await;
                self.collect_stale_replicas().await;
            }
        }
    }

    /// Carries out the core's commands, reporting back what it needs to know.
    async fn execute(&self, commands: Vec<Command>) {
        for command in commands {
            match command {
                Command::Host {
                    group,
                    founders,
                    rejoin,
                } => match self.broker.host(group, founders, rejoin).await {
                    Ok(()) => self.core().on_hosted(group),
                    // Damage is reported (status, describe) and repaired
                    // on its own path; retried hosting is not news.
                    Err(e) if self.broker.damaged().await.contains(&group) => {
                        tracing::debug!(partition = %group.named(), error = %e, "not hosting a damaged replica")
                    }
                    Err(e) => tracing::warn!(partition = %group.named(), error = %e, "could not host a replica"),
                },
                Command::Unhost { group } => self.broker.unhost(group).await,
                Command::Reconfigure { group, voters } => self.broker.reconfigure(group, voters),
                Command::PreferLeader { group, node } => self.broker.prefer_leader(group, node),
                Command::Retain { group, retention_ms } => self.broker.retain(group, retention_ms),
                Command::Compact { group, policy } => self.broker.compact(group, policy),
                Command::DeleteFiles { group } => match self.broker.delete_replica_files(group) {
                    Ok(()) => tracing::info!(partition = %group.named(), "deleted the files of a stale replica"),
                    Err(e) => {
                        tracing::warn!(partition = %group.named(), error = %e, "could not delete a stale replica's files")
                    }
                },
            }
        }
    }

    /// Hosts a replica of every partition assigned here (and founding
    /// replicas a group may need); stops unassigned replicas the group let go.
    async fn reconcile(&self) {
        let commands = self.core().reconcile(|group| self.broker.ever_hosted(group));
        self.execute(commands).await;
        let unassigned = self.core().unassigned_hosted();
        for group in unassigned {
            let member = self.group_view(group).await.is_some_and(|v| v.counts(self.me()));
            let command = self.core().on_unassigned(group, member);
            self.execute(command.into_iter().collect()).await;
        }
    }

    /// Hands the dataflow runtime the tasks metadata places here, when that
    /// set changes.
    fn reconcile_tasks(&self) {
        let Some(host) = &self.tasks else { return };
        if let Some((wanted, plans)) = self.core().tasks_changed() {
            host.assign(wanted, plans);
        }
    }

    /// On the controller leader: moves every replica and task of a node
    /// dead longer than `replace_after` to a live node, or with none dead
    /// one task to balance them.
    async fn heal(&self) {
        let leads = self
            .broker
            .status(CONTROLLER_GROUP)
            .await
            .is_some_and(|s| s.leader == Some(self.me()));
        if !leads {
            return;
        }
        let moves = self.core().heal(unix_ms() as u64, &self.member_views());
        for command in moves {
            tracing::info!(
                ?command,
                "moving a replica or task (off a dead node, or to balance tasks)"
            );
            if let ControllerResponse::Failed(e) = self.commit(command).await {
                tracing::warn!(error = %e, "could not commit a replica move");
                return;
            }
        }
    }

    /// Tells the controller about local replicas the supervisor gave up on
    /// that are still assigned here, so they are placed on another node.
    async fn report_failed_replicas(&self) {
        let failed: Vec<GroupId> = self
            .broker
            .health()
            .await
            .into_iter()
            .filter(|h| h.failed)
            .map(|h| h.group)
            .collect();
        let to_report = self.core().failed_to_report(&failed);
        for group in to_report {
            let request = ControllerRequest::ReplicaFailed {
                group,
                node: self.node.id(),
            };
            if let ControllerResponse::Failed(e) = self.controller_call(request).await {
                tracing::warn!(partition = %group.named(), error = %e, "could not report a failed replica");
            }
        }
    }

    /// Deletes the files of replicas no assignment names any more (this node
    /// was replaced while it was away), as the core judges them.
    async fn collect_stale_replicas(&self) {
        let on_disk = self.broker.replica_dirs();
        let candidates = self
            .core()
            .stale_candidates(&on_disk, |g| self.broker.replica(g).is_some());
        if candidates.is_empty() {
            return;
        }
        let ControllerResponse::Offset(leader_committed) =
            self.controller_call(ControllerRequest::CommittedOffset).await
        else {
            return;
        };
        if let Err(reason) = self.pull_and_apply().await {
            tracing::debug!(reason, "controller log not reachable; stale replicas kept for now");
            return;
        }
        let checks = self.core().stale_checks(&candidates, leader_committed);
        for check in checks {
            let removed = match &check.ask {
                Some(nodes) => self.removed_from(check.group, nodes).await,
                None => true,
            };
            if !removed {
                tracing::debug!(
                    group = %check.group,
                    "still in the group's configuration; files kept for now"
                );
            }
            let commands = self.core().on_stale_answer(check.group, removed);
            self.execute(commands).await;
        }
    }

    /// Repairs local replicas whose files are damaged, in place. A leader of
    /// the group on another node (elected by a majority without this
    /// replica, so it holds every committed entry) first removes this node
    /// from the voters, with its record of what the replica held; then the
    /// files move to the quarantine and the replica rejoins empty and
    /// passive; settling adds it as a learner, it catches up and is
    /// promoted. Without such a leader the files stay: they may hold the
    /// last copy of committed entries.
    async fn repair_damaged_replicas(&self) {
        let damaged = self.broker.damaged().await;
        if damaged.is_empty() {
            return;
        }
        let repairable = self.core().damaged_to_repair(&damaged);
        for (group, peers) in repairable {
            let leader = self.leader_view(group, &peers).await;
            let step = self
                .core()
                .on_damaged_status(group, leader.as_ref().map(|(node, view)| (*node, view)));
            let leader = match step {
                RepairStep::Keep => {
                    if self.core().on_kept(group) {
                        tracing::warn!(partition = %group.named(), "damaged replica kept as it is: no leader elsewhere confirms the group goes on without it (it may hold the last copy of committed records; the partition takes no writes here until it is repaired)");
                    }
                    continue;
                }
                RepairStep::AskRemoval { leader } => leader,
                RepairStep::Quarantine => {
                    self.quarantine(group);
                    continue;
                }
            };
            let request = encode(&ControllerRequest::RemoveDamaged { group, node: self.me() });
            let _ = self
                .node
                .call(leader, CONTROLLER_ACTOR, request, MEMBERS_CALL_TIMEOUT)
                .await;
        }
    }

    /// Moves a damaged replica's files aside (see [`RepairStep::Quarantine`]).
    fn quarantine(&self, group: GroupId) {
        match self.broker.quarantine_replica(group) {
            Ok(path) => {
                self.core().on_quarantined(group);
                tracing::warn!(
                    partition = %group.named(),
                    quarantine = %path.display(),
                    "damaged replica files moved aside; the replica rejoins empty and catches up from its peers"
                )
            }
            Err(e) => {
                tracing::error!(partition = %group.named(), error = %e, "could not move a damaged replica's files aside")
            }
        }
    }

    /// Whether the leader of `group`, found among `nodes`, confirms that
    /// this node is neither a voter nor a learner of the group any more.
    async fn removed_from(&self, group: GroupId, nodes: &[NodeId]) -> bool {
        self.leader_view(group, nodes)
            .await
            .is_some_and(|(_, view)| !view.counts(self.me()))
    }

    /// The leader of `group`, the first of `nodes` that answers as the
    /// leader, and the members as it knows them.
    pub(super) async fn leader_view(&self, group: GroupId, nodes: &[NodeId]) -> Option<(NodeId, GroupView)> {
        let payload = encode(&ControllerRequest::GroupMembers { group });
        // A follower names its leader, which may be outside `nodes` (a
        // group mid-reconfiguration): asked next, each node at most once.
        let mut to_ask: std::collections::VecDeque<NodeId> = nodes.iter().copied().collect();
        let mut asked = std::collections::BTreeSet::new();
        while let Some(node) = to_ask.pop_front() {
            if node == self.me() || !asked.insert(node) {
                continue;
            }
            let Ok(bytes) = self
                .node
                .call(node, CONTROLLER_ACTOR, payload.clone(), MEMBERS_CALL_TIMEOUT)
                .await
            else {
                continue;
            };
            match decode_payload(&bytes) {
                Ok(ControllerResponse::Members { voters, learners }) => {
                    return Some((node, GroupView { voters, learners }))
                }
                Ok(ControllerResponse::Failed(BrokerError::NotLeader {
                    leader: Some(leader), ..
                })) => to_ask.push_front(leader),
                _ => {}
            }
        }
        None
    }

    /// Nudges every hosted group whose voters differ from its assignment one
    /// step towards it (where the local replica leads).
    async fn settle_membership(&self) {
        let targets = self.core().settle_targets(unix_ms() as u64);
        for (group, assigned) in targets {
            let Some(view) = self.group_view(group).await else {
                continue;
            };
            let command = self.core().on_settle_status(group, &assigned, &view);
            self.execute(command.into_iter().collect()).await;
        }
        self.ask_about_passive_replicas().await;
    }

    /// Asks the other replicas of each group whose local replica is passive
    /// what they know of it (see [`crate::ReplicaCore::judge_passive`]):
    /// confirmed promotions end its passivity, a leader that counted it as a
    /// voter from before demotes it.
    async fn ask_about_passive_replicas(&self) {
        let me = self.me();
        for group in self.broker.passive_groups() {
            let Some(status) = self.broker.status(group).await else {
                continue;
            };
            let Some(since) = status.passive_since else { continue };
            let view = GroupView {
                voters: status.voters,
                learners: status.learners,
            };
            let peers = self.core().passive_peers(group, &view);
            let payload = encode(&ControllerRequest::PassiveReplica { group, node: me, since });
            for peer in peers {
                let answer = self
                    .node
                    .call(peer, CONTROLLER_ACTOR, payload.clone(), MEMBERS_CALL_TIMEOUT)
                    .await;
                let Ok(bytes) = answer else { continue };
                match decode_payload(&bytes) {
                    Ok(ControllerResponse::Passive(PassiveAnswer::Promoted)) => {
                        tracing::info!(partition = %group.named(), peer = %peer, "a peer confirms this passive replica was promoted");
                        self.broker.promoted(group);
                        break;
                    }
                    Ok(ControllerResponse::Passive(PassiveAnswer::Demoting)) => break,
                    _ => {}
                }
            }
        }
    }

    /// Applies every newly committed metadata command, in log order.
    /// Brings this node's metadata up to the controller leader's commit
    /// point, asked now, so that a negative answer ("no such topic") is
    /// never a stale one (a node that just restarted, or has not yet applied
    /// a topic created a moment ago). Concurrent callers share one catch-up.
    async fn catch_up(&self) -> std::result::Result<(), String> {
        let _one_at_a_time = self.catching_up.lock().await;
        let committed = match self.controller_call(ControllerRequest::CommittedOffset).await {
            ControllerResponse::Offset(committed) => committed,
            other => return Err(format!("the controller leader's commit point is not known: {other:?}")),
        };
        let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        loop {
            self.pull_and_apply().await?;
            let applied = self.core().meta().applied_offset;
            if applied >= committed {
                return Ok(());
            }
            // This node's own controller replica may not have learnt the
            // leader's commit point yet (it does with the next heartbeat).
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "applied to offset {applied} of the controller log, committed to {committed}"
                ));
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
    }

    async fn pull_and_apply(&self) -> std::result::Result<(), String> {
        loop {
            let offset = self.core().meta().applied_offset;
            let batches = self.fetch_controller_log(offset).await?;
            if batches.is_empty() {
                return Ok(());
            }
            let mut core = self.core();
            for batch in &batches {
                core.apply_batch(batch).map_err(|e| e.to_string())?;
            }
        }
    }

    async fn fetch_controller_log(&self, offset: u64) -> std::result::Result<Vec<RecordBatch>, String> {
        if self.broker.replica(CONTROLLER_GROUP).is_some() {
            let fetched = self
                .broker
                .fetch(CONTROLLER_GROUP, offset, leader::LOG_FETCH_BYTES as usize, true)
                .await
                .map_err(|e| e.to_string())?;
            return Ok(fetched.batches);
        }
        let request = encode(&ControllerRequest::FetchLog {
            offset,
            max_bytes: leader::LOG_FETCH_BYTES,
        });
        let mut last_error = "no controller configured".to_string();
        for &controller in &self.config.controllers {
            let answer = self
                .node
                .call(
                    controller,
                    CONTROLLER_ACTOR,
                    request.clone(),
                    self.config.request_timeout,
                )
                .await;
            match answer
                .map_err(|e| e.to_string())
                .and_then(|bytes| decode_payload::<ControllerResponse>(&bytes).map_err(|e| e.to_string()))
            {
                Ok(ControllerResponse::Log { batches }) => {
                    return batches
                        .into_iter()
                        .map(|b| RecordBatch::from_bytes(b.into_vec()).map_err(|e| e.to_string()))
                        .collect();
                }
                Ok(other) => last_error = format!("controller {controller} answered {other:?}"),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests;
