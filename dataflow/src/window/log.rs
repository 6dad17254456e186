//! A window operator's state as changelog entries (see
//! [`crate::changelog`]): each open window's aggregate of a key is one
//! entry, keyed `f` + the window's start + the key, and each key's open
//! sessions are one entry, keyed `s` + the key. The operator notes which
//! entries changed since the last checkpoint; the keys of a window that
//! closes become tombstones, so the changelog holds about the open state.
//!
//! Entry keys and values are postcard; a start is 8 bytes, big-endian.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hash;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::OPEN_WINDOWS_MAX;
use super::{check_sessions, event_time_in_range, Emit, Session, Window, WindowError, WindowKind, WindowOperator};
use super::{EVENT_TIME_LIMIT_MS, WINDOW_SPAN_MAX_MS};
use crate::builder::{Change, StageError, StateStore};

use super::Map;

const FIXED_TAG: u8 = b'f';
const SESSION_TAG: u8 = b's';
/// What an entry costs beyond its key and value, about (the record's
/// framing and the entry prefix).
const ENTRY_OVERHEAD_BYTES: usize = 32;
/// A changed entry's size is measured when first noted, after 1, 2, 4, …
/// changes, then every this many: an aggregate that grows
/// (`COUNT_DISTINCT`, `MAX` of text) is counted within about twice its
/// growth, at a fraction of the cost of measuring every change.
const MEASURE_EVERY: u32 = 64;

/// The entries changed since the last checkpoint, and about what they
/// take as records.
pub(super) struct Changes<K> {
    fixed: BTreeMap<i64, Map<K, Noted>>,
    sessions: Map<K, Noted>,
    bytes: usize,
    /// Entries of windows closed since the last checkpoint, keys whose
    /// last session closed since (a key may open a session again before
    /// the checkpoint), and the entries a written checkpoint made obsolete:
    /// their tombstones go after it (see [`StateStore::take_obsolete`]).
    closing: Vec<Vec<u8>>,
    closing_sessions: Map<K, ()>,
    obsolete: BTreeSet<Vec<u8>>,
}

/// A changed entry: changes since it was measured, and its size then.
#[derive(Clone, Copy)]
struct Noted {
    changes: u32,
    bytes: usize,
}

impl<K> Default for Changes<K> {
    fn default() -> Changes<K> {
        Changes {
            fixed: BTreeMap::new(),
            sessions: Map::default(),
            bytes: 0,
            closing: Vec::new(),
            closing_sessions: Map::default(),
            obsolete: BTreeSet::new(),
        }
    }
}

fn size_of<T: Serialize>(value: &T) -> usize {
    postcard::experimental::serialized_size(value).unwrap_or(0)
}

/// Notes a change of `key` in `noted`, measuring it (`measure`) when
/// first noted, after 1, 2, 4, … changes and every [`MEASURE_EVERY`];
/// keeps `total` the sum of the sizes last measured.
fn note<K: Clone + Eq + Hash>(noted: &mut Map<K, Noted>, key: &K, measure: impl Fn() -> usize, total: &mut usize) {
    match noted.get_mut(key) {
        Some(entry) => {
            entry.changes = entry.changes.wrapping_add(1);
            if entry.changes.is_power_of_two() || entry.changes.is_multiple_of(MEASURE_EVERY) {
                let bytes = measure();
                *total = *total - entry.bytes + bytes;
                entry.bytes = bytes;
            }
        }
        None => {
            let bytes = measure();
            noted.insert(key.clone(), Noted { changes: 0, bytes });
            *total += bytes;
        }
    }
}

impl<K: Clone + Eq + Hash + Serialize> Changes<K> {
    /// Notes that `key`'s aggregate in the window starting at `start`
    /// changed (to `value`).
    pub(super) fn fixed<A: Serialize>(&mut self, start: i64, key: &K, value: &A) {
        let keys = self.fixed.entry(start).or_default();
        let measure = || 9 + size_of(key) + size_of(value) + ENTRY_OVERHEAD_BYTES;
        note(keys, key, measure, &mut self.bytes);
    }

