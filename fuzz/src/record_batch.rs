//! Runnel's record batch (storage/src/batch.rs): what producers send, Raft
//! replicates and segments hold.

use runnel_storage::batch::{
    BATCH_HEADER_BYTES, CRC_START, LOG_OVERHEAD_BYTES, OFFSET_CRC, OFFSET_LENGTH, OFFSET_MAGIC,
};
use runnel_storage::RecordBatch;

pub fn run(data: &[u8]) {
    decode(data);
    decode(&with_valid_frame(data));
}

/// `data` with its length field, magic and CRC made right, so that decoding
/// goes past them to the records.
pub fn with_valid_frame(data: &[u8]) -> Vec<u8> {
    let mut bytes = data.to_vec();
    if bytes.len() < BATCH_HEADER_BYTES {
        return bytes;
    }
    let length = (bytes.len() - LOG_OVERHEAD_BYTES) as u32;
    bytes[OFFSET_LENGTH..OFFSET_LENGTH + 4].copy_from_slice(&length.to_le_bytes());
    bytes[OFFSET_MAGIC] = runnel_storage::batch::MAGIC_V1;
    let crc = crc32c::crc32c(&bytes[CRC_START..]);
    bytes[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    bytes
}

fn decode(bytes: &[u8]) {
    let Ok(batch) = RecordBatch::from_bytes(bytes.to_vec()) else {
        return;
    };
    assert_eq!(batch.size_bytes(), bytes.len());
    let mut decoded = 0u64;
    for view in batch.views() {
        let Ok(view) = view else { break };
        assert_eq!(
            view.offset,
            batch.base_offset() + decoded,
            "records are numbered in order"
        );
        let headers: Vec<_> = view.headers().collect();
        if let Some((name, value)) = headers.first() {
            assert_eq!(view.header(name), Some(*value), "the first header of a name is found");
        }
        decoded += 1;
    }
    let owned: Vec<_> = batch.records().collect();
    assert_eq!(owned.iter().filter(|r| r.is_ok()).count() as u64, decoded);
    assert!(decoded <= u64::from(batch.record_count()));
}
