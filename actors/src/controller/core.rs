//! The controller's decisions on one node, as a deterministic state machine.
//!
//! [`ControllerCore`] does no I/O and never waits: the shell around it (the
//! tokio tasks in [`super`], or the deterministic simulation) feeds it what
//! happened — controller-log batches, its local replicas' configurations,
//! membership, answers from peers — and carries out the [`Command`]s it
//! returns (host or stop a replica, reconfigure a group, delete stale files)
//! and the [`MetadataCommand`]s it proposes. Both shells drive this same
//! code, so a decision the simulation checks is the decision a node makes.
//!
//! What one node decides:
//! - **Hosting** ([`ControllerCore::reconcile`]): a replica of every
//!   partition assigned here; the founding replica of a group moved off
//!   before this node ever hosted it; replicas no longer assigned stop once
//!   their group no longer counts them ([`ControllerCore::on_unassigned`]).
//! - **Settling** ([`ControllerCore::settle_targets`],
//!   [`ControllerCore::on_settle_status`]): each local group whose voters
//!   differ from its assignment is nudged towards it every heal interval,
//!   and every group is looked at again every 10 s; the nudge acts where the
//!   local replica leads, so a reconfiguration finishes whichever leader
//!   started it.
//! - **Stale files** ([`ControllerCore::stale_candidates`],
//!   [`ControllerCore::on_stale_answer`]): files of a replica no assignment
//!   names are deleted only once this node's metadata has reached the
//!   controller leader's commit point and the group's leader confirms the
//!   replica was removed.
//! - **Healing**, on the controller leader ([`ControllerCore::heal`],
//!   [`ControllerCore::replace_failed`]): a dead node's replicas and tasks,
//!   and failed replicas, move to live nodes.
//! - **Admin**, on the controller leader: topic creation and deletion,
//!   dataflow placement, rebalancing — validated and placed here, committed
//!   by the shell.

use std::collections::{BTreeMap, BTreeSet};

use runnel_storage::{CompactionPolicy, RecordBatch};

use crate::metadata::{
    pick_replacement, place, place_tasks, validate_topic_name, AppliedMetadata, DataflowMeta, GroupId, MetadataCommand,
    MetadataError, MetadataLogError, NodeId, Plan, SqlObject, TopicConfig, CONTROLLER_GROUP,
};
use crate::tasks::{dataflow_topics, DataflowShape, TaskAssignment};

/// Every hosted group, settled or not, is compared with its assignment this
/// often (see [`ControllerCore::settle_targets`]).
const FULL_SETTLE_INTERVAL_MS: u64 = 10_000;
/// Replica moves one rebalance proposes at most.
const REBALANCE_MOVES_MAX: usize = 1000;
/// How often each node asks the partitions it leads to hand leadership to
/// their preferred replicas (Kafka checks every 5 minutes by default; a
/// returning node here gets its share back within seconds).
pub const PREFER_INTERVAL_MS: u64 = 5_000;

/// How one node's controller core behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreConfig {
    /// This node's id.
    pub me: NodeId,
    /// A node dead this long has its replicas and tasks re-created elsewhere.
    pub replace_after_ms: u64,
    /// Hosting is reconciled when the metadata changes or this often; the
    /// healing duties (settling, stale files, dead nodes) run this often.
    pub heal_interval_ms: u64,
    /// Commands committed before this time (ms since the epoch; the node's
    /// start) are logged at debug when applied: a restart replays them.
    pub quiet_before_ms: i64,
}

/// How this node's membership sees one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub node: NodeId,
    pub liveness: Liveness,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Missed heartbeats, not declared dead yet: neither alive for placement
    /// nor dead for healing.
    Suspect,
    /// Dead since this time (the shell's clock, milliseconds).
    Dead {
        since_ms: u64,
    },
}

/// A local replica's view of its group's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupView {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

impl GroupView {
    /// Whether the group counts `node`, as a voter or a learner.
    pub fn counts(&self, node: NodeId) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }

    /// Whether the voters are exactly `assigned` and no learner is left.
    pub fn matches(&self, assigned: &[NodeId]) -> bool {
        let mut voters = self.voters.clone();
        voters.sort_unstable();
        let mut want = assigned.to_vec();
        want.sort_unstable();
        voters == want && self.learners.is_empty()
    }
}

