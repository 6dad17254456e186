//! Record batches both ways, every codec, and batches that must be refused
//! by name: two batches, a record count the bytes cannot hold, a bad CRC, a
//! decompression bomb, a transactional batch.

use std::io::Write;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record as KafkaRecord, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use proptest::prelude::*;
use runnel_storage::{BatchBuilder, ProducerInfo, RecordBatch};

use super::*;

fn record(i: i64, producer_id: i64) -> KafkaRecord {
    let mut headers = IndexMap::new();
    headers.insert(StrBytes::from_static_str("h"), Some(Bytes::from(format!("x{i}"))));
    KafkaRecord {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id,
        producer_epoch: if producer_id >= 0 { 0 } else { -1 },
        timestamp_type: TimestampType::Creation,
        offset: i,
        // As clients write them: the encoder keeps `offset - sequence` constant
        // within a batch, and a batch without a producer has base sequence -1.
        sequence: if producer_id >= 0 { 10 + i as i32 } else { i as i32 - 1 },
        timestamp: 1_700_000_000_000 + i,
        key: Some(Bytes::from(format!("k{i}"))),
        value: (i != 3).then(|| Bytes::from(format!("value-{i}"))),
        headers,
    }
}

/// Compresses as Kafka clients do: gzip, raw snappy, lz4 frames, zstd.
fn compress(records: &mut BytesMut, out: &mut BytesMut, codec: Compression) -> anyhow::Result<()> {
    let bytes = match codec {
        Compression::None => records.to_vec(),
        Compression::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(records)?;
            encoder.finish()?
        }
        Compression::Snappy => snap::raw::Encoder::new().compress_vec(records)?,
        Compression::Lz4 => {
            let mut encoder = lz4_flex::frame::FrameEncoder::new(Vec::new());
            encoder.write_all(records)?;
            encoder.finish()?
        }
        Compression::Zstd => {
            ruzstd::encoding::compress_to_vec(&records[..], ruzstd::encoding::CompressionLevel::Fastest)
        }
    };
    out.put_slice(&bytes);
    Ok(())
}

fn kafka_batch(records: &[KafkaRecord], codec: Compression) -> Bytes {
    let mut out = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: codec,
    };
    RecordBatchEncoder::encode_with_custom_compression(&mut out, records.iter(), &options, Some(compress))
        .expect("encodes");
    out.freeze()
}

#[test]
fn a_batch_in_every_codec_becomes_the_same_runnel_batch_and_reads_back_at_its_offsets() {
    let records: Vec<KafkaRecord> = (0..50).map(|i| record(i, 77)).collect();
    for codec in [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ] {
        let mut batch = produced_batch(kafka_batch(&records, codec), 0).expect("accepted");
        assert_eq!(batch.record_count(), 50, "{codec:?}");
        let producer = batch.header().producer;
        assert_eq!((producer.producer_id, producer.base_sequence), (77, 10), "{codec:?}");
        batch.set_base_offset(1000);
        let mut fetched = fetched_batches(&[batch], 1010, 1 << 20).expect("encodes");
        let back = RecordBatchDecoder::decode_all(&mut fetched).expect("decodes");
        let back: Vec<&KafkaRecord> = back.iter().flat_map(|set| &set.records).collect();
        assert_eq!(back.len(), 40, "records before offset 1010 are left out");
        for r in &back {
            let i = r.offset - 1000;
            assert_eq!(r.key, records[i as usize].key, "{codec:?}");
            assert_eq!(
                r.value, records[i as usize].value,
                "{codec:?} (record 3 is a tombstone)"
            );
            assert_eq!(r.headers, records[i as usize].headers);
            assert_eq!(
                (r.timestamp, r.producer_id, r.sequence),
                (1_700_000_000_000 + i, 77, 10 + i as i32)
            );
        }
    }
}

