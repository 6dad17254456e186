//! Behaviour of the segmented log as its users see it: appends, reads, crash
//! recovery, truncation and retention.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use runnel_storage::{BatchBuilder, FsyncPolicy, Log, LogConfig, Record, RecordBatch, StorageError};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        index_interval_bytes: 256,
        fsync: FsyncPolicy::Never,
        retention_age: None,
        ..LogConfig::default()
    }
}

/// A batch of `count` records whose values name their batch and position.
fn batch(tag: u64, count: u32, timestamp_ms: i64) -> RecordBatch {
    let mut builder = BatchBuilder::new();
    for i in 0..count {
        let record = Record {
            timestamp_ms: timestamp_ms + i as i64,
            key: Some(Bytes::from(format!("key-{tag}"))),
            value: Some(Bytes::from(format!("batch-{tag}-record-{i}-{}", "x".repeat(40)))),
            headers: Vec::new(),
        };
        builder.push(&record).expect("push");
    }
    builder.build().expect("build")
}

/// Appends `batches` batches of 5 records; returns each batch's (base, size).
fn fill(log: &mut Log, batches: u64) -> Vec<(u64, usize)> {
    (0..batches)
        .map(|tag| {
            let mut b = batch(tag, 5, 1_000 + tag as i64 * 10);
            let base = log.append(&mut b).expect("append");
            (base, b.size_bytes())
        })
        .collect()
}

/// Every record value from `offset` to the end, decoded.
fn values_from(log: &Log, offset: u64) -> Vec<(u64, Bytes)> {
    let mut out = Vec::new();
    let mut next = offset;
    while next < log.end_offset() {
        let batches = log.read(next, 1000).expect("read");
        assert!(!batches.is_empty(), "read at {next} below the end returned nothing");
        for b in &batches {
            for r in b.records() {
                let r = r.expect("record");
                if r.offset >= next {
                    out.push((r.offset, r.record.value.expect("value")));
                }
            }
            next = b.next_offset();
        }
    }
    out
}

fn last_segment(dir: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop().expect("a segment")
}

#[test]
fn appends_read_back_in_order_across_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    let placed = fill(&mut log, 60);
    assert!(
        log.segment_count() > 3,
        "expected several segments, got {}",
        log.segment_count()
    );
    assert_eq!(placed[0].0, 0);
    assert!(
        placed.windows(2).all(|w| w[1].0 == w[0].0 + 5),
        "offsets are contiguous"
    );
    assert_eq!(log.end_offset(), 300);

    let values = values_from(&log, 0);
    assert_eq!(values.len(), 300);
    for (i, (offset, value)) in values.iter().enumerate() {
        assert_eq!(*offset, i as u64);
        let expected = format!("batch-{}-record-{}-", i / 5, i % 5);
        assert!(value.starts_with(expected.as_bytes()), "offset {offset}: {value:?}");
    }
    // A read from the middle of a batch starts with the batch that holds it.
    let batches = log.read(137, 1).expect("read");
    assert_eq!(batches.len(), 1, "a small byte limit still returns one batch");
    assert_eq!(batches[0].base_offset(), 135);
    // A large limit crosses segment boundaries.
    let batches = log.read(0, 1 << 20).expect("read");
    assert_eq!(batches.iter().map(|b| b.record_count() as u64).sum::<u64>(), 300);
    // Reads stop below an upper bound (a commit point).
    let batches = log.read_until(0, 1 << 20, 52).expect("read");
    assert_eq!(batches.last().map(|b| b.base_offset()), Some(50));
}

#[test]
fn clean_close_and_reopen_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    fill(&mut log, 40);
    let before = values_from(&log, 0);
    log.close().expect("close");
    let mut log = Log::open(dir.path(), config()).expect("reopen");
    assert_eq!(values_from(&log, 0), before);
    assert_eq!(log.append(&mut batch(99, 2, 5)).expect("append"), 200);
    drop(log); // a crash: no clean close
    let log = Log::open(dir.path(), config()).expect("recover");
    assert_eq!(log.end_offset(), 202);
    assert_eq!(values_from(&log, 0)[..200], before[..]);
}

