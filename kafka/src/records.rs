//! Record batches between Kafka's format (v2, "magic 2") and Runnel's.
//!
//! A produced Kafka batch is decoded (decompressed with a bound: a small
//! compressed batch must not become gigabytes in memory), checked, and
//! rebuilt as one Runnel batch with the same records, timestamps, headers
//! and idempotent-producer fields. Fetched Runnel batches are encoded as
//! uncompressed Kafka batches at the same offsets; Runnel's control batches
//! (Raft configuration entries, which take offsets) become Kafka control
//! batches, which every Kafka consumer skips while moving past their offsets.

use std::io::Read;

use bytes::{Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record as KafkaRecord, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use runnel_storage::{BatchBuilder, ProducerInfo, RecordBatch};

/// Bytes a produced batch may decompress to at most (Runnel's own batch
/// limit: the rebuilt batch could not be larger anyway).
pub const DECOMPRESSED_BYTES_MAX: usize = runnel_storage::batch::BATCH_BYTES_HARD_LIMIT;
/// Records in one produced batch at most. The decoder reserves memory by the
/// count a batch claims, so the claim is checked first.
pub const BATCH_RECORDS_MAX: i32 = 1 << 20;
/// The smallest encoded Kafka record: length, attributes, timestamp delta,
/// offset delta, key length, value length, header count (one byte each).
const RECORD_BYTES_MIN: usize = 7;
/// xerial's framing of snappy, which Kafka's Java clients write.
const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_BYTES: usize = 16;
/// The key of the control record Runnel's control batches become: version
/// 0, type 1 (a transaction COMMIT marker, which commits nothing here).
const CONTROL_KEY: [u8; 4] = [0, 0, 0, 1];
/// Its value: version 0, coordinator epoch 0.
const CONTROL_VALUE: [u8; 6] = [0; 6];

/// Why a produced batch was refused; the text names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordsError {
    #[error("the partition's records hold {0} record batches; a produce request carries exactly one per partition")]
    BatchCount(usize),
    #[error("record batch: {0}")]
    Corrupt(String),
    #[error("record batch claims {claimed} records in {bytes} bytes ({why})")]
    TooManyRecords {
        claimed: i32,
        bytes: usize,
        why: &'static str,
    },
    #[error("{codec:?} data decompresses to more than {limit_bytes} bytes")]
    TooLarge { codec: Compression, limit_bytes: usize },
    #[error("transactional and control batches cannot be produced: Runnel has no Kafka transactions")]
    Transactional,
    #[error("the batch is not valid for Runnel: {0}")]
    Invalid(String),
}

/// The one Kafka batch of a produce request's partition data, as a Runnel
/// batch, and how many records it holds.
pub fn produced_batch(mut records: Bytes, now_ms: i64) -> Result<RecordBatch, RecordsError> {
    check_batch_headers(&records)?;
    let set = RecordBatchDecoder::decode_with_custom_compression(&mut records, Some(decompress))
        .map_err(|e| RecordsError::Corrupt(format!("{e:#}")))?;
    if !records.is_empty() {
        return Err(RecordsError::BatchCount(2));
    }
    to_runnel(&set.records, now_ms)
}

/// Checks the batch headers before anything is decoded: exactly one batch
/// and a record count the bytes can hold.
fn check_batch_headers(records: &Bytes) -> Result<(), RecordsError> {
    let infos = RecordBatchDecoder::decode_batch_info(&mut records.clone())
        .map_err(|e| RecordsError::Corrupt(format!("{e:#}")))?;
    if infos.len() != 1 {
        return Err(RecordsError::BatchCount(infos.len()));
    }
    let info = &infos[0];
    if info.version != 2 {
        return Err(RecordsError::Corrupt(format!(
            "message format v{} is not supported; use record batches (v2, Kafka 0.11 on)",
            info.version
        )));
    }
    if info.transactional || info.control {
        return Err(RecordsError::Transactional);
    }
    let claimed = info.record_count;
    let bound = match info.compression {
        Compression::None => records.len() / RECORD_BYTES_MIN,
        _ => DECOMPRESSED_BYTES_MAX / RECORD_BYTES_MIN,
    };
    if claimed == 0 || claimed > BATCH_RECORDS_MAX || claimed as usize > bound {
        let why = if claimed == 0 {
            "a batch needs a record"
        } else {
            "more than the bytes or the limit allow"
        };
        return Err(RecordsError::TooManyRecords {
            claimed,
            bytes: records.len(),
            why,
        });
    }
    Ok(())
}