/// What the shell carries out for the core on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Run a replica of `group` here (founders' configuration, or `None` to
    /// reopen what is on disk), then report with [`ControllerCore::on_hosted`].
    Host {
        group: GroupId,
        founders: Option<Vec<NodeId>>,
        rejoin: bool,
    },
    /// Stop the local replica of `group`; its files stay. Already counted.
    Unhost { group: GroupId },
    /// Ask the local replica of `group`, if it leads, to move the group's
    /// voters one step towards `voters`.
    Reconfigure { group: GroupId, voters: Vec<NodeId> },
    /// Delete the files of a stale replica, leaving a tombstone.
    DeleteFiles { group: GroupId },
    /// Ask the local replica of `group`, if it leads, to hand leadership to
    /// `node`, the group's preferred replica, once that one has caught up.
    PreferLeader { group: GroupId, node: NodeId },
    /// Ask the local replica of `group` to delete its closed segments whose
    /// newest record is older than `retention_ms` (the topic's setting).
    Retain { group: GroupId, retention_ms: u64 },
    /// Ask the local replica of `group` to compact its log (the topic's
    /// `cleanup.policy` compacts) by the topic's `policy`.
    Compact { group: GroupId, policy: CompactionPolicy },
}

/// What a node does next about its damaged replica of a group (see
/// [`ControllerCore::on_damaged_status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairStep {
    /// No leader elsewhere confirms the group goes on without this replica:
    /// its files may hold the last copy of committed data, so they stay.
    Keep,
    /// The group's leader still counts this node, as a voter or a learner:
    /// ask it to remove it first, which also drops its record of what the
    /// replica held (else the rebuilt replica would be told to commit
    /// entries it lacks).
    AskRemoval { leader: NodeId },
    /// The leader no longer counts it at all: move the files aside; the
    /// replica is hosted again empty and rejoins as a learner.
    Quarantine,
}

/// Heal intervals a node removed for damage stays out of settling.
pub const DAMAGED_HOLD_HEALS: u64 = 4;
/// Damaged removals a leader holds back at once.
const DAMAGED_HELD_MAX: usize = 1024;

/// Which duties are due at a step (see [`ControllerCore::due`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Reconcile hosting: the metadata changed, or the heal interval passed.
    pub reconcile: bool,
    /// Settle groups, heal, report failed replicas, collect stale files.
    pub heal: bool,
    /// Hand leadership back to preferred replicas ([`ControllerCore::preferred_leaders`]).
    pub prefer: bool,
}

/// A stale replica directory to ask about: delete it only if the group's
/// leader, found among `ask`, confirms this node left the group. With no
/// one to ask (its topic is gone), it is removed at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleCheck {
    pub group: GroupId,
    pub ask: Option<Vec<NodeId>>,
}

/// One node's controller state and decisions. See the module docs.
#[derive(Debug)]
pub struct ControllerCore {
    config: CoreConfig,
    meta: AppliedMetadata,
    /// Groups this node hosts because the metadata (or a stale check) asked.
    hosted: BTreeSet<GroupId>,
    /// Groups this node stopped hosting since it started (it left them): never
    /// reopened as possibly needed voters — only replicas found on disk
    /// after a restart are.
    closed: BTreeSet<GroupId>,
    /// The task assignment last handed to the dataflow runtime.
    assigned_tasks: (Vec<TaskAssignment>, BTreeMap<String, Plan>),
    /// Hosted groups last seen with voters equal to this assignment.
    seen_settled: BTreeMap<GroupId, Vec<NodeId>>,
    /// Leader only: nodes removed from a group because their replica's files
    /// are damaged, left out of settling until the time here, so that the
    /// damaged node sees itself removed and moves its files aside before it
    /// is added back (see [`ControllerCore::voters_without_damaged`]).
    damaged_held: BTreeMap<(GroupId, NodeId), u64>,
    last_full_settle_ms: Option<u64>,
    /// The applied offset hosting was last reconciled at.
    reconciled_at: Option<u64>,
    last_heal_ms: Option<u64>,
    /// When preferred leaders were last asked for (see [`PREFER_INTERVAL_MS`]).
    last_prefer_ms: Option<u64>,
    /// Damaged replicas kept as they are, already said (see [`ControllerCore::on_kept`]).
    kept: BTreeSet<GroupId>,
}

impl ControllerCore {
    pub fn new(config: CoreConfig) -> ControllerCore {
        let meta = AppliedMetadata {
            quiet_before_ms: config.quiet_before_ms,
            ..AppliedMetadata::default()
        };
        ControllerCore {
            config,
            meta,
            hosted: BTreeSet::new(),
            closed: BTreeSet::new(),
            assigned_tasks: (Vec::new(), BTreeMap::new()),
            seen_settled: BTreeMap::new(),
            damaged_held: BTreeMap::new(),
            last_full_settle_ms: None,
            reconciled_at: None,
            last_heal_ms: None,
            last_prefer_ms: None,
            kept: BTreeSet::new(),
        }
    }