#[test]
fn cutting_the_last_batch_at_every_byte_recovers_to_the_previous_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    let placed = fill(&mut log, 12);
    let expected = values_from(&log, 0);
    drop(log);
    let segment = last_segment(dir.path());
    let original = std::fs::read(&segment).expect("read segment");
    let (last_base, last_size) = *placed.last().expect("batches");
    let last_start = original.len() - last_size;
    for cut in last_start..original.len() {
        std::fs::write(&segment, &original[..cut]).expect("cut");
        let log = Log::open(dir.path(), config()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(log.end_offset(), last_base, "cut at {cut}");
        assert_eq!(values_from(&log, 0)[..], expected[..last_base as usize], "cut at {cut}");
        drop(log);
        std::fs::write(&segment, &original).expect("restore");
    }
}

#[test]
fn garbage_after_the_last_batch_is_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    fill(&mut log, 3);
    drop(log);
    let segment = last_segment(dir.path());
    let mut bytes = std::fs::read(&segment).expect("read");
    bytes.extend_from_slice(&[0u8; 700]);
    std::fs::write(&segment, &bytes).expect("write");
    let mut log = Log::open(dir.path(), config()).expect("recover");
    assert_eq!(log.end_offset(), 15);
    assert_eq!(log.append(&mut batch(7, 1, 0)).expect("append"), 15);
}

#[test]
fn a_flipped_bit_mid_segment_is_reported_with_file_and_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one_segment = || LogConfig {
        segment_bytes_max: 1 << 20,
        ..config()
    };
    let mut log = Log::open(dir.path(), one_segment()).expect("open");
    let placed = fill(&mut log, 12);
    drop(log);
    let segment = last_segment(dir.path());
    let original = std::fs::read(&segment).expect("read");
    let per_batch = placed[0].1;
    // Flip bits in the second batch of the segment, in the CRC'd body and in the length field.
    for position in [per_batch + 40, per_batch + 100, per_batch + 9] {
        let mut damaged = original.clone();
        damaged[position] ^= 0x10;
        std::fs::write(&segment, &damaged).expect("write");
        match Log::open(dir.path(), one_segment()) {
            Err(StorageError::Corrupt {
                path,
                position: at,
                reason,
            }) => {
                assert_eq!(path, segment, "{reason}");
                assert_eq!(at, per_batch as u64, "damage at byte {position}: {reason}");
            }
            Err(other) => panic!("damage at byte {position}: wrong error {other}"),
            Ok(log) => panic!(
                "damage at byte {position} went unnoticed; log ends at {}",
                log.end_offset()
            ),
        }
    }
    // Nothing was cut off: undoing the damage gives the whole log back.
    std::fs::write(&segment, &original).expect("restore");
    assert_eq!(Log::open(dir.path(), one_segment()).expect("open").end_offset(), 60);
}

#[test]
fn damage_in_a_trusted_segment_is_caught_on_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    fill(&mut log, 5);
    log.close().expect("close");
    let segment = last_segment(dir.path());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment)
        .expect("open segment");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 100).expect("read");
    file.write_all_at(&[byte[0] ^ 1], 100).expect("write");
    let log = Log::open(dir.path(), config()).expect("clean open skips checks");
    let err = log.read(0, 1 << 20).expect_err("damaged read accepted");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(".log"), "{err}");
}

#[test]
fn truncate_then_append_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    fill(&mut log, 40);
    let segments_before = log.segment_count();
    let before = values_from(&log, 0);

    let err = log.truncate(52).expect_err("mid-batch truncate");
    assert!(
        matches!(
            err,
            StorageError::NotBatchBoundary {
                offset: 52,
                batch_base: 50
            }
        ),
        "{err}"
    );
    log.truncate(50).expect("truncate");
    assert_eq!(log.end_offset(), 50);
    assert!(log.segment_count() < segments_before);
    assert_eq!(log.append(&mut batch(500, 3, 0)).expect("append"), 50);
    let after = values_from(&log, 0);
    assert_eq!(after[..50], before[..50]);
    assert!(after[50].1.starts_with(b"batch-500-record-0"));
    drop(log);
    let log = Log::open(dir.path(), config()).expect("recover");
    assert_eq!(log.end_offset(), 53);
    assert_eq!(values_from(&log, 0), after);

    let mut log = log;
    log.truncate(0).expect("truncate all");
    assert_eq!((log.start_offset(), log.end_offset()), (0, 0));
    assert!(log.read(0, 100).expect("read").is_empty());
}

