//! Stream–stream joins end to end without a cluster: statements planned
//! and compiled, both sides' records run through their source stages into
//! the join stage as a node's tasks would, and the output checked against
//! a reference computed here from the join's definition.

use std::collections::BTreeMap;

use runnel_client::plan::{ObjectKind, SqlObject, SqlType};
use runnel_dataflow::builder::{Emitted, WindowStage};
use runnel_dataflow::compile::compile;
use serde_json::{json, Value};

use super::{attempts, cards, object, plan_in};

/// `PAYMENTS (CARD STRING, PAID BIGINT, AT_MS BIGINT)`, event time AT_MS.
pub(super) fn payments() -> SqlObject {
    let columns = [
        ("CARD", SqlType::String),
        ("PAID", SqlType::BigInt),
        ("AT_MS", SqlType::BigInt),
    ];
    object("payments", ObjectKind::Stream, &columns, Some(2))
}

fn plan(statement: &str) -> Result<runnel_client::plan::Plan, String> {
    plan_in(vec![attempts(), cards(), payments()], statement)
}

/// Runs `event` through its side's source stage into `join`, then moves
/// the join's watermark to the greatest event time fed (`watermark_ms`).
fn feed(
    def: &runnel_dataflow::DataflowDef,
    join: &mut dyn WindowStage,
    event: &Event,
    watermark_ms: &mut i64,
    out: &mut Emitted,
) {
    let mut staged = Emitted::default();
    let (_, source) = def.source_of(u32::from(event.side)).expect("a source stage");
    source
        .process(event.json().to_string().as_bytes(), 0, &mut staged)
        .expect("decodes");
    for r in staged.iter() {
        join.add(r.key.expect("keyed"), r.value.expect("carried"), r.timestamp_ms, out)
            .expect("adds");
        *watermark_ms = (*watermark_ms).max(r.timestamp_ms);
    }
    join.advance(*watermark_ms, out).expect("advances");
}

/// One input record: its side (0 left, 1 right), card (`None`: a NULL key)
/// and event time.
#[derive(Clone, Copy, Debug)]
struct Event {
    side: u8,
    card: Option<u8>,
    at_ms: i64,
    /// Distinguishes records (AMOUNT on the left, PAID on the right).
    id: i64,
}

impl Event {
    fn json(&self) -> Value {
        let card = self.card.map(|c| format!("c{c}"));
        match self.side {
            0 => json!({"card": card, "amount": self.id, "at_ms": self.at_ms, "note": "n", "meta": {}}),
            _ => json!({"card": card, "paid": self.id, "at_ms": self.at_ms}),
        }
    }
}

/// Out of order (up to 6 s back), with a few records a minute late and a
/// few NULL cards, over five cards.
fn events() -> Vec<Event> {
    let mut rng = runnel_dataflow::testing::Lcg::new(11);
    let mut next = || {
        let state = rng.next_state();
        state >> 33
    };
    (0..600)
        .map(|i| {
            let roll = next();
            let late = if roll % 37 == 0 { 60_000 } else { 0 };
            Event {
                side: (roll % 2) as u8,
                card: (roll % 23 != 0).then_some(((roll >> 3) % 5) as u8),
                at_ms: 1_000_000 + i * 700 - ((roll >> 8) % 6_000) as i64 - late,
                id: i,
            }
        })
        .collect()
}

/// A joined row as the test compares them: (time, left id, right id).
type Joined = (i64, Option<i64>, Option<i64>);

