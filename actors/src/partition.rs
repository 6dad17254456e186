//! `PartitionReplica`: the actor that owns one replica's [`ReplicaCore`].
//!
//! Every message (a tick, a peer's Raft message, a produce, a fetch) is
//! handled, then the replica's ready state is drained: what Raft asks to
//! persist is persisted, outgoing messages go to the [`RaftRouter`], and
//! produce requests waiting for their entry are answered. A storage error
//! fails the actor; its supervisor restarts it from what is on disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use raft::eraftpb::Message;
use runnel_storage::{LogConfig, RecordBatch};

use crate::producers::SequenceCheck;
use crate::protocol::{Acks, BrokerError, GroupId, NodeId, PassiveAnswer};
use crate::replica::{ReplicaConfig, ReplicaCore};

/// Ticks (100 ms each) before deleting segments below the log's start is
/// tried again after it failed.
const DELETION_PAUSE_TICKS: u32 = 50;
/// Produce requests waiting on one replica at most; more are refused as busy.
pub const WAITERS_MAX: usize = 8192;
/// Compaction steps (each reads at most 4 MiB) one message runs: the
/// replica answers its other messages between them.
pub const COMPACTION_STEPS_PER_MESSAGE: usize = 4;

/// Where a replica's outgoing Raft messages go.
pub trait RaftRouter: Send + Sync + 'static {
    fn send(&self, group: GroupId, messages: Vec<Message>);
}

/// Everything needed to (re)start a replica.
#[derive(Clone)]
pub struct ReplicaArgs {
    pub group: GroupId,
    pub dir: PathBuf,
    pub log_config: LogConfig,
    pub config: ReplicaConfig,
    /// The founding voters, for a brand-new group; `None` otherwise.
    pub bootstrap_voters: Option<Vec<NodeId>>,
    pub router: Arc<dyn RaftRouter>,
    /// Ticks and Raft messages queued for this instance (set at each spawn).
    pub queued: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether the instance is passive now, for the node to find passive
    /// replicas without asking each one (set at each spawn).
    pub passive: Arc<std::sync::atomic::AtomicBool>,
}

/// Committed batches read from a replica.
#[derive(Debug)]
pub struct Fetched {
    pub batches: Vec<RecordBatch>,
    pub start_offset: u64,
    pub committed_offset: u64,
}

/// A replica's view of its group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub group: GroupId,
    pub id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    /// The first offset the log holds (retention moves it).
    pub start_offset: u64,
    pub committed_offset: u64,
    pub end_offset: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// While passive: the leader's commit index when it first heard from
    /// one (see [`ReplicaCore::judge_passive`]).
    pub passive_since: Option<u64>,
    /// A leader whose commit point is the group's: an entry of its own term
    /// has committed. Until then its commit offset may lag what an earlier
    /// leader committed.
    pub commit_known: bool,
}

pub enum ReplicaMsg {
    Tick,
    Raft(Box<Message>),
    Produce {
        batch: RecordBatch,
        acks: Acks,
        /// The topic's `min.insync.replicas` (see [`PartitionCore::produce`]).
        min_insync: u16,
        reply: RpcReplyPort<Result<u64, BrokerError>>,
    },
    Fetch {
        offset: u64,
        max_bytes: usize,
        /// Serve from a follower too (tools and tests comparing replicas).
        any_replica: bool,
        reply: RpcReplyPort<Result<Fetched, BrokerError>>,
    },
    Status(RpcReplyPort<ReplicaStatus>),
    OffsetForTimestamp {
        timestamp_ms: i64,
        reply: RpcReplyPort<Result<Option<u64>, BrokerError>>,
    },
    /// Move the group's voters one step towards these node ids (leader only).
    Reconfigure(Vec<NodeId>),
    /// Hand leadership to this voter, the preferred replica, if leading and
    /// it has caught up.
    PreferLeader(NodeId),
    /// A peer's passive replica asks what this replica knows of it.
    JudgePassive {
        node: NodeId,
        since: u64,
        reply: RpcReplyPort<Result<PassiveAnswer, BrokerError>>,
    },
    /// A peer confirmed this passive replica's promotion.
    Promoted,
    /// Move where readers start to `before_offset` (the commit point for
    /// `None`), deleting the records below it (Kafka's DeleteRecords;
    /// leader only): answered with the new start once committed.
    DeleteRecords {
        before_offset: Option<u64>,
        reply: RpcReplyPort<Result<u64, BrokerError>>,
    },
    /// Delete the closed segments whose newest record is older than this
    /// (the topic's `retention.ms`).
    Retain {
        retention_ms: u64,
    },
    /// Compact the log (the topic's `cleanup.policy` compacts) a few
    /// bounded steps at a time; `continued` is the replica's own reminder
    /// that a pass is under way (the controller's periodic ones are then
    /// left to it).
    Compact {
        policy: runnel_storage::CompactionPolicy,
        continued: bool,
    },
    /// Test-only fault hook: the replica's handler panics, as a bug would.
    InjectPanic,
}

