//! The Rust builders users write dataflows with, and the type-erased stages
//! they compile to.
//!
//! A dataflow has one or two stages. The *source stage* decodes each source
//! record (JSON into the source type), runs the stateless operators (`map`,
//! `filter`, `flat_map`, `event_time`) and, for a keyed dataflow, encodes
//! key and value (postcard) for the repartition topic. The *window stage*
//! reads a repartition partition, so every key lives in exactly one task, and
//! runs the window, the aggregate and the having-filter; its results go to
//! the sink keyed by `{"key", "window_start_ms", "window_end_ms"}` with the
//! aggregate as JSON. A dataflow without `key_by` is one stage that writes
//! its records (JSON) straight to the sink. Operators inside a stage are
//! fused into the stage's task (like Flink's operator chaining); the
//! repartition topic is the boundary between stages.

use std::hash::Hash;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::window::{Emit, Window, WindowBounds, WindowError, WindowOperator, WindowResult};

/// Hands one (value, event time) on to the next operator.
type Out<'a, T> = &'a mut dyn FnMut(T, i64);
/// Decodes a source record and runs every operator so far.
type Chain<T> = Arc<dyn Fn(&[u8], i64, Out<'_, T>) -> Result<(), String> + Send + Sync>;

/// A record leaving a stage: for the repartition topic or the sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emitted {
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone (a retracted session window).
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: i64,
}

/// The source stage of a dataflow, erased of its types.
pub trait SourceStage: Send + Sync {
    /// Runs one source record through the stateless operators. An error is
    /// a record that does not decode as the source type (for the DLQ).
    fn process(&self, value: &[u8], timestamp_ms: i64, out: &mut Vec<Emitted>) -> Result<(), String>;
}

/// One window task's state, erased of its types.
pub trait WindowStage: Send + Sync {
    /// Adds a repartitioned record (postcard key and value) at event time `t_ms`.
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Vec<Emitted>) -> Result<(), StageError>;
    /// Moves the watermark; closed windows' results (if final) go to `out`.
    fn advance(&mut self, watermark_ms: i64, out: &mut Vec<Emitted>) -> Result<(), StageError>;
    fn snapshot(&self) -> Result<Vec<u8>, StageError>;
    fn restore(&mut self, bytes: &[u8]) -> Result<(), StageError>;
    fn late_records(&self) -> u64;
    fn watermark_ms(&self) -> i64;
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error("repartitioned record does not decode: {0}")]
    Corrupt(String),
    /// A result whose key or aggregate has no JSON form (e.g. a map with
    /// non-string keys): the task stops rather than drop or blank it.
    #[error("window result does not encode as JSON: {0}")]
    Unencodable(String),
}

/// Makes a fresh window stage for each task.
pub type WindowStageFactory = Arc<dyn Fn() -> Box<dyn WindowStage> + Send + Sync>;

/// A complete dataflow, ready to register with a node.
#[derive(Clone)]
pub struct DataflowDef {
    pub name: String,
    pub source: String,
    pub sink: String,
    pub source_stage: Arc<dyn SourceStage>,
    /// `None` for a dataflow without `key_by` (one stage).
    pub window_stage: Option<WindowStageFactory>,
}

impl DataflowDef {
    /// Stages, and so tasks per source partition.
    pub fn stages(&self) -> u32 {
        if self.window_stage.is_some() {
            2
        } else {
            1
        }
    }
}

impl std::fmt::Debug for DataflowDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataflowDef")
            .field("name", &self.name)
            .field("source", &self.source)
            .field("sink", &self.sink)
            .field("stages", &self.stages())
            .finish()
    }
}

/// The start of every dataflow: `Dataflow::new(name).source::<T>(topic)`.
pub struct Dataflow {
    name: String,
}

impl Dataflow {
    pub fn new(name: &str) -> Dataflow {
        Dataflow { name: name.to_string() }
    }

    /// Reads `topic`, decoding each record's value as JSON into `T`; the
    /// record's timestamp is the event time unless `event_time` says otherwise.
    pub fn source<T: DeserializeOwned + 'static>(self, topic: &str) -> Stream<T> {
        let chain: Chain<T> = Arc::new(|bytes, timestamp_ms, out| {
            let value: T = serde_json::from_slice(bytes)
                .map_err(|e| format!("record does not decode as {}: {e}", std::any::type_name::<T>()))?;
            out(value, timestamp_ms);
            Ok(())
        });
        Stream {
            name: self.name,
            source: topic.to_string(),
            chain,
        }
    }
}

/// A stream of `T` with event times.
pub struct Stream<T> {
    name: String,
    source: String,
    chain: Chain<T>,
}

