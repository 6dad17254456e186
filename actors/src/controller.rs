//! The controller and the services around it, on every node.
//!
//! - Controller voters host Raft group 0, whose log holds committed
//!   [`MetadataCommand`]s (one per record).
//! - Every node follows that log (from its own group-0 replica, or by asking
//!   a controller node) and applies it to its [`Metadata`], then reconciles:
//!   it hosts a replica of every partition assigned to it.
//! - The controller leader creates and deletes topics: it validates, places
//!   replicas on live nodes, proposes the command and waits until it applied.
//! - `client.broker` answers clients on every node (metadata, admin,
//!   produce, fetch); `broker.controller` answers other nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use runnel_client::protocol::{
    Acks, BrokerError, ClientRequest, ClientResponse, PartitionInfo, ReplicaHealthInfo, TopicInfo, CLIENT_ACTOR,
};
use runnel_cluster::{Mailbox, MemberState, NodeHandle, NodeId};
use runnel_storage::RecordBatch;
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::error::Result;
use crate::metadata::{
    command_batch, pick_replacement, place, place_tasks, validate_topic_name, AppliedMetadata, DataflowMeta,
    MetadataCommand, MetadataError, TopicConfig, CONTROLLER_GROUP,
};
use crate::protocol::{ControllerRequest, ControllerResponse, PassiveAnswer, CONTROLLER_ACTOR};
use crate::tasks::{dataflow_topics, TaskAssignment, TaskHost};

/// How often the controller leader looks for dead nodes' replicas to move,
/// and every node nudges unsettled groups.
const HEAL_INTERVAL: Duration = Duration::from_millis(500);
/// How long `start_dataflow` looks for a source topic this node has not
/// applied yet (a commit reaches a follower within a heartbeat or two).
const SOURCE_TOPIC_WAIT: Duration = Duration::from_secs(3);
/// How long a node waits for a group leader's configuration before it
/// asks another (the control loop waits meanwhile).
const MEMBERS_CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Controller and client requests handled at once per node; more wait.
const REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Controller log fetched per request.
const LOG_FETCH_BYTES: u32 = 1 << 20;

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Node ids of the controller voters (group 0).
    pub controllers: Vec<u64>,
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
    pub fn new(controllers: Vec<u64>) -> ControllerConfig {
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

struct Shared {
    broker: Arc<Broker>,
    node: NodeHandle,
    config: ControllerConfig,
    meta: RwLock<AppliedMetadata>,
    /// Groups this node was asked to host by the metadata.
    hosted: Mutex<BTreeSet<u64>>,
    /// Groups this node stopped hosting since it started (it left them, or
    /// their replica failed for good): never reopened as possibly needed
    /// voters — only replicas found on disk after a restart are.
    closed: Mutex<BTreeSet<u64>>,
    /// Local groups whose voters may differ from their assignment, with the
    /// desired voters; checked until they match.
    unsettled: Mutex<BTreeMap<u64, Vec<u64>>>,
    /// Local groups whose voters were seen equal to these assigned voters.
    /// An assignment that differs (even one back at the founders, after two
    /// replacements) makes the group unsettled again.
    settled: Mutex<BTreeMap<u64, Vec<u64>>>,
    /// This node's dataflow runtime, if its binary has one.
    tasks: Option<Arc<dyn TaskHost>>,
    /// The task assignment last handed to `tasks`.
    assigned: Mutex<Vec<TaskAssignment>>,
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
        let me = u64::from(node.id().0);
        if config.controllers.contains(&me) {
            broker
                .host(CONTROLLER_GROUP, Some(config.controllers.clone()), false)
                .await?;
        }
        let shared = Arc::new(Shared {
            broker,
            node: node.clone(),
            config: config.clone(),
            meta: RwLock::new(AppliedMetadata::default()),
            hosted: Mutex::new(BTreeSet::new()),
            closed: Mutex::new(BTreeSet::new()),
            unsettled: Mutex::new(BTreeMap::new()),
            settled: Mutex::new(BTreeMap::new()),
            tasks,
            assigned: Mutex::new(Vec::new()),
        });
        let mut tasks = Vec::new();
        let follower = shared.clone();
        tasks.push(tokio::spawn(async move { follower.follow().await }));
        let inbox = node.register(CONTROLLER_ACTOR, config.inbox_capacity)?;
        tasks.push(tokio::spawn(serve_inbox(
            inbox,
            shared.clone(),
            |shared, request: ControllerRequest| async move { shared.serve_controller(request).await },
            |e| ControllerResponse::Failed(BrokerError::InvalidRequest(e)),
        )));
        let inbox = node.register(CLIENT_ACTOR, config.inbox_capacity)?;
        tasks.push(tokio::spawn(serve_inbox(
            inbox,
            shared.clone(),
            |shared, request: ClientRequest| async move { shared.serve_client(request).await },
            |e| ClientResponse::Failed(BrokerError::InvalidRequest(e)),
        )));
        Ok(Controller { shared, tasks })
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
            let response = match postcard::from_bytes::<Req>(&message.payload) {
                Ok(request) => serve(shared, request).await,
                Err(e) => malformed(e.to_string()),
            };
            let _ = reply.reply(encode(&response));
        });
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).unwrap_or_default()
}

