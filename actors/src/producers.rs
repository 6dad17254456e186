//! The idempotent-producer table of one partition replica.
//!
//! A producer stamps each batch with its producer id and the sequence number
//! of its first record (sequences count records per partition from 0, and
//! after `i32::MAX` from 0 again, as Kafka's: [`runnel_storage::sequence`]). The
//! table remembers, per producer, the last few batches in this replica's log
//! — committed or not — so a leader can tell a retry (same id and sequence)
//! from a new batch, and a gap from a duplicate. It is rebuilt from batch
//! headers when the replica opens and whenever its log tail is truncated, so
//! it always describes exactly what the log holds.

use std::collections::{HashMap, VecDeque};

use runnel_storage::sequence::{sequence_add, sequence_before};
use runnel_storage::{BatchHeader, ProducerInfo};

/// Batches remembered per producer (a producer may have this many in flight).
pub const RECENT_BATCHES: usize = 5;
/// Producers remembered per partition; the least recently written go first.
pub const PRODUCERS_MAX: usize = 10_000;

/// One batch of a producer, where the log holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducedBatch {
    pub base_sequence: i32,
    pub last_sequence: i32,
    pub index: u64,
    pub base_offset: u64,
}

#[derive(Clone, Debug, Default)]
struct ProducerEntry {
    epoch: i16,
    recent: VecDeque<ProducedBatch>,
}

/// What to do with a new batch from an idempotent producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Not seen: propose it.
    New,
    /// Already in the log: answer with where it is.
    Duplicate(ProducedBatch),
    /// A sequence beyond the next expected one: records are missing.
    Gap { expected: i32, got: i32 },
    /// Older than what is remembered. `index` is where the producer's
    /// newest batch (ending at `last_sequence`) is.
    Stale { last_sequence: i32, index: u64 },
    /// From an epoch older than the producer's newest (`newest_epoch`,
    /// whose newest batch is at `index`): a fenced producer.
    Fenced { newest_epoch: i16, index: u64 },
    /// The same first sequence as a stored batch (at `index`, ending at
    /// `last_sequence`) but a different length: the producer reused sequence
    /// numbers, or a deterministic producer batched its records differently.
    Mismatch { last_sequence: i32, index: u64 },
    /// A producer this replica does not remember (never seen, or evicted)
    /// sending a batch that does not start its sequence: dedupe is impossible.
    UnknownProducer,
}

#[derive(Clone, Debug, Default)]
pub struct ProducerTable {
    producers: HashMap<i64, ProducerEntry>,
    /// Whether a producer was ever forgotten to make room
    /// ([`PRODUCERS_MAX`]): then an unknown producer may be one whose
    /// batches are still in the log.
    evicted: bool,
}

impl ProducerTable {
    /// Records a batch appended at Raft `index` (no-op for batches without a
    /// producer).
    pub fn record(&mut self, header: &BatchHeader, index: u64) {
        let producer = header.producer;
        if producer.producer_id < 0 || producer.base_sequence < 0 {
            return;
        }
        if !self.producers.contains_key(&producer.producer_id) && self.producers.len() >= PRODUCERS_MAX {
            self.evict_oldest();
        }
        let entry = self.producers.entry(producer.producer_id).or_default();
        if producer.producer_epoch > entry.epoch {
            entry.recent.clear();
        }
        entry.epoch = producer.producer_epoch.max(entry.epoch);
        entry.recent.push_back(ProducedBatch {
            base_sequence: producer.base_sequence,
            last_sequence: sequence_add(producer.base_sequence, i64::from(header.record_count) - 1),
            index,
            base_offset: header.base_offset,
        });
        while entry.recent.len() > RECENT_BATCHES {
            entry.recent.pop_front();
        }
    }

    fn evict_oldest(&mut self) {
        let oldest = self
            .producers
            .iter()
            .min_by_key(|(_, e)| e.recent.back().map_or(0, |b| b.index))
            .map(|(&id, _)| id);
        if let Some(id) = oldest {
            self.producers.remove(&id);
            self.evicted = true;
        }
    }

    /// Whether this table forgot a producer to make room (see `evicted`).
    pub fn evicted(&self) -> bool {
        self.evicted
    }

    /// Classifies a batch about to be proposed.
    pub fn check(&self, producer: &ProducerInfo, record_count: u32) -> SequenceCheck {
        let Some(entry) = self.producers.get(&producer.producer_id) else {
            // A producer's first batch on this partition starts at 0; a later
            // one means the table forgot it, and accepting it could write a
            // retry twice. (After 2^31 records a producer's sequences pass 0
            // again: a forgotten producer's retry of exactly that batch
            // would be taken as new, as in Kafka.)
            return if producer.base_sequence == 0 {
                SequenceCheck::New
            } else {
                SequenceCheck::UnknownProducer
            };
        };
        let newest = entry.recent.back();
        let (last_sequence, newest_index) = newest.map_or((-1, 0), |b| (b.last_sequence, b.index));
        if producer.producer_epoch < entry.epoch {
            return SequenceCheck::Fenced {
                newest_epoch: entry.epoch,
                index: newest_index,
            };
        }
        if producer.producer_epoch > entry.epoch {
            return SequenceCheck::New;
        }
        if let Some(batch) = entry.recent.iter().find(|b| b.base_sequence == producer.base_sequence) {
            let last_sequence = sequence_add(producer.base_sequence, i64::from(record_count) - 1);
            if batch.last_sequence != last_sequence {
                return SequenceCheck::Mismatch {
                    last_sequence: batch.last_sequence,
                    index: batch.index,
                };
            }
            return SequenceCheck::Duplicate(*batch);
        }
        // After none (-1) comes 0; after i32::MAX, 0 again.
        let expected = sequence_add(last_sequence.max(0), i64::from(newest.is_some()));
        if producer.base_sequence == expected {
            SequenceCheck::New
        } else if sequence_before(expected, producer.base_sequence) {
            SequenceCheck::Gap {
                expected,
                got: producer.base_sequence,
            }
        } else {
            SequenceCheck::Stale {
                last_sequence,
                index: newest_index,
            }
        }
    }

