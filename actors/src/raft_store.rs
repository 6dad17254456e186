//! The Raft log of a partition *is* its record log.
//!
//! A normal Raft entry's data is an encoded batch of user records, stored as
//! one batch in the partition's [`Log`]. Any other entry (the empty entry a
//! new leader appends, a configuration change) is a *control entry*, held in
//! the metadata file beside the log so that it takes no offset (see
//! [`controls`]); past that file's bound one goes into the log as a *control
//! batch* of one record that consumers skip. A batch's base offset is
//! assigned when it is appended, as the log's end offset; since every replica
//! appends the same entries in the same order, every replica assigns the same
//! offsets, and one offset names one record everywhere.
//!
//! The Raft index of the log's first entry is kept in the replica's metadata
//! file; walking the log's batches and the held control entries in index
//! order rebuilds the map from index to (offsets, term) on open, from batch
//! headers alone.
//!
//! Metadata (`raft.meta`, a [`DurableKv`]): hard state (term, vote, commit),
//! configuration, and the snapshot point (index, term and the log offset where
//! the log starts after a snapshot was installed).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use runnel_storage::batch::ATTRIBUTE_CONTROL;
use runnel_storage::{
    BatchBuilder, CompactionOutcome, CompactionSettings, CompactionStep, Compactor, DurableKv, FsyncPolicy, Log,
    LogConfig, Record, RecordBatch,
};
use serde::{Deserialize, Serialize};

use crate::error::{ActorError, Result};
use crate::producers::ProducerTable;

mod controls;
use controls::{ControlEntry, HeldControls, KEY_CONTROL_ENTRIES};

const META_FILE: &str = "raft.meta";
const KEY_HARD_STATE: &str = "hard_state";
const KEY_CONF_STATE: &str = "conf_state";
const KEY_SNAPSHOT: &str = "snapshot";
const KEY_VOTERS_SINCE: &str = "voters_since";
/// The index of the last configuration change the stored conf state
/// reflects (absent in stores written before retention existed: 0).
const KEY_CONF_INDEX: &str = "conf_index";
/// The first offset a reader may read, as deletions of records (Kafka's
/// DeleteRecords) last moved it; absent: 0 (see [`PartitionStore::first_offset`]).
const KEY_LOG_START: &str = "log_start";
/// The context of a log-start entry: this prefix, then the offset (8 bytes,
/// little-endian). An empty normal entry with it is a control entry stored
/// in the log (one offset, see [`controls`]), replicated as any entry.
const LOG_START_CONTEXT: &[u8] = b"runnel.log_start.v1:";
/// Present while a snapshot from the leader is being installed: the
/// metadata describes it, and the log may still hold the old entries.
const KEY_INSTALLING: &str = "installing";
/// Snapshot data, format 2: this byte, the log's start offset and the conf
/// index (format 1 was the start offset alone, 8 bytes).
const SNAPSHOT_DATA_V2: u8 = 2;
/// Entries committed between two writes of the commit index at most.
const COMMIT_PERSIST_EVERY: u64 = 1024;

/// Where one entry sits in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EntrySlot {
    base_offset: u64,
    next_offset: u64,
    term: u64,
}

/// The snapshot point: the log starts right after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotPoint {
    index: u64,
    term: u64,
    /// The offset of the first record after the snapshot point.
    start_offset: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StoredHardState {
    term: u64,
    vote: u64,
    commit: u64,
}

/// What one call of [`PartitionStore::compact_log`] may do.
#[derive(Clone, Copy, Debug)]
pub struct CompactLimits {
    pub now_ms: i64,
    pub policy: runnel_storage::CompactionPolicy,
    /// Compaction looks at entries up to this one (applied, so committed).
    pub applied: u64,
    /// Entries up to this one are on every replica (0: unknown here).
    pub all_hold: u64,
    pub steps_max: usize,
}

/// Where log compaction stands after [`PartitionStore::compact_log`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogCompaction {
    /// A pass is under way: call again.
    pub more: bool,
    /// The pass that ended in these steps.
    pub finished: Option<CompactionOutcome>,
}

/// What one retention pass deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compacted {
    /// The new snapshot point: the last entry deleted.
    pub index: u64,
    /// Where the log starts now.
    pub start_offset: u64,
    pub segments: usize,
    pub bytes: u64,
}

/// Raft storage for one partition replica.
pub struct PartitionStore {
    dir: PathBuf,
    log: Log,
    meta: DurableKv,
    snapshot: SnapshotPoint,
    /// One slot per entry, from index `snapshot.index + 1`.
    slots: VecDeque<EntrySlot>,
    /// Control entries held beside the log (a slot of no width each).
    controls: HeldControls,
    hard_state: HardState,
    /// Term and vote as last written to disk; commit is written lazily.
    persisted: StoredHardState,
    conf_state: ConfState,
    /// The index of the last configuration change `conf_state` reflects: a
    /// replica restored from a snapshot holds the sender's configuration,
    /// which may already include changes still in the log after the
    /// snapshot point; those are not applied a second time.
    conf_index: u64,
    /// Voter → the index of the committed change that made it a voter, for
    /// voters added by a change this replica applied (founders and voters
    /// of an installed snapshot have none): what tells a passive replica
    /// that it was promoted (see [`crate::ReplicaCore`]).
    voters_since: BTreeMap<u64, u64>,
    /// Entries appended but not yet synced.
    unsynced: bool,
    /// Whether [`PartitionStore::sync`] fsyncs (see `ReplicaConfig::sync_log`).
    sync_log: bool,
    /// Idempotent producers' recent batches in this log.
    producers: ProducerTable,
    /// The entries appended last, in index order, as Raft handed them over
    /// (their data shares its buffer): Raft reads what it just appended right
    /// back, to apply it and to send it to a follower, and from here that
    /// costs no read, decode or checksum. At most [`RECENT_BYTES_MAX`] of data.
    recent: VecDeque<Entry>,
    recent_bytes: usize,
    /// Damage Raft met reading entries (to send them to a follower): Raft
    /// only learns that the entries are unavailable, so the replica's
    /// owner checks this after driving it ([`PartitionStore::read_damage`]).
    read_damage: std::sync::OnceLock<String>,
    /// Log compaction's pass under way (topics with `cleanup.policy`
    /// compact); in memory only, as a new pass starts over safely.
    compactor: Compactor,
    /// Where the last applied log-start entry moved the readable log
    /// ([`KEY_LOG_START`]); whole segments below it are deleted.
    log_start: u64,
    /// The last entry the replica applied: the commit index written never
    /// passes it, so a restart applies again every entry it had not (a
    /// log-start entry, a configuration change) rather than skip it.
    applied: u64,
}

/// The context of a log-start entry moving the readable log to `offset`.
pub fn log_start_context(offset: u64) -> Vec<u8> {
    let mut context = LOG_START_CONTEXT.to_vec();
    context.extend_from_slice(&offset.to_le_bytes());
    context
}

/// The offset a log-start entry's context names; `None` for any other.
pub fn decode_log_start(context: &[u8]) -> Option<u64> {
    let word = context.strip_prefix(LOG_START_CONTEXT)?;
    Some(u64::from_le_bytes(word.try_into().ok()?))
}

/// Data bytes of recently appended entries kept in memory per replica.
const RECENT_BYTES_MAX: usize = 4 << 20;

