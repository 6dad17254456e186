//! `runnel status --watch`: a live view of nodes and partitions, and an event
//! line for every change of node state, leadership, voters or learners, so
//! a person can watch failover and healing happen. A node's change carries
//! its own time (when the answering node saw the state begin); a
//! partition's, the refresh that saw it. On a terminal the view is redrawn
//! and fits the window (a summary and the partitions with a problem when all
//! do not fit); otherwise, or with `--json`, events are printed one per line
//! (JSON objects with `--json`) and nothing else.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
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
/// Rows assumed when the terminal's size cannot be read.
const ROWS_DEFAULT: usize = 24;

/// A partition's leader, voters and learners.
type Membership = (Option<NodeId>, Vec<NodeId>, Vec<NodeId>);

/// What one refresh saw: node states (and since when, ms since the epoch)
/// and, per (topic, partition), its membership.
#[derive(Default, PartialEq)]
struct Snapshot {
    nodes: BTreeMap<NodeId, (String, u64)>,
    partitions: BTreeMap<(String, u32), Membership>,
}

/// One change, and when it happened (ms since the epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Event {
    at_ms: u64,
    text: String,
}

/// How `--watch` prints.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Redraw a view that fits the terminal.
    Screen,
    /// Event lines only, as text.
    Lines,
    /// Event lines only, as JSON objects.
    Json,
}

impl Output {
    /// JSON when asked; a redrawn view only on a terminal.
    pub fn choose(json: bool) -> Output {
        match (json, std::io::stdout().is_terminal()) {
            (true, _) => Output::Json,
            (false, true) => Output::Screen,
            (false, false) => Output::Lines,
        }
    }
}

