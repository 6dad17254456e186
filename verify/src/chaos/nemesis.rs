//! The nemesis's schedule: a pure function of the seed. Which node a
//! leader-targeted kill hits is decided when it happens (it depends on who
//! leads then); everything else is fixed by the seed.

use std::fmt;
use std::str::FromStr;

use runnel_cluster::sim::SimRng;
use runnel_cluster::NodeId;

/// The kinds of fault a run may inject (`--faults`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL a node: a random one, a partition leader, or the controller.
    Kill,
    /// SIGSTOP a node, SIGCONT it when the fault ends.
    Pause,
    /// Cut the network between a minority of nodes and the rest.
    Partition,
    /// Restart killed nodes when their fault ends (without it they stay down
    /// until the final heal, and re-replication must restore the replicas).
    Restart,
}

impl FromStr for FaultKind {
    type Err = String;

    fn from_str(text: &str) -> Result<FaultKind, String> {
        match text {
            "kill" => Ok(FaultKind::Kill),
            "pause" => Ok(FaultKind::Pause),
            "partition" => Ok(FaultKind::Partition),
            "restart" => Ok(FaultKind::Restart),
            other => Err(format!(
                "unknown fault {other:?} (expected kill, pause, partition or restart)"
            )),
        }
    }
}

/// Whom a kill hits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KillTarget {
    Node(NodeId),
    /// The leader of this partition of the checked topic, when it happens.
    LeaderOf(u32),
    /// The controller leader, when it happens.
    Controller,
}

/// Damage done to a killed node's files before it restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskDamage {
    /// One byte flipped in the middle of a closed segment of one replica.
    FlippedByte,
    /// A closed segment of one replica deleted.
    DeletedSegment,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    Kill(KillTarget),
    Pause(NodeId),
    /// These nodes on one side, every other node on the other.
    Partition(Vec<NodeId>),
    /// SIGSTOP a node, then SIGKILL it without ever resuming it (it is
    /// restarted when the fault ends).
    PauseThenKill(NodeId),
    /// Kill a node while a partition's replicas are moving (one holding a
    /// learner, else the leader of a partition), as a reconfiguration runs.
    KillDuringMoves,
    /// Kill a node and damage its files while it is down.
    KillAndDamage(NodeId, DiskDamage),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Kill(KillTarget::Node(node)) => write!(f, "kill node {node}"),
            Fault::Kill(KillTarget::LeaderOf(partition)) => write!(f, "kill the leader of partition {partition}"),
            Fault::Kill(KillTarget::Controller) => write!(f, "kill the controller leader"),
            Fault::Pause(node) => write!(f, "pause node {node}"),
            Fault::Partition(side) => write!(f, "cut nodes {side:?} off from the rest"),
            Fault::PauseThenKill(node) => write!(f, "pause node {node}, then kill it"),
            Fault::KillDuringMoves => write!(f, "kill a node while replicas move"),
            Fault::KillAndDamage(node, damage) => write!(f, "kill node {node} and damage its files ({damage:?})"),
        }
    }
}

/// One fault: when it starts (ms into the run) and how long it lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub at_ms: u64,
    pub lasts_ms: u64,
    pub fault: Fault,
}

/// Quiet time between faults, and how long a fault lasts.
const QUIET_MS: (u64, u64) = (2_000, 5_000);
const FAULT_MS: (u64, u64) = (3_000, 9_000);

/// The schedule of a run: one fault at a time, each followed by quiet time,
/// until `duration_ms`. Nodes are numbered `1..=nodes`.
pub fn plan(seed: u64, duration_ms: u64, kinds: &[FaultKind], nodes: u32, partitions: u32) -> Vec<Step> {
    let active: Vec<FaultKind> = kinds.iter().copied().filter(|k| *k != FaultKind::Restart).collect();
    let mut rng = SimRng::new(seed);
    let mut steps = Vec::new();
    let mut at_ms = rng.between(QUIET_MS.0, QUIET_MS.1);
    while !active.is_empty() && nodes > 0 && at_ms < duration_ms {
        let lasts_ms = rng.between(FAULT_MS.0, FAULT_MS.1).min(duration_ms - at_ms);
        let kind = active[rng.between(0, active.len() as u64 - 1) as usize];
        let node = NodeId(rng.between(1, u64::from(nodes)) as u32);
        let fault = match kind {
            FaultKind::Kill => match rng.between(0, 2) {
                0 => Fault::Kill(KillTarget::Node(node)),
                1 => Fault::Kill(KillTarget::LeaderOf(
                    rng.between(0, u64::from(partitions.max(1)) - 1) as u32
                )),
                _ => Fault::Kill(KillTarget::Controller),
            },
            FaultKind::Pause => Fault::Pause(node),
            FaultKind::Partition => Fault::Partition(minority(&mut rng, nodes)),
            FaultKind::Restart => unreachable!("filtered out above"),
        };
        steps.push(Step { at_ms, lasts_ms, fault });
        at_ms += lasts_ms + rng.between(QUIET_MS.0, QUIET_MS.1);
    }
    steps
}

