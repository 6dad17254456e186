//! Push queries (`SELECT … EMIT CHANGES`): the plan runs here, in the
//! client, over the source topic's records as they arrive, through the same
//! compiled stages a node would run. Nothing is left in the cluster.
//!
//! Like ksqlDB, a push query starts at the end of its source unless
//! `SET 'auto.offset.reset' = 'earliest';` was given in the session. The
//! tables it joins are read whole first, then moved on at every poll (a
//! push query replays nothing, so it joins with the freshest rows). A join
//! of two streams reads both, each through its own source stage; the
//! watermark is the least of the greatest event times read from each.

use std::sync::Arc;

use runnel_client::plan::Plan;
use runnel_client::{Client, Consumer};
use runnel_dataflow::builder::{DataflowDef, Emitted, WindowStage};
use runnel_dataflow::compile::compile;
use runnel_dataflow::table::TableState;

use crate::error::{SqlError, SqlResult};

/// How long a push query waits after a poll that found nothing.
const IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// A running push query.
pub struct PushQuery {
    def: DataflowDef,
    window: Option<Box<dyn WindowStage>>,
    /// The stateful stages after it (an aggregate over a join).
    next: Vec<Box<dyn WindowStage>>,
    tables: Vec<TableState>,
    client: Arc<Client>,
    /// A consumer per source, in stage order.
    consumers: Vec<Consumer>,
    /// The output's column names, in order.
    pub columns: Vec<String>,
    limit: Option<u64>,
    emitted: u64,
    /// Per source, the greatest event time read.
    max_event_ms: Vec<i64>,
}

impl PushQuery {
    pub async fn start(client: Arc<Client>, plan: &Plan, limit: Option<u64>, earliest: bool) -> SqlResult<PushQuery> {
        let def = compile("push-query", plan).map_err(|e| SqlError::new(e.to_string()))?;
        let mut tables: Vec<TableState> = def.source_stage.table_states();
        for table in &mut tables {
            table.load(&*client).await.map_err(|e| SqlError::new(e.to_string()))?;
        }
        let mut consumers = Vec::new();
        for source in plan.sources() {
            consumers.push(consumer_of(&client, &source.topic, earliest).await?);
        }
        Ok(PushQuery {
            window: def.window_stage.as_ref().map(|factory| factory()),
            next: def.next_stages.iter().map(|factory| factory()).collect(),
            def,
            tables,
            client,
            consumers,
            columns: plan.sink.columns.iter().map(|c| c.name.clone()).collect(),
            limit,
            emitted: 0,
            max_event_ms: vec![i64::MIN; plan.sources().count()],
        })
    }

    /// Whether the LIMIT has been reached.
    pub fn done(&self) -> bool {
        self.limit.is_some_and(|limit| self.emitted >= limit)
    }

    /// The next rows (JSON objects), waiting for records to arrive; empty
    /// when none came in one poll.
    pub async fn poll(&mut self) -> SqlResult<Vec<serde_json::Value>> {
        let mut records = Vec::new();
        for (stage, consumer) in self.consumers.iter_mut().enumerate() {
            let polled = consumer.poll().await.map_err(|e| SqlError::new(e.to_string()))?;
            records.extend(polled.into_iter().map(|(_, stored)| (stage as u32, stored)));
        }
        if records.is_empty() {
            // Nothing new: wait before asking again rather than spin.
            tokio::time::sleep(IDLE_POLL).await;
        }
        for table in &mut self.tables {
            table
                .refresh(&*self.client)
                .await
                .map_err(|e| SqlError::new(e.to_string()))?;
        }
        let mut staged = Emitted::default();
        let mut out = Emitted::default();
        for (stage, stored) in &records {
            let record = &stored.record;
            let Some((_, source)) = self.def.source_of(*stage) else {
                continue;
            };
            let tables: &[TableState] = if *stage == 0 { &self.tables } else { &[] };
            let Some(window) = &mut self.window else {
                // A record that does not match the schema is skipped, as a
                // persistent query sends it to its dead-letter topic.
                let _ = source.process_record(
                    record.key.as_deref(),
                    record.value.as_deref(),
                    record.timestamp_ms,
                    tables,
                    &mut out,
                );
                continue;
            };
            staged.clear();
            let _ = source.process_record(
                record.key.as_deref(),
                record.value.as_deref(),
                record.timestamp_ms,
                tables,
                &mut staged,
            );
            // The window stage writes the output, or the first next stage's input.
            let mut first = Emitted::default();
            let target = if self.next.is_empty() { &mut out } else { &mut first };
            for r in staged.iter() {
                let key = r.key.unwrap_or_default();
                window
                    .add(key, r.value.unwrap_or_default(), r.timestamp_ms, target)
                    .map_err(|e| SqlError::new(e.to_string()))?;
                let max = &mut self.max_event_ms[*stage as usize];
                *max = (*max).max(r.timestamp_ms);
            }
            // Each source's progress holds the windows: the least of them.
            let watermark_ms = self.max_event_ms.iter().copied().min().unwrap_or(i64::MIN);
            window
                .advance(watermark_ms, target)
                .map_err(|e| SqlError::new(e.to_string()))?;
            let (mut input, mut progress_ms) = (first, window.output_watermark_ms());
            let last = self.next.len().saturating_sub(1);
            for (i, next) in self.next.iter_mut().enumerate() {
                let mut produced = Emitted::default();
                let target = if i == last { &mut out } else { &mut produced };
                for r in input.iter() {
                    next.add(
                        r.key.unwrap_or_default(),
                        r.value.unwrap_or_default(),
                        r.timestamp_ms,
                        target,
                    )
                    .map_err(|e| SqlError::new(e.to_string()))?;
                }
                next.advance(progress_ms, target)
                    .map_err(|e| SqlError::new(e.to_string()))?;
                (input, progress_ms) = (produced, next.output_watermark_ms());
            }
        }
        let mut rows = Vec::new();
        for record in out.iter() {
            if self.done() {
                break;
            }
            let Some(value) = record.value else { continue };
            let row = serde_json::from_slice(value).map_err(|e| SqlError::new(e.to_string()))?;
            rows.push(row);
            self.emitted += 1;
        }
        Ok(rows)
    }
}

/// A consumer of every partition of `topic`, from its start or its end.
async fn consumer_of(client: &Arc<Client>, topic: &str, earliest: bool) -> SqlResult<Consumer> {
    let partitions = client
        .describe_topic(topic)
        .await
        .map_err(|e| SqlError::new(e.to_string()))?
        .config
        .partitions;
    let mut consumer = Consumer::new(client.clone(), topic);
    for partition in 0..partitions {
        consumer.assign(partition, 0);
    }
    if !earliest {
        let ends = consumer.end_offsets().await.map_err(|e| SqlError::new(e.to_string()))?;
        for (partition, end) in ends {
            consumer.assign(partition, end);
        }
    }
    Ok(consumer)
}
