//! The record-batch codec: the unit that producers send, Raft replicates and the
//! log stores.
//!
//! # Batch format (version 2, all integers little-endian)
//!
//! ```text
//! byte  size  field
//!    0     8  base_offset        offset of the first record; assigned by the log
//!    8     4  batch_length       bytes that follow this field (total size - 12)
//!   12     8  raft_term          term of the Raft entry that carried the batch
//!   20     1  magic              format version, 2 (1 is still read)
//!   21     4  crc                CRC32C (Castagnoli) of bytes 12..20 then 25..end
//!   25     2  attributes         reserved flags, carried as given
//!   27     4  record_count       records in the batch, at least 1
//!   31     8  first_timestamp_ms timestamp of the first record
//!   39     8  max_timestamp_ms   largest record timestamp
//!   47     8  producer_id        idempotent producer id, -1 when none
//!   55     2  producer_epoch     producer epoch, -1 when none
//!   57     4  base_sequence      sequence of the first record, -1 when none
//!   61     …  records
//! ```
//!
//! The CRC leaves out the base offset and length, which the log assigns and
//! checks structurally (lengths in range, base offsets contiguous), as
//! Kafka's does. Version 2 covers the Raft term too (a flipped term byte
//! would otherwise go unseen, and Raft trusts terms): a term rewrite adjusts
//! the CRC arithmetically ([`crc32c::crc32c_combine`]), without reading the
//! records again. Version 1 (the CRC over bytes 25..end only) is still read;
//! setting its term rewrites it as version 2.
//!
//! Version 3 is a batch that log compaction rewrote: `record_count` is then
//! the span of offsets the batch covers (its next offset is still
//! `base_offset + record_count`), and the records present are the ones
//! compaction kept, possibly none, each with its original offset delta
//! (strictly increasing, below the span). The header and CRC are as in
//! version 2. Producers never send version 3; only the log writes it.
//!
//! # Record format
//!
//! ```text
//! body_length        uvarint  bytes of the record after this field
//! attributes         u8       reserved, 0
//! timestamp_delta    zvarint  timestamp - first_timestamp_ms
//! offset_delta       uvarint  offset - base_offset; equals the record's index
//! key_length         uvarint  0 = no key, else length + 1
//! key                bytes
//! value_length       uvarint  0 = no value (a tombstone), else length + 1
//! value              bytes
//! header_count       uvarint
//! per header:        key_length uvarint, key (UTF-8), value_length uvarint
//!                    (0 = none, else length + 1), value
//! ```

use bytes::Bytes;

use crate::error::{Result, StorageError};
use crate::varint::{self, Reader};

pub const MAGIC_V1: u8 = 1;
/// The version written now: the CRC covers the Raft term.
pub const MAGIC_V2: u8 = 2;
/// A batch compaction rewrote: records may be missing (see the module doc).
pub const MAGIC_V3: u8 = 3;
/// Bytes before the records.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Bytes before `batch_length`'s counted region: base offset and the length.
pub const LOG_OVERHEAD_BYTES: usize = 12;
/// Attribute bit of a control batch: it carries metadata of the replication
/// layer (a Raft configuration change or an empty leader entry), takes an
/// offset like any batch, and is skipped by consumers.
pub const ATTRIBUTE_CONTROL: u16 = 1 << 5;
/// No batch may exceed this, whatever a log is configured to accept; it bounds
/// what a decoder will ever allocate.
pub const BATCH_BYTES_HARD_LIMIT: usize = 64 * 1024 * 1024;
/// The CRC covers the bytes from here to the end.
pub const CRC_START: usize = 25;
/// A record is at least: length, attributes, timestamp, offset, key, value, headers.
const RECORD_BYTES_MIN: usize = 7;

const OFFSET_BASE: usize = 0;
pub const OFFSET_LENGTH: usize = 8;
const OFFSET_TERM: usize = 12;
pub const OFFSET_MAGIC: usize = 20;
pub const OFFSET_CRC: usize = 21;
const OFFSET_ATTRIBUTES: usize = 25;
const OFFSET_COUNT: usize = 27;
const OFFSET_FIRST_TS: usize = 31;
const OFFSET_MAX_TS: usize = 39;
const OFFSET_PRODUCER_ID: usize = 47;
const OFFSET_PRODUCER_EPOCH: usize = 55;
const OFFSET_BASE_SEQUENCE: usize = 57;

/// One key/value pair attached to a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Option<Bytes>,
}

/// A record as a producer writes it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Record {
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    /// `None` is a tombstone.
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

/// A record read back from a batch, with its offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    pub record: Record,
}

/// Who produced a batch, for idempotent de-duplication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerInfo {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

impl ProducerInfo {
    /// The marker of a batch written without an idempotent producer.
    pub const NONE: ProducerInfo = ProducerInfo {
        producer_id: -1,
        producer_epoch: -1,
        base_sequence: -1,
    };
}

/// The fixed fields of a batch, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: u64,
    pub batch_length: u32,
    pub raft_term: u64,
    pub magic: u8,
    pub crc: u32,
    pub attributes: u16,
    pub record_count: u32,
    pub first_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
    pub producer: ProducerInfo,
}

