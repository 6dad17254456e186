//! The motivating query, KSQL's
//! `SELECT card_number, count(*) FROM authorization_attempts WINDOW TUMBLING
//! (SIZE 5 MINUTE) GROUP BY card_number HAVING count(*) > 3`, as a dataflow,
//! with a deterministic generator of attempts and a reference computed
//! directly from the input (what the sink must equal).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use runnel_client::{Acks, Client, ClientError, Consumer, Producer};
use runnel_storage::Record;
use serde::{Deserialize, Serialize};

use crate::builder::{Dataflow, DataflowDef};
use crate::window::{Emit, Window};

pub const NAME: &str = "possible_fraud";
pub const SOURCE: &str = "authorization_attempts";
pub const SINK: &str = "possible_fraud";
pub const WINDOW_MS: i64 = 300_000;
pub const GRACE_MS: i64 = 30_000;
/// More attempts than this per card and window is possible fraud.
pub const THRESHOLD: u64 = 3;

/// One card authorization attempt, as JSON in `authorization_attempts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub card_number: String,
    pub amount_cents: u64,
    pub at_ms: i64,
}

/// The fraud dataflow, emitting each (card, window) once when it closes.
pub fn dataflow() -> DataflowDef {
    Dataflow::new(NAME)
        .source::<Attempt>(SOURCE)
        .event_time(|a| a.at_ms)
        .key_by(|a| a.card_number.clone())
        .window(Window::tumbling(Duration::from_millis(WINDOW_MS as u64)).grace(Duration::from_millis(GRACE_MS as u64)))
        .count()
        .filter(|_card, _window, count| *count > THRESHOLD)
        .emit(Emit::Final)
        .sink(SINK)
}

/// A deterministic stream of attempts: `cards` card numbers, event times
/// advancing `step_ms` per attempt with a bounded jitter (out of order, but
/// always within the grace period), a few cards much busier than the rest.
pub struct Generator {
    state: u64,
    cards: u64,
    /// One attempt in this many goes to the busiest 1% of cards.
    hot_one_in: u64,
    next_ms: i64,
    step_ms: i64,
}

impl Generator {
    pub fn new(seed: u64, cards: u64, start_ms: i64, step_ms: i64) -> Generator {
        Generator {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            cards: cards.max(1),
            hot_one_in: 4,
            next_ms: start_ms,
            step_ms,
        }
    }

    /// Sends one attempt in `one_in` to the busiest 1% of cards (4 unless
    /// set): with many cards and a large `one_in`, most cards make a few
    /// attempts and a small share bursts, as real card traffic does.
    pub fn bursting_one_in(mut self, one_in: u64) -> Generator {
        self.hot_one_in = one_in.max(1);
        self
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*: fast, deterministic, good enough for test data.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// An attempt whose time is past every window the stream touched, plus
    /// the grace: it closes them all (needed for `Emit::Final`).
    pub fn closing_attempt(&self) -> Attempt {
        Attempt {
            card_number: "closing".to_string(),
            amount_cents: 0,
            at_ms: self.next_ms + 2 * (WINDOW_MS + GRACE_MS),
        }
    }
}

impl Iterator for Generator {
    type Item = Attempt;

    fn next(&mut self) -> Option<Attempt> {
        let r = self.next_u64();
        let hot = (self.cards / 100).max(1);
        let card = if r.is_multiple_of(self.hot_one_in) {
            (r >> 8) % hot
        } else {
            (r >> 8) % self.cards
        };
        let jitter = ((r >> 40) % 10_000) as i64;
        self.next_ms += self.step_ms;
        Some(Attempt {
            card_number: format!("card-{card:06}"),
            amount_cents: (r >> 20) % 50_000,
            at_ms: (self.next_ms - jitter).max(0),
        })
    }
}

/// (card, window start) → count, for windows with more than `THRESHOLD`
/// attempts, computed directly from the attempts. Windows that the last
/// attempt's time (minus the grace) has not closed are left out, as the
/// dataflow with `Emit::Final` leaves them open.
pub fn reference<'a>(attempts: impl IntoIterator<Item = &'a Attempt>) -> BTreeMap<(String, i64), u64> {
    let attempts: Vec<&Attempt> = attempts.into_iter().collect();
    let max_ms = attempts.iter().map(|a| a.at_ms).max().unwrap_or(i64::MIN);
    let mut counts = open_reference(attempts);
    counts.retain(|(_, start), _| start + WINDOW_MS + GRACE_MS <= max_ms);
    counts
}

