//! Many nodes in one process over the simulated network: views converge, a
//! partition splits them, healing merges them, crashes and restarts are seen,
//! and the same seed reproduces the same event order.
//!
//! `RUNNEL_SEED=<n> cargo test -p runnel-cluster --test sim` replays one seed.

use std::collections::BTreeMap;

use runnel_cluster::sim::{FaultConfig, SimCluster};
use runnel_cluster::{MemberState, MembershipConfig, NodeId};

const NODES: u32 = 7;
const SETTLE_MS: u64 = 3_000;

fn seeds() -> Vec<u64> {
    match std::env::var("RUNNEL_SEED") {
        Ok(seed) => vec![seed.parse().expect("RUNNEL_SEED must be a number")],
        Err(_) => (0..40).collect(),
    }
}

fn expect_views(cluster: &SimCluster, seed: u64, phase: &str, expected: impl Fn(NodeId, NodeId) -> MemberState) {
    for of in cluster.node_ids() {
        let view = cluster.view(of);
        if view.is_empty() {
            continue; // crashed
        }
        let want: BTreeMap<NodeId, MemberState> = cluster
            .node_ids()
            .into_iter()
            .filter(|&n| n != of)
            .map(|n| (n, expected(of, n)))
            .collect();
        assert_eq!(
            view, want,
            "seed {seed}, phase {phase}: node {of}'s view is wrong (replay with RUNNEL_SEED={seed})"
        );
    }
}

/// One full scenario; returns the event trace.
fn scenario(seed: u64) -> Vec<String> {
    let mut cluster = SimCluster::new(seed, NODES, FaultConfig::default(), MembershipConfig::default());
    tracing::info!(seed, "phase: form the cluster from seeds");
    cluster.run_for(SETTLE_MS);
    expect_views(&cluster, seed, "formed", |_, _| MemberState::Alive);

    tracing::info!(seed, "phase: partition {{1,2,3}} | {{4,5,6,7}}");
    let minority: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let majority: Vec<NodeId> = (4..=NODES).map(NodeId).collect();
    cluster.partition(&[minority.clone(), majority]);
    cluster.run_for(SETTLE_MS);
    let same_side = |a: NodeId, b: NodeId| minority.contains(&a) == minority.contains(&b);
    expect_views(&cluster, seed, "partitioned", |a, b| {
        if same_side(a, b) {
            MemberState::Alive
        } else {
            MemberState::Dead
        }
    });

    tracing::info!(seed, "phase: heal");
    cluster.heal();
    cluster.run_for(SETTLE_MS);
    expect_views(&cluster, seed, "healed", |_, _| MemberState::Alive);

    tracing::info!(seed, "phase: crash node 5, then restart it");
    cluster.crash(NodeId(5));
    cluster.run_for(SETTLE_MS);
    expect_views(&cluster, seed, "crashed", |_, b| {
        if b == NodeId(5) {
            MemberState::Dead
        } else {
            MemberState::Alive
        }
    });
    cluster.restart(NodeId(5));
    cluster.run_for(SETTLE_MS);
    expect_views(&cluster, seed, "restarted", |_, _| MemberState::Alive);
    let rejoined = cluster
        .trace()
        .iter()
        .filter(|line| line.contains("NodeUp { node: 5, incarnation: 2"))
        .count();
    assert_eq!(
        rejoined,
        NODES as usize - 1,
        "seed {seed}: every other node saw node 5's new incarnation"
    );
    let stats = cluster.stats();
    assert!(
        stats.dropped > 0 && stats.duplicated > 0,
        "seed {seed}: faults were injected: {stats:?}"
    );
    cluster.trace().to_vec()
}

#[test]
fn partition_heal_crash_restart_over_many_seeds() {
    for seed in seeds() {
        scenario(seed);
    }
}

#[test]
fn the_same_seed_gives_the_same_event_order() {
    let first = scenario(7);
    let again = scenario(7);
    assert_eq!(first, again);
    let other = scenario(8);
    assert_ne!(first, other, "different seeds should give different timings");
}
