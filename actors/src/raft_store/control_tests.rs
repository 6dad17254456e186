//! Control entries held beside the log: record offsets run on without a
//! gap, and every way a store changes (a cut tail, a crash, retention, a
//! full file) leaves the same entries at the same indexes after an open.

use raft::eraftpb::{ConfChangeV2, Entry, EntryType};
use raft::{GetEntriesContext, Storage as _};
use runnel_storage::LogConfig;

use super::controls::KEY_CONTROL_ENTRIES;
use super::tests::{normal_entry, small_segment_store, values};
use super::{HeldControls, PartitionStore};

/// The empty entry a new leader appends.
fn leader_entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        ..Entry::default()
    }
}

/// A configuration change whose data is `data` (opaque to the store).
fn conf_entry(index: u64, term: u64, data: Vec<u8>) -> Entry {
    let mut entry = Entry {
        index,
        term,
        data: data.into(),
        ..Entry::default()
    };
    entry.set_entry_type(EntryType::EntryConfChangeV2);
    entry
}

fn offsets(store: &PartitionStore, last: u64) -> Vec<(u64, u64)> {
    (1..=last).map(|i| store.entry_offsets(i).expect("an entry")).collect()
}

/// Every record offset in the log, in order.
fn record_offsets(store: &PartitionStore) -> Vec<u64> {
    let batches = store.log().read(store.log().start_offset(), 1 << 20).expect("read");
    batches
        .iter()
        .filter(|b| !b.is_control())
        .flat_map(|b| b.records().map(|r| r.expect("record").offset).collect::<Vec<_>>())
        .collect()
}

/// What an entry says: index, term, type, and its data (a control
/// entry's bytes, or a batch's record values; a stored batch's header
/// differs from the one Raft gave, as the log places it).
type Said = (u64, u64, EntryType, Vec<String>);

fn said(entries: &[Entry]) -> Vec<Said> {
    entries
        .iter()
        .map(|e| {
            let data = if super::ControlEntry::is_control(e) {
                vec![format!("{:?}", e.data)]
            } else {
                runnel_storage::RecordBatch::from_bytes(e.data.clone())
                    .expect("batch")
                    .records()
                    .map(|r| format!("{:?}", r.expect("record").record.value))
                    .collect()
            };
            (e.index, e.term, e.get_entry_type(), data)
        })
        .collect()
}

fn entries(store: &PartitionStore, low: u64, high: u64) -> Vec<Said> {
    said(
        &store
            .entries(low, high, None, GetEntriesContext::empty(false))
            .expect("entries"),
    )
}

fn held(store: &PartitionStore) -> HeldControls {
    HeldControls::decode(store.meta.get(KEY_CONTROL_ENTRIES), store.meta.path()).expect("held")
}

fn reopen(store: PartitionStore, dir: &std::path::Path, config: &LogConfig) -> PartitionStore {
    drop(store);
    PartitionStore::open(dir, config.clone(), true).expect("reopen")
}

#[test]
fn control_entries_take_no_offset_and_are_the_same_entries_after_an_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut store, config) = small_segment_store(dir.path());
    let change = ConfChangeV2::default();
    let change_bytes = protobuf::Message::write_to_bytes(&change).expect("encode");
    let written = vec![
        leader_entry(1, 1),
        normal_entry(2, 1, "a"),
        normal_entry(3, 1, "b"),
        conf_entry(4, 1, change_bytes),
        leader_entry(5, 2),
        normal_entry(6, 2, "c"),
        leader_entry(7, 3),
    ];
    store.append(&written).expect("append");
    store.sync().expect("sync");
    let expected = vec![(0, 0), (0, 3), (3, 6), (6, 6), (6, 6), (6, 9), (9, 9)];
    assert_eq!(offsets(&store, 7), expected);
    assert_eq!(record_offsets(&store), (0..9).collect::<Vec<_>>(), "no gap, from 0");
    assert_eq!(entries(&store, 1, 8), said(&written), "as Raft gave them, from memory");

    let store = reopen(store, dir.path(), &config);
    assert!(store.recent.is_empty());
    assert_eq!(offsets(&store, 7), expected);
    assert_eq!(entries(&store, 1, 8), said(&written), "as Raft gave them, from disk");
    assert_eq!(
        (1..=7).map(|i| store.term(i).expect("term")).collect::<Vec<_>>(),
        vec![1, 1, 1, 1, 2, 2, 3]
    );
}

/// A new leader's entries replace a tail from a control entry, then from a
/// batch that a control entry at the same offset precedes: the control
/// entries before the cut stay, those after it go, and an open agrees.
#[test]
fn a_cut_tail_takes_its_control_entries_and_keeps_the_ones_before() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut store, config) = small_segment_store(dir.path());
    let first = vec![
        leader_entry(1, 1),
        normal_entry(2, 1, "a"),
        leader_entry(3, 2),
        normal_entry(4, 2, "b"),
        normal_entry(5, 2, "c"),
    ];
    store.append(&first).expect("append");
    store
        .append(&[leader_entry(3, 3), normal_entry(4, 3, "d")])
        .expect("cut at a control entry");
    assert_eq!(offsets(&store, 4), vec![(0, 0), (0, 3), (3, 3), (3, 6)]);
    assert_eq!(store.last_index_value(), 4);
    store
        .append(&[normal_entry(4, 4, "e"), leader_entry(5, 4)])
        .expect("cut after one");
    store.sync().expect("sync");
    assert_eq!(offsets(&store, 5), vec![(0, 0), (0, 3), (3, 3), (3, 6), (6, 6)]);
    assert_eq!(
        store.term(3).expect("term"),
        3,
        "the control entry before the cut stays"
    );
    assert_eq!(values(&store, 4, 5), vec![vec!["e/0", "e/1", "e/2"]]);
    let before = entries(&store, 1, 6);

    let store = reopen(store, dir.path(), &config);
    assert_eq!(offsets(&store, 5), vec![(0, 0), (0, 3), (3, 3), (3, 6), (6, 6)]);
    assert_eq!(entries(&store, 1, 6), before);
    assert_eq!(record_offsets(&store), (0..6).collect::<Vec<_>>());
}

