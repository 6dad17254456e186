//! One partition replica as a pure state machine around raft-rs's `RawNode`:
//! no sockets, no timers. Its owner calls [`ReplicaCore::tick`] on a clock,
//! feeds it peers' messages with [`ReplicaCore::step`], and after either calls
//! [`ReplicaCore::handle_ready`], which persists what Raft asks (entries, hard
//! state, fsync) and returns the messages to send and the entries that
//! committed. The actor and the network are a thin shell around this.

use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType,
};
use raft::{RawNode, StateRole};
use runnel_storage::{BatchHeader, LogConfig, RecordBatch};

use crate::error::{ActorError, Result};
use crate::protocol::PassiveAnswer;
use crate::raft_store::{CompactLimits, Compacted, LogCompaction, PartitionStore};

/// Ticks a replica just opened counts as already elapsed towards its first
/// election timeout: with the default timing, its first election comes after
/// 0.2-0.6 s instead of 0.5-0.9 s.
const FIRST_ELECTION_HEAD_START_TICKS: usize = 3;

/// Timing and limits of one replica.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// Raft id: the node id of the node holding the replica.
    pub id: u64,
    /// Ticks without a leader before an election (randomized up to twice this).
    pub election_tick: usize,
    /// Pins the randomized election timeout to `[min, max)` ticks instead.
    /// raft-rs draws it from the thread's RNG, so the deterministic
    /// simulation pins it to one value per replica (`max = min + 1`).
    pub election_tick_range: Option<(usize, usize)>,
    pub heartbeat_tick: usize,
    /// Bytes of entries in one append message.
    pub max_size_per_msg: u64,
    /// Append messages in flight to one follower.
    pub max_inflight_msgs: usize,
    /// Bytes proposed but not yet committed before proposals are refused.
    pub max_uncommitted_bytes: u64,
    /// The replica is created for a group that already has a history (its
    /// node was placed in the group after the group was founded, or is
    /// coming back after its old replica was removed and deleted). If it
    /// opens with nothing on disk it is *passive* (see [`ReplicaCore`]).
    pub rejoin: bool,
    /// A deliberately injected bug, for proving the chaos checker can fail:
    /// `acks=all` is answered once the leader appended, before the commit.
    /// Never set outside that test.
    pub ack_before_commit: bool,
    /// Whether the log is fsynced before this replica votes or acknowledges
    /// an append (once per Raft ready). Off (`runnel node --fsync never`),
    /// an acknowledged record survives any process crash, but a power loss
    /// of a majority before the OS writes it back may lose it.
    pub sync_log: bool,
}

impl ReplicaConfig {
    pub fn new(id: u64) -> ReplicaConfig {
        ReplicaConfig {
            id,
            // With the node's 100 ms tick: heartbeats every 200 ms, elections
            // after 0.5-0.9 s of silence (two missed heartbeats at least).
            election_tick: 5,
            election_tick_range: Some((5, 9)),
            heartbeat_tick: 2,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_uncommitted_bytes: 64 << 20,
            rejoin: false,
            ack_before_commit: false,
            sync_log: true,
        }
    }
}

/// A voter as its leader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VoterProgress {
    pub id: u64,
    /// The last index the leader knows the voter holds.
    pub matched: u64,
    /// Whether the leader heard from it since its last quorum check (every
    /// election timeout); briefly false for a live voter after each check.
    pub recently_heard: bool,
}

/// An entry of user records that committed, and where it sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    pub index: u64,
    pub base_offset: u64,
    pub next_offset: u64,
}

/// What one round of ready handling produced.
#[derive(Debug, Default)]
pub struct ReadyOutput {
    /// To send to peers (`Message::to`), in order.
    pub messages: Vec<Message>,
    pub committed: Vec<Committed>,
}

/// The file marking a passive replica; it holds the leader's commit index
/// when the replica first heard from a leader (empty until then).
const PASSIVE_FILE: &str = "passive";

