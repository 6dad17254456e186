//! Event-time windows as a pure state machine: no I/O, no clocks, so tests
//! drive it record by record and a task replaying its input after a crash
//! reaches exactly the same state and emits exactly the same results.
//!
//! - Windows are aligned to the Unix epoch and half-open, `[start, end)`.
//!   Tumbling: `start = t - t mod size`. Hopping: every window of `size`
//!   starting at a multiple of `advance` that contains `t`. Session: records
//!   of one key closer than `gap` form one window `[first, last + 1)`; a
//!   record bridging two sessions merges them.
//! - The caller moves the *watermark* (event time below which the input is
//!   complete: the maximum event time seen, or for a task with several
//!   upstream writers the minimum of theirs). A window closes once
//!   `watermark >= end + grace` (sessions: `last + gap + grace`); a record
//!   whose every window is closed is late: dropped and counted.
//! - Results leave in a deterministic order (closed windows by end, keys in
//!   key order), so the output sequence of a replay matches the original's.

mod log;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Fixed-key hashing: iteration order never leaks into results (they are
/// sorted), but a fixed hasher keeps runs reproducible when debugging. Fx
/// rather than SipHash: a lookup per record is the operator's main cost,
/// and SipHash with fixed keys resists crafted collisions no better.
type Map<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

/// Open windows of one kind kept at most per task; beyond it a task fails
/// with a clear error instead of growing without bound.
pub const OPEN_WINDOWS_MAX: usize = 100_000;
/// Aggregates (a key's in one window) held at most per task, across its
/// windows; beyond it a task fails with a clear error.
pub const AGGREGATES_MAX: usize = 1_000_000;
/// Event times a window holds: within ±2^53 ms of the epoch (about
/// ±285,000 years; also the integers JSON numbers hold exactly). A record
/// outside goes to the dead letters before it reaches a window, so window
/// arithmetic never overflows.
pub const EVENT_TIME_LIMIT_MS: i64 = 1 << 53;
/// A window's size, advance, gap or grace at most (an unwindowed aggregate
/// is one window this long).
pub const WINDOW_SPAN_MAX_MS: i64 = 1 << 62;

/// Whether a window can hold an event at `t_ms` ([`EVENT_TIME_LIMIT_MS`]).
pub fn event_time_in_range(t_ms: i64) -> bool {
    (-EVENT_TIME_LIMIT_MS..=EVENT_TIME_LIMIT_MS).contains(&t_ms)
}

/// The shape of a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowKind {
    Tumbling { size_ms: i64 },
    Hopping { size_ms: i64, advance_ms: i64 },
    Session { gap_ms: i64 },
}

/// A window definition: its shape and how long after its end late records
/// are still accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub kind: WindowKind,
    pub grace_ms: i64,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl Window {
    /// Back-to-back windows of `size`.
    pub fn tumbling(size: Duration) -> Window {
        Window {
            kind: WindowKind::Tumbling { size_ms: millis(size) },
            grace_ms: 0,
        }
    }

    /// Windows of `size` starting every `advance` (overlapping when
    /// `advance < size`).
    pub fn hopping(size: Duration, advance: Duration) -> Window {
        Window {
            kind: WindowKind::Hopping {
                size_ms: millis(size),
                advance_ms: millis(advance),
            },
            grace_ms: 0,
        }
    }

    /// One window per burst of a key's records, closed by `gap` of inactivity.
    pub fn session(gap: Duration) -> Window {
        Window {
            kind: WindowKind::Session { gap_ms: millis(gap) },
            grace_ms: 0,
        }
    }

    /// How long after a window's end records for it are still accepted.
    pub fn grace(mut self, grace: Duration) -> Window {
        self.grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        self
    }

    /// How long state is kept past a record's time: the retention bound.
    pub fn retention_ms(&self) -> i64 {
        let span = match self.kind {
            WindowKind::Tumbling { size_ms } | WindowKind::Hopping { size_ms, .. } => size_ms,
            WindowKind::Session { gap_ms } => gap_ms,
        };
        span.saturating_add(self.grace_ms)
    }

    pub fn validate(&self) -> Result<(), String> {
        let spans = match self.kind {
            WindowKind::Tumbling { size_ms } => [size_ms, size_ms],
            WindowKind::Hopping { size_ms, advance_ms } => [size_ms, advance_ms],
            WindowKind::Session { gap_ms } => [gap_ms, gap_ms],
        };
        if spans.iter().any(|&ms| !(1..=WINDOW_SPAN_MAX_MS).contains(&ms)) || self.grace_ms > WINDOW_SPAN_MAX_MS {
            return Err(format!(
                "window sizes, advances, gaps and grace must be at most {WINDOW_SPAN_MAX_MS} ms (sizes at least 1 ms): {self:?}"
            ));
        }
        match self.kind {
            WindowKind::Hopping { size_ms, advance_ms } if advance_ms > size_ms => Err(format!(
                "a hopping window's advance ({advance_ms} ms) must not exceed its size ({size_ms} ms)"
            )),
            WindowKind::Hopping { size_ms, advance_ms } if size_ms / advance_ms > 1000 => Err(format!(
                "a hopping window of {size_ms} ms advancing by {advance_ms} ms puts a record in over 1000 windows"
            )),
            _ if self.grace_ms < 0 => Err("grace must not be negative".to_string()),
            _ => Ok(()),
        }
    }

    /// Starts of the fixed windows containing `t`, oldest first.
    fn starts(&self, t: i64) -> impl Iterator<Item = i64> {
        let (size, advance) = match self.kind {
            WindowKind::Tumbling { size_ms } => (size_ms, size_ms),
            WindowKind::Hopping { size_ms, advance_ms } => (size_ms, advance_ms),
            WindowKind::Session { .. } => (1, 1),
        };
        let last = t - t.rem_euclid(advance);
        let first = last - (size - 1) / advance * advance;
        (first..=last).step_by(advance as usize).filter(move |s| t < s + size)
    }

    fn size_ms(&self) -> i64 {
        match self.kind {
            WindowKind::Tumbling { size_ms } | WindowKind::Hopping { size_ms, .. } => size_ms,
            WindowKind::Session { .. } => 1,
        }
    }
}

