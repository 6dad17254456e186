//! A table's rows by time, for joins by event time (SQL's
//! `FOR SYSTEM_TIME AS OF`; Kafka Streams' versioned key-value store,
//! KIP-914).
//!
//! Each key keeps its rows and deletions of the last `history_ms` of table
//! time (the newest time of any record applied), plus the one in force
//! when that history begins, so a lookup at any time within the history
//! finds the row as it was then. Older lookups find nothing: the table no
//! longer knows. A write older than the history is dropped, as Kafka
//! Streams drops it. A key's past is pruned each time the key is written,
//! so what a key keeps is bounded by its writes within the history; the
//! table's own bounds (rows and bytes) count every version kept.

use std::collections::HashMap;

use crate::row::Value;

/// One row of a key from `from_ms` on; `None` is a deletion.
#[derive(Clone, Debug, PartialEq)]
struct Kept {
    from_ms: i64,
    row: Option<Vec<Value>>,
}

/// A write: a key's row (a deletion when `None`) from `at_ms` on.
#[derive(Clone, Debug, PartialEq)]
pub struct Version {
    pub at_ms: i64,
    pub row: Option<Vec<Value>>,
    /// Whether its time moves the table's time on (a deletion dated by its
    /// record's timestamp, when rows are timed by a column, does not).
    pub moves_time: bool,
}

/// Every key's versions within the history.
#[derive(Debug, Default)]
pub struct VersionedRows {
    history_ms: i64,
    keys: HashMap<String, Vec<Kept>>,
    /// The newest time written; `None` before the first write.
    newest_ms: Option<i64>,
    versions: usize,
}

impl VersionedRows {
    pub fn new(history_ms: i64) -> VersionedRows {
        assert!(history_ms >= 0, "a validated history");
        VersionedRows {
            history_ms,
            ..VersionedRows::default()
        }
    }

    /// Versions kept, over every key.
    pub fn versions(&self) -> usize {
        self.versions
    }

    /// The time the history begins at: lookups before it find nothing.
    fn horizon_ms(&self) -> Option<i64> {
        self.newest_ms.map(|newest| newest.saturating_sub(self.history_ms))
    }

    /// Writes `key`'s version, and prunes the key's versions the history
    /// no longer needs; the rows it dropped or replaced are given to
    /// `released` (for byte accounting). A deletion is kept even when the
    /// key had no row then: a row dated before it may still come. False
    /// when the write is older than the history, and dropped.
    pub fn put(&mut self, key: &str, version: Version, mut released: impl FnMut(&str, &[Value])) -> bool {
        let Version { at_ms, row, moves_time } = version;
        if self.horizon_ms().is_some_and(|horizon| at_ms < horizon) {
            return false;
        }
        if moves_time || self.newest_ms.is_none() {
            self.newest_ms = Some(self.newest_ms.map_or(at_ms, |newest| newest.max(at_ms)));
        }
        let horizon = self.horizon_ms().expect("just written");
        let versions = self.keys.entry(key.to_string()).or_default();
        let added = match versions.binary_search_by_key(&at_ms, |v| v.from_ms) {
            Ok(i) => {
                let old = std::mem::replace(&mut versions[i].row, row);
                if let Some(old) = old {
                    released(key, &old);
                }
                0
            }
            Err(i) => {
                versions.insert(i, Kept { from_ms: at_ms, row });
                1
            }
        };
        let pruned = prune(versions, horizon, |row| released(key, row));
        if versions.is_empty() {
            self.keys.remove(key);
        }
        self.versions = (self.versions + added) - pruned;
        true
    }

    /// `key`'s row as it was at `at_ms`: `None` when deleted then, before
    /// its first row, or before the history.
    pub fn get(&self, key: &str, at_ms: i64) -> Option<&[Value]> {
        if self.horizon_ms().is_none_or(|horizon| at_ms < horizon) {
            return None;
        }
        let versions = self.keys.get(key)?;
        let after = versions.partition_point(|v| v.from_ms <= at_ms);
        versions[..after].last()?.row.as_deref()
    }
}

