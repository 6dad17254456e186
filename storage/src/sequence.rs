//! Producer sequence numbers, which count modulo 2^31 as Kafka's do: after
//! `i32::MAX` comes 0 (`DefaultRecordBatch.incrementSequence`). A producer
//! writing more than 2^31 records to one partition goes on from 0, and
//! whoever compares two sequences asks which comes first within half the
//! space (serial number arithmetic, RFC 1982): a retry or a gap is never
//! anywhere near 2^30 records away.

/// How many sequence numbers there are.
pub const SEQUENCE_SPACE: i64 = 1 << 31;

/// `sequence` moved on by `records` (which may be negative), wrapping.
pub fn sequence_add(sequence: i32, records: i64) -> i32 {
    debug_assert!(sequence >= 0, "sequence {sequence}");
    (i64::from(sequence) + records).rem_euclid(SEQUENCE_SPACE) as i32
}

/// How many records on from `from` `to` is (0 to 2^31 − 1).
pub fn sequence_distance(from: i32, to: i32) -> i64 {
    (i64::from(to) - i64::from(from)).rem_euclid(SEQUENCE_SPACE)
}

/// Whether `a` comes before `b` (by less than half the space).
pub fn sequence_before(a: i32, b: i32) -> bool {
    let distance = sequence_distance(a, b);
    distance > 0 && distance < SEQUENCE_SPACE / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_wrap_after_the_largest_and_compare_across_the_wrap() {
        assert_eq!(sequence_add(i32::MAX, 1), 0);
        assert_eq!(sequence_add(i32::MAX - 1, 5), 3);
        assert_eq!(sequence_add(2, -5), i32::MAX - 2);
        assert_eq!(sequence_distance(i32::MAX, 1), 2);
        assert_eq!(sequence_distance(5, 5), 0);
        assert!(sequence_before(i32::MAX, 0) && sequence_before(i32::MAX - 10, 3));
        assert!(!sequence_before(0, i32::MAX) && !sequence_before(7, 7));
        assert!(sequence_before(0, 1 << 29) && !sequence_before(0, 1 << 30));
    }
}
