//! The cluster's metadata as a deterministic state machine: the controller
//! (Raft group 0) commits [`MetadataCommand`]s, and every replica of the
//! controller applies them in the same order to the same [`Metadata`].
//!
//! Placement is decided by the controller leader *before* proposing (it knows
//! which nodes are alive), and the decision travels inside the command, so
//! applying a command never depends on anything but the command and the
//! state.

use std::collections::BTreeMap;

use bytes::Bytes;
// Topic settings, refusals and dataflow metadata travel to clients too, so
// they live in the client protocol.
pub use runnel_client::plan::{Plan, SqlObject};
pub use runnel_client::protocol::{
    CleanupPolicy, DataflowMeta, GroupId, MetadataError, NodeId, TopicConfig, TopicSetting, PARTITIONS_MAX,
    REPLICATION_MAX, TOPIC_SETTINGS_MAX,
};
use runnel_storage::{BatchBuilder, Record, RecordBatch, StorageError};
use serde::{Deserialize, Serialize};

use crate::tasks::TaskAssignment;

pub const TOPIC_NAME_BYTES_MAX: usize = 200;
/// Raft group id of the controller; an alias of [`GroupId::CONTROLLER`].
pub const CONTROLLER_GROUP: GroupId = GroupId::CONTROLLER;
/// Apply results kept for commands (by record offset).
const RESULTS_KEPT: usize = 1024;

