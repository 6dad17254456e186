//! A partition's log: an ordered set of segments in one directory.
//!
//! Directory layout:
//!
//! ```text
//! 00000000000000000000.log        record batches
//! 00000000000000000000.index      sparse offset index (saved on roll and close)
//! 00000000000000000000.timeindex  sparse time index
//! 00000000000000052311.log        the active segment: appends go here
//! log.meta                        DurableKv: recovery point, clean-shutdown marker
//! ```
//!
//! Recovery: a clean close writes the `clean_shutdown` marker; open removes it
//! before anything else happens. Without the marker, every batch at or after the
//! recovery point (the end of the last segment synced on roll) is checked. A
//! torn or corrupt tail of the last segment is cut off and logged; damage with
//! valid data after it is a `Corrupt` error naming the file and position.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::batch::{BatchHeader, RecordBatch};
use crate::error::{IoContext, Result, StorageError};
use crate::kv::{sync_parent_dir, DurableKv};
use crate::segment::{parse_segment_name, ScanMode, Segment};

mod compact;
pub use compact::{CompactionOutcome, CompactionPolicy, CompactionSettings, CompactionStep, Compactor};

const META_FILE: &str = "log.meta";
const KEY_RECOVERY_POINT: &str = "recovery_point";
const KEY_CLEAN_SHUTDOWN: &str = "clean_shutdown";
/// Where the next compaction pass starts scanning (see [`compact`]).
const KEY_CLEANED_TO: &str = "cleaned_to";
/// Positions in the offset index are u32.
const SEGMENT_BYTES_LIMIT: u64 = u32::MAX as u64;

/// When appended data is forced to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fsync before `append` returns: an appended batch survives a power loss.
    EveryBatch,
    /// fsync when this much time has passed since the last one (checked on
    /// append and by [`Log::flush_if_due`]).
    Interval(Duration),
    /// Leave it to the operating system; segments are still synced when they roll.
    Never,
}

/// Settings of one log. `Default` is the safe choice: fsync on every batch.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// A segment rolls before it would grow past this.
    pub segment_bytes_max: u64,
    /// A segment older than this rolls at the next append.
    pub segment_age_max: Option<Duration>,
    /// Bytes between two entries of the sparse indexes.
    pub index_interval_bytes: u64,
    /// Largest batch the log accepts.
    pub batch_bytes_max: usize,
    pub fsync: FsyncPolicy,
    /// Closed segments whose newest record is older than this are deleted.
    pub retention_age: Option<Duration>,
    /// Oldest closed segments are deleted while the log is larger than this.
    pub retention_bytes: Option<u64>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 1 << 30,
            segment_age_max: Some(Duration::from_secs(7 * 24 * 3600)),
            index_interval_bytes: 4096,
            batch_bytes_max: 8 << 20,
            fsync: FsyncPolicy::EveryBatch,
            retention_age: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_bytes: None,
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<()> {
        let fail = |why: String| Err(StorageError::InvalidConfig(why));
        if self.segment_bytes_max < 1024 || self.segment_bytes_max > SEGMENT_BYTES_LIMIT {
            return fail(format!(
                "segment_bytes_max {} is outside [1024, {SEGMENT_BYTES_LIMIT}]",
                self.segment_bytes_max
            ));
        }
        if self.index_interval_bytes == 0 {
            return fail("index_interval_bytes must be positive".to_string());
        }
        if self.batch_bytes_max == 0 || self.batch_bytes_max > crate::batch::BATCH_BYTES_HARD_LIMIT {
            return fail(format!(
                "batch_bytes_max {} is outside [1, {}]",
                self.batch_bytes_max,
                crate::batch::BATCH_BYTES_HARD_LIMIT
            ));
        }
        Ok(())
    }
}

/// What a retention pass removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
}

pub struct Log {
    dir: PathBuf,
    config: LogConfig,
    /// By base offset; never empty: the last one is the active segment.
    segments: BTreeMap<u64, Segment>,
    meta: DurableKv,
    last_sync: Instant,
    /// Appended bytes not yet synced.
    dirty: bool,
    /// The active segment's size at its last sync: what survives a crash.
    synced_bytes: u64,
    /// Set when a mutation failed part-way; every later call is refused.
    failed: Option<String>,
    /// The end offset when there is no segment (only after a failed reset).
    empty_start: u64,
    /// Counts resets and truncations: a compaction pass begun under
    /// another generation starts over (retention deleting the oldest
    /// segments does not disturb one).
    generation: u64,
}