impl Shared {
    fn me(&self) -> u64 {
        u64::from(self.node.id().0)
    }

    fn meta(&self) -> std::sync::RwLockReadGuard<'_, AppliedMetadata> {
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Ids of the nodes membership holds alive now.
    fn alive_nodes(&self) -> Vec<u32> {
        self.node
            .members()
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.node.0)
            .collect()
    }

    async fn follow(&self) {
        let mut interval = tokio::time::interval(self.config.poll_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heal = Instant::now();
        let mut reconciled_at = None;
        loop {
            interval.tick().await;
            if let Err(reason) = self.pull_and_apply().await {
                tracing::debug!(reason, "controller log not reachable yet");
            }
            // Replicas follow the metadata as soon as it changes; otherwise
            // (a failed hosting to retry, a moved-off replica whose group
            // has let it go) every heal interval: walking a thousand
            // groups every poll was a fifth of an idle node's CPU.
            let applied = self.meta().applied_offset;
            let heal_due = last_heal.elapsed() >= HEAL_INTERVAL;
            if reconciled_at != Some(applied) || heal_due {
                self.reconcile().await;
                reconciled_at = Some(applied);
            }
            self.reconcile_tasks();
            if heal_due {
                last_heal = Instant::now();
                self.settle_membership().await;
                self.heal().await;
                self.report_failed_replicas().await;
                self.collect_stale_replicas().await;
            }
        }
    }

    /// On the controller leader: moves every replica of a node dead longer
    /// than `replace_after` to a live node, least loaded first. Partitions
    /// with no live node to take a replica stay under-replicated until one
    /// appears.
    async fn heal(&self) {
        let leads = self
            .broker
            .status(CONTROLLER_GROUP)
            .await
            .is_some_and(|s| s.leader == Some(self.me()));
        if !leads {
            return;
        }
        let now_ms = unix_ms() as u64;
        let members = self.node.members();
        let replace_after_ms = self.config.replace_after.as_millis() as u64;
        let dead: Vec<u32> = members
            .iter()
            .filter(|m| m.state == MemberState::Dead && m.since_unix_ms + replace_after_ms <= now_ms)
            .map(|m| m.node.0)
            .collect();
        if dead.is_empty() {
            return;
        }
        let alive: Vec<u32> = members
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.node.0)
            .collect();
        let moves = self.meta().replica_moves(&dead, &alive);
        let moves = moves.into_iter().chain(self.meta().task_moves(&dead, &alive));
        for command in moves {
            tracing::info!(?command, "re-creating a dead node's replica or task elsewhere");
            if let ControllerResponse::Failed(e) = self.commit(command).await {
                tracing::warn!(error = %e, "could not commit a replica move");
                return;
            }
        }
    }

    /// Hands the dataflow runtime the tasks metadata places here, when that
    /// set changes.
    fn reconcile_tasks(&self) {
        let Some(host) = &self.tasks else { return };
        let me = self.me() as u32;
        let wanted: Vec<TaskAssignment> = self.meta().metadata.tasks_of(me);
        let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        if *assigned != wanted {
            *assigned = wanted.clone();
            host.assign(wanted);
        }
    }

    /// On any node whose binary knows the dataflow: makes its topics (the
    /// sink too, when missing) and asks the controller leader to place it.
    async fn start_dataflow(&self, name: String) -> ClientResponse {
        let Some(shape) = self.tasks.as_ref().and_then(|host| host.shape(&name)) else {
            return ClientResponse::Refused(MetadataError::UnregisteredDataflow(name));
        };
        // This node may not have applied a topic created a moment ago: a
        // follower's copy of the controller log learns of a commit only with
        // the leader's next message, so an unknown source is looked for again
        // until `SOURCE_TOPIC_WAIT` has passed.
        let deadline = Instant::now() + SOURCE_TOPIC_WAIT;
        let partitions = loop {
            if let Err(reason) = self.pull_and_apply().await {
                tracing::debug!(reason, "controller log not reachable; answering from what is applied");
            }
            if self.meta().metadata.dataflows.contains_key(&name) {
                return ClientResponse::Refused(MetadataError::DataflowRunning(name));
            }
            let known = self
                .meta()
                .metadata
                .topics
                .get(&shape.source)
                .map(|t| t.config.partitions);
            match known {
                Some(partitions) => break partitions,
                None if Instant::now() >= deadline => return ClientResponse::UnknownTopic(shape.source),
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let replication = self.alive_nodes().len().clamp(1, 3) as u16;
        for (topic, topic_partitions) in dataflow_topics(&name, &shape, partitions) {
            if self.meta().metadata.topics.contains_key(&topic) {
                continue;
            }
            let config = TopicConfig::new(topic_partitions, replication);
            match self.admin(ControllerRequest::CreateTopic { name: topic, config }).await {
                ClientResponse::Done | ClientResponse::Refused(MetadataError::TopicExists(_)) => {}
                other => return other,
            }
        }
        let dataflow = DataflowMeta {
            name,
            source: shape.source,
            sink: shape.sink,
            stages: shape.stages,
            partitions,
            placement: Vec::new(),
        };
        self.admin(ControllerRequest::StartDataflow { dataflow }).await
    }

    /// Tells the controller about local replicas the supervisor gave up on
    /// that are still assigned here, so they are placed on another node.
    async fn report_failed_replicas(&self) {
        let failed: Vec<u64> = self
            .broker
            .health()
            .await
            .into_iter()
            .filter(|h| h.failed)
            .map(|h| h.group)
            .collect();
        let hosted = self.hosted.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for group in failed
            .into_iter()
            .filter(|g| hosted.contains(g) && *g != CONTROLLER_GROUP)
        {
            let request = ControllerRequest::ReplicaFailed {
                group,
                node: self.node.id().0,
            };
            if let ControllerResponse::Failed(e) = self.controller_call(request).await {
                tracing::warn!(group, error = %e, "could not report a failed replica");
            }
        }
    }

    /// On the controller leader: moves `node`'s failed replica of `group` to
    /// the least-loaded live node not in the partition.
    async fn replace_failed(&self, group: u64, node: u32) -> ControllerResponse {
        let alive: Vec<u32> = self.alive_nodes();
        let command = {
            let meta = self.meta();
            let load = meta.metadata.load();
            let found = meta.metadata.topics.values().find_map(|t| {
                (0..t.assignment.len())
                    .find(|&p| t.group_id(p as u32) == group)
                    .map(|p| (t.name.clone(), p as u32, t.assignment[p].clone()))
            });
            let Some((topic, partition, replicas)) = found else {
                return ControllerResponse::Done;
            };
            if !replicas.contains(&node) {
                return ControllerResponse::Done;
            }
            let replacement = pick_replacement(&alive, &replicas, &load);
            let Some(replacement) = replacement else {
                return ControllerResponse::Done;
            };
            MetadataCommand::ReplaceReplica {
                topic,
                partition,
                dead: node,
                replacement,
            }
        };
        tracing::info!(?command, "placing a failed replica on another node");
        self.commit(command).await
    }

    /// Deletes the files of replicas no assignment names any more (this node
    /// was replaced while it was away). Only once this node's metadata has
    /// reached the controller leader's commit point: a lagging view could
    /// miss a current assignment. The controller group is never touched.
    async fn collect_stale_replicas(&self) {
        let on_disk = self.broker.replica_dirs();
        let wanted = self.meta().wanted_groups(self.me());
        let hosted = self.hosted.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // Replicas not assigned here: on disk only, or still running as
        // members of their group.
        let candidates: Vec<u64> = on_disk
            .into_iter()
            .filter(|g| *g != CONTROLLER_GROUP && !wanted.contains_key(g))
            .filter(|g| hosted.contains(g) || self.broker.replica(*g).is_none())
            .collect();
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
        let (assigned, members_of) = {
            let meta = self.meta();
            if meta.applied_offset < leader_committed {
                return;
            }
            let assigned: BTreeSet<u64> = meta
                .metadata
                .topics
                .values()
                .flat_map(|t| {
                    (0..t.assignment.len())
                        .filter(|&p| t.assignment[p].contains(&self.node.id().0))
                        .map(|p| t.group_id(p as u32))
                })
                .collect();
            let members_of: BTreeMap<u64, Vec<u32>> = meta
                .metadata
                .topics
                .values()
                .flat_map(|t| (0..t.assignment.len()).map(move |p| (t.group_id(p as u32), t.assignment[p].clone())))
                .collect();
            (assigned, members_of)
        };
        for group in candidates.into_iter().filter(|g| !assigned.contains(g)) {
            // Files of a replica the group's configuration still counts are
            // its votes and acknowledged entries: deleting them would let
            // the same id come back empty while the leader believes it holds
            // everything (and could lose committed records).
            if let Some(nodes) = members_of.get(&group) {
                if !self.removed_from(group, nodes).await {
                    // Maybe still a voter the group needs (after a restart,
                    // nothing runs it): run it until it is known removed.
                    let closed = self.closed.lock().unwrap_or_else(|p| p.into_inner()).contains(&group);
                    if !hosted.contains(&group) && !closed {
                        match self.broker.host(group, None, true).await {
                            Ok(()) => {
                                self.hosted.lock().unwrap_or_else(|p| p.into_inner()).insert(group);
                            }
                            Err(e) => tracing::warn!(group, error = %e, "could not reopen an unassigned replica"),
                        }
                    }
                    tracing::debug!(group, "still in the group's configuration; its files are kept for now");
                    continue;
                }
            }
            if hosted.contains(&group) {
                self.stop_hosting(group).await;
            }
            match self.broker.delete_replica_files(group) {
                Ok(()) => tracing::info!(group, "deleted the files of a stale replica"),
                Err(e) => tracing::warn!(group, error = %e, "could not delete a stale replica's files"),
            }
        }
    }

    /// Whether the leader of `group`, found among `nodes`, confirms that
    /// this node is neither a voter nor a learner of the group any more.
    async fn removed_from(&self, group: u64, nodes: &[u32]) -> bool {
        let payload = encode(&ControllerRequest::GroupMembers { group });
        for &node in nodes {
            let Ok(bytes) = self
                .node
                .call(NodeId(node), CONTROLLER_ACTOR, payload.clone(), MEMBERS_CALL_TIMEOUT)
                .await
            else {
                continue;
            };
            if let Ok(ControllerResponse::Members { voters, learners }) = postcard::from_bytes(&bytes) {
                let me = self.me();
                return !voters.contains(&me) && !learners.contains(&me);
            }
        }
        false
    }

    /// Nudges the leader of every unsettled local group one step towards its
    /// assignment; forgets groups whose voters match it.
    async fn settle_membership(&self) {
        let unsettled: Vec<(u64, Vec<u64>)> = self
            .unsettled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(g, d)| (*g, d.clone()))
            .collect();
        for (group, desired) in unsettled {
            let Some(status) = self.broker.status(group).await else {
                continue;
            };
            let mut voters = status.voters.clone();
            voters.sort_unstable();
            let mut want = desired.clone();
            want.sort_unstable();
            if voters == want && status.learners.is_empty() {
                self.unsettled.lock().unwrap_or_else(|p| p.into_inner()).remove(&group);
                self.settled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(group, desired);
                continue;
            }
            self.broker.reconfigure(group, desired);
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
            let mut members: BTreeSet<u64> = status.voters.iter().chain(&status.learners).copied().collect();
            members.extend(self.meta().assignment_of(group).unwrap_or_default());
            members.remove(&me);
            let payload = encode(&ControllerRequest::PassiveReplica { group, node: me, since });
            for member in members {
                let Ok(member) = u32::try_from(member) else { continue };
                let answer = self
                    .node
                    .call(NodeId(member), CONTROLLER_ACTOR, payload.clone(), MEMBERS_CALL_TIMEOUT)
                    .await;
                let Ok(bytes) = answer else { continue };
                match postcard::from_bytes(&bytes) {
                    Ok(ControllerResponse::Passive(PassiveAnswer::Promoted)) => {
                        tracing::info!(group, member, "a peer confirms this passive replica was promoted");
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
    async fn pull_and_apply(&self) -> std::result::Result<(), String> {
        loop {
            let offset = self.meta().applied_offset;
            let batches = self.fetch_controller_log(offset).await?;
            if batches.is_empty() {
                return Ok(());
            }
            let mut meta = self.meta.write().unwrap_or_else(|p| p.into_inner());
            for batch in &batches {
                meta.apply_batch(batch).map_err(|e| e.to_string())?;
            }
        }
    }

    async fn fetch_controller_log(&self, offset: u64) -> std::result::Result<Vec<RecordBatch>, String> {
        if self.broker.replica(CONTROLLER_GROUP).is_some() {
            let fetched = self
                .broker
                .fetch(CONTROLLER_GROUP, offset, LOG_FETCH_BYTES as usize, true)
                .await
                .map_err(|e| e.to_string())?;
            return Ok(fetched.batches);
        }
        let request = encode(&ControllerRequest::FetchLog {
            offset,
            max_bytes: LOG_FETCH_BYTES,
        });
        let mut last_error = "no controller configured".to_string();
        for &controller in &self.config.controllers {
            let Ok(id) = u32::try_from(controller) else { continue };
            match self
                .node
                .call(
                    NodeId(id),
                    CONTROLLER_ACTOR,
                    request.clone(),
                    self.config.request_timeout,
                )
                .await
            {
                Ok(bytes) => match postcard::from_bytes::<ControllerResponse>(&bytes) {
                    Ok(ControllerResponse::Log { batches }) => {
                        return batches
                            .into_iter()
                            .map(|b| RecordBatch::from_bytes(b.into_vec()).map_err(|e| e.to_string()))
                            .collect();
                    }
                    Ok(other) => last_error = format!("controller {controller} answered {other:?}"),
                    Err(e) => last_error = e.to_string(),
                },
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(last_error)
    }

    /// Hosts a replica of every partition assigned here, and remembers which
    /// local groups must still converge on their assignment.
    async fn reconcile(&self) {
        let me = self.me();
        let wanted = self.meta().wanted_groups(me);
        let hosted: BTreeSet<u64> = self.hosted.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (group, wanted_group) in &wanted {
            let voters = &wanted_group.voters;
            let settled = self.settled.lock().unwrap_or_else(|p| p.into_inner()).get(group) == Some(voters);
            if !settled {
                // Checked until the group's voters match the assignment; a
                // changed assignment replaces an older target at once.
                let mut unsettled = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
                if unsettled.get(group) != Some(voters) {
                    unsettled.insert(*group, voters.clone());
                }
            }
            if hosted.contains(group) {
                continue;
            }
            // Every replica starts from the founders' configuration, the one
            // at index 0, and replays the log's changes from there: a replica
            // placed later is then added as a learner on top of the right
            // configuration, and is not a voter (so never campaigns) until a
            // committed change makes it one. (Holds while logs are never
            // compacted; snapshots will have to carry the configuration.) A
            // founder's replica re-created after a move is passive until
            // promoted again: the founders' configuration counts it.
            let bootstrap = Some(wanted_group.founders.clone());
            match self.broker.host(*group, bootstrap, wanted_group.rejoin).await {
                Ok(()) => {
                    self.hosted.lock().unwrap_or_else(|p| p.into_inner()).insert(*group);
                    self.closed.lock().unwrap_or_else(|p| p.into_inner()).remove(group);
                }
                Err(e) => tracing::warn!(group, error = %e, "could not host an assigned replica"),
            }
        }
        self.host_founders_never_hosted().await;
        let hosted: BTreeSet<u64> = self.hosted.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for group in hosted.difference(&wanted.keys().copied().collect()) {
            // A replica the group still counts keeps running wherever the
            // assignment moved: its vote and log may be what the group needs
            // to elect a leader and hand its data to the new replicas (found
            // by the simulation: two replicas moved at once left a group
            // without a quorum). Led here, it moves the group towards the
            // assignment too.
            if self.still_member(*group).await {
                if let Some(assigned) = self.meta().assignment_of(*group) {
                    let mut unsettled = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
                    if unsettled.get(group) != Some(&assigned) {
                        unsettled.insert(*group, assigned);
                    }
                }
                continue;
            }
            self.stop_hosting(*group).await;
        }
    }

    /// Creates the founding replicas of groups moved off this node that it
    /// never hosted (see [`AppliedMetadata::founded_groups_moved_off`]);
    /// they run until their group's leader confirms them removed.
    async fn host_founders_never_hosted(&self) {
        let founded = self.meta().founded_groups_moved_off(self.me());
        for (group, founders) in founded {
            let hosted = self.hosted.lock().unwrap_or_else(|p| p.into_inner()).contains(&group);
            let closed = self.closed.lock().unwrap_or_else(|p| p.into_inner()).contains(&group);
            if hosted || closed || self.broker.ever_hosted(group) {
                continue;
            }
            tracing::info!(
                group,
                "creating the founding replica of a group moved off before it was hosted here"
            );
            match self.broker.host(group, Some(founders), false).await {
                Ok(()) => {
                    self.hosted.lock().unwrap_or_else(|p| p.into_inner()).insert(group);
                }
                Err(e) => tracing::warn!(group, error = %e, "could not create a founding replica"),
            }
        }
    }

    /// Whether this node's replica of `group` counts itself in the group.
    async fn still_member(&self, group: u64) -> bool {
        let me = self.me();
        self.broker
            .status(group)
            .await
            .is_some_and(|s| s.voters.contains(&me) || s.learners.contains(&me))
    }

    async fn stop_hosting(&self, group: u64) {
        self.broker.unhost(group).await;
        self.closed.lock().unwrap_or_else(|p| p.into_inner()).insert(group);
        self.hosted.lock().unwrap_or_else(|p| p.into_inner()).remove(&group);
        self.unsettled.lock().unwrap_or_else(|p| p.into_inner()).remove(&group);
        self.settled.lock().unwrap_or_else(|p| p.into_inner()).remove(&group);
    }

    /// Sends a controller request to the leader of group 0, following hints.
    async fn controller_call(&self, request: ControllerRequest) -> ControllerResponse {
        let deadline = Instant::now() + self.config.request_timeout;
        let payload = encode(&request);
        let mut hint: Option<u64> = None;
        loop {
            let local_leader = match self.broker.status(CONTROLLER_GROUP).await {
                Some(status) => status.leader,
                None => None,
            };
            let mut candidates: Vec<u64> = hint.into_iter().chain(local_leader).collect();
            candidates.extend(self.config.controllers.iter().copied());
            for candidate in candidates {
                let response = if candidate == self.me() {
                    self.serve_controller(request.clone()).await
                } else {
                    let Ok(id) = u32::try_from(candidate) else { continue };
                    match self
                        .node
                        .call(
                            NodeId(id),
                            CONTROLLER_ACTOR,
                            payload.clone(),
                            self.config.request_timeout,
                        )
                        .await
                    {
                        Ok(bytes) => postcard::from_bytes(&bytes)
                            .unwrap_or_else(|e| ControllerResponse::Failed(BrokerError::InvalidRequest(e.to_string()))),
                        Err(_) => continue,
                    }
                };
                match response {
                    ControllerResponse::Failed(BrokerError::NotLeader { leader, .. }) => {
                        if leader.is_some() && leader != hint {
                            hint = leader;
                            break;
                        }
                    }
                    other => return other,
                }
            }
            if Instant::now() >= deadline {
                return ControllerResponse::Failed(BrokerError::NotLeader {
                    group: CONTROLLER_GROUP,
                    leader: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn serve_controller(&self, request: ControllerRequest) -> ControllerResponse {
        match request {
            ControllerRequest::FetchLog { offset, max_bytes } => {
                match self
                    .broker
                    .fetch(CONTROLLER_GROUP, offset, max_bytes as usize, true)
                    .await
                {
                    Ok(fetched) => ControllerResponse::Log {
                        batches: fetched
                            .batches
                            .into_iter()
                            .map(|b| serde_bytes::ByteBuf::from(b.into_bytes()))
                            .collect(),
                    },
                    Err(e) => ControllerResponse::Failed(e),
                }
            }
            ControllerRequest::CreateTopic { name, config } => self.create_topic(name, config).await,
            ControllerRequest::Rebalance => self.rebalance().await,
            ControllerRequest::ReplicaFailed { group, node } => self.replace_failed(group, node).await,
            ControllerRequest::CommittedOffset => match self.broker.status(CONTROLLER_GROUP).await {
                Some(status) if status.leader == Some(self.me()) => ControllerResponse::Offset(status.committed_offset),
                Some(status) => ControllerResponse::Failed(BrokerError::NotLeader {
                    group: CONTROLLER_GROUP,
                    leader: status.leader,
                }),
                None => ControllerResponse::Failed(BrokerError::UnknownGroup(CONTROLLER_GROUP)),
            },
            ControllerRequest::GroupMembers { group } => match self.broker.status(group).await {
                Some(status) if status.leader == Some(self.me()) => ControllerResponse::Members {
                    voters: status.voters,
                    learners: status.learners,
                },
                Some(status) => ControllerResponse::Failed(BrokerError::NotLeader {
                    group,
                    leader: status.leader,
                }),
                None => ControllerResponse::Failed(BrokerError::UnknownGroup(group)),
            },
            ControllerRequest::PassiveReplica { group, node, since } => {
                match self.broker.judge_passive(group, node, since).await {
                    Ok(answer) => ControllerResponse::Passive(answer),
                    Err(e) => ControllerResponse::Failed(e),
                }
            }
            ControllerRequest::StartDataflow { mut dataflow } => {
                let alive = self.alive_nodes();
                let tasks = dataflow.stages * dataflow.partitions;
                dataflow.placement = match place_tasks(tasks, &alive, &self.meta().metadata.task_load()) {
                    Ok(placement) => placement,
                    Err(e) => return ControllerResponse::Refused(e),
                };
                self.commit(MetadataCommand::StartDataflow { dataflow }).await
            }
            ControllerRequest::StopDataflow { name } => {
                if !self.meta().metadata.dataflows.contains_key(&name) {
                    return ControllerResponse::Refused(MetadataError::UnknownDataflow(name));
                }
                self.commit(MetadataCommand::StopDataflow { name }).await
            }
            ControllerRequest::DeleteTopic { name } => {
                if !self.meta().metadata.topics.contains_key(&name) {
                    return ControllerResponse::Refused(MetadataError::UnknownTopic(name));
                }
                self.commit(MetadataCommand::DeleteTopic { name }).await
            }
        }
    }

    /// On the controller leader: moves replicas from the most loaded live
    /// node to the least loaded one until loads differ by at most one. Each
    /// move goes through the same learner -> voter -> remove path as healing,
    /// so no partition drops below its replication factor.
    async fn rebalance(&self) -> ControllerResponse {
        const MOVES_MAX: usize = 1000;
        let alive: Vec<u32> = self.alive_nodes();
        let moves: Vec<MetadataCommand> = {
            let meta = self.meta();
            let mut load: BTreeMap<u32, usize> = alive.iter().map(|&n| (n, 0)).collect();
            for (node, count) in meta.metadata.load() {
                if let Some(slot) = load.get_mut(&node) {
                    *slot = count;
                }
            }
            let mut assignment: Vec<(String, u32, Vec<u32>)> = meta
                .metadata
                .topics
                .values()
                .flat_map(|t| {
                    t.assignment
                        .iter()
                        .enumerate()
                        .map(|(p, r)| (t.name.clone(), p as u32, r.clone()))
                })
                .collect();
            let mut moves = Vec::new();
            while moves.len() < MOVES_MAX {
                let (Some((&from, &most)), Some((&to, &least))) = (
                    load.iter().max_by_key(|(n, c)| (**c, **n)),
                    load.iter().min_by_key(|(n, c)| (**c, **n)),
                ) else {
                    break;
                };
                if most <= least + 1 {
                    break;
                }
                let Some(slot) = assignment
                    .iter_mut()
                    .find(|(_, _, r)| r.contains(&from) && !r.contains(&to))
                else {
                    break;
                };
                if let Some(replica) = slot.2.iter_mut().find(|n| **n == from) {
                    *replica = to;
                }
                moves.push(MetadataCommand::ReplaceReplica {
                    topic: slot.0.clone(),
                    partition: slot.1,
                    dead: from,
                    replacement: to,
                });
                *load.entry(from).or_default() -= 1;
                *load.entry(to).or_default() += 1;
            }
            moves
        };
        for command in moves {
            tracing::info!(?command, "rebalance moves a replica");
            if let ControllerResponse::Failed(e) = self.commit(command).await {
                return ControllerResponse::Failed(e);
            }
        }
        ControllerResponse::Done
    }

    /// On the controller leader: validate, place, commit.
    async fn create_topic(&self, name: String, config: TopicConfig) -> ControllerResponse {
        if let Err(e) = validate_topic_name(&name).and_then(|()| config.validate()) {
            return ControllerResponse::Refused(e);
        }
        if self.meta().metadata.topics.contains_key(&name) {
            return ControllerResponse::Refused(MetadataError::TopicExists(name));
        }
        let live: Vec<u32> = self.alive_nodes();
        let load = self.meta().metadata.load();
        let assignment = match place(&config, &live, &load) {
            Ok(assignment) => assignment,
            Err(e) => return ControllerResponse::Refused(e),
        };
        self.commit(MetadataCommand::CreateTopic {
            name,
            config,
            assignment,
        })
        .await
    }

    /// Proposes a command to group 0 (this node must lead it) and waits until
    /// it is applied here, returning how applying it went.
    async fn commit(&self, command: MetadataCommand) -> ControllerResponse {
        let batch = match command_batch(&command, unix_ms()) {
            Ok(batch) => batch,
            Err(e) => return ControllerResponse::Failed(BrokerError::InvalidRequest(e.to_string())),
        };
        let base_offset = match self.broker.produce(CONTROLLER_GROUP, batch, Acks::All).await {
            Ok(offset) => offset,
            Err(e) => return ControllerResponse::Failed(e),
        };
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            if let Err(reason) = self.pull_and_apply().await {
                tracing::debug!(reason, "applying the controller log");
            }
            if let Some(result) = self.meta().results.get(&base_offset) {
                return match result {
                    Ok(()) => ControllerResponse::Done,
                    Err(e) => ControllerResponse::Refused(e.clone()),
                };
            }
            if Instant::now() >= deadline {
                return ControllerResponse::Failed(BrokerError::Timeout(CONTROLLER_GROUP));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn serve_client(&self, request: ClientRequest) -> ClientResponse {
        match request {
            ClientRequest::Metadata => {
                let names: Vec<String> = self.meta().metadata.topics.keys().cloned().collect();
                let mut topics = Vec::with_capacity(names.len());
                for name in names {
                    if let Some(info) = self.topic_info(&name).await {
                        topics.push(info);
                    }
                }
                let nodes = self
                    .node
                    .members()
                    .iter()
                    .filter(|m| m.state == MemberState::Alive)
                    .map(|m| (m.node.0, m.addr))
                    .collect();
                let controller_leader = match self.broker.status(CONTROLLER_GROUP).await {
                    Some(status) => status.leader.and_then(|l| u32::try_from(l).ok()),
                    None => None,
                };
                ClientResponse::Metadata {
                    topics,
                    nodes,
                    controller_leader,
                }
            }
            ClientRequest::DescribeTopic { name } => match self.topic_info(&name).await {
                Some(info) => ClientResponse::Topic(info),
                None => ClientResponse::UnknownTopic(name),
            },
            ClientRequest::CreateTopic { name, config } => {
                self.admin(ControllerRequest::CreateTopic { name, config }).await
            }
            ClientRequest::DeleteTopic { name } => self.admin(ControllerRequest::DeleteTopic { name }).await,
            ClientRequest::Produce {
                topic,
                partition,
                acks,
                batch,
            } => {
                let group = match self.locate(&topic, partition) {
                    Ok(group) => group,
                    Err(response) => return response,
                };
                let batch = match RecordBatch::from_bytes(batch) {
                    Ok(batch) => batch,
                    Err(e) => return ClientResponse::Failed(BrokerError::InvalidRequest(e.to_string())),
                };
                match self.broker.produce(group, batch, acks).await {
                    Ok(base_offset) => ClientResponse::Produced { base_offset },
                    Err(e) => ClientResponse::Failed(e),
                }
            }
            ClientRequest::Rebalance => self.admin(ControllerRequest::Rebalance).await,
            ClientRequest::StartDataflow { name } => self.start_dataflow(name).await,
            ClientRequest::StopDataflow { name } => self.admin(ControllerRequest::StopDataflow { name }).await,
            ClientRequest::Dataflows => {
                ClientResponse::Dataflows(self.meta().metadata.dataflows.values().cloned().collect())
            }
            ClientRequest::DataflowTasks => {
                ClientResponse::Tasks(self.tasks.as_ref().map(|host| host.status()).unwrap_or_default())
            }
            ClientRequest::InjectPanic { topic, partition } => {
                if !self.config.test_fault_hooks {
                    let reason = "test fault hooks are disabled on this node".to_string();
                    return ClientResponse::Failed(BrokerError::InvalidRequest(reason));
                }
                let group = match self.locate(&topic, partition) {
                    Ok(group) => group,
                    Err(response) => return response,
                };
                match self.broker.replica(group) {
                    Some(replica) if replica.cast(crate::partition::ReplicaMsg::InjectPanic).is_ok() => {
                        ClientResponse::Done
                    }
                    _ => ClientResponse::Failed(BrokerError::UnknownGroup(group)),
                }
            }
            ClientRequest::ReplicaHealth => {
                let health = self.broker.health().await;
                ClientResponse::Health(
                    health
                        .into_iter()
                        .map(|h| ReplicaHealthInfo {
                            group: h.group,
                            restarts: h.restarts as u32,
                            failed: h.failed,
                            last_failure: h.last_failure,
                        })
                        .collect(),
                )
            }
            ClientRequest::OffsetForTimestamp {
                topic,
                partition,
                timestamp_ms,
            } => {
                let group = match self.locate(&topic, partition) {
                    Ok(group) => group,
                    Err(response) => return response,
                };
                match self.broker.offset_for_timestamp(group, timestamp_ms).await {
                    Ok(offset) => ClientResponse::Offset(offset),
                    Err(e) => ClientResponse::Failed(e),
                }
            }
            ClientRequest::Fetch {
                topic,
                partition,
                offset,
                max_bytes,
                any_replica,
            } => {
                let group = match self.locate(&topic, partition) {
                    Ok(group) => group,
                    Err(response) => return response,
                };
                match self.broker.fetch(group, offset, max_bytes as usize, any_replica).await {
                    Ok(fetched) => ClientResponse::Fetched {
                        batches: fetched
                            .batches
                            .into_iter()
                            .map(|b| serde_bytes::ByteBuf::from(b.into_bytes()))
                            .collect(),
                        start_offset: fetched.start_offset,
                        committed_offset: fetched.committed_offset,
                    },
                    Err(e) => ClientResponse::Failed(e),
                }
            }
        }
    }

    async fn admin(&self, request: ControllerRequest) -> ClientResponse {
        match self.controller_call(request).await {
            ControllerResponse::Done => ClientResponse::Done,
            ControllerResponse::Refused(e) => ClientResponse::Refused(e),
            ControllerResponse::Failed(e) => ClientResponse::Failed(e),
            ControllerResponse::Log { .. }
            | ControllerResponse::Offset(_)
            | ControllerResponse::Members { .. }
            | ControllerResponse::Passive(_) => {
                ClientResponse::Failed(BrokerError::InvalidRequest("unexpected answer".to_string()))
            }
        }
    }

    /// The group of a topic partition hosted here, or the answer to give.
    fn locate(&self, topic: &str, partition: u32) -> std::result::Result<u64, ClientResponse> {
        let meta = self.meta();
        let Some(meta_topic) = meta.metadata.topics.get(topic) else {
            return Err(ClientResponse::UnknownTopic(topic.to_string()));
        };
        let Some(replicas) = meta_topic.assignment.get(partition as usize) else {
            return Err(ClientResponse::PartitionOutOfRange {
                topic: topic.to_string(),
                partition,
                partitions: meta_topic.config.partitions,
            });
        };
        let group = meta_topic.group_id(partition);
        if self.broker.replica(group).is_none() {
            return Err(ClientResponse::NotHere {
                replicas: replicas.clone(),
            });
        }
        Ok(group)
    }

    async fn topic_info(&self, name: &str) -> Option<TopicInfo> {
        let topic = self.meta().metadata.topics.get(name).cloned()?;
        let mut partitions = Vec::with_capacity(topic.assignment.len());
        for (partition, replicas) in topic.assignment.iter().enumerate() {
            let status = self.broker.status(topic.group_id(partition as u32)).await;
            partitions.push(PartitionInfo {
                partition: partition as u32,
                replicas: replicas.clone(),
                leader: status
                    .as_ref()
                    .and_then(|s| s.leader)
                    .and_then(|l| u32::try_from(l).ok()),
                committed_offset: status.as_ref().map(|s| s.committed_offset),
                end_offset: status.as_ref().map(|s| s.end_offset),
                learners: status
                    .as_ref()
                    .map(|s| s.learners.iter().filter_map(|&v| u32::try_from(v).ok()).collect())
                    .unwrap_or_default(),
                voters: status
                    .map(|s| s.voters.iter().filter_map(|&v| u32::try_from(v).ok()).collect())
                    .unwrap_or_default(),
            });
        }
        Some(TopicInfo {
            name: topic.name,
            config: topic.config,
            partitions,
        })
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
