//! One segment of a log: `<base_offset:020>.log` holding record batches back to
//! back, with its `.index` and `.timeindex` beside it.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::batch::{verify_batch, BatchHeader, RecordBatch, BATCH_HEADER_BYTES};
use crate::error::{IoContext, Result, StorageError};
use crate::index::{OffsetEntry, SegmentIndex, SegmentSummary};

/// File names of one segment.
#[derive(Clone, Debug)]
pub(crate) struct SegmentPaths {
    pub log: PathBuf,
    pub index: PathBuf,
    pub time_index: PathBuf,
    /// Where compaction writes the segment's new contents before the rename.
    pub cleaned: PathBuf,
}

impl SegmentPaths {
    pub fn new(dir: &Path, base_offset: u64) -> SegmentPaths {
        let stem = format!("{base_offset:020}");
        SegmentPaths {
            log: dir.join(format!("{stem}.log")),
            index: dir.join(format!("{stem}.index")),
            time_index: dir.join(format!("{stem}.timeindex")),
            cleaned: dir.join(format!("{stem}.log.cleaned")),
        }
    }
}

/// Parses `<20 digits>.log` into a base offset.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

/// How a scan of a segment treats a bad batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScanMode {
    /// Any bad batch is corruption (closed segments, which were synced on roll).
    Strict,
    /// A bad batch with nothing valid after it is a torn tail, cut off.
    RepairTail,
}

pub(crate) struct Segment {
    pub base_offset: u64,
    pub paths: SegmentPaths,
    /// Opened for reading and positional writing; its cursor is never used.
    file: File,
    state: SegmentState,
    index_interval_bytes: u64,
    /// When the segment was opened for appends, for rolling by age.
    pub created_at: SystemTime,
}

/// Everything about a segment that a scan rebuilds from its batches.
#[derive(Clone, Debug)]
struct SegmentState {
    /// Bytes of batches in the file; appends go here.
    size_bytes: u64,
    /// The offset the next appended batch gets.
    next_offset: u64,
    /// Largest record timestamp, for time-based retention; `i64::MIN` when empty.
    max_timestamp_ms: i64,
    index: SegmentIndex,
    /// Bytes appended since the last index entry: the index is sparse.
    bytes_since_index_entry: u64,
}

impl SegmentState {
    fn empty(base_offset: u64) -> SegmentState {
        SegmentState {
            size_bytes: 0,
            next_offset: base_offset,
            max_timestamp_ms: i64::MIN,
            index: SegmentIndex::default(),
            bytes_since_index_entry: 0,
        }
    }

    /// Updates sizes, offsets and the sparse index for a batch now at the end.
    fn record_appended(&mut self, header: &BatchHeader, base_offset: u64, index_interval_bytes: u64) {
        self.max_timestamp_ms = self.max_timestamp_ms.max(header.max_timestamp_ms);
        if self.size_bytes == 0 || self.bytes_since_index_entry >= index_interval_bytes {
            let entry = OffsetEntry {
                relative_offset: (header.base_offset - base_offset) as u32,
                position: self.size_bytes as u32,
            };
            self.index.push(entry, self.max_timestamp_ms);
            self.bytes_since_index_entry = 0;
        }
        let size = header.size_bytes() as u64;
        self.size_bytes += size;
        self.bytes_since_index_entry += size;
        self.next_offset = header.next_offset();
    }
}

/// Reads a file from a position of its own. Handles made by `try_clone` share
/// one cursor, so nothing here relies on a cursor.
struct PositionalReader<'a> {
    file: &'a File,
    position: u64,
}

impl Read for PositionalReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.file.read_at(buf, self.position)?;
        self.position += read as u64;
        Ok(read)
    }
}