/// One replica. A replica created empty for a group with a history is
/// *passive*: it starts from the founders' configuration (the one the log's
/// changes apply to), which may still count this node as a voter — but this
/// replica holds none of what that voter had. Until a configuration change
/// made after it first heard from a leader promotes it, it grants no votes,
/// never campaigns and never takes leadership; otherwise it and other
/// re-created replicas could form a majority of a stale configuration and
/// elect a leader that lacks committed entries (found by the simulation).
pub struct ReplicaCore {
    raw: RawNode<PartitionStore>,
    /// Where the passive marker lives, while passive.
    passive: Option<PathBuf>,
    /// A passive replica's first leader's commit index: only a promotion
    /// beyond it is about this incarnation.
    contact_commit: Option<u64>,
    /// Leadership transfers this replica started, to rotate their targets.
    transfers: usize,
}

impl ReplicaCore {
    /// Opens the replica in `dir`. A new founding replica passes the group's
    /// initial voters; a replica joining later (a learner) and a reopened one
    /// pass `None`.
    pub fn open(
        dir: &Path,
        log_config: LogConfig,
        config: &ReplicaConfig,
        bootstrap_voters: Option<&[u64]>,
    ) -> Result<ReplicaCore> {
        let mut store = PartitionStore::open(dir, log_config, config.sync_log)?;
        let marker = dir.join(PASSIVE_FILE);
        let fresh = store.conf_state().voters.is_empty() && store.last_index_value() == 0;
        if config.rejoin && fresh && store.hard_state().term == 0 {
            std::fs::write(&marker, b"").map_err(|e| ActorError::io(&marker, e))?;
        }
        let contact_commit = match std::fs::read_to_string(&marker) {
            Ok(text) => Some(text.trim().parse::<u64>().ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ActorError::io(&marker, e)),
        };
        if let Some(voters) = bootstrap_voters {
            if store.conf_state().voters.is_empty() && store.last_index_value() == 0 {
                store.bootstrap(voters)?;
            }
        }
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_tick,
            min_election_tick: config.election_tick_range.map_or(0, |(min, _)| min),
            max_election_tick: config.election_tick_range.map_or(0, |(_, max)| max),
            heartbeat_tick: config.heartbeat_tick,
            // Committed entries are already in the log, which is the state.
            applied: store.hard_state().commit,
            max_size_per_msg: config.max_size_per_msg,
            max_inflight_msgs: config.max_inflight_msgs,
            max_uncommitted_size: config.max_uncommitted_bytes,
            // Bounds what one ready loads when a replica catches up.
            max_committed_size_per_ready: 16 << 20,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        };
        raft_config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut raw = RawNode::new(&raft_config, store, &logger)?;
        // A replica just opened knows no leader: it looks for one after a
        // shorter first timeout (still randomized), so a restarted group
        // elects sooner. Pre-vote keeps a live leader undisturbed.
        let timeout = raw.raft.randomized_election_timeout();
        raw.raft.election_elapsed = FIRST_ELECTION_HEAD_START_TICKS.min(timeout.saturating_sub(1));
        Ok(ReplicaCore {
            raw,
            passive: contact_commit.is_some().then_some(marker),
            contact_commit: contact_commit.flatten(),
            transfers: 0,
        })
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    /// Starts an election now (a new group's preferred leader does, so
    /// leadership follows placement instead of whoever times out first).
    pub fn campaign(&mut self) -> Result<()> {
        if self.passive.is_some() {
            return Ok(());
        }
        Ok(self.raw.campaign()?)
    }