pub fn run(
    seeds: Vec<SocketAddr>,
    certs: PathBuf,
    interval: Duration,
    count: Option<u64>,
    output: Output,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let identity = CertDir::new(&certs).client_identity()?;
        let cluster = ClusterClient::new(&identity, seeds.clone())?;
        let client = Client::connect(seeds, &certs).await?;
        let mut previous = Snapshot::default();
        let mut events: VecDeque<Event> = VecDeque::new();
        let mut refreshes = 0u64;
        loop {
            let current = snapshot(&cluster, &client).await?;
            let mut new = changes(&previous, &current, now_ms());
            new.sort_by_key(|e| e.at_ms);
            print_events(&new, output)?;
            for event in new {
                events.push_back(event);
                if events.len() > EVENTS_SHOWN {
                    events.pop_front();
                }
            }
            if output == Output::Screen {
                render(&current, &events, terminal_rows());
            }
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
        snapshot.nodes = members
            .iter()
            .map(|m| (m.node, (m.state.to_string(), m.since_unix_ms)))
            .collect();
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

/// Everything that differs between two refreshes; a node's change at the
/// time its new state began, a partition's at `now_ms`.
fn changes(before: &Snapshot, after: &Snapshot, now_ms: u64) -> Vec<Event> {
    let mut events = Vec::new();
    for (node, (state, since_ms)) in &after.nodes {
        let at_ms = if *since_ms > 0 { *since_ms } else { now_ms };
        let text = match before.nodes.get(node) {
            Some((old, _)) if old != state => format!("node {node}: {old} -> {state}"),
            None if !before.nodes.is_empty() => format!("node {node}: joined ({state})"),
            _ => continue,
        };
        events.push(Event { at_ms, text });
    }
    for ((topic, partition), membership) in &after.partitions {
        let old = before.partitions.get(&(topic.clone(), *partition));
        let first_look = before.partitions.is_empty() && !before.nodes.is_empty();
        for text in partition_changes(topic, *partition, old, membership, first_look) {
            events.push(Event { at_ms: now_ms, text });
        }
    }
    events
}

fn partition_changes(
    topic: &str,
    partition: u32,
    old: Option<&Membership>,
    (leader, voters, learners): &Membership,
    first_look: bool,
) -> Vec<String> {
    let Some((old_leader, old_voters, old_learners)) = old else {
        return match first_look {
            true => Vec::new(),
            false => vec![format!(
                "{topic}/{partition}: leader {}, voters {voters:?}",
                node_or_none(leader)
            )],
        };
    };
    let mut events = Vec::new();
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
    events
}

/// Event lines as `--watch` prints them off the screen (none on it).
fn print_events(events: &[Event], output: Output) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for event in events {
        match output {
            Output::Screen => return Ok(()),
            Output::Lines => writeln!(out, "{}  {}", clock(event.at_ms), event.text)?,
            Output::Json => writeln!(
                out,
                "{}",
                serde_json::json!({"at_unix_ms": event.at_ms, "at": clock(event.at_ms), "event": event.text})
            )?,
        }
    }
    out.flush()?;
    Ok(())
}

/// The terminal's height in rows (a default when it cannot be read).
fn terminal_rows() -> usize {
    rustix::termios::tcgetwinsize(std::io::stdout())
        .ok()
        .map(|size| usize::from(size.ws_row))
        .filter(|rows| *rows > 0)
        .unwrap_or(ROWS_DEFAULT)
}

fn render(snapshot: &Snapshot, events: &VecDeque<Event>, rows: usize) {
    let mut out = String::from("\x1b[2J\x1b[H");
    out.push_str(&format!("runnel cluster at {} UTC\n", clock(now_ms())));
    let nodes: Vec<String> = snapshot.nodes.iter().map(|(n, (s, _))| format!("{n}:{s}")).collect();
    out.push_str(&format!("nodes: {}\n", nodes.join("  ")));
    // Two header lines, "events:", the events and a last empty line.
    let room = rows.saturating_sub(4 + events.len()).max(1);
    for line in partition_lines(snapshot, room) {
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str("events:\n");
    for event in events {
        out.push_str(&format!("  {}  {}\n", clock(event.at_ms), event.text));
    }
    print!("{out}");
}

/// A line per partition when they fit in `room` lines; else a summary and
/// the partitions with a problem (no leader, or a voter not alive), as many
/// as fit, and how many more.
fn partition_lines(snapshot: &Snapshot, room: usize) -> Vec<String> {
    let alive = |n: &NodeId| snapshot.nodes.get(n).is_some_and(|(s, _)| s == "alive");
    let line = |(topic, partition): &(String, u32), (leader, voters, learners): &Membership| {
        let under = leader.is_none() || voters.iter().any(|v| !alive(v));
        let mark = if under { "  UNDER-REPLICATED" } else { "" };
        let leader = leader.map_or("none".to_string(), |l| l.to_string());
        (
            under,
            format!("  {topic}/{partition:<4} leader {leader:>4}  voters {voters:?}  learners {learners:?}{mark}"),
        )
    };
    let all: Vec<(bool, String)> = snapshot.partitions.iter().map(|(k, m)| line(k, m)).collect();
    if all.len() <= room {
        return all.into_iter().map(|(_, l)| l).collect();
    }
    let problems: Vec<String> = all.into_iter().filter(|(under, _)| *under).map(|(_, l)| l).collect();
    let shown = room.saturating_sub(2).min(problems.len());
    let mut lines = vec![format!(
        "  {} partitions, {} under-replicated or without a leader (the terminal is too small for all)",
        snapshot.partitions.len(),
        problems.len()
    )];
    lines.extend(problems.iter().take(shown).cloned());
    if problems.len() > shown {
        lines.push(format!("  …and {} more", problems.len() - shown));
    }
    lines
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A time as HH:MM:SS.mmm (UTC).
fn clock(at_ms: u64) -> String {
    let day_ms = at_ms % 86_400_000;
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

    fn at(leader: Option<u32>, node_state: &str, since_ms: u64) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.nodes.insert(NodeId(2), (node_state.to_string(), since_ms));
        let voters = vec![NodeId(1), NodeId(2), NodeId(3)];
        snapshot
            .partitions
            .insert(("orders".to_string(), 0), (leader.map(NodeId), voters, Vec::new()));
        snapshot
    }

    #[test]
    fn a_leader_change_reads_as_node_ids_and_a_node_change_carries_its_own_time() {
        let texts = |events: Vec<Event>| events.into_iter().map(|e| e.text).collect::<Vec<_>>();
        assert_eq!(
            texts(changes(&at(Some(2), "alive", 5), &at(Some(3), "alive", 5), 9_000)),
            vec!["orders/0: leader 2 -> 3"]
        );
        assert_eq!(
            texts(changes(&at(Some(2), "alive", 5), &at(None, "alive", 5), 9_000)),
            vec!["orders/0: leader 2 -> none"]
        );
        let events = changes(&at(Some(2), "alive", 5), &at(Some(2), "suspect", 7_250), 9_000);
        assert_eq!(
            events,
            vec![Event {
                at_ms: 7_250,
                text: "node 2: alive -> suspect".to_string()
            }]
        );
        assert_eq!(clock(7_250), "00:00:07.250");
    }

    #[test]
    fn partitions_that_do_not_fit_are_summarised_with_the_troubled_ones_first() {
        let mut snapshot = at(Some(2), "alive", 0);
        for node in [1, 3] {
            snapshot.nodes.insert(NodeId(node), ("alive".to_string(), 0));
        }
        for p in 1..40 {
            let leader = if p % 10 == 0 { None } else { Some(NodeId(1)) };
            snapshot
                .partitions
                .insert(("orders".to_string(), p), (leader, vec![NodeId(1)], Vec::new()));
        }
        let lines = partition_lines(&snapshot, 4);
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].contains("40 partitions, 3 under-replicated"), "{lines:#?}");
        assert!(
            lines[1].contains("orders/10") && lines[1].contains("UNDER-REPLICATED"),
            "{lines:#?}"
        );
        assert_eq!(lines[3], "  …and 1 more");
        assert_eq!(partition_lines(&snapshot, 100).len(), 40, "all fit");
    }
}
