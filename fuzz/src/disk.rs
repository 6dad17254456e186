//! What a node reads from disk when it opens a replica: segments, their
//! indexes, `log.meta` (storage/src/log.rs, segment.rs, index.rs, kv.rs) and
//! the Raft state beside them (`raft.meta`, actors/src/raft_store.rs).
//!
//! A log is written, closed cleanly or crashed, damaged (bytes flipped,
//! files cut, deleted or overwritten; metadata flipped with its checksum
//! made right), then reopened. Whatever the damage, opening and reading
//! must not panic, and a log that opens returns only batches that were
//! written, at the offsets they were written at; after one more append and
//! a clean close it opens again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use raft::eraftpb::{Entry, HardState};
use raft::{GetEntriesContext, Storage as _};
use runnel_actors::raft_store::PartitionStore;
use runnel_storage::batch::CRC_START;
use runnel_storage::{BatchBuilder, FsyncPolicy, Log, LogConfig, Record, RecordBatch};

const BATCHES_MAX: usize = 24;
const DAMAGES_MAX: usize = 4;

#[derive(Arbitrary, Debug)]
struct Scenario {
    /// Segment size: 1 KiB and up, so that several segments exist.
    segment_kib: u8,
    index_interval_bytes: u8,
    batches: Vec<BatchSpec>,
    clean_close: bool,
    damages: Vec<Damage>,
    /// The Raft store instead of a bare log.
    raft: bool,
}

#[derive(Arbitrary, Debug)]
struct BatchSpec {
    records: u8,
    value_bytes: u8,
    keyed: bool,
    timestamp_step_ms: i16,
}

#[derive(Arbitrary, Debug)]
enum Damage {
    Flip {
        file: u8,
        at: u32,
        mask: u8,
    },
    Truncate {
        file: u8,
        at: u32,
    },
    Delete {
        file: u8,
    },
    Overwrite {
        file: u8,
        bytes: Vec<u8>,
    },
    /// A metadata file (`log.meta`, `raft.meta`) flipped, its CRC made right.
    FlipMeta {
        raft: bool,
        at: u32,
        mask: u8,
    },
}

pub fn run(data: &[u8]) {
    let mut input = Unstructured::new(data);
    let Ok(scenario) = Scenario::arbitrary(&mut input) else {
        return;
    };
    let dir = tempfile::tempdir().expect("a scratch directory");
    if scenario.raft {
        raft_store(dir.path(), &scenario);
    } else {
        log(dir.path(), &scenario);
    }
}

fn config(scenario: &Scenario) -> LogConfig {
    LogConfig {
        segment_bytes_max: 1024 * (1 + u64::from(scenario.segment_kib % 8)),
        index_interval_bytes: 1 + u64::from(scenario.index_interval_bytes),
        fsync: FsyncPolicy::Never,
        segment_age_max: None,
        retention_age: None,
        ..LogConfig::default()
    }
}

fn batch(spec: &BatchSpec, n: usize) -> RecordBatch {
    let mut builder = BatchBuilder::new();
    let mut timestamp_ms = 1_700_000_000_000 + n as i64 * 1000;
    for r in 0..1 + usize::from(spec.records % 4) {
        let value = vec![(n + r) as u8; usize::from(spec.value_bytes)];
        builder
            .push(&Record {
                timestamp_ms,
                key: spec.keyed.then(|| Bytes::from(format!("k{r}"))),
                value: Some(Bytes::from(value)),
                ..Record::default()
            })
            .expect("a record fits");
        timestamp_ms += i64::from(spec.timestamp_step_ms);
    }
    builder.build().expect("a batch builds")
}

/// The log written, by base offset.
type Written = BTreeMap<u64, Vec<u8>>;

fn log(dir: &Path, scenario: &Scenario) {
    let log_dir = dir.join("log");
    let mut log = Log::open(&log_dir, config(scenario)).expect("a new log opens");
    let mut written = Written::new();
    for (n, spec) in scenario.batches.iter().take(BATCHES_MAX).enumerate() {
        let mut batch = batch(spec, n);
        log.append(&mut batch).expect("append");
        written.insert(batch.base_offset(), batch.as_bytes().to_vec());
    }
    match scenario.clean_close {
        true => log.close().expect("close"),
        false => drop(log),
    }
    damage(&log_dir, &log_dir.join("log.meta"), scenario);
    let Ok(log) = Log::open(&log_dir, config(scenario)) else {
        return;
    };
    let Ok(mut log) = check_log(log, &written) else { return };
    let mut more = batch(
        &BatchSpec {
            records: 1,
            value_bytes: 3,
            keyed: true,
            timestamp_step_ms: 0,
        },
        99,
    );
    if log.append(&mut more).is_err() {
        return;
    }
    written.insert(more.base_offset(), more.as_bytes().to_vec());
    log.close().expect("a log that opened and took an append closes");
    let log = Log::open(&log_dir, config(scenario)).expect("a log closed cleanly opens again");
    let _ = check_log(log, &written);
}

