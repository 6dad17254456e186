//! [`BrokerService`]'s consumer-group methods: the group coordinator's
//! shell over [`crate::groups::core`], with committed offsets kept as
//! records of the offsets topic (see [`crate::groups`]).

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use runnel_client::{partition_for_key, OFFSETS_PARTITIONS, OFFSETS_TOPIC};
use runnel_storage::{BatchBuilder, Record};

use super::service::{BrokerService, ServiceError};
use super::Shared;
use crate::groups::core::{Answer, Group, GroupError, GroupState, GroupsCore, Join, Joined, Synced, Ticket};
use crate::groups::{offset_key, parse_offset, OffsetCache, CACHED_OFFSETS_MAX};
use crate::metadata::{CleanupPolicy, GroupId, MetadataError, NodeId, TopicConfig};
use crate::protocol::{Acks, BrokerError};
use runnel_client::protocol::{GroupErrorKind, GroupInfo, GroupListing, GroupMemberInfo, GroupRequest, GroupResponse};

/// How long a parked join or sync waits at most (the longest rebalance
/// timeout the core accepts, plus a margin).
const PARKED_MAX: Duration = Duration::from_secs(1_800 + 30);
/// Offsets one commit may carry at most.
pub const COMMIT_OFFSETS_MAX: usize = 10_000;
// The refusal at the bound names it.
const _: () = assert!(CACHED_OFFSETS_MAX == 1_000_000);
/// Bytes read per fetch while loading an offsets partition.
const LOAD_FETCH_BYTES: usize = 1 << 20;

/// Why a group request failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupFailure {
    #[error("this node is not the coordinator of group {0:?} (ask where it is again)")]
    NotCoordinator(String),
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// A group as `describe` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDescription {
    pub state: &'static str,
    pub protocol_type: String,
    pub protocol: String,
    pub generation: i32,
    /// (member id, client id, client host, assignment bytes).
    pub members: Vec<(String, String, String, Bytes)>,
}

impl BrokerService {
    /// The node coordinating `group` (the leader of its offsets partition),
    /// making the offsets topic first if the cluster has none yet.
    pub async fn find_coordinator(&self, group: &str) -> Result<Option<NodeId>, ServiceError> {
        self.ensure_offsets_topic().await?;
        let partition = partition_for_key(group.as_bytes(), OFFSETS_PARTITIONS);
        self.partition_leader(OFFSETS_TOPIC, partition).await
    }

