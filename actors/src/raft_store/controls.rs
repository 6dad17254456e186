//! Raft control entries kept beside the record log, so that they take no
//! offset.
//!
//! A control entry (the empty entry a new leader appends, a configuration
//! change) carries nothing for consumers. Stored as a batch in the record
//! log it took an offset, so a partition's first record was offset 1 and a
//! leader change left a gap (Kafka clients saw 1, 2, 3, 5). Held here
//! instead, in the replica's metadata file, its slot sits between two
//! batches, at the offset of the batch after it, and occupies none: record
//! offsets run 0, 1, 2, … without a gap, as Kafka users know them.
//!
//! Every replica must place an entry alike, or they would give one record
//! different offsets, so the placement is the entry's own: a control entry
//! is held unless it is *marked as in the log* ([`ControlEntry::in_log`]).
//! Stores written before control entries were held keep theirs in the log
//! as one-record control batches (one offset each), and readers skip them;
//! such a batch read back for Raft becomes an entry so marked, and a
//! follower sent it stores it in the log too, at the same offset. (The mark
//! is raft-rs's `Entry::sync_log`, a field raft-rs keeps for wire
//! compatibility and never reads.) Every node of a cluster must run a build
//! that holds control entries: an older one puts them in the log.
//!
//! Bounded: retention and snapshot installs drop the held entries at or
//! below the snapshot point, so a topic with retention holds a few; one
//! without it holds one small entry per leader change and configuration
//! change. Past [`CONTROLS_MAX`] entries or [`CONTROL_BYTES_MAX`] bytes an
//! append fails with an error that says so (the replica stops rather than
//! place an entry unlike its peers).
//!
//! Crash safety rests on one order: the held entries are written (the
//! metadata file is replaced atomically and synced) before any later entry
//! reaches the log, and a diverged tail is cut from the log (synced) before
//! its control entries are dropped from here. So the log never holds a
//! batch whose index depends on a control entry the file lacks; the file
//! may hold entries past the log's end (the log lost an unsynced tail
//! before them), which the open drops.
//!
//! # Format (metadata key `control_entries`, postcard)
//! `Stored { version: 1, entries: [HeldEntry { index, term, offset, control }] }`
//! in index order; `offset` is where the entry sits (the log's end when it
//! was appended), which the open checks: a held entry that the log's batches
//! would place elsewhere, or that lies past the log's end at an offset below
//! it, is damage, not a tail the log lost.

use std::collections::BTreeMap;
use std::path::Path;

use raft::eraftpb::{Entry, EntryType};
use serde::{Deserialize, Serialize};

use crate::error::{ActorError, Result};

/// The metadata key of the held entries.
pub(super) const KEY_CONTROL_ENTRIES: &str = "control_entries";
/// The format written (and the only one read).
const FORMAT_VERSION: u8 = 1;
/// Control entries held at most (a few MiB of metadata file).
pub(super) const CONTROLS_MAX: usize = 65_536;
/// Bytes of held control entries' data and context at most.
pub(super) const CONTROL_BYTES_MAX: usize = 4 << 20;

/// A control entry's content: its type, data and context.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ControlEntry {
    entry_type: i32,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    #[serde(with = "serde_bytes")]
    context: Vec<u8>,
}

impl ControlEntry {
    /// Whether a Raft entry is a control entry rather than a batch of records.
    pub fn is_control(entry: &Entry) -> bool {
        entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty()
    }

    /// Whether a control entry is stored in the log (one offset) rather than
    /// held: the mark a control batch read back from the log gives it.
    pub fn in_log(entry: &Entry) -> bool {
        entry.sync_log
    }

    /// Whether the store holds `entry` beside the log.
    pub fn is_held(entry: &Entry) -> bool {
        Self::is_control(entry) && !Self::in_log(entry)
    }

    pub fn of(entry: &Entry) -> ControlEntry {
        ControlEntry {
            entry_type: entry.get_entry_type() as i32,
            data: entry.data.to_vec(),
            context: entry.context.to_vec(),
        }
    }