/// As [`reference`], open windows too: what the SQL query's tasks hold
/// (their 24-hour grace keeps every window of a run open), and so what a
/// pull query answers.
pub fn open_reference<'a>(attempts: impl IntoIterator<Item = &'a Attempt>) -> BTreeMap<(String, i64), u64> {
    let mut counts: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for attempt in attempts {
        let start = attempt.at_ms - attempt.at_ms.rem_euclid(WINDOW_MS);
        *counts.entry((attempt.card_number.clone(), start)).or_default() += 1;
    }
    counts.retain(|_, count| *count > THRESHOLD);
    counts
}

/// One sink record of a windowed count: ((key, window start), count).
pub fn decode_result(record: &Record) -> Result<((String, i64), u64), String> {
    let key: FraudKey =
        serde_json::from_slice(record.key.as_deref().unwrap_or_default()).map_err(|e| format!("sink key: {e}"))?;
    let count: u64 =
        serde_json::from_slice(record.value.as_deref().unwrap_or_default()).map_err(|e| format!("sink value: {e}"))?;
    Ok(((key.key, key.window_start_ms), count))
}

/// One sink record of the fraud dataflow, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct FraudKey {
    pub key: String,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
}

/// An attempt as a record: JSON value, keyed by card, timestamped by event time.
pub fn record(attempt: &Attempt) -> Record {
    Record {
        timestamp_ms: attempt.at_ms,
        key: Some(Bytes::from(attempt.card_number.clone())),
        // Strings and integers only: serialising an attempt cannot fail.
        value: Some(Bytes::from(serde_json::to_vec(attempt).unwrap_or_default())),
        headers: Vec::new(),
    }
}

/// Produces attempts keyed by card with `acks=all`, then, if given, one
/// closing attempt per partition (it closes every window the attempts touched).
pub async fn produce(
    client: &Arc<Client>,
    attempts: impl IntoIterator<Item = Attempt>,
    closing: Option<&Attempt>,
) -> Result<(), ClientError> {
    let mut producer = Producer::new(client.clone(), SOURCE, Acks::All).await?;
    for attempt in attempts {
        producer.send(None, record(&attempt)).await?;
    }
    if let Some(closing) = closing {
        let partitions = client.describe_topic(SOURCE).await?.config.partitions;
        for partition in 0..partitions {
            producer.send(Some(partition), record(closing)).await?;
        }
    }
    producer.flush().await?;
    Ok(())
}

/// Every committed record of every partition of `topic`.
pub async fn read_topic(client: &Arc<Client>, topic: &str) -> Result<Vec<Record>, ClientError> {
    let partitions = client.describe_topic(topic).await?.config.partitions;
    let mut consumer = Consumer::new(client.clone(), topic);
    for partition in 0..partitions {
        consumer.assign(partition, 0);
    }
    let ends = consumer.end_offsets().await?;
    let mut records = Vec::new();
    while !ends
        .iter()
        .all(|(p, end)| consumer.position(*p).is_some_and(|at| at >= *end))
    {
        records.extend(consumer.poll().await?.into_iter().map(|(_, r)| r.record));
    }
    Ok(records)
}

/// The attempts in the source topic (the reference's input).
pub async fn read_attempts(client: &Arc<Client>) -> Result<Vec<Attempt>, String> {
    let records = read_topic(client, SOURCE).await.map_err(|e| e.to_string())?;
    records
        .iter()
        .map(|r| serde_json::from_slice(r.value.as_deref().unwrap_or_default()).map_err(|e| e.to_string()))
        .collect()
}

