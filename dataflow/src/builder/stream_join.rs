//! The Rust builders' stream–stream join: `left.join(right, window, kind,
//! joiner)` on two keyed streams, run as SQL's join of two streams runs (a
//! source stage per side, then a join stage holding both sides in
//! [`JoinBuffers`]), with the records kept as their postcard encodings.

use std::sync::Arc;

use runnel_client::plan::JoinKind;
use runnel_client::tasks::StateRow;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    step, to_json, type_name, DataflowDef, Emitted, JoinedSource, KeyedSource, KeyedStream, StageError, StateStore,
    WindowStage, WindowStageFactory,
};
use crate::join::{JoinBuffers, JoinWindow, Joined, Side};

/// What a join makes of a key and its pair (or of one side alone, for a
/// left or outer join's record that matched nothing).
type Joiner<K, T, U, R> = Arc<dyn Fn(&K, Option<&T>, Option<&U>) -> Option<R> + Send + Sync>;

impl<K: 'static, T: 'static> KeyedStream<K, T> {
    /// Joins with `other`, keyed by the same key, within `window`: Kafka
    /// Streams' `KStream#join`, `leftJoin` and `outerJoin` with
    /// `JoinWindows` (inner, left, outer `kind`). `joiner` gets each pair
    /// as soon as its second record arrives, and, for a left or outer join,
    /// each record that matched nothing once its window has closed; what
    /// it returns goes on (`None` drops it). Records later than the grace
    /// are dropped and counted. Both sources must have as many partitions:
    /// their source tasks are paired by partition.
    pub fn join<U: 'static, R: 'static>(
        self,
        other: KeyedStream<K, U>,
        window: JoinWindow,
        kind: JoinKind,
        joiner: impl Fn(&K, Option<&T>, Option<&U>) -> Option<R> + Send + Sync + 'static,
    ) -> JoinedStream<K, T, U, R> {
        JoinedStream {
            left: self,
            right: other,
            window,
            kind,
            joiner: Arc::new(joiner),
        }
    }
}

/// Two keyed streams joined within a window, ready for a sink.
pub struct JoinedStream<K, T, U, R> {
    left: KeyedStream<K, T>,
    right: KeyedStream<K, U>,
    window: JoinWindow,
    kind: JoinKind,
    joiner: Joiner<K, T, U, R>,
}

impl<K, T, U, R> JoinedStream<K, T, U, R>
where
    K: Serialize + DeserializeOwned + 'static,
    T: Serialize + DeserializeOwned + 'static,
    U: Serialize + DeserializeOwned + 'static,
    R: Serialize + 'static,
{
    /// Writes each joined record to `topic` as JSON, keyed by the key (JSON).
    pub fn sink(self, topic: &str) -> DataflowDef {
        let (left, right) = (self.left, self.right);
        let right_topic = right.stream.source.clone();
        let join_steps = vec![
            step(format!(
                "{:?} JOIN {right_topic} WITHIN {} ms before, {} ms after, GRACE {} ms",
                self.kind, self.window.before_ms, self.window.after_ms, self.window.grace_ms
            )),
            step(format!("JOINER to {}", type_name::<R>())),
        ];
        let (window, kind, joiner) = (self.window, self.kind, self.joiner);
        let factory: WindowStageFactory = Arc::new(move || {
            Box::new(TypedJoinStage::<K, T, U, R> {
                buffers: JoinBuffers::logged(window, kind),
                joiner: joiner.clone(),
                _types: std::marker::PhantomData,
            })
        });
        DataflowDef {
            name: left.stream.name,
            source: left.stream.source,
            sink: topic.to_string(),
            source_stage: Arc::new(KeyedSource {
                chain: left.stream.chain,
                joins: left.stream.joins,
                key: left.key,
                carry_values: true,
                side: Some(0),
            }),
            joined_sources: vec![JoinedSource {
                topic: right_topic,
                stage: Arc::new(KeyedSource {
                    chain: right.stream.chain,
                    joins: right.stream.joins,
                    key: right.key,
                    carry_values: true,
                    side: Some(1),
                }),
            }],
            window_stage: Some(factory),
            next_stages: Vec::new(),
            steps: vec![left.stream.steps, right.stream.steps, join_steps],
        }
    }
}

/// A typed join task: both sides' encoded records in [`JoinBuffers`].
struct TypedJoinStage<K, T, U, R> {
    buffers: JoinBuffers<Vec<u8>>,
    joiner: Joiner<K, T, U, R>,
    _types: std::marker::PhantomData<fn() -> (T, U)>,
}

