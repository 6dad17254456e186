//! The consumer-group membership state machine, deterministic: requests
//! and the time in, answers out. Kafka's group protocol: members join, the
//! coordinator waits for every known member to rejoin (or the rebalance
//! timeout), starts a new generation with one member as leader, the leader
//! sends the assignment (computed by the clients, by a protocol they chose),
//! and every member gets its share from SyncGroup. Heartbeats keep members
//! alive; a member silent for its session timeout is removed, which starts
//! a rebalance. Generation ids fence members of an older generation.
//!
//! A join or sync that must wait is parked under a [`Ticket`]; the answer
//! comes out of a later call as an [`Answer`] for that ticket.
//!
//! Static membership (Kafka's `group.instance.id`, KIP-345): a member that
//! names an instance id keeps its place across restarts. Rejoining with an
//! empty member id, it takes over its instance's membership under a new
//! member id — with its assignment, and without a rebalance while the group
//! is stable and its protocols are unchanged — and the old member id is
//! fenced (`FencedInstanceId`). It is removed when it leaves by instance id
//! or goes silent for its session timeout.

use std::collections::BTreeMap;

use bytes::Bytes;

/// Identifies a parked join or sync request.
pub type Ticket = u64;

/// Groups one coordinator holds at most.
pub const GROUPS_MAX: usize = 10_000;
/// Members one group holds at most.
pub const MEMBERS_MAX: usize = 1_000;
/// Member ids handed out and not yet joined with (KIP-394), over every
/// group, at most.
pub const PENDING_MEMBERS_MAX: usize = 10_000;
/// Session timeouts accepted, in milliseconds (Kafka's
/// `group.min/max.session.timeout.ms` are 6 s and 30 min).
pub const SESSION_TIMEOUT_MIN_MS: u64 = 1_000;
pub const SESSION_TIMEOUT_MAX_MS: u64 = 1_800_000;
/// Protocols one member may offer, and bytes of their metadata.
pub const PROTOCOLS_MAX: usize = 32;
pub const METADATA_BYTES_MAX: usize = 1 << 20;

/// Why a group request was refused (each is a Kafka error code).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("unknown member id (it left, timed out, or the coordinator moved): rejoin")]
    UnknownMemberId,
    #[error("the generation id is not the group's current one: rejoin")]
    IllegalGeneration,
    #[error("the group is rebalancing: rejoin")]
    RebalanceInProgress,
    #[error("no protocol (or protocol type) is shared with the group's members")]
    InconsistentGroupProtocol,
    #[error("session timeout outside [{SESSION_TIMEOUT_MIN_MS}, {SESSION_TIMEOUT_MAX_MS}] ms")]
    InvalidSessionTimeout,
    #[error("the group has {MEMBERS_MAX} members already")]
    GroupMaxSizeReached,
    #[error("the coordinator holds {GROUPS_MAX} groups already")]
    TooManyGroups,
    #[error("the group still has members; it can be deleted once they have left")]
    NonEmptyGroup,
    #[error("the request is invalid: {0}")]
    Invalid(&'static str),
    #[error("another member took over this group.instance.id: this one is fenced")]
    FencedInstanceId,
    #[error("no such group: it has no members and no committed offsets")]
    GroupIdNotFound,
}

/// A member's JoinGroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Join {
    pub group: String,
    /// Empty for a new member: the coordinator names it.
    pub member_id: String,
    pub client_id: String,
    pub client_host: String,
    pub protocol_type: String,
    /// (protocol name, its metadata), in the member's order of preference.
    pub protocols: Vec<(String, Bytes)>,
    pub session_timeout_ms: u64,
    pub rebalance_timeout_ms: u64,
    /// `group.instance.id`: a static member's lasting name.
    pub instance_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    pub generation: i32,
    pub protocol_type: String,
    pub protocol: String,
    pub leader: String,
    pub member_id: String,
    /// Every member and its metadata for the chosen protocol, for the
    /// leader only (it computes the assignment).
    pub members: Vec<(String, Bytes)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Synced {
    pub protocol_type: String,
    pub protocol: String,
    pub assignment: Bytes,
}

/// The answer to a parked request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Join(Ticket, Result<Joined, GroupError>),
    Sync(Ticket, Result<Synced, GroupError>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: u64,
    pub rebalance_timeout_ms: u64,
    pub protocols: Vec<(String, Bytes)>,
    pub assignment: Bytes,
    /// A static member's `group.instance.id`.
    pub instance_id: Option<String>,
    last_seen_ms: u64,
}

