//! The deterministic simulation (`runnel_verify::sim`): whole clusters in one
//! process under seeded network faults, crashes (unsynced tails lost) and
//! partitions. `RUNNEL_SEED=N cargo test -p runnel-verify --test sim` replays one seed;
//! `RUNNEL_SIM_SEEDS=K` runs K seeds instead of the default.

use runnel_verify::fixtures::scratch_dir;
use runnel_verify::sim::{run, SimConfig, SimReport};

/// Seeds the suite runs by default.
const SEEDS: u64 = 200;

/// A scratch directory on tmpfs when there is one (the simulation tracks
/// what is synced itself, so real fsyncs only cost time), else the default.
fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = scratch_dir("runnel-sim-", Some(shm)) {
            return dir;
        }
    }
    scratch_dir("runnel-sim-", None).expect("temp dir")
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

fn run_seed(seed: u64, config: &SimConfig, dir: &std::path::Path) -> SimReport {
    match run(seed, config, dir) {
        Ok(report) => report,
        Err(error) => {
            panic!("the simulation failed: {error}\nreplay: RUNNEL_SEED={seed} cargo test -p runnel-verify --test sim")
        }
    }
}

/// The seeds to run: the one named by `one_var`, else `1..=` the count
/// `many_var` names (default `count`).
fn seeds_from_env(one_var: &str, many_var: &str, count: u64) -> Vec<u64> {
    match env_u64(one_var) {
        Some(seed) => vec![seed],
        None => (1..=env_u64(many_var).unwrap_or(count)).collect(),
    }
}

/// Runs `seeds`: their totals, and each failing seed's failure with its
/// last 40 events.
fn run_seeds(seeds: &[u64], config: &SimConfig) -> (SimReport, Vec<String>) {
    let dir = scratch();
    let mut totals = SimReport::default();
    let mut failures = Vec::new();
    for &seed in seeds {
        let report = run_seed(seed, config, dir.path());
        if let Some(failure) = report.failure() {
            let trace: Vec<String> = report.trace.iter().rev().take(40).rev().cloned().collect();
            failures.push(format!("{failure}\n  last events:\n    {}", trace.join("\n    ")));
        }
        totals.add(report);
    }
    (totals, failures)
}

#[test]
fn seeds_lose_and_duplicate_nothing_acknowledged() {
    let seeds = seeds_from_env("RUNNEL_SEED", "RUNNEL_SIM_SEEDS", SEEDS);
    let started = std::time::Instant::now();
    let (totals, failures) = run_seeds(&seeds, &SimConfig::default());
    println!(
        "{} seeds in {:.1} s: {}",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        totals.summary()
    );
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed (replay one with RUNNEL_SEED=<seed> cargo test -p runnel-verify --test sim):\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n")
    );
    if seeds.len() > 1 {
        // The runs must have exercised something.
        assert!(
            totals.verdict.acknowledged > 1_000,
            "only {} acknowledged",
            totals.verdict.acknowledged
        );
        assert!(totals.faults.get("crash_mid_ready").copied().unwrap_or(0) > 0);
        assert!(totals.faults.get("partition").copied().unwrap_or(0) > 0);
        assert!(totals.bytes_lost > 0, "no crash lost an unsynced tail");
        assert!(totals.task_failures > 0, "no dataflow task failed and restarted");
        assert!(
            totals.dataflow_results > 1_000,
            "only {} dataflow results",
            totals.dataflow_results
        );
    }
}

/// Found by the table join: after a whole-cluster restart, a partition's new
/// leader answered fetches from a commit point behind its predecessor's
/// (it had the table's rows but not yet their commit), so a task starting
/// then took the table for read to its end with half its rows, and the
/// join dropped attempts. A leader now answers reads once its commit point
/// is of its own term. Both seeds fail without that.
#[test]
fn a_new_leader_serves_reads_only_from_a_commit_point_of_its_term() {
    let (totals, failures) = run_seeds(&[251, 299], &SimConfig::default());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(totals.dataflow_results > 1_000, "{}", totals.summary());
}

/// Seeds the disk-damage suite runs by default.
const DAMAGE_SEEDS: u64 = 40;

