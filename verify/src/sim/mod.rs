//! The deterministic simulation: a whole cluster in one thread — the
//! controller (Raft group 0 and its metadata), every partition's replicas,
//! idempotent producers and consumers — over a simulated network and a
//! simulated clock, all driven by one seed. The same seed gives the same
//! run, event for event, so a failing seed replays exactly.
//!
//! What runs is the real code: each replica is a [`PartitionCore`] (the
//! `PartitionReplica` actor without its actor shell: Raft, the log on disk,
//! produce admission with idempotent sequences, fetch), and the controller's
//! decisions are [`AppliedMetadata`]'s (apply the controller log, which
//! groups a node hosts, where a dead node's replicas go) and
//! [`ReplicaCore::step_towards`] (membership changes). This module is the
//! shell the actors are in production: it routes messages, ticks, and plays
//! the failure detector, and it is the nemesis:
//! - the network drops, duplicates and delays (so reorders) messages;
//! - nodes are cut off from the rest, then healed;
//! - nodes crash and restart; a crash may strike while a replica is handling
//!   Raft's ready state, after its new entries were written but before the
//!   fsync — those unsynced bytes are lost, or torn part-way
//!   ([`ReplicaCore::crash`]).
//!
//! Invariants are checked throughout (every replica's committed records
//! against the first copy seen committed at each offset; every
//! acknowledgement against it) and at the end by [`crate::check`], the
//! checker `runnel chaos` uses, after the faults heal and the cluster
//! converges. Timed-out requests, elections and reconfiguration all happen
//! in simulated time, so a run of many simulated seconds takes well under a
//! real one.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;
use runnel_actors::controller::{Command, ControllerCore, CoreConfig, GroupView, Liveness, MemberView, RepairStep};
use runnel_actors::metadata::{
    command_batch, group_id, AppliedMetadata, Metadata, MetadataCommand, TopicConfig, TopicMeta, CONTROLLER_GROUP,
};
use runnel_actors::partition::{PartitionCore, ProduceReply};
use runnel_actors::protocol::{GroupId, PassiveAnswer};
use runnel_actors::{Acks, BrokerError, RaftMessage as Message, ReplicaConfig};
use runnel_client::policy;
use runnel_cluster::sim::{FaultConfig, SimNetwork, SimRng, SimStats};
use runnel_cluster::NodeId;
use runnel_storage::batch::{BATCH_HEADER_BYTES, CRC_START, LOG_OVERHEAD_BYTES, OFFSET_LENGTH};
use runnel_storage::{BatchBuilder, FsyncPolicy, Header, LogConfig, ProducerInfo, Record, RecordBatch, StoredRecord};
use serde::Serialize;

use crate::check::{
    self, compaction_key, Anomaly, History, Outcome, PartitionKey, Seen, Verdict, Write, WRITE_ID_HEADER,
};

mod dataflow;

use dataflow::{TaskReply, Tasks};

/// The simulated topic.
pub const TOPIC: &str = "sim";
/// A Raft tick of every replica, and a node's control loop.
const TICK_MS: u64 = 100;
/// Clients act this often.
const CLIENT_STEP_MS: u64 = 10;
/// Raft timing in ticks; each replica's election timeout is drawn from the
/// seed in `[ELECTION_TICKS, 2 * ELECTION_TICKS)`.
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 3;
/// Nodes tell the controller voters they are alive this often; the
/// controller leader moves the replicas of a node silent for `DEAD_MS`.
const HEARTBEAT_MS: u64 = 200;
const DEAD_MS: u64 = 4_000;
/// A controller leader proposes replica moves at most this often.
const MOVES_EVERY_MS: u64 = 2_000;
/// The controller core's heal interval: settling groups, passive replicas
/// and stale files are looked at this often (as on a real node).
const HEAL_EVERY_MS: u64 = 500;
/// A client request unanswered this long is sent again (maybe elsewhere).
const REQUEST_TIMEOUT_MS: u64 = 500;
/// A producer's pause before it sends a batch again after a refusal for
/// load or an unknown outcome.
const RETRY_PAUSE_MS: u64 = 50;
/// A producer retries one batch this long, then records it unknown.
const GIVE_UP_MS: u64 = 8_000;
/// Clients refresh their metadata this often.
const METADATA_EVERY_MS: u64 = 1_000;
/// A consumer's pause after a fetch that brought nothing.
const FETCH_IDLE_MS: u64 = 50;
/// Bytes of committed records in one fetch answer.
const FETCH_BYTES: usize = 64 * 1024;
/// Records of one producer batch at most.
const BATCH_RECORDS_MAX: u64 = 4;
/// Writes recorded per run at most (producers stop at this), so memory stays
/// bounded however long the run.
const WRITES_MAX: usize = 200_000;
/// Trace lines kept (the last ones).
const TRACE_MAX: usize = 2_000;
/// Unsynced bytes a torn write keeps at most.
const TORN_BYTES_MAX: u64 = 300;

/// One simulated run's shape. `Default` is the test suite's: five nodes,
/// three controllers, one topic of three partitions with three replicas.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: u32,
    /// Nodes 1..=controllers are the controller voters.
    pub controllers: u32,
    pub partitions: u32,
    pub replication: u16,
    /// Simulated time with faults and producers running.
    pub duration_ms: u64,
    /// After healing: how long the cluster may take to converge.
    pub converge_ms: u64,
    pub network: FaultConfig,
    /// Inject crashes, restarts and partitions (the network faults above
    /// apply regardless).
    pub nemesis: bool,
    pub producers: u32,
    /// A producer's pause between batches to one partition.
    pub produce_every_ms: u64,
    pub consumers: u32,
    /// Run a dataflow over the producers' records (counts per card in
    /// tumbling windows) and check its sink against a reference.
    pub dataflow: bool,
    /// Run the dataflow as a stream–stream join instead: the records joined
    /// with themselves (two source stages over the topic) within
    /// [`dataflow::JOIN_WITHIN_MS`], every pair checked once against a
    /// reference.
    pub join_dataflow: bool,
    /// Run the dataflow as an aggregate over a table instead: the records
    /// keyed by row (a few keys per partition, rewritten and deleted), each
    /// row's latest attempt counted per card with its amounts summed, the
    /// sink checked against the table the topic holds at the end.
    pub table_dataflow: bool,
    /// The deliberately injected bug (acks before commit), for proving the
    /// checks can fail.
    pub bug_ack_before_commit: bool,
    /// A deliberately injected dataflow bug: the tasks' sink batches lose
    /// their producer id and sequence on the way (as if written without the
    /// idempotent producer), so retries and replays after a restart write
    /// results twice.
    pub bug_unsequenced_task_output: bool,
    /// Damage a replica's files while its node is down (garbage Raft or log
    /// metadata, a deleted closed segment, a flipped byte in one), one
    /// replica at a time, and require the repair to rebuild it from its
    /// peers.
    pub disk_damage: bool,
    /// The topic's `min.insync.replicas` (the default: a majority).
    pub min_insync: Option<u16>,
    /// The topic's `retention.ms` (the default: a week, which no run
    /// reaches). Set, segments are small and retention deletes them during
    /// the run: every replica compacts its log, followers behind the
    /// deleted entries get snapshots, and each deletion is checked to take
    /// only records older than the retention.
    pub retention_ms: Option<u64>,
    /// The topic is compacted (`cleanup.policy=compact`) and its records
    /// share a few keys: segments are small, every replica compacts its
    /// closed segments during the run, and the checker takes a record as
    /// compacted away only when a later record of its key is in the log.
    pub compact: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 5,
            controllers: 3,
            partitions: 3,
            replication: 3,
            duration_ms: 20_000,
            converge_ms: 60_000,
            network: FaultConfig {
                drop_per_mille: 20,
                duplicate_per_mille: 20,
                delay_min_ms: 1,
                delay_max_ms: 30,
            },
            nemesis: true,
            producers: 2,
            produce_every_ms: 40,
            consumers: 2,
            dataflow: true,
            join_dataflow: false,
            table_dataflow: false,
            bug_ack_before_commit: false,
            bug_unsequenced_task_output: false,
            disk_damage: false,
            min_insync: None,
            retention_ms: None,
            compact: false,
        }
    }
}

/// What one seed did and the verdict.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SimReport {
    pub seed: u64,
    /// Simulated time covered, faults and convergence included.
    pub sim_ms: u64,
    /// Faults injected by kind (crash, crash_mid_ready, restart, partition, heal).
    pub faults: BTreeMap<String, u64>,
    /// Unsynced bytes lost by crashes.
    pub bytes_lost: u64,
    pub torn_writes: u64,
    pub messages_sent: u64,
    pub messages_dropped: u64,
    pub messages_duplicated: u64,
    pub messages_cut: u64,
    /// Leader changes seen across all groups.
    pub leader_changes: u64,
    /// Replica moves the controller committed.
    pub replica_moves: u64,
    /// Records compared by the running checks (every replica, every record).
    pub records_checked: u64,
    /// Dataflow task incarnations started (first starts, restarts, moves).
    pub task_starts: u64,
    /// Dataflow task incarnations that failed (and were restarted).
    pub task_failures: u64,
    /// Dataflow sink records checked against the reference.
    pub dataflow_results: u64,
    /// Simulated time from the heal until the cluster converged.
    pub converged_after_ms: Option<u64>,
    pub verdict: Verdict,
    /// The last events, for a person replaying a failing seed.
    #[serde(skip)]
    pub trace: Vec<String>,
}

impl SimReport {
    pub fn ok(&self) -> bool {
        self.verdict.ok() && self.converged_after_ms.is_some()
    }

    /// Adds another seed's figures to these (totals over a sweep).
    pub fn add(&mut self, other: SimReport) {
        self.sim_ms += other.sim_ms;
        self.records_checked += other.records_checked;
        self.task_starts += other.task_starts;
        self.task_failures += other.task_failures;
        self.dataflow_results += other.dataflow_results;
        self.bytes_lost += other.bytes_lost;
        self.torn_writes += other.torn_writes;
        self.replica_moves += other.replica_moves;
        self.leader_changes += other.leader_changes;
        self.messages_sent += other.messages_sent;
        self.messages_dropped += other.messages_dropped;
        self.messages_duplicated += other.messages_duplicated;
        self.messages_cut += other.messages_cut;
        self.verdict.attempted += other.verdict.attempted;
        self.verdict.acknowledged += other.verdict.acknowledged;
        self.verdict.unknown += other.verdict.unknown;
        self.verdict.expired += other.verdict.expired;
        self.verdict.compacted += other.verdict.compacted;
        for (kind, count) in other.faults {
            *self.faults.entry(kind).or_default() += count;
        }
        self.verdict.merge(other.verdict);
    }

    /// One line of the figures (of a sweep's totals, usually).
    pub fn summary(&self) -> String {
        format!(
            "{:.0} simulated s; faults {:?}; {} unsynced bytes lost ({} torn writes); {} leader changes; \
             {} replica moves; messages: {} sent, {} dropped, {} duplicated, {} cut; writes: {} attempted, \
             {} acknowledged ({} since expired by retention, {} compacted away), {} unknown; {} committed records checked; \
             dataflow: {} task starts, {} task failures, {} results checked",
            self.sim_ms as f64 / 1000.0,
            self.faults,
            self.bytes_lost,
            self.torn_writes,
            self.leader_changes,
            self.replica_moves,
            self.messages_sent,
            self.messages_dropped,
            self.messages_duplicated,
            self.messages_cut,
            self.verdict.attempted,
            self.verdict.acknowledged,
            self.verdict.expired,
            self.verdict.compacted,
            self.verdict.unknown,
            self.records_checked,
            self.task_starts,
            self.task_failures,
            self.dataflow_results,
        )
    }

    /// Why the run failed, in one paragraph, with the seed to replay.
    pub fn failure(&self) -> Option<String> {
        if self.ok() {
            return None;
        }
        let mut text = format!("seed {} failed", self.seed);
        if self.converged_after_ms.is_none() {
            text.push_str(": the cluster did not converge after the heal");
        }
        for anomaly in &self.verdict.anomalies {
            text.push_str(&format!("\n  {anomaly:?}"));
        }
        text.push_str(&format!("\n  counts: {:?}", self.verdict.anomaly_counts));
        Some(text)
    }
}

