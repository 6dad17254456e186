//! Log compaction as a reader sees it: the latest record of every key stays
//! at its offset, tombstones go after their retention, and a crash at any
//! step leaves a log that still answers the latest value of every key.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use runnel_storage::{
    BatchBuilder, CompactionOutcome, CompactionSettings, CompactionStep, Compactor, FsyncPolicy, Log, LogConfig, Record,
};

const KEYS: u64 = 12;
/// Records are stamped from 500,000 ms on; tombstones live 60,000 ms.
const NOW_MS: i64 = 510_000;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 1024,
        index_interval_bytes: 128,
        fsync: FsyncPolicy::EveryBatch,
        retention_age: None,
        ..LogConfig::default()
    }
}

/// Record `i` of the test's history: mostly keyed updates, every 7th a
/// tombstone, every 11th without a key.
fn record(i: u64) -> Record {
    let key = (i % 11 != 5).then(|| Bytes::from(format!("key-{}", (i * 7) % KEYS)));
    let value = (i % 7 != 3).then(|| Bytes::from(format!("value-{i}")));
    Record {
        timestamp_ms: 500_000 + i as i64,
        key,
        value,
        headers: Vec::new(),
    }
}

/// Appends records `from..to`, three to a batch; every record by offset.
fn append(log: &mut Log, from: u64, to: u64, history: &mut BTreeMap<u64, Record>) {
    let mut i = from;
    while i < to {
        let mut builder = BatchBuilder::new();
        let first = i;
        while i < to && i < first + 3 {
            builder.push(&record(i)).expect("push");
            i += 1;
        }
        let mut batch = builder.build().expect("build");
        let base = log.append(&mut batch).expect("append");
        for (n, offset) in (first..i).zip(base..) {
            history.insert(offset, record(n));
        }
    }
}

/// Every record in the log, by offset.
fn read_all(log: &Log) -> BTreeMap<u64, Record> {
    let mut out = BTreeMap::new();
    let mut next = log.start_offset();
    while next < log.end_offset() {
        let batches = log.read(next, 4096).expect("read");
        for batch in &batches {
            for stored in batch.records() {
                let stored = stored.expect("record");
                if stored.offset >= next {
                    out.insert(stored.offset, stored.record);
                }
            }
            next = batch.next_offset();
        }
    }
    out
}

/// Each key's latest record (a tombstone included) and every keyless one.
fn latest(history: &BTreeMap<u64, Record>, below: u64) -> BTreeMap<u64, Record> {
    let mut by_key = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (&offset, record) in history.range(..below) {
        match &record.key {
            Some(key) => {
                by_key.insert(key.clone(), offset);
            }
            None => {
                out.insert(offset, record.clone());
            }
        }
    }
    for offset in by_key.into_values() {
        out.insert(offset, history[&offset].clone());
    }
    out
}

fn settings(now_ms: i64) -> CompactionSettings {
    CompactionSettings {
        step_bytes_max: 300,
        dirty_ratio_min: 0.0,
        delete_retention_ms: 60_000,
        ..CompactionSettings::new(u64::MAX, now_ms)
    }
}

/// Steps until the pass ends; its outcome and the steps it took.
fn compact(log: &mut Log, compactor: &mut Compactor, settings: &CompactionSettings) -> (CompactionOutcome, usize) {
    for steps in 1..10_000 {
        match log.compact_step(compactor, settings).expect("step") {
            CompactionStep::More => {}
            CompactionStep::Idle => return (CompactionOutcome::default(), steps),
            CompactionStep::Finished(outcome) => return (outcome, steps),
        }
    }
    panic!("compaction did not finish in 10,000 steps");
}

/// The log's records below the active segment are the latest of their key
/// (and tombstones among them), above it everything; every record is the
/// one written at its offset.
fn check_compacted(log: &Log, history: &BTreeMap<u64, Record>, active_base: u64) {
    let read = read_all(log);
    for (offset, record) in &read {
        assert_eq!(
            Some(record),
            history.get(offset),
            "offset {offset} holds what was written there"
        );
    }
    let wanted = latest(history, active_base);
    let closed: BTreeMap<_, _> = read.range(..active_base).map(|(o, r)| (*o, r.clone())).collect();
    assert_eq!(closed, wanted, "closed segments hold the latest record of each key");
    let active: Vec<_> = read.range(active_base..).map(|(o, _)| *o).collect();
    let written: Vec<_> = history.range(active_base..).map(|(o, _)| *o).collect();
    assert_eq!(active, written, "the active segment is untouched");
}

fn active_base(log: &Log) -> u64 {
    *log.segment_bases().last().expect("a segment")
}

