//! Three partition replicas in one process, driven step by step: elect,
//! produce, kill the leader, fail over, restart, and diverge then heal. Every
//! acknowledged (committed) batch must survive, once, at the same offsets on
//! every replica.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;

use bytes::Bytes;
use raft::eraftpb::{Message, MessageType};
use runnel_actors::{ReplicaConfig, ReplicaCore};
use runnel_storage::{BatchBuilder, FsyncPolicy, LogConfig, Record, RecordBatch};

const IDS: [u64; 3] = [1, 2, 3];
const ROUNDS_MAX: usize = 2_000;

struct Harness {
    _scratch: tempfile::TempDir,
    dirs: BTreeMap<u64, PathBuf>,
    replicas: BTreeMap<u64, Option<ReplicaCore>>,
    in_flight: VecDeque<Message>,
    /// Replicas whose traffic is dropped both ways.
    isolated: BTreeSet<u64>,
    /// Snapshot messages still to lose in transit.
    snapshots_to_drop: usize,
    /// Acknowledged batches: Raft index → (base offset, tag).
    acked: BTreeMap<u64, (u64, String)>,
    /// Proposed and waiting: Raft index → tag, on the proposing leader.
    pending: BTreeMap<u64, (u64, String)>,
}

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 16 * 1024,
        fsync: FsyncPolicy::EveryBatch,
        retention_age: None,
        ..LogConfig::default()
    }
}

fn batch(tag: &str, records: u32) -> RecordBatch {
    let mut builder = BatchBuilder::new();
    for i in 0..records {
        let value = Bytes::from(format!("{tag}/{i}"));
        builder
            .push(&Record {
                timestamp_ms: 1,
                value: Some(value),
                ..Record::default()
            })
            .expect("push");
    }
    builder.build().expect("build")
}

impl Harness {
    fn new() -> Harness {
        let scratch = tempfile::tempdir().expect("tempdir");
        let mut harness = Harness {
            dirs: IDS
                .iter()
                .map(|&id| (id, scratch.path().join(format!("replica-{id}"))))
                .collect(),
            _scratch: scratch,
            replicas: BTreeMap::new(),
            in_flight: VecDeque::new(),
            isolated: BTreeSet::new(),
            snapshots_to_drop: 0,
            acked: BTreeMap::new(),
            pending: BTreeMap::new(),
        };
        for id in IDS {
            harness.start(id);
        }
        harness
    }

    fn start(&mut self, id: u64) {
        let replica =
            ReplicaCore::open(&self.dirs[&id], log_config(), &ReplicaConfig::new(id), Some(&IDS)).expect("open");
        self.replicas.insert(id, Some(replica));
    }

    fn kill(&mut self, id: u64) {
        self.replicas.insert(id, None);
        self.pending.retain(|_, (leader, _)| *leader != id);
    }

    fn replica(&self, id: u64) -> &ReplicaCore {
        self.replicas[&id].as_ref().expect("replica is running")
    }

    fn reachable(&self, from: u64, to: u64) -> bool {
        !self.isolated.contains(&from) && !self.isolated.contains(&to)
    }

    /// Ready handling on every replica, then delivery of every message.
    fn pump(&mut self) {
        for id in IDS {
            let Some(replica) = self.replicas.get_mut(&id).and_then(Option::as_mut) else {
                continue;
            };
            let output = replica.handle_ready().expect("ready");
            self.in_flight.extend(output.messages);
            for committed in output.committed {
                if let Some((leader, tag)) = self.pending.remove(&committed.index) {
                    if leader == id {
                        let previous = self.acked.insert(committed.index, (committed.base_offset, tag));
                        assert!(previous.is_none(), "index {} acknowledged twice", committed.index);
                    }
                }
            }
        }
        while let Some(message) = self.in_flight.pop_front() {
            if !self.reachable(message.from, message.to) {
                continue;
            }
            if message.get_msg_type() == MessageType::MsgSnapshot && self.snapshots_to_drop > 0 {
                self.snapshots_to_drop -= 1;
                continue;
            }
            if let Some(Some(replica)) = self.replicas.get_mut(&message.to) {
                replica.step(message).expect("step");
            }
        }
    }

