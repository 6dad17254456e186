//! Dataflow tasks in the simulation. Each task is the real [`TaskRunner`]
//! (restore from the checkpoint, then steps), run as a future the
//! simulation's loop polls; its I/O is [`SimIo`]: every fetch and produce
//! travels the simulated network from the node metadata places the task on,
//! and its clock is the simulated one. The loop plays the node's task
//! supervisor: it starts the tasks metadata places on a node, stops those
//! placed elsewhere, restarts failed ones after the supervisor's back-off,
//! and a crash kills a node's tasks mid-step.
//!
//! The dataflow joins the simulation's records (authorization attempts)
//! by event time with a table of cards ([`TABLE`], written before the
//! dataflow starts; a versioned table, see `runnel_dataflow::versioned`),
//! keeping the attempts of cards with a row, then counts them per card in
//! tumbling windows and emits every change, so the sink must hold, per
//! window, each count from the filter's threshold up to the window's total
//! exactly once — any output lost or written twice across crashes,
//! restarts and moves shows, and so does a task restored without its table
//! (the join would drop its attempts).

use std::collections::BTreeMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use runnel_actors::client::{ClientError, ClientResult, FetchedBatches};
use runnel_actors::controller::ControllerCore;
use runnel_actors::metadata::{AppliedMetadata, DataflowMeta, GroupId, MetadataCommand, TopicMeta};
use runnel_actors::supervisor::RestartPolicy;
use runnel_actors::tasks::{repartition_topic, DataflowShape, TaskAssignment, TaskStatus};
use runnel_actors::{Acks, BrokerError};
use runnel_client::partition_for_key;
use runnel_client::plan::JoinKind;
use runnel_cluster::NodeId;
use runnel_dataflow::fraud::{decode_result, Attempt};
use runnel_dataflow::host::IDLE_POLL;
use runnel_dataflow::join::JoinWindow;
use runnel_dataflow::task::{TaskError, TaskIo, TaskRunner};
use runnel_dataflow::{Dataflow, DataflowDef, Emit, Window};
use runnel_storage::{BatchBuilder, Record, RecordBatch, StoredRecord};

use super::{Msg, World, REQUEST_TIMEOUT_MS, TOPIC};
use crate::check::{self, Anomaly, Verdict, WindowKey};

/// The simulated dataflow, and its sink topic.
pub const DATAFLOW: &str = "sim_counts";
const WINDOW_MS: i64 = 1_000;
/// Far above how late a record can reach its partition in the simulation (a
/// producer gives up after 8 s; a cut lasts 6 s at most), so no record is
/// late and the sink must equal the reference exactly.
const GRACE_MS: i64 = 30_000;
/// Counts above this are emitted.
const THRESHOLD: u64 = 1;
/// Cards the attempts are spread over.
const CARDS: u64 = 5;

/// How far back the table keeps its rows: the dataflow joins each attempt
/// with its card's row as of the attempt's time (the rows are dated 0).
const TABLE_HISTORY: Duration = Duration::from_secs(3_600);

/// The table the dataflow joins with, and its partitions.
pub const TABLE: &str = "sim_cards";
pub const TABLE_PARTITIONS: u32 = 2;

/// A row of [`TABLE`].
#[derive(serde::Serialize, serde::Deserialize)]
struct CardRow {
    region: String,
}

/// Whether `card` has a row: every card but the last.
fn has_row(card: &str) -> bool {
    card != format!("card-{}", CARDS - 1)
}

/// The rows of [`TABLE`] that hash to `partition`, as one batch (`None`
/// when none does).
pub fn table_batch(partition: u32) -> Result<Option<RecordBatch>, runnel_storage::StorageError> {
    let mut builder = BatchBuilder::new();
    let cards = (0..CARDS).map(|c| format!("card-{c}")).filter(|c| has_row(c));
    let mut any = false;
    for card in cards.filter(|c| partition_for_key(c.as_bytes(), TABLE_PARTITIONS) == partition) {
        let row = CardRow {
            region: format!("region-{}", card.len() % 2),
        };
        builder.push(&Record {
            timestamp_ms: 0,
            key: Some(card.clone().into()),
            value: Some(serde_json::to_vec(&row).unwrap_or_default().into()),
            headers: Vec::new(),
        })?;
        any = true;
    }
    if !any {
        return Ok(None);
    }
    builder.build().map(Some)
}

/// How many rows [`TABLE`] holds.
pub fn table_rows() -> usize {
    (0..CARDS).filter(|c| has_row(&format!("card-{c}"))).count()
}

