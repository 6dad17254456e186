//! A node's dataflow runtime: the registry of dataflows its binary knows,
//! the [`TaskSupervisor`] actor that runs the tasks metadata places here
//! (each a [`TaskActor`] linked to it, restarted with back-off from its
//! checkpoint when it fails), and [`DataflowHost`], the controller's handle.
//!
//! Unlike a replica, a task is never given up on: its failures are mostly
//! the cluster being unreachable, and a task placed elsewhere would fail the
//! same way. Restarts back off like the replicas' (100 ms doubling to 5 s).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use runnel_client::protocol::NodeId;
use runnel_client::tasks::{RestartPolicy, StateError, StateRead, StateRow, TaskAssignment, TaskHost, TaskStatus};
use runnel_client::{Client, LocalNode};

use runnel_client::plan::{Plan, PlanError};

use crate::builder::DataflowDef;
use crate::compile::compile;
use crate::task::{TaskError, TaskRunner};

/// How long an idle task waits before reading its input again. A task that
/// just made progress is likely right behind its upstream (a window task
/// behind the source tasks): it reads again after `BUSY_POLL`, doubling
/// the wait with each empty read up to `IDLE_POLL`.
pub const IDLE_POLL: Duration = Duration::from_millis(20);
const BUSY_POLL: Duration = Duration::from_millis(1);

/// The dataflows a node's binary knows, by name (closures cannot travel).
#[derive(Clone, Default)]
pub struct Registry {
    dataflows: BTreeMap<String, Arc<DataflowDef>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a dataflow; a later one with the same name replaces it.
    pub fn register(mut self, dataflow: DataflowDef) -> Registry {
        self.dataflows.insert(dataflow.name.clone(), Arc::new(dataflow));
        self
    }

    pub fn get(&self, name: &str) -> Option<Arc<DataflowDef>> {
        self.dataflows.get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.dataflows.keys().cloned().collect()
    }

    /// The definition a registered plan stands for, as dataflow `name`:
    /// refused when this binary does not register its dataflow, or
    /// registers it with other steps (another build planned it).
    pub fn resolve(&self, name: &str, plan: &Plan) -> Result<Arc<DataflowDef>, PlanError> {
        plan.validate()?;
        let dataflow = plan.registered().unwrap_or(name);
        let def = self.get(dataflow).ok_or_else(|| PlanError::Unregistered {
            dataflow: dataflow.to_string(),
            known: self.names().join(", "),
        })?;
        if let Some(differs) = plan_difference(&def.plan(), plan) {
            return Err(PlanError::RegisteredDiffers {
                dataflow: dataflow.to_string(),
                differs,
            });
        }
        let mut def = (*def).clone();
        def.name = name.to_string();
        Ok(Arc::new(def))
    }
}

/// Where `theirs` differs from `ours`, in words; `None` when it does not.
fn plan_difference(ours: &Plan, theirs: &Plan) -> Option<String> {
    if ours.source.topic != theirs.source.topic || ours.sink.topic != theirs.sink.topic {
        let (a, b) = (&ours.source.topic, &ours.sink.topic);
        let (c, d) = (&theirs.source.topic, &theirs.sink.topic);
        return Some(format!(
            "here it reads {a} and writes {b}; the plan reads {c} and writes {d}"
        ));
    }
    let steps = ours.operators.len().max(theirs.operators.len());
    (0..steps).find_map(|i| {
        let (a, b) = (ours.operators.get(i), theirs.operators.get(i));
        (a != b).then(|| format!("step {}: here {a:?}, in the plan {b:?}", i + 1))
    })
}

type TaskKey = (String, u32);
type StatusBoard = Arc<Mutex<BTreeMap<TaskKey, Arc<Mutex<TaskStatus>>>>>;

/// How the tasks reach the cluster: as a client of their own node.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub seeds: Vec<SocketAddr>,
    pub certs: PathBuf,
    /// The node the tasks run in: their requests to it skip the network.
    pub local: Option<LocalNode>,
}