/// Where the answer to a produce goes: the actor's reply port, or the
/// deterministic simulation's outbox.
pub trait ProduceReply {
    fn answer(self, result: Result<u64, BrokerError>);
}

impl ProduceReply for RpcReplyPort<Result<u64, BrokerError>> {
    fn answer(self, result: Result<u64, BrokerError>) {
        // The caller may have given up waiting; nothing is lost by that.
        let _ = self.send(result);
    }
}

/// What a batch's producer sequence says to do with it.
enum SequenceVerdict {
    /// New (or not an idempotent produce): propose it.
    Propose,
    /// Answer at once: a committed retry's offset, or a refusal.
    Answer(Result<u64, BrokerError>),
    /// A retry of an entry not yet committed: wait for it as its original does.
    Wait { index: u64, term: u64 },
}

struct Waiter<R> {
    /// The leader's term when it proposed: a different term at the index
    /// means the entry was replaced and the batch was not written.
    term: u64,
    acks: Acks,
    /// Replicas that must hold the entry before `acks=all` is answered.
    copies: u16,
    /// The answer once committed, when not the entry's offset (a
    /// log-start entry answers with the start it sets).
    answer: Option<u64>,
    reply: R,
}

/// Ticks a voter may go without catching up and still count as in sync:
/// 5 s at the node's 100 ms tick (Kafka's `replica.lag.time.max.ms` is 30 s),
/// so that an `acks=all` produce waiting for a replica that died is
/// answered before the broker's 10 s request timeout.
const IN_SYNC_LAG_TICKS: u32 = 50;

/// Which voters are in sync with the leader (Kafka's ISR): those that, at
/// some tick within the last [`IN_SYNC_LAG_TICKS`], had been heard from
/// and had caught up with where the leader's log ended at the tick before
/// (a dead voter drops out even while nothing is produced). A new leader
/// starts counting every voter in sync.
#[derive(Default)]
struct InSync {
    /// Voter → ticks since it last caught up.
    behind_ticks: BTreeMap<u64, u32>,
    /// The leader's last index at the previous tick.
    last_index_before: u64,
    /// Whether this replica led at the previous tick.
    led: bool,
}

impl InSync {
    fn on_tick(&mut self, core: &ReplicaCore) {
        if !core.is_leader() {
            *self = InSync::default();
            return;
        }
        let target = self.last_index_before;
        let behind_before = std::mem::take(&mut self.behind_ticks);
        for voter in core.voter_progress() {
            let caught_up = voter.id == core.id() || (voter.matched >= target && voter.recently_heard);
            let behind = match behind_before.get(&voter.id) {
                Some(&ticks) if self.led && !caught_up => ticks.saturating_add(1),
                _ => 0,
            };
            self.behind_ticks.insert(voter.id, behind);
        }
        self.last_index_before = core.last_index();
        self.led = true;
    }

    /// Voters in sync now, this leader included; 0 on a replica that does
    /// not lead.
    fn count(&self, core: &ReplicaCore) -> usize {
        let lagging = |id: u64| self.behind_ticks.get(&id).is_some_and(|&t| t >= IN_SYNC_LAG_TICKS);
        core.voter_progress()
            .filter(|voter| voter.id == core.id() || !lagging(voter.id))
            .count()
    }
}