/// Messages between simulated nodes and clients.
#[derive(Clone, Debug)]
enum Msg {
    Raft {
        group: GroupId,
        message: Box<Message>,
    },
    /// Node → controller voters: alive.
    Heartbeat,
    /// Node → controller voter: committed controller log from `offset`.
    MetaPull {
        offset: u64,
    },
    MetaLog {
        batches: Vec<RecordBatch>,
    },
    /// Client → node: your metadata, please.
    MetaQuery,
    MetaAnswer(Box<Metadata>),
    Produce {
        request: u64,
        group: GroupId,
        batch: RecordBatch,
    },
    Produced {
        request: u64,
        result: Result<u64, BrokerError>,
    },
    /// A task deletes a partition's records below an offset (answered
    /// `Produced` with the partition's new start).
    DeleteRecords {
        request: u64,
        group: GroupId,
        before_offset: u64,
    },
    Fetch {
        request: u64,
        group: GroupId,
        offset: u64,
        max_bytes: usize,
    },
    /// Committed batches and the commit offset.
    Fetched {
        request: u64,
        result: Result<(Vec<RecordBatch>, u64), BrokerError>,
    },
    /// Node → group member: does the group's leader still count me?
    Members {
        group: GroupId,
    },
    /// From the group's leader only.
    MembersAnswer {
        group: GroupId,
        removed: bool,
    },
    /// Damaged replica → the group's other replicas: who leads, and whom
    /// does it count? (The real shell's `GroupMembers` call.)
    RepairAsk {
        group: GroupId,
    },
    /// From the group's leader only.
    RepairView {
        group: GroupId,
        view: GroupView,
    },
    /// From a follower: the leader it knows, to ask instead.
    RepairHint {
        group: GroupId,
        leader: NodeId,
    },
    /// Damaged replica → the group's leader: remove me from the voters.
    RemoveDamaged {
        group: GroupId,
    },
    /// Node → the group's other replicas: my replica is passive since a
    /// leader's commit index `since`; what do you know of it?
    PassiveReplica {
        group: GroupId,
        since: u64,
    },
    PassiveAnswer {
        group: GroupId,
        answer: PassiveAnswer,
    },
    /// Node → controller voters: the controller log's commit point, please
    /// (answered by the leader only).
    CommittedQuery,
    CommittedAnswer {
        offset: u64,
    },
}

type Outbox = Rc<RefCell<Vec<(NodeId, NodeId, Msg)>>>;

/// Where a simulated produce's answer goes.
enum SimReply {
    Client {
        node: NodeId,
        client: NodeId,
        request: u64,
        outbox: Outbox,
    },
    /// The controller's own proposals: applied from the log, not answered.
    Nobody,
}

impl ProduceReply for SimReply {
    fn answer(self, result: Result<u64, BrokerError>) {
        if let SimReply::Client {
            node,
            client,
            request,
            outbox,
        } = self
        {
            outbox
                .borrow_mut()
                .push((node, client, Msg::Produced { request, result }));
        }
    }
}

type Part = PartitionCore<SimReply>;

/// Rounds of reading every replica whole after the run, each followed by
/// convergence again when one met damage.
const SCRUB_ROUNDS_MAX: usize = 3;

/// A replica the nemesis damaged: no other is damaged until this one was
/// moved aside (or deleted) and its group settled again. Damage that is
/// never found (a flipped byte in entries never read again) stops further
/// damage for the run.
struct Damaged {
    node: NodeId,
    rebuilt: bool,
}

struct Node {
    id: NodeId,
    dir: PathBuf,
    up: bool,
    /// A crash armed to strike inside the next ready handling, keeping this
    /// many unsynced bytes.
    crash_armed: Option<u64>,
    groups: BTreeMap<GroupId, Part>,
    /// The node's controller decisions: the real core, as production runs it.
    core: ControllerCore,
    /// Controller leader only: when each node was last heard from.
    heard: BTreeMap<NodeId, u64>,
    leading_since: Option<u64>,
    last_moves_ms: u64,
    topic_proposed_ms: Option<u64>,
    /// Stale replica directories asked about and not answered yet; still
    /// unanswered at the next heal, they count as "nobody confirmed the
    /// removal" (the real shell's call timing out).
    stale_asked: BTreeSet<GroupId>,
    /// Stale candidates waiting for the controller leader's commit point.
    stale_candidates: Vec<GroupId>,
    /// Leader each hosted group last had here, to count changes.
    leaders: BTreeMap<GroupId, Option<NodeId>>,
    /// Replicas whose files failed to open as damaged (the broker's
    /// supervisor's record; lost with the node's memory on a crash).
    damaged: BTreeSet<GroupId>,
    /// Produce requests taken in, by id (at most [`PRODUCES_SEEN_MAX`]): a
    /// duplicate the simulated network made is dropped, as the real
    /// transport (a QUIC stream per request) never delivers one twice.
    produces_seen: BTreeSet<u64>,
}

/// Produce request ids a node remembers (ids grow, so the oldest go first).
const PRODUCES_SEEN_MAX: usize = 4_096;

impl Node {
    /// A node not started yet, its directory created.
    fn new(id: NodeId, dir: PathBuf) -> Result<Node, String> {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Node {
            id,
            dir,
            up: false,
            crash_armed: None,
            groups: BTreeMap::new(),
            core: ControllerCore::new(core_config(id)),
            heard: BTreeMap::new(),
            leading_since: None,
            last_moves_ms: 0,
            topic_proposed_ms: None,
            stale_asked: BTreeSet::new(),
            stale_candidates: Vec::new(),
            leaders: BTreeMap::new(),
            damaged: BTreeSet::new(),
            produces_seen: BTreeSet::new(),
        })
    }

    fn group_dir(&self, group: GroupId) -> PathBuf {
        self.dir.join(format!("group-{group}"))
    }

    /// Left when a stale replica's files are deleted: the node hosted the
    /// group once (as the broker's `<group>.left`).
    fn tombstone(&self, group: GroupId) -> PathBuf {
        self.dir.join(format!("group-{group}.left"))
    }

    fn meta(&self) -> &AppliedMetadata {
        self.core.meta()
    }
}

/// As the broker's `ever_hosted`: a replica directory or a tombstone.
fn ever_hosted_in(dir: &Path, group: GroupId) -> bool {
    dir.join(format!("group-{group}")).exists() || dir.join(format!("group-{group}.left")).exists()
}

/// The core's settings in the simulation: dead nodes are judged by the
/// simulated failure detector (`DEAD_MS`), so they move at once.
fn core_config(id: NodeId) -> CoreConfig {
    CoreConfig {
        me: id,
        replace_after_ms: 0,
        heal_interval_ms: HEAL_EVERY_MS,
        quiet_before_ms: 0,
    }
}

fn group_view(part: &Part) -> GroupView {
    let status = part.status();
    GroupView {
        voters: status.voters,
        learners: status.learners,
    }
}

/// A batch a producer is trying to get acknowledged.
struct Pending {
    batch: RecordBatch,
    ids: Vec<String>,
    started_ms: u64,
    sent_ms: u64,
    /// Every request id this batch was sent under (any answer counts).
    requests: BTreeSet<u64>,
    target: NodeId,
    retry_at: Option<u64>,
    /// Some attempt may have been written (no answer, or an ambiguous one).
    maybe_written: bool,
    last_error: String,
}

struct Producer {
    node: NodeId,
    index: u32,
    generation: u32,
    next_sequence: BTreeMap<u32, i32>,
    pending: BTreeMap<u32, Pending>,
    next_send: BTreeMap<u32, u64>,
    written: u64,
}

impl Producer {
    /// Producer `index`, client node `1000 + index`.
    fn new(index: u32) -> Producer {
        Producer {
            node: NodeId(1000 + index),
            index,
            generation: 0,
            next_sequence: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_send: BTreeMap::new(),
            written: 0,
        }
    }

    fn producer_id(&self) -> i64 {
        (i64::from(self.index + 1) << 32) | i64::from(self.generation)
    }
}

struct Consumer {
    node: NodeId,
    name: String,
    position: BTreeMap<u32, u64>,
    /// Partition → (request, sent at, target).
    in_flight: BTreeMap<u32, (u64, u64, NodeId)>,
    /// Partition → when to fetch next (a fetch that found nothing waits).
    next_fetch: BTreeMap<u32, u64>,
}

impl Consumer {
    /// Consumer `index`, client node `2000 + index`.
    fn new(index: u32) -> Consumer {
        Consumer {
            node: NodeId(2000 + index),
            name: format!("consumer-{index}"),
            position: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            next_fetch: BTreeMap::new(),
        }
    }
}

/// A client's view of the cluster.
#[derive(Default)]
struct ClientView {
    metadata: Option<Metadata>,
    /// Group → the node believed to lead it.
    leader: BTreeMap<GroupId, NodeId>,
    asked_ms: Option<u64>,
}

impl ClientView {
    /// A refusal named the group's leader (or knew none): the next request
    /// goes there (or to a replica chosen from the seed).
    fn heard_leader(&mut self, group: GroupId, leader: Option<NodeId>) {
        match leader {
            Some(leader) => self.leader.insert(group, leader),
            None => self.leader.remove(&group),
        };
    }
}

/// The nemesis's schedule during the faulty phase.
struct Schedule {
    next_fault: u64,
    heal_at: Option<u64>,
    /// Crashed node → when it restarts.
    restart_at: BTreeMap<NodeId, u64>,
}

struct World {
    config: SimConfig,
    seed: u64,
    rng: SimRng,
    net: SimNetwork<Msg>,
    outbox: Outbox,
    nodes: BTreeMap<NodeId, Node>,
    producers: Vec<Producer>,
    consumers: Vec<Consumer>,
    views: BTreeMap<NodeId, ClientView>,
    next_request: u64,
    /// Producing new batches (off during convergence).
    producing: bool,
    writes: Vec<Write>,
    consumer_reads: BTreeMap<String, BTreeMap<PartitionKey, Vec<Seen>>>,
    /// The running check: per group, the first committed copy of each offset.
    committed: BTreeMap<GroupId, BTreeMap<u64, Option<String>>>,
    /// Per (node, group): the committed offset checked so far.
    checked: BTreeMap<(NodeId, GroupId), u64>,
    /// Groups whose replica the nemesis damaged and the repair has not
    /// rebuilt yet: one at a time, so a group always keeps a majority.
    damaged_groups: BTreeMap<GroupId, Damaged>,
    running: Verdict,
    tasks: Tasks,
    report: SimReport,
    trace: std::collections::VecDeque<String>,
}