/// Removes the versions before the one in force at `horizon_ms` (and that
/// one too when it is a deletion: no row then is what an absent version
/// says); how many.
fn prune(versions: &mut Vec<Kept>, horizon_ms: i64, mut released: impl FnMut(&[Value])) -> usize {
    let in_force = versions.partition_point(|v| v.from_ms <= horizon_ms);
    let mut cut = in_force.saturating_sub(1);
    if versions
        .get(cut)
        .is_some_and(|v| v.from_ms <= horizon_ms && v.row.is_none())
    {
        cut += 1;
    }
    for version in versions.drain(..cut) {
        if let Some(row) = version.row {
            released(&row);
        }
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(country: &str) -> Option<Vec<Value>> {
        Some(vec![Value::String(country.into())])
    }

    /// A write at `at_ms` that moves the table's time.
    fn at(at_ms: i64, row: Option<Vec<Value>>) -> Version {
        Version {
            at_ms,
            row,
            moves_time: true,
        }
    }

    fn country(rows: &VersionedRows, key: &str, at_ms: i64) -> Option<String> {
        rows.get(key, at_ms).map(|row| row[0].to_string())
    }

    #[test]
    fn a_lookup_finds_the_row_in_force_at_its_time_whatever_the_order_of_writes() {
        let mut rows = VersionedRows::new(1_000);
        rows.put("c1", at(100, row("NL")), |_, _| {});
        rows.put("c1", at(300, row("DE")), |_, _| {});
        rows.put("c1", at(200, row("BE")), |_, _| {}); // out of order, within the history
        assert_eq!(country(&rows, "c1", 99), None, "before its first row");
        assert_eq!(country(&rows, "c1", 100).as_deref(), Some("NL"));
        assert_eq!(country(&rows, "c1", 250).as_deref(), Some("BE"));
        assert_eq!(country(&rows, "c1", 5_000).as_deref(), Some("DE"), "after the newest");
        rows.put("c1", at(400, None), |_, _| {});
        assert_eq!(country(&rows, "c1", 450), None, "deleted from 400");
        assert_eq!(country(&rows, "c1", 350).as_deref(), Some("DE"), "but not before");
        rows.put("c1", at(300, row("FR")), |_, _| {});
        assert_eq!(
            country(&rows, "c1", 350).as_deref(),
            Some("FR"),
            "a write at the same time replaces"
        );
        assert_eq!(rows.versions(), 4);
    }

    #[test]
    fn history_bounds_what_is_kept_and_what_is_answered() {
        let mut rows = VersionedRows::new(1_000);
        let mut released = Vec::new();
        for (i, at_ms) in [0, 500, 900, 1_600, 2_500].into_iter().enumerate() {
            rows.put("c1", at(at_ms, row(&format!("v{i}"))), |_, r| {
                released.push(r[0].to_string())
            });
        }
        // Newest 2,500: the history begins at 1,500; v2 (in force then),
        // v3 and v4 are kept, v0 and v1 pruned.
        assert_eq!(rows.versions(), 3);
        assert_eq!(released, ["v0", "v1"]);
        assert_eq!(country(&rows, "c1", 1_500).as_deref(), Some("v2"));
        assert_eq!(country(&rows, "c1", 1_499), None, "before the history: not known");
        let kept = rows.put("c1", at(1_200, row("late")), |_, _| {});
        assert!(!kept, "a write older than the history is dropped");
        assert_eq!(country(&rows, "c1", 1_700).as_deref(), Some("v3"));
        rows.put("c2", at(2_600, None), |_, _| {});
        assert_eq!(rows.versions(), 4, "a deletion is kept: a row dated before it may come");
        rows.put("c1", at(5_000, None), |_, _| {});
        // Newest 5,000, history from 4,000: c1 keeps v4 (in force then)
        // and its deletion; c2's deletion, in force then, says no more
        // than no version does, and goes.
        rows.put("c2", at(4_500, row("x")), |_, _| {});
        assert_eq!(rows.versions(), 3, "{rows:?}");
        let undated = Version {
            at_ms: 1_000_000,
            row: None,
            moves_time: false,
        };
        rows.put("c2", undated, |_, _| {});
        assert_eq!(
            country(&rows, "c2", 4_600).as_deref(),
            Some("x"),
            "the history did not move"
        );
        assert_eq!(country(&rows, "c2", 1_000_000), None, "deleted from then");
        assert_eq!(country(&rows, "c1", 4_999).as_deref(), Some("v4"));
        assert_eq!(country(&rows, "c2", 4_600).as_deref(), Some("x"));
    }
}
