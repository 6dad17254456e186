//! Log compaction: closed segments keep only the latest record of each key,
//! at its offset (a reader sees gaps), as Kafka's `cleanup.policy=compact`.
//!
//! A pass has two phases, both done in bounded steps so that the owner (a
//! replica actor) stays responsive:
//! 1. **Scan** the records written since the last pass (from the persisted
//!    `cleaned_to` point) and remember each key's latest offset, in at most
//!    [`CompactionSettings::key_map_bytes_max`] of memory. A larger key set
//!    ends the scan early; the next pass goes on from there.
//! 2. **Rewrite** every closed segment below the scanned end, oldest first,
//!    into `<base>.log.cleaned`, leaving out records whose key has a later
//!    record and tombstones (no value) older than the delete retention. A
//!    batch that loses records is written as version 3 (the same offsets,
//!    term and producer; see [`crate::batch`]), and a batch that loses all
//!    of them stays as an empty one, so every Raft entry keeps its batch.
//!    The swap: sync the new file, delete the segment's indexes, rename it
//!    over the segment, sync the directory, reopen the segment.
//!
//! Crash safety: until the rename the old segment is whole; after it, the
//! new one is (each step syncs what it wrote; the new segment opens from
//! the state built as it was written, so no step reads a whole segment). A `.cleaned` file left by a crash is deleted on open, and a
//! segment without index files is rebuilt by a strict scan. `cleaned_to`
//! is written only when a pass ends, so a crash repeats the pass, which
//! finds what is already done and drops nothing more than it would have.
//!
//! Only records below [`CompactionSettings::end_offset`] (a replica passes
//! the end of its applied entries) are looked at, and the active segment is
//! never rewritten. Records without a key are kept. A segment whose newest
//! record is younger than [`CompactionSettings::min_lag_ms`] ends what a
//! pass takes (Kafka's `min.compaction.lag.ms`): records written within the
//! lag are neither removed nor count as a later record of their key.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use super::{Log, KEY_CLEANED_TO};
use crate::batch::{RecordBatch, RecordView};
use crate::error::{IoContext, Result};
use crate::kv::sync_parent_dir;
use crate::segment::{BuiltState, Segment, SegmentPaths};

/// Memory a key's entry takes beyond its bytes (map slot, allocation).
const KEY_ENTRY_OVERHEAD_BYTES: usize = 64;

/// A topic's compaction settings: how long a tombstone that is the latest
/// record of its key stays (`delete.retention.ms`), and how long any record
/// stays uncompacted (`min.compaction.lag.ms`: a segment is compacted only
/// once its newest record is that old).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactionPolicy {
    pub delete_retention_ms: u64,
    pub min_lag_ms: u64,
}

/// How one compaction pass runs.
#[derive(Clone, Copy, Debug)]
pub struct CompactionSettings {
    /// Records at or above this offset are neither compacted nor scanned.
    pub end_offset: u64,
    /// Now, in ms since the epoch: tombstones expire against it.
    pub now_ms: i64,
    /// How long a tombstone that is the latest record of its key stays,
    /// from its record time (or, unstamped, its segment's write time).
    pub delete_retention_ms: u64,
    /// Segments whose newest record is younger than this are not compacted
    /// (nor those after them): `min.compaction.lag.ms`.
    pub min_lag_ms: u64,
    /// Tombstones at or above this offset stay whatever their age: a
    /// replicated log passes the offset every replica holds, so that no
    /// replica behind misses a deletion (its older record of the key would
    /// outlive it there).
    pub tombstone_horizon_offset: u64,
    /// Bytes one step reads at most (one batch whatever its size).
    pub step_bytes_max: usize,
    /// Memory for the latest offset of each key in one pass.
    pub key_map_bytes_max: usize,
    /// A pass starts once bytes written since the last one are at least
    /// this share of the closed segments' bytes (Kafka's
    /// `min.cleanable.dirty.ratio`).
    pub dirty_ratio_min: f64,
}

impl CompactionSettings {
    /// Kafka's defaults: a day of tombstones, half the log dirty.
    pub fn new(end_offset: u64, now_ms: i64) -> CompactionSettings {
        CompactionSettings {
            end_offset,
            now_ms,
            delete_retention_ms: 24 * 3600 * 1000,
            min_lag_ms: 0,
            tombstone_horizon_offset: end_offset,
            step_bytes_max: 4 << 20,
            key_map_bytes_max: 16 << 20,
            dirty_ratio_min: 0.5,
        }
    }
}

/// What a finished pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactionOutcome {
    pub segments_rewritten: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_removed: u64,
    pub tombstones_removed: u64,
    /// Records below this were scanned; the next pass starts here.
    pub cleaned_to: u64,
}

