//! The Rust client: [`Client`] for admin, produce and fetch, with
//! [`Producer`] (batching, key → partition by a stable hash) and [`Consumer`]
//! (assigned partitions, offsets, polling) on top.
//!
//! Requests go to any node over the client protocol; the client follows
//! leader hints (`NotLeader`) and replica lists (`NotHere`) to the node that
//! leads the partition. Batches from a [`Producer`] carry a producer id and
//! sequence numbers, so a produce whose outcome is unknown (no answer, a
//! leader lost mid-request) is retried and the leader writes it once; a
//! batch without a producer id is retried only when it certainly was not
//! written.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use runnel_cluster::protocol::{ClientRequest as WireRequest, ClientResponse as WireResponse};
use runnel_cluster::quic::ClusterClient;
use runnel_cluster::tls::CertDir;
use runnel_cluster::{ClusterError, NodeHandle};
use runnel_storage::{BatchBuilder, ProducerInfo, Record, RecordBatch, RecordView, StoredRecord};

use crate::metadata::{MetadataError, TopicConfig};
use crate::protocol::{Acks, BrokerError, ClientRequest, ClientResponse, TopicInfo, CLIENT_ACTOR};

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Cluster(#[from] runnel_cluster::ClusterError),
    #[error(transparent)]
    Storage(#[from] runnel_storage::StorageError),
    #[error(transparent)]
    Refused(#[from] MetadataError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error("partition {partition} of topic {topic:?} does not exist (it has {partitions})")]
    PartitionOutOfRange {
        topic: String,
        partition: u32,
        partitions: u32,
    },
    #[error("record of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    RecordTooLarge { size_bytes: usize, limit_bytes: usize },
    #[error("no node could serve partition {partition} of {topic:?} within {timeout_ms} ms: {last_error}")]
    Unavailable {
        topic: String,
        partition: u32,
        timeout_ms: u64,
        last_error: String,
    },
    #[error("unexpected answer from the cluster: {0}")]
    Protocol(String),
}

pub type ClientResult<T> = std::result::Result<T, ClientError>;

/// How long a node that failed to answer is tried last.
const FAILED_NODE_MEMORY: Duration = Duration::from_secs(5);

/// How long routing trusts cached metadata before asking again.
const METADATA_MAX_AGE: Duration = Duration::from_secs(2);

/// Largest single record the client sends (the broker's batch limit is 8 MiB).
pub const RECORD_BYTES_MAX: usize = 1 << 20;

/// Committed records of one partition read by [`Client::fetch`].
#[derive(Debug)]
pub struct FetchedRecords {
    pub records: Vec<StoredRecord>,
    /// Where the next fetch should start.
    pub next_offset: u64,
    pub committed_offset: u64,
}

/// Committed batches of one partition read by [`Client::fetch_batches`],
/// decoded only as they are read.
#[derive(Debug)]
pub struct FetchedBatches {
    /// The offset asked for: earlier records of the first batch are not
    /// part of the answer.
    pub offset: u64,
    pub batches: Vec<RecordBatch>,
    /// Where the next fetch should start.
    pub next_offset: u64,
    pub committed_offset: u64,
}

impl FetchedBatches {
    pub fn new(offset: u64, batches: Vec<RecordBatch>, committed_offset: u64) -> FetchedBatches {
        let next_offset = batches.iter().map(RecordBatch::next_offset).fold(offset, u64::max);
        FetchedBatches {
            offset,
            batches,
            next_offset,
            committed_offset,
        }
    }

    /// The batches holding user records at or after `offset`.
    pub fn user_batches(&self) -> impl Iterator<Item = &RecordBatch> {
        self.batches
            .iter()
            .filter(|b| !b.is_control() && b.record_count() > 0 && b.next_offset() > self.offset)
    }

    /// Whether there is any user record at or after `offset`.
    pub fn has_records(&self) -> bool {
        self.user_batches().next().is_some()
    }

    /// The user records at or after `offset`, in order, borrowing the
    /// batches (nothing is allocated per record).
    pub fn views(&self) -> impl Iterator<Item = Result<RecordView<'_>, runnel_storage::StorageError>> {
        self.user_batches().flat_map(move |batch| self.views_of(batch))
    }

    /// The records of `batch` (one of [`FetchedBatches::user_batches`]) at
    /// or after `offset`.
    pub fn views_of<'a>(
        &self,
        batch: &'a RecordBatch,
    ) -> impl Iterator<Item = Result<RecordView<'a>, runnel_storage::StorageError>> + use<'a> {
        let offset = self.offset;
        batch
            .views()
            .filter(move |view| view.as_ref().map_or(true, |v| v.offset >= offset))
    }

    /// The user records at or after `offset`, as owned records (their keys
    /// and values still share the batches' bytes).
    pub fn into_records(self) -> Result<FetchedRecords, runnel_storage::StorageError> {
        let mut records = Vec::with_capacity(self.user_batches().map(|b| b.record_count() as usize).sum());
        for batch in self.user_batches() {
            for record in batch.records() {
                let record = record?;
                if record.offset >= self.offset {
                    records.push(record);
                }
            }
        }
        Ok(FetchedRecords {
            records,
            next_offset: self.next_offset,
            committed_offset: self.committed_offset,
        })
    }
}