impl<T: 'static> Stream<T> {
    fn then<U: 'static>(self, step: impl Fn(T, i64, Out<'_, U>) + Send + Sync + 'static) -> Stream<U> {
        let previous = self.chain;
        Stream {
            name: self.name,
            source: self.source,
            chain: Arc::new(move |bytes, timestamp_ms, out| {
                previous(bytes, timestamp_ms, &mut |value, t| step(value, t, &mut *out))
            }),
        }
    }

    pub fn map<U: 'static>(self, f: impl Fn(T) -> U + Send + Sync + 'static) -> Stream<U> {
        self.then(move |value, t, out| out(f(value), t))
    }

    pub fn filter(self, keep: impl Fn(&T) -> bool + Send + Sync + 'static) -> Stream<T> {
        self.then(move |value, t, out| {
            if keep(&value) {
                out(value, t)
            }
        })
    }

    pub fn flat_map<U: 'static, I: IntoIterator<Item = U>>(
        self,
        f: impl Fn(T) -> I + Send + Sync + 'static,
    ) -> Stream<U> {
        self.then(move |value, t, out| {
            for item in f(value) {
                out(item, t)
            }
        })
    }

    /// Takes each record's event time (ms since the epoch) from its value.
    pub fn event_time(self, at_ms: impl Fn(&T) -> i64 + Send + Sync + 'static) -> Stream<T> {
        self.then(move |value, _, out| {
            let t = at_ms(&value);
            out(value, t)
        })
    }

    /// Groups by key: the records go through the repartition topic so each
    /// key's records meet in one task.
    pub fn key_by<K: 'static>(self, key: impl Fn(&T) -> K + Send + Sync + 'static) -> KeyedStream<K, T> {
        KeyedStream {
            stream: self,
            key: Arc::new(key),
        }
    }
}

impl<T: Serialize + 'static> Stream<T> {
    /// Writes each record (JSON, no key) to `topic`: a one-stage dataflow.
    pub fn sink(self, topic: &str) -> DataflowDef {
        struct Stateless<T> {
            chain: Chain<T>,
        }
        impl<T: Serialize> SourceStage for Stateless<T> {
            fn process(&self, value: &[u8], timestamp_ms: i64, out: &mut Vec<Emitted>) -> Result<(), String> {
                let mut failed = None;
                (self.chain)(
                    value,
                    timestamp_ms,
                    &mut |record, t| match serde_json::to_vec(&record) {
                        Ok(bytes) => out.push(Emitted {
                            key: None,
                            value: Some(bytes),
                            timestamp_ms: t,
                        }),
                        Err(e) => failed = Some(e.to_string()),
                    },
                )?;
                failed.map_or(Ok(()), Err)
            }
        }
        DataflowDef {
            name: self.name,
            source: self.source,
            sink: topic.to_string(),
            source_stage: Arc::new(Stateless { chain: self.chain }),
            window_stage: None,
        }
    }
}

pub struct KeyedStream<K, T> {
    stream: Stream<T>,
    key: Arc<dyn Fn(&T) -> K + Send + Sync>,
}

impl<K: 'static, T: 'static> KeyedStream<K, T> {
    pub fn window(self, window: Window) -> WindowedStream<K, T> {
        WindowedStream { keyed: self, window }
    }
}

pub struct WindowedStream<K, T> {
    keyed: KeyedStream<K, T>,
    window: Window,
}

impl<K: 'static, T: Clone + 'static> WindowedStream<K, T> {
    /// Records per key and window.
    pub fn count(self) -> WindowedTable<K, T, u64> {
        self.table(
            Arc::new(|| 0),
            Arc::new(|count, _| *count += 1),
            Some(Arc::new(|a, b| *a += b)),
        )
    }

    /// Folds each key's records per window into an `A`, starting from
    /// `init()`. Session windows also need [`WindowedTable::merge`].
    pub fn aggregate<A: Default + 'static>(
        self,
        init: impl Fn() -> A + Send + Sync + 'static,
        fold: impl Fn(A, &T) -> A + Send + Sync + 'static,
    ) -> WindowedTable<K, T, A> {
        self.table(
            Arc::new(init),
            Arc::new(move |aggregate: &mut A, value: &T| {
                let current = std::mem::take(aggregate);
                *aggregate = fold(current, value);
            }),
            None,
        )
    }

    /// Combines each key's records per window with `f` (the first record
    /// as is); the result is `null` for an empty window.
    pub fn reduce(self, f: impl Fn(T, &T) -> T + Send + Sync + 'static) -> WindowedTable<K, T, Option<T>> {
        let f = Arc::new(f);
        let merge_f = f.clone();
        self.table(
            Arc::new(|| None),
            Arc::new(move |aggregate: &mut Option<T>, value: &T| {
                *aggregate = Some(match aggregate.take() {
                    None => value.clone(),
                    Some(current) => f(current, value),
                });
            }),
            Some(Arc::new(move |a: &mut Option<T>, b: Option<T>| {
                if let Some(b) = b {
                    *a = Some(match a.take() {
                        None => b,
                        Some(current) => merge_f(current, &b),
                    });
                }
            })),
        )
    }

    fn table<A>(self, init: Init<A>, fold: Fold<A, T>, merge: Option<Merge<A>>) -> WindowedTable<K, T, A> {
        WindowedTable {
            windowed: self,
            init,
            fold,
            merge,
            having: Arc::new(|_, _, _| true),
            emit: Emit::Changes,
        }
    }
}