/// When results leave a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Emit {
    /// An update every time a window's result changes.
    Changes,
    /// One result per window, once it closes.
    Final,
}

/// `[start_ms, end_ms)` in event time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WindowBounds {
    pub start_ms: i64,
    pub end_ms: i64,
}

/// What a window operator emits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowResult<K, A> {
    /// The window's current (or, under [`Emit::Final`], final) value.
    Update { key: K, window: WindowBounds, value: A },
    /// A session window that was merged into a larger one: its earlier
    /// updates no longer stand (sent as a tombstone).
    Retract { key: K, window: WindowBounds, value: A },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Session<A> {
    first_ms: i64,
    last_ms: i64,
    value: A,
}

impl<A> Session<A> {
    fn bounds(&self) -> WindowBounds {
        WindowBounds {
            start_ms: self.first_ms,
            end_ms: self.last_ms + 1,
        }
    }
}

/// Adds one window's current value to `out`; `None` past `limit`.
fn push_bounded<K: Clone, A: Clone>(
    out: &mut Vec<WindowResult<K, A>>,
    limit: usize,
    key: &K,
    window: WindowBounds,
    value: &A,
) -> Option<()> {
    if out.len() >= limit {
        return None;
    }
    out.push(WindowResult::Update {
        key: key.clone(),
        window,
        value: value.clone(),
    });
    Some(())
}

/// Why a window operator refused to go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WindowError {
    #[error("more than {OPEN_WINDOWS_MAX} windows open at once; shorten the window or grace, or add partitions")]
    TooManyWindows,
    #[error("event time {0} ms is outside the range a window holds (±{EVENT_TIME_LIMIT_MS} ms of the epoch)")]
    EventTimeOutOfRange(i64),
    #[error("more than {AGGREGATES_MAX} aggregates (keys times windows) held at once; add partitions, or shorten the window or grace")]
    TooManyAggregates,
    #[error("window state does not decode: {0}")]
    CorruptState(String),
    #[error("a key does not decode: {0}")]
    BadKey(String),
    #[error("window state does not encode: {0}")]
    Unencodable(String),
}

/// The state of one task's windows: per window, per key, an aggregate.
pub struct WindowOperator<K, A> {
    window: Window,
    emit: Emit,
    /// Fixed windows by start; each holds its keys' aggregates.
    fixed: BTreeMap<i64, Map<K, A>>,
    /// Session windows per key, ordered by start.
    sessions: Map<K, Vec<Session<A>>>,
    /// Open sessions by the watermark that closes them.
    session_closing: BTreeSet<(i64, K, i64)>,
    watermark_ms: i64,
    late_records: u64,
    /// Keys the last closed window held: a new window starts with room for
    /// as many, rather than growing (and rehashing) record by record.
    keys_hint: usize,
    /// Aggregates in `fixed` ([`AGGREGATES_MAX`]).
    aggregates: usize,
    /// What changed since the last checkpoint, when the state is kept as
    /// changelog entries (see [`log`]).
    changes: Option<log::Changes<K>>,
}

/// The most keys a new window is sized for in advance.
const KEYS_HINT_MAX: usize = 1 << 16;

/// The serialisable part of a [`WindowOperator`], for checkpoints.
#[derive(Serialize, Deserialize)]
struct Snapshot<K, A> {
    fixed: Vec<(i64, Vec<(K, A)>)>,
    sessions: Vec<(K, Vec<Session<A>>)>,
    watermark_ms: i64,
    late_records: u64,
}