impl BatchHeader {
    /// Decodes and checks the fixed fields. `bytes` needs only the header; the
    /// CRC is not checked here (see [`verify_batch`]).
    pub fn parse(bytes: &[u8]) -> std::result::Result<BatchHeader, String> {
        if bytes.len() < BATCH_HEADER_BYTES {
            return Err(format!(
                "{} bytes is shorter than a batch header ({BATCH_HEADER_BYTES})",
                bytes.len()
            ));
        }
        let header = BatchHeader {
            base_offset: read_u64(bytes, OFFSET_BASE),
            batch_length: read_u32(bytes, OFFSET_LENGTH),
            raft_term: read_u64(bytes, OFFSET_TERM),
            magic: bytes[OFFSET_MAGIC],
            crc: read_u32(bytes, OFFSET_CRC),
            attributes: u16::from_le_bytes([bytes[OFFSET_ATTRIBUTES], bytes[OFFSET_ATTRIBUTES + 1]]),
            record_count: read_u32(bytes, OFFSET_COUNT),
            first_timestamp_ms: read_u64(bytes, OFFSET_FIRST_TS) as i64,
            max_timestamp_ms: read_u64(bytes, OFFSET_MAX_TS) as i64,
            producer: ProducerInfo {
                producer_id: read_u64(bytes, OFFSET_PRODUCER_ID) as i64,
                producer_epoch: i16::from_le_bytes([bytes[OFFSET_PRODUCER_EPOCH], bytes[OFFSET_PRODUCER_EPOCH + 1]]),
                base_sequence: read_u32(bytes, OFFSET_BASE_SEQUENCE) as i32,
            },
        };
        header.check()?;
        Ok(header)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if !(MAGIC_V1..=MAGIC_V3).contains(&self.magic) {
            return Err(format!("unknown batch magic {} (this build reads 1 to 3)", self.magic));
        }
        let size = self.size_bytes();
        if !(BATCH_HEADER_BYTES..=BATCH_BYTES_HARD_LIMIT).contains(&size) {
            return Err(format!(
                "batch length {size} is outside [{BATCH_HEADER_BYTES}, {BATCH_BYTES_HARD_LIMIT}]"
            ));
        }
        let records_bytes = size - BATCH_HEADER_BYTES;
        // A compacted batch's count is its offset span, whatever it holds.
        let holds_count = self.magic != MAGIC_V3;
        if self.record_count == 0 || holds_count && self.record_count as usize > records_bytes / RECORD_BYTES_MIN {
            return Err(format!(
                "record count {} does not fit {records_bytes} bytes of records",
                self.record_count
            ));
        }
        if self.max_timestamp_ms < self.first_timestamp_ms {
            return Err("max timestamp is below the first timestamp".to_string());
        }
        if self.base_offset.checked_add(u64::from(self.record_count)).is_none() {
            return Err("offsets overflow 64 bits".to_string());
        }
        Ok(())
    }

    /// Size of the whole batch on disk or on the wire.
    pub fn size_bytes(&self) -> usize {
        self.batch_length as usize + LOG_OVERHEAD_BYTES
    }

    /// The offset after the batch's last record.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Checks a whole encoded batch: header fields, exact length and CRC.
pub fn verify_batch(bytes: &[u8]) -> std::result::Result<BatchHeader, String> {
    let header = BatchHeader::parse(bytes)?;
    if header.size_bytes() != bytes.len() {
        return Err(format!(
            "batch length field says {} bytes but {} were given",
            header.size_bytes(),
            bytes.len()
        ));
    }
    let actual = batch_crc(header.magic, header.raft_term, &bytes[CRC_START..]);
    if actual != header.crc {
        return Err(format!(
            "CRC mismatch: stored {:#010x}, computed {actual:#010x}",
            header.crc
        ));
    }
    Ok(header)
}

/// The CRC a batch of format `magic` carries over `body` (bytes 25..end).
fn batch_crc(magic: u8, raft_term: u64, body: &[u8]) -> u32 {
    match magic {
        MAGIC_V1 => crc32c::crc32c(body),
        _ => crc32c::crc32c_append(crc32c::crc32c(&raft_term.to_le_bytes()), body),
    }
}

/// The version-2 CRC of a batch whose term changes from `old` to `new`,
/// from its CRC `crc` over `body_len` bytes of records: a CRC is affine,
/// so swapping an 8-byte prefix shifts it by the two prefixes' CRCs.
fn retermed_crc(crc: u32, old: u64, new: u64, body_len: usize) -> u32 {
    let shifted = |term: u64| crc32c::crc32c_combine(crc32c::crc32c(&term.to_le_bytes()), 0, body_len);
    crc ^ shifted(old) ^ shifted(new)
}

/// An encoded, verified record batch. Cheap to inspect; the bytes are exactly
/// what goes to disk and over the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordBatch {
    /// Shared: decoded keys and values are slices of it, not copies.
    bytes: Bytes,
    header: BatchHeader,
}