    fn tick(&mut self) {
        for replica in self.replicas.values_mut().flatten() {
            replica.tick();
        }
        self.pump();
    }

    /// Ticks until some replica among `candidates` leads; returns it.
    fn elect(&mut self, candidates: &[u64]) -> u64 {
        for _ in 0..ROUNDS_MAX {
            self.tick();
            for &id in candidates {
                if self.replicas[&id].as_ref().is_some_and(|r| r.is_leader()) {
                    return id;
                }
            }
        }
        panic!("no leader among {candidates:?}");
    }

    fn propose(&mut self, leader: u64, tag: &str) -> u64 {
        let replica = self
            .replicas
            .get_mut(&leader)
            .and_then(Option::as_mut)
            .expect("leader runs");
        let index = replica.propose(batch(tag, 5)).expect("propose");
        self.pending.insert(index, (leader, tag.to_string()));
        index
    }

    fn settle(&mut self) {
        for _ in 0..50 {
            self.tick();
        }
    }

    /// Every user record the replica holds below its commit point, with offsets.
    fn records(&self, id: u64) -> Vec<(u64, Bytes)> {
        let replica = self.replica(id);
        let mut out = Vec::new();
        let first = replica.store().first_offset();
        let mut offset = first;
        while offset < replica.committed_offset() {
            for batch in replica.read_committed(offset, 1 << 20).expect("read") {
                offset = batch.next_offset();
                if batch.is_control() {
                    continue;
                }
                for record in batch.records() {
                    let record = record.expect("record");
                    if record.offset >= first {
                        out.push((record.offset, record.record.value.expect("value")));
                    }
                }
            }
        }
        out
    }

    fn replica_mut(&mut self, id: u64) -> &mut ReplicaCore {
        self.replicas
            .get_mut(&id)
            .and_then(Option::as_mut)
            .expect("replica is running")
    }

    /// Every acknowledged batch at or after the replica's log start is
    /// present once, at its acknowledged offset.
    fn check_acknowledged(&self, id: u64) {
        let start = self.replica(id).store().first_offset();
        let records = self.records(id);
        let by_value: BTreeMap<&Bytes, Vec<u64>> = records.iter().fold(BTreeMap::new(), |mut map, (offset, value)| {
            map.entry(value).or_default().push(*offset);
            map
        });
        for (index, (base_offset, tag)) in self.acked.iter().filter(|(_, (base, _))| *base >= start) {
            for i in 0..5u64 {
                let value = Bytes::from(format!("{tag}/{i}"));
                let offsets = by_value
                    .get(&value)
                    .unwrap_or_else(|| panic!("replica {id} lost {value:?} (index {index})"));
                assert_eq!(
                    offsets,
                    &vec![base_offset + i],
                    "replica {id}: {value:?} at wrong offsets"
                );
            }
        }
    }

    /// The replicas' committed logs are byte-for-byte the same batches.
    fn check_identical(&self, ids: &[u64]) {
        let reference = self.records(ids[0]);
        for &id in &ids[1..] {
            assert_eq!(
                self.records(id),
                reference,
                "replica {id} differs from replica {}",
                ids[0]
            );
        }
    }
}

#[test]
fn produce_commits_the_same_records_at_the_same_offsets_everywhere() {
    let mut h = Harness::new();
    let leader = h.elect(&IDS);
    for i in 0..200 {
        h.propose(leader, &format!("b{i}"));
        h.pump();
    }
    h.settle();
    assert_eq!(h.acked.len(), 200, "every proposal committed");
    h.check_identical(&IDS);
    for id in IDS {
        h.check_acknowledged(id);
        assert_eq!(h.records(id).len(), 1000);
    }
    // A follower refuses proposals and names the leader.
    let follower = IDS.iter().copied().find(|&id| id != leader).expect("a follower");
    let replicas = h.replicas.get_mut(&follower).and_then(Option::as_mut).expect("runs");
    let err = replicas
        .propose(batch("x", 1))
        .expect_err("follower accepted a proposal");
    assert!(err.to_string().contains(&format!("Some({leader})")), "{err}");
}