    /// Notes that `key`'s sessions changed (to `sessions`).
    pub(super) fn sessions<A: Serialize>(&mut self, key: &K, sessions: &[Session<A>]) {
        self.closing_sessions.remove(key);
        let measure = || 1 + size_of(key) + size_of(&sessions) + ENTRY_OVERHEAD_BYTES;
        note(&mut self.sessions, key, measure, &mut self.bytes);
    }

    /// Notes that the window starting at `start` closed with `key`'s
    /// aggregate in it: not a change for the next checkpoint's batch, but
    /// an entry that checkpoint makes obsolete.
    pub(super) fn closed_fixed(&mut self, start: i64, key: &K) {
        if let Some(noted) = self.fixed.get_mut(&start).and_then(|keys| keys.remove(key)) {
            self.bytes -= noted.bytes;
        }
        if let Ok(entry) = fixed_key(start, key) {
            self.closing.push(entry);
        }
    }

    /// Notes that `key`'s last session closed (as [`Changes::closed_fixed`]).
    pub(super) fn closed_sessions(&mut self, key: &K) {
        if let Some(noted) = self.sessions.remove(key) {
            self.bytes -= noted.bytes;
        }
        self.closing_sessions.insert(key.clone(), ());
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The changes are in a written checkpoint: the entries closed since
    /// the one before are obsolete now.
    fn written(&mut self) {
        self.fixed.clear();
        self.sessions.clear();
        self.bytes = 0;
        self.obsolete.extend(self.closing.drain(..));
        for (key, ()) in self.closing_sessions.drain() {
            if let Ok(entry) = session_key(&key) {
                self.obsolete.insert(entry);
            }
        }
    }
}

fn fixed_key<K: Serialize>(start: i64, key: &K) -> Result<Vec<u8>, WindowError> {
    let mut entry = vec![FIXED_TAG];
    entry.extend_from_slice(&start.to_be_bytes());
    postcard::to_extend(key, entry).map_err(|e| WindowError::Unencodable(e.to_string()))
}

fn session_key<K: Serialize>(key: &K) -> Result<Vec<u8>, WindowError> {
    postcard::to_extend(key, vec![SESSION_TAG]).map_err(|e| WindowError::Unencodable(e.to_string()))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WindowError> {
    postcard::to_allocvec(value).map_err(|e| WindowError::Unencodable(e.to_string()))
}

fn corrupt(why: String) -> WindowError {
    WindowError::CorruptState(format!("changelog entry: {why}"))
}

impl<K, A> WindowOperator<K, A>
where
    K: Clone + Eq + Hash + Ord + Serialize + DeserializeOwned,
    A: Clone + Serialize + DeserializeOwned,
{
    /// An operator keeping its state as changelog entries: its snapshots
    /// hold none of it, and its [`StateStore`] says what changed.
    pub fn logged(window: Window, emit: Emit) -> WindowOperator<K, A> {
        let mut operator = WindowOperator::new(window, emit);
        operator.changes = Some(Changes::default());
        operator
    }

    pub fn logs_changes(&self) -> bool {
        self.changes.is_some()
    }

    /// The entries changed since the last checkpoint, each with its
    /// current value (`None`: gone).
    fn changed_entries(&self) -> Result<Vec<Change>, WindowError> {
        let Some(changes) = &self.changes else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (&start, keys) in &changes.fixed {
            let open = self.fixed.get(&start);
            for key in keys.keys() {
                let value = open.and_then(|window| window.get(key)).map(encode).transpose()?;
                out.push((fixed_key(start, key)?, value));
            }
        }
        for key in changes.sessions.keys() {
            let sessions = self.sessions.get(key).filter(|s| !s.is_empty());
            out.push((session_key(key)?, sessions.map(encode).transpose()?));
        }
        Ok(out)
    }

    /// Applies one entry read back from the changelog, checking what a
    /// window can hold.
    fn apply_entry(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), WindowError> {
        match key.split_first() {
            Some((&FIXED_TAG, rest)) if rest.len() > 8 => {
                let (start, key) = rest.split_at(8);
                let start = i64::from_be_bytes(start.try_into().map_err(|_| corrupt("a short key".into()))?);
                let key: K = crate::changelog::decode_exact(key).map_err(|e| corrupt(format!("key: {e}")))?;
                self.apply_fixed(start, key, value)
            }
            Some((&SESSION_TAG, rest)) => {
                let key: K = crate::changelog::decode_exact(rest).map_err(|e| corrupt(format!("key: {e}")))?;
                self.apply_sessions(key, value)
            }
            _ => Err(corrupt(format!("key {key:?} is neither a window's nor a session's"))),
        }
    }

    fn apply_fixed(&mut self, start: i64, key: K, value: Option<&[u8]>) -> Result<(), WindowError> {
        let starts = -EVENT_TIME_LIMIT_MS - WINDOW_SPAN_MAX_MS..=EVENT_TIME_LIMIT_MS;
        if !starts.contains(&start) {
            return Err(corrupt(format!(
                "a window starts at {start} ms, outside the range windows hold"
            )));
        }
        // A replay may read several versions of an entry (compaction has
        // not met them all): the last one read decides.
        let entry = fixed_key(start, &key)?;
        if let Some(changes) = &mut self.changes {
            changes.obsolete.remove(&entry);
        }
        let Some(value) = value else {
            if let Some(keys) = self.fixed.get_mut(&start) {
                self.aggregates -= usize::from(keys.remove(&key).is_some());
                if keys.is_empty() {
                    self.fixed.remove(&start);
                }
            }
            return Ok(());
        };
        if self.closes_at(start + self.window.size_ms()) <= self.watermark_ms {
            // Closed before the checkpoint: its tombstone had not been
            // written (or compaction has not met it yet).
            if let Some(changes) = &mut self.changes {
                changes.obsolete.insert(entry);
            }
            return Ok(());
        }
        let value: A = crate::changelog::decode_exact(value).map_err(|e| corrupt(format!("aggregate: {e}")))?;
        if !self.fixed.contains_key(&start) && self.fixed.len() >= OPEN_WINDOWS_MAX {
            return Err(WindowError::TooManyWindows);
        }
        let keys = self.fixed.entry(start).or_default();
        if keys.insert(key, value).is_none() {
            self.aggregates += 1;
        }
        self.check_aggregates()
    }

    fn apply_sessions(&mut self, key: K, value: Option<&[u8]>) -> Result<(), WindowError> {
        let gap_ms = match self.window.kind {
            WindowKind::Session { gap_ms } => gap_ms,
            _ => return Err(corrupt("a session of a window that is not a session window".into())),
        };
        for old in self.sessions.remove(&key).unwrap_or_default() {
            let close = old.last_ms.saturating_add(gap_ms).saturating_add(self.window.grace_ms);
            self.session_closing.remove(&(close, key.clone(), old.first_ms));
        }
        // The last version read decides whether the key is closed.
        if let Some(changes) = &mut self.changes {
            changes.closing_sessions.remove(&key);
        }
        let Some(value) = value else {
            return Ok(());
        };
        let mut sessions: Vec<Session<A>> =
            crate::changelog::decode_exact(value).map_err(|e| corrupt(format!("sessions: {e}")))?;
        check_sessions(&sessions)?;
        // Sessions closed before the checkpoint left the state then.
        let (grace_ms, watermark_ms) = (self.window.grace_ms, self.watermark_ms);
        sessions.retain(|s| s.last_ms.saturating_add(gap_ms).saturating_add(grace_ms) > watermark_ms);
        if sessions.is_empty() {
            if let Some(changes) = &mut self.changes {
                changes.closing_sessions.insert(key, ());
            }
            return Ok(());
        }
        if self.session_closing.len() + sessions.len() > OPEN_WINDOWS_MAX {
            return Err(WindowError::TooManyWindows);
        }
        for s in &sessions {
            debug_assert!(event_time_in_range(s.last_ms));
            let close = s.last_ms.saturating_add(gap_ms).saturating_add(self.window.grace_ms);
            self.session_closing.insert((close, key.clone(), s.first_ms));
        }
        self.sessions.insert(key, sessions);
        Ok(())
    }
}

impl<K, A> StateStore for WindowOperator<K, A>
where
    K: Clone + Eq + Hash + Ord + Serialize + DeserializeOwned + Send + Sync,
    A: Clone + Serialize + DeserializeOwned + Send + Sync,
{
    fn changes(&self) -> Result<Vec<Change>, StageError> {
        Ok(self.changed_entries()?)
    }

    fn changes_written(&mut self) {
        if let Some(changes) = &mut self.changes {
            changes.written();
        }
    }

    fn take_obsolete(&mut self, max: usize) -> Vec<Vec<u8>> {
        let Some(changes) = &mut self.changes else {
            return Vec::new();
        };
        std::iter::from_fn(|| changes.obsolete.pop_first()).take(max).collect()
    }

    fn changes_bytes(&self) -> usize {
        self.changes.as_ref().map_or(0, Changes::bytes)
    }

    fn apply_change(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), StageError> {
        Ok(self.apply_entry(key, value)?)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::{checkpoint_into, compacted, replay_into, Changelog};
    use crate::window::WindowResult;

    type Counts = WindowOperator<String, u64>;

    /// Counts one record and moves the watermark to `watermark_ms`.
    fn step(op: &mut Counts, key: &str, t_ms: i64, watermark_ms: i64, out: &mut Vec<WindowResult<String, u64>>) {
        let admit = |_: &String| Ok(());
        op.add(
            key.to_string(),
            t_ms,
            &(),
            &|| 0,
            &|a, _: &()| *a += 1,
            &|a, b| *a += b,
            &admit,
            out,
        )
        .expect("adds");
        op.advance(watermark_ms, &|_, _, _| true, out);
    }

    /// Out-of-order records over 9 keys; the watermark trails the
    /// maximum event time by 40 s, so some records are late.
    fn records() -> Vec<(String, i64)> {
        let mut rng = crate::testing::Lcg::new(11);
        (0..600)
            .map(|i| {
                let state = rng.next_state();
                let jitter = ((state >> 33) % 90_000) as i64;
                (format!("k{}", (state >> 20) % 9), i * 1_000 + jitter)
            })
            .collect()
    }

    /// A logged operator checkpointing every `every` records (its changes
    /// folded by key, as compaction keeps them) and restored from each
    /// checkpoint (snapshot then entries) emits what one never restored
    /// does; once every window has closed the changelog holds nothing.
    fn restores_exactly(window: Window, emit: Emit, every: usize) {
        let records = records();
        let mut whole = Counts::logged(window, emit);
        let mut expected = Vec::new();
        let watermark = |i: usize| records[..=i].iter().map(|r| r.1).max().unwrap_or(0) - 40_000;
        for (i, (key, t)) in records.iter().enumerate() {
            step(&mut whole, key, *t, watermark(i), &mut expected);
        }
        let mut op = Counts::logged(window, emit);
        let mut log = Changelog::new();
        let mut out = Vec::new();
        for (i, (key, t)) in records.iter().enumerate() {
            if i % every == 0 {
                // Some tombstones are lost (a crash): a restore ignores
                // the entries of windows closed by then.
                checkpoint_into(&mut op, &mut log, i % (2 * every) == 0);
                let snapshot = op.snapshot().expect("snapshot");
                op = Counts::logged(window, emit);
                op.restore(&snapshot).expect("restores");
                // Some restores read every version (compaction has not
                // run), some each key's latest.
                replay_into(&mut op, &log, i % (3 * every) == 0);
            }
            step(&mut op, key, *t, watermark(i), &mut out);
        }
        assert_eq!(out, expected, "{window:?} {emit:?}");
        op.advance(i64::MAX / 4, &|_, _, _| true, &mut out);
        log.extend(op.changes().expect("changes"));
        op.changes_written();
        assert_eq!(op.changes_bytes(), 0);
        let obsolete = op.take_obsolete(usize::MAX);
        assert!(!obsolete.is_empty(), "closed windows leave tombstones to write");
        log.extend(obsolete.into_iter().map(|k| (k, None)));
        assert!(compacted(&log).values().all(Option::is_none), "only tombstones left");
    }

    #[test]
    fn a_logged_operator_restored_from_its_entries_emits_what_an_unrestored_one_does() {
        let windows = [
            Window::tumbling(Duration::from_secs(30)),
            Window::hopping(Duration::from_secs(60), Duration::from_secs(20)).grace(Duration::from_secs(10)),
            Window::session(Duration::from_secs(5)).grace(Duration::from_secs(3)),
        ];
        for window in windows {
            for emit in [Emit::Final, Emit::Changes] {
                for every in [1, 7, 250] {
                    restores_exactly(window, emit, every);
                }
            }
        }
    }

    #[test]
    fn entries_that_do_not_decode_or_cannot_be_held_are_refused_by_what_is_wrong() {
        let mut op = Counts::logged(Window::tumbling(Duration::from_secs(30)), Emit::Final);
        let refused = |op: &mut Counts, key: &[u8], value: Option<&[u8]>| {
            op.apply_change(key, value).expect_err("refused").to_string()
        };
        assert!(refused(&mut op, b"x", None).contains("neither a window's nor a session's"));
        let mut far = vec![FIXED_TAG];
        far.extend_from_slice(&i64::MAX.to_be_bytes());
        far.extend_from_slice(&postcard::to_allocvec("k").expect("encodes"));
        assert!(refused(&mut op, &far, Some(&[1])).contains("outside the range"));
        let mut key = vec![FIXED_TAG];
        key.extend_from_slice(&0i64.to_be_bytes());
        key.extend_from_slice(&postcard::to_allocvec("k").expect("encodes"));
        assert!(refused(&mut op, &key, Some(&[])).contains("aggregate"));
        let session = postcard::to_extend("k", vec![SESSION_TAG]).expect("encodes");
        assert!(refused(&mut op, &session, Some(&[1])).contains("not a session window"));
        assert!(refused(&mut op, &key, Some(&[3, 0])).contains("1 bytes left over"));
        op.apply_change(&key, Some(&[3])).expect("a count of 3");
        assert_eq!(op.current(None, 10).expect("few").len(), 1);
    }

    /// An aggregate that grows as it folds (a distinct set) is counted
    /// near its size, not at the size it had when first noted.
    #[test]
    fn a_growing_aggregate_is_counted_near_its_size() {
        let window = Window::tumbling(Duration::from_secs(30));
        let mut op = WindowOperator::<String, Vec<u64>>::logged(window, Emit::Final);
        let admit = |_: &String| Ok(());
        let mut out = Vec::new();
        for i in 0..10_000u64 {
            let push = |a: &mut Vec<u64>, v: &u64| a.push(*v);
            op.add(
                "k".to_string(),
                1_000,
                &(i << 20),
                &Vec::new,
                &push,
                &|a, b| a.extend(b),
                &admit,
                &mut out,
            )
            .expect("adds");
        }
        let exact: usize = op
            .changes()
            .expect("changes")
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        assert!(exact > 40_000, "{exact} bytes");
        let counted = op.changes_bytes();
        assert!(counted >= exact * 9 / 10, "counted {counted} of {exact} bytes");
    }
}