/// What one step left to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompactionStep {
    /// Nothing to compact now.
    Idle,
    /// A pass is under way: step again.
    More,
    /// A pass ended.
    Finished(CompactionOutcome),
}

/// The state of a pass between steps. Owned by the log's owner; a new one
/// (or one whose log changed underneath it) starts over safely.
#[derive(Default)]
pub struct Compactor {
    pass: Option<Pass>,
}

struct Pass {
    /// The log's generation when the pass began: a reset or truncation
    /// since then ends the pass.
    generation: u64,
    /// `cleaned_to` when the pass began: an earlier pass scanned every
    /// record below it and dropped the older records of their keys.
    clean_start: u64,
    keys: KeyMap,
    phase: Phase,
    outcome: CompactionOutcome,
}

enum Phase {
    Scan {
        next: u64,
        until: u64,
    },
    /// Segments from base `from` on, below `map_end`, are left to rewrite.
    Rewrite {
        map_end: u64,
        from: u64,
        segment: Option<Rewrite>,
    },
}

/// One segment being rewritten.
struct Rewrite {
    base: u64,
    /// The next offset to copy.
    next: u64,
    out: BufWriter<File>,
    path: PathBuf,
    /// The new file's state, batch by batch: it opens without a scan.
    built: BuiltState,
    dropped: u64,
    /// Set once the new file is synced and the old indexes are gone.
    indexes_dropped: bool,
}

/// Each key's latest offset, within a memory bound.
#[derive(Default)]
struct KeyMap {
    latest: HashMap<Vec<u8>, u64>,
    bytes: usize,
}

impl KeyMap {
    fn insert(&mut self, key: &[u8], offset: u64) {
        match self.latest.get_mut(key) {
            Some(latest) => *latest = offset,
            None => {
                self.bytes += key.len() + KEY_ENTRY_OVERHEAD_BYTES;
                self.latest.insert(key.to_vec(), offset);
            }
        }
    }
}

impl Log {
    /// Runs one bounded step of compaction (see the module doc). Call it
    /// again while it answers `More`.
    pub fn compact_step(&mut self, compactor: &mut Compactor, settings: &CompactionSettings) -> Result<CompactionStep> {
        self.healthy()?;
        let Some(mut pass) = compactor.pass.take() else {
            compactor.pass = self.begin_pass(settings)?;
            return Ok(if compactor.pass.is_some() {
                CompactionStep::More
            } else {
                CompactionStep::Idle
            });
        };
        if pass.generation != self.generation {
            pass.abandon();
            return Ok(CompactionStep::More);
        }
        let stepped = match pass.phase {
            Phase::Scan { .. } => self.scan_step(&mut pass, settings),
            Phase::Rewrite { .. } => self.rewrite_step(&mut pass, settings),
        };
        let finished = match stepped {
            Ok(finished) => finished,
            Err(e) => {
                pass.abandon();
                return Err(e);
            }
        };
        if finished {
            let outcome = std::mem::take(&mut pass.outcome);
            self.meta.set_u64(KEY_CLEANED_TO, outcome.cleaned_to)?;
            return Ok(CompactionStep::Finished(outcome));
        }
        compactor.pass = Some(pass);
        Ok(CompactionStep::More)
    }

    /// Where the next pass starts scanning.
    pub fn cleaned_to(&self) -> Result<u64> {
        Ok(self.meta.get_u64(KEY_CLEANED_TO)?.unwrap_or(0).max(self.start_offset()))
    }

    /// A pass when enough was written since the last one.
    fn begin_pass(&self, settings: &CompactionSettings) -> Result<Option<Pass>> {
        let cleaned_to = self.cleaned_to()?;
        let closed = self.segments.len() - 1;
        let lag_ms = i64::try_from(settings.min_lag_ms).unwrap_or(i64::MAX);
        let old_enough = |s: &Segment| s.max_timestamp_ms() <= settings.now_ms.saturating_sub(lag_ms);
        let cleanable: Vec<&Segment> = self
            .segments
            .values()
            .take(closed)
            .take_while(|s| s.next_offset() <= settings.end_offset && old_enough(s))
            .collect();
        let Some(until) = cleanable.last().map(|s| s.next_offset()) else {
            return Ok(None);
        };
        let total_bytes: u64 = cleanable.iter().map(|s| s.size_bytes()).sum();
        let dirty_bytes: u64 = cleanable
            .iter()
            .filter(|s| s.next_offset() > cleaned_to)
            .map(|s| s.size_bytes())
            .sum();
        if until <= cleaned_to || (dirty_bytes as f64) < settings.dirty_ratio_min * total_bytes as f64 {
            return Ok(None);
        }
        Ok(Some(Pass {
            generation: self.generation,
            clean_start: cleaned_to,
            keys: KeyMap::default(),
            phase: Phase::Scan {
                next: cleaned_to,
                until,
            },
            outcome: CompactionOutcome::default(),
        }))
    }