#[test]
fn compaction_keeps_the_latest_record_of_each_key_at_its_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    let mut history = BTreeMap::new();
    append(&mut log, 0, 300, &mut history);
    let (end, size) = (log.end_offset(), log.size_bytes());
    assert!(log.segment_count() > 5, "{} segments", log.segment_count());

    let (outcome, _) = compact(&mut log, &mut Compactor::default(), &settings(NOW_MS));
    assert!(outcome.segments_rewritten > 0, "{outcome:?}");
    assert!(outcome.records_removed > 200, "{outcome:?}");
    assert_eq!(outcome.tombstones_removed, 0, "young tombstones stay: {outcome:?}");
    assert_eq!(log.end_offset(), end, "offsets do not move");
    // Every batch keeps its 61-byte header, emptied or not.
    assert!(
        log.size_bytes() < size * 2 / 3,
        "{} of {size} bytes left",
        log.size_bytes()
    );
    check_compacted(&log, &history, active_base(&log));

    // The same after a reopen, with the indexes the swap saved.
    let base = active_base(&log);
    log.close().expect("close");
    let log = Log::open(dir.path(), config()).expect("reopen");
    check_compacted(&log, &history, base);
    let header_count = {
        let mut n = 0;
        log.visit_headers(|_| n += 1).expect("headers");
        n
    };
    assert_eq!(header_count, 100, "every batch stays, even an emptied one");
}

#[test]
fn tombstones_stay_for_their_retention_then_go() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    let mut history = BTreeMap::new();
    append(&mut log, 0, 150, &mut history);
    let mut compactor = Compactor::default();
    compact(&mut log, &mut compactor, &settings(NOW_MS));
    let first_base = active_base(&log);
    let tombstones = |log: &Log| {
        read_all(log)
            .range(..first_base)
            .filter(|(_, r)| r.key.is_some() && r.value.is_none())
            .count()
    };
    let kept = tombstones(&log);
    assert!(kept > 0, "the latest record of some keys is a tombstone");

    // Later records, and a clock past the tombstones' retention: those
    // the first pass scanned go; those this pass scans first stay (a
    // reader may have read the values they delete before the swap).
    append(&mut log, 150, 180, &mut history);
    compact(&mut log, &mut compactor, &settings(NOW_MS * 10));
    let read = read_all(&log);
    let base = active_base(&log);
    for (offset, record) in read.range(..first_base) {
        assert!(
            record.value.is_some() || record.key.is_none(),
            "tombstone at {offset} outlived its retention"
        );
    }
    let mut expected = latest(&history, base);
    expected.retain(|offset, r| r.value.is_some() || r.key.is_none() || *offset >= first_base);
    let closed: BTreeMap<_, _> = read.range(..base).map(|(o, r)| (*o, r.clone())).collect();
    assert_eq!(closed, expected);
    assert!(
        closed
            .range(first_base..)
            .any(|(_, r)| r.key.is_some() && r.value.is_none()),
        "a tombstone first scanned by the second pass stays"
    );
}

#[test]
fn a_small_key_memory_compacts_in_several_passes_to_the_same_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    let mut history = BTreeMap::new();
    append(&mut log, 0, 300, &mut history);
    let small = CompactionSettings {
        key_map_bytes_max: 300,
        ..settings(NOW_MS)
    };
    let mut compactor = Compactor::default();
    let mut passes = 0;
    while compact(&mut log, &mut compactor, &small).0 != CompactionOutcome::default() {
        passes += 1;
        assert!(passes < 100, "passes do not converge");
    }
    assert!(passes > 1, "{passes} passes");
    check_compacted(&log, &history, active_base(&log));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

#[test]
fn a_crash_at_any_step_of_a_compaction_leaves_every_key_readable() {
    let original = tempfile::tempdir().expect("tempdir");
    let mut history = BTreeMap::new();
    let mut log = Log::open(original.path(), config()).expect("open");
    append(&mut log, 0, 200, &mut history);
    let base = active_base(&log);
    log.close().expect("close");
    let (_, total_steps) = {
        let copy = tempfile::tempdir().expect("tempdir");
        copy_dir(original.path(), copy.path());
        let mut log = Log::open(copy.path(), config()).expect("open");
        compact(&mut log, &mut Compactor::default(), &settings(NOW_MS))
    };
    assert!(total_steps > 10, "{total_steps} steps");

    for crash_after in 0..total_steps {
        let copy = tempfile::tempdir().expect("tempdir");
        copy_dir(original.path(), copy.path());
        let mut log = Log::open(copy.path(), config()).expect("open");
        let mut compactor = Compactor::default();
        for _ in 0..crash_after {
            log.compact_step(&mut compactor, &settings(NOW_MS)).expect("step");
        }
        log.crash(0).expect("crash");
        drop(log);
        drop(compactor);

        let mut log =
            Log::open(copy.path(), config()).unwrap_or_else(|e| panic!("reopen after step {crash_after}: {e}"));
        let read = read_all(&log);
        for (offset, record) in &read {
            assert_eq!(
                Some(record),
                history.get(offset),
                "after step {crash_after}: offset {offset}"
            );
        }
        for (offset, record) in latest(&history, base) {
            assert_eq!(
                read.get(&offset),
                Some(&record),
                "after step {crash_after}: latest at {offset} lost"
            );
        }
        let leftovers = std::fs::read_dir(copy.path())
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".cleaned")
            })
            .count();
        assert_eq!(
            leftovers, 0,
            "after step {crash_after}: unfinished output removed on open"
        );
        compact(&mut log, &mut Compactor::default(), &settings(NOW_MS));
        check_compacted(&log, &history, base);
    }
}