/// Runs `events` through `statement`'s stages, the watermark following the
/// greatest event time read (as a join task's upstreams announce it), and
/// closes every window at the end. Optionally snapshots the join state
/// after `restart_at` records and goes on in a fresh stage restored from it.
fn run(statement: &str, events: &[Event], restart_at: Option<usize>) -> (Vec<Joined>, u64) {
    let plan = plan(statement).unwrap_or_else(|e| panic!("{statement}: {e}"));
    let def = compile("q", &plan).expect("compiles");
    assert_eq!((plan.stages(), def.stages(), def.source_count()), (3, 3, 2));
    let factory = def.window_stage.as_ref().expect("a join stage");
    let mut join: Box<dyn WindowStage> = factory();
    let mut out = Emitted::default();
    let mut watermark_ms = i64::MIN;
    for (i, event) in events.iter().enumerate() {
        if restart_at == Some(i) {
            join = runnel_dataflow::testing::restored(factory, &*join).expect("restores");
        }
        feed(&def, join.as_mut(), event, &mut watermark_ms, &mut out);
    }
    join.advance(i64::MAX, &mut out).expect("closes");
    // Keyed by the join key, also where the SELECT's a.card is NULL (a
    // right row alone): only a NULL join key leaves a NULL key.
    let null_cards = events.iter().filter(|e| e.card.is_none()).count();
    let null_keyed = out
        .iter()
        .filter(|r| {
            let key: Value = r
                .key
                .map_or(Value::Null, |k| serde_json::from_slice(k).expect("JSON key"));
            !(key["CARD"].is_string() || key["ROWKEY"].is_string())
        })
        .count();
    assert!(null_keyed <= null_cards, "{null_keyed} rows keyed by NULL");
    let mut joined: Vec<Joined> = out
        .iter()
        .map(|r| {
            let value: Value = serde_json::from_slice(r.value.expect("value")).expect("JSON");
            (r.timestamp_ms, value["AMOUNT"].as_i64(), value["PAID"].as_i64())
        })
        .collect();
    joined.sort();
    (joined, join.late_records())
}

/// What a join of `events` emits by definition: every pair of on-time
/// records of one card whose times are within (before, after), at the later
/// time; each on-time record of a kept side that pairs with nothing, NULL
/// cards included; late ones (whose window and grace had passed the
/// greatest time read before them) nowhere.
fn reference(events: &[Event], before_ms: i64, after_ms: i64, grace_ms: i64, keeps: [bool; 2]) -> (Vec<Joined>, u64) {
    let mut max_ms = i64::MIN;
    let mut on_time = Vec::new();
    let mut late = 0;
    for event in events {
        // Late: its own window closed (a left record's reaches `after` on, a right one's `before`).
        let reach_ms = if event.side == 0 { after_ms } else { before_ms };
        if event.at_ms + reach_ms + grace_ms < max_ms {
            late += 1;
        } else {
            on_time.push(*event);
        }
        max_ms = max_ms.max(event.at_ms);
    }
    let mut joined = Vec::new();
    let mut matched = vec![false; on_time.len()];
    for (i, l) in on_time.iter().enumerate().filter(|(_, e)| e.side == 0) {
        for (j, r) in on_time.iter().enumerate().filter(|(_, e)| e.side == 1) {
            let within = r.at_ms >= l.at_ms - before_ms && r.at_ms <= l.at_ms + after_ms;
            if l.card.is_some() && l.card == r.card && within {
                joined.push((l.at_ms.max(r.at_ms), Some(l.id), Some(r.id)));
                (matched[i], matched[j]) = (true, true);
            }
        }
    }
    for (event, _) in on_time
        .iter()
        .zip(&matched)
        .filter(|(e, m)| !**m && keeps[e.side as usize])
    {
        joined.push(match event.side {
            0 => (event.at_ms, Some(event.id), None),
            _ => (event.at_ms, None, Some(event.id)),
        });
    }
    joined.sort();
    (joined, late)
}

fn statement(kind: &str) -> String {
    format!(
        "SELECT a.card, a.amount, p.paid FROM attempts a {kind} payments p \
         WITHIN (3 SECONDS, 5 SECONDS) GRACE PERIOD 10 SECONDS ON a.card = p.card EMIT CHANGES"
    )
}

