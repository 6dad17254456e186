//! The checker: a pure function from what the harness did and saw to the
//! anomalies Jepsen's queue checker names. No I/O, so unit tests drive it
//! with hand-made histories.
//!
//! Every record the harness writes carries a unique write id (header
//! [`WRITE_ID_HEADER`]); the checker matches acknowledgements, consumer reads
//! and the final read by that id.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// The header holding a harness record's unique write id.
pub const WRITE_ID_HEADER: &str = "chaos-id";

/// Anomalies of one kind listed in a report at most; the count is exact.
const LISTED_PER_KIND_MAX: usize = 10;

/// How one write ended, as the producer saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged with `acks=all` at this offset.
    Acked { offset: u64 },
    /// Refused in a way that says it was not written.
    Failed(String),
    /// No answer the producer could trust: it may or may not be written.
    Unknown(String),
}

#[derive(Clone, Debug)]
pub struct Write {
    pub id: String,
    pub topic: String,
    pub partition: u32,
    pub outcome: Outcome,
}

/// One record as a reader saw it: its offset and write id (`None` for a
/// record without one, which the harness never writes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub offset: u64,
    pub id: Option<String>,
}

/// A partition of a topic.
pub type PartitionKey = (String, u32);

/// Everything the checker judges.
#[derive(Debug, Default)]
pub struct History {
    pub writes: Vec<Write>,
    /// The final read of every partition, from its leader after healing.
    pub final_read: BTreeMap<PartitionKey, Vec<Seen>>,
    /// Each replica's committed records after healing: (partition, node).
    pub replica_reads: BTreeMap<(PartitionKey, runnel_cluster::NodeId), Vec<Seen>>,
    /// Per consumer, per partition, what it read during the run in order.
    pub consumer_reads: BTreeMap<String, BTreeMap<PartitionKey, Vec<Seen>>>,
    /// Where each partition's final read starts when retention deleted
    /// records below it (absent: it starts at 0). Whether a deletion was
    /// due is the harness's check, when it happens.
    pub log_starts: BTreeMap<PartitionKey, u64>,
    /// The topic is compacted, its records keyed by [`compaction_key`]: an
    /// acknowledged record may be gone when a later record of its key is
    /// in the log.
    pub compacted: bool,
}

/// Keys a compacted topic's writes share: the key of write `id`.
pub fn compaction_key(id: &str) -> String {
    const KEYS: u64 = 16;
    format!("k{}", fnv1a64(id.bytes()) % KEYS)
}

/// FNV-1a, 64 bits: a stable digest for the checks' labels and keys.
pub fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl History {
    /// Where `key`'s final read starts.
    fn log_start(&self, key: &PartitionKey) -> u64 {
        self.log_starts.get(key).copied().unwrap_or(0)
    }
}

/// One anomaly, named the way a person debugging it needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Anomaly {
    /// Acknowledged but absent from the final read.
    Lost {
        id: String,
        topic: String,
        partition: u32,
        acked_offset: u64,
    },
    /// Present more than once in the final read.
    Duplicated {
        id: String,
        topic: String,
        partition: u32,
        offsets: Vec<u64>,
    },
    /// Acknowledged at one offset, found at another (one offset, two records).
    InconsistentOffset {
        id: String,
        topic: String,
        partition: u32,
        acked_offset: u64,
        found_at: u64,
    },
    /// Refused as definitely not written, yet present.
    FailedButWritten {
        id: String,
        topic: String,
        partition: u32,
        offset: u64,
        error: String,
    },
    /// A replica holds another record than the leader below its commit point.
    ReplicaDisagrees {
        topic: String,
        partition: u32,
        node: runnel_cluster::NodeId,
        offset: u64,
        leader: String,
        replica: String,
    },
    /// A consumer saw offsets go backwards or repeat.
    NonMonotonicRead {
        consumer: String,
        topic: String,
        partition: u32,
        previous: u64,
        offset: u64,
    },
    /// A consumer read a record the final read does not hold at that offset.
    ReadNotInLog {
        consumer: String,
        topic: String,
        partition: u32,
        offset: u64,
        read: String,
        log: String,
    },
    /// A record no producer wrote.
    Unexpected { topic: String, partition: u32, offset: u64 },
    /// A window result the reference (computed from the input) holds and
    /// the dataflow's sink does not.
    DataflowMissing {
        dataflow: String,
        key: String,
        window_start_ms: i64,
        expected: u64,
    },
    /// A window result in the sink the reference does not hold.
    DataflowExtra {
        dataflow: String,
        key: String,
        window_start_ms: i64,
        found: u64,
    },
    DataflowWrongCount {
        dataflow: String,
        key: String,
        window_start_ms: i64,
        expected: u64,
        found: u64,
    },
    /// A window result in the sink more than once.
    DataflowDuplicated {
        dataflow: String,
        key: String,
        window_start_ms: i64,
        copies: u64,
    },
    /// A dataflow task found records it had written gone from its output.
    DataflowOutputLost { dataflow: String, task: u32, error: String },
    /// Retention deleted a record younger than the topic's retention.
    ExpiredTooSoon {
        topic: String,
        partition: u32,
        node: runnel_cluster::NodeId,
        offset: u64,
        timestamp_ms: i64,
        horizon_ms: i64,
    },
}

