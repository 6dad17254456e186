//! The controller RPC service (`broker.controller`), which nodes call on
//! each other: the controller log, admin on the controller leader (topics,
//! dataflows, moves), a group leader's configuration and passive-replica
//! judgements. Decisions are the core's; this file validates who leads,
//! commits and waits.

use std::time::{Duration, Instant};

use runnel_cluster::NodeId;

use super::{encode, unix_ms, GroupView, Shared};
use crate::metadata::{command_batch, GroupId, MetadataCommand, MetadataError, CONTROLLER_GROUP};
use crate::protocol::{decode_payload, Acks, BrokerError, ControllerRequest, ControllerResponse, CONTROLLER_ACTOR};

/// Controller log fetched per request.
pub(super) const LOG_FETCH_BYTES: u32 = 1 << 20;
/// A controller call retries its candidates this often until its deadline.
const CALL_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// A commit looks for its applied result this often.
const COMMIT_POLL: Duration = Duration::from_millis(10);
/// How long a placement refused for too few live nodes waits for more to
/// be heard from, and how often it looks.
const SETTLE_WAIT: Duration = Duration::from_secs(3);
const SETTLE_POLL: Duration = Duration::from_millis(100);

impl Shared {
    /// Sends a controller request to the leader of group 0, following hints.
    pub(super) async fn controller_call(&self, request: ControllerRequest) -> ControllerResponse {
        let deadline = Instant::now() + self.config.request_timeout;
        let payload = encode(&request);
        let mut hint: Option<NodeId> = None;
        loop {
            let local_leader = self.broker.status(CONTROLLER_GROUP).await.and_then(|s| s.leader);
            let mut candidates: Vec<NodeId> = hint.into_iter().chain(local_leader).collect();
            candidates.extend(self.config.controllers.iter().copied());
            for candidate in candidates {
                let Some(response) = self.call_candidate(candidate, &request, &payload).await else {
                    continue;
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
            tokio::time::sleep(CALL_RETRY_PAUSE).await;
        }
    }

    /// One controller node's answer, or `None` when it could not be reached.
    async fn call_candidate(
        &self,
        candidate: NodeId,
        request: &ControllerRequest,
        payload: &[u8],
    ) -> Option<ControllerResponse> {
        if candidate == self.me() {
            return Some(Box::pin(self.serve_controller(request.clone())).await);
        }
        let bytes = self
            .node
            .call(
                candidate,
                CONTROLLER_ACTOR,
                payload.to_vec(),
                self.config.request_timeout,
            )
            .await
            .ok()?;
        Some(
            decode_payload(&bytes)
                .unwrap_or_else(|e| ControllerResponse::Failed(BrokerError::InvalidRequest(e.to_string()))),
        )
    }

    pub(super) async fn serve_controller(&self, request: ControllerRequest) -> ControllerResponse {
        match request {
            ControllerRequest::FetchLog { offset, max_bytes } => self.serve_log(offset, max_bytes).await,
            ControllerRequest::CreateTopic { name, config } => {
                let decided = self
                    .placed(|core, alive| core.create_topic(name.clone(), config.clone(), alive))
                    .await;
                self.commit_decided(decided).await
            }
            ControllerRequest::Rebalance => self.rebalance().await,
            ControllerRequest::ReplicaFailed { group, node } => {
                let command = self.core().replace_failed(group, node, &self.alive_nodes());
                match command {
                    Some(command) => {
                        tracing::info!(?command, "placing a failed replica on another node");
                        self.commit(command).await
                    }
                    None => ControllerResponse::Done,
                }
            }
            ControllerRequest::CommittedOffset => self.serve_committed_offset().await,
            ControllerRequest::GroupMembers { group } => self.serve_group_members(group).await,
            ControllerRequest::RemoveDamaged { group, node } => self.remove_damaged(group, node).await,
            ControllerRequest::PassiveReplica { group, node, since } => {
                match self.broker.judge_passive(group, node, since).await {
                    Ok(answer) => ControllerResponse::Passive(answer),
                    Err(e) => ControllerResponse::Failed(e),
                }
            }
            ControllerRequest::StartDataflow { dataflow } => {
                let decided = self.core().start_dataflow(dataflow, &self.alive_nodes());
                self.commit_decided(decided).await
            }
            ControllerRequest::StopDataflow { name } => {
                let decided = self.core().stop_dataflow(name);
                self.commit_decided(decided).await
            }
            ControllerRequest::StartQuery { dataflow, plan, object } => {
                let decided = self.core().start_query(dataflow, plan, object, &self.alive_nodes());
                self.commit_decided(decided).await
            }
            ControllerRequest::CreateObject { object } => {
                let decided = self.core().checked(MetadataCommand::CreateObject { object });
                self.commit_decided(decided).await
            }
            ControllerRequest::DropObject { name } => {
                let decided = self.core().checked(MetadataCommand::DropObject { name });
                self.commit_decided(decided).await
            }
            ControllerRequest::DeleteTopic { name } => {
                let decided = self.core().delete_topic(name);
                self.commit_decided(decided).await
            }
            ControllerRequest::KafkaListener { node, advertised } => {
                let decided = self.core().checked(MetadataCommand::KafkaListener { node, advertised });
                self.commit_decided(decided).await
            }
            ControllerRequest::AlterTopic { name, settings } => {
                let decided = self.core().checked(MetadataCommand::AlterTopic { name, settings });
                self.commit_decided(decided).await
            }
            ControllerRequest::AddPartitions { name, partitions } => {
                let decided = self
                    .placed(|core, alive| core.add_partitions(name.clone(), partitions, alive))
                    .await;
                self.commit_decided(decided).await
            }
            ControllerRequest::ResetDataflow { name } => {
                let decided = self.core().checked(MetadataCommand::ResetDataflow { name });
                self.commit_decided(decided).await
            }
        }
    }

    /// A placement decision on the live nodes. Refused for too few live
    /// nodes, it is decided again every [`SETTLE_POLL`] for up to
    /// [`SETTLE_WAIT`]: a cluster just started (or a leader just elected)
    /// may not have heard from every node yet, and a create right after
    /// starting the nodes should not fail for that.
    async fn placed(
        &self,
        decide: impl Fn(&super::core::ControllerCore, &[NodeId]) -> Result<MetadataCommand, MetadataError>,
    ) -> Result<MetadataCommand, MetadataError> {
        let deadline = Instant::now() + SETTLE_WAIT;
        let mut waited = false;
        loop {
            let decided = decide(&self.core(), &self.alive_nodes());
            match decided {
                Err(e @ MetadataError::NotEnoughNodes { .. }) if Instant::now() < deadline => {
                    if !waited {
                        tracing::info!(reason = %e, "placement waits for more live nodes");
                        waited = true;
                    }
                    tokio::time::sleep(SETTLE_POLL).await;
                }
                other => return other,
            }
        }
    }

    async fn serve_log(&self, offset: u64, max_bytes: u32) -> ControllerResponse {
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

    async fn serve_committed_offset(&self) -> ControllerResponse {
        match self.broker.status(CONTROLLER_GROUP).await {
            Some(status) if status.leader == Some(self.me()) && status.commit_known => {
                ControllerResponse::Offset(status.committed_offset)
            }
            // A leader new to its term: the asker tries again later rather
            // than judge its metadata against a commit point that may lag.
            Some(status) if status.leader == Some(self.me()) => {
                ControllerResponse::Failed(BrokerError::NotYetCommitted(CONTROLLER_GROUP))
            }
            Some(status) => ControllerResponse::Failed(BrokerError::NotLeader {
                group: CONTROLLER_GROUP,
                leader: status.leader,
            }),
            None => ControllerResponse::Failed(BrokerError::UnknownGroup(CONTROLLER_GROUP)),
        }
    }

    async fn serve_group_members(&self, group: GroupId) -> ControllerResponse {
        match self.broker.status(group).await {
            Some(status) if status.leader == Some(self.me()) => ControllerResponse::Members {
                voters: status.voters,
                learners: status.learners,
            },
            Some(status) => ControllerResponse::Failed(BrokerError::NotLeader {
                group,
                leader: status.leader,
            }),
            None => ControllerResponse::Failed(BrokerError::UnknownGroup(group)),
        }
    }

    /// As the leader of `group`: steps `node` (whose replica's files are
    /// damaged) out of the voters. Settling adds it back as a learner, to be
    /// promoted once its rebuilt replica has caught up.
    async fn remove_damaged(&self, group: GroupId, node: NodeId) -> ControllerResponse {
        let Some(status) = self.broker.status(group).await else {
            return ControllerResponse::Failed(BrokerError::UnknownGroup(group));
        };
        let view = GroupView {
            voters: status.voters,
            learners: status.learners,
        };
        match self
            .core()
            .voters_without_damaged(group, status.leader, &view, node, unix_ms() as u64)
        {
            Ok(Some(voters)) => {
                tracing::warn!(partition = %group.named(), node = %node, "removing a voter whose replica files are damaged; it rejoins as a learner");
                self.broker.reconfigure(group, voters);
                ControllerResponse::Done
            }
            Ok(None) => ControllerResponse::Done,
            Err(leader) => ControllerResponse::Failed(BrokerError::NotLeader { group, leader }),
        }
    }

    /// On the controller leader: the core's rebalancing moves, committed one
    /// by one.
    async fn rebalance(&self) -> ControllerResponse {
        let moves = self.core().rebalance(&self.alive_nodes());
        for command in moves {
            tracing::info!(?command, "rebalance moves a replica");
            if let ControllerResponse::Failed(e) = self.commit(command).await {
                return ControllerResponse::Failed(e);
            }
        }
        ControllerResponse::Done
    }

    async fn commit_decided(&self, decided: Result<MetadataCommand, MetadataError>) -> ControllerResponse {
        match decided {
            Ok(command) => self.commit(command).await,
            Err(e) => ControllerResponse::Refused(e),
        }
    }

    /// Proposes a command to group 0 (this node must lead it) and waits until
    /// it is applied here, returning how applying it went.
    pub(super) async fn commit(&self, command: MetadataCommand) -> ControllerResponse {
        let batch = match command_batch(&command, unix_ms()) {
            Ok(batch) => batch,
            Err(e) => return ControllerResponse::Failed(BrokerError::InvalidRequest(e.to_string())),
        };
        let base_offset = match self.broker.produce(CONTROLLER_GROUP, batch, Acks::All, 0).await {
            Ok(offset) => offset,
            Err(e) => return ControllerResponse::Failed(e),
        };
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            if let Err(reason) = self.pull_and_apply().await {
                tracing::debug!(reason, "applying the controller log");
            }
            if let Some(result) = self.core().meta().results.get(&base_offset) {
                return match result {
                    Ok(()) => ControllerResponse::Done,
                    Err(e) => ControllerResponse::Refused(e.clone()),
                };
            }
            if Instant::now() >= deadline {
                return ControllerResponse::Failed(BrokerError::Timeout(CONTROLLER_GROUP));
            }
            tokio::time::sleep(COMMIT_POLL).await;
        }
    }
}
