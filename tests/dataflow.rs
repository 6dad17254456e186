//! The fraud dataflow on real `runnel node` processes: its sink must equal a
//! reference computed directly from the input topic, with every (card,
//! window) result exactly once — also when a node running tasks is killed
//! with SIGKILL mid-stream.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use runnel::client::{Acks, Client, Producer};
use runnel::dataflow::fraud::{self, Attempt, FraudKey, Generator};
use runnel::storage::Record;

const TIMEOUT: Duration = Duration::from_secs(60);
/// How long the dataflow may take to produce every result.
const RESULTS_TIMEOUT: Duration = Duration::from_secs(600);
const PARTITIONS: u32 = 3;
/// 2026-01-01T00:00:00Z.
const START_MS: i64 = 1_767_225_600_000;

struct Cluster {
    _scratch: tempfile::TempDir,
    certs: std::path::PathBuf,
    addrs: Vec<SocketAddr>,
    nodes: Vec<NodeProcess>,
}

/// Tasks move off a dead node at once.
const NODE_ENV: [(&str, &str); 1] = [("RUNNEL_REPLACE_AFTER", "0")];

fn start(first_host: u8) -> Cluster {
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    certs_init(&certs, 3);
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|i| free_addr_on_host(first_host + i).expect("a free loopback address"))
        .collect();
    let nodes = (0..3)
        .map(|i| start_node_with(i as u32 + 1, addrs[i], &addrs, &certs, scratch.path(), &NODE_ENV))
        .collect();
    Cluster {
        _scratch: scratch,
        certs,
        addrs,
        nodes,
    }
}

fn cli(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    let seeds: Vec<String> = cluster.addrs.iter().map(SocketAddr::to_string).collect();
    runnel()
        .args(args)
        .args(["--seeds", &seeds.join(",")])
        .arg("--certs")
        .arg(&cluster.certs)
        .output()
        .expect("run runnel")
}

fn create_source(cluster: &Cluster) {
    wait_for("the source topic to be created", TIMEOUT, || {
        cli(
            cluster,
            &[
                "topic",
                "create",
                fraud::SOURCE,
                "--partitions",
                &PARTITIONS.to_string(),
                "--replication",
                "3",
            ],
        )
        .status
        .success()
    });
}