/// Replicas damaged while their node was down are found when they open,
/// removed from their group by its leader, quarantined and rebuilt from
/// their peers (the controller core's repair decisions); nothing
/// acknowledged is lost and the groups converge to their assignments.
#[test]
fn damaged_replicas_are_rebuilt_and_nothing_acknowledged_is_lost() {
    let config = SimConfig {
        disk_damage: true,
        ..SimConfig::default()
    };
    let seeds = seeds_from_env("RUNNEL_DAMAGE_SEED", "RUNNEL_DAMAGE_SEEDS", DAMAGE_SEEDS);
    let (totals, failures) = run_seeds(&seeds, &config);
    println!("{} seeds with disk damage: {}", seeds.len(), totals.summary());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if seeds.len() > 1 {
        let count = |kind: &str| totals.faults.get(kind).copied().unwrap_or(0);
        let damaged = count("damage_raft_meta")
            + count("damage_log_meta")
            + count("damage_deleted_segment")
            + count("damage_flipped_byte");
        assert!(damaged > 0, "nothing was damaged: {:?}", totals.faults);
        assert!(count("damage_detected") > 0, "no damage was found: {:?}", totals.faults);
        assert!(
            count("repair_quarantined") > 0,
            "no damaged replica was rebuilt: {:?}",
            totals.faults
        );
    }
}

#[test]
fn a_seed_replays_exactly() {
    let dir = scratch();
    let config = SimConfig {
        duration_ms: 10_000,
        ..SimConfig::default()
    };
    let first = run_seed(7, &config, dir.path());
    let second = run_seed(7, &config, dir.path());
    assert_eq!(first.trace, second.trace);
    assert_eq!(
        serde_json::to_string(&first).expect("json"),
        serde_json::to_string(&second).expect("json")
    );
    assert!(first.verdict.acknowledged > 0);
}

#[test]
fn an_injected_bug_is_caught() {
    let dir = scratch();
    let config = SimConfig {
        bug_ack_before_commit: true,
        ..SimConfig::default()
    };
    let caught: Vec<u64> = (1..=20)
        .filter(|&seed| {
            let report = run_seed(seed, &config, dir.path());
            report.verdict.anomaly_counts.get("lost").copied().unwrap_or(0) > 0
        })
        .collect();
    assert!(!caught.is_empty(), "acking before commit lost nothing in 20 seeds");
    println!("seeds whose checker reported lost records: {caught:?}");
}

#[test]
fn an_injected_dataflow_bug_is_caught() {
    let dir = scratch();
    let config = SimConfig {
        bug_unsequenced_task_output: true,
        ..SimConfig::default()
    };
    let caught: Vec<u64> = (1..=5)
        .filter(|&seed| {
            let report = run_seed(seed, &config, dir.path());
            report
                .verdict
                .anomaly_counts
                .get("dataflow_duplicated")
                .copied()
                .unwrap_or(0)
                > 0
        })
        .collect();
    assert!(
        !caught.is_empty(),
        "unsequenced task output duplicated nothing in 5 seeds"
    );
    println!("seeds whose checker reported duplicated results: {caught:?}");
}

/// Seeds run with `min.insync.replicas` equal to the replication factor.
const MIN_INSYNC_SEEDS: u64 = 20;

/// With `min.insync.replicas=3` on 3 replicas, acks=all is refused while a
/// replica is down or lagging (nothing written) or answered as short of
/// copies (written, so unknown to the producer); the partition cores make
/// those decisions as on a real node, and nothing acknowledged is lost or
/// duplicated.
#[test]
fn acks_all_with_min_insync_above_a_majority_loses_nothing() {
    let config = SimConfig {
        min_insync: Some(3),
        ..SimConfig::default()
    };
    let seeds = seeds_from_env("RUNNEL_INSYNC_SEED", "RUNNEL_INSYNC_SEEDS", MIN_INSYNC_SEEDS);
    let (totals, failures) = run_seeds(&seeds, &config);
    println!("{} seeds with min.insync.replicas=3: {}", seeds.len(), totals.summary());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if seeds.len() > 1 {
        let refused = totals.faults.get("refused_not_enough_replicas").copied().unwrap_or(0);
        assert!(refused > 0, "no produce was refused: {:?}", totals.faults);
        assert!(
            totals.verdict.acknowledged > 100,
            "only {} acknowledged",
            totals.verdict.acknowledged
        );
    }
}

/// Seeds run with a short retention.
const RETENTION_SEEDS: u64 = 20;

