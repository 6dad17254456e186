//! [`Client`]'s connection to the cluster: calls to one node (over QUIC, or
//! straight to the broker of the node the client runs in), the metadata
//! cache, and routing of partition requests to their leader with retries
//! as [`crate::policy`] decides.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use runnel_cluster::protocol::{NodeRequest, NodeResponse};
use runnel_cluster::quic::ClusterClient;
use runnel_cluster::tls::CertDir;
use runnel_cluster::{ClusterError, NodeHandle, NodeId};

use crate::error::{ClientError, ClientResult};
use crate::policy::{self, Outcome};
use crate::protocol::{decode_payload, encode_payload, ClientRequest, ClientResponse, TopicInfo, CLIENT_ACTOR};

/// How long routing trusts cached metadata before asking again.
const METADATA_MAX_AGE: Duration = Duration::from_secs(2);

/// Pause between rounds over a partition's candidate nodes.
const ROUND_PAUSE: Duration = Duration::from_millis(50);

pub struct Client {
    cluster: ClusterClient,
    /// Node addresses learned from metadata.
    nodes: RwLock<HashMap<NodeId, SocketAddr>>,
    /// Nodes alive at the last metadata refresh.
    alive: RwLock<Vec<NodeId>>,
    /// The controller leader at the last metadata refresh, if known.
    controller_leader: RwLock<Option<NodeId>>,
    /// Topics as of the last refresh, for routing.
    cache: RwLock<Option<(Instant, Vec<TopicInfo>)>>,
    /// Where each (topic, partition) was last served.
    leaders: RwLock<HashMap<(String, u32), NodeId>>,
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

/// A request being routed to a partition's leader, with what the retry
/// policy needs to know of it.
struct Routed<'a> {
    topic: &'a str,
    partition: u32,
    request: &'a ClientRequest,
    /// Only a produce can be written twice by a retry.
    is_produce: bool,
    /// Whether an attempt whose outcome is unknown may be retried.
    retry_safe: bool,
    /// Whether some attempt so far may have written the batch.
    maybe_written: bool,
}

/// What routing does after one attempt at one node.
enum Step {
    Answer(ClientResponse),
    /// Try another node; `why` says why this one did not serve, `leader`
    /// is the node it named as the leader (tried first, on a new round).
    Next {
        why: String,
        leader: Option<NodeId>,
    },
    Fail(ClientError),
}

/// How a node that has not registered its broker service yet answers
/// (`RemoteError::UnknownActor`), and how long a starting node is waited for.
const NOT_READY: &str = "no actor named";
const NOT_READY_WAIT: Duration = Duration::from_secs(5);

/// The longest pause between two rounds over the seeds while none answers
/// (nodes starting, or too busy to finish a handshake or an answer).
const CONNECT_PAUSE_MAX: Duration = Duration::from_secs(1);