fn start_dataflow(cluster: &Cluster) {
    let output = cli(cluster, &["dataflow", "start", fraud::NAME]);
    assert!(
        output.status.success(),
        "dataflow start: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn describe(cluster: &Cluster) -> Vec<serde_json::Value> {
    let output = cli(cluster, &["dataflow", "describe", fraud::NAME, "--json"]);
    serde_json::from_slice::<serde_json::Value>(&output.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

async fn connect(addrs: &[SocketAddr], certs: &Path) -> Arc<Client> {
    Arc::new(Client::connect(addrs.to_vec(), certs).await.expect("connect"))
}

/// Sends attempts keyed by card (acks=all); a send that fails is retried
/// with a fresh producer (the reference is read back from the topic, so a
/// retried record that landed twice is part of the input either way).
async fn produce(client: &Arc<Client>, attempts: impl Iterator<Item = Attempt>) {
    produce_to(client, fraud::SOURCE, attempts.map(|a| fraud::record(&a))).await
}

/// Sends `records` to `topic` as [`produce`] sends attempts.
async fn produce_to(client: &Arc<Client>, topic: &str, records: impl Iterator<Item = Record>) {
    let mut producer = Producer::new(client.clone(), topic, Acks::All).await.expect("producer");
    for record in records {
        let deadline = Instant::now() + TIMEOUT;
        while let Err(e) = producer.send(None, record.clone()).await {
            assert!(Instant::now() < deadline, "produce kept failing: {e}");
            producer = Producer::new(client.clone(), topic, Acks::All).await.expect("producer");
        }
    }
    let deadline = Instant::now() + TIMEOUT;
    while let Err(e) = producer.flush().await {
        assert!(Instant::now() < deadline, "flush kept failing: {e}");
    }
}

/// One attempt per partition far in the future: it closes every window.
async fn close_windows(client: &Arc<Client>, generator: &Generator) {
    let closing = generator.closing_attempt();
    let mut producer = Producer::new(client.clone(), fraud::SOURCE, Acks::All)
        .await
        .expect("producer");
    for partition in 0..PARTITIONS {
        producer
            .send(Some(partition), fraud::record(&closing))
            .await
            .expect("closing attempt");
    }
    producer.flush().await.expect("flush");
}

/// Every record of every partition of `topic`, read to the committed end.
async fn read_all(client: &Arc<Client>, topic: &str) -> Vec<Record> {
    fraud::read_topic(client, topic).await.expect("read the topic")
}

/// The reference over what the source topic holds.
async fn reference(client: &Arc<Client>) -> BTreeMap<(String, i64), u64> {
    let records = read_all(client, fraud::SOURCE).await;
    // Records that are not attempts are the dead-letter test's input.
    let attempts: Vec<Attempt> = records
        .iter()
        .filter_map(|r| serde_json::from_slice(r.value.as_deref()?).ok())
        .collect();
    fraud::reference(&attempts)
}

/// The SQL query's state over what the source topic holds: every window
/// above the threshold, closed or not (its 24-hour grace keeps them all).
async fn open_reference(client: &Arc<Client>) -> BTreeMap<(String, i64), u64> {
    let records = read_all(client, fraud::SOURCE).await;
    let attempts: Vec<Attempt> = records
        .iter()
        .filter_map(|r| serde_json::from_slice(r.value.as_deref()?).ok())
        .collect();
    fraud::open_reference(&attempts)
}

/// The sink's results, and how many (card, window) keys came more than once.
async fn results(client: &Arc<Client>) -> (BTreeMap<(String, i64), u64>, usize) {
    let mut results = BTreeMap::new();
    let mut duplicates = 0;
    for record in read_all(client, fraud::SINK).await {
        let key: FraudKey = serde_json::from_slice(record.key.as_deref().expect("key")).expect("sink key");
        assert_eq!(key.window_end_ms - key.window_start_ms, fraud::WINDOW_MS);
        let count: u64 = serde_json::from_slice(record.value.as_deref().expect("value")).expect("count");
        if results.insert((key.key, key.window_start_ms), count).is_some() {
            duplicates += 1;
        }
    }
    (results, duplicates)
}

/// Polls the sink until it holds as many results as the reference (or the
/// time is up), then checks it equals the reference exactly.
async fn expect_reference(client: &Arc<Client>, cluster: &Cluster, expected: &BTreeMap<(String, i64), u64>) {
    let started = Instant::now();
    let (found, duplicates) = loop {
        let (found, duplicates) = results(client).await;
        if found.len() + duplicates >= expected.len() || started.elapsed() > RESULTS_TIMEOUT {
            break (found, duplicates);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let missing = expected.keys().filter(|k| !found.contains_key(*k)).count();
    let wrong = expected
        .iter()
        .filter(|(k, v)| found.get(*k).is_some_and(|f| f != *v))
        .count();
    let extra = found.keys().filter(|k| !expected.contains_key(*k)).count();
    assert!(
        found == *expected && duplicates == 0,
        "sink differs from the reference after {:?}: {} expected, {} found, {missing} missing, {wrong} wrong, \
         {extra} extra, {duplicates} duplicated; tasks: {:#?}",
        started.elapsed(),
        expected.len(),
        found.len(),
        describe(cluster)
    );
    tracing::info!(results = found.len(), took = ?started.elapsed(), "sink equals the reference");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fraud_dataflow_over_a_million_attempts_equals_the_reference() {
    let attempts: usize = std::env::var("RUNNEL_FRAUD_ATTEMPTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let cluster = start(170);
    create_source(&cluster);
    let client = connect(&cluster.addrs, &cluster.certs).await;
    // 20,000 cards, an attempt every 3 ms of event time: ~50 minutes of
    // windows, a few hundred fraud results per window from the hot cards.
    let mut generator = Generator::new(1, 20_000, START_MS, 3);
    let started = Instant::now();
    produce(&client, generator.by_ref().take(attempts)).await;
    // Bad input: values that do not decode as an attempt.
    let mut producer = Producer::new(client.clone(), fraud::SOURCE, Acks::All)
        .await
        .expect("producer");
    for (i, garbage) in ["not json", "{\"card_number\": 7}", "\u{0}\u{1}"].iter().enumerate() {
        let record = Record {
            timestamp_ms: START_MS,
            key: None,
            value: Some(Bytes::from(garbage.to_string())),
            headers: Vec::new(),
        };
        producer
            .send(Some(i as u32 % PARTITIONS), record)
            .await
            .expect("garbage");
    }
    producer.flush().await.expect("flush");
    close_windows(&client, &generator).await;
    eprintln!("produced {attempts} attempts in {:?}", started.elapsed());
    start_dataflow(&cluster);
    let expected = reference(&client).await;
    assert!(expected.len() > 100, "the generator makes fraud: {}", expected.len());
    expect_reference(&client, &cluster, &expected).await;
    eprintln!("dataflow done {:?} after start", started.elapsed());
    let tasks = describe(&cluster);
    assert_eq!(tasks.len(), 2 * PARTITIONS as usize, "{tasks:#?}");
    let read: u64 = tasks
        .iter()
        .filter(|t| t["stage"] == 0)
        .map(|t| t["records_in"].as_u64().unwrap_or_default())
        .sum();
    assert_eq!(read, attempts as u64 + u64::from(PARTITIONS) + 3, "{tasks:#?}");
    let dead: u64 = tasks
        .iter()
        .map(|t| t["dead_letters"].as_u64().unwrap_or_default())
        .sum();
    assert_eq!(dead, 3, "undecodable records are counted: {tasks:#?}");
    let letters = read_all(&client, &format!("{}.dlq", fraud::NAME)).await;
    assert_eq!(letters.len(), 3);
    for letter in &letters {
        let error = letter.headers.iter().find(|h| h.key == "error").expect("error header");
        let text = String::from_utf8_lossy(error.value.as_deref().unwrap_or_default()).to_string();
        assert!(text.contains("does not decode as"), "{text}");
    }
    let late: u64 = tasks
        .iter()
        .map(|t| t["late_records"].as_u64().unwrap_or_default())
        .sum();
    assert_eq!(late, 0, "the generator stays within the grace period");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_running_tasks_mid_stream_keeps_the_results_exact() {
    let attempts: usize = std::env::var("RUNNEL_FRAUD_KILL_ATTEMPTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let mut cluster = start(175);
    create_source(&cluster);
    let client = connect(&cluster.addrs, &cluster.certs).await;
    start_dataflow(&cluster);
    let mut generator = Generator::new(2, 5_000, START_MS, 10);
    produce(&client, generator.by_ref().take(attempts / 2)).await;
    // Mid-stream: once node 3's tasks have checkpointed progress, kill it.
    let victim = 3u64;
    wait_for("node 3's tasks to checkpoint", RESULTS_TIMEOUT, || {
        let tasks = describe(&cluster);
        let on_victim: Vec<&serde_json::Value> = tasks.iter().filter(|t| t["node"] == victim).collect();
        !on_victim.is_empty() && on_victim.iter().all(|t| t["checkpoints"].as_u64().unwrap_or(0) > 0)
    });
    let killed_at = describe(&cluster);
    cluster.nodes[2].kill();
    tracing::info!("node 3 killed");
    let survivors = connect(&cluster.addrs[..2], &cluster.certs).await;
    produce(&survivors, generator.by_ref().take(attempts - attempts / 2)).await;
    close_windows(&survivors, &generator).await;
    let expected = reference(&survivors).await;
    assert!(expected.len() > 50, "the generator makes fraud: {}", expected.len());
    expect_reference(&survivors, &cluster, &expected).await;
    let tasks = describe(&cluster);
    assert!(
        tasks.iter().all(|t| t["node"] != victim),
        "tasks moved off the dead node: {tasks:#?} (before the kill: {killed_at:#?})"
    );

    // Node 3 returns: while records flow, tasks move back until each node
    // runs two of the six (checked exact below, after the stop and start).
    cluster.nodes[2] = start_node_with(
        3,
        cluster.addrs[2],
        &cluster.addrs,
        &cluster.certs,
        cluster._scratch.path(),
        &NODE_ENV,
    );
    let after_closing = generator.closing_attempt().at_ms + fraud::WINDOW_MS;
    let mut later = Generator::new(3, 5_000, after_closing, 10);
    produce(&survivors, later.by_ref().take(10_000)).await;
    let took = wait_for("tasks to spread over the three nodes again", TIMEOUT, || {
        let tasks = describe(&cluster);
        let mut per_node = BTreeMap::new();
        for task in &tasks {
            *per_node.entry(task["node"].as_u64().unwrap_or(0)).or_insert(0) += 1;
        }
        tasks.len() == 6 && per_node.len() == 3 && per_node.values().all(|&n| n == 2)
    });
    tracing::info!(?took, "tasks spread again after node 3 returned");

    // Stop, produce more, start again: the tasks resume from their
    // checkpoints and the results stay exact (none repeated).
    let output = cli(&cluster, &["dataflow", "stop", fraud::NAME]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    wait_for("the dataflow to be gone from the list", TIMEOUT, || {
        let output = cli(&cluster, &["dataflow", "list", "--json"]);
        output.status.success()
            && serde_json::from_slice::<serde_json::Value>(&output.stdout).is_ok_and(|v| v == serde_json::json!([]))
    });
    produce(&survivors, later.by_ref().take(10_000)).await;
    close_windows(&survivors, &later).await;
    start_dataflow(&cluster);
    let expected = reference(&survivors).await;
    expect_reference(&survivors, &cluster, &expected).await;
    drop(cluster);
}

/// The seed's statement, verbatim, as a user types it.
const SEED_STATEMENT: &str = "CREATE STREAM possible_fraud AS
  SELECT card_number, count(*) FROM authorization_attempts
  WINDOW TUMBLING (SIZE 5 MINUTE)
  GROUP BY card_number HAVING count(*) > 3;";
const SQL_QUERY: &str = "CSAS_POSSIBLE_FRAUD_0";
const SQL_SINK: &str = "POSSIBLE_FRAUD";

fn sql(cluster: &Cluster, statements: &str) -> std::process::Output {
    cli(cluster, &["sql", "-e", statements])
}

/// The SQL sink's changes per (card, window), in the order they came.
async fn sql_changes(client: &Arc<Client>) -> BTreeMap<(String, i64), Vec<u64>> {
    let mut changes: BTreeMap<(String, i64), Vec<u64>> = BTreeMap::new();
    for record in read_all(client, SQL_SINK).await {
        let key: serde_json::Value = serde_json::from_slice(record.key.as_deref().expect("key")).expect("JSON key");
        let value: serde_json::Value =
            serde_json::from_slice(record.value.as_deref().expect("value")).expect("JSON value");
        assert_eq!(
            key["WINDOWEND"]
                .as_i64()
                .zip(key["WINDOWSTART"].as_i64())
                .map(|(e, s)| e - s),
            Some(fraud::WINDOW_MS)
        );
        assert_eq!(key["CARD_NUMBER"], value["CARD_NUMBER"]);
        let card = value["CARD_NUMBER"].as_str().expect("card").to_string();
        let start = key["WINDOWSTART"].as_i64().expect("window start");
        changes
            .entry((card, start))
            .or_default()
            .push(value["KSQL_COL_0"].as_u64().expect("count"));
    }
    changes
}

/// ksqlDB's `EMIT CHANGES` under exactly-once: each (card, window) got the
/// counts above the threshold one by one, each once, up to the final count.
fn final_counts(changes: &BTreeMap<(String, i64), Vec<u64>>) -> BTreeMap<(String, i64), u64> {
    for (key, counts) in changes {
        let expected: Vec<u64> = (fraud::THRESHOLD + 1..=*counts.last().expect("one")).collect();
        assert_eq!(counts, &expected, "changes of {key:?}: none lost, none repeated");
    }
    changes
        .iter()
        .map(|(k, v)| (k.clone(), *v.last().expect("one")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_statement_typed_on_three_nodes_equals_the_builder_dataflow_through_a_kill() {
    let mut cluster = start(200);
    let declare = "CREATE STREAM authorization_attempts (card_number STRING, amount_cents BIGINT, at_ms BIGINT) \
        WITH (KAFKA_TOPIC='authorization_attempts', VALUE_FORMAT='JSON', PARTITIONS=3, REPLICAS=3);";
    wait_for("the stream to be declared", TIMEOUT, || {
        sql(&cluster, declare).status.success()
    });

    expect_refused_statements(&cluster);
    expect_the_shell(&cluster);
    submit_the_seed_statement(&cluster);
    let generator = run_through_a_kill(&mut cluster).await;
    tracing::info!("phase: restart the whole cluster; the query is the cluster's and carries on");
    restart_the_whole_cluster(&mut cluster, &generator).await;
    type_rows_then_terminate_and_drop(&cluster);
    drop(cluster);
}

/// Refused statements name the problem and change nothing.
fn expect_refused_statements(cluster: &Cluster) {
    for (statement, error) in [
        ("SELECT * FROM nowhere EMIT CHANGES;", "unknown stream or table NOWHERE"),
        (
            "CREATE STREAM s AS SELECT card_number, SUM(card_number) FROM authorization_attempts GROUP BY card_number;",
            "takes a number",
        ),
        (
            "CREATE STREAM s AS SELECT card_number FROM authorization_attempts WINDOW TUMBLING (SIZE 5 MINUTE);",
            "WINDOW needs a GROUP BY",
        ),
        ("SELECT card_number FROM\n  authorization_attempts WHERE = 3;", "line 2"),
        (
            "SELECT * FROM authorization_attempts WHERE card_number = 'card-1';",
            "AUTHORIZATION_ATTEMPTS holds no state to look up",
        ),
    ] {
        let output = sql(cluster, statement);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(error),
            "{statement}: {stderr}"
        );
    }
}

/// The shell, fed by a pipe: a statement over two lines, ended by ';'.
fn expect_the_shell(cluster: &Cluster) {
    let seeds: Vec<String> = cluster.addrs.iter().map(SocketAddr::to_string).collect();
    let mut shell = runnel()
        .args(["sql", "--seeds", &seeds.join(","), "--certs"])
        .arg(&cluster.certs)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run runnel sql");
    {
        use std::io::Write;
        let mut stdin = shell.stdin.take().expect("stdin");
        stdin
            .write_all(b"SHOW\n  STREAMS;\nDESCRIBE nowhere;\n")
            .expect("write statements");
    }
    let output = shell
        .wait_with_output()
        .expect("the shell ends at the end of its input");
    let (shown, errors) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success() && shown.contains("AUTHORIZATION_ATTEMPTS"),
        "{shown}\n{errors}"
    );
    assert!(
        errors.contains("unknown stream or table NOWHERE"),
        "the shell reports and goes on: {errors}"
    );
    let output = sql(cluster, "SHOW STREAMS;");
    let listed = String::from_utf8_lossy(&output.stdout);
    assert!(
        listed.contains("AUTHORIZATION_ATTEMPTS") && listed.contains("(1 row)"),
        "{listed}"
    );
}

/// The seed's statement, verbatim, and a pull query it refuses by name.
fn submit_the_seed_statement(cluster: &Cluster) {
    let output = sql(cluster, SEED_STATEMENT);
    assert!(
        output.status.success(),
        "the seed statement: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = sql(cluster, "SELECT * FROM possible_fraud WHERE KSQL_COL_0 > 3;");
    let refused = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && refused.contains("looks rows up by its key CARD_NUMBER"),
        "a pull query on a column without an index: {refused}"
    );
}

/// Starts the builder dataflow too, feeds both, kills node 3 mid-stream;
/// both sinks and pull queries equal the reference. The generator, to go on.
async fn run_through_a_kill(cluster: &mut Cluster) -> Generator {
    start_dataflow(cluster);
    let client = connect(&cluster.addrs, &cluster.certs).await;
    let mut generator = Generator::new(4, 2_000, START_MS, 10);
    produce(&client, generator.by_ref().take(20_000)).await;
    tracing::info!("phase: pull queries answer from the tasks' state");
    expect_pulled(cluster, &open_reference(&client).await);
    // A record that does not match the declared schema (amount_cents is a BIGINT).
    let mut producer = Producer::new(client.clone(), fraud::SOURCE, Acks::All)
        .await
        .expect("producer");
    let mismatch = br#"{"card_number":"card-x","amount_cents":"a lot","at_ms":1767225600000}"#;
    let record = Record {
        timestamp_ms: START_MS,
        key: Some(Bytes::from_static(b"card-x")),
        value: Some(Bytes::from_static(mismatch)),
        headers: Vec::new(),
    };
    producer.send(Some(0), record).await.expect("mismatch");
    producer.flush().await.expect("flush");
    wait_for_checkpoints_on(cluster, SQL_QUERY, 3);
    cluster.nodes[2].kill();
    tracing::info!("node 3 killed");
    let survivors = connect(&cluster.addrs[..2], &cluster.certs).await;
    produce(&survivors, generator.by_ref().take(20_000)).await;
    tracing::info!("phase: pull queries answer from the state restored on the survivors");
    expect_pulled(cluster, &open_reference(&survivors).await);
    close_windows(&survivors, &generator).await;
    let expected = reference(&survivors).await;
    assert!(expected.len() > 20, "the generator makes fraud: {}", expected.len());
    expect_reference(&survivors, cluster, &expected).await;
    expect_sql_results(&survivors, &expected).await;
    expect_explained_and_dead_letters(cluster, &survivors).await;
    generator
}

/// EXPLAIN, `dataflow describe` of both dataflows, and the dead letter.
async fn expect_explained_and_dead_letters(cluster: &Cluster, survivors: &Arc<Client>) {
    let output = sql(
        cluster,
        &format!("EXPLAIN {SQL_QUERY}; DESCRIBE possible_fraud EXTENDED;"),
    );
    let explained = String::from_utf8_lossy(&output.stdout);
    assert!(
        explained.contains("AGGREGATE") && explained.contains("KSQL_COL_0"),
        "{explained}"
    );
    let output = cli(cluster, &["dataflow", "describe", SQL_QUERY]);
    let described = String::from_utf8_lossy(&output.stdout);
    assert!(
        described.contains("REPARTITION BY CARD_NUMBER"),
        "the plan as a tree: {described}"
    );
    // The Rust-builder dataflow runs as a plan of its registered steps.
    let output = cli(cluster, &["dataflow", "describe", fraud::NAME]);
    let described = String::from_utf8_lossy(&output.stdout);
    assert!(
        [
            "RUST KEY_BY",
            "RUST COUNT",
            "RUST HAVING",
            "RUST EMIT Final",
            "registered in the node binary"
        ]
        .iter()
        .all(|step| described.contains(step)),
        "the builder dataflow's steps as a tree: {described}"
    );
    let letters = read_all(survivors, &format!("{SQL_QUERY}.dlq")).await;
    let reasons: Vec<String> = letters
        .iter()
        .filter_map(|l| l.headers.iter().find(|h| h.key == "error"))
        .map(|h| String::from_utf8_lossy(h.value.as_deref().unwrap_or_default()).to_string())
        .collect();
    assert!(
        reasons.len() == 1 && reasons[0].contains("column AMOUNT_CENTS") && reasons[0].contains("BIGINT"),
        "the mismatch is a dead letter with its reason: {reasons:?}"
    );
}

/// Restarts every node; the query carries on over new input.
async fn restart_the_whole_cluster(cluster: &mut Cluster, generator: &Generator) {
    cluster.nodes[0].kill();
    cluster.nodes[1].kill();
    let scratch = cluster._scratch.path().to_path_buf();
    let env = [("RUNNEL_REPLACE_AFTER", "0")];
    for i in 0..3 {
        cluster.nodes[i] = start_node_with(
            i as u32 + 1,
            cluster.addrs[i],
            &cluster.addrs,
            &cluster.certs,
            &scratch,
            &env,
        );
    }
    wait_for("the restarted cluster to serve the source topic", TIMEOUT, || {
        cli(cluster, &["topic", "describe", fraud::SOURCE]).status.success()
    });
    let client = connect(&cluster.addrs, &cluster.certs).await;
    let after_closing = generator.closing_attempt().at_ms + fraud::WINDOW_MS;
    let mut later = Generator::new(5, 2_000, after_closing, 10);
    produce(&client, later.by_ref().take(10_000)).await;
    close_windows(&client, &later).await;
    let expected = reference(&client).await;
    expect_sql_results(&client, &expected).await;
}

/// Rows typed in, a push query, then TERMINATE and DROP.
fn type_rows_then_terminate_and_drop(cluster: &Cluster) {
    let output = sql(
        cluster,
        "INSERT INTO authorization_attempts (card_number, amount_cents, at_ms) VALUES ('typed-1', 5, 0), ('typed-2', 7, 0);
         SET 'auto.offset.reset' = 'earliest';
         SELECT card_number, amount_cents * 2 AS doubled FROM authorization_attempts WHERE card_number LIKE 'typed-%' EMIT CHANGES LIMIT 2;",
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        printed.contains("typed-1 | 10") && printed.contains("typed-2 | 14"),
        "{printed}"
    );
    let output = sql(cluster, "DROP STREAM possible_fraud;");
    let refused = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && refused.contains("TERMINATE them first"),
        "{refused}"
    );
    let output = sql(
        cluster,
        &format!("TERMINATE {SQL_QUERY}; DROP STREAM possible_fraud DELETE TOPIC; SHOW QUERIES;"),
    );
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        shown.contains("(1 row)")
            && shown.contains("Rust dataflow possible_fraud")
            && !shown.lines().any(|line| line.starts_with(SQL_QUERY)),
        "only the builder dataflow runs: {shown}"
    );
    // TERMINATE ALL stops the Rust dataflow too, keeping its checkpoints.
    let output = sql(cluster, "SHOW PROPERTIES; TERMINATE ALL; SHOW QUERIES;");
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        shown.contains("auto.offset.reset")
            && shown.contains("Rust dataflow possible_fraud stopped; its checkpoints stay")
            && shown.contains("(0 rows)"),
        "{shown}"
    );
    let topics = String::from_utf8_lossy(&cli(cluster, &["topic", "list", "--all"]).stdout).to_string();
    assert!(topics.contains("possible_fraud.checkpoints"), "{topics}");
}

/// A pull query's rows (`--format json`) as (key, window start) -> count,
/// from the columns `(key, count)` named, or its error.
fn pull_rows(
    cluster: &Cluster,
    statement: &str,
    (key, count): (&str, &str),
) -> Result<BTreeMap<(String, i64), u64>, String> {
    let output = cli(cluster, &["sql", "--format", "json", "-e", statement]);
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let mut rows = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let row: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
        let field = |name: &str| {
            row[name]
                .as_str()
                .map(str::to_string)
                .ok_or(format!("no {name} in {line}"))
        };
        let start = field("WINDOWSTART")?.parse().map_err(|e| format!("{e}: {line}"))?;
        let n = field(count)?.parse().map_err(|e| format!("{e}: {line}"))?;
        rows.insert((field(key)?, start), n);
    }
    Ok(rows)
}

/// Waits until pull queries answer what `expected` (the reference over
/// the input so far, every window still open) says: by key for a few
/// cards, and by a range scan over every task's state.
fn expect_pulled(cluster: &Cluster, expected: &BTreeMap<(String, i64), u64>) {
    let cards: BTreeSet<&String> = expected.keys().map(|(card, _)| card).take(3).collect();
    assert!(!cards.is_empty(), "the input holds fraud");
    for card in cards {
        let wanted: BTreeMap<(String, i64), u64> = expected
            .iter()
            .filter(|((c, _), _)| c == card)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        wait_pulled(
            cluster,
            &format!("SELECT * FROM possible_fraud WHERE card_number = '{card}';"),
            &wanted,
        );
    }
    wait_pulled(
        cluster,
        "SELECT * FROM possible_fraud WHERE card_number >= '';",
        expected,
    );
}

fn wait_pulled(cluster: &Cluster, statement: &str, wanted: &BTreeMap<(String, i64), u64>) {
    wait_pulled_rows(cluster, statement, ("CARD_NUMBER", "KSQL_COL_0"), wanted)
}

fn wait_pulled_rows(cluster: &Cluster, statement: &str, columns: (&str, &str), wanted: &BTreeMap<(String, i64), u64>) {
    let started = Instant::now();
    loop {
        let pulled = pull_rows(cluster, statement, columns);
        if pulled.as_ref() == Ok(wanted) {
            return;
        }
        assert!(
            started.elapsed() < RESULTS_TIMEOUT,
            "{statement} answered {pulled:?}, not {wanted:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Polls the SQL sink until each (card, window) reached its expected
/// count, then checks it holds exactly the reference.
async fn expect_sql_results(client: &Arc<Client>, expected: &BTreeMap<(String, i64), u64>) {
    let started = Instant::now();
    let found = loop {
        let changes = sql_changes(client).await;
        let done = changes.len() >= expected.len()
            && changes
                .iter()
                .all(|(k, v)| expected.get(k).is_some_and(|n| v.last() == Some(n)));
        if done || started.elapsed() > RESULTS_TIMEOUT {
            break final_counts(&changes);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(&found, expected, "the SQL sink holds exactly the reference's results");
}

/// `dataflow delete`, and the protection of a running dataflow's internal
/// topics: refused while it runs; once stopped and deleted, no internal
/// topic is left behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_dataflow_is_deleted_and_its_topics_are_protected_while_it_runs() {
    let cluster = start(160);
    create_source(&cluster);
    start_dataflow(&cluster);
    let client = connect(&cluster.addrs, &cluster.certs).await;
    let mut generator = Generator::new(7, 50, START_MS, 1_000);
    produce(&client, generator.by_ref().take(600)).await;
    close_windows(&client, &generator).await;
    let expected = reference(&client).await;
    assert!(!expected.is_empty(), "some card went over the threshold");
    expect_reference(&client, &cluster, &expected).await;
    a_reset_writes_every_result_again(&cluster, &client, &expected).await;

    let stderr = |output: std::process::Output| String::from_utf8_lossy(&output.stderr).to_string();
    let refused = stderr(cli(&cluster, &["dataflow", "delete", fraud::NAME]));
    assert!(refused.contains("is running; stop it first"), "{refused}");
    let checkpoints = format!("{}.checkpoints", fraud::NAME);
    let refused = stderr(cli(&cluster, &["topic", "delete", &checkpoints]));
    assert!(
        refused.contains("is used by running dataflows [\"possible_fraud\"]"),
        "{refused}"
    );

    assert!(cli(&cluster, &["dataflow", "stop", fraud::NAME]).status.success());
    let deleted = cli(&cluster, &["dataflow", "delete", fraud::NAME]);
    let printed = String::from_utf8_lossy(&deleted.stdout).to_string();
    assert!(deleted.status.success() && printed.contains(&checkpoints), "{printed}");
    let listed = cli(&cluster, &["topic", "list", "--all"]);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(
        !listed.contains(&checkpoints) && listed.contains(fraud::SOURCE),
        "{listed}"
    );
}

/// `dataflow reset` of the running builder dataflow and of the seed
/// statement's SQL query: each starts over from the beginning of the source
/// and writes its results once more, exactly (the sink keeps the first
/// ones), and the query still writes its stream.
async fn a_reset_writes_every_result_again(
    cluster: &Cluster,
    client: &Arc<Client>,
    expected: &BTreeMap<(String, i64), u64>,
) {
    let declare = "CREATE STREAM authorization_attempts (card_number STRING, amount_cents BIGINT, at_ms BIGINT) \
        WITH (KAFKA_TOPIC='authorization_attempts', VALUE_FORMAT='JSON');";
    let typed = sql(cluster, &format!("{declare} {SEED_STATEMENT}"));
    assert!(typed.status.success(), "{typed:?}");
    let once = wait_for_sql_changes(client, expected, 1).await;

    let reset = cli(cluster, &["dataflow", "reset", fraud::NAME]);
    let printed = String::from_utf8_lossy(&reset.stdout);
    assert!(
        reset.status.success() && printed.contains("possible_fraud.checkpoints"),
        "{printed} {}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let deadline = Instant::now() + RESULTS_TIMEOUT;
    let (found, duplicates) = loop {
        let (found, duplicates) = results(client).await;
        if found.len() + duplicates >= 2 * expected.len() || Instant::now() > deadline {
            break (found, duplicates);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(&found, expected, "the second run's results equal the reference");
    assert_eq!(
        duplicates,
        expected.len(),
        "every result written once more, none a third time"
    );

    let reset = cli(cluster, &["dataflow", "reset", SQL_QUERY]);
    assert!(reset.status.success(), "{reset:?}");
    let twice = wait_for_sql_changes(client, expected, 2).await;
    for (key, counts) in &twice {
        let first = &once[key];
        assert_eq!(
            counts,
            &[first.clone(), first.clone()].concat(),
            "{key:?}: the changes, twice"
        );
    }
    let catalog = client.catalog().await.expect("catalog");
    let object = catalog.objects.iter().find(|o| o.name == SQL_SINK).expect("the stream");
    assert_eq!(
        object.query.as_deref(),
        Some(SQL_QUERY),
        "the restarted query still writes it"
    );
    assert!(sql(cluster, &format!("TERMINATE {SQL_QUERY};")).status.success());
}

/// Polls the SQL sink until each (card, window) of `expected` got its
/// changes `runs` times over; the changes of one run.
async fn wait_for_sql_changes(
    client: &Arc<Client>,
    expected: &BTreeMap<(String, i64), u64>,
    runs: usize,
) -> BTreeMap<(String, i64), Vec<u64>> {
    let deadline = Instant::now() + RESULTS_TIMEOUT;
    let wanted: usize = expected.values().map(|&n| (n - fraud::THRESHOLD) as usize * runs).sum();
    loop {
        let changes = sql_changes(client).await;
        let got: usize = changes.values().map(Vec::len).sum();
        if got >= wanted || Instant::now() > deadline {
            if runs == 1 {
                assert_eq!(
                    &final_counts(&changes),
                    expected,
                    "the query's results equal the reference"
                );
            }
            assert_eq!(got, wanted, "changes of {runs} run(s)");
            return changes;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The cards table of the join test: a country and a limit per card, and
/// no row for every tenth card (an inner join drops their attempts).
fn card_row(card: u64) -> Option<(String, serde_json::Value)> {
    const COUNTRIES: [&str; 5] = ["NL", "DE", "FR", "US", "BR"];
    let number = format!("card-{card:06}");
    let row = serde_json::json!({
        "card_number": number,
        "country": COUNTRIES[(card % 5) as usize],
        "card_limit": 100 * (card % 7 + 1),
    });
    (card % 10 != 9).then_some((number, row))
}

/// The attempts the source topic holds.
async fn source_attempts(client: &Arc<Client>) -> Vec<Attempt> {
    read_all(client, fraud::SOURCE)
        .await
        .iter()
        .filter_map(|record| serde_json::from_slice::<Attempt>(record.value.as_deref()?).ok())
        .collect()
}

/// (country, window start) -> attempts, over what the source topic holds,
/// each attempt joined with its card's row.
async fn per_country_reference(
    client: &Arc<Client>,
    countries: &BTreeMap<String, String>,
) -> BTreeMap<(String, i64), u64> {
    let mut counts = BTreeMap::new();
    for attempt in source_attempts(client).await {
        if let Some(country) = countries.get(&attempt.card_number) {
            let start = attempt.at_ms - attempt.at_ms.rem_euclid(fraud::WINDOW_MS);
            *counts.entry((country.clone(), start)).or_default() += 1;
        }
    }
    counts
}

/// A windowed aggregate's sink: per (key, window), the counts its changes
/// carried, in order (which must be 1, 2, … n: none lost, none repeated).
async fn windowed_changes(
    client: &Arc<Client>,
    topic: &str,
    (key_column, count_column): (&str, &str),
) -> BTreeMap<(String, i64), Vec<u64>> {
    let mut changes: BTreeMap<(String, i64), Vec<u64>> = BTreeMap::new();
    for record in read_all(client, topic).await {
        let key: serde_json::Value = serde_json::from_slice(record.key.as_deref().expect("key")).expect("JSON key");
        let value: serde_json::Value = serde_json::from_slice(record.value.as_deref().expect("value")).expect("JSON");
        let name = key[key_column].as_str().expect("key column").to_string();
        let start = key["WINDOWSTART"].as_i64().expect("window start");
        changes
            .entry((name, start))
            .or_default()
            .push(value[count_column].as_u64().expect("count"));
    }
    changes
}

/// Polls `topic` until each (key, window) reached its expected count, then
/// checks every change came once and the counts are exact.
async fn expect_changes_once(
    client: &Arc<Client>,
    topic: &str,
    columns: (&str, &str),
    expected: &BTreeMap<(String, i64), u64>,
) {
    let started = Instant::now();
    let changes = loop {
        let changes = windowed_changes(client, topic, columns).await;
        let done = changes.len() >= expected.len()
            && changes
                .iter()
                .all(|(k, v)| expected.get(k).is_some_and(|n| v.last() == Some(n)));
        if done || started.elapsed() > RESULTS_TIMEOUT {
            break changes;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for (key, counts) in &changes {
        let once: Vec<u64> = (1..=counts.len() as u64).collect();
        assert_eq!(counts, &once, "{topic}: changes of {key:?}: none lost, none repeated");
    }
    let found: BTreeMap<(String, i64), u64> = changes.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect();
    assert_eq!(&found, expected, "{topic} holds exactly the reference's counts");
}

/// The issue's join process test: attempts enriched with a cards table,
/// counted per country in 5-minute windows, a node killed mid-stream; the
/// sink equals the reference exactly once, and pull queries answer the
/// right counts before and after the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_joined_with_a_table_counts_per_country_exactly_once_through_a_kill() {
    let mut cluster = start(140);
    let client = connect(&cluster.addrs, &cluster.certs).await;
    let cards = 500;
    let dated = declare_and_load_cards(&cluster, &client, cards).await;
    // Rows for two cards that had none, dated 100 days on: the join of the
    // latest rows counts their attempts, the join by event time does not.
    let countries = add_future_rows(&client, &dated, &["card-000019", "card-000029"]).await;
    let output = sql(
        &cluster,
        "CREATE TABLE per_country AS SELECT c.country, COUNT(*) AS attempts \
         FROM authorization_attempts a JOIN cards c ON a.card_number = c.card_number \
         WINDOW TUMBLING (SIZE 5 MINUTES) GROUP BY c.country EMIT CHANGES;
         CREATE STREAM dated_countries AS SELECT a.card_number, a.at_ms, c.country \
         FROM authorization_attempts a JOIN cards FOR SYSTEM_TIME AS OF a.at_ms HISTORY 365 DAYS c \
         ON a.card_number = c.card_number;
         CREATE TABLE cards_per_country AS SELECT country, COUNT(*) AS cards, SUM(card_limit) AS limits \
         FROM cards GROUP BY country;",
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = sql(&cluster, "EXPLAIN CTAS_PER_COUNTRY_0; DROP TABLE cards;");
    let (explained, refused) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        explained.contains("Inner JOIN TABLE CARDS"),
        "EXPLAIN printed {explained:?}, and on stderr {refused:?}"
    );
    assert!(
        refused.contains("TERMINATE them first"),
        "a joined table is not dropped: {refused}"
    );

    let mut generator = Generator::new(6, cards, START_MS, 20);
    produce(&client, generator.by_ref().take(10_000)).await;
    let expected = per_country_reference(&client, &countries).await;
    expect_pulled_countries(&cluster, &expected);
    wait_for_checkpoints_on(&cluster, "CTAS_PER_COUNTRY_0", 3);
    wait_for_checkpoints_on(&cluster, "CTAS_CARDS_PER_COUNTRY_0", 3);
    cluster.nodes[2].kill();
    tracing::info!("node 3 killed");
    let survivors = connect(&cluster.addrs[..2], &cluster.certs).await;
    produce(&survivors, generator.by_ref().take(10_000)).await;
    let expected = per_country_reference(&survivors, &countries).await;
    let joined: u64 = expected.values().sum();
    assert!(
        joined > 15_000 && expected.len() >= 5,
        "most of the 20,000 attempts join: {joined} in {expected:?}"
    );
    expect_pulled_countries(&cluster, &expected);
    expect_changes_once(&survivors, "PER_COUNTRY", ("COUNTRY", "ATTEMPTS"), &expected).await;
    expect_dated_countries(&survivors, &dated).await;

    // A push query over the join, from the earliest attempt.
    let output = sql(
        &cluster,
        "SET 'auto.offset.reset' = 'earliest';
         SELECT a.card_number, c.country FROM authorization_attempts a LEFT JOIN cards c
           ON a.card_number = c.card_number WHERE a.card_number = 'card-000009' EMIT CHANGES LIMIT 1;",
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        printed.contains("card-000009 | null"),
        "card 9 has no row: a left join keeps it with NULLs: {printed}"
    );
    move_and_delete_cards(&survivors).await;
    expect_cards_per_country(&cluster, &survivors).await;
    // A push query aggregating the table, in the client: its first change
    // for XX counts the first row that comes to XX.
    let output = sql(
        &cluster,
        "SET 'auto.offset.reset' = 'earliest';
         SELECT country, COUNT(*) AS cards FROM cards WHERE country = 'XX' GROUP BY country EMIT CHANGES LIMIT 1;",
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(printed.contains("XX | 1"), "{printed}");
    drop(cluster);
}

/// Moves every fourth of the first 60 cards to another country and a
/// higher limit, and deletes every fourth (some never had a row).
async fn move_and_delete_cards(client: &Arc<Client>) {
    let mut producer = Producer::new(client.clone(), "cards", Acks::All)
        .await
        .expect("producer");
    for card in 0..60u64 {
        let number = format!("card-{card:06}");
        let value = match card % 4 {
            0 => Some(serde_json::json!({"card_number": number, "country": "XX", "card_limit": 5_000 + card})),
            1 => None,
            _ => continue,
        };
        let record = Record {
            timestamp_ms: START_MS + 200 * 86_400_000,
            key: Some(Bytes::from(number)),
            value: value.map(|v| Bytes::from(v.to_string())),
            headers: Vec::new(),
        };
        producer.send(None, record).await.expect("a card change");
    }
    producer.flush().await.expect("flush");
}

/// The aggregate over the cards table equals, in its sink and by pull
/// query, the count and limits per country of the rows the table holds.
async fn expect_cards_per_country(cluster: &Cluster, client: &Arc<Client>) {
    let mut cards: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for record in read_all(client, "cards").await {
        let key = String::from_utf8(record.key.expect("keyed").to_vec()).expect("text");
        match record.value.as_deref() {
            Some(value) => cards.insert(key, serde_json::from_slice(value).expect("JSON")),
            None => cards.remove(&key),
        };
    }
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for row in cards.values() {
        let group = expected
            .entry(row["country"].as_str().expect("country").to_string())
            .or_default();
        *group = (group.0 + 1, group.1 + row["card_limit"].as_i64().expect("limit"));
    }
    // 15 moved, and card 19 (its row dated later; card 29's is deleted).
    assert!(
        expected.len() == 6 && expected["XX"].0 == 16,
        "moved into XX: {expected:?}"
    );
    let number = |v: &serde_json::Value| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok()));
    let row_of = |row: &serde_json::Value| {
        let country = row["COUNTRY"].as_str().unwrap_or_default().to_string();
        (
            country,
            (
                number(&row["CARDS"]).unwrap_or(-1),
                number(&row["LIMITS"]).unwrap_or(-1),
            ),
        )
    };
    let started = Instant::now();
    loop {
        let mut sunk = BTreeMap::new();
        for record in read_all(client, "CARDS_PER_COUNTRY").await {
            let key: serde_json::Value = serde_json::from_slice(record.key.as_deref().expect("keyed")).expect("JSON");
            let country = key["COUNTRY"].as_str().expect("the group").to_string();
            match record.value.as_deref() {
                Some(value) => sunk.insert(country, row_of(&serde_json::from_slice(value).expect("JSON")).1),
                None => sunk.remove(&country),
            };
        }
        let output = cli(
            cluster,
            &["sql", "--format", "json", "-e", "SELECT * FROM cards_per_country;"],
        );
        let pulled: BTreeMap<String, (i64, i64)> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .map(|row| row_of(&row))
            .collect();
        if sunk == expected && pulled == expected {
            return;
        }
        assert!(
            started.elapsed() < RESULTS_TIMEOUT,
            "per country {expected:?}: the sink holds {sunk:?}, a pull query answers {pulled:?} ({})",
            String::from_utf8_lossy(&output.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Writes a row for each of `numbers` dated 100 days after the attempts
/// begin; `countries` with those rows.
async fn add_future_rows(
    client: &Arc<Client>,
    countries: &BTreeMap<String, String>,
    numbers: &[&str],
) -> BTreeMap<String, String> {
    let mut producer = Producer::new(client.clone(), "cards", Acks::All)
        .await
        .expect("producer");
    let mut with_future = countries.clone();
    for number in numbers {
        assert!(!countries.contains_key(*number), "{number} had no row");
        let row = serde_json::json!({"card_number": number, "country": "XX", "card_limit": 1});
        let record = Record {
            timestamp_ms: START_MS + 100 * 86_400_000,
            key: Some(Bytes::from(number.to_string())),
            value: Some(Bytes::from(row.to_string())),
            headers: Vec::new(),
        };
        producer.send(None, record).await.expect("a card row");
        with_future.insert(number.to_string(), "XX".to_string());
    }
    producer.flush().await.expect("flush");
    with_future
}

/// The join by event time holds each attempt once with the country of
/// its card's row dated at or before it (none for cards whose only row
/// is dated later).
async fn expect_dated_countries(client: &Arc<Client>, dated: &BTreeMap<String, String>) {
    let mut expected: Vec<(String, i64, String)> = Vec::new();
    for attempt in source_attempts(client).await {
        if let Some(country) = dated.get(&attempt.card_number).filter(|_| attempt.at_ms >= START_MS) {
            expected.push((attempt.card_number, attempt.at_ms, country.clone()));
        }
    }
    expected.sort();
    assert!(
        expected.len() > 15_000,
        "most of the 20,000 attempts join: {}",
        expected.len()
    );
    let started = Instant::now();
    let found = loop {
        let mut found: Vec<(String, i64, String)> = read_all(client, "DATED_COUNTRIES")
            .await
            .iter()
            .map(|record| {
                let value: serde_json::Value =
                    serde_json::from_slice(record.value.as_deref().expect("value")).expect("JSON");
                let text = |column: &str| value[column].as_str().expect("text").to_string();
                (
                    text("CARD_NUMBER"),
                    value["AT_MS"].as_i64().expect("time"),
                    text("COUNTRY"),
                )
            })
            .collect();
        if found.len() >= expected.len() || started.elapsed() > RESULTS_TIMEOUT {
            found.sort();
            break found;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(found.len(), expected.len(), "none lost, none repeated");
    assert!(found == expected, "each attempt with its card's row as of its time");
}

/// Declares `cards` and `authorization_attempts`, and writes a row per card
/// (`card_row`); each card's country.
async fn declare_and_load_cards(cluster: &Cluster, client: &Arc<Client>, cards: u64) -> BTreeMap<String, String> {
    let declare = "CREATE TABLE cards (card_number STRING PRIMARY KEY, country STRING, card_limit BIGINT) \
        WITH (KAFKA_TOPIC='cards', VALUE_FORMAT='JSON', PARTITIONS=2, REPLICAS=3);
        CREATE STREAM authorization_attempts (card_number STRING, amount_cents BIGINT, at_ms BIGINT) \
        WITH (KAFKA_TOPIC='authorization_attempts', VALUE_FORMAT='JSON', PARTITIONS=3, REPLICAS=3);";
    wait_for("the table and stream to be declared", TIMEOUT, || {
        let output = sql(cluster, declare);
        output.status.success() || String::from_utf8_lossy(&output.stderr).contains("already exists")
    });
    let rows: Vec<(String, serde_json::Value)> = (0..cards).filter_map(card_row).collect();
    let mut producer = Producer::new(client.clone(), "cards", Acks::All)
        .await
        .expect("producer");
    for (number, row) in &rows {
        let record = Record {
            timestamp_ms: START_MS,
            key: Some(Bytes::from(number.clone())),
            value: Some(Bytes::from(row.to_string())),
            headers: Vec::new(),
        };
        producer.send(None, record).await.expect("a card row");
    }
    producer.flush().await.expect("flush");
    rows.iter()
        .map(|(number, row)| (number.clone(), row["country"].as_str().expect("country").to_string()))
        .collect()
}

/// Waits until every task of `query` on `node` has checkpointed.
fn wait_for_checkpoints_on(cluster: &Cluster, query: &str, node: u64) {
    wait_for(
        &format!("{query}'s tasks on node {node} to checkpoint"),
        RESULTS_TIMEOUT,
        || {
            let output = cli(cluster, &["dataflow", "describe", query, "--json"]);
            let tasks: Vec<serde_json::Value> = serde_json::from_slice::<serde_json::Value>(&output.stdout)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default();
            let on_node: Vec<&serde_json::Value> = tasks.iter().filter(|t| t["node"] == node).collect();
            !on_node.is_empty() && on_node.iter().all(|t| t["checkpoints"].as_u64().unwrap_or(0) > 0)
        },
    );
}

/// Pull queries by country answer the reference's counts.
fn expect_pulled_countries(cluster: &Cluster, expected: &BTreeMap<(String, i64), u64>) {
    for country in ["NL", "US"] {
        let wanted = expected
            .iter()
            .filter(|((c, _), _)| c == country)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let statement = format!("SELECT * FROM per_country WHERE country = '{country}';");
        wait_pulled_rows(cluster, &statement, ("COUNTRY", "ATTEMPTS"), &wanted);
    }
}

/// A payment of `attempt`'s card, `delay_ms` after it, keyed by card.
fn payment(attempt: &Attempt, delay_ms: i64) -> Record {
    let at_ms = attempt.at_ms + delay_ms;
    let value =
        serde_json::json!({"card_number": attempt.card_number, "paid_cents": attempt.amount_cents, "at_ms": at_ms});
    Record {
        timestamp_ms: at_ms,
        key: Some(Bytes::from(attempt.card_number.clone())),
        value: Some(Bytes::from(value.to_string())),
        headers: Vec::new(),
    }
}

/// One joined row as the test compares them: card, attempt time, amount,
/// payment time (none for a left join's attempt without a payment).
type Paid = (String, i64, u64, Option<i64>);

/// The join of what the two topics hold: each attempt with each payment of
/// its card at most `within_ms` away; for a `left` join, each attempt
/// without one too. The closing records are left out.
async fn paid_reference(client: &Arc<Client>, within_ms: i64, left: bool) -> Vec<Paid> {
    let rows = |records: Vec<Record>| -> Vec<serde_json::Value> {
        records
            .iter()
            .map(|r| serde_json::from_slice(r.value.as_deref().expect("value")).expect("JSON"))
            .collect()
    };
    let attempts = rows(read_all(client, "attempts").await);
    let payments = rows(read_all(client, "payments").await);
    let mut by_card: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for p in &payments {
        by_card
            .entry(p["card_number"].as_str().expect("card"))
            .or_default()
            .push(p["at_ms"].as_i64().expect("at"));
    }
    let mut expected = Vec::new();
    for a in attempts.iter().filter(|a| a["card_number"] != CLOSING_CARD) {
        let (card, at_ms) = (
            a["card_number"].as_str().expect("card"),
            a["at_ms"].as_i64().expect("at"),
        );
        let amount = a["amount_cents"].as_u64().expect("amount");
        let paid: Vec<i64> = by_card
            .get(card)
            .into_iter()
            .flatten()
            .copied()
            .filter(|paid_ms| (paid_ms - at_ms).abs() <= within_ms)
            .collect();
        if paid.is_empty() && left {
            expected.push((card.to_string(), at_ms, amount, None));
        }
        expected.extend(paid.into_iter().map(|p| (card.to_string(), at_ms, amount, Some(p))));
    }
    expected.sort();
    expected
}

/// What `topic` (a join's sink) holds, the closing records left out.
async fn paid_results(client: &Arc<Client>, topic: &str) -> Vec<Paid> {
    let mut found: Vec<Paid> = read_all(client, topic)
        .await
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().expect("value")).expect("JSON");
            (
                v["CARD_NUMBER"].as_str().expect("card").to_string(),
                v["ATTEMPT_MS"].as_i64().expect("attempt time"),
                v["AMOUNT_CENTS"].as_u64().expect("amount"),
                v["PAID_MS"].as_i64(),
            )
        })
        .filter(|row| row.0 != CLOSING_CARD)
        .collect();
    found.sort();
    found
}

/// The aggregate over the join (four stages: two sources, the join, the
/// count) counted each pair once per (card, minute of the pair's time):
/// each window's changes are 1, 2, … n, none lost or repeated.
async fn expect_pairs_per_card(client: &Arc<Client>, pairs: &[Paid]) {
    let mut expected: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for (card, attempt_ms, _, paid_ms) in pairs {
        let t_ms = (*attempt_ms).max(paid_ms.expect("a pair"));
        *expected
            .entry((card.clone(), t_ms - t_ms.rem_euclid(60_000)))
            .or_default() += 1;
    }
    expect_changes_once(client, "PAID_PER_CARD", ("CARD_NUMBER", "PAIRS"), &expected).await;
}

/// The card of the records that close every join window.
const CLOSING_CARD: &str = "closing";

/// An attempt and a payment three days on in every partition of both
/// topics: every source task's event time passes every window and its
/// grace, so the left join lets every attempt go.
async fn close_join_windows(client: &Arc<Client>) {
    let at_ms = START_MS + 3 * 86_400_000;
    let closing = Attempt {
        card_number: CLOSING_CARD.to_string(),
        amount_cents: 0,
        at_ms,
    };
    for (topic, record) in [
        ("attempts", fraud::record(&closing)),
        ("payments", payment(&closing, 0)),
    ] {
        let mut producer = Producer::new(client.clone(), topic, Acks::All).await.expect("producer");
        for partition in 0..PARTITIONS {
            producer
                .send(Some(partition), record.clone())
                .await
                .expect("a closing record");
        }
        producer.flush().await.expect("flush");
    }
}

/// Polls `topic` until it holds as many rows as `expected`, then checks
/// it holds exactly those.
async fn expect_joined(client: &Arc<Client>, topic: &str, expected: &[Paid]) {
    let started = Instant::now();
    let found = loop {
        let found = paid_results(client, topic).await;
        if found.len() >= expected.len() || started.elapsed() > RESULTS_TIMEOUT {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    tracing::info!(topic, expected = expected.len(), found = found.len(), "joined rows");
    assert_eq!(found.len(), expected.len(), "{topic}: none lost, none repeated");
    assert!(found == expected, "{topic} holds exactly the reference's rows");
}

/// Joins on three nodes, a node killed mid-stream: attempts joined with
/// the payments of their card within 10 seconds (the sink holds every pair
/// of the two topics exactly once), and card holders left-joined with card
/// limits (the sink materializes the join of the tables' final rows, and a
/// pull query reads it by key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_tables_joined_equal_their_references_exactly_once_through_a_kill() {
    let mut cluster = start(150);
    let client = connect(&cluster.addrs, &cluster.certs).await;
    let declare = "CREATE STREAM attempts (card_number STRING, amount_cents BIGINT, at_ms BIGINT) \
        WITH (KAFKA_TOPIC='attempts', VALUE_FORMAT='JSON', PARTITIONS=3, REPLICAS=3, TIMESTAMP='at_ms');
        CREATE STREAM payments (card_number STRING, paid_cents BIGINT, at_ms BIGINT) \
        WITH (KAFKA_TOPIC='payments', VALUE_FORMAT='JSON', PARTITIONS=3, REPLICAS=3, TIMESTAMP='at_ms');
        CREATE STREAM refunds (card_number STRING) WITH (KAFKA_TOPIC='refunds', VALUE_FORMAT='JSON', PARTITIONS=2, REPLICAS=3);
        CREATE TABLE holders (card_number STRING PRIMARY KEY, name STRING) \
        WITH (KAFKA_TOPIC='holders', VALUE_FORMAT='JSON', PARTITIONS=3, REPLICAS=3);
        CREATE TABLE limits (card_number STRING PRIMARY KEY, card_limit BIGINT) \
        WITH (KAFKA_TOPIC='limits', VALUE_FORMAT='JSON', PARTITIONS=3, REPLICAS=3);";
    wait_for("the streams to be declared", TIMEOUT, || {
        let output = sql(&cluster, declare);
        output.status.success() || String::from_utf8_lossy(&output.stderr).contains("already exists")
    });
    let output = sql(
        &cluster,
        "CREATE STREAM odd AS SELECT a.card_number FROM attempts a JOIN refunds r WITHIN 1 SECOND ON a.card_number = r.card_number;",
    );
    let refused = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && refused.contains("cannot join attempts (3 partitions) with refunds (2 partitions)"),
        "{refused}"
    );
    let output = sql(
        &cluster,
        "CREATE STREAM paid AS SELECT a.card_number, a.at_ms AS attempt_ms, a.amount_cents, p.at_ms AS paid_ms \
         FROM attempts a JOIN payments p WITHIN 10 SECONDS ON a.card_number = p.card_number;",
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let explained = String::from_utf8_lossy(&sql(&cluster, "EXPLAIN CSAS_PAID_0;").stdout).to_string();
    assert!(explained.contains("Inner JOIN STREAM PAYMENTS"), "{explained}");
    let output = sql(
        &cluster,
        "CREATE TABLE paid_per_card AS SELECT a.card_number, COUNT(*) AS pairs \
         FROM attempts a JOIN payments p WITHIN 10 SECONDS ON a.card_number = p.card_number \
         WINDOW TUMBLING (SIZE 1 MINUTE) GROUP BY a.card_number;",
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = sql(
        &cluster,
        "CREATE STREAM unpaid AS SELECT a.card_number, a.at_ms AS attempt_ms, a.amount_cents, p.at_ms AS paid_ms \
         FROM attempts a LEFT JOIN payments p WITHIN 10 SECONDS ON a.card_number = p.card_number;",
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = sql(
        &cluster,
        "CREATE TABLE holder_limits AS SELECT h.card_number, h.name, l.card_limit \
         FROM holders h LEFT JOIN limits l ON h.card_number = l.card_number;",
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table_changes = table_changes();

    let mut generator = Generator::new(9, 300, START_MS, 20).bursting_one_in(1_000);
    let send = |client: Arc<Client>, attempts: Vec<Attempt>| async move {
        let payments: Vec<Record> = attempts.iter().step_by(3).map(|a| payment(a, 4_000)).collect();
        produce_to(&client, "attempts", attempts.iter().map(fraud::record)).await;
        produce_to(&client, "payments", payments.into_iter()).await;
    };
    for _ in 0..3 {
        send(client.clone(), generator.by_ref().take(1_000).collect()).await;
    }
    produce_table_changes(&client, &table_changes[..300]).await;
    wait_for_checkpoints_on(&cluster, "CSAS_PAID_0", 3);
    wait_for_checkpoints_on(&cluster, "CSAS_UNPAID_0", 3);
    wait_for_checkpoints_on(&cluster, "CTAS_PAID_PER_CARD_0", 3);
    wait_for_checkpoints_on(&cluster, "CTAS_HOLDER_LIMITS_0", 3);
    cluster.nodes[2].kill();
    tracing::info!("node 3 killed");
    let survivors = connect(&cluster.addrs[..2], &cluster.certs).await;
    for _ in 0..3 {
        send(survivors.clone(), generator.by_ref().take(1_000).collect()).await;
    }
    produce_table_changes(&survivors, &table_changes[300..]).await;
    let expected = paid_reference(&survivors, 10_000, false).await;
    assert!(
        expected.len() > 2_000,
        "most payments meet attempts: {} pairs",
        expected.len()
    );
    expect_joined(&survivors, "PAID", &expected).await;
    expect_pairs_per_card(&survivors, &expected).await;
    // The left join's attempts without a payment leave once every source
    // task (of both streams) has passed their windows and grace.
    close_join_windows(&survivors).await;
    let expected = paid_reference(&survivors, 10_000, true).await;
    let unpaid = expected.iter().filter(|row| row.3.is_none()).count();
    assert!(unpaid > 1_000, "most attempts have no payment: {unpaid}");
    expect_joined(&survivors, "UNPAID", &expected).await;
    expect_holder_limits(&cluster, &survivors, &table_changes).await;
    drop(cluster);
}

/// A change to `holders` (side 0) or `limits` (side 1): a card's new row,
/// or its deletion.
type TableChange = (usize, String, Option<serde_json::Value>);

/// 600 changes over 40 cards: rows written, rewritten and deleted.
fn table_changes() -> Vec<TableChange> {
    let mut rng = runnel::dataflow::testing::Lcg::new(3);
    (0..600)
        .map(|i| {
            let state = rng.next_state();
            let roll = state >> 33;
            let side = (roll % 2) as usize;
            let card = format!("card-{:06}", (roll >> 2) % 40);
            let row = match ((roll >> 8) % 5, side) {
                (0, _) => None,
                (_, 0) => Some(serde_json::json!({"name": format!("holder {i}")})),
                _ => Some(serde_json::json!({"card_limit": i * 100})),
            };
            (side, card, row)
        })
        .collect()
}

async fn produce_table_changes(client: &Arc<Client>, changes: &[TableChange]) {
    for (side, topic) in [(0, "holders"), (1, "limits")] {
        let records = changes
            .iter()
            .filter(|(s, _, _)| *s == side)
            .map(|(_, card, row)| Record {
                timestamp_ms: START_MS,
                key: Some(Bytes::from(card.clone())),
                value: row.as_ref().map(|r| Bytes::from(r.to_string())),
                headers: Vec::new(),
            });
        produce_to(client, topic, records).await;
    }
}

/// The table the join's sink materializes equals the left join of the
/// tables' final rows, and pull queries answer it by key.
async fn expect_holder_limits(cluster: &Cluster, client: &Arc<Client>, changes: &[TableChange]) {
    let mut tables: [BTreeMap<String, serde_json::Value>; 2] = Default::default();
    for (side, card, row) in changes {
        match row {
            Some(row) => tables[*side].insert(card.clone(), row.clone()),
            None => tables[*side].remove(card),
        };
    }
    let expected: BTreeMap<String, serde_json::Value> = tables[0]
        .iter()
        .map(|(card, holder)| {
            let limit = tables[1]
                .get(card)
                .map_or(serde_json::Value::Null, |l| l["card_limit"].clone());
            let row = serde_json::json!({"CARD_NUMBER": card, "NAME": holder["name"], "CARD_LIMIT": limit});
            (card.clone(), row)
        })
        .collect();
    assert!(expected.len() > 10, "most cards have a holder: {expected:?}");
    let started = Instant::now();
    let materialized = loop {
        let mut materialized = BTreeMap::new();
        for record in read_all(client, "HOLDER_LIMITS").await {
            let key: serde_json::Value = serde_json::from_slice(record.key.as_deref().expect("key")).expect("JSON");
            let card = key["CARD_NUMBER"].as_str().expect("card").to_string();
            match record.value.as_deref() {
                Some(value) => materialized.insert(card, serde_json::from_slice(value).expect("JSON")),
                None => materialized.remove(&card),
            };
        }
        if materialized == expected || started.elapsed() > RESULTS_TIMEOUT {
            break materialized;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        materialized, expected,
        "the join's table: every change applied once, in order"
    );
    let (card, row) = expected.iter().next().expect("a row");
    let output = cli(
        cluster,
        &[
            "sql",
            "--format",
            "json",
            "-e",
            &format!("SELECT * FROM holder_limits WHERE card_number = '{card}';"),
        ],
    );
    let pulled: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(
        pulled["NAME"].as_str(),
        row["NAME"].as_str(),
        "pulled {pulled}, expected {row}"
    );
}