pub fn validate_topic_name(name: &str) -> Result<(), MetadataError> {
    let invalid = |reason: &str| {
        Err(MetadataError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() || name.len() > TOPIC_NAME_BYTES_MAX {
        return invalid(&format!("it must be 1 to {TOPIC_NAME_BYTES_MAX} bytes long"));
    }
    if name == "." || name == ".." {
        return invalid("it cannot be . or ..");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return invalid("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// A committed change to the metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {
    CreateTopic {
        name: String,
        config: TopicConfig,
        /// Node ids holding each partition's replicas, decided by the leader.
        assignment: Vec<Vec<NodeId>>,
    },
    DeleteTopic {
        name: String,
    },
    /// Moves a partition's replica off `dead` onto `replacement`.
    ReplaceReplica {
        topic: String,
        partition: u32,
        dead: NodeId,
        replacement: NodeId,
    },
    /// Starts a dataflow with its tasks placed by the leader.
    StartDataflow {
        dataflow: DataflowMeta,
    },
    StopDataflow {
        name: String,
    },
    /// Moves a dataflow task off `dead` onto `replacement`.
    MoveDataflowTask {
        name: String,
        task: u32,
        dead: NodeId,
        replacement: NodeId,
    },
    /// Names a stream or table of the SQL catalog (format version 2 on).
    CreateObject {
        object: Box<SqlObject>,
    },
    DropObject {
        name: String,
    },
    /// Starts a SQL query: its dataflow, the plan every node compiles, and
    /// the stream or table it writes when the statement names one (all
    /// three or nothing).
    StartQuery {
        dataflow: DataflowMeta,
        plan: Box<Plan>,
        object: Option<Box<SqlObject>>,
    },
    /// The address Kafka clients reach `node` at (its `--kafka-listen`
    /// advertised address), or none when it serves no Kafka listener
    /// (format version 3 on).
    KafkaListener {
        node: NodeId,
        advertised: Option<String>,
    },
    /// Changes settings of a topic, in order (format version 5 on).
    AlterTopic {
        name: String,
        settings: Vec<TopicSetting>,
    },
    /// Appends partitions to a topic, with their replicas decided by the
    /// leader (format version 5 on). The new groups are founded by them.
    AddPartitions {
        name: String,
        assignment: Vec<Vec<NodeId>>,
    },
    /// Starts a new generation of a stopped dataflow (format version 5
    /// on): its tasks write with the next producer epoch, so output written
    /// again from the beginning is not taken for retries of the old.
    ResetDataflow {
        name: String,
    },
}

/// Dataflow names whose generation is remembered, at most.
pub const GENERATIONS_MAX: usize = 10_000;

/// Bytes of an advertised `host:port` at most.
pub const ADVERTISED_BYTES_MAX: usize = 255;

/// Persistent queries at most, so that plans in metadata stay bounded.
pub const QUERIES_MAX: usize = 100;
/// Streams and tables at most.
pub const OBJECTS_MAX: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub name: String,
    /// Unique for the cluster's life: a re-created topic gets a new id, so its
    /// partition groups never meet the old ones'.
    pub id: u64,
    pub config: TopicConfig,
    pub assignment: Vec<Vec<NodeId>>,
    /// The assignment at creation: the voters each group was founded with.
    /// A replica placed later joins as a learner instead.
    pub founders: Vec<Vec<NodeId>>,
    /// Per partition, the nodes its replicas were ever moved off.
    #[serde(default)]
    pub departed: Vec<Vec<NodeId>>,
}

impl TopicMeta {
    /// The Raft group id of one partition.
    pub fn group_id(&self, partition: u32) -> GroupId {
        group_id(self.id, partition)
    }
}

/// Partition groups: topic id in the high bits, partition in the low 20.
pub fn group_id(topic_id: u64, partition: u32) -> GroupId {
    GroupId((topic_id << 20) | u64::from(partition))
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub topics: BTreeMap<String, TopicMeta>,
    /// Topic ids start at 1 (group 0 is the controller).
    pub next_topic_id: u64,
    pub dataflows: BTreeMap<String, DataflowMeta>,
    /// The plan of each dataflow a SQL statement started, by dataflow name.
    pub plans: BTreeMap<String, Plan>,
    /// The SQL catalog: streams and tables by name.
    pub objects: BTreeMap<String, SqlObject>,
    /// Where Kafka clients reach each node that serves the Kafka protocol.
    pub kafka_listeners: BTreeMap<NodeId, String>,
    /// Each reset dataflow's generation (0, never reset, is not kept).
    #[serde(default)]
    pub generations: BTreeMap<String, i16>,
}

impl Metadata {
    /// Applies a committed command. Refusals leave the state unchanged and are
    /// the same on every replica.
    pub fn apply(&mut self, command: &MetadataCommand) -> Result<(), MetadataError> {
        match command {
            MetadataCommand::CreateTopic {
                name,
                config,
                assignment,
            } => self.create_topic(name, config, assignment),
            MetadataCommand::DeleteTopic { name } => match self.topics.remove(name) {
                Some(_) => Ok(()),
                None => Err(MetadataError::UnknownTopic(name.clone())),
            },
            MetadataCommand::ReplaceReplica {
                topic,
                partition,
                dead,
                replacement,
            } => self.replace_replica(topic, *partition, *dead, *replacement),
            MetadataCommand::StartDataflow { dataflow } => self.start_dataflow(dataflow),
            MetadataCommand::CreateObject { object } => self.create_object(object),
            MetadataCommand::DropObject { name } => self.drop_object(name),
            MetadataCommand::StartQuery { dataflow, plan, object } => {
                self.start_query(dataflow, plan, object.as_deref())
            }
            MetadataCommand::StopDataflow { name } => self.stop_dataflow(name),
            MetadataCommand::MoveDataflowTask {
                name,
                task,
                dead,
                replacement,
            } => self.move_dataflow_task(name, *task, *dead, *replacement),
            MetadataCommand::KafkaListener { node, advertised } => {
                self.set_kafka_listener(*node, advertised.as_deref())
            }
            MetadataCommand::AlterTopic { name, settings } => self.alter_topic(name, settings),
            MetadataCommand::AddPartitions { name, assignment } => self.add_partitions(name, assignment),
            MetadataCommand::ResetDataflow { name } => self.reset_dataflow(name),
        }
    }

    /// The next generation of a dataflow that is not running.
    fn reset_dataflow(&mut self, name: &str) -> Result<(), MetadataError> {
        if self.dataflows.contains_key(name) {
            return Err(MetadataError::DataflowRunning(name.to_string()));
        }
        let generation = self.generations.get(name).copied().unwrap_or(0);
        if generation == i16::MAX {
            return Err(MetadataError::InvalidConfig(format!(
                "dataflow {name:?} was reset {} times, the most a producer epoch counts; give it a new name",
                i16::MAX
            )));
        }
        if generation == 0 && self.generations.len() >= GENERATIONS_MAX {
            return Err(MetadataError::InvalidConfig(format!(
                "{GENERATIONS_MAX} dataflows were reset already; give this one a new name"
            )));
        }
        self.generations.insert(name.to_string(), generation + 1);
        Ok(())
    }

    /// Changes a topic's settings; all or none (the result must be valid).
    fn alter_topic(&mut self, name: &str, settings: &[TopicSetting]) -> Result<(), MetadataError> {
        if settings.len() > TOPIC_SETTINGS_MAX {
            return Err(MetadataError::InvalidConfig(format!(
                "{} settings changed at once; at most {TOPIC_SETTINGS_MAX}",
                settings.len()
            )));
        }
        let topic = self
            .topics
            .get_mut(name)
            .ok_or_else(|| MetadataError::UnknownTopic(name.to_string()))?;
        let mut config = topic.config.clone();
        for setting in settings {
            setting.apply_to(&mut config);
        }
        config.validate()?;
        use runnel_client::tasks::{checkpoint_topic, repartition_topic};
        let internal = [repartition_topic(""), checkpoint_topic("")];
        if config.cleanup.compacts() && internal.iter().any(|suffix| name.ends_with(suffix.as_str())) {
            return Err(MetadataError::InvalidConfig(format!(
                "{name} is a dataflow's internal topic, read in order from its start: compaction would drop records its tasks still need"
            )));
        }
        topic.config = config;
        Ok(())
    }

    /// Appends partitions founded by `assignment` to a topic that no
    /// running dataflow uses (a dataflow's partitioning is fixed while it runs).
    fn add_partitions(&mut self, name: &str, assignment: &[Vec<NodeId>]) -> Result<(), MetadataError> {
        if name == runnel_client::offsets::OFFSETS_TOPIC {
            return Err(MetadataError::InvalidConfig(format!(
                "{name} keeps its partitions: each group's offsets live in the partition its name hashes to"
            )));
        }
        let users = self.dataflows_using(name);
        if !users.is_empty() {
            return Err(MetadataError::TopicInUse {
                topic: name.to_string(),
                dataflows: users,
            });
        }
        let topic = self
            .topics
            .get_mut(name)
            .ok_or_else(|| MetadataError::UnknownTopic(name.to_string()))?;
        if assignment.is_empty() {
            return Err(MetadataError::InvalidConfig(format!(
                "topic {name:?} already has {} partitions; ask for more than that",
                topic.config.partitions
            )));
        }
        let mut config = topic.config.clone();
        config.partitions = u32::try_from(assignment.len())
            .ok()
            .and_then(|added| config.partitions.checked_add(added))
            .unwrap_or(u32::MAX);
        config.validate()?;
        let mut all = topic.assignment.clone();
        all.extend_from_slice(assignment);
        check_assignment(&config, &all)?;
        topic.config = config;
        topic.assignment = all;
        topic.founders.extend_from_slice(assignment);
        topic.departed.resize(topic.assignment.len(), Vec::new());
        Ok(())
    }

    /// The running dataflows that read, write or keep state in `topic`.
    pub fn dataflows_using(&self, topic: &str) -> Vec<String> {
        self.dataflows
            .values()
            .filter(|d| dataflow_uses(d, topic) || self.plans.get(&d.name).is_some_and(|p| joins(p, topic)))
            .map(|d| d.name.clone())
            .collect()
    }

    /// Records (or clears) the address Kafka clients reach `node` at.
    fn set_kafka_listener(&mut self, node: NodeId, advertised: Option<&str>) -> Result<(), MetadataError> {
        let Some(advertised) = advertised else {
            self.kafka_listeners.remove(&node);
            return Ok(());
        };
        validate_advertised(advertised)?;
        self.kafka_listeners.insert(node, advertised.to_string());
        Ok(())
    }

    /// Creates a topic with the next unused id (ids are never reused).
    fn create_topic(
        &mut self,
        name: &str,
        config: &TopicConfig,
        assignment: &[Vec<NodeId>],
    ) -> Result<(), MetadataError> {
        validate_topic_name(name)?;
        config.validate()?;
        if self.topics.contains_key(name) {
            return Err(MetadataError::TopicExists(name.to_string()));
        }
        check_assignment(config, assignment)?;
        let id = self.next_topic_id.max(1);
        self.next_topic_id = id + 1;
        let topic = TopicMeta {
            name: name.to_string(),
            id,
            config: config.clone(),
            assignment: assignment.to_vec(),
            founders: assignment.to_vec(),
            departed: vec![Vec::new(); assignment.len()],
        };
        self.topics.insert(name.to_string(), topic);
        Ok(())
    }

    /// Moves a partition's replica off `dead` onto `replacement`, and
    /// remembers that the partition left `dead`.
    fn replace_replica(
        &mut self,
        topic: &str,
        partition: u32,
        dead: NodeId,
        replacement: NodeId,
    ) -> Result<(), MetadataError> {
        let meta = self
            .topics
            .get_mut(topic)
            .ok_or_else(|| MetadataError::UnknownTopic(topic.to_string()))?;
        let replicas = meta.assignment.get_mut(partition as usize).ok_or_else(|| {
            MetadataError::InvalidConfig(format!("partition {partition} of {topic:?} does not exist"))
        })?;
        if replicas.contains(&replacement) {
            return Err(MetadataError::InvalidConfig(format!(
                "node {replacement} already holds {topic}/{partition}"
            )));
        }
        let slot = replicas
            .iter_mut()
            .find(|n| **n == dead)
            .ok_or_else(|| MetadataError::InvalidConfig(format!("node {dead} does not hold {topic}/{partition}")))?;
        *slot = replacement;
        if let Some(departed) = meta.departed.get_mut(partition as usize) {
            if !departed.contains(&dead) {
                departed.push(dead);
            }
        }
        Ok(())
    }

    /// Starts a dataflow whose placement covers every task exactly.
    fn start_dataflow(&mut self, dataflow: &DataflowMeta) -> Result<(), MetadataError> {
        if self.dataflows.contains_key(&dataflow.name) {
            return Err(MetadataError::DataflowRunning(dataflow.name.clone()));
        }
        if dataflow.placement.len() as u64 != u64::from(dataflow.stages) * u64::from(dataflow.partitions) {
            return Err(MetadataError::InvalidConfig(format!(
                "{} tasks placed for {} stages of {} partitions",
                dataflow.placement.len(),
                dataflow.stages,
                dataflow.partitions
            )));
        }
        self.dataflows.insert(dataflow.name.clone(), dataflow.clone());
        Ok(())
    }

    /// Stops a dataflow; the stream or table its query wrote stays, written
    /// by no query (ksqlDB's `TERMINATE`).
    fn stop_dataflow(&mut self, name: &str) -> Result<(), MetadataError> {
        self.dataflows
            .remove(name)
            .ok_or_else(|| MetadataError::UnknownDataflow(name.to_string()))?;
        self.plans.remove(name);
        for object in self.objects.values_mut() {
            if object.query.as_deref() == Some(name) {
                object.query = None;
            }
        }
        Ok(())
    }

    /// A request retried after its answer was lost (a timeout, a leader
    /// change) finds its object already made: done, not refused.
    fn create_object(&mut self, object: &SqlObject) -> Result<(), MetadataError> {
        if self.objects.get(&object.name) == Some(object) {
            return Ok(());
        }
        if self.objects.contains_key(&object.name) {
            return Err(MetadataError::ObjectExists(object.name.clone()));
        }
        if self.objects.len() >= OBJECTS_MAX {
            return Err(MetadataError::InvalidConfig(format!(
                "the catalog holds {OBJECTS_MAX} streams and tables, its limit"
            )));
        }
        self.objects.insert(object.name.clone(), object.clone());
        Ok(())
    }

    /// Drops a stream or table no running query reads or writes.
    fn drop_object(&mut self, name: &str) -> Result<(), MetadataError> {
        let object = self
            .objects
            .get(name)
            .ok_or_else(|| MetadataError::UnknownObject(name.to_string()))?;
        let mut users: Vec<String> = object.query.iter().cloned().collect();
        users.extend(
            self.plans
                .iter()
                .filter(|(_, plan)| plan.reads(&object.topic))
                .map(|(query, _)| query.clone()),
        );
        users.dedup();
        if !users.is_empty() {
            return Err(MetadataError::ObjectInUse {
                name: name.to_string(),
                queries: users,
            });
        }
        self.objects.remove(name);
        Ok(())
    }

    /// Whether query `name` runs `plan` and made `object`: a start of it
    /// retried after its answer was lost (a timeout, a leader change) is
    /// done already, not refused. Only the placement may differ, and the
    /// first one stands.
    pub fn holds_query(&self, name: &str, plan: &Plan, object: Option<&SqlObject>) -> bool {
        self.plans.get(name) == Some(plan)
            && self.dataflows.contains_key(name)
            && object.is_none_or(|o| self.objects.get(&o.name) == Some(o))
    }

    /// Starts a query's dataflow with its plan and, when it writes a new
    /// stream or table, names it; refused whole when any part is.
    fn start_query(
        &mut self,
        dataflow: &DataflowMeta,
        plan: &Plan,
        object: Option<&SqlObject>,
    ) -> Result<(), MetadataError> {
        if self.holds_query(&dataflow.name, plan, object) {
            return Ok(());
        }
        if self.plans.len() >= QUERIES_MAX {
            return Err(MetadataError::InvalidConfig(format!(
                "{QUERIES_MAX} persistent queries run, the limit; terminate one first"
            )));
        }
        if let Some(object) = object {
            if self.objects.contains_key(&object.name) {
                return Err(MetadataError::ObjectExists(object.name.clone()));
            }
        }
        plan.validate()
            .map_err(|e| MetadataError::InvalidConfig(e.to_string()))?;
        self.start_dataflow(dataflow)?;
        self.plans.insert(dataflow.name.clone(), plan.clone());
        if let Some(object) = object {
            self.objects.insert(object.name.clone(), object.clone());
        }
        Ok(())
    }

    /// Moves a dataflow task off `dead` onto `replacement`; refused unless
    /// the task is on `dead` now.
    fn move_dataflow_task(
        &mut self,
        name: &str,
        task: u32,
        dead: NodeId,
        replacement: NodeId,
    ) -> Result<(), MetadataError> {
        let dataflow = self
            .dataflows
            .get_mut(name)
            .ok_or_else(|| MetadataError::UnknownDataflow(name.to_string()))?;
        match dataflow.placement.get_mut(task as usize) {
            Some(node) if *node == dead => {
                *node = replacement;
                Ok(())
            }
            _ => Err(MetadataError::InvalidConfig(format!(
                "task {task} of dataflow {name:?} is not on node {dead}"
            ))),
        }
    }

    /// Every partition group's `topic/partition` name, for log lines.
    pub fn group_names(&self) -> BTreeMap<GroupId, String> {
        self.topics
            .values()
            .flat_map(|t| (0..t.assignment.len() as u32).map(move |p| (t.group_id(p), format!("{}/{p}", t.name))))
            .collect()
    }

    /// The dataflow tasks placed on `node`.
    pub fn tasks_of(&self, node: NodeId) -> Vec<TaskAssignment> {
        self.dataflows
            .values()
            .flat_map(|d| {
                d.placement
                    .iter()
                    .enumerate()
                    .filter(move |(_, &placed)| placed == node)
                    .map(|(task, _)| TaskAssignment {
                        dataflow: d.name.clone(),
                        task: task as u32,
                        partitions: d.partitions,
                        stages: d.stages,
                        generation: self.generations.get(&d.name).copied().unwrap_or(0),
                    })
            })
            .collect()
    }

    /// The topic and partition of a partition group, if it exists.
    pub fn partition_of(&self, group: GroupId) -> Option<(&TopicMeta, u32)> {
        let partition = u32::try_from(group.0 & ((1 << 20) - 1)).ok()?;
        self.topics
            .values()
            .find(|topic| topic.group_id(partition) == group && (partition as usize) < topic.assignment.len())
            .map(|topic| (topic, partition))
    }

    /// Dataflow tasks each node runs now, for placement.
    pub fn task_load(&self) -> BTreeMap<NodeId, usize> {
        let mut load = BTreeMap::new();
        for dataflow in self.dataflows.values() {
            for &node in &dataflow.placement {
                *load.entry(node).or_default() += 1;
            }
        }
        load
    }

    /// Replicas each node holds now, for placement.
    pub fn load(&self) -> BTreeMap<NodeId, usize> {
        let mut load = BTreeMap::new();
        for topic in self.topics.values() {
            for replicas in &topic.assignment {
                for &node in replicas {
                    *load.entry(node).or_default() += 1;
                }
            }
        }
        load
    }
}

/// Whether `plan` reads `topic` beyond its first source: a stream it
/// joins with, or a table's (which must then keep its partitions, and not
/// be deleted, while the query runs).
fn joins(plan: &Plan, topic: &str) -> bool {
    plan.reads(topic)
}

/// Whether a running dataflow reads `topic`, writes it, or keeps its
/// repartitioned records, checkpoints or dead letters there.
fn dataflow_uses(dataflow: &DataflowMeta, topic: &str) -> bool {
    use runnel_client::tasks::{checkpoint_topic, dead_letter_topic, repartition_topic};
    let name = dataflow.name.as_str();
    [
        dataflow.source.clone(),
        dataflow.sink.clone(),
        repartition_topic(name),
        checkpoint_topic(name),
        dead_letter_topic(name),
    ]
    .iter()
    .any(|t| t == topic)
}

fn check_assignment(config: &TopicConfig, assignment: &[Vec<NodeId>]) -> Result<(), MetadataError> {
    if assignment.len() != config.partitions as usize {
        return Err(MetadataError::InvalidConfig(format!(
            "{} partitions assigned for {} partitions",
            assignment.len(),
            config.partitions
        )));
    }
    for (partition, replicas) in assignment.iter().enumerate() {
        let mut distinct = replicas.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if replicas.len() != config.replication as usize || distinct.len() != replicas.len() {
            return Err(MetadataError::InvalidConfig(format!(
                "partition {partition} needs {} replicas on distinct nodes, got {replicas:?}",
                config.replication
            )));
        }
    }
    Ok(())
}

/// Places each partition's replicas on distinct live nodes, least loaded
/// first, rotating the first replica (the preferred leader) across nodes.
pub fn place(
    config: &TopicConfig,
    live_nodes: &[NodeId],
    load: &BTreeMap<NodeId, usize>,
) -> Result<Vec<Vec<NodeId>>, MetadataError> {
    config.validate()?;
    let mut nodes: Vec<NodeId> = live_nodes.to_vec();
    nodes.sort_unstable();
    nodes.dedup();
    if usize::from(config.replication) > nodes.len() {
        return Err(MetadataError::NotEnoughNodes {
            replication: config.replication,
            live: nodes.len(),
        });
    }
    let mut load: BTreeMap<NodeId, usize> = nodes.iter().map(|&n| (n, load.get(&n).copied().unwrap_or(0))).collect();
    let mut assignment = Vec::with_capacity(config.partitions as usize);
    let mut leaders: BTreeMap<NodeId, usize> = BTreeMap::new();
    for partition in 0..config.partitions as usize {
        // Least loaded first; ties broken by a rotation so leaders spread.
        let mut order: Vec<NodeId> = nodes.clone();
        order.sort_by_key(|&n| {
            let position = nodes.iter().position(|&x| x == n).unwrap_or(0);
            (
                load[&n],
                (position + nodes.len() - partition % nodes.len()) % nodes.len(),
            )
        });
        let mut replicas: Vec<NodeId> = order.into_iter().take(usize::from(config.replication)).collect();
        for node in &replicas {
            *load.entry(*node).or_default() += 1;
        }
        // The first replica is the preferred leader: the one leading least so far.
        let leader_position = (0..replicas.len())
            .min_by_key(|&i| leaders.get(&replicas[i]).copied().unwrap_or(0))
            .unwrap_or(0);
        replicas.swap(0, leader_position);
        *leaders.entry(replicas[0]).or_default() += 1;
        assignment.push(replicas);
    }
    Ok(assignment)
}

/// Places `tasks` tasks on live nodes, each on the least loaded one (ties
/// to the lowest id), so a dataflow's tasks spread evenly.
pub fn place_tasks(
    tasks: u32,
    live_nodes: &[NodeId],
    load: &BTreeMap<NodeId, usize>,
) -> Result<Vec<NodeId>, MetadataError> {
    let mut load: BTreeMap<NodeId, usize> = live_nodes
        .iter()
        .map(|&n| (n, load.get(&n).copied().unwrap_or(0)))
        .collect();
    let mut placement = Vec::with_capacity(tasks as usize);
    for _ in 0..tasks {
        let (&node, _) = load
            .iter()
            .min_by_key(|(&n, &l)| (l, n))
            .ok_or(MetadataError::NoLiveNodes)?;
        *load.entry(node).or_default() += 1;
        placement.push(node);
    }
    Ok(placement)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::{decode_command, encode_command, CommandFormatError, NodeId, COMMAND_MAGIC};
    use runnel_client::plan::{Column, ObjectKind, Operator, Sink, Source, SqlType, PLAN_FORMAT_VERSION};

    /// A one-stage plan reading topic `s` into topic `k`.
    pub(crate) fn sample_plan() -> Plan {
        let columns = vec![Column {
            name: "A".into(),
            ty: SqlType::String,
        }];
        Plan {
            version: PLAN_FORMAT_VERSION,
            statement: "CREATE STREAM K AS SELECT a FROM S".into(),
            source: Source {
                topic: "s".into(),
                columns: columns.clone(),
                timestamp: None,
            },
            operators: vec![Operator::Project(vec![(
                columns[0].clone(),
                runnel_client::plan::Expr::Column(0),
            )])],
            sink: Sink {
                topic: "k".into(),
                columns,
                key: Vec::new(),
            },
        }
    }

    pub(crate) fn sample_object() -> Box<SqlObject> {
        Box::new(SqlObject {
            name: "K".into(),
            kind: ObjectKind::Stream,
            topic: "k".into(),
            columns: Vec::new(),
            timestamp: None,
            key: Vec::new(),
            windowed: false,
            query: Some("d".into()),
            statement: String::new(),
        })
    }

    fn every_command() -> Vec<MetadataCommand> {
        let dataflow = DataflowMeta {
            name: "d".to_string(),
            source: "s".to_string(),
            sink: "k".to_string(),
            stages: 1,
            partitions: 1,
            placement: vec![NodeId(1)],
        };
        let text = String::new;
        vec![
            MetadataCommand::CreateTopic {
                name: text(),
                config: TopicConfig::new(1, 1),
                assignment: vec![vec![NodeId(1)]],
            },
            MetadataCommand::DeleteTopic { name: text() },
            MetadataCommand::ReplaceReplica {
                topic: text(),
                partition: 0,
                dead: NodeId(1),
                replacement: NodeId(2),
            },
            MetadataCommand::StartDataflow {
                dataflow: dataflow.clone(),
            },
            MetadataCommand::StopDataflow { name: text() },
            MetadataCommand::MoveDataflowTask {
                name: text(),
                task: 0,
                dead: NodeId(1),
                replacement: NodeId(2),
            },
            MetadataCommand::CreateObject {
                object: sample_object(),
            },
            MetadataCommand::DropObject { name: text() },
            MetadataCommand::StartQuery {
                dataflow,
                plan: Box::new(sample_plan()),
                object: Some(sample_object()),
            },
            MetadataCommand::KafkaListener {
                node: NodeId(1),
                advertised: Some("localhost:9092".to_string()),
            },
            MetadataCommand::AlterTopic {
                name: text(),
                settings: vec![TopicSetting::MinInsync(1)],
            },
            MetadataCommand::AddPartitions {
                name: text(),
                assignment: vec![vec![NodeId(1)]],
            },
            MetadataCommand::ResetDataflow { name: text() },
        ]
    }

    #[test]
    fn kafka_listeners_are_recorded_cleared_and_checked() {
        let mut metadata = Metadata::default();
        let set = |advertised: &str| MetadataCommand::KafkaListener {
            node: NodeId(2),
            advertised: Some(advertised.to_string()),
        };
        metadata.apply(&set("kafka-2.example:9092")).expect("a host name");
        metadata.apply(&set("[::1]:9092")).expect("an IPv6 address");
        assert_eq!(metadata.kafka_listeners[&NodeId(2)], "[::1]:9092");
        for bad in ["no-port", "host:0", "host:99999", ":9092", "a b:9092"] {
            let refused = metadata.apply(&set(bad)).expect_err(bad).to_string();
            assert!(refused.contains(bad), "{refused}");
        }
        assert_eq!(
            metadata.kafka_listeners[&NodeId(2)],
            "[::1]:9092",
            "refusals change nothing"
        );
        let clear = MetadataCommand::KafkaListener {
            node: NodeId(2),
            advertised: None,
        };
        metadata.apply(&clear).expect("cleared");
        assert!(metadata.kafka_listeners.is_empty());
    }

    #[test]
    fn version_1_commands_still_read_and_sql_commands_apply_whole_or_not_at_all() {
        // DeleteTopic: CreateTopic's encoding changed in version 6.
        let command = every_command().remove(1);
        let mut v1 = encode_command(&command).expect("encodes");
        v1[1] = 1;
        assert_eq!(
            decode_command(&v1),
            Ok(command.clone()),
            "version 1 wrote the same encoding"
        );
        let mut v2 = encode_command(&command).expect("encodes");
        v2[1] = 2;
        assert_eq!(decode_command(&v2), Ok(command), "version 2 wrote the same encoding");

        let mut metadata = Metadata::default();
        let commands = every_command();
        let (source, query) = (commands[6].clone(), commands[8].clone());
        let MetadataCommand::StartQuery { dataflow, .. } = &query else {
            unreachable!()
        };
        let source = match source {
            MetadataCommand::CreateObject { mut object } => {
                object.name = "S".into();
                object.topic = "s".into();
                object.query = None;
                MetadataCommand::CreateObject { object }
            }
            _ => unreachable!(),
        };
        metadata.apply(&source).expect("declares S");
        let declared = metadata.clone();
        metadata.apply(&source).expect("the same declaration retried is done");
        assert_eq!(metadata, declared, "a retried declaration changes nothing");
        let MetadataCommand::CreateObject { object } = &source else {
            unreachable!()
        };
        let mut other = object.clone();
        other.topic = "elsewhere".into();
        let other = MetadataCommand::CreateObject { object: other };
        assert_eq!(metadata.apply(&other), Err(MetadataError::ObjectExists("S".into())));
        metadata.apply(&query).expect("starts the query and names K");
        assert!(metadata.plans.contains_key("d") && metadata.objects.contains_key("K"));
        let before = metadata.clone();
        metadata.apply(&query).expect("the same start retried is done");
        assert_eq!(metadata, before, "a retried start changes nothing");
        let MetadataCommand::StartQuery {
            dataflow: first,
            plan,
            object,
        } = query.clone()
        else {
            unreachable!()
        };
        let renamed = DataflowMeta {
            name: "d2".into(),
            ..first
        };
        let other = MetadataCommand::StartQuery {
            dataflow: renamed,
            plan,
            object,
        };
        assert_eq!(
            metadata.apply(&other),
            Err(MetadataError::ObjectExists("K".into())),
            "another query naming K is refused"
        );
        assert_eq!(metadata, before, "a refused start changes nothing");
        for name in ["S", "K"] {
            let refused = metadata.apply(&MetadataCommand::DropObject { name: name.into() });
            assert_eq!(
                refused,
                Err(MetadataError::ObjectInUse {
                    name: name.into(),
                    queries: vec![dataflow.name.clone()]
                })
            );
        }
        metadata
            .apply(&MetadataCommand::StopDataflow { name: "d".into() })
            .expect("terminates");
        assert!(metadata.plans.is_empty() && metadata.objects["K"].query.is_none());
        for name in ["S", "K"] {
            metadata
                .apply(&MetadataCommand::DropObject { name: name.into() })
                .expect("drops");
        }
        assert!(metadata.objects.is_empty());
    }

    /// The controller log is persisted: a reordered or removed variant would
    /// make every node read old commands as other ones. A retired tag stays
    /// retired.
    #[test]
    fn metadata_command_tags_are_pinned_and_versioned() {
        for (tag, command) in every_command().into_iter().enumerate() {
            let value = encode_command(&command).expect("encodes");
            assert_eq!(&value[..3], &[COMMAND_MAGIC, 7, tag as u8], "{command:?}");
            assert_eq!(decode_command(&value), Ok(command.clone()));
            if matches!(command, MetadataCommand::CreateTopic { .. }) {
                continue; // its config changed in formats 6 and 7: see the next tests
            }
            let mut earlier = value;
            for version in [
                COMMAND_FORMAT_V6,
                COMMAND_FORMAT_V5,
                COMMAND_FORMAT_V4,
                COMMAND_FORMAT_V3,
                COMMAND_FORMAT_V2,
                COMMAND_FORMAT_V1,
            ] {
                earlier[1] = version;
                assert_eq!(decode_command(&earlier), Ok(command.clone()), "version {version}");
            }
        }
    }

    #[test]
    fn a_create_topic_of_format_5_reads_with_the_default_cleanup_policy() {
        let old = CommandV5::CreateTopic {
            name: "t".into(),
            config: TopicConfigV5 {
                partitions: 3,
                replication: 2,
                min_insync: 1,
                retention_ms: Some(9),
            },
            assignment: vec![vec![NodeId(1), NodeId(2)]; 3],
        };
        let mut value = vec![COMMAND_MAGIC, COMMAND_FORMAT_V5];
        value.extend(postcard::to_allocvec(&old).expect("encodes"));
        let MetadataCommand::CreateTopic {
            name,
            config,
            assignment,
        } = decode_command(&value).expect("reads")
        else {
            panic!("not a CreateTopic");
        };
        assert_eq!((name.as_str(), assignment.len()), ("t", 3));
        assert_eq!(
            (
                config.partitions,
                config.replication,
                config.min_insync,
                config.retention_ms
            ),
            (3, 2, 1, Some(9))
        );
        assert_eq!(config.cleanup, runnel_client::protocol::CleanupPolicy::Delete);
        // Unversioned (format 0) too.
        assert_eq!(decode_command(&value[2..]), decode_command(&value));
        // A format-7 CreateTopic keeps its policy and lag.
        let mut compacted = TopicConfig::new(1, 1);
        compacted.cleanup = runnel_client::protocol::CleanupPolicy::Compact;
        compacted.min_compaction_lag_ms = 60_000;
        let command = MetadataCommand::CreateTopic {
            name: "c".into(),
            config: compacted,
            assignment: vec![vec![NodeId(1)]],
        };
        assert_eq!(decode_command(&encode_command(&command).expect("encodes")), Ok(command));
    }

    #[test]
    fn a_create_topic_of_format_6_reads_with_no_compaction_lag() {
        let old = CommandV6::CreateTopic {
            name: "t".into(),
            config: TopicConfigV6 {
                partitions: 2,
                replication: 3,
                min_insync: 2,
                retention_ms: None,
                cleanup: CleanupPolicy::Compact,
                delete_retention_ms: 77,
            },
            assignment: vec![vec![NodeId(1), NodeId(2), NodeId(3)]; 2],
        };
        let mut value = vec![COMMAND_MAGIC, COMMAND_FORMAT_V6];
        value.extend(postcard::to_allocvec(&old).expect("encodes"));
        let Ok(MetadataCommand::CreateTopic { name, config, .. }) = decode_command(&value) else {
            panic!("not a CreateTopic");
        };
        let read = (
            config.partitions,
            config.min_insync,
            config.cleanup,
            config.delete_retention_ms,
        );
        assert_eq!((name.as_str(), read), ("t", (2, 2, CleanupPolicy::Compact, 77)));
        assert_eq!((config.retention_ms, config.min_compaction_lag_ms), (None, 0));
    }

    #[test]
    fn an_unversioned_command_is_read_as_version_0_and_an_unknown_version_is_refused_by_name() {
        let command = every_command().remove(1);
        let legacy = postcard::to_allocvec(&command).expect("encodes");
        assert_eq!(decode_command(&legacy), Ok(command.clone()));
        let mut future = encode_command(&command).expect("encodes");
        future[1] = 9;
        let refused = decode_command(&future).expect_err("refused");
        assert_eq!(refused, CommandFormatError::UnknownVersion(9));
        assert!(refused.to_string().contains("format version 9"), "{refused}");
        let mut applied = AppliedMetadata::default();
        let mut builder = BatchBuilder::new();
        builder
            .push(&Record {
                value: Some(Bytes::from(future)),
                ..Record::default()
            })
            .expect("push");
        let error = applied
            .apply_batch(&builder.build().expect("batch"))
            .expect_err("stops");
        assert!(
            error.to_string().contains("offset 0") && error.to_string().contains("version 9"),
            "{error}"
        );
        assert_eq!(applied.applied_offset, 0, "nothing skipped");
    }

    use super::*;

    #[test]
    fn placement_is_distinct_even_and_leaders_rotate() {
        let config = TopicConfig::new(6, 3);
        let assignment =
            place(&config, &[NodeId(1), NodeId(2), NodeId(3), NodeId(4)], &BTreeMap::new()).expect("place");
        let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
        let mut leaders: BTreeMap<NodeId, usize> = BTreeMap::new();
        for replicas in &assignment {
            let mut distinct = replicas.clone();
            distinct.dedup();
            assert_eq!(replicas.len(), 3);
            for &n in replicas {
                *load.entry(n).or_default() += 1;
            }
            *leaders.entry(replicas[0]).or_default() += 1;
        }
        assert!(load.values().all(|&l| l == 18 / 4 || l == 18 / 4 + 1), "{load:?}");
        assert!(leaders.len() >= 3, "preferred leaders spread: {leaders:?}");
        let err = place(&TopicConfig::new(1, 3), &[NodeId(1), NodeId(2)], &BTreeMap::new()).expect_err("too few nodes");
        assert_eq!(err.to_string(), "replication factor 3 is more than the 2 live nodes");
    }

    #[test]
    fn apply_is_deterministic_and_refusals_change_nothing() {
        let config = TopicConfig::new(2, 1);
        let create = MetadataCommand::CreateTopic {
            name: "payments".to_string(),
            config: config.clone(),
            assignment: vec![vec![NodeId(1)], vec![NodeId(2)]],
        };
        let mut a = Metadata::default();
        let mut b = Metadata::default();
        a.apply(&create).expect("create");
        b.apply(&create).expect("create");
        assert_eq!(a, b);
        assert_eq!(a.topics["payments"].id, 1);
        assert_eq!(
            a.apply(&create),
            Err(MetadataError::TopicExists("payments".to_string()))
        );
        let bad = MetadataCommand::CreateTopic {
            name: "bad name!".to_string(),
            config,
            assignment: vec![vec![NodeId(1)], vec![NodeId(2)]],
        };
        assert!(matches!(a.apply(&bad), Err(MetadataError::InvalidName { .. })));
        a.apply(&MetadataCommand::DeleteTopic {
            name: "payments".to_string(),
        })
        .expect("delete");
        a.apply(&create).expect("re-create");
        assert_eq!(a.topics["payments"].id, 2, "a re-created topic gets a new id");
        assert_ne!(group_id(1, 0), group_id(2, 0));
        assert_ne!(group_id(1, 0), CONTROLLER_GROUP);
    }
}

/// The controller log's record format. Each record's value is
/// `[COMMAND_MAGIC, version, postcard(MetadataCommand)]`; version
/// [`COMMAND_FORMAT_VERSION`] is the one written now. A value without the
/// magic byte (its first byte is a postcard enum tag, below 0x80) was
/// written before the format carried a version and is read as version 0,
/// the same postcard encoding. Any other version is refused by name: a node
/// must not skip a command it cannot read, or its metadata would diverge.
pub const COMMAND_MAGIC: u8 = 0xC5;
pub const COMMAND_FORMAT_VERSION: u8 = 7;
/// Version 1 wrote the same encoding, before the SQL commands existed.
const COMMAND_FORMAT_V1: u8 = 1;
/// Version 2 wrote the same encoding, before `KafkaListener` existed.
const COMMAND_FORMAT_V2: u8 = 2;
/// Version 3 wrote the same encoding, before plans could hold
/// `Operator::Registered` (a Rust dataflow started as a plan).
const COMMAND_FORMAT_V3: u8 = 3;
/// Version 4 wrote the same encoding, before `AlterTopic`,
/// `AddPartitions` and `ResetDataflow` existed.
const COMMAND_FORMAT_V4: u8 = 4;
/// Version 5 wrote `TopicConfig` without `cleanup` and
/// `delete_retention_ms` (see [`legacy_create_topic`]).
const COMMAND_FORMAT_V5: u8 = 5;
/// Version 6 wrote `TopicConfig` without `min_compaction_lag_ms` (see
/// [`create_topic_v6`]).
const COMMAND_FORMAT_V6: u8 = 6;

/// Why a controller-log record could not be read as a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandFormatError {
    #[error("metadata command format version {0} is unknown to this node (it reads versions 0 to {COMMAND_FORMAT_VERSION}); upgrade this node")]
    UnknownVersion(u8),
    #[error("metadata command does not decode: {0}")]
    Malformed(String),
}

/// Why applying the controller log stopped.
#[derive(Debug, thiserror::Error)]
pub enum MetadataLogError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("controller log record at offset {offset}: {source}")]
    Format { offset: u64, source: CommandFormatError },
}