#[derive(Clone, Debug)]
pub struct Group {
    pub state: GroupState,
    pub generation: i32,
    pub protocol_type: String,
    pub protocol: String,
    pub leader: String,
    pub members: BTreeMap<String, Member>,
    /// Static members: instance id → its current member id.
    instances: BTreeMap<String, String>,
    joins: BTreeMap<String, Ticket>,
    syncs: BTreeMap<String, Ticket>,
    rebalance_deadline_ms: u64,
}

impl Group {
    fn new() -> Group {
        Group {
            state: GroupState::Empty,
            generation: 0,
            protocol_type: String::new(),
            protocol: String::new(),
            leader: String::new(),
            members: BTreeMap::new(),
            instances: BTreeMap::new(),
            joins: BTreeMap::new(),
            syncs: BTreeMap::new(),
            rebalance_deadline_ms: 0,
        }
    }
}

/// Every group one coordinator serves.
#[derive(Debug)]
pub struct GroupsCore {
    groups: BTreeMap<String, Group>,
    /// Makes member ids unique to this coordinator's life, so members of a
    /// coordinator that moved are unknown here and rejoin.
    nonce: u64,
    next_member: u64,
    /// Member ids handed out to joins without one (KIP-394: a Kafka
    /// JoinGroup v4+ is answered MEMBER_ID_REQUIRED with an id), by group
    /// and id, with when each expires (its session timeout) and the
    /// order it was handed out in: the member is admitted only when it
    /// joins again with the id, so a join whose client gave up leaves no
    /// member behind to be assigned partitions.
    pending: BTreeMap<(String, String), Pending>,
    /// The Raft term in which each offsets partition's groups were last
    /// coordinated here.
    terms: BTreeMap<u32, u64>,
}

/// A member id handed out and not yet joined with.
#[derive(Clone, Copy, Debug)]
struct Pending {
    expires_ms: u64,
    /// Larger for a later id.
    order: u64,
}

impl GroupsCore {
    pub fn new(nonce: u64) -> GroupsCore {
        GroupsCore {
            groups: BTreeMap::new(),
            nonce,
            next_member: 0,
            pending: BTreeMap::new(),
            terms: BTreeMap::new(),
        }
    }

    /// Notes that this node coordinates offsets partition `partition` in
    /// Raft term `term`; `false` for a term older than one already seen (a
    /// late answer: not the coordinator as far as it knows). The groups
    /// `of_partition` names, kept from an earlier term, are dropped first:
    /// another node may have coordinated them in between (a leadership
    /// that went and came back while this node was too slow to say), so
    /// their members rejoin, as after a move, rather than meet a stale
    /// generation or instance. Answers to their parked requests go in
    /// `answers`.
    pub fn coordinates(
        &mut self,
        partition: u32,
        term: u64,
        of_partition: impl Fn(&str) -> bool,
        answers: &mut Vec<Answer>,
    ) -> bool {
        let known = self.terms.get(&partition).copied();
        if known.is_some_and(|known| term < known) {
            return false;
        }
        self.terms.insert(partition, term);
        if known.is_some_and(|known| term > known) {
            answers.extend(self.drop_groups(of_partition));
        }
        true
    }

