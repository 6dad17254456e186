//! A stream–stream join's held records as changelog entries (see
//! [`crate::changelog`]): each held record is one entry, keyed `j` + its
//! arrival sequence + its time + its side + the join key (all fixed for the
//! record's life, so a tombstone says which record leaves), valued by its
//! payload and whether it had matched when written. A record that first
//! matches after that gets a small entry of its own, keyed `m` + the same,
//! rather than its payload written again: one record may match thousands.
//! The buffers note which records changed since the last checkpoint:
//! added, first matched, or let go.
//!
//! Numbers in entry keys are 8 bytes big-endian; values are postcard.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Held, JoinBuffers, Side, JOIN_HELD_RECORDS_MAX};
use crate::builder::{Change, StageError, StateStore};

const HELD_TAG: u8 = b'j';
const MATCHED_TAG: u8 = b'm';
/// What an entry costs beyond its key and payload, about.
const ENTRY_OVERHEAD_BYTES: usize = 48;

/// Where a held record is: its join key, side and time.
type Locator = (Vec<u8>, Side, i64);

/// The records changed since the last checkpoint, by arrival sequence,
/// and about what their entries take.
#[derive(Default)]
pub(super) struct Changes {
    /// Records added since (their entries to write whole).
    records: BTreeMap<u64, Locator>,
    /// Records written before that first matched since.
    matched: BTreeMap<u64, Locator>,
    bytes: usize,
    /// Entries of records released since the last checkpoint, and those a
    /// written checkpoint made obsolete: their tombstones go after it (see
    /// [`StateStore::take_obsolete`]).
    releasing: Vec<Vec<u8>>,
    obsolete: BTreeSet<Vec<u8>>,
}

impl Changes {
    /// Notes that the record `seq` changed (`payload_bytes`: about its
    /// payload's size; counted once per checkpoint).
    pub(super) fn note(&mut self, seq: u64, key: &[u8], side: Side, t_ms: i64, payload_bytes: usize) {
        if let std::collections::btree_map::Entry::Vacant(entry) = self.records.entry(seq) {
            entry.insert((key.to_vec(), side, t_ms));
            self.bytes += key.len() + payload_bytes + ENTRY_OVERHEAD_BYTES;
        }
    }

    /// Notes that the record `seq` first matched: its entry says so if
    /// it is yet to be written, else a small entry of its own does.
    pub(super) fn note_matched(&mut self, seq: u64, key: &[u8], side: Side, t_ms: i64) {
        if self.records.contains_key(&seq) {
            return;
        }
        if let std::collections::btree_map::Entry::Vacant(entry) = self.matched.entry(seq) {
            entry.insert((key.to_vec(), side, t_ms));
            self.bytes += key.len() + ENTRY_OVERHEAD_BYTES;
        }
    }
}

/// A held record's entry value.
#[derive(Serialize, Deserialize)]
struct Entry<P> {
    payload: P,
    matched: bool,
}

fn entry_key(seq: u64, locator: &Locator) -> Vec<u8> {
    tagged_key(HELD_TAG, seq, locator)
}

fn tagged_key(tag: u8, seq: u64, (key, side, t_ms): &Locator) -> Vec<u8> {
    let mut entry = Vec::with_capacity(18 + key.len());
    entry.push(tag);
    entry.extend_from_slice(&seq.to_be_bytes());
    entry.extend_from_slice(&t_ms.to_be_bytes());
    entry.push(side.index() as u8);
    entry.extend_from_slice(key);
    entry
}

/// An entry key's tag, sequence and locator.
fn parse_key(entry: &[u8]) -> Option<(u8, u64, Locator)> {
    let (&tag, rest) = entry.split_first()?;
    if !matches!(tag, HELD_TAG | MATCHED_TAG) || rest.len() < 17 {
        return None;
    }
    let seq = u64::from_be_bytes(rest[..8].try_into().ok()?);
    let t_ms = i64::from_be_bytes(rest[8..16].try_into().ok()?);
    let side = match rest[16] {
        0 => Side::Left,
        1 => Side::Right,
        _ => return None,
    };
    Some((tag, seq, (rest[17..].to_vec(), side, t_ms)))
}

fn corrupt(why: String) -> StageError {
    StageError::Corrupt(format!("join changelog entry: {why}"))
}

impl<P: Clone + Serialize + DeserializeOwned> JoinBuffers<P> {
    /// Buffers keeping their records as changelog entries: their snapshots
    /// hold none, and their [`StateStore`] says what changed.
    pub fn logged(window: super::JoinWindow, kind: runnel_client::plan::JoinKind) -> JoinBuffers<P> {
        let mut buffers = JoinBuffers::new(window, kind);
        buffers.changes = Some(Changes::default());
        buffers
    }