    pub fn me(&self) -> NodeId {
        self.config.me
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// The metadata as applied here.
    pub fn meta(&self) -> &AppliedMetadata {
        &self.meta
    }

    /// Applies one committed controller-log batch (ones already applied are
    /// skipped).
    pub fn apply_batch(&mut self, batch: &RecordBatch) -> Result<(), MetadataLogError> {
        self.meta.apply_batch(batch)
    }

    /// Which duties are due at `now_ms`; marks them done.
    pub fn due(&mut self, now_ms: u64) -> Due {
        let heal = self
            .last_heal_ms
            .is_none_or(|last| now_ms >= last + self.config.heal_interval_ms);
        let applied = self.meta.applied_offset;
        let reconcile = heal || self.reconciled_at != Some(applied);
        if reconcile {
            self.reconciled_at = Some(applied);
        }
        if heal {
            self.last_heal_ms = Some(now_ms);
        }
        let prefer = self
            .last_prefer_ms
            .is_none_or(|last| now_ms >= last + PREFER_INTERVAL_MS);
        if prefer {
            self.last_prefer_ms = Some(now_ms);
        }
        Due {
            reconcile,
            heal,
            prefer,
        }
    }

    /// Kafka's preferred-leader election: for every partition replicated
    /// here whose preferred replica (the first of its assignment, which
    /// placement spreads over the nodes) is another live node, ask the local
    /// replica to hand leadership to it. Only a leader acts, and only once
    /// the preferred replica has caught up, so after a node returns its
    /// partitions come back to it and leaders spread evenly again.
    ///
    /// The consumer-offsets partitions keep their leaders: each leader is
    /// the coordinator of its groups, whose membership lives in its memory
    /// only, so moving it would cost every one of those groups a rebalance
    /// and its members' pending commits.
    pub fn preferred_leaders(&self, members: &[MemberView]) -> Vec<Command> {
        let alive = alive_nodes(members);
        let me = self.me();
        let mut commands = Vec::new();
        let topics = self.meta.metadata.topics.values();
        for topic in topics.filter(|t| t.name != runnel_client::offsets::OFFSETS_TOPIC) {
            for (partition, replicas) in topic.assignment.iter().enumerate() {
                let group = topic.group_id(partition as u32);
                let Some(&preferred) = replicas.first() else { continue };
                if preferred != me && alive.contains(&preferred) && self.hosted.contains(&group) {
                    commands.push(Command::PreferLeader { group, node: preferred });
                }
            }
        }
        commands
    }

    /// Retention and compaction for every partition hosted here: retention
    /// where the topic's `cleanup.policy` deletes and it sets
    /// `retention.ms`, compaction where the policy compacts. Every replica
    /// applies them to its own files. Runnel's internal topics that hold
    /// state or unread input are never cut by retention (see
    /// `holds_state`); one created compacted is compacted.
    pub fn retention(&self) -> Vec<Command> {
        let mut commands = Vec::new();
        for topic in self.meta.metadata.topics.values() {
            let config = &topic.config;
            let retention_ms = config
                .retention_ms
                .filter(|_| config.cleanup.deletes() && !holds_state(&topic.name));
            for partition in 0..topic.assignment.len() as u32 {
                let group = topic.group_id(partition);
                if !self.hosted.contains(&group) {
                    continue;
                }
                if let Some(retention_ms) = retention_ms {
                    commands.push(Command::Retain { group, retention_ms });
                }
                if config.cleanup.compacts() {
                    let policy = CompactionPolicy {
                        delete_retention_ms: config.delete_retention_ms,
                        min_lag_ms: config.min_compaction_lag_ms,
                    };
                    commands.push(Command::Compact { group, policy });
                }
            }
        }
        commands
    }

    /// Replicas to host: every group assigned here that is not running yet,
    /// and the founding replica of each group moved off this node before it
    /// ever hosted it (`ever_hosted`: its files or tombstone are on disk).
    pub fn reconcile(&mut self, ever_hosted: impl Fn(GroupId) -> bool) -> Vec<Command> {
        let wanted = self.meta.wanted_groups(self.me());
        let mut commands = Vec::new();
        for (group, wanted_group) in wanted {
            if !self.hosted.contains(&group) {
                // Every replica starts from the founders' configuration and
                // replays the log's changes from there: a replica placed
                // later is added as a learner on top of the right
                // configuration, and never campaigns until a committed change
                // makes it a voter. (Holds while logs are never compacted.)
                commands.push(Command::Host {
                    group,
                    founders: Some(wanted_group.founders),
                    rejoin: wanted_group.rejoin,
                });
            }
        }
        for (group, founders) in self.meta.founded_groups_moved_off(self.me()) {
            if self.hosted.contains(&group) || self.closed.contains(&group) || ever_hosted(group) {
                continue;
            }
            tracing::info!(
                partition = %group.named(),
                "creating the founding replica of a group moved off before it was hosted here"
            );
            commands.push(Command::Host {
                group,
                founders: Some(founders),
                rejoin: false,
            });
        }
        commands
    }

    /// A [`Command::Host`] succeeded.
    pub fn on_hosted(&mut self, group: GroupId) {
        self.hosted.insert(group);
        self.closed.remove(&group);
    }

    /// Groups hosted here that no assignment places here any more: ask each
    /// replica whether its group still counts this node, and tell
    /// [`ControllerCore::on_unassigned`].
    pub fn unassigned_hosted(&self) -> Vec<GroupId> {
        let wanted = self.meta.wanted_groups(self.me());
        self.hosted
            .iter()
            .copied()
            .filter(|g| *g != CONTROLLER_GROUP && !wanted.contains_key(g))
            .collect()
    }

    /// A hosted, unassigned group's replica counts this node (`member`) or
    /// not. A replica the group still counts keeps running wherever the
    /// assignment moved: its vote and log may be what the group needs to
    /// elect a leader and hand its data to the new replicas (found by the
    /// simulation: two replicas moved at once left a group without a
    /// quorum). Led here, it moves the group towards the assignment too
    /// (see [`ControllerCore::settle_targets`]).
    pub fn on_unassigned(&mut self, group: GroupId, member: bool) -> Option<Command> {
        if member {
            return None;
        }
        self.stop_hosting(group);
        Some(Command::Unhost { group })
    }

    fn stop_hosting(&mut self, group: GroupId) {
        self.closed.insert(group);
        self.hosted.remove(&group);
        self.seen_settled.remove(&group);
    }

    /// The hosted groups to compare with their assignment now, with their
    /// assigned voters: the shell looks at each local replica's
    /// configuration and tells [`ControllerCore::on_settle_status`]. Each
    /// heal interval: groups not yet seen matching their current
    /// assignment. Every `FULL_SETTLE_INTERVAL_MS`: all of them, because a
    /// group seen settled once can be unsettled again by a change an earlier
    /// leader proposed (found by the simulation, seed 6 of the first sweep
    /// on the shared core: a learner left over for good). Looking at every
    /// group every heal interval cost an idle node with 1,000 replicas about
    /// 4% of a core.
    pub fn settle_targets(&mut self, now_ms: u64) -> Vec<(GroupId, Vec<NodeId>)> {
        let full = self
            .last_full_settle_ms
            .is_none_or(|last| now_ms >= last + FULL_SETTLE_INTERVAL_MS);
        if full {
            self.last_full_settle_ms = Some(now_ms);
        }
        self.damaged_held.retain(|_, until_ms| *until_ms > now_ms);
        let held = &self.damaged_held;
        self.hosted
            .iter()
            .filter_map(|&group| {
                let assigned = self.meta.assignment_of(group)?;
                Some((
                    group,
                    assigned
                        .into_iter()
                        .filter(|n| !held.contains_key(&(group, *n)))
                        .collect(),
                ))
            })
            .filter(|(group, assigned)| full || self.seen_settled.get(group) != Some(assigned))
            .collect()
    }

    /// The local replica of a hosted group sees `view`: a group whose voters
    /// differ from `assigned` is nudged (a no-op unless the replica leads);
    /// one that matches is left alone until the assignment changes or the
    /// next full look.
    pub fn on_settle_status(&mut self, group: GroupId, assigned: &[NodeId], view: &GroupView) -> Option<Command> {
        if view.matches(assigned) {
            self.seen_settled.insert(group, assigned.to_vec());
            return None;
        }
        self.seen_settled.remove(&group);
        Some(Command::Reconfigure {
            group,
            voters: assigned.to_vec(),
        })
    }

    /// The peers a passive local replica of `group` asks about itself (see
    /// [`crate::ReplicaCore::judge_passive`]): its group's members and
    /// assigned nodes, without this node.
    pub fn passive_peers(&self, group: GroupId, view: &GroupView) -> Vec<NodeId> {
        let mut members: BTreeSet<NodeId> = view.voters.iter().chain(&view.learners).copied().collect();
        members.extend(self.meta.assignment_of(group).unwrap_or_default());
        members.remove(&self.me());
        members.into_iter().collect()
    }

    /// The tasks the metadata places here, when they changed since the last
    /// call.
    /// With them, the plans of those that SQL statements started.
    pub fn tasks_changed(&mut self) -> Option<(Vec<TaskAssignment>, BTreeMap<String, Plan>)> {
        let metadata = &self.meta.metadata;
        let wanted = metadata.tasks_of(self.me());
        let plans: BTreeMap<String, Plan> = wanted
            .iter()
            .filter_map(|t| Some((t.dataflow.clone(), metadata.plans.get(&t.dataflow)?.clone())))
            .collect();
        let wanted = (wanted, plans);
        if wanted == self.assigned_tasks {
            return None;
        }
        self.assigned_tasks = wanted.clone();
        Some(wanted)
    }

    /// Of the local replicas the supervisor gave up on, those still hosted
    /// for an assignment: the controller leader is told, so they are placed
    /// on another node.
    pub fn failed_to_report(&self, failed: &[GroupId]) -> Vec<GroupId> {
        failed
            .iter()
            .copied()
            .filter(|g| self.hosted.contains(g) && *g != CONTROLLER_GROUP)
            .collect()
    }

    /// Of the local replicas whose files are damaged, those assigned here
    /// (not the controller's, whose loss stops the node), each with the
    /// other nodes assigned its group: one of them must lead the group and
    /// count this node before the files are moved aside.
    pub fn damaged_to_repair(&self, damaged: &[GroupId]) -> Vec<(GroupId, Vec<NodeId>)> {
        let me = self.me();
        damaged
            .iter()
            .filter(|g| **g != CONTROLLER_GROUP)
            .filter_map(|&group| {
                let assigned = self.meta.assignment_of(group)?;
                assigned
                    .contains(&me)
                    .then(|| (group, assigned.into_iter().filter(|n| *n != me).collect()))
            })
            .collect()
    }

    /// The next repair step for this node's damaged replica of `group`,
    /// given the group's leader and members as that leader reported them
    /// (`None`: no other replica answered as leader).
    pub fn on_damaged_status(&self, group: GroupId, leader: Option<(NodeId, &GroupView)>) -> RepairStep {
        let me = self.me();
        match leader {
            _ if group == CONTROLLER_GROUP => RepairStep::Keep,
            None => RepairStep::Keep,
            Some((leader, _)) if leader == me => RepairStep::Keep,
            Some((leader, view)) if view.counts(me) => RepairStep::AskRemoval { leader },
            Some(_) => RepairStep::Quarantine,
        }
    }

    /// On a node asked to remove `node`'s damaged replica from a group whose
    /// local replica reports `leader` and members `view`: the voters to move
    /// to, which leave `node` out as a voter or a learner (none when the
    /// group does not count it), or the leader to ask instead when this node
    /// does not lead. A leader never removes itself. Settling leaves `node`
    /// out of the group for [`DAMAGED_HOLD_HEALS`] heal intervals from
    /// `now_ms` (else it would add it back as a learner before the damaged
    /// node saw itself removed, and the two would go round for ever).
    pub fn voters_without_damaged(
        &mut self,
        group: GroupId,
        leader: Option<NodeId>,
        view: &GroupView,
        node: NodeId,
        now_ms: u64,
    ) -> Result<Option<Vec<NodeId>>, Option<NodeId>> {
        if leader != Some(self.me()) || node == self.me() {
            return Err(leader);
        }
        if self.damaged_held.len() < DAMAGED_HELD_MAX {
            let until_ms = now_ms + DAMAGED_HOLD_HEALS * self.config.heal_interval_ms;
            self.damaged_held.insert((group, node), until_ms);
        }
        Ok(view
            .counts(node)
            .then(|| view.voters.iter().copied().filter(|v| *v != node).collect()))
    }

    /// A damaged replica's files were moved aside: it is hosted no more, so
    /// the next reconcile hosts it again (empty, rejoining).
    pub fn on_quarantined(&mut self, group: GroupId) {
        self.hosted.remove(&group);
        self.kept.remove(&group);
    }

    /// A damaged replica is kept as it is ([`RepairStep::Keep`]): whether
    /// this is news (the first time since it was last repaired), so that it
    /// is said once, not every heal. At most [`DAMAGED_HELD_MAX`] remembered.
    pub fn on_kept(&mut self, group: GroupId) -> bool {
        if self.kept.len() >= DAMAGED_HELD_MAX {
            return !self.kept.contains(&group);
        }
        self.kept.insert(group)
    }

    /// Replica directories on disk (`on_disk`) that no assignment names for
    /// this node, hosted here still or not running at all (`running`).
    pub fn stale_candidates(&self, on_disk: &[GroupId], running: impl Fn(GroupId) -> bool) -> Vec<GroupId> {
        let wanted = self.meta.wanted_groups(self.me());
        on_disk
            .iter()
            .copied()
            .filter(|g| *g != CONTROLLER_GROUP && !wanted.contains_key(g))
            .filter(|g| self.hosted.contains(g) || !running(*g))
            .collect()
    }

    /// Which stale candidates to ask about, once this node's metadata is at
    /// least the controller leader's commit point (`leader_committed`): a
    /// lagging view could miss a current assignment, so nothing is checked
    /// before.
    pub fn stale_checks(&self, candidates: &[GroupId], leader_committed: u64) -> Vec<StaleCheck> {
        if self.meta.applied_offset < leader_committed {
            return Vec::new();
        }
        let me = self.me();
        let mut assigned = BTreeSet::new();
        let mut members_of = BTreeMap::new();
        for topic in self.meta.metadata.topics.values() {
            for (partition, replicas) in topic.assignment.iter().enumerate() {
                let group = topic.group_id(partition as u32);
                if replicas.contains(&me) {
                    assigned.insert(group);
                }
                members_of.insert(group, replicas.clone());
            }
        }
        candidates
            .iter()
            .filter(|g| !assigned.contains(g) && self.topic_known(**g))
            .map(|&group| StaleCheck {
                group,
                ask: members_of.get(&group).cloned(),
            })
            .collect()
    }

    /// Whether the metadata applied here has seen the topic a group belongs
    /// to created (topic ids are never reused). A group of a later topic is
    /// no stale replica, whatever the commit point said: found by the
    /// simulation (seeds 489 and 788 of the first 2,000-seed sweep on the
    /// shared core), where a restarted controller leader answered its old
    /// commit point, the node's metadata held none of the newer topics, and
    /// the files of replicas still assigned to it were deleted as those of
    /// deleted topics.
    fn topic_known(&self, group: GroupId) -> bool {
        group.0 >> 20 < self.meta.metadata.next_topic_id
    }

    /// The answer to a [`StaleCheck`]: `removed` when the group's leader
    /// confirmed this node left it (or there is no group to ask). Files of a
    /// replica the group still counts are its votes and acknowledged
    /// entries: deleting them would let the same id come back empty while
    /// the leader believes it holds everything. Such a replica, not running
    /// after a restart, runs again until it is known removed.
    pub fn on_stale_answer(&mut self, group: GroupId, removed: bool) -> Vec<Command> {
        if self.meta.wanted_groups(self.me()).contains_key(&group) {
            // Assigned here again while the question was out.
            return Vec::new();
        }
        if !removed {
            if self.hosted.contains(&group) || self.closed.contains(&group) {
                return Vec::new();
            }
            return vec![Command::Host {
                group,
                founders: None,
                rejoin: true,
            }];
        }
        let mut commands = Vec::new();
        if self.hosted.contains(&group) {
            self.stop_hosting(group);
            commands.push(Command::Unhost { group });
        }
        commands.push(Command::DeleteFiles { group });
        commands
    }

    /// On the controller leader: every replica and task of a node dead
    /// longer than `replace_after_ms` moves to a live node, least loaded
    /// first. Partitions with no live node to take a replica stay
    /// under-replicated until one appears. With no node dead, tasks are
    /// balanced ([`ControllerCore::balance_tasks`]).
    pub fn heal(&self, now_ms: u64, members: &[MemberView]) -> Vec<MetadataCommand> {
        let dead: Vec<NodeId> = members
            .iter()
            .filter(|m| match m.liveness {
                Liveness::Dead { since_ms } => since_ms + self.config.replace_after_ms <= now_ms,
                _ => false,
            })
            .map(|m| m.node)
            .collect();
        if dead.is_empty() {
            return self.balance_tasks(members).into_iter().collect();
        }
        let alive = alive_nodes(members);
        let mut moves = self.meta.replica_moves(&dead, &alive);
        moves.extend(self.meta.task_moves(&dead, &alive));
        moves
    }

    /// On the controller leader, with every member alive: one task moves
    /// from the node running the most to the one running the fewest, when
    /// they differ by more than one, so that tasks moved off a node while
    /// it was down spread out again once it is back. One move per heal, so
    /// each is applied before the next is judged; a moved task resumes on
    /// its new node from its checkpoint, exactly once as after a failure.
    pub fn balance_tasks(&self, members: &[MemberView]) -> Option<MetadataCommand> {
        if members.iter().any(|m| m.liveness != Liveness::Alive) {
            return None;
        }
        let metadata = &self.meta.metadata;
        let mut load: BTreeMap<NodeId, usize> = alive_nodes(members).into_iter().map(|n| (n, 0)).collect();
        for (node, count) in metadata.task_load() {
            if let Some(slot) = load.get_mut(&node) {
                *slot = count;
            }
        }
        let (&from, &most) = load.iter().max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)))?;
        let (&to, &least) = load.iter().min_by_key(|(n, c)| (**c, **n))?;
        if most < least + 2 {
            return None;
        }
        let (name, task) = metadata.dataflows.values().find_map(|d| {
            let task = d.placement.iter().rposition(|n| *n == from)?;
            Some((d.name.clone(), task as u32))
        })?;
        Some(MetadataCommand::MoveDataflowTask {
            name,
            task,
            dead: from,
            replacement: to,
        })
    }

    /// On the controller leader: `node`'s failed replica of `group` moves to
    /// the least-loaded live node not in the partition.
    pub fn replace_failed(&self, group: GroupId, node: NodeId, alive: &[NodeId]) -> Option<MetadataCommand> {
        let metadata = &self.meta.metadata;
        let (topic, partition, replicas) = metadata.topics.values().find_map(|t| {
            (0..t.assignment.len())
                .find(|&p| t.group_id(p as u32) == group)
                .map(|p| (t.name.clone(), p as u32, t.assignment[p].clone()))
        })?;
        if !replicas.contains(&node) {
            return None;
        }
        let replacement = pick_replacement(alive, &replicas, &metadata.load())?;
        Some(MetadataCommand::ReplaceReplica {
            topic,
            partition,
            dead: node,
            replacement,
        })
    }

    /// On the controller leader: validates a new topic and places its
    /// replicas on `live` nodes.
    pub fn create_topic(
        &self,
        name: String,
        config: TopicConfig,
        live: &[NodeId],
    ) -> Result<MetadataCommand, MetadataError> {
        validate_topic_name(&name).and_then(|()| config.validate())?;
        if self.meta.metadata.topics.contains_key(&name) {
            return Err(MetadataError::TopicExists(name));
        }
        let assignment = place(&config, live, &self.meta.metadata.load())?;
        Ok(MetadataCommand::CreateTopic {
            name,
            config,
            assignment,
        })
    }

    /// On the controller leader: grows a topic to `partitions` in all,
    /// placing the new ones on `live` nodes.
    pub fn add_partitions(
        &self,
        name: String,
        partitions: u32,
        live: &[NodeId],
    ) -> Result<MetadataCommand, MetadataError> {
        let topic = self
            .meta
            .metadata
            .topics
            .get(&name)
            .ok_or_else(|| MetadataError::UnknownTopic(name.clone()))?;
        let have = topic.config.partitions;
        if partitions <= have {
            return Err(MetadataError::InvalidConfig(format!(
                "topic {name:?} has {have} partitions; partitions can only be added (ask for more than {have})"
            )));
        }
        let mut added = topic.config.clone();
        added.partitions = partitions - have;
        added.validate()?;
        let assignment = place(&added, live, &self.meta.metadata.load())?;
        self.checked(MetadataCommand::AddPartitions { name, assignment })
    }

    pub fn delete_topic(&self, name: String) -> Result<MetadataCommand, MetadataError> {
        if !self.meta.metadata.topics.contains_key(&name) {
            return Err(MetadataError::UnknownTopic(name));
        }
        let users = self.meta.metadata.dataflows_using(&name);
        if !users.is_empty() {
            return Err(MetadataError::TopicInUse {
                topic: name,
                dataflows: users,
            });
        }
        Ok(MetadataCommand::DeleteTopic { name })
    }

    /// The topics a dataflow needs that do not exist yet (its checkpoints,
    /// dead letters, sink and repartition topics), each with `replication`.
    pub fn dataflow_topics_missing(
        &self,
        name: &str,
        shape: &DataflowShape,
        partitions: u32,
        replication: u16,
    ) -> Vec<(String, TopicConfig)> {
        dataflow_topics(name, shape, partitions)
            .into_iter()
            .filter(|(topic, _)| !self.meta.metadata.topics.contains_key(topic))
            .map(|(topic, topic_partitions)| {
                let mut config = TopicConfig::new(topic_partitions, replication);
                if holds_state(&topic) {
                    // As Kafka Streams' internal topics: never expired.
                    config.retention_ms = None;
                }
                if topic.ends_with(&runnel_client::tasks::checkpoint_topic("")) {
                    // Each checkpoint's chunks are keyed by their place in
                    // it, so compaction keeps the newest checkpoint whole
                    // and the topic no longer grows with every checkpoint.
                    config.cleanup = crate::metadata::CleanupPolicy::Compact;
                }
                (topic, config)
            })
            .collect()
    }

    /// On the controller leader: places a dataflow's tasks on `alive` nodes.
    pub fn start_dataflow(
        &self,
        mut dataflow: DataflowMeta,
        alive: &[NodeId],
    ) -> Result<MetadataCommand, MetadataError> {
        let tasks = dataflow.stages * dataflow.partitions;
        dataflow.placement = place_tasks(tasks, alive, &self.meta.metadata.task_load())?;
        Ok(MetadataCommand::StartDataflow { dataflow })
    }

    /// On the controller leader: places a SQL query's tasks on `alive`
    /// nodes; refused as applying it would be.
    pub fn start_query(
        &self,
        mut dataflow: DataflowMeta,
        plan: Box<Plan>,
        object: Option<Box<SqlObject>>,
        alive: &[NodeId],
    ) -> Result<MetadataCommand, MetadataError> {
        let tasks = dataflow.stages * dataflow.partitions;
        dataflow.placement = place_tasks(tasks, alive, &self.meta.metadata.task_load())?;
        self.checked(MetadataCommand::StartQuery { dataflow, plan, object })
    }

    /// `command` if applying it to the metadata as it is now succeeds (the
    /// refusal otherwise): an admin request that would be refused is not
    /// committed.
    pub fn checked(&self, command: MetadataCommand) -> Result<MetadataCommand, MetadataError> {
        self.meta.metadata.clone().apply(&command)?;
        Ok(command)
    }

    pub fn stop_dataflow(&self, name: String) -> Result<MetadataCommand, MetadataError> {
        if !self.meta.metadata.dataflows.contains_key(&name) {
            return Err(MetadataError::UnknownDataflow(name));
        }
        Ok(MetadataCommand::StopDataflow { name })
    }

    /// On the controller leader: moves replicas from the most loaded live
    /// node to the least loaded one until loads differ by at most one. Each
    /// move goes through the same learner -> voter -> remove path as
    /// healing, so no partition drops below its replication factor.
    pub fn rebalance(&self, alive: &[NodeId]) -> Vec<MetadataCommand> {
        let metadata = &self.meta.metadata;
        let mut load: BTreeMap<NodeId, usize> = alive.iter().map(|&n| (n, 0)).collect();
        for (node, count) in metadata.load() {
            if let Some(slot) = load.get_mut(&node) {
                *slot = count;
            }
        }
        let mut assignment: Vec<(String, u32, Vec<NodeId>)> = metadata
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
        while moves.len() < REBALANCE_MOVES_MAX {
            let Some(command) = next_rebalance_move(&mut load, &mut assignment) else {
                break;
            };
            moves.push(command);
        }
        moves
    }
}

