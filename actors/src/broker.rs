//! The broker of one node: its [`NodeSupervisor`] and replicas, the Raft
//! inbox registered in the cluster directory, and one ticker that drives every
//! local Raft group.
//!
//! Raft messages leaving a replica are grouped by destination node and sent as
//! one [`RaftBatch`] per node; the QUIC transport further batches whatever
//! queues up for the same peer into one stream write.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use protobuf::Message as _;
use ractor::{Actor, ActorRef};
use raft::eraftpb::Message;
use runnel_cluster::{NodeHandle, NodeId};
use runnel_storage::{LogConfig, RecordBatch};
use tokio::task::JoinHandle;

use crate::error::{ActorError, Result};
use crate::partition::{Fetched, RaftRouter, ReplicaArgs, ReplicaMsg, ReplicaStatus};
use crate::protocol::{
    decode_payload, encode_payload, Acks, BrokerError, GroupId, GroupMessage, PassiveAnswer, RaftBatch, RAFT_ACTOR,
};
use crate::replica::ReplicaConfig;
use crate::supervisor::{
    NodeSupervisor, Registry, ReplicaHandle, ReplicaHealth, RestartPolicy, SupervisorArgs, SupervisorMsg,
};

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub data_dir: PathBuf,
    /// Raft's logical clock: elections after 10-20 ticks, heartbeats every 2.
    pub tick: Duration,
    pub log_config: LogConfig,
    pub restart_policy: RestartPolicy,
    /// Raft batches waiting in the inbox before peers see backpressure.
    pub inbox_capacity: usize,
    /// How long a produce or fetch waits for the replica.
    pub request_timeout: Duration,
    /// Test-only injected bug (see `ReplicaConfig::ack_before_commit`).
    pub test_ack_before_commit: bool,
    /// Whether replicas fsync their logs (see `ReplicaConfig::sync_log`).
    pub sync_log: bool,
}

impl BrokerConfig {
    pub fn new(data_dir: PathBuf) -> BrokerConfig {
        BrokerConfig {
            data_dir,
            tick: Duration::from_millis(100),
            log_config: LogConfig::default(),
            restart_policy: RestartPolicy::default(),
            inbox_capacity: 4096,
            request_timeout: Duration::from_secs(10),
            test_ack_before_commit: false,
            sync_log: true,
        }
    }
}

/// Raft messages waiting for one peer at most; more are dropped (Raft
/// retransmits).
const PENDING_PER_PEER_MAX: usize = 65_536;

/// Sends Raft messages through the cluster layer, coalesced: messages of
/// every group for the same peer that queue up while the flusher is busy
/// leave together as one cluster message.
struct ClusterRouter {
    node: NodeHandle,
    pending: std::sync::Mutex<BTreeMap<u64, Vec<GroupMessage>>>,
    wake: tokio::sync::Notify,
}

impl RaftRouter for ClusterRouter {
    fn send(&self, group: GroupId, messages: Vec<Message>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for message in messages {
            let queue = pending.entry(message.to).or_default();
            if queue.len() >= PENDING_PER_PEER_MAX {
                tracing::debug!(group = %group, to = message.to, "Raft queue to peer full; message dropped");
                continue;
            }
            match message.write_to_bytes() {
                Ok(bytes) => queue.push(GroupMessage { group, message: bytes }),
                Err(e) => tracing::error!(partition = %group.named(), error = %e, "could not encode a Raft message"),
            }
        }
        drop(pending);
        self.wake.notify_one();
    }
}

impl ClusterRouter {
    /// Sends whatever is queued, one cluster message per peer, until stopped.
    async fn flush_forever(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            // Let the other replicas of this round add their messages.
            tokio::task::yield_now().await;
            let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
            for (to, messages) in pending {
                self.send_batch(to, messages);
            }
        }
    }

    fn send_batch(&self, to: u64, messages: Vec<GroupMessage>) {
        // Raft addresses peers by u64 id; one no node can have goes nowhere.
        let Some(to) = NodeId::from_raft(to) else { return };
        let payload = match encode_payload(&RaftBatch { messages }) {
            Ok(payload) => payload,
            Err(e) => {
                tracing::error!(to = %to, error = %e, "could not encode a Raft batch");
                return;
            }
        };
        // Raft retransmits: a message lost to a full queue or a dead peer is
        // recovered by the protocol, so it is only logged.
        if let Err(e) = self.node.send(to, RAFT_ACTOR, payload) {
            tracing::debug!(to = %to, error = %e, "Raft batch not sent");
        }
    }
}