    async fn ensure_offsets_topic(&self) -> Result<(), ServiceError> {
        if self.shared.core().meta().metadata.topics.contains_key(OFFSETS_TOPIC) {
            return Ok(());
        }
        let replication = self.alive_nodes().len().clamp(1, 3) as u16;
        let mut config = TopicConfig::new(OFFSETS_PARTITIONS, replication);
        // A group's latest commit per partition is what counts, as Kafka's.
        config.cleanup = CleanupPolicy::Compact;
        match self.create_topic(OFFSETS_TOPIC.to_string(), config).await {
            Ok(()) | Err(ServiceError::Refused(MetadataError::TopicExists(_))) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The offsets partition of `group` if this node leads it.
    async fn coordinating(&self, group: &str) -> Result<(GroupId, u32, u64), GroupFailure> {
        let partition = partition_for_key(group.as_bytes(), OFFSETS_PARTITIONS);
        let not_here = || GroupFailure::NotCoordinator(group.to_string());
        let gid = self.locate(OFFSETS_TOPIC, partition).await.map_err(|_| not_here())?;
        match self.shared.broker.status(gid).await {
            Some(s) if s.leader == Some(self.node_id()) && s.commit_known => {
                match self
                    .shared
                    .groups
                    .coordinates(partition, s.term, of_offsets_partition(partition))
                {
                    true => Ok((gid, partition, s.term)),
                    false => Err(not_here()),
                }
            }
            _ => Err(not_here()),
        }
    }

    pub async fn join_group(&self, join: Join) -> Result<Joined, GroupFailure> {
        self.coordinating(&join.group).await?;
        match self.parked(|core, ticket| core.join(join, ticket, now_ms())).await? {
            Answer::Join(_, result) => Ok(result?),
            Answer::Sync(..) => Err(GroupError::RebalanceInProgress.into()),
        }
    }

    /// A member id for a Kafka JoinGroup (v4+) that came without one and
    /// names no static instance: the member joins again with it (KIP-394).
    pub async fn member_id_for(&self, join: &Join) -> Result<String, GroupFailure> {
        self.coordinating(&join.group).await?;
        Ok(self.shared.groups.core().member_id_for(join, now_ms())?)
    }

    pub async fn sync_group(
        &self,
        group: &str,
        generation: i32,
        member_id: &str,
        assignments: Vec<(String, Bytes)>,
    ) -> Result<Synced, GroupFailure> {
        self.coordinating(group).await?;
        let sync =
            |core: &mut GroupsCore, ticket| core.sync(group, generation, member_id, assignments, ticket, now_ms());
        match self.parked(sync).await? {
            Answer::Sync(_, result) => Ok(result?),
            Answer::Join(..) => Err(GroupError::RebalanceInProgress.into()),
        }
    }

    /// Runs a core call that may park its request under a ticket, and waits
    /// (at most [`PARKED_MAX`]) for the answer; a request that times out is
    /// forgotten, so no answer channel outlives it.
    async fn parked(
        &self,
        call: impl FnOnce(&mut GroupsCore, Ticket) -> Result<Vec<Answer>, GroupError>,
    ) -> Result<Answer, GroupFailure> {
        let groups = &self.shared.groups;
        let (ticket, answer) = groups.park();
        let answers = call(&mut groups.core(), ticket);
        match answers {
            Ok(answers) => groups.deliver(answers),
            Err(e) => {
                groups.unpark(ticket);
                return Err(e.into());
            }
        }
        match tokio::time::timeout(PARKED_MAX, answer).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => {
                groups.unpark(ticket);
                Err(GroupError::RebalanceInProgress.into())
            }
        }
    }

    /// Fences a member whose static instance a newer member took over
    /// (Kafka's heartbeats, syncs and commits name the instance too).
    pub async fn check_instance(
        &self,
        group: &str,
        instance_id: Option<&str>,
        member_id: &str,
    ) -> Result<(), GroupFailure> {
        if instance_id.is_none() {
            return Ok(());
        }
        self.coordinating(group).await?;
        Ok(self
            .shared
            .groups
            .core()
            .check_instance(group, instance_id, member_id)?)
    }

    pub async fn heartbeat(&self, group: &str, generation: i32, member_id: &str) -> Result<(), GroupFailure> {
        self.coordinating(group).await?;
        Ok(self
            .shared
            .groups
            .core()
            .heartbeat(group, generation, member_id, now_ms())?)
    }

    /// Each leaver's outcome: a member id, and maybe a static member's
    /// instance id (see [`GroupsCore::leave`]).
    pub async fn leave_group(
        &self,
        group: &str,
        leavers: &[(String, Option<String>)],
    ) -> Result<Vec<Result<(), GroupError>>, GroupFailure> {
        self.coordinating(group).await?;
        let (results, answers) = self.shared.groups.core().leave(group, leavers, now_ms());
        self.shared.groups.deliver(answers);
        Ok(results)
    }

    /// The groups this node coordinates: (id, protocol type, state).
    pub fn list_groups(&self) -> Vec<(String, String, &'static str)> {
        let core = self.shared.groups.core();
        core.groups()
            .map(|(name, g)| (name.clone(), g.protocol_type.clone(), state_name(g.state)))
            .collect()
    }

    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription, GroupFailure> {
        self.coordinating(group).await?;
        let known = self.shared.groups.core().group(group).is_some();
        if !known {
            // Kafka's words: a group without members is Empty while it has
            // committed offsets, and Dead when it has nothing.
            let has_offsets = !self.group_offsets(group, None).await?.is_empty();
            return Ok(GroupDescription {
                state: if has_offsets { "Empty" } else { "Dead" },
                protocol_type: String::new(),
                protocol: String::new(),
                generation: 0,
                members: Vec::new(),
            });
        }
        let core = self.shared.groups.core();
        let Some(g) = core.group(group) else {
            return Err(GroupError::UnknownMemberId.into());
        };
        let members = g
            .members
            .iter()
            .map(|(id, m)| {
                (
                    id.clone(),
                    m.client_id.clone(),
                    m.client_host.clone(),
                    m.assignment.clone(),
                )
            })
            .collect();
        Ok(GroupDescription {
            state: state_name(g.state),
            protocol_type: g.protocol_type.clone(),
            protocol: g.protocol.clone(),
            generation: g.generation,
            members,
        })
    }

    /// Commits `offsets` (topic, partition, next offset; negative as a
    /// Kafka client may commit it, see [`crate::groups`]) for a member of
    /// `generation` (negative: a consumer outside group management), once
    /// written on a majority of the offsets partition's replicas.
    pub async fn commit_group_offsets(
        &self,
        group: &str,
        generation: i32,
        member_id: &str,
        offsets: &[(String, u32, i64)],
    ) -> Result<(), GroupFailure> {
        let (gid, partition, term) = self.coordinating(group).await?;
        self.shared.groups.core().check_commit(group, generation, member_id)?;
        if offsets.is_empty() {
            return Ok(());
        }
        if offsets.len() > COMMIT_OFFSETS_MAX {
            return Err(GroupError::Invalid("more offsets in one commit than allowed").into());
        }
        let mut caches = self.shared.groups.offsets.lock().await;
        self.load_offsets(&mut caches, gid, partition, term).await?;
        let cache = caches.entry(partition).or_default();
        let added = offsets
            .iter()
            .filter(|(topic, p, _)| !cache.offsets.contains_key(&(group.to_string(), topic.clone(), *p)))
            .count();
        if cache.offsets.len() + added > CACHED_OFFSETS_MAX {
            return Err(GroupError::Invalid(
                "this group's partition of the offsets topic holds 1,000,000 committed offsets, the most kept",
            )
            .into());
        }
        let entries: Vec<_> = offsets.iter().map(|(t, p, o)| (t.clone(), *p, Some(*o))).collect();
        self.write_offsets(gid, group, &entries, cache).await?;
        Ok(())
    }

    /// Kafka's OffsetDelete: forgets `group`'s committed offsets of
    /// `wanted`, except of the topics its members read. `subscribed` reads
    /// them from the group's protocol type and each member's protocol
    /// metadata (read with no lock held); `None`, a group of another kind,
    /// refuses the request while the group has members. Each partition's
    /// outcome: `true` forgotten (or had none), `false` kept because a
    /// member reads its topic.
    pub async fn delete_group_offsets(
        &self,
        group: &str,
        wanted: &[(String, u32)],
        subscribed: impl Fn(&str, &[Vec<Bytes>]) -> Option<Subscribed>,
    ) -> Result<Vec<bool>, GroupFailure> {
        let (gid, partition, term) = self.coordinating(group).await?;
        if wanted.len() > COMMIT_OFFSETS_MAX {
            return Err(GroupError::Invalid("more offsets in one request than allowed").into());
        }
        // Under the offsets lock, a member's commit waits for the delete.
        let mut caches = self.shared.groups.offsets.lock().await;
        self.load_offsets(&mut caches, gid, partition, term).await?;
        let cache = caches.entry(partition).or_default();
        let members = self.shared.groups.core().group(group).map(member_protocols);
        let first = (group.to_string(), String::new(), 0);
        let has_offsets = cache
            .offsets
            .range(first..)
            .next()
            .is_some_and(|((g, ..), _)| g == group);
        let read = match members {
            None if !has_offsets => return Err(GroupError::GroupIdNotFound.into()),
            Some((kind, metadata)) if !metadata.is_empty() => {
                subscribed(&kind, &metadata).ok_or(GroupError::NonEmptyGroup)?
            }
            _ => Subscribed::Topics(BTreeSet::new()),
        };
        let outcomes: Vec<bool> = wanted.iter().map(|(topic, _)| !read.includes(topic)).collect();
        let forgotten: Vec<(String, u32, Option<i64>)> = wanted
            .iter()
            .zip(&outcomes)
            .filter(|((topic, p), forget)| {
                **forget && cache.offsets.contains_key(&(group.to_string(), topic.clone(), *p))
            })
            .map(|((topic, p), _)| (topic.clone(), *p, None))
            .collect();
        if !forgotten.is_empty() {
            self.write_offsets(gid, group, &forgotten, cache).await?;
        }
        Ok(outcomes)
    }

    /// Writes `entries` (topic, partition, next offset, or `None` for a
    /// tombstone) of `group` to its offsets partition on a majority, then
    /// into `cache`.
    async fn write_offsets(
        &self,
        gid: GroupId,
        group: &str,
        entries: &[(String, u32, Option<i64>)],
        cache: &mut OffsetCache,
    ) -> Result<(), ServiceError> {
        let invalid = |e: runnel_storage::StorageError| ServiceError::from(BrokerError::InvalidRequest(e.to_string()));
        let mut builder = BatchBuilder::new();
        for (topic, p, offset) in entries {
            builder
                .push(&Record {
                    timestamp_ms: now_ms() as i64,
                    key: Some(offset_key(group, topic, *p)),
                    value: offset.map(|o| Bytes::copy_from_slice(&o.to_le_bytes())),
                    headers: Vec::new(),
                })
                .map_err(invalid)?;
        }
        let batch = builder.build().map_err(invalid)?;
        self.shared
            .broker
            .produce(gid, batch, Acks::All, 0)
            .await
            .map_err(ServiceError::from)?;
        for (topic, p, offset) in entries {
            let key = (group.to_string(), topic.clone(), *p);
            match offset {
                Some(offset) => cache.offsets.insert(key, *offset),
                None => cache.offsets.remove(&key),
            };
        }
        Ok(())
    }

    /// `group`'s committed offsets: of the given (topic, partition)s, or
    /// all of them.
    pub async fn group_offsets(
        &self,
        group: &str,
        wanted: Option<&[(String, u32)]>,
    ) -> Result<Vec<(String, u32, Option<i64>)>, GroupFailure> {
        let (gid, partition, term) = self.coordinating(group).await?;
        let mut caches = self.shared.groups.offsets.lock().await;
        self.load_offsets(&mut caches, gid, partition, term).await?;
        let cache = caches.entry(partition).or_default();
        let lookup = |topic: &str, p: u32| cache.offsets.get(&(group.to_string(), topic.to_string(), p)).copied();
        Ok(match wanted {
            Some(wanted) => wanted.iter().map(|(t, p)| (t.clone(), *p, lookup(t, *p))).collect(),
            None => cache
                .offsets
                .iter()
                .filter(|((g, _, _), _)| g == group)
                .map(|((_, t, p), o)| (t.clone(), *p, Some(*o)))
                .collect(),
        })
    }

    /// Reads an offsets partition led here into its cache, unless the cache
    /// is of the current term already.
    async fn load_offsets(
        &self,
        caches: &mut std::collections::BTreeMap<u32, OffsetCache>,
        gid: GroupId,
        partition: u32,
        term: u64,
    ) -> Result<(), ServiceError> {
        if caches.get(&partition).is_some_and(|c| c.term == term) {
            return Ok(());
        }
        let mut cache = OffsetCache {
            term,
            ..OffsetCache::default()
        };
        let mut offset = self.offset_range(OFFSETS_TOPIC, partition).await?.0;
        loop {
            let fetched = self.shared.broker.fetch(gid, offset, LOAD_FETCH_BYTES, false).await?;
            let Some(last) = fetched.batches.last() else { break };
            let next = last.next_offset();
            for batch in &fetched.batches {
                read_offsets(batch, offset, &mut cache);
            }
            if next >= fetched.committed_offset || next == offset {
                break;
            }
            offset = next;
        }
        tracing::info!(
            partition,
            offsets = cache.offsets.len(),
            term,
            "loaded committed offsets"
        );
        caches.insert(partition, cache);
        Ok(())
    }
}

fn read_offsets(batch: &runnel_storage::RecordBatch, from: u64, cache: &mut OffsetCache) {
    if batch.is_control() {
        return;
    }
    for view in batch.views().flatten() {
        let Some(key) = view.key.filter(|_| view.offset >= from) else {
            continue;
        };
        match parse_offset(key, view.value) {
            Some((key, Some(offset)))
                if cache.offsets.len() < CACHED_OFFSETS_MAX || cache.offsets.contains_key(&key) =>
            {
                cache.offsets.insert(key, offset);
            }
            Some((key, None)) => {
                cache.offsets.remove(&key);
            }
            _ => {}
        }
    }
}

fn state_name(state: GroupState) -> &'static str {
    match state {
        GroupState::Empty => "Empty",
        GroupState::PreparingRebalance => "PreparingRebalance",
        GroupState::CompletingRebalance => "CompletingRebalance",
        GroupState::Stable => "Stable",
    }
}