#[test]
fn inner_left_and_outer_joins_of_two_streams_equal_a_reference() {
    let events = events();
    for (kind, keeps) in [
        ("JOIN", [false, false]),
        ("LEFT JOIN", [true, false]),
        ("FULL OUTER JOIN", [true, true]),
    ] {
        let (found, late) = run(&statement(kind), &events, None);
        let (expected, expected_late) = reference(&events, 3_000, 5_000, 10_000, keeps);
        assert!(
            expected_late > 0 && expected.len() > 100,
            "the data has late records and matches"
        );
        assert_eq!(late, expected_late, "{kind}: late records");
        assert_eq!(found.len(), expected.len(), "{kind}: rows");
        assert_eq!(found, expected, "{kind}");
        let unmatched = found.iter().filter(|(_, l, r)| l.is_none() || r.is_none()).count();
        assert_eq!(unmatched > 0, kind != "JOIN", "{kind}: unmatched rows only where kept");
    }
}

#[test]
fn a_join_restored_from_its_snapshot_emits_what_an_uninterrupted_one_does() {
    let events = events();
    let statement = statement("FULL OUTER JOIN");
    let (whole, late) = run(&statement, &events, None);
    for restart_at in [1, 137, 300, 599] {
        assert_eq!(
            run(&statement, &events, Some(restart_at)),
            (whole.clone(), late),
            "restart at {restart_at}"
        );
    }
}

#[test]
fn a_symmetric_within_and_the_default_grace_hold_every_record_to_the_end() {
    let events = events();
    let statement = "SELECT a.amount, p.paid FROM attempts a LEFT JOIN payments p WITHIN 2 SECONDS ON p.card = a.card";
    let (found, late) = run(statement, &events, None);
    let (expected, _) = reference(&events, 2_000, 2_000, 24 * 3_600_000, [true, false]);
    assert_eq!((found, late), (expected, 0), "a day's grace: nothing is late");
}

#[test]
fn a_join_of_two_streams_plans_three_stages_and_explains_them() {
    let plan = plan(&statement("LEFT JOIN")).expect("plans");
    assert_eq!(
        plan.sources().map(|s| s.topic.as_str()).collect::<Vec<_>>(),
        ["attempts", "payments"]
    );
    assert_eq!(plan.sink.key, [0], "keyed by the join key, as ksqlDB keys a join");
    let explained = plan.explain("Q");
    assert!(
        explained.contains("Left JOIN STREAM PAYMENTS (CARD STRING, PAID BIGINT, AT_MS BIGINT, ROWTIME) from payments (stage 1) WITHIN 3000 ms before, 5000 ms after, GRACE 10000 ms ON CARD = PAYMENTS.CARD"),
        "{explained}"
    );
    assert!(explained.contains("stage 2 starts"), "{explained}");
    let everything =
        super::stream_join::plan("SELECT * FROM attempts a JOIN payments p WITHIN 1 SECOND ON a.card = p.card")
            .expect("plans");
    let names: Vec<&str> = everything.sink.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["A_CARD", "A_AMOUNT", "A_AT_MS", "A_NOTE", "A_META", "P_CARD", "P_PAID", "P_AT_MS"],
        "both sides' columns, named as ksqlDB names them"
    );
}

#[test]
fn refused_stream_joins_name_the_problem() {
    for (statement, expected) in [
        ("SELECT * FROM attempts a JOIN payments p ON a.card = p.card", "needs WITHIN"),
        (
            "SELECT * FROM attempts a JOIN cards c WITHIN 1 SECOND ON a.card = c.card",
            "WITHIN belongs to a join of two streams",
        ),
        (
            "SELECT * FROM attempts a JOIN payments p WITHIN 1 SECOND ON a.amount = p.card",
            "a join on values of different types",
        ),
        (
            "SELECT * FROM attempts a JOIN payments p WITHIN 1 SECOND ON a.card = p.card JOIN cards c ON a.card = c.card",
            "is the only join of its query",
        ),
        (
            "SELECT * FROM attempts a FULL OUTER JOIN cards c ON a.card = c.card",
            "not FULL OUTER JOIN",
        ),
        (
            "SELECT * FROM attempts a JOIN payments p WITHIN 1 SECOND ON a.card = a.note",
            "compares an expression of one stream with one of the other",
        ),
        (
            "SELECT * FROM attempts a JOIN payments p WITHIN 1 FORTNIGHT ON a.card = p.card",
            "a unit",
        ),
        (
            "SELECT * FROM attempts a JOIN payments p WITHIN (1 SECOND) ON a.card = p.card",
            "WITHIN (before unit, after unit)",
        ),
        (
            "SELECT * FROM attempts a JOIN payments p WITHIN 1 SECOND GRACE 2 SECONDS ON a.card = p.card",
            "PERIOD after GRACE",
        ),
        (
            "SELECT rowtime FROM attempts a JOIN payments p WITHIN 1 SECOND ON a.card = p.card",
            "column ROWTIME is ambiguous",
        ),
    ] {
        let refused = plan(statement).expect_err(statement);
        assert!(refused.contains(expected), "{statement}: {refused}");
    }
}

