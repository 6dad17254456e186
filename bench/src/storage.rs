//! `runnel bench storage`: how fast the log appends compared with the disk,
//! and how fast it compacts.
//!
//! Writes `--bytes` (1 GiB by default) of 100-byte records in batches of 1 MiB
//! and 16 KiB, with fsync never and on every batch. Every log run is paired
//! with a plain `write` loop (with `fdatasync` after each write in the fsync
//! cases) of the same size and write size: the disk's limit. Each case runs
//! `--repeat` times; medians are reported.
//!
//! Then compaction: `--compact-bytes` (256 MiB) of 100-byte records over
//! 10,000 keys in 64 KiB batches and 16 MiB segments, compacted to the end
//! in the bounded steps a replica runs (`Log::compact_step`): MB/s of
//! closed segments compacted, the bytes left, and the longest step (what a
//! replica's other messages may wait).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use runnel_storage::{
    BatchBuilder, CompactionSettings, CompactionStep, Compactor, FsyncPolicy, Log, LogConfig, Record, RecordBatch,
};
use serde_json::json;

use super::median;

#[derive(clap::Args)]
pub struct Args {
    /// Bytes written per case.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Bytes written per case with fsync on every batch (each fsync is a disk
    /// round trip; 16 KiB batches over 1 GiB would be 65,536 of them).
    #[arg(long, default_value_t = 256 << 20)]
    fsync_bytes: u64,
    /// Runs per case; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Directory to write in (a temporary one under it is used and removed).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Bytes of keyed records written, then compacted, per compaction run.
    #[arg(long, default_value_t = 256 << 20)]
    compact_bytes: u64,
}

/// Distinct keys of the compaction case's records.
const COMPACT_KEYS: u64 = 10_000;

const RECORD_VALUE_BYTES: usize = 100;

struct Case {
    batch_bytes: usize,
    fsync: bool,
}

const CASES: [Case; 4] = [
    Case {
        batch_bytes: 1 << 20,
        fsync: false,
    },
    Case {
        batch_bytes: 16 << 10,
        fsync: false,
    },
    Case {
        batch_bytes: 1 << 20,
        fsync: true,
    },
    Case {
        batch_bytes: 16 << 10,
        fsync: true,
    },
];

