//! Sparse offset and time indexes of one segment, held in memory and saved
//! next to the segment when it closes.
//!
//! # `.index` file (version 1, little-endian)
//!
//! ```text
//! magic "RNIX", version u8 = 1
//! log_size_bytes u64     size of the .log file this index describes
//! next_offset u64        offset after the segment's last record
//! max_timestamp_ms i64   largest record timestamp, i64::MIN when empty
//! entry_count u32, then entries of (relative_offset u32, position u32)
//! crc32c u32 over everything before it
//! ```
//!
//! # `.timeindex` file
//!
//! ```text
//! magic "RNTI", version u8 = 1, entry_count u32,
//! entries of (max_timestamp_ms i64, relative_offset u32), crc32c u32
//! ```
//!
//! An index that is missing, fails its CRC or describes a different log size is
//! rebuilt by scanning the segment; indexes are a cache, never the truth.

use std::path::Path;

use crate::error::Result;

const OFFSET_MAGIC: &[u8; 4] = b"RNIX";
const TIME_MAGIC: &[u8; 4] = b"RNTI";
const VERSION: u8 = 1;

/// One sampled batch start: the batch with this relative offset begins here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OffsetEntry {
    pub relative_offset: u32,
    pub position: u32,
}

/// The running maximum timestamp reached by the batch at `relative_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub max_timestamp_ms: i64,
    pub relative_offset: u32,
}

/// What a saved `.index` says about its segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SegmentSummary {
    pub log_size_bytes: u64,
    pub next_offset: u64,
    pub max_timestamp_ms: i64,
}

/// Both indexes of a segment.
#[derive(Clone, Debug, Default)]
pub(crate) struct SegmentIndex {
    pub offsets: Vec<OffsetEntry>,
    pub times: Vec<TimeEntry>,
}

impl SegmentIndex {
    /// The last sampled batch start at or below `relative_offset`.
    pub fn position_at_or_before(&self, relative_offset: u32) -> Option<OffsetEntry> {
        let after = self.offsets.partition_point(|e| e.relative_offset <= relative_offset);
        after.checked_sub(1).map(|i| self.offsets[i])
    }

    /// The last time entry whose running maximum is below `timestamp_ms`: every
    /// batch up to it is older than the target, so a search may start there.
    pub fn last_below(&self, timestamp_ms: i64) -> Option<TimeEntry> {
        let after = self.times.partition_point(|e| e.max_timestamp_ms < timestamp_ms);
        after.checked_sub(1).map(|i| self.times[i])
    }

    pub fn push(&mut self, offset: OffsetEntry, running_max_ms: i64) {
        debug_assert!(self
            .offsets
            .last()
            .is_none_or(|last| last.relative_offset < offset.relative_offset));
        self.offsets.push(offset);
        if self
            .times
            .last()
            .is_none_or(|last| last.max_timestamp_ms < running_max_ms)
        {
            self.times.push(TimeEntry {
                max_timestamp_ms: running_max_ms,
                relative_offset: offset.relative_offset,
            });
        }
    }

    pub fn save(&self, index_path: &Path, time_path: &Path, summary: &SegmentSummary) -> Result<()> {
        let mut buf = Vec::with_capacity(37 + self.offsets.len() * 8);
        buf.extend_from_slice(OFFSET_MAGIC);
        buf.push(VERSION);
        buf.extend_from_slice(&summary.log_size_bytes.to_le_bytes());
        buf.extend_from_slice(&summary.next_offset.to_le_bytes());
        buf.extend_from_slice(&summary.max_timestamp_ms.to_le_bytes());
        buf.extend_from_slice(&(self.offsets.len() as u32).to_le_bytes());
        for entry in &self.offsets {
            buf.extend_from_slice(&entry.relative_offset.to_le_bytes());
            buf.extend_from_slice(&entry.position.to_le_bytes());
        }
        seal(&mut buf);
        crate::kv::write_atomically(index_path, &buf)?;

        let mut buf = Vec::with_capacity(13 + self.times.len() * 12);
        buf.extend_from_slice(TIME_MAGIC);
        buf.push(VERSION);
        buf.extend_from_slice(&(self.times.len() as u32).to_le_bytes());
        for entry in &self.times {
            buf.extend_from_slice(&entry.max_timestamp_ms.to_le_bytes());
            buf.extend_from_slice(&entry.relative_offset.to_le_bytes());
        }
        seal(&mut buf);
        crate::kv::write_atomically(time_path, &buf)
    }