/// One replica move from the most to the least loaded node, if their loads
/// differ by more than one and some partition can move.
fn next_rebalance_move(
    load: &mut BTreeMap<NodeId, usize>,
    assignment: &mut [(String, u32, Vec<NodeId>)],
) -> Option<MetadataCommand> {
    let (&from, &most) = load.iter().max_by_key(|(n, c)| (**c, **n))?;
    let (&to, &least) = load.iter().min_by_key(|(n, c)| (**c, **n))?;
    if most <= least + 1 {
        return None;
    }
    let slot = assignment
        .iter_mut()
        .find(|(_, _, r)| r.contains(&from) && !r.contains(&to))?;
    if let Some(replica) = slot.2.iter_mut().find(|n| **n == from) {
        *replica = to;
    }
    *load.entry(from).or_default() -= 1;
    *load.entry(to).or_default() += 1;
    Some(MetadataCommand::ReplaceReplica {
        topic: slot.0.clone(),
        partition: slot.1,
        dead: from,
        replacement: to,
    })
}

/// The nodes `members` holds alive.
pub fn alive_nodes(members: &[MemberView]) -> Vec<NodeId> {
    members
        .iter()
        .filter(|m| m.liveness == Liveness::Alive)
        .map(|m| m.node)
        .collect()
}

/// Whether a topic is one of Runnel's own that retention would break: the
/// consumer-offsets topic and dataflows' checkpoints hold state, and a
/// repartition topic holds input a task may not have read yet (its tasks
/// delete what every reader has checkpointed past instead, as Kafka
/// Streams purges its repartition topics). See
/// [`ControllerCore::retention`].
fn holds_state(topic: &str) -> bool {
    use runnel_client::tasks::{checkpoint_topic, repartition_topic};
    // A dataflow's internal topic is its name and a suffix.
    topic == runnel_client::offsets::OFFSETS_TOPIC
        || topic.ends_with(&checkpoint_topic(""))
        || topic.ends_with(&repartition_topic(""))
}