/// Joins attempts with their card's row (dropping those of cards without
/// one), then counts them per card in tumbling windows, emitting every
/// change.
pub fn dataflow() -> DataflowDef {
    Dataflow::new(DATAFLOW)
        .source::<Attempt>(TOPIC)
        .join_table_as_of(
            TABLE,
            TABLE_PARTITIONS,
            (TABLE_HISTORY, Duration::ZERO),
            |a| a.card_number.clone(),
            |a, row: Option<CardRow>| row.map(|_| a),
        )
        .event_time(|a| a.at_ms)
        .key_by(|a| a.card_number.clone())
        .window(Window::tumbling(Duration::from_millis(WINDOW_MS as u64)).grace(Duration::from_millis(GRACE_MS as u64)))
        .count()
        .filter(|_card, _window, count| *count > THRESHOLD)
        .emit(Emit::Changes)
        .sink(DATAFLOW)
}

/// How far apart (ms) two attempts of a card may be to pair in [`join_dataflow`].
pub const JOIN_WITHIN_MS: i64 = 150;

/// One result of [`join_dataflow`]: two attempts of a card, `left_ms` and
/// `right_ms` their times.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Pair {
    card: String,
    left_ms: i64,
    right_ms: i64,
}

/// The records joined with themselves: each attempt with every attempt of
/// its card (itself included) at most [`JOIN_WITHIN_MS`] away, through two
/// source stages over the same topic and a join stage, so the sink must
/// hold every such pair exactly once across crashes, restarts and moves.
/// The grace is [`GRACE_MS`], so no record is late and nothing depends on
/// when watermarks move.
pub fn join_dataflow() -> DataflowDef {
    let right = Dataflow::new(DATAFLOW)
        .source::<Attempt>(TOPIC)
        .event_time(|a| a.at_ms)
        .key_by(|a| a.card_number.clone());
    let within =
        JoinWindow::within(Duration::from_millis(JOIN_WITHIN_MS as u64)).grace(Duration::from_millis(GRACE_MS as u64));
    Dataflow::new(DATAFLOW)
        .source::<Attempt>(TOPIC)
        .event_time(|a| a.at_ms)
        .key_by(|a| a.card_number.clone())
        .join(
            right,
            within,
            JoinKind::Inner,
            |card: &String, l: Option<&Attempt>, r: Option<&Attempt>| {
                Some(Pair {
                    card: card.clone(),
                    left_ms: l?.at_ms,
                    right_ms: r?.at_ms,
                })
            },
        )
        .sink(DATAFLOW)
}

/// Per pair of times (keyed `card@right_ms`, `left_ms`), how many times
/// [`join_dataflow`] must emit it.
pub fn join_reference(attempts: &[Attempt]) -> BTreeMap<WindowKey, u64> {
    let mut by_card: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for attempt in attempts {
        by_card.entry(&attempt.card_number).or_default().push(attempt.at_ms);
    }
    let mut pairs = BTreeMap::new();
    for (card, times) in &mut by_card {
        times.sort_unstable();
        for (i, &left_ms) in times.iter().enumerate() {
            let from = times[..i].partition_point(|&t| t < left_ms - JOIN_WITHIN_MS);
            for &right_ms in times[from..].iter().take_while(|&&t| t <= left_ms + JOIN_WITHIN_MS) {
                *pairs.entry((format!("{card}@{right_ms}"), left_ms)).or_default() += 1;
            }
        }
    }
    pairs
}

/// The value of a simulated record: an attempt of card `card % CARDS` at
/// `at_ms`.
pub fn attempt_value(card: u64, at_ms: u64) -> Vec<u8> {
    let attempt = Attempt {
        card_number: format!("card-{}", card % CARDS),
        amount_cents: 0,
        at_ms: at_ms as i64,
    };
    serde_json::to_vec(&attempt).unwrap_or_default()
}

/// Keys the table dataflow's rows take per partition.
const TABLE_KEYS: u64 = 8;

/// The simulated topic read as a table (a record's key names its row; one
/// without a value deletes it), each row's latest attempt counted per card
/// with its amounts summed: an aggregate over a table, whose rows move
/// between cards as they are rewritten.
pub fn table_dataflow() -> DataflowDef {
    Dataflow::new(DATAFLOW)
        .table::<Attempt>(TOPIC)
        .group_by(|_row: &str, attempt: &Attempt| Some(attempt.card_number.clone()))
        .aggregate(
            || (0u64, 0u64),
            |(rows, cents): &mut (u64, u64), a: &Attempt| (*rows, *cents) = (*rows + 1, *cents + a.amount_cents),
            |(rows, cents): &mut (u64, u64), a: &Attempt| (*rows, *cents) = (*rows - 1, *cents - a.amount_cents),
        )
        .sink(DATAFLOW)
}