    /// A member id for a join that came without one (KIP-394), kept until
    /// the member joins with it or its session timeout passes.
    ///
    /// Ids handed out count with the group's members against
    /// [`MEMBERS_MAX`]. Past [`PENDING_MEMBERS_MAX`] over every group, the
    /// oldest id is forgotten (its member, if it comes back, is unknown and
    /// asks again), so a client looping on joins, whatever its session
    /// timeout, pushes out its own ids before a member's that just asked.
    pub fn member_id_for(&mut self, join: &Join, now_ms: u64) -> Result<String, GroupError> {
        check_join(join)?;
        self.pending.retain(|_, p| p.expires_ms >= now_ms);
        let members = self.groups.get(&join.group).map_or(0, |g| g.members.len());
        let first = (join.group.clone(), String::new());
        let pending = self
            .pending
            .range(first..)
            .take_while(|((g, _), _)| *g == join.group)
            .count();
        if members + pending >= MEMBERS_MAX {
            return Err(GroupError::GroupMaxSizeReached);
        }
        if self.pending.len() >= PENDING_MEMBERS_MAX {
            let oldest = self.pending.iter().min_by_key(|(_, p)| p.order);
            if let Some(key) = oldest.map(|(key, _)| key.clone()) {
                self.pending.remove(&key);
            }
        }
        let member_id = self.new_member_id(&join.client_id);
        let pending = Pending {
            expires_ms: now_ms.saturating_add(join.session_timeout_ms),
            order: self.next_member,
        };
        self.pending.insert((join.group.clone(), member_id.clone()), pending);
        Ok(member_id)
    }

    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.get(name)
    }

    pub fn groups(&self) -> impl Iterator<Item = (&String, &Group)> {
        self.groups.iter()
    }

    /// A JoinGroup: answered at once when refused, else parked until the
    /// rebalance completes (which this call may do).
    pub fn join(&mut self, join: Join, ticket: Ticket, now_ms: u64) -> Result<Vec<Answer>, GroupError> {
        check_join(&join)?;
        if !self.groups.contains_key(&join.group) && self.groups.len() >= GROUPS_MAX {
            return Err(GroupError::TooManyGroups);
        }
        let member_id = match join.member_id.is_empty() {
            true => self.new_member_id(&join.client_id),
            false => join.member_id.clone(),
        };
        let group = self.groups.entry(join.group.clone()).or_insert_with(Group::new);
        let current = join.instance_id.as_ref().and_then(|i| group.instances.get(i)).cloned();
        if let Some(current) = current {
            if join.member_id.is_empty() {
                admit(group, &join, &current, false)?;
                return Ok(rejoin_static(group, join, &current, member_id, ticket, now_ms));
            }
            if current != join.member_id {
                return Err(GroupError::FencedInstanceId);
            }
        }
        let pending = (join.group.clone(), member_id.clone());
        let handed_out = self.pending.get(&pending).is_some_and(|p| p.expires_ms >= now_ms);
        admit(group, &join, &member_id, handed_out)?;
        self.pending.remove(&pending);
        // A member names one instance at most: the one it joins with now.
        group.instances.retain(|_, member| *member != member_id);
        if let Some(instance) = &join.instance_id {
            group.instances.insert(instance.clone(), member_id.clone());
        }
        group.protocol_type = join.protocol_type.clone();
        group
            .members
            .insert(member_id.clone(), member_of(join, Bytes::new(), now_ms));
        Ok(park_join(group, member_id, ticket, now_ms))
    }

    /// Whether `member_id` may act for static member `instance_id` (any
    /// member may when it names none): a member whose instance was taken
    /// over by a newer member is fenced.
    pub fn check_instance(&self, group: &str, instance_id: Option<&str>, member_id: &str) -> Result<(), GroupError> {
        let Some(instance) = instance_id else { return Ok(()) };
        match self.groups.get(group).and_then(|g| g.instances.get(instance)) {
            Some(current) if current != member_id => Err(GroupError::FencedInstanceId),
            _ => Ok(()),
        }
    }

    fn new_member_id(&mut self, client_id: &str) -> String {
        self.next_member += 1;
        let client: String = client_id.chars().filter(|c| c.is_ascii_graphic()).take(64).collect();
        format!("{client}-{:x}-{}", self.nonce, self.next_member)
    }

    /// A SyncGroup: the leader's carries the assignment.
    pub fn sync(
        &mut self,
        group_name: &str,
        generation: i32,
        member_id: &str,
        assignments: Vec<(String, Bytes)>,
        ticket: Ticket,
        now_ms: u64,
    ) -> Result<Vec<Answer>, GroupError> {
        let group = self.groups.get_mut(group_name).ok_or(GroupError::UnknownMemberId)?;
        let member = group.members.get_mut(member_id).ok_or(GroupError::UnknownMemberId)?;
        member.last_seen_ms = now_ms;
        if generation != group.generation {
            return Err(GroupError::IllegalGeneration);
        }
        match group.state {
            GroupState::Empty => Err(GroupError::UnknownMemberId),
            GroupState::PreparingRebalance => Err(GroupError::RebalanceInProgress),
            GroupState::Stable => Ok(vec![Answer::Sync(ticket, Ok(synced(group, member_id)))]),
            GroupState::CompletingRebalance => {
                group.syncs.insert(member_id.to_string(), ticket);
                if member_id == group.leader {
                    for (member, assignment) in assignments {
                        if let Some(m) = group.members.get_mut(&member) {
                            m.assignment = assignment;
                        }
                    }
                    group.state = GroupState::Stable;
                    return Ok(answer_syncs(group));
                }
                Ok(Vec::new())
            }
        }
    }

    /// A Heartbeat: whether the member is current and the group stable.
    pub fn heartbeat(&mut self, group: &str, generation: i32, member_id: &str, now_ms: u64) -> Result<(), GroupError> {
        let group = self.groups.get_mut(group).ok_or(GroupError::UnknownMemberId)?;
        let member = group.members.get_mut(member_id).ok_or(GroupError::UnknownMemberId)?;
        member.last_seen_ms = now_ms;
        if generation != group.generation {
            return Err(GroupError::IllegalGeneration);
        }
        match group.state {
            GroupState::PreparingRebalance => Err(GroupError::RebalanceInProgress),
            _ => Ok(()),
        }
    }

    /// Checks a member may commit offsets for `generation` (a negative
    /// generation: a consumer outside group management, allowed while the
    /// group has no members, as Kafka does).
    pub fn check_commit(&self, group: &str, generation: i32, member_id: &str) -> Result<(), GroupError> {
        let Some(group) = self.groups.get(group) else {
            return match generation < 0 {
                true => Ok(()),
                false => Err(GroupError::IllegalGeneration),
            };
        };
        if generation < 0 {
            return match group.members.is_empty() {
                true => Ok(()),
                false => Err(GroupError::RebalanceInProgress),
            };
        }
        if !group.members.contains_key(member_id) {
            return Err(GroupError::UnknownMemberId);
        }
        if generation != group.generation {
            return Err(GroupError::IllegalGeneration);
        }
        // As Kafka's coordinator: a member of the current generation may
        // commit while the group prepares a rebalance (an eager consumer
        // commits what it delivered as it revokes its partitions), not
        // while the new assignment is being handed out.
        match group.state {
            GroupState::Stable | GroupState::PreparingRebalance => Ok(()),
            _ => Err(GroupError::RebalanceInProgress),
        }
    }

    /// A LeaveGroup: the members go, the rest rebalance. Each leaver is a
    /// member id and maybe an instance id (a static member may be named by
    /// its instance id alone). Each member's outcome, and the answers to
    /// parked requests it settles.
    pub fn leave(
        &mut self,
        group_name: &str,
        leavers: &[(String, Option<String>)],
        now_ms: u64,
    ) -> (Vec<Result<(), GroupError>>, Vec<Answer>) {
        let Some(group) = self.groups.get_mut(group_name) else {
            return (
                leavers.iter().map(|_| Err(GroupError::UnknownMemberId)).collect(),
                Vec::new(),
            );
        };
        let mut results = Vec::new();
        let mut gone = Vec::new();
        for (member_id, instance_id) in leavers {
            let member = match leaving_member(group, member_id, instance_id.as_deref()) {
                Ok(member) => member,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let known = group.members.remove(&member).is_some();
            results.push(if known {
                Ok(())
            } else {
                Err(GroupError::UnknownMemberId)
            });
            if known {
                gone.push(member);
            }
        }
        forget_instances(group);
        let mut answers = Vec::new();
        if !gone.is_empty() {
            answers.extend(remove_done(group, &gone));
            answers.extend(rebalance_after_loss(group, now_ms));
        }
        (results, answers)
    }

    /// Expires silent members and completes rebalances whose time is up.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Answer> {
        self.pending.retain(|_, p| p.expires_ms >= now_ms);
        let mut answers = Vec::new();
        for group in self.groups.values_mut() {
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(id, m)| {
                    !group.joins.contains_key(*id)
                        && !group.syncs.contains_key(*id)
                        && now_ms > m.last_seen_ms + m.session_timeout_ms
                })
                .map(|(id, _)| id.clone())
                .collect();
            if !expired.is_empty() {
                for id in &expired {
                    group.members.remove(id);
                }
                forget_instances(group);
                answers.extend(remove_done(group, &expired));
                answers.extend(rebalance_after_loss(group, now_ms));
            }
            if group.state == GroupState::PreparingRebalance {
                answers.extend(try_complete_join(group, now_ms));
            }
        }
        self.groups
            .retain(|_, g| !(g.state == GroupState::Empty && g.members.is_empty() && g.joins.is_empty()));
        answers
    }

    /// Drops the groups `moved` names (their coordinator is elsewhere now);
    /// parked requests are answered `UnknownMemberId`, so their members find
    /// the new coordinator and rejoin there.
    pub fn drop_groups(&mut self, moved: impl Fn(&str) -> bool) -> Vec<Answer> {
        self.pending.retain(|(group, _), _| !moved(group));
        let names: Vec<String> = self.groups.keys().filter(|g| moved(g)).cloned().collect();
        let mut answers = Vec::new();
        for group in names.iter().filter_map(|n| self.groups.remove(n)) {
            answers.extend(
                group
                    .joins
                    .values()
                    .map(|t| Answer::Join(*t, Err(GroupError::UnknownMemberId))),
            );
            answers.extend(
                group
                    .syncs
                    .values()
                    .map(|t| Answer::Sync(*t, Err(GroupError::UnknownMemberId))),
            );
        }
        answers
    }

    /// Removes a group with no members (`runnel group delete`, Kafka's
    /// DeleteGroups); refused while members are in it.
    pub fn remove_empty(&mut self, group: &str) -> Result<(), GroupError> {
        match self.groups.get(group) {
            Some(g) if !g.members.is_empty() => Err(GroupError::NonEmptyGroup),
            _ => {
                self.groups.remove(group);
                Ok(())
            }
        }
    }
}

