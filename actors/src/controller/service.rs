//! [`BrokerService`]: what a node answers clients, one typed method per
//! request kind. The QUIC client listener (`client.broker`) is an adapter
//! over it ([`BrokerService::dispatch`]); another listener (the Kafka
//! protocol) is another adapter over the same methods.

use std::sync::Arc;
use std::time::{Duration, Instant};

use runnel_cluster::MemberState;
use runnel_storage::RecordBatch;

use super::Shared;
use crate::metadata::{
    DataflowMeta, GroupId, MetadataError, NodeId, Plan, SqlObject, TopicConfig, TopicSetting, CONTROLLER_GROUP,
};
use crate::partition::Fetched;
use crate::protocol::{
    Acks, BrokerError, ClientRequest, ClientResponse, ControllerRequest, ControllerResponse, PartitionInfo,
    ReplicaHealthInfo, TopicInfo,
};
use crate::tasks::{DataflowShape, StateError, StateRow, TaskStatus};
use runnel_client::protocol::{Catalog, FailedReplica};

/// How long `start_dataflow` looks for a source topic this node has not
/// applied yet (a commit reaches a follower within a heartbeat or two).
const SOURCE_TOPIC_WAIT: Duration = Duration::from_secs(3);
/// How often `start_dataflow` looks again meanwhile.
const SOURCE_TOPIC_POLL: Duration = Duration::from_millis(50);
/// How long creating a dataflow's topic waits for the controller leader to
/// see as many live nodes as this node does, and how often it asks.
const DATAFLOW_TOPIC_SETTLE: Duration = Duration::from_secs(4);
const DATAFLOW_TOPIC_RETRY: Duration = Duration::from_millis(200);

/// Why the service did not do what was asked. Each names the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error("topic {topic:?} has {partitions} partitions; there is no partition {partition}")]
    PartitionOutOfRange {
        topic: String,
        partition: u32,
        partitions: u32,
    },
    /// The answering node has no replica of the partition; try these nodes.
    #[error("no replica of the partition on this node; its replicas are on nodes {replicas:?}")]
    NotHere { replicas: Vec<NodeId> },
    #[error(transparent)]
    Refused(#[from] MetadataError),
    #[error(transparent)]
    Failed(#[from] BrokerError),
}

impl From<ServiceError> for ClientResponse {
    fn from(error: ServiceError) -> ClientResponse {
        match error {
            ServiceError::UnknownTopic(name) => ClientResponse::UnknownTopic(name),
            ServiceError::PartitionOutOfRange {
                topic,
                partition,
                partitions,
            } => ClientResponse::PartitionOutOfRange {
                topic,
                partition,
                partitions,
            },
            ServiceError::NotHere { replicas } => ClientResponse::NotHere { replicas },
            ServiceError::Refused(e) => ClientResponse::Refused(e),
            ServiceError::Failed(e) => ClientResponse::Failed(e),
        }
    }
}

/// The cluster as the answering node knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterMetadata {
    pub topics: Vec<TopicInfo>,
    pub nodes: Vec<(NodeId, std::net::SocketAddr)>,
    pub controller_leader: Option<NodeId>,
}

/// One node's client service. Cheap to clone.
#[derive(Clone)]
pub struct BrokerService {
    pub(super) shared: Arc<Shared>,
}

impl BrokerService {
    pub(super) fn new(shared: Arc<Shared>) -> BrokerService {
        BrokerService { shared }
    }