#[test]
fn reads_outside_the_log_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    fill(&mut log, 3);
    assert!(log.read(15, 100).expect("read at end").is_empty());
    let err = log.read(16, 100).expect_err("past the end");
    assert!(matches!(
        err,
        StorageError::OffsetOutOfRange {
            offset: 16,
            start: 0,
            end: 15
        }
    ));
    assert_eq!(err.to_string(), "offset 16 is out of range: the log holds [0, 15)");
    log.reset(1000).expect("reset");
    let err = log.read(5, 100).expect_err("below the start");
    assert!(matches!(
        err,
        StorageError::OffsetOutOfRange {
            offset: 5,
            start: 1000,
            end: 1000
        }
    ));
    assert_eq!(log.append(&mut batch(1, 1, 0)).expect("append"), 1000);
}

#[test]
fn retention_deletes_only_closed_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config();
    cfg.retention_bytes = Some(0);
    let mut log = Log::open(dir.path(), cfg.clone()).expect("open");
    fill(&mut log, 40);
    let count = log.segment_count();
    let end = log.end_offset();
    let outcome = log.apply_retention(SystemTime::now()).expect("retention");
    assert_eq!(outcome.segments_deleted, count - 1, "everything but the active segment");
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.end_offset(), end);
    assert!(log.start_offset() > 0);
    assert!(!values_from(&log, log.start_offset()).is_empty());

    // By age: record timestamps of 1970 are ancient; only closed segments go.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config();
    cfg.retention_age = Some(Duration::from_secs(3600));
    let mut log = Log::open(dir.path(), cfg).expect("open");
    fill(&mut log, 40);
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64;
    let mut fresh = batch(1, 50, now_ms);
    log.append(&mut fresh).expect("append");
    log.append(&mut batch(2, 50, now_ms)).expect("append");
    let outcome = log.apply_retention(SystemTime::now()).expect("retention");
    assert!(outcome.segments_deleted > 0);
    assert_eq!(
        log.start_offset(),
        fresh.base_offset(),
        "the segment with fresh records stays"
    );
    let outcome = log.apply_retention(SystemTime::now()).expect("retention");
    assert_eq!(outcome.segments_deleted, 0);
}

/// The retention point is where the first closed segment holding a record
/// within the retention starts (segments expire oldest first, by their
/// newest record); deleting stops only at a segment's start, and survives a
/// reopen.
#[test]
fn the_retention_point_stops_at_the_first_segment_to_keep_and_deletion_at_segment_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    fill(&mut log, 40);
    let young = log.append(&mut batch(100, 5, 1_000_000)).expect("append");
    fill(&mut log, 40);
    assert!(log.segment_count() > 3);
    let point = log.retention_point(2_000_000, 1_500_000);
    let keep_from = log
        .segment_bases()
        .into_iter()
        .filter(|&b| b <= young)
        .max()
        .expect("a segment");
    assert_eq!(
        point, keep_from,
        "the segment holding the young batch stays, and all after it"
    );
    assert_eq!(
        log.retention_point(2_000_000, 1_999_000),
        log.start_offset(),
        "nothing expired"
    );
    let everything = log.retention_point(i64::MAX, 1);
    assert_eq!(
        everything,
        *log.segment_bases().last().expect("active"),
        "all but the active one"
    );

    let inside = point + 1;
    let refused = log.delete_before(inside).expect_err("not a segment start");
    assert!(matches!(refused, StorageError::NotSegmentBoundary { offset, .. } if offset == inside));
    let end = log.end_offset();
    let outcome = log.delete_before(point).expect("delete");
    assert!(outcome.segments_deleted > 0 && outcome.bytes_deleted > 0);
    assert_eq!((log.start_offset(), log.end_offset()), (point, end));
    drop(log);
    let log = Log::open(dir.path(), config()).expect("reopen");
    assert_eq!((log.start_offset(), log.end_offset()), (point, end));
    assert_eq!(values_from(&log, point).first().map(|(offset, _)| *offset), Some(point));
}