    /// The Raft entry it stands for, at `index` of `term`.
    pub fn to_entry(&self, index: u64, term: u64) -> Result<Entry> {
        let entry_type = match self.entry_type {
            0 => EntryType::EntryNormal,
            1 => EntryType::EntryConfChange,
            2 => EntryType::EntryConfChangeV2,
            other => {
                return Err(ActorError::InvalidState(format!(
                    "control entry {index} has unknown type {other}"
                )))
            }
        };
        let mut entry = Entry {
            index,
            term,
            data: self.data.clone().into(),
            context: self.context.clone().into(),
            ..Entry::default()
        };
        entry.set_entry_type(entry_type);
        Ok(entry)
    }

    fn bytes(&self) -> usize {
        self.data.len() + self.context.len()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct HeldEntry {
    index: u64,
    term: u64,
    offset: u64,
    control: ControlEntry,
}

/// A held entry's term, offset and content.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    term: u64,
    offset: u64,
    control: ControlEntry,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u8,
    entries: Vec<HeldEntry>,
}

/// The control entries held beside the log, by index.
#[derive(Clone, Debug, Default)]
pub(super) struct HeldControls {
    entries: BTreeMap<u64, Held>,
    bytes: usize,
}

impl HeldControls {
    /// Reads what the metadata file holds (`None`: nothing yet).
    pub fn decode(bytes: Option<&[u8]>, path: &Path) -> Result<HeldControls> {
        let Some(bytes) = bytes else {
            return Ok(HeldControls::default());
        };
        let corrupt = |reason: String| ActorError::corrupt(path, format!("{KEY_CONTROL_ENTRIES}: {reason}"));
        let stored: Stored = postcard::from_bytes(bytes).map_err(|e| corrupt(e.to_string()))?;
        if stored.version != FORMAT_VERSION {
            let reason = format!(
                "format {} is unknown (this node reads {FORMAT_VERSION})",
                stored.version
            );
            return Err(corrupt(reason));
        }
        let mut held = HeldControls::default();
        for entry in stored.entries {
            held.bytes += entry.control.bytes();
            let value = Held {
                term: entry.term,
                offset: entry.offset,
                control: entry.control,
            };
            if held.entries.insert(entry.index, value).is_some() {
                return Err(corrupt(format!("entry {} is held twice", entry.index)));
            }
        }
        Ok(held)
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let stored = Stored {
            version: FORMAT_VERSION,
            entries: self
                .entries
                .iter()
                .map(|(&index, held)| HeldEntry {
                    index,
                    term: held.term,
                    offset: held.offset,
                    control: held.control.clone(),
                })
                .collect(),
        };
        postcard::to_allocvec(&stored)
            .map_err(|e| ActorError::InvalidState(format!("encoding {KEY_CONTROL_ENTRIES}: {e}")))
    }

    /// Holds a control entry at `offset`; past the bounds, an error that
    /// names them (`path`: the metadata file).
    pub fn hold(&mut self, entry: &Entry, offset: u64, path: &Path) -> Result<()> {
        debug_assert!(ControlEntry::is_held(entry));
        let control = ControlEntry::of(entry);
        if self.entries.len() >= CONTROLS_MAX || self.bytes + control.bytes() > CONTROL_BYTES_MAX {
            let reason = format!(
                "{} control entries of {} bytes are held, the most a replica holds ({CONTROLS_MAX} entries, \
                 {CONTROL_BYTES_MAX} bytes): one per leader change and configuration change since the \
                 snapshot point; set retention.ms on the topic so that retention moves it",
                self.entries.len(),
                self.bytes
            );
            return Err(ActorError::InvalidState(format!("{}: {reason}", path.display())));
        }
        self.bytes += control.bytes();
        let held = Held {
            term: entry.term,
            offset,
            control,
        };
        let replaced = self.entries.insert(entry.index, held);
        debug_assert!(replaced.is_none(), "entry {} held twice", entry.index);
        Ok(())
    }