/// The controller's handle on a node's dataflow runtime.
pub struct DataflowHost {
    registry: Registry,
    supervisor: ActorRef<SupervisorMsg>,
    board: StatusBoard,
}

impl DataflowHost {
    /// Starts the runtime of node `node`; tasks connect as clients through
    /// `client` once they are first placed here.
    pub async fn start(registry: Registry, node: NodeId, client: ClientSettings) -> Result<Arc<DataflowHost>, String> {
        let board: StatusBoard = Arc::default();
        let args = SupervisorArgs {
            registry: registry.clone(),
            node,
            settings: client,
            board: board.clone(),
        };
        let (supervisor, _) = Actor::spawn(None, TaskSupervisor, args)
            .await
            .map_err(|e| format!("starting the dataflow task supervisor: {e}"))?;
        Ok(Arc::new(DataflowHost {
            registry,
            supervisor,
            board,
        }))
    }

    pub fn shutdown(&self) {
        self.supervisor.stop(Some("node stopping".to_string()));
    }
}

impl Drop for DataflowHost {
    fn drop(&mut self) {
        self.supervisor.stop(Some("node stopping".to_string()));
    }
}

impl TaskHost for DataflowHost {
    fn plan(&self, dataflow: &str) -> Option<Plan> {
        self.registry.get(dataflow).map(|def| def.plan())
    }

    fn joined_sources(&self, dataflow: &str) -> Vec<String> {
        self.registry
            .get(dataflow)
            .map(|def| def.joined_sources.iter().map(|s| s.topic.clone()).collect())
            .unwrap_or_default()
    }

    fn assign(&self, tasks: Vec<TaskAssignment>, plans: BTreeMap<String, Plan>) {
        let _ = self.supervisor.cast(SupervisorMsg::Assign(tasks, plans));
    }