#[test]
fn records_without_a_producer_or_timestamp_are_stamped_and_fetched_as_one_kafka_batch() {
    let mut records: Vec<KafkaRecord> = (0..20).map(|i| record(i, -1)).collect();
    records[0].timestamp = -1;
    let mut batch = produced_batch(kafka_batch(&records, Compression::None), 42).expect("accepted");
    assert_eq!(batch.header().producer, ProducerInfo::NONE);
    assert_eq!(batch.views().next().expect("one").expect("ok").timestamp_ms, 42);
    batch.set_base_offset(5);
    let mut fetched = fetched_batches(&[batch], 9, 1 << 20).expect("encodes");
    let infos = RecordBatchDecoder::decode_batch_info(&mut fetched.clone()).expect("headers");
    assert_eq!(infos.len(), 1, "one Kafka batch, not one per record");
    assert_eq!(
        (infos[0].min_offset, infos[0].base_sequence, infos[0].producer_id),
        (9, -1, -1)
    );
    assert_eq!(
        RecordBatchDecoder::decode(&mut fetched).expect("decodes").records.len(),
        16
    );
}

#[test]
fn a_runnel_control_batch_reaches_kafka_clients_as_a_control_batch_at_its_offset() {
    let mut builder = BatchBuilder::new().attributes(runnel_storage::batch::ATTRIBUTE_CONTROL);
    builder
        .push_parts(1, None, Some(b"raft configuration"), &[])
        .expect("push");
    let mut control = builder.build().expect("builds");
    control.set_base_offset(7);
    let mut fetched = fetched_batches(&[control], 0, 1 << 20).expect("encodes");
    let set = RecordBatchDecoder::decode(&mut fetched).expect("decodes");
    let r = &set.records[0];
    assert!(r.control && r.offset == 7, "{r:?}");
    assert_eq!(
        r.key.as_deref(),
        Some(&[0u8, 0, 0, 1][..]),
        "a COMMIT marker, which commits nothing"
    );
}

#[test]
fn refused_batches_name_the_problem() {
    let one = kafka_batch(&[record(0, -1)], Compression::None);
    let mut two = BytesMut::from(&one[..]);
    two.extend_from_slice(&one);
    let refused = produced_batch(two.freeze(), 0).expect_err("two batches");
    assert!(refused.to_string().contains("exactly one per partition"), "{refused}");

    let mut flipped = BytesMut::from(&one[..]);
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    let refused = produced_batch(flipped.freeze(), 0).expect_err("crc");
    assert!(
        refused.to_string().contains("Cyclic redundancy check failed"),
        "{refused}"
    );

    let mut transactional = record(0, 5);
    transactional.transactional = true;
    let refused = produced_batch(kafka_batch(&[transactional], Compression::None), 0).expect_err("transactional");
    assert_eq!(refused, RecordsError::Transactional);

    let refused = produced_batch(Bytes::from_static(b"not a batch"), 0).expect_err("garbage");
    assert!(matches!(refused, RecordsError::Corrupt(_)), "{refused}");
}

/// Sets a batch's claimed record count and fixes its CRC, as a hostile
/// client would.
fn with_record_count(batch: &Bytes, count: i32) -> Bytes {
    let mut bytes = BytesMut::from(&batch[..]);
    bytes[57..61].copy_from_slice(&count.to_be_bytes());
    let crc = crc32c::crc32c(&bytes[21..]);
    bytes[17..21].copy_from_slice(&crc.to_be_bytes());
    bytes.freeze()
}

#[test]
fn a_record_count_the_bytes_cannot_hold_is_refused_before_anything_is_reserved() {
    let batch = kafka_batch(&[record(0, -1)], Compression::None);
    let refused = produced_batch(with_record_count(&batch, i32::MAX), 0).expect_err("claims 2^31 records");
    assert!(
        matches!(refused, RecordsError::TooManyRecords { claimed: i32::MAX, .. }),
        "{refused}"
    );
    let compressed = kafka_batch(&[record(0, -1)], Compression::Gzip);
    let refused = produced_batch(with_record_count(&compressed, BATCH_RECORDS_MAX + 1), 0).expect_err("too many");
    assert!(
        refused.to_string().contains("more than the bytes or the limit allow"),
        "{refused}"
    );
}