impl Anomaly {
    pub fn kind(&self) -> &'static str {
        match self {
            Anomaly::Lost { .. } => "lost",
            Anomaly::Duplicated { .. } => "duplicated",
            Anomaly::InconsistentOffset { .. } => "inconsistent_offset",
            Anomaly::FailedButWritten { .. } => "failed_but_written",
            Anomaly::ReplicaDisagrees { .. } => "replica_disagrees",
            Anomaly::NonMonotonicRead { .. } => "non_monotonic_read",
            Anomaly::ReadNotInLog { .. } => "read_not_in_log",
            Anomaly::Unexpected { .. } => "unexpected",
            Anomaly::DataflowMissing { .. } => "dataflow_missing",
            Anomaly::DataflowExtra { .. } => "dataflow_extra",
            Anomaly::DataflowWrongCount { .. } => "dataflow_wrong_count",
            Anomaly::DataflowDuplicated { .. } => "dataflow_duplicated",
            Anomaly::DataflowOutputLost { .. } => "dataflow_output_lost",
            Anomaly::ExpiredTooSoon { .. } => "expired_too_soon",
        }
    }
}

/// The checker's verdict and the counts behind it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verdict {
    pub attempted: u64,
    pub acknowledged: u64,
    pub failed: u64,
    pub unknown: u64,
    /// Unknown writes found in the final read (they were written).
    pub unknown_present: u64,
    /// Unknown writes absent from the final read (they were not).
    pub unknown_absent: u64,
    pub records_read: u64,
    pub consumer_reads: u64,
    /// Acknowledged writes below the final read's start: deleted by
    /// retention, not lost.
    pub expired: u64,
    /// Acknowledged writes of a compacted topic absent because a later
    /// record of their key is in the log: compacted away, not lost.
    pub compacted: u64,
    /// Why writes failed or were left unknown: error text → records.
    pub failure_reasons: BTreeMap<String, u64>,
    /// Anomalies per kind (exact counts).
    pub anomaly_counts: BTreeMap<String, u64>,
    /// The first few anomalies of each kind.
    pub anomalies: Vec<Anomaly>,
}

impl Verdict {
    pub fn anomaly_total(&self) -> u64 {
        self.anomaly_counts.values().sum()
    }

    pub fn ok(&self) -> bool {
        self.anomaly_total() == 0
    }

    /// Adds the anomalies another check found (a running check's).
    pub fn merge(&mut self, other: Verdict) {
        for (kind, count) in other.anomaly_counts {
            *self.anomaly_counts.entry(kind).or_default() += count;
        }
        self.anomalies.extend(other.anomalies);
    }

    pub fn add(&mut self, anomaly: Anomaly) {
        let count = self.anomaly_counts.entry(anomaly.kind().to_string()).or_default();
        *count += 1;
        if *count as usize <= LISTED_PER_KIND_MAX {
            self.anomalies.push(anomaly);
        }
    }
}

/// A windowed result: (key, window start).
pub type WindowKey = (String, i64);