impl RecordBatch {
    /// Takes ownership of encoded bytes after checking them completely.
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Result<RecordBatch> {
        let bytes = bytes.into();
        let header = verify_batch(&bytes).map_err(StorageError::InvalidBatch)?;
        Ok(RecordBatch { bytes, header })
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    pub fn base_offset(&self) -> u64 {
        self.header.base_offset
    }

    pub fn next_offset(&self) -> u64 {
        self.header.next_offset()
    }

    pub fn record_count(&self) -> u32 {
        self.header.record_count
    }

    pub fn raft_term(&self) -> u64 {
        self.header.raft_term
    }

    pub fn max_timestamp_ms(&self) -> i64 {
        self.header.max_timestamp_ms
    }

    /// Whether the batch is replication metadata rather than user records.
    pub fn is_control(&self) -> bool {
        self.header.attributes & ATTRIBUTE_CONTROL != 0
    }

    pub fn size_bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The encoded batch (without a copy unless records decoded from it
    /// are still alive).
    pub fn into_bytes(self) -> Vec<u8> {
        Vec::from(self.bytes)
    }

    pub fn into_shared(self) -> Bytes {
        self.bytes
    }

    /// Rewrites the base offset; the CRC does not cover it.
    pub fn set_base_offset(&mut self, base_offset: u64) {
        self.overwrite(OFFSET_BASE, &base_offset.to_le_bytes());
        self.header.base_offset = base_offset;
    }

    /// Rewrites the Raft term and the CRC that covers it (a version-1
    /// batch becomes version 2: its CRC, over the records only, is
    /// extended over the term).
    pub fn set_raft_term(&mut self, raft_term: u64) {
        let header = self.header;
        if header.magic != MAGIC_V1 && header.raft_term == raft_term {
            return;
        }
        let magic = header.magic.max(MAGIC_V2);
        let body_len = self.bytes.len() - CRC_START;
        let crc = match header.magic {
            MAGIC_V1 => crc32c::crc32c_combine(crc32c::crc32c(&raft_term.to_le_bytes()), header.crc, body_len),
            _ => retermed_crc(header.crc, header.raft_term, raft_term, body_len),
        };
        self.overwrite(OFFSET_TERM, &raft_term.to_le_bytes());
        self.overwrite(OFFSET_MAGIC, &[magic]);
        self.overwrite(OFFSET_CRC, &crc.to_le_bytes());
        self.header.raft_term = raft_term;
        self.header.magic = magic;
        self.header.crc = crc;
        debug_assert_eq!(
            verify_batch(&self.bytes).map(|h| h.crc),
            Ok(crc),
            "a re-termed batch verifies"
        );
    }

    /// Overwrites header bytes in place (copying the batch first only if
    /// it is shared).
    fn overwrite(&mut self, at: usize, value: &[u8]) {
        if &self.bytes[at..at + value.len()] == value {
            return;
        }
        let mut bytes = bytes::BytesMut::from(std::mem::take(&mut self.bytes));
        bytes[at..at + value.len()].copy_from_slice(value);
        self.bytes = bytes.freeze();
    }

    /// Decodes the records one by one. Errors name what is wrong; decoding stops
    /// at the first error.
    pub fn records(&self) -> RecordIter<'_> {
        RecordIter {
            source: &self.bytes,
            views: self.views(),
        }
    }

    /// As [`RecordBatch::records`], borrowing keys, values and headers from
    /// the batch: nothing is allocated per record.
    pub fn views(&self) -> RecordViews<'_> {
        RecordViews {
            reader: Reader::new(&self.bytes[BATCH_HEADER_BYTES..]),
            header: self.header,
            index: 0,
            done: false,
        }
    }

    /// Whether compaction rewrote this batch (some of its offsets may hold
    /// no record).
    pub fn is_compacted(&self) -> bool {
        self.header.magic == MAGIC_V3
    }

    /// This batch with only the records `keep` accepts, as compaction
    /// writes it (version 3: same offsets, term, producer and timestamps in
    /// the header; the kept records byte for byte). `None` when every
    /// record is kept, so the batch stays as it is; a control batch is
    /// always kept whole.
    pub fn retain_records(&self, mut keep: impl FnMut(&RecordView<'_>) -> bool) -> Result<Option<RecordBatch>> {
        if self.is_control() {
            return Ok(None);
        }
        let mut bytes = Vec::with_capacity(self.bytes.len());
        bytes.extend_from_slice(&self.bytes[..BATCH_HEADER_BYTES]);
        let mut dropped = false;
        for view in self.views() {
            let view = view?;
            if keep(&view) {
                bytes.extend_from_slice(view.encoded);
            } else {
                dropped = true;
            }
        }
        if !dropped {
            return Ok(None);
        }
        let batch_length = (bytes.len() - LOG_OVERHEAD_BYTES) as u32;
        bytes[OFFSET_LENGTH..OFFSET_LENGTH + 4].copy_from_slice(&batch_length.to_le_bytes());
        bytes[OFFSET_MAGIC] = MAGIC_V3;
        let crc = batch_crc(MAGIC_V3, self.header.raft_term, &bytes[CRC_START..]);
        bytes[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        let compacted = RecordBatch::from_bytes(bytes)?;
        debug_assert_eq!(compacted.next_offset(), self.next_offset(), "compaction keeps offsets");
        Ok(Some(compacted))
    }
}

/// A record decoded in place: its fields borrow the batch.
#[derive(Clone, Copy, Debug)]
pub struct RecordView<'a> {
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// The encoded headers (already checked), `header_count` of them.
    headers: &'a [u8],
    header_count: u64,
    /// The whole encoded record, as compaction copies it.
    encoded: &'a [u8],
}

impl<'a> RecordView<'a> {
    /// The headers as (name, value) pairs, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> {
        let mut reader = Reader::new(self.headers);
        (0..self.header_count).map_while(move |_| read_header(&mut reader).ok())
    }