/// The sink's results as (card, window start) → count, and how many
/// (card, window) results came more than once.
pub async fn read_results(client: &Arc<Client>) -> Result<(BTreeMap<(String, i64), u64>, usize), String> {
    let mut results = BTreeMap::new();
    let mut duplicates = 0;
    for record in read_topic(client, SINK).await.map_err(|e| e.to_string())? {
        let (key, count) = decode_result(&record)?;
        if results.insert(key, count).is_some() {
            duplicates += 1;
        }
    }
    Ok((results, duplicates))
}

/// The seed's statement, as a user types it.
pub const STATEMENT: &str = "CREATE STREAM possible_fraud AS
  SELECT card_number, count(*) FROM authorization_attempts
  WINDOW TUMBLING (SIZE 5 MINUTE)
  GROUP BY card_number HAVING count(*) > 3;";
/// The declaration of the attempts' schema the statement reads.
pub const DECLARATION: &str = "CREATE STREAM authorization_attempts
  (card_number STRING, amount_cents BIGINT, at_ms BIGINT)
  WITH (KAFKA_TOPIC='authorization_attempts', VALUE_FORMAT='JSON', TIMESTAMP='at_ms',
        PARTITIONS=3, REPLICAS=3);";
/// The persistent query the statement starts, and the topic it writes.
pub const SQL_QUERY: &str = "CSAS_POSSIBLE_FRAUD_0";
pub const SQL_SINK: &str = "POSSIBLE_FRAUD";

/// The SQL query's output (`EMIT CHANGES`): each (card, window)'s counts
/// above the threshold, in the order they came.
pub async fn read_changes(client: &Arc<Client>, topic: &str) -> Result<BTreeMap<(String, i64), Vec<u64>>, String> {
    let mut changes: BTreeMap<(String, i64), Vec<u64>> = BTreeMap::new();
    for record in read_topic(client, topic).await.map_err(|e| e.to_string())? {
        let key: serde_json::Value =
            serde_json::from_slice(record.key.as_deref().unwrap_or_default()).map_err(|e| format!("sink key: {e}"))?;
        let value: serde_json::Value = serde_json::from_slice(record.value.as_deref().unwrap_or_default())
            .map_err(|e| format!("sink value: {e}"))?;
        let card = value["CARD_NUMBER"].as_str().ok_or("sink value without CARD_NUMBER")?;
        let start = key["WINDOWSTART"].as_i64().ok_or("sink key without WINDOWSTART")?;
        let count = value["KSQL_COL_0"].as_u64().ok_or("sink value without a count")?;
        changes.entry((card.to_string(), start)).or_default().push(count);
    }
    Ok(changes)
}

/// The final count per (card, window), and how many changes broke the
/// exactly-once pattern (each count from `THRESHOLD + 1` up, once).
pub fn final_counts(changes: &BTreeMap<(String, i64), Vec<u64>>) -> (BTreeMap<(String, i64), u64>, usize) {
    let mut irregular = 0;
    let mut counts = BTreeMap::new();
    for (key, seen) in changes {
        let last = seen.last().copied().unwrap_or_default();
        let expected: Vec<u64> = (THRESHOLD + 1..=last).collect();
        if *seen != expected {
            irregular += 1;
        }
        counts.insert(key.clone(), last);
    }
    (counts, irregular)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_and_stays_within_grace() {
        let a: Vec<Attempt> = Generator::new(7, 100, 0, 1000).take(1000).collect();
        let b: Vec<Attempt> = Generator::new(7, 100, 0, 1000).take(1000).collect();
        assert_eq!(a, b);
        let mut max = i64::MIN;
        for attempt in &a {
            assert!(
                attempt.at_ms > max.saturating_sub(GRACE_MS),
                "out of order beyond the grace"
            );
            max = max.max(attempt.at_ms);
        }
        assert!(!reference(&a).is_empty(), "some cards look fraudulent");
    }
}