/// Decompresses one batch's records, refusing output beyond
/// [`DECOMPRESSED_BYTES_MAX`].
fn decompress(data: &mut Bytes, codec: Compression) -> anyhow::Result<Bytes> {
    let limit = DECOMPRESSED_BYTES_MAX;
    let out = match codec {
        Compression::None => return Ok(data.clone()),
        Compression::Gzip => read_bounded(flate2::read::MultiGzDecoder::new(&data[..]), codec)?,
        Compression::Lz4 => read_bounded(lz4_flex::frame::FrameDecoder::new(&data[..]), codec)?,
        Compression::Zstd => {
            let decoder =
                ruzstd::decoding::StreamingDecoder::new(&data[..]).map_err(|e| anyhow::anyhow!("zstd data: {e}"))?;
            read_bounded(decoder, codec)?
        }
        Compression::Snappy => snappy(data, limit)?,
    };
    Ok(Bytes::from(out))
}

fn read_bounded(reader: impl Read, codec: Compression) -> anyhow::Result<Vec<u8>> {
    let limit = DECOMPRESSED_BYTES_MAX;
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| anyhow::anyhow!("{codec:?} data: {e}"))?;
    if out.len() > limit {
        return Err(RecordsError::TooLarge {
            codec,
            limit_bytes: limit,
        }
        .into());
    }
    Ok(out)
}

/// Snappy as Kafka clients write it: xerial-framed chunks (Java) or one
/// raw block (librdkafka writes either).
fn snappy(data: &[u8], limit: usize) -> anyhow::Result<Vec<u8>> {
    let too_large = || RecordsError::TooLarge {
        codec: Compression::Snappy,
        limit_bytes: limit,
    };
    let mut decoder = snap::raw::Decoder::new();
    if !data.starts_with(XERIAL_MAGIC) {
        if snap::raw::decompress_len(data)? > limit {
            return Err(too_large().into());
        }
        return Ok(decoder.decompress_vec(data)?);
    }
    let mut rest = data
        .get(XERIAL_HEADER_BYTES..)
        .ok_or_else(|| anyhow::anyhow!("snappy: short xerial header"))?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| anyhow::anyhow!("snappy: short chunk length"))?;
        let len = u32::from_be_bytes(*len) as usize;
        let chunk = tail
            .get(..len)
            .ok_or_else(|| anyhow::anyhow!("snappy: chunk of {len} bytes is cut short"))?;
        if out.len() + snap::raw::decompress_len(chunk)? > limit {
            return Err(too_large().into());
        }
        out.extend_from_slice(&decoder.decompress_vec(chunk)?);
        rest = &tail[len..];
    }
    Ok(out)
}

/// Kafka records (one batch) as a Runnel batch.
fn to_runnel(records: &[KafkaRecord], now_ms: i64) -> Result<RecordBatch, RecordsError> {
    let first = records.first().ok_or(RecordsError::Invalid("no records".to_string()))?;
    let mut builder = BatchBuilder::new();
    if first.producer_id >= 0 {
        builder.set_producer(ProducerInfo {
            producer_id: first.producer_id,
            producer_epoch: first.producer_epoch,
            base_sequence: first.sequence,
        });
    }
    let mut headers: Vec<(&str, Option<&[u8]>)> = Vec::new();
    for record in records {
        headers.clear();
        headers.extend(record.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())));
        let timestamp_ms = if record.timestamp < 0 { now_ms } else { record.timestamp };
        builder
            .push_parts(timestamp_ms, record.key.as_deref(), record.value.as_deref(), &headers)
            .map_err(|e| RecordsError::Invalid(e.to_string()))?;
    }
    builder.build().map_err(|e| RecordsError::Invalid(e.to_string()))
}

/// Committed Runnel batches as Kafka record batches, leaving out records
/// before `from_offset`; stops before `max_bytes` once something is in.
pub fn fetched_batches(batches: &[RecordBatch], from_offset: u64, max_bytes: usize) -> anyhow::Result<Bytes> {
    let mut out = BytesMut::new();
    let mut records = Vec::new();
    for batch in batches {
        if !out.is_empty() && out.len() + batch.size_bytes() > max_bytes {
            break;
        }
        records.clear();
        kafka_records(batch, from_offset, &mut records)?;
        if records.is_empty() {
            continue;
        }
        let options = RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        };
        RecordBatchEncoder::encode(&mut out, records.iter(), &options)?;
    }
    Ok(out.freeze())
}