    /// The value of the first header named `name`: `None` if there is no
    /// such header, `Some(None)` if it has no value.
    pub fn header(&self, name: &str) -> Option<Option<&'a [u8]>> {
        // Names were checked as UTF-8 when the record was read: compare bytes.
        let mut reader = Reader::new(self.headers);
        for _ in 0..self.header_count {
            let key_len = usize::try_from(reader.u64().ok()?).ok()?;
            let key = reader.take(key_len).ok()?;
            let value = read_nullable(&mut reader).ok()?;
            if key == name.as_bytes() {
                return Some(value);
            }
        }
        None
    }
}

/// Iterator over the records of a batch, borrowing it.
pub struct RecordViews<'a> {
    reader: Reader<'a>,
    header: BatchHeader,
    /// The offset delta the next record has (at least, in a compacted batch).
    index: u32,
    /// Set by a decoding error: iteration stops there.
    done: bool,
}

impl<'a> Iterator for RecordViews<'a> {
    type Item = Result<RecordView<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let compacted = self.header.magic == MAGIC_V3;
        if self.done || (compacted && self.reader.is_empty()) || (!compacted && self.index >= self.header.record_count)
        {
            return None;
        }
        let index = self.index;
        let result = self.decode_one();
        match &result {
            Ok(view) => self.index = (view.offset - self.header.base_offset) as u32 + 1,
            Err(_) => self.done = true,
        }
        Some(result.map_err(|reason| StorageError::InvalidBatch(format!("record {index}: {reason}"))))
    }
}

impl<'a> RecordViews<'a> {
    fn decode_one(&mut self) -> std::result::Result<RecordView<'a>, String> {
        let record_start = self.reader.position();
        let body_len = usize::try_from(self.reader.u64()?).map_err(|_| "record length overflows")?;
        let body = self.reader.take(body_len)?;
        let encoded = self.reader.consumed_since(record_start);
        let mut body = Reader::new(body);
        let _attributes = body.u8()?;
        let timestamp_delta = body.i64()?;
        let offset_delta = body.u64()?;
        self.check_offset_delta(offset_delta)?;
        let timestamp_ms = self
            .header
            .first_timestamp_ms
            .checked_add(timestamp_delta)
            .ok_or("timestamp overflows")?;
        let key = read_nullable(&mut body)?;
        let value = read_nullable(&mut body)?;
        let header_count = body.u64()?;
        if header_count > (body_len as u64) / 2 {
            return Err(format!("header count {header_count} does not fit the record"));
        }
        let headers_start = body.position();
        for _ in 0..header_count {
            read_header(&mut body)?;
        }
        let headers = body.consumed_since(headers_start);
        if !body.is_empty() {
            return Err(format!("{} unread bytes after the record", body_len - body.position()));
        }
        Ok(RecordView {
            offset: self.header.base_offset + offset_delta,
            timestamp_ms,
            key,
            value,
            headers,
            header_count,
            encoded,
        })
    }

    /// A record's offset delta is its index; in a compacted batch, any
    /// later delta within the batch's span.
    fn check_offset_delta(&self, offset_delta: u64) -> std::result::Result<(), String> {
        let expected = u64::from(self.index);
        let in_place = if self.header.magic == MAGIC_V3 {
            (expected..u64::from(self.header.record_count)).contains(&offset_delta)
        } else {
            offset_delta == expected
        };
        if !in_place {
            return Err(format!("offset delta {offset_delta} where {expected} was expected"));
        }
        Ok(())
    }
}

/// Iterator over the records of a batch, as owned records whose keys and
/// values share the batch's bytes.
pub struct RecordIter<'a> {
    source: &'a Bytes,
    views: RecordViews<'a>,
}

impl Iterator for RecordIter<'_> {
    type Item = Result<StoredRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        let view = match self.views.next()? {
            Ok(view) => view,
            Err(e) => return Some(Err(e)),
        };
        let share = |bytes: Option<&[u8]>| bytes.map(|b| self.source.slice_ref(b));
        Some(Ok(StoredRecord {
            offset: view.offset,
            record: Record {
                timestamp_ms: view.timestamp_ms,
                key: share(view.key),
                value: share(view.value),
                headers: view
                    .headers()
                    .map(|(key, value)| Header {
                        key: key.to_string(),
                        value: share(value),
                    })
                    .collect(),
            },
        }))
    }
}

fn read_header<'a>(reader: &mut Reader<'a>) -> std::result::Result<(&'a str, Option<&'a [u8]>), String> {
    let key_len = usize::try_from(reader.u64()?).map_err(|_| "header key length overflows")?;
    let key = std::str::from_utf8(reader.take(key_len)?).map_err(|_| "header key is not UTF-8")?;
    let value = read_nullable(reader)?;
    Ok((key, value))
}

