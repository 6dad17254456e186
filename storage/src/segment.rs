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
}

impl SegmentPaths {
    pub fn new(dir: &Path, base_offset: u64) -> SegmentPaths {
        let stem = format!("{base_offset:020}");
        SegmentPaths {
            log: dir.join(format!("{stem}.log")),
            index: dir.join(format!("{stem}.index")),
            time_index: dir.join(format!("{stem}.timeindex")),
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
    /// Opened for reading and positional writing.
    file: File,
    /// Bytes of batches in the file; appends go here.
    size_bytes: u64,
    /// The offset the next appended batch gets.
    next_offset: u64,
    /// Largest record timestamp, for time-based retention; `i64::MIN` when empty.
    max_timestamp_ms: i64,
    index: SegmentIndex,
    /// Bytes appended since the last index entry: the index is sparse.
    bytes_since_index_entry: u64,
    index_interval_bytes: u64,
    /// When the segment was opened for appends, for rolling by age.
    pub created_at: SystemTime,
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
            size_bytes: 0,
            next_offset: base_offset,
            max_timestamp_ms: i64::MIN,
            index: SegmentIndex::default(),
            bytes_since_index_entry: 0,
            index_interval_bytes,
            created_at: SystemTime::now(),
        })
    }

    /// Opens a segment that a clean shutdown (or an earlier recovery) vouches
    /// for: its saved index is used when it matches the file, else it is
    /// rebuilt by a strict scan.
    pub fn open_trusted(dir: &Path, base_offset: u64, index_interval_bytes: u64) -> Result<Segment> {
        let mut segment = Self::open_file(dir, base_offset, index_interval_bytes)?;
        if let Some((index, summary)) = SegmentIndex::load(&segment.paths.index, &segment.paths.time_index) {
            if summary.log_size_bytes == segment.size_bytes && summary.next_offset >= base_offset {
                segment.index = index;
                segment.next_offset = summary.next_offset;
                segment.max_timestamp_ms = summary.max_timestamp_ms;
                return Ok(segment);
            }
        }
        segment.scan(ScanMode::Strict)?;
        Ok(segment)
    }

    /// Opens a segment and checks every batch in it.
    pub fn open_checked(dir: &Path, base_offset: u64, index_interval_bytes: u64, mode: ScanMode) -> Result<Segment> {
        let mut segment = Self::open_file(dir, base_offset, index_interval_bytes)?;
        segment.scan(mode)?;
        Ok(segment)
    }

    fn open_file(dir: &Path, base_offset: u64, index_interval_bytes: u64) -> Result<Segment> {
        let paths = SegmentPaths::new(dir, base_offset);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&paths.log)
            .at(&paths.log)?;
        let metadata = file.metadata().at(&paths.log)?;
        Ok(Segment {
            base_offset,
            created_at: metadata.modified().unwrap_or_else(|_| SystemTime::now()),
            paths,
            file,
            size_bytes: metadata.len(),
            next_offset: base_offset,
            max_timestamp_ms: i64::MIN,
            index: SegmentIndex::default(),
            bytes_since_index_entry: 0,
            index_interval_bytes,
        })
    }

    /// Reads every batch from the start, checking structure, offsets and CRCs,
    /// and rebuilds the in-memory index.
    fn scan(&mut self, mode: ScanMode) -> Result<()> {
        let file_len = self.size_bytes;
        self.size_bytes = 0;
        self.next_offset = self.base_offset;
        self.max_timestamp_ms = i64::MIN;
        self.index = SegmentIndex::default();
        self.bytes_since_index_entry = 0;
        let file = self.file.try_clone().at(&self.paths.log)?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut buf = Vec::new();
        while self.size_bytes < file_len {
            match read_next_batch(&mut reader, &mut buf, file_len - self.size_bytes, self.next_offset) {
                Ok(header) => self.record_appended(&header),
                Err(reason) => return self.handle_bad_batch(mode, file_len, reason),
            }
        }
        Ok(())
    }

    fn handle_bad_batch(&mut self, mode: ScanMode, file_len: u64, reason: String) -> Result<()> {
        let position = self.size_bytes;
        let corrupt = |reason: String| StorageError::Corrupt {
            path: self.paths.log.clone(),
            position,
            reason,
        };
        if mode == ScanMode::Strict {
            return Err(corrupt(reason));
        }
        if let Some(valid_at) =
            find_valid_batch_after(&self.file, &self.paths.log, position, file_len, self.next_offset)?
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
        self.file.set_len(position).at(&self.paths.log)?;
        self.file.sync_all().at(&self.paths.log)?;
        Ok(())
    }

    /// Updates sizes, offsets and the sparse index for a batch now at the end.
    fn record_appended(&mut self, header: &BatchHeader) {
        let position = self.size_bytes;
        if self.size_bytes == 0 || self.bytes_since_index_entry >= self.index_interval_bytes {
            self.max_timestamp_ms = self.max_timestamp_ms.max(header.max_timestamp_ms);
            let entry = OffsetEntry {
                relative_offset: (header.base_offset - self.base_offset) as u32,
                position: position as u32,
            };
            self.index.push(entry, self.max_timestamp_ms);
            self.bytes_since_index_entry = 0;
        }
        self.max_timestamp_ms = self.max_timestamp_ms.max(header.max_timestamp_ms);
        let size = header.size_bytes() as u64;
        self.size_bytes += size;
        self.bytes_since_index_entry += size;
        self.next_offset = header.next_offset();
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    pub fn max_timestamp_ms(&self) -> i64 {
        self.max_timestamp_ms
    }

    pub fn is_empty(&self) -> bool {
        self.size_bytes == 0
    }

    /// Writes a batch whose base offset is already this segment's next offset.
    pub fn append(&mut self, batch: &RecordBatch) -> Result<()> {
        assert_eq!(
            batch.base_offset(),
            self.next_offset,
            "batch offset must continue the segment"
        );
        self.file
            .write_all_at(batch.as_bytes(), self.size_bytes)
            .at(&self.paths.log)?;
        self.record_appended(batch.header());
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().at(&self.paths.log)
    }

    pub fn save_index(&self) -> Result<()> {
        let summary = SegmentSummary {
            log_size_bytes: self.size_bytes,
            next_offset: self.next_offset,
            max_timestamp_ms: self.max_timestamp_ms,
        };
        self.index.save(&self.paths.index, &self.paths.time_index, &summary)
    }

    pub fn delete(self) -> Result<()> {
        drop(self.file);
        for path in [&self.paths.index, &self.paths.time_index] {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).at(path),
                _ => {}
            }
        }
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
        debug_assert!(offset >= self.base_offset && offset < self.next_offset);
        let relative = (offset - self.base_offset) as u32;
        let mut position = self
            .index
            .position_at_or_before(relative)
            .map_or(0, |e| u64::from(e.position));
        while position < self.size_bytes {
            let header = self.header_at(position)?;
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

    /// Appends whole batches from `position` to `out` while they start below
    /// `upper_offset` and fit `budget_bytes`; the first batch is taken even when
    /// it is larger, so a reader always makes progress.
    pub fn read_into(
        &self,
        mut position: u64,
        upper_offset: u64,
        budget_bytes: &mut usize,
        out: &mut Vec<RecordBatch>,
    ) -> Result<()> {
        while position < self.size_bytes {
            let header = self.header_at(position)?;
            let size = header.size_bytes();
            if header.base_offset >= upper_offset || (!out.is_empty() && size > *budget_bytes) {
                return Ok(());
            }
            let mut bytes = vec![0u8; size];
            self.file.read_exact_at(&mut bytes, position).at(&self.paths.log)?;
            let batch = RecordBatch::from_bytes(bytes).map_err(|e| self.corrupt(position, e.to_string()))?;
            out.push(batch);
            *budget_bytes = budget_bytes.saturating_sub(size);
            position += size as u64;
        }
        Ok(())
    }

    /// The first offset whose record timestamp is at least `timestamp_ms`.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>> {
        if self.max_timestamp_ms < timestamp_ms {
            return Ok(None);
        }
        let start = self.index.last_below(timestamp_ms).map_or(0, |e| e.relative_offset);
        let mut position = self
            .index
            .position_at_or_before(start)
            .map_or(0, |e| u64::from(e.position));
        while position < self.size_bytes {
            let header = self.header_at(position)?;
            if header.max_timestamp_ms >= timestamp_ms {
                let mut batches = Vec::with_capacity(1);
                self.read_into(position, u64::MAX, &mut 0, &mut batches)?;
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
        if offset >= self.next_offset {
            return Ok(());
        }
        let (position, header) = self.find_batch(offset)?;
        if header.base_offset != offset {
            return Err(StorageError::NotBatchBoundary {
                offset,
                batch_base: header.base_offset,
            });
        }
        self.file.set_len(position).at(&self.paths.log)?;
        self.file.sync_all().at(&self.paths.log)?;
        // Rebuild sizes, timestamps and index from what remains.
        self.size_bytes = position;
        self.scan(ScanMode::Strict)
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
    let header_bytes = BATCH_HEADER_BYTES as u64;
    let mut chunk_start = bad_at + 1;
    let mut chunk = Vec::new();
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
            // Records are at least 7 bytes, which bounds how far offsets can run ahead.
            let offset_plausible = header.base_offset >= expected_offset
                && header.base_offset - expected_offset <= (position - bad_at) / 7 + 1;
            if !offset_plausible || position + header.size_bytes() as u64 > file_len {
                continue;
            }
            let mut bytes = vec![0u8; header.size_bytes()];
            file.read_exact_at(&mut bytes, position).at(path)?;
            if verify_batch(&bytes).is_ok() {
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