impl Shared {
    /// Expires silent members, completes rebalances whose time is up, and
    /// drops the groups whose offsets partition this node no longer leads
    /// (not those whose replica is only slow to say).
    pub(super) async fn tick_groups(&self) {
        let answers = self.groups.core().tick(now_ms());
        self.groups.deliver(answers);
        let mut led = Vec::new();
        let gids: Vec<(u32, GroupId)> = {
            let core = self.core();
            match core.meta().metadata.topics.get(OFFSETS_TOPIC) {
                Some(topic) => (0..topic.config.partitions).map(|p| (p, topic.group_id(p))).collect(),
                None => Vec::new(),
            }
        };
        for (partition, gid) in gids {
            match self.broker.leading_term(gid).await {
                // Groups kept from an earlier term go now, not at the
                // partition's next request.
                Some(Some(term)) => {
                    self.groups
                        .coordinates(partition, term, of_offsets_partition(partition));
                    led.push(partition);
                }
                Some(None) => {}
                // A replica too busy to answer in time keeps its groups:
                // the next tick asks again.
                None => led.push(partition),
            }
        }
        let moved = |group: &str| !led.contains(&partition_for_key(group.as_bytes(), OFFSETS_PARTITIONS));
        let answers = self.groups.core().drop_groups(moved);
        self.groups.deliver(answers);
    }
}