struct Figures {
    mb_per_s: f64,
    records_per_s: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.repeat >= 1, "--repeat must be at least 1");
    anyhow::ensure!(args.bytes >= 1 << 20, "--bytes must be at least 1 MiB");
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::Builder::new()
        .prefix("runnel-bench-storage-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a scratch directory in {}", parent.display()))?;
    println!(
        "{}",
        json!({"bench": "storage", "event": "start", "bytes": args.bytes, "fsync_bytes": args.fsync_bytes,
            "repeat": args.repeat, "dir": scratch.path().display().to_string()})
    );
    let mut summary = Vec::new();
    for case in &CASES {
        let bytes = if case.fsync { args.fsync_bytes } else { args.bytes };
        let batch = make_batch(case.batch_bytes)?;
        let (mut log_runs, mut plain_runs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        // Each log run is paired with a plain loop of the same write size and
        // fsync mode, and the order alternates, so drift in this shared disk's
        // state hits both sides alike.
        for run in 0..args.repeat {
            let (log, plain) = if run % 2 == 0 {
                let plain = plain_write_loop(scratch.path(), bytes, case.batch_bytes, case.fsync)?;
                (log_append_loop(scratch.path(), &batch, bytes, case.fsync)?, plain)
            } else {
                let log = log_append_loop(scratch.path(), &batch, bytes, case.fsync)?;
                (
                    log,
                    plain_write_loop(scratch.path(), bytes, case.batch_bytes, case.fsync)?,
                )
            };
            ratios.push(log.mb_per_s / plain);
            log_runs.push(log);
            plain_runs.push(plain);
        }
        let mb = median(&mut log_runs.iter().map(|f| f.mb_per_s).collect::<Vec<_>>());
        let records = median(&mut log_runs.iter().map(|f| f.records_per_s).collect::<Vec<_>>());
        let plain = median(&mut plain_runs.clone());
        let ratio = median(&mut ratios.clone());
        let fsync = if case.fsync { "every_batch" } else { "never" };
        let line = json!({"bench": "storage", "case": "log_vs_plain_write", "batch_bytes": case.batch_bytes,
            "records_per_batch": batch.record_count(), "record_value_bytes": RECORD_VALUE_BYTES,
            "fsync": fsync, "bytes": bytes, "log_mb_per_s": mb, "log_records_per_s": records,
            "plain_mb_per_s": plain, "ratio_median": ratio,
            "runs_log_mb_per_s": log_runs.iter().map(|f| f.mb_per_s).collect::<Vec<_>>(),
            "runs_plain_mb_per_s": plain_runs, "runs_ratio": ratios});
        println!("{line}");
        summary.push(format!(
            "  {:>4} KiB batches, fsync {:<11}: log {:>7.1} MB/s {:>11.0} records/s | plain {:>7.1} MB/s | log/plain {:>5.1}%",
            case.batch_bytes >> 10,
            fsync,
            mb,
            records,
            plain,
            ratio * 100.0
        ));
    }
    summary.push(compaction_case(scratch.path(), args.compact_bytes, args.repeat)?);
    println!(
        "\nstorage benchmark: {} MiB per case ({} MiB with fsync), {} paired runs each, medians",
        args.bytes >> 20,
        args.fsync_bytes >> 20,
        args.repeat
    );
    println!("  (plain = a write loop of the same write size and fsync mode, the disk's limit)");
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

/// What one compaction run measured.
struct Compaction {
    mb_per_s: f64,
    bytes_before: u64,
    bytes_after: u64,
    steps: usize,
    longest_step_ms: f64,
}

/// The compaction case: `--repeat` runs, medians; its summary line.
fn compaction_case(scratch: &Path, bytes: u64, repeat: usize) -> anyhow::Result<String> {
    let mut runs = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        runs.push(compact_run(scratch, bytes)?);
    }
    let mb = median(&mut runs.iter().map(|r| r.mb_per_s).collect::<Vec<_>>());
    let longest = median(&mut runs.iter().map(|r| r.longest_step_ms).collect::<Vec<_>>());
    let last = runs.last().context("at least one run")?;
    println!(
        "{}",
        json!({"bench": "storage", "case": "compaction", "bytes": bytes, "keys": COMPACT_KEYS,
            "compacted_mb_per_s": mb, "longest_step_ms": longest, "bytes_before": last.bytes_before,
            "bytes_after": last.bytes_after, "steps": last.steps,
            "runs_compacted_mb_per_s": runs.iter().map(|r| r.mb_per_s).collect::<Vec<_>>()})
    );
    Ok(format!(
        "  compaction, {} keys: {mb:>7.1} MB/s of closed segments, {} MiB left of {} MiB, longest step {longest:.1} ms",
        COMPACT_KEYS,
        last.bytes_after >> 20,
        last.bytes_before >> 20
    ))
}