#[test]
fn a_join_stage_holds_a_bounded_number_of_records_and_refuses_a_foreign_snapshot() {
    let plan = plan(&statement("JOIN")).expect("plans");
    let def = compile("q", &plan).expect("compiles");
    let mut join = (def.window_stage.as_ref().expect("join"))();
    let refused = join.restore(b"\x07garbage").expect_err("not a join state");
    assert!(refused.to_string().contains("join state"), "{refused}");
    let refused = join.read(None, 10).expect_err("no table");
    assert!(refused.to_string().contains("stream–stream join"), "{refused}");
    let (mut staged, mut out) = (Emitted::default(), Emitted::default());
    let (_, left) = def.source_of(0).expect("left");
    let mut held = 0;
    let outcome = loop {
        staged.clear();
        let record = json!({"card": "c1", "amount": held, "at_ms": 5_000, "note": "n", "meta": {}});
        left.process(record.to_string().as_bytes(), 0, &mut staged)
            .expect("decodes");
        let r = staged.iter().next().expect("one record");
        match join.add(r.key.expect("key"), r.value.expect("value"), r.timestamp_ms, &mut out) {
            Ok(()) => held += 1,
            Err(e) => break e,
        }
        assert!(held <= runnel_dataflow::join::JOIN_HELD_RECORDS_MAX, "bounded");
    };
    assert_eq!(held, runnel_dataflow::join::JOIN_HELD_RECORDS_MAX);
    assert!(outcome.to_string().contains("shorten the join's WITHIN"), "{outcome}");
    // A right record within the window of more than 10,000 left ones pairs
    // with too many: refused before it emits anything.
    let mut join = (def.window_stage.as_ref().expect("join"))();
    let fan_out = runnel_dataflow::join::JOIN_PAIRS_PER_RECORD_MAX + 1;
    for amount in 0..fan_out {
        staged.clear();
        let record = json!({"card": "c1", "amount": amount, "at_ms": 5_000, "note": "n", "meta": {}});
        left.process(record.to_string().as_bytes(), 0, &mut staged)
            .expect("decodes");
        let r = staged.iter().next().expect("one record");
        join.add(r.key.expect("key"), r.value.expect("value"), r.timestamp_ms, &mut out)
            .expect("held");
    }
    let (_, right) = def.source_of(1).expect("right");
    let (mut staged, mut out) = (Emitted::default(), Emitted::default());
    let record = json!({"card": "c1", "paid": 1, "at_ms": 5_000});
    right
        .process(record.to_string().as_bytes(), 0, &mut staged)
        .expect("decodes");
    let r = staged.iter().next().expect("one record");
    let refused = join
        .add(r.key.expect("key"), r.value.expect("value"), r.timestamp_ms, &mut out)
        .expect_err("fan-out past the bound");
    assert!(
        refused.to_string().contains(&format!("pairs with {fan_out} records")),
        "{refused}"
    );
    assert!(out.is_empty(), "nothing emitted before the refusal");
}