    fn status(&self) -> Vec<TaskStatus> {
        let board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        board
            .values()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    fn read_state(&self, dataflow: &str, task: u32, key: Option<Vec<u8>>) -> StateRead {
        let supervisor = self.supervisor.clone();
        let key_of_task = (dataflow.to_string(), task);
        Box::pin(async move {
            let failed = |reason: String| StateError::Failed {
                dataflow: key_of_task.0.clone(),
                task,
                reason,
            };
            let asked = supervisor
                .call(
                    |reply| SupervisorMsg::ReadState {
                        task: key_of_task.clone(),
                        key,
                        reply,
                    },
                    Some(STATE_READ_TIMEOUT),
                )
                .await
                .map_err(|e| failed(format!("the task supervisor did not answer: {e}")))?;
            match asked {
                CallResult::Success(answer) => answer,
                CallResult::Timeout => Err(StateError::Busy {
                    dataflow: key_of_task.0.clone(),
                    task,
                }),
                CallResult::SenderError => Err(failed("the task stopped before answering".to_string())),
            }
        })
    }
}

/// How long a state read waits for its task.
const STATE_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a state read's answer goes.
type StateReply = RpcReplyPort<Result<Vec<StateRow>, StateError>>;

pub enum SupervisorMsg {
    /// Every task placed on this node now, and the plans of those a SQL
    /// statement started.
    Assign(Vec<TaskAssignment>, BTreeMap<String, Plan>),
    /// Start a task that is wanted but not running (after a back-off).
    Restart(TaskKey),
    /// Read a task's state (a pull query); its task answers.
    ReadState {
        task: TaskKey,
        key: Option<Vec<u8>>,
        reply: StateReply,
    },
}

pub struct SupervisorArgs {
    registry: Registry,
    node: NodeId,
    settings: ClientSettings,
    board: StatusBoard,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    client: Option<Arc<Client>>,
    wanted: BTreeMap<TaskKey, TaskAssignment>,
    running: BTreeMap<TaskKey, ActorRef<TaskMsg>>,
    /// The plans of the SQL dataflows placed here, compiled.
    compiled: BTreeMap<String, (Plan, Result<Arc<DataflowDef>, PlanError>)>,
    /// Consecutive failures per task, for the back-off.
    failures: BTreeMap<TaskKey, u32>,
}

/// Runs and restarts this node's dataflow tasks.
pub struct TaskSupervisor;

impl Actor for TaskSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            args,
            client: None,
            wanted: BTreeMap::new(),
            running: BTreeMap::new(),
            compiled: BTreeMap::new(),
            failures: BTreeMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Assign(tasks, plans) => {
                let wanted: BTreeMap<TaskKey, TaskAssignment> =
                    tasks.into_iter().map(|t| ((t.dataflow.clone(), t.task), t)).collect();
                // A task whose assignment changed (a new generation after a
                // reset) is started again with the new one.
                let changed: Vec<TaskKey> = state
                    .wanted
                    .iter()
                    .filter(|(k, a)| wanted.get(*k).is_some_and(|w| w != *a))
                    .map(|(k, _)| k.clone())
                    .collect();
                state.wanted = wanted;
                let replanned = state.compile(plans);
                let gone: Vec<TaskKey> = state
                    .running
                    .keys()
                    .filter(|k| !state.wanted.contains_key(*k) || replanned.contains(&k.0) || changed.contains(k))
                    .cloned()
                    .collect();
                for key in gone {
                    if let Some(task) = state.running.remove(&key) {
                        tracing::info!(dataflow = %key.0, task = key.1, "task no longer placed here; stopping it");
                        task.stop(Some("placed elsewhere".to_string()));
                    }
                    state.args.board.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                }
                let missing: Vec<TaskKey> = state
                    .wanted
                    .keys()
                    .filter(|k| !state.running.contains_key(*k))
                    .cloned()
                    .collect();
                for key in missing {
                    state.start(&myself, key).await;
                }
            }
            SupervisorMsg::Restart(key) => {
                if state.wanted.contains_key(&key) && !state.running.contains_key(&key) {
                    state.start(&myself, key).await;
                }
            }
            SupervisorMsg::ReadState { task, key, reply } => match state.running.get(&task) {
                Some(actor) => {
                    let message = TaskMsg::ReadState {
                        task: task.clone(),
                        key,
                        reply,
                    };
                    if let Err(e) = actor.cast(message) {
                        tracing::debug!(dataflow = %task.0, task = task.1, error = %e, "a state read found its task stopping");
                    }
                }
                None => {
                    let (dataflow, task) = task;
                    let _ = reply.send(Err(StateError::NotHere { dataflow, task }));
                }
            },
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason): (ActorCell, String) = match event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, error.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".to_string()))
            }
            _ => return Ok(()),
        };
        let Some(key) = state
            .running
            .iter()
            .find(|(_, task)| task.get_id() == cell.get_id())
            .map(|(key, _)| key.clone())
        else {
            return Ok(());
        };
        state.running.remove(&key);
        state.failed(&myself, key, reason);
        Ok(())
    }
}

impl SupervisorState {
    async fn start(&mut self, myself: &ActorRef<SupervisorMsg>, key: TaskKey) {
        let Some(assignment) = self.wanted.get(&key).cloned() else {
            return;
        };
        let def = match self.compiled.get(&key.0) {
            Some((_, compiled)) => compiled.clone().map_err(|e| e.to_string()),
            None => self
                .args
                .registry
                .get(&key.0)
                .ok_or_else(|| TaskError::Unregistered(key.0.clone()).to_string()),
        };
        let def = match def {
            Ok(def) => def,
            Err(reason) => {
                self.status(&key, &assignment)
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .state = format!("failed: {reason}");
                tracing::error!(dataflow = %key.0, reason, "a task placed here cannot run");
                return;
            }
        };
        let client = match self.client().await {
            Ok(client) => client,
            Err(reason) => {
                self.failed(myself, key, reason);
                return;
            }
        };
        let status = self.status(&key, &assignment);
        let args = TaskArgs {
            def,
            assignment,
            client,
            status,
        };
        match Actor::spawn_linked(None, TaskActor, args, myself.get_cell()).await {
            Ok((task, _)) => {
                self.running.insert(key, task);
            }
            Err(e) => self.failed(myself, key, format!("starting the task: {e}")),
        }
    }