/// The topics a group's members read, as OffsetDelete asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subscribed {
    Topics(BTreeSet<String>),
    /// A subscription that cannot be read: taken to include every topic.
    Every,
}

impl Subscribed {
    fn includes(&self, topic: &str) -> bool {
        match self {
            Subscribed::Topics(topics) => topics.contains(topic),
            Subscribed::Every => true,
        }
    }
}

/// A group's protocol type and each member's protocol metadata (cheap
/// copies: read after the core's lock is let go).
fn member_protocols(group: &Group) -> (String, Vec<Vec<Bytes>>) {
    let metadata = group
        .members
        .values()
        .map(|m| m.protocols.iter().map(|(_, bytes)| bytes.clone()).collect())
        .collect();
    (group.protocol_type.clone(), metadata)
}

/// Whether a group's coordinator is the leader of offsets partition
/// `partition`.
fn of_offsets_partition(partition: u32) -> impl Fn(&str) -> bool {
    move |group| partition_for_key(group.as_bytes(), OFFSETS_PARTITIONS) == partition
}

fn now_ms() -> u64 {
    super::unix_ms().max(0) as u64
}

impl BrokerService {
    /// The client protocol's group requests.
    pub async fn group(&self, request: GroupRequest) -> GroupResponse {
        match self.group_answer(request).await {
            Ok(response) => response,
            Err(failure) => GroupResponse::Error {
                kind: error_kind(&failure),
                message: failure.to_string(),
            },
        }
    }