impl Client {
    /// Connects through any of `seeds` with the client certificate in
    /// `certs`. While no seed answers (nodes starting, or too loaded to
    /// finish a handshake), it asks again for up to 15 s; a handshake a
    /// node refuses (a certificate of another cluster) fails at once.
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
            leaders: RwLock::new(HashMap::new()),
            local,
            timeout: Duration::from_secs(15),
        };
        client.bootstrap().await?;
        Ok(client)
    }

    /// The first metadata, asked of the seeds in rounds while no seed
    /// answers (see [`Client::read_any`]).
    async fn bootstrap(&self) -> ClientResult<()> {
        self.topics().await.map(drop)
    }

    /// A read any node may answer (metadata, the SQL catalog, the dataflows), asked
    /// again while no node answers (as at connecting), for up to the
    /// client's timeout: asking twice changes nothing.
    pub(crate) async fn read_any(&self, request: &ClientRequest) -> ClientResult<ClientResponse> {
        self.asking_again(self.timeout, || self.call(None, request)).await
    }

    /// Runs `attempt` until it succeeds, fails in a way waiting cannot
    /// cure ([`policy::retry_bootstrap`]), or `wait` has passed; pauses
    /// from 100 ms doubling to [`CONNECT_PAUSE_MAX`].
    async fn asking_again<T, F>(&self, wait: Duration, mut attempt: impl FnMut() -> F) -> ClientResult<T>
    where
        F: std::future::Future<Output = ClientResult<T>>,
    {
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match attempt().await {
                Err(e) if policy::retry_bootstrap(&e) && started.elapsed() + pause < wait => {
                    let waiting_s = wait.as_secs();
                    tracing::info!(error = %e, "no seed answered yet; asking again for up to {waiting_s} s");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(CONNECT_PAUSE_MAX);
                }
                answer => return answer,
            }
        }
    }

    /// One request to node `addr` (any node when `None`). A node still
    /// starting (its broker service not yet registered) is asked again for
    /// up to [`NOT_READY_WAIT`].
    pub(crate) async fn call(&self, addr: Option<SocketAddr>, request: &ClientRequest) -> ClientResult<ClientResponse> {
        let started = std::time::Instant::now();
        loop {
            match self.call_once(addr, request).await {
                Err(ClientError::Protocol(e)) if e.starts_with(NOT_READY) && started.elapsed() < NOT_READY_WAIT => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                answer => return answer,
            }
        }
    }

    async fn call_once(&self, addr: Option<SocketAddr>, request: &ClientRequest) -> ClientResult<ClientResponse> {
        let payload = encode_payload(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let Some(local) = self.local.as_ref().filter(|l| addr.is_none_or(|a| a == l.addr)) {
            return self.call_local(local, payload).await;
        }
        let wire = NodeRequest::Service {
            name: CLIENT_ACTOR.to_string(),
            payload,
        };
        let answer = match addr {
            Some(addr) => self.cluster.request_to(addr, wire, self.timeout).await?,
            None => self.cluster.request(wire, self.timeout).await?,
        };
        match answer {
            NodeResponse::Service(bytes) => decode_payload(&bytes).map_err(|e| ClientError::Protocol(e.to_string())),
            NodeResponse::Error(e) => Err(ClientError::Protocol(e)),
            NodeResponse::Status { .. } => Err(ClientError::Protocol("status answer to a broker request".to_string())),
        }
    }

    /// A request to the node this client runs in, answered as the node's
    /// client gateway answers it over the network: no answer within the
    /// timeout leaves the outcome unknown; a failure to deliver is the
    /// gateway's error.
    async fn call_local(&self, local: &LocalNode, payload: Vec<u8>) -> ClientResult<ClientResponse> {
        let handle = &local.handle;
        match handle.call(handle.id(), CLIENT_ACTOR, payload, self.timeout).await {
            Ok(bytes) => decode_payload(&bytes).map_err(|e| ClientError::Protocol(e.to_string())),
            Err(e @ ClusterError::CallTimeout { .. }) => Err(ClientError::Cluster(ClusterError::NoAnswer {
                addr: local.addr,
                reason: e.to_string(),
            })),
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }

    /// All topics, refreshing what the client knows of nodes and leaders.
    pub async fn topics(&self) -> ClientResult<Vec<TopicInfo>> {
        let mut answer = self.read_any(&ClientRequest::Metadata).await?;
        if matches!(
            answer,
            ClientResponse::Metadata {
                controller_leader: None,
                ..
            }
        ) {
            // A node that knows no controller leader (just restarted, or cut
            // off) may hold stale metadata, even none: ask the others.
            if let Some(other) = self.metadata_with_leader().await {
                answer = other;
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

    /// Metadata from the first known node that knows the controller leader.
    async fn metadata_with_leader(&self) -> Option<ClientResponse> {
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
                return Some(other);
            }
        }
        None
    }

    /// The controller leader at the last metadata refresh, if the answering
    /// node knew it.
    pub fn controller_leader(&self) -> Option<NodeId> {
        *self.controller_leader.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Nodes alive at the last metadata refresh.
    pub fn alive_nodes(&self) -> Vec<NodeId> {
        self.alive.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn node_addr(&self, node: NodeId) -> Option<SocketAddr> {
        self.nodes.read().unwrap_or_else(|p| p.into_inner()).get(&node).copied()
    }

    /// The address of `node`, or an error naming it.
    pub(crate) fn known_node(&self, node: NodeId) -> ClientResult<SocketAddr> {
        self.node_addr(node)
            .ok_or_else(|| ClientError::Protocol(format!("node {node} is not known")))
    }

    /// Topics from a recent refresh, or fresh ones.
    pub(crate) async fn cached_topics(&self, refresh: bool) -> ClientResult<Vec<TopicInfo>> {
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

    /// Whether the last request to `node` failed moments ago (the
    /// cluster client remembers it for a while).
    async fn failed_recently(&self, node: NodeId) -> bool {
        match self.node_addr(node) {
            Some(addr) => self.cluster.failed_recently(addr).await,
            None => false,
        }
    }

    /// Topic `name` from `topics`; one they do not list is asked for by
    /// name, which a node answers "does not exist" only after catching up
    /// with the controller (a node that restarted after a crash lists
    /// topics from metadata that may lag until then).
    pub(crate) async fn find_topic(&self, topics: Vec<TopicInfo>, name: &str) -> ClientResult<TopicInfo> {
        if let Some(info) = topics.into_iter().find(|t| t.name == name) {
            return Ok(info);
        }
        let request = ClientRequest::DescribeTopic { name: name.to_string() };
        match self.call(None, &request).await? {
            ClientResponse::Topic(info) => Ok(info),
            ClientResponse::UnknownTopic(_) => Err(ClientError::UnknownTopic(name.to_string())),
            ClientResponse::Failed(e) => Err(e.into()),
            ClientResponse::Refused(e) => Err(e.into()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Nodes to try for a partition: the last known leader first, then replicas.
    async fn candidates(&self, topic: &str, partition: u32, refresh: bool) -> ClientResult<Vec<NodeId>> {
        let mut topics = self.cached_topics(refresh).await?;
        if !refresh && !topics.iter().any(|t| t.name == topic) {
            // Perhaps created since the cache was filled.
            topics = self.cached_topics(true).await?;
        }
        let info = self.find_topic(topics, topic).await?;
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
        let mut nodes: Vec<NodeId> = known.into_iter().chain(info.leader).collect();
        nodes.extend(info.replicas);
        let mut seen = std::collections::HashSet::new();
        nodes.retain(|n| seen.insert(*n));
        // Nodes that just failed are left out while another may serve: a
        // dead leader must not cost a connection timeout on every round
        // while its followers elect a new one.
        let mut answering = Vec::with_capacity(nodes.len());
        for &node in &nodes {
            if !self.failed_recently(node).await {
                answering.push(node);
            }
        }
        Ok(if answering.is_empty() { nodes } else { answering })
    }

    /// Finds the node that serves the partition, following hints, retrying
    /// only failures that certainly had no effect. A produce that fails after
    /// an attempt whose outcome is unknown fails as `Unavailable` (outcome
    /// unknown), whatever the last attempt said: that attempt may have
    /// written the batch.
    pub(crate) async fn route(
        &self,
        topic: &str,
        partition: u32,
        request: &ClientRequest,
    ) -> ClientResult<ClientResponse> {
        let mut routed = Routed {
            topic,
            partition,
            request,
            is_produce: matches!(request, ClientRequest::Produce { .. }),
            // A produce is retried after an unknown outcome only when it
            // carries a producer id: the leader then recognises a batch it
            // already has.
            retry_safe: policy::retry_safe(request),
            maybe_written: false,
        };
        match self.route_once(&mut routed).await {
            Err(e) if routed.maybe_written && !policy::is_unknown_outcome(&e) => Err(ClientError::Unavailable {
                topic: topic.to_string(),
                partition,
                timeout_ms: self.timeout.as_millis() as u64,
                last_error: format!("{e}, after an attempt whose outcome is unknown"),
            }),
            other => other,
        }
    }

    /// Rounds over the partition's candidates until one serves, the policy
    /// calls a failure final, or the timeout passes.
    async fn route_once(&self, routed: &mut Routed<'_>) -> ClientResult<ClientResponse> {
        let deadline = Instant::now() + self.timeout;
        let mut last_error = String::from("no replica tried");
        let mut hint: Option<NodeId> = None;
        let mut refresh = false;
        loop {
            let mut nodes = match self.candidates(routed.topic, routed.partition, refresh).await {
                Ok(nodes) => nodes,
                // A node behind the controller asks to be asked again.
                Err(e @ ClientError::Broker(_))
                    if policy::classify_client(&e) == Outcome::Retry && Instant::now() < deadline =>
                {
                    last_error = e.to_string();
                    tokio::time::sleep(ROUND_PAUSE).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            refresh = true;
            // A follower names the old leader until it learns of a new one.
            if let Some(hint) = hint.take() {
                if !self.failed_recently(hint).await {
                    nodes.insert(0, hint);
                }
            }
            for node in nodes {
                let Some(addr) = self.node_addr(node) else { continue };
                match self.attempt(node, addr, routed).await {
                    Step::Answer(response) => {
                        self.leaders
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert((routed.topic.to_string(), routed.partition), node);
                        return Ok(response);
                    }
                    Step::Fail(e) => return Err(e),
                    Step::Next { why, leader } => {
                        last_error = why;
                        if leader.is_some() {
                            hint = leader;
                            break;
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Unavailable {
                    topic: routed.topic.to_string(),
                    partition: routed.partition,
                    timeout_ms: self.timeout.as_millis() as u64,
                    last_error,
                });
            }
            tokio::time::sleep(ROUND_PAUSE).await;
        }
    }

    /// One attempt at `node`. A node that does not answer is tried last for
    /// a while; a produce that may have been written is not retried unless
    /// it is retry-safe: a retry could write it twice.
    async fn attempt(&self, node: NodeId, addr: SocketAddr, routed: &mut Routed<'_>) -> Step {
        match self.call(Some(addr), routed.request).await {
            Ok(response) => routed.judge(node, response),
            Err(e) => {
                let outcome = policy::classify_client(&e);
                if !policy::may_retry(outcome, routed.retry_safe) {
                    return Step::Fail(e);
                }
                routed.maybe_written |= routed.is_produce && outcome == Outcome::Unknown;
                Step::Next {
                    why: format!("node {node}: {e}"),
                    leader: None,
                }
            }
        }
    }
}

impl Routed<'_> {
    /// What to do with `node`'s answer, as the policy classifies it.
    fn judge(&mut self, node: NodeId, response: ClientResponse) -> Step {
        let Some(outcome) = policy::classify_response(&response) else {
            return Step::Answer(response);
        };
        let why = match &response {
            ClientResponse::Failed(e @ crate::protocol::BrokerError::NotLeader { .. }) => {
                return Step::Next {
                    why: format!("node {node} does not lead"),
                    leader: policy::leader_hint(e),
                }
            }
            ClientResponse::NotHere { .. } => format!("node {node} has no replica"),
            // The node's metadata lags the client's, which has the topic
            // (or `candidates` would have said otherwise).
            ClientResponse::UnknownTopic(_) => format!("node {node} does not know the topic yet"),
            ClientResponse::Failed(e) if outcome == Outcome::Unknown => format!("node {node}: {e}"),
            _ => format!("node {node}: retryable failure"),
        };
        if !policy::may_retry(outcome, self.retry_safe) {
            return Step::Fail(final_error(response));
        }
        self.maybe_written |= self.is_produce && outcome == Outcome::Unknown;
        Step::Next { why, leader: None }
    }
}

/// The error a final answer stands for.
fn final_error(response: ClientResponse) -> ClientError {
    match response {
        ClientResponse::Failed(e) => e.into(),
        ClientResponse::PartitionOutOfRange {
            topic,
            partition,
            partitions,
        } => ClientError::PartitionOutOfRange {
            topic,
            partition,
            partitions,
        },
        other => ClientError::Protocol(format!("{other:?}")),
    }
}