fn check_join(join: &Join) -> Result<(), GroupError> {
    if !(SESSION_TIMEOUT_MIN_MS..=SESSION_TIMEOUT_MAX_MS).contains(&join.session_timeout_ms) {
        return Err(GroupError::InvalidSessionTimeout);
    }
    if join.group.is_empty() {
        return Err(GroupError::Invalid("an empty group id"));
    }
    if join.protocols.is_empty() || join.protocol_type.is_empty() {
        return Err(GroupError::InconsistentGroupProtocol);
    }
    let metadata: usize = join.protocols.iter().map(|(_, m)| m.len()).sum();
    if join.protocols.len() > PROTOCOLS_MAX || metadata > METADATA_BYTES_MAX {
        return Err(GroupError::Invalid("too many protocols or too much protocol metadata"));
    }
    Ok(())
}

/// Whether `join` may enter `group` as `member_id`: a member it has, a new
/// one (no id given, or an id `handed_out` by [`GroupsCore::member_id_for`])
/// while there is room, of a protocol every other member shares.
fn admit(group: &Group, join: &Join, member_id: &str, handed_out: bool) -> Result<(), GroupError> {
    let known = group.members.contains_key(member_id);
    if !join.member_id.is_empty() && !known && !handed_out {
        return Err(GroupError::UnknownMemberId);
    }
    if !known && group.members.len() >= MEMBERS_MAX {
        return Err(GroupError::GroupMaxSizeReached);
    }
    let others: Vec<&Member> = group
        .members
        .iter()
        .filter(|(id, _)| *id != member_id)
        .map(|(_, m)| m)
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    if group.protocol_type != join.protocol_type {
        return Err(GroupError::InconsistentGroupProtocol);
    }
    let shared = join
        .protocols
        .iter()
        .any(|(name, _)| others.iter().all(|m| m.protocols.iter().any(|(n, _)| n == name)));
    match shared {
        true => Ok(()),
        false => Err(GroupError::InconsistentGroupProtocol),
    }
}