/// A dataflow's sink against the reference computed from its input: per
/// window, the results the reference expects in order — one with
/// `Emit::Final`, each update passing the filter with `Emit::Changes` — and
/// every one of them exactly once.
pub fn check_results(
    dataflow: &str,
    reference: &BTreeMap<WindowKey, Vec<u64>>,
    sink: &[(WindowKey, u64)],
    verdict: &mut Verdict,
) {
    let mut found: BTreeMap<&WindowKey, Vec<u64>> = BTreeMap::new();
    for (key, count) in sink {
        found.entry(key).or_default().push(*count);
    }
    for (key, counts) in &found {
        let (name, start) = (key.0.clone(), key.1);
        let mut distinct = counts.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() < counts.len() {
            verdict.add(Anomaly::DataflowDuplicated {
                dataflow: dataflow.to_string(),
                key: name.clone(),
                window_start_ms: start,
                copies: (counts.len() - distinct.len()) as u64,
            });
        }
        let last = counts.last().copied().unwrap_or_default();
        match reference.get(*key) {
            None => verdict.add(Anomaly::DataflowExtra {
                dataflow: dataflow.to_string(),
                key: name,
                window_start_ms: start,
                found: last,
            }),
            Some(expected) if distinct != *expected => verdict.add(Anomaly::DataflowWrongCount {
                dataflow: dataflow.to_string(),
                key: name,
                window_start_ms: start,
                expected: expected.last().copied().unwrap_or_default(),
                found: last,
            }),
            Some(_) => {}
        }
    }
    for (key, expected) in reference.iter().filter(|(k, _)| !found.contains_key(k)) {
        verdict.add(Anomaly::DataflowMissing {
            dataflow: dataflow.to_string(),
            key: key.0.clone(),
            window_start_ms: key.1,
            expected: expected.last().copied().unwrap_or_default(),
        });
    }
}

/// A dataflow whose results are counted, not changes (a join's pairs):
/// each key must be in the sink exactly as many times as the reference says.
pub fn check_result_counts(
    dataflow: &str,
    reference: &BTreeMap<WindowKey, u64>,
    found: &BTreeMap<WindowKey, u64>,
    verdict: &mut Verdict,
) {
    for (key, &count) in found {
        let (name, start) = (key.0.clone(), key.1);
        match reference.get(key).copied() {
            None => verdict.add(Anomaly::DataflowExtra {
                dataflow: dataflow.to_string(),
                key: name,
                window_start_ms: start,
                found: count,
            }),
            Some(expected) if count > expected => verdict.add(Anomaly::DataflowDuplicated {
                dataflow: dataflow.to_string(),
                key: name,
                window_start_ms: start,
                copies: count - expected,
            }),
            Some(expected) if count < expected => verdict.add(Anomaly::DataflowWrongCount {
                dataflow: dataflow.to_string(),
                key: name,
                window_start_ms: start,
                expected,
                found: count,
            }),
            Some(_) => {}
        }
    }
    for (key, &expected) in reference.iter().filter(|(k, _)| !found.contains_key(k)) {
        verdict.add(Anomaly::DataflowMissing {
            dataflow: dataflow.to_string(),
            key: key.0.clone(),
            window_start_ms: key.1,
            expected,
        });
    }
}

fn label(id: &Option<String>) -> String {
    id.clone().unwrap_or_else(|| "<no write id>".to_string())
}

/// Judges a history.
pub fn check(history: &History) -> Verdict {
    let mut verdict = Verdict::default();
    // Where each write id is in the final read.
    let mut found: BTreeMap<&str, (&PartitionKey, Vec<u64>)> = BTreeMap::new();
    for (key, records) in &history.final_read {
        verdict.records_read += records.len() as u64;
        for seen in records {
            match &seen.id {
                Some(id) => found
                    .entry(id.as_str())
                    .or_insert((key, Vec::new()))
                    .1
                    .push(seen.offset),
                None => verdict.add(Anomaly::Unexpected {
                    topic: key.0.clone(),
                    partition: key.1,
                    offset: seen.offset,
                }),
            }
        }
    }
    check_writes(history, &found, &mut verdict);
    for (id, (key, offsets)) in &found {
        if offsets.len() > 1 {
            verdict.add(Anomaly::Duplicated {
                id: id.to_string(),
                topic: key.0.clone(),
                partition: key.1,
                offsets: offsets.clone(),
            });
        }
    }
    check_replicas(history, &mut verdict);
    check_consumers(history, &mut verdict);
    verdict
}

