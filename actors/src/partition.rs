//! `PartitionReplica`: the actor that owns one replica's [`ReplicaCore`].
//!
//! Every message (a tick, a peer's Raft message, a produce, a fetch) is
//! handled, then the replica's ready state is drained: what Raft asks to
//! persist is persisted, outgoing messages go to the [`RaftRouter`], and
//! produce requests waiting for their entry are answered. A storage error
//! fails the actor; its supervisor restarts it from what is on disk.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use raft::eraftpb::Message;
use runnel_storage::{LogConfig, RecordBatch};

use crate::producers::SequenceCheck;
use crate::protocol::{Acks, BrokerError};
use crate::replica::{ReplicaConfig, ReplicaCore};

/// Produce requests waiting on one replica at most; more are refused as busy.
pub const WAITERS_MAX: usize = 8192;

/// Where a replica's outgoing Raft messages go.
pub trait RaftRouter: Send + Sync + 'static {
    fn send(&self, group: u64, messages: Vec<Message>);
}

/// Everything needed to (re)start a replica.
#[derive(Clone)]
pub struct ReplicaArgs {
    pub group: u64,
    pub dir: PathBuf,
    pub log_config: LogConfig,
    pub config: ReplicaConfig,
    /// The founding voters, for a brand-new group; `None` otherwise.
    pub bootstrap_voters: Option<Vec<u64>>,
    pub router: Arc<dyn RaftRouter>,
    /// Ticks and Raft messages queued for this instance (set at each spawn).
    pub queued: Arc<std::sync::atomic::AtomicUsize>,
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
    pub group: u64,
    pub id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub committed_offset: u64,
    pub end_offset: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

pub enum ReplicaMsg {
    Tick,
    Raft(Box<Message>),
    Produce {
        batch: RecordBatch,
        acks: Acks,
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
    Reconfigure(Vec<u64>),
    /// Test-only fault hook: the replica's handler panics, as a bug would.
    InjectPanic,
}

struct Waiter {
    /// The leader's term when it proposed: a different term at the index
    /// means the entry was replaced and the batch was not written.
    term: u64,
    acks: Acks,
    reply: RpcReplyPort<Result<u64, BrokerError>>,
}

pub struct ReplicaState {
    core: ReplicaCore,
    args: ReplicaArgs,
    /// By Raft index.
    waiters: BTreeMap<u64, Vec<Waiter>>,
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
        let mut core = ReplicaCore::open(
            &args.dir,
            args.log_config.clone(),
            &args.config,
            args.bootstrap_voters.as_deref(),
        )?;
        let preferred = args.bootstrap_voters.as_ref().and_then(|v| v.first()) == Some(&args.config.id);
        if preferred && core.is_fresh() {
            core.campaign()?;
            // Its vote requests go out with the first ready.
            let output = core.handle_ready()?;
            args.router.send(args.group, output.messages);
        }
        tracing::info!(
            group = args.group,
            id = args.config.id,
            end_offset = core.store().log().end_offset(),
            "replica started"
        );
        Ok(ReplicaState {
            core,
            args,
            waiters: BTreeMap::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ReplicaMsg>,
        message: ReplicaMsg,
        state: &mut ReplicaState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ReplicaMsg::Tick => {
                state.args.queued.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                state.core.tick();
            }
            ReplicaMsg::Raft(message) => {
                state.args.queued.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                state.core.step(*message)?
            }
            ReplicaMsg::Produce { batch, acks, reply } => state.produce(batch, acks, reply),
            ReplicaMsg::Fetch {
                offset,
                max_bytes,
                any_replica,
                reply,
            } => {
                let _ = reply.send(state.fetch(offset, max_bytes, any_replica)?);
            }
            ReplicaMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            ReplicaMsg::OffsetForTimestamp { timestamp_ms, reply } => {
                let answer = if state.core.is_leader() {
                    let committed = state.core.committed_offset();
                    let found = state.core.store().log().offset_for_timestamp(timestamp_ms)?;
                    Ok(found.filter(|&offset| offset < committed))
                } else {
                    Err(BrokerError::NotLeader {
                        group: state.args.group,
                        leader: state.core.leader_id(),
                    })
                };
                let _ = reply.send(answer);
            }
            ReplicaMsg::Reconfigure(desired) => {
                if let Some((change, node)) = state.core.step_towards(&desired)? {
                    tracing::info!(group = state.args.group, ?change, node, "membership change proposed");
                }
            }
            ReplicaMsg::InjectPanic => panic!("injected fault in the replica of group {}", state.args.group),
        }
        state.drive()?;
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ReplicaMsg>,
        state: &mut ReplicaState,
    ) -> Result<(), ActorProcessingErr> {
        state.core.persist_commit()?;
        Ok(())
    }
}

impl ReplicaState {
    fn produce(&mut self, batch: RecordBatch, acks: Acks, reply: RpcReplyPort<Result<u64, BrokerError>>) {
        let group = self.args.group;
        let limit_bytes = self.args.log_config.batch_bytes_max;
        if batch.size_bytes() > limit_bytes {
            let _ = reply.send(Err(BrokerError::BatchTooLarge {
                size_bytes: batch.size_bytes(),
                limit_bytes,
            }));
            return;
        }
        if self.waiters.values().map(Vec::len).sum::<usize>() >= WAITERS_MAX {
            let _ = reply.send(Err(BrokerError::Busy(group)));
            return;
        }
        // Attributes belong to the broker (a client-made control batch would
        // be read back as a Raft configuration change).
        if batch.header().attributes != 0 {
            let reason = format!("batch attributes must be 0, not {:#06x}", batch.header().attributes);
            let _ = reply.send(Err(BrokerError::InvalidRequest(reason)));
            return;
        }
        let producer = batch.header().producer;
        if producer.producer_id >= 0 && self.core.is_leader() {
            match self.core.store().producers().check(&producer, batch.record_count()) {
                SequenceCheck::New => {}
                SequenceCheck::Duplicate(original) => {
                    // A retry: answer with the original's fate, never write twice.
                    let store = self.core.store();
                    if original.index <= store.hard_state().commit {
                        let _ = reply.send(Ok(original.base_offset));
                    } else if let Some(term) = store.entry_term(original.index) {
                        self.waiters
                            .entry(original.index)
                            .or_default()
                            .push(Waiter { term, acks, reply });
                    } else {
                        let _ = reply.send(Err(BrokerError::LeadershipLost));
                    }
                    return;
                }
                SequenceCheck::Gap { expected, got } => {
                    let producer_id = producer.producer_id;
                    let _ = reply.send(Err(BrokerError::OutOfOrderSequence {
                        producer_id,
                        expected,
                        got,
                    }));
                    return;
                }
                SequenceCheck::Mismatch { last_sequence, index } => {
                    // Answered only about a committed batch: a producer that
                    // trims what is stored must never trim a batch that a
                    // new leader could still drop.
                    let error = if index > self.core.store().hard_state().commit {
                        BrokerError::NotYetCommitted(group)
                    } else {
                        BrokerError::SequenceMismatch {
                            producer_id: producer.producer_id,
                            base_sequence: producer.base_sequence,
                            stored_last_sequence: last_sequence,
                        }
                    };
                    let _ = reply.send(Err(error));
                    return;
                }
                SequenceCheck::UnknownProducer => {
                    let reason = format!(
                        "producer {} is not known here and its sequence {} is not 0; start a new producer",
                        producer.producer_id, producer.base_sequence
                    );
                    let _ = reply.send(Err(BrokerError::InvalidRequest(reason)));
                    return;
                }
                SequenceCheck::Stale { last_sequence, index } => {
                    let (producer_id, got) = (producer.producer_id, producer.base_sequence);
                    let error = if index > self.core.store().hard_state().commit {
                        BrokerError::NotYetCommitted(group)
                    } else {
                        BrokerError::StaleSequence {
                            producer_id,
                            last_sequence,
                            got,
                        }
                    };
                    let _ = reply.send(Err(error));
                    return;
                }
            }
        }
        match self.core.propose(batch) {
            Ok(index) => {
                let term = self.core.term();
                self.waiters
                    .entry(index)
                    .or_default()
                    .push(Waiter { term, acks, reply });
            }
            Err(crate::ActorError::NotLeader { leader }) => {
                let _ = reply.send(Err(BrokerError::NotLeader { group, leader }));
            }
            Err(_) => {
                let _ = reply.send(Err(BrokerError::Busy(group)));
            }
        }
    }