    /// Compiles the plans that are new or changed; the dataflows whose
    /// plan changed (their running tasks restart with the new one).
    fn compile(&mut self, plans: BTreeMap<String, Plan>) -> BTreeSet<String> {
        let mut replanned = BTreeSet::new();
        self.compiled.retain(|name, _| plans.contains_key(name));
        for (name, plan) in plans {
            if self.compiled.get(&name).is_some_and(|(known, _)| *known == plan) {
                continue;
            }
            let compiled = match plan.registered() {
                Some(_) => self.args.registry.resolve(&name, &plan),
                None => compile(&name, &plan).map(Arc::new),
            };
            if let Err(e) = &compiled {
                tracing::error!(dataflow = %name, error = %e, "a SQL dataflow's plan does not compile here");
            }
            if self.compiled.insert(name.clone(), (plan, compiled)).is_some() {
                replanned.insert(name);
            }
        }
        replanned
    }

    fn status(&self, key: &TaskKey, assignment: &TaskAssignment) -> Arc<Mutex<TaskStatus>> {
        let mut board = self.args.board.lock().unwrap_or_else(|p| p.into_inner());
        board
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(TaskStatus {
                    dataflow: key.0.clone(),
                    task: key.1,
                    stage: assignment.stage(),
                    partition: assignment.partition(),
                    node: self.args.node,
                    state: "starting".to_string(),
                    ..TaskStatus::default()
                }))
            })
            .clone()
    }

    async fn client(&mut self) -> Result<Arc<Client>, String> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let settings = &self.args.settings;
        let client = Client::connect_from(settings.seeds.clone(), &settings.certs, settings.local.clone())
            .await
            .map_err(|e| format!("dataflow tasks cannot reach the cluster as a client: {e}"))?;
        let client = Arc::new(client);
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Records a failure and schedules a restart with back-off.
    fn failed(&mut self, myself: &ActorRef<SupervisorMsg>, key: TaskKey, reason: String) {
        if !self.wanted.contains_key(&key) {
            return;
        }
        let failures = self.failures.entry(key.clone()).or_default();
        *failures += 1;
        // The replicas' back-off; tasks have no restart limit (see the module docs).
        let backoff = RestartPolicy::default().backoff(*failures as usize);
        if let Some(status) = self.args.board.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            let mut status = status.lock().unwrap_or_else(|p| p.into_inner());
            status.restarts += 1;
            status.state = format!("restarting: {reason}");
        }
        tracing::warn!(
            dataflow = %key.0,
            task = key.1,
            reason,
            backoff_ms = backoff.as_millis() as u64,
            "dataflow task failed; restarting it from its checkpoint"
        );
        myself.send_after(backoff, move || SupervisorMsg::Restart(key));
    }
}

pub enum TaskMsg {
    /// Restore from the checkpoint (the first message).
    Restore,
    /// Run one step.
    Step,
    /// Read the task's state (a pull query): answered between steps, and
    /// refused as retryable until the state is restored.
    ReadState {
        task: TaskKey,
        key: Option<Vec<u8>>,
        reply: StateReply,
    },
}

pub struct TaskArgs {
    def: Arc<DataflowDef>,
    assignment: TaskAssignment,
    client: Arc<Client>,
    status: Arc<Mutex<TaskStatus>>,
}

pub enum TaskState {
    Restoring(Option<TaskArgs>),
    /// With the wait before the next read if it finds nothing new.
    Running(Box<TaskRunner>, Duration),
}

/// One operator instance: a stage over one input partition.
pub struct TaskActor;

impl Actor for TaskActor {
    type Msg = TaskMsg;
    type State = TaskState;
    type Arguments = TaskArgs;

    async fn pre_start(&self, myself: ActorRef<TaskMsg>, args: TaskArgs) -> Result<TaskState, ActorProcessingErr> {
        // Restoring reads the cluster: it happens in a message, so the
        // supervisor is never blocked on it.
        myself.cast(TaskMsg::Restore)?;
        args.status.lock().unwrap_or_else(|p| p.into_inner()).state = "restoring".to_string();
        Ok(TaskState::Restoring(Some(args)))
    }