/// With `retention.ms` of 3 simulated seconds and small segments, every
/// replica deletes expired segments through its Raft log while nodes crash,
/// restart and are cut off: followers behind the deleted entries catch up
/// from snapshots, no deletion takes a record younger than the retention,
/// and nothing acknowledged at or after the final log start is lost.
#[test]
fn retention_deletes_only_expired_records_and_followers_catch_up_from_snapshots() {
    let config = SimConfig {
        retention_ms: Some(3_000),
        dataflow: false,
        ..SimConfig::default()
    };
    let seeds = seeds_from_env("RUNNEL_RETENTION_SEED", "RUNNEL_RETENTION_SEEDS", RETENTION_SEEDS);
    let (totals, failures) = run_seeds(&seeds, &config);
    println!("{} seeds with retention.ms=3000: {}", seeds.len(), totals.summary());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if seeds.len() > 1 {
        let count = |kind: &str| totals.faults.get(kind).copied().unwrap_or(0);
        assert!(
            count("retention_compactions") > 0,
            "nothing was deleted: {:?}",
            totals.faults
        );
        assert!(
            count("snapshots_sent") > 0,
            "no follower needed a snapshot: {:?}",
            totals.faults
        );
        assert!(totals.verdict.expired > 0, "no acknowledged write expired");
    }
}

/// Seed 86 with retention and disk damage found (session 19) a candidate
/// whose unapplied entries held a flipped byte hearing a commit point in a
/// vote answer: raft-rs's commit by vote, reading them, stopped the
/// process, and `ReplicaCore::check_commit_by_vote` now reads them first so
/// the damage fails the replica and it is repaired. Since leaders serve
/// reads only from a commit point of their own term (session 21) the
/// schedules differ, and no seed reaches that path any more: with the
/// guard removed, retention-and-damage seeds 1–700 and damage seeds
/// 1401–1500 all pass. The seed stays as a run whose damage must be found
/// and repaired with nothing lost; the guard's own test builds the vote in
/// the replica harness (actors/tests/replica.rs,
/// `a_candidate_with_damaged_unapplied_entries_fails_as_damaged_not_a_crash`).
#[test]
fn seed_86_with_retention_and_disk_damage_is_repaired() {
    let config = SimConfig {
        retention_ms: Some(3_000),
        disk_damage: true,
        dataflow: false,
        ..SimConfig::default()
    };
    // Schedules move with the store's writes (control entries held beside
    // the log shifted seed 86's off damage): seeds from 86 on run until one
    // has damage found and repaired, at most ten, and none may fail.
    for seed in 86..96 {
        let (totals, failures) = run_seeds(&[seed], &config);
        assert!(failures.is_empty(), "seed {seed}: {}", failures.join("\n"));
        let count = |kind: &str| totals.faults.get(kind).copied().unwrap_or(0);
        if count("damage_detected") > 0 && count("repair_quarantined") > 0 {
            return;
        }
    }
    panic!("no seed of 86..96 had damage found and repaired");
}

/// Seeds run with a compacted topic.
const COMPACTION_SEEDS: u64 = 20;

/// A compacted topic whose records share 16 keys, with small segments:
/// every replica compacts its closed segments while nodes crash, restart
/// and are cut off, followers are sent compacted entries, and the checker
/// finds every acknowledged record in the final read unless a later record
/// of its key is there; replicas agree on every offset they both hold.
#[test]
fn compaction_keeps_the_latest_record_of_every_key_through_faults() {
    let config = SimConfig {
        compact: true,
        dataflow: false,
        ..SimConfig::default()
    };
    let seeds = seeds_from_env("RUNNEL_COMPACTION_SEED", "RUNNEL_COMPACTION_SEEDS", COMPACTION_SEEDS);
    let (totals, failures) = run_seeds(&seeds, &config);
    println!("{} seeds with a compacted topic: {}", seeds.len(), totals.summary());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if seeds.len() > 1 {
        let compactions = totals.faults.get("log_compactions").copied().unwrap_or(0);
        assert!(compactions > 0, "nothing was compacted: {:?}", totals.faults);
        assert!(totals.verdict.compacted > 0, "no acknowledged write was compacted away");
    }
}