    /// The client protocol's adapter: one request in, its answer out.
    pub async fn dispatch(&self, request: ClientRequest) -> ClientResponse {
        match request {
            ClientRequest::Metadata => {
                let m = self.metadata().await;
                ClientResponse::Metadata {
                    topics: m.topics,
                    nodes: m.nodes,
                    controller_leader: m.controller_leader,
                }
            }
            ClientRequest::DescribeTopic { name } => answer(self.describe_topic(&name).await, ClientResponse::Topic),
            ClientRequest::CreateTopic { name, config } => done(self.create_topic(name, config).await),
            ClientRequest::DeleteTopic { name } => done(self.delete_topic(name).await),
            ClientRequest::AlterTopic { name, settings } => done(self.alter_topic(name, settings).await),
            ClientRequest::AddPartitions { name, partitions } => done(self.add_partitions(name, partitions).await),
            ClientRequest::ResetDataflow { name } => done(self.admin(ControllerRequest::ResetDataflow { name }).await),
            ClientRequest::ReadState { dataflow, task, key } => {
                ClientResponse::State(self.read_state(dataflow, task, key.map(|k| k.into_vec())).await)
            }
            ClientRequest::Produce {
                topic,
                partition,
                acks,
                batch,
            } => answer(
                self.produce_bytes(&topic, partition, acks, batch).await,
                |base_offset| ClientResponse::Produced { base_offset },
            ),
            ClientRequest::Fetch {
                topic,
                partition,
                offset,
                max_bytes,
                any_replica,
            } => answer(
                self.fetch(&topic, partition, offset, max_bytes, any_replica).await,
                fetched_response,
            ),
            ClientRequest::OffsetForTimestamp {
                topic,
                partition,
                timestamp_ms,
            } => answer(
                self.offset_for_timestamp(&topic, partition, timestamp_ms).await,
                ClientResponse::Offset,
            ),
            ClientRequest::DeleteRecords {
                topic,
                partition,
                before_offset,
            } => answer(self.delete_records(&topic, partition, before_offset).await, |start| {
                ClientResponse::Offset(Some(start))
            }),
            ClientRequest::ReplicaHealth => ClientResponse::Health(self.replica_health().await),
            ClientRequest::InjectPanic { topic, partition } => done(self.inject_panic(&topic, partition).await),
            ClientRequest::Rebalance => done(self.rebalance().await),
            ClientRequest::StartDataflow { name } => done(self.start_dataflow(name).await),
            ClientRequest::StopDataflow { name } => done(self.stop_dataflow(name).await),
            ClientRequest::Dataflows => ClientResponse::Dataflows(self.dataflows()),
            ClientRequest::DataflowTasks => ClientResponse::Tasks(self.dataflow_tasks()),
            ClientRequest::StartQuery { name, plan, object } => {
                done(self.start_query(name, *plan, object.map(|o| *o)).await)
            }
            ClientRequest::CreateObject { object } => {
                let object = Box::new(object);
                done(self.admin(ControllerRequest::CreateObject { object }).await)
            }
            ClientRequest::DropObject { name } => done(self.admin(ControllerRequest::DropObject { name }).await),
            ClientRequest::Catalog => ClientResponse::Catalog(self.caught_up_catalog().await),
            ClientRequest::FailedReplicas => ClientResponse::FailedReplicas(self.failed_replicas().await),
            ClientRequest::Group(request) => ClientResponse::Group(self.group(request).await),
        }
    }