#[test]
fn killing_the_leader_loses_no_acknowledged_batch_and_a_restart_catches_up() {
    let mut h = Harness::new();
    let leader = h.elect(&IDS);
    for i in 0..50 {
        h.propose(leader, &format!("before-{i}"));
        h.pump();
    }
    h.settle();
    assert_eq!(h.acked.len(), 50);
    // Proposals in flight when the leader dies may or may not commit.
    for i in 0..10 {
        h.propose(leader, &format!("in-flight-{i}"));
    }
    h.kill(leader);
    let survivors: Vec<u64> = IDS.iter().copied().filter(|&id| id != leader).collect();
    let new_leader = h.elect(&survivors);
    for i in 0..50 {
        h.propose(new_leader, &format!("after-{i}"));
        h.pump();
    }
    h.settle();
    assert!(h.acked.len() >= 100, "acknowledged {}", h.acked.len());
    h.check_identical(&survivors);
    for &id in &survivors {
        h.check_acknowledged(id);
    }

    h.start(leader);
    h.settle();
    h.check_identical(&IDS);
    h.check_acknowledged(leader);
}

#[test]
fn an_isolated_leaders_unacknowledged_tail_is_replaced() {
    let mut h = Harness::new();
    let leader = h.elect(&IDS);
    for i in 0..20 {
        h.propose(leader, &format!("common-{i}"));
        h.pump();
    }
    h.settle();
    h.isolated.insert(leader);
    for i in 0..10 {
        h.propose(leader, &format!("lost-{i}"));
        h.pump();
    }
    let majority: Vec<u64> = IDS.iter().copied().filter(|&id| id != leader).collect();
    let new_leader = h.elect(&majority);
    for i in 0..20 {
        h.propose(new_leader, &format!("majority-{i}"));
        h.pump();
    }
    h.settle();
    assert!(
        h.acked.values().all(|(_, tag)| !tag.starts_with("lost-")),
        "an isolated leader acknowledged"
    );

    h.isolated.clear();
    h.settle();
    h.check_identical(&IDS);
    for id in IDS {
        h.check_acknowledged(id);
        let lost = h.records(id).iter().filter(|(_, v)| v.starts_with(b"lost-")).count();
        assert_eq!(lost, 0, "replica {id} kept the diverged tail");
    }
}

/// Milliseconds after the test records' timestamp (1) at which retention
/// runs, and the age it keeps: every closed segment has expired.
const LATER_MS: i64 = 1_000_000;
const RETENTION_MS: u64 = 1_000;