fn keyed(key: &str, value: Option<&str>, timestamp_ms: i64) -> Record {
    Record {
        timestamp_ms,
        key: Some(Bytes::from(key.to_string())),
        value: value.map(|v| Bytes::from(v.to_string())),
        headers: Vec::new(),
    }
}

/// Appends one record per batch.
fn append_records(log: &mut Log, records: &[Record]) {
    for record in records {
        let mut builder = BatchBuilder::new();
        builder.push(record).expect("push");
        log.append(&mut builder.build().expect("build")).expect("append");
    }
}

fn keys_of(log: &Log) -> Vec<(String, bool)> {
    read_all(log)
        .values()
        .filter_map(|r| Some((String::from_utf8_lossy(r.key.as_ref()?).into_owned(), r.value.is_some())))
        .collect()
}

/// A tombstone a pass kept while it was young goes in a later pass once it
/// has expired, though its key is never written again; and a tombstone at
/// or above the horizon (what every replica holds) stays however old.
#[test]
fn an_old_tombstone_goes_in_a_later_pass_but_never_above_the_horizon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    let padding = "x".repeat(200);
    append_records(
        &mut log,
        &[keyed("gone", Some(&padding), 1_000), keyed("gone", None, 2_000)],
    );
    let filler: Vec<Record> = (0..12)
        .map(|i| keyed(&format!("f{i}"), Some(&padding), 3_000))
        .collect();
    append_records(&mut log, &filler);
    let mut compactor = Compactor::default();
    let young = CompactionSettings {
        delete_retention_ms: 10_000,
        ..settings(5_000)
    };
    compact(&mut log, &mut compactor, &young);
    assert!(
        keys_of(&log).contains(&("gone".to_string(), false)),
        "the young tombstone stays"
    );
    assert!(
        !keys_of(&log).contains(&("gone".to_string(), true)),
        "the value it deletes goes"
    );

    // More records (other keys), a clock past the retention, but the
    // horizon below the tombstone: it stays.
    let more: Vec<Record> = (12..24)
        .map(|i| keyed(&format!("f{i}"), Some(&padding), 3_000))
        .collect();
    append_records(&mut log, &more);
    let held_back = CompactionSettings {
        delete_retention_ms: 10_000,
        tombstone_horizon_offset: 1,
        ..settings(100_000)
    };
    compact(&mut log, &mut compactor, &held_back);
    assert!(
        keys_of(&log).contains(&("gone".to_string(), false)),
        "above the horizon it stays"
    );

    let later: Vec<Record> = (24..36)
        .map(|i| keyed(&format!("f{i}"), Some(&padding), 3_000))
        .collect();
    append_records(&mut log, &later);
    let (outcome, _) = compact(
        &mut log,
        &mut compactor,
        &CompactionSettings {
            delete_retention_ms: 10_000,
            ..settings(100_000)
        },
    );
    assert_eq!(outcome.tombstones_removed, 1, "{outcome:?}");
    assert!(
        keys_of(&log).iter().all(|(key, _)| key != "gone"),
        "{:?}",
        keys_of(&log)
    );
}

/// `min.compaction.lag.ms`: a segment whose newest record is younger than
/// the lag is not compacted, nor any after it, so every version of a key
/// written within the lag stays readable; once the lag has passed, the
/// same segments compact as usual.
#[test]
fn records_younger_than_the_lag_are_not_compacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    let mut history = BTreeMap::new();
    append(&mut log, 0, 300, &mut history);
    let active = active_base(&log);
    // The records are stamped 500,000..500,300 ms: at 510,000 with a lag
    // of 9,900 ms, the segments ending after 500,100 are too young.
    let lagged = CompactionSettings {
        min_lag_ms: 9_900,
        ..settings(NOW_MS)
    };
    let mut compactor = Compactor::default();
    compact(&mut log, &mut compactor, &lagged);
    let read = read_all(&log);
    let young = history
        .iter()
        .filter(|(_, r)| r.timestamp_ms > NOW_MS - 9_900)
        .map(|(&offset, _)| offset)
        .min()
        .expect("young records");
    for (offset, record) in history.range(young..) {
        assert_eq!(read.get(offset), Some(record), "a young record at {offset} stays");
    }
    assert!(read.len() < history.len(), "the old segments compacted");
    let mut compactor = Compactor::default();
    compact(&mut log, &mut compactor, &settings(NOW_MS + 10_000));
    check_compacted(&log, &history, active);
}