/// Runs one seed. `Err` is a failure of the simulation itself (a replica
/// that cannot reopen its files, an I/O error) — also a finding: the message
/// names the seed, the time and the node.
pub fn run(seed: u64, config: &SimConfig, scratch: &Path) -> Result<SimReport, String> {
    let dir = scratch.join(format!("sim-{seed}"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut world = World::new(seed, config.clone(), &dir)?;
    let result = world.run();
    let _ = std::fs::remove_dir_all(&dir);
    result.map_err(|e| {
        let trace: Vec<&String> = world.trace.iter().rev().take(30).collect();
        let trace: Vec<&String> = trace.into_iter().rev().collect();
        format!(
            "seed {seed}: t={} ms: {e}\nlast events:\n{}",
            world.net.now_ms(),
            trace.iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
        )
    })
}

/// Replicas' log settings; with disk damage or retention, small segments,
/// so that closed ones exist to damage or delete.
fn log_config(small_segments: bool) -> LogConfig {
    LogConfig {
        segment_bytes_max: if small_segments { 4 * 1024 } else { 64 * 1024 },
        // The store syncs once per Raft ready itself.
        fsync: FsyncPolicy::Never,
        retention_age: None,
        ..LogConfig::default()
    }
}

/// A record as the checks compare it: by its write id, or (the dataflow's
/// records have none) by a digest of its key, value and headers.
fn seen_of(offset: u64, record: &Record) -> Seen {
    let id = record
        .headers
        .iter()
        .find(|h| h.key == WRITE_ID_HEADER)
        .and_then(|h| h.value.as_ref())
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let id = id.or_else(|| {
        let parts = [record.key.as_deref(), record.value.as_deref()].into_iter().chain(
            record
                .headers
                .iter()
                .flat_map(|h| [Some(h.key.as_bytes()), h.value.as_deref()]),
        );
        let bytes = parts.flat_map(|part| part.unwrap_or(b"-").iter().chain(b"|").copied());
        Some(format!("#{:016x}", check::fnv1a64(bytes)))
    });
    Seen { offset, id }
}

/// A consumer's fetched batches: its position moves past them (and it
/// fetches again at once), their records join its reads.
fn take_fetched(
    consumer: &mut Consumer,
    consumer_reads: &mut BTreeMap<String, BTreeMap<PartitionKey, Vec<Seen>>>,
    partition: u32,
    batches: &[RecordBatch],
    now: u64,
) {
    let Ok(records) = records_of(batches) else {
        return;
    };
    if let Some(next) = batches.last().map(|b| b.next_offset()) {
        let position = consumer.position.entry(partition).or_insert(0);
        *position = (*position).max(next);
        consumer.next_fetch.insert(partition, now);
    }
    let reads = consumer_reads
        .entry(consumer.name.clone())
        .or_default()
        .entry((TOPIC.to_string(), partition))
        .or_default();
    reads.extend(records);
}

/// The user records of committed batches (control batches skipped).
fn records_of(batches: &[RecordBatch]) -> Result<Vec<Seen>, String> {
    let mut seen = Vec::new();
    for batch in batches.iter().filter(|b| !b.is_control()) {
        for record in batch.records() {
            let record = record.map_err(|e| e.to_string())?;
            seen.push(seen_of(record.offset, &record.record));
        }
    }
    Ok(seen)
}

/// The topic and partition of a partition group, as any node knows them.
fn partition_of(nodes: &BTreeMap<NodeId, Node>, group: GroupId) -> (String, u32) {
    let partition = (group.0 & ((1 << 20) - 1)) as u32;
    let topic = nodes
        .values()
        .flat_map(|n| n.meta().metadata.topics.values())
        .find(|t| t.group_id(partition) == group)
        .map_or_else(|| format!("<group {group}>"), |t| t.name.clone());
    (topic, partition)
}

impl World {
    /// The world of one seed: its nodes (directories under `dir`) started,
    /// its clients, not a message sent yet.
    fn new(seed: u64, config: SimConfig, dir: &Path) -> Result<World, String> {
        let outbox: Outbox = Rc::new(RefCell::new(Vec::new()));
        let mut nodes = BTreeMap::new();
        for id in (1..=config.nodes).map(NodeId) {
            nodes.insert(id, Node::new(id, dir.join(format!("node-{id}")))?);
        }
        let producers = (0..config.producers).map(Producer::new).collect::<Vec<_>>();
        let consumers = (0..config.consumers).map(Consumer::new).collect::<Vec<_>>();
        let views = producers
            .iter()
            .map(|p| p.node)
            .chain(consumers.iter().map(|c| c.node))
            .map(|n| (n, ClientView::default()))
            .collect();
        let tasks = Tasks::new(config.dataflow, config.join_dataflow, config.table_dataflow);
        let mut world = World {
            seed,
            tasks,
            rng: SimRng::new(seed ^ 0x5151_5eed),
            net: SimNetwork::new(seed, config.network.clone()),
            config,
            outbox,
            nodes,
            producers,
            consumers,
            views,
            next_request: 1,
            producing: true,
            writes: Vec::new(),
            consumer_reads: BTreeMap::new(),
            committed: BTreeMap::new(),
            checked: BTreeMap::new(),
            damaged_groups: BTreeMap::new(),
            running: Verdict::default(),
            report: SimReport {
                seed,
                ..SimReport::default()
            },
            trace: std::collections::VecDeque::new(),
        };
        let ids: Vec<NodeId> = world.nodes.keys().copied().collect();
        for id in ids {
            world.start(id).map_err(|e| format!("starting node {id}: {e}"))?;
        }
        Ok(world)
    }

    fn note(&mut self, line: String) {
        tracing::debug!(seed = self.seed, "{line}");
        if self.trace.len() >= TRACE_MAX {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("t={} {line}", self.net.now_ms()));
    }

    fn now(&self) -> u64 {
        self.net.now_ms()
    }

    fn small_segments(&self) -> bool {
        self.config.disk_damage || self.config.retention_ms.is_some() || self.config.compact
    }

    fn controllers(&self) -> Vec<NodeId> {
        (1..=self.config.controllers).map(NodeId).collect()
    }

    fn replica_config(&mut self, node: NodeId) -> ReplicaConfig {
        let mut config = ReplicaConfig::new(node.to_raft());
        config.election_tick = ELECTION_TICKS;
        config.heartbeat_tick = HEARTBEAT_TICKS;
        let ticks = ELECTION_TICKS + self.rng.between(0, ELECTION_TICKS as u64 - 1) as usize;
        config.election_tick_range = Some((ticks, ticks + 1));
        config.ack_before_commit = self.config.bug_ack_before_commit;
        config
    }

    /// Starts (or restarts) a node: the controller voters open group 0 at
    /// once; partition replicas open when the metadata names them.
    fn start(&mut self, id: NodeId) -> Result<(), String> {
        self.net.set_down(id, false);
        let node = self.nodes.get_mut(&id).expect("known node");
        node.up = true;
        node.crash_armed = None;
        node.core = ControllerCore::new(core_config(id));
        node.heard.clear();
        node.leading_since = None;
        node.leaders.clear();
        node.stale_asked.clear();
        node.stale_candidates.clear();
        node.damaged.clear();
        if self.controllers().contains(&id) {
            let voters = self.controllers();
            self.host(id, CONTROLLER_GROUP, Some(&voters), false)?;
        }
        Ok(())
    }

    fn host(&mut self, id: NodeId, group: GroupId, founders: Option<&[NodeId]>, rejoin: bool) -> Result<(), String> {
        let mut config = self.replica_config(id);
        let node = self.nodes.get_mut(&id).expect("known node");
        // As the broker: a replica deleted here before comes back passive,
        // whatever the node's (maybe lagging) metadata says.
        config.rejoin = rejoin || node.tombstone(group).exists();
        if config.rejoin && !rejoin {
            let line = format!("node {id} re-creates group {group}, deleted here before: passive");
            self.note(line);
        }
        let log_config = log_config(self.small_segments());
        let node = self.nodes.get_mut(&id).expect("known node");
        let dir = node.group_dir(group);
        let (part, messages) = match Part::open(group, &dir, log_config, &config, founders) {
            Ok(opened) => opened,
            // As the broker's supervisor: marked damaged, left for repair.
            Err(e) if e.is_damage() => {
                node.damaged.insert(group);
                *self.report.faults.entry("damage_detected".to_string()).or_default() += 1;
                self.note(format!("node {id} group {group} replica damaged: {e}"));
                return Ok(());
            }
            Err(e) => return Err(format!("node {id} opening group {group}: {e}")),
        };
        // As the supervisor's record: a replica running here is not damaged.
        node.damaged.remove(&group);
        node.groups.insert(group, part);
        self.send_raft(id, group, messages);
        Ok(())
    }

    fn send_raft(&mut self, from: NodeId, group: GroupId, messages: Vec<Message>) {
        for message in messages {
            let to = NodeId(message.to as u32);
            if message.get_msg_type() == runnel_actors::RaftMessageType::MsgSnapshot {
                *self.report.faults.entry("snapshots_sent".to_string()).or_default() += 1;
            }
            self.net.post(
                from,
                to,
                Msg::Raft {
                    group,
                    message: Box::new(message),
                },
            );
        }
    }

    fn flush_outbox(&mut self) {
        let queued: Vec<(NodeId, NodeId, Msg)> = std::mem::take(&mut *self.outbox.borrow_mut());
        for (from, to, msg) in queued {
            self.net.post(from, to, msg);
        }
    }

    /// Persists and sends what a group has ready — or, with a crash armed on
    /// the node, crashes it right there, mid-ready.
    fn drive(&mut self, id: NodeId, group: GroupId) -> Result<(), String> {
        if let Some(keep) = self.nodes[&id].crash_armed {
            self.crash(id, Some((group, keep)))?;
            return Ok(());
        }
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(part) = node.groups.get_mut(&group) else {
            return Ok(());
        };
        let messages = match part.drive() {
            Ok(messages) => messages,
            Err(e) if e.is_damage() => return self.on_running_damage(id, group, &e.to_string()),
            Err(e) => return Err(format!("node {id} group {group}: {e}")),
        };
        let leader = part.core().leader_id().and_then(NodeId::from_raft);
        let before = node.leaders.insert(group, leader);
        if before.is_some_and(|b| b != leader) && leader.is_some() {
            self.report.leader_changes += 1;
            self.note(format!("group {group}: node {id} sees leader {leader:?}"));
        }
        self.send_raft(id, group, messages);
        self.flush_outbox();
        Ok(())
    }

    /// Crashes a node: every replica is dropped unsynced (see
    /// [`ReplicaCore::crash`]); with `mid_ready`, that group was inside
    /// ready handling and keeps `keep` of its unsynced bytes.
    fn crash(&mut self, id: NodeId, mid_ready: Option<(GroupId, u64)>) -> Result<(), String> {
        self.net.set_down(id, true);
        let node = self.nodes.get_mut(&id).expect("known node");
        node.up = false;
        node.crash_armed = None;
        let groups = std::mem::take(&mut node.groups);
        self.tasks.crash(id);
        let mut lost = 0;
        for (group, part) in groups {
            let (strike, keep) = match mid_ready {
                Some((g, keep)) if g == group => (true, keep),
                _ => (false, 0),
            };
            lost += part
                .into_core()
                .crash(strike, keep)
                .map_err(|e| format!("crashing node {id} group {group}: {e}"))?;
        }
        self.report.bytes_lost += lost;
        let kind = if mid_ready.is_some() {
            "crash_mid_ready"
        } else {
            "crash"
        };
        *self.report.faults.entry(kind.to_string()).or_default() += 1;
        if mid_ready.is_some_and(|(_, keep)| keep > 0) && lost > 0 {
            self.report.torn_writes += 1;
        }
        self.note(format!("{kind} node {id} ({lost} unsynced bytes lost)"));
        Ok(())
    }

    /// The run: faults and producers for `duration_ms`, then everything
    /// healed and the producers stopped until the cluster converges (or
    /// `converge_ms` passes), then the verdict.
    fn run(&mut self) -> Result<SimReport, String> {
        let healed_at = self.run_with_faults()?;
        self.heal_everything()?;
        self.producing = false;
        let mut now = self.await_convergence(healed_at, healed_at)?;
        // The final check reads every replica whole; damage no read met
        // during the run is handed to the repair first, as a read would,
        // and the cluster must converge again.
        for _ in 0..SCRUB_ROUNDS_MAX {
            if !self.scrub()? {
                break;
            }
            self.report.converged_after_ms = None;
            now = self.await_convergence(now, healed_at)?;
        }
        self.report.sim_ms = now;
        if self.report.converged_after_ms.is_none() {
            for line in self.describe_groups() {
                self.note(line);
            }
        }
        self.check_replicas()?;
        self.finish()
    }

    /// The faulty phase: deliveries, ticks, clients and the nemesis, step
    /// by step until `duration_ms`; returns the time it ended.
    fn run_with_faults(&mut self) -> Result<u64, String> {
        let duration = self.config.duration_ms;
        let mut schedule = Schedule {
            next_fault: 2_000 + self.rng.between(0, 2_000),
            heal_at: None,
            restart_at: BTreeMap::new(),
        };
        let mut now = 0;
        while now < duration {
            now += CLIENT_STEP_MS;
            self.deliver_until(now)?;
            self.net.advance_to(now);
            if now.is_multiple_of(TICK_MS) {
                self.tick_nodes()?;
            }
            self.step_clients();
            if self.config.nemesis {
                self.nemesis_step(now, &mut schedule)?;
            }
        }
        Ok(now)
    }

    /// The nemesis at `now`: the cut healed, crashed nodes restarted, and a
    /// new fault, each when due.
    fn nemesis_step(&mut self, now: u64, schedule: &mut Schedule) -> Result<(), String> {
        if schedule.heal_at.is_some_and(|t| t <= now) {
            schedule.heal_at = None;
            self.net.heal();
            *self.report.faults.entry("heal".to_string()).or_default() += 1;
            self.note("heal".to_string());
        }
        let due: Vec<NodeId> = schedule
            .restart_at
            .iter()
            .filter(|(_, &t)| t <= now)
            .map(|(&n, _)| n)
            .collect();
        for id in due {
            schedule.restart_at.remove(&id);
            let healed: Vec<GroupId> = self
                .damaged_groups
                .iter()
                .filter(|(g, damage)| damage.rebuilt && self.settled(**g))
                .map(|(g, _)| *g)
                .collect();
            for group in healed {
                self.damaged_groups.remove(&group);
            }
            if self.config.disk_damage && self.damaged_groups.is_empty() && self.rng.chance_per_mille(400) {
                self.damage(id)?;
            }
            self.start(id)?;
            *self.report.faults.entry("restart".to_string()).or_default() += 1;
            self.note(format!("restart node {id}"));
        }
        if now >= schedule.next_fault {
            schedule.next_fault = now + self.rng.between(1_000, 4_000);
            self.inject(&mut schedule.heal_at, &mut schedule.restart_at)?;
        }
        Ok(())
    }

    /// Heals everything: the network whole, crashes armed but not struck
    /// yet called off, every down node restarted.
    fn heal_everything(&mut self) -> Result<(), String> {
        self.net.heal();
        for node in self.nodes.values_mut() {
            node.crash_armed = None;
        }
        let down: Vec<NodeId> = self.nodes.values().filter(|n| !n.up).map(|n| n.id).collect();
        for id in down {
            self.start(id)?;
            self.note(format!("restart node {id} (final heal)"));
        }
        Ok(())
    }

    /// Runs from the heal at `healed_at` until the producers are idle and
    /// the cluster converged (recorded in the report) or `converge_ms`
    /// passed; returns the time it ended.
    fn await_convergence(&mut self, start: u64, healed_at: u64) -> Result<u64, String> {
        let mut now = start;
        let deadline = now + self.config.converge_ms;
        while now < deadline {
            now += CLIENT_STEP_MS;
            self.deliver_until(now)?;
            self.net.advance_to(now);
            if now.is_multiple_of(TICK_MS) {
                self.tick_nodes()?;
                if now.is_multiple_of(500) && self.producers_idle() && self.converged() {
                    self.report.converged_after_ms = Some(now - healed_at);
                    break;
                }
            }
            self.step_clients();
        }
        Ok(now)
    }

    /// One fault from the seed: crash (maybe mid-ready, maybe torn) or cut
    /// off a minority.
    fn inject(&mut self, heal_at: &mut Option<u64>, restart_at: &mut BTreeMap<NodeId, u64>) -> Result<(), String> {
        let now = self.now();
        let nodes: Vec<NodeId> = self.nodes.keys().copied().collect();
        let down = self.nodes.values().filter(|n| !n.up || n.crash_armed.is_some()).count();
        let minority = (nodes.len() - 1) / 2;
        match self.rng.between(0, 2) {
            0 | 1 if down < minority => {
                let up: Vec<NodeId> = self
                    .nodes
                    .values()
                    .filter(|n| n.up && n.crash_armed.is_none())
                    .map(|n| n.id)
                    .collect();
                if up.is_empty() {
                    return Ok(());
                }
                let id = up[self.rng.between(0, up.len() as u64 - 1) as usize];
                if self.rng.chance_per_mille(600) {
                    // Strikes inside the node's next ready handling.
                    let keep = if self.rng.chance_per_mille(500) {
                        self.rng.between(1, TORN_BYTES_MAX)
                    } else {
                        0
                    };
                    self.nodes.get_mut(&id).expect("known node").crash_armed = Some(keep);
                } else {
                    self.crash(id, None)?;
                }
                restart_at.insert(id, now + self.rng.between(500, 6_000));
            }
            _ if heal_at.is_none() => {
                let size = self.rng.between(1, minority as u64) as usize;
                let mut rest = nodes.clone();
                let mut cut = Vec::new();
                for _ in 0..size {
                    let i = self.rng.between(0, rest.len() as u64 - 1) as usize;
                    cut.push(rest.remove(i));
                }
                self.net.partition(&[cut.clone(), rest.clone()]);
                *heal_at = Some(now + self.rng.between(1_000, 6_000));
                *self.report.faults.entry("partition".to_string()).or_default() += 1;
                self.note(format!("partition {cut:?} | {rest:?}"));
            }
            _ => {}
        }
        Ok(())
    }

    fn deliver_until(&mut self, until: u64) -> Result<(), String> {
        while let Some((to, from, msg)) = self.net.next_delivery(until) {
            let id = to;
            if self.nodes.get(&id).is_some_and(|n| n.up) {
                self.on_node_message(id, from, msg)?;
            } else if self.views.contains_key(&to) {
                self.on_client_message(to, msg);
            }
        }
        Ok(())
    }

    /// A message reached live node `id`: one handler per kind.
    fn on_node_message(&mut self, id: NodeId, from: NodeId, msg: Msg) -> Result<(), String> {
        match msg {
            Msg::Raft { group, message } => self.on_raft(id, group, *message)?,
            Msg::Heartbeat => self.on_heartbeat(id, from),
            Msg::MetaPull { offset } => self.on_meta_pull(id, from, offset)?,
            Msg::MetaLog { batches } => self.on_meta_log(id, &batches)?,
            Msg::MetaQuery => self.on_meta_query(id, from),
            Msg::Produce { request, group, batch } => self.on_produce(id, from, request, group, batch)?,
            Msg::DeleteRecords {
                request,
                group,
                before_offset,
            } => self.on_delete_records(id, from, request, group, before_offset)?,
            Msg::Fetch {
                request,
                group,
                offset,
                max_bytes,
            } => self.on_fetch(id, from, request, group, offset, max_bytes)?,
            Msg::Members { group } => self.on_members(id, from, group),
            Msg::RepairAsk { group } => self.on_repair_ask(id, from, group),
            Msg::RepairView { group, view } => self.on_repair_view(id, from, group, view)?,
            Msg::RepairHint { group, leader } => {
                if self.nodes[&id].damaged.contains(&group) && leader != id {
                    self.net.post(id, leader, Msg::RepairAsk { group });
                }
            }
            Msg::RemoveDamaged { group } => self.on_remove_damaged(id, from, group)?,
            Msg::PassiveReplica { group, since } => self.on_passive_replica(id, from, group, since)?,
            Msg::PassiveAnswer { group, answer } => self.on_passive_answer(id, from, group, answer)?,
            Msg::MembersAnswer { group, removed } => self.on_members_answer(id, group, removed)?,
            Msg::CommittedQuery => self.on_committed_query(id, from),
            Msg::CommittedAnswer { offset } => self.on_leader_committed(id, offset)?,
            Msg::Produced { request, result } => self.on_task_reply(id, request, result.map(TaskReply::Produced)),
            Msg::Fetched { request, result } => {
                let reply = result.map(|(batches, committed)| TaskReply::Fetched { batches, committed });
                self.on_task_reply(id, request, reply);
            }
            Msg::MetaAnswer(_) => {}
        }
        Ok(())
    }

    /// A Raft message for one of the node's groups (dropped if it hosts none).
    fn on_raft(&mut self, id: NodeId, group: GroupId, message: Message) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(part) = node.groups.get_mut(&group) {
            match part.core_mut().step(message) {
                Ok(()) => {}
                Err(e) if e.is_damage() => return self.on_running_damage(id, group, &e.to_string()),
                Err(e) => return Err(format!("node {id} group {group} step: {e}")),
            }
            self.drive(id, group)?;
        }
        Ok(())
    }

    /// A running replica found damage (an entry it must apply does not read
    /// back, or entries it held are gone): as the broker's supervisor, it
    /// stops and is marked damaged, for the repair duty.
    fn on_running_damage(&mut self, id: NodeId, group: GroupId, error: &str) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("known node");
        node.groups.remove(&group);
        node.damaged.insert(group);
        *self
            .report
            .faults
            .entry("damage_detected_running".to_string())
            .or_default() += 1;
        self.note(format!(
            "node {id} group {group} replica damaged while running: {error}"
        ));
        Ok(())
    }

    /// A node's heartbeat, heard by a controller voter.
    fn on_heartbeat(&mut self, id: NodeId, from: NodeId) {
        let now = self.now();
        let node = self.nodes.get_mut(&id).expect("known node");
        node.heard.insert(from, now);
    }

    /// A controller voter answers a pull with its committed controller log
    /// from `offset` (nothing if it has not committed that far).
    fn on_meta_pull(&mut self, id: NodeId, from: NodeId, offset: u64) -> Result<(), String> {
        let node = &self.nodes[&id];
        if let Some(part) = node.groups.get(&CONTROLLER_GROUP) {
            if offset <= part.core().committed_offset() {
                let batches = part
                    .core()
                    .read_committed(offset, FETCH_BYTES)
                    .map_err(|e| format!("node {id} reading the controller log: {e}"))?;
                self.net.post(id, from, Msg::MetaLog { batches });
            }
        }
        Ok(())
    }

    /// Controller log pulled from a voter: applied to the node's metadata.
    fn on_meta_log(&mut self, id: NodeId, batches: &[RecordBatch]) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("known node");
        for batch in batches {
            node.core
                .apply_batch(batch)
                .map_err(|e| format!("node {id} applying the controller log: {e}"))?;
        }
        Ok(())
    }

    /// A client's metadata query, answered once the topic exists.
    fn on_meta_query(&mut self, id: NodeId, from: NodeId) {
        let metadata = self.nodes[&id].meta().metadata.clone();
        if metadata.topics.contains_key(TOPIC) {
            self.net.post(id, from, Msg::MetaAnswer(Box::new(metadata)));
        }
    }

    /// A produce: handed to the group's replica (which answers through the
    /// outbox), or refused at once when the node hosts no replica.
    fn on_produce(
        &mut self,
        id: NodeId,
        from: NodeId,
        request: u64,
        group: GroupId,
        batch: RecordBatch,
    ) -> Result<(), String> {
        let me = id;
        let outbox = self.outbox.clone();
        let node = self.nodes.get_mut(&id).expect("known node");
        if !node.produces_seen.insert(request) {
            return Ok(());
        }
        if node.produces_seen.len() > PRODUCES_SEEN_MAX {
            node.produces_seen.pop_first();
        }
        let min_insync = node
            .meta()
            .metadata
            .topics
            .get(TOPIC)
            .map_or(0, |t| t.config.min_insync);
        match node.groups.get_mut(&group) {
            Some(part) => {
                let reply = SimReply::Client {
                    node: me,
                    client: from,
                    request,
                    outbox,
                };
                part.produce(batch, Acks::All, min_insync, reply);
                self.drive(id, group)?;
            }
            None => {
                let result = Err(BrokerError::NotLeader { group, leader: None });
                self.net.post(me, from, Msg::Produced { request, result });
            }
        }
        Ok(())
    }

    /// A task's deletion of records, answered once its entry commits.
    fn on_delete_records(
        &mut self,
        id: NodeId,
        from: NodeId,
        request: u64,
        group: GroupId,
        before_offset: u64,
    ) -> Result<(), String> {
        let outbox = self.outbox.clone();
        match self.nodes.get_mut(&id).and_then(|n| n.groups.get_mut(&group)) {
            Some(part) => {
                let reply = SimReply::Client {
                    node: id,
                    client: from,
                    request,
                    outbox,
                };
                part.delete_records(Some(before_offset), reply);
                self.drive(id, group)?;
            }
            None => {
                let result = Err(BrokerError::NotLeader { group, leader: None });
                self.net.post(id, from, Msg::Produced { request, result });
            }
        }
        Ok(())
    }

    /// A fetch of committed records, answered at once.
    fn on_fetch(
        &mut self,
        id: NodeId,
        from: NodeId,
        request: u64,
        group: GroupId,
        offset: u64,
        max_bytes: usize,
    ) -> Result<(), String> {
        let result = match self.nodes[&id]
            .groups
            .get(&group)
            .map(|p| p.fetch(offset, max_bytes, false))
        {
            Some(Ok(answer)) => answer.map(|fetched| (fetched.batches, fetched.committed_offset)),
            // As the broker's actor: the replica fails, marked damaged.
            Some(Err(e)) if e.is_damage() => {
                self.on_running_damage(id, group, &e.to_string())?;
                Err(BrokerError::NotLeader { group, leader: None })
            }
            Some(Err(e)) => return Err(format!("node {id} group {group} fetch: {e}")),
            None => Err(BrokerError::NotLeader { group, leader: None }),
        };
        self.net.post(id, from, Msg::Fetched { request, result });
        Ok(())
    }

    /// Damages one replica of down node `id` (not the controller's): its
    /// Raft metadata or log metadata overwritten with garbage, or a closed
    /// segment deleted (each found when the replica opens), or a byte of a
    /// closed segment flipped (found by whichever read meets it first:
    /// Raft applying or sending the entry, or a consumer's fetch).
    fn damage(&mut self, id: NodeId) -> Result<(), String> {
        let node = &self.nodes[&id];
        let groups: Vec<GroupId> = replica_dirs(&node.dir)?
            .into_iter()
            .filter(|g| *g != CONTROLLER_GROUP)
            .collect();
        if groups.is_empty() {
            return Ok(());
        }
        let group = groups[self.rng.between(0, groups.len() as u64 - 1) as usize];
        let dir = node.group_dir(group);
        let segments = closed_segments(&dir.join("log"))?;
        let kind = match self.rng.between(0, 3) {
            3 if !segments.is_empty() => {
                let segment = &segments[self.rng.between(0, segments.len() as u64 - 1) as usize];
                self.flip_batch_byte(segment)?;
                "damage_flipped_byte"
            }
            2 if !segments.is_empty() => {
                let segment = &segments[self.rng.between(0, segments.len() as u64 - 1) as usize];
                std::fs::remove_file(segment).map_err(|e| format!("{}: {e}", segment.display()))?;
                "damage_deleted_segment"
            }
            1 => overwrite(&dir.join("log").join("log.meta"), "damage_log_meta")?,
            _ => overwrite(&dir.join("raft.meta"), "damage_raft_meta")?,
        };
        self.damaged_groups.insert(
            group,
            Damaged {
                node: id,
                rebuilt: false,
            },
        );
        *self.report.faults.entry(kind.to_string()).or_default() += 1;
        self.note(format!("{kind}: node {id} group {group}"));
        Ok(())
    }

    /// Flips one byte of one batch of `segment`, among the bytes its CRC
    /// covers. (A flip in the header before them -- the Raft term above
    /// all -- is not detected yet: a fuzz finding kept open.)
    fn flip_batch_byte(&mut self, segment: &Path) -> Result<(), String> {
        let what = |e: std::io::Error| format!("{}: {e}", segment.display());
        let mut bytes = std::fs::read(segment).map_err(what)?;
        let mut batches = Vec::new();
        let mut at = 0usize;
        while at + BATCH_HEADER_BYTES <= bytes.len() {
            let word = bytes[at + OFFSET_LENGTH..at + OFFSET_LENGTH + 4]
                .try_into()
                .expect("4 bytes");
            let end = at + LOG_OVERHEAD_BYTES + u32::from_le_bytes(word) as usize;
            if end > bytes.len() {
                break;
            }
            batches.push((at + CRC_START, end));
            at = end;
        }
        let Some(&(start, end)) = batches.get(self.rng.between(0, batches.len().max(1) as u64 - 1) as usize) else {
            return Err(format!("{}: no whole batch to damage", segment.display()));
        };
        let index = self.rng.between(start as u64, end as u64 - 1) as usize;
        bytes[index] ^= 1 << self.rng.between(0, 7);
        std::fs::write(segment, &bytes).map_err(what)
    }

    /// Whether a leader of `group` has the voters its metadata assigns and
    /// no learner: a damaged replica of it was rebuilt (or never was).
    /// (The leader of the highest term: a stale replica elsewhere may still
    /// think it leads with an older configuration.)
    fn settled(&self, group: GroupId) -> bool {
        let leader = self
            .nodes
            .values()
            .filter(|n| n.up)
            .filter_map(|node| Some((node, node.groups.get(&group).filter(|p| p.core().is_leader())?)))
            .max_by_key(|(_, part)| part.status().term);
        leader.is_some_and(|(node, part)| {
            let assigned = node.core.meta().assignment_of(group);
            assigned.is_some_and(|assigned| group_view(part).matches(&assigned))
        })
    }

    /// The repair duty: each damaged replica asks its group's other
    /// replicas for the leader's view (only a leader answers).
    fn ask_about_damaged(&mut self, id: NodeId) {
        let node = &self.nodes[&id];
        let damaged: Vec<GroupId> = node.damaged.iter().copied().collect();
        for (group, peers) in node.core.damaged_to_repair(&damaged) {
            for peer in peers {
                self.net.post(id, peer, Msg::RepairAsk { group });
            }
        }
    }

    /// As the real `GroupMembers` call: the leader answers with its view, a
    /// follower names the leader it knows (asked next).
    fn on_repair_ask(&mut self, id: NodeId, from: NodeId, group: GroupId) {
        let Some(part) = self.nodes[&id].groups.get(&group) else {
            return;
        };
        if part.core().is_leader() {
            let view = group_view(part);
            self.net.post(id, from, Msg::RepairView { group, view });
        } else if let Some(leader) = part.status().leader {
            self.net.post(id, from, Msg::RepairHint { group, leader });
        }
    }

    /// The leader's view reached a damaged replica: the core's next step.
    fn on_repair_view(&mut self, id: NodeId, from: NodeId, group: GroupId, view: GroupView) -> Result<(), String> {
        let node = &self.nodes[&id];
        if !node.damaged.contains(&group) {
            return Ok(());
        }
        match node.core.on_damaged_status(group, Some((from, &view))) {
            RepairStep::Keep => Ok(()),
            RepairStep::AskRemoval { leader } => {
                self.net.post(id, leader, Msg::RemoveDamaged { group });
                Ok(())
            }
            RepairStep::Quarantine => self.quarantine(id, group),
        }
    }

    /// On a group's leader: a damaged replica asks to be removed.
    fn on_remove_damaged(&mut self, id: NodeId, from: NodeId, group: GroupId) -> Result<(), String> {
        let now = self.now();
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(part) = node.groups.get(&group) else {
            return Ok(());
        };
        let (leader, view) = (part.status().leader, group_view(part));
        if let Ok(Some(voters)) = node.core.voters_without_damaged(group, leader, &view, from, now) {
            self.note(format!("node {id} removes damaged voter {from} of group {group}"));
            self.reconfigure(id, group, &voters)?;
        }
        Ok(())
    }

    /// Moves a damaged replica's files aside, as the broker does: a
    /// tombstone, the directory under `quarantine/`; the next reconcile
    /// hosts it again, empty and rejoining.
    fn quarantine(&mut self, id: NodeId, group: GroupId) -> Result<(), String> {
        let now = self.now();
        let node = self.nodes.get_mut(&id).expect("known node");
        let dir = node.group_dir(group);
        let aside = node.dir.join("quarantine").join(format!("group-{group}-{now}"));
        let tombstone = node.tombstone(group);
        std::fs::create_dir_all(aside.parent().expect("a parent")).map_err(|e| e.to_string())?;
        std::fs::write(&tombstone, b"").map_err(|e| format!("{}: {e}", tombstone.display()))?;
        std::fs::rename(&dir, &aside).map_err(|e| format!("{}: {e}", dir.display()))?;
        node.damaged.remove(&group);
        node.core.on_quarantined(group);
        self.checked.remove(&(id, group));
        if let Some(damage) = self.damaged_groups.get_mut(&group).filter(|d| d.node == id) {
            damage.rebuilt = true;
        }
        *self.report.faults.entry("repair_quarantined".to_string()).or_default() += 1;
        self.note(format!("node {id} quarantined its damaged replica of group {group}"));
        Ok(())
    }

    /// The group's leader tells the asker whether it still counts it a member.
    fn on_members(&mut self, id: NodeId, from: NodeId, group: GroupId) {
        if let Some(part) = self.nodes[&id].groups.get(&group) {
            if part.core().is_leader() {
                let status = part.status();
                let asker = from;
                let removed = !status.voters.contains(&asker) && !status.learners.contains(&asker);
                self.net.post(id, from, Msg::MembersAnswer { group, removed });
            }
        }
    }

    /// A passive replica asks about itself: the local replica judges it
    /// (a leader may demote it) and answers.
    fn on_passive_replica(&mut self, id: NodeId, from: NodeId, group: GroupId, since: u64) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(part) = node.groups.get_mut(&group) {
            let asker = u64::from(from.0);
            let answer = part
                .core_mut()
                .judge_passive(asker, since)
                .map_err(|e| format!("node {id} group {group} judging a passive replica: {e}"))?;
            if answer == PassiveAnswer::Demoting {
                self.note(format!("group {group}: leader {id} demotes passive voter {asker}"));
                self.drive(id, group)?;
            }
            self.net.post(id, from, Msg::PassiveAnswer { group, answer });
        }
        Ok(())
    }

    /// A peer confirms the node's passive replica was promoted: it is
    /// passive no longer.
    fn on_passive_answer(
        &mut self,
        id: NodeId,
        from: NodeId,
        group: GroupId,
        answer: PassiveAnswer,
    ) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(part) = node.groups.get_mut(&group) {
            if answer == PassiveAnswer::Promoted && part.core().is_passive() {
                part.core_mut()
                    .promoted()
                    .map_err(|e| format!("node {id} group {group} ending passivity: {e}"))?;
                let asker = from.0;
                self.note(format!(
                    "group {group}: node {asker} confirms node {id}'s passive replica was promoted"
                ));
            }
        }
        Ok(())
    }

    /// A group leader's answer about a stale replica asked of it.
    fn on_members_answer(&mut self, id: NodeId, group: GroupId, removed: bool) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("known node");
        if node.stale_asked.remove(&group) {
            let commands = node.core.on_stale_answer(group, removed);
            self.execute(id, commands)?;
        }
        Ok(())
    }

    /// The controller leader answers with its commit point.
    fn on_committed_query(&mut self, id: NodeId, from: NodeId) {
        let node = &self.nodes[&id];
        // As the real controller: only a leader that knows the commit point
        // (an entry of its term committed) answers.
        if let Some(part) = node
            .groups
            .get(&CONTROLLER_GROUP)
            .filter(|p| p.core().knows_commit_point())
        {
            let offset = part.core().committed_offset();
            self.net.post(id, from, Msg::CommittedAnswer { offset });
        }
    }

    /// Every live node's control loop: Raft ticks, metadata, hosting,
    /// membership, the controller leader's duties, heartbeats.
    fn tick_nodes(&mut self) -> Result<(), String> {
        let now = self.now();
        let ids: Vec<NodeId> = self.nodes.values().filter(|n| n.up).map(|n| n.id).collect();
        for id in ids {
            if !self.nodes[&id].up {
                continue;
            }
            let groups: Vec<GroupId> = self.nodes[&id].groups.keys().copied().collect();
            for group in groups {
                if let Some(part) = self.nodes.get_mut(&id).and_then(|n| n.groups.get_mut(&group)) {
                    part.tick();
                }
                self.drive(id, group)?;
                if !self.nodes[&id].up {
                    break;
                }
            }
            if !self.nodes[&id].up {
                continue;
            }
            self.follow_metadata(id)?;
            self.reconcile(id)?;
            self.reconcile_tasks(id);
            self.lead_controller(id)?;
            if now.is_multiple_of(HEARTBEAT_MS) {
                for controller in self.controllers() {
                    self.net.post(id, controller, Msg::Heartbeat);
                }
                if let Some(node) = self.nodes.get_mut(&id) {
                    node.heard.insert(id, now);
                }
            }
        }
        if now.is_multiple_of(1_000) {
            self.check_replicas()?;
        }
        Ok(())
    }

    fn follow_metadata(&mut self, id: NodeId) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(part) = node.groups.get(&CONTROLLER_GROUP) {
            let mut offset = node.core.meta().applied_offset;
            while offset < part.core().committed_offset() {
                let batches = part
                    .core()
                    .read_committed(offset, FETCH_BYTES)
                    .map_err(|e| format!("node {id} reading the controller log: {e}"))?;
                if batches.is_empty() {
                    break;
                }
                for batch in &batches {
                    node.core
                        .apply_batch(batch)
                        .map_err(|e| format!("node {id} applying the controller log: {e}"))?;
                }
                offset = node.core.meta().applied_offset;
            }
            return Ok(());
        }
        let controllers = self.controllers();
        let target = controllers[self.rng.between(0, controllers.len() as u64 - 1) as usize];
        let offset = self.nodes[&id].meta().applied_offset;
        self.net.post(id, target, Msg::MetaPull { offset });
        Ok(())
    }

    /// Carries out the controller core's commands on node `id`, as the real
    /// controller's shell does (`Controller::execute`).
    fn execute(&mut self, id: NodeId, commands: Vec<Command>) -> Result<(), String> {
        for command in commands {
            match command {
                Command::Host {
                    group,
                    founders,
                    rejoin,
                } => {
                    self.host(id, group, founders.as_deref(), rejoin)?;
                    self.nodes.get_mut(&id).expect("known node").core.on_hosted(group);
                }
                Command::Unhost { group } => {
                    if let Some(part) = self.nodes.get_mut(&id).expect("known node").groups.remove(&group) {
                        close(id, part)?;
                    }
                }
                Command::Reconfigure { group, voters } => self.reconfigure(id, group, &voters)?,
                Command::DeleteFiles { group } => self.delete_files(id, group)?,
                Command::PreferLeader { group, node } => self.prefer_leader(id, group, node)?,
                Command::Retain { group, retention_ms } => self.retain(id, group, retention_ms)?,
                Command::Compact { group, policy } => self.compact(id, group, policy)?,
            }
        }
        Ok(())
    }

    /// As `ReplicaMsg::Reconfigure`: the local replica, if it leads, steps
    /// the group's voters towards `voters`.
    fn reconfigure(&mut self, id: NodeId, group: GroupId, voters: &[NodeId]) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(part) = node.groups.get_mut(&group) else {
            return Ok(());
        };
        let change = part
            .core_mut()
            .step_towards(&voters.iter().map(|n| n.to_raft()).collect::<Vec<_>>())
            .map_err(|e| format!("node {id} group {group} reconfigure: {e}"))?;
        if let Some(change) = change {
            self.note(format!("group {group}: leader {id} proposes {change:?}"));
        }
        self.drive(id, group)
    }

    /// As `ReplicaMsg::PreferLeader`: the local replica, if it leads, hands
    /// leadership to the preferred replica once it has caught up.
    fn prefer_leader(&mut self, id: NodeId, group: GroupId, preferred: NodeId) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(part) = node.groups.get_mut(&group) else {
            return Ok(());
        };
        if part.core_mut().prefer_leader(preferred.to_raft()) {
            self.note(format!(
                "group {group}: leader {id} hands leadership to preferred replica {preferred}"
            ));
        }
        self.drive(id, group)
    }

    /// As `ReplicaMsg::Retain`: the local replica deletes its closed
    /// segments older than `retention_ms` by the simulated clock.
    fn retain(&mut self, id: NodeId, group: GroupId, retention_ms: u64) -> Result<(), String> {
        let now_ms = self.now() as i64;
        let horizon_ms = now_ms - retention_ms as i64;
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(part) = node.groups.get_mut(&group) else {
            return Ok(());
        };
        // What retention may delete, read first to judge the deletion by.
        let doomed = closed_segment_records(part);
        let compacted = part
            .core_mut()
            .compact_for_retention(now_ms, retention_ms)
            .map_err(|e| format!("node {id} group {group} retention: {e}"))?;
        if let Some(done) = compacted {
            let (topic, partition) = partition_of(&self.nodes, group);
            for (offset, timestamp_ms) in doomed.into_iter().filter(|(o, _)| *o < done.start_offset) {
                if timestamp_ms >= horizon_ms {
                    self.running.add(Anomaly::ExpiredTooSoon {
                        topic: topic.clone(),
                        partition,
                        node: id,
                        offset,
                        timestamp_ms,
                        horizon_ms,
                    });
                }
            }
            *self
                .report
                .faults
                .entry("retention_compactions".to_string())
                .or_default() += 1;
            self.note(format!(
                "group {group}: node {id} retention deleted {} segments, log starts at {}",
                done.segments, done.start_offset
            ));
        }
        self.drive(id, group)
    }

    /// As `ReplicaMsg::Compact` and the replica's own reminders: the local
    /// replica compacts its log by the simulated clock until the pass ends.
    fn compact(&mut self, id: NodeId, group: GroupId, policy: runnel_storage::CompactionPolicy) -> Result<(), String> {
        const STEPS_MAX: usize = 100_000;
        let now_ms = self.now() as i64;
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(part) = node.groups.get_mut(&group) else {
            return Ok(());
        };
        let done = match part.core_mut().compact_log(now_ms, policy, STEPS_MAX) {
            Ok(done) => done,
            // As the replica actor: logged; damage it met is recorded in
            // the store, and driving the replica fails it for repair.
            Err(e) => {
                self.note(format!("group {group}: node {id} compaction failed: {e}"));
                return self.drive(id, group);
            }
        };
        if done.more {
            return Err(format!(
                "node {id} group {group}: compaction did not end in {STEPS_MAX} steps"
            ));
        }
        if let Some(outcome) = done.finished.filter(|o| o.segments_rewritten > 0) {
            *self.report.faults.entry("log_compactions".to_string()).or_default() += 1;
            self.note(format!(
                "group {group}: node {id} compaction rewrote {} segments, removed {} records",
                outcome.segments_rewritten, outcome.records_removed
            ));
        }
        self.drive(id, group)
    }

    /// As `Broker::delete_replica_files`: a tombstone, then the files go.
    fn delete_files(&mut self, id: NodeId, group: GroupId) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("known node");
        let dir = node.group_dir(group);
        if !dir.is_dir() {
            return Ok(());
        }
        let tombstone = node.tombstone(group);
        std::fs::write(&tombstone, b"").map_err(|e| format!("{}: {e}", tombstone.display()))?;
        std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        self.checked.remove(&(id, group));
        if self.damaged_groups.get(&group).is_some_and(|d| d.node == id) {
            // The damaged copy is gone; the group has others.
            self.damaged_groups.remove(&group);
        }
        self.nodes.get_mut(&id).expect("known node").damaged.remove(&group);
        self.note(format!("node {id} deleted its stale replica of group {group}"));
        Ok(())
    }

    /// The controller core's hosting and healing duties on node `id`, when
    /// due (as the real controller's control loop).
    fn reconcile(&mut self, id: NodeId) -> Result<(), String> {
        let now = self.now();
        let node = self.nodes.get_mut(&id).expect("known node");
        let due = node.core.due(now);
        if due.reconcile {
            let dir = node.dir.clone();
            let commands = node.core.reconcile(|group| ever_hosted_in(&dir, group));
            self.execute(id, commands)?;
            let unassigned = self.nodes[&id].core.unassigned_hosted();
            for group in unassigned {
                let node = self.nodes.get_mut(&id).expect("known node");
                let member = node.groups.get(&group).is_some_and(|p| group_view(p).counts(id));
                let command = node.core.on_unassigned(group, member);
                self.execute(id, command.into_iter().collect())?;
            }
        }
        if due.heal {
            self.ask_about_damaged(id);
            self.settle(id)?;
            self.ask_about_passive(id);
            self.collect_stale(id)?;
        }
        if due.prefer {
            let members = self.member_views(id);
            let commands = self.nodes[&id].core.preferred_leaders(&members);
            self.execute(id, commands)?;
            let commands = self.nodes[&id].core.retention();
            self.execute(id, commands)?;
        }
        Ok(())
    }

    /// Membership as node `id` sees it now: alive if heard from lately.
    fn member_views(&self, id: NodeId) -> Vec<MemberView> {
        let now = self.now();
        let node = &self.nodes[&id];
        (1..=self.config.nodes)
            .map(NodeId)
            .map(|n| {
                let heard = if n == id {
                    Some(now)
                } else {
                    node.heard.get(&n).copied()
                };
                let liveness = match heard {
                    Some(t) if t + DEAD_MS > now => Liveness::Alive,
                    _ => Liveness::Dead {
                        since_ms: heard.unwrap_or(0) + DEAD_MS,
                    },
                };
                MemberView { node: n, liveness }
            })
            .collect()
    }

    /// Nudges every hosted group whose voters differ from its assignment.
    fn settle(&mut self, id: NodeId) -> Result<(), String> {
        let now = self.now();
        let targets = self.nodes.get_mut(&id).expect("known node").core.settle_targets(now);
        for (group, assigned) in targets {
            let node = self.nodes.get_mut(&id).expect("known node");
            let Some(view) = node.groups.get(&group).map(group_view) else {
                continue;
            };
            let command = node.core.on_settle_status(group, &assigned, &view);
            self.execute(id, command.into_iter().collect())?;
        }
        Ok(())
    }

    /// Passive replicas ask the group's other replicas whether they were
    /// promoted (or, of a leader, to be demoted).
    fn ask_about_passive(&mut self, id: NodeId) {
        let node = &self.nodes[&id];
        let mut asks = Vec::new();
        for (&group, part) in &node.groups {
            let Some(since) = part.core().passive_since() else {
                continue;
            };
            let peers = node.core.passive_peers(group, &group_view(part));
            asks.extend(peers.into_iter().map(|peer| (group, peer, since)));
        }
        for (group, peer, since) in asks {
            let msg = Msg::PassiveReplica { group, since };
            self.net.post(id, peer, msg);
        }
    }

    /// Stale replica directories: asks unanswered since the last round count
    /// as "nobody confirmed the removal"; new candidates wait for the
    /// controller leader's commit point (asked of every controller voter;
    /// only the leader answers).
    fn collect_stale(&mut self, id: NodeId) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("known node");
        let unanswered: Vec<GroupId> = std::mem::take(&mut node.stale_asked).into_iter().collect();
        for group in unanswered {
            let commands = self
                .nodes
                .get_mut(&id)
                .expect("known node")
                .core
                .on_stale_answer(group, false);
            self.execute(id, commands)?;
        }
        let node = self.nodes.get_mut(&id).expect("known node");
        let on_disk = replica_dirs(&node.dir)?;
        let candidates = node.core.stale_candidates(&on_disk, |g| node.groups.contains_key(&g));
        if candidates.is_empty() {
            return Ok(());
        }
        node.stale_candidates = candidates;
        for controller in self.controllers() {
            self.net.post(id, controller, Msg::CommittedQuery);
        }
        Ok(())
    }

    /// The controller leader's commit point reached node `id`: the core
    /// picks the stale candidates to ask their groups' leaders about.
    fn on_leader_committed(&mut self, id: NodeId, committed: u64) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("known node");
        let candidates = std::mem::take(&mut node.stale_candidates);
        let checks = node.core.stale_checks(&candidates, committed);
        for check in checks {
            let Some(ask) = check.ask else {
                let commands = self
                    .nodes
                    .get_mut(&id)
                    .expect("known node")
                    .core
                    .on_stale_answer(check.group, true);
                self.execute(id, commands)?;
                continue;
            };
            self.nodes
                .get_mut(&id)
                .expect("known node")
                .stale_asked
                .insert(check.group);
            for member in ask {
                let msg = Msg::Members { group: check.group };
                self.net.post(id, member, msg);
            }
        }
        Ok(())
    }

    /// On the controller leader: the workload's topic and dataflow, then
    /// the core's moves of the replicas and tasks of nodes the simulated
    /// failure detector holds dead.
    fn lead_controller(&mut self, id: NodeId) -> Result<(), String> {
        let now = self.now();
        let node = self.nodes.get_mut(&id).expect("known node");
        let leads = node
            .groups
            .get(&CONTROLLER_GROUP)
            .is_some_and(|p| p.core().is_leader() && node.meta().applied_offset >= p.core().committed_offset());
        if !leads {
            node.leading_since = None;
            return Ok(());
        }
        node.leading_since.get_or_insert(now);
        let commands = if !node.meta().metadata.topics.contains_key(TOPIC)
            || (self.tasks.def.is_some() && !node.meta().metadata.dataflows.contains_key(dataflow::DATAFLOW))
        {
            self.setup_commands(id)?
        } else {
            self.heal_commands(id)
        };
        if commands.is_empty() {
            return Ok(());
        }
        let node = self.nodes.get_mut(&id).expect("known node");
        for command in &commands {
            let batch = command_batch(command, now as i64).map_err(|e| format!("encoding {command:?}: {e}"))?;
            if let Some(part) = node.groups.get_mut(&CONTROLLER_GROUP) {
                part.produce(batch, Acks::All, 0, SimReply::Nobody);
            }
            if matches!(command, MetadataCommand::ReplaceReplica { .. }) {
                self.report.replica_moves += 1;
            }
        }
        self.note(format!("controller leader {id} proposes {commands:?}"));
        self.drive(id, CONTROLLER_GROUP)
    }

    /// The workload's topic, then its dataflow, placed by the core (at most
    /// once per `MOVES_EVERY_MS` while not applied yet).
    fn setup_commands(&mut self, id: NodeId) -> Result<Vec<MetadataCommand>, String> {
        let now = self.now();
        let all: Vec<NodeId> = (1..=self.config.nodes).map(NodeId).collect();
        let node = self.nodes.get_mut(&id).expect("known node");
        if node.topic_proposed_ms.is_some_and(|t| t + MOVES_EVERY_MS > now) {
            return Ok(Vec::new());
        }
        node.topic_proposed_ms = Some(now);
        if !node.meta().metadata.topics.contains_key(TOPIC) {
            let mut config = TopicConfig::new(self.config.partitions, self.config.replication);
            if let Some(min_insync) = self.config.min_insync {
                config.min_insync = min_insync;
            }
            if self.config.retention_ms.is_some() {
                config.retention_ms = self.config.retention_ms;
            }
            if self.config.compact {
                use runnel_actors::metadata::CleanupPolicy;
                // With a retention too, both run: compact,delete.
                config.cleanup = match self.config.retention_ms {
                    Some(_) => CleanupPolicy::CompactDelete,
                    None => CleanupPolicy::Compact,
                };
            }
            let command = node
                .core
                .create_topic(TOPIC.to_string(), config, &all)
                .map_err(|e| format!("placing the topic: {e}"))?;
            return Ok(vec![command]);
        }
        let Some(def) = self.tasks.def.clone() else {
            return Ok(Vec::new());
        };
        if !self.table_written()? {
            return self.setup_table(id);
        }
        let node = self.nodes.get_mut(&id).expect("known node");
        dataflow::start_commands(&node.core, &def, &all)
    }

    /// The dataflow's table: its topic, then its rows proposed on each
    /// partition's leader, again each time until all are committed (a row
    /// written twice is still one row).
    fn setup_table(&mut self, id: NodeId) -> Result<Vec<MetadataCommand>, String> {
        let all: Vec<NodeId> = (1..=self.config.nodes).map(NodeId).collect();
        let node = self.nodes.get(&id).expect("known node");
        let Some(meta) = node.meta().metadata.topics.get(dataflow::TABLE).cloned() else {
            let mut config = TopicConfig::new(dataflow::TABLE_PARTITIONS, self.config.replication);
            config.cleanup = runnel_actors::metadata::CleanupPolicy::Compact;
            let command = node
                .core
                .create_topic(dataflow::TABLE.to_string(), config, &all)
                .map_err(|e| format!("placing the table: {e}"))?;
            return Ok(vec![command]);
        };
        for partition in 0..dataflow::TABLE_PARTITIONS {
            let group = meta.group_id(partition);
            let leader = self
                .nodes
                .iter()
                .find(|(_, n)| n.up && n.groups.get(&group).is_some_and(|p| p.core().is_leader()))
                .map(|(&leader, _)| leader);
            let batch = dataflow::table_batch(partition).map_err(|e| format!("the table's rows: {e}"))?;
            let (Some(leader), Some(batch)) = (leader, batch) else {
                continue;
            };
            if let Some(part) = self.nodes.get_mut(&leader).and_then(|n| n.groups.get_mut(&group)) {
                part.produce(batch, Acks::All, 0, SimReply::Nobody);
            }
            self.drive(leader, group)?;
        }
        Ok(Vec::new())
    }

    /// Whether every row of the dataflow's table is committed.
    fn table_written(&self) -> Result<bool, String> {
        let records = self.leader_records(dataflow::TABLE)?;
        let keys: BTreeSet<&[u8]> = records.iter().filter_map(|r| r.record.key.as_deref()).collect();
        Ok(keys.len() == dataflow::table_rows())
    }

    /// The core's moves off the nodes silent for `DEAD_MS` (a leader new to
    /// the job first listens for `DEAD_MS`: nodes it has not heard yet are
    /// suspects, not dead), at most once per `MOVES_EVERY_MS`.
    fn heal_commands(&mut self, id: NodeId) -> Vec<MetadataCommand> {
        let now = self.now();
        let nodes = self.config.nodes;
        let node = self.nodes.get_mut(&id).expect("known node");
        let since = node.leading_since.unwrap_or(now);
        if now < since + DEAD_MS || now < node.last_moves_ms + MOVES_EVERY_MS {
            return Vec::new();
        }
        let members: Vec<MemberView> = (1..=nodes)
            .map(NodeId)
            .map(|n| {
                let heard = node.heard.get(&n).copied();
                let liveness = match heard {
                    Some(t) if t + DEAD_MS > now => Liveness::Alive,
                    _ => Liveness::Dead {
                        since_ms: heard.unwrap_or(since).max(since) + DEAD_MS,
                    },
                };
                MemberView { node: n, liveness }
            })
            .collect();
        let commands = node.core.heal(now, &members);
        if !commands.is_empty() {
            node.last_moves_ms = now;
        }
        commands
    }

    /// A message reached a client (a producer or a consumer).
    fn on_client_message(&mut self, client: NodeId, msg: Msg) {
        match msg {
            Msg::MetaAnswer(metadata) => {
                if let Some(view) = self.views.get_mut(&client) {
                    view.metadata = Some(*metadata);
                }
            }
            Msg::Produced { request, result } => self.on_produced(client, request, result),
            Msg::Fetched { request, result } => self.on_fetched(client, request, result),
            _ => {}
        }
    }

    /// A produce's answer: the batch it was sent for is acknowledged, to be
    /// sent again, or done with (see [`produce_failed`]).
    fn on_produced(&mut self, client: NodeId, request: u64, result: Result<u64, BrokerError>) {
        let now = self.now();
        let Some(producer) = self.producers.iter_mut().find(|p| p.node == client) else {
            return;
        };
        let Some((&partition, _)) = producer.pending.iter().find(|(_, p)| p.requests.contains(&request)) else {
            return;
        };
        let view = self.views.get_mut(&client).expect("client view");
        let pending = producer.pending.get_mut(&partition).expect("pending batch");
        let outcome = match result {
            Ok(offset) => Some(Outcome::Acked { offset }),
            Err(e) => {
                if let BrokerError::NotLeader { group, leader } = &e {
                    view.heard_leader(*group, *leader);
                }
                let short = match &e {
                    BrokerError::NotEnoughReplicas { .. } => Some("refused_not_enough_replicas"),
                    BrokerError::NotEnoughReplicasAfterAppend { .. } => Some("short_of_replicas_after_append"),
                    _ => None,
                };
                if let Some(kind) = short {
                    *self.report.faults.entry(kind.to_string()).or_default() += 1;
                }
                produce_failed(pending, e, now)
            }
        };
        if let Some(outcome) = outcome {
            self.finish_batch(client, partition, outcome);
        }
    }

    /// A fetch's answer: the consumer takes its records and fetches again
    /// at once, or (nothing new, or refused) after a pause.
    fn on_fetched(&mut self, client: NodeId, request: u64, result: Result<(Vec<RecordBatch>, u64), BrokerError>) {
        let now = self.now();
        let Some(consumer) = self.consumers.iter_mut().find(|c| c.node == client) else {
            return;
        };
        let Some((&partition, _)) = consumer.in_flight.iter().find(|(_, (r, _, _))| *r == request) else {
            return;
        };
        consumer.in_flight.remove(&partition);
        consumer.next_fetch.insert(partition, now + FETCH_IDLE_MS);
        let view = self.views.get_mut(&client).expect("client view");
        let group = view
            .metadata
            .as_ref()
            .and_then(|m| m.topics.get(TOPIC))
            .map(|t| t.group_id(partition));
        match result {
            Ok((batches, _)) => take_fetched(consumer, &mut self.consumer_reads, partition, &batches, now),
            Err(BrokerError::NotLeader { leader, .. }) => {
                if let Some(group) = group {
                    view.heard_leader(group, leader);
                }
            }
            // As the client's consumer: retention deleted the records from
            // here, so it reads on from the oldest one left.
            Err(BrokerError::OffsetOutOfRange { offset, start, .. }) if offset < start => {
                consumer.position.insert(partition, start);
            }
            Err(_) => {}
        }
    }

    /// Records a batch's outcome for each of its records and readies the
    /// producer for the next one (a fresh identity after anything but an ack).
    fn finish_batch(&mut self, client: NodeId, partition: u32, outcome: Outcome) {
        let producer = self.producers.iter_mut().find(|p| p.node == client).expect("producer");
        let Some(pending) = producer.pending.remove(&partition) else {
            return;
        };
        let count = pending.ids.len() as i32;
        if let Outcome::Acked { offset } = &outcome {
            // The running check: the offset must hold this very record
            // wherever it has committed.
            for (i, id) in pending.ids.iter().enumerate() {
                let at = offset + i as u64;
                let group = group_of(&self.views, client, partition);
                if let Some(Some(found)) = group.and_then(|g| self.committed.get(&g)).and_then(|c| c.get(&at)) {
                    if found != id {
                        self.running.add(Anomaly::InconsistentOffset {
                            id: id.clone(),
                            topic: TOPIC.to_string(),
                            partition,
                            acked_offset: at,
                            found_at: at,
                        });
                    }
                }
            }
            let next = producer.next_sequence.entry(partition).or_insert(0);
            *next = runnel_storage::sequence::sequence_add(*next, i64::from(count));
        } else {
            producer.generation += 1;
            producer.next_sequence.clear();
        }
        for (i, id) in pending.ids.into_iter().enumerate() {
            let outcome = match &outcome {
                Outcome::Acked { offset } => Outcome::Acked {
                    offset: offset + i as u64,
                },
                other => other.clone(),
            };
            self.writes.push(Write {
                id,
                topic: TOPIC.to_string(),
                partition,
                outcome,
            });
        }
    }

    fn producers_idle(&self) -> bool {
        self.producers.iter().all(|p| p.pending.is_empty())
    }

    fn step_clients(&mut self) {
        let now = self.now();
        let nodes: Vec<NodeId> = self.nodes.keys().copied().collect();
        // Metadata refresh.
        let clients: Vec<NodeId> = self.views.keys().copied().collect();
        for client in clients {
            let view = self.views.get_mut(&client).expect("client view");
            if view.asked_ms.is_none_or(|t| t + METADATA_EVERY_MS <= now) {
                view.asked_ms = Some(now);
                let target = nodes[self.rng.between(0, nodes.len() as u64 - 1) as usize];
                self.net.post(client, target, Msg::MetaQuery);
            }
        }
        for index in 0..self.producers.len() {
            self.step_producer(index, now);
        }
        for index in 0..self.consumers.len() {
            self.step_consumer(index, now);
        }
        self.step_tasks();
    }

    /// The node a client sends a group's requests to: the leader it heard
    /// of, else a replica of the assignment chosen from the seed.
    fn target(&mut self, client: NodeId, group: GroupId, partition: u32, avoid: Option<NodeId>) -> Option<NodeId> {
        let view = self.views.get(&client)?;
        if let Some(&leader) = view.leader.get(&group) {
            if Some(leader) != avoid {
                return Some(leader);
            }
        }
        let replicas = view
            .metadata
            .as_ref()?
            .topics
            .get(TOPIC)?
            .assignment
            .get(partition as usize)?
            .clone();
        let choice = replicas[self.rng.between(0, replicas.len() as u64 - 1) as usize];
        Some(choice)
    }

    /// The simulated topic as a client last heard of it.
    fn client_topic(&self, client: NodeId) -> Option<TopicMeta> {
        self.views.get(&client)?.metadata.as_ref()?.topics.get(TOPIC).cloned()
    }

    /// A producer's turn: per partition, the batch in flight is given up,
    /// sent again or left waiting; with none in flight, a new one goes out
    /// when due.
    fn step_producer(&mut self, index: usize, now: u64) {
        let client = self.producers[index].node;
        let Some(topic) = self.client_topic(client) else {
            return;
        };
        for partition in 0..topic.config.partitions {
            let group = topic.group_id(partition);
            if self.producers[index].pending.contains_key(&partition) {
                self.step_pending(index, partition, group, now);
            } else {
                self.produce_next(index, partition, group, now);
            }
        }
    }

    /// The batch a producer has in flight to `partition`: recorded failed or
    /// unknown after `GIVE_UP_MS`, sent again (elsewhere after a timeout)
    /// when its request timed out or its retry is due.
    fn step_pending(&mut self, index: usize, partition: u32, group: GroupId, now: u64) {
        let client = self.producers[index].node;
        let pending = self.producers[index]
            .pending
            .get_mut(&partition)
            .expect("pending batch");
        if now >= pending.started_ms + GIVE_UP_MS {
            let outcome = give_up(pending);
            self.finish_batch(client, partition, outcome);
            return;
        }
        let timed_out = now >= pending.sent_ms + REQUEST_TIMEOUT_MS;
        if timed_out {
            pending.maybe_written = true;
            pending.last_error = "request timed out".to_string();
        }
        let retry = pending.retry_at.is_some_and(|t| t <= now);
        if !timed_out && !retry {
            return;
        }
        let avoid = timed_out.then_some(pending.target);
        let batch = pending.batch.clone();
        let Some(target) = self.target(client, group, partition, avoid) else {
            return;
        };
        if timed_out {
            self.views.get_mut(&client).expect("client view").leader.remove(&group);
        }
        let request = self.new_request();
        let pending = self.producers[index]
            .pending
            .get_mut(&partition)
            .expect("pending batch");
        pending.requests.insert(request);
        pending.sent_ms = now;
        pending.retry_at = None;
        pending.target = target;
        self.net.post(client, target, Msg::Produce { request, group, batch });
    }

    /// A producer's next batch to `partition`, when producing, under the
    /// write cap, and due (the batch is drawn even when no node to send it
    /// to is known yet; it is dropped then).
    fn produce_next(&mut self, index: usize, partition: u32, group: GroupId, now: u64) {
        if !self.producing || self.writes.len() >= WRITES_MAX {
            return;
        }
        let producer = &self.producers[index];
        if producer.next_send.get(&partition).is_some_and(|&t| t > now) {
            return;
        }
        let client = producer.node;
        let (batch, ids) = self.new_batch(index, partition, now);
        let producer = &mut self.producers[index];
        producer.next_send.insert(partition, now + self.config.produce_every_ms);
        let Some(target) = self.target(client, group, partition, None) else {
            return;
        };
        let request = self.new_request();
        self.producers[index].pending.insert(
            partition,
            Pending {
                batch: batch.clone(),
                ids,
                started_ms: now,
                sent_ms: now,
                requests: BTreeSet::from([request]),
                target,
                retry_at: None,
                maybe_written: false,
                last_error: String::new(),
            },
        );
        self.net.post(client, target, Msg::Produce { request, group, batch });
    }

    /// A fresh request id.
    fn new_request(&mut self) -> u64 {
        let request = self.next_request;
        self.next_request += 1;
        request
    }

    /// A new batch of 1..=`BATCH_RECORDS_MAX` records (the count drawn from
    /// the seed) under the producer's identity and next sequence, and the
    /// write ids of its records.
    fn new_batch(&mut self, index: usize, partition: u32, now: u64) -> (RecordBatch, Vec<String>) {
        let count = self.rng.between(1, BATCH_RECORDS_MAX);
        let producer = &mut self.producers[index];
        let base_sequence = producer.next_sequence.get(&partition).copied().unwrap_or(0);
        let mut builder = BatchBuilder::new();
        builder.set_producer(ProducerInfo {
            producer_id: producer.producer_id(),
            producer_epoch: 0,
            base_sequence,
        });
        let mut ids = Vec::new();
        for _ in 0..count {
            let id = format!("p{}-{}", producer.index, producer.written);
            producer.written += 1;
            // The dataflow's input: an attempt of a card drawn from the seed.
            let roll = self.rng.between(0, u64::MAX - 1);
            let value = match self.tasks.def {
                Some(_) => dataflow::attempt_value(roll, now),
                None => id.clone().into_bytes(),
            };
            let mut record = written_record(&id, value, now);
            if self.config.compact {
                record.key = Some(Bytes::from(compaction_key(&id)));
            }
            if self.config.table_dataflow {
                let (key, value) = dataflow::table_row(roll, partition, now);
                (record.key, record.value) = (Some(Bytes::from(key)), value.map(Bytes::from));
            }
            builder.push(&record).expect("a small record encodes");
            ids.push(id);
        }
        (builder.build().expect("a small batch builds"), ids)
    }

    fn step_consumer(&mut self, index: usize, now: u64) {
        let client = self.consumers[index].node;
        let Some(topic) = self.client_topic(client) else {
            return;
        };
        for partition in 0..topic.config.partitions {
            let group = topic.group_id(partition);
            let consumer = &mut self.consumers[index];
            if consumer.next_fetch.get(&partition).is_some_and(|&t| t > now) {
                continue;
            }
            let mut avoid = None;
            if let Some(&(_, sent, target)) = consumer.in_flight.get(&partition) {
                if now < sent + REQUEST_TIMEOUT_MS {
                    continue;
                }
                consumer.in_flight.remove(&partition);
                avoid = Some(target);
                self.views.get_mut(&client).expect("client view").leader.remove(&group);
            }
            let Some(target) = self.target(client, group, partition, avoid) else {
                continue;
            };
            let request = self.next_request;
            self.next_request += 1;
            let consumer = &mut self.consumers[index];
            let offset = consumer.position.get(&partition).copied().unwrap_or(0);
            consumer.in_flight.insert(partition, (request, now, target));
            let fetch = Msg::Fetch {
                request,
                group,
                offset,
                max_bytes: FETCH_BYTES,
            };
            self.net.post(client, target, fetch);
        }
    }

    /// The running check: every replica's newly committed records against
    /// the first committed copy seen at each offset.
    /// Reads every committed record of every replica on a running node;
    /// a replica whose read meets damage fails as a running one does
    /// ([`World::on_running_damage`]). Whether any did.
    fn scrub(&mut self) -> Result<bool, String> {
        let mut damaged = Vec::new();
        for node in self.nodes.values().filter(|n| n.up) {
            for (&group, part) in node.groups.iter().filter(|(g, _)| **g != CONTROLLER_GROUP) {
                if let Err(e) = read_all_checked(part) {
                    if !e.is_damage() {
                        return Err(format!("node {} group {group} scrub: {e}", node.id));
                    }
                    damaged.push((node.id, group, e.to_string()));
                }
            }
        }
        for (id, group, error) in &damaged {
            *self
                .report
                .faults
                .entry("damage_found_by_final_read".to_string())
                .or_default() += 1;
            self.on_running_damage(*id, *group, error)?;
        }
        Ok(!damaged.is_empty())
    }

    fn check_replicas(&mut self) -> Result<(), String> {
        let mut found = Vec::new();
        let mut progress = Vec::new();
        let mut damaged = Vec::new();
        for node in self.nodes.values().filter(|n| n.up) {
            for (&group, part) in node.groups.iter().filter(|(g, _)| **g != CONTROLLER_GROUP) {
                let core = part.core();
                let committed = core.committed_offset();
                let checked = self.checked.get(&(node.id, group)).copied().unwrap_or(0);
                let mut offset = checked.max(core.store().log().start_offset());
                while offset < committed {
                    let batches = match core.read_committed(offset, FETCH_BYTES) {
                        Ok(batches) => batches,
                        // A reader met damage: the replica fails (below).
                        Err(e) if e.is_damage() => {
                            damaged.push((node.id, group, e.to_string()));
                            break;
                        }
                        Err(e) => return Err(format!("node {} group {group} read: {e}", node.id)),
                    };
                    let Some(last) = batches.last() else { break };
                    offset = last.next_offset().min(committed);
                    let records = records_of(&batches)?;
                    found.extend(
                        records
                            .into_iter()
                            .filter(|s| s.offset < committed)
                            .map(|s| (node.id, group, s)),
                    );
                }
                progress.push(((node.id, group), offset));
            }
        }
        self.checked.extend(progress);
        for (id, group, error) in &damaged {
            self.on_running_damage(*id, *group, error)?;
        }
        for (node, group, seen) in found {
            self.report.records_checked += 1;
            let first = self
                .committed
                .entry(group)
                .or_default()
                .entry(seen.offset)
                .or_insert_with(|| seen.id.clone());
            if *first != seen.id {
                let leader = first.clone().unwrap_or_default();
                let (topic, partition) = partition_of(&self.nodes, group);
                self.running.add(Anomaly::ReplicaDisagrees {
                    topic,
                    partition,
                    node,
                    offset: seen.offset,
                    leader,
                    replica: seen.id.unwrap_or_default(),
                });
            }
        }
        Ok(())
    }

    /// Whether every node is up, holds the metadata, and every partition
    /// (and the controller) has one leader whose voters are the assignment,
    /// with every replica's log equal to the leader's and all of it committed.
    fn converged(&self) -> bool {
        if self.nodes.values().any(|n| !n.up) {
            return false;
        }
        let mut groups: Vec<(GroupId, Vec<NodeId>)> = vec![(CONTROLLER_GROUP, self.controllers())];
        let Some(leader_meta) = self.nodes.values().find_map(|n| {
            let part = n.groups.get(&CONTROLLER_GROUP)?;
            part.core().is_leader().then_some(n.meta())
        }) else {
            return false;
        };
        if !leader_meta.metadata.topics.contains_key(TOPIC) {
            return false;
        }
        if self
            .nodes
            .values()
            .any(|n| n.meta().applied_offset != leader_meta.applied_offset)
        {
            return false;
        }
        for topic in leader_meta.metadata.topics.values() {
            for partition in 0..topic.config.partitions {
                let voters = topic.assignment[partition as usize].clone();
                groups.push((topic.group_id(partition), voters));
            }
        }
        groups
            .iter()
            .all(|(group, voters)| self.group_converged(*group, voters))
            && self.tasks_caught_up(leader_meta)
    }

    /// Every replica's view of its group, for a run that did not converge.
    fn describe_groups(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for node in self.nodes.values() {
            let assigned: Vec<GroupId> = node.meta().wanted_groups(node.id).keys().copied().collect();
            lines.push(format!(
                "node {} up={} metadata at {} assigned {assigned:?}",
                node.id,
                node.up,
                node.meta().applied_offset
            ));
            for part in node.groups.values() {
                let s = part.status();
                lines.push(format!(
                    "  group {} leader {:?} term {} voters {:?} learners {:?} committed {} end {}{}",
                    s.group,
                    s.leader,
                    s.term,
                    s.voters,
                    s.learners,
                    s.committed_offset,
                    s.end_offset,
                    if part.core().is_passive() { " passive" } else { "" }
                ));
            }
        }
        if let Some(topic) = self.nodes.values().find_map(|n| n.meta().metadata.topics.get(TOPIC)) {
            lines.push(format!(
                "assignment {:?} founders {:?}",
                topic.assignment, topic.founders
            ));
        }
        lines
    }

    /// Every committed record of a topic, partition by partition, from each
    /// partition's leader.
    fn leader_records(&self, topic: &str) -> Result<Vec<StoredRecord>, String> {
        let Some(meta) = self.nodes.values().find_map(|n| n.meta().metadata.topics.get(topic)) else {
            return Ok(Vec::new());
        };
        let mut records = Vec::new();
        for partition in 0..meta.config.partitions {
            let group = meta.group_id(partition);
            let leader = self
                .nodes
                .values()
                .filter_map(|n| n.groups.get(&group))
                .find(|p| p.core().is_leader());
            if let Some(part) = leader {
                records.extend(read_all(part).map_err(|e| format!("{topic}/{partition}: {e}"))?);
            }
        }
        Ok(records)
    }

    fn group_converged(&self, group: GroupId, voters: &[NodeId]) -> bool {
        let mut want = voters.to_vec();
        want.sort_unstable();
        let parts: Vec<&Part> = voters.iter().filter_map(|v| self.nodes[v].groups.get(&group)).collect();
        if parts.len() != voters.len() {
            return false;
        }
        let Some(leader) = parts.iter().find(|p| p.core().is_leader()) else {
            return false;
        };
        let status = leader.status();
        let mut have = status.voters.clone();
        have.sort_unstable();
        if have != want || !status.learners.is_empty() || status.committed_offset != status.end_offset {
            return false;
        }
        parts.iter().all(|p| {
            let s = p.status();
            s.committed_offset == status.committed_offset && s.end_offset == status.end_offset
        })
    }

    /// The dataflow's repartition partitions whose leader starts past
    /// offset 0: where its tasks deleted records every stage had read.
    fn repartition_partitions_purged(&self) -> u64 {
        let name = runnel_client::tasks::repartition_topic(dataflow::DATAFLOW);
        let Some(topic) = self
            .nodes
            .values()
            .find_map(|n| n.meta().metadata.topics.get(&name).cloned())
        else {
            return 0;
        };
        let starts = (0..topic.config.partitions).filter_map(|partition| {
            let group = topic.group_id(partition);
            let leader = self
                .nodes
                .values()
                .filter_map(|n| n.groups.get(&group))
                .find(|p| p.core().is_leader());
            leader.map(|p| p.core().store().first_offset())
        });
        starts.filter(|&start| start > 0).count() as u64
    }

    /// Final reads, the checker, and the report.
    fn finish(&mut self) -> Result<SimReport, String> {
        let mut history = History {
            writes: std::mem::take(&mut self.writes),
            consumer_reads: std::mem::take(&mut self.consumer_reads),
            compacted: self.config.compact,
            ..History::default()
        };
        let topic = self
            .nodes
            .values()
            .find_map(|n| n.meta().metadata.topics.get(TOPIC).cloned());
        let mut source = Vec::new();
        if let Some(topic) = topic {
            for partition in 0..topic.config.partitions {
                let group = topic.group_id(partition);
                let key = (TOPIC.to_string(), partition);
                for node in self.nodes.values() {
                    let Some(part) = node.groups.get(&group) else { continue };
                    let records = read_all(part).map_err(|e| format!("node {} group {group}: {e}", node.id))?;
                    let seen: Vec<Seen> = records.iter().map(|r| seen_of(r.offset, &r.record)).collect();
                    if part.core().is_leader() {
                        let start = part.core().store().log().start_offset();
                        history.log_starts.insert(key.clone(), start);
                        history.final_read.insert(key.clone(), seen.clone());
                        source.extend(records);
                    }
                    history.replica_reads.insert((key.clone(), node.id), seen);
                }
            }
        }
        let mut verdict = check::check(&history);
        verdict.merge(std::mem::take(&mut self.running));
        if self.tasks.def.is_some() {
            let sink = self.leader_records(dataflow::DATAFLOW)?;
            self.report.dataflow_results = self.check_dataflow(&source, &sink, &mut verdict)?;
            let purged = self.repartition_partitions_purged();
            self.report
                .faults
                .insert("repartition_partitions_purged".to_string(), purged);
        }
        let stats: SimStats = self.net.stats.clone();
        self.report.messages_sent = stats.sent;
        self.report.messages_dropped = stats.dropped;
        self.report.messages_duplicated = stats.duplicated;
        self.report.messages_cut = stats.cut_by_partition;
        self.report.verdict = verdict;
        self.report.trace = self.trace.iter().cloned().collect();
        Ok(self.report.clone())
    }
}