fn read_nullable<'a>(reader: &mut Reader<'a>) -> std::result::Result<Option<&'a [u8]>, String> {
    let tagged = reader.u64()?;
    if tagged == 0 {
        return Ok(None);
    }
    let len = usize::try_from(tagged - 1).map_err(|_| "length overflows")?;
    Ok(Some(reader.take(len)?))
}

fn put_nullable(buf: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => varint::put_u64(buf, 0),
        Some(bytes) => {
            varint::put_u64(buf, bytes.len() as u64 + 1);
            buf.extend_from_slice(bytes);
        }
    }
}

fn nullable_len(bytes: Option<&[u8]>) -> usize {
    match bytes {
        None => 1,
        Some(bytes) => varint::len_u64(bytes.len() as u64 + 1) + bytes.len(),
    }
}

/// Encodes records into a batch. The builder writes each record straight into
/// the final buffer, so building costs one pass over the data.
pub struct BatchBuilder {
    buf: Vec<u8>,
    record_count: u32,
    first_timestamp_ms: i64,
    max_timestamp_ms: i64,
    producer: ProducerInfo,
    attributes: u16,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    pub fn new() -> BatchBuilder {
        Self::with_capacity(4096)
    }

    pub fn with_capacity(capacity_bytes: usize) -> BatchBuilder {
        let mut buf = Vec::with_capacity(capacity_bytes.max(BATCH_HEADER_BYTES));
        buf.resize(BATCH_HEADER_BYTES, 0);
        BatchBuilder {
            buf,
            record_count: 0,
            first_timestamp_ms: 0,
            max_timestamp_ms: i64::MIN,
            producer: ProducerInfo::NONE,
            attributes: 0,
        }
    }

    pub fn producer(mut self, producer: ProducerInfo) -> BatchBuilder {
        self.producer = producer;
        self
    }

    /// Sets who produced the batch, any time before it is built.
    pub fn set_producer(&mut self, producer: ProducerInfo) {
        self.producer = producer;
    }

    pub fn attributes(mut self, attributes: u16) -> BatchBuilder {
        self.attributes = attributes;
        self
    }

    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// The size the batch would have if built now.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The size a record would add to the batch.
    pub fn record_size_bytes(&self, record: &Record) -> usize {
        let body = self.body_len(&Parts::of(record));
        varint::len_u64(body as u64) + body
    }

    fn body_len(&self, record: &Parts<'_, impl HeaderList>) -> usize {
        let delta = self.timestamp_delta(record.timestamp_ms);
        let mut headers = 0;
        record.headers.each(|key, value| {
            headers += varint::len_u64(key.len() as u64) + key.len() + nullable_len(value);
        });
        1 + varint::len_i64(delta)
            + varint::len_u64(u64::from(self.record_count))
            + nullable_len(record.key)
            + nullable_len(record.value)
            + varint::len_u64(record.headers.count() as u64)
            + headers
    }

    fn timestamp_delta(&self, timestamp_ms: i64) -> i64 {
        if self.record_count == 0 {
            0
        } else {
            timestamp_ms.wrapping_sub(self.first_timestamp_ms)
        }
    }

    /// Appends a record. Fails when the batch would outgrow the hard limit or
    /// the timestamp is too far from the first one to encode.
    pub fn push(&mut self, record: &Record) -> Result<()> {
        self.push_record(&Parts::of(record))
    }

    /// As [`BatchBuilder::push`], from borrowed parts (no [`Record`] built).
    pub fn push_parts(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) -> Result<()> {
        self.push_record(&Parts {
            timestamp_ms,
            key,
            value,
            headers,
        })
    }

    fn push_record(&mut self, record: &Parts<'_, impl HeaderList>) -> Result<()> {
        let body_len = self.body_len(record);
        let added = varint::len_u64(body_len as u64) + body_len;
        if self.buf.len() + added > BATCH_BYTES_HARD_LIMIT {
            return Err(StorageError::BatchTooLarge {
                size_bytes: self.buf.len() + added,
                limit_bytes: BATCH_BYTES_HARD_LIMIT,
            });
        }
        if self.record_count == 0 {
            self.first_timestamp_ms = record.timestamp_ms;
        } else if self
            .first_timestamp_ms
            .checked_add(self.timestamp_delta(record.timestamp_ms))
            != Some(record.timestamp_ms)
        {
            return Err(StorageError::InvalidBatch("timestamp delta overflows".to_string()));
        }
        let delta = self.timestamp_delta(record.timestamp_ms);
        let buf = &mut self.buf;
        varint::put_u64(buf, body_len as u64);
        buf.push(0);
        varint::put_i64(buf, delta);
        varint::put_u64(buf, u64::from(self.record_count));
        put_nullable(buf, record.key);
        put_nullable(buf, record.value);
        varint::put_u64(buf, record.headers.count() as u64);
        record.headers.each(|key, value| {
            varint::put_u64(buf, key.len() as u64);
            buf.extend_from_slice(key.as_bytes());
            put_nullable(buf, value);
        });
        self.record_count += 1;
        self.max_timestamp_ms = self.max_timestamp_ms.max(record.timestamp_ms);
        Ok(())
    }