impl Log {
    /// Opens (or creates) the log in `dir`, recovering it if it was not closed
    /// cleanly.
    pub fn open(dir: impl Into<PathBuf>, config: LogConfig) -> Result<Log> {
        config.validate()?;
        let dir = dir.into();
        std::fs::create_dir_all(&dir).at(&dir)?;
        let meta = DurableKv::open(dir.join(META_FILE))?;
        let clean = meta.get_u64(KEY_CLEAN_SHUTDOWN)?;
        let recovery_point = meta.get_u64(KEY_RECOVERY_POINT)?.unwrap_or(0);
        let bases = list_segments(&dir)?;
        let segments = open_segments(&dir, &bases, &config, clean, recovery_point)?;
        let mut log = Log {
            dir,
            config,
            segments,
            meta,
            last_sync: Instant::now(),
            dirty: false,
            synced_bytes: 0,
            failed: None,
            empty_start: recovery_point,
            generation: 0,
        };
        log.check_contiguous()?;
        // Only now, with everything checked: from here on a crash must not be
        // mistaken for a clean shutdown. (Removed earlier, a failed open would
        // let the next one repair data that a clean close vouched for.)
        log.meta.remove(KEY_CLEAN_SHUTDOWN)?;
        if log.segments.is_empty() {
            // A reset persists the new start as the recovery point before
            // deleting segments, so an empty directory resumes there.
            log.start_segment(recovery_point)?;
        }
        log.synced_bytes = log.active().size_bytes();
        tracing::debug!(dir = %log.dir.display(), start = log.start_offset(), end = log.end_offset(), clean = clean.is_some(), "log opened");
        Ok(log)
    }