impl Segment {
    pub fn create(dir: &Path, base_offset: u64, index_interval_bytes: u64) -> Result<Segment> {
        let paths = SegmentPaths::new(dir, base_offset);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&paths.log)
            .at(&paths.log)?;
        Ok(Segment {
            base_offset,
            paths,
            file,
            state: SegmentState::empty(base_offset),
            index_interval_bytes,
            created_at: SystemTime::now(),
        })
    }

    /// Opens a segment that a clean shutdown (or an earlier recovery) vouches
    /// for: its saved index is used when it matches the file, else it is
    /// rebuilt by a strict scan.
    pub fn open_trusted(dir: &Path, base_offset: u64, index_interval_bytes: u64) -> Result<Segment> {
        let (mut segment, file_len) = Self::open_file(dir, base_offset, index_interval_bytes)?;
        if let Some((index, summary)) = SegmentIndex::load(&segment.paths.index, &segment.paths.time_index) {
            if summary.log_size_bytes == file_len && summary.next_offset >= base_offset {
                segment.state = SegmentState {
                    size_bytes: file_len,
                    next_offset: summary.next_offset,
                    max_timestamp_ms: summary.max_timestamp_ms,
                    index,
                    // Appends after a reopen start a fresh index interval.
                    bytes_since_index_entry: index_interval_bytes,
                };
                return Ok(segment);
            }
        }
        segment.scan(file_len, ScanMode::Strict, 0)?;
        Ok(segment)
    }

    /// Opens a segment and checks every batch in it. In `RepairTail` mode a
    /// bad batch that starts below `recovery_point` (data that was synced) is
    /// still corruption.
    pub fn open_checked(
        dir: &Path,
        base_offset: u64,
        index_interval_bytes: u64,
        mode: ScanMode,
        recovery_point: u64,
    ) -> Result<Segment> {
        let (mut segment, file_len) = Self::open_file(dir, base_offset, index_interval_bytes)?;
        segment.scan(file_len, mode, recovery_point)?;
        Ok(segment)
    }

    fn open_file(dir: &Path, base_offset: u64, index_interval_bytes: u64) -> Result<(Segment, u64)> {
        let paths = SegmentPaths::new(dir, base_offset);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&paths.log)
            .at(&paths.log)?;
        let metadata = file.metadata().at(&paths.log)?;
        let segment = Segment {
            base_offset,
            created_at: metadata.modified().unwrap_or_else(|_| SystemTime::now()),
            paths,
            file,
            state: SegmentState::empty(base_offset),
            index_interval_bytes,
        };
        Ok((segment, metadata.len()))
    }

    /// Reads every batch of the first `file_len` bytes, checking structure,
    /// offsets and CRCs, and rebuilds the in-memory state. The state changes
    /// only if the scan succeeds.
    fn scan(&mut self, file_len: u64, mode: ScanMode, recovery_point: u64) -> Result<()> {
        let mut state = SegmentState::empty(self.base_offset);
        let source = PositionalReader {
            file: &self.file,
            position: 0,
        };
        let mut reader = BufReader::with_capacity(1 << 20, source);
        let mut buf = Vec::new();
        while state.size_bytes < file_len {
            match read_next_batch(&mut reader, &mut buf, file_len - state.size_bytes, state.next_offset) {
                Ok(header) => state.record_appended(&header, self.base_offset, self.index_interval_bytes),
                Err(reason) => {
                    self.handle_bad_batch(mode, &state, file_len, recovery_point, reason)?;
                    break;
                }
            }
        }
        self.state = state;
        Ok(())
    }

    /// Cuts a torn tail off, or reports corruption.
    fn handle_bad_batch(
        &self,
        mode: ScanMode,
        good: &SegmentState,
        file_len: u64,
        recovery_point: u64,
        reason: String,
    ) -> Result<()> {
        let position = good.size_bytes;
        let corrupt = |reason: String| self.corrupt(position, reason);
        if mode == ScanMode::Strict {
            return Err(corrupt(reason));
        }
        if good.next_offset < recovery_point {
            return Err(corrupt(format!(
                "{reason}; offset {} is below the recovery point {recovery_point}, so it was synced",
                good.next_offset
            )));
        }
        if let Some(valid_at) =
            find_valid_batch_after(&self.file, &self.paths.log, position, file_len, good.next_offset)?
        {
            return Err(corrupt(format!(
                "{reason}; a valid batch follows at byte {valid_at}, so this is not a torn tail"
            )));
        }
        tracing::warn!(
            path = %self.paths.log.display(),
            position,
            bytes_dropped = file_len - position,
            reason = %reason,
            "truncating torn or corrupt tail of the log"
        );
        self.cut_at(position)
    }

    /// Shortens the file to `position`, dropping the saved indexes first so a
    /// stale one can never describe the new contents.
    fn cut_at(&self, position: u64) -> Result<()> {
        self.delete_index_files()?;
        self.file.set_len(position).at(&self.paths.log)?;
        self.file.sync_all().at(&self.paths.log)
    }

    pub(crate) fn delete_index_files(&self) -> Result<()> {
        for path in [&self.paths.index, &self.paths.time_index] {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).at(path),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn size_bytes(&self) -> u64 {
        self.state.size_bytes
    }

    pub fn next_offset(&self) -> u64 {
        self.state.next_offset
    }

    pub fn max_timestamp_ms(&self) -> i64 {
        self.state.max_timestamp_ms
    }

    /// When the segment's file was last written, in ms since the epoch
    /// (none if the file system cannot say).
    pub fn modified_ms(&self) -> Option<i64> {
        let modified = std::fs::metadata(&self.paths.log).and_then(|m| m.modified()).ok()?;
        let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
        i64::try_from(since_epoch.as_millis()).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.state.size_bytes == 0
    }

    /// Writes a batch whose base offset is already this segment's next offset.
    /// A failed write is cut back off, so the file never holds a partial batch
    /// that the in-memory state does not know about.
    pub fn append(&mut self, batch: &RecordBatch) -> Result<()> {
        assert_eq!(
            batch.base_offset(),
            self.state.next_offset,
            "batch offset must continue the segment"
        );
        if let Err(e) = self.file.write_all_at(batch.as_bytes(), self.state.size_bytes) {
            let _ = self.file.set_len(self.state.size_bytes);
            return Err(e).at(&self.paths.log);
        }
        self.state
            .record_appended(batch.header(), self.base_offset, self.index_interval_bytes);
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().at(&self.paths.log)
    }

    /// Saves both indexes durably (a closed segment's indexes are trusted on
    /// the next open).
    pub fn save_index(&self) -> Result<()> {
        let summary = SegmentSummary {
            log_size_bytes: self.state.size_bytes,
            next_offset: self.state.next_offset,
            max_timestamp_ms: self.state.max_timestamp_ms,
        };
        self.state
            .index
            .save(&self.paths.index, &self.paths.time_index, &summary)
    }

    pub fn delete(self) -> Result<()> {
        self.delete_index_files()?;
        drop(self.file);
        std::fs::remove_file(&self.paths.log).at(&self.paths.log)
    }

    fn header_at(&self, position: u64) -> Result<BatchHeader> {
        let mut bytes = [0u8; BATCH_HEADER_BYTES];
        self.file.read_exact_at(&mut bytes, position).at(&self.paths.log)?;
        BatchHeader::parse(&bytes).map_err(|reason| self.corrupt(position, reason))
    }

    fn corrupt(&self, position: u64, reason: String) -> StorageError {
        StorageError::Corrupt {
            path: self.paths.log.clone(),
            position,
            reason,
        }
    }

    /// The position and header of the batch holding `offset`, which must lie in
    /// `[base_offset, next_offset)`.
    pub fn find_batch(&self, offset: u64) -> Result<(u64, BatchHeader)> {
        debug_assert!(offset >= self.base_offset && offset < self.state.next_offset);
        let relative = (offset - self.base_offset) as u32;
        let mut position = self
            .state
            .index
            .position_at_or_before(relative)
            .map_or(0, |e| u64::from(e.position));
        while position < self.state.size_bytes {
            let header = self.header_at(position)?;
            if header.base_offset > offset {
                let reason = format!(
                    "batch at offset {} found while looking for offset {offset}",
                    header.base_offset
                );
                return Err(self.corrupt(position, reason));
            }
            if header.next_offset() > offset {
                return Ok((position, header));
            }
            position += header.size_bytes() as u64;
        }
        Err(self.corrupt(
            position,
            format!("offset {offset} not found before the end of the segment"),
        ))
    }

    /// Appends whole batches, starting with the batch at `position` (which
    /// holds `first_offset`), to `out` while they start below `upper_offset`
    /// and fit `budget_bytes`; the first batch is taken even when it is larger,
    /// so a reader always makes progress. Every batch is checked: its CRC, that
    /// it lies inside the segment, and that offsets run on without a gap.
    pub fn read_into(
        &self,
        mut position: u64,
        first_offset: u64,
        upper_offset: u64,
        budget_bytes: &mut usize,
        out: &mut Vec<RecordBatch>,
    ) -> Result<()> {
        let mut expected: Option<u64> = None;
        while position < self.state.size_bytes {
            let header = self.header_at(position)?;
            let size = header.size_bytes();
            if header.base_offset >= upper_offset || (!out.is_empty() && size > *budget_bytes) {
                return Ok(());
            }
            let in_place = match expected {
                None => header.base_offset <= first_offset && first_offset < header.next_offset(),
                Some(next) => header.base_offset == next,
            };
            if !in_place || position + size as u64 > self.state.size_bytes {
                let reason = format!("batch with base offset {} is out of place", header.base_offset);
                return Err(self.corrupt(position, reason));
            }
            let mut bytes = vec![0u8; size];
            self.file.read_exact_at(&mut bytes, position).at(&self.paths.log)?;
            let batch = RecordBatch::from_bytes(bytes).map_err(|e| self.corrupt(position, e.to_string()))?;
            expected = Some(batch.next_offset());
            out.push(batch);
            *budget_bytes = budget_bytes.saturating_sub(size);
            position += size as u64;
        }
        Ok(())
    }

    /// Calls `visit` with the header of every batch, in order, reading only
    /// headers. Offsets must run on without a gap.
    pub fn visit_headers(&self, visit: &mut dyn FnMut(&BatchHeader)) -> Result<()> {
        let mut position = 0;
        let mut expected = self.base_offset;
        while position < self.state.size_bytes {
            let header = self.header_at(position)?;
            if header.base_offset != expected || position + header.size_bytes() as u64 > self.state.size_bytes {
                let reason = format!("batch with base offset {} is out of place", header.base_offset);
                return Err(self.corrupt(position, reason));
            }
            visit(&header);
            expected = header.next_offset();
            position += header.size_bytes() as u64;
        }
        Ok(())
    }

    /// The first offset whose record timestamp is at least `timestamp_ms`.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>> {
        if self.state.max_timestamp_ms < timestamp_ms {
            return Ok(None);
        }
        let start = self
            .state
            .index
            .last_below(timestamp_ms)
            .map_or(0, |e| e.relative_offset);
        let mut position = self
            .state
            .index
            .position_at_or_before(start)
            .map_or(0, |e| u64::from(e.position));
        while position < self.state.size_bytes {
            let header = self.header_at(position)?;
            if header.max_timestamp_ms >= timestamp_ms {
                let mut batches = Vec::with_capacity(1);
                self.read_into(position, header.base_offset, u64::MAX, &mut 0, &mut batches)?;
                for record in batches[0].records() {
                    let record = record.map_err(|e| self.corrupt(position, e.to_string()))?;
                    if record.record.timestamp_ms >= timestamp_ms {
                        return Ok(Some(record.offset));
                    }
                }
            }
            position += header.size_bytes() as u64;
        }
        Ok(None)
    }

    /// Discards every batch at or after `offset`, which must start a batch (or be
    /// the segment's next offset).
    pub fn truncate_to(&mut self, offset: u64) -> Result<()> {
        if offset >= self.state.next_offset {
            return Ok(());
        }
        let (position, header) = self.find_batch(offset)?;
        if header.base_offset != offset {
            return Err(StorageError::NotBatchBoundary {
                offset,
                batch_base: header.base_offset,
            });
        }
        self.cut_at(position)?;
        // Rebuild sizes, timestamps and index from what remains.
        self.scan(position, ScanMode::Strict, 0)
    }
}