type Init<A> = Arc<dyn Fn() -> A + Send + Sync>;
type Fold<A, T> = Arc<dyn Fn(&mut A, &T) + Send + Sync>;
type Merge<A> = Arc<dyn Fn(&mut A, A) + Send + Sync>;
type Having<K, A> = Arc<dyn Fn(&K, &WindowBounds, &A) -> bool + Send + Sync>;

/// Per key and window, an aggregate.
pub struct WindowedTable<K, T, A> {
    windowed: WindowedStream<K, T>,
    init: Init<A>,
    fold: Fold<A, T>,
    merge: Option<Merge<A>>,
    having: Having<K, A>,
    emit: Emit,
}

impl<K, T, A> WindowedTable<K, T, A>
where
    K: Serialize + DeserializeOwned + Clone + Eq + Hash + Ord + Send + Sync + 'static,
    T: Serialize + DeserializeOwned + Clone + 'static,
    A: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Keeps only results passing `keep` (SQL's HAVING).
    pub fn filter(mut self, keep: impl Fn(&K, &WindowBounds, &A) -> bool + Send + Sync + 'static) -> Self {
        let previous = self.having;
        self.having = Arc::new(move |k, w, a| previous(k, w, a) && keep(k, w, a));
        self
    }

    /// How two session windows' aggregates combine when a record bridges them.
    pub fn merge(mut self, merge: impl Fn(A, A) -> A + Send + Sync + 'static) -> Self
    where
        A: Default,
    {
        self.merge = Some(Arc::new(move |a: &mut A, b: A| {
            let current = std::mem::take(a);
            *a = merge(current, b);
        }));
        self
    }

    /// `Emit::Changes` (the default) or `Emit::Final`.
    pub fn emit(mut self, emit: Emit) -> Self {
        self.emit = emit;
        self
    }

    /// Writes results to `topic`. Panics when the dataflow is not valid
    /// (a hopping advance larger than its size, a session aggregate
    /// without `merge`): a programming error found when the binary starts.
    pub fn sink(self, topic: &str) -> DataflowDef {
        let window = self.windowed.window;
        if let Err(e) = window.validate() {
            panic!("dataflow {:?}: {e}", self.windowed.keyed.stream.name);
        }
        let merge: Merge<A> = match (self.merge, window.kind) {
            (Some(merge), _) => merge,
            (None, crate::window::WindowKind::Session { .. }) => panic!(
                "dataflow {:?}: a session-window aggregate needs .merge(...)",
                self.windowed.keyed.stream.name
            ),
            (None, _) => Arc::new(|_, _| {}),
        };
        let keyed = self.windowed.keyed;
        let source_stage = Arc::new(KeyedSource {
            chain: keyed.stream.chain,
            key: keyed.key,
        });
        let (init, fold, having, emit) = (self.init, self.fold, self.having, self.emit);
        let factory: WindowStageFactory = Arc::new(move || {
            Box::new(TypedWindowStage::<K, T, A> {
                operator: WindowOperator::new(window, emit),
                init: init.clone(),
                fold: fold.clone(),
                merge: merge.clone(),
                having: having.clone(),
                results: Vec::new(),
            })
        });
        DataflowDef {
            name: keyed.stream.name,
            source: keyed.stream.source,
            sink: topic.to_string(),
            source_stage,
            window_stage: Some(factory),
        }
    }
}

struct KeyedSource<K, T> {
    chain: Chain<T>,
    key: Arc<dyn Fn(&T) -> K + Send + Sync>,
}

impl<K: Serialize, T: Serialize> SourceStage for KeyedSource<K, T> {
    fn process(&self, value: &[u8], timestamp_ms: i64, out: &mut Vec<Emitted>) -> Result<(), String> {
        let mut failed = None;
        (self.chain)(value, timestamp_ms, &mut |record, t| {
            let key = postcard::to_allocvec(&(self.key)(&record));
            match (key, postcard::to_allocvec(&record)) {
                (Ok(key), Ok(value)) => out.push(Emitted {
                    key: Some(key),
                    value: Some(value),
                    timestamp_ms: t,
                }),
                (Err(e), _) | (_, Err(e)) => failed = Some(e.to_string()),
            }
        })?;
        failed.map_or(Ok(()), Err)
    }
}

struct TypedWindowStage<K, T, A> {
    operator: WindowOperator<K, A>,
    init: Init<A>,
    fold: Fold<A, T>,
    merge: Merge<A>,
    having: Having<K, A>,
    /// Reused between calls.
    results: Vec<WindowResult<K, A>>,
}

/// The sink record key of a window result (KSQL's windowed key).
#[derive(Serialize)]
struct SinkKey<'a, K> {
    key: &'a K,
    window_start_ms: i64,
    window_end_ms: i64,
}