    /// Forgets every producer (a snapshot replaced the log): the table
    /// describes the new, empty log.
    pub fn clear(&mut self) {
        self.producers.clear();
        self.evicted = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(producer_id: i64, base_sequence: i32, count: u32, base_offset: u64) -> BatchHeader {
        BatchHeader {
            base_offset,
            batch_length: 0,
            raft_term: 1,
            magic: 1,
            crc: 0,
            attributes: 0,
            record_count: count,
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
            producer: ProducerInfo {
                producer_id,
                producer_epoch: 0,
                base_sequence,
            },
        }
    }

    fn info(producer_id: i64, base_sequence: i32) -> ProducerInfo {
        ProducerInfo {
            producer_id,
            producer_epoch: 0,
            base_sequence,
        }
    }

    #[test]
    fn new_duplicate_gap_and_stale() {
        let mut table = ProducerTable::default();
        assert_eq!(table.check(&info(7, 0), 10), SequenceCheck::New);
        table.record(&header(7, 0, 10, 100), 1);
        table.record(&header(7, 10, 5, 110), 2);
        assert_eq!(table.check(&info(7, 15), 1), SequenceCheck::New);
        assert_eq!(
            table.check(&info(7, 10), 3),
            SequenceCheck::Mismatch {
                last_sequence: 14,
                index: 2
            }
        );
        match table.check(&info(7, 10), 5) {
            SequenceCheck::Duplicate(batch) => assert_eq!((batch.index, batch.base_offset), (2, 110)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            table.check(&info(7, 20), 1),
            SequenceCheck::Gap { expected: 15, got: 20 }
        );
        for i in 0..RECENT_BATCHES as i32 {
            table.record(&header(7, 15 + i, 1, 200 + i as u64), 3 + i as u64);
        }
        assert_eq!(
            table.check(&info(7, 0), 10),
            SequenceCheck::Stale {
                last_sequence: 19,
                index: 3 + RECENT_BATCHES as u64 - 1
            }
        );
        assert_eq!(
            table.check(&info(8, 0), 1),
            SequenceCheck::New,
            "another producer is independent"
        );
        assert_eq!(table.check(&info(9, 30), 1), SequenceCheck::UnknownProducer);
    }

    /// A batch of an epoch older than the producer's newest is fenced, not
    /// stale: Kafka clients must not take it for written.
    #[test]
    fn an_older_epoch_is_fenced() {
        let mut table = ProducerTable::default();
        let mut newer = header(7, 0, 2, 0);
        newer.producer.producer_epoch = 3;
        table.record(&newer, 4);
        assert_eq!(
            table.check(&info(7, 2), 1),
            SequenceCheck::Fenced {
                newest_epoch: 3,
                index: 4
            }
        );
    }

    /// Sequences go on from 0 after i32::MAX (as Kafka's): a batch across
    /// the wrap ends at its wrapped sequence, the next starts after it, and
    /// a retry, a gap and a stale batch are told apart across it.
    #[test]
    fn sequences_wrap_after_the_largest() {
        let mut table = ProducerTable::default();
        // As if it had written 2^31 − 4 records before.
        table.record(&header(7, i32::MAX - 4, 3, 0), 2);
        assert_eq!(table.check(&info(7, i32::MAX - 1), 3), SequenceCheck::New);
        table.record(&header(7, i32::MAX - 1, 3, 500), 3);
        assert_eq!(table.check(&info(7, 1), 1), SequenceCheck::New, "after the wrap");
        match table.check(&info(7, i32::MAX - 1), 3) {
            SequenceCheck::Duplicate(batch) => assert_eq!((batch.last_sequence, batch.base_offset), (0, 500)),
            other => panic!("{other:?}"),
        }
        assert_eq!(table.check(&info(7, 4), 1), SequenceCheck::Gap { expected: 1, got: 4 });
        assert_eq!(
            table.check(&info(7, i32::MAX - 9), 1),
            SequenceCheck::Stale {
                last_sequence: 0,
                index: 3
            }
        );
    }

    /// A full table forgets its least recently written producer, and says
    /// so from then on (until it is cleared for a new log).
    #[test]
    fn a_full_table_forgets_the_oldest_producer_and_remembers_that_it_did() {
        let mut table = ProducerTable::default();
        for id in 0..PRODUCERS_MAX as i64 {
            table.record(&header(id, 0, 1, id as u64), id as u64 + 1);
        }
        assert!(!table.evicted());
        let newcomer = PRODUCERS_MAX as i64;
        table.record(&header(newcomer, 0, 1, 0), newcomer as u64 + 1);
        assert!(table.evicted());
        assert_eq!(
            table.check(&info(0, 1), 1),
            SequenceCheck::UnknownProducer,
            "0 was forgotten"
        );
        assert_eq!(table.check(&info(1, 1), 1), SequenceCheck::New, "1 is remembered");
        table.clear();
        assert!(!table.evicted());
    }
}
