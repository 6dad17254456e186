//! The high-intensity nemesis's executor: faults overlap, each undone when
//! it ends, and a fault is injected only while a majority of the nodes
//! stays up and reachable (at most a minority killed or paused at once, and
//! a network cut only while every node is up). Killed nodes may have their
//! files damaged (a flipped byte, a deleted segment) before they restart.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use runnel_actors::client::Client;
use runnel_actors::metadata::NodeId;
use runnel_cluster::sim::SimRng;

use super::nemesis::{DiskDamage, Fault, KillTarget, Step};
use super::{Injected, Timeline, TOPIC};
use crate::fixtures::ProcessCluster;

/// How long finding a kill's target (a leader) may take.
const TARGET_LOOKUP: Duration = Duration::from_millis(1_000);

/// A fault in effect, undone at `end_ms` (ms into the run).
struct Active {
    end_ms: u64,
    done: Done,
}

/// What a fault did, so it can be undone.
enum Done {
    Killed(NodeId),
    Paused(NodeId),
    /// Paused; killed (never resumed) and restarted when the fault ends.
    PausedToKill(NodeId),
    /// Killed; its files damaged, then restarted, when the fault ends.
    KilledToDamage(NodeId, DiskDamage),
    Cut,
}

/// Runs `plan` (steps may overlap) and undoes every fault by its end.
pub(super) async fn run(
    cluster: &mut ProcessCluster,
    client: &Client,
    plan: &[Step],
    timeline: &Timeline,
    seed: u64,
) -> anyhow::Result<Injected> {
    let mut injected = Injected::default();
    for step in plan {
        *injected.scheduled.entry(scheduled_kind(&step.fault)).or_default() += 1;
    }
    let mut rng = SimRng::new(seed ^ 0x5eed);
    let mut active: Vec<Active> = Vec::new();
    let mut damaged = Damaged::default();
    let start = Instant::now();
    for step in plan {
        end_due(
            cluster,
            &mut active,
            step.at_ms,
            start,
            timeline,
            &mut rng,
            &mut damaged,
        )
        .await?;
        tokio::time::sleep_until((start + Duration::from_millis(step.at_ms)).into()).await;
        match inject(cluster, client, &step.fault, &active, &mut rng).await? {
            Some((done, text)) => {
                *injected.by_kind.entry(kind(&done)).or_default() += 1;
                timeline.event("fault", format!("{text} for {} ms", step.lasts_ms));
                active.push(Active {
                    end_ms: step.at_ms + step.lasts_ms,
                    done,
                });
            }
            None => {
                injected.skipped += 1;
                timeline.event("fault", format!("{}: skipped (a majority must stay up)", step.fault));
            }
        }
    }
    end_due(cluster, &mut active, u64::MAX, start, timeline, &mut rng, &mut damaged).await?;
    Ok(injected)
}

fn scheduled_kind(fault: &Fault) -> &'static str {
    match fault {
        Fault::Kill(KillTarget::LeaderOf(_)) => "leader_kill",
        Fault::Kill(_) => "kill",
        Fault::Pause(_) => "pause",
        Fault::Partition(_) => "partition",
        Fault::PauseThenKill(_) => "pause_then_kill",
        Fault::KillDuringMoves => "kill_during_moves",
        Fault::KillAndDamage(_, DiskDamage::FlippedByte) => "kill_flipped_byte",
        Fault::KillAndDamage(_, DiskDamage::DeletedSegment) => "kill_deleted_segment",
    }
}

fn kind(done: &Done) -> &'static str {
    match done {
        Done::Killed(_) => "kill",
        Done::Paused(_) => "pause",
        Done::PausedToKill(_) => "pause_then_kill",
        Done::KilledToDamage(_, DiskDamage::FlippedByte) => "kill_flipped_byte",
        Done::KilledToDamage(_, DiskDamage::DeletedSegment) => "kill_deleted_segment",
        Done::Cut => "partition",
    }
}

/// Undoes, in time order, every fault that ends by `until_ms`.
async fn end_due(
    cluster: &mut ProcessCluster,
    active: &mut Vec<Active>,
    until_ms: u64,
    start: Instant,
    timeline: &Timeline,
    rng: &mut SimRng,
    damaged: &mut Damaged,
) -> anyhow::Result<()> {
    active.sort_by_key(|a| a.end_ms);
    while active.first().is_some_and(|a| a.end_ms <= until_ms) {
        let ended = active.remove(0);
        tokio::time::sleep_until((start + Duration::from_millis(ended.end_ms)).into()).await;
        let text = undo(cluster, ended.done, rng, damaged)?;
        timeline.event("recover", text);
    }
    Ok(())
}

fn undo(cluster: &mut ProcessCluster, done: Done, rng: &mut SimRng, damaged: &mut Damaged) -> anyhow::Result<String> {
    Ok(match done {
        Done::Killed(node) => {
            cluster.restart(node)?;
            format!("restarted node {node}")
        }
        Done::Paused(node) => {
            cluster.resume(node)?;
            format!("SIGCONT node {node}")
        }
        Done::PausedToKill(node) => {
            cluster.kill(node)?;
            cluster.restart(node)?;
            format!("SIGKILLed paused node {node} and restarted it")
        }
        Done::KilledToDamage(node, damage) => {
            let what = damage_files(&cluster.command.dir.join(format!("data-{node}")), damage, rng, damaged)?;
            cluster.restart(node)?;
            format!("{what} on node {node}, then restarted it")
        }
        Done::Cut => {
            cluster.heal_network()?;
            "network healed".to_string()
        }
    })
}