/// An advertised Kafka address is `host:port`: a host name or IP address
/// and a port, at most [`ADVERTISED_BYTES_MAX`] bytes.
pub fn validate_advertised(advertised: &str) -> Result<(), MetadataError> {
    let invalid = |why: &str| {
        Err(MetadataError::InvalidConfig(format!(
            "advertised Kafka address {advertised:?}: {why}"
        )))
    };
    if advertised.len() > ADVERTISED_BYTES_MAX {
        return invalid(&format!("longer than {ADVERTISED_BYTES_MAX} bytes"));
    }
    let Some((host, port)) = advertised.rsplit_once(':') else {
        return invalid("expected host:port");
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return invalid("the host is empty or has spaces");
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(()),
        _ => invalid("the port is not a number in 1..=65535"),
    }
}

/// A command's record value, versioned.
pub fn encode_command(command: &MetadataCommand) -> Result<Vec<u8>, StorageError> {
    postcard::to_extend(command, vec![COMMAND_MAGIC, COMMAND_FORMAT_VERSION])
        .map_err(|e| StorageError::InvalidBatch(e.to_string()))
}

/// A command from its record value (see [`COMMAND_MAGIC`]).
pub fn decode_command(value: &[u8]) -> Result<MetadataCommand, CommandFormatError> {
    let body = match value {
        [COMMAND_MAGIC, COMMAND_FORMAT_VERSION, body @ ..] => {
            return postcard::from_bytes(body).map_err(|e| CommandFormatError::Malformed(e.to_string()))
        }
        [COMMAND_MAGIC, COMMAND_FORMAT_V6, body @ ..] => {
            if let Some(command) = create_topic_v6(body) {
                return Ok(command);
            }
            return postcard::from_bytes(body).map_err(|e| CommandFormatError::Malformed(e.to_string()));
        }
        [COMMAND_MAGIC, COMMAND_FORMAT_V5 | COMMAND_FORMAT_V4 | COMMAND_FORMAT_V3 | COMMAND_FORMAT_V2 | COMMAND_FORMAT_V1, body @ ..] => {
            body
        }
        [COMMAND_MAGIC, version, ..] => return Err(CommandFormatError::UnknownVersion(*version)),
        [COMMAND_MAGIC] => return Err(CommandFormatError::Malformed("a magic byte and no version".to_string())),
        legacy => legacy,
    };
    if let Some(command) = legacy_create_topic(body) {
        return Ok(command);
    }
    postcard::from_bytes(body).map_err(|e| CommandFormatError::Malformed(e.to_string()))
}