/// Records a producer left without a time (stamped 0) do not make their
/// segments ancient: such a segment is judged by when it was last written,
/// as Kafka judges segments without timestamps.
#[test]
fn segments_without_record_times_expire_by_when_they_were_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    for tag in 0..80 {
        log.append(&mut batch(tag, 1, 0)).expect("append");
    }
    assert!(log.segment_count() > 2);
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64;
    let hour_ms = 3_600_000;
    assert_eq!(log.retention_point(now_ms, hour_ms as u64), 0, "written just now: kept");
    let later = log.retention_point(now_ms + 2 * hour_ms, hour_ms as u64);
    assert_eq!(
        later,
        *log.segment_bases().last().expect("active"),
        "written long before: gone"
    );
}

#[test]
fn lookup_by_timestamp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    fill(&mut log, 40); // batch t has timestamps 1000 + 10t .. +4
    assert_eq!(log.offset_for_timestamp(0).expect("lookup"), Some(0));
    assert_eq!(
        log.offset_for_timestamp(1_000 + 10 * 17 + 2).expect("lookup"),
        Some(17 * 5 + 2)
    );
    assert_eq!(
        log.offset_for_timestamp(1_000 + 10 * 17 + 7).expect("lookup"),
        Some(18 * 5)
    );
    assert_eq!(
        log.offset_for_timestamp(1_000 + 10 * 39 + 4).expect("lookup"),
        Some(199)
    );
    assert_eq!(log.offset_for_timestamp(1_000 + 10 * 39 + 5).expect("lookup"), None);
    log.close().expect("close");
    let log = Log::open(dir.path(), config()).expect("reopen with saved indexes");
    assert_eq!(log.offset_for_timestamp(1_000 + 10 * 23).expect("lookup"), Some(23 * 5));
}

#[test]
fn limits_and_offsets_are_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config();
    cfg.batch_bytes_max = 200;
    let mut log = Log::open(dir.path(), cfg).expect("open");
    let err = log.append(&mut batch(0, 10, 0)).expect_err("oversized batch");
    assert!(
        matches!(err, StorageError::BatchTooLarge { limit_bytes: 200, .. }),
        "{err}"
    );
    let mut b = batch(0, 1, 0);
    b.set_base_offset(5);
    let err = log.append_exact(&b).expect_err("gap");
    assert!(err.to_string().contains("does not continue the log at 0"), "{err}");
    let bad = LogConfig {
        segment_bytes_max: 10,
        ..LogConfig::default()
    };
    assert!(matches!(
        Log::open(dir.path().join("x"), bad),
        Err(StorageError::InvalidConfig(_))
    ));
}

#[test]
fn fsync_every_batch_and_interval_policies_work() {
    for policy in [FsyncPolicy::EveryBatch, FsyncPolicy::Interval(Duration::from_millis(0))] {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = LogConfig {
            fsync: policy,
            ..config()
        };
        let mut log = Log::open(dir.path(), cfg).expect("open");
        fill(&mut log, 10);
        assert!(!log.flush_if_due().expect("flush"), "{policy:?}: nothing left to sync");
        drop(log);
        assert_eq!(Log::open(dir.path(), config()).expect("open").end_offset(), 50);
    }
}

/// Review finding: a rescan after truncation must read from byte 0 of the
/// segment, whatever happened to the file handle before.
#[test]
fn truncate_after_crash_recovery_keeps_the_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one_segment = || LogConfig {
        segment_bytes_max: 1 << 20,
        ..config()
    };
    let mut log = Log::open(dir.path(), one_segment()).expect("open");
    fill(&mut log, 10);
    let before = values_from(&log, 0);
    drop(log); // crash: the reopen scans the segment
    let mut log = Log::open(dir.path(), one_segment()).expect("recover");
    log.truncate(30).expect("truncate");
    log.truncate(20).expect("truncate again in the same segment");
    assert_eq!(log.end_offset(), 20);
    assert_eq!(log.append(&mut batch(77, 2, 0)).expect("append"), 20);
    let after = values_from(&log, 0);
    assert_eq!(after[..20], before[..20]);
    drop(log);
    let log = Log::open(dir.path(), one_segment()).expect("recover again");
    assert_eq!(values_from(&log, 0), after);
}

/// Review finding: a failed open must not consume the clean-shutdown marker,
/// or a retry would "repair" data a clean close vouched for.
#[test]
fn a_cleanly_closed_log_missing_data_stays_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    fill(&mut log, 5);
    log.close().expect("close");
    let segment = last_segment(dir.path());
    let bytes = std::fs::read(&segment).expect("read");
    std::fs::write(&segment, &bytes[..bytes.len() - 10]).expect("cut");
    for attempt in 0..2 {
        let err = Log::open(dir.path(), config()).err().expect("damaged log opened");
        assert!(matches!(err, StorageError::Corrupt { .. }), "attempt {attempt}: {err}");
    }
}