/// A member as its join describes it.
fn member_of(join: Join, assignment: Bytes, now_ms: u64) -> Member {
    Member {
        client_id: join.client_id,
        client_host: join.client_host,
        session_timeout_ms: join.session_timeout_ms,
        rebalance_timeout_ms: join.rebalance_timeout_ms,
        protocols: join.protocols,
        assignment,
        instance_id: join.instance_id,
        last_seen_ms: now_ms,
    }
}

/// Parks `member_id`'s join and moves the rebalance on.
fn park_join(group: &mut Group, member_id: String, ticket: Ticket, now_ms: u64) -> Vec<Answer> {
    let mut answers = Vec::new();
    if let Some(old) = group.joins.insert(member_id, ticket) {
        answers.push(Answer::Join(old, Err(GroupError::RebalanceInProgress)));
    }
    if group.state != GroupState::PreparingRebalance {
        answers.extend(prepare_rebalance(group, now_ms));
    }
    answers.extend(try_complete_join(group, now_ms));
    answers
}

/// A static member rejoining without its member id (it restarted): it
/// replaces `current`, its instance's member, under `new_id`, keeping its
/// assignment and its place as leader; `current`'s parked requests are
/// fenced. A stable group whose chosen protocol's metadata this member
/// still sends answers at once, in the current generation; otherwise the
/// group rebalances.
fn rejoin_static(
    group: &mut Group,
    join: Join,
    current: &str,
    new_id: String,
    ticket: Ticket,
    now_ms: u64,
) -> Vec<Answer> {
    let mut answers = Vec::new();
    if let Some(t) = group.joins.remove(current) {
        answers.push(Answer::Join(t, Err(GroupError::FencedInstanceId)));
    }
    if let Some(t) = group.syncs.remove(current) {
        answers.push(Answer::Sync(t, Err(GroupError::FencedInstanceId)));
    }
    let old = group.members.remove(current);
    let unchanged = old.as_ref().is_some_and(|m| {
        protocol_metadata(m, &group.protocol) == protocol_metadata_of(&join.protocols, &group.protocol)
    });
    let assignment = old.map(|m| m.assignment).unwrap_or_default();
    if let Some(instance) = &join.instance_id {
        group.instances.insert(instance.clone(), new_id.clone());
    }
    if group.leader == current {
        group.leader = new_id.clone();
    }
    group
        .members
        .insert(new_id.clone(), member_of(join, assignment, now_ms));
    if group.state == GroupState::Stable && unchanged {
        let members = match group.leader == new_id {
            true => leader_view(group),
            false => Vec::new(),
        };
        let joined = Joined {
            generation: group.generation,
            protocol_type: group.protocol_type.clone(),
            protocol: group.protocol.clone(),
            leader: group.leader.clone(),
            member_id: new_id,
            members,
        };
        answers.push(Answer::Join(ticket, Ok(joined)));
        return answers;
    }
    answers.extend(park_join(group, new_id, ticket, now_ms));
    answers
}