pub struct Broker {
    node: NodeHandle,
    config: BrokerConfig,
    supervisor: ActorRef<SupervisorMsg>,
    registry: Registry,
    router: Arc<dyn RaftRouter>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Broker {
    /// Starts the broker of a running node.
    pub async fn start(node: NodeHandle, config: BrokerConfig) -> Result<Broker> {
        let registry: Registry = Arc::new(RwLock::new(HashMap::new()));
        let args = SupervisorArgs {
            registry: registry.clone(),
            policy: config.restart_policy.clone(),
        };
        let (supervisor, _) = Actor::spawn(None, NodeSupervisor, args)
            .await
            .map_err(|e| ActorError::InvalidState(format!("starting the node supervisor: {e}")))?;
        let mut inbox = node.register(RAFT_ACTOR, config.inbox_capacity)?;
        let inbox_registry = registry.clone();
        let inbox_task = tokio::spawn(async move {
            while let Some(message) = inbox.recv().await {
                deliver_raft_batch(&inbox_registry, message.from, &message.payload);
            }
        });
        let tick_registry = registry.clone();
        let tick = config.tick;
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let replicas: Vec<ReplicaHandle> = tick_registry
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .cloned()
                    .collect();
                for replica in replicas {
                    replica.offer(ReplicaMsg::Tick);
                }
            }
        });
        let cluster_router = Arc::new(ClusterRouter {
            node: node.clone(),
            pending: std::sync::Mutex::new(BTreeMap::new()),
            wake: tokio::sync::Notify::new(),
        });
        let flusher = tokio::spawn(cluster_router.clone().flush_forever());
        let router: Arc<dyn RaftRouter> = cluster_router;
        Ok(Broker {
            node,
            config,
            supervisor,
            registry,
            router,
            tasks: std::sync::Mutex::new(vec![inbox_task, ticker, flusher]),
        })
    }

    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    /// Runs a replica of `group` on this node. A founding replica of a new
    /// group passes the group's voters; a reopened one passes `None`. With
    /// `rejoin`, a replica created empty is passive (`ReplicaConfig::rejoin`).
    pub async fn host(&self, group: GroupId, bootstrap_voters: Option<Vec<NodeId>>, rejoin: bool) -> Result<()> {
        // A replica this node deleted before comes back passive whatever
        // the (maybe lagging) metadata says: the group may have counted its
        // votes, which an empty replica no longer holds.
        let rejoin = rejoin || self.tombstone(group).exists();
        let args = ReplicaArgs {
            group,
            dir: self.config.data_dir.join("partitions").join(group.to_string()),
            log_config: self.config.log_config.clone(),
            config: ReplicaConfig {
                ack_before_commit: self.config.test_ack_before_commit,
                sync_log: self.config.sync_log,
                rejoin,
                ..ReplicaConfig::new(self.node.id().to_raft())
            },
            bootstrap_voters,
            router: self.router.clone(),
            queued: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            passive: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let started = self
            .supervisor
            .call(
                |reply| SupervisorMsg::Start(Box::new(args), reply),
                Some(self.config.request_timeout),
            )
            .await
            .map_err(|e| ActorError::InvalidState(format!("node supervisor: {e}")))?;
        match started {
            ractor::rpc::CallResult::Success(Ok(())) => Ok(()),
            ractor::rpc::CallResult::Success(Err(e)) => Err(ActorError::InvalidState(e)),
            _ => Err(ActorError::InvalidState(
                "the node supervisor did not answer".to_string(),
            )),
        }
    }

    /// The live replica of `group`, if this node runs one.
    pub fn replica(&self, group: GroupId) -> Option<ActorRef<ReplicaMsg>> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .map(|h| h.actor.clone())
    }

    fn replica_or_error(&self, group: GroupId) -> std::result::Result<ActorRef<ReplicaMsg>, BrokerError> {
        self.replica(group).ok_or(BrokerError::UnknownGroup(group))
    }

    /// Appends a batch to `group` through its local replica, which must lead.
    /// With `acks=all`, `min_insync` replicas must be in sync and hold the
    /// batch before it is acknowledged (0 or 1: the Raft majority alone).
    pub async fn produce(
        &self,
        group: GroupId,
        batch: RecordBatch,
        acks: Acks,
        min_insync: u16,
    ) -> std::result::Result<u64, BrokerError> {
        let replica = self.replica_or_error(group)?;
        let answer = replica
            .call(
                |reply| ReplicaMsg::Produce {
                    batch,
                    acks,
                    min_insync,
                    reply,
                },
                Some(self.config.request_timeout),
            )
            .await;
        flatten(group, answer)
    }

    /// As [`Broker::produce`], but the batch is handed to the replica now,
    /// before this returns: batches submitted one after another reach the
    /// replica in that order (a Kafka connection's pipelined produce
    /// requests keep each partition's order so). The answer is awaited
    /// from the returned future.
    pub fn submit_produce(
        &self,
        group: GroupId,
        batch: RecordBatch,
        acks: Acks,
        min_insync: u16,
    ) -> impl std::future::Future<Output = std::result::Result<u64, BrokerError>> + Send + 'static {
        let (reply, answer) = ractor::concurrency::oneshot();
        let sent = self.replica_or_error(group).and_then(|replica| {
            let message = ReplicaMsg::Produce {
                batch,
                acks,
                min_insync,
                reply: reply.into(),
            };
            replica.cast(message).map_err(|_| BrokerError::ReplicaFailed {
                group,
                reason: "the replica stopped before taking the batch".to_string(),
            })
        });
        let timeout = self.config.request_timeout;
        async move {
            sent?;
            match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(BrokerError::ReplicaFailed {
                    group,
                    reason: "the replica stopped before answering".to_string(),
                }),
                Err(_) => Err(BrokerError::Timeout(group)),
            }
        }
    }

    /// Reads committed batches of `group` from `offset`.
    pub async fn fetch(
        &self,
        group: GroupId,
        offset: u64,
        max_bytes: usize,
        any_replica: bool,
    ) -> std::result::Result<Fetched, BrokerError> {
        let replica = self.replica_or_error(group)?;
        let answer = replica
            .call(
                |reply| ReplicaMsg::Fetch {
                    offset,
                    max_bytes,
                    any_replica,
                    reply,
                },
                Some(self.config.request_timeout),
            )
            .await;
        flatten(group, answer)
    }

    /// The first committed offset of `group` at or after `timestamp_ms`.
    pub async fn offset_for_timestamp(
        &self,
        group: GroupId,
        timestamp_ms: i64,
    ) -> std::result::Result<Option<u64>, BrokerError> {
        let replica = self.replica_or_error(group)?;
        let answer = replica
            .call(
                |reply| ReplicaMsg::OffsetForTimestamp { timestamp_ms, reply },
                Some(self.config.request_timeout),
            )
            .await;
        flatten(group, answer)
    }

    /// Deletes `group`'s records below `before_offset` (its commit point
    /// for `None`) on its leader here; where it starts once committed.
    pub async fn delete_records(
        &self,
        group: GroupId,
        before_offset: Option<u64>,
    ) -> std::result::Result<u64, BrokerError> {
        let replica = self.replica_or_error(group)?;
        let answer = replica
            .call(
                |reply| ReplicaMsg::DeleteRecords { before_offset, reply },
                Some(self.config.request_timeout),
            )
            .await;
        flatten(group, answer)
    }

    /// Asks the local replica of `group`, if it leads, to move the group's
    /// voters one step towards `desired`.
    pub fn reconfigure(&self, group: GroupId, desired: Vec<NodeId>) {
        if let Some(replica) = self.replica(group) {
            let _ = replica.cast(ReplicaMsg::Reconfigure(desired));
        }
    }

    /// Asks the local replica of `group`, if it leads, to hand leadership to
    /// `node` once that replica has caught up.
    pub fn prefer_leader(&self, group: GroupId, node: NodeId) {
        if let Some(replica) = self.replica(group) {
            let _ = replica.cast(ReplicaMsg::PreferLeader(node));
        }
    }

    /// Asks the local replica of `group` to apply its topic's retention.
    pub fn retain(&self, group: GroupId, retention_ms: u64) {
        if let Some(replica) = self.replica(group) {
            let _ = replica.cast(ReplicaMsg::Retain { retention_ms });
        }
    }

    /// Asks the local replica of `group` to compact its log.
    pub fn compact(&self, group: GroupId, policy: runnel_storage::CompactionPolicy) {
        if let Some(replica) = self.replica(group) {
            let _ = replica.cast(ReplicaMsg::Compact {
                policy,
                continued: false,
            });
        }
    }

    /// What the local replica of `group` knows of `node`'s passive replica
    /// (see [`crate::ReplicaCore::judge_passive`]).
    pub async fn judge_passive(
        &self,
        group: GroupId,
        node: NodeId,
        since: u64,
    ) -> std::result::Result<PassiveAnswer, BrokerError> {
        let replica = self.replica_or_error(group)?;
        let answer = replica
            .call(
                |reply| ReplicaMsg::JudgePassive { node, since, reply },
                Some(self.config.request_timeout),
            )
            .await;
        flatten(group, answer)
    }

    /// The groups whose local replica is passive.
    pub fn passive_groups(&self) -> Vec<GroupId> {
        let registry = self.registry.read().unwrap_or_else(|p| p.into_inner());
        let mut groups: Vec<GroupId> = registry
            .iter()
            .filter(|(_, h)| h.passive.load(std::sync::atomic::Ordering::Relaxed))
            .map(|(&g, _)| g)
            .collect();
        groups.sort_unstable();
        groups
    }

    /// Tells the local passive replica of `group` that it was promoted.
    pub fn promoted(&self, group: GroupId) {
        if let Some(replica) = self.replica(group) {
            let _ = replica.cast(ReplicaMsg::Promoted);
        }
    }

    pub async fn status(&self, group: GroupId) -> Option<ReplicaStatus> {
        let replica = self.replica(group)?;
        match replica
            .call(ReplicaMsg::Status, Some(self.config.request_timeout))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(status)) => Some(status),
            _ => None,
        }
    }

    /// The Raft term in which this node's replica of `group` leads it, or
    /// `Some(None)` when it does not lead; `None` when the replica did not
    /// answer within the request timeout (busy, as under load), so that a
    /// caller keeps what it last knew rather than take a slow replica for a
    /// lost leadership.
    pub async fn leading_term(&self, group: GroupId) -> Option<Option<u64>> {
        let Some(replica) = self.replica(group) else {
            return Some(None);
        };
        match replica
            .call(ReplicaMsg::Status, Some(self.config.request_timeout))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(status)) => {
                Some((status.leader == Some(self.node.id())).then_some(status.term))
            }
            Ok(ractor::rpc::CallResult::Timeout) => None,
            Ok(ractor::rpc::CallResult::SenderError) | Err(_) => Some(None),
        }
    }

    pub async fn health(&self) -> Vec<ReplicaHealth> {
        match self
            .supervisor
            .call(SupervisorMsg::Health, Some(self.config.request_timeout))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(health)) => health,
            _ => Vec::new(),
        }
    }

    /// Groups that have a replica directory on this node's disk.
    pub fn replica_dirs(&self) -> Vec<GroupId> {
        let dir = self.config.data_dir.join("partitions");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok().map(GroupId))
            .collect()
    }

    /// Deletes the files of a replica that no longer runs here, leaving a
    /// tombstone (`<group>.left`) first: this node hosted the group once.
    pub fn delete_replica_files(&self, group: GroupId) -> Result<()> {
        let tombstone = self.tombstone(group);
        runnel_storage::kv::write_atomically(&tombstone, b"")?;
        let dir = self.config.data_dir.join("partitions").join(group.to_string());
        std::fs::remove_dir_all(&dir).map_err(|e| ActorError::Io { path: dir, source: e })
    }

    /// Moves the files of a replica that cannot be read (and does not run)
    /// to `<data>/quarantine/<group>-<unix ms>`, kept for forensics (the
    /// newest [`QUARANTINE_KEPT`]), and leaves a tombstone first so that
    /// the replica comes back passive: it rejoins empty, is demoted to a
    /// learner, catches up from its peers and is promoted.
    pub fn quarantine_replica(&self, group: GroupId) -> Result<PathBuf> {
        let tombstone = self.tombstone(group);
        runnel_storage::kv::write_atomically(&tombstone, b"")?;
        let dir = self.config.data_dir.join("partitions").join(group.to_string());
        let quarantine = self.config.data_dir.join("quarantine");
        std::fs::create_dir_all(&quarantine).map_err(|e| ActorError::io(&quarantine, e))?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let target = quarantine.join(format!("{group}-{now_ms}"));
        std::fs::rename(&dir, &target).map_err(|e| ActorError::io(&dir, e))?;
        runnel_storage::kv::sync_parent_dir(&dir)?;
        runnel_storage::kv::sync_parent_dir(&target)?;
        prune_quarantine(&quarantine)?;
        let how = format!(
            "damaged files moved to {}; rejoined empty to catch up from its peers",
            target.display()
        );
        let _ = self.supervisor.cast(SupervisorMsg::Repaired(group, how));
        Ok(target)
    }

    /// Whether this node ever hosted a replica of `group`: its files or its
    /// tombstone are on disk.
    pub fn ever_hosted(&self, group: GroupId) -> bool {
        let dir = self.config.data_dir.join("partitions").join(group.to_string());
        dir.exists() || self.tombstone(group).exists()
    }

    /// Groups whose local replica's files are damaged (not run).
    pub async fn damaged(&self) -> Vec<GroupId> {
        self.health()
            .await
            .into_iter()
            .filter(|h| h.damaged.is_some())
            .map(|h| h.group)
            .collect()
    }

    fn tombstone(&self, group: GroupId) -> PathBuf {
        self.config.data_dir.join("partitions").join(format!("{group}.left"))
    }

    /// Stops the replica of `group` cleanly; its files stay.
    pub async fn unhost(&self, group: GroupId) {
        let _ = self
            .supervisor
            .call(
                |reply| SupervisorMsg::Stop(group, reply),
                Some(self.config.request_timeout),
            )
            .await;
    }

    /// Stops every replica (cleanly: commit indexes are saved) and the tasks.
    pub async fn shutdown(&self) {
        for task in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            task.abort();
        }
        let groups: Vec<GroupId> = self
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        for group in groups {
            self.unhost(group).await;
        }
        self.supervisor.stop(None);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            task.abort();
        }
        self.supervisor.stop(None);
    }
}