/// A record of the table dataflow's input, drawn from `roll`: its row's
/// key (a few per partition, so a row's records keep their order) and its
/// attempt, or none (one in eight) to delete the row.
pub fn table_row(roll: u64, partition: u32, at_ms: u64) -> (String, Option<Vec<u8>>) {
    let key = format!("row-{partition}-{}", roll % TABLE_KEYS);
    let attempt = Attempt {
        card_number: format!("card-{}", (roll >> 8) % CARDS),
        amount_cents: (roll >> 16) % 1_000,
        at_ms: at_ms as i64,
    };
    let value = (!(roll >> 32).is_multiple_of(8)).then(|| serde_json::to_vec(&attempt).unwrap_or_default());
    (key, value)
}

/// What the table dataflow's sink must hold: per card of the rows the
/// topic's final contents leave (each key's last record; a row's records
/// are all in one partition, in offset order), the rows and their cents,
/// as `("card-1 rows", 0)` and `("card-1 cents", 0)`.
pub fn table_reference(source: &[StoredRecord]) -> BTreeMap<WindowKey, u64> {
    let mut rows: BTreeMap<&[u8], Option<Attempt>> = BTreeMap::new();
    for record in source {
        let Some(key) = record.record.key.as_deref() else {
            continue;
        };
        let row = record
            .record
            .value
            .as_deref()
            .and_then(|v| serde_json::from_slice(v).ok());
        rows.insert(key, row);
    }
    let mut expected = BTreeMap::new();
    for attempt in rows.into_values().flatten() {
        *expected
            .entry((format!("{} rows", attempt.card_number), 0))
            .or_default() += 1;
        *expected
            .entry((format!("{} cents", attempt.card_number), 0))
            .or_default() += attempt.amount_cents;
    }
    expected
}

/// The table dataflow's sink folded as a table (a tombstone deletes the
/// card's row), in [`table_reference`]'s form.
fn table_found(sink: &[StoredRecord]) -> Result<BTreeMap<WindowKey, u64>, String> {
    let mut cards: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for record in sink {
        let key = record.record.key.as_deref().ok_or("a sink record without a key")?;
        let card: String = serde_json::from_slice(key).map_err(|e| format!("sink key: {e}"))?;
        match record.record.value.as_deref() {
            Some(value) => {
                let aggregate = serde_json::from_slice(value).map_err(|e| format!("sink value: {e}"))?;
                cards.insert(card, aggregate);
            }
            None => {
                cards.remove(&card);
            }
        }
    }
    let mut found = BTreeMap::new();
    for (card, (rows, cents)) in cards {
        found.insert((format!("{card} rows"), 0), rows);
        found.insert((format!("{card} cents"), 0), cents);
    }
    Ok(found)
}

/// Per window, the counts the sink must hold in order: every count above
/// the threshold up to the window's total.
pub fn reference(attempts: &[Attempt]) -> BTreeMap<WindowKey, Vec<u64>> {
    let mut totals: BTreeMap<WindowKey, u64> = BTreeMap::new();
    for attempt in attempts.iter().filter(|a| has_row(&a.card_number)) {
        let start = attempt.at_ms - attempt.at_ms.rem_euclid(WINDOW_MS);
        *totals.entry((attempt.card_number.clone(), start)).or_default() += 1;
    }
    totals
        .into_iter()
        .filter(|(_, total)| *total > THRESHOLD)
        .map(|(key, total)| (key, (THRESHOLD + 1..=total).collect()))
        .collect()
}

/// The commands that create the dataflow's topics, then start it with its
/// tasks placed — what `BrokerService::start_dataflow` asks of the
/// controller, decided by the same core. Empty once it runs.
pub fn start_commands(
    core: &ControllerCore,
    def: &DataflowDef,
    nodes: &[NodeId],
) -> Result<Vec<MetadataCommand>, String> {
    let metadata = &core.meta().metadata;
    let Some(source) = metadata.topics.get(TOPIC) else {
        return Ok(Vec::new());
    };
    if metadata.dataflows.contains_key(DATAFLOW) {
        return Ok(Vec::new());
    }
    let shape = DataflowShape {
        source: def.source.clone(),
        sink: def.sink.clone(),
        stages: def.stages(),
    };
    let partitions = source.config.partitions;
    let missing = core.dataflow_topics_missing(DATAFLOW, &shape, partitions, source.config.replication);
    if missing.is_empty() {
        let dataflow = DataflowMeta {
            name: DATAFLOW.to_string(),
            source: shape.source,
            sink: shape.sink,
            stages: shape.stages,
            partitions,
            placement: Vec::new(),
        };
        let command = core
            .start_dataflow(dataflow, nodes)
            .map_err(|e| format!("placing the tasks: {e}"))?;
        return Ok(vec![command]);
    }
    missing
        .into_iter()
        .map(|(name, config)| {
            core.create_topic(name.clone(), config, nodes)
                .map_err(|e| format!("placing {name}: {e}"))
        })
        .collect()
}