/// `TopicConfig` as formats 0 to 5 wrote it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct TopicConfigV5 {
    partitions: u32,
    replication: u16,
    min_insync: u16,
    retention_ms: Option<u64>,
}

/// The one command of formats 0 to 5 whose encoding changed: `CreateTopic`
/// (tag 0), read with its old config. Any other tag is not this one.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
enum CommandV5 {
    CreateTopic {
        name: String,
        config: TopicConfigV5,
        assignment: Vec<Vec<NodeId>>,
    },
}

/// `TopicConfig` as format 6 wrote it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct TopicConfigV6 {
    partitions: u32,
    replication: u16,
    min_insync: u16,
    retention_ms: Option<u64>,
    cleanup: CleanupPolicy,
    delete_retention_ms: u64,
}

/// `CreateTopic` as format 6 wrote it (see [`CommandV5`]).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
enum CommandV6 {
    CreateTopic {
        name: String,
        config: TopicConfigV6,
        assignment: Vec<Vec<NodeId>>,
    },
}

/// A format-6 `CreateTopic`, its config with no compaction lag.
fn create_topic_v6(body: &[u8]) -> Option<MetadataCommand> {
    let CommandV6::CreateTopic {
        name,
        config,
        assignment,
    } = postcard::from_bytes(body).ok()?;
    let mut current = TopicConfig::new(config.partitions, config.replication);
    current.min_insync = config.min_insync;
    current.retention_ms = config.retention_ms;
    current.cleanup = config.cleanup;
    current.delete_retention_ms = config.delete_retention_ms;
    Some(MetadataCommand::CreateTopic {
        name,
        config: current,
        assignment,
    })
}

