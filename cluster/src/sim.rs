//! The simulated network: many nodes in one process, virtual time, and faults
//! drawn from one seed. The same seed gives the same run, event for event.
//!
//! [`SimNetwork`] holds messages in flight and decides each one's fate (drop,
//! duplicate, delay — random delays reorder) and honours partitions and
//! crashed nodes. [`SimTransport`] is the [`Transport`] a simulated node sends
//! through. [`SimCluster`] drives the nodes' membership state machines over
//! it and records every membership event in a trace.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::error::{ClusterError, Result};
use crate::membership::{MemberState, Membership, MembershipConfig};
use crate::protocol::{Envelope, PeerFrame, PROTOCOL_VERSION};
use crate::{NodeId, Transport};

/// splitmix64: small, fast, and the same everywhere.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[low, high]`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }

    pub fn chance_per_mille(&mut self, per_mille: u32) -> bool {
        self.next_u64() % 1000 < u64::from(per_mille)
    }
}

/// How unreliable the simulated network is.
#[derive(Clone, Debug)]
pub struct FaultConfig {
    pub drop_per_mille: u32,
    pub duplicate_per_mille: u32,
    pub delay_min_ms: u64,
    pub delay_max_ms: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            drop_per_mille: 20,
            duplicate_per_mille: 20,
            delay_min_ms: 1,
            delay_max_ms: 40,
        }
    }
}

/// What happened to the messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    pub sent: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub cut_by_partition: u64,
    pub delivered: u64,
}

struct InFlight<M> {
    from: NodeId,
    to: NodeId,
    message: M,
}

/// Messages of type `M` between simulated nodes: each one's fate (dropped,
/// duplicated, delayed — random delays reorder) is drawn from the seed.
pub struct SimNetwork<M = Envelope> {
    now_ms: u64,
    rng: SimRng,
    faults: FaultConfig,
    /// (delivery time, sequence): the sequence breaks ties deterministically.
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: BTreeMap<u64, InFlight<M>>,
    next_seq: u64,
    nodes_by_addr: BTreeMap<SocketAddr, NodeId>,
    /// Directed pairs that cannot reach each other.
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Crashed nodes: nothing reaches them.
    down: BTreeSet<NodeId>,
    /// Messages in flight at most; more are dropped (and counted).
    in_flight_max: usize,
    pub stats: SimStats,
}

