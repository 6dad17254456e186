//! `runnel status --watch`: a live view of nodes and partitions, and an event
//! line, with a timestamp, for every change of node state, leadership,
//! voters or learners, so a person can watch failover and healing happen.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use runnel::client::protocol::NodeId;
use runnel::client::Client;
use runnel::cluster::protocol::{NodeRequest, NodeResponse};
use runnel::cluster::quic::ClusterClient;
use runnel::cluster::tls::CertDir;

/// Event lines kept on screen.
const EVENTS_SHOWN: usize = 20;

/// A partition's leader, voters and learners.
type Membership = (Option<NodeId>, Vec<NodeId>, Vec<NodeId>);

/// What one refresh saw: node states and, per (topic, partition), its membership.
#[derive(Default, PartialEq)]
struct Snapshot {
    nodes: BTreeMap<NodeId, String>,
    partitions: BTreeMap<(String, u32), Membership>,
}

pub fn run(seeds: Vec<SocketAddr>, certs: PathBuf, interval: Duration, count: Option<u64>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let identity = CertDir::new(&certs).client_identity()?;
        let cluster = ClusterClient::new(&identity, seeds.clone())?;
        let client = Client::connect(seeds, &certs).await?;
        let mut previous = Snapshot::default();
        let mut events: VecDeque<String> = VecDeque::new();
        let mut refreshes = 0u64;
        loop {
            let current = snapshot(&cluster, &client).await?;
            for event in changes(&previous, &current) {
                events.push_back(format!("{}  {event}", clock()));
                if events.len() > EVENTS_SHOWN {
                    events.pop_front();
                }
            }
            render(&current, &events);
            previous = current;
            refreshes += 1;
            if count.is_some_and(|c| refreshes >= c) {
                return Ok(());
            }
            tokio::time::sleep(interval).await;
        }
    })
}

async fn snapshot(cluster: &ClusterClient, client: &Client) -> anyhow::Result<Snapshot> {
    let mut snapshot = Snapshot::default();
    if let NodeResponse::Status { members, .. } = cluster.request(NodeRequest::Status, Duration::from_secs(5)).await? {
        snapshot.nodes = members.iter().map(|m| (m.node, m.state.to_string())).collect();
    }
    for topic in client.topics().await? {
        let Ok(info) = client.describe_topic(&topic.name).await else {
            continue;
        };
        for p in info.partitions {
            snapshot
                .partitions
                .insert((info.name.clone(), p.partition), (p.leader, p.voters, p.learners));
        }
    }
    Ok(snapshot)
}

/// Event descriptions for everything that differs between two refreshes.
fn changes(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let mut events = Vec::new();
    for (node, state) in &after.nodes {
        match before.nodes.get(node) {
            Some(old) if old != state => events.push(format!("node {node}: {old} -> {state}")),
            None if !before.nodes.is_empty() => events.push(format!("node {node}: joined ({state})")),
            _ => {}
        }
    }
    for ((topic, partition), (leader, voters, learners)) in &after.partitions {
        let Some((old_leader, old_voters, old_learners)) = before.partitions.get(&(topic.clone(), *partition)) else {
            if !before.partitions.is_empty() || before.nodes.is_empty() {
                events.push(format!(
                    "{topic}/{partition}: leader {}, voters {voters:?}",
                    node_or_none(leader)
                ));
            }
            continue;
        };
        if old_leader != leader {
            events.push(format!(
                "{topic}/{partition}: leader {} -> {}",
                node_or_none(old_leader),
                node_or_none(leader)
            ));
        }
        if old_voters != voters {
            events.push(format!("{topic}/{partition}: voters {old_voters:?} -> {voters:?}"));
        }
        if old_learners != learners {
            events.push(format!(
                "{topic}/{partition}: learners {old_learners:?} -> {learners:?}"
            ));
        }
    }
    events
}

fn render(snapshot: &Snapshot, events: &VecDeque<String>) {
    let mut out = String::from("\x1b[2J\x1b[H");
    out.push_str(&format!("runnel cluster at {} UTC\n", clock()));
    let nodes: Vec<String> = snapshot.nodes.iter().map(|(n, s)| format!("{n}:{s}")).collect();
    out.push_str(&format!("nodes: {}\n", nodes.join("  ")));
    for ((topic, partition), (leader, voters, learners)) in &snapshot.partitions {
        let alive = |n: &NodeId| snapshot.nodes.get(n).is_some_and(|s| s == "alive");
        let under = leader.is_none() || voters.iter().any(|v| !alive(v));
        let mark = if under { "  UNDER-REPLICATED" } else { "" };
        let leader = leader.map_or("none".to_string(), |l| l.to_string());
        out.push_str(&format!(
            "  {topic}/{partition:<4} leader {leader:>4}  voters {voters:?}  learners {learners:?}{mark}\n"
        ));
    }
    out.push_str("events:\n");
    for event in events {
        out.push_str(&format!("  {event}\n"));
    }
    print!("{out}");
}

/// The wall clock as HH:MM:SS.mmm (UTC).
fn clock() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let day_ms = now.as_millis() % 86_400_000;
    let (h, m, s, ms) = (
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000,
    );
    format!("{h:02}:{m:02}:{s:02}.{ms:03}")
}

/// A leader as a person reads it: `2`, or `none`.
fn node_or_none(node: &Option<NodeId>) -> String {
    node.map_or("none".to_string(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_change_reads_as_node_ids() {
        let at = |leader: Option<u32>| {
            let mut snapshot = Snapshot::default();
            snapshot.nodes.insert(NodeId(2), "alive".to_string());
            let voters = vec![NodeId(1), NodeId(2), NodeId(3)];
            snapshot
                .partitions
                .insert(("orders".to_string(), 0), (leader.map(NodeId), voters, Vec::new()));
            snapshot
        };
        assert_eq!(changes(&at(Some(2)), &at(Some(3))), vec!["orders/0: leader 2 -> 3"]);
        assert_eq!(changes(&at(Some(2)), &at(None)), vec!["orders/0: leader 2 -> none"]);
    }
}