fn legacy_create_topic(body: &[u8]) -> Option<MetadataCommand> {
    let CommandV5::CreateTopic {
        name,
        config,
        assignment,
    } = postcard::from_bytes(body).ok()?;
    let mut current = TopicConfig::new(config.partitions, config.replication);
    current.min_insync = config.min_insync;
    current.retention_ms = config.retention_ms;
    Some(MetadataCommand::CreateTopic {
        name,
        config: current,
        assignment,
    })
}

/// A command as the controller log holds it: one record of its own.
pub fn command_batch(command: &MetadataCommand, timestamp_ms: i64) -> Result<RecordBatch, StorageError> {
    let value = encode_command(command)?;
    let mut builder = BatchBuilder::new();
    builder.push(&Record {
        timestamp_ms,
        value: Some(Bytes::from(value)),
        ..Record::default()
    })?;
    builder.build()
}

/// A partition group a node is assigned to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedGroup {
    /// The assigned replicas' nodes.
    pub voters: Vec<NodeId>,
    /// The voters the group was founded with.
    pub founders: Vec<NodeId>,
    /// Whether a replica created empty here joins a group with a history
    /// (see `ReplicaConfig::rejoin`).
    pub rejoin: bool,
}

/// The metadata as one node has applied it from the controller log.
#[derive(Clone, Debug, Default)]
pub struct AppliedMetadata {
    pub metadata: Metadata,
    /// The controller-log offset up to which commands are applied.
    pub applied_offset: u64,
    /// How applying each recent command went, by record offset.
    pub results: BTreeMap<u64, Result<(), MetadataError>>,
    /// Commands committed before this time (ms since the epoch) are history
    /// a restarted node replays: logged at debug, not at info.
    pub quiet_before_ms: i64,
}

