//! Consumer groups: the coordinator of each group is the node leading the
//! group's partition of the offsets topic (`__consumer_offsets`, partition
//! by a hash of the group id, as Runnel's client stores offsets), so any
//! node can say where a group's coordinator is.
//!
//! - [`core`]: membership as a deterministic state machine.
//! - this module: the coordinator's state on a node ([`Coordinator`]):
//!   the core, the parked requests' answer channels, and the committed
//!   offsets of the offsets partitions this node leads, read from the
//!   partition when it becomes leader and kept current by each commit.
//!
//! Offsets are records of the offsets partition (key `group\0topic\0partition`,
//! value the next offset, i64 little-endian; a tombstone deletes it), so
//! Kafka consumer groups and Runnel's consumers share them. A Kafka client
//! may commit a negative offset (KafkaJS commits -2 or -1, its reset to the
//! earliest or latest offset); it is kept as it came and read back the
//! same, as Kafka keeps it, and Runnel's consumers take it for none. (The
//! value was described as u64 before: the bytes of every offset a log can
//! have are the same either way.)
//! Membership is not persisted: when a coordinator moves, members find the
//! new one, are unknown there, and rejoin (a rebalance).

pub mod core;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::oneshot;

use self::core::{Answer, GroupsCore, Ticket};

/// Committed offsets one offsets partition's cache holds at most.
pub const CACHED_OFFSETS_MAX: usize = 1_000_000;

/// A committed offset's key: group, topic, partition.
pub type OffsetKey = (String, String, u32);

/// The committed offsets of one offsets partition led here, as of a Raft
/// term (a new term means another leader may have written: read again).
#[derive(Debug, Default)]
pub struct OffsetCache {
    pub term: u64,
    pub offsets: BTreeMap<OffsetKey, i64>,
}

/// The group coordinator's state on one node.
pub struct Coordinator {
    pub core: Mutex<GroupsCore>,
    waiters: Mutex<BTreeMap<Ticket, oneshot::Sender<Answer>>>,
    next_ticket: AtomicU64,
    /// By offsets partition.
    pub offsets: tokio::sync::Mutex<BTreeMap<u32, OffsetCache>>,
}

impl Coordinator {
    pub fn new(nonce: u64) -> Coordinator {
        Coordinator {
            core: Mutex::new(GroupsCore::new(nonce)),
            waiters: Mutex::new(BTreeMap::new()),
            next_ticket: AtomicU64::new(1),
            offsets: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// [`GroupsCore::coordinates`], with the answers to the requests of
    /// dropped groups delivered.
    pub fn coordinates(&self, partition: u32, term: u64, of_partition: impl Fn(&str) -> bool) -> bool {
        let mut answers = Vec::new();
        let current = self.core().coordinates(partition, term, of_partition, &mut answers);
        self.deliver(answers);
        current
    }

    pub fn core(&self) -> std::sync::MutexGuard<'_, GroupsCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ticket and the channel its answer arrives on.
    pub fn park(&self) -> (Ticket, oneshot::Receiver<Answer>) {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (send, receive) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ticket, send);
        (ticket, receive)
    }

    /// Forgets a ticket whose request was refused at once.
    pub fn unpark(&self, ticket: Ticket) {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&ticket);
    }

    /// Delivers answers to their parked requests.
    pub fn deliver(&self, answers: Vec<Answer>) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for answer in answers {
            let ticket = match &answer {
                Answer::Join(t, _) | Answer::Sync(t, _) => *t,
            };
            if let Some(waiter) = waiters.remove(&ticket) {
                let _ = waiter.send(answer);
            }
        }
    }
}

/// The record key of a committed offset.
pub fn offset_key(group: &str, topic: &str, partition: u32) -> Bytes {
    Bytes::from(format!("{group}\u{0}{topic}\u{0}{partition}"))
}

/// A committed offset from its record, if the record is one.
pub fn parse_offset(key: &[u8], value: Option<&[u8]>) -> Option<(OffsetKey, Option<i64>)> {
    let key = std::str::from_utf8(key).ok()?;
    let mut parts = key.split('\u{0}');
    let (group, topic, partition) = (parts.next()?, parts.next()?, parts.next()?.parse().ok()?);
    if parts.next().is_some() {
        return None;
    }
    let offset = match value {
        None => None,
        Some(v) => Some(i64::from_le_bytes(<[u8; 8]>::try_from(v).ok()?)),
    };
    Some(((group.to_string(), topic.to_string(), partition), offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_records_round_trip_and_other_records_are_not_offsets() {
        let key = offset_key("g", "orders", 7);
        let value = 42u64.to_le_bytes();
        let parsed = parse_offset(&key, Some(&value)).expect("an offset");
        assert_eq!(parsed, (("g".into(), "orders".into(), 7), Some(42)));
        assert_eq!(parse_offset(&key, None).expect("a deletion").1, None);
        // A Kafka client's reset to the earliest, kept as it came.
        let earliest = (-2i64).to_le_bytes();
        assert_eq!(parse_offset(&key, Some(&earliest)).expect("an offset").1, Some(-2));
        assert!(parse_offset(b"g\0orders", Some(&value)).is_none());
        assert!(parse_offset(&key, Some(b"short")).is_none());
    }

    /// A coordinator that leads an offsets partition again in a later term
    /// drops the groups it kept from the earlier one, and only those.
    #[test]
    fn groups_kept_from_an_earlier_term_of_their_partition_are_dropped() {
        let coordinator = Coordinator::new(1);
        let join = |group: &str| core::Join {
            group: group.into(),
            member_id: String::new(),
            client_id: "c".into(),
            client_host: String::new(),
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Bytes::new())],
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 5_000,
            instance_id: None,
        };
        let of_partition_0 = |g: &str| g.starts_with("p0-");
        assert!(coordinator.coordinates(0, 3, of_partition_0));
        for group in ["p0-a", "p1-b"] {
            coordinator.core().join(join(group), 1, 0).expect("joins");
        }
        coordinator.coordinates(0, 3, of_partition_0);
        assert!(coordinator.core().group("p0-a").is_some(), "the same term keeps them");
        assert!(coordinator.coordinates(0, 5, of_partition_0));
        assert!(coordinator.core().group("p0-a").is_none(), "a later term drops them");
        assert!(
            !coordinator.coordinates(0, 4, of_partition_0),
            "a late answer of an older term"
        );
        assert!(coordinator.core().group("p1-b").is_some(), "another partition's stay");
    }
}