/// The member a LeaveGroup entry names: by member id, or by instance id
/// (fenced when both are given and the instance is another member's).
fn leaving_member(group: &Group, member_id: &str, instance_id: Option<&str>) -> Result<String, GroupError> {
    let Some(instance) = instance_id else {
        return Ok(member_id.to_string());
    };
    match group.instances.get(instance) {
        None => Err(GroupError::UnknownMemberId),
        Some(current) if !member_id.is_empty() && current != member_id => Err(GroupError::FencedInstanceId),
        Some(current) => Ok(current.clone()),
    }
}

/// Drops instance ids whose member is gone.
fn forget_instances(group: &mut Group) {
    let members = &group.members;
    group.instances.retain(|_, member| members.contains_key(member));
}

/// Every member and its metadata for the chosen protocol: what the leader
/// computes the assignment from.
fn leader_view(group: &Group) -> Vec<(String, Bytes)> {
    group
        .members
        .iter()
        .map(|(id, m)| (id.clone(), protocol_metadata(m, &group.protocol)))
        .collect()
}

/// Starts a rebalance: parked syncs are told to rejoin.
fn prepare_rebalance(group: &mut Group, now_ms: u64) -> Vec<Answer> {
    group.state = GroupState::PreparingRebalance;
    let timeout = group
        .members
        .values()
        .map(|m| m.rebalance_timeout_ms)
        .max()
        .unwrap_or(0);
    group.rebalance_deadline_ms = now_ms + timeout.clamp(SESSION_TIMEOUT_MIN_MS, SESSION_TIMEOUT_MAX_MS);
    std::mem::take(&mut group.syncs)
        .into_values()
        .map(|t| Answer::Sync(t, Err(GroupError::RebalanceInProgress)))
        .collect()
}

/// After members left or expired: rebalance the rest, or empty the group.
fn rebalance_after_loss(group: &mut Group, now_ms: u64) -> Vec<Answer> {
    if group.members.is_empty() {
        group.state = GroupState::Empty;
        group.generation += 1;
        group.leader.clear();
        let mut answers: Vec<Answer> = std::mem::take(&mut group.syncs)
            .into_values()
            .map(|t| Answer::Sync(t, Err(GroupError::UnknownMemberId)))
            .collect();
        answers.extend(
            std::mem::take(&mut group.joins)
                .into_values()
                .map(|t| Answer::Join(t, Err(GroupError::UnknownMemberId))),
        );
        return answers;
    }
    let mut answers = Vec::new();
    if group.state != GroupState::PreparingRebalance {
        answers.extend(prepare_rebalance(group, now_ms));
    }
    answers.extend(try_complete_join(group, now_ms));
    answers
}