    /// Reads up to a step's bytes of records into the key map; whether the
    /// pass ended (nothing to rewrite).
    fn scan_step(&self, pass: &mut Pass, settings: &CompactionSettings) -> Result<bool> {
        let Phase::Scan { next, until } = pass.phase else {
            unreachable!("a scan step runs in the scan phase")
        };
        // Retention may have deleted the oldest segments meanwhile.
        let next = next.max(self.start_offset());
        let mut scanned_to = next;
        let mut full = false;
        let batches = if next < until {
            self.read_until(next, settings.step_bytes_max, until)?
        } else {
            Vec::new()
        };
        'batches: for batch in batches {
            if !batch.is_control() {
                for view in batch.views() {
                    let view = view?;
                    if view.offset < next {
                        continue;
                    }
                    if let Some(key) = view.key {
                        pass.keys.insert(key, view.offset);
                    }
                    if pass.keys.bytes >= settings.key_map_bytes_max {
                        scanned_to = view.offset + 1;
                        full = true;
                        break 'batches;
                    }
                }
            }
            scanned_to = batch.next_offset();
        }
        if !full && scanned_to < until {
            pass.phase = Phase::Scan {
                next: scanned_to,
                until,
            };
            return Ok(false);
        }
        pass.outcome.cleaned_to = scanned_to;
        pass.phase = Phase::Rewrite {
            map_end: scanned_to,
            from: 0,
            segment: None,
        };
        Ok(pass.keys.latest.is_empty())
    }

    /// Copies up to a step's bytes of the segment being rewritten, or swaps
    /// it in, or starts the next one; whether the pass ended.
    fn rewrite_step(&mut self, pass: &mut Pass, settings: &CompactionSettings) -> Result<bool> {
        let Phase::Rewrite { map_end, from, segment } = &mut pass.phase else {
            unreachable!("a rewrite step runs in the rewrite phase")
        };
        let map_end = *map_end;
        let Some(mut rewrite) = segment.take() else {
            let closed = self.segments.len() - 1;
            let next =
                self.segments.values().take(closed).find(|s| {
                    s.base_offset >= *from && s.base_offset < map_end && s.next_offset() <= settings.end_offset
                });
            let Some(next) = next else { return Ok(true) };
            *segment = Some(Rewrite::start(next, self.config.index_interval_bytes)?);
            return Ok(false);
        };
        let Some(source) = self.segments.get(&rewrite.base) else {
            // Retention deleted it meanwhile.
            *from = rewrite.base + 1;
            rewrite.discard();
            return Ok(false);
        };
        let segment_end = source.next_offset();
        if rewrite.next < segment_end {
            let modified_ms = source.modified_ms().unwrap_or(settings.now_ms);
            let batches = self.read_until(rewrite.next, settings.step_bytes_max, segment_end)?;
            let mut removed = Removed::default();
            let scanned = Scanned {
                keys: &pass.keys,
                map_end,
                clean_start: pass.clean_start,
            };
            for batch in batches {
                let kept =
                    batch.retain_records(|view| removed.count(verdict(&scanned, settings, modified_ms, view)))?;
                rewrite.copy(&batch, kept.as_ref())?;
            }
            rewrite.sync_step()?;
            rewrite.dropped += removed.records;
            pass.outcome.records_removed += removed.records;
            pass.outcome.tombstones_removed += removed.tombstones;
            *segment = Some(rewrite);
            return Ok(false);
        }
        *from = segment_end;
        if rewrite.dropped == 0 {
            rewrite.discard();
            return Ok(false);
        }
        if !rewrite.indexes_dropped {
            rewrite.seal(source)?;
            *segment = Some(rewrite);
            return Ok(false);
        }
        self.swap_in(rewrite, &mut pass.outcome)?;
        Ok(false)
    }

    /// Renames the rewritten file over its segment and opens it from the
    /// state built while it was written (no scan).
    fn swap_in(&mut self, rewrite: Rewrite, outcome: &mut CompactionOutcome) -> Result<()> {
        let before = self.segments.get(&rewrite.base).map_or(0, Segment::size_bytes);
        let paths = SegmentPaths::new(&self.dir, rewrite.base);
        drop(rewrite.out);
        std::fs::rename(&rewrite.path, &paths.log).at(&paths.log)?;
        sync_parent_dir(&paths.log)?;
        let reopened = Segment::open_built(&self.dir, rewrite.built)?;
        reopened.save_index()?;
        outcome.segments_rewritten += 1;
        outcome.bytes_before += before;
        outcome.bytes_after += reopened.size_bytes();
        self.segments.insert(rewrite.base, reopened);
        Ok(())
    }
}