    /// Whether the replica has no entries and no vote yet: a group just founded.
    pub fn is_fresh(&self) -> bool {
        let store = self.raw.store();
        store.last_index_value() == 0 && store.hard_state().term == 0
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Whether this replica leads and the commit point it has stored is
    /// of its own term: only then is that point the partition's. A new
    /// leader may hold a commit point behind the one its predecessor
    /// reached until an entry of its own term commits (a read of "all
    /// committed records" must not stop short there).
    pub fn serves_reads(&self) -> bool {
        let raft = &self.raw.raft;
        let commit = self.raw.store().hard_state().commit;
        self.is_leader() && raft.raft_log.term(commit).is_ok_and(|term| term == raft.term)
    }

    /// The leader this replica knows of, if any.
    pub fn leader_id(&self) -> Option<u64> {
        let leader = self.raw.raft.leader_id;
        (leader != raft::INVALID_ID).then_some(leader)
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn store(&self) -> &PartitionStore {
        self.raw.store()
    }

    /// The offset after the last committed record.
    /// Whether this replica leads and knows the group's commit point: a
    /// Raft leader learns it only once an entry of its own term commits
    /// (raft-rs proposes an empty one on election); before that its commit
    /// index is the one it had as a follower, maybe behind the group's.
    pub fn knows_commit_point(&self) -> bool {
        let raft = &self.raw.raft;
        self.is_leader()
            && raft
                .raft_log
                .term(raft.raft_log.committed)
                .is_ok_and(|term| term == raft.term)
    }

    pub fn committed_offset(&self) -> u64 {
        self.raw.store().committed_offset()
    }

    /// Proposes a batch of records; returns the Raft index it will commit at.
    /// Only the leader accepts proposals.
    pub fn propose(&mut self, mut batch: RecordBatch) -> Result<u64> {
        if !self.is_leader() {
            return Err(ActorError::NotLeader {
                leader: self.leader_id(),
            });
        }
        // Stamped where it will land, the batch is written as it is, here and
        // on every follower: an append that had to restamp a batch whose
        // buffer Raft shares would copy all of it first. (Appends set both
        // stamps anyway; they are outside the CRC.)
        batch.set_raft_term(self.raw.raft.term);
        batch.set_base_offset(self.next_proposal_offset());
        match self.raw.propose(Vec::new(), batch.into_bytes()) {
            Ok(()) => Ok(self.raw.raft.raft_log.last_index()),
            Err(raft::Error::ProposalDropped) => {
                Err(ActorError::Backpressure(self.raw.raft.raft_log.last_index() as usize))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The offset after the log's last record once the entries Raft has not
    /// yet handed over for writing are written too (each entry that is not a
    /// batch of user records takes one offset, as a control batch).
    fn next_proposal_offset(&self) -> u64 {
        let raft_log = &self.raw.raft.raft_log;
        let mut offset = raft_log.store.log().end_offset();
        for entry in &raft_log.unstable.entries {
            let records = match entry.get_entry_type() {
                EntryType::EntryNormal if !entry.data.is_empty() => {
                    BatchHeader::parse(&entry.data).map_or(1, |h| u64::from(h.record_count))
                }
                _ => 1,
            };
            offset += records;
        }
        offset
    }

    /// Proposes moving where readers start to `offset` (Kafka's
    /// DeleteRecords): a control entry stored in the log, which every
    /// replica applies; returns its Raft index. Only the leader accepts it.
    pub fn propose_log_start(&mut self, offset: u64) -> Result<u64> {
        if !self.is_leader() {
            return Err(ActorError::NotLeader {
                leader: self.leader_id(),
            });
        }
        let mut entry = Entry {
            context: crate::raft_store::log_start_context(offset).into(),
            ..Entry::default()
        };
        // Stored in the log, so it goes with its segment (a held one would
        // stay until the snapshot point passed it).
        entry.sync_log = true;
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgPropose);
        message.from = self.raw.raft.id;
        message.set_entries(vec![entry].into());
        match self.raw.raft.step(message) {
            Ok(()) => Ok(self.raw.raft.raft_log.last_index()),
            Err(raft::Error::ProposalDropped) => {
                Err(ActorError::Backpressure(self.raw.raft.raft_log.last_index() as usize))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the whole segments below where readers start, as far as
    /// this replica has applied (see [`PartitionStore::delete_below_log_start`]).
    pub fn delete_below_log_start(&mut self) -> Result<Option<Compacted>> {
        if !self.raw.store().deletion_due() {
            return Ok(None);
        }
        let applied = self.raw.raft.raft_log.applied;
        self.raw.mut_store().delete_below_log_start(applied)
    }

    /// Whether this replica is passive (see [`ReplicaCore`]).
    pub fn is_passive(&self) -> bool {
        self.passive.is_some()
    }

    /// While passive, once it heard from a leader: that leader's commit
    /// index then. Only a promotion after it is about this incarnation.
    pub fn passive_since(&self) -> Option<u64> {
        self.passive.as_ref().and(self.contact_commit)
    }

    /// A peer's answer to the passive replica `node`, which first heard
    /// from a leader at commit index `since`. It was promoted if a
    /// committed change after `since` made it a voter: it may have missed
    /// that entry (cut off right after the change, then no leader can be
    /// elected without its vote, which it withholds while passive). A
    /// leader that counts it as a voter from before demotes it: no
    /// promotion would come otherwise.
    pub fn judge_passive(&mut self, node: u64, since: u64) -> Result<PassiveAnswer> {
        let store = self.raw.store();
        let voter = store.conf_state().voters.contains(&node);
        if voter && store.voter_since(node).is_some_and(|index| index > since) {
            return Ok(PassiveAnswer::Promoted);
        }
        if self.demote(node)? {
            return Ok(PassiveAnswer::Demoting);
        }
        Ok(PassiveAnswer::Unknown)
    }

    /// A peer answered [`PassiveAnswer::Promoted`]: the replica votes from
    /// now on, as it would after applying its promotion itself.
    pub fn promoted(&mut self) -> Result<()> {
        self.end_passive()
    }

    /// On the leader: makes voter `node` a learner again (see
    /// [`ReplicaCore::judge_passive`]); [`ReplicaCore::step_towards`]
    /// promotes it again once it has caught up. Returns whether the change
    /// was proposed.
    pub fn demote(&mut self, node: u64) -> Result<bool> {
        if !self.is_leader() || node == self.id() || self.raw.raft.has_pending_conf() {
            return Ok(false);
        }
        if !self.raw.raft.prs().conf().to_conf_state().voters.contains(&node) {
            return Ok(false);
        }
        self.propose_single_change(ConfChangeType::AddLearnerNode, node)
    }

    /// On the leader: hands leadership to voter `node` (the group's
    /// preferred replica) once it holds the whole log; raft-rs completes or
    /// abandons the transfer. Whether a transfer started.
    pub fn prefer_leader(&mut self, node: u64) -> bool {
        let raft = &self.raw.raft;
        if !self.is_leader() || node == self.id() || raft.has_pending_conf() || raft.lead_transferee.is_some() {
            return false;
        }
        if !raft.prs().conf().to_conf_state().voters.contains(&node) {
            return false;
        }
        let last = raft.raft_log.last_index();
        if raft.prs().get(node).is_none_or(|p| p.matched < last) {
            return false;
        }
        self.raw.transfer_leader(node);
        true
    }

    /// Hands leadership to one of `targets`; each call tries the next one,
    /// as a passive voter never takes it and would be picked every time.
    fn transfer_to_one_of(&mut self, targets: &[u64]) {
        if targets.is_empty() {
            return;
        }
        let target = targets[self.transfers % targets.len()];
        self.transfers = self.transfers.wrapping_add(1);
        self.raw.transfer_leader(target);
    }

    /// Proposes one simple configuration change; whether Raft took it (it
    /// drops proposals while leadership is being transferred).
    fn propose_single_change(&mut self, change_type: ConfChangeType, node: u64) -> Result<bool> {
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change_type);
        single.node_id = node;
        let mut change = ConfChangeV2::default();
        change.mut_changes().push(single);
        match self.raw.propose_conf_change(Vec::new(), change) {
            Ok(()) => Ok(true),
            Err(raft::Error::ProposalDropped) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Feeds a message from a peer. Messages from unknown peers are dropped.
    /// A heartbeat committing entries this replica does not hold means the
    /// leader saw it hold them: they were lost from disk. That is damage
    /// (the replica is rebuilt from its peers), not a crash to retry.
    pub fn step(&mut self, message: Message) -> Result<()> {
        let last_index = self.raw.raft.raft_log.last_index();
        if message.get_msg_type() == MessageType::MsgHeartbeat && message.commit > last_index {
            let reason = format!(
                "the leader counts entries up to index {} as held here, but the log ends at {last_index}: they were lost from disk",
                message.commit
            );
            return Err(ActorError::corrupt(self.raw.store().dir(), reason));
        }
        self.check_commit_by_vote(&message)?;
        if let Some(marker) = &self.passive {
            match message.get_msg_type() {
                MessageType::MsgRequestVote | MessageType::MsgRequestPreVote | MessageType::MsgTimeoutNow => {
                    return Ok(());
                }
                // An append names the leader's commit point; a snapshot does
                // not (its index may be far below it, and a promotion between
                // the two would be taken for one of this incarnation's).
                MessageType::MsgAppend if self.contact_commit.is_none() => {
                    let commit = message.commit;
                    std::fs::write(marker, commit.to_string()).map_err(|e| ActorError::io(marker, e))?;
                    self.contact_commit = Some(commit);
                }
                _ => {}
            }
        }
        match self.raw.step(message) {
            Ok(()) | Err(raft::Error::StepPeerNotFound) => Ok(()),
            // Local-only message types must never come from a peer.
            Err(raft::Error::StepLocalMsg) => {
                tracing::warn!(id = self.id(), "dropped a local-only Raft message from a peer");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A candidate that hears of a commit point beyond its own in a vote
    /// message moves its commit there and reads the entries in between at
    /// once (raft-rs's commit by vote), with no way to wait for one it cannot
    /// read: it stops the process. Those entries are read here first, so that
    /// damage among them fails the replica as damage (it is repaired).
    fn check_commit_by_vote(&self, message: &Message) -> Result<()> {
        let vote = matches!(
            message.get_msg_type(),
            MessageType::MsgRequestVote
                | MessageType::MsgRequestPreVote
                | MessageType::MsgRequestVoteResponse
                | MessageType::MsgRequestPreVoteResponse
        );
        let candidate = matches!(self.raw.raft.state, StateRole::Candidate | StateRole::PreCandidate);
        let committed = self.commit_index();
        if !vote || !candidate || message.commit <= committed {
            return Ok(());
        }
        let high = message.commit.min(self.last_index()) + 1;
        self.raw.store().check_readable(committed + 1, high)
    }

    /// Voters (this leader included) whose progress shows they hold entry
    /// `index`; 0 on a replica that does not lead.
    pub fn copies_of(&self, index: u64) -> usize {
        self.voter_progress().filter(|p| p.matched >= index).count()
    }

    /// What this leader knows of each voter (itself included); nothing on a
    /// replica that does not lead.
    pub fn voter_progress(&self) -> impl Iterator<Item = VoterProgress> + '_ {
        let prs = self.raw.raft.prs();
        let voters: &[u64] = if self.is_leader() {
            &self.raw.store().conf_state().voters
        } else {
            &[]
        };
        voters.iter().filter_map(move |&id| {
            let progress = prs.get(id)?;
            Some(VoterProgress {
                id,
                matched: progress.matched,
                recently_heard: progress.recent_active,
            })
        })
    }

    /// The index up to which this replica knows entries are committed.
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// The index of this replica's last log entry.
    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    /// Advances the logical clock; returns whether there may be work. A
    /// passive replica's clock stands still: it never campaigns.
    pub fn tick(&mut self) -> bool {
        if self.passive.is_some() {
            return false;
        }
        self.raw.tick()
    }

    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Persists what Raft asks, in the order it requires, and returns the
    /// messages to send and what committed.
    pub fn handle_ready(&mut self) -> Result<ReadyOutput> {
        let mut early = Vec::new();
        let mut out = self.handle_ready_sending(&mut |messages| early.extend(messages))?;
        early.append(&mut out.messages);
        out.messages = early;
        Ok(out)
    }

    /// As [`ReplicaCore::handle_ready`], but the messages that may go out
    /// before this replica persists (a leader's appends) are handed to `send`
    /// first, so followers write and sync while the leader does.
    pub fn handle_ready_sending(&mut self, send: &mut dyn FnMut(Vec<Message>)) -> Result<ReadyOutput> {
        let mut out = ReadyOutput::default();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        // The committed entries this ready applies are read from disk when
        // not in memory; a damaged one must surface as damage, not as a
        // panic inside Raft.
        let log = &self.raw.raft.raft_log;
        let (low, high) = (log.applied + 1, log.committed.min(log.persisted) + 1);
        if high > low {
            self.raw.store().check_readable(low, high)?;
        }
        let mut ready = self.raw.ready();
        let early = ready.take_messages();
        let mut snapshots_sent = snapshot_targets(&early);
        if !early.is_empty() {
            send(early);
        }
        if !ready.snapshot().is_empty() {
            self.raw.mut_store().apply_snapshot(ready.snapshot())?;
        }
        let committed = ready.take_committed_entries();
        self.apply(committed, &mut out)?;
        self.raw.mut_store().append(ready.entries())?;
        // Entries before hard state: a written commit index never runs ahead
        // of the durable log. Votes and acknowledgements go out after both.
        self.raw.mut_store().sync()?;
        if let Some(hard_state) = ready.hs() {
            self.raw.mut_store().set_hard_state(hard_state)?;
        }
        out.messages.extend(ready.take_persisted_messages());
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        out.messages.extend(light.take_messages());
        self.apply(light.take_committed_entries(), &mut out)?;
        self.raw.advance_apply();
        let applied = self.raw.raft.raft_log.applied;
        self.raw.mut_store().set_applied(applied);
        self.raw.mut_store().persist_commit_if_far()?;
        snapshots_sent.extend(snapshot_targets(&out.messages));
        for to in snapshots_sent {
            // A partition snapshot is a few bytes, applied as it arrives:
            // sent is as good as finished. raft-rs then probes the follower
            // again at the next heartbeat, and sends another snapshot if
            // this one was lost; unreported, it would wait for it forever.
            self.raw.report_snapshot(to, raft::SnapshotStatus::Finish);
        }
        Ok(out)
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut ReadyOutput) -> Result<()> {
        for entry in entries {
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => self.apply_control(&entry, out)?,
                EntryType::EntryNormal => {
                    let (base_offset, next_offset) = self.raw.store().entry_offsets(entry.index).ok_or_else(|| {
                        ActorError::InvalidState(format!("committed entry {} is not in the log", entry.index))
                    })?;
                    out.committed.push(Committed {
                        index: entry.index,
                        base_offset,
                        next_offset,
                    });
                }
                // Already in effect: a snapshot installed the sender's
                // configuration, which included it (or a restart re-delivers
                // a change applied before the commit index was written).
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2
                    if entry.index <= self.raw.store().conf_index() => {}
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data)
                        .map_err(|e| ActorError::InvalidState(format!("conf change {}: {e}", entry.index)))?;
                    let conf_state = self.raw.apply_conf_change(&change)?;
                    self.step_down_if_removed(&conf_state);
                    self.raw.mut_store().apply_conf_state(conf_state, entry.index)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let change = ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(|e| ActorError::InvalidState(format!("conf change {}: {e}", entry.index)))?;
                    let conf_state = self.raw.apply_conf_change(&change)?;
                    self.step_down_if_removed(&conf_state);
                    self.raw.mut_store().apply_conf_state(conf_state, entry.index)?;
                    let promotes_me = change
                        .get_changes()
                        .iter()
                        .any(|c| c.get_change_type() == ConfChangeType::AddNode && c.node_id == self.id());
                    if promotes_me && self.contact_commit.is_some_and(|commit| entry.index > commit) {
                        self.end_passive()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// An empty normal entry: a new leader's, or a log-start entry, which
    /// moves where readers start (and is answered as a committed entry).
    fn apply_control(&mut self, entry: &Entry, out: &mut ReadyOutput) -> Result<()> {
        let Some(offset) = crate::raft_store::decode_log_start(&entry.context) else {
            return Ok(());
        };
        self.raw.mut_store().set_log_start(offset)?;
        if let Some((base_offset, next_offset)) = self.raw.store().entry_offsets(entry.index) {
            out.committed.push(Committed {
                index: entry.index,
                base_offset,
                next_offset,
            });
        }
        Ok(())
    }

    /// A leader elected before its own removal committed stays leader of a
    /// configuration without it in raft-rs (which then panics counting its
    /// own progress on the next acknowledgement): it steps down, and the
    /// remaining voters elect one of themselves.
    fn step_down_if_removed(&mut self, conf_state: &raft::eraftpb::ConfState) {
        if self.is_leader() && !conf_state.voters.contains(&self.id()) {
            tracing::info!(id = self.id(), "leader removed from its group's voters; stepping down");
            let term = self.raw.raft.term;
            self.raw.raft.become_follower(term, raft::INVALID_ID);
            // What it sent as leader in this ready (appends after an earlier
            // change in the same batch) must not leave from a follower:
            // raft-rs refuses that. Raft recovers from the loss.
            self.raw.raft.msgs.clear();
        }
    }

    fn end_passive(&mut self) -> Result<()> {
        if let Some(marker) = self.passive.take() {
            std::fs::remove_file(&marker).map_err(|e| ActorError::io(&marker, e))?;
            tracing::info!(
                id = self.id(),
                "a re-created replica was promoted; it votes from now on"
            );
        }
        Ok(())
    }

    /// On the leader, proposes the next single configuration change that
    /// moves the group's voters to `desired`: add a missing node as a
    /// learner; promote a learner once it has caught up with the commit
    /// point; remove a learner that is not desired; then remove a voter that
    /// is not desired. One change at a time
    /// (each is a simple ConfChangeV2, so no joint state), none while one is
    /// pending. Returns the change proposed, if any.
    pub fn step_towards(&mut self, desired: &[u64]) -> Result<Option<(ConfChangeType, u64)>> {
        if !self.is_leader() || self.raw.raft.has_pending_conf() {
            return Ok(None);
        }
        let conf = self.raw.raft.prs().conf().to_conf_state();
        let committed = self.raw.raft.raft_log.committed;
        let caught_up = |node: u64| self.raw.raft.prs().get(node).is_some_and(|p| p.matched >= committed);
        let me = self.id();
        let change = if let Some(&node) = desired
            .iter()
            .find(|n| !conf.voters.contains(n) && !conf.learners.contains(n))
        {
            Some((ConfChangeType::AddLearnerNode, node))
        } else if let Some(&node) = desired.iter().find(|&&n| conf.learners.contains(&n) && caught_up(n)) {
            Some((ConfChangeType::AddNode, node))
        } else if let Some(&node) = conf.learners.iter().find(|n| !desired.contains(n)) {
            // Added for an assignment that moved on before it was promoted.
            Some((ConfChangeType::RemoveNode, node))
        } else if desired.iter().all(|n| conf.voters.contains(n)) {
            if !desired.contains(&me) && conf.voters.iter().all(|v| desired.contains(v) || *v == me) {
                // This leader is the one to leave: hand leadership to a
                // caught-up voter first; the new leader removes this one.
                let targets: Vec<u64> = desired.iter().copied().filter(|&n| caught_up(n)).collect();
                self.transfer_to_one_of(&targets);
                return Ok(None);
            }
            conf.voters
                .iter()
                .copied()
                .find(|v| !desired.contains(v) && *v != me)
                .map(|v| (ConfChangeType::RemoveNode, v))
        } else {
            None
        };
        let Some((change_type, node_id)) = change else {
            return Ok(None);
        };
        let proposed = self.propose_single_change(change_type, node_id)?;
        Ok(proposed.then_some((change_type, node_id)))
    }

    /// Simulates the node crashing now. With `mid_ready`, the crash strikes
    /// while a ready is being handled: its new entries were written but not
    /// synced, and nothing of it was sent. Unsynced log bytes are lost except
    /// the first `keep_unsynced_bytes`; the commit index is as last written.
    /// Returns the bytes lost. The replica must be dropped and reopened.
    pub fn crash(mut self, mid_ready: bool, keep_unsynced_bytes: u64) -> Result<u64> {
        if mid_ready && self.raw.has_ready() {
            let ready = self.raw.ready();
            if ready.snapshot().is_empty() {
                self.raw.mut_store().append(ready.entries())?;
            }
        }
        self.raw.mut_store().crash(keep_unsynced_bytes)
    }

    /// Writes the commit index too (it is otherwise written lazily); call it
    /// now and then and before a clean stop.
    pub fn persist_commit(&mut self) -> Result<()> {
        self.raw.mut_store().persist_hard_state()
    }

    /// A clean stop: the commit index saved, and the log closed cleanly so
    /// that the next open needs no crash recovery.
    pub fn close(&mut self) -> Result<()> {
        self.persist_commit()?;
        self.raw.mut_store().close_log()
    }

    /// Retention: deletes the oldest closed segments whose newest record is
    /// older than `retention_ms` at `now_ms`, as far as this replica has
    /// applied (see [`PartitionStore::compact_for_retention`]). Each replica
    /// decides on its own files; they hold the same records, so they agree.
    pub fn compact_for_retention(&mut self, now_ms: i64, retention_ms: u64) -> Result<Option<Compacted>> {
        let applied = self.raw.raft.raft_log.applied;
        self.raw
            .mut_store()
            .compact_for_retention(now_ms, retention_ms, applied)
    }

    /// Log compaction (`cleanup.policy` compact): up to `steps_max`
    /// bounded steps over what this replica has applied (see
    /// [`PartitionStore::compact_log`]).
    /// Only the leader lets expired tombstones go, below the entries every
    /// replica (learners too) holds.
    pub fn compact_log(
        &mut self,
        now_ms: i64,
        policy: runnel_storage::CompactionPolicy,
        steps_max: usize,
    ) -> Result<LogCompaction> {
        let all_hold = match self.is_leader() {
            true => self.raw.raft.prs().iter().map(|(_, p)| p.matched).min().unwrap_or(0),
            false => 0,
        };
        let limits = CompactLimits {
            now_ms,
            policy,
            applied: self.raw.raft.raft_log.applied,
            all_hold,
            steps_max,
        };
        self.raw.mut_store().compact_log(limits)
    }

    /// Committed batches from `offset` (control batches included; a consumer
    /// skips them), up to `max_bytes`.
    pub fn read_committed(&self, offset: u64, max_bytes: usize) -> Result<Vec<RecordBatch>> {
        let store = self.raw.store();
        Ok(store.log().read_until(offset, max_bytes, store.committed_offset())?)
    }
}

/// The peers `messages` send a snapshot to.
fn snapshot_targets(messages: &[Message]) -> Vec<u64> {
    messages
        .iter()
        .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
        .map(|m| m.to)
        .collect()
}