    async fn group_answer(&self, request: GroupRequest) -> Result<GroupResponse, GroupFailure> {
        Ok(match request {
            GroupRequest::FindCoordinator { group } => GroupResponse::Coordinator(self.find_coordinator(&group).await?),
            join @ GroupRequest::Join { .. } => self.serve_join(join).await?,
            GroupRequest::Sync {
                group,
                generation,
                member_id,
                assignments,
            } => {
                let assignments = assignments
                    .into_iter()
                    .map(|(m, a)| (m, Bytes::from(a.into_vec())))
                    .collect();
                let synced = self.sync_group(&group, generation, &member_id, assignments).await?;
                GroupResponse::Synced {
                    assignment: synced.assignment.to_vec().into(),
                }
            }
            GroupRequest::Heartbeat {
                group,
                generation,
                member_id,
            } => {
                self.heartbeat(&group, generation, &member_id).await?;
                GroupResponse::Done
            }
            GroupRequest::Leave { group, member_id } => {
                let results = self.leave_group(&group, &[(member_id, None)]).await?;
                results.into_iter().next().unwrap_or(Ok(()))?;
                GroupResponse::Done
            }
            GroupRequest::Commit {
                group,
                generation,
                member_id,
                offsets,
            } => {
                let offsets = offsets
                    .into_iter()
                    .map(|(t, p, o)| Ok((t, p, i64::try_from(o)?)))
                    .collect::<Result<Vec<_>, std::num::TryFromIntError>>()
                    .map_err(|_| GroupError::Invalid("an offset past the largest a log can have"))?;
                self.commit_group_offsets(&group, generation, &member_id, &offsets)
                    .await?;
                GroupResponse::Done
            }
            GroupRequest::Offsets { group, topic } => {
                let offsets = self.group_offsets(&group, None).await?;
                let of_topic = |(t, ..): &(String, u32, Option<i64>)| topic.as_ref().is_none_or(|w| w == t);
                // A negative offset a Kafka client committed is none to
                // Runnel's consumers: their reset policy applies.
                let runnel = |(t, p, o): (String, u32, Option<i64>)| (t, p, o.and_then(|o| u64::try_from(o).ok()));
                GroupResponse::Offsets(offsets.into_iter().filter(of_topic).map(runnel).collect())
            }
            GroupRequest::List => GroupResponse::Groups(self.listings()),
            GroupRequest::Describe { group } => {
                let description = self.describe_group(&group).await?;
                GroupResponse::Description(group_info(group, description))
            }
            GroupRequest::Delete { group } => {
                self.delete_group(&group).await?;
                GroupResponse::Done
            }
        })
    }

