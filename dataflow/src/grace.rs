//! The stream side's grace buffer of a join by event time (Kafka Streams'
//! stream–table join grace period, KIP-923).
//!
//! A source task whose stage joins a table by event time with a grace
//! period holds its input records, in event-time order, until its stream
//! time (the greatest event time it has read) is `grace_ms` past theirs,
//! and only then runs them (decode, join, emit). A table row dated before a
//! stream record but read a little after it is then still joined, as long
//! as it arrives within the grace.
//!
//! Exactly-once: what is released when depends only on the input, so a
//! replay releases the same records in the same order; the held records
//! are part of the task's checkpoint. Memory is bounded: past
//! [`GRACE_RECORDS_MAX`] records or [`GRACE_BYTES_MAX`] bytes the oldest
//! are released early (joined as of what the task has read so far).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Records one task holds at most.
pub const GRACE_RECORDS_MAX: usize = 50_000;
/// Bytes of keys and values one task holds at most (so that a checkpoint
/// holding them stays one batch).
pub const GRACE_BYTES_MAX: usize = 4 << 20;
/// What a held record costs beyond its key and value.
const HELD_OVERHEAD_BYTES: usize = 48;

/// One input record held until its time is past the grace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub event_ms: i64,
    /// Its input offset: the tie-break between equal times, and its place
    /// in a dead letter.
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<ByteBuf>,
    pub value: Option<ByteBuf>,
}

impl Held {
    fn bytes(&self) -> usize {
        let len = |b: &Option<ByteBuf>| b.as_ref().map_or(0, |b| b.len());
        len(&self.key) + len(&self.value) + HELD_OVERHEAD_BYTES
    }
}

/// The records a task holds, by (event time, offset).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraceBuffer {
    grace_ms: i64,
    /// The greatest event time read (`i64::MIN` before any).
    stream_time_ms: i64,
    held: BTreeMap<(i64, u64), Held>,
    bytes: usize,
}

impl GraceBuffer {
    pub fn new(grace_ms: i64) -> GraceBuffer {
        assert!(grace_ms >= 0, "a validated grace");
        GraceBuffer {
            grace_ms,
            stream_time_ms: i64::MIN,
            held: BTreeMap::new(),
            bytes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn grace_ms(&self) -> i64 {
        self.grace_ms
    }

    /// The same records, held for `grace_ms` from now on.
    pub fn with_grace_ms(self, grace_ms: i64) -> GraceBuffer {
        assert!(grace_ms >= 0, "a validated grace");
        GraceBuffer { grace_ms, ..self }
    }

    /// The greatest event time read.
    pub fn stream_time_ms(&self) -> i64 {
        self.stream_time_ms
    }

    /// Holds `held` and moves the stream time on.
    pub fn push(&mut self, held: Held) {
        self.stream_time_ms = self.stream_time_ms.max(held.event_ms);
        self.bytes += held.bytes();
        if let Some(old) = self.held.insert((held.event_ms, held.offset), held) {
            // The same input offset read twice: one record, held once.
            self.bytes -= old.bytes();
        }
    }

    /// The records due, oldest first: those the stream time is the grace
    /// past, then the oldest while more than the bounds are held.
    pub fn release(&mut self) -> Vec<Held> {
        let due_to = self.stream_time_ms.saturating_sub(self.grace_ms);
        let mut released = Vec::new();
        loop {
            let over = self.held.len() > GRACE_RECORDS_MAX || self.bytes > GRACE_BYTES_MAX;
            let Some(entry) = self.held.first_entry() else { break };
            if entry.key().0 > due_to && !over {
                break;
            }
            let held = entry.remove();
            self.bytes -= held.bytes();
            released.push(held);
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(event_ms: i64, offset: u64, value_bytes: usize) -> Held {
        Held {
            event_ms,
            offset,
            timestamp_ms: 0,
            key: None,
            value: Some(ByteBuf::from(vec![b'x'; value_bytes])),
        }
    }

    fn times(released: &[Held]) -> Vec<(i64, u64)> {
        released.iter().map(|h| (h.event_ms, h.offset)).collect()
    }

    #[test]
    fn records_leave_in_time_order_once_the_stream_time_is_the_grace_past_them() {
        let mut buffer = GraceBuffer::new(1_000);
        buffer.push(held(5_000, 0, 1));
        buffer.push(held(4_500, 1, 1));
        assert!(buffer.release().is_empty(), "stream time 5,000: nothing is 1 s old");
        buffer.push(held(5_600, 2, 1));
        assert_eq!(times(&buffer.release()), [(4_500, 1)]);
        buffer.push(held(3_000, 3, 1)); // older than the grace: due at once
        buffer.push(held(5_000, 4, 1));
        assert_eq!(times(&buffer.release()), [(3_000, 3)]);
        buffer.push(held(7_000, 5, 1));
        assert_eq!(times(&buffer.release()), [(5_000, 0), (5_000, 4), (5_600, 2)]);
        assert_eq!((buffer.len(), buffer.stream_time_ms()), (1, 7_000));
        let copy: GraceBuffer =
            postcard::from_bytes(&postcard::to_allocvec(&buffer).expect("encodes")).expect("decodes");
        assert_eq!(copy, buffer, "a checkpoint holds it whole");
    }

    #[test]
    fn past_its_bounds_the_oldest_records_leave_early() {
        let mut buffer = GraceBuffer::new(i64::MAX);
        let each = GRACE_BYTES_MAX / 4;
        for offset in 0..5 {
            buffer.push(held(100 - offset as i64, offset, each));
        }
        let released = buffer.release();
        assert_eq!(times(&released), [(96, 4), (97, 3)], "down to the byte bound");
        assert!(buffer.bytes <= GRACE_BYTES_MAX);
        let mut buffer = GraceBuffer::new(i64::MAX);
        for offset in 0..=GRACE_RECORDS_MAX as u64 {
            buffer.push(held(0, offset, 0));
        }
        assert_eq!(times(&buffer.release()), [(0, 0)], "down to the record bound");
    }
}