/// Answers the parked requests of members that are gone.
fn remove_done(group: &mut Group, gone: &[String]) -> Vec<Answer> {
    let mut answers = Vec::new();
    for id in gone {
        if let Some(t) = group.joins.remove(id) {
            answers.push(Answer::Join(t, Err(GroupError::UnknownMemberId)));
        }
        if let Some(t) = group.syncs.remove(id) {
            answers.push(Answer::Sync(t, Err(GroupError::UnknownMemberId)));
        }
    }
    answers
}

/// Completes the join phase once every member rejoined or time is up:
/// dynamic members that did not rejoin are dropped (static ones stay), the
/// generation advances, a protocol every member offers is chosen, a member
/// that rejoined leads, and every parked join answered.
fn try_complete_join(group: &mut Group, now_ms: u64) -> Vec<Answer> {
    let all_joined = group.members.keys().all(|id| group.joins.contains_key(id));
    if !all_joined && now_ms < group.rebalance_deadline_ms {
        return Vec::new();
    }
    let joined: Vec<String> = group.joins.keys().cloned().collect();
    // A static member that did not rejoin keeps its place (as in Kafka): it
    // may be restarting, and goes only when its session times out.
    group
        .members
        .retain(|id, m| group.joins.contains_key(id) || m.instance_id.is_some());
    forget_instances(group);
    if group.members.is_empty() {
        group.state = GroupState::Empty;
        return Vec::new();
    }
    let Some(first_joined) = joined.first() else {
        // Only static members that have not rejoined: wait for one, or for
        // their sessions to time out (`GroupsCore::tick`).
        return Vec::new();
    };
    group.generation += 1;
    group.protocol = choose_protocol(group);
    if !group.joins.contains_key(&group.leader) {
        // The leader computes the assignment: one that rejoined.
        group.leader = first_joined.clone();
    }
    group.state = GroupState::CompletingRebalance;
    let members = leader_view(group);
    let mut answers = Vec::new();
    for (member_id, ticket) in std::mem::take(&mut group.joins) {
        if let Some(m) = group.members.get_mut(&member_id) {
            m.last_seen_ms = now_ms;
        }
        let joined = Joined {
            generation: group.generation,
            protocol_type: group.protocol_type.clone(),
            protocol: group.protocol.clone(),
            leader: group.leader.clone(),
            members: if member_id == group.leader {
                members.clone()
            } else {
                Vec::new()
            },
            member_id,
        };
        answers.push(Answer::Join(ticket, Ok(joined)));
    }
    answers
}

/// The leader's most preferred protocol that every member offers (the
/// leader is the first member when none is chosen yet).
fn choose_protocol(group: &Group) -> String {
    let first = group
        .members
        .get(&group.leader)
        .or_else(|| group.members.values().next());
    let candidates = first.map(|m| m.protocols.clone()).unwrap_or_default();
    candidates
        .into_iter()
        .map(|(name, _)| name)
        .find(|name| {
            group
                .members
                .values()
                .all(|m| m.protocols.iter().any(|(n, _)| n == name))
        })
        .unwrap_or_default()
}

fn protocol_metadata(member: &Member, protocol: &str) -> Bytes {
    protocol_metadata_of(&member.protocols, protocol)
}

fn protocol_metadata_of(protocols: &[(String, Bytes)], protocol: &str) -> Bytes {
    protocols
        .iter()
        .find(|(n, _)| n == protocol)
        .map(|(_, m)| m.clone())
        .unwrap_or_default()
}

fn synced(group: &Group, member_id: &str) -> Synced {
    Synced {
        protocol_type: group.protocol_type.clone(),
        protocol: group.protocol.clone(),
        assignment: group
            .members
            .get(member_id)
            .map(|m| m.assignment.clone())
            .unwrap_or_default(),
    }
}

fn answer_syncs(group: &mut Group) -> Vec<Answer> {
    let syncs = std::mem::take(&mut group.syncs);
    syncs
        .into_iter()
        .map(|(member, ticket)| Answer::Sync(ticket, Ok(synced(group, &member))))
        .collect()
}

#[cfg(test)]
mod tests;
