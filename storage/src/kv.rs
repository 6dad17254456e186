//! A small durable key-value file for Raft hard state, recovery points and
//! similar metadata. Every change rewrites the whole file atomically: write a
//! temporary file, fsync it, rename it over the old one, fsync the directory.
//! A crash leaves either the old contents or the new, never a mix.
//!
//! # File format (version 1, little-endian)
//!
//! ```text
//! magic "RNKV", version u8 = 1, entry_count u32
//! per entry: key_length u16, key (UTF-8), value_length u32, value
//! crc32c u32 over everything before it
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result, StorageError};

const MAGIC: &[u8; 4] = b"RNKV";
const VERSION: u8 = 1;
/// Metadata files stay small; a larger one is a bug or corruption.
pub const KV_FILE_BYTES_MAX: usize = 16 * 1024 * 1024;

pub struct DurableKv {
    path: PathBuf,
    entries: BTreeMap<String, Vec<u8>>,
}

impl DurableKv {
    /// Opens the file, or starts empty when it does not exist. A damaged file
    /// is a `Corrupt` error, never silently replaced.
    pub fn open(path: impl Into<PathBuf>) -> Result<DurableKv> {
        let path = path.into();
        let entries = match std::fs::read(&path) {
            Ok(bytes) => decode(&bytes).map_err(|(position, reason)| StorageError::Corrupt {
                path: path.clone(),
                position,
                reason,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).at(&path),
        };
        Ok(DurableKv { path, entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).map(Vec::as_slice)
    }

    /// Reads a value stored by [`DurableKv::set_u64`].
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        let Some(bytes) = self.get(key) else {
            return Ok(None);
        };
        let word: [u8; 8] = bytes.try_into().map_err(|_| StorageError::Corrupt {
            path: self.path.clone(),
            position: 0,
            reason: format!("value of {key:?} is {} bytes, not a u64", bytes.len()),
        })?;
        Ok(Some(u64::from_le_bytes(word)))
    }

    pub fn set_u64(&mut self, key: &str, value: u64) -> Result<()> {
        self.set(key, value.to_le_bytes().to_vec())
    }

    pub fn set(&mut self, key: &str, value: Vec<u8>) -> Result<()> {
        self.update(|entries| {
            entries.insert(key.to_string(), value);
        })
    }

    pub fn remove(&mut self, key: &str) -> Result<()> {
        if !self.entries.contains_key(key) {
            return Ok(());
        }
        self.update(|entries| {
            entries.remove(key);
        })
    }

    /// Applies several changes and persists them as one atomic write.
    pub fn update(&mut self, change: impl FnOnce(&mut BTreeMap<String, Vec<u8>>)) -> Result<()> {
        let mut next = self.entries.clone();
        change(&mut next);
        let bytes = encode(&next)?;
        write_atomically(&self.path, &bytes)?;
        self.entries = next;
        Ok(())
    }
}

fn encode(entries: &BTreeMap<String, Vec<u8>>) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    buf.push(VERSION);
    buf.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (key, value) in entries {
        let key_len = u16::try_from(key.len())
            .map_err(|_| StorageError::InvalidConfig(format!("metadata key of {} bytes is too long", key.len())))?;
        buf.extend_from_slice(&key_len.to_le_bytes());
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        buf.extend_from_slice(value);
    }
    if buf.len() + 4 > KV_FILE_BYTES_MAX {
        return Err(StorageError::InvalidConfig(format!(
            "metadata of {} bytes exceeds the limit of {KV_FILE_BYTES_MAX}",
            buf.len()
        )));
    }
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

type DecodeError = (u64, String);

fn decode(bytes: &[u8]) -> std::result::Result<BTreeMap<String, Vec<u8>>, DecodeError> {
    if bytes.len() > KV_FILE_BYTES_MAX || bytes.len() < 13 {
        return Err((0, format!("file of {} bytes cannot be a metadata file", bytes.len())));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if &body[..4] != MAGIC {
        return Err((0, "bad magic, not a metadata file".to_string()));
    }
    if body[4] != VERSION {
        return Err((4, format!("unknown metadata version {}", body[4])));
    }
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != stored {
        return Err(((bytes.len() - 4) as u64, "CRC mismatch".to_string()));
    }
    let mut position = 5;
    let mut take = |len: usize| -> std::result::Result<&[u8], DecodeError> {
        let slice = body
            .get(position..position + len)
            .ok_or((position as u64, "entry runs past the end".to_string()))?;
        position += len;
        Ok(slice)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().unwrap_or_default());
    let mut entries = BTreeMap::new();
    for _ in 0..count {
        let key_len = u16::from_le_bytes(take(2)?.try_into().unwrap_or_default()) as usize;
        let key = std::str::from_utf8(take(key_len)?).map_err(|_| (0, "metadata key is not UTF-8".to_string()))?;
        let value_len = u32::from_le_bytes(take(4)?.try_into().unwrap_or_default()) as usize;
        let value = take(value_len)?.to_vec();
        entries.insert(key.to_string(), value);
    }
    Ok(entries)
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).at(&tmp)?;
    file.write_all(bytes).at(&tmp)?;
    file.sync_all().at(&tmp)?;
    drop(file);
    std::fs::rename(&tmp, path).at(path)?;
    sync_parent_dir(path)
}

/// Makes a create, rename or delete in the file's directory durable.
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hard_state");
        let mut kv = DurableKv::open(&path).expect("open");
        assert_eq!(kv.get("term"), None);
        kv.set_u64("term", 7).expect("set");
        kv.set("vote", b"node-3".to_vec()).expect("set");
        kv.remove("missing").expect("remove");
        let kv = DurableKv::open(&path).expect("reopen");
        assert_eq!(kv.get_u64("term").expect("u64"), Some(7));
        assert_eq!(kv.get("vote"), Some(&b"node-3"[..]));
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn damage_is_reported_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta");
        let mut kv = DurableKv::open(&path).expect("open");
        kv.set_u64("commit", 99).expect("set");
        let mut bytes = std::fs::read(&path).expect("read");
        for cut in 0..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).expect("write");
            assert!(
                matches!(DurableKv::open(&path), Err(StorageError::Corrupt { .. })),
                "cut at {cut}"
            );
        }
        bytes[9] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let err = DurableKv::open(&path).err().expect("flip accepted");
        assert!(err.to_string().contains("meta"), "{err}");
    }
}