/// A left join's rows (pairs, and attempts without a payment once let go)
/// counted per card in one-minute windows, EMIT FINAL with no grace: four
/// stages, the aggregate's watermark the join's output watermark, so a
/// watermark that ran ahead of what the join still emits would drop rows.
#[test]
fn an_aggregate_over_a_join_of_two_streams_counts_every_row_once_per_window() {
    let statement = "SELECT a.card, COUNT(*) AS pairs FROM attempts a LEFT JOIN payments p \
        WITHIN (3 SECONDS, 5 SECONDS) GRACE PERIOD 10 SECONDS ON a.card = p.card \
        WINDOW TUMBLING (SIZE 60 SECONDS, GRACE PERIOD 0 SECONDS) GROUP BY a.card EMIT FINAL";
    let plan = plan(statement).expect("plans");
    assert_eq!(plan.stages(), 4);
    let def = compile("q", &plan).expect("compiles");
    assert_eq!((def.stages(), def.next_stages.len()), (4, 1));
    let mut join = (def.window_stage.as_ref().expect("join"))();
    let mut count = (def.next_stages[0])();
    let (mut joined, mut out) = (Emitted::default(), Emitted::default());
    let mut watermark_ms = i64::MIN;
    let events = events();
    for event in &events {
        joined.clear();
        feed(&def, join.as_mut(), event, &mut watermark_ms, &mut joined);
        for r in joined.iter() {
            count
                .add(
                    r.key.expect("grouped"),
                    r.value.unwrap_or_default(),
                    r.timestamp_ms,
                    &mut out,
                )
                .expect("counts");
        }
        count
            .advance(join.output_watermark_ms(), &mut out)
            .expect("closes windows");
    }
    assert!(
        out.len() > 3,
        "windows close as the join's output watermark moves: {}",
        out.len()
    );
    joined.clear();
    join.advance(i64::MAX, &mut joined).expect("lets every record go");
    for r in joined.iter() {
        count
            .add(
                r.key.expect("grouped"),
                r.value.unwrap_or_default(),
                r.timestamp_ms,
                &mut out,
            )
            .expect("counts");
    }
    count.advance(i64::MAX, &mut out).expect("closes every window");
    assert_eq!(
        count.late_records(),
        0,
        "nothing the join emits is late for the aggregate"
    );
    let mut found: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for r in out.iter() {
        let key: Value = serde_json::from_slice(r.key.expect("key")).expect("JSON");
        let value: Value = serde_json::from_slice(r.value.expect("value")).expect("JSON");
        let window = (
            key["CARD"].as_str().unwrap_or("NULL").to_string(),
            key["WINDOWSTART"].as_i64().expect("start"),
        );
        assert!(
            found.insert(window, value["PAIRS"].as_i64().expect("count")).is_none(),
            "one final row per window"
        );
    }
    let (rows, _) = reference(&events, 3_000, 5_000, 10_000, [true, false]);
    // The count groups by a.card: attempts without a card form a NULL group.
    let card_of: BTreeMap<i64, String> = events
        .iter()
        .filter_map(|e| Some((e.id, format!("c{}", e.card?))))
        .collect();
    let mut expected: BTreeMap<(String, i64), i64> = BTreeMap::new();
    let mut unmatched = 0;
    for (t_ms, left, right) in rows {
        let card = card_of
            .get(&left.expect("a left join's row"))
            .map_or("NULL", String::as_str);
        unmatched += usize::from(right.is_none());
        *expected
            .entry((card.to_string(), t_ms - t_ms.rem_euclid(60_000)))
            .or_default() += 1;
    }
    assert!(unmatched > 10, "attempts without a payment are counted too");
    assert_eq!(found, expected);
    let ungrouped = super::stream_join::plan(
        "SELECT COUNT(*) AS n FROM attempts a JOIN payments p WITHIN 1 SECOND ON a.amount = p.paid GROUP BY a.card",
    )
    .expect("plans");
    assert!(
        ungrouped.sink.key.is_empty(),
        "not keyed by a join column's number: {:?}",
        ungrouped.sink.key
    );
}