pub struct Client {
    cluster: ClusterClient,
    /// Node addresses learned from metadata.
    nodes: RwLock<HashMap<u32, SocketAddr>>,
    /// Nodes alive at the last metadata refresh.
    alive: RwLock<Vec<u32>>,
    /// The controller leader at the last metadata refresh, if known.
    controller_leader: RwLock<Option<u32>>,
    /// Topics as of the last refresh, for routing.
    cache: RwLock<Option<(Instant, Vec<TopicInfo>)>>,
    /// Nodes that recently failed to answer, tried last for a while.
    failed: RwLock<HashMap<u32, Instant>>,
    /// Where each (topic, partition) was last served.
    leaders: RwLock<HashMap<(String, u32), u32>>,
    /// The node this client runs inside, if any.
    local: Option<LocalNode>,
    pub timeout: Duration,
}

/// The node a client runs inside (a node's own dataflow tasks): requests
/// for that node go to its broker directly instead of through QUIC, TLS and
/// the loopback interface, with the same answers and errors.
#[derive(Clone)]
pub struct LocalNode {
    pub handle: NodeHandle,
    /// The address the cluster knows the node by.
    pub addr: SocketAddr,
}

impl std::fmt::Debug for LocalNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNode")
            .field("node", &self.handle.id())
            .field("addr", &self.addr)
            .finish()
    }
}

impl Client {
    /// Connects through any of `seeds` with the client certificate in `certs`.
    pub async fn connect(seeds: Vec<SocketAddr>, certs: &Path) -> ClientResult<Client> {
        Client::connect_from(seeds, certs, None).await
    }

    /// As [`Client::connect`], for a client inside node `local`: what is
    /// meant for that node skips the network.
    pub async fn connect_from(seeds: Vec<SocketAddr>, certs: &Path, local: Option<LocalNode>) -> ClientResult<Client> {
        let identity = CertDir::new(certs).client_identity()?;
        let client = Client {
            cluster: ClusterClient::new(&identity, seeds)?,
            nodes: RwLock::new(HashMap::new()),
            alive: RwLock::new(Vec::new()),
            controller_leader: RwLock::new(None),
            cache: RwLock::new(None),
            failed: RwLock::new(HashMap::new()),
            leaders: RwLock::new(HashMap::new()),
            local,
            timeout: Duration::from_secs(15),
        };
        client.topics().await?;
        Ok(client)
    }