/// Reads the whole log; every batch it returns must be one written at that
/// offset. A read may fail (damage found), never return something else.
fn check_log(log: Log, written: &Written) -> Result<Log, ()> {
    let mut offset = log.start_offset();
    while offset < log.end_offset() {
        let batches = log.read(offset, 4096).map_err(|_| ())?;
        assert!(!batches.is_empty(), "a read below the end offset returns a batch");
        for batch in &batches {
            let original = written.get(&batch.base_offset());
            assert_eq!(
                original.map(Vec::as_slice),
                Some(batch.as_bytes()),
                "the batch at offset {} is not the one written there",
                batch.base_offset()
            );
            for record in batch.records() {
                record.expect("a batch that matches what was written decodes");
            }
        }
        let next = batches.last().expect("not empty").next_offset();
        assert!(next > offset, "reads progress");
        offset = next;
    }
    let _ = log.offset_for_timestamp(1_700_000_005_000);
    Ok(log)
}

fn raft_store(dir: &Path, scenario: &Scenario) {
    let mut store = PartitionStore::open(dir, config(scenario), false).expect("a new store opens");
    store.bootstrap(&[1, 2, 3]).expect("bootstrap");
    let mut entries = Vec::new();
    for (n, spec) in scenario.batches.iter().take(BATCHES_MAX).enumerate() {
        let mut entry = Entry {
            index: n as u64 + 1,
            term: 1 + n as u64 / 5,
            ..Entry::default()
        };
        if spec.records % 5 != 4 {
            entry.data = Bytes::from(batch(spec, n).into_bytes());
        }
        entries.push(entry);
    }
    store.append(&entries).expect("append");
    let last = entries.len() as u64;
    let hard_state = HardState {
        term: last / 5 + 1,
        vote: 1,
        commit: last / 2,
        ..HardState::default()
    };
    store.set_hard_state(&hard_state).expect("hard state");
    store.persist_hard_state().expect("persist");
    store.sync().expect("sync");
    if scenario.clean_close {
        store.close_log().expect("close");
    }
    drop(store);
    damage(&dir.join("log"), &dir.join("raft.meta"), scenario);
    let Ok(store) = PartitionStore::open(dir, config(scenario), false) else {
        return;
    };
    let (first, last) = (store.first_index_value(), store.last_index_value());
    assert!(first <= last + 1, "first index {first} is past last {last} + 1");
    let Ok(read) = store.entries(first, last + 1, None, GetEntriesContext::empty(false)) else {
        return;
    };
    for entry in read {
        if let Some(original) = entries.get(entry.index as usize - 1) {
            // The store writes the log offset and the term into a batch's
            // header (and the CRC, which covers the term); what the
            // producer wrote is everything from the attributes on.
            if entry.term == original.term && !original.data.is_empty() {
                assert_eq!(
                    entry.data.get(CRC_START..),
                    original.data.get(CRC_START..),
                    "entry {} changed",
                    entry.index
                );
            }
        }
    }
}

/// The files of `dir`, in name order.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn damage(log_dir: &Path, raft_meta: &Path, scenario: &Scenario) {
    for damage in scenario.damages.iter().take(DAMAGES_MAX) {
        let files = files(log_dir);
        let pick = |file: &u8| (!files.is_empty()).then(|| files[usize::from(*file) % files.len()].clone());
        match damage {
            Damage::Flip { file, at, mask } => {
                if let Some(path) = pick(file) {
                    edit(&path, |bytes| flip(bytes, *at, *mask));
                }
            }
            Damage::Truncate { file, at } => {
                if let Some(path) = pick(file) {
                    edit(&path, |bytes| bytes.truncate(*at as usize % (bytes.len() + 1)));
                }
            }
            Damage::Delete { file } => {
                if let Some(path) = pick(file) {
                    let _ = std::fs::remove_file(path);
                }
            }
            Damage::Overwrite { file, bytes: new } => {
                if let Some(path) = pick(file) {
                    edit(&path, |bytes| *bytes = new.clone());
                }
            }
            Damage::FlipMeta { raft, at, mask } => {
                let path = if *raft {
                    raft_meta.to_path_buf()
                } else {
                    log_dir.join("log.meta")
                };
                edit(&path, |bytes| {
                    if bytes.len() > 4 {
                        let body = bytes.len() - 4;
                        flip(&mut bytes[..body], *at, *mask);
                        let crc = crc32c::crc32c(&bytes[..body]);
                        bytes[body..].copy_from_slice(&crc.to_le_bytes());
                    }
                });
            }
        }
    }
}

fn flip(bytes: &mut [u8], at: u32, mask: u8) {
    if !bytes.is_empty() {
        let at = at as usize % bytes.len();
        bytes[at] ^= mask.max(1);
    }
}

fn edit(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    if let Ok(mut bytes) = std::fs::read(path) {
        change(&mut bytes);
        std::fs::write(path, bytes).expect("a scratch file is writable");
    }
}