impl<K, A> WindowOperator<K, A>
where
    K: Clone + Eq + Hash + Ord + Serialize,
    A: Clone + Serialize,
{
    pub fn new(window: Window, emit: Emit) -> WindowOperator<K, A> {
        WindowOperator {
            window,
            emit,
            fixed: BTreeMap::new(),
            sessions: Map::default(),
            session_closing: BTreeSet::new(),
            watermark_ms: i64::MIN,
            late_records: 0,
            keys_hint: 0,
            aggregates: 0,
            changes: None,
        }
    }

    fn check_aggregates(&self) -> Result<(), WindowError> {
        if self.aggregates > AGGREGATES_MAX {
            return Err(WindowError::TooManyAggregates);
        }
        Ok(())
    }

    pub fn watermark_ms(&self) -> i64 {
        self.watermark_ms
    }

    /// Records dropped because all their windows had closed.
    pub fn late_records(&self) -> u64 {
        self.late_records
    }

    /// Windows (fixed) or sessions open now.
    pub fn open_windows(&self) -> usize {
        self.fixed.values().map(|keys| keys.len()).sum::<usize>() + self.session_closing.len()
    }

    /// Each open window's current aggregate for `key` (or, without one,
    /// for every key), oldest first: what a pull query reads. At most
    /// `limit` of them; `None` when there are more.
    pub fn current(&self, key: Option<&K>, limit: usize) -> Option<Vec<WindowResult<K, A>>> {
        let size = self.window.size_ms();
        let mut out = Vec::new();
        for (&start_ms, keys) in &self.fixed {
            let window = WindowBounds {
                start_ms,
                end_ms: start_ms + size,
            };
            let mut found: Vec<(&K, &A)> = match key {
                Some(key) => keys.get_key_value(key).into_iter().collect(),
                None => keys.iter().collect(),
            };
            found.sort_by(|a, b| a.0.cmp(b.0));
            for (key, value) in found {
                push_bounded(&mut out, limit, key, window, value)?;
            }
        }
        let mut sessions: Vec<(&K, &Vec<Session<A>>)> = match key {
            Some(key) => self.sessions.get_key_value(key).into_iter().collect(),
            None => self.sessions.iter().collect(),
        };
        sessions.sort_by(|a, b| a.0.cmp(b.0));
        for (key, sessions) in sessions {
            for session in sessions {
                push_bounded(&mut out, limit, key, session.bounds(), &session.value)?;
            }
        }
        Some(out)
    }

    fn closes_at(&self, end_ms: i64) -> i64 {
        end_ms.saturating_add(self.window.grace_ms)
    }

    /// Adds one record at event time `t_ms` to its key's windows. `init`
    /// makes an empty aggregate, `fold` adds the record to one, and `merge`
    /// combines two (session windows only). `admit` checks a key the first
    /// time it enters a window (a later record of it carries the same key),
    /// and its error refuses the record. Updates go to `out` under
    /// [`Emit::Changes`]. The key is taken by value: a new window keeps it
    /// without a copy.
    #[allow(clippy::too_many_arguments)]
    pub fn add<V>(
        &mut self,
        key: K,
        t_ms: i64,
        value: &V,
        init: &dyn Fn() -> A,
        fold: &dyn Fn(&mut A, &V),
        merge: &dyn Fn(&mut A, A),
        admit: &dyn Fn(&K) -> Result<(), String>,
        out: &mut Vec<WindowResult<K, A>>,
    ) -> Result<(), WindowError> {
        if !event_time_in_range(t_ms) {
            return Err(WindowError::EventTimeOutOfRange(t_ms));
        }
        if let WindowKind::Session { gap_ms } = self.window.kind {
            if !self.sessions.contains_key(&key) {
                admit(&key).map_err(WindowError::BadKey)?;
            }
            return self.add_to_session(&key, t_ms, gap_ms, value, init, fold, merge, out);
        }
        let size = self.window.size_ms();
        let mut accepted = false;
        let mut key = Some(key);
        let mut starts = self.window.starts(t_ms).peekable();
        while let Some(start) = starts.next() {
            let end = start + size;
            if self.closes_at(end) <= self.watermark_ms {
                continue;
            }
            if !self.fixed.contains_key(&start) && self.fixed.len() >= OPEN_WINDOWS_MAX {
                return Err(WindowError::TooManyWindows);
            }
            accepted = true;
            // The last window takes the key itself; earlier ones a copy.
            let Some(key) = (if starts.peek().is_some() {
                key.clone()
            } else {
                key.take()
            }) else {
                break;
            };
            self.add_to_fixed(key, start, end, value, init, fold, admit, out)?;
        }
        if !accepted {
            self.late_records += 1;
        }
        Ok(())
    }

    /// Adds one record to its key's aggregate in the fixed window
    /// `[start, end)`, which must be open. Inlined: it is the body of
    /// [`WindowOperator::add`]'s per-window loop, the operator's hot path.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn add_to_fixed<V>(
        &mut self,
        key: K,
        start: i64,
        end: i64,
        value: &V,
        init: &dyn Fn() -> A,
        fold: &dyn Fn(&mut A, &V),
        admit: &dyn Fn(&K) -> Result<(), String>,
        out: &mut Vec<WindowResult<K, A>>,
    ) -> Result<(), WindowError> {
        let changed_key = (self.emit == Emit::Changes).then(|| key.clone());
        let keys_hint = self.keys_hint;
        let keys = self
            .fixed
            .entry(start)
            .or_insert_with(|| Map::with_capacity_and_hasher(keys_hint, Default::default()));
        let changed = match keys.entry(key) {
            Entry::Occupied(mut entry) => {
                fold(entry.get_mut(), value);
                if let Some(changes) = &mut self.changes {
                    changes.fixed(start, entry.key(), entry.get());
                }
                changed_key.is_some().then(|| entry.get().clone())
            }
            Entry::Vacant(entry) => {
                admit(entry.key()).map_err(WindowError::BadKey)?;
                if self.aggregates >= AGGREGATES_MAX {
                    return Err(WindowError::TooManyAggregates);
                }
                self.aggregates += 1;
                // Folded before it is stored: the store into a table
                // slot that is rarely in cache need not be waited for.
                let mut aggregate = init();
                fold(&mut aggregate, value);
                if let Some(changes) = &mut self.changes {
                    changes.fixed(start, entry.key(), &aggregate);
                }
                let changed = changed_key.is_some().then(|| aggregate.clone());
                entry.insert(aggregate);
                changed
            }
        };
        if let (Some(key), Some(value)) = (changed_key, changed) {
            out.push(WindowResult::Update {
                key,
                window: WindowBounds {
                    start_ms: start,
                    end_ms: end,
                },
                value,
            });
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn add_to_session<V>(
        &mut self,
        key: &K,
        t_ms: i64,
        gap_ms: i64,
        value: &V,
        init: &dyn Fn() -> A,
        fold: &dyn Fn(&mut A, &V),
        merge: &dyn Fn(&mut A, A),
        out: &mut Vec<WindowResult<K, A>>,
    ) -> Result<(), WindowError> {
        let sessions = self.sessions.entry(key.clone()).or_default();
        // Sessions this record touches: within `gap` of it on either side.
        let touching: Vec<usize> = (0..sessions.len())
            .filter(|&i| sessions[i].first_ms - gap_ms < t_ms && t_ms < sessions[i].last_ms + gap_ms)
            .collect();
        if touching.is_empty() {
            let close = t_ms.saturating_add(gap_ms).saturating_add(self.window.grace_ms);
            if close <= self.watermark_ms {
                self.late_records += 1;
                if sessions.is_empty() {
                    self.sessions.remove(key);
                }
                return Ok(());
            }
            if self.session_closing.len() >= OPEN_WINDOWS_MAX {
                return Err(WindowError::TooManyWindows);
            }
        }
        let mut merged = Session {
            first_ms: t_ms,
            last_ms: t_ms,
            value: init(),
        };
        let mut retracted = Vec::new();
        for &i in touching.iter().rev() {
            let old = sessions.remove(i);
            let close = old.last_ms.saturating_add(gap_ms).saturating_add(self.window.grace_ms);
            self.session_closing.remove(&(close, key.clone(), old.first_ms));
            merged.first_ms = merged.first_ms.min(old.first_ms);
            merged.last_ms = merged.last_ms.max(old.last_ms);
            retracted.push((old.bounds(), old.value.clone()));
            merge(&mut merged.value, old.value);
        }
        fold(&mut merged.value, value);
        let close = merged
            .last_ms
            .saturating_add(gap_ms)
            .saturating_add(self.window.grace_ms);
        self.session_closing.insert((close, key.clone(), merged.first_ms));
        if self.emit == Emit::Changes {
            for (window, old) in retracted.into_iter().rev() {
                // The session keeps its bounds: it only grew in value.
                if window != merged.bounds() {
                    out.push(WindowResult::Retract {
                        key: key.clone(),
                        window,
                        value: old,
                    });
                }
            }
            out.push(WindowResult::Update {
                key: key.clone(),
                window: merged.bounds(),
                value: merged.value.clone(),
            });
        }
        let position = sessions.partition_point(|s| s.first_ms < merged.first_ms);
        sessions.insert(position, merged);
        if let Some(changes) = &mut self.changes {
            changes.sessions(key, sessions);
        }
        Ok(())
    }

    /// Moves the watermark forward (never back) and closes every window it
    /// passes: under [`Emit::Final`] their results that `keep` accepts (the
    /// having-filter, applied before the results are put in order) go to
    /// `out`, oldest window first, keys in order. Closed windows are evicted
    /// either way.
    pub fn advance(
        &mut self,
        watermark_ms: i64,
        keep: &dyn Fn(&K, &WindowBounds, &A) -> bool,
        out: &mut Vec<WindowResult<K, A>>,
    ) {
        if watermark_ms <= self.watermark_ms {
            return;
        }
        self.watermark_ms = watermark_ms;
        let size = self.window.size_ms();
        while let Some((&start, _)) = self.fixed.first_key_value() {
            if self.closes_at(start + size) > watermark_ms {
                break;
            }
            let Some((_, keys)) = self.fixed.pop_first() else { break };
            self.keys_hint = keys.len().min(KEYS_HINT_MAX);
            self.aggregates -= keys.len();
            if let Some(changes) = &mut self.changes {
                for key in keys.keys() {
                    changes.closed_fixed(start, key);
                }
            }
            if self.emit == Emit::Final {
                let window = WindowBounds {
                    start_ms: start,
                    end_ms: start + size,
                };
                let mut keys: Vec<(K, A)> = keys
                    .into_iter()
                    .filter(|(key, value)| keep(key, &window, value))
                    .collect();
                keys.sort_by(|a, b| a.0.cmp(&b.0));
                out.extend(
                    keys.into_iter()
                        .map(|(key, value)| WindowResult::Update { key, window, value }),
                );
            }
        }
        while let Some((close, _, _)) = self.session_closing.first() {
            if *close > watermark_ms {
                break;
            }
            let Some((_, key, first_ms)) = self.session_closing.pop_first() else {
                break;
            };
            let Some(sessions) = self.sessions.get_mut(&key) else {
                continue;
            };
            let Some(i) = sessions.iter().position(|s| s.first_ms == first_ms) else {
                continue;
            };
            let session = sessions.remove(i);
            // A key with sessions left keeps its entry as it was: a
            // restore drops the sessions its watermark closed.
            if let Some(changes) = self.changes.as_mut().filter(|_| sessions.is_empty()) {
                changes.closed_sessions(&key);
            }
            if sessions.is_empty() {
                self.sessions.remove(&key);
            }
            if self.emit == Emit::Final && keep(&key, &session.bounds(), &session.value) {
                out.push(WindowResult::Update {
                    window: session.bounds(),
                    key,
                    value: session.value,
                });
            }
        }
    }
}

impl<K, A> WindowOperator<K, A>
where
    K: Clone + Eq + Hash + Ord + Serialize + for<'de> Deserialize<'de>,
    A: Clone + Serialize + for<'de> Deserialize<'de>,
{
    /// The state as bytes (postcard), keys sorted so equal states encode
    /// equally. Without the windows' contents when they are kept as
    /// changelog entries.
    pub fn snapshot(&self) -> Result<Vec<u8>, WindowError> {
        let logged = self.changes.is_some();
        let fixed = self
            .fixed
            .iter()
            .filter(|_| !logged)
            .map(|(&start, keys)| {
                let mut keys: Vec<(K, A)> = keys.iter().map(|(k, a)| (k.clone(), a.clone())).collect();
                keys.sort_by(|a, b| a.0.cmp(&b.0));
                (start, keys)
            })
            .collect();
        let mut sessions: Vec<(K, Vec<Session<A>>)> = self
            .sessions
            .iter()
            .filter(|_| !logged)
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        sessions.sort_by(|a, b| a.0.cmp(&b.0));
        let snapshot = Snapshot {
            fixed,
            sessions,
            watermark_ms: self.watermark_ms,
            late_records: self.late_records,
        };
        postcard::to_allocvec(&snapshot).map_err(|e| WindowError::Unencodable(e.to_string()))
    }

    /// Replaces the state with a snapshot's. When the state is kept as
    /// changelog entries, what the snapshot holds (one written before it
    /// was) is all changes to write.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), WindowError> {
        let snapshot: Snapshot<K, A> =
            postcard::from_bytes(bytes).map_err(|e| WindowError::CorruptState(e.to_string()))?;
        check_snapshot(&snapshot)?;
        let gap_ms = match self.window.kind {
            WindowKind::Session { gap_ms } => gap_ms,
            _ => 0,
        };
        self.fixed = snapshot
            .fixed
            .into_iter()
            .map(|(start, keys)| (start, keys.into_iter().collect()))
            .collect();
        self.session_closing.clear();
        for (key, sessions) in &snapshot.sessions {
            for s in sessions {
                let close = s.last_ms.saturating_add(gap_ms).saturating_add(self.window.grace_ms);
                self.session_closing.insert((close, key.clone(), s.first_ms));
            }
        }
        self.sessions = snapshot.sessions.into_iter().collect();
        self.watermark_ms = snapshot.watermark_ms;
        self.late_records = snapshot.late_records;
        self.aggregates = self.fixed.values().map(Map::len).sum();
        if let Some(changes) = &mut self.changes {
            for (&start, keys) in &self.fixed {
                for (key, value) in keys {
                    changes.fixed(start, key, value);
                }
            }
            for (key, sessions) in &self.sessions {
                changes.sessions(key, sessions);
            }
        }
        self.check_aggregates()
    }
}