/// One replica as its node serves it: the Raft core, produce admission (size,
/// attributes, idempotent-producer sequences), produces waiting for their
/// entry, and fetches. No actor, socket or clock: [`PartitionReplica`] is a
/// shell around it, and the deterministic simulation drives it directly.
pub struct PartitionCore<R> {
    group: GroupId,
    batch_bytes_max: usize,
    ack_before_commit: bool,
    core: ReplicaCore,
    /// By Raft index.
    waiters: BTreeMap<u64, Vec<Waiter<R>>>,
    in_sync: InSync,
    /// Ticks to wait before deleting segments below the log's start again,
    /// after a failure.
    deletion_pause_ticks: u32,
    /// Damage met deleting them: the replica fails with it at its next
    /// drive, so that it is repaired.
    deletion_damage: Option<crate::ActorError>,
}

pub struct ReplicaState {
    part: PartitionCore<RpcReplyPort<Result<u64, BrokerError>>>,
    args: ReplicaArgs,
    /// A compaction pass is under way, driven by the replica's own
    /// `Compact { continued: true }` messages.
    compacting: bool,
}

pub struct PartitionReplica;

impl Actor for PartitionReplica {
    type Msg = ReplicaMsg;
    type State = ReplicaState;
    type Arguments = ReplicaArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ReplicaMsg>,
        args: ReplicaArgs,
    ) -> Result<ReplicaState, ActorProcessingErr> {
        let (part, messages) = PartitionCore::open(
            args.group,
            &args.dir,
            args.log_config.clone(),
            &args.config,
            args.bootstrap_voters.as_deref(),
        )?;
        if !messages.is_empty() {
            args.router.send(args.group, messages);
        }
        tracing::info!(
            partition = %args.group.named(),
            id = args.config.id,
            end_offset = part.core().store().log().end_offset(),
            "replica started"
        );
        args.passive
            .store(part.core().is_passive(), std::sync::atomic::Ordering::Relaxed);
        Ok(ReplicaState {
            part,
            args,
            compacting: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ReplicaMsg>,
        message: ReplicaMsg,
        state: &mut ReplicaState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ReplicaMsg::Tick => {
                state.args.queued.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                state.part.tick();
            }
            ReplicaMsg::Raft(message) => {
                state.args.queued.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                state.part.core_mut().step(*message)?
            }
            ReplicaMsg::Produce {
                batch,
                acks,
                min_insync,
                reply,
            } => state.part.produce(batch, acks, min_insync, reply),
            ReplicaMsg::Fetch {
                offset,
                max_bytes,
                any_replica,
                reply,
            } => {
                let _ = reply.send(state.part.fetch(offset, max_bytes, any_replica)?);
            }
            ReplicaMsg::Status(reply) => {
                let _ = reply.send(state.part.status());
            }
            ReplicaMsg::OffsetForTimestamp { timestamp_ms, reply } => {
                let _ = reply.send(state.part.offset_for_timestamp(timestamp_ms)?);
            }
            ReplicaMsg::Reconfigure(desired) => {
                let desired: Vec<u64> = desired.iter().map(|n| n.to_raft()).collect();
                if let Some((change, node)) = state.part.core_mut().step_towards(&desired)? {
                    tracing::info!(partition = %state.args.group.named(), ?change, node, "membership change proposed");
                }
            }
            ReplicaMsg::PreferLeader(node) => {
                if state.part.core_mut().prefer_leader(node.to_raft()) {
                    tracing::info!(partition = %state.args.group.named(), node = %node, "handing leadership to the preferred replica");
                }
            }
            ReplicaMsg::JudgePassive { node, since, reply } => {
                let answer = state.part.core_mut().judge_passive(node.to_raft(), since)?;
                if answer != PassiveAnswer::Unknown {
                    tracing::info!(partition = %state.args.group.named(), node = %node, ?answer, "a passive replica asked");
                }
                let _ = reply.send(Ok(answer));
            }
            ReplicaMsg::Promoted => state.part.core_mut().promoted()?,
            ReplicaMsg::DeleteRecords { before_offset, reply } => state.part.delete_records(before_offset, reply),
            ReplicaMsg::Retain { retention_ms } => state.part.retain(runnel_client::unix_now_ms(), retention_ms),
            ReplicaMsg::Compact { policy, continued } => {
                if continued || !state.compacting {
                    state.compacting = state.part.compact(runnel_client::unix_now_ms(), policy);
                    if state.compacting {
                        let _ = myself.cast(ReplicaMsg::Compact {
                            policy,
                            continued: true,
                        });
                    }
                }
            }
            ReplicaMsg::InjectPanic => panic!("injected fault in the replica of group {}", state.args.group),
        }
        let (router, group) = (&state.args.router, state.args.group);
        state.part.drive_sending(&mut |messages| router.send(group, messages))?;
        let passive = state.part.core().is_passive();
        state.args.passive.store(passive, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ReplicaMsg>,
        state: &mut ReplicaState,
    ) -> Result<(), ActorProcessingErr> {
        state.part.core_mut().close()?;
        Ok(())
    }
}

impl<R: ProduceReply> PartitionCore<R> {
    /// Opens the replica in `dir` (see [`ReplicaCore::open`]). A brand-new
    /// group's preferred replica (the first founder) campaigns at once, so
    /// leadership follows placement; its vote requests are returned.
    pub fn open(
        group: GroupId,
        dir: &Path,
        log_config: LogConfig,
        config: &ReplicaConfig,
        bootstrap_voters: Option<&[NodeId]>,
    ) -> crate::Result<(PartitionCore<R>, Vec<Message>)> {
        let batch_bytes_max = log_config.batch_bytes_max;
        // Raft speaks u64 ids: the founders cross the boundary here.
        let raft_voters: Option<Vec<u64>> = bootstrap_voters.map(|v| v.iter().map(|n| n.to_raft()).collect());
        let mut core = ReplicaCore::open(dir, log_config, config, raft_voters.as_deref())?;
        let mut messages = Vec::new();
        let preferred = bootstrap_voters.and_then(|v| v.first()).map(|n| n.to_raft()) == Some(config.id);
        if preferred && core.is_fresh() {
            core.campaign()?;
            messages = core.handle_ready()?.messages;
        }
        let part = PartitionCore {
            group,
            batch_bytes_max,
            ack_before_commit: config.ack_before_commit,
            core,
            waiters: BTreeMap::new(),
            in_sync: InSync::default(),
            deletion_pause_ticks: 0,
            deletion_damage: None,
        };
        Ok((part, messages))
    }

    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The leader this replica knows of, as a node id.
    fn leader(&self) -> Option<NodeId> {
        self.core.leader_id().and_then(NodeId::from_raft)
    }

    pub fn core(&self) -> &ReplicaCore {
        &self.core
    }

    pub fn core_mut(&mut self) -> &mut ReplicaCore {
        &mut self.core
    }

    /// The Raft core, dropping waiting produces unanswered (as a crash does).
    pub fn into_core(self) -> ReplicaCore {
        self.core
    }

    /// Produces waiting for their entry.
    pub fn waiting(&self) -> usize {
        self.waiters.values().map(Vec::len).sum()
    }

    /// The leader's answer to a committed timestamp lookup.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> crate::Result<Result<Option<u64>, BrokerError>> {
        if !self.core.is_leader() {
            return Ok(Err(BrokerError::NotLeader {
                group: self.group,
                leader: self.leader(),
            }));
        }
        let committed = self.core.committed_offset();
        let found = self.core.store().log().offset_for_timestamp(timestamp_ms)?;
        let first = self.core.store().first_offset();
        Ok(Ok(found
            .map(|offset| offset.max(first))
            .filter(|&offset| offset < committed)))
    }

    /// Admits a produce: refused at once, answered from the log (a retried
    /// batch), or proposed and answered when its entry commits (`acks=all`)
    /// or is appended here (`leader`, `none`).
    /// With `acks=all` the batch is refused unless `min_insync` voters are
    /// in sync, and answered once that many hold it (and a majority
    /// committed it). `min_insync` up to a majority asks for nothing more
    /// than Raft's commit.
    pub fn produce(&mut self, batch: RecordBatch, acks: Acks, min_insync: u16, reply: R) {
        let majority = self.core.store().conf_state().voters.len() / 2 + 1;
        let copies = if acks == Acks::All && usize::from(min_insync) > majority {
            min_insync
        } else {
            0
        };
        if let Some(error) = self.admission_error(&batch) {
            reply.answer(Err(error));
            return;
        }
        match self.sequence_verdict(&batch) {
            // Only a batch not written before is refused for want of
            // replicas: a retry gets its original's answer.
            SequenceVerdict::Propose => match self.in_sync_error(copies) {
                Some(error) => reply.answer(Err(error)),
                None => self.propose(batch, acks, copies, reply),
            },
            SequenceVerdict::Answer(result) => reply.answer(result),
            SequenceVerdict::Wait { index, term } => self.waiters.entry(index).or_default().push(Waiter {
                term,
                acks,
                copies,
                answer: None,
                reply,
            }),
        }
    }

    /// Applies the topic's retention at `now_ms` (see
    /// [`ReplicaCore::compact_for_retention`]). A failure is logged, not
    /// fatal: the records stay until the next pass.
    pub fn retain(&mut self, now_ms: i64, retention_ms: u64) {
        match self.core.compact_for_retention(now_ms, retention_ms) {
            Ok(None) => {}
            Ok(Some(done)) => self.log_deleted(&done, "retention"),
            Err(e) => tracing::warn!(partition = %self.group.named(), error = %e, "retention failed; the records stay"),
        }
    }

    /// Logs the segments a deletion took (`cause`: retention, or deleted
    /// records below the log's start).
    fn log_deleted(&self, done: &crate::raft_store::Compacted, cause: &str) {
        tracing::info!(
            partition = %self.group.named(),
            cause,
            segments = done.segments,
            bytes = done.bytes,
            start_offset = done.start_offset,
            "the oldest segments were deleted"
        );
    }

    /// Log compaction: a few bounded steps (see
    /// [`ReplicaCore::compact_log`]); whether a pass is still under way. A
    /// failure is logged, not fatal: the records stay as they are.
    pub fn compact(&mut self, now_ms: i64, policy: runnel_storage::CompactionPolicy) -> bool {
        match self.core.compact_log(now_ms, policy, COMPACTION_STEPS_PER_MESSAGE) {
            Ok(done) => {
                if let Some(outcome) = done.finished.filter(|o| o.segments_rewritten > 0) {
                    tracing::info!(
                        partition = %self.group.named(),
                        segments = outcome.segments_rewritten,
                        bytes_before = outcome.bytes_before,
                        bytes_after = outcome.bytes_after,
                        records_removed = outcome.records_removed,
                        tombstones_removed = outcome.tombstones_removed,
                        "compaction rewrote segments"
                    );
                }
                done.more
            }
            Err(e) => {
                tracing::warn!(partition = %self.group.named(), error = %e, "compaction failed; the records stay");
                false
            }
        }
    }

    /// Advances the replica's clock and its view of which voters are in
    /// sync, and deletes the segments a log-start entry left below the start.
    pub fn tick(&mut self) -> bool {
        let work = self.core.tick();
        self.in_sync.on_tick(&self.core);
        self.delete_below_log_start();
        work
    }

    /// Deletes the segments a log-start entry left below the start; after a
    /// failure, tries again [`DELETION_PAUSE_TICKS`] later, and damage
    /// fails the replica (at its next drive).
    fn delete_below_log_start(&mut self) {
        if self.deletion_pause_ticks > 0 {
            self.deletion_pause_ticks -= 1;
            return;
        }
        match self.core.delete_below_log_start() {
            Ok(None) => {}
            Ok(Some(done)) => self.log_deleted(&done, "deleted records"),
            Err(e) if e.is_damage() => self.deletion_damage = Some(e),
            Err(e) => {
                tracing::warn!(partition = %self.group.named(), error = %e, "deleting records failed; the files stay for now");
                self.deletion_pause_ticks = DELETION_PAUSE_TICKS;
            }
        }
    }

    /// Kafka's DeleteRecords: moves where readers start to `before_offset`
    /// (the commit point for `None`), through a log-start entry every
    /// replica applies; its whole segments below are then deleted. Answered
    /// with the start once the entry commits on a majority, at once when
    /// the log already starts there.
    pub fn delete_records(&mut self, before_offset: Option<u64>, reply: R) {
        let group = self.group;
        if !self.core.serves_reads() {
            let leader = self.leader();
            return reply.answer(Err(BrokerError::NotLeader { group, leader }));
        }
        let (start, committed) = (self.core.store().first_offset(), self.core.committed_offset());
        let offset = before_offset.unwrap_or(committed);
        if offset > committed {
            let end = committed;
            return reply.answer(Err(BrokerError::OffsetOutOfRange { offset, start, end }));
        }
        if offset <= start {
            return reply.answer(Ok(start));
        }
        if self.waiting() >= WAITERS_MAX {
            return reply.answer(Err(BrokerError::Busy(group)));
        }
        match self.core.propose_log_start(offset) {
            Ok(index) => {
                let term = self.core.term();
                let waiter = Waiter {
                    term,
                    acks: Acks::All,
                    copies: 0,
                    answer: Some(offset),
                    reply,
                };
                self.waiters.entry(index).or_default().push(waiter);
            }
            Err(crate::ActorError::NotLeader { leader }) => {
                let leader = leader.and_then(NodeId::from_raft);
                reply.answer(Err(BrokerError::NotLeader { group, leader }));
            }
            Err(_) => reply.answer(Err(BrokerError::Busy(group))),
        }
    }

    /// `NotEnoughReplicas` when this leader counts fewer than `copies`
    /// voters in sync (a follower refuses the proposal anyway).
    fn in_sync_error(&self, copies: u16) -> Option<BrokerError> {
        if !self.core.is_leader() {
            return None;
        }
        let in_sync = self.in_sync.count(&self.core);
        (in_sync < usize::from(copies)).then_some(BrokerError::NotEnoughReplicas {
            group: self.group,
            in_sync: in_sync as u16,
            required: copies,
        })
    }

    /// Why a batch is refused before its producer's sequence is looked at:
    /// too large, too many produces waiting, or attributes set.
    fn admission_error(&self, batch: &RecordBatch) -> Option<BrokerError> {
        let limit_bytes = self.batch_bytes_max;
        if batch.size_bytes() > limit_bytes {
            return Some(BrokerError::BatchTooLarge {
                size_bytes: batch.size_bytes(),
                limit_bytes,
            });
        }
        if self.waiting() >= WAITERS_MAX {
            return Some(BrokerError::Busy(self.group));
        }
        // Attributes belong to the broker (a client-made control batch would
        // be read back as a Raft configuration change).
        if batch.header().attributes != 0 {
            let reason = format!("batch attributes must be 0, not {:#06x}", batch.header().attributes);
            return Some(BrokerError::InvalidRequest(reason));
        }
        if batch.is_compacted() {
            let reason = "batch format 3 is written by log compaction only; producers send format 2".to_string();
            return Some(BrokerError::InvalidRequest(reason));
        }
        None
    }

    /// What an idempotent producer's sequence says of this batch. A batch
    /// without a producer id has no sequence, and only the leader judges
    /// sequences: elsewhere the proposal itself refuses the batch.
    fn sequence_verdict(&self, batch: &RecordBatch) -> SequenceVerdict {
        let group = self.group;
        let producer = batch.header().producer;
        if producer.producer_id < 0 || !self.core.is_leader() {
            return SequenceVerdict::Propose;
        }
        let store = self.core.store();
        let commit = store.hard_state().commit;
        let error = match store.producers().check(&producer, batch.record_count()) {
            SequenceCheck::New => return SequenceVerdict::Propose,
            // Retention deleted the start of the log, and with it maybe the
            // producer's batches: it goes on as a new one (a retry of a
            // batch older than the retention cannot be recognized anyway).
            // Not when the table forgot producers to make room: this one's
            // batches may still be in the log, and a retry would be written
            // twice.
            SequenceCheck::UnknownProducer if store.first_index_value() > 1 && !store.producers().evicted() => {
                return SequenceVerdict::Propose
            }
            SequenceCheck::Duplicate(original) => {
                // A retry: answer with the original's fate, never write twice.
                return if original.index <= commit {
                    SequenceVerdict::Answer(Ok(original.base_offset))
                } else if let Some(term) = store.entry_term(original.index) {
                    SequenceVerdict::Wait {
                        index: original.index,
                        term,
                    }
                } else {
                    SequenceVerdict::Answer(Err(BrokerError::LeadershipLost))
                };
            }
            SequenceCheck::Gap { expected, got } => BrokerError::OutOfOrderSequence {
                producer_id: producer.producer_id,
                expected,
                got,
            },
            // Answered only about a committed batch: a producer that trims
            // what is stored must never trim a batch that a new leader could
            // still drop.
            SequenceCheck::Mismatch { index, .. }
            | SequenceCheck::Stale { index, .. }
            | SequenceCheck::Fenced { index, .. }
                if index > commit =>
            {
                BrokerError::NotYetCommitted(group)
            }
            SequenceCheck::Mismatch { last_sequence, .. } => BrokerError::SequenceMismatch {
                producer_id: producer.producer_id,
                base_sequence: producer.base_sequence,
                stored_last_sequence: last_sequence,
            },
            SequenceCheck::UnknownProducer => {
                let reason = format!(
                    "producer {} is not known here and its sequence {} is not 0; start a new producer",
                    producer.producer_id, producer.base_sequence
                );
                BrokerError::InvalidRequest(reason)
            }
            SequenceCheck::Fenced { newest_epoch, .. } => BrokerError::ProducerFenced {
                producer_id: producer.producer_id,
                epoch: producer.producer_epoch,
                newest_epoch,
            },
            SequenceCheck::Stale { last_sequence, .. } => BrokerError::StaleSequence {
                producer_id: producer.producer_id,
                last_sequence,
                got: producer.base_sequence,
            },
        };
        SequenceVerdict::Answer(Err(error))
    }

    /// Proposes an admitted batch: its produce waits for the entry, or is
    /// refused at once if this replica cannot propose.
    fn propose(&mut self, batch: RecordBatch, acks: Acks, copies: u16, reply: R) {
        let group = self.group;
        match self.core.propose(batch) {
            Ok(index) => {
                let term = self.core.term();
                self.waiters.entry(index).or_default().push(Waiter {
                    term,
                    acks,
                    copies,
                    answer: None,
                    reply,
                });
            }
            Err(crate::ActorError::NotLeader { leader }) => {
                reply.answer(Err(BrokerError::NotLeader {
                    group,
                    leader: leader.and_then(NodeId::from_raft),
                }));
            }
            Err(_) => {
                reply.answer(Err(BrokerError::Busy(group)));
            }
        }
    }

    /// Committed batches from `offset`, from the leader (or any replica).
    pub fn fetch(
        &self,
        offset: u64,
        max_bytes: usize,
        any_replica: bool,
    ) -> crate::Result<Result<Fetched, BrokerError>> {
        let group = self.group;
        // A leader new to its term answers once its commit point is its
        // own (a moment after election); until then it names itself, and
        // the reader asks again.
        if !any_replica && !self.core.serves_reads() {
            return Ok(Err(BrokerError::NotLeader {
                group,
                leader: self.leader(),
            }));
        }
        let start = self.core.store().first_offset();
        let committed = self.core.committed_offset();
        if offset < start || offset > committed {
            return Ok(Err(BrokerError::OffsetOutOfRange {
                offset,
                start,
                end: committed,
            }));
        }
        let batches = self.core.read_committed(offset, max_bytes)?;
        Ok(Ok(Fetched {
            batches,
            start_offset: start,
            committed_offset: committed,
        }))
    }

    pub fn status(&self) -> ReplicaStatus {
        let conf = self.core.store().conf_state();
        ReplicaStatus {
            group: self.group,
            // Replica ids are node ids made raft ids (`NodeId::to_raft`).
            id: NodeId::from_raft(self.core.id()).unwrap_or_default(),
            leader: self.leader(),
            term: self.core.term(),
            start_offset: self.core.store().first_offset(),
            committed_offset: self.core.committed_offset(),
            end_offset: self.core.store().log().end_offset(),
            voters: conf.voters.iter().copied().filter_map(NodeId::from_raft).collect(),
            learners: conf.learners.iter().copied().filter_map(NodeId::from_raft).collect(),
            passive_since: self.core.passive_since(),
            commit_known: self.core.knows_commit_point(),
        }
    }

    /// Drains ready state: persists what Raft asks, answers waiting
    /// produces, and returns the messages to send, in order.
    pub fn drive(&mut self) -> crate::Result<Vec<Message>> {
        let mut messages = Vec::new();
        self.drive_sending(&mut |sent| messages.extend(sent))?;
        Ok(messages)
    }

    /// As [`PartitionCore::drive`], but every message goes to `send` as soon
    /// as it may: a leader's appends before it persists them.
    /// Damage that Raft met reading entries for a follower fails the replica
    /// here, as damage met on open or apply does, so it is repaired.
    pub fn drive_sending(&mut self, send: &mut dyn FnMut(Vec<Message>)) -> crate::Result<()> {
        self.check_read_damage()?;
        while self.core.has_ready() {
            let output = self.core.handle_ready_sending(send)?;
            if !output.messages.is_empty() {
                send(output.messages);
            }
            for committed in output.committed {
                self.resolve(committed.index, true);
            }
        }
        self.resolve_appended();
        self.check_read_damage()
    }

    fn check_read_damage(&mut self) -> crate::Result<()> {
        if let Some(damage) = self.deletion_damage.take() {
            return Err(damage);
        }
        match self.core.store().read_damage() {
            Some(damage) => Err(damage),
            None => Ok(()),
        }
    }

    /// Answers the waiters of a committed (or, for `acks=leader|none`,
    /// appended) entry: with its offset if the entry is the one proposed,
    /// else with `LeadershipLost`.
    fn resolve(&mut self, index: u64, committed: bool) {
        let Some(waiters) = self.waiters.remove(&index) else {
            return;
        };
        let committed = committed || index <= self.core.commit_index();
        let short_of = self.copies_short_of(index);
        let store = self.core.store();
        let mut still_waiting = Vec::new();
        for waiter in waiters {
            let all = waiter.acks == Acks::All && !self.ack_before_commit;
            if all && (!committed || short_of(waiter.copies) == Some(true)) {
                still_waiting.push(waiter);
                continue;
            }
            let result = match (store.entry_term(index), store.entry_offsets(index)) {
                (Some(term), Some(_)) if term == waiter.term && all && short_of(waiter.copies) == Some(false) => {
                    Err(BrokerError::NotEnoughReplicasAfterAppend {
                        group: self.group,
                        copies: self.core.copies_of(index) as u16,
                        required: waiter.copies,
                    })
                }
                (Some(term), Some((base_offset, _))) if term == waiter.term => {
                    // A log-start entry answers with the start, which a
                    // later one may have moved further already.
                    Ok(waiter
                        .answer
                        .map_or(base_offset, |start| start.max(store.first_offset())))
                }
                _ => Err(BrokerError::LeadershipLost),
            };
            waiter.reply.answer(result);
        }
        if !still_waiting.is_empty() {
            self.waiters.insert(index, still_waiting);
        }
    }

    /// For a leader: whether an entry at `index` lacks copies a waiter needs,
    /// `Some(true)` while more voters are in sync to hold it, `Some(false)`
    /// when too few are; `None` when it has them (or this replica does not
    /// lead: a committed entry is answered as before).
    fn copies_short_of(&self, index: u64) -> impl Fn(u16) -> Option<bool> {
        let leading = self.core.is_leader();
        let copies = self.core.copies_of(index);
        let in_sync = if leading { self.in_sync.count(&self.core) } else { 0 };
        move |needed: u16| {
            let needed = usize::from(needed);
            (leading && copies < needed).then_some(in_sync >= needed)
        }
    }

    /// Answers `acks=leader|none` waiters whose entries are persisted here, and
    /// fails waiters whose entries were replaced or cut off.
    fn resolve_appended(&mut self) {
        let last_index = self.core.store().last_index_value();
        let indexes: Vec<u64> = self.waiters.keys().copied().collect();
        for index in indexes {
            let Some(waiters) = self.waiters.remove(&index) else {
                continue;
            };
            let term_here = self.core.store().entry_term(index);
            let (replaced, kept): (Vec<Waiter<R>>, Vec<Waiter<R>>) = waiters
                .into_iter()
                .partition(|w| index > last_index || term_here.is_some_and(|t| t != w.term));
            for waiter in replaced {
                waiter.reply.answer(Err(BrokerError::LeadershipLost));
            }
            if !kept.is_empty() {
                self.waiters.insert(index, kept);
                self.resolve(index, false);
            }
        }
    }
}
