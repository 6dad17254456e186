use std::io;
use std::path::PathBuf;

/// Everything the storage layer can report. Tests match on the variants.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system call on a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Bytes on disk that must be valid are not: a bad checksum or an impossible
    /// field before the tail of the log. Never skipped silently.
    #[error("corrupt data in {path} at byte {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },

    /// A record batch handed to the codec or the log is malformed.
    #[error("invalid record batch: {0}")]
    InvalidBatch(String),

    /// A read asked for an offset the log does not hold.
    #[error("offset {offset} is out of range: the log holds [{start}, {end})")]
    OffsetOutOfRange { offset: u64, start: u64, end: u64 },

    /// A truncation point falls inside a batch rather than at its start.
    #[error("offset {offset} is not a batch boundary (the batch there starts at {batch_base})")]
    NotBatchBoundary { offset: u64, batch_base: u64 },

    /// Deleting a log's prefix must stop at a segment's start.
    #[error("offset {offset} is not where a segment of the log in {dir} starts")]
    NotSegmentBoundary { offset: u64, dir: PathBuf },

    /// A batch is larger than the configured maximum.
    #[error("record batch of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    BatchTooLarge { size_bytes: usize, limit_bytes: usize },

    /// An earlier write, fsync or truncation failed part-way; the in-memory
    /// view can no longer be trusted, so the log refuses work until reopened
    /// (which recovers from what is on disk).
    #[error("log in {dir} failed earlier and must be reopened: {reason}")]
    Failed { dir: PathBuf, reason: String },

    /// A configuration value is out of its allowed range.
    #[error("invalid log configuration: {0}")]
    InvalidConfig(String),
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// Attaches a path to an `io::Error`, so every I/O failure names its file.
pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| StorageError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