    fn healthy(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(reason) => Err(StorageError::Failed {
                dir: self.dir.clone(),
                reason: reason.clone(),
            }),
        }
    }

    /// Runs a mutation; if it fails, the log is failed from then on.
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Log) -> Result<T>) -> Result<T> {
        self.healthy()?;
        let result = op(self);
        if let Err(e) = &result {
            tracing::error!(dir = %self.dir.display(), error = %e, "log failed; it must be reopened");
            self.failed = Some(e.to_string());
        }
        result
    }

    fn check_contiguous(&self) -> Result<()> {
        let mut expected: Option<u64> = None;
        for segment in self.segments.values() {
            if let Some(expected) = expected {
                if segment.base_offset != expected {
                    return Err(StorageError::Corrupt {
                        path: segment.paths.log.clone(),
                        position: 0,
                        reason: format!(
                            "segment starts at offset {} but the previous one ends at {expected}",
                            segment.base_offset
                        ),
                    });
                }
            }
            expected = Some(segment.next_offset());
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// The first offset the log holds.
    pub fn start_offset(&self) -> u64 {
        self.segments
            .values()
            .next()
            .map_or(self.empty_start, |s| s.base_offset)
    }

    /// The offset the next appended record gets.
    pub fn end_offset(&self) -> u64 {
        self.segments
            .values()
            .next_back()
            .map_or(self.empty_start, Segment::next_offset)
    }

    pub fn size_bytes(&self) -> u64 {
        self.segments.values().map(Segment::size_bytes).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Each segment's base offset, oldest first (the last is the active one).
    pub fn segment_bases(&self) -> Vec<u64> {
        self.segments.keys().copied().collect()
    }

    fn active(&self) -> &Segment {
        self.segments
            .values()
            .next_back()
            .expect("a healthy log has an active segment (callers check health first)")
    }

    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .values_mut()
            .next_back()
            .expect("a healthy log has an active segment (callers check health first)")
    }

    /// Appends a batch at the end, rewriting its base offset, and returns that
    /// offset.
    pub fn append(&mut self, batch: &mut RecordBatch) -> Result<u64> {
        batch.set_base_offset(self.end_offset());
        self.append_exact(batch)?;
        Ok(batch.base_offset())
    }

    /// Appends a batch whose base offset must already equal the end offset, as
    /// a follower does with a batch the leader placed.
    pub fn append_exact(&mut self, batch: &RecordBatch) -> Result<()> {
        self.healthy()?;
        if batch.size_bytes() > self.config.batch_bytes_max {
            return Err(StorageError::BatchTooLarge {
                size_bytes: batch.size_bytes(),
                limit_bytes: self.config.batch_bytes_max,
            });
        }
        if batch.base_offset() != self.end_offset() {
            return Err(StorageError::InvalidBatch(format!(
                "batch base offset {} does not continue the log at {}",
                batch.base_offset(),
                self.end_offset()
            )));
        }
        if batch
            .base_offset()
            .checked_add(u64::from(batch.record_count()))
            .is_none()
        {
            return Err(StorageError::InvalidBatch("offsets would overflow 64 bits".to_string()));
        }
        // A failed write or fsync leaves the tail unknown: stop, and let a
        // reopen recover from disk, rather than retry and maybe acknowledge
        // data the kernel already dropped.
        self.guarded(|log| {
            if log.should_roll(batch.size_bytes() as u64) {
                log.roll()?;
            }
            log.active_mut().append(batch)?;
            log.dirty = true;
            log.sync_by_policy()
        })
    }

    fn should_roll(&self, incoming_bytes: u64) -> bool {
        let active = self.active();
        if active.is_empty() {
            return false;
        }
        let too_big = active.size_bytes() + incoming_bytes > self.config.segment_bytes_max;
        let too_old = self.config.segment_age_max.is_some_and(|age| {
            SystemTime::now()
                .duration_since(active.created_at)
                .is_ok_and(|elapsed| elapsed >= age)
        });
        too_big || too_old
    }

    /// Closes the active segment (synced, index saved) and starts a new one.
    fn roll(&mut self) -> Result<()> {
        let next = self.end_offset();
        let active = self.active();
        active.sync()?;
        active.save_index()?;
        self.meta.set_u64(KEY_RECOVERY_POINT, next)?;
        self.start_segment(next)?;
        tracing::debug!(dir = %self.dir.display(), base_offset = next, "rolled to a new segment");
        Ok(())
    }

    fn start_segment(&mut self, base_offset: u64) -> Result<()> {
        let segment = Segment::create(&self.dir, base_offset, self.config.index_interval_bytes)?;
        sync_parent_dir(&segment.paths.log)?;
        self.segments.insert(base_offset, segment);
        self.synced_bytes = 0;
        Ok(())
    }

    fn sync_by_policy(&mut self) -> Result<()> {
        match self.config.fsync {
            FsyncPolicy::EveryBatch => self.flush(),
            FsyncPolicy::Interval(_) => self.flush_if_due().map(|_| ()),
            FsyncPolicy::Never => Ok(()),
        }
    }

    /// fsyncs the active segment if anything was appended since the last sync.
    pub fn flush(&mut self) -> Result<()> {
        self.healthy()?;
        if self.dirty {
            self.guarded(|log| log.active().sync())?;
            self.dirty = false;
        }
        self.synced_bytes = self.active().size_bytes();
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Under `FsyncPolicy::Interval`, syncs when the interval has passed.
    /// Returns whether it synced. A node's ticker calls this.
    pub fn flush_if_due(&mut self) -> Result<bool> {
        let FsyncPolicy::Interval(interval) = self.config.fsync else {
            return Ok(false);
        };
        if !self.dirty || self.last_sync.elapsed() < interval {
            return Ok(false);
        }
        self.flush()?;
        Ok(true)
    }

    /// Whole batches from the one holding `offset`, up to `max_bytes` (at least
    /// one batch, so a reader always progresses). The first batch may start
    /// before `offset`. Reading at the end offset returns nothing.
    pub fn read(&self, offset: u64, max_bytes: usize) -> Result<Vec<RecordBatch>> {
        self.read_until(offset, max_bytes, self.end_offset())
    }

    /// As [`Log::read`], but only batches that start below `upper_offset` (a
    /// replica serves reads up to its commit point).
    pub fn read_until(&self, offset: u64, max_bytes: usize, upper_offset: u64) -> Result<Vec<RecordBatch>> {
        self.healthy()?;
        let (start, end) = (self.start_offset(), self.end_offset());
        if offset < start || offset > end {
            return Err(StorageError::OffsetOutOfRange { offset, start, end });
        }
        let mut out = Vec::new();
        if offset == end || offset >= upper_offset {
            return Ok(out);
        }
        let mut budget = max_bytes;
        let mut position = Some(self.segment_for(offset).find_batch(offset)?.0);
        for segment in self
            .segments
            .range(self.segment_for(offset).base_offset..)
            .map(|(_, s)| s)
        {
            let first_offset = if position.is_some() {
                offset
            } else {
                segment.base_offset
            };
            segment.read_into(
                position.take().unwrap_or(0),
                first_offset,
                upper_offset,
                &mut budget,
                &mut out,
            )?;
            let stopped_early = out.last().is_some_and(|b| b.next_offset() < segment.next_offset());
            if budget == 0 || stopped_early || segment.next_offset() >= upper_offset {
                break;
            }
        }
        Ok(out)
    }

    /// The segment whose offsets include `offset`, which must be below the end.
    fn segment_for(&self, offset: u64) -> &Segment {
        self.segments
            .range(..=offset)
            .next_back()
            .map(|(_, s)| s)
            .expect("offset at or above the start offset has a segment")
    }

    /// Calls `visit` with the header of every batch from the start, reading
    /// only headers (a replica rebuilds its entry index this way on open).
    pub fn visit_headers(&self, mut visit: impl FnMut(&BatchHeader)) -> Result<()> {
        self.healthy()?;
        for segment in self.segments.values() {
            segment.visit_headers(&mut visit)?;
        }
        Ok(())
    }

    /// The first offset whose record timestamp is at or after `timestamp_ms`,
    /// or `None` when every record is older.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>> {
        self.healthy()?;
        for segment in self.segments.values() {
            if let Some(offset) = segment.offset_for_timestamp(timestamp_ms)? {
                return Ok(Some(offset));
            }
        }
        Ok(None)
    }

    /// Discards every record at or after `offset`, which must start a batch (a
    /// Raft entry). A replica does this to drop a diverged tail.
    pub fn truncate(&mut self, offset: u64) -> Result<()> {
        self.healthy()?;
        let (start, end) = (self.start_offset(), self.end_offset());
        if offset < start || offset > end {
            return Err(StorageError::OffsetOutOfRange { offset, start, end });
        }
        if offset == end {
            return Ok(());
        }
        if offset > start {
            let (_, header) = self.segment_for(offset).find_batch(offset)?;
            if header.base_offset != offset {
                return Err(StorageError::NotBatchBoundary {
                    offset,
                    batch_base: header.base_offset,
                });
            }
        }
        self.generation += 1;
        self.guarded(|log| log.truncate_checked(offset, start))?;
        tracing::info!(dir = %self.dir.display(), offset, dropped_from = end, "log truncated");
        Ok(())
    }

    fn truncate_checked(&mut self, offset: u64, start: u64) -> Result<()> {
        // Lower the recovery point first: data appended after this is unsynced.
        if self.meta.get_u64(KEY_RECOVERY_POINT)?.unwrap_or(0) > offset {
            self.meta.set_u64(KEY_RECOVERY_POINT, offset)?;
        }
        // Delete newest first, so a crash midway leaves a contiguous prefix.
        let doomed: Vec<u64> = self
            .segments
            .range(offset..)
            .map(|(&base, _)| base)
            .filter(|&b| b > start)
            .rev()
            .collect();
        for base in doomed {
            if let Some(segment) = self.segments.remove(&base) {
                segment.delete()?;
            }
        }
        self.active_mut().truncate_to(offset)?;
        self.synced_bytes = self.synced_bytes.min(self.active().size_bytes());
        sync_parent_dir(&self.dir.join(META_FILE))
    }

    /// Deletes every segment and starts empty at `start_offset`, as a replica
    /// does before installing a snapshot.
    pub fn reset(&mut self, start_offset: u64) -> Result<()> {
        self.generation += 1;
        self.guarded(|log| {
            // Persisted first: an empty directory after a crash resumes here.
            log.meta.set_u64(KEY_RECOVERY_POINT, start_offset)?;
            log.empty_start = start_offset;
            while let Some((&base, _)) = log.segments.iter().next_back() {
                if let Some(segment) = log.segments.remove(&base) {
                    segment.delete()?;
                }
            }
            log.dirty = false;
            log.start_segment(start_offset)
        })
    }

    /// Where a log would start once every closed segment older than
    /// `retention_ms` at `now_ms` is gone: the base of the oldest segment to
    /// keep (the start offset itself when none has expired). Segments
    /// expire in order, oldest first, as Kafka's do: by their newest
    /// record's timestamp, or, when none of its records carries one (all
    /// stamped 0 or before, as by a producer that leaves timestamps unset),
    /// by when its file was last written. The active segment always stays.
    pub fn retention_point(&self, now_ms: i64, retention_ms: u64) -> u64 {
        let horizon_ms = now_ms.saturating_sub(i64::try_from(retention_ms).unwrap_or(i64::MAX));
        let closed = self.segments.len().saturating_sub(1);
        let mut point = self.start_offset();
        for segment in self.segments.values().take(closed) {
            let newest_ms = match segment.max_timestamp_ms() {
                stamped if stamped > 0 => stamped,
                _ => segment.modified_ms().unwrap_or(i64::MAX),
            };
            if newest_ms >= horizon_ms {
                break;
            }
            point = segment.next_offset();
        }
        point
    }

    /// The segment boundary where deleting every record below `offset` by
    /// whole segments starts the log: the base offset of the segment that
    /// holds `offset` (the active one's at most), or the start when no
    /// closed segment lies wholly below it.
    pub fn boundary_at_or_below(&self, offset: u64) -> u64 {
        self.segments
            .range(..=offset)
            .next_back()
            .map_or(self.start_offset(), |(&base, _)| base)
            .max(self.start_offset())
    }

    /// Deletes the closed segments that end at or below `offset`, which
    /// must be a segment's base offset (see [`Log::retention_point`]); the
    /// log then starts there.
    pub fn delete_before(&mut self, offset: u64) -> Result<RetentionOutcome> {
        self.healthy()?;
        if offset != self.start_offset() && !self.segments.contains_key(&offset) {
            return Err(StorageError::NotSegmentBoundary {
                offset,
                dir: self.dir.clone(),
            });
        }
        let mut outcome = RetentionOutcome::default();
        while self.segments.len() > 1 && self.start_offset() < offset {
            let base = self.start_offset();
            let segment = self.segments.remove(&base).expect("the first segment exists");
            outcome.segments_deleted += 1;
            outcome.bytes_deleted += segment.size_bytes();
            segment.delete()?;
        }
        if outcome.segments_deleted > 0 {
            sync_parent_dir(&self.dir.join(META_FILE))?;
        }
        Ok(outcome)
    }

    /// Deletes closed segments past the retention age or size (the log's
    /// own settings; a replica's log is compacted through Raft instead).
    /// The active segment is never deleted.
    pub fn apply_retention(&mut self, now: SystemTime) -> Result<RetentionOutcome> {
        self.healthy()?;
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let age_ms = |age: Duration| u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        let mut point = match self.config.retention_age {
            Some(age) => self.retention_point(now_ms, age_ms(age)),
            None => self.start_offset(),
        };
        if let Some(limit_bytes) = self.config.retention_bytes {
            let closed = self.segments.len() - 1;
            let mut kept_bytes: u64 = self.segments.range(point..).map(|(_, s)| s.size_bytes()).sum();
            for segment in self.segments.range(point..).map(|(_, s)| s).take(closed) {
                if kept_bytes <= limit_bytes || segment.base_offset == self.active().base_offset {
                    break;
                }
                kept_bytes -= segment.size_bytes();
                point = segment.next_offset();
            }
        }
        let outcome = self.delete_before(point)?;
        if outcome.segments_deleted > 0 {
            tracing::info!(dir = %self.dir.display(), segments = outcome.segments_deleted, start = point, "retention deleted segments");
        }
        Ok(outcome)
    }

    /// Simulates the machine crashing now, for the deterministic simulation
    /// and crash tests: of the bytes appended to the active segment since its
    /// last sync only the first `keep_unsynced_bytes` reach the disk (0 loses
    /// them all; a count inside a batch leaves a torn write), and the log
    /// refuses every later call; drop it without closing. Earlier segments
    /// were synced when they rolled. Returns the bytes lost.
    pub fn crash(&mut self, keep_unsynced_bytes: u64) -> Result<u64> {
        self.healthy()?;
        self.failed = Some("the log crashed (simulated)".to_string());
        let active = self.active();
        let size = active.size_bytes();
        let kept = self.synced_bytes.saturating_add(keep_unsynced_bytes).min(size);
        if kept < size {
            let path = &active.paths.log;
            let file = std::fs::OpenOptions::new().write(true).open(path).at(path)?;
            file.set_len(kept).at(path)?;
        }
        Ok(size - kept)
    }

    /// Syncs everything, saves the active segment's index and marks the log
    /// cleanly shut down, so the next open skips the checks.
    pub fn close(mut self) -> Result<()> {
        self.mark_clean()
    }

    /// As [`Log::close`], for a log owned by something that stops next (a
    /// replica): every later operation fails, so nothing is written after
    /// the clean-shutdown mark vouches for the log's end.
    pub fn mark_clean(&mut self) -> Result<()> {
        self.healthy()?;
        self.dirty = true;
        self.flush()?;
        self.active().save_index()?;
        let end = self.end_offset();
        self.meta.update(|entries| {
            entries.insert(KEY_RECOVERY_POINT.to_string(), end.to_le_bytes().to_vec());
            entries.insert(KEY_CLEAN_SHUTDOWN.to_string(), end.to_le_bytes().to_vec());
        })?;
        self.failed = Some("the log was closed".to_string());
        Ok(())
    }
}

/// Base offsets of the `.log` files in `dir`, ascending. Index files without a
/// log (left by a crash during a delete) and unfinished compaction output
/// (`.cleaned`, left by a crash before its rename) are removed.
fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut bases = Vec::new();
    let mut orphans = Vec::new();
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = parse_segment_name(name) {
            bases.push(base);
        } else if name.ends_with(".index") || name.ends_with(".timeindex") {
            orphans.push(entry.path());
        } else if name.ends_with(".log.cleaned") {
            let path = entry.path();
            std::fs::remove_file(&path).at(&path)?;
        }
    }
    bases.sort_unstable();
    for path in orphans {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        if !bases.iter().any(|b| format!("{b:020}") == stem) {
            std::fs::remove_file(&path).at(&path)?;
        }
    }
    Ok(bases)
}