    async fn call(&self, addr: Option<SocketAddr>, request: &ClientRequest) -> ClientResult<ClientResponse> {
        let payload = postcard::to_allocvec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let Some(local) = self.local.as_ref().filter(|l| addr.is_none_or(|a| a == l.addr)) {
            return self.call_local(local, payload).await;
        }
        let wire = WireRequest::Service {
            name: CLIENT_ACTOR.to_string(),
            payload,
        };
        let answer = match addr {
            Some(addr) => self.cluster.request_to(addr, wire, self.timeout).await?,
            None => self.cluster.request(wire, self.timeout).await?,
        };
        match answer {
            WireResponse::Service(bytes) => {
                postcard::from_bytes(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
            }
            WireResponse::Error(e) => Err(ClientError::Protocol(e)),
            WireResponse::Status { .. } => Err(ClientError::Protocol("status answer to a broker request".to_string())),
        }
    }

    /// A request to the node this client runs in, answered as the node's
    /// client gateway answers it over the network: no answer within the
    /// timeout leaves the outcome unknown; a failure to deliver is the
    /// gateway's error.
    async fn call_local(&self, local: &LocalNode, payload: Vec<u8>) -> ClientResult<ClientResponse> {
        let handle = &local.handle;
        match handle.call(handle.id(), CLIENT_ACTOR, payload, self.timeout).await {
            Ok(bytes) => postcard::from_bytes(&bytes).map_err(|e| ClientError::Protocol(e.to_string())),
            Err(e @ ClusterError::CallTimeout { .. }) => Err(ClientError::Cluster(ClusterError::NoAnswer {
                addr: local.addr,
                reason: e.to_string(),
            })),
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }

    /// All topics, refreshing what the client knows of nodes and leaders.
    pub async fn topics(&self) -> ClientResult<Vec<TopicInfo>> {
        let mut answer = self.call(None, &ClientRequest::Metadata).await?;
        if matches!(
            answer,
            ClientResponse::Metadata {
                controller_leader: None,
                ..
            }
        ) {
            // A node that knows no controller leader (just restarted, or cut
            // off) may hold stale metadata, even none: ask the others.
            let addrs: Vec<SocketAddr> = self
                .nodes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .copied()
                .collect();
            for addr in addrs {
                if let Ok(
                    other @ ClientResponse::Metadata {
                        controller_leader: Some(_),
                        ..
                    },
                ) = self.call(Some(addr), &ClientRequest::Metadata).await
                {
                    answer = other;
                    break;
                }
            }
        }
        match answer {
            ClientResponse::Metadata {
                topics,
                nodes,
                controller_leader,
            } => {
                *self.controller_leader.write().unwrap_or_else(|p| p.into_inner()) = controller_leader;
                *self.alive.write().unwrap_or_else(|p| p.into_inner()) = nodes.iter().map(|(id, _)| *id).collect();
                self.nodes.write().unwrap_or_else(|p| p.into_inner()).extend(nodes);
                Ok(topics)
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Creates a topic; returns once the node this client asks for metadata
    /// knows it too, so the caller can use it at once.
    pub async fn create_topic(&self, name: &str, config: TopicConfig) -> ClientResult<()> {
        let request = ClientRequest::CreateTopic {
            name: name.to_string(),
            config,
        };
        self.expect_done(self.call(None, &request).await?)?;
        let deadline = Instant::now() + self.timeout;
        while !self.topics().await?.iter().any(|t| t.name == name) {
            if Instant::now() >= deadline {
                return Err(ClientError::Protocol(format!(
                    "topic {name:?} was created but is not visible yet"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Spreads replicas evenly over the live nodes (moves happen in the
    /// background, each through learner -> voter -> removal).
    pub async fn rebalance(&self) -> ClientResult<()> {
        self.expect_done(self.call(None, &ClientRequest::Rebalance).await?)
    }

    /// Starts a dataflow that the nodes' binary registered: the cluster
    /// creates its internal topics (and the sink, if missing) and places
    /// its tasks on live nodes.
    pub async fn start_dataflow(&self, name: &str) -> ClientResult<()> {
        let request = ClientRequest::StartDataflow { name: name.to_string() };
        self.expect_done(self.call(None, &request).await?)?;
        self.cached_topics(true).await?;
        Ok(())
    }

    /// Stops a dataflow's tasks; its checkpoints stay, so a later start
    /// resumes where it stopped.
    pub async fn stop_dataflow(&self, name: &str) -> ClientResult<()> {
        let request = ClientRequest::StopDataflow { name: name.to_string() };
        self.expect_done(self.call(None, &request).await?)
    }

    /// Running dataflows and the node of each task.
    pub async fn dataflows(&self) -> ClientResult<Vec<crate::metadata::DataflowMeta>> {
        match self.call(None, &ClientRequest::Dataflows).await? {
            ClientResponse::Dataflows(dataflows) => Ok(dataflows),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Figures of the dataflow tasks running on `node`.
    pub async fn dataflow_tasks(&self, node: u32) -> ClientResult<Vec<crate::tasks::TaskStatus>> {
        let addr = self
            .node_addr(node)
            .ok_or_else(|| ClientError::Protocol(format!("node {node} is not known")))?;
        match self.call(Some(addr), &ClientRequest::DataflowTasks).await? {
            ClientResponse::Tasks(tasks) => Ok(tasks),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn delete_topic(&self, name: &str) -> ClientResult<()> {
        self.expect_done(
            self.call(None, &ClientRequest::DeleteTopic { name: name.to_string() })
                .await?,
        )
    }

    fn expect_done(&self, response: ClientResponse) -> ClientResult<()> {
        match response {
            ClientResponse::Done => Ok(()),
            ClientResponse::Refused(e) => Err(e.into()),
            ClientResponse::Failed(e) => Err(e.into()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// A topic with each partition's leader and offsets, as the replicas see them.
    pub async fn describe_topic(&self, name: &str) -> ClientResult<TopicInfo> {
        let topics = self.topics().await?;
        let mut topic = topics
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| ClientError::UnknownTopic(name.to_string()))?;
        // Ask a replica of each partition for what only replicas know.
        for partition in &mut topic.partitions {
            for node in partition.replicas.clone() {
                let Some(addr) = self.node_addr(node) else { continue };
                let Ok(ClientResponse::Topic(info)) = self
                    .call(Some(addr), &ClientRequest::DescribeTopic { name: name.to_string() })
                    .await
                else {
                    continue;
                };
                if let Some(seen) = info
                    .partitions
                    .into_iter()
                    .find(|p| p.partition == partition.partition && p.committed_offset.is_some())
                {
                    *partition = seen;
                    break;
                }
            }
        }
        Ok(topic)
    }

    /// The controller leader at the last metadata refresh, if the answering
    /// node knew it.
    pub fn controller_leader(&self) -> Option<u32> {
        *self.controller_leader.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Nodes alive at the last metadata refresh.
    pub fn alive_nodes(&self) -> Vec<u32> {
        self.alive.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn node_addr(&self, node: u32) -> Option<SocketAddr> {
        self.nodes.read().unwrap_or_else(|p| p.into_inner()).get(&node).copied()
    }

    /// Topics from a recent refresh, or fresh ones.
    async fn cached_topics(&self, refresh: bool) -> ClientResult<Vec<TopicInfo>> {
        if !refresh {
            let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
            if let Some((at, topics)) = cache.as_ref() {
                if at.elapsed() < METADATA_MAX_AGE {
                    return Ok(topics.clone());
                }
            }
        }
        let topics = self.topics().await?;
        *self.cache.write().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), topics.clone()));
        Ok(topics)
    }

    /// Nodes to try for a partition: the last known leader first, then replicas.
    async fn candidates(&self, topic: &str, partition: u32, refresh: bool) -> ClientResult<Vec<u32>> {
        let mut topics = self.cached_topics(refresh).await?;
        if !refresh && !topics.iter().any(|t| t.name == topic) {
            // Perhaps created since the cache was filled.
            topics = self.cached_topics(true).await?;
        }
        let info = topics
            .into_iter()
            .find(|t| t.name == topic)
            .ok_or_else(|| ClientError::UnknownTopic(topic.to_string()))?;
        let partitions = info.config.partitions;
        let info = info
            .partitions
            .into_iter()
            .find(|p| p.partition == partition)
            .ok_or_else(|| ClientError::PartitionOutOfRange {
                topic: topic.to_string(),
                partition,
                partitions,
            })?;
        let known = self
            .leaders
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(topic.to_string(), partition))
            .copied();
        let mut nodes: Vec<u32> = known.into_iter().chain(info.leader).collect();
        nodes.extend(info.replicas);
        let mut seen = std::collections::HashSet::new();
        nodes.retain(|n| seen.insert(*n));
        // Nodes that just failed go last: a dead leader must not cost a
        // connection timeout on every retry.
        let failed = self.failed.read().unwrap_or_else(|p| p.into_inner());
        nodes.sort_by_key(|n| failed.get(n).is_some_and(|at| at.elapsed() < FAILED_NODE_MEMORY));
        Ok(nodes)
    }

    /// Sends one batch to a partition's leader; returns its base offset.
    pub async fn produce(&self, topic: &str, partition: u32, batch: RecordBatch, acks: Acks) -> ClientResult<u64> {
        let request = ClientRequest::Produce {
            topic: topic.to_string(),
            partition,
            acks,
            batch: batch.into_bytes(),
        };
        match self.route(topic, partition, &request).await? {
            ClientResponse::Produced { base_offset } => Ok(base_offset),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The first committed offset of a partition whose record timestamp is at
    /// least `timestamp_ms`, or `None` when every record is older.
    pub async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> ClientResult<Option<u64>> {
        let request = ClientRequest::OffsetForTimestamp {
            topic: topic.to_string(),
            partition,
            timestamp_ms,
        };
        match self.route(topic, partition, &request).await? {
            ClientResponse::Offset(offset) => Ok(offset),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Test-only: makes `node`'s replica of the partition panic (the node
    /// must run with test fault hooks enabled).
    pub async fn inject_panic(&self, node: u32, topic: &str, partition: u32) -> ClientResult<()> {
        let addr = self
            .node_addr(node)
            .ok_or_else(|| ClientError::Protocol(format!("node {node} is not known")))?;
        let request = ClientRequest::InjectPanic {
            topic: topic.to_string(),
            partition,
        };
        self.expect_done(self.call(Some(addr), &request).await?)
    }

    /// Committed records of a partition from `offset`, up to `max_bytes`.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    ) -> ClientResult<FetchedRecords> {
        Ok(self
            .fetch_batches(topic, partition, offset, max_bytes)
            .await?
            .into_records()?)
    }

    /// As [`Client::fetch`], leaving the records in their batches.
    pub async fn fetch_batches(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    ) -> ClientResult<FetchedBatches> {
        let request = ClientRequest::Fetch {
            topic: topic.to_string(),
            partition,
            offset,
            max_bytes,
            any_replica: false,
        };
        let response = self.route(topic, partition, &request).await?;
        decode_fetched(offset, response, topic, partition)
    }

    /// As [`Client::fetch`], from a given replica's node (to compare replicas).
    pub async fn fetch_from_replica(
        &self,
        node: u32,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    ) -> ClientResult<FetchedRecords> {
        let addr = self
            .node_addr(node)
            .ok_or_else(|| ClientError::Protocol(format!("node {node} is not known")))?;
        let request = ClientRequest::Fetch {
            topic: topic.to_string(),
            partition,
            offset,
            max_bytes,
            any_replica: true,
        };
        Ok(decode_fetched(offset, self.call(Some(addr), &request).await?, topic, partition)?.into_records()?)
    }

    /// Finds the node that serves the partition, following hints, retrying
    /// only failures that certainly had no effect. A produce that fails after
    /// an attempt whose outcome is unknown fails as `Unavailable` (outcome
    /// unknown), whatever the last attempt said: that attempt may have
    /// written the batch.
    async fn route(&self, topic: &str, partition: u32, request: &ClientRequest) -> ClientResult<ClientResponse> {
        let mut maybe_written = false;
        match self.route_once(topic, partition, request, &mut maybe_written).await {
            Err(e) if maybe_written && !is_unknown_outcome(&e) => Err(ClientError::Unavailable {
                topic: topic.to_string(),
                partition,
                timeout_ms: self.timeout.as_millis() as u64,
                last_error: format!("{e}, after an attempt whose outcome is unknown"),
            }),
            other => other,
        }
    }

    async fn route_once(
        &self,
        topic: &str,
        partition: u32,
        request: &ClientRequest,
        maybe_written: &mut bool,
    ) -> ClientResult<ClientResponse> {
        let is_produce = matches!(request, ClientRequest::Produce { .. });
        // A produce is retried after an unknown outcome only when it carries
        // a producer id: the leader then recognises a batch it already has.
        let retry_safe = match request {
            ClientRequest::Produce { batch, .. } => {
                runnel_storage::BatchHeader::parse(batch).is_ok_and(|h| h.producer.producer_id >= 0)
            }
            _ => true,
        };
        let deadline = Instant::now() + self.timeout;
        let mut last_error = String::from("no replica tried");
        let mut hint: Option<u32> = None;
        let mut refresh = false;
        loop {
            let mut nodes = self.candidates(topic, partition, refresh).await?;
            refresh = true;
            if let Some(hint) = hint.take() {
                // A follower names the old leader until it learns of a new one.
                let failed_recently = self
                    .failed
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&hint)
                    .is_some_and(|at| at.elapsed() < FAILED_NODE_MEMORY);
                if !failed_recently {
                    nodes.insert(0, hint);
                }
            }
            for node in nodes {
                let Some(addr) = self.node_addr(node) else { continue };
                let response = match self.call(Some(addr), request).await {
                    Ok(response) => response,
                    // A produce that may have been written is not retried: a
                    // retry could write it twice.
                    Err(ClientError::Cluster(e @ ClusterError::NoAnswer { .. })) if !retry_safe => {
                        self.failed
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(node, Instant::now());
                        return Err(ClientError::Cluster(e));
                    }
                    Err(e) => {
                        *maybe_written |=
                            is_produce && matches!(e, ClientError::Cluster(ClusterError::NoAnswer { .. }));
                        self.failed
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(node, Instant::now());
                        last_error = format!("node {node}: {e}");
                        continue;
                    }
                };
                match response {
                    ClientResponse::Failed(BrokerError::NotLeader { leader, .. }) => {
                        last_error = format!("node {node} does not lead");
                        if let Some(leader) = leader.and_then(|l| u32::try_from(l).ok()) {
                            hint = Some(leader);
                            break;
                        }
                    }
                    ClientResponse::NotHere { .. } => last_error = format!("node {node} has no replica"),
                    ClientResponse::Failed(
                        BrokerError::LeadershipLost
                        | BrokerError::Busy(_)
                        | BrokerError::UnknownGroup(_)
                        | BrokerError::NotYetCommitted(_),
                    ) => {
                        last_error = format!("node {node}: retryable failure");
                    }
                    ClientResponse::Failed(BrokerError::Timeout(_) | BrokerError::ReplicaFailed { .. })
                        if retry_safe =>
                    {
                        *maybe_written |= is_produce;
                        last_error = format!("node {node}: no answer from the replica");
                    }
                    ClientResponse::Failed(e) => return Err(e.into()),
                    // The node's metadata lags the client's, which has the
                    // topic (or `candidates` would have said otherwise).
                    ClientResponse::UnknownTopic(_) => last_error = format!("node {node} does not know the topic yet"),
                    ClientResponse::PartitionOutOfRange {
                        topic,
                        partition,
                        partitions,
                    } => {
                        return Err(ClientError::PartitionOutOfRange {
                            topic,
                            partition,
                            partitions,
                        })
                    }
                    other => {
                        self.leaders
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert((topic.to_string(), partition), node);
                        return Ok(other);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Unavailable {
                    topic: topic.to_string(),
                    partition,
                    timeout_ms: self.timeout.as_millis() as u64,
                    last_error,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn decode_fetched(offset: u64, response: ClientResponse, topic: &str, partition: u32) -> ClientResult<FetchedBatches> {
    let ClientResponse::Fetched {
        batches,
        committed_offset,
        ..
    } = response
    else {
        return match response {
            ClientResponse::Failed(e) => Err(e.into()),
            ClientResponse::UnknownTopic(name) => Err(ClientError::UnknownTopic(name)),
            ClientResponse::PartitionOutOfRange { partitions, .. } => Err(ClientError::PartitionOutOfRange {
                topic: topic.to_string(),
                partition,
                partitions,
            }),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        };
    };
    let batches = batches
        .into_iter()
        .map(|bytes| RecordBatch::from_bytes(bytes.into_vec()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(FetchedBatches::new(offset, batches, committed_offset))
}

/// A stable hash of a key (FNV-1a), so a key always maps to one partition.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &byte in key {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

/// Batches records per partition and sends them with the chosen acks.
pub struct Producer {
    client: Arc<Client>,
    topic: String,
    partitions: u32,
    acks: Acks,
    /// Records per batch before it is sent.
    pub batch_records_max: usize,
    /// How long a started batch may wait for more records; checked on each
    /// `send` (and `flush_due`), so a slow trickle still goes out.
    pub linger: Duration,
    /// When each partition's pending batch got its first record.
    started: BTreeMap<u32, Instant>,
    pending: BTreeMap<u32, BatchBuilder>,
    next_partition: u32,
    /// Identifies this producer's batches so retries are written once.
    producer_id: i64,
    /// Sequence of the next record, per partition.
    next_sequence: BTreeMap<u32, i32>,
}

/// A producer id unlikely to collide with any other: random bits from the
/// standard library's hasher keys, the time and the process id.
fn new_producer_id() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(now);
    hasher.write_u32(std::process::id());
    (hasher.finish() >> 1) as i64
}

impl Producer {
    pub async fn new(client: Arc<Client>, topic: &str, acks: Acks) -> ClientResult<Producer> {
        let topics = client.topics().await?;
        let info = topics
            .iter()
            .find(|t| t.name == topic)
            .ok_or_else(|| ClientError::UnknownTopic(topic.to_string()))?;
        Ok(Producer {
            partitions: info.config.partitions,
            client,
            topic: topic.to_string(),
            acks,
            batch_records_max: 1000,
            linger: Duration::from_millis(5),
            started: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_partition: 0,
            producer_id: new_producer_id(),
            next_sequence: BTreeMap::new(),
        })
    }

    /// Queues a record: to `partition` if given, else by key hash, else
    /// round-robin. Sends the partition's batch when it is full; returns the
    /// acknowledged (partition, base offset, records) of what was sent.
    pub async fn send(&mut self, partition: Option<u32>, record: Record) -> ClientResult<Vec<(u32, u64, u32)>> {
        let size = record.key.as_ref().map_or(0, |k| k.len()) + record.value.as_ref().map_or(0, |v| v.len());
        if size > RECORD_BYTES_MAX {
            return Err(ClientError::RecordTooLarge {
                size_bytes: size,
                limit_bytes: RECORD_BYTES_MAX,
            });
        }
        let partition = match (partition, &record.key) {
            (Some(p), _) if p >= self.partitions => {
                return Err(ClientError::PartitionOutOfRange {
                    topic: self.topic.clone(),
                    partition: p,
                    partitions: self.partitions,
                })
            }
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, self.partitions),
            (None, None) => {
                self.next_partition = (self.next_partition + 1) % self.partitions;
                self.next_partition
            }
        };
        let builder = self.pending.entry(partition).or_default();
        builder.push(&record)?;
        self.started.entry(partition).or_insert_with(Instant::now);
        if builder.record_count() as usize >= self.batch_records_max {
            if let Some(builder) = self.pending.remove(&partition) {
                self.started.remove(&partition);
                let mut sent = vec![self.send_batch(partition, builder).await?];
                sent.extend(self.flush_due().await?);
                return Ok(sent);
            }
        }
        self.flush_due().await
    }

    /// Sends the batches that have waited longer than `linger`.
    pub async fn flush_due(&mut self) -> ClientResult<Vec<(u32, u64, u32)>> {
        let due: Vec<u32> = self
            .started
            .iter()
            .filter(|(_, t)| t.elapsed() >= self.linger)
            .map(|(&p, _)| p)
            .collect();
        let mut sent = Vec::new();
        for partition in due {
            self.started.remove(&partition);
            if let Some(builder) = self.pending.remove(&partition) {
                sent.push(self.send_batch(partition, builder).await?);
            }
        }
        Ok(sent)
    }

    /// Stamps a partition's batch with this producer's id and next sequence
    /// and sends it. The sequence advances once the batch is written. After an
    /// outcome the cluster could not tell, the producer takes a fresh id, so a
    /// sequence that may already be stored is never used for other records.
    async fn send_batch(&mut self, partition: u32, mut builder: BatchBuilder) -> ClientResult<(u32, u64, u32)> {
        let base_sequence = self.next_sequence.get(&partition).copied().unwrap_or(0);
        builder.set_producer(ProducerInfo {
            producer_id: self.producer_id,
            producer_epoch: 0,
            base_sequence,
        });
        let batch = builder.build()?;
        let count = batch.record_count();
        match self.client.produce(&self.topic, partition, batch, self.acks).await {
            Ok(base) => {
                *self.next_sequence.entry(partition).or_insert(0) += count as i32;
                Ok((partition, base, count))
            }
            Err(e) => {
                if is_unknown_outcome(&e) {
                    self.producer_id = new_producer_id();
                    self.next_sequence.clear();
                }
                Err(e)
            }
        }
    }

    /// Sends every queued record. On an error, partitions not yet tried stay
    /// queued; the failed partition's batch is reported by the error.
    pub async fn flush(&mut self) -> ClientResult<Vec<(u32, u64, u32)>> {
        let mut sent = Vec::new();
        let partitions: Vec<u32> = self.pending.keys().copied().collect();
        for partition in partitions {
            self.started.remove(&partition);
            let Some(builder) = self.pending.remove(&partition) else {
                continue;
            };
            if !builder.is_empty() {
                sent.push(self.send_batch(partition, builder).await?);
            }
        }
        Ok(sent)
    }
}

/// Whether a produce error leaves it open if the batch was written.
fn is_unknown_outcome(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Unavailable { .. }
            | ClientError::Cluster(ClusterError::NoAnswer { .. })
            | ClientError::Broker(BrokerError::Timeout(_) | BrokerError::ReplicaFailed { .. })
    )
}

/// Reads assigned partitions of a topic from chosen offsets.
pub struct Consumer {
    client: Arc<Client>,
    topic: String,
    /// Next offset per assigned partition.
    positions: BTreeMap<u32, u64>,
    pub fetch_bytes_max: u32,
}

impl Consumer {
    pub fn new(client: Arc<Client>, topic: &str) -> Consumer {
        Consumer {
            client,
            topic: topic.to_string(),
            positions: BTreeMap::new(),
            fetch_bytes_max: 1 << 20,
        }
    }

    /// Reads `partition` from `offset` on.
    pub fn assign(&mut self, partition: u32, offset: u64) {
        self.positions.insert(partition, offset);
    }

    pub fn position(&self, partition: u32) -> Option<u64> {
        self.positions.get(&partition).copied()
    }

    /// One round over the assigned partitions; returns (partition, record).
    pub async fn poll(&mut self) -> ClientResult<Vec<(u32, StoredRecord)>> {
        let mut out = Vec::new();
        let mut first_error = None;
        for (partition, position) in self.positions.clone() {
            let fetched = match self
                .client
                .fetch(&self.topic, partition, position, self.fetch_bytes_max)
                .await
            {
                Ok(fetched) => fetched,
                // A new leader learns the commit point a moment after it is
                // elected: nothing to read there yet.
                Err(ClientError::Broker(BrokerError::OffsetOutOfRange { offset, end, .. })) if offset > end => continue,
                // The other partitions are still read (their positions move
                // on with what is delivered); this one is tried again on the
                // next poll. The error is returned only if nothing was read.
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            self.positions.insert(partition, fetched.next_offset);
            out.extend(fetched.records.into_iter().map(|r| (partition, r)));
        }
        match first_error {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    /// The committed offset (the end for readers) of each assigned partition.
    pub async fn end_offsets(&self) -> ClientResult<BTreeMap<u32, u64>> {
        let mut ends = BTreeMap::new();
        for &partition in self.positions.keys() {
            let position = self.positions[&partition];
            let fetched = self.client.fetch(&self.topic, partition, position, 1).await?;
            ends.insert(partition, fetched.committed_offset);
        }
        Ok(ends)
    }
}

/// The internal topic holding consumers' committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Partitions of the offsets topic (a consumer's commits all go to one).
pub const OFFSETS_PARTITIONS: u32 = 8;

/// The key under which a consumer's offset for one partition is stored.
fn offset_key(consumer: &str, topic: &str, partition: u32) -> Bytes {
    Bytes::from(format!("{consumer}\u{0}{topic}\u{0}{partition}"))
}

impl Client {
    /// Makes sure the offsets topic exists (replicated like any topic).
    async fn ensure_offsets_topic(&self) -> ClientResult<()> {
        if self.cached_topics(false).await?.iter().any(|t| t.name == OFFSETS_TOPIC) {
            return Ok(());
        }
        let alive = self.alive_nodes().len().clamp(1, 3) as u16;
        match self
            .create_topic(OFFSETS_TOPIC, TopicConfig::new(OFFSETS_PARTITIONS, alive))
            .await
        {
            Ok(()) | Err(ClientError::Refused(MetadataError::TopicExists(_))) => {
                self.cached_topics(true).await?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Stores `consumer`'s next offsets for `topic` partitions in the cluster.
    pub async fn commit_offsets(&self, consumer: &str, topic: &str, offsets: &BTreeMap<u32, u64>) -> ClientResult<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        self.ensure_offsets_topic().await?;
        let partition = partition_for_key(consumer.as_bytes(), OFFSETS_PARTITIONS);
        let mut builder = BatchBuilder::new();
        for (&p, &offset) in offsets {
            let timestamp_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            builder.push(&Record {
                timestamp_ms,
                key: Some(offset_key(consumer, topic, p)),
                value: Some(Bytes::copy_from_slice(&offset.to_le_bytes())),
                headers: Vec::new(),
            })?;
        }
        self.produce(OFFSETS_TOPIC, partition, builder.build()?, Acks::All)
            .await?;
        Ok(())
    }

    /// `consumer`'s committed offsets for `topic`, by partition (the latest
    /// commit of each). Reads the consumer's offsets partition from the start:
    /// fine while it is small; compaction will bound it.
    pub async fn committed_offsets(&self, consumer: &str, topic: &str) -> ClientResult<BTreeMap<u32, u64>> {
        if !self.cached_topics(true).await?.iter().any(|t| t.name == OFFSETS_TOPIC) {
            return Ok(BTreeMap::new());
        }
        let partition = partition_for_key(consumer.as_bytes(), OFFSETS_PARTITIONS);
        let prefix = format!("{consumer}\u{0}{topic}\u{0}");
        let mut committed = BTreeMap::new();
        let mut offset = 0;
        loop {
            let fetched = self.fetch(OFFSETS_TOPIC, partition, offset, 1 << 20).await?;
            for record in &fetched.records {
                let (Some(key), Some(value)) = (&record.record.key, &record.record.value) else {
                    continue;
                };
                let Some(p) = std::str::from_utf8(key)
                    .ok()
                    .and_then(|k| k.strip_prefix(&prefix))
                    .and_then(|p| p.parse().ok())
                else {
                    continue;
                };
                if let Ok(word) = <[u8; 8]>::try_from(value.as_ref()) {
                    committed.insert(p, u64::from_le_bytes(word));
                }
            }
            if fetched.next_offset == offset || fetched.next_offset >= fetched.committed_offset {
                return Ok(committed);
            }
            offset = fetched.next_offset;
        }
    }
}

impl Consumer {
    /// Moves every assigned partition to its first record at or after
    /// `timestamp_ms` (or to its end when all records are older).
    pub async fn seek_to_timestamp(&mut self, timestamp_ms: i64) -> ClientResult<()> {
        let ends = self.end_offsets().await?;
        for (partition, position) in self.positions.iter_mut() {
            let found = self
                .client
                .offset_for_timestamp(&self.topic, *partition, timestamp_ms)
                .await?;
            *position = found.unwrap_or_else(|| ends.get(partition).copied().unwrap_or(*position));
        }
        Ok(())
    }

    /// Stores this consumer's positions in the cluster under `name`.
    pub async fn commit(&self, name: &str) -> ClientResult<()> {
        self.client.commit_offsets(name, &self.topic, &self.positions).await
    }

    /// Moves assigned partitions to the positions committed under `name`;
    /// returns how many partitions had a committed position.
    pub async fn resume(&mut self, name: &str) -> ClientResult<usize> {
        let committed = self.client.committed_offsets(name, &self.topic).await?;
        let mut resumed = 0;
        for (partition, position) in self.positions.iter_mut() {
            if let Some(&offset) = committed.get(partition) {
                *position = offset;
                resumed += 1;
            }
        }
        Ok(resumed)
    }
}
