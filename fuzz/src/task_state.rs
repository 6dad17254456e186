//! A dataflow task's state and inputs (dataflow/src/window.rs, builder.rs,
//! compile.rs, row.rs): source records (JSON by schema) with any event time,
//! repartitioned keys and values as the next stage reads them off its
//! topic, watermarks anywhere in i64, and window state restored from a
//! checkpoint's bytes.
//!
//! The first byte picks a dataflow: the Rust-builder fraud dataflow or a
//! SQL query of each window kind. The rest is a list of operations. A
//! snapshot restored into a fresh stage snapshots to the same bytes.

use arbitrary::{Arbitrary, Unstructured};
use runnel_dataflow::builder::Emitted;
use runnel_dataflow::DataflowDef;

/// Operations one input runs at most.
const OPERATIONS_MAX: usize = 64;

/// The SQL queries driven besides the builder dataflow.
const QUERIES: [&str; 5] = [
    "SELECT card, count(*) FROM attempts WINDOW TUMBLING (SIZE 5 MINUTE) GROUP BY card HAVING count(*) > 1 EMIT CHANGES",
    "SELECT card, sum(amount), avg(amount), min(note) FROM attempts WINDOW HOPPING (SIZE 10 SECONDS, ADVANCE BY 5 SECONDS, GRACE PERIOD 1 SECOND) GROUP BY card EMIT FINAL",
    "SELECT card, count(*), max(amount), WINDOWSTART, WINDOWEND FROM attempts WINDOW SESSION (30 SECONDS) GROUP BY card EMIT CHANGES",
    "SELECT note, count_distinct(card), count(amount) FROM attempts WHERE amount > 3 GROUP BY note EMIT CHANGES",
    "SELECT card, amount * 2 AS twice, meta->a->b AS b FROM attempts WHERE note LIKE 'x%' EMIT CHANGES",
];

#[derive(Arbitrary, Debug)]
enum Operation {
    /// A source record: JSON text, at an event time from the record or this.
    Source {
        json: String,
        timestamp_ms: i64,
    },
    /// A source record made of fields, so that it usually matches the schema.
    Attempt {
        card: u8,
        amount: i64,
        at_ms: i64,
        note: String,
    },
    /// A repartitioned record as the window stage reads it.
    Raw {
        key: Vec<u8>,
        value: Vec<u8>,
        t_ms: i64,
    },
    Advance {
        watermark_ms: i64,
    },
    /// Snapshot, then restore into a fresh stage that replaces this one.
    RoundTrip,
    /// Restore window state from arbitrary bytes.
    Restore {
        bytes: Vec<u8>,
    },
}

pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let def = match usize::from(which) % (QUERIES.len() + 1) {
        0 => runnel_dataflow::fraud::dataflow(),
        n => crate::sql::compiled(QUERIES[n - 1]),
    };
    let mut input = Unstructured::new(rest);
    let mut state = State::new(&def);
    for _ in 0..OPERATIONS_MAX {
        let Ok(operation) = Operation::arbitrary(&mut input) else {
            break;
        };
        state.apply(&def, operation);
    }
}

struct State {
    window: Option<Box<dyn runnel_dataflow::builder::WindowStage>>,
    staged: Emitted,
    out: Emitted,
}

impl State {
    fn new(def: &DataflowDef) -> State {
        State {
            window: def.window_stage.as_ref().map(|make| make()),
            staged: Emitted::default(),
            out: Emitted::default(),
        }
    }

    fn apply(&mut self, def: &DataflowDef, operation: Operation) {
        self.out.clear();
        match operation {
            Operation::Source { json, timestamp_ms } => self.source(def, json.as_bytes(), timestamp_ms),
            Operation::Attempt {
                card,
                amount,
                at_ms,
                note,
            } => {
                let json = serde_json::json!({
                    "card": format!("c-{card}"), "card_number": format!("c-{card}"),
                    "amount": amount, "amount_cents": amount, "at_ms": at_ms, "timestamp_ms": at_ms,
                    "note": note, "meta": {"a": {"b": amount}},
                });
                self.source(def, json.to_string().as_bytes(), at_ms);
            }
            Operation::Raw { key, value, t_ms } => {
                if let Some(window) = self.window.as_mut() {
                    let _ = window.add(&key, &value, t_ms, &mut self.out);
                }
            }
            Operation::Advance { watermark_ms } => {
                if let Some(window) = self.window.as_mut() {
                    let _ = window.advance(watermark_ms, &mut self.out);
                }
            }
            Operation::RoundTrip => self.round_trip(def),
            Operation::Restore { bytes } => {
                if let Some(window) = self.window.as_mut() {
                    if window.restore(&bytes).is_err() {
                        *self = State::new(def);
                    }
                }
            }
        }
    }

    fn source(&mut self, def: &DataflowDef, value: &[u8], timestamp_ms: i64) {
        self.staged.clear();
        if def.source_stage.process(value, timestamp_ms, &mut self.staged).is_err() {
            return;
        }
        let Some(window) = self.window.as_mut() else { return };
        for record in self.staged.iter() {
            let (key, value) = (record.key.unwrap_or_default(), record.value.unwrap_or_default());
            let _ = window.add(key, value, record.timestamp_ms, &mut self.out);
        }
    }

    fn round_trip(&mut self, def: &DataflowDef) {
        let Some(window) = self.window.as_ref() else { return };
        let Ok(snapshot) = window.snapshot() else { return };
        let mut fresh = State::new(def);
        let restored = fresh.window.as_mut().expect("the same dataflow has a window stage");
        restored.restore(&snapshot).expect("a snapshot restores");
        assert_eq!(
            restored.snapshot().expect("snapshots again"),
            snapshot,
            "a restored state snapshots alike"
        );
        assert_eq!(restored.watermark_ms(), window.watermark_ms());
        *self = fresh;
    }
}