/// Per partition and compaction key, the greatest offset in the final read.
fn latest_by_key(history: &History) -> BTreeMap<(&PartitionKey, String), u64> {
    let mut latest = BTreeMap::new();
    if !history.compacted {
        return latest;
    }
    for (key, records) in &history.final_read {
        for seen in records {
            if let Some(id) = &seen.id {
                let offset = latest.entry((key, compaction_key(id))).or_insert(seen.offset);
                *offset = (*offset).max(seen.offset);
            }
        }
    }
    latest
}

/// Whether compaction explains why the record written as `id` at `offset`
/// is not in the final read: a later one of its key is.
fn compacted_away(latest: &BTreeMap<(&PartitionKey, String), u64>, key: &PartitionKey, id: &str, offset: u64) -> bool {
    latest
        .get(&(key, compaction_key(id)))
        .is_some_and(|&latest| latest > offset)
}

fn check_writes(history: &History, found: &BTreeMap<&str, (&PartitionKey, Vec<u64>)>, verdict: &mut Verdict) {
    let attempted: BTreeSet<&str> = history.writes.iter().map(|w| w.id.as_str()).collect();
    let latest = latest_by_key(history);
    for write in &history.writes {
        verdict.attempted += 1;
        let here = found.get(write.id.as_str());
        match &write.outcome {
            Outcome::Acked { offset } => {
                verdict.acknowledged += 1;
                let key = (write.topic.clone(), write.partition);
                match here {
                    None if *offset < history.log_start(&key) => verdict.expired += 1,
                    None if compacted_away(&latest, &key, &write.id, *offset) => verdict.compacted += 1,
                    None => verdict.add(Anomaly::Lost {
                        id: write.id.clone(),
                        topic: write.topic.clone(),
                        partition: write.partition,
                        acked_offset: *offset,
                    }),
                    Some((key, offsets)) if key.1 != write.partition || !offsets.contains(offset) => {
                        verdict.add(Anomaly::InconsistentOffset {
                            id: write.id.clone(),
                            topic: write.topic.clone(),
                            partition: write.partition,
                            acked_offset: *offset,
                            found_at: offsets[0],
                        })
                    }
                    Some(_) => {}
                }
            }
            Outcome::Failed(error) => {
                verdict.failed += 1;
                *verdict.failure_reasons.entry(format!("failed: {error}")).or_default() += 1;
            }
            Outcome::Unknown(error) => {
                verdict.unknown += 1;
                *verdict.failure_reasons.entry(format!("unknown: {error}")).or_default() += 1;
                match here {
                    Some(_) => verdict.unknown_present += 1,
                    None => verdict.unknown_absent += 1,
                }
            }
        }
    }
    // A write refused as definitely not written must not appear.
    for write in &history.writes {
        if let (Outcome::Failed(error), Some((key, offsets))) = (&write.outcome, found.get(write.id.as_str())) {
            verdict.add(Anomaly::FailedButWritten {
                id: write.id.clone(),
                topic: key.0.clone(),
                partition: key.1,
                offset: offsets[0],
                error: error.clone(),
            });
        }
    }
    for (id, (key, offsets)) in found {
        if !attempted.contains(id) {
            verdict.add(Anomaly::Unexpected {
                topic: key.0.clone(),
                partition: key.1,
                offset: offsets[0],
            });
        }
    }
}

/// Every replica must agree with the leader's log on every offset both hold.
fn check_replicas(history: &History, verdict: &mut Verdict) {
    for ((key, node), records) in &history.replica_reads {
        let Some(leader) = history.final_read.get(key) else {
            continue;
        };
        let by_offset: BTreeMap<u64, &Option<String>> = leader.iter().map(|s| (s.offset, &s.id)).collect();
        for seen in records {
            if let Some(at_leader) = by_offset.get(&seen.offset) {
                if **at_leader != seen.id {
                    verdict.add(Anomaly::ReplicaDisagrees {
                        topic: key.0.clone(),
                        partition: key.1,
                        node: *node,
                        offset: seen.offset,
                        leader: label(at_leader),
                        replica: label(&seen.id),
                    });
                }
            }
        }
    }
}