/// Writes `bytes` of keyed records, then compacts them to the end.
fn compact_run(scratch: &Path, bytes: u64) -> anyhow::Result<Compaction> {
    let dir = scratch.join("compacted");
    let config = LogConfig {
        segment_bytes_max: 16 << 20,
        fsync: FsyncPolicy::Never,
        retention_age: None,
        ..LogConfig::default()
    };
    let mut log = Log::open(&dir, config)?;
    let value = Bytes::from(vec![b'v'; RECORD_VALUE_BYTES]);
    let mut record_number = 0u64;
    while log.size_bytes() < bytes {
        let mut builder = BatchBuilder::with_capacity(64 << 10);
        while builder.size_bytes() < 63 << 10 {
            let key = format!("key-{}", (record_number * 7919) % COMPACT_KEYS);
            builder.push_parts(1_700_000_000_000, Some(key.as_bytes()), Some(&value), &[])?;
            record_number += 1;
        }
        log.append(&mut builder.build()?)?;
    }
    log.flush()?;
    let settings = CompactionSettings {
        dirty_ratio_min: 0.0,
        ..CompactionSettings::new(log.end_offset(), 1_700_000_000_000)
    };
    let mut compactor = Compactor::default();
    let (mut steps, mut longest) = (0, std::time::Duration::ZERO);
    let started = Instant::now();
    let outcome = loop {
        let step_started = Instant::now();
        let step = log.compact_step(&mut compactor, &settings)?;
        longest = longest.max(step_started.elapsed());
        steps += 1;
        match step {
            CompactionStep::More => {}
            CompactionStep::Finished(outcome) => break outcome,
            CompactionStep::Idle => anyhow::bail!("nothing to compact after {steps} steps"),
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    log.close()?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(Compaction {
        mb_per_s: outcome.bytes_before as f64 / 1e6 / seconds,
        bytes_before: outcome.bytes_before,
        bytes_after: outcome.bytes_after,
        steps,
        longest_step_ms: longest.as_secs_f64() * 1e3,
    })
}

/// A batch of 100-byte records filling about `batch_bytes`.
fn make_batch(batch_bytes: usize) -> anyhow::Result<RecordBatch> {
    let mut builder = BatchBuilder::with_capacity(batch_bytes + 256);
    let value = Bytes::from(vec![b'v'; RECORD_VALUE_BYTES]);
    let mut timestamp_ms = 1_700_000_000_000;
    loop {
        let record = Record {
            timestamp_ms,
            key: None,
            value: Some(value.clone()),
            headers: Vec::new(),
        };
        if builder.size_bytes() + builder.record_size_bytes(&record) > batch_bytes {
            break;
        }
        builder.push(&record)?;
        timestamp_ms += 1;
    }
    Ok(builder.build()?)
}

fn log_append_loop(scratch: &Path, template: &RecordBatch, total_bytes: u64, fsync: bool) -> anyhow::Result<Figures> {
    let dir = scratch.join("log");
    let config = LogConfig {
        fsync: if fsync {
            FsyncPolicy::EveryBatch
        } else {
            FsyncPolicy::Never
        },
        retention_age: None,
        ..LogConfig::default()
    };
    let mut log = Log::open(&dir, config)?;
    let mut batch = template.clone();
    // Stay within one segment: a roll syncs the closed segment, a once-per-GiB
    // cost that is not the append path being measured here.
    let batches = (total_bytes / batch.size_bytes() as u64).max(1);
    let started = Instant::now();
    for _ in 0..batches {
        log.append(&mut batch)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let written = batches * batch.size_bytes() as u64;
    let records = batches * u64::from(batch.record_count());
    // Untimed: leave no dirty pages behind to slow down the next case.
    log.close()?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(Figures {
        mb_per_s: written as f64 / 1e6 / seconds,
        records_per_s: records as f64 / seconds,
    })
}

/// MB/s of writing `total_bytes` in `write_bytes` `write` calls (plus
/// `fdatasync` after each when `fsync`).
fn plain_write_loop(scratch: &Path, total_bytes: u64, write_bytes: usize, fsync: bool) -> anyhow::Result<f64> {
    let path = scratch.join("plain");
    let mut file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let chunk = vec![b'p'; write_bytes];
    let writes = (total_bytes / chunk.len() as u64).max(1);
    let started = Instant::now();
    for _ in 0..writes {
        file.write_all(&chunk)?;
        if fsync {
            file.sync_data()?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // Untimed: leave no dirty pages behind to slow down the next case.
    file.sync_all()?;
    drop(file);
    std::fs::remove_file(&path)?;
    Ok((writes * chunk.len() as u64) as f64 / 1e6 / seconds)
}