    /// Loads saved indexes; `None` when either is missing or damaged, in which
    /// case the caller rebuilds them.
    pub fn load(index_path: &Path, time_path: &Path) -> Option<(SegmentIndex, SegmentSummary)> {
        let offsets_bytes = std::fs::read(index_path).ok()?;
        let times_bytes = std::fs::read(time_path).ok()?;
        let mut offsets = Fields::open(&offsets_bytes, OFFSET_MAGIC)?;
        let summary = SegmentSummary {
            log_size_bytes: offsets.u64()?,
            next_offset: offsets.u64()?,
            max_timestamp_ms: offsets.u64()? as i64,
        };
        let count = offsets.u32()? as usize;
        let mut index = SegmentIndex::default();
        for _ in 0..count.min(offsets_bytes.len() / 8) {
            let relative_offset = offsets.u32()?;
            let position = offsets.u32()?;
            index.offsets.push(OffsetEntry {
                relative_offset,
                position,
            });
        }
        let mut times = Fields::open(&times_bytes, TIME_MAGIC)?;
        let count = times.u32()? as usize;
        for _ in 0..count.min(times_bytes.len() / 12) {
            let max_timestamp_ms = times.u64()? as i64;
            let relative_offset = times.u32()?;
            index.times.push(TimeEntry {
                max_timestamp_ms,
                relative_offset,
            });
        }
        let sorted = index
            .offsets
            .windows(2)
            .all(|w| w[0].relative_offset < w[1].relative_offset)
            && index
                .times
                .windows(2)
                .all(|w| w[0].max_timestamp_ms < w[1].max_timestamp_ms);
        (offsets.at_end() && times.at_end() && sorted).then_some((index, summary))
    }
}

fn seal(buf: &mut Vec<u8>) {
    let crc = crc32c::crc32c(buf);
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// Reads the fields of a sealed index file after checking magic, version and CRC.
struct Fields<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Fields<'a> {
    fn open(bytes: &'a [u8], magic: &[u8; 4]) -> Option<Fields<'a>> {
        let body_len = bytes.len().checked_sub(4)?;
        let (body, crc) = bytes.split_at(body_len);
        let stored = u32::from_le_bytes(crc.try_into().ok()?);
        if body.len() < 5 || &body[..4] != magic || body[4] != VERSION || crc32c::crc32c(body) != stored {
            return None;
        }
        Some(Fields {
            bytes: body,
            position: 5,
        })
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let slice = self.bytes.get(self.position..self.position + N)?;
        self.position += N;
        slice.try_into().ok()
    }

    fn u64(&mut self) -> Option<u64> {
        self.take::<8>().map(u64::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }

    fn at_end(&self) -> bool {
        self.position == self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_and_damage_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ip, tp) = (dir.path().join("a.index"), dir.path().join("a.timeindex"));
        let mut index = SegmentIndex::default();
        index.push(
            OffsetEntry {
                relative_offset: 0,
                position: 0,
            },
            10,
        );
        index.push(
            OffsetEntry {
                relative_offset: 5,
                position: 4096,
            },
            10,
        );
        index.push(
            OffsetEntry {
                relative_offset: 9,
                position: 8200,
            },
            30,
        );
        assert_eq!(index.times.len(), 2);
        let summary = SegmentSummary {
            log_size_bytes: 9000,
            next_offset: 12,
            max_timestamp_ms: 30,
        };
        index.save(&ip, &tp, &summary).expect("save");
        let (loaded, loaded_summary) = SegmentIndex::load(&ip, &tp).expect("load");
        assert_eq!(loaded.offsets, index.offsets);
        assert_eq!(loaded.times, index.times);
        assert_eq!(loaded_summary, summary);
        assert_eq!(
            loaded.position_at_or_before(7),
            Some(OffsetEntry {
                relative_offset: 5,
                position: 4096
            })
        );
        assert_eq!(loaded.last_below(30).map(|e| e.relative_offset), Some(0));

        let mut bytes = std::fs::read(&ip).expect("read");
        bytes[10] ^= 0x40;
        std::fs::write(&ip, bytes).expect("write");
        assert!(SegmentIndex::load(&ip, &tp).is_none());
    }
}