/// What a remembered entry counts against [`RECENT_BYTES_MAX`].
fn remembered_bytes(entry: &Entry) -> usize {
    entry.data.len() + entry.context.len()
}

impl PartitionStore {
    /// Marks the log cleanly shut down (indexes and `log.meta` saved), so
    /// that the next open skips crash recovery; the log takes no more writes.
    pub fn close_log(&mut self) -> Result<()> {
        Ok(self.log.mark_clean()?)
    }

    /// The replica's directory, for errors that name it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens the replica's storage in `dir`, creating it empty if needed;
    /// `sync_log` says whether [`PartitionStore::sync`] fsyncs the log.
    pub fn open(dir: &Path, log_config: LogConfig, sync_log: bool) -> Result<PartitionStore> {
        std::fs::create_dir_all(dir).map_err(|e| ActorError::io(dir, e))?;
        // The store syncs once per Raft ready, not once per batch.
        let mut log = Log::open(
            dir.join("log"),
            LogConfig {
                fsync: FsyncPolicy::Never,
                ..log_config
            },
        )?;
        let mut meta = DurableKv::open(dir.join(META_FILE))?;
        let StoredMeta {
            snapshot,
            mut stored,
            conf_state,
            conf_index,
            voters_since,
            log_start,
        } = StoredMeta::read(dir, &meta)?;
        if meta.get(KEY_INSTALLING).is_some() {
            // A snapshot's install stopped before the old log was gone:
            // the metadata describes the snapshot; the log restarts at it.
            log.reset(snapshot.start_offset)?;
            meta.remove(KEY_INSTALLING)?;
        } else if log.start_offset() < snapshot.start_offset {
            // A compaction moved the snapshot point, then stopped before
            // every segment below it was deleted: finish it.
            log.delete_before(snapshot.start_offset)
                .map_err(|e| ActorError::corrupt(dir, format!("finishing a compaction: {e}")))?;
        }
        if log.start_offset() != snapshot.start_offset {
            let reason = format!(
                "log starts at {} but the snapshot point says {}",
                log.start_offset(),
                snapshot.start_offset
            );
            return Err(ActorError::corrupt(dir, reason));
        }
        let mut controls = HeldControls::decode(meta.get(KEY_CONTROL_ENTRIES), meta.path())?;
        let (slots, producers) = index_log(&log, &snapshot, &controls, meta.path())?;
        let last_index = snapshot.index + slots.len() as u64;
        // Held past the log's end: the log lost an unsynced tail before them.
        let beyond = controls.remove_from(last_index + 1);
        if controls.remove_through(snapshot.index) || beyond {
            meta.set(KEY_CONTROL_ENTRIES, controls.encode()?)?;
        }
        check_commit(dir, &mut stored, last_index, sync_log)?;
        let commit = stored.commit.max(snapshot.index);
        let hard_state = HardState {
            term: stored.term,
            vote: stored.vote,
            commit,
            ..HardState::default()
        };
        Ok(PartitionStore {
            dir: dir.to_path_buf(),
            log,
            meta,
            snapshot,
            slots,
            controls,
            hard_state,
            persisted: stored,
            conf_state,
            conf_index,
            voters_since,
            unsynced: false,
            sync_log,
            producers,
            recent: VecDeque::new(),
            recent_bytes: 0,
            read_damage: std::sync::OnceLock::new(),
            log_start,
            applied: commit,
            compactor: Compactor::default(),
        })
    }