impl<K, T, A> TypedWindowStage<K, T, A>
where
    K: Serialize + DeserializeOwned + Clone + Eq + Hash + Ord,
    A: Serialize + Clone,
{
    fn drain(&mut self, out: &mut Vec<Emitted>) -> Result<(), StageError> {
        let unencodable = |e: serde_json::Error| StageError::Unencodable(e.to_string());
        for result in self.results.drain(..) {
            let (key, window, value, retract) = match &result {
                WindowResult::Update { key, window, value } => (key, window, value, false),
                WindowResult::Retract { key, window, value } => (key, window, value, true),
            };
            if !(self.having)(key, window, value) {
                continue;
            }
            let sink_key = SinkKey {
                key,
                window_start_ms: window.start_ms,
                window_end_ms: window.end_ms,
            };
            let key_bytes = serde_json::to_vec(&sink_key).map_err(unencodable)?;
            let value = if retract {
                None
            } else {
                Some(serde_json::to_vec(value).map_err(unencodable)?)
            };
            out.push(Emitted {
                key: Some(key_bytes),
                value,
                timestamp_ms: window.start_ms,
            });
        }
        Ok(())
    }
}

impl<K, T, A> WindowStage for TypedWindowStage<K, T, A>
where
    K: Serialize + DeserializeOwned + Clone + Eq + Hash + Ord + Send + Sync,
    T: DeserializeOwned,
    A: Serialize + DeserializeOwned + Clone + Send + Sync,
{
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Vec<Emitted>) -> Result<(), StageError> {
        let key: K = postcard::from_bytes(key).map_err(|e| StageError::Corrupt(format!("key: {e}")))?;
        let value: T = postcard::from_bytes(value).map_err(|e| StageError::Corrupt(format!("value: {e}")))?;
        let mut results = std::mem::take(&mut self.results);
        let outcome = self
            .operator
            .add(&key, t_ms, &value, &*self.init, &*self.fold, &*self.merge, &mut results);
        self.results = results;
        self.drain(out)?;
        Ok(outcome?)
    }

    fn advance(&mut self, watermark_ms: i64, out: &mut Vec<Emitted>) -> Result<(), StageError> {
        let mut results = std::mem::take(&mut self.results);
        self.operator.advance(watermark_ms, &mut results);
        self.results = results;
        self.drain(out)
    }

    fn snapshot(&self) -> Result<Vec<u8>, StageError> {
        Ok(self.operator.snapshot()?)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), StageError> {
        Ok(self.operator.restore(bytes)?)
    }

    fn late_records(&self) -> u64 {
        self.operator.late_records()
    }

    fn watermark_ms(&self) -> i64 {
        self.operator.watermark_ms()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_result_without_a_json_form_fails_the_stage_instead_of_vanishing() {
        // JSON object keys must be strings: a map keyed by bytes has no JSON form.
        let def = Dataflow::new("odd")
            .source::<u32>("in")
            .key_by(|n| BTreeMap::from([(vec![*n as u8], 1u8)]))
            .window(Window::tumbling(Duration::from_secs(60)))
            .count()
            .sink("out");
        let mut emitted = Vec::new();
        def.source_stage.process(b"7", 1_000, &mut emitted).expect("decodes");
        let record = emitted.pop().expect("one keyed record");
        let mut window = (def.window_stage.expect("keyed"))();
        let mut out = Vec::new();
        let key = record.key.expect("key");
        let value = record.value.expect("value");
        let err = window.add(&key, &value, 1_000, &mut out).expect_err("unencodable key");
        assert!(matches!(err, StageError::Unencodable(_)), "{err}");
        assert!(out.is_empty());
    }
}