    fn fetch(
        &self,
        offset: u64,
        max_bytes: usize,
        any_replica: bool,
    ) -> Result<Result<Fetched, BrokerError>, ActorProcessingErr> {
        let group = self.args.group;
        if !any_replica && !self.core.is_leader() {
            return Ok(Err(BrokerError::NotLeader {
                group,
                leader: self.core.leader_id(),
            }));
        }
        let start = self.core.store().log().start_offset();
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

    fn status(&self) -> ReplicaStatus {
        let conf = self.core.store().conf_state();
        ReplicaStatus {
            group: self.args.group,
            id: self.core.id(),
            leader: self.core.leader_id(),
            term: self.core.term(),
            committed_offset: self.core.committed_offset(),
            end_offset: self.core.store().log().end_offset(),
            voters: conf.voters.clone(),
            learners: conf.learners.clone(),
        }
    }

    /// Drains ready state: persist, send, and answer waiting produces.
    fn drive(&mut self) -> Result<(), ActorProcessingErr> {
        while self.core.has_ready() {
            let output = self.core.handle_ready()?;
            if !output.messages.is_empty() {
                self.args.router.send(self.args.group, output.messages);
            }
            for committed in output.committed {
                self.resolve(committed.index, true);
            }
        }
        self.resolve_appended();
        Ok(())
    }

    /// Answers the waiters of a committed (or, for `acks=leader|none`,
    /// appended) entry: with its offset if the entry is the one proposed,
    /// else with `LeadershipLost`.
    fn resolve(&mut self, index: u64, committed: bool) {
        let Some(waiters) = self.waiters.remove(&index) else {
            return;
        };
        let store = self.core.store();
        let mut still_waiting = Vec::new();
        for waiter in waiters {
            if !committed && waiter.acks == Acks::All && !self.args.config.ack_before_commit {
                still_waiting.push(waiter);
                continue;
            }
            let result = match (store.entry_term(index), store.entry_offsets(index)) {
                (Some(term), Some((base_offset, _))) if term == waiter.term => Ok(base_offset),
                _ => Err(BrokerError::LeadershipLost),
            };
            let _ = waiter.reply.send(result);
        }
        if !still_waiting.is_empty() {
            self.waiters.insert(index, still_waiting);
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
            let (replaced, kept): (Vec<Waiter>, Vec<Waiter>) = waiters
                .into_iter()
                .partition(|w| index > last_index || term_here.is_some_and(|t| t != w.term));
            for waiter in replaced {
                let _ = waiter.reply.send(Err(BrokerError::LeadershipLost));
            }
            if !kept.is_empty() {
                self.waiters.insert(index, kept);
                self.resolve(index, false);
            }
        }
    }
}