/// Each consumer's offsets per partition only go up, and what it read is
/// what the log holds at that offset.
fn check_consumers(history: &History, verdict: &mut Verdict) {
    let latest = latest_by_key(history);
    for (consumer, partitions) in &history.consumer_reads {
        for (key, reads) in partitions {
            verdict.consumer_reads += reads.len() as u64;
            let log: BTreeMap<u64, &Option<String>> = history
                .final_read
                .get(key)
                .map(|records| records.iter().map(|s| (s.offset, &s.id)).collect())
                .unwrap_or_default();
            let mut previous: Option<u64> = None;
            for seen in reads {
                if let Some(previous) = previous.filter(|p| seen.offset <= *p) {
                    verdict.add(Anomaly::NonMonotonicRead {
                        consumer: consumer.clone(),
                        topic: key.0.clone(),
                        partition: key.1,
                        previous,
                        offset: seen.offset,
                    });
                }
                previous = Some(seen.offset);
                if seen.offset < history.log_start(key) {
                    // Read before retention deleted it.
                    continue;
                }
                let in_log = log.get(&seen.offset).copied();
                let compacted = in_log.is_none()
                    && seen
                        .id
                        .as_deref()
                        .is_some_and(|id| compacted_away(&latest, key, id, seen.offset));
                if in_log != Some(&seen.id) && !compacted {
                    verdict.add(Anomaly::ReadNotInLog {
                        consumer: consumer.clone(),
                        topic: key.0.clone(),
                        partition: key.1,
                        offset: seen.offset,
                        read: label(&seen.id),
                        log: in_log.map_or_else(|| "<nothing>".to_string(), label),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use runnel_cluster::NodeId;

    use super::*;

    fn key() -> PartitionKey {
        ("t".to_string(), 0)
    }

    fn seen(offset: u64, id: &str) -> Seen {
        Seen {
            offset,
            id: Some(id.to_string()),
        }
    }

    fn write(id: &str, outcome: Outcome) -> Write {
        Write {
            id: id.to_string(),
            topic: "t".to_string(),
            partition: 0,
            outcome,
        }
    }

    fn acked(id: &str, offset: u64) -> Write {
        write(id, Outcome::Acked { offset })
    }

    fn kinds(verdict: &Verdict) -> Vec<(&str, u64)> {
        verdict.anomaly_counts.iter().map(|(k, v)| (k.as_str(), *v)).collect()
    }

    #[test]
    fn a_clean_history_passes_and_resolves_unknown_writes() {
        let mut history = History {
            writes: vec![
                acked("a", 0),
                acked("b", 1),
                write("c", Outcome::Unknown("timeout".into())),
                write("d", Outcome::Unknown("timeout".into())),
                write("e", Outcome::Failed("unknown topic".into())),
            ],
            ..History::default()
        };
        history
            .final_read
            .insert(key(), vec![seen(0, "a"), seen(1, "b"), seen(2, "c")]);
        history
            .replica_reads
            .insert((key(), NodeId(2)), vec![seen(0, "a"), seen(1, "b")]);
        let mut reads = BTreeMap::new();
        reads.insert(key(), vec![seen(0, "a"), seen(2, "c")]);
        history.consumer_reads.insert("c1".into(), reads);
        let verdict = check(&history);
        assert!(verdict.ok(), "{:?}", verdict.anomalies);
        assert_eq!(
            (verdict.attempted, verdict.acknowledged, verdict.failed, verdict.unknown),
            (5, 2, 1, 2)
        );
        assert_eq!((verdict.unknown_present, verdict.unknown_absent), (1, 1));
        assert_eq!((verdict.records_read, verdict.consumer_reads), (3, 2));
    }

    #[test]
    fn lost_duplicated_and_moved_records_are_reported() {
        let mut history = History {
            writes: vec![acked("a", 0), acked("b", 1), acked("c", 2), acked("d", 3)],
            ..History::default()
        };
        // "b" lost, "c" written twice, "d" acknowledged at 3 but found at 4.
        history
            .final_read
            .insert(key(), vec![seen(0, "a"), seen(2, "c"), seen(3, "c"), seen(4, "d")]);
        let verdict = check(&history);
        assert_eq!(
            kinds(&verdict),
            vec![("duplicated", 1), ("inconsistent_offset", 1), ("lost", 1)]
        );
        assert!(verdict.anomalies.contains(&Anomaly::Lost {
            id: "b".into(),
            topic: "t".into(),
            partition: 0,
            acked_offset: 1
        }));
    }

    /// Records below the final read's start were deleted by retention: an
    /// acknowledged write there is counted as expired, a consumer's earlier
    /// read of one is not judged against the log; one at or above the start
    /// that is missing is still lost.
    #[test]
    fn records_below_the_log_start_expired_rather_than_lost() {
        let mut history = History {
            writes: vec![acked("a", 0), acked("b", 1), acked("c", 2), acked("d", 3)],
            ..History::default()
        };
        history.final_read.insert(key(), vec![seen(2, "c")]);
        history.log_starts.insert(key(), 2);
        let mut reads = BTreeMap::new();
        reads.insert(key(), vec![seen(0, "a"), seen(1, "b"), seen(2, "c")]);
        history.consumer_reads.insert("c1".into(), reads);
        let verdict = check(&history);
        assert_eq!(kinds(&verdict), vec![("lost", 1)], "{:?}", verdict.anomalies);
        assert_eq!(verdict.expired, 2);
        assert!(matches!(&verdict.anomalies[0], Anomaly::Lost { id, .. } if id == "d"));
    }

    #[test]
    fn replicas_consumers_and_strangers_are_checked() {
        let mut history = History {
            writes: vec![acked("a", 0), acked("b", 1)],
            ..History::default()
        };
        history.final_read.insert(
            key(),
            vec![seen(0, "a"), seen(1, "b"), Seen { offset: 2, id: None }, seen(3, "zz")],
        );
        history
            .replica_reads
            .insert((key(), NodeId(3)), vec![seen(0, "a"), seen(1, "x")]);
        let mut reads = BTreeMap::new();
        reads.insert(key(), vec![seen(1, "b"), seen(0, "a"), seen(5, "ghost")]);
        history.consumer_reads.insert("c1".into(), reads);
        let verdict = check(&history);
        assert_eq!(
            kinds(&verdict),
            vec![
                ("non_monotonic_read", 1),
                ("read_not_in_log", 1),
                ("replica_disagrees", 1),
                ("unexpected", 2)
            ]
        );
    }

    #[test]
    fn a_write_refused_as_not_written_must_not_appear() {
        let mut history = History {
            writes: vec![write("a", Outcome::Failed("refused".into()))],
            ..History::default()
        };
        history.final_read.insert(key(), vec![seen(0, "a")]);
        assert_eq!(kinds(&check(&history)), vec![("failed_but_written", 1)]);
    }

    #[test]
    fn dataflow_results_must_equal_the_reference_exactly_once() {
        let w = |card: &str, start: i64| (card.to_string(), start);
        // Final results: one per window.
        let reference = BTreeMap::from([(w("a", 0), vec![4]), (w("b", 0), vec![5]), (w("c", 60), vec![6])]);
        let mut clean = Verdict::default();
        let sink = vec![(w("b", 0), 5), (w("a", 0), 4), (w("c", 60), 6)];
        check_results("f", &reference, &sink, &mut clean);
        assert!(clean.ok(), "{:?}", clean.anomalies);

        let mut verdict = Verdict::default();
        let sink = vec![(w("a", 0), 4), (w("a", 0), 4), (w("b", 0), 7), (w("d", 0), 9)];
        check_results("f", &reference, &sink, &mut verdict);
        assert_eq!(
            kinds(&verdict),
            vec![
                ("dataflow_duplicated", 1),
                ("dataflow_extra", 1),
                ("dataflow_missing", 1),
                ("dataflow_wrong_count", 1)
            ]
        );

        // Changes: every update once, none skipped.
        let reference = BTreeMap::from([(w("a", 0), vec![2, 3, 4])]);
        let mut clean = Verdict::default();
        check_results(
            "f",
            &reference,
            &[(w("a", 0), 2), (w("a", 0), 3), (w("a", 0), 4)],
            &mut clean,
        );
        assert!(clean.ok(), "{:?}", clean.anomalies);
        let mut skipped = Verdict::default();
        check_results("f", &reference, &[(w("a", 0), 2), (w("a", 0), 4)], &mut skipped);
        assert_eq!(kinds(&skipped), vec![("dataflow_wrong_count", 1)]);
        let mut repeated = Verdict::default();
        let sink = [(w("a", 0), 2), (w("a", 0), 3), (w("a", 0), 3), (w("a", 0), 4)];
        check_results("f", &reference, &sink, &mut repeated);
        assert_eq!(kinds(&repeated), vec![("dataflow_duplicated", 1)]);
    }
}