#[test]
fn a_decompression_bomb_is_refused_at_the_limit() {
    let zeros = vec![0u8; DECOMPRESSED_BYTES_MAX + 1024];
    for codec in [
        Compression::Gzip,
        Compression::Lz4,
        Compression::Zstd,
        Compression::Snappy,
    ] {
        let mut input = BytesMut::from(&zeros[..]);
        let mut compressed = BytesMut::new();
        compress(&mut input, &mut compressed, codec).expect("compresses");
        let error = decompress(&mut compressed.freeze(), codec).expect_err("bomb");
        assert!(
            error.to_string().contains("decompresses to more than"),
            "{codec:?}: {error:#}"
        );
    }
}

#[test]
fn xerial_framed_snappy_as_java_clients_write_it_decompresses() {
    let data = b"hello hello hello kafka".repeat(100);
    let mut framed = Vec::from(XERIAL_MAGIC);
    framed.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
    for chunk in data.chunks(1000) {
        let block = snap::raw::Encoder::new().compress_vec(chunk).expect("compresses");
        framed.extend_from_slice(&(block.len() as u32).to_be_bytes());
        framed.extend_from_slice(&block);
    }
    let out = decompress(&mut Bytes::from(framed), Compression::Snappy).expect("decompresses");
    assert_eq!(&out[..], &data[..]);
}

#[test]
fn a_fetch_answer_stops_at_max_bytes_but_always_holds_the_first_batch() {
    let batches: Vec<RecordBatch> = (0..4)
        .map(|b| {
            let mut batch = produced_batch(kafka_batch(&[record(0, -1)], Compression::None), 0).expect("batch");
            batch.set_base_offset(b);
            batch
        })
        .collect();
    let one = fetched_batches(&batches, 0, 1).expect("encodes");
    assert_eq!(
        RecordBatchDecoder::decode_batch_info(&mut one.clone())
            .expect("ok")
            .len(),
        1
    );
    let all = fetched_batches(&batches, 0, 1 << 20).expect("encodes");
    assert_eq!(
        RecordBatchDecoder::decode_batch_info(&mut all.clone())
            .expect("ok")
            .len(),
        4
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Garbage, and a valid batch with bytes flipped (its CRC then fixed, as
    /// a hostile client would), are refused or taken, never a panic.
    #[test]
    fn garbage_batches_never_panic(
        garbage in proptest::collection::vec(any::<u8>(), 0..300),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        codec in 0..5usize,
    ) {
        let _ = produced_batch(Bytes::from(garbage), 0);
        let codecs = [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];
        let batch = kafka_batch(&(0..5).map(|i| record(i, 3)).collect::<Vec<_>>(), codecs[codec]);
        let mut bytes = BytesMut::from(&batch[..]);
        for (at, value) in flips {
            let at = 21 + at % (bytes.len() - 21);
            bytes[at] ^= value;
        }
        let crc = crc32c::crc32c(&bytes[21..]);
        bytes[17..21].copy_from_slice(&crc.to_be_bytes());
        let _ = produced_batch(bytes.freeze(), 0);
    }
}

/// An emptied span decodes as a Kafka batch of no record whose last offset
/// is the span's, with a valid CRC.
#[test]
fn an_emptied_span_is_a_valid_batch_of_no_record() {
    let mut span = emptied_span(1000, 1250);
    let infos = RecordBatchDecoder::decode_batch_info(&mut span.clone()).expect("a batch header");
    assert_eq!(infos.len(), 1);
    assert_eq!(span.len(), 61);
    assert_eq!(i64::from_be_bytes(span[0..8].try_into().expect("8")), 1000);
    assert_eq!(
        i32::from_be_bytes(span[23..27].try_into().expect("4")),
        249,
        "last offset delta"
    );
    let crc = u32::from_be_bytes(span[17..21].try_into().expect("4"));
    assert_eq!(crc, crc32c::crc32c(&span[21..]));
    let decoded = RecordBatchDecoder::decode_all(&mut span).expect("decodes");
    assert!(decoded.iter().all(|set| set.records.is_empty()));
}