impl<M: Clone> SimNetwork<M> {
    pub fn new(seed: u64, faults: FaultConfig) -> SimNetwork<M> {
        SimNetwork {
            now_ms: 0,
            rng: SimRng::new(seed),
            faults,
            queue: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            next_seq: 0,
            nodes_by_addr: BTreeMap::new(),
            cut: BTreeSet::new(),
            down: BTreeSet::new(),
            in_flight_max: 1 << 20,
            stats: SimStats::default(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// The network's random source, for callers that draw their own faults
    /// from the same seed.
    pub fn rng(&mut self) -> &mut SimRng {
        &mut self.rng
    }

    fn blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.cut.contains(&(from, to)) || self.down.contains(&to) || self.down.contains(&from)
    }

    /// Sends `message` from `from` to `to`; its fate is decided now.
    pub fn post(&mut self, from: NodeId, to: NodeId, message: M) {
        self.stats.sent += 1;
        if self.blocked(from, to) {
            self.stats.cut_by_partition += 1;
            return;
        }
        if self.rng.chance_per_mille(self.faults.drop_per_mille) || self.in_flight.len() >= self.in_flight_max {
            self.stats.dropped += 1;
            return;
        }
        let copies = if self.rng.chance_per_mille(self.faults.duplicate_per_mille) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.rng.between(self.faults.delay_min_ms, self.faults.delay_max_ms);
            let seq = self.next_seq;
            self.next_seq += 1;
            self.queue.push(Reverse((self.now_ms + delay, seq)));
            let message = message.clone();
            self.in_flight.insert(seq, InFlight { from, to, message });
        }
    }

    /// The next message due at or before `until_ms` as (to, from, message),
    /// advancing the clock to its delivery time. Messages across a partition
    /// that formed while they were in flight, or to a node that crashed, are
    /// lost.
    pub fn next_delivery(&mut self, until_ms: u64) -> Option<(NodeId, NodeId, M)> {
        while let Some(&Reverse((at, seq))) = self.queue.peek() {
            if at > until_ms {
                return None;
            }
            self.queue.pop();
            self.now_ms = self.now_ms.max(at);
            let message = self.in_flight.remove(&seq)?;
            if self.blocked(message.from, message.to) {
                self.stats.cut_by_partition += 1;
                continue;
            }
            self.stats.delivered += 1;
            return Some((message.to, message.from, message.message));
        }
        None
    }

    pub fn advance_to(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// Cuts every link between nodes of different groups, both ways.
    pub fn partition(&mut self, groups: &[Vec<NodeId>]) {
        for (i, a) in groups.iter().enumerate() {
            for b in groups.iter().skip(i + 1) {
                for &x in a {
                    for &y in b {
                        self.cut.insert((x, y));
                        self.cut.insert((y, x));
                    }
                }
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    pub fn set_down(&mut self, node: NodeId, down: bool) {
        if down {
            self.down.insert(node);
        } else {
            self.down.remove(&node);
        }
    }

    /// Messages in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

impl SimNetwork<Envelope> {
    pub fn add_node(&mut self, node: NodeId, addr: SocketAddr) {
        self.nodes_by_addr.insert(addr, node);
    }

    /// Sends a node's envelope to the node listening at `to`.
    pub fn send(&mut self, to: SocketAddr, envelope: Envelope) {
        match self.nodes_by_addr.get(&to) {
            Some(&to) => self.post(envelope.from, to, envelope),
            None => {
                self.stats.sent += 1;
                self.stats.dropped += 1;
            }
        }
    }
}

/// The transport of a simulated node.
#[derive(Clone)]
pub struct SimTransport {
    network: Arc<Mutex<SimNetwork>>,
}

impl SimTransport {
    pub fn new(network: Arc<Mutex<SimNetwork>>) -> SimTransport {
        SimTransport { network }
    }
}

impl Transport for SimTransport {
    fn send(&self, to: SocketAddr, envelope: Envelope) -> Result<()> {
        let mut network = self.network.lock().map_err(|_| ClusterError::ShuttingDown)?;
        network.send(to, envelope);
        Ok(())
    }
}

struct SimNode {
    addr: SocketAddr,
    incarnation: u64,
    /// `None` while crashed.
    membership: Option<Membership>,
}

/// Whole clusters of membership state machines over the simulated network.
pub struct SimCluster {
    network: Arc<Mutex<SimNetwork>>,
    transport: SimTransport,
    nodes: BTreeMap<NodeId, SimNode>,
    seeds: Vec<SocketAddr>,
    config: MembershipConfig,
    tick_ms: u64,
    trace: Vec<String>,
}

impl SimCluster {
    /// `node_count` nodes with ids 1..=n; the first three are the seeds.
    pub fn new(seed: u64, node_count: u32, faults: FaultConfig, config: MembershipConfig) -> SimCluster {
        let network = Arc::new(Mutex::new(SimNetwork::new(seed, faults)));
        let addr = |id: u32| SocketAddr::from(([10, 0, (id >> 8) as u8, id as u8], 7100));
        let seeds: Vec<SocketAddr> = (1..=node_count.min(3)).map(addr).collect();
        let mut cluster = SimCluster {
            transport: SimTransport::new(network.clone()),
            network,
            nodes: BTreeMap::new(),
            seeds,
            tick_ms: (config.heartbeat_interval_ms / 4).max(1),
            config,
            trace: Vec::new(),
        };
        for id in 1..=node_count {
            let node = NodeId(id);
            cluster.net().add_node(node, addr(id));
            cluster.nodes.insert(
                node,
                SimNode {
                    addr: addr(id),
                    incarnation: 1,
                    membership: None,
                },
            );
            cluster.start(node);
        }
        cluster
    }

    fn net(&self) -> std::sync::MutexGuard<'_, SimNetwork> {
        self.network.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&mut self, node: NodeId) {
        let seeds = self.seeds.clone();
        let config = self.config.clone();
        if let Some(sim) = self.nodes.get_mut(&node) {
            sim.membership = Some(Membership::new(node, sim.incarnation, sim.addr, seeds, config));
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.net().now_ms()
    }

    pub fn stats(&self) -> SimStats {
        self.net().stats.clone()
    }

    /// Every membership event so far, as `t=<ms> node <id>: <event>` lines.
    pub fn trace(&self) -> &[String] {
        &self.trace
    }

    fn note(&mut self, line: String) {
        tracing::debug!("{line}");
        self.trace.push(line);
    }

    /// Runs the cluster for `duration_ms` of simulated time.
    pub fn run_for(&mut self, duration_ms: u64) {
        let end = self.now_ms() + duration_ms;
        loop {
            let now = self.now_ms();
            let next_tick = (now / self.tick_ms + 1) * self.tick_ms;
            if next_tick > end {
                self.deliver_until(end);
                self.net().advance_to(end);
                return;
            }
            self.deliver_until(next_tick);
            self.net().advance_to(next_tick);
            self.tick_all(next_tick);
        }
    }

    fn deliver_until(&mut self, until_ms: u64) {
        loop {
            let next = self.net().next_delivery(until_ms);
            let Some((to, from, envelope)) = next else { return };
            let now = self.now_ms();
            let Some(membership) = self.nodes.get_mut(&to).and_then(|n| n.membership.as_mut()) else {
                continue;
            };
            if let PeerFrame::Heartbeat {
                incarnation,
                addr,
                members,
            } = &envelope.frame
            {
                let events = membership.on_heartbeat(now, from, *incarnation, *addr, members);
                for event in events {
                    self.note(format!("t={now} node {to}: {event:?}"));
                }
            }
        }
    }

    fn tick_all(&mut self, now: u64) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let Some(membership) = self.nodes.get_mut(&id).and_then(|n| n.membership.as_mut()) else {
                continue;
            };
            let output = membership.tick(now);
            let heartbeat = membership.heartbeat();
            for event in output.events {
                self.note(format!("t={now} node {id}: {event:?}"));
            }
            for addr in output.heartbeat_to {
                let envelope = Envelope {
                    version: PROTOCOL_VERSION,
                    from: id,
                    frame: heartbeat.clone(),
                };
                let _ = self.transport.send(addr, envelope);
            }
        }
    }

    pub fn partition(&mut self, groups: &[Vec<NodeId>]) {
        let now = self.now_ms();
        self.note(format!("t={now} partition {groups:?}"));
        self.net().partition(groups);
    }

    pub fn heal(&mut self) {
        let now = self.now_ms();
        self.note(format!("t={now} heal"));
        self.net().heal();
    }

    /// Stops a node: it forgets everything and nothing reaches it.
    pub fn crash(&mut self, node: NodeId) {
        let now = self.now_ms();
        self.note(format!("t={now} crash node {node}"));
        self.net().set_down(node, true);
        if let Some(sim) = self.nodes.get_mut(&node) {
            sim.membership = None;
        }
    }

    /// Starts a crashed node again with a higher incarnation.
    pub fn restart(&mut self, node: NodeId) {
        let now = self.now_ms();
        self.note(format!("t={now} restart node {node}"));
        self.net().set_down(node, false);
        if let Some(sim) = self.nodes.get_mut(&node) {
            sim.incarnation += 1;
        }
        self.start(node);
    }

    /// How `of` sees every other node (empty while `of` is crashed).
    pub fn view(&self, of: NodeId) -> BTreeMap<NodeId, MemberState> {
        let Some(membership) = self.nodes.get(&of).and_then(|n| n.membership.as_ref()) else {
            return BTreeMap::new();
        };
        self.nodes
            .keys()
            .filter(|&&n| n != of)
            .filter_map(|&n| membership.state_of(n).map(|s| (n, s)))
            .collect()
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }
}