/// `compact,delete`: compaction and retention on the same replicas during
/// the faults (a retention deletion no longer ends a compaction pass).
#[test]
fn compaction_and_retention_together_lose_nothing() {
    let config = SimConfig {
        compact: true,
        retention_ms: Some(3_000),
        dataflow: false,
        ..SimConfig::default()
    };
    let seeds = seeds_from_env("RUNNEL_COMPACT_DELETE_SEED", "RUNNEL_COMPACT_DELETE_SEEDS", 5);
    let (totals, failures) = run_seeds(&seeds, &config);
    println!("{} seeds with compact,delete: {}", seeds.len(), totals.summary());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if seeds.len() > 1 {
        let count = |kind: &str| totals.faults.get(kind).copied().unwrap_or(0);
        assert!(
            count("log_compactions") > 0 && count("retention_compactions") > 0,
            "{:?}",
            totals.faults
        );
        assert!(
            totals.verdict.expired > 0 && totals.verdict.compacted > 0,
            "{}",
            totals.summary()
        );
    }
}

/// Seeds run with the dataflow as a stream–stream join.
const JOIN_SEEDS: u64 = 30;

/// The dataflow as a stream–stream self-join (two source stages over the
/// topic, a join stage): through crashes, restarts, partitions and task
/// moves, the sink holds every pair within the window exactly once.
#[test]
fn a_stream_join_emits_every_pair_exactly_once_through_faults() {
    let config = SimConfig {
        join_dataflow: true,
        ..SimConfig::default()
    };
    let seeds = seeds_from_env("RUNNEL_JOIN_SEED", "RUNNEL_JOIN_SEEDS", JOIN_SEEDS);
    let (totals, failures) = run_seeds(&seeds, &config);
    println!("{} seeds with a join: {}", seeds.len(), totals.summary());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if seeds.len() > 1 {
        assert!(
            totals.dataflow_results > 10_000 && totals.task_failures > 0,
            "the join's tasks failed and restarted, and many pairs were checked: {}",
            totals.summary()
        );
    }
}

/// The dataflow as an aggregate over a table (rows rewritten and deleted,
/// so they move between cards and leave them): through crashes, restarts,
/// partitions and task moves, the sink holds per card exactly the rows and
/// cents the topic's final table holds.
#[test]
fn a_table_aggregate_equals_the_final_table_through_faults() {
    let config = SimConfig {
        table_dataflow: true,
        ..SimConfig::default()
    };
    let seeds = seeds_from_env("RUNNEL_TABLE_SEED", "RUNNEL_TABLE_SEEDS", 10);
    let (totals, failures) = run_seeds(&seeds, &config);
    println!("{} seeds with a table aggregate: {}", seeds.len(), totals.summary());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if seeds.len() > 1 {
        assert!(
            totals.dataflow_results > 1_000 && totals.task_failures > 0,
            "the tasks failed and restarted, and many results were written: {}",
            totals.summary()
        );
    }
}

/// Runs long enough for the tasks to delete what every stage read from the
/// repartition topic (every 30 s of simulated time): the results stay
/// exact through the faults, and the repartition partitions start past 0.
#[test]
fn repartitioned_records_are_deleted_through_faults_and_results_stay_exact() {
    let config = SimConfig {
        duration_ms: 90_000,
        ..SimConfig::default()
    };
    let seeds = seeds_from_env("RUNNEL_PURGE_SEED", "RUNNEL_PURGE_SEEDS", 3);
    let (totals, failures) = run_seeds(&seeds, &config);
    println!("{} seeds of 90 s: {}", seeds.len(), totals.summary());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let purged = totals.faults.get("repartition_partitions_purged").copied().unwrap_or(0);
    assert!(
        purged > 0,
        "no repartition partition's records were deleted: {}",
        totals.summary()
    );
}

#[test]
fn an_injected_dataflow_bug_is_caught_in_a_join() {
    let dir = scratch();
    let config = SimConfig {
        join_dataflow: true,
        bug_unsequenced_task_output: true,
        ..SimConfig::default()
    };
    let caught = (1..=5).find(|&seed| {
        let report = run_seed(seed, &config, dir.path());
        report
            .verdict
            .anomaly_counts
            .get("dataflow_duplicated")
            .copied()
            .unwrap_or(0)
            > 0
    });
    assert!(
        caught.is_some(),
        "unsequenced join output duplicated nothing in 5 seeds"
    );
}