/// A task's request, as the loop routes it.
pub enum Call {
    Fetch {
        topic: String,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    },
    Produce {
        topic: String,
        partition: u32,
        batch: RecordBatch,
    },
    DeleteRecords {
        topic: String,
        partition: u32,
        before_offset: u64,
    },
}

pub enum Answer {
    Fetched(ClientResult<FetchedBatches>),
    Produced(ClientResult<u64>),
}

#[derive(Default)]
struct IoState {
    now_ms: u64,
    next_call: u64,
    calls: Vec<(u64, Call)>,
    answers: BTreeMap<u64, Answer>,
}

/// A task's way to the cluster in the simulation: calls wait in a queue the
/// loop takes them from, and are answered when the network brings a reply
/// (or the request times out).
#[derive(Default)]
pub struct SimIo {
    state: Mutex<IoState>,
}

impl SimIo {
    fn lock(&self) -> MutexGuard<'_, IoState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn call(&self, call: Call) -> Answer {
        let id = {
            let mut state = self.lock();
            state.next_call += 1;
            let id = state.next_call;
            state.calls.push((id, call));
            id
        };
        poll_fn(|_| match self.lock().answers.remove(&id) {
            Some(answer) => Poll::Ready(answer),
            None => Poll::Pending,
        })
        .await
    }

    fn take_calls(&self) -> Vec<(u64, Call)> {
        std::mem::take(&mut self.lock().calls)
    }

    fn answer(&self, call: u64, answer: Answer) {
        self.lock().answers.insert(call, answer);
    }
}

impl TaskIo for SimIo {
    async fn fetch(&self, topic: &str, partition: u32, offset: u64, max_bytes: u32) -> ClientResult<FetchedBatches> {
        let call = Call::Fetch {
            topic: topic.to_string(),
            partition,
            offset,
            max_bytes,
        };
        match self.call(call).await {
            Answer::Fetched(result) => result,
            Answer::Produced(_) => Err(ClientError::Protocol("a produce answer to a fetch".to_string())),
        }
    }

    async fn produce(&self, topic: &str, partition: u32, batch: RecordBatch, _acks: Acks) -> ClientResult<u64> {
        let call = Call::Produce {
            topic: topic.to_string(),
            partition,
            batch,
        };
        match self.call(call).await {
            Answer::Produced(result) => result,
            Answer::Fetched(_) => Err(ClientError::Protocol("a fetch answer to a produce".to_string())),
        }
    }

    async fn delete_records(&self, topic: &str, partition: u32, before_offset: u64) -> ClientResult<u64> {
        let call = Call::DeleteRecords {
            topic: topic.to_string(),
            partition,
            before_offset,
        };
        match self.call(call).await {
            Answer::Produced(result) => result,
            Answer::Fetched(_) => Err(ClientError::Protocol("a fetch answer to a deletion".to_string())),
        }
    }

    fn now(&self) -> Duration {
        Duration::from_millis(self.lock().now_ms)
    }

    async fn sleep(&self, pause: Duration) {
        let until = self.now() + pause;
        poll_fn(|_| match self.now() >= until {
            true => Poll::Ready(()),
            false => Poll::Pending,
        })
        .await
    }
}

/// One running incarnation of a task: the host's task actor, as a future
/// that ends only with the task's failure.
pub struct SimTask {
    io: Arc<SimIo>,
    status: Arc<Mutex<TaskStatus>>,
    run: Pin<Box<dyn Future<Output = TaskError>>>,
}

impl SimTask {
    fn start(def: Arc<DataflowDef>, assignment: TaskAssignment, now_ms: u64) -> SimTask {
        let io = Arc::new(SimIo::default());
        io.lock().now_ms = now_ms;
        let status = Arc::new(Mutex::new(TaskStatus::default()));
        let run = {
            let (io, status) = (io.clone(), status.clone());
            async move {
                let mut runner = match TaskRunner::restore(def, assignment, io.clone(), status).await {
                    Ok(runner) => runner,
                    Err(e) => return e,
                };
                loop {
                    match runner.step().await {
                        Ok(true) => {}
                        Ok(false) => io.sleep(IDLE_POLL).await,
                        Err(e) => return e,
                    }
                }
            }
        };
        SimTask {
            io,
            status,
            run: Box::pin(run),
        }
    }

    /// Runs the task until it waits for an answer or the clock; its error
    /// if it failed.
    fn poll(&mut self, now_ms: u64) -> Option<TaskError> {
        self.io.lock().now_ms = now_ms;
        let mut context = Context::from_waker(Waker::noop());
        match self.run.as_mut().poll(&mut context) {
            Poll::Ready(error) => Some(error),
            Poll::Pending => None,
        }
    }