    /// Finishes the batch: writes the header and the CRC. Base offset and term
    /// are 0 until the log or the Raft leader sets them.
    pub fn build(mut self) -> Result<RecordBatch> {
        if self.record_count == 0 {
            return Err(StorageError::InvalidBatch(
                "a batch needs at least one record".to_string(),
            ));
        }
        let batch_length = (self.buf.len() - LOG_OVERHEAD_BYTES) as u32;
        let buf = &mut self.buf;
        buf[OFFSET_LENGTH..OFFSET_LENGTH + 4].copy_from_slice(&batch_length.to_le_bytes());
        buf[OFFSET_MAGIC] = MAGIC_V2;
        buf[OFFSET_ATTRIBUTES..OFFSET_ATTRIBUTES + 2].copy_from_slice(&self.attributes.to_le_bytes());
        buf[OFFSET_COUNT..OFFSET_COUNT + 4].copy_from_slice(&self.record_count.to_le_bytes());
        buf[OFFSET_FIRST_TS..OFFSET_FIRST_TS + 8].copy_from_slice(&self.first_timestamp_ms.to_le_bytes());
        buf[OFFSET_MAX_TS..OFFSET_MAX_TS + 8].copy_from_slice(&self.max_timestamp_ms.to_le_bytes());
        buf[OFFSET_PRODUCER_ID..OFFSET_PRODUCER_ID + 8].copy_from_slice(&self.producer.producer_id.to_le_bytes());
        buf[OFFSET_PRODUCER_EPOCH..OFFSET_PRODUCER_EPOCH + 2]
            .copy_from_slice(&self.producer.producer_epoch.to_le_bytes());
        buf[OFFSET_BASE_SEQUENCE..OFFSET_BASE_SEQUENCE + 4].copy_from_slice(&self.producer.base_sequence.to_le_bytes());
        let crc = batch_crc(MAGIC_V2, 0, &buf[CRC_START..]);
        buf[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        let header = BatchHeader::parse(&self.buf).map_err(StorageError::InvalidBatch)?;
        let batch = RecordBatch {
            bytes: Bytes::from(self.buf),
            header,
        };
        // Our own output: its CRC was just computed over these bytes.
        debug_assert!(verify_batch(batch.as_bytes()).is_ok(), "a built batch does not verify");
        Ok(batch)
    }
}

/// A record to encode, borrowed from a [`Record`] or from parts.
struct Parts<'a, H> {
    timestamp_ms: i64,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    headers: H,
}

impl<'a> Parts<'a, &'a [Header]> {
    fn of(record: &'a Record) -> Self {
        Parts {
            timestamp_ms: record.timestamp_ms,
            key: record.key.as_deref(),
            value: record.value.as_deref(),
            headers: &record.headers,
        }
    }
}

/// Headers as a record's or as borrowed pairs.
trait HeaderList {
    fn count(&self) -> usize;
    fn each(&self, f: impl FnMut(&str, Option<&[u8]>));
}

impl HeaderList for &[Header] {
    fn count(&self) -> usize {
        self.len()
    }

    fn each(&self, mut f: impl FnMut(&str, Option<&[u8]>)) {
        for header in self.iter() {
            f(&header.key, header.value.as_deref());
        }
    }
}

impl HeaderList for &[(&str, Option<&[u8]>)] {
    fn count(&self) -> usize {
        self.len()
    }