    /// The held entry at `index`, as Raft gave it.
    pub fn entry(&self, index: u64) -> Option<Result<Entry>> {
        let held = self.entries.get(&index)?;
        Some(held.control.to_entry(index, held.term))
    }

    /// The term and offset of the held entry at `index`.
    pub fn term_and_offset(&self, index: u64) -> Option<(u64, u64)> {
        self.entries.get(&index).map(|held| (held.term, held.offset))
    }

    /// The held entries from `index` on: (index, offset).
    pub fn offsets_from(&self, index: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.entries.range(index..).map(|(&i, held)| (i, held.offset))
    }

    /// Drops the entries from `index` on; whether any went.
    pub fn remove_from(&mut self, index: u64) -> bool {
        let gone = self.entries.split_off(&index);
        self.bytes -= gone.values().map(|h| h.control.bytes()).sum::<usize>();
        !gone.is_empty()
    }

    /// Drops the entries up to `index`; whether any went.
    pub fn remove_through(&mut self, index: u64) -> bool {
        let kept = self.entries.split_off(&index.saturating_add(1));
        let gone = std::mem::replace(&mut self.entries, kept);
        self.bytes -= gone.values().map(|h| h.control.bytes()).sum::<usize>();
        !gone.is_empty()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(index: u64, term: u64, data: &[u8]) -> Entry {
        let mut entry = Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Entry::default()
        };
        if !data.is_empty() {
            entry.set_entry_type(EntryType::EntryConfChangeV2);
        }
        entry
    }

    impl HeldControls {
        fn hold_at0(&mut self, entry: &Entry) -> bool {
            self.hold(entry, 0, Path::new("/m")).is_ok()
        }
    }

    #[test]
    fn held_entries_round_trip_and_a_later_format_is_refused_by_name() {
        let mut held = HeldControls::default();
        assert!(held.hold_at0(&control(3, 2, b"")));
        assert!(held.hold_at0(&control(7, 2, b"change")));
        let bytes = held.encode().expect("encode");
        let read = HeldControls::decode(Some(&bytes), Path::new("/m")).expect("decode");
        assert_eq!(read.entries, held.entries);
        assert_eq!(read.bytes, 6);
        let entry = read.entry(7).expect("held").expect("entry");
        assert_eq!(
            (entry.index, entry.term, entry.get_entry_type()),
            (7, 2, EntryType::EntryConfChangeV2)
        );
        let mut later = bytes.clone();
        later[0] = 9;
        let refused = HeldControls::decode(Some(&later), Path::new("/m")).expect_err("format 9");
        assert!(refused.to_string().contains("format 9 is unknown"), "{refused}");
        assert!(HeldControls::decode(Some(&[1, 200]), Path::new("/m")).is_err());
    }

    #[test]
    fn holding_stops_at_the_bounds_and_removal_frees_them() {
        let mut held = HeldControls::default();
        for index in 1..=CONTROLS_MAX as u64 {
            assert!(held.hold_at0(&control(index, 1, b"")));
        }
        let refused = held
            .hold(&control(CONTROLS_MAX as u64 + 1, 1, b""), 0, Path::new("/m"))
            .expect_err("past the count");
        assert!(refused.to_string().contains("the most a replica holds"), "{refused}");
        assert!(held.remove_through(10));
        assert_eq!(held.len(), CONTROLS_MAX - 10);
        assert!(held.remove_from(100));
        assert_eq!(held.len(), 89);
        assert!(!held.remove_from(100), "nothing left there");
        let big = vec![0u8; CONTROL_BYTES_MAX];
        assert!(held.hold_at0(&control(100, 1, &big)), "up to the bytes");
        assert!(!held.hold_at0(&control(101, 1, b"x")), "past the bytes");
        assert!(held.remove_from(100));
        assert!(held.hold_at0(&control(100, 1, b"x")));
    }
}