/// Injects `fault` if a majority stays up: what was done and its
/// description, or `None` when skipped.
async fn inject(
    cluster: &mut ProcessCluster,
    client: &Client,
    fault: &Fault,
    active: &[Active],
    rng: &mut SimRng,
) -> anyhow::Result<Option<(Done, String)>> {
    let nodes = cluster.node_count();
    let up: Vec<NodeId> = cluster
        .running()
        .into_iter()
        .filter(|n| !cluster.is_paused(*n))
        .collect();
    let cut = active.iter().any(|a| matches!(a.done, Done::Cut));
    let room = !cut && (nodes as usize - up.len()) < ((nodes as usize).saturating_sub(1)) / 2;
    let target = |node: NodeId| (room && up.contains(&node)).then_some(node);
    Ok(match fault {
        Fault::Partition(side) if !cut && up.len() == nodes as usize => {
            cluster.cut(side)?;
            Some((Done::Cut, fault.to_string()))
        }
        Fault::Partition(_) => None,
        Fault::Pause(node) => match target(*node) {
            Some(node) => {
                cluster.pause(node)?;
                Some((Done::Paused(node), format!("SIGSTOP node {node}")))
            }
            None => None,
        },
        Fault::PauseThenKill(node) => match target(*node) {
            Some(node) => {
                cluster.pause(node)?;
                Some((
                    Done::PausedToKill(node),
                    format!("SIGSTOP node {node} (to be SIGKILLed)"),
                ))
            }
            None => None,
        },
        Fault::KillAndDamage(node, damage) => match target(*node) {
            Some(node) => {
                cluster.kill(node)?;
                Some((
                    Done::KilledToDamage(node, *damage),
                    format!("SIGKILL node {node} (its files to be damaged)"),
                ))
            }
            None => None,
        },
        Fault::Kill(_) | Fault::KillDuringMoves => {
            // Bounded, so that the schedule does not fall behind while
            // nodes are down.
            let chosen = tokio::time::timeout(TARGET_LOOKUP, kill_target(client, fault))
                .await
                .ok()
                .flatten();
            let node = chosen.unwrap_or_else(|| NodeId(rng.between(1, u64::from(nodes)) as u32));
            match target(node) {
                Some(node) => {
                    cluster.kill(node)?;
                    Some((Done::Killed(node), format!("{fault} -> SIGKILL node {node}")))
                }
                None => None,
            }
        }
    })
}

/// The node a kill hits: a given one, a partition's leader, the controller
/// leader, or (while replicas move) the leader of a partition with
/// learners. `None` when the cluster does not say.
async fn kill_target(client: &Client, fault: &Fault) -> Option<NodeId> {
    match fault {
        Fault::Kill(KillTarget::Node(node)) => Some(*node),
        Fault::Kill(KillTarget::LeaderOf(partition)) => {
            let info = client.describe_topic(TOPIC).await.ok()?;
            info.partitions.iter().find(|p| p.partition == *partition)?.leader
        }
        Fault::Kill(KillTarget::Controller) => {
            client.topics().await.ok()?;
            client.controller_leader()
        }
        Fault::KillDuringMoves => {
            let info = client.describe_topic(TOPIC).await.ok()?;
            let moving = info.partitions.iter().find(|p| !p.learners.is_empty());
            moving.or(info.partitions.first())?.leader
        }
        _ => None,
    }
}

/// The partition groups whose files were damaged in this run: each at most
/// once, so that no partition has more than one damaged copy (damage to a
/// majority of a partition's replicas is not something a cluster can heal
/// without losing what only they held; such a partition rightly stays
/// unavailable).
#[derive(Default)]
struct Damaged(std::collections::BTreeSet<String>);

/// Damages one replica of a killed node (its data in `data_dir`): a byte
/// flipped in the middle of, or the deletion of, the oldest closed segment
/// of a replica picked by `rng` among groups not damaged before. What was
/// done, or why nothing was.
fn damage_files(
    data_dir: &Path,
    damage: DiskDamage,
    rng: &mut SimRng,
    damaged: &mut Damaged,
) -> anyhow::Result<String> {
    let partitions = data_dir.join("broker").join("partitions");
    let mut replicas: Vec<PathBuf> = std::fs::read_dir(&partitions)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    replicas.retain(|p| {
        p.is_dir()
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n != "0" && !damaged.0.contains(n))
    });
    replicas.sort();
    let with_closed: Vec<(PathBuf, PathBuf)> = replicas
        .iter()
        .filter_map(|replica| oldest_closed_segment(replica).map(|s| (replica.clone(), s)))
        .collect();
    if with_closed.is_empty() {
        return Ok("no replica (of a group not damaged before) had a closed segment to damage".to_string());
    }
    let (replica, segment) = &with_closed[rng.between(0, with_closed.len() as u64 - 1) as usize];
    let name = replica.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
    damaged.0.insert(name.clone());
    match damage {
        DiskDamage::FlippedByte => {
            let mut bytes = std::fs::read(segment)?;
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xFF;
            std::fs::write(segment, bytes)?;
            Ok(format!(
                "flipped byte {middle} of {} of group {name}",
                segment.display()
            ))
        }
        DiskDamage::DeletedSegment => {
            std::fs::remove_file(segment)?;
            Ok(format!("deleted {} of group {name}", segment.display()))
        }
    }
}

/// A replica's oldest segment file, if a newer one follows it (so it is
/// closed).
fn oldest_closed_segment(replica: &Path) -> Option<PathBuf> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(replica.join("log"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    (segments.len() >= 2).then(|| segments.swap_remove(0))
}
