//! Reading dataflow tasks' state: what a pull query (`SELECT … FROM table
//! WHERE key = …` without `EMIT CHANGES`) sends. A key's rows live in the
//! task of the aggregate stage that owns the key's repartition partition;
//! the request goes to the node the dataflow's placement names, and is
//! retried while that task moves (`NotHere`) or restores its checkpoint
//! (`Restoring`), so an answer always comes from a fully restored state.

use std::time::{Duration, Instant};

use crate::error::{ClientError, ClientResult};
use crate::protocol::{ClientRequest, ClientResponse, DataflowMeta, NodeId};
use crate::tasks::{StateError, StateRow, STATE_ROWS_MAX};
use crate::{partition_for_key, Client};

/// Pause between two attempts while a task moves or restores.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

impl Client {
    /// The rows of task `task`'s state on `node`, which must run it.
    pub async fn read_task_state(
        &self,
        node: NodeId,
        dataflow: &str,
        task: u32,
        key: Option<&[u8]>,
    ) -> ClientResult<Vec<StateRow>> {
        let addr = self.known_node(node)?;
        let request = ClientRequest::ReadState {
            dataflow: dataflow.to_string(),
            task,
            key: key.map(|k| serde_bytes::ByteBuf::from(k.to_vec())),
        };
        match self.call(Some(addr), &request).await? {
            ClientResponse::State(answer) => Ok(answer?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The rows of `key` (the postcard key the aggregate groups by) in
    /// `dataflow`'s state, from the task that owns it; without a key, every
    /// row of every task (at most [`STATE_ROWS_MAX`]). Tasks that move or
    /// restore are asked again until `wait` runs out.
    pub async fn read_dataflow_state(
        &self,
        dataflow: &str,
        key: Option<&[u8]>,
        wait: Duration,
    ) -> ClientResult<Vec<StateRow>> {
        let deadline = Instant::now() + wait;
        let meta = self.dataflow_meta(dataflow).await?;
        let tasks: Vec<u32> = match key {
            Some(key) => vec![owning_task(&meta, key)?],
            None => (0..meta.partitions)
                .map(|p| state_stage(&meta) * meta.partitions + p)
                .collect(),
        };
        let mut rows = Vec::new();
        for task in tasks {
            rows.extend(self.read_task_until(dataflow, task, key, deadline).await?);
            if rows.len() > STATE_ROWS_MAX {
                return Err(StateError::TooManyRows {
                    dataflow: dataflow.to_string(),
                    task,
                }
                .into());
            }
        }
        Ok(rows)
    }

    /// One task's rows, asking the node its placement names now, again
    /// while the answer is retryable and time is left.
    async fn read_task_until(
        &self,
        dataflow: &str,
        task: u32,
        key: Option<&[u8]>,
        deadline: Instant,
    ) -> ClientResult<Vec<StateRow>> {
        loop {
            let meta = self.dataflow_meta(dataflow).await?;
            let node = meta.placement.get(task as usize).copied();
            let answer = match node {
                Some(node) => self.read_task_state(node, dataflow, task, key).await,
                None => Err(StateError::NotHere {
                    dataflow: dataflow.to_string(),
                    task,
                }
                .into()),
            };
            let retryable = match &answer {
                Err(ClientError::State(e)) => e.is_retryable(),
                Err(ClientError::Cluster(_)) => true,
                _ => false,
            };
            if !retryable || Instant::now() + RETRY_PAUSE > deadline {
                return answer;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    async fn dataflow_meta(&self, dataflow: &str) -> ClientResult<DataflowMeta> {
        self.dataflows()
            .await?
            .into_iter()
            .find(|d| d.name == dataflow)
            .ok_or_else(|| ClientError::Protocol(format!("no dataflow or query named {dataflow} is running")))
    }
}

/// The aggregate-stage task that owns `key`: the one reading the key's
/// repartition partition.
/// The stage holding a dataflow's state: its last (an aggregate's or a
/// join's), which reads what every source stage repartitions.
fn state_stage(meta: &DataflowMeta) -> u32 {
    meta.stages.saturating_sub(1)
}

fn owning_task(meta: &DataflowMeta, key: &[u8]) -> ClientResult<u32> {
    if meta.stages <= 1 {
        return Err(StateError::Stateless {
            dataflow: meta.name.clone(),
            task: 0,
        }
        .into());
    }
    Ok(state_stage(meta) * meta.partitions + partition_for_key(key, meta.partitions))
}
