//! The Kafka listener's decoders (kafka/src/api/mod.rs, records.rs): any
//! request frame a client sends — routed by its header, answered
//! UNSUPPORTED_VERSION from the header alone, or decoded as the served
//! request — and produced record batches (Kafka's v2 format, with gzip,
//! snappy, lz4 and zstd, decompressed with a bound) rebuilt as Runnel
//! batches. Fetched batches go the other way: a Runnel batch encoded for
//! Kafka decodes to the same records.
//!
//! The first byte picks: a request frame, a produced batch with its length
//! and CRC made right, or a Runnel batch sent to a Kafka consumer.

use bytes::Bytes;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::Decodable;
use kafka_protocol::records::RecordBatchDecoder;
use runnel_kafka::api::{route, Route};
use runnel_kafka::records::{fetched_batches, produced_batch};
use runnel_storage::RecordBatch;

/// Kafka's batch header: base offset, length, leader epoch, magic, CRC.
const KAFKA_OFFSET_LENGTH: usize = 8;
const KAFKA_OFFSET_MAGIC: usize = 16;
const KAFKA_OFFSET_CRC: usize = 17;
const KAFKA_CRC_START: usize = 21;
const KAFKA_HEADER_BYTES: usize = 61;

pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => request(Bytes::copy_from_slice(rest)),
        1 => produced(rest),
        _ => fetched(rest),
    }
}

fn request(frame: Bytes) {
    let Ok(Route::Serve {
        api, version, mut body, ..
    }) = route(frame)
    else {
        return;
    };
    macro_rules! decode {
        ($t:ty) => {{
            let _ = <$t>::decode(&mut body, version);
        }};
    }
    match api {
        ApiKey::Produce => {
            let Ok(request) = ProduceRequest::decode(&mut body, version) else {
                return;
            };
            for topic in request.topic_data {
                for partition in topic.partition_data {
                    if let Some(records) = partition.records {
                        let _ = produced_batch(records, 0);
                    }
                }
            }
        }
        ApiKey::Fetch => decode!(FetchRequest),
        ApiKey::ListOffsets => decode!(ListOffsetsRequest),
        ApiKey::Metadata => decode!(MetadataRequest),
        ApiKey::ApiVersions => decode!(ApiVersionsRequest),
        ApiKey::CreateTopics => decode!(CreateTopicsRequest),
        ApiKey::DeleteTopics => decode!(DeleteTopicsRequest),
        ApiKey::InitProducerId => decode!(InitProducerIdRequest),
        ApiKey::FindCoordinator => decode!(FindCoordinatorRequest),
        ApiKey::JoinGroup => decode!(JoinGroupRequest),
        ApiKey::SyncGroup => decode!(SyncGroupRequest),
        ApiKey::Heartbeat => decode!(HeartbeatRequest),
        ApiKey::LeaveGroup => decode!(LeaveGroupRequest),
        ApiKey::OffsetCommit => decode!(OffsetCommitRequest),
        ApiKey::OffsetFetch => decode!(OffsetFetchRequest),
        ApiKey::ListGroups => decode!(ListGroupsRequest),
        ApiKey::DescribeGroups => decode!(DescribeGroupsRequest),
        ApiKey::DescribeConfigs => decode!(DescribeConfigsRequest),
        ApiKey::DeleteGroups => decode!(DeleteGroupsRequest),
        ApiKey::AlterConfigs => decode!(AlterConfigsRequest),
        ApiKey::CreatePartitions => decode!(CreatePartitionsRequest),
        ApiKey::IncrementalAlterConfigs => decode!(IncrementalAlterConfigsRequest),
        other => panic!("{other:?} was routed to be served but has no decoder here"),
    }
}

/// A produced batch, with its length, magic and CRC made right so that the
/// decoder reaches the (compressed) records.
fn produced(data: &[u8]) {
    let mut bytes = data.to_vec();
    if bytes.len() >= KAFKA_HEADER_BYTES {
        let length = (bytes.len() - 12) as i32;
        bytes[KAFKA_OFFSET_LENGTH..KAFKA_OFFSET_LENGTH + 4].copy_from_slice(&length.to_be_bytes());
        bytes[KAFKA_OFFSET_MAGIC] = 2;
        let crc = crc32c::crc32c(&bytes[KAFKA_CRC_START..]);
        bytes[KAFKA_OFFSET_CRC..KAFKA_OFFSET_CRC + 4].copy_from_slice(&crc.to_be_bytes());
    }
    let Ok(batch) = produced_batch(Bytes::from(bytes), 1_700_000_000_000) else {
        return;
    };
    assert!(batch.record_count() >= 1);
    for record in batch.records() {
        record.expect("a rebuilt batch decodes");
    }
}

/// A Runnel batch as a Kafka consumer fetches it decodes to its records.
fn fetched(data: &[u8]) {
    let Some((&from, rest)) = data.split_first() else {
        return;
    };
    let Ok(batch) = RecordBatch::from_bytes(crate::record_batch::with_valid_frame(rest)) else {
        return;
    };
    let Ok(records) = batch.records().collect::<Result<Vec<_>, _>>() else {
        return;
    };
    let from_offset = batch.base_offset().saturating_add(u64::from(from % 4));
    let Ok(mut encoded) = fetched_batches(std::slice::from_ref(&batch), from_offset, 1 << 20) else {
        return;
    };
    let mut decoded = Vec::new();
    while !encoded.is_empty() {
        let set = RecordBatchDecoder::decode(&mut encoded).expect("an encoded fetch decodes");
        decoded.extend(set.records);
    }
    let expected: Vec<_> = records.iter().filter(|r| r.offset >= from_offset).collect();
    if batch.is_control() {
        return;
    }
    assert_eq!(decoded.len(), expected.len(), "every record from the offset is fetched");
    for (kafka, ours) in decoded.iter().zip(expected) {
        assert_eq!(kafka.offset as u64, ours.offset);
        assert_eq!(kafka.timestamp, ours.record.timestamp_ms);
        assert_eq!(kafka.key, ours.record.key);
        assert_eq!(kafka.value, ours.record.value);
        // kafka-protocol holds headers in a map: names repeated in one
        // record collapse to one (a limit of the crate, see README).
        let names: std::collections::BTreeSet<&str> = ours.record.headers.iter().map(|h| h.key.as_str()).collect();
        assert_eq!(kafka.headers.len(), names.len());
    }
}