fn group_of(views: &BTreeMap<NodeId, ClientView>, client: NodeId, partition: u32) -> Option<GroupId> {
    let topic = views.get(&client)?.metadata.as_ref()?.topics.get(TOPIC)?;
    Some(group_id(topic.id, partition))
}

/// A batch retried for `GIVE_UP_MS` without an acknowledgement: unknown if
/// some attempt may have written it, else failed.
fn give_up(pending: &Pending) -> Outcome {
    if pending.maybe_written {
        Outcome::Unknown(format!("no acknowledgement in {GIVE_UP_MS} ms: {}", pending.last_error))
    } else {
        Outcome::Failed(pending.last_error.clone())
    }
}

/// A producer's record: its value, stamped `now`, with its write id as a header.
fn written_record(id: &str, value: Vec<u8>, now: u64) -> Record {
    Record {
        timestamp_ms: now as i64,
        value: Some(Bytes::from(value)),
        headers: vec![Header {
            key: WRITE_ID_HEADER.to_string(),
            value: Some(Bytes::from(id.to_string())),
        }],
        ..Record::default()
    }
}

/// What a failed produce means for the batch, as the real client's policy
/// ([`policy::classify`]) judges it: routing errors retry at once, load and
/// unknown outcomes after a pause (a produce with a producer id is safe to
/// send again), final errors end the batch — as unknown if an earlier
/// attempt may have written it, or if the error may speak of this very
/// batch stored earlier (a sequence error).
fn produce_failed(pending: &mut Pending, error: BrokerError, now: u64) -> Option<Outcome> {
    pending.last_error = error.to_string();
    match policy::classify(&error) {
        policy::Outcome::Retry => {
            let pause_ms = if matches!(error, BrokerError::NotLeader { .. }) {
                0
            } else {
                RETRY_PAUSE_MS
            };
            pending.retry_at = Some(now + pause_ms);
            None
        }
        policy::Outcome::Unknown => {
            pending.maybe_written = true;
            pending.retry_at = Some(now + RETRY_PAUSE_MS);
            None
        }
        policy::Outcome::Final => {
            let stored = matches!(
                error,
                BrokerError::StaleSequence { .. }
                    | BrokerError::SequenceMismatch { .. }
                    | BrokerError::ProducerFenced { .. }
            );
            if pending.maybe_written || stored {
                Some(Outcome::Unknown(pending.last_error.clone()))
            } else {
                Some(Outcome::Failed(pending.last_error.clone()))
            }
        }
    }
}

