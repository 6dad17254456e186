//! The state store of a table–table join: each key's latest left and right
//! rows (SQL's rows of values, or the Rust builders' encoded records),
//! kept as changelog entries (see [`crate::changelog`]): one entry per key,
//! holding both rows; a key with neither row is a tombstone.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::TABLE_JOIN_KEYS_MAX;
use crate::builder::{Change, StageError, StateStore};

/// What a changed key costs beyond its rows in the pending changes.
const CHANGE_OVERHEAD_BYTES: usize = 64;

/// A key's latest rows: left, right.
pub type Rows<R> = [Option<R>; 2];

/// Each key's rows, and the keys changed since the last checkpoint.
pub struct KeyRows<R> {
    rows: BTreeMap<Vec<u8>, Rows<R>>,
    /// Keys changed since the last checkpoint, each with what its entry
    /// takes now, and their sum.
    changed: BTreeMap<Vec<u8>, usize>,
    changed_bytes: usize,
}

impl<R> Default for KeyRows<R> {
    fn default() -> KeyRows<R> {
        KeyRows {
            rows: BTreeMap::new(),
            changed: BTreeMap::new(),
            changed_bytes: 0,
        }
    }
}

impl<R: Serialize + DeserializeOwned> KeyRows<R> {
    /// Sets `key`'s row of `side` (0 left, 1 right; `None`: deleted), and
    /// answers what `joined` makes of its rows before and after.
    pub fn update<T>(
        &mut self,
        key: &[u8],
        side: usize,
        row: Option<R>,
        mut joined: impl FnMut(&Rows<R>) -> Result<T, StageError>,
    ) -> Result<(T, T), StageError> {
        // A deletion of a key not held adds none, even at the bound.
        if row.is_some() && !self.rows.contains_key(key) && self.rows.len() >= TABLE_JOIN_KEYS_MAX {
            return Err(StageError::TableJoinFull(TABLE_JOIN_KEYS_MAX));
        }
        let mut rows = self.rows.remove(key).unwrap_or_default();
        let before = joined(&rows);
        rows[side] = row;
        let after = joined(&rows);
        let kept = rows.iter().any(Option::is_some).then_some(rows);
        self.mark_changed(key, kept.as_ref());
        if let Some(rows) = kept {
            self.rows.insert(key.to_vec(), rows);
        }
        Ok((before?, after?))
    }

    /// The rows of `key`, or of every key, in key order.
    pub fn iter<'a>(&'a self, key: Option<&[u8]>) -> Box<dyn Iterator<Item = (&'a Vec<u8>, &'a Rows<R>)> + 'a> {
        match key {
            Some(key) => Box::new(self.rows.get_key_value(key).into_iter()),
            None => Box::new(self.rows.iter()),
        }
    }

    /// Rows a snapshot held (written before the rows were kept as entries):
    /// all of them are changes to write.
    pub fn restore_rows(&mut self, rows: Vec<(Vec<u8>, Rows<R>)>) {
        for (key, rows) in rows {
            self.mark_changed(&key, Some(&rows));
            self.rows.insert(key, rows);
        }
    }

    /// Notes that `key` changed to `rows` (`None`: gone): its entry's
    /// size replaces what it took before.
    fn mark_changed(&mut self, key: &[u8], rows: Option<&Rows<R>>) {
        let value_bytes = rows.map_or(0, |r| postcard::experimental::serialized_size(r).unwrap_or(0));
        let bytes = key.len() + value_bytes + CHANGE_OVERHEAD_BYTES;
        let before = self.changed.insert(key.to_vec(), bytes).unwrap_or(0);
        self.changed_bytes = self.changed_bytes - before + bytes;
    }
}

impl<R: Serialize + DeserializeOwned + Send + Sync> StateStore for KeyRows<R> {
    fn changes(&self) -> Result<Vec<Change>, StageError> {
        let entry = |key: &Vec<u8>| -> Result<_, StageError> {
            let value = match self.rows.get(key) {
                Some(rows) => Some(postcard::to_allocvec(rows).map_err(|e| StageError::Unencodable(e.to_string()))?),
                None => None,
            };
            Ok((key.clone(), value))
        };
        self.changed.keys().map(entry).collect()
    }

    fn changes_written(&mut self) {
        self.changed.clear();
        self.changed_bytes = 0;
    }

    fn changes_bytes(&self) -> usize {
        self.changed_bytes
    }

    fn apply_change(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), StageError> {
        let Some(value) = value else {
            self.rows.remove(key);
            return Ok(());
        };
        let rows: Rows<R> = crate::changelog::decode_exact(value)
            .map_err(|e| StageError::Corrupt(format!("table join changelog entry: {e}")))?;
        if rows.iter().all(Option::is_none) {
            // A key with neither row is written as a tombstone.
            return Err(StageError::Corrupt(
                "a table join changelog entry with neither row".to_string(),
            ));
        }
        if !self.rows.contains_key(key) && self.rows.len() >= TABLE_JOIN_KEYS_MAX {
            return Err(StageError::TableJoinFull(TABLE_JOIN_KEYS_MAX));
        }
        self.rows.insert(key.to_vec(), rows);
        Ok(())
    }
}