    /// Every topic, the live nodes and the controller leader.
    pub async fn metadata(&self) -> ClusterMetadata {
        let names: Vec<String> = self.shared.core().meta().metadata.topics.keys().cloned().collect();
        let mut topics = Vec::with_capacity(names.len());
        for name in names {
            if let Ok(info) = self.describe_topic(&name).await {
                topics.push(info);
            }
        }
        let nodes = self
            .shared
            .node
            .members()
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| (m.node, m.addr))
            .collect();
        let controller_leader = self.shared.broker.status(CONTROLLER_GROUP).await.and_then(|s| s.leader);
        ClusterMetadata {
            topics,
            nodes,
            controller_leader,
        }
    }

    /// How many partitions `topic` has, as this node's metadata says (no
    /// catching up with the controller, no replica asked): `None` when it
    /// knows no such topic.
    pub fn partition_count(&self, topic: &str) -> Option<u32> {
        let core = self.shared.core();
        core.meta().metadata.topics.get(topic).map(|t| t.config.partitions)
    }

    /// A topic's configuration and, per partition, what this node knows of
    /// its replicas.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo, ServiceError> {
        let known = || self.shared.core().meta().metadata.topics.get(name).cloned();
        let topic = match known() {
            Some(topic) => topic,
            None => {
                self.catch_up().await?;
                known().ok_or_else(|| ServiceError::UnknownTopic(name.to_string()))?
            }
        };
        let mut partitions = Vec::with_capacity(topic.assignment.len());
        for (partition, replicas) in topic.assignment.iter().enumerate() {
            let status = self.shared.broker.status(topic.group_id(partition as u32)).await;
            partitions.push(PartitionInfo {
                partition: partition as u32,
                replicas: replicas.clone(),
                leader: status.as_ref().and_then(|s| s.leader),
                start_offset: status.as_ref().map(|s| s.start_offset),
                committed_offset: status.as_ref().map(|s| s.committed_offset),
                end_offset: status.as_ref().map(|s| s.end_offset),
                learners: status.as_ref().map(|s| s.learners.clone()).unwrap_or_default(),
                voters: status.as_ref().map(|s| s.voters.clone()).unwrap_or_default(),
            });
        }
        Ok(TopicInfo {
            name: topic.name,
            config: topic.config,
            partitions,
        })
    }

    pub async fn create_topic(&self, name: String, config: TopicConfig) -> Result<(), ServiceError> {
        self.admin(ControllerRequest::CreateTopic { name, config }).await
    }

    /// Changes settings of a topic, all or none.
    pub async fn alter_topic(&self, name: String, settings: Vec<TopicSetting>) -> Result<(), ServiceError> {
        self.admin(ControllerRequest::AlterTopic { name, settings }).await
    }

    /// Grows a topic to `partitions` partitions in all.
    pub async fn add_partitions(&self, name: String, partitions: u32) -> Result<(), ServiceError> {
        self.admin(ControllerRequest::AddPartitions { name, partitions }).await
    }

    pub async fn delete_topic(&self, name: String) -> Result<(), ServiceError> {
        self.admin(ControllerRequest::DeleteTopic { name }).await
    }

    /// Appends an encoded record batch to a partition led here.
    async fn produce_bytes(
        &self,
        topic: &str,
        partition: u32,
        acks: Acks,
        batch: Vec<u8>,
    ) -> Result<u64, ServiceError> {
        let group = self.locate(topic, partition).await?;
        let batch = RecordBatch::from_bytes(batch).map_err(|e| BrokerError::InvalidRequest(e.to_string()))?;
        let min_insync = self.admit(topic, &batch)?;
        Ok(self.shared.broker.produce(group, batch, acks, min_insync).await?)
    }

    /// Appends a record batch to a partition led here; its base offset.
    pub async fn produce(
        &self,
        topic: &str,
        partition: u32,
        acks: Acks,
        batch: RecordBatch,
    ) -> Result<u64, ServiceError> {
        let group = self.locate(topic, partition).await?;
        let min_insync = self.admit(topic, &batch)?;
        Ok(self.shared.broker.produce(group, batch, acks, min_insync).await?)
    }

    /// As [`BrokerService::produce`], handing the batch to the partition's
    /// replica before the returned future is awaited (see
    /// [`crate::Broker::submit_produce`]); locating the partition may wait.
    pub async fn submit_produce(
        &self,
        topic: &str,
        partition: u32,
        acks: Acks,
        batch: RecordBatch,
    ) -> Result<impl std::future::Future<Output = Result<u64, ServiceError>> + Send + 'static, ServiceError> {
        let group = self.locate(topic, partition).await?;
        let min_insync = self.admit(topic, &batch)?;
        let answer = self.shared.broker.submit_produce(group, batch, acks, min_insync);
        Ok(async move { Ok(answer.await?) })
    }

    /// The topic's `min.insync.replicas` (0 if it is not known here), once
    /// the batch suits the topic: a compacted topic takes only records with
    /// a key, as Kafka's (compaction keeps the latest record of each key).
    fn admit(&self, topic: &str, batch: &RecordBatch) -> Result<u16, BrokerError> {
        let core = self.shared.core();
        let Some(info) = core.meta().metadata.topics.get(topic) else {
            return Ok(0);
        };
        if info.config.cleanup.compacts() {
            if let Some(index) = batch.views().position(|v| v.is_ok_and(|v| v.key.is_none())) {
                return Err(BrokerError::InvalidRequest(format!(
                    "topic {topic:?} is compacted (cleanup.policy={}): every record needs a key, and record {index} of the batch has none",
                    info.config.cleanup.as_str()
                )));
            }
        }
        Ok(info.config.min_insync)
    }

    /// Committed batches of a partition from `offset`.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        any_replica: bool,
    ) -> Result<Fetched, ServiceError> {
        let group = self.locate(topic, partition).await?;
        Ok(self
            .shared
            .broker
            .fetch(group, offset, max_bytes as usize, any_replica)
            .await?)
    }

    /// A partition led here: its first offset, its committed offset (the
    /// high watermark) and its log's end (appended, maybe not committed).
    pub async fn offset_range(&self, topic: &str, partition: u32) -> Result<(u64, u64, u64), ServiceError> {
        let group = self.locate(topic, partition).await?;
        let status = self.shared.broker.status(group).await;
        // A fetch past every offset is refused with the range it knows.
        match self.shared.broker.fetch(group, u64::MAX, 0, false).await {
            Err(BrokerError::OffsetOutOfRange { start, end, .. }) => {
                let log_end = status.map_or(end, |s| s.end_offset.max(end));
                Ok((start, end, log_end))
            }
            Err(e) => Err(e.into()),
            Ok(_) => Err(BrokerError::InvalidRequest("a fetch past the end was answered".to_string()).into()),
        }
    }

    /// The first committed offset whose record is at least `timestamp_ms`
    /// old, or none.
    pub async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<Option<u64>, ServiceError> {
        let group = self.locate(topic, partition).await?;
        Ok(self.shared.broker.offset_for_timestamp(group, timestamp_ms).await?)
    }

    /// Deletes a partition's records below `before_offset` (the commit
    /// point for `None`); where it starts now.
    pub async fn delete_records(
        &self,
        topic: &str,
        partition: u32,
        before_offset: Option<u64>,
    ) -> Result<u64, ServiceError> {
        use runnel_client::tasks::checkpoint_topic;
        if topic == runnel_client::offsets::OFFSETS_TOPIC || topic.ends_with(&checkpoint_topic("")) {
            let reason = format!("{topic} holds state (offsets or checkpoints): its records are not deleted by hand");
            return Err(ServiceError::Failed(BrokerError::InvalidRequest(reason)));
        }
        let group = self.locate(topic, partition).await?;
        Ok(self.shared.broker.delete_records(group, before_offset).await?)
    }

    /// Restarts and failures of this node's replicas.
    pub async fn replica_health(&self) -> Vec<ReplicaHealthInfo> {
        let health = self.shared.broker.health().await;
        health
            .into_iter()
            .map(|h| ReplicaHealthInfo {
                group: h.group,
                restarts: h.restarts as u32,
                failed: h.failed,
                // A repair is news for `status` as a failure is.
                last_failure: h.last_failure.or(h.repaired.map(|how| format!("repaired: {how}"))),
            })
            .collect()
    }

    /// This node's replicas that its supervisor no longer runs, by partition.
    pub async fn failed_replicas(&self) -> Vec<FailedReplica> {
        let health = self.shared.broker.health().await;
        let core = self.shared.core();
        let metadata = &core.meta().metadata;
        health
            .into_iter()
            .filter(|h| h.failed)
            .filter_map(|h| {
                let (topic, partition) = metadata.partition_of(h.group)?;
                Some(FailedReplica {
                    topic: topic.name.clone(),
                    partition,
                    node: self.shared.node.id(),
                    damaged: h.damaged.is_some(),
                    reason: h.last_failure.unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Test-only fault hook: this node's replica of the partition panics.
    /// Refused unless the node runs with test fault hooks enabled.
    pub async fn inject_panic(&self, topic: &str, partition: u32) -> Result<(), ServiceError> {
        if !self.shared.config.test_fault_hooks {
            let reason = "test fault hooks are disabled on this node".to_string();
            return Err(BrokerError::InvalidRequest(reason).into());
        }
        let group = self.locate(topic, partition).await?;
        match self.shared.broker.replica(group) {
            Some(replica) if replica.cast(crate::partition::ReplicaMsg::InjectPanic).is_ok() => Ok(()),
            _ => Err(BrokerError::UnknownGroup(group).into()),
        }
    }

    /// Spreads replicas evenly over the live nodes.
    pub async fn rebalance(&self) -> Result<(), ServiceError> {
        self.admin(ControllerRequest::Rebalance).await
    }

    /// On a node whose binary registers the dataflow: starts it as a plan
    /// of its registered steps, committed like a SQL query's, so that every
    /// node resolves it in its own registry and `describe` shows its steps.
    pub async fn start_dataflow(&self, name: String) -> Result<(), ServiceError> {
        let plan = self.shared.tasks.as_ref().and_then(|host| host.plan(&name));
        let plan = plan.ok_or_else(|| MetadataError::UnregisteredDataflow(name.clone()))?;
        let joined = self
            .shared
            .tasks
            .as_ref()
            .map(|host| host.joined_sources(&name))
            .unwrap_or_default();
        self.check_partitions_match(&name, &plan.source.topic, joined.iter().map(String::as_str))
            .await?;
        self.start_query(name, plan, None).await
    }

    /// Starts a SQL query's dataflow from its plan (no node needs it in
    /// its binary): makes its topics and asks the controller leader to
    /// place it and commit the plan.
    pub async fn start_query(&self, name: String, plan: Plan, object: Option<SqlObject>) -> Result<(), ServiceError> {
        plan.validate()
            .map_err(|e| MetadataError::InvalidConfig(e.to_string()))?;
        if let Err(reason) = self.shared.pull_and_apply().await {
            tracing::debug!(reason, "controller log not reachable; answering from what is applied");
        }
        if self
            .shared
            .core()
            .meta()
            .metadata
            .holds_query(&name, &plan, object.as_ref())
        {
            return Ok(());
        }
        self.check_co_partitioned(&name, &plan).await?;
        let shape = DataflowShape {
            source: plan.source.topic.clone(),
            sink: plan.sink.topic.clone(),
            stages: plan.stages(),
        };
        let dataflow = self.make_dataflow_topics(name, shape).await?;
        let (plan, object) = (Box::new(plan), object.map(Box::new));
        self.admin(ControllerRequest::StartQuery { dataflow, plan, object })
            .await
    }

    /// A plan of more than one source (a stream–stream join) runs a task
    /// per partition of each source stage: the sources must have as many
    /// partitions as the first (ksqlDB refuses such a join too).
    async fn check_co_partitioned(&self, name: &str, plan: &Plan) -> Result<(), ServiceError> {
        let others = plan.sources().skip(1).map(|s| s.topic.as_str());
        self.check_partitions_match(name, &plan.source.topic, others).await
    }

    /// Each of `others` has as many partitions as `first`.
    async fn check_partitions_match<'a>(
        &self,
        name: &str,
        first: &str,
        others: impl Iterator<Item = &'a str>,
    ) -> Result<(), ServiceError> {
        let mut expected = None;
        for other in others {
            let first_partitions = match expected {
                Some(partitions) => partitions,
                None => *expected.insert(self.source_partitions(name, first).await?),
            };
            let partitions = self.source_partitions(name, other).await?;
            if partitions != first_partitions {
                return Err(MetadataError::InvalidConfig(format!(
                    "cannot join {first} ({first_partitions} partitions) with {other} ({partitions} partitions): a join of two streams or two tables needs the same number of partitions on both sides; give both topics the same count"
                ))
                .into());
            }
        }
        Ok(())
    }

    /// Makes the topics a dataflow of `shape` writes that are missing; its
    /// metadata, not yet placed.
    async fn make_dataflow_topics(&self, name: String, shape: DataflowShape) -> Result<DataflowMeta, ServiceError> {
        let partitions = self.source_partitions(&name, &shape.source).await?;
        let replication = self.shared.alive_nodes().len().clamp(1, 3) as u16;
        let missing = self
            .shared
            .core()
            .dataflow_topics_missing(&name, &shape, partitions, replication);
        for (topic, config) in missing {
            self.create_dataflow_topic(topic, config).await?;
        }
        Ok(DataflowMeta {
            name,
            source: shape.source,
            sink: shape.sink,
            stages: shape.stages,
            partitions,
            placement: Vec::new(),
        })
    }

    /// Creates one of a dataflow's topics (one that exists is fine). Its
    /// replication comes from this node's view of the live nodes; the
    /// controller leader's view may lag it while a cluster forms (or a node
    /// returns), so that refusal is asked again for a bounded time.
    async fn create_dataflow_topic(&self, topic: String, config: TopicConfig) -> Result<(), ServiceError> {
        let deadline = tokio::time::Instant::now() + DATAFLOW_TOPIC_SETTLE;
        loop {
            match self.create_topic(topic.clone(), config.clone()).await {
                Ok(()) | Err(ServiceError::Refused(MetadataError::TopicExists(_))) => return Ok(()),
                Err(ServiceError::Refused(MetadataError::NotEnoughNodes { .. }))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(DATAFLOW_TOPIC_RETRY).await
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The partitions of a dataflow's source topic. This node may not have
    /// applied a topic created a moment ago: a follower's copy of the
    /// controller log learns of a commit only with the leader's next
    /// message, so an unknown source is looked for again until
    /// `SOURCE_TOPIC_WAIT` has passed.
    async fn source_partitions(&self, dataflow: &str, source: &str) -> Result<u32, ServiceError> {
        let deadline = Instant::now() + SOURCE_TOPIC_WAIT;
        loop {
            if let Err(reason) = self.shared.pull_and_apply().await {
                tracing::debug!(reason, "controller log not reachable; answering from what is applied");
            }
            let known = {
                let core = self.shared.core();
                let metadata = &core.meta().metadata;
                if metadata.dataflows.contains_key(dataflow) {
                    return Err(MetadataError::DataflowRunning(dataflow.to_string()).into());
                }
                metadata.topics.get(source).map(|t| t.config.partitions)
            };
            match known {
                Some(partitions) => return Ok(partitions),
                None if Instant::now() >= deadline => return Err(ServiceError::UnknownTopic(source.to_string())),
                None => tokio::time::sleep(SOURCE_TOPIC_POLL).await,
            }
        }
    }

    pub async fn stop_dataflow(&self, name: String) -> Result<(), ServiceError> {
        self.admin(ControllerRequest::StopDataflow { name }).await
    }

    /// The SQL catalog and the plans of running SQL queries.
    /// The catalog once this node has caught up with the controller, so
    /// a statement sees every object and query created before it asked
    /// (whichever node it asks), as ksqlDB's servers wait for the command
    /// topic. When the controller cannot say within
    /// [`CATALOG_CATCH_UP_WAIT`] (no leader, this node replaying its log),
    /// the catalog as this node has applied it: a statement is not
    /// refused for want of the newest one.
    async fn caught_up_catalog(&self) -> Catalog {
        match tokio::time::timeout(CATALOG_CATCH_UP_WAIT, self.catch_up()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "answering the catalog as applied here"),
            Err(_) => tracing::debug!("controller slow to answer; answering the catalog as applied here"),
        }
        self.catalog()
    }

    pub fn catalog(&self) -> Catalog {
        let core = self.shared.core();
        let metadata = &core.meta().metadata;
        Catalog {
            objects: metadata.objects.values().cloned().collect(),
            queries: metadata
                .plans
                .iter()
                .filter_map(|(name, plan)| Some((metadata.dataflows.get(name)?.clone(), plan.clone())))
                .collect(),
        }
    }

    /// Running dataflows and their task placement.
    pub fn dataflows(&self) -> Vec<DataflowMeta> {
        self.shared.core().meta().metadata.dataflows.values().cloned().collect()
    }

    /// Figures of the dataflow tasks running on this node.
    pub fn dataflow_tasks(&self) -> Vec<TaskStatus> {
        self.shared.tasks.as_ref().map(|host| host.status()).unwrap_or_default()
    }

    /// A dataflow task's state rows, from the task on this node.
    pub async fn read_state(
        &self,
        dataflow: String,
        task: u32,
        key: Option<Vec<u8>>,
    ) -> Result<Vec<StateRow>, StateError> {
        match &self.shared.tasks {
            Some(host) => host.read_state(&dataflow, task, key).await,
            None => Err(StateError::NotHere { dataflow, task }),
        }
    }

    /// A controller request sent to the controller leader.
    /// Once the controller leader has committed the change, this node
    /// applies it before answering, so the client's next request here (a
    /// SQL script's next statement, a Kafka client's Metadata after
    /// CreateTopics) sees its own write. The change stands even when that
    /// catch-up runs out of time: the answer is still `Ok`.
    async fn admin(&self, request: ControllerRequest) -> Result<(), ServiceError> {
        match self.shared.controller_call(request).await {
            ControllerResponse::Done => {
                if let Err(reason) = self.shared.catch_up().await {
                    tracing::debug!(reason, "committed, but not yet applied on this node");
                }
                Ok(())
            }
            ControllerResponse::Refused(e) => Err(e.into()),
            ControllerResponse::Failed(e) => Err(e.into()),
            ControllerResponse::Log { .. }
            | ControllerResponse::Offset(_)
            | ControllerResponse::Members { .. }
            | ControllerResponse::Passive(_) => {
                Err(BrokerError::InvalidRequest("unexpected answer".to_string()).into())
            }
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.me()
    }

    /// The live nodes, as this node's membership sees them.
    pub fn alive_nodes(&self) -> Vec<NodeId> {
        let members = self.shared.node.members();
        members
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.node)
            .collect()
    }

    /// The live nodes that serve the Kafka protocol, with the address Kafka
    /// clients reach each at.
    pub fn kafka_brokers(&self) -> Vec<(NodeId, String)> {
        let listeners = self.shared.core().meta().metadata.kafka_listeners.clone();
        self.shared
            .node
            .members()
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .filter_map(|m| Some((m.node, listeners.get(&m.node)?.clone())))
            .collect()
    }

    /// Records with the controller where Kafka clients reach this node
    /// (nothing is committed when metadata already says so).
    pub async fn register_kafka_listener(&self, advertised: Option<String>) -> Result<(), ServiceError> {
        let node = self.node_id();
        if self.shared.core().meta().metadata.kafka_listeners.get(&node) == advertised.as_ref() {
            return Ok(());
        }
        self.admin(ControllerRequest::KafkaListener { node, advertised }).await
    }

    /// The leader of a topic partition: this node's replica's view when it
    /// knows one, else the first other replica that answers.
    pub async fn partition_leader(&self, topic: &str, partition: u32) -> Result<Option<NodeId>, ServiceError> {
        let (group, replicas) = self.group_of(topic, partition).await?;
        if let Some(leader) = self.shared.broker.status(group).await.and_then(|s| s.leader) {
            return Ok(Some(leader));
        }
        let me = self.node_id();
        let others: Vec<NodeId> = replicas.into_iter().filter(|n| *n != me).collect();
        Ok(self.shared.leader_view(group, &others).await.map(|(leader, _)| leader))
    }

    /// Brings this node's metadata up to the controller's commit point; a
    /// retryable [`BrokerError::MetadataBehind`] when it cannot.
    pub async fn catch_up(&self) -> Result<(), ServiceError> {
        self.shared.catch_up().await.map_err(|reason| {
            tracing::debug!(reason, "metadata not caught up; answering retry");
            ServiceError::Failed(BrokerError::MetadataBehind(reason))
        })
    }

    /// A topic partition's group and assigned replicas. Before saying the
    /// topic or partition does not exist, the node catches up with the
    /// controller and looks again.
    async fn group_of(&self, topic: &str, partition: u32) -> Result<(GroupId, Vec<NodeId>), ServiceError> {
        match self.group_of_now(topic, partition) {
            Err(ServiceError::UnknownTopic(_) | ServiceError::PartitionOutOfRange { .. }) => {
                self.catch_up().await?;
                self.group_of_now(topic, partition)
            }
            found => found,
        }
    }

    /// [`BrokerService::group_of`] from the metadata this node holds now.
    fn group_of_now(&self, topic: &str, partition: u32) -> Result<(GroupId, Vec<NodeId>), ServiceError> {
        let core = self.shared.core();
        let meta_topic = core
            .meta()
            .metadata
            .topics
            .get(topic)
            .ok_or_else(|| ServiceError::UnknownTopic(topic.to_string()))?;
        let replicas =
            meta_topic
                .assignment
                .get(partition as usize)
                .ok_or_else(|| ServiceError::PartitionOutOfRange {
                    topic: topic.to_string(),
                    partition,
                    partitions: meta_topic.config.partitions,
                })?;
        Ok((meta_topic.group_id(partition), replicas.clone()))
    }

    /// The group of a topic partition hosted here, or why not.
    pub async fn locate(&self, topic: &str, partition: u32) -> Result<GroupId, ServiceError> {
        let (group, replicas) = self.group_of(topic, partition).await?;
        if self.shared.broker.replica(group).is_some() {
            return Ok(group);
        }
        // A replica assigned here that does not run because its files are
        // damaged says so, rather than that it is not here.
        let health = self.shared.broker.health().await;
        if let Some(damage) = health.into_iter().find(|h| h.group == group).and_then(|h| h.damaged) {
            let reason = format!(
                "partition {topic}/{partition}: this node's replica is damaged and takes no reads or writes until it is \
                 repaired ({damage})"
            );
            return Err(BrokerError::ReplicaFailed { group, reason }.into());
        }
        Err(ServiceError::NotHere { replicas })
    }
}

/// How long a catalog request waits to catch up with the controller.
const CATALOG_CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn answer<T>(result: Result<T, ServiceError>, ok: impl FnOnce(T) -> ClientResponse) -> ClientResponse {
    result.map_or_else(ClientResponse::from, ok)
}

fn done(result: Result<(), ServiceError>) -> ClientResponse {
    answer(result, |()| ClientResponse::Done)
}

fn fetched_response(fetched: Fetched) -> ClientResponse {
    ClientResponse::Fetched {
        batches: fetched
            .batches
            .into_iter()
            .map(|b| serde_bytes::ByteBuf::from(b.into_bytes()))
            .collect(),
        start_offset: fetched.start_offset,
        committed_offset: fetched.committed_offset,
    }
}