fn open_segments(
    dir: &Path,
    bases: &[u64],
    config: &LogConfig,
    clean: Option<u64>,
    recovery_point: u64,
) -> Result<BTreeMap<u64, Segment>> {
    let mut segments = BTreeMap::new();
    let interval = config.index_interval_bytes;
    for (i, &base) in bases.iter().enumerate() {
        let is_last = i + 1 == bases.len();
        // A segment is vouched for by a clean shutdown, or by having been synced
        // in full before the recovery point (the next segment starts at or below it).
        let synced = bases.get(i + 1).is_some_and(|&next| next <= recovery_point);
        let segment = if clean.is_some() || synced {
            Segment::open_trusted(dir, base, interval)?
        } else {
            let mode = if is_last {
                ScanMode::RepairTail
            } else {
                ScanMode::Strict
            };
            Segment::open_checked(dir, base, interval, mode, recovery_point)?
        };
        segments.insert(base, segment);
    }
    if let (Some(clean_end), None) = (clean, segments.values().next_back()) {
        if clean_end != recovery_point {
            return Err(StorageError::Corrupt {
                path: dir.to_path_buf(),
                position: 0,
                reason: format!("no segment files, but the log was cleanly closed at offset {clean_end}"),
            });
        }
    }
    if let (Some(clean_end), Some(last)) = (clean, segments.values().next_back()) {
        if last.next_offset() != clean_end {
            return Err(StorageError::Corrupt {
                path: last.paths.log.clone(),
                position: last.size_bytes(),
                reason: format!(
                    "log ends at offset {} but was cleanly closed at {clean_end}",
                    last.next_offset()
                ),
            });
        }
    }
    Ok(segments)
}
