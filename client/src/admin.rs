//! [`Client`]'s admin calls: topics, rebalancing, dataflows, and the
//! test-only fault hook.

use std::time::{Duration, Instant};

use crate::error::{ClientError, ClientResult};
use crate::plan::{Plan, SqlObject};
use crate::protocol::{
    Catalog, ClientRequest, ClientResponse, DataflowMeta, FailedReplica, NodeId, TopicConfig, TopicInfo, TopicSetting,
};
use crate::tasks::TaskStatus;
use crate::Client;

impl Client {
    /// Creates a topic; returns once the node this client asks for metadata
    /// knows it too, so the caller can use it at once.
    pub async fn create_topic(&self, name: &str, config: TopicConfig) -> ClientResult<()> {
        let request = ClientRequest::CreateTopic {
            name: name.to_string(),
            config,
        };
        expect_done(self.call(None, &request).await?)?;
        let deadline = Instant::now() + self.timeout;
        while !self.topics().await?.iter().any(|t| t.name == name) {
            if Instant::now() >= deadline {
                return Err(ClientError::Protocol(format!(
                    "topic {name:?} was created but is not visible yet"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Changes settings of a topic, all or none.
    pub async fn alter_topic(&self, name: &str, settings: Vec<TopicSetting>) -> ClientResult<()> {
        let request = ClientRequest::AlterTopic {
            name: name.to_string(),
            settings,
        };
        expect_done(self.call(None, &request).await?)
    }

    /// Grows a topic to `partitions` partitions in all; returns once the
    /// node this client asks for metadata knows them, so producers can use
    /// them at once. Records already written stay where they are: a key
    /// may hash to another partition from now on.
    pub async fn add_partitions(&self, name: &str, partitions: u32) -> ClientResult<()> {
        let request = ClientRequest::AddPartitions {
            name: name.to_string(),
            partitions,
        };
        expect_done(self.call(None, &request).await?)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let topics = self.cached_topics(true).await?;
            if topics
                .iter()
                .any(|t| t.name == name && t.config.partitions >= partitions)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Protocol(format!(
                    "topic {name:?} was given {partitions} partitions but the metadata does not show them yet"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn delete_topic(&self, name: &str) -> ClientResult<()> {
        expect_done(
            self.call(None, &ClientRequest::DeleteTopic { name: name.to_string() })
                .await?,
        )
    }

    /// Spreads replicas evenly over the live nodes (moves happen in the
    /// background, each through learner -> voter -> removal).
    pub async fn rebalance(&self) -> ClientResult<()> {
        expect_done(self.call(None, &ClientRequest::Rebalance).await?)
    }

    /// Starts a dataflow that the nodes' binary registered: the cluster
    /// creates its internal topics (and the sink, if missing) and places
    /// its tasks on live nodes.
    pub async fn start_dataflow(&self, name: &str) -> ClientResult<()> {
        let request = ClientRequest::StartDataflow { name: name.to_string() };
        expect_done(self.call(None, &request).await?)?;
        self.cached_topics(true).await?;
        Ok(())
    }

    /// Stops a dataflow's tasks; its checkpoints stay, so a later start
    /// resumes where it stopped.
    pub async fn stop_dataflow(&self, name: &str) -> ClientResult<()> {
        let request = ClientRequest::StopDataflow { name: name.to_string() };
        expect_done(self.call(None, &request).await?)
    }

    /// Starts a new generation of the stopped dataflow `name`: started
    /// again, it writes its output anew rather than as retries of the old.
    pub async fn reset_dataflow(&self, name: &str) -> ClientResult<()> {
        let request = ClientRequest::ResetDataflow { name: name.to_string() };
        expect_done(self.call(None, &request).await?)
    }

    /// Starts a SQL query's dataflow `name` from its plan; `object` names
    /// the stream or table it writes.
    pub async fn start_query(&self, name: &str, plan: Plan, object: Option<SqlObject>) -> ClientResult<()> {
        let request = ClientRequest::StartQuery {
            name: name.to_string(),
            plan: Box::new(plan),
            object: object.map(Box::new),
        };
        expect_done(self.call(None, &request).await?)
    }

    /// Names a stream or table of the SQL catalog.
    pub async fn create_object(&self, object: SqlObject) -> ClientResult<()> {
        expect_done(self.call(None, &ClientRequest::CreateObject { object }).await?)
    }

    /// Drops a stream or table that no running query uses.
    pub async fn drop_object(&self, name: &str) -> ClientResult<()> {
        let request = ClientRequest::DropObject { name: name.to_string() };
        expect_done(self.call(None, &request).await?)
    }

    /// The SQL catalog and the running queries' plans.
    pub async fn catalog(&self) -> ClientResult<Catalog> {
        match self.read_any(&ClientRequest::Catalog).await? {
            ClientResponse::Catalog(catalog) => Ok(catalog),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Running dataflows and the node of each task.
    pub async fn dataflows(&self) -> ClientResult<Vec<DataflowMeta>> {
        match self.read_any(&ClientRequest::Dataflows).await? {
            ClientResponse::Dataflows(dataflows) => Ok(dataflows),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The replicas `node` no longer runs (damaged files, or too many crashes).
    pub async fn failed_replicas(&self, node: NodeId) -> ClientResult<Vec<FailedReplica>> {
        let addr = self.known_node(node)?;
        match self.call(Some(addr), &ClientRequest::FailedReplicas).await? {
            ClientResponse::FailedReplicas(failed) => Ok(failed),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Figures of the dataflow tasks running on `node`.
    pub async fn dataflow_tasks(&self, node: NodeId) -> ClientResult<Vec<TaskStatus>> {
        let addr = self.known_node(node)?;
        match self.call(Some(addr), &ClientRequest::DataflowTasks).await? {
            ClientResponse::Tasks(tasks) => Ok(tasks),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// A topic with each partition's leader and offsets, as the replicas see them.
    pub async fn describe_topic(&self, name: &str) -> ClientResult<TopicInfo> {
        let topics = self.topics().await?;
        let mut topic = self.find_topic(topics, name).await?;
        // Ask a replica of each partition for what only replicas know.
        for partition in &mut topic.partitions {
            for node in partition.replicas.clone() {
                let Some(addr) = self.node_addr(node) else { continue };
                let Ok(ClientResponse::Topic(info)) = self
                    .call(Some(addr), &ClientRequest::DescribeTopic { name: name.to_string() })
                    .await
                else {
                    continue;
                };
                if let Some(seen) = info
                    .partitions
                    .into_iter()
                    .find(|p| p.partition == partition.partition && p.committed_offset.is_some())
                {
                    *partition = seen;
                    break;
                }
            }
        }
        Ok(topic)
    }

    /// Test-only: makes `node`'s replica of the partition panic (the node
    /// must run with test fault hooks enabled).
    pub async fn inject_panic(&self, node: NodeId, topic: &str, partition: u32) -> ClientResult<()> {
        let addr = self.known_node(node)?;
        let request = ClientRequest::InjectPanic {
            topic: topic.to_string(),
            partition,
        };
        expect_done(self.call(Some(addr), &request).await?)
    }
}

/// `Ok` for `Done`; a refusal or failure as its error.
fn expect_done(response: ClientResponse) -> ClientResult<()> {
    match response {
        ClientResponse::Done => Ok(()),
        ClientResponse::Refused(e) => Err(e.into()),
        ClientResponse::Failed(e) => Err(e.into()),
        other => Err(ClientError::Protocol(format!("{other:?}"))),
    }
}