/// A Kafka record batch (v2) holding no record and spanning offsets
/// `[base_offset, next_offset)`: what a fetch answers when everything it
/// read there was emptied by log compaction. Clients move their position
/// past a batch's last offset (KAFKA-5443), so they do not ask for the same
/// offset again. Written by hand: the encoder makes no empty batch.
pub fn emptied_span(base_offset: u64, next_offset: u64) -> Bytes {
    const HEADER_BYTES: usize = 61;
    const CRC_FROM: usize = 21;
    let span = next_offset.saturating_sub(base_offset).clamp(1, i32::MAX as u64);
    let mut out = BytesMut::with_capacity(HEADER_BYTES);
    out.extend_from_slice(&(base_offset as i64).to_be_bytes());
    out.extend_from_slice(&((HEADER_BYTES - 12) as i32).to_be_bytes());
    out.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
    out.extend_from_slice(&[2]); // magic
    out.extend_from_slice(&[0; 4]); // CRC, below
    out.extend_from_slice(&0i16.to_be_bytes()); // attributes
    out.extend_from_slice(&((span - 1) as i32).to_be_bytes()); // last offset delta
    out.extend_from_slice(&(-1i64).to_be_bytes()); // first timestamp
    out.extend_from_slice(&(-1i64).to_be_bytes()); // max timestamp
    out.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    out.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
    out.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    out.extend_from_slice(&0i32.to_be_bytes()); // records
    debug_assert_eq!(out.len(), HEADER_BYTES);
    let crc = crc32c::crc32c(&out[CRC_FROM..]);
    out[17..CRC_FROM].copy_from_slice(&crc.to_be_bytes());
    out.freeze()
}

/// The records of one Runnel batch from `from_offset` on, as Kafka records.
/// Sequences keep `offset - sequence` constant, so the encoder writes them
/// as one Kafka batch whose base sequence is the producer's (or -1) — two
/// for a batch whose sequences wrap past i32::MAX to 0.
fn kafka_records(batch: &RecordBatch, from_offset: u64, out: &mut Vec<KafkaRecord>) -> anyhow::Result<()> {
    let header = batch.header();
    let producer = header.producer;
    let control = batch.is_control();
    let mut first_offset = None;
    for view in batch.views() {
        let view = view?;
        if view.offset < from_offset {
            continue;
        }
        let first = *first_offset.get_or_insert(view.offset);
        let sequence = if producer.producer_id >= 0 && producer.base_sequence >= 0 && !control {
            // After i32::MAX comes 0, as in Kafka.
            runnel_storage::sequence::sequence_add(producer.base_sequence, (view.offset - header.base_offset) as i64)
        } else {
            (view.offset - first) as i32 - 1
        };
        out.push(kafka_record(&view, producer, control, sequence));
    }
    Ok(())
}

fn kafka_record(
    view: &runnel_storage::RecordView<'_>,
    producer: ProducerInfo,
    control: bool,
    sequence: i32,
) -> KafkaRecord {
    let (key, value, headers) = if control {
        let key = Some(Bytes::from_static(&CONTROL_KEY));
        (key, Some(Bytes::from_static(&CONTROL_VALUE)), IndexMap::new())
    } else {
        let headers = view
            .headers()
            .map(|(k, v)| (StrBytes::from_string(k.to_string()), v.map(Bytes::copy_from_slice)))
            .collect();
        (
            view.key.map(Bytes::copy_from_slice),
            view.value.map(Bytes::copy_from_slice),
            headers,
        )
    };
    let (producer_id, producer_epoch) = if control {
        (-1, -1)
    } else {
        (producer.producer_id, producer.producer_epoch)
    };
    KafkaRecord {
        transactional: false,
        control,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id,
        producer_epoch,
        timestamp_type: TimestampType::Creation,
        offset: view.offset as i64,
        sequence,
        timestamp: view.timestamp_ms,
        key,
        value,
        headers,
    }
}

#[cfg(test)]
mod tests;