    /// The next input offset the task will read.
    fn input_offset(&self) -> u64 {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).input_offset
    }
}

/// A task's call on its way: the client's routing, as [`Client`] does it
/// (follow the leader a replica names, else try another replica; retry
/// what certainly had no effect, and a produce with a producer id, until
/// the client's timeout).
///
/// [`Client`]: runnel_actors::client::Client
pub struct TaskRequest {
    task: (NodeId, u32),
    call_id: u64,
    call: Call,
    group: GroupId,
    replicas: Vec<NodeId>,
    /// The node of the attempt in flight and when it went.
    target: NodeId,
    sent_ms: u64,
    /// Not before this (after a refusal that named no leader).
    resend_ms: u64,
    deadline_ms: u64,
    /// A produce a retry can never write twice (it carries a producer id).
    retry_safe: bool,
    /// An attempt of this produce may have been written.
    maybe_written: bool,
    last_error: String,
}

impl TaskRequest {
    fn topic_partition(&self) -> (&str, u32) {
        match &self.call {
            Call::Fetch { topic, partition, .. }
            | Call::Produce { topic, partition, .. }
            | Call::DeleteRecords { topic, partition, .. } => (topic, *partition),
        }
    }

    fn is_produce(&self) -> bool {
        matches!(self.call, Call::Produce { .. })
    }

    /// The error a call ends with once the client gives up.
    fn unavailable(&self) -> ClientError {
        let (topic, partition) = self.topic_partition();
        ClientError::Unavailable {
            topic: topic.to_string(),
            partition,
            timeout_ms: CLIENT_TIMEOUT_MS,
            last_error: self.last_error.clone(),
        }
    }
}

/// The client's timeout for one call, all attempts included.
const CLIENT_TIMEOUT_MS: u64 = 15_000;
/// The pause before trying another replica after a refusal.
const RETRY_PAUSE_MS: u64 = 20;

/// The simulation's dataflow side: the tasks running on each node.
#[derive(Default)]
pub struct Tasks {
    pub def: Option<Arc<DataflowDef>>,
    /// The dataflow is [`join_dataflow`].
    join: bool,
    /// The dataflow is [`table_dataflow`].
    table: bool,
    /// (node, task) → the incarnation running there.
    running: BTreeMap<(NodeId, u32), SimTask>,
    /// Request id → the call it is an attempt of.
    requests: BTreeMap<u64, TaskRequest>,
    /// Calls waiting to be tried again.
    resends: Vec<TaskRequest>,
    /// (node, group) → the leader the node's tasks last heard of.
    leaders: BTreeMap<(NodeId, GroupId), NodeId>,
    /// (node, task) → consecutive failures and when it may start again.
    backoff: BTreeMap<(NodeId, u32), (u32, u64)>,
}

impl Tasks {
    /// The simulated dataflow's tasks (none unless `enabled`): the windowed
    /// count, with `join` the stream–stream self-join, with `table` the
    /// aggregate over a table.
    pub fn new(enabled: bool, join: bool, table: bool) -> Tasks {
        let def = match (join, table) {
            (true, _) => join_dataflow(),
            (_, true) => table_dataflow(),
            _ => dataflow(),
        };
        Tasks {
            def: enabled.then(|| Arc::new(def)),
            join,
            table,
            ..Tasks::default()
        }
    }

    /// A node crashed: its tasks die where they stand.
    pub fn crash(&mut self, node: NodeId) {
        self.running.retain(|(n, _), _| *n != node);
        self.requests.retain(|_, r| r.task.0 != node);
        self.resends.retain(|r| r.task.0 != node);
        self.leaders.retain(|(n, _), _| *n != node);
        self.backoff.retain(|(n, _), _| *n != node);
    }
}

impl World {
    /// The node's task supervisor: starts the tasks metadata places here
    /// (after the back-off, for failed ones) and stops those placed elsewhere.
    pub(super) fn reconcile_tasks(&mut self, id: NodeId) {
        let Some(def) = self.tasks.def.clone() else { return };
        let now = self.now();
        let wanted: BTreeMap<u32, TaskAssignment> = self.nodes[&id]
            .meta()
            .metadata
            .tasks_of(id)
            .into_iter()
            .filter(|t| t.dataflow == DATAFLOW)
            .map(|t| (t.task, t))
            .collect();
        let here: Vec<(NodeId, u32)> = self.tasks.running.keys().copied().filter(|(n, _)| *n == id).collect();
        for key in here {
            if !wanted.contains_key(&key.1) {
                self.stop_task(key);
                self.tasks.backoff.remove(&key);
                self.note(format!("node {id} stops task {} (placed elsewhere)", key.1));
            }
        }
        for (task, assignment) in wanted {
            let key = (id, task);
            let waiting = self.tasks.backoff.get(&key).is_some_and(|&(_, at)| at > now);
            if self.tasks.running.contains_key(&key) || waiting {
                continue;
            }
            self.tasks
                .running
                .insert(key, SimTask::start(def.clone(), assignment, now));
            self.report.task_starts += 1;
            self.note(format!("node {id} starts task {task}"));
        }
    }