impl AppliedMetadata {
    /// Applies the commands of one committed controller-log batch that are
    /// not applied yet. A command the metadata refuses, or a record that is
    /// not a command, is refused alike on every node (its result says why);
    /// a command in a format version this node cannot read stops the
    /// applying, naming the offset and the version.
    pub fn apply_batch(&mut self, batch: &RecordBatch) -> Result<(), MetadataLogError> {
        if batch.next_offset() <= self.applied_offset {
            return Ok(());
        }
        if !batch.is_control() {
            for record in batch.records() {
                let record = record?;
                if record.offset < self.applied_offset {
                    continue;
                }
                let value = record.record.value.unwrap_or_default();
                let result = match decode_command(&value) {
                    Ok(command) => {
                        let result = self.metadata.apply(&command);
                        let history = record.record.timestamp_ms < self.quiet_before_ms;
                        match &result {
                            Ok(()) if history => tracing::debug!(offset = record.offset, ?command, "metadata applied"),
                            Ok(()) => tracing::info!(offset = record.offset, ?command, "metadata applied"),
                            Err(e) => tracing::debug!(offset = record.offset, error = %e, "metadata command refused"),
                        }
                        result
                    }
                    // Written by a newer node: skipping it would diverge.
                    Err(source @ CommandFormatError::UnknownVersion(_)) => {
                        tracing::error!(offset = record.offset, error = %source, "controller log record not readable");
                        return Err(MetadataLogError::Format {
                            offset: record.offset,
                            source,
                        });
                    }
                    // Not a command at all: every node skips it alike.
                    Err(e) => {
                        tracing::error!(offset = record.offset, error = %e, "controller record is not a command");
                        Err(MetadataError::InvalidConfig(format!("undecodable command: {e}")))
                    }
                };
                self.results.insert(record.offset, result);
                while self.results.len() > RESULTS_KEPT {
                    self.results.pop_first();
                }
                self.applied_offset = record.offset + 1;
            }
        }
        self.applied_offset = batch.next_offset();
        Ok(())
    }