    /// Sets the initial voters of a new group (every founding replica must get
    /// the same set). Refused once the replica has any state.
    pub fn bootstrap(&mut self, voters: &[u64]) -> Result<()> {
        if !self.conf_state.voters.is_empty() || !self.slots.is_empty() || self.hard_state.term != 0 {
            return Err(ActorError::InvalidState(format!(
                "{} already holds a replica",
                self.dir.display()
            )));
        }
        let conf_state = ConfState {
            voters: voters.to_vec(),
            ..ConfState::default()
        };
        self.set_conf_state(conf_state, 0)
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The first damage met while Raft read entries, as an error naming the
    /// file and what is wrong.
    pub fn read_damage(&self) -> Option<ActorError> {
        self.read_damage
            .get()
            .map(|reason| ActorError::corrupt(&self.dir, reason.clone()))
    }

    pub fn first_index_value(&self) -> u64 {
        self.snapshot.index + 1
    }

    pub fn last_index_value(&self) -> u64 {
        self.snapshot.index + self.slots.len() as u64
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    fn slot(&self, index: u64) -> Option<EntrySlot> {
        let position = index.checked_sub(self.snapshot.index + 1)?;
        self.slots.get(usize::try_from(position).ok()?).copied()
    }

    pub fn producers(&self) -> &ProducerTable {
        &self.producers
    }

    /// Rebuilds the producer table from the log (after its tail changed).
    fn rebuild_producers(&mut self) -> Result<()> {
        let (slots, producers) = index_log(&self.log, &self.snapshot, &self.controls, self.meta.path())?;
        debug_assert_eq!(slots, self.slots);
        self.producers = producers;
        Ok(())
    }

    /// The term of entry `index`, if the log holds it.
    pub fn entry_term(&self, index: u64) -> Option<u64> {
        self.slot(index).map(|s| s.term)
    }

    /// The offset range `[base, next)` that entry `index` occupies.
    pub fn entry_offsets(&self, index: u64) -> Option<(u64, u64)> {
        self.slot(index).map(|s| (s.base_offset, s.next_offset))
    }

    /// The offset after the last committed record: consumers read below it.
    pub fn committed_offset(&self) -> u64 {
        match self.slot(self.hard_state.commit) {
            Some(slot) => slot.next_offset,
            None => self.snapshot.start_offset,
        }
    }

    /// Appends entries from a Raft ready, first cutting off any conflicting
    /// tail from the first new index on.
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        let Some(first) = entries.first() else { return Ok(()) };
        if first.index <= self.snapshot.index {
            return Err(ActorError::InvalidState(format!(
                "entry {} is at or below the snapshot point {}",
                first.index, self.snapshot.index
            )));
        }
        if first.index > self.last_index_value() + 1 {
            return Err(ActorError::InvalidState(format!(
                "entry {} leaves a gap after {}",
                first.index,
                self.last_index_value()
            )));
        }
        if let Some(slot) = self.slot(first.index) {
            // The log first (synced): see the order in [`controls`].
            self.log.truncate(slot.base_offset)?;
            self.slots.truncate((first.index - self.snapshot.index - 1) as usize);
            if self.controls.remove_from(first.index) {
                self.write_controls()?;
            }
            self.rebuild_producers()?;
            self.forget_recent_from(first.index);
        }
        let mut unwritten_controls = false;
        for entry in entries {
            debug_assert_eq!(entry.index, self.last_index_value() + 1);
            let at = self.log.end_offset();
            if ControlEntry::is_held(entry) {
                self.controls.hold(entry, at, self.meta.path())?;
                self.push_slot(at, at, entry);
                unwritten_controls = true;
                continue;
            }
            if std::mem::take(&mut unwritten_controls) {
                // Before the log holds anything after them.
                self.write_controls()?;
            }
            let mut batch = entry_to_batch(entry)?;
            let base_offset = self.log.append(&mut batch)?;
            self.push_slot(base_offset, batch.next_offset(), entry);
            self.producers.record(batch.header(), entry.index);
        }
        if unwritten_controls {
            self.write_controls()?;
        }
        self.unsynced = true;
        Ok(())
    }

    fn push_slot(&mut self, base_offset: u64, next_offset: u64, entry: &Entry) {
        self.slots.push_back(EntrySlot {
            base_offset,
            next_offset,
            term: entry.term,
        });
        self.remember(entry);
    }

    fn write_controls(&mut self) -> Result<()> {
        let bytes = self.controls.encode()?;
        self.meta.set(KEY_CONTROL_ENTRIES, bytes)?;
        Ok(())
    }

    /// Keeps an appended entry in memory, letting the oldest go past the bound.
    fn remember(&mut self, entry: &Entry) {
        let bytes = remembered_bytes(entry);
        if bytes > RECENT_BYTES_MAX {
            self.recent.clear();
            self.recent_bytes = 0;
            return;
        }
        self.recent.push_back(entry.clone());
        self.recent_bytes += bytes;
        while self.recent_bytes > RECENT_BYTES_MAX {
            let Some(oldest) = self.recent.pop_front() else { break };
            self.recent_bytes -= remembered_bytes(&oldest);
        }
    }

    /// Drops the remembered entries from `index` on (a conflicting tail was cut off).
    fn forget_recent_from(&mut self, index: u64) {
        while self.recent.back().is_some_and(|e| e.index >= index) {
            if let Some(entry) = self.recent.pop_back() {
                self.recent_bytes -= remembered_bytes(&entry);
            }
        }
    }

    /// A remembered entry, if `index` is among them.
    fn recent_entry(&self, index: u64) -> Option<&Entry> {
        let first = self.recent.front()?.index;
        let entry = self.recent.get(usize::try_from(index.checked_sub(first)?).ok()?)?;
        debug_assert_eq!(entry.index, index);
        Some(entry)
    }

    /// Reads entries `low..high` that are not held in memory, checking them
    /// as any read does (a batch's CRC among others): a damaged one is an
    /// error here (damage, see `ActorError::is_damage`) rather than inside
    /// Raft, which cannot go on without an entry it must apply.
    pub fn check_readable(&self, low: u64, high: u64) -> Result<()> {
        for index in low..high {
            if self.recent_entry(index).is_some() {
                continue;
            }
            if let Some(slot) = self.slot(index) {
                self.read_entry(index, slot)?;
            }
        }
        Ok(())
    }

    /// Makes appended entries durable. Raft answers votes and appends only
    /// after this; without `sync_log` it leaves them to the OS, and a power
    /// loss may lose entries a leader counted.
    pub fn sync(&mut self) -> Result<()> {
        if self.unsynced && self.sync_log {
            self.log.flush()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Simulates a crash: entries appended since the last sync are lost
    /// except their first `keep_unsynced_bytes` (see [`Log::crash`]); the
    /// store refuses further writes and must be dropped and reopened.
    pub fn crash(&mut self, keep_unsynced_bytes: u64) -> Result<u64> {
        Ok(self.log.crash(keep_unsynced_bytes)?)
    }

    /// Writes the commit index when it has moved far since last written, so a
    /// restart after a crash does not re-read a long committed stretch.
    pub fn persist_commit_if_far(&mut self) -> Result<()> {
        if self.writable_commit() >= self.persisted.commit + COMMIT_PERSIST_EVERY {
            self.persist_hard_state()?;
        }
        Ok(())
    }

    /// Records a new hard state. Term and vote are written (atomically, with
    /// fsync) before anything else happens; the commit index is written later
    /// (it can be relearned, and a lower one after a crash is safe).
    pub fn set_hard_state(&mut self, hard_state: &HardState) -> Result<()> {
        self.hard_state = hard_state.clone();
        if hard_state.term != self.persisted.term || hard_state.vote != self.persisted.vote {
            self.persist_hard_state()?;
        }
        Ok(())
    }

    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    /// Records the last entry the replica applied (see `applied`).
    pub fn set_applied(&mut self, applied: u64) {
        self.applied = applied;
    }

    /// The commit index as it may be written: not past what was applied.
    fn writable_commit(&self) -> u64 {
        self.hard_state.commit.min(self.applied)
    }

    /// Writes the full hard state, commit included (as far as applied).
    pub fn persist_hard_state(&mut self) -> Result<()> {
        let stored = StoredHardState {
            term: self.hard_state.term,
            vote: self.hard_state.vote,
            commit: self.writable_commit(),
        };
        write_meta(&mut self.meta, KEY_HARD_STATE, &stored)?;
        self.persisted = stored;
        Ok(())
    }

    /// Sets the configuration without a change that led to it (founding,
    /// snapshot): no voter has a known promotion index.
    pub fn set_conf_state(&mut self, conf_state: ConfState, conf_index: u64) -> Result<()> {
        self.write_conf_state(conf_state, BTreeMap::new(), conf_index)
    }

    /// Sets the configuration a committed change at `index` produced; the
    /// voters it added are recorded as voters since `index`.
    pub fn apply_conf_state(&mut self, conf_state: ConfState, index: u64) -> Result<()> {
        let mut voters_since = self.voters_since.clone();
        voters_since.retain(|voter, _| conf_state.voters.contains(voter));
        for &voter in &conf_state.voters {
            if !self.conf_state.voters.contains(&voter) {
                voters_since.insert(voter, index);
            }
        }
        self.write_conf_state(conf_state, voters_since, index)
    }

    /// The index of the last configuration change the stored configuration
    /// reflects: a change at or below it is already in effect.
    pub fn conf_index(&self) -> u64 {
        self.conf_index
    }

    fn write_conf_state(
        &mut self,
        conf_state: ConfState,
        voters_since: BTreeMap<u64, u64>,
        conf_index: u64,
    ) -> Result<()> {
        let conf_bytes = conf_state
            .write_to_bytes()
            .map_err(|e| ActorError::InvalidState(format!("encoding a conf state: {e}")))?;
        let since_bytes = postcard::to_allocvec(&voters_since)
            .map_err(|e| ActorError::InvalidState(format!("encoding {KEY_VOTERS_SINCE}: {e}")))?;
        let index_bytes = postcard::to_allocvec(&conf_index)
            .map_err(|e| ActorError::InvalidState(format!("encoding {KEY_CONF_INDEX}: {e}")))?;
        // One atomic write: the three always describe the same configuration.
        self.meta.update(|entries| {
            entries.insert(KEY_CONF_STATE.to_string(), conf_bytes);
            entries.insert(KEY_VOTERS_SINCE.to_string(), since_bytes);
            entries.insert(KEY_CONF_INDEX.to_string(), index_bytes);
        })?;
        self.conf_state = conf_state;
        self.voters_since = voters_since;
        self.conf_index = conf_index;
        Ok(())
    }

    /// The index of the committed change that made `node` a voter, if this
    /// replica applied it and `node` is a voter still.
    pub fn voter_since(&self, node: u64) -> Option<u64> {
        self.voters_since.get(&node).copied()
    }

    /// Installs a snapshot from the leader: the log restarts empty at the
    /// snapshot's offset, and entries continue from its index.
    pub fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<()> {
        let metadata = snapshot.get_metadata();
        let data = SnapshotData::decode(&snapshot.data)?;
        let start_offset = data.start_offset;
        let point = SnapshotPoint {
            index: metadata.index,
            term: metadata.term,
            start_offset,
        };
        let stored = StoredHardState {
            term: self.hard_state.term.max(metadata.term),
            vote: self.hard_state.vote,
            commit: self.hard_state.commit.max(metadata.index),
        };
        let conf_state = metadata.get_conf_state().clone();
        let conf_index = data.conf_index.max(metadata.index);
        // Everything the snapshot sets, in one atomic write, marked as an
        // install until the old log is gone: a crash in between resets the
        // log on the next open (`PartitionStore::open`).
        let encode = |key: &str, bytes: std::result::Result<Vec<u8>, String>| {
            bytes.map_err(|e| ActorError::InvalidState(format!("encoding {key}: {e}")))
        };
        let point_bytes = encode(KEY_SNAPSHOT, postcard::to_allocvec(&point).map_err(|e| e.to_string()))?;
        let hard_bytes = encode(
            KEY_HARD_STATE,
            postcard::to_allocvec(&stored).map_err(|e| e.to_string()),
        )?;
        let conf_bytes = encode(KEY_CONF_STATE, conf_state.write_to_bytes().map_err(|e| e.to_string()))?;
        let since_bytes = encode(
            KEY_VOTERS_SINCE,
            postcard::to_allocvec(&BTreeMap::<u64, u64>::new()).map_err(|e| e.to_string()),
        )?;
        let index_bytes = encode(
            KEY_CONF_INDEX,
            postcard::to_allocvec(&conf_index).map_err(|e| e.to_string()),
        )?;
        self.meta.update(|entries| {
            entries.insert(KEY_SNAPSHOT.to_string(), point_bytes);
            entries.insert(KEY_HARD_STATE.to_string(), hard_bytes);
            entries.insert(KEY_CONF_STATE.to_string(), conf_bytes);
            entries.insert(KEY_VOTERS_SINCE.to_string(), since_bytes);
            entries.insert(KEY_CONF_INDEX.to_string(), index_bytes);
            entries.remove(KEY_CONTROL_ENTRIES);
            entries.insert(KEY_INSTALLING.to_string(), vec![1]);
        })?;
        self.log.reset(start_offset)?;
        self.meta.remove(KEY_INSTALLING)?;
        self.slots.clear();
        self.controls.clear();
        self.producers.clear();
        self.recent.clear();
        self.recent_bytes = 0;
        self.snapshot = point;
        self.hard_state.term = stored.term;
        self.hard_state.commit = stored.commit;
        self.persisted = stored;
        self.applied = self.applied.max(point.index);
        self.conf_state = conf_state;
        self.voters_since = BTreeMap::new();
        self.conf_index = conf_index;
        Ok(())
    }

    /// Lets retention delete the log's oldest closed segments whose newest
    /// record is older than `retention_ms` at `now_ms`, up to entry
    /// `applied` at most. The snapshot point moves to the last deleted
    /// entry first, then the files go: a crash in between is finished on
    /// the next open. A follower that needs a deleted entry gets a snapshot
    /// instead ([`raft::Storage::snapshot`]). `None` when nothing expired.
    pub fn compact_for_retention(&mut self, now_ms: i64, retention_ms: u64, applied: u64) -> Result<Option<Compacted>> {
        let point = self.log.retention_point(now_ms, retention_ms);
        self.delete_before_point(point, applied)
    }

    /// Deletes the whole segments below the readable log's start, which a
    /// log-start entry moved ([`PartitionStore::set_log_start`]), up to
    /// entry `applied` at most; `None` when no segment lies wholly below it.
    pub fn delete_below_log_start(&mut self, applied: u64) -> Result<Option<Compacted>> {
        let point = self.log.boundary_at_or_below(self.log_start);
        self.delete_before_point(point, applied)
    }

    /// Whether segments wait to be deleted below the readable log's start
    /// (cheap: what [`PartitionStore::delete_below_log_start`] checks first).
    pub fn deletion_due(&self) -> bool {
        self.log.boundary_at_or_below(self.log_start) > self.snapshot.start_offset
            || self.log.start_offset() < self.snapshot.start_offset
    }

    /// The first offset a reader may read: where the log starts, or where
    /// a log-start entry moved it past that (the records between stay on
    /// disk until their segment goes whole).
    pub fn first_offset(&self) -> u64 {
        self.log.start_offset().max(self.log_start)
    }

    /// Applies a committed log-start entry: readers start at `offset` from
    /// now on (written at once; a later entry never moves it back).
    pub fn set_log_start(&mut self, offset: u64) -> Result<()> {
        if offset <= self.log_start {
            return Ok(());
        }
        let bytes = postcard::to_allocvec(&offset)
            .map_err(|e| ActorError::InvalidState(format!("encoding {KEY_LOG_START}: {e}")))?;
        self.meta.set(KEY_LOG_START, bytes)?;
        self.log_start = offset;
        Ok(())
    }

    /// Moves the snapshot point to the entry that ends at segment boundary
    /// `point`, if past it, then deletes the segments below.
    fn delete_before_point(&mut self, point: u64, applied: u64) -> Result<Option<Compacted>> {
        if self.log.start_offset() < self.snapshot.start_offset {
            // An earlier pass failed part-way through deleting its files.
            self.log.delete_before(self.snapshot.start_offset)?;
        }
        if point <= self.snapshot.start_offset {
            return Ok(None);
        }
        let position = self.slots.partition_point(|slot| slot.next_offset < point);
        let Some(slot) = self
            .slots
            .get(position)
            .copied()
            .filter(|slot| slot.next_offset == point)
        else {
            return Err(ActorError::corrupt(
                &self.dir,
                format!("no entry ends at segment boundary {point}"),
            ));
        };
        let index = self.snapshot.index + 1 + position as u64;
        if index > applied {
            // A replica still catching up: the next pass compacts.
            return Ok(None);
        }
        let compacted = SnapshotPoint {
            index,
            term: slot.term,
            start_offset: point,
        };
        let point_bytes = postcard::to_allocvec(&compacted)
            .map_err(|e| ActorError::InvalidState(format!("encoding {KEY_SNAPSHOT}: {e}")))?;
        let mut kept_controls = self.controls.clone();
        kept_controls.remove_through(index);
        let controls_bytes = kept_controls.encode()?;
        // One atomic write: the held control entries below the point go
        // with it (and from memory only once it is written).
        self.meta.update(|entries| {
            entries.insert(KEY_SNAPSHOT.to_string(), point_bytes);
            entries.insert(KEY_CONTROL_ENTRIES.to_string(), controls_bytes);
        })?;
        self.controls = kept_controls;
        // Memory follows the written point before any file goes, so that a
        // deletion failing part-way leaves a store that agrees with its
        // metadata (the next pass, or the next open, deletes the rest).
        self.slots.drain(..=position);
        self.snapshot = compacted;
        while self.recent.front().is_some_and(|entry| entry.index <= index) {
            let entry = self.recent.pop_front().expect("a front entry");
            self.recent_bytes -= remembered_bytes(&entry);
        }
        let deleted = self.log.delete_before(point)?;
        Ok(Some(Compacted {
            index,
            start_offset: point,
            segments: deleted.segments_deleted,
            bytes: deleted.bytes_deleted,
        }))
    }

    /// Runs up to `steps_max` bounded steps of log compaction over the
    /// entries up to `applied` (see [`Log::compact_step`]). Compaction keeps
    /// every batch and its offsets, so the entry index is unchanged; a
    /// follower sent a compacted entry stores it as it is. Each replica
    /// compacts its own files; what a reader can see agrees across them.
    /// A key's expired tombstone goes only below entry `all_hold` (the
    /// entries every replica holds, as the leader knows; 0 elsewhere): a
    /// replica behind would otherwise be sent the emptied batch and keep
    /// its older record of the key.
    pub fn compact_log(&mut self, limits: CompactLimits) -> Result<LogCompaction> {
        let offset_after = |index: u64| match self.slot(index) {
            Some(slot) => slot.next_offset,
            None => self.snapshot.start_offset,
        };
        let end_offset = offset_after(limits.applied);
        let tombstone_horizon_offset = match limits.all_hold {
            0 => 0,
            index => offset_after(index.min(limits.applied)),
        };
        let settings = CompactionSettings {
            delete_retention_ms: limits.policy.delete_retention_ms,
            min_lag_ms: limits.policy.min_lag_ms,
            tombstone_horizon_offset,
            ..CompactionSettings::new(end_offset, limits.now_ms)
        };
        let steps_max = limits.steps_max;
        for _ in 0..steps_max {
            let step = self.log.compact_step(&mut self.compactor, &settings).map_err(|e| {
                let e = ActorError::from(e);
                // Damage a pass reads fails the replica for repair, as
                // damage met by any other read does.
                if e.is_damage() {
                    let _ = self.read_damage.set(format!("compacting the log: {e}"));
                }
                e
            })?;
            match step {
                CompactionStep::More => {}
                CompactionStep::Idle => return Ok(LogCompaction::default()),
                CompactionStep::Finished(outcome) => {
                    return Ok(LogCompaction {
                        more: false,
                        finished: Some(outcome),
                    })
                }
            }
        }
        Ok(LogCompaction {
            more: true,
            finished: None,
        })
    }

    /// Reads entry `index` back from the held control entries or the log.
    fn read_entry(&self, index: u64, slot: EntrySlot) -> Result<Entry> {
        if let Some(entry) = self.controls.entry(index) {
            return entry;
        }
        let batches = self.log.read(slot.base_offset, 1)?;
        let batch = batches
            .into_iter()
            .next()
            .filter(|b| b.base_offset() == slot.base_offset)
            .ok_or_else(|| ActorError::corrupt(&self.dir, format!("entry {index} is missing from the log")))?;
        batch_to_entry(index, batch)
    }
}

/// What the metadata file holds, as read on open (absent keys: defaults).
struct StoredMeta {
    snapshot: SnapshotPoint,
    stored: StoredHardState,
    conf_state: ConfState,
    conf_index: u64,
    voters_since: BTreeMap<u64, u64>,
    log_start: u64,
}

impl StoredMeta {
    fn read(dir: &Path, meta: &DurableKv) -> Result<StoredMeta> {
        let snapshot: SnapshotPoint = read_meta(meta, KEY_SNAPSHOT)?.unwrap_or_default();
        let stored: StoredHardState = read_meta(meta, KEY_HARD_STATE)?.unwrap_or_default();
        let conf_state = match meta.get(KEY_CONF_STATE) {
            Some(bytes) => {
                ConfState::parse_from_bytes(bytes).map_err(|e| ActorError::corrupt(dir, format!("conf state: {e}")))?
            }
            None => ConfState::default(),
        };
        let voters_since = read_meta(meta, KEY_VOTERS_SINCE)?.unwrap_or_default();
        let log_start = read_meta(meta, KEY_LOG_START)?.unwrap_or_default();
        // A store from before the key: its configuration reflects at least
        // every change up to its commit index (applied before it was written).
        let conf_index = read_meta(meta, KEY_CONF_INDEX)?.unwrap_or(stored.commit);
        Ok(StoredMeta {
            snapshot,
            stored,
            conf_state,
            conf_index,
            voters_since,
            log_start,
        })
    }
}

/// The slot of every entry from `snapshot_index + 1` on, walking `log`'s
/// batches and the `held` control entries in index order, and the producer
/// table, from batch headers alone. A held entry takes the offset of the
/// batch after it, or the log's end, and must have been held there; ones
/// past the last entry must lie at or past the log's end (a tail the log
/// lost), else the metadata file (`meta_path`) is damaged.
fn index_log(
    log: &Log,
    snapshot: &SnapshotPoint,
    held: &HeldControls,
    meta_path: &Path,
) -> Result<(VecDeque<EntrySlot>, ProducerTable)> {
    let snapshot_index = snapshot.index;
    let mut slots = VecDeque::new();
    let mut producers = ProducerTable::default();
    let mut misplaced = None;
    let mut push_held = |slots: &mut VecDeque<EntrySlot>, at: u64| {
        let mut index = snapshot_index + slots.len() as u64 + 1;
        while let Some((term, offset)) = held.term_and_offset(index) {
            if offset != at {
                misplaced.get_or_insert((index, offset, at));
            }
            slots.push_back(EntrySlot {
                base_offset: at,
                next_offset: at,
                term,
            });
            index += 1;
        }
    };
    log.visit_headers(|header| {
        if header.base_offset < snapshot.start_offset {
            // Below the snapshot point: a retention pass whose deletion
            // stopped part-way left it (the next pass or open deletes it).
            return;
        }
        push_held(&mut slots, header.base_offset);
        slots.push_back(EntrySlot {
            base_offset: header.base_offset,
            next_offset: header.next_offset(),
            term: header.raft_term,
        });
        producers.record(header, snapshot_index + slots.len() as u64);
    })?;
    push_held(&mut slots, log.end_offset());
    if let Some((index, offset, at)) = misplaced {
        let reason = format!("control entry {index} was held at offset {offset}, but the log places it at {at}");
        return Err(ActorError::corrupt(meta_path, reason));
    }
    let end = log.end_offset();
    let after_last = snapshot_index + slots.len() as u64 + 1;
    if let Some((index, offset)) = held.offsets_from(after_last).find(|&(_, offset)| offset < end) {
        let reason =
            format!("control entry {index} is held past the log's last entry, at offset {offset} below its end {end}");
        return Err(ActorError::corrupt(meta_path, reason));
    }
    Ok((slots, producers))
}

/// Checks the stored commit index against the log's last index.
///
/// The log is synced before the commit index is written, so a commit
/// beyond the log means committed entries were lost from disk. Without
/// log syncs that is what a power loss does: the replica carries on
/// from what it has (the commit is lowered), and catches up from the leader.
fn check_commit(dir: &Path, stored: &mut StoredHardState, last_index: u64, sync_log: bool) -> Result<()> {
    if stored.commit > last_index && !sync_log {
        tracing::warn!(dir = %dir.display(), commit = stored.commit, last_index,
            "the log lost committed entries (it is not fsynced); continuing from its end");
        stored.commit = last_index;
    }
    if stored.commit > last_index {
        let reason = format!(
            "committed entries up to index {} are lost: the log ends at {last_index}",
            stored.commit
        );
        return Err(ActorError::corrupt(dir, reason));
    }
    Ok(())
}

fn read_meta<T: for<'de> Deserialize<'de>>(meta: &DurableKv, key: &str) -> Result<Option<T>> {
    match meta.get(key) {
        None => Ok(None),
        Some(bytes) => postcard::from_bytes(bytes)
            .map(Some)
            .map_err(|e| ActorError::corrupt(meta.path(), format!("{key}: {e}"))),
    }
}

fn write_meta<T: Serialize>(meta: &mut DurableKv, key: &str, value: &T) -> Result<()> {
    let bytes = postcard::to_allocvec(value).map_err(|e| ActorError::InvalidState(format!("encoding {key}: {e}")))?;
    meta.set(key, bytes)?;
    Ok(())
}

/// What a partition snapshot carries besides Raft's metadata: a partition's
/// state is its log, so a replica restored from a snapshot holds nothing
/// before the snapshot point, and its log resumes at `start_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotData {
    pub start_offset: u64,
    /// The index of the last configuration change the snapshot's conf
    /// state reflects (at or after the snapshot point).
    pub conf_index: u64,
}

impl SnapshotData {
    const V1_BYTES: usize = 8;
    const V2_BYTES: usize = 17;

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(Self::V2_BYTES);
        bytes.push(SNAPSHOT_DATA_V2);
        bytes.extend_from_slice(&self.start_offset.to_le_bytes());
        bytes.extend_from_slice(&self.conf_index.to_le_bytes());
        bytes
    }

    pub fn decode(data: &[u8]) -> Result<SnapshotData> {
        let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
        match data.len() {
            Self::V1_BYTES => Ok(SnapshotData {
                start_offset: word(0),
                conf_index: 0,
            }),
            Self::V2_BYTES if data[0] == SNAPSHOT_DATA_V2 => Ok(SnapshotData {
                start_offset: word(1),
                conf_index: word(9),
            }),
            n => Err(ActorError::InvalidState(format!(
                "snapshot data of {n} bytes (format byte {:?}) is neither format 1 nor 2",
                data.first()
            ))),
        }
    }
}

/// The batch that stores a Raft entry: its records, or for a control entry
/// marked as in the log ([`ControlEntry::in_log`]), a control batch of one
/// record.
fn entry_to_batch(entry: &Entry) -> Result<RecordBatch> {
    let mut batch = if ControlEntry::is_control(entry) {
        let value = postcard::to_allocvec(&ControlEntry::of(entry))
            .map_err(|e| ActorError::InvalidState(format!("control entry: {e}")))?;
        let mut builder = BatchBuilder::new().attributes(ATTRIBUTE_CONTROL);
        builder.push(&Record {
            value: Some(value.into()),
            ..Record::default()
        })?;
        builder.build()?
    } else {
        RecordBatch::from_bytes(entry.data.clone())
            .map_err(|e| ActorError::InvalidState(format!("entry {} does not hold a valid batch: {e}", entry.index)))?
    };
    batch.set_raft_term(entry.term);
    Ok(batch)
}

/// The Raft entry a stored batch stands for.
fn batch_to_entry(index: u64, batch: RecordBatch) -> Result<Entry> {
    if batch.is_control() {
        let record = batch
            .records()
            .next()
            .ok_or_else(|| ActorError::InvalidState("empty control batch".to_string()))??;
        let value = record.record.value.unwrap_or_default();
        let control: ControlEntry = postcard::from_bytes(&value)
            .map_err(|e| ActorError::InvalidState(format!("control entry {index}: {e}")))?;
        let mut entry = control.to_entry(index, batch.raft_term())?;
        // In the log it stays, on every replica it is sent to.
        entry.sync_log = true;
        return Ok(entry);
    }
    let mut entry = Entry {
        index,
        term: batch.raft_term(),
        ..Entry::default()
    };
    entry.set_entry_type(EntryType::EntryNormal);
    entry.data = batch.into_shared();
    Ok(entry)
}

fn store_error(error: ActorError) -> raft::Error {
    raft::Error::Store(RaftStorageError::Other(Box::new(error)))
}

impl raft::Storage for PartitionStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.snapshot.index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if high > self.last_index_value() + 1 {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let mut entries = Vec::new();
        let mut size = 0u64;
        for index in low..high {
            let slot = self
                .slot(index)
                .ok_or(raft::Error::Store(RaftStorageError::Unavailable))?;
            let entry = match self.recent_entry(index) {
                Some(entry) => entry.clone(),
                // Raft treats any other storage error while sending as
                // fatal (it panics): damage is recorded for the owner to
                // fail the replica with, and Raft is told to wait.
                None => self.read_entry(index, slot).map_err(|e| {
                    if !e.is_damage() {
                        return store_error(e);
                    }
                    let _ = self.read_damage.set(format!("reading entry {index}: {e}"));
                    raft::Error::Store(RaftStorageError::LogTemporarilyUnavailable)
                })?,
            };
            size += entry.compute_size() as u64;
            if !entries.is_empty() && size > max_size {
                break;
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if index < self.snapshot.index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        self.slot(index)
            .map(|slot| slot.term)
            .ok_or(raft::Error::Store(RaftStorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index_value())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index_value())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let mut snapshot = Snapshot::default();
        let metadata = snapshot.mut_metadata();
        metadata.index = self.snapshot.index;
        metadata.term = self.snapshot.term;
        // The configuration as of now, not as of the snapshot point: a
        // learner added since must find itself in it (raft-rs refuses a
        // snapshot that does not name it). The changes after the point that
        // it already reflects are not applied again (`conf_index`).
        metadata.set_conf_state(self.conf_state.clone());
        let data = SnapshotData {
            start_offset: self.snapshot.start_offset,
            conf_index: self.conf_index.max(self.snapshot.index),
        };
        snapshot.data = data.encode().into();
        Ok(snapshot)
    }
}

#[cfg(test)]
mod control_tests;
#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage as _;