/// Review finding: synced data below the recovery point is never cut off as a
/// torn tail.
#[test]
fn damage_below_the_recovery_point_is_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one_segment = || LogConfig {
        segment_bytes_max: 1 << 20,
        ..config()
    };
    let mut log = Log::open(dir.path(), one_segment()).expect("open");
    let placed = fill(&mut log, 4);
    log.close().expect("close"); // recovery point = 20
    let mut log = Log::open(dir.path(), one_segment()).expect("reopen");
    fill(&mut log, 2);
    drop(log); // crash
    let segment = last_segment(dir.path());
    let mut bytes = std::fs::read(&segment).expect("read");
    let last_synced_batch = placed[..3].iter().map(|p| p.1).sum::<usize>();
    bytes.truncate(last_synced_batch + 30); // tear inside batch 3, below the recovery point
    std::fs::write(&segment, &bytes).expect("write");
    let err = Log::open(dir.path(), one_segment())
        .err()
        .expect("synced data was cut silently");
    assert!(err.to_string().contains("recovery point"), "{err}");
}

/// Review finding: a reset survives a crash that left no segment files.
#[test]
fn reset_start_survives_losing_every_segment_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), config()).expect("open");
    fill(&mut log, 3);
    log.reset(1000).expect("reset");
    drop(log);
    std::fs::remove_file(last_segment(dir.path())).expect("remove");
    let log = Log::open(dir.path(), config()).expect("open");
    assert_eq!((log.start_offset(), log.end_offset()), (1000, 1000));
}

/// Review finding: offsets a corrupt header claims are checked on read.
#[test]
fn a_flipped_base_offset_in_a_trusted_segment_is_caught_on_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one_segment = || LogConfig {
        segment_bytes_max: 1 << 20,
        ..config()
    };
    let mut log = Log::open(dir.path(), one_segment()).expect("open");
    let placed = fill(&mut log, 6);
    log.close().expect("close");
    let segment = last_segment(dir.path());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment)
        .expect("open segment");
    let position = placed[..2].iter().map(|p| p.1 as u64).sum::<u64>(); // batch at offset 10
    file.write_all_at(&7u64.to_le_bytes(), position).expect("write");
    let log = Log::open(dir.path(), one_segment()).expect("clean open skips checks");
    let err = log.read(0, 1 << 20).expect_err("duplicated offsets accepted");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    let err = log.read(12, 1 << 20).expect_err("wrong batch accepted");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
}

/// Review findings: unbounded retention keeps everything; offsets cannot overflow.
#[test]
fn extreme_values_are_handled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = LogConfig {
        retention_age: Some(Duration::MAX),
        ..config()
    };
    let mut log = Log::open(dir.path(), cfg).expect("open");
    fill(&mut log, 40);
    assert_eq!(
        log.apply_retention(SystemTime::now())
            .expect("retention")
            .segments_deleted,
        0
    );
    log.reset(u64::MAX - 2).expect("reset");
    let err = log.append(&mut batch(1, 5, 0)).expect_err("overflow accepted");
    assert!(err.to_string().contains("overflow"), "{err}");
}

#[test]
fn a_crash_loses_what_was_not_synced_and_a_torn_write_is_cut_off() {
    for keep in [0, 1, 60] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = Log::open(dir.path(), config()).expect("open");
        fill(&mut log, 3);
        log.flush().expect("sync");
        let synced_end = log.end_offset();
        let expected = values_from(&log, 0);
        let mut unsynced = batch(99, 5, 5_000);
        log.append(&mut unsynced).expect("append");
        let lost = log.crash(keep).expect("crash");
        assert_eq!(lost, unsynced.size_bytes() as u64 - keep, "keep {keep}");
        let after = log.append(&mut batch(100, 1, 6_000));
        assert!(after.is_err(), "a crashed log must refuse appends");
        drop(log);
        let log = Log::open(dir.path(), config()).expect("reopen");
        assert_eq!(log.end_offset(), synced_end, "keep {keep}");
        assert_eq!(values_from(&log, 0), expected, "keep {keep}");
    }
}
