//! The fuzz harnesses: one module per target, each a `run(data)` that feeds
//! arbitrary bytes to the decoders of one family and checks what must hold
//! whatever the bytes are — no panic, no unbounded allocation, and where a
//! decoder accepts the input, the properties its format promises (a log
//! returns only what was written, a refused metadata command changes
//! nothing, a snapshot round-trips).
//!
//! Checksums are repaired before decoding where a format has one (record
//! batches, Kafka batches, metadata files), so the fuzzer reaches the
//! parsers behind them: a peer or a producer computes those checksums over
//! whatever it sends, and a checksum proves only that the bytes did not
//! change after they were written.
//!
//! `cargo fuzz run <target>` drives them with libFuzzer; `cargo test` here
//! replays every saved finding in `regressions/<target>/`.

pub mod disk;
pub mod kafka;
pub mod metadata;
pub mod record_batch;
pub mod sql;
pub mod task_state;
pub mod wire;

/// One harness: arbitrary bytes in.
pub type Harness = fn(&[u8]);

/// Targets by name, for the regression replay.
pub const TARGETS: [(&str, Harness); 7] = [
    ("record_batch", record_batch::run),
    ("disk", disk::run),
    ("wire", wire::run),
    ("metadata", metadata::run),
    ("task_state", task_state::run),
    ("sql", sql::run),
    ("kafka", kafka::run),
];

/// Splits input into length-prefixed chunks (one byte of length, at most
/// 255), for targets that take several independent inputs.
pub fn chunks(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (&len, rest) = data.split_first()?;
        let take = (len as usize).min(rest.len());
        let (chunk, rest) = rest.split_at(take);
        data = rest;
        Some(chunk)
    })
}