    /// A normal entry of three records.
    fn entry_of(index: u64, term: u64, record: impl Fn(u64) -> Record) -> Entry {
        let mut builder = BatchBuilder::new();
        for i in 0..3 {
            builder.push(&record(i)).expect("push");
        }
        Entry {
            index,
            term,
            data: builder.build().expect("build").into_shared(),
            ..Entry::default()
        }
    }

    pub(super) fn normal_entry(index: u64, term: u64, tag: &str) -> Entry {
        entry_of(index, term, |i| Record {
            timestamp_ms: 1,
            value: Some(format!("{tag}/{i}").into_bytes().into()),
            ..Record::default()
        })
    }

    pub(super) fn values(store: &PartitionStore, low: u64, high: u64) -> Vec<Vec<String>> {
        let context = GetEntriesContext::empty(false);
        let entries = store.entries(low, high, None, context).expect("entries");
        entries
            .into_iter()
            .map(|entry| {
                RecordBatch::from_bytes(entry.data)
                    .expect("batch")
                    .records()
                    .map(|r| String::from_utf8(r.expect("record").record.value.expect("value").to_vec()).expect("utf8"))
                    .collect()
            })
            .collect()
    }

    /// A one-voter store in `dir` with 1 KiB segments, and their config.
    pub(super) fn small_segment_store(dir: &Path) -> (PartitionStore, LogConfig) {
        let config = LogConfig {
            segment_bytes_max: 1024,
            ..LogConfig::default()
        };
        let mut store = PartitionStore::open(dir, config.clone(), true).expect("open");
        store.bootstrap(&[1]).expect("bootstrap");
        (store, config)
    }