/// What a pass knows when it judges a record.
struct Scanned<'a> {
    keys: &'a KeyMap,
    /// Records at or above this were not scanned.
    map_end: u64,
    clean_start: u64,
}

/// What compaction does with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    /// Its key has a later record.
    Superseded,
    /// The latest record of its key, a tombstone past its retention.
    Expired,
}

/// Below `map_end`, a record is dropped when its key has a later record,
/// or when it is the key's latest and an expired tombstone that an earlier
/// pass scanned (below `clean_start`: that pass dropped the key's older
/// records, and no later one has come since). A tombstone this pass
/// scanned stays until a later pass, whatever its age: a reader that read
/// the key's older record before this pass swapped its segment must still
/// find the tombstone after it (as Kafka keeps a tombstone for
/// `delete.retention.ms` after the pass that cleaned it).
fn verdict(scanned: &Scanned<'_>, settings: &CompactionSettings, modified_ms: i64, view: &RecordView<'_>) -> Verdict {
    let Some(key) = view.key else { return Verdict::Keep };
    if view.offset >= scanned.map_end {
        return Verdict::Keep;
    }
    let latest_tombstone = match scanned.keys.latest.get(key) {
        Some(&latest) if latest > view.offset => return Verdict::Superseded,
        Some(_) => false,
        None => view.value.is_none() && view.offset < scanned.clean_start,
    };
    if latest_tombstone && view.offset < settings.tombstone_horizon_offset && expired(settings, modified_ms, view) {
        Verdict::Expired
    } else {
        Verdict::Keep
    }
}

/// Whether a tombstone's retention has passed.
fn expired(settings: &CompactionSettings, modified_ms: i64, view: &RecordView<'_>) -> bool {
    let written_ms = if view.timestamp_ms > 0 {
        view.timestamp_ms
    } else {
        modified_ms
    };
    let delete_retention_ms = i64::try_from(settings.delete_retention_ms).unwrap_or(i64::MAX);
    written_ms.saturating_add(delete_retention_ms) < settings.now_ms
}

/// Records one step of a rewrite left out.
#[derive(Default)]
struct Removed {
    records: u64,
    tombstones: u64,
}

impl Removed {
    /// Counts `verdict`; whether the record stays.
    fn count(&mut self, verdict: Verdict) -> bool {
        self.records += u64::from(verdict != Verdict::Keep);
        self.tombstones += u64::from(verdict == Verdict::Expired);
        verdict == Verdict::Keep
    }
}

impl Pass {
    fn abandon(&mut self) {
        if let Phase::Rewrite {
            segment: Some(rewrite), ..
        } = &mut self.phase
        {
            let _ = std::fs::remove_file(&rewrite.path);
        }
    }
}

impl Rewrite {
    fn start(source: &Segment, index_interval_bytes: u64) -> Result<Rewrite> {
        let path = source.paths.cleaned.clone();
        let file = File::create(&path).at(&path)?;
        Ok(Rewrite {
            base: source.base_offset,
            next: source.base_offset,
            out: BufWriter::with_capacity(1 << 20, file),
            path,
            built: BuiltState::new(source.base_offset, index_interval_bytes),
            dropped: 0,
            indexes_dropped: false,
        })
    }

    /// Writes `batch`, or what compaction kept of it.
    fn copy(&mut self, batch: &RecordBatch, kept: Option<&RecordBatch>) -> Result<()> {
        debug_assert_eq!(batch.base_offset(), self.next, "batches are copied in order");
        let written = kept.unwrap_or(batch);
        self.out.write_all(written.as_bytes()).at(&self.path)?;
        self.built.add(written.header());
        self.next = batch.next_offset();
        Ok(())
    }

    /// Makes what a step wrote durable, so that sealing syncs little.
    fn sync_step(&mut self) -> Result<()> {
        self.out.flush().at(&self.path)?;
        self.out.get_ref().sync_data().at(&self.path)
    }

    /// Makes the new file durable (with the old one's write time, which
    /// retention reads) and drops the old indexes: the rename comes next.
    fn seal(&mut self, source: &Segment) -> Result<()> {
        self.out.flush().at(&self.path)?;
        let file = self.out.get_ref();
        if let Ok(modified) = std::fs::metadata(&source.paths.log).and_then(|m| m.modified()) {
            file.set_modified(modified).at(&self.path)?;
        }
        file.sync_all().at(&self.path)?;
        source.delete_index_files()?;
        self.indexes_dropped = true;
        Ok(())
    }

    fn discard(self) {
        drop(self.out);
        let _ = std::fs::remove_file(&self.path);
    }
}