    /// A client's `GroupRequest::Join`, answered `Joined`.
    async fn serve_join(&self, request: GroupRequest) -> Result<GroupResponse, GroupFailure> {
        let GroupRequest::Join {
            group,
            member_id,
            client_id,
            protocol_type,
            protocols,
            session_timeout_ms,
            rebalance_timeout_ms,
        } = request
        else {
            return Err(GroupError::Invalid("not a join").into());
        };
        let join = Join {
            group,
            member_id,
            client_id,
            client_host: String::new(),
            protocol_type,
            protocols: protocols
                .into_iter()
                .map(|(n, m)| (n, Bytes::from(m.into_vec())))
                .collect(),
            session_timeout_ms,
            rebalance_timeout_ms,
            instance_id: None,
        };
        let joined = self.join_group(join).await?;
        Ok(GroupResponse::Joined {
            generation: joined.generation,
            protocol: joined.protocol,
            leader: joined.leader,
            member_id: joined.member_id,
            members: joined
                .members
                .into_iter()
                .map(|(m, b)| (m, b.to_vec().into()))
                .collect(),
        })
    }

    /// The groups this node coordinates, as the client protocol lists them.
    fn listings(&self) -> Vec<GroupListing> {
        self.list_groups()
            .into_iter()
            .map(|(group, protocol_type, state)| GroupListing {
                group,
                protocol_type,
                state: state.to_string(),
                coordinator: self.node_id(),
            })
            .collect()
    }

    /// Forgets a group without members: its committed offsets are deleted
    /// (tombstones in the offsets partition) and it is no longer listed.
    pub async fn delete_group(&self, group: &str) -> Result<(), GroupFailure> {
        let (gid, partition, term) = self.coordinating(group).await?;
        self.shared.groups.core().remove_empty(group)?;
        let mut caches = self.shared.groups.offsets.lock().await;
        self.load_offsets(&mut caches, gid, partition, term).await?;
        let cache = caches.entry(partition).or_default();
        let forgotten: Vec<(String, u32, Option<i64>)> = cache
            .offsets
            .keys()
            .filter(|(g, ..)| g == group)
            .map(|(_, topic, p)| (topic.clone(), *p, None))
            .collect();
        if forgotten.is_empty() {
            return Ok(());
        }
        self.write_offsets(gid, group, &forgotten, cache).await?;
        Ok(())
    }
}

fn group_info(group: String, d: GroupDescription) -> GroupInfo {
    let members = d
        .members
        .into_iter()
        .map(|(member_id, client_id, client_host, assignment)| GroupMemberInfo {
            member_id,
            client_id,
            client_host,
            assignment: assignment.to_vec(),
        })
        .collect();
    GroupInfo {
        group,
        state: d.state.to_string(),
        protocol_type: d.protocol_type,
        protocol: d.protocol,
        generation: d.generation,
        members,
    }
}

fn error_kind(failure: &GroupFailure) -> GroupErrorKind {
    match failure {
        GroupFailure::NotCoordinator(_) => GroupErrorKind::NotCoordinator,
        GroupFailure::Group(GroupError::UnknownMemberId) => GroupErrorKind::UnknownMember,
        GroupFailure::Group(GroupError::IllegalGeneration) => GroupErrorKind::IllegalGeneration,
        GroupFailure::Group(GroupError::RebalanceInProgress) => GroupErrorKind::RebalanceInProgress,
        GroupFailure::Group(_) => GroupErrorKind::Invalid,
        GroupFailure::Service(ServiceError::UnknownTopic(_) | ServiceError::PartitionOutOfRange { .. }) => {
            GroupErrorKind::Invalid
        }
        GroupFailure::Service(_) => GroupErrorKind::Unavailable,
    }
}