fn flatten<T, M>(
    group: GroupId,
    answer: std::result::Result<ractor::rpc::CallResult<std::result::Result<T, BrokerError>>, ractor::MessagingErr<M>>,
) -> std::result::Result<T, BrokerError> {
    match answer {
        Ok(ractor::rpc::CallResult::Success(result)) => result,
        Ok(ractor::rpc::CallResult::Timeout) => Err(BrokerError::Timeout(group)),
        Ok(ractor::rpc::CallResult::SenderError) | Err(_) => Err(BrokerError::ReplicaFailed {
            group,
            reason: "the replica stopped before answering".to_string(),
        }),
    }
}

/// Hands each message of a peer's batch to the local replica of its group.
fn deliver_raft_batch(registry: &Registry, from: NodeId, payload: &[u8]) {
    let batch: RaftBatch = match decode_payload(payload) {
        Ok(batch) => batch,
        Err(e) => {
            tracing::warn!(%from, error = %e, "dropped an undecodable Raft batch");
            return;
        }
    };
    let registry = registry.read().unwrap_or_else(|p| p.into_inner());
    for GroupMessage { group, message } in batch.messages {
        let message = match Message::parse_from_bytes(&message) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(%from, partition = %group.named(), error = %e, "dropped an undecodable Raft message");
                continue;
            }
        };
        if raft::raw_node::is_local_msg(message.get_msg_type()) {
            tracing::warn!(%from, partition = %group.named(), "dropped a local-only Raft message type from a peer");
            continue;
        }
        if message.from != from.to_raft() {
            tracing::warn!(%from, partition = %group.named(), claimed = message.from, "dropped a Raft message from a forged sender");
            continue;
        }
        if let Some(replica) = registry.get(&group) {
            if !replica.offer(ReplicaMsg::Raft(Box::new(message))) {
                tracing::debug!(group = %group, "replica mailbox full; Raft message dropped");
            }
        }
    }
}

/// Quarantined replica directories kept per node (the newest).
pub const QUARANTINE_KEPT: usize = 8;

/// Removes all but the newest [`QUARANTINE_KEPT`] quarantined directories.
fn prune_quarantine(quarantine: &Path) -> Result<()> {
    let mut kept: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(quarantine)
        .map_err(|e| ActorError::io(quarantine, e))?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            Some((entry.metadata().ok()?.modified().ok()?, entry.path()))
        })
        .collect();
    kept.sort();
    let excess = kept.len().saturating_sub(QUARANTINE_KEPT);
    for (_, path) in kept.into_iter().take(excess) {
        std::fs::remove_dir_all(&path).map_err(|e| ActorError::io(&path, e))?;
    }
    Ok(())
}