/// Runs `joiner` over a pair or a lone record, emitting what it returns.
fn emit_typed<K, T, U, R>(
    joiner: &Joiner<K, T, U, R>,
    joined: Joined<'_, Vec<u8>>,
    out: &mut Emitted,
) -> Result<(), StageError>
where
    K: Serialize + DeserializeOwned,
    T: DeserializeOwned,
    U: DeserializeOwned,
    R: Serialize,
{
    let decode = |what: &str, bytes: &[u8]| StageError::Corrupt(format!("{what} of {} bytes", bytes.len()));
    let (key, left, right, t_ms) = joined.parts();
    let k: K = postcard::from_bytes(key).map_err(|_| decode("a join key", key))?;
    let t: Option<T> = match left {
        Some(bytes) => Some(postcard::from_bytes(bytes).map_err(|_| decode("a left record", bytes))?),
        None => None,
    };
    let u: Option<U> = match right {
        Some(bytes) => Some(postcard::from_bytes(bytes).map_err(|_| decode("a right record", bytes))?),
        None => None,
    };
    let Some(result) = joiner(&k, t.as_ref(), u.as_ref()) else {
        return Ok(());
    };
    let unencodable = |e: serde_json::Error| StageError::Unencodable(e.to_string());
    let key = out.encode(to_json(&k)).map_err(unencodable)?;
    let value = out.encode(to_json(&result)).map_err(unencodable)?;
    out.push(t_ms, Some(key), Some(value));
    Ok(())
}