    fn each(&self, mut f: impl FnMut(&str, Option<&[u8]>)) {
        for (key, value) in self.iter() {
            f(key, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keyed(count: u32) -> RecordBatch {
        let mut builder = BatchBuilder::new();
        for i in 0..count {
            builder
                .push(&Record {
                    timestamp_ms: 100 + i64::from(i),
                    key: Some(Bytes::from(format!("k{}", i % 2))),
                    value: Some(Bytes::from(format!("v{i}"))),
                    headers: vec![],
                })
                .expect("push");
        }
        let mut batch = builder.build().expect("build");
        batch.set_base_offset(40);
        batch.set_raft_term(3);
        batch
    }

    #[test]
    fn a_compacted_batch_keeps_its_offsets_term_and_the_records_kept() {
        let batch = keyed(5);
        assert_eq!(
            batch.retain_records(|_| true).expect("retain"),
            None,
            "all kept: no rewrite"
        );
        let mut compacted = batch
            .retain_records(|v| v.offset == 41 || v.offset == 44)
            .expect("retain")
            .expect("some dropped");
        assert!(compacted.is_compacted());
        assert_eq!((compacted.base_offset(), compacted.next_offset()), (40, 45));
        let offsets: Vec<u64> = compacted.records().map(|r| r.expect("record").offset).collect();
        assert_eq!(offsets, vec![41, 44]);
        assert_eq!(compacted.header().producer, batch.header().producer);
        compacted.set_raft_term(9);
        assert!(compacted.is_compacted(), "a new term keeps version 3");
        let decoded = RecordBatch::from_bytes(compacted.as_bytes().to_vec()).expect("verifies");
        let values: Vec<_> = decoded.records().map(|r| r.expect("record").record.value).collect();
        assert_eq!(values, vec![Some(Bytes::from("v1")), Some(Bytes::from("v4"))]);

        let empty = batch.retain_records(|_| false).expect("retain").expect("all dropped");
        assert_eq!(
            (empty.next_offset(), empty.records().count()),
            (45, 0),
            "an emptied batch keeps its span"
        );
    }

    #[test]
    fn a_compacted_batch_with_records_out_of_order_or_past_its_span_is_refused() {
        let compacted = keyed(3)
            .retain_records(|v| v.offset != 41)
            .expect("retain")
            .expect("dropped");
        // Only version 3 may skip offsets: as version 2 the same bytes fail.
        let mut as_v2 = compacted.as_bytes().to_vec();
        as_v2[OFFSET_MAGIC] = MAGIC_V2;
        let crc = batch_crc(MAGIC_V2, 3, &as_v2[CRC_START..]);
        as_v2[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        let batch = RecordBatch::from_bytes(as_v2).expect("the header is valid");
        assert!(
            batch.records().any(|r| r.is_err()),
            "a skipped offset in version 2 is an error"
        );
        // A span that does not cover the records kept.
        let mut short = compacted.as_bytes().to_vec();
        short[OFFSET_COUNT..OFFSET_COUNT + 4].copy_from_slice(&2u32.to_le_bytes());
        let crc = batch_crc(MAGIC_V3, 3, &short[CRC_START..]);
        short[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        let batch = RecordBatch::from_bytes(short).expect("the header is valid");
        assert!(batch.records().any(|r| r.is_err()), "offset 42 lies past a span of 2");
        let mut future = compacted.as_bytes().to_vec();
        future[OFFSET_MAGIC] = 4;
        let error = RecordBatch::from_bytes(future).expect_err("magic 4");
        assert!(error.to_string().contains("unknown batch magic 4"), "{error}");
    }

    fn arb_bytes() -> impl Strategy<Value = Option<Bytes>> {
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from))
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        let header = ("[a-z]{0,8}", arb_bytes()).prop_map(|(key, value)| Header { key, value });
        (
            -1_000_000_000_000i64..1_000_000_000_000,
            arb_bytes(),
            arb_bytes(),
            proptest::collection::vec(header, 0..3),
        )
            .prop_map(|(timestamp_ms, key, value, headers)| Record {
                timestamp_ms,
                key,
                value,
                headers,
            })
    }

    fn build(records: &[Record], producer: ProducerInfo) -> RecordBatch {
        let mut builder = BatchBuilder::new().producer(producer);
        for record in records {
            builder.push(record).expect("push");
        }
        builder.build().expect("build")
    }

    proptest! {
        #[test]
        fn batch_round_trips(
            records in proptest::collection::vec(arb_record(), 1..40),
            base_offset in 0u64..u64::MAX / 2,
            term in any::<u64>(),
            producer_id in any::<i64>(),
            epoch in any::<i16>(),
            sequence in any::<i32>(),
        ) {
            let producer = ProducerInfo { producer_id, producer_epoch: epoch, base_sequence: sequence };
            let mut batch = build(&records, producer);
            batch.set_base_offset(base_offset);
            batch.set_raft_term(term);
            let decoded = RecordBatch::from_bytes(batch.as_bytes().to_vec()).expect("decode");
            prop_assert_eq!(decoded.header(), batch.header());
            prop_assert_eq!(decoded.header().producer, producer);
            prop_assert_eq!(decoded.raft_term(), term);
            let back: Vec<StoredRecord> = decoded.records().collect::<Result<_>>().expect("records");
            prop_assert_eq!(back.len(), records.len());
            for (index, (stored, original)) in back.iter().zip(&records).enumerate() {
                prop_assert_eq!(stored.offset, base_offset + index as u64);
                prop_assert_eq!(&stored.record, original);
            }
            let views: Vec<RecordView<'_>> = decoded.views().collect::<Result<_>>().expect("views");
            for (view, stored) in views.iter().zip(&back) {
                prop_assert_eq!(view.offset, stored.offset);
                prop_assert_eq!(view.timestamp_ms, stored.record.timestamp_ms);
                prop_assert_eq!(view.key, stored.record.key.as_deref());
                prop_assert_eq!(view.value, stored.record.value.as_deref());
                let headers: Vec<(&str, Option<&[u8]>)> = view.headers().collect();
                let expected: Vec<(&str, Option<&[u8]>)> =
                    stored.record.headers.iter().map(|h| (h.key.as_str(), h.value.as_deref())).collect();
                prop_assert_eq!(headers, expected);
                for h in &stored.record.headers {
                    let first = stored.record.headers.iter().find(|o| o.key == h.key).map(|o| o.value.as_deref());
                    prop_assert_eq!(view.header(&h.key), first);
                }
            }
            let max = records.iter().map(|r| r.timestamp_ms).max().unwrap_or(0);
            prop_assert_eq!(decoded.max_timestamp_ms(), max);
        }

        #[test]
        fn parts_encode_exactly_as_records_do(records in proptest::collection::vec(arb_record(), 1..20)) {
            let mut whole = BatchBuilder::new();
            let mut parts = BatchBuilder::new();
            for r in &records {
                let headers: Vec<(&str, Option<&[u8]>)> =
                    r.headers.iter().map(|h| (h.key.as_str(), h.value.as_deref())).collect();
                let pushed = parts.push_parts(r.timestamp_ms, r.key.as_deref(), r.value.as_deref(), &headers);
                prop_assert_eq!(whole.push(r).is_ok(), pushed.is_ok());
            }
            match (whole.build(), parts.build()) {
                (Ok(whole), Ok(parts)) => prop_assert_eq!(whole.as_bytes(), parts.as_bytes()),
                (whole, parts) => prop_assert_eq!(whole.is_ok(), parts.is_ok()),
            }
        }

        #[test]
        fn decoder_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(batch) = RecordBatch::from_bytes(bytes) {
                for view in batch.views().flatten() {
                    let _ = view.headers().count();
                }
                for record in batch.records() {
                    let _ = record;
                }
            }
        }

        /// Random record bytes under a valid header and CRC: the batch parses,
        /// and the record decoder must reject garbage without panicking.
        #[test]
        fn record_decoder_never_panics(
            body in proptest::collection::vec(any::<u8>(), 7..512),
            count in 1u32..64,
        ) {
            let mut bytes = vec![0u8; BATCH_HEADER_BYTES];
            bytes.extend_from_slice(&body);
            let length = (bytes.len() - LOG_OVERHEAD_BYTES) as u32;
            bytes[OFFSET_LENGTH..OFFSET_LENGTH + 4].copy_from_slice(&length.to_le_bytes());
            bytes[OFFSET_MAGIC] = MAGIC_V1;
            let count = count.min((body.len() / RECORD_BYTES_MIN) as u32).max(1);
            bytes[OFFSET_COUNT..OFFSET_COUNT + 4].copy_from_slice(&count.to_le_bytes());
            let crc = crc32c::crc32c(&bytes[CRC_START..]);
            bytes[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
            let batch = RecordBatch::from_bytes(bytes).expect("header is valid");
            for record in batch.records() {
                let _ = record;
            }
        }

        /// Version 2: the term is covered too, after any number of
        /// arithmetic re-terms; a version-1 batch still reads, and setting
        /// its term makes it a version-2 one.
        #[test]
        fn a_flipped_term_bit_is_detected_and_version_1_still_reads(
            records in proptest::collection::vec(arb_record(), 1..8),
            terms in proptest::collection::vec(any::<u64>(), 1..4),
            bit in 0usize..64,
        ) {
            let mut batch = build(&records, ProducerInfo::NONE);
            for &term in &terms {
                batch.set_raft_term(term);
            }
            let expected = batch_crc(MAGIC_V2, *terms.last().expect("a term"), &batch.as_bytes()[CRC_START..]);
            prop_assert_eq!(batch.header().crc, expected, "arithmetic re-term equals a full CRC");
            let mut flipped = batch.as_bytes().to_vec();
            flipped[OFFSET_TERM + bit / 8] ^= 1 << (bit % 8);
            prop_assert!(RecordBatch::from_bytes(flipped).is_err(), "a flipped term bit is seen");

            let mut v1 = build(&records, ProducerInfo::NONE).into_bytes();
            v1[OFFSET_MAGIC] = MAGIC_V1;
            let crc = crc32c::crc32c(&v1[CRC_START..]);
            v1[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
            let mut old = RecordBatch::from_bytes(v1).expect("version 1 reads");
            old.set_raft_term(terms[0]);
            prop_assert_eq!(old.header().magic, MAGIC_V2);
            let back = RecordBatch::from_bytes(old.as_bytes().to_vec()).expect("re-termed version 1 verifies");
            prop_assert_eq!(back.raft_term(), terms[0]);
        }

        #[test]
        fn any_single_bit_flip_in_the_crc_region_is_detected(
            records in proptest::collection::vec(arb_record(), 1..8),
            bit in any::<prop::sample::Index>(),
        ) {
            let batch = build(&records, ProducerInfo::NONE);
            let mut bytes = batch.into_bytes();
            let region_bits = (bytes.len() - CRC_START) * 8;
            let at = bit.index(region_bits);
            bytes[CRC_START + at / 8] ^= 1 << (at % 8);
            prop_assert!(RecordBatch::from_bytes(bytes).is_err());
        }
    }

    #[test]
    fn empty_batch_is_rejected() {
        assert!(matches!(
            BatchBuilder::new().build(),
            Err(StorageError::InvalidBatch(_))
        ));
    }

    #[test]
    fn truncated_batch_is_rejected_with_reason() {
        let batch = build(
            &[Record {
                value: Some(Bytes::from_static(b"v")),
                ..Record::default()
            }],
            ProducerInfo::NONE,
        );
        let bytes = batch.as_bytes();
        for cut in 0..bytes.len() {
            let err = RecordBatch::from_bytes(bytes[..cut].to_vec()).expect_err("truncated batch accepted");
            assert!(err.to_string().contains("invalid record batch"), "{err}");
        }
    }
}