/// The held entries are written at once, the log's batches at the next
/// sync: a crash that loses the log's unsynced tail leaves held entries
/// past it, which the open drops (nothing after them was acknowledged).
#[test]
fn held_entries_past_a_log_tail_lost_in_a_crash_are_dropped_on_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut store, config) = small_segment_store(dir.path());
    store
        .append(&[leader_entry(1, 1), normal_entry(2, 1, "a")])
        .expect("append");
    store.sync().expect("sync");
    store
        .append(&[normal_entry(3, 1, "b"), leader_entry(4, 2)])
        .expect("append");
    assert!(store.crash(0).expect("crash") > 0, "entry 3 was not synced");
    assert_eq!(held(&store).len(), 2, "entry 4 is held on disk");

    let store = reopen(store, dir.path(), &config);
    assert_eq!(store.last_index_value(), 2);
    assert_eq!(offsets(&store, 2), vec![(0, 0), (0, 3)]);
    assert_eq!(held(&store).len(), 1, "entry 4 was dropped from the file");
}

/// A control entry marked as in the log (as one read back from a store
/// written before control entries were held) is stored as a control batch
/// of one offset, and read back so marked: a follower sent it stores it
/// the same way, so both give every record the same offset.
#[test]
fn a_control_entry_in_the_log_takes_an_offset_on_every_replica_it_is_sent_to() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut leader, config) = small_segment_store(dir.path());
    let mut in_log = conf_entry(1, 1, b"in the log".to_vec());
    in_log.sync_log = true;
    let written = vec![in_log, leader_entry(2, 1), normal_entry(3, 1, "a")];
    leader.append(&written).expect("append");
    leader.sync().expect("sync");
    let expected = vec![(0, 1), (1, 1), (1, 4)];
    assert_eq!(offsets(&leader, 3), expected);
    assert_eq!(held(&leader).len(), 1, "only the unmarked one is held");

    let leader = reopen(leader, dir.path(), &config);
    let sent = leader
        .entries(1, 4, None, GetEntriesContext::empty(false))
        .expect("entries");
    assert!(
        sent[0].sync_log && !sent[1].sync_log,
        "the log's control batch reads back marked"
    );
    assert_eq!(said(&sent), said(&written));
    let follower_dir = tempfile::tempdir().expect("temp dir");
    let (mut follower, _) = small_segment_store(follower_dir.path());
    follower.append(&sent).expect("append");
    assert_eq!(offsets(&follower, 3), expected, "the follower places them alike");
    assert_eq!(record_offsets(&follower), record_offsets(&leader));
}

/// Retention moves the snapshot point past held entries: they leave the
/// file with the point's write, and the ones after it stay.
#[test]
fn retention_drops_the_held_entries_below_its_point_and_keeps_the_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut store, config) = small_segment_store(dir.path());
    let mut written = vec![leader_entry(1, 1)];
    written.extend((2..=40).map(|i| normal_entry(i, 1, &format!("e{i}"))));
    written.push(leader_entry(41, 2));
    written.push(normal_entry(42, 2, "last"));
    store.append(&written).expect("append");
    store.sync().expect("sync");
    store.set_commit(42);
    let compacted = store
        .compact_for_retention(1_000_000, 1_000, 42)
        .expect("retention")
        .expect("segments expired");
    assert!(compacted.index > 1 && compacted.index < 41, "{compacted:?}");
    let kept = held(&store);
    assert_eq!(
        (kept.len(), kept.term_and_offset(41).map(|(term, _)| term)),
        (1, Some(2)),
        "{kept:?}"
    );
    let point = compacted.index;
    let store = reopen(store, dir.path(), &config);
    assert_eq!(store.first_index_value(), point + 1);
    assert_eq!(entries(&store, point + 1, 43), said(&written[point as usize..]));
}

/// Damage that moves a held entry to another index (a metadata file
/// rewritten with its checksum made right) is found on open by the offset
/// it was held at, whether the log's batches now place it elsewhere or it
/// lands past the last entry below the log's end; neither shifts entries.
#[test]
fn a_held_entry_moved_to_another_index_is_damage_named_on_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut store, config) = small_segment_store(dir.path());
    let written = vec![
        leader_entry(1, 1),
        normal_entry(2, 1, "a"),
        normal_entry(3, 1, "b"),
        leader_entry(4, 2),
        normal_entry(5, 2, "c"),
    ];
    store.append(&written).expect("append");
    store.sync().expect("sync");
    for (moved_to, says) in [(3, "but the log places it at 3"), (9, "past the log's last entry")] {
        let mut moved = HeldControls::default();
        let path = store.meta.path().to_path_buf();
        moved.hold(&leader_entry(1, 1), 0, &path).expect("hold");
        moved.hold(&leader_entry(moved_to, 2), 6, &path).expect("hold");
        store
            .meta
            .set(KEY_CONTROL_ENTRIES, moved.encode().expect("encode"))
            .expect("write");
        let refused = PartitionStore::open(dir.path(), config.clone(), true)
            .err()
            .expect("damage");
        assert!(refused.is_damage(), "{refused}");
        assert!(refused.to_string().contains(says), "{refused}");
    }
}