/// How hard the nemesis hits (`--intensity`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Intensity {
    /// One fault at a time, each followed by quiet time.
    #[default]
    Normal,
    /// Overlapping faults up to a minority of the nodes, bursts of
    /// leader-targeted kills, pause-then-kill, kills while replicas move and
    /// disk damage to killed nodes.
    High,
}

/// Gap between two faults' starts under high intensity, and how long one lasts.
const HIGH_GAP_MS: (u64, u64) = (300, 2_500);
const HIGH_FAULT_MS: (u64, u64) = (2_000, 8_000);
/// Gap between the kills of a burst.
const BURST_GAP_MS: (u64, u64) = (150, 600);

/// The high-intensity schedule: faults start every 0.3-2.5 s and last 2-8 s,
/// so they overlap; the executor keeps those it can run without leaving
/// less than a majority of the nodes up (see `run_nemesis`). Partitions
/// are left to `--intensity normal`'s schedule only when asked for.
pub fn plan_high(seed: u64, duration_ms: u64, kinds: &[FaultKind], nodes: u32, partitions: u32) -> Vec<Step> {
    let mut rng = SimRng::new(seed);
    let mut steps = Vec::new();
    let mut at_ms = rng.between(HIGH_GAP_MS.0, HIGH_GAP_MS.1);
    let node_of = |rng: &mut SimRng| NodeId(rng.between(1, u64::from(nodes.max(1))) as u32);
    while nodes > 0 && at_ms < duration_ms {
        let lasts_ms =
            |rng: &mut SimRng, at_ms: u64| rng.between(HIGH_FAULT_MS.0, HIGH_FAULT_MS.1).min(duration_ms - at_ms);
        let roll = rng.between(0, 9);
        let faults: Vec<Fault> = match roll {
            0 | 1 if kinds.contains(&FaultKind::Kill) => {
                // A burst of leader-targeted kills.
                let count = rng.between(2, 3);
                (0..count)
                    .map(|_| {
                        Fault::Kill(KillTarget::LeaderOf(
                            rng.between(0, u64::from(partitions.max(1)) - 1) as u32
                        ))
                    })
                    .collect()
            }
            2 | 8 if kinds.contains(&FaultKind::Pause) && kinds.contains(&FaultKind::Kill) => {
                vec![Fault::PauseThenKill(node_of(&mut rng))]
            }
            3 if kinds.contains(&FaultKind::Kill) => vec![Fault::KillDuringMoves],
            4 if kinds.contains(&FaultKind::Kill) => {
                let damage = match rng.between(0, 1) {
                    0 => DiskDamage::FlippedByte,
                    _ => DiskDamage::DeletedSegment,
                };
                vec![Fault::KillAndDamage(node_of(&mut rng), damage)]
            }
            5 if kinds.contains(&FaultKind::Partition) => vec![Fault::Partition(minority(&mut rng, nodes))],
            6 if kinds.contains(&FaultKind::Pause) => vec![Fault::Pause(node_of(&mut rng))],
            _ if kinds.contains(&FaultKind::Kill) => vec![Fault::Kill(KillTarget::Node(node_of(&mut rng)))],
            _ => Vec::new(),
        };
        for fault in faults {
            if at_ms >= duration_ms {
                break;
            }
            let lasts_ms = lasts_ms(&mut rng, at_ms);
            steps.push(Step { at_ms, lasts_ms, fault });
            at_ms += rng.between(BURST_GAP_MS.0, BURST_GAP_MS.1);
        }
        at_ms += rng.between(HIGH_GAP_MS.0, HIGH_GAP_MS.1);
    }
    steps
}