impl<K, T, U, R> WindowStage for TypedJoinStage<K, T, U, R>
where
    K: Serialize + DeserializeOwned + 'static,
    T: DeserializeOwned + 'static,
    U: DeserializeOwned + 'static,
    R: Serialize + 'static,
{
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let side = match value.first() {
            Some(0) => Side::Left,
            Some(1) => Side::Right,
            other => return Err(StageError::Corrupt(format!("join value names no side: {other:?}"))),
        };
        let joiner = &self.joiner;
        self.buffers
            .add(Some(key), side, t_ms, value[1..].to_vec(), &mut |joined| {
                emit_typed(joiner, joined, out)
            })
    }

    fn advance(&mut self, watermark_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let joiner = &self.joiner;
        self.buffers
            .advance(watermark_ms, &mut |joined| emit_typed(joiner, joined, out))
    }

    fn snapshot(&self) -> Result<Vec<u8>, StageError> {
        self.buffers.snapshot()
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), StageError> {
        self.buffers.restore(bytes)
    }

    fn late_records(&self) -> u64 {
        self.buffers.late_records()
    }

    fn watermark_ms(&self) -> i64 {
        self.buffers.watermark_ms()
    }

    fn read(&self, _key: Option<&[u8]>, _limit: usize) -> Result<Option<Vec<StateRow>>, StageError> {
        Err(StageError::NoTable(
            "a stream–stream join holds records, not a table's rows",
        ))
    }

    fn store(&self) -> Option<&dyn StateStore> {
        Some(&self.buffers)
    }

    fn store_mut(&mut self) -> Option<&mut dyn StateStore> {
        Some(&mut self.buffers)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde::Deserialize;

    use super::*;
    use crate::Dataflow;

    #[derive(Clone, Serialize, Deserialize)]
    struct Attempt {
        card: String,
        amount: i64,
        at_ms: i64,
    }

    #[derive(Clone, Serialize, Deserialize)]
    struct Payment {
        card: String,
        paid: i64,
        at_ms: i64,
    }

    fn dataflow(kind: JoinKind) -> DataflowDef {
        let payments = Dataflow::new("paid")
            .source::<Payment>("payments")
            .event_time(|p| p.at_ms)
            .key_by(|p| p.card.clone());
        Dataflow::new("paid")
            .source::<Attempt>("attempts")
            .event_time(|a| a.at_ms)
            .key_by(|a| a.card.clone())
            .join(
                payments,
                JoinWindow::within(Duration::from_secs(5)).grace(Duration::from_secs(2)),
                kind,
                |card: &String, a: Option<&Attempt>, p: Option<&Payment>| {
                    Some((card.clone(), a.map(|a| a.amount), p.map(|p| p.paid)))
                },
            )
            .sink("paid")
    }

    /// (side, card, time, id): out of order by up to 4 s, some 30 s late.
    fn events() -> Vec<(usize, u8, i64, i64)> {
        let mut rng = crate::testing::Lcg::new(17);
        (0..400)
            .map(|i| {
                let state = rng.next_state();
                let roll = state >> 33;
                let late = if roll.is_multiple_of(29) { 30_000 } else { 0 };
                (
                    (roll % 2) as usize,
                    ((roll >> 3) % 4) as u8,
                    i * 600 - ((roll >> 9) % 4_000) as i64 - late,
                    i,
                )
            })
            .collect()
    }

    type Row = (i64, Option<i64>, Option<i64>);

    fn run(kind: JoinKind, restart_at: Option<usize>) -> Vec<Row> {
        let def = dataflow(kind);
        assert_eq!((def.stages(), def.plan().stages(), def.source_count()), (3, 3, 2));
        let factory = def.window_stage.clone().expect("a join stage");
        let mut join = factory();
        let (mut staged, mut out) = (Emitted::default(), Emitted::default());
        let mut watermark_ms = i64::MIN;
        for (i, &(side, card, at_ms, id)) in events().iter().enumerate() {
            if restart_at == Some(i) {
                join = crate::testing::restored(&factory, &*join).expect("restores");
            }
            let card = format!("c{card}");
            let json = match side {
                0 => serde_json::to_vec(&Attempt {
                    card,
                    amount: id,
                    at_ms,
                }),
                _ => serde_json::to_vec(&Payment { card, paid: id, at_ms }),
            }
            .expect("JSON");
            staged.clear();
            let (_, source) = def.source_of(side as u32).expect("a source");
            source.process(&json, 0, &mut staged).expect("decodes");
            for r in staged.iter() {
                join.add(r.key.expect("key"), r.value.expect("value"), r.timestamp_ms, &mut out)
                    .expect("adds");
                watermark_ms = watermark_ms.max(r.timestamp_ms);
            }
            join.advance(watermark_ms, &mut out).expect("advances");
        }
        join.advance(i64::MAX, &mut out).expect("closes");
        let mut rows: Vec<Row> = out
            .iter()
            .map(|r| {
                let (_, a, p): (String, Option<i64>, Option<i64>) =
                    serde_json::from_slice(r.value.expect("value")).expect("JSON");
                (r.timestamp_ms, a, p)
            })
            .collect();
        rows.sort();
        rows
    }

    /// Pairs of on-time records of one card within 5 s, at the later time;
    /// for a left join, each on-time attempt that paired with nothing.
    fn reference(left_join: bool) -> Vec<Row> {
        let mut max_ms = i64::MIN;
        let mut on_time = Vec::new();
        for event in events() {
            // Within 5 s either way, grace 2 s: late once 7 s behind.
            if event.2 + 5_000 + 2_000 >= max_ms {
                on_time.push(event);
            }
            max_ms = max_ms.max(event.2);
        }
        let mut rows = Vec::new();
        for &(side, card, t, id) in on_time.iter().filter(|e| e.0 == 0) {
            let pairs: Vec<Row> = on_time
                .iter()
                .filter(|p| p.0 == 1 && p.1 == card && (p.2 - t).abs() <= 5_000)
                .map(|p| (t.max(p.2), Some(id), Some(p.3)))
                .collect();
            if pairs.is_empty() && left_join && side == 0 {
                rows.push((t, Some(id), None));
            }
            rows.extend(pairs);
        }
        rows.sort();
        rows
    }

    #[test]
    fn typed_streams_join_inner_and_left_as_a_reference_says_through_a_restore() {
        let inner = run(JoinKind::Inner, None);
        assert_eq!(inner, reference(false));
        let left = run(JoinKind::Left, None);
        assert_eq!(left, reference(true));
        assert!(
            left.len() > inner.len() && inner.len() > 50,
            "{} {}",
            left.len(),
            inner.len()
        );
        assert_eq!(run(JoinKind::Left, Some(211)), left, "restored from a snapshot");
    }

    #[test]
    fn a_typed_join_names_both_sources_and_its_window_in_its_plan() {
        let def = dataflow(JoinKind::Outer);
        assert_eq!(def.source_of(1).map(|(topic, _)| topic), Some("payments"));
        let plan = def.plan();
        let explained = plan.explain("paid");
        assert!(
            explained.contains("RUST Outer JOIN payments WITHIN 5000 ms before, 5000 ms after, GRACE 2000 ms"),
            "{explained}"
        );
    }
}