/// A segment's state built batch by batch while its file is written
/// elsewhere (compaction's output), so that it opens without a scan.
pub(crate) struct BuiltState {
    base_offset: u64,
    index_interval_bytes: u64,
    state: SegmentState,
}

impl BuiltState {
    pub fn new(base_offset: u64, index_interval_bytes: u64) -> BuiltState {
        BuiltState {
            base_offset,
            index_interval_bytes,
            state: SegmentState::empty(base_offset),
        }
    }

    /// A batch written after the ones before.
    pub fn add(&mut self, header: &BatchHeader) {
        self.state
            .record_appended(header, self.base_offset, self.index_interval_bytes);
    }
}

impl Segment {
    /// Opens a segment whose every batch was checked as it was written:
    /// its file must be exactly as long as `built` says.
    pub(crate) fn open_built(dir: &Path, built: BuiltState) -> Result<Segment> {
        let (mut segment, file_len) = Self::open_file(dir, built.base_offset, built.index_interval_bytes)?;
        if file_len != built.state.size_bytes {
            let reason = format!("{file_len} bytes where {} were written", built.state.size_bytes);
            return Err(segment.corrupt(0, reason));
        }
        segment.state = built.state;
        Ok(segment)
    }
}

/// Reads the next batch, checking its structure, offset continuity and CRC.
/// Errors are reasons, so the caller decides between "torn" and "corrupt".
fn read_next_batch(
    reader: &mut impl Read,
    buf: &mut Vec<u8>,
    remaining: u64,
    expected_offset: u64,
) -> std::result::Result<BatchHeader, String> {
    if remaining < BATCH_HEADER_BYTES as u64 {
        return Err(format!("{remaining} trailing bytes are shorter than a batch header"));
    }
    buf.resize(BATCH_HEADER_BYTES, 0);
    reader
        .read_exact(buf)
        .map_err(|e| format!("reading a batch header: {e}"))?;
    let header = BatchHeader::parse(buf)?;
    if header.size_bytes() as u64 > remaining {
        return Err(format!(
            "batch of {} bytes runs past the end of the file ({remaining} bytes left)",
            header.size_bytes()
        ));
    }
    if header.base_offset != expected_offset {
        return Err(format!(
            "batch base offset {} where {expected_offset} was expected",
            header.base_offset
        ));
    }
    buf.resize(header.size_bytes(), 0);
    reader
        .read_exact(&mut buf[BATCH_HEADER_BYTES..])
        .map_err(|e| format!("reading a batch body: {e}"))?;
    verify_batch(buf)
}