/// The groups with a replica directory under a node's `dir`.
/// The log segments of `log_dir` but the last (the active one), in order.
fn closed_segments(log_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(log_dir)
        .map_err(|e| format!("{}: {e}", log_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    segments.pop();
    Ok(segments)
}

/// Overwrites a metadata file with garbage; `kind` names the damage.
fn overwrite(path: &Path, kind: &'static str) -> Result<&'static str, String> {
    std::fs::write(path, b"not a metadata file").map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(kind)
}

fn replica_dirs(dir: &Path) -> Result<Vec<GroupId>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut groups = Vec::new();
    for entry in entries {
        let name = entry.map_err(|e| e.to_string())?.file_name();
        if let Some(group) = name
            .to_str()
            .and_then(|n| n.strip_prefix("group-")?.parse::<u64>().ok())
        {
            groups.push(GroupId(group));
        }
    }
    // In a fixed order: directory listings are not, and hosting draws from
    // the seed.
    groups.sort_unstable();
    Ok(groups)
}

/// Closes a replica the node no longer hosts (its files stay).
fn close(id: NodeId, mut part: Part) -> Result<(), String> {
    let group = part.group();
    part.core_mut()
        .persist_commit()
        .map_err(|e| format!("node {id} closing group {group}: {e}"))
}

/// Every committed record of a replica.
/// Every committed batch of a replica read (and so checksummed) once.
fn read_all_checked(part: &Part) -> Result<(), runnel_actors::ActorError> {
    let core = part.core();
    let committed = core.committed_offset();
    let mut offset = core.store().log().start_offset();
    while offset < committed {
        let batches = core.read_committed(offset, FETCH_BYTES)?;
        let Some(last) = batches.last() else { break };
        offset = last.next_offset();
    }
    Ok(())
}

/// The records (offset, timestamp) a retention pass could delete from the
/// replica: every closed segment's, whatever their age (the pass is judged
/// by which of them it took). Unreadable ones (damage, found elsewhere) are
/// left out.
fn closed_segment_records(part: &Part) -> Vec<(u64, i64)> {
    let log = part.core().store().log();
    let point = log.segment_bases().last().copied().unwrap_or(0);
    let mut offset = log.start_offset();
    let mut out = Vec::new();
    while offset < point {
        let Ok(batches) = log.read_until(offset, FETCH_BYTES, point) else {
            break;
        };
        let Some(last) = batches.last() else { break };
        offset = last.next_offset();
        for batch in batches.iter().filter(|b| !b.is_control()) {
            out.extend(batch.records().flatten().map(|r| (r.offset, r.record.timestamp_ms)));
        }
    }
    out
}

fn read_all(part: &Part) -> Result<Vec<StoredRecord>, String> {
    let core = part.core();
    let committed = core.committed_offset();
    let mut offset = core.store().log().start_offset();
    let mut records = Vec::new();
    while offset < committed {
        let batches = core.read_committed(offset, FETCH_BYTES).map_err(|e| e.to_string())?;
        let Some(last) = batches.last() else { break };
        offset = last.next_offset();
        for batch in batches.iter().filter(|b| !b.is_control()) {
            for record in batch.records() {
                let record = record.map_err(|e| e.to_string())?;
                if record.offset < committed {
                    records.push(record);
                }
            }
        }
    }
    Ok(records)
}