    fn stop_task(&mut self, key: (NodeId, u32)) {
        self.tasks.running.remove(&key);
        self.tasks.requests.retain(|_, r| r.task != key);
        self.tasks.resends.retain(|r| r.task != key);
    }

    /// Every running task goes as far as it can; its calls go out on the
    /// network; attempts unanswered too long are given up on.
    pub(super) fn step_tasks(&mut self) {
        let now = self.now();
        let expired: Vec<u64> = self
            .tasks
            .requests
            .iter()
            .filter(|(_, r)| now >= r.sent_ms + REQUEST_TIMEOUT_MS)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            let Some(mut request) = self.tasks.requests.remove(&id) else {
                continue;
            };
            self.tasks.leaders.remove(&(request.task.0, request.group));
            request.last_error = format!("node {}: no answer in {REQUEST_TIMEOUT_MS} ms", request.target);
            if request.is_produce() && !request.retry_safe {
                // It may have been written: a retry could write it twice.
                let error = request.unavailable();
                self.answer_task(&request, Err(error));
                continue;
            }
            request.maybe_written |= request.is_produce();
            request.resend_ms = now;
            self.retry(request);
        }
        let due: Vec<TaskRequest> = {
            let (due, later) = std::mem::take(&mut self.tasks.resends)
                .into_iter()
                .partition(|r| r.resend_ms <= now);
            self.tasks.resends = later;
            due
        };
        for request in due {
            self.attempt(request);
        }
        let keys: Vec<(NodeId, u32)> = self.tasks.running.keys().copied().collect();
        for key in keys {
            let Some(task) = self.tasks.running.get_mut(&key) else {
                continue;
            };
            if let Some(error) = task.poll(now) {
                self.task_failed(key, error);
                continue;
            }
            for (call_id, call) in task.io.take_calls() {
                self.route_task_call(key, call_id, call);
            }
        }
    }

    fn task_failed(&mut self, key: (NodeId, u32), error: TaskError) {
        self.stop_task(key);
        self.report.task_failures += 1;
        if let TaskError::OutputLost { .. } = &error {
            self.running.add(Anomaly::DataflowOutputLost {
                dataflow: DATAFLOW.to_string(),
                task: key.1,
                error: error.to_string(),
            });
        }
        let now = self.now();
        let entry = self.tasks.backoff.entry(key).or_insert((0, now));
        entry.0 += 1;
        let pause = RestartPolicy::default().backoff(entry.0 as usize).as_millis() as u64;
        entry.1 = now + pause;
        self.note(format!(
            "task {} on node {} failed ({error}); restarts in {pause} ms",
            key.1, key.0
        ));
    }

    /// Starts a task's call: the partition as the task's node knows it.
    fn route_task_call(&mut self, key: (NodeId, u32), call_id: u64, call: Call) {
        let (group, replicas) = match self.task_call_partition(key.0, &call) {
            Ok(found) => found,
            Err(error) => {
                if let Some(task) = self.tasks.running.get(&key) {
                    task.io.answer(call_id, answer_error(&call, error));
                }
                return;
            }
        };
        let call = match call {
            Call::Produce {
                topic,
                partition,
                batch,
            } if self.config.bug_unsequenced_task_output && topic == DATAFLOW => match unsequenced(&batch) {
                Ok(batch) => Call::Produce {
                    topic,
                    partition,
                    batch,
                },
                Err(e) => {
                    if let Some(task) = self.tasks.running.get(&key) {
                        task.io.answer(call_id, Answer::Produced(Err(ClientError::from(e))));
                    }
                    return;
                }
            },
            call => call,
        };
        let retry_safe = match &call {
            Call::Produce { batch, .. } => batch.header().producer.producer_id >= 0,
            Call::Fetch { .. } | Call::DeleteRecords { .. } => true,
        };
        let now = self.now();
        self.attempt(TaskRequest {
            task: key,
            call_id,
            call,
            group,
            replicas,
            target: NodeId(0),
            sent_ms: now,
            resend_ms: now,
            deadline_ms: now + CLIENT_TIMEOUT_MS,
            retry_safe,
            maybe_written: false,
            last_error: "no replica tried".to_string(),
        });
    }

    /// The group and replicas of a call's partition, as node `node`'s
    /// metadata has them (the client's errors when it has not).
    fn task_call_partition(&self, node: NodeId, call: &Call) -> Result<(GroupId, Vec<NodeId>), ClientError> {
        let (topic_name, partition) = match call {
            Call::Fetch { topic, partition, .. }
            | Call::Produce { topic, partition, .. }
            | Call::DeleteRecords { topic, partition, .. } => (topic.clone(), *partition),
        };
        let topic: Option<TopicMeta> = self.nodes[&node].meta().metadata.topics.get(&topic_name).cloned();
        match topic {
            None => Err(ClientError::UnknownTopic(topic_name)),
            Some(topic) => match topic.assignment.get(partition as usize) {
                Some(replicas) => Ok((topic.group_id(partition), replicas.clone())),
                None => Err(ClientError::PartitionOutOfRange {
                    topic: topic_name,
                    partition,
                    partitions: topic.config.partitions,
                }),
            },
        }
    }

    /// Sends one attempt: to the leader the node heard of, else to a
    /// replica of the assignment drawn from the seed.
    fn attempt(&mut self, mut request: TaskRequest) {
        let node = request.task.0;
        let target = match self.tasks.leaders.get(&(node, request.group)) {
            Some(&leader) => leader,
            None => {
                let replicas = &request.replicas;
                replicas[self.rng.between(0, replicas.len() as u64 - 1) as usize]
            }
        };
        let id = self.next_request;
        self.next_request += 1;
        request.target = target;
        request.sent_ms = self.now();
        let group = request.group;
        let msg = match &request.call {
            Call::Fetch { offset, max_bytes, .. } => Msg::Fetch {
                request: id,
                group,
                offset: *offset,
                max_bytes: *max_bytes as usize,
            },
            Call::Produce { batch, .. } => Msg::Produce {
                request: id,
                group,
                batch: batch.clone(),
            },
            Call::DeleteRecords { before_offset, .. } => Msg::DeleteRecords {
                request: id,
                group,
                before_offset: *before_offset,
            },
        };
        self.tasks.requests.insert(id, request);
        self.net.post(node, target, msg);
    }

    /// Tries a call again (after `resend_ms`), unless the client's timeout
    /// has passed.
    fn retry(&mut self, request: TaskRequest) {
        if self.now() >= request.deadline_ms {
            let error = request.unavailable();
            self.answer_task(&request, Err(error));
            return;
        }
        self.tasks.resends.push(request);
    }

    /// A reply that reached node `node`: a task's, if the request is one.
    pub(super) fn on_task_reply(&mut self, node: NodeId, request: u64, reply: Result<TaskReply, BrokerError>) {
        if self.tasks.requests.get(&request).is_none_or(|r| r.task.0 != node) {
            return;
        }
        let Some(pending) = self.tasks.requests.remove(&request) else {
            return;
        };
        let from = pending.target;
        let error = match reply {
            Ok(TaskReply::Produced(offset)) => {
                self.tasks.leaders.insert((node, pending.group), from);
                return self.answer_task(&pending, Ok(Answer::Produced(Ok(offset))));
            }
            Ok(TaskReply::Fetched { batches, committed }) => {
                self.tasks.leaders.insert((node, pending.group), from);
                let offset = match &pending.call {
                    Call::Fetch { offset, .. } => *offset,
                    Call::Produce { .. } | Call::DeleteRecords { .. } => 0,
                };
                let fetched = Ok(FetchedBatches::new(offset, batches, committed));
                return self.answer_task(&pending, Ok(Answer::Fetched(fetched)));
            }
            Err(error) => error,
        };
        self.task_call_failed(node, pending, error);
    }

    /// A task's call refused or unanswered: sent again (to the leader named,
    /// or after a pause) when that is safe, else answered with the error.
    fn task_call_failed(&mut self, node: NodeId, mut pending: TaskRequest, error: BrokerError) {
        let now = self.now();
        let from = pending.target;
        match error {
            BrokerError::NotLeader { leader, .. } => {
                pending.last_error = format!("node {from} does not lead");
                match leader {
                    Some(leader) if leader != from => {
                        self.tasks.leaders.insert((node, pending.group), leader);
                        pending.resend_ms = now;
                    }
                    _ => {
                        self.tasks.leaders.remove(&(node, pending.group));
                        pending.resend_ms = now + RETRY_PAUSE_MS;
                    }
                }
                self.retry(pending);
            }
            BrokerError::LeadershipLost
            | BrokerError::Busy(_)
            | BrokerError::UnknownGroup(_)
            | BrokerError::NotYetCommitted(_) => {
                pending.last_error = format!("node {from}: retryable failure");
                pending.resend_ms = now + RETRY_PAUSE_MS;
                self.retry(pending);
            }
            BrokerError::Timeout(_) | BrokerError::ReplicaFailed { .. } if pending.retry_safe => {
                pending.maybe_written |= pending.is_produce();
                pending.last_error = format!("node {from}: no answer from the replica");
                pending.resend_ms = now + RETRY_PAUSE_MS;
                self.retry(pending);
            }
            error => {
                let unknown = matches!(error, BrokerError::Timeout(_) | BrokerError::ReplicaFailed { .. });
                // As the client: after an attempt whose outcome is unknown,
                // a definite refusal says nothing of that attempt.
                let error = match pending.maybe_written && !unknown {
                    true => {
                        pending.last_error = format!("{error}, after an attempt whose outcome is unknown");
                        pending.unavailable()
                    }
                    false => ClientError::Broker(error),
                };
                self.answer_task(&pending, Err(error));
            }
        }
    }

    fn answer_task(&mut self, request: &TaskRequest, answer: ClientResult<Answer>) {
        let Some(task) = self.tasks.running.get(&request.task) else {
            return;
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => answer_error(&request.call, error),
        };
        task.io.answer(request.call_id, answer);
    }

    /// Whether every task metadata places is running where it is placed and
    /// has read all of its input's committed log.
    pub(super) fn tasks_caught_up(&self, leader_meta: &AppliedMetadata) -> bool {
        let Some(def) = &self.tasks.def else { return true };
        let Some(dataflow) = leader_meta.metadata.dataflows.get(DATAFLOW) else {
            return false;
        };
        let topics = &leader_meta.metadata.topics;
        dataflow.placement.iter().enumerate().all(|(task, &node)| {
            let assignment = TaskAssignment {
                dataflow: DATAFLOW.to_string(),
                task: task as u32,
                partitions: dataflow.partitions,
                stages: dataflow.stages,
                generation: leader_meta.metadata.generations.get(DATAFLOW).copied().unwrap_or(0),
            };
            let input = match def.source_of(assignment.stage()) {
                Some((topic, _)) => topic.to_string(),
                None => repartition_topic(DATAFLOW),
            };
            let Some(group) = topics.get(&input).map(|t| t.group_id(assignment.partition())) else {
                return false;
            };
            let committed = self
                .nodes
                .values()
                .filter_map(|n| n.groups.get(&group))
                .find(|p| p.core().is_leader())
                .map(|p| p.core().committed_offset());
            let read = self.tasks.running.get(&(node, task as u32)).map(SimTask::input_offset);
            committed.is_some() && read == committed
        })
    }

    /// The sink against the reference computed from the source topic's
    /// final contents; returns the results checked.
    pub(super) fn check_dataflow(
        &self,
        source: &[StoredRecord],
        sink: &[StoredRecord],
        verdict: &mut Verdict,
    ) -> Result<u64, String> {
        let attempts: Vec<Attempt> = source
            .iter()
            .filter_map(|r| serde_json::from_slice(r.record.value.as_deref()?).ok())
            .collect();
        if self.tasks.table {
            let found = table_found(sink)?;
            check::check_result_counts(DATAFLOW, &table_reference(source), &found, verdict);
            return Ok(sink.len() as u64);
        }
        if self.tasks.join {
            let mut found: BTreeMap<WindowKey, u64> = BTreeMap::new();
            for record in sink {
                let value = record.record.value.as_deref().unwrap_or_default();
                let pair: Pair = serde_json::from_slice(value).map_err(|e| format!("sink value: {e}"))?;
                *found
                    .entry((format!("{}@{}", pair.card, pair.right_ms), pair.left_ms))
                    .or_default() += 1;
            }
            check::check_result_counts(DATAFLOW, &join_reference(&attempts), &found, verdict);
            return Ok(sink.len() as u64);
        }
        let results = sink
            .iter()
            .map(|r| decode_result(&r.record))
            .collect::<Result<Vec<_>, _>>()?;
        check::check_results(DATAFLOW, &reference(&attempts), &results, verdict);
        Ok(results.len() as u64)
    }
}

/// What a node answered a task.
pub enum TaskReply {
    Produced(u64),
    Fetched { batches: Vec<RecordBatch>, committed: u64 },
}

/// The batch's records in a batch without a producer id (the injected bug).
fn unsequenced(batch: &RecordBatch) -> Result<RecordBatch, runnel_storage::StorageError> {
    let mut builder = BatchBuilder::new();
    for record in batch.records() {
        builder.push(&record?.record)?;
    }
    builder.build()
}

fn answer_error(request: &Call, error: ClientError) -> Answer {
    match request {
        Call::Fetch { .. } => Answer::Fetched(Err(error)),
        Call::Produce { .. } | Call::DeleteRecords { .. } => Answer::Produced(Err(error)),
    }
}