    #[test]
    fn remembered_entries_read_as_the_log_does_also_after_a_cut_off_tail() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut store, config) = small_segment_store(dir.path());
        let first: Vec<Entry> = (1..=5).map(|i| normal_entry(i, 1, &format!("a{i}"))).collect();
        store.append(&first).expect("append");
        // A new leader replaces the tail from index 3 on.
        let second: Vec<Entry> = (3..=4).map(|i| normal_entry(i, 2, &format!("b{i}"))).collect();
        store.append(&second).expect("append over the tail");
        store.sync().expect("sync");
        let remembered = values(&store, 1, 5);
        assert_eq!(remembered.len(), 4);
        assert_eq!(remembered[2], vec!["b3/0", "b3/1", "b3/2"]);
        assert_eq!(store.term(3).expect("term"), 2);
        drop(store);
        // A reopened store has nothing in memory: every entry comes from disk.
        let reopened = PartitionStore::open(dir.path(), config, true).expect("reopen");
        assert!(reopened.recent.is_empty());
        assert_eq!(values(&reopened, 1, 5), remembered);
    }

    /// Round `round` of keys k0..k2.
    fn keyed_entry(index: u64, term: u64, round: u64) -> Entry {
        entry_of(index, term, |key| Record {
            timestamp_ms: 1,
            key: Some(format!("k{key}").into_bytes().into()),
            value: Some(format!("r{round}/k{key}").into_bytes().into()),
            ..Record::default()
        })
    }

    /// Compaction goes no further than the applied entries, keeps every
    /// entry's index, term and offsets, and a follower sent the compacted
    /// entries stores them as they are: both agree on every record.
    #[test]
    fn compaction_keeps_entries_in_place_and_a_follower_stores_compacted_entries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut leader, config) = small_segment_store(dir.path());
        let entries: Vec<Entry> = (1..=40).map(|i| keyed_entry(i, 1, i)).collect();
        leader.append(&entries).expect("append");
        leader.sync().expect("sync");
        let terms: Vec<u64> = (1..=40).map(|i| leader.term(i).expect("term")).collect();
        let offsets: Vec<_> = (1..=40).map(|i| leader.entry_offsets(i)).collect();
        let limits = |applied| CompactLimits {
            now_ms: 1_000,
            policy: runnel_storage::CompactionPolicy {
                delete_retention_ms: 60_000,
                min_lag_ms: 0,
            },
            applied,
            all_hold: applied,
            steps_max: 1_000,
        };
        let nothing_applied = leader.compact_log(limits(0)).expect("compact");
        assert_eq!(nothing_applied.finished, None, "nothing applied, nothing compacted");
        let done = leader.compact_log(limits(40)).expect("compact");
        let outcome = done.finished.expect("a pass ended");
        assert!(outcome.records_removed > 50, "{outcome:?}");
        assert_eq!(
            (1..=40).map(|i| leader.term(i).expect("term")).collect::<Vec<_>>(),
            terms
        );
        assert_eq!((1..=40).map(|i| leader.entry_offsets(i)).collect::<Vec<_>>(), offsets);

        // Reopened, the leader reads entries from its (compacted) log rather
        // than from memory.
        drop(leader);
        let leader = PartitionStore::open(dir.path(), config.clone(), true).expect("reopen");
        let follower_dir = tempfile::tempdir().expect("temp dir");
        let mut follower = PartitionStore::open(follower_dir.path(), config, true).expect("open");
        follower.bootstrap(&[1]).expect("bootstrap");
        let context = GetEntriesContext::empty(false);
        let sent = leader.entries(1, 41, None, context).expect("entries");
        follower.append(&sent).expect("append");
        follower.sync().expect("sync");
        let read = |store: &PartitionStore| -> Vec<_> {
            store
                .log()
                .read(0, 1 << 20)
                .expect("read")
                .iter()
                .flat_map(|b| b.records().map(|r| r.expect("record")).collect::<Vec<_>>())
                .collect()
        };
        let records = read(&leader);
        assert!(records.len() < 40, "{} records left", records.len());
        assert_eq!(read(&follower), records);
        assert_eq!(follower.entry_offsets(40), offsets[39]);
        // The latest round of every key is there.
        for key in 0..3 {
            let latest = records
                .iter()
                .rev()
                .find(|r| r.record.key.as_deref() == Some(format!("k{key}").as_bytes()));
            assert_eq!(
                latest.and_then(|r| r.record.value.clone()),
                Some(format!("r40/k{key}").into_bytes().into())
            );
        }
    }

    /// A pass that reads a damaged segment records the damage, so the
    /// replica's owner fails it for repair, as for any other read.
    #[test]
    fn damage_met_by_compaction_is_recorded_for_repair() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut store, _) = small_segment_store(dir.path());
        let entries: Vec<Entry> = (1..=40).map(|i| keyed_entry(i, 1, i)).collect();
        store.append(&entries).expect("append");
        store.sync().expect("sync");
        let first = dir.path().join("log").join("00000000000000000000.log");
        let file = std::fs::OpenOptions::new().write(true).open(&first).expect("open");
        file.write_all_at(b"\xff", 100).expect("flip a byte");
        let limits = CompactLimits {
            now_ms: 1_000,
            policy: runnel_storage::CompactionPolicy {
                delete_retention_ms: 60_000,
                min_lag_ms: 0,
            },
            applied: 40,
            all_hold: 40,
            steps_max: 1_000,
        };
        let failed = store.compact_log(limits).expect_err("damage");
        assert!(failed.is_damage(), "{failed}");
        let recorded = store.read_damage().expect("damage recorded");
        assert!(recorded.to_string().contains("compacting the log"), "{recorded}");
    }

    /// Retention moves the snapshot point before it deletes files; a crash
    /// in between (the point written, the segments still there) is
    /// finished when the store opens again, and the store serves Raft from
    /// the new point: terms and entries below it are compacted, and its
    /// snapshot carries the start offset and the configuration.
    #[test]
    fn an_interrupted_compaction_is_finished_on_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut store, config) = small_segment_store(dir.path());
        let entries: Vec<Entry> = (1..=40).map(|i| normal_entry(i, 1, &format!("e{i}"))).collect();
        store.append(&entries).expect("append");
        store.sync().expect("sync");
        store.set_commit(40);
        let point = store.log().retention_point(1_000_000, 1_000);
        assert!(point > 0 && store.log().segment_count() > 2);
        let position = store
            .slots
            .iter()
            .position(|s| s.next_offset == point)
            .expect("a boundary");
        let index = position as u64 + 1;
        let compacted = SnapshotPoint {
            index,
            term: 1,
            start_offset: point,
        };
        write_meta(&mut store.meta, KEY_SNAPSHOT, &compacted).expect("point");
        drop(store);

        let reopened = PartitionStore::open(dir.path(), config, true).expect("reopen");
        assert_eq!(reopened.log().start_offset(), point);
        assert_eq!(reopened.first_index_value(), index + 1);
        assert_eq!(reopened.last_index_value(), 40);
        assert_eq!(reopened.term(index).expect("the point's term"), 1);
        assert!(matches!(
            reopened.term(index - 1),
            Err(raft::Error::Store(RaftStorageError::Compacted))
        ));
        let read = values(&reopened, index + 1, index + 2);
        assert_eq!(read[0][0], format!("e{}/0", index + 1));
        let snapshot = reopened.snapshot(0, 2).expect("snapshot");
        assert_eq!(snapshot.get_metadata().index, index);
        assert_eq!(snapshot.get_metadata().get_conf_state().voters, vec![1]);
        let data = SnapshotData::decode(&snapshot.data).expect("data");
        assert_eq!(
            data,
            SnapshotData {
                start_offset: point,
                conf_index: index
            }
        );
    }

    /// A snapshot's install writes its metadata marked as an install, then
    /// resets the log; a crash in between resets the log on open, even
    /// where the snapshot's offset is also a segment start of the old log
    /// (whose entries may differ from the leader's and must not be kept).
    #[test]
    fn an_interrupted_snapshot_install_restarts_the_log_at_the_snapshot() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut store, config) = small_segment_store(dir.path());
        let entries: Vec<Entry> = (1..=40).map(|i| normal_entry(i, 1, &format!("e{i}"))).collect();
        store.append(&entries).expect("append");
        store.sync().expect("sync");
        let boundary = store.log().segment_bases()[1];
        let point = SnapshotPoint {
            index: 70,
            term: 3,
            start_offset: boundary,
        };
        let point_bytes = postcard::to_allocvec(&point).expect("point");
        store
            .meta
            .update(|entries| {
                entries.insert(KEY_SNAPSHOT.to_string(), point_bytes);
                entries.insert(KEY_INSTALLING.to_string(), vec![1]);
            })
            .expect("metadata");
        drop(store);

        let reopened = PartitionStore::open(dir.path(), config, true).expect("reopen");
        assert_eq!(reopened.log().start_offset(), boundary);
        assert_eq!(reopened.log().end_offset(), boundary, "nothing of the old log is kept");
        assert_eq!((reopened.first_index_value(), reopened.last_index_value()), (71, 70));
        assert_eq!(reopened.term(70).expect("the point's term"), 3);
        assert!(reopened.meta.get(KEY_INSTALLING).is_none(), "the install is finished");
    }

    #[test]
    fn snapshot_data_of_both_formats_decodes_and_other_bytes_are_refused() {
        assert_eq!(
            SnapshotData::decode(&77u64.to_le_bytes()).expect("format 1"),
            SnapshotData {
                start_offset: 77,
                conf_index: 0
            }
        );
        let data = SnapshotData {
            start_offset: 9,
            conf_index: 4,
        };
        assert_eq!(SnapshotData::decode(&data.encode()).expect("format 2"), data);
        let mut wrong = data.encode();
        wrong[0] = 7;
        let refused = SnapshotData::decode(&wrong).expect_err("unknown format");
        assert!(refused.to_string().contains("neither format 1 nor 2"), "{refused}");
        assert!(SnapshotData::decode(&[1, 2, 3]).is_err());
    }

    /// A one-voter store in `dir` holding entries 1..=3, `sync` called.
    fn store_of_three(dir: &Path, sync_log: bool) -> PartitionStore {
        let mut store = PartitionStore::open(dir, LogConfig::default(), sync_log).expect("open");
        store.bootstrap(&[1]).expect("bootstrap");
        let entries: Vec<Entry> = (1..=3).map(|i| normal_entry(i, 1, "e")).collect();
        store.append(&entries).expect("append");
        store.sync().expect("sync");
        store
    }

    #[test]
    fn without_log_syncs_a_power_loss_leaves_a_replica_that_carries_on_from_its_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = store_of_three(dir.path(), false);
        store.set_commit(3);
        store.set_applied(3);
        store.persist_hard_state().expect("hard state");
        // Nothing of the log was fsynced: a power loss now loses all of it.
        assert!(store.crash(0).expect("crash") > 0);
        drop(store);
        // A replica that syncs would have had the entries: a commit past its
        // log is corruption there.
        assert!(matches!(
            PartitionStore::open(dir.path(), LogConfig::default(), true),
            Err(ActorError::Corrupt { .. })
        ));
        let reopened = PartitionStore::open(dir.path(), LogConfig::default(), false).expect("reopen");
        assert_eq!(reopened.last_index_value(), 0);
        assert_eq!(reopened.hard_state().commit, 0);
    }

    /// The commit index written never passes what the replica applied, so
    /// a restart applies again the entries it had not.
    #[test]
    fn the_commit_index_written_stops_at_the_last_entry_applied() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = store_of_three(dir.path(), true);
        store.set_commit(3);
        store.set_applied(1);
        store.persist_hard_state().expect("hard state");
        drop(store);
        let mut reopened = PartitionStore::open(dir.path(), LogConfig::default(), true).expect("reopen");
        assert_eq!(reopened.hard_state().commit, 1, "applied through 1 only");
        reopened.set_commit(3);
        reopened.set_applied(3);
        reopened.persist_hard_state().expect("hard state");
        drop(reopened);
        let reopened = PartitionStore::open(dir.path(), LogConfig::default(), true).expect("reopen");
        assert_eq!(reopened.hard_state().commit, 3);
    }

    #[test]
    fn synced_entries_survive_a_power_loss() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = store_of_three(dir.path(), true);
        assert_eq!(store.crash(0).expect("crash"), 0);
        drop(store);
        let reopened = PartitionStore::open(dir.path(), LogConfig::default(), true).expect("reopen");
        assert_eq!(reopened.last_index_value(), 3);
    }

    #[test]
    fn damage_met_reading_entries_for_raft_is_recorded_and_raft_is_told_to_wait() {
        use runnel_storage::batch::{BATCH_HEADER_BYTES, LOG_OVERHEAD_BYTES, OFFSET_LENGTH};
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = store_of_three(dir.path(), true);
        store.close_log().expect("clean close");
        drop(store);
        // A byte of the second batch's records flipped while the replica was
        // down: a clean close means the next open does not scan the segment.
        let segment = dir.path().join("log").join("00000000000000000000.log");
        let mut bytes = std::fs::read(&segment).expect("segment");
        let word: [u8; 4] = bytes[OFFSET_LENGTH..OFFSET_LENGTH + 4].try_into().expect("4 bytes");
        let second = LOG_OVERHEAD_BYTES + u32::from_le_bytes(word) as usize;
        bytes[second + BATCH_HEADER_BYTES + 3] ^= 0x40;
        std::fs::write(&segment, &bytes).expect("write");
        let store = PartitionStore::open(dir.path(), LogConfig::default(), true).expect("reopen");
        assert!(store.read_damage().is_none());
        assert_eq!(values(&store, 1, 2).len(), 1, "the first entry still reads");
        let context = GetEntriesContext::empty(false);
        assert!(matches!(
            store.entries(1, 4, None, context),
            Err(raft::Error::Store(RaftStorageError::LogTemporarilyUnavailable))
        ));
        let damage = store.read_damage().expect("damage recorded");
        assert!(damage.is_damage(), "{damage}");
        assert!(damage.to_string().contains("reading entry 2"), "{damage}");
    }

    #[test]
    fn remembered_entries_stay_within_their_bound() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = PartitionStore::open(dir.path(), LogConfig::default(), true).expect("open");
        store.bootstrap(&[1]).expect("bootstrap");
        let size = normal_entry(1, 1, "x").data.len();
        let count = RECENT_BYTES_MAX / size + 10;
        let entries: Vec<Entry> = (1..=count as u64).map(|i| normal_entry(i, 1, "x")).collect();
        store.append(&entries).expect("append");
        assert!(store.recent_bytes <= RECENT_BYTES_MAX);
        assert_eq!(store.recent.back().map(|e| e.index), Some(count as u64));
        // The oldest ones come from the log again.
        assert_eq!(values(&store, 1, 3)[0], vec!["x/0", "x/1", "x/2"]);
    }
}
