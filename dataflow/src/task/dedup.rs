//! A stateful task reads each upstream record once, even if the
//! repartition topic holds it twice.
//!
//! An upstream task re-sends the output it produced after its last
//! checkpoint when it restores, with the same producer id and sequences; the
//! partition's leader recognises the retry from its table of idempotent
//! producers and does not write it again. That table is rebuilt from the
//! log when a replica opens, so once the repartition records a writer's
//! batches sat in are deleted ([`super::purge`]), a replica that reopened
//! since no longer knows that writer and takes its retry as new. The reader
//! closes that gap: it remembers, per upstream task, the next sequence it
//! expects (in its checkpoint, format 6), and skips records below it
//! (before it, as sequences wrap after i32::MAX:
//! [`runnel_storage::sequence`]).

use std::collections::BTreeMap;

use runnel_storage::sequence::{sequence_add, sequence_before};
use serde::{Deserialize, Serialize};

/// Per upstream task, the producer epoch and the next record sequence read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadSequences(BTreeMap<u32, (i16, i32)>);

impl ReadSequences {
    /// Whether upstream `task`'s record `sequence` (of producer epoch
    /// `epoch`) is new to this reader; a new one counts as read from now on.
    /// A record below the next expected sequence of its epoch, or of an
    /// older epoch, was read already (or belongs to a replaced generation).
    pub fn admit(&mut self, task: u32, epoch: i16, sequence: i32) -> bool {
        match self.0.get(&task) {
            Some(&(seen, next)) if seen == epoch && sequence_before(sequence, next) => false,
            Some(&(seen, _)) if seen > epoch => false,
            _ => {
                self.0.insert(task, (epoch, sequence_add(sequence, 1)));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_admitted_once_per_epoch_and_older_epochs_never() {
        let mut read = ReadSequences::default();
        assert!(read.admit(3, 0, 0));
        assert!(read.admit(3, 0, 1));
        assert!(!read.admit(3, 0, 0), "a retry");
        assert!(!read.admit(3, 0, 1), "a retry");
        assert!(read.admit(4, 0, 1), "another upstream's");
        assert!(read.admit(3, 0, 5), "a gap is not a retry");
        assert!(!read.admit(3, 0, 4));
        assert!(read.admit(3, 1, 0), "a new epoch starts over");
        assert!(!read.admit(3, 0, 9), "an older epoch's");
    }

    #[test]
    fn sequences_are_compared_across_their_wrap() {
        let mut read = ReadSequences::default();
        assert!(read.admit(1, 0, i32::MAX - 1));
        assert!(read.admit(1, 0, i32::MAX));
        assert!(read.admit(1, 0, 0), "after the largest comes 0");
        assert!(!read.admit(1, 0, i32::MAX), "a retry from before the wrap");
        assert!(!read.admit(1, 0, 0), "a retry after it");
        assert!(read.admit(1, 0, 1));
    }
}