    async fn handle(
        &self,
        myself: ActorRef<TaskMsg>,
        message: TaskMsg,
        state: &mut TaskState,
    ) -> Result<(), ActorProcessingErr> {
        match (message, &mut *state) {
            (TaskMsg::Restore, TaskState::Restoring(args)) => {
                let Some(args) = args.take() else { return Ok(()) };
                let runner = TaskRunner::restore(args.def, args.assignment, args.client, args.status).await?;
                *state = TaskState::Running(Box::new(runner), BUSY_POLL);
                myself.cast(TaskMsg::Step)?;
            }
            (TaskMsg::ReadState { key, reply, .. }, TaskState::Running(runner, _)) => {
                let _ = reply.send(runner.read_state(key.as_deref()));
            }
            (TaskMsg::ReadState { task, reply, .. }, TaskState::Restoring(_)) => {
                let (dataflow, task) = task;
                let _ = reply.send(Err(StateError::Restoring { dataflow, task }));
            }
            (TaskMsg::Step, TaskState::Running(runner, wait)) => {
                if runner.step().await? {
                    *wait = BUSY_POLL;
                    myself.cast(TaskMsg::Step)?;
                } else {
                    myself.send_after(*wait, || TaskMsg::Step);
                    *wait = (*wait * 2).min(IDLE_POLL);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The runtime of a process that hosts nodes: twice as many workers as
/// cores (unless `TOKIO_WORKER_THREADS` says otherwise). A dataflow task's
/// step is a CPU-bound stretch of milliseconds between awaits; with spare
/// workers the OS preempts it, so the broker's actors (produce, fetch,
/// Raft) are not queued behind steps. Measured by `bench window` (b):
/// 0.99 M events/s with 2 workers, 1.2 M with 4, on 2 cores.
pub fn node_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        builder.worker_threads(2 * cores);
    }
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use runnel_client::plan::{Operator, PlanError};

    use super::*;
    use crate::compile::compile;

    #[test]
    fn a_builder_dataflow_is_a_plan_of_registered_steps_that_resolves_only_in_a_registry_that_has_them() {
        let def = crate::fraud::dataflow();
        let plan = def.plan();
        assert_eq!(plan.stages(), 2, "{plan:?}");
        assert_eq!(plan.registered(), Some(crate::fraud::NAME));
        assert_eq!(plan.validate(), Ok(()));
        let explained = plan.explain("fraud-copy");
        for step in [
            "RUST DECODE JSON as runnel_dataflow::fraud::Attempt",
            "RUST KEY_BY",
            "RUST COUNT",
            "RUST HAVING",
            "RUST EMIT Final",
            "fraud-copy.repartition",
        ] {
            assert!(explained.contains(step), "{step:?} missing from\n{explained}");
        }

        let registry = crate::builtin();
        let resolved = registry.resolve("fraud-copy", &plan).expect("resolves");
        assert_eq!((resolved.name.as_str(), resolved.stages()), ("fraud-copy", 2));
        assert_eq!(resolved.source, def.source);

        let refused = Registry::new()
            .resolve("fraud-copy", &plan)
            .expect_err("not registered");
        assert!(
            matches!(&refused, PlanError::Unregistered { dataflow, .. } if dataflow == crate::fraud::NAME),
            "{refused}"
        );
        assert!(refused.to_string().contains("same runnel build"), "{refused}");

        let mut other_build = plan.clone();
        other_build.operators.remove(1);
        let refused = registry.resolve("fraud-copy", &other_build).expect_err("other steps");
        assert!(
            matches!(&refused, PlanError::RegisteredDiffers { differs, .. } if differs.starts_with("step 2")),
            "{refused}"
        );

        let refused = compile("fraud-copy", &plan).expect_err("no closures in a plan");
        assert!(refused.to_string().contains("registry"), "{refused}");

        let mut mixed = plan;
        mixed
            .operators
            .push(Operator::Filter(runnel_client::plan::Expr::Column(0)));
        assert!(matches!(mixed.validate(), Err(PlanError::Invalid(why)) if why.contains("mixed with a SQL operator")));
    }
}