/// Retention deletes closed segments on each replica; a follower that was
/// cut off needs entries the others deleted, so it gets a snapshot (the
/// first one sent is lost, and the leader sends another): its log
/// restarts at the same offset, it takes the configuration the leader has
/// now (it was made a learner after the snapshot point, and that change is
/// not applied twice), is promoted again, and holds the same records; a
/// restart reopens the compacted stores.
#[test]
fn retention_deletes_old_segments_and_a_cut_off_follower_catches_up_from_a_snapshot() {
    let mut h = Harness::new();
    let leader = h.elect(&IDS);
    let cut_off = IDS.iter().copied().find(|&id| id != leader).expect("a follower");
    let other = IDS
        .iter()
        .copied()
        .find(|&id| id != leader && id != cut_off)
        .expect("another");
    h.isolated.insert(cut_off);
    for i in 0..300 {
        h.propose(leader, &format!("old-{i}"));
        h.pump();
    }
    h.settle();
    assert_eq!(h.acked.len(), 300, "two of three commit");
    let segments_before = h.replica(leader).store().log().segment_count();
    assert!(segments_before >= 3, "{segments_before} segments");
    for id in [leader, other] {
        let done = h
            .replica_mut(id)
            .compact_for_retention(LATER_MS, RETENTION_MS)
            .expect("retention")
            .expect("closed segments expired");
        assert_eq!(done.segments, segments_before - 1, "all but the active segment go");
        assert_eq!(h.replica(id).store().log().start_offset(), done.start_offset);
        let again = h
            .replica_mut(id)
            .compact_for_retention(LATER_MS, RETENTION_MS)
            .expect("retention");
        assert_eq!(again, None, "nothing more has expired");
    }
    let start = h.replica(leader).store().log().start_offset();
    assert_eq!(h.replica(other).store().log().start_offset(), start);
    assert!(h.replica(leader).store().first_index_value() > 1);

    // A configuration change after the snapshot point, while cut off.
    assert!(h.replica_mut(leader).demote(cut_off).expect("demote"));
    h.settle();
    assert!(h.replica(leader).store().conf_state().learners.contains(&cut_off));
    for i in 0..5 {
        h.propose(leader, &format!("new-{i}"));
        h.pump();
    }
    h.isolated.clear();
    h.snapshots_to_drop = 1;
    for _ in 0..ROUNDS_MAX {
        h.tick();
        h.replica_mut(leader).step_towards(&IDS).expect("step towards");
        let caught_up = h.replica(cut_off).committed_offset() == h.replica(leader).committed_offset();
        if caught_up && h.replica(cut_off).store().conf_state().voters.contains(&cut_off) {
            break;
        }
    }
    h.settle();
    assert_eq!(h.snapshots_to_drop, 0, "a snapshot was sent");
    let restored = h.replica(cut_off);
    assert_eq!(
        restored.store().log().start_offset(),
        start,
        "the log restarts where the leader's does"
    );
    assert!(
        restored.store().conf_state().voters.contains(&cut_off),
        "promoted again"
    );
    assert_eq!(h.replica(leader).store().conf_state(), restored.store().conf_state());
    h.check_identical(&IDS);
    for id in IDS {
        h.check_acknowledged(id);
        assert_eq!(h.records(id).first().map(|(offset, _)| *offset), Some(start));
    }

    for id in IDS {
        h.kill(id);
        h.start(id);
    }
    let leader = h.elect(&IDS);
    h.propose(leader, "after-restart");
    h.settle();
    h.check_identical(&IDS);
    for id in IDS {
        h.check_acknowledged(id);
    }
}

/// The last segment file under `dir` (the replica's log).
fn last_segment(dir: &std::path::Path) -> PathBuf {
    let mut segments = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "log") {
                segments.push(path);
            }
        }
    }
    segments.sort();
    segments.pop().expect("a segment")
}

/// Flips a byte inside the records of the segment's last batch.
fn flip_last_batch(segment: &std::path::Path) {
    use runnel_storage::batch::{BATCH_HEADER_BYTES, LOG_OVERHEAD_BYTES, OFFSET_LENGTH};
    let mut bytes = std::fs::read(segment).expect("segment");
    let (mut at, mut last) = (0, None);
    while at + LOG_OVERHEAD_BYTES <= bytes.len() {
        let word: [u8; 4] = bytes[at + OFFSET_LENGTH..at + OFFSET_LENGTH + 4]
            .try_into()
            .expect("4 bytes");
        let size = u32::from_le_bytes(word) as usize;
        if size == 0 {
            break;
        }
        last = Some(at);
        at += LOG_OVERHEAD_BYTES + size;
    }
    let last = last.expect("a batch");
    bytes[last + BATCH_HEADER_BYTES + 3] ^= 0x40;
    std::fs::write(segment, &bytes).expect("write");
}