/// Checks what a restored snapshot must hold: window starts and session
/// times a window can hold, sessions in order, and no more windows than a
/// task opens (the checkpoint's size bounds the keys).
fn check_snapshot<K, A>(snapshot: &Snapshot<K, A>) -> Result<(), WindowError> {
    let corrupt = |why: String| Err(WindowError::CorruptState(why));
    if snapshot.fixed.len() > OPEN_WINDOWS_MAX {
        return corrupt(format!(
            "{} windows, beyond the {OPEN_WINDOWS_MAX} a task opens",
            snapshot.fixed.len()
        ));
    }
    // A window holding an event in range starts at most a window span
    // before it (an unwindowed aggregate's one window starts at -2^62).
    let starts = -EVENT_TIME_LIMIT_MS - WINDOW_SPAN_MAX_MS..=EVENT_TIME_LIMIT_MS;
    if let Some((start, _)) = snapshot.fixed.iter().find(|(start, _)| !starts.contains(start)) {
        return corrupt(format!("a window starts at {start} ms, outside the range windows hold"));
    }
    for (_, sessions) in &snapshot.sessions {
        check_sessions(sessions)?;
    }
    Ok(())
}

/// Checks one key's sessions: in order, and at times a window holds.
fn check_sessions<A>(sessions: &[Session<A>]) -> Result<(), WindowError> {
    let ordered = sessions.windows(2).all(|w| w[0].last_ms < w[1].first_ms);
    let in_range = sessions
        .iter()
        .all(|s| event_time_in_range(s.first_ms) && event_time_in_range(s.last_ms) && s.first_ms <= s.last_ms);
    if !ordered || !in_range {
        let why = "a key's sessions are out of order or outside the range windows hold";
        return Err(WindowError::CorruptState(why.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn count_op(window: Window, emit: Emit) -> WindowOperator<String, u64> {
        WindowOperator::new(window, emit)
    }

    /// Counts one record of `key` at `t`, `admit` checking new keys.
    fn count_admitting(
        op: &mut WindowOperator<String, u64>,
        key: &str,
        t: i64,
        admit: &dyn Fn(&String) -> Result<(), String>,
        out: &mut Vec<WindowResult<String, u64>>,
    ) -> Result<(), WindowError> {
        op.add(
            key.to_string(),
            t,
            &(),
            &|| 0,
            &|a, _: &()| *a += 1,
            &|a, b| *a += b,
            admit,
            out,
        )
    }

    /// Counts one record of `key` at `t`.
    fn count_one(op: &mut WindowOperator<String, u64>, key: &str, t: i64, out: &mut Vec<WindowResult<String, u64>>) {
        count_admitting(op, key, t, &|_| Ok(()), out).expect("add");
    }

    /// Feeds (key, t) records, advancing the watermark to the maximum event
    /// time seen after each one, like a single-input task.
    fn run(op: &mut WindowOperator<String, u64>, records: &[(&str, i64)]) -> Vec<WindowResult<String, u64>> {
        let mut out = Vec::new();
        let mut max = i64::MIN;
        for &(key, t) in records {
            count_one(op, key, t, &mut out);
            max = max.max(t);
            op.advance(max, &|_, _, _| true, &mut out);
        }
        out
    }

    fn update(key: &str, start_ms: i64, end_ms: i64, value: u64) -> WindowResult<String, u64> {
        WindowResult::Update {
            key: key.to_string(),
            window: WindowBounds { start_ms, end_ms },
            value,
        }
    }

    #[test]
    fn tumbling_windows_are_epoch_aligned_and_half_open() {
        let window = Window::tumbling(Duration::from_secs(300));
        let starts: Vec<i64> = window.starts(5 * MIN - 1).collect();
        assert_eq!(starts, vec![0]);
        let starts: Vec<i64> = window.starts(5 * MIN).collect();
        assert_eq!(starts, vec![5 * MIN], "end is exclusive");
        let starts: Vec<i64> = window.starts(-1).collect();
        assert_eq!(starts, vec![-5 * MIN], "times before the epoch align too");
    }

    #[test]
    fn hopping_windows_hold_a_record_in_every_window_covering_it() {
        let window = Window::hopping(Duration::from_secs(300), Duration::from_secs(60));
        let starts: Vec<i64> = window.starts(7 * MIN + 5).collect();
        assert_eq!(starts, vec![3 * MIN, 4 * MIN, 5 * MIN, 6 * MIN, 7 * MIN]);
        let starts: Vec<i64> = window.starts(7 * MIN).collect();
        assert_eq!(starts, vec![3 * MIN, 4 * MIN, 5 * MIN, 6 * MIN, 7 * MIN]);
        let mut op = count_op(window, Emit::Final);
        let out = run(&mut op, &[("a", 0), ("a", 2 * MIN), ("a", 20 * MIN)]);
        // Windows starting at -4..=2 minutes saw records; each closes once.
        let finals: Vec<(i64, u64)> = out
            .iter()
            .map(|r| match r {
                WindowResult::Update { window, value, .. } => (window.start_ms / MIN, *value),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(finals, vec![(-4, 1), (-3, 1), (-2, 2), (-1, 2), (0, 2), (1, 1), (2, 1)]);
    }

    #[test]
    fn emit_final_once_per_window_when_it_closes_emit_changes_every_update() {
        let window = Window::tumbling(Duration::from_secs(300));
        let records = [("a", 10), ("b", 20), ("a", 30), ("a", 5 * MIN + 1)];
        let mut op = count_op(window, Emit::Final);
        let out = run(&mut op, &records);
        assert_eq!(out, vec![update("a", 0, 5 * MIN, 2), update("b", 0, 5 * MIN, 1)]);
        let mut op = count_op(window, Emit::Changes);
        let out = run(&mut op, &records);
        assert_eq!(
            out,
            vec![
                update("a", 0, 5 * MIN, 1),
                update("b", 0, 5 * MIN, 1),
                update("a", 0, 5 * MIN, 2),
                update("a", 5 * MIN, 10 * MIN, 1),
            ]
        );
    }

    #[test]
    fn out_of_order_within_grace_counts_and_late_beyond_grace_is_dropped_and_counted() {
        let window = Window::tumbling(Duration::from_secs(300)).grace(Duration::from_secs(30));
        let mut op = count_op(window, Emit::Final);
        let out = run(
            &mut op,
            &[
                ("a", MIN),
                ("a", 5 * MIN + 10_000), // watermark 5:10, window [0,5) still open (grace 30 s)
                ("a", 2 * MIN),          // out of order, within grace: counted
                ("a", 5 * MIN + 30_000), // watermark 5:30: [0,5) closes with 2
                ("a", 3 * MIN),          // late: dropped and counted
            ],
        );
        assert_eq!(out, vec![update("a", 0, 5 * MIN, 2)]);
        assert_eq!(op.late_records(), 1);
        assert_eq!(op.open_windows(), 1, "the closed window was evicted");
    }

    #[test]
    fn session_windows_split_on_gaps_and_merge_when_bridged() {
        let window = Window::session(Duration::from_secs(60));
        let mut op = count_op(window, Emit::Changes);
        let out = run(&mut op, &[("a", 0), ("a", 2 * MIN)]);
        assert_eq!(out, vec![update("a", 0, 1, 1), update("a", 2 * MIN, 2 * MIN + 1, 1)]);
        // The first session closed at watermark 2 min (0 + gap); a record at
        // 1:30 touches only the second one, extending it backwards.
        let mut out = Vec::new();
        count_one(&mut op, "a", 90_000, &mut out);
        assert_eq!(
            out,
            vec![
                WindowResult::Retract {
                    key: "a".to_string(),
                    window: WindowBounds {
                        start_ms: 2 * MIN,
                        end_ms: 2 * MIN + 1
                    },
                    value: 1
                },
                update("a", 90_000, 2 * MIN + 1, 2),
            ]
        );
        // A record that bridges two open sessions merges them.
        let mut op = count_op(
            Window::session(Duration::from_secs(60)).grace(Duration::from_secs(600)),
            Emit::Final,
        );
        let out = run(&mut op, &[("k", 0), ("k", 100_000), ("k", 50_000), ("k", 20 * MIN)]);
        assert_eq!(out, vec![update("k", 0, 100_001, 3)]);
        assert_eq!(op.late_records(), 0);
    }

    #[test]
    fn final_results_pass_the_keep_filter_before_they_are_put_in_order() {
        let mut op = count_op(Window::tumbling(Duration::from_secs(60)), Emit::Final);
        let mut out = Vec::new();
        for (key, t) in [("b", 0), ("a", 1), ("b", 2), ("c", 3), ("a", 4), ("b", 5)] {
            count_one(&mut op, key, t, &mut out);
        }
        op.advance(MIN, &|_, _, n| *n >= 2, &mut out);
        assert_eq!(out, vec![update("a", 0, MIN, 2), update("b", 0, MIN, 3)]);
        assert_eq!(op.open_windows(), 0, "windows the filter rejects are evicted too");
    }

    #[test]
    fn a_key_is_admitted_once_per_window_and_a_refused_one_changes_nothing() {
        let admitted = std::cell::RefCell::new(Vec::new());
        let admit = |key: &String| {
            admitted.borrow_mut().push(key.clone());
            if key == "bad" {
                Err("refused".to_string())
            } else {
                Ok(())
            }
        };
        for window in [
            Window::tumbling(Duration::from_secs(60)),
            Window::session(Duration::from_secs(60)),
        ] {
            admitted.borrow_mut().clear();
            let mut op = count_op(window, Emit::Changes);
            let mut out = Vec::new();
            for (key, t) in [("a", 0), ("a", 1_000), ("a", MIN), ("bad", 2_000)] {
                let added = count_admitting(&mut op, key, t, &admit, &mut out);
                assert_eq!(added.is_err(), key == "bad", "{window:?} {key}");
            }
            let (expected, open): (&[&str], usize) = match window.kind {
                // Tumbling: "a" enters the windows at 0 and at 1 min.
                WindowKind::Tumbling { .. } => (&["a", "a", "bad"], 2),
                _ => (&["a", "bad"], 1),
            };
            assert_eq!(*admitted.borrow(), expected, "{window:?}");
            let keys: Vec<&String> = out
                .iter()
                .map(|r| match r {
                    WindowResult::Update { key, .. } | WindowResult::Retract { key, .. } => key,
                })
                .collect();
            assert!(
                !keys.is_empty() && keys.iter().all(|k| *k == "a"),
                "{window:?}: {keys:?}"
            );
            assert_eq!(op.open_windows(), open, "{window:?}");
        }
    }

    #[test]
    fn late_session_record_is_dropped_and_counted() {
        let mut op = count_op(Window::session(Duration::from_secs(10)), Emit::Final);
        let out = run(&mut op, &[("k", 100_000), ("k", 0)]);
        assert!(out.is_empty());
        assert_eq!(op.late_records(), 1);
    }

    #[test]
    fn snapshot_restore_gives_the_same_future() {
        let window = Window::hopping(Duration::from_secs(300), Duration::from_secs(100)).grace(Duration::from_secs(50));
        let records: Vec<(String, i64)> = (0..500)
            .map(|i| (format!("k{}", i % 7), (i * 7919) % 1_000_000))
            .collect();
        let mut whole = count_op(window, Emit::Final);
        let mut out_whole = Vec::new();
        let mut resumed_out = Vec::new();
        let mut snapshot = Vec::new();
        let mut max = i64::MIN;
        for (i, (key, t)) in records.iter().enumerate() {
            let target = if i < 250 { &mut out_whole } else { &mut resumed_out };
            count_one(&mut whole, key, *t, target);
            max = max.max(*t);
            whole.advance(max, &|_, _, _| true, target);
            if i == 249 {
                snapshot = whole.snapshot().expect("snapshot");
            }
        }
        let mut restored = count_op(window, Emit::Final);
        restored.restore(&snapshot).expect("restore");
        let mut out = Vec::new();
        let mut max = restored.watermark_ms();
        for (key, t) in &records[250..] {
            count_one(&mut restored, key, *t, &mut out);
            max = max.max(*t);
            restored.advance(max, &|_, _, _| true, &mut out);
        }
        assert_eq!(out, resumed_out);
        assert_eq!(restored.late_records(), whole.late_records());
        assert!(restored.restore(b"\xff\xff garbage").is_err());
    }

    /// Found by fuzzing (`fuzz/`, target task_state): an event time near
    /// i64::MAX overflowed window arithmetic (a panic in debug builds,
    /// wrong windows in release). Now it is refused by name, and nothing
    /// changes.
    #[test]
    fn event_times_beyond_the_window_range_are_refused_and_change_nothing() {
        let windows = [
            Window::tumbling(Duration::from_secs(300)),
            Window::hopping(Duration::from_secs(10), Duration::from_secs(5)),
            Window::session(Duration::from_secs(30)).grace(Duration::from_secs(1)),
        ];
        for window in windows {
            let mut op = count_op(window, Emit::Changes);
            let mut out = Vec::new();
            for t in [i64::MAX, i64::MIN, EVENT_TIME_LIMIT_MS + 1, -EVENT_TIME_LIMIT_MS - 1] {
                let refused = count_admitting(&mut op, "k", t, &|_| Ok(()), &mut out);
                assert_eq!(refused, Err(WindowError::EventTimeOutOfRange(t)), "{window:?}");
            }
            assert_eq!((op.open_windows(), out.len()), (0, 0), "{window:?}");
            for t in [EVENT_TIME_LIMIT_MS, -EVENT_TIME_LIMIT_MS] {
                count_admitting(&mut op, "k", t, &|_| Ok(()), &mut out).expect("at the limit");
            }
            op.advance(i64::MAX, &|_, _, _| true, &mut out);
            assert_eq!(op.open_windows(), 0, "{window:?}");
        }
    }

    #[test]
    fn a_snapshot_outside_the_window_range_or_a_window_of_no_size_is_refused() {
        let mut op = count_op(Window::tumbling(Duration::from_secs(60)), Emit::Final);
        let snapshot = Snapshot::<String, u64> {
            fixed: vec![(i64::MAX - 5, vec![("k".to_string(), 1)])],
            sessions: Vec::new(),
            watermark_ms: 0,
            late_records: 0,
        };
        let bytes = postcard::to_allocvec(&snapshot).expect("encodes");
        assert!(matches!(op.restore(&bytes), Err(WindowError::CorruptState(why)) if why.contains("outside")));
        // Found by fuzzing the check itself: an unwindowed aggregate's one
        // window starts at -2^62, and its state restores.
        let all_time = Snapshot::<String, u64> {
            fixed: vec![(-WINDOW_SPAN_MAX_MS, vec![("k".to_string(), 1)])],
            ..snapshot
        };
        let bytes = postcard::to_allocvec(&all_time).expect("encodes");
        op.restore(&bytes).expect("an all-time window restores");
        let mut none = Window::tumbling(Duration::from_secs(60));
        none.kind = WindowKind::Tumbling { size_ms: 0 };
        assert!(none.validate().is_err());
        let huge = Window::tumbling(Duration::from_secs(60)).grace(Duration::MAX);
        assert!(huge.validate().expect_err("grace too long").contains("at most"));
    }
}