    /// The partition groups assigned to `node`.
    pub fn wanted_groups(&self, node: NodeId) -> BTreeMap<GroupId, WantedGroup> {
        let mut wanted = BTreeMap::new();
        for topic in self.metadata.topics.values() {
            for (partition, replicas) in topic.assignment.iter().enumerate() {
                let voters = replicas.clone();
                if voters.contains(&node) {
                    let founders = topic.founders[partition].clone();
                    // A founder that never left may come up empty as the
                    // voter it always was (it never held anything); any
                    // other replica joins through the leader.
                    let departed = topic.departed.get(partition).is_some_and(|d| d.contains(&node));
                    let rejoin = departed || !founders.contains(&node);
                    let group = WantedGroup {
                        voters,
                        founders,
                        rejoin,
                    };
                    wanted.insert(topic.group_id(partition as u32), group);
                }
            }
        }
        wanted
    }

    /// Groups `node` founded whose assignment has moved off it, with their
    /// founders. If this node never hosted such a group (it was down when
    /// the topic was created and replaced before it came back), its
    /// founding replica may still be what the group needs to elect its
    /// first leader: the founders' configuration counts it, and a group
    /// that never elected cannot take the replacement in (found by the
    /// simulation, seed 424). A founder that never held anything is safe to
    /// create: a group's entries commit on a majority of founders that did.
    pub fn founded_groups_moved_off(&self, node: NodeId) -> BTreeMap<GroupId, Vec<NodeId>> {
        let mut groups = BTreeMap::new();
        for topic in self.metadata.topics.values() {
            for (partition, founders) in topic.founders.iter().enumerate() {
                let assigned = topic.assignment.get(partition).is_some_and(|a| a.contains(&node));
                if founders.contains(&node) && !assigned {
                    groups.insert(topic.group_id(partition as u32), founders.clone());
                }
            }
        }
        groups
    }