    /// Notes that the record `seq` was released: not a change for the next
    /// checkpoint's batch, but an entry that checkpoint makes obsolete.
    pub(super) fn note_released(&mut self, seq: u64, key: &[u8], side: Side, t_ms: i64, matched: bool) {
        if let Some(changes) = &mut self.changes {
            changes.records.remove(&seq);
            changes.matched.remove(&seq);
            let locator = (key.to_vec(), side, t_ms);
            changes.releasing.push(entry_key(seq, &locator));
            if matched {
                changes.releasing.push(tagged_key(MATCHED_TAG, seq, &locator));
            }
        }
    }

    /// Notes that the record `seq` changed, if the buffers keep a log.
    pub(super) fn note_change(&mut self, seq: u64, key: &[u8], side: Side, t_ms: i64, payload: &P) {
        if let Some(changes) = &mut self.changes {
            let bytes = postcard::experimental::serialized_size(payload).unwrap_or(0);
            changes.note(seq, key, side, t_ms, bytes);
        }
    }
}

impl<P> StateStore for JoinBuffers<P>
where
    P: Clone + Serialize + DeserializeOwned + Send + Sync,
{
    fn changes(&self) -> Result<Vec<Change>, StageError> {
        let Some(changes) = &self.changes else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(changes.records.len());
        for (&seq, locator) in &changes.records {
            let (key, side, t_ms) = locator;
            let held = self.held.get(key).and_then(|h| h[side.index()].get(&(*t_ms, seq)));
            let value = match held {
                Some(held) => {
                    let entry = Entry {
                        payload: &held.payload,
                        matched: held.matched,
                    };
                    Some(postcard::to_allocvec(&entry).map_err(|e| StageError::Unencodable(e.to_string()))?)
                }
                None => None,
            };
            out.push((entry_key(seq, locator), value));
        }
        for (&seq, locator) in &changes.matched {
            out.push((tagged_key(MATCHED_TAG, seq, locator), Some(vec![1])));
        }
        Ok(out)
    }

    fn changes_written(&mut self) {
        if let Some(changes) = &mut self.changes {
            changes.records.clear();
            changes.matched.clear();
            changes.bytes = 0;
            changes.obsolete.extend(changes.releasing.drain(..));
        }
    }

    fn take_obsolete(&mut self, max: usize) -> Vec<Vec<u8>> {
        let Some(changes) = &mut self.changes else {
            return Vec::new();
        };
        std::iter::from_fn(|| changes.obsolete.pop_first()).take(max).collect()
    }

    fn changes_bytes(&self) -> usize {
        self.changes.as_ref().map_or(0, |c| c.bytes)
    }

    fn apply_change(&mut self, entry: &[u8], value: Option<&[u8]>) -> Result<(), StageError> {
        let (tag, seq, (key, side, t_ms)) =
            parse_key(entry).ok_or_else(|| corrupt(format!("key {entry:?} is not a held record's")))?;
        if seq >= self.next_seq {
            return Err(corrupt(format!(
                "sequence {seq} past the checkpoint's {}",
                self.next_seq
            )));
        }
        // A replay may read several versions of an entry (compaction has
        // not met them all): the last one read decides.
        if let Some(changes) = &mut self.changes {
            changes.obsolete.remove(entry);
        }
        let Some(value) = value else {
            if tag == HELD_TAG {
                self.remove(&key, side, t_ms, seq);
            }
            return Ok(());
        };
        if self.window.released_at(t_ms) < self.watermark_ms {
            // Released before the checkpoint: its tombstone had not been
            // written (or compaction has not met it yet).
            if let Some(changes) = &mut self.changes {
                changes.obsolete.insert(entry.to_vec());
            }
            return Ok(());
        }
        if tag == MATCHED_TAG {
            let held = self
                .held
                .get_mut(&key)
                .and_then(|h| h[side.index()].get_mut(&(t_ms, seq)));
            let held = held.ok_or_else(|| corrupt(format!("sequence {seq} matched but not held")))?;
            held.matched = true;
            return Ok(());
        }
        let Entry { payload, matched } = crate::changelog::decode_exact::<Entry<P>>(value)
            .map_err(|e| corrupt(format!("value at sequence {seq}: {e}")))?;
        let present = self
            .held
            .get(&key)
            .is_some_and(|h| h[side.index()].contains_key(&(t_ms, seq)));
        if !present && self.held() >= JOIN_HELD_RECORDS_MAX {
            return Err(StageError::JoinFull(JOIN_HELD_RECORDS_MAX));
        }
        let held = Held {
            side,
            t_ms,
            payload,
            matched,
        };
        self.insert(key, seq, held);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use runnel_client::plan::JoinKind;

    use super::*;
    use crate::join::{JoinWindow, Joined};
    use crate::testing::{checkpoint_into, compacted, replay_into, Changelog};

    type Out = Vec<(Vec<u8>, Option<u32>, Option<u32>, i64)>;

    /// Adds one record (side, key, time, payload) and moves the watermark.
    fn step(buffers: &mut JoinBuffers<u32>, record: (Side, u8, i64, u32), watermark_ms: i64, out: &mut Out) {
        let (side, key, t_ms, payload) = record;
        let mut emit = |joined: Joined<'_, u32>| {
            let (key, left, right, t_ms) = joined.parts();
            out.push((key.to_vec(), left.copied(), right.copied(), t_ms));
            Ok(())
        };
        buffers.add(Some(&[key]), side, t_ms, payload, &mut emit).expect("adds");
        buffers.advance(watermark_ms, &mut emit).expect("advances");
    }

    /// Out-of-order records of both sides over 5 keys.
    fn records() -> Vec<(Side, u8, i64, u32)> {
        let mut rng = crate::testing::Lcg::new(3);
        (0..500u32)
            .map(|i| {
                let state = rng.next_state();
                let roll = state >> 33;
                let side = if roll.is_multiple_of(2) {
                    Side::Left
                } else {
                    Side::Right
                };
                (
                    side,
                    (roll >> 3) as u8 % 5,
                    i64::from(i) * 500 - (roll >> 9) as i64 % 3_000,
                    i,
                )
            })
            .collect()
    }

    /// Buffers checkpointed every `every` records (their changes folded
    /// by key, as compaction keeps them) and restored from each checkpoint
    /// emit what buffers never restored do, and hold nothing once every
    /// window has closed.
    fn restores_exactly(kind: JoinKind, every: usize) {
        let window = JoinWindow::within(Duration::from_secs(2)).grace(Duration::from_secs(1));
        let records = records();
        let watermark = |i: usize| records[..=i].iter().map(|r| r.2).max().unwrap_or(0) - 2_000;
        let (mut whole, mut expected) = (JoinBuffers::logged(window, kind), Out::new());
        for (i, &record) in records.iter().enumerate() {
            step(&mut whole, record, watermark(i), &mut expected);
        }
        let (mut buffers, mut out) = (JoinBuffers::<u32>::logged(window, kind), Out::new());
        let mut log = Changelog::new();
        for (i, &record) in records.iter().enumerate() {
            if i % every == 0 {
                // Some tombstones are lost (a crash): a restore ignores
                // the records they delete.
                checkpoint_into(&mut buffers, &mut log, i % (2 * every) == 0);
                let snapshot = buffers.snapshot().expect("snapshot");
                buffers = JoinBuffers::logged(window, kind);
                buffers.restore(&snapshot).expect("restores");
                replay_into(&mut buffers, &log, i % (3 * every) == 0);
            }
            step(&mut buffers, record, watermark(i), &mut out);
        }
        assert_eq!(out, expected, "{kind:?} every {every}");
        let mut emit = |_: Joined<'_, u32>| Ok(());
        buffers.advance(i64::MAX, &mut emit).expect("closes");
        checkpoint_into(&mut buffers, &mut log, true);
        assert!(compacted(&log).values().all(Option::is_none), "only tombstones left");
    }

    #[test]
    fn join_buffers_restored_from_their_entries_emit_what_unrestored_ones_do() {
        for kind in [JoinKind::Inner, JoinKind::Left, JoinKind::Outer] {
            for every in [1, 9, 200] {
                restores_exactly(kind, every);
            }
        }
    }

    #[test]
    fn entries_that_do_not_decode_are_refused_by_what_is_wrong() {
        let window = JoinWindow::within(Duration::from_secs(2));
        let mut buffers = JoinBuffers::<u32>::logged(window, JoinKind::Inner);
        buffers.next_seq = 10;
        let key = entry_key(3, &(b"k".to_vec(), Side::Left, 5));
        let refused = |b: &mut JoinBuffers<u32>, key: &[u8], value: Option<&[u8]>| {
            b.apply_change(key, value).expect_err("refused").to_string()
        };
        assert!(refused(&mut buffers, b"j", None).contains("not a held record's"));
        assert!(refused(&mut buffers, &entry_key(11, &(b"k".to_vec(), Side::Left, 5)), None).contains("past"));
        assert!(refused(&mut buffers, &key, Some(&[])).contains("value at sequence 3"));
        let value = postcard::to_allocvec(&Entry {
            payload: 7u32,
            matched: false,
        })
        .expect("encodes");
        buffers.apply_change(&key, Some(&value)).expect("applies");
        assert_eq!(buffers.held(), 1);
        buffers.apply_change(&key, None).expect("a tombstone");
        assert_eq!(buffers.held(), 0);
    }
}