/// Session 19's finding (simulation seed 86 then): a candidate whose
/// unapplied entries are damaged hears a commit point beyond them in a vote
/// message; raft-rs's commit by vote would read them and stop the process.
/// The replica reads them first and fails as damaged (to be repaired).
#[test]
fn a_candidate_with_damaged_unapplied_entries_fails_as_damaged_not_a_crash() {
    let mut h = Harness::new();
    let leader = h.elect(&IDS);
    let others: Vec<u64> = IDS.into_iter().filter(|&id| id != leader).collect();
    let (behind, other) = (others[0], others[1]);
    h.propose(leader, "a");
    h.settle();
    h.propose(leader, "b");
    // Both followers hold b and the leader commits it; `behind` never hears so.
    h.pump();
    h.pump();
    h.isolated.insert(behind);
    h.settle();
    assert!(
        h.replica(behind).commit_index() < h.replica(other).commit_index(),
        "one follower is behind on the commit point"
    );
    h.replica_mut(behind).close().expect("clean close");
    h.kill(behind);
    flip_last_batch(&last_segment(&h.dirs[&behind]));
    h.start(behind);
    h.kill(leader);
    h.isolated.remove(&behind);
    h.replica_mut(behind).campaign().expect("it campaigns");
    h.replica_mut(other).campaign().expect("the other campaigns");
    let messages = h.replica_mut(other).handle_ready().expect("ready").messages;
    let vote = messages
        .into_iter()
        .find(|m| m.to == behind)
        .expect("a vote request to the one behind");
    assert!(
        vote.commit > h.replica(behind).commit_index(),
        "the request names the commit point"
    );
    let failed = h
        .replica_mut(behind)
        .step(vote)
        .expect_err("damage among the entries to commit");
    assert!(failed.is_damage(), "{failed}");
}

/// Deleting records (Kafka's DeleteRecords) moves where every replica's
/// readers start, through an entry each applies, and each deletes the
/// whole segments below it on its own; a follower cut off meanwhile gets a
/// snapshot, then the entry, and starts there too; restarts keep it.
#[test]
fn deleting_records_moves_every_replicas_start_and_their_segments_go() {
    let mut h = Harness::new();
    let leader = h.elect(&IDS);
    let cut_off = IDS.iter().copied().find(|&id| id != leader).expect("a follower");
    for i in 0..400 {
        h.propose(leader, &format!("r-{i}"));
        h.pump();
    }
    h.settle();
    assert_eq!(h.acked.len(), 400);
    let segments_before = h.replica(leader).store().log().segment_count();
    assert!(segments_before >= 3, "{segments_before} segments");
    // Half-way into the 300th batch: a start need not be a batch's.
    let (_, (base, _)) = h.acked.iter().nth(300).expect("acked");
    let before = base + 2;
    h.isolated.insert(cut_off);
    let index = h.replica_mut(leader).propose_log_start(before).expect("propose");
    h.settle();
    assert!(h.replica(leader).commit_index() >= index, "committed by two of three");
    for id in IDS.iter().copied().filter(|&id| id != cut_off) {
        assert_eq!(
            h.replica(id).store().first_offset(),
            before,
            "replica {id} starts there"
        );
        let done = h
            .replica_mut(id)
            .delete_below_log_start()
            .expect("delete")
            .expect("segments went");
        assert!(done.start_offset <= before && done.start_offset > 0, "{done:?}");
        assert_eq!(h.replica(id).store().log().start_offset(), done.start_offset);
        assert_eq!(h.replica_mut(id).delete_below_log_start().expect("again"), None);
        let first = h.records(id).first().map(|(offset, _)| *offset);
        assert_eq!(first, Some(before), "replica {id} reads from the start");
    }
    h.isolated.clear();
    for i in 0..5 {
        h.propose(leader, &format!("after-{i}"));
        h.pump();
    }
    for _ in 0..ROUNDS_MAX {
        h.tick();
        if h.replica(cut_off).committed_offset() == h.replica(leader).committed_offset() {
            break;
        }
    }
    h.settle();
    assert_eq!(
        h.replica(cut_off).store().first_offset(),
        before,
        "the cut-off follower too"
    );
    h.replica_mut(cut_off).delete_below_log_start().expect("delete");
    h.check_identical(&IDS);
    for id in IDS {
        h.check_acknowledged(id);
        h.kill(id);
        h.start(id);
        assert_eq!(
            h.replica(id).store().first_offset(),
            before,
            "replica {id} after a restart"
        );
    }
    // An older start changes nothing.
    let leader = h.elect(&IDS);
    h.replica_mut(leader).propose_log_start(before - 10).expect("propose");
    h.settle();
    for id in IDS {
        assert_eq!(h.replica(id).store().first_offset(), before);
    }
}