    /// The nodes a partition group is assigned to, if the group exists.
    pub fn assignment_of(&self, group: GroupId) -> Option<Vec<NodeId>> {
        self.metadata.topics.values().find_map(|topic| {
            let partition = u32::try_from(group.0 & ((1 << 20) - 1)).ok()?;
            let replicas = topic.assignment.get(partition as usize)?;
            (topic.group_id(partition) == group).then(|| replicas.clone())
        })
    }

    /// The controller leader's moves of `dead` nodes' replicas: each to the
    /// least-loaded `alive` node not holding the partition yet. Partitions
    /// with no such node stay under-replicated until one appears.
    pub fn replica_moves(&self, dead: &[NodeId], alive: &[NodeId]) -> Vec<MetadataCommand> {
        let mut load = self.metadata.load();
        let mut moves = Vec::new();
        for topic in self.metadata.topics.values() {
            for (partition, replicas) in topic.assignment.iter().enumerate() {
                for &gone in replicas.iter().filter(|n| dead.contains(n)) {
                    if let Some(replacement) = pick_replacement(alive, replicas, &load) {
                        *load.entry(replacement).or_default() += 1;
                        moves.push(MetadataCommand::ReplaceReplica {
                            topic: topic.name.clone(),
                            partition: partition as u32,
                            dead: gone,
                            replacement,
                        });
                    }
                }
            }
        }
        moves
    }
}

impl AppliedMetadata {
    /// The controller leader's moves of dataflow tasks off `dead` nodes, each
    /// to the `alive` node running the fewest tasks.
    pub fn task_moves(&self, dead: &[NodeId], alive: &[NodeId]) -> Vec<MetadataCommand> {
        let mut load = self.metadata.task_load();
        let mut moves = Vec::new();
        for dataflow in self.metadata.dataflows.values() {
            for (task, node) in dataflow.placement.iter().enumerate() {
                if !dead.contains(node) {
                    continue;
                }
                let Ok(placed) = place_tasks(1, alive, &load) else {
                    return moves;
                };
                *load.entry(placed[0]).or_default() += 1;
                moves.push(MetadataCommand::MoveDataflowTask {
                    name: dataflow.name.clone(),
                    task: task as u32,
                    dead: *node,
                    replacement: placed[0],
                });
            }
        }
        moves
    }
}

/// The least-loaded live node that holds no replica of the partition yet.
pub fn pick_replacement(alive: &[NodeId], replicas: &[NodeId], load: &BTreeMap<NodeId, usize>) -> Option<NodeId> {
    alive
        .iter()
        .copied()
        .filter(|n| !replicas.contains(n))
        .min_by_key(|n| (load.get(n).copied().unwrap_or(0), *n))
}