/// A random non-empty minority of `1..=nodes` (sorted).
fn minority(rng: &mut SimRng, nodes: u32) -> Vec<NodeId> {
    let size = rng.between(1, u64::from((nodes.saturating_sub(1) / 2).max(1))) as usize;
    let mut all: Vec<NodeId> = (1..=nodes).map(NodeId).collect();
    // Fisher-Yates on the prefix we keep.
    for i in 0..size.min(all.len()) {
        let j = rng.between(i as u64, all.len() as u64 - 1) as usize;
        all.swap(i, j);
    }
    let mut side: Vec<NodeId> = all.into_iter().take(size).collect();
    side.sort_unstable();
    side
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [FaultKind; 4] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Partition,
        FaultKind::Restart,
    ];

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let a = plan(7, 60_000, &ALL, 5, 12);
        assert_eq!(a, plan(7, 60_000, &ALL, 5, 12));
        assert_ne!(a, plan(8, 60_000, &ALL, 5, 12));
    }

    #[test]
    fn faults_do_not_overlap_and_stay_within_the_run() {
        for seed in 0..200 {
            let steps = plan(seed, 60_000, &ALL, 5, 12);
            assert!(!steps.is_empty());
            for pair in steps.windows(2) {
                assert!(
                    pair[0].at_ms + pair[0].lasts_ms < pair[1].at_ms,
                    "seed {seed}: {pair:?}"
                );
            }
            for step in &steps {
                assert!(step.at_ms + step.lasts_ms <= 60_000);
                match &step.fault {
                    Fault::Partition(side) => assert!(!side.is_empty() && side.len() <= 2, "{side:?}"),
                    Fault::Pause(node) | Fault::Kill(KillTarget::Node(node)) => assert!((1..=5).contains(&node.0)),
                    Fault::Kill(KillTarget::LeaderOf(p)) => assert!(*p < 12),
                    Fault::Kill(KillTarget::Controller) => {}
                    other => panic!("not in a normal schedule: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_high_schedule_overlaps_faults_and_has_every_kind() {
        let steps = plan_high(3, 60_000, &ALL, 5, 12);
        assert_eq!(steps, plan_high(3, 60_000, &ALL, 5, 12), "a pure function of the seed");
        let overlapping = steps
            .windows(2)
            .filter(|pair| pair[1].at_ms < pair[0].at_ms + pair[0].lasts_ms)
            .count();
        assert!(overlapping > steps.len() / 2, "{overlapping} of {}", steps.len());
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..20 {
            for step in plan_high(seed, 60_000, &ALL, 5, 12) {
                assert!(step.at_ms + step.lasts_ms <= 60_000);
                kinds.insert(match step.fault {
                    Fault::Kill(KillTarget::LeaderOf(_)) => "leader kill",
                    Fault::Kill(_) => "kill",
                    Fault::Pause(_) => "pause",
                    Fault::Partition(_) => "partition",
                    Fault::PauseThenKill(_) => "pause then kill",
                    Fault::KillDuringMoves => "kill during moves",
                    Fault::KillAndDamage(_, DiskDamage::FlippedByte) => "flipped byte",
                    Fault::KillAndDamage(_, DiskDamage::DeletedSegment) => "deleted segment",
                });
            }
        }
        assert_eq!(kinds.len(), 8, "{kinds:?}");
        assert!(plan_high(1, 60_000, &[FaultKind::Pause], 5, 12)
            .iter()
            .all(|s| matches!(s.fault, Fault::Pause(_))));
    }

    #[test]
    fn only_the_chosen_kinds_are_injected() {
        for seed in 0..50 {
            let steps = plan(seed, 60_000, &[FaultKind::Partition], 3, 4);
            assert!(steps
                .iter()
                .all(|s| matches!(&s.fault, Fault::Partition(side) if side.len() == 1)));
        }
        assert!(plan(1, 60_000, &[FaultKind::Restart], 3, 4).is_empty());
        assert_eq!("pause".parse::<FaultKind>(), Ok(FaultKind::Pause));
        assert!("explode".parse::<FaultKind>().unwrap_err().contains("explode"));
    }
}