/// Looks past a bad batch for any valid one whose offset could follow it. Finding
/// one means the damage sits in the middle of the data, not at a torn tail.
fn find_valid_batch_after(
    file: &File,
    path: &Path,
    bad_at: u64,
    file_len: u64,
    expected_offset: u64,
) -> Result<Option<u64>> {
    const CHUNK_BYTES: u64 = 1 << 20;
    // Checking a candidate costs a read and a CRC of up to a whole batch;
    // crafted bytes must not make recovery run for hours.
    const CANDIDATES_CHECKED_MAX: usize = 4096;
    let header_bytes = BATCH_HEADER_BYTES as u64;
    let mut chunk_start = bad_at + 1;
    let mut chunk = Vec::new();
    let mut candidate = Vec::new();
    let mut checked = 0;
    while chunk_start + header_bytes <= file_len {
        let len = (CHUNK_BYTES + header_bytes).min(file_len - chunk_start);
        chunk.resize(len as usize, 0);
        file.read_exact_at(&mut chunk, chunk_start).at(path)?;
        let candidates = (len - header_bytes + 1).min(CHUNK_BYTES);
        for i in 0..candidates as usize {
            let position = chunk_start + i as u64;
            let Ok(header) = BatchHeader::parse(&chunk[i..i + BATCH_HEADER_BYTES]) else {
                continue;
            };
            // No bound on how far offsets run ahead: a compacted batch spans
            // any number of offsets in a header's bytes. The CRC decides, and
            // the candidate cap bounds the cost.
            let offset_plausible = header.base_offset >= expected_offset;
            if !offset_plausible || position + header.size_bytes() as u64 > file_len {
                continue;
            }
            checked += 1;
            if checked > CANDIDATES_CHECKED_MAX {
                return Err(StorageError::Corrupt {
                    path: path.to_path_buf(),
                    position: bad_at,
                    reason: format!("more than {CANDIDATES_CHECKED_MAX} plausible batch headers after damaged data"),
                });
            }
            candidate.resize(header.size_bytes(), 0);
            file.read_exact_at(&mut candidate, position).at(path)?;
            if verify_batch(&candidate).is_ok() {
                return Ok(Some(position));
            }
        }
        chunk_start += CHUNK_BYTES;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_parse_strictly() {
        assert_eq!(parse_segment_name("00000000000000000042.log"), Some(42));
        assert_eq!(parse_segment_name("42.log"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.log"), None);
        assert_eq!(parse_segment_name("00000000000000000042.index"), None);
        assert_eq!(
            SegmentPaths::new(Path::new("/d"), 7).log,
            Path::new("/d/00000000000000000007.log")
        );
    }
}
