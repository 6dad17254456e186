//! Replicated partitions on real `runnel node` processes: a 100,000-record
//! round trip, a leader killed with SIGKILL mid-produce, a restart that
//! catches up, and clear errors for bad produce requests.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use runnel::client::protocol::NodeId;
use runnel::client::{Acks, Client, ClientError, Consumer, Producer};
use runnel::storage::{BatchBuilder, ProducerInfo, Record, StoredRecord};

const TIMEOUT: Duration = Duration::from_secs(60);

struct ProcessCluster {
    scratch: tempfile::TempDir,
    certs: std::path::PathBuf,
    addrs: Vec<SocketAddr>,
    nodes: Vec<NodeProcess>,
}

fn start_cluster(first_host: u8) -> ProcessCluster {
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    certs_init(&certs, 3);
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|i| free_addr_on_host(first_host + i).expect("a free loopback address"))
        .collect();
    let nodes = (0..3)
        .map(|i| start_node(i as u32 + 1, addrs[i], &addrs, &certs, scratch.path()))
        .collect();
    ProcessCluster {
        scratch,
        certs,
        addrs,
        nodes,
    }
}

/// `runnel produce ARGS` against the cluster with `input` on its standard
/// input; its output, standard error included.
fn produce_stdin(cluster: &ProcessCluster, args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = runnel()
        .arg("produce")
        .args(args)
        .args(["--seeds", &cluster.addrs[0].to_string()])
        .arg("--certs")
        .arg(&cluster.certs)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input).expect("write");
    child.wait_with_output().expect("wait")
}

fn create_topic(cluster: &ProcessCluster, name: &str, partitions: u32) {
    let seeds: Vec<String> = cluster.addrs.iter().map(SocketAddr::to_string).collect();
    wait_for("the topic to be created", TIMEOUT, || {
        runnel()
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
                "--replication",
                "3",
            ])
            .args(["--seeds", &seeds.join(",")])
            .arg("--certs")
            .arg(&cluster.certs)
            .output()
            .is_ok_and(|o| o.status.success())
    });
}

/// `runnel status --json` as the node at `seed` answers it (null when it
/// does not answer).
fn status_json(certs: &std::path::Path, seed: &str) -> serde_json::Value {
    let output = runnel()
        .args(["status", "--json", "--seeds", seed])
        .arg("--certs")
        .arg(certs)
        .output()
        .expect("status");
    serde_json::from_slice(&output.stdout).unwrap_or_default()
}

async fn connect(cluster: &ProcessCluster) -> Arc<Client> {
    Arc::new(
        Client::connect(cluster.addrs.clone(), &cluster.certs)
            .await
            .expect("connect"),
    )
}

/// Every committed record of a partition on one replica (an error while the
/// replica is still starting).
async fn replica_records(
    client: &Client,
    node: NodeId,
    topic: &str,
    partition: u32,
) -> Result<Vec<StoredRecord>, ClientError> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let fetched = client
            .fetch_from_replica(node, topic, partition, offset, 4 << 20)
            .await?;
        if fetched.next_offset == offset {
            return Ok(out);
        }
        offset = fetched.next_offset;
        out.extend(fetched.records);
    }
}

/// Waits until every replica of the partition holds the same records, and
/// returns them.
async fn identical_replicas(client: &Client, topic: &str, partition: u32, nodes: &[NodeId]) -> Vec<StoredRecord> {
    let deadline = Instant::now() + TIMEOUT;
    let mut last = String::new();
    loop {
        let mut copies = Vec::new();
        for &node in nodes {
            match replica_records(client, node, topic, partition).await {
                Ok(records) => copies.push(records),
                Err(e) => last = format!("node {node}: {e}"),
            }
        }
        if copies.len() == nodes.len() && copies.windows(2).all(|w| w[0] == w[1]) {
            return copies.swap_remove(0);
        }
        assert!(
            Instant::now() < deadline,
            "replicas of partition {partition} never converged ({last})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_records_round_trip_with_the_same_offsets_on_every_replica() {
    let cluster = start_cluster(50);
    create_topic(&cluster, "payments", 3);
    let client = connect(&cluster).await;

    eprintln!("phase: produce 100,000 keyed records with acks=all");
    let mut producer = Producer::new(client.clone(), "payments", Acks::All)
        .await
        .expect("producer");
    let count = 100_000u32;
    let mut acknowledged = 0u64;
    for i in 0..count {
        let record = Record {
            timestamp_ms: i64::from(i),
            key: Some(Bytes::from(format!("card-{}", i % 997))),
            value: Some(Bytes::from(format!("{i:06}"))),
            headers: Vec::new(),
        };
        acknowledged += producer
            .send(None, record)
            .await
            .expect("send")
            .iter()
            .map(|s| u64::from(s.2))
            .sum::<u64>();
    }
    acknowledged += producer
        .flush()
        .await
        .expect("flush")
        .iter()
        .map(|s| u64::from(s.2))
        .sum::<u64>();
    assert_eq!(acknowledged, u64::from(count));

    eprintln!("phase: consume everything back");
    let mut consumer = Consumer::new(client.clone(), "payments");
    for partition in 0..3 {
        consumer.assign(partition, 0);
    }
    let mut consumed: BTreeMap<u32, Vec<StoredRecord>> = BTreeMap::new();
    let deadline = Instant::now() + TIMEOUT;
    while consumed.values().map(Vec::len).sum::<usize>() < count as usize {
        assert!(Instant::now() < deadline, "consumed too little");
        for (partition, record) in consumer.poll().await.expect("poll") {
            consumed.entry(partition).or_default().push(record);
        }
    }
    assert_eq!(consumed.values().map(Vec::len).sum::<usize>(), count as usize);

    eprintln!("phase: every replica holds the same records at the same offsets, in production order per key");
    for (partition, records) in &consumed {
        let replicas = identical_replicas(&client, "payments", *partition, &[NodeId(1), NodeId(2), NodeId(3)]).await;
        assert_eq!(
            &replicas, records,
            "partition {partition}: a replica differs from what was consumed"
        );
        let mut last_per_key: BTreeMap<Bytes, Bytes> = BTreeMap::new();
        for record in records {
            let key = record.record.key.clone().expect("key");
            let value = record.record.value.clone().expect("value");
            if let Some(previous) = last_per_key.insert(key, value.clone()) {
                assert!(previous < value, "order broken in partition {partition}");
            }
        }
    }
    drop(cluster);
}

/// Finds the node leading partition 0.
async fn leader_of(client: &Client, topic: &str) -> NodeId {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(info) = client.describe_topic(topic).await {
            if let Some(leader) = info.partitions[0].leader {
                return leader;
            }
        }
        assert!(Instant::now() < deadline, "no leader for {topic}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ten records of batch `tag` from one idempotent producer.
fn tagged_batch(tag: u32) -> runnel::storage::RecordBatch {
    let producer = ProducerInfo {
        producer_id: 4242,
        producer_epoch: 0,
        base_sequence: (tag * 10) as i32,
    };
    let mut builder = BatchBuilder::new().producer(producer);
    for i in 0..10 {
        let value = Bytes::from(format!("{tag:06}-{i}"));
        builder
            .push(&Record {
                timestamp_ms: 1,
                value: Some(value),
                ..Record::default()
            })
            .expect("push");
    }
    builder.build().expect("build")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_produce_loses_no_acknowledged_record_and_a_restart_catches_up() {
    let mut cluster = start_cluster(60);
    create_topic(&cluster, "orders", 1);
    let client = connect(&cluster).await;
    let leader = leader_of(&client, "orders").await;

    eprintln!("phase: produce with acks=all from an idempotent producer; SIGKILL the leader (node {leader}) midway");
    let mut acked: BTreeMap<u32, u64> = BTreeMap::new();
    let mut retries = 0u32;
    let deadline = Instant::now() + TIMEOUT;
    for tag in 0..400u32 {
        if tag == 150 {
            // SIGKILL from another thread, so it lands while requests are in flight.
            let pid = cluster.nodes[leader.0 as usize - 1].pid().expect("leader runs");
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(15));
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            });
        }
        // Every batch is retried until it is acknowledged: idempotence makes
        // a retry of a batch that did get written a no-op.
        loop {
            assert!(Instant::now() < deadline, "produced only {} batches", acked.len());
            match client.produce("orders", 0, tagged_batch(tag), Acks::All).await {
                Ok(base_offset) => {
                    acked.insert(tag, base_offset);
                    break;
                }
                Err(ClientError::Cluster(_) | ClientError::Broker(_) | ClientError::Unavailable { .. }) => retries += 1,
                Err(e) => panic!("produce: {e}"),
            }
        }
    }
    eprintln!("acknowledged {} batches after {retries} retries", acked.len());

    eprintln!("phase: every acknowledged record is readable exactly once, at its offset");
    let survivors: Vec<NodeId> = [1, 2, 3].into_iter().map(NodeId).filter(|&n| n != leader).collect();
    let records = identical_replicas(&client, "orders", 0, &survivors).await;
    check_acknowledged(&records, &acked);
    assert_eq!(records.len(), 4000, "nothing but the acknowledged records, each once");

    eprintln!("phase: restart the killed node; its log catches up to the leader's");
    let killed = leader.0 as usize - 1;
    cluster.nodes[killed] = start_node(
        leader.0,
        cluster.addrs[killed],
        &cluster.addrs,
        &cluster.certs,
        cluster.scratch.path(),
    );
    let all = identical_replicas(&client, "orders", 0, &[NodeId(1), NodeId(2), NodeId(3)]).await;
    assert_eq!(all, records);
}

fn check_acknowledged(records: &[StoredRecord], acked: &BTreeMap<u32, u64>) {
    let mut offsets: BTreeMap<Bytes, Vec<u64>> = BTreeMap::new();
    for record in records {
        offsets
            .entry(record.record.value.clone().expect("value"))
            .or_default()
            .push(record.offset);
    }
    assert!(offsets.values().all(|o| o.len() == 1), "a record is stored twice");
    for (tag, base_offset) in acked {
        for i in 0..10u64 {
            let value = Bytes::from(format!("{tag:06}-{i}"));
            assert_eq!(
                offsets.get(&value),
                Some(&vec![base_offset + i]),
                "acknowledged {value:?} lost or moved"
            );
        }
    }
}

#[test]
fn bad_produce_requests_get_clear_errors_and_the_cluster_keeps_serving() {
    let cluster = start_cluster(70);
    create_topic(&cluster, "events", 2);
    let produce = |args: &[&str], input: &[u8]| produce_stdin(&cluster, args, input);
    let err = |output: std::process::Output| {
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    assert!(err(produce(&["nope"], b"x\n")).contains("topic \"nope\" does not exist"));
    assert!(err(produce(&["events", "--partition", "5"], b"x\n"))
        .contains("partition 5 of topic \"events\" does not exist (it has 2)"));
    let huge = vec![b'x'; 2 << 20];
    assert!(err(produce(&["events"], &huge)).contains("exceeds the limit"));
    let output = produce(&["events"], b"still\nserving\n");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // A line that is not UTF-8 is named; the lines before it are produced.
    let refused = produce(&["events", "--partition", "1"], b"before\n\xff\xfe binary\nafter\n");
    let stderr = err(refused);
    assert!(
        stderr.contains("line 2 was not produced")
            && stderr.contains("--value-format")
            && stderr.contains("produced 1 records"),
        "{stderr}"
    );
    let output = produce(
        &["events", "--partition", "1", "--value-format", "hex"],
        b"48656c6c6f2d686578\n",
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = produce(
        &["events", "--partition", "1", "--value-format", "base64"],
        b"aGVsbG8tYmFzZTY0\n",
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        err(produce(&["events", "--value-format", "hex"], b"zz\n")).contains("line 1 was not produced: it is not hex")
    );
    let consumed = runnel()
        .args(["consume", "events", "--seeds", &cluster.addrs[1].to_string()])
        .arg("--certs")
        .arg(&cluster.certs)
        .output()
        .expect("consume");
    let text = String::from_utf8_lossy(&consumed.stdout);
    assert!(text.contains("still") && text.contains("serving"), "{text}");
    assert!(text.contains("before") && !text.contains("after"), "{text}");
    assert!(text.contains("Hello-hex") && text.contains("hello-base64"), "{text}");
}

#[test]
fn consume_max_prints_at_most_max_and_a_group_commits_only_what_was_printed() {
    let cluster = start_cluster(180);
    create_topic(&cluster, "seen", 1);
    let lines: String = (0..12).map(|i| format!("r{i}\n")).collect();
    let mut child = runnel()
        .args(["produce", "seen", "--seeds", &cluster.addrs[0].to_string()])
        .arg("--certs")
        .arg(&cluster.certs)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), lines.as_bytes()).expect("write");
    assert!(child.wait().expect("wait").success());
    // Through the node that took the produce: its client service is up (a
    // node still starting answers that it has none, which is issue 23's).
    let consume = |extra: &[&str]| {
        let output = runnel()
            .args(["consume", "seen", "--seeds", &cluster.addrs[0].to_string()])
            .arg("--certs")
            .arg(&cluster.certs)
            .args(extra)
            .output()
            .expect("consume");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let expect = |range: std::ops::Range<u32>| range.map(|i| format!("r{i}")).collect::<Vec<_>>();
    assert_eq!(consume(&["--max", "0"]), Vec::<String>::new(), "--max 0 prints nothing");
    assert_eq!(consume(&["--max", "3"]), expect(0..3));
    assert_eq!(
        consume(&["-e", "-o", "-2"]),
        expect(10..12),
        "kcat's -e: stop at the end"
    );
    // One poll brings all twelve records; the group commits the five printed.
    assert_eq!(consume(&["--group", "g", "--max", "5"]), expect(0..5));
    assert_eq!(
        consume(&["--group", "g", "--max", "5"]),
        expect(5..10),
        "no record skipped"
    );
    assert_eq!(consume(&["--group", "g"]), expect(10..12));

    // Kafka tools' start positions and short flags.
    assert_eq!(consume(&["-o", "-4"]), expect(8..12), "the last four");
    assert_eq!(consume(&["-o", "end"]), Vec::<String>::new());
    let r10: serde_json::Value =
        serde_json::from_str(&consume(&["-o", "-2", "-c", "1", "-f", "json"])[0]).expect("json");
    let r10_offset = r10["offset"].as_u64().expect("offset").to_string();
    assert_eq!(r10["value"], "r10");
    assert_eq!(
        consume(&["-o", &r10_offset, "-c", "1"]),
        expect(10..11),
        "from an offset"
    );
    assert_eq!(consume(&["--offset", "beginning", "-c", "2"]), expect(0..2));
    let future = (runnel::client::unix_now_ms() + 3_600_000).to_string();
    assert_eq!(
        consume(&["-o", &format!("@{future}")]),
        Vec::<String>::new(),
        "nothing after an hour from now"
    );
    // A keyed record prints its key, a tab, then its value.
    let mut keyed = runnel()
        .args(["produce", "seen", "--key-field", "0", "--sep", ":", "-p", "0"])
        .args(["--seeds", &cluster.addrs[0].to_string()])
        .arg("--certs")
        .arg(&cluster.certs)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(&mut keyed.stdin.take().expect("stdin"), b"card-7:42\n").expect("write");
    assert!(keyed.wait().expect("wait").success());
    assert_eq!(consume(&["-o", "-1"]), vec!["card-7\tcard-7:42".to_string()]);
    let json = consume(&["-o", "-1", "-f", "json"]);
    let json: serde_json::Value = serde_json::from_str(&json[0]).expect("json");
    assert_eq!(
        (json["key"].as_str(), json["offset"].as_u64()),
        (Some("card-7"), Some(r10["offset"].as_u64().expect("offset") + 2))
    );
    assert!(json["headers"].is_object(), "{json}");
    // --print-offsets: where each line went.
    let printed = runnel()
        .args([
            "produce",
            "seen",
            "-p",
            "0",
            "--print-offsets",
            "--seeds",
            &cluster.addrs[0].to_string(),
        ])
        .arg("--certs")
        .arg(&cluster.certs)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut printed = printed;
    std::io::Write::write_all(&mut printed.stdin.take().expect("stdin"), b"x1\nx2\n").expect("write");
    let printed = printed.wait_with_output().expect("wait");
    let lines: Vec<String> = String::from_utf8_lossy(&printed.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let x2 = consume(&["-o", "-1", "-f", "json"]);
    let x2: serde_json::Value = serde_json::from_str(&x2[0]).expect("json");
    assert_eq!(lines[1], format!("partition 0 offset {}", x2["offset"]), "{lines:?}");
    assert_eq!(x2["value"], "x2");
    // Headers on every record, and a key from a JSON field.
    let produce_lines = |args: &[&str], input: &[u8]| produce_stdin(&cluster, args, input);
    let args = [
        "seen",
        "-p",
        "0",
        "-H",
        "trace=abc",
        "-H",
        "src=cli",
        "--key-json",
        "user.id",
    ];
    let output = produce_lines(&args, b"{\"user\":{\"id\":\"u-9\"},\"n\":1}\n");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let last = consume(&["-o", "-1", "-f", "json"]);
    let last: serde_json::Value = serde_json::from_str(&last[0]).expect("json");
    assert_eq!(last["key"], "u-9", "{last}");
    assert_eq!(
        (last["headers"]["trace"].as_str(), last["headers"]["src"].as_str()),
        (Some("abc"), Some("cli")),
        "{last}"
    );
    let output = produce_lines(&args, b"not json\n");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && err.contains("line 1 was not produced: --key-json needs a JSON value"),
        "{err}"
    );
    let output = produce_lines(&["seen", "-H", "no-equals"], b"x\n");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && err.contains("is not NAME=VALUE"), "{err}");
}

/// `runnel consume … | head -1`: the reader goes away after one line; the
/// command ends quietly with status 0, neither a panic nor an error.
#[test]
fn a_closed_pipe_ends_consume_quietly_with_status_0() {
    let cluster = start_cluster(185);
    create_topic(&cluster, "many", 1);
    let seeds = cluster.addrs[0].to_string();
    let connect = |command: &mut std::process::Command| {
        command.args(["--seeds", &seeds]).arg("--certs").arg(&cluster.certs);
    };
    let lines: String = (0..4000).map(|i| format!("{i:0>120}\n")).collect();
    let mut producer = runnel();
    producer.args(["produce", "many"]).stdin(std::process::Stdio::piped());
    connect(&mut producer);
    let mut producer = producer.spawn().expect("spawn");
    std::io::Write::write_all(&mut producer.stdin.take().expect("stdin"), lines.as_bytes()).expect("write");
    assert!(producer.wait().expect("wait").success());

    let mut consumer = runnel();
    consumer.args(["consume", "many"]);
    connect(&mut consumer);
    let mut consumer = consumer
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut first = String::new();
    let mut stdout = std::io::BufReader::new(consumer.stdout.take().expect("stdout"));
    std::io::BufRead::read_line(&mut stdout, &mut first).expect("a line");
    assert_eq!(first.trim_end(), format!("{:0>120}", 0));
    drop(stdout);
    let output = consumer.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "status {:?}: {stderr}", output.status);
    assert!(!stderr.contains("error") && !stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_a_leader_kill_and_seek_by_timestamp_works() {
    let mut cluster = start_cluster(80);
    create_topic(&cluster, "events", 1);
    let client = connect(&cluster).await;
    let mut producer = Producer::new(client.clone(), "events", Acks::All)
        .await
        .expect("producer");
    producer.batch_records_max = 10;
    producer.linger = Duration::from_secs(3600); // batches of exactly 10
    for i in 0..100i64 {
        let record = Record {
            timestamp_ms: i * 10,
            value: Some(Bytes::from(format!("{i:03}"))),
            ..Record::default()
        };
        producer.send(Some(0), record).await.expect("send");
    }
    producer.flush().await.expect("flush");

    eprintln!("phase: consumer 'billing' reads 40 records and commits");
    let mut consumer = Consumer::new(client.clone(), "events");
    consumer.fetch_bytes_max = 1; // one batch of 10 per poll
    consumer.assign(0, 0);
    let mut read = Vec::new();
    while read.len() < 40 {
        read.extend(consumer.poll().await.expect("poll"));
    }
    assert_eq!(read.len(), 40);
    consumer.commit("billing").await.expect("commit");
    let committed = consumer.position(0).expect("position");

    eprintln!("phase: kill the node leading the offsets partition; a new consumer resumes at the commit");
    let info = client
        .describe_topic(runnel::client::OFFSETS_TOPIC)
        .await
        .expect("describe");
    let offsets_partition = runnel::client::partition_for_key(b"billing", info.config.partitions);
    let leader = info.partitions[offsets_partition as usize]
        .leader
        .expect("offsets leader");
    cluster.nodes[leader.0 as usize - 1].kill();
    let survivors: Vec<SocketAddr> = cluster
        .addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader.0 as usize - 1)
        .map(|(_, a)| *a)
        .collect();
    let client = Arc::new(Client::connect(survivors, &cluster.certs).await.expect("connect"));
    let mut resumed = Consumer::new(client.clone(), "events");
    resumed.assign(0, 0);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match resumed.resume("billing").await {
            Ok(1) => break,
            Ok(_) | Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("resume: {other:?}"),
        }
    }
    assert_eq!(resumed.position(0), Some(committed));
    let next = loop {
        let records = resumed.poll().await.expect("poll");
        if let Some((_, record)) = records.into_iter().next() {
            break record;
        }
    };
    assert_eq!(
        next.record.value.as_deref(),
        Some(&b"040"[..]),
        "resumed right after the committed records"
    );

    eprintln!("phase: seek by timestamp");
    let mut seeker = Consumer::new(client.clone(), "events");
    seeker.assign(0, 0);
    seeker.seek_to_timestamp(505).await.expect("seek");
    let first = loop {
        if let Some((_, record)) = seeker.poll().await.expect("poll").into_iter().next() {
            break record;
        }
    };
    assert_eq!(first.record.timestamp_ms, 510);
    assert_eq!(first.record.value.as_deref(), Some(&b"051"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replica_restarts_in_place_and_status_shows_it() {
    let cluster = start_cluster(90);
    create_topic(&cluster, "audit", 1);
    let client = connect(&cluster).await;
    let info = client.describe_topic("audit").await.expect("describe");
    let victim = info.partitions[0].replicas[1];

    eprintln!("phase: inject a panic into node {victim}'s replica (test-only hook)");
    client.inject_panic(victim, "audit", 0).await.expect("inject");
    let seeds = cluster.addrs[0].to_string();
    let mut restarts = serde_json::Value::Null;
    wait_for("status to report the restart", TIMEOUT, || {
        let json = status_json(&cluster.certs, &seeds);
        restarts = json["replica_restarts"].clone();
        restarts
            .as_array()
            .is_some_and(|r| r.iter().any(|e| e["node"] == victim.0 && e["restarts"] == 1))
    });
    assert!(restarts.to_string().contains("injected fault"), "{restarts}");

    eprintln!("phase: the partition keeps serving, and the restarted replica has every record");
    let mut producer = Producer::new(client.clone(), "audit", Acks::All)
        .await
        .expect("producer");
    for i in 0..50 {
        producer
            .send(
                Some(0),
                Record {
                    value: Some(Bytes::from(format!("{i}"))),
                    ..Record::default()
                },
            )
            .await
            .expect("send");
    }
    producer.flush().await.expect("flush");
    let records = identical_replicas(&client, "audit", 0, &[NodeId(1), NodeId(2), NodeId(3)]).await;
    assert_eq!(records.len(), 50);
}

/// Certificates for `certified` nodes, of which the first `running` are
/// started (seeding each other); returns every reserved address too, so a
/// test can start the rest later.
fn start_nodes(
    certified: usize,
    running: usize,
    first_host: u8,
    env: &[(&str, &str)],
) -> (ProcessCluster, Vec<NodeProcess>, Vec<SocketAddr>) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    certs_init(&certs, certified as u32);
    let addrs: Vec<SocketAddr> = (0..certified)
        .map(|i| free_addr_on_host(first_host + i as u8).expect("a free loopback address"))
        .collect();
    let seeds = &addrs[..running];
    let nodes = (0..running)
        .map(|i| start_node_with(i as u32 + 1, addrs[i], seeds, &certs, scratch.path(), env))
        .collect();
    let cluster = ProcessCluster {
        scratch,
        certs,
        addrs: seeds.to_vec(),
        nodes: Vec::new(),
    };
    (cluster, nodes, addrs)
}

/// Nodes replace a dead node's replicas at once.
const REPLACE_AT_ONCE: [(&str, &str); 1] = [("RUNNEL_REPLACE_AFTER", "0")];

/// `count` node processes that replace dead nodes' replicas at once.
fn start_healing_cluster(count: usize, first_host: u8) -> (ProcessCluster, Vec<NodeProcess>) {
    let (cluster, nodes, _) = start_nodes(count, count, first_host, &REPLACE_AT_ONCE);
    (cluster, nodes)
}

/// Connects through the nodes that are not `dead`.
async fn connect_avoiding(cluster: &ProcessCluster, dead: &[NodeId]) -> Arc<Client> {
    let live: Vec<SocketAddr> = cluster
        .addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| !dead.contains(&NodeId(*i as u32 + 1)))
        .map(|(_, a)| *a)
        .collect();
    Arc::new(Client::connect(live, &cluster.certs).await.expect("connect"))
}

/// Waits until no partition of `topic` has a replica on a `dead` node and
/// every partition's voters are exactly its (live) replicas, with a leader.
async fn wait_healed(client: &Client, topic: &str, dead: &[NodeId]) -> runnel::client::protocol::TopicInfo {
    let deadline = Instant::now() + TIMEOUT;
    let mut last = String::new();
    loop {
        if let Ok(info) = client.describe_topic(topic).await {
            let done = info.partitions.iter().all(|p| {
                let mut voters = p.voters.clone();
                voters.sort_unstable();
                let mut replicas = p.replicas.clone();
                replicas.sort_unstable();
                p.replicas.iter().all(|r| !dead.contains(r)) && voters == replicas && p.leader.is_some()
            });
            if done {
                return info;
            }
            last = format!(
                "{:?}",
                info.partitions
                    .iter()
                    .map(|p| (&p.replicas, &p.voters, p.leader))
                    .collect::<Vec<_>>()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the replication factor was not restored: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn produce_tagged(client: &Arc<Client>, topic: &str, partitions: u32, tag: &str, count: u32) {
    // The node this client asks may apply the topic's creation a moment
    // after the controller committed it.
    let deadline = Instant::now() + TIMEOUT;
    let mut producer = loop {
        match Producer::new(client.clone(), topic, Acks::All).await {
            Ok(producer) => break producer,
            Err(ClientError::UnknownTopic(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("producer: {e:?}"),
        }
    };
    for i in 0..count {
        let record = Record {
            value: Some(Bytes::from(format!("{tag}-{i}"))),
            ..Record::default()
        };
        producer.send(Some(i % partitions), record).await.expect("send");
    }
    producer.flush().await.expect("flush");
}

/// Every replica of every partition holds the same records; returns how many.
async fn records_everywhere(client: &Client, info: &runnel::client::protocol::TopicInfo) -> usize {
    let mut total = 0;
    for partition in &info.partitions {
        total += identical_replicas(client, &info.name, partition.partition, &partition.replicas)
            .await
            .len();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_replicas_are_recreated_elsewhere_until_the_replication_factor_is_restored() {
    let (cluster, mut nodes) = start_healing_cluster(4, 100);
    create_topic(&cluster, "heal", 4);
    let client = connect(&cluster).await;
    produce_tagged(&client, "heal", 4, "before", 200).await;
    let victim = client.describe_topic("heal").await.expect("describe").partitions[0].replicas[2];

    eprintln!("phase: SIGKILL node {victim}, which holds replicas; the controller re-creates them on live nodes");
    nodes[victim.0 as usize - 1].kill();
    let client = connect_avoiding(&cluster, &[victim]).await;
    let healed = wait_healed(&client, "heal", &[victim]).await;
    eprintln!(
        "healed: {:?}",
        healed.partitions.iter().map(|p| &p.voters).collect::<Vec<_>>()
    );

    eprintln!("phase: the partitions keep serving and every replica, old and new, holds the same records");
    produce_tagged(&client, "heal", 4, "after", 200).await;
    assert_eq!(records_everywhere(&client, &healed).await, 400, "every record, once");

    eprintln!("phase: node {victim} comes back; its stale replicas are removed and their files deleted");
    let dir = cluster
        .scratch
        .path()
        .join(format!("data-{victim}"))
        .join("broker")
        .join("partitions");
    let stale_before = std::fs::read_dir(&dir).expect("partitions dir").count();
    assert!(
        stale_before > 1,
        "the victim had partition replicas besides the controller's"
    );
    let addr = cluster.addrs[victim.0 as usize - 1];
    nodes[victim.0 as usize - 1] = start_node_with(
        victim.0,
        addr,
        &cluster.addrs,
        &cluster.certs,
        cluster.scratch.path(),
        &REPLACE_AT_ONCE,
    );
    let assigned_here: Vec<String> = client
        .describe_topic("heal")
        .await
        .expect("describe")
        .partitions
        .iter()
        .filter(|p| p.replicas.contains(&victim))
        .map(|p| p.partition.to_string())
        .collect();
    assert!(assigned_here.is_empty(), "healing moved every replica off the victim");
    // Deleted replicas leave a `<group>.left` tombstone file; only the
    // controller's replica directory stays.
    let names = |want_dirs: bool| -> Vec<String> {
        std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir() == want_dirs)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_for("the stale replica directories to be deleted", TIMEOUT, || {
        names(true) == vec!["0".to_string()]
    });
    let tombstones = names(false);
    assert_eq!(
        tombstones.len(),
        stale_before - 1,
        "a tombstone per deleted replica: {tombstones:?}"
    );
    assert!(tombstones.iter().all(|t| t.ends_with(".left")), "{tombstones:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_two_nodes_of_five_one_after_another_heals_after_each() {
    let (cluster, mut nodes) = start_healing_cluster(5, 110);
    create_topic(&cluster, "twice", 5);
    let client = connect(&cluster).await;
    produce_tagged(&client, "twice", 5, "first", 100).await;
    let mut dead = Vec::new();
    for round in 0..2 {
        let info = client_for(&cluster, &dead)
            .await
            .describe_topic("twice")
            .await
            .expect("describe");
        let victim = info.partitions[round]
            .replicas
            .iter()
            .copied()
            .find(|n| !dead.contains(n))
            .expect("a live replica");
        eprintln!("phase: SIGKILL node {victim}");
        nodes[victim.0 as usize - 1].kill();
        dead.push(victim);
        let client = client_for(&cluster, &dead).await;
        let healed = wait_healed(&client, "twice", &dead).await;
        produce_tagged(&client, "twice", 5, &format!("after-kill-{round}"), 100).await;
        assert_eq!(
            records_everywhere(&client, &healed).await,
            100 * (round + 2),
            "round {round}"
        );
    }
}

async fn client_for(cluster: &ProcessCluster, dead: &[NodeId]) -> Arc<Client> {
    connect_avoiding(cluster, dead).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_controller_leader_during_re_replication_still_heals() {
    // Six nodes, two partitions of three replicas on disjoint nodes: the two
    // nodes killed below never hold the same partition, so every partition
    // keeps a quorum (a partition that loses two of three voters cannot
    // commit anything, a configuration change included, by design).
    let (cluster, mut nodes) = start_healing_cluster(6, 120);
    create_topic(&cluster, "steady", 2);
    let client = connect(&cluster).await;
    produce_tagged(&client, "steady", 2, "before", 100).await;
    client.topics().await.expect("metadata");
    let controller = client
        .controller_leader()
        .expect("the answering node knows the controller leader");
    let info = client.describe_topic("steady").await.expect("describe");
    let victim = info
        .partitions
        .iter()
        .find(|p| !p.replicas.contains(&controller))
        .and_then(|p| p.replicas.first().copied())
        .expect("a partition without the controller leader");

    eprintln!(
        "phase: SIGKILL node {victim} (replicas) and, during its re-replication, node {controller} (controller leader)"
    );
    nodes[victim.0 as usize - 1].kill();
    std::thread::sleep(Duration::from_millis(300));
    nodes[controller.0 as usize - 1].kill();
    let dead = [victim, controller];
    let client = connect_avoiding(&cluster, &dead).await;
    let healed = wait_healed(&client, "steady", &dead).await;
    eprintln!(
        "healed: {:?}",
        healed.partitions.iter().map(|p| &p.voters).collect::<Vec<_>>()
    );
    produce_tagged(&client, "steady", 2, "after", 100).await;
    assert_eq!(records_everywhere(&client, &healed).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_enough_live_nodes_a_partition_serves_under_replicated_and_heals_when_a_node_joins() {
    let (cluster, mut nodes, addrs) = start_nodes(4, 3, 130, &REPLACE_AT_ONCE);
    let seeds = &addrs[..3];
    create_topic(&cluster, "thin", 1);
    let client = connect(&cluster).await;
    produce_tagged(&client, "thin", 1, "before", 50).await;

    eprintln!("phase: kill node 3 of 3: nowhere to re-create its replica; the partition serves, under-replicated");
    nodes[2].kill();
    let client = connect_avoiding(&cluster, &[NodeId(3)]).await;
    produce_tagged(&client, "thin", 1, "degraded", 50).await;
    let info = client.describe_topic("thin").await.expect("describe");
    assert!(
        info.partitions[0].replicas.contains(&NodeId(3)),
        "no live node could take the replica"
    );
    wait_for("the partition to be marked under-replicated", TIMEOUT, || {
        let output = runnel()
            .args(["topic", "describe", "thin", "--json", "--seeds", &addrs[0].to_string()])
            .arg("--certs")
            .arg(&cluster.certs)
            .output()
            .expect("describe");
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        json["partitions"][0]["under_replicated"] == true
    });
    let status = runnel()
        .args(["status", "--json", "--seeds", &addrs[0].to_string()])
        .arg("--certs")
        .arg(&cluster.certs)
        .output()
        .expect("status");
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(
        json["under_replicated"][0]["topic"], "thin",
        "runnel status shows it: {json}"
    );

    eprintln!("phase: node 4 joins; the replica moves there and the partition heals");
    nodes.push(start_node_with(
        4,
        addrs[3],
        seeds,
        &cluster.certs,
        cluster.scratch.path(),
        &REPLACE_AT_ONCE,
    ));
    let client = connect_avoiding(&cluster, &[NodeId(3)]).await;
    let healed = wait_healed(&client, "thin", &[NodeId(3)]).await;
    assert!(healed.partitions[0].replicas.contains(&NodeId(4)));
    assert_eq!(records_everywhere(&client, &healed).await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_shows_failover_and_healing_as_events() {
    let (cluster, mut nodes) = start_healing_cluster(4, 140);
    create_topic(&cluster, "watched", 2);
    let client = connect(&cluster).await;
    let victim = client.describe_topic("watched").await.expect("describe").partitions[0].replicas[1];
    let watcher = runnel()
        .args([
            "status",
            "--watch",
            "--interval-ms",
            "200",
            "--count",
            "40",
            "--json",
            "--seeds",
            &cluster.addrs[0].to_string(),
        ])
        .arg("--certs")
        .arg(&cluster.certs)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn watch");
    std::thread::sleep(Duration::from_millis(1500));
    eprintln!("phase: SIGKILL node {victim} while the watcher runs");
    nodes[victim.0 as usize - 1].kill();
    let output = watcher.wait_with_output().expect("watch output");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!text.contains('\x1b'), "no screen codes in JSON lines");
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(
        events
            .iter()
            .all(|e| e["at_unix_ms"].as_u64().is_some() && e["event"].is_string()),
        "{text}"
    );
    assert!(text.contains("watched/0"), "partitions are listed");
    assert!(
        text.contains(&format!("node {victim}: alive -> ")),
        "the node's failure is an event:\n{text}"
    );
    assert!(
        text.contains("watched/0: voters"),
        "re-replication shows as a voters event:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_moves_replicas_to_a_new_node_without_dropping_below_the_replication_factor() {
    let (cluster, mut nodes, addrs) = start_nodes(4, 3, 150, &[]);
    let seeds = &addrs[..3];
    create_topic(&cluster, "spread", 6);
    let client = connect(&cluster).await;
    produce_tagged(&client, "spread", 6, "before", 120).await;

    eprintln!("phase: node 4 joins; `runnel rebalance` moves replicas onto it");
    nodes.push(start_node(4, addrs[3], seeds, &cluster.certs, cluster.scratch.path()));
    wait_for("node 4 to be alive", TIMEOUT, || {
        states(addrs[0], &cluster.certs).is_some_and(|s| s.iter().any(|(id, state, _)| *id == 4 && state == "alive"))
    });
    let output = runnel()
        .args(["rebalance", "--seeds", &addrs[0].to_string()])
        .arg("--certs")
        .arg(&cluster.certs)
        .output()
        .expect("rebalance");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let client = Arc::new(Client::connect(addrs.clone(), &cluster.certs).await.expect("connect"));
    let healed = wait_healed(&client, "spread", &[]).await;
    let mut load = BTreeMap::new();
    for partition in &healed.partitions {
        assert_eq!(partition.voters.len(), 3, "never below the replication factor");
        for &replica in &partition.replicas {
            *load.entry(replica).or_insert(0) += 1;
        }
    }
    assert!(
        load.values().all(|&l| l == 4 || l == 5),
        "replicas spread over four nodes: {load:?}"
    );
    produce_tagged(&client, "spread", 6, "after", 120).await;
    assert_eq!(records_everywhere(&client, &healed).await, 240);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_keeps_crashing_is_reported_and_placed_on_another_node() {
    let (cluster, _nodes) = start_healing_cluster(4, 160);
    create_topic(&cluster, "fragile", 1);
    let client = connect(&cluster).await;
    produce_tagged(&client, "fragile", 1, "before", 50).await;
    let info = client.describe_topic("fragile").await.expect("describe");
    let victim = *info.partitions[0]
        .replicas
        .iter()
        .find(|&&n| Some(n) != info.partitions[0].leader)
        .expect("a follower");

    eprintln!("phase: crash node {victim}'s replica until its supervisor gives up");
    // (restarts, failed) of the victim's replica, as `runnel status --json` reports them.
    let health = || {
        let json = status_json(&cluster.certs, &cluster.addrs[victim.0 as usize - 1].to_string());
        json["replica_restarts"]
            .as_array()
            .and_then(|r| r.iter().find(|e| e["node"] == victim.0))
            .map_or((0, false), |e| {
                (e["restarts"].as_u64().unwrap_or(0), e["failed"] == true)
            })
    };
    let deadline = Instant::now() + TIMEOUT;
    let mut last_refusal: Option<String> = None;
    loop {
        let (restarts, failed) = health();
        if failed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the supervisor never gave up ({restarts} restarts)"
        );
        // Refused while the replica is between restarts; accepted once it is back.
        match client.inject_panic(victim, "fragile", 0).await {
            Ok(()) => {
                wait_for("the crash to be counted", TIMEOUT, || {
                    let (now, failed) = health();
                    now > restarts || failed
                });
            }
            Err(e) => {
                if last_refusal.as_ref() != Some(&e.to_string()) {
                    eprintln!("injecting a panic was refused: {e}");
                    last_refusal = Some(e.to_string());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    eprintln!("phase: the failed replica is reported to the controller and re-created on another node");
    let healed = wait_healed(&client, "fragile", &[victim]).await;
    assert!(!healed.partitions[0].replicas.contains(&victim));
    produce_tagged(&client, "fragile", 1, "after", 50).await;
    assert_eq!(records_everywhere(&client, &healed).await, 100);
}

/// The replica directory of `topic`'s only partition on node `id`, once the
/// node has made it (a node hosts a new topic's replica a moment after the
/// topic is created).
fn replica_dir(cluster: &ProcessCluster, id: NodeId) -> std::path::PathBuf {
    let partitions = cluster
        .scratch
        .path()
        .join(format!("data-{}", id.0))
        .join("broker")
        .join("partitions");
    let list = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&partitions)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n != "0"))
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_for("the node to host the topic's replica", TIMEOUT, || !list().is_empty());
    let groups = list();
    assert_eq!(groups.len(), 1, "one partition besides the controller: {groups:?}");
    groups[0].clone()
}

/// Ways a stopped node's replica files get damaged.
#[derive(Clone, Copy, Debug)]
enum Damage {
    GarbageRaftMeta,
    GarbageLogMeta,
    FlippedByteMidSegment,
    DeletedSegment,
}

/// Damages the replica in `dir`; returns what the node must name.
fn damage(dir: &std::path::Path, kind: Damage) -> &'static str {
    let segment = dir.join("log").join("00000000000000000000.log");
    match kind {
        Damage::GarbageRaftMeta => {
            std::fs::write(dir.join("raft.meta"), b"not a replica's hard state").expect("garbage");
            "raft.meta"
        }
        Damage::GarbageLogMeta => {
            std::fs::write(dir.join("log").join("log.meta"), b"not a log's metadata").expect("garbage");
            "log.meta"
        }
        Damage::FlippedByteMidSegment => {
            // Inside the first batch's records, with the next round's batch
            // after it: damage in the middle of the data. (A flip in the
            // last batch reads as a torn write, which recovery cuts off.)
            let mut bytes = std::fs::read(&segment).expect("segment");
            let inside_first_batch = runnel::storage::batch::BATCH_HEADER_BYTES + 10;
            assert!(bytes.len() > 2 * inside_first_batch, "two batches");
            bytes[inside_first_batch] ^= 0xFF;
            std::fs::write(&segment, bytes).expect("flip");
            "00000000000000000000.log"
        }
        Damage::DeletedSegment => {
            std::fs::remove_file(&segment).expect("delete the segment");
            ""
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_damaged_files_are_reported_quarantined_and_rebuilt_from_their_peers() {
    let mut cluster = start_cluster(215);
    create_topic(&cluster, "damaged", 1);
    let client = connect(&cluster).await;
    let mut produced = 0;
    let kinds = [
        Damage::GarbageRaftMeta,
        Damage::FlippedByteMidSegment,
        Damage::GarbageLogMeta,
        Damage::DeletedSegment,
    ];
    for (round, kind) in kinds.into_iter().enumerate() {
        produce_tagged(&client, "damaged", 1, &format!("round-{round}"), 50).await;
        produced += 50;
        let info = client.describe_topic("damaged").await.expect("describe");
        let victim = *info.partitions[0]
            .replicas
            .iter()
            .find(|&&n| Some(n) != info.partitions[0].leader)
            .expect("a follower");
        eprintln!("phase: {kind:?} on node {victim}'s replica while it is stopped");
        // The victim holds every record before it stops (acks=all answers
        // once two of three do; a clean-clone CI run once stopped it before
        // it had even made its replica's directory).
        let nodes: Vec<NodeId> = info.partitions[0].replicas.clone();
        let held = identical_replicas(&client, "damaged", 0, &nodes).await;
        assert_eq!(held.len(), produced, "every replica caught up before the damage");
        let dir = replica_dir(&cluster, victim);
        let index = victim.0 as usize - 1;
        cluster.nodes[index].kill();
        let named = damage(&dir, kind);
        cluster.nodes[index] = start_node(
            victim.0,
            cluster.addrs[index],
            &cluster.addrs,
            &cluster.certs,
            cluster.scratch.path(),
        );
        let repaired = wait_repaired(&cluster, victim);
        let log = cluster.nodes[index].log_text();
        let detected = log
            .lines()
            .rev()
            .find(|l| l.contains("replica files are damaged"))
            .unwrap_or_else(|| panic!("node {victim} logs the damage ({kind:?})"))
            .to_string();
        eprintln!("{kind:?}: {}", detected.rsplit("reason=").next().unwrap_or_default());
        assert!(detected.contains(named), "names the file: {detected}");
        let settled = wait_settled(&cluster);
        eprintln!("{kind:?}: repaired {repaired:?} after the restart, settled {settled:?} later");
        let records = identical_replicas(&client, "damaged", 0, &nodes).await;
        assert_eq!(
            records.len(),
            produced,
            "every acknowledged record on every replica, the rebuilt one too"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_last_copy_is_kept_and_its_partition_refuses_writes_saying_why() {
    let mut cluster = start_cluster(190);
    let seeds = cluster.addrs[0].to_string();
    wait_for("the topic to be created", TIMEOUT, || {
        runnel()
            .args(["topic", "create", "solo", "-p", "1", "-r", "1", "--seeds", &seeds])
            .arg("--certs")
            .arg(&cluster.certs)
            .status()
            .is_ok_and(|s| s.success())
    });
    let client = connect(&cluster).await;
    let owner = wait_for_leader(&client, "solo").await;
    for i in 0..20 {
        produce_one(&client, "solo", &format!("kept-{i}"), Acks::All)
            .await
            .expect("acknowledged");
    }
    let index = owner.0 as usize - 1;
    let dir = replica_dir(&cluster, owner);
    cluster.nodes[index].kill();
    damage(&dir, Damage::GarbageRaftMeta);
    cluster.nodes[index] = start_node(
        owner.0,
        cluster.addrs[index],
        &cluster.addrs,
        &cluster.certs,
        cluster.scratch.path(),
    );
    let all: Vec<String> = cluster.addrs.iter().map(SocketAddr::to_string).collect();
    wait_for("describe to name the damage", TIMEOUT, || {
        let output = runnel()
            .args(["topic", "describe", "solo", "--json", "--seeds", &all.join(",")])
            .arg("--certs")
            .arg(&cluster.certs)
            .output()
            .expect("describe");
        let described: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        described["partitions"][0]["problems"].to_string().contains("damaged")
    });
    let refused = produce_stdin(&cluster, &["solo"], b"one more\n");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("is damaged and takes no reads or writes until it is repaired"),
        "{stderr}"
    );
    assert!(stderr.contains("raft.meta"), "names the file: {stderr}");
    // The only copy is never moved aside or rebuilt empty.
    let garbage = std::fs::read(dir.join("raft.meta")).expect("the damaged files stay");
    assert_eq!(garbage, b"not a replica's hard state");
    let quarantine = dir
        .parent()
        .and_then(|p| p.parent())
        .expect("broker dir")
        .join("quarantine");
    assert!(
        std::fs::read_dir(&quarantine).map_or(0, |d| d.count()) == 0,
        "nothing quarantined"
    );
}

/// Waits for node `victim` to repair its replica: a new quarantined
/// directory, and `runnel status` saying so.
fn wait_repaired(cluster: &ProcessCluster, victim: NodeId) -> Duration {
    let seeds = cluster.addrs[victim.0 as usize - 1].to_string();
    let quarantine = cluster
        .scratch
        .path()
        .join(format!("data-{}", victim.0))
        .join("broker")
        .join("quarantine");
    let before = std::fs::read_dir(&quarantine).map_or(0, |d| d.count());
    wait_for("status to report the repair", TIMEOUT, || {
        let json = status_json(&cluster.certs, &seeds);
        let now = std::fs::read_dir(&quarantine).map_or(0, |d| d.count());
        now > before
            && json["replica_restarts"]
                .to_string()
                .contains("repaired: damaged files moved to")
    })
}

/// Waits until `topic describe` finds the partition settled on three voters.
fn wait_settled(cluster: &ProcessCluster) -> Duration {
    let all: Vec<String> = cluster.addrs.iter().map(SocketAddr::to_string).collect();
    wait_for("the partition to settle with three voters", TIMEOUT, || {
        let output = runnel()
            .args(["topic", "describe", "damaged", "--json", "--seeds", &all.join(",")])
            .arg("--certs")
            .arg(&cluster.certs)
            .output()
            .expect("describe");
        let described: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        let partition = &described["partitions"][0];
        partition["under_replicated"] == false && partition["voters"].as_array().is_some_and(|v| v.len() == 3)
    })
}

/// How long node `victim` takes, from its start, until its replica of
/// `topic` holds `records` committed records.
async fn restart_and_time(cluster: &mut ProcessCluster, client: &Client, victim: NodeId, records: usize) -> Duration {
    let index = victim.0 as usize - 1;
    let started = Instant::now();
    cluster.nodes[index] = start_node(
        victim.0,
        cluster.addrs[index],
        &cluster.addrs,
        &cluster.certs,
        cluster.scratch.path(),
    );
    loop {
        if replica_records(client, victim, "tidy", 0)
            .await
            .is_ok_and(|r| r.len() == records)
        {
            return started.elapsed();
        }
        assert!(started.elapsed() < TIMEOUT, "node {victim}'s replica never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_saves_indexes_and_log_metadata_so_a_restart_skips_recovery() {
    let mut cluster = start_cluster(220);
    create_topic(&cluster, "tidy", 1);
    let client = connect(&cluster).await;
    produce_tagged(&client, "tidy", 1, "before", 200).await;
    let victim = NodeId(3);
    let log_dir = replica_dir(&cluster, victim).join("log");
    // Acknowledged on a majority: under load node 3's replica may not hold
    // them yet, or not exist yet.
    let started = Instant::now();
    while !replica_records(&client, victim, "tidy", 0)
        .await
        .is_ok_and(|r| r.len() == 200)
    {
        assert!(
            started.elapsed() < TIMEOUT,
            "node {victim}'s replica never held the 200 records"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    eprintln!("phase: SIGTERM node {victim}: a clean stop");
    cluster.nodes[2].signal("-TERM").expect("SIGTERM");
    wait_for("node 3 to stop", TIMEOUT, || !cluster.nodes[2].is_running());
    for file in [
        "00000000000000000000.index",
        "00000000000000000000.timeindex",
        "log.meta",
    ] {
        if !log_dir.join(file).exists() {
            panic!(
                "{file} is not saved at a clean stop; node 3 logged:\n{}",
                cluster.nodes[2].log_text()
            );
        }
    }
    let meta = std::fs::read(log_dir.join("log.meta")).expect("log.meta");
    assert!(
        meta.windows(b"clean_shutdown".len()).any(|w| w == b"clean_shutdown"),
        "log.meta marks the clean shutdown, so the next open trusts the indexes"
    );
    let clean = restart_and_time(&mut cluster, &client, victim, 200).await;

    eprintln!("phase: SIGKILL node {victim}: the next start recovers");
    cluster.nodes[2].kill();
    let crashed = restart_and_time(&mut cluster, &client, victim, 200).await;
    eprintln!(
        "restart until the replica serves its 200 records: {clean:?} after a clean stop, {crashed:?} after SIGKILL"
    );
}

/// A node that just restarted has not applied the controller log up to its
/// commit point yet. Asked at once about a topic that exists, it must answer
/// right or "retry", never "does not exist" (it catches up with the
/// controller leader before a negative answer).
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_node_asked_at_once_never_says_an_existing_topic_does_not_exist() {
    use runnel::client::protocol::{decode_payload, encode_payload, ClientRequest, ClientResponse, CLIENT_ACTOR};
    use runnel::cluster::protocol::{NodeRequest, NodeResponse};

    let mut cluster = start_cluster(195);
    create_topic(&cluster, "m", 3);
    let victim = 2;
    cluster.nodes[victim].kill();
    cluster.nodes[victim] = start_node(
        3,
        cluster.addrs[victim],
        &cluster.addrs,
        &cluster.certs,
        cluster.scratch.path(),
    );
    let identity = runnel::cluster::tls::CertDir::new(&cluster.certs)
        .client_identity()
        .expect("identity");
    let raw = runnel::cluster::quic::ClusterClient::new(&identity, vec![cluster.addrs[victim]]).expect("client");
    let requests = [
        ClientRequest::DescribeTopic { name: "m".into() },
        ClientRequest::Fetch {
            topic: "m".into(),
            partition: 1,
            offset: 0,
            max_bytes: 1024,
            any_replica: true,
        },
    ];
    let (mut right, mut retry, mut wrong) = (0, 0, Vec::new());
    let started = Instant::now();
    while right < 40 && started.elapsed() < TIMEOUT {
        for request in &requests {
            let wire = NodeRequest::Service {
                name: CLIENT_ACTOR.to_string(),
                payload: encode_payload(request).expect("encode"),
            };
            let answer = raw
                .request_to(cluster.addrs[victim], wire, Duration::from_secs(5))
                .await;
            let Ok(NodeResponse::Service(bytes)) = answer else {
                continue; // not listening yet, or its service not registered yet
            };
            match decode_payload::<ClientResponse>(&bytes).expect("decode") {
                ClientResponse::Topic(_) | ClientResponse::Fetched { .. } => right += 1,
                ClientResponse::UnknownTopic(_) | ClientResponse::PartitionOutOfRange { .. } => {
                    wrong.push(format!("{request:?}"))
                }
                other => {
                    let retryable = matches!(&other, ClientResponse::NotHere { .. } | ClientResponse::Failed(_));
                    assert!(retryable, "{other:?}");
                    retry += 1;
                }
            }
        }
    }
    eprintln!(
        "answers from the restarted node: {right} right, {retry} retry, {} wrong",
        wrong.len()
    );
    let first: Vec<_> = wrong.iter().take(3).collect();
    assert!(
        wrong.is_empty(),
        "said an existing topic does not exist {} times: {first:?}",
        wrong.len()
    );
    assert!(right >= 40, "only {right} right answers in {TIMEOUT:?}");
}

/// How many partitions of `topic` each node leads (a partition without a
/// leader counts under node 0).
async fn leader_counts(client: &Client, topic: &str) -> BTreeMap<u32, usize> {
    let mut counts = BTreeMap::new();
    if let Ok(info) = client.describe_topic(topic).await {
        for p in info.partitions {
            *counts.entry(p.leader.map_or(0, |l| l.0)).or_default() += 1;
        }
    }
    counts
}

/// After a killed node comes back, preferred-leader election hands it its
/// share of leaders again: every node leads within one of even.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_killed_node_returns_leaders_spread_evenly_again() {
    let mut cluster = start_cluster(205);
    create_topic(&cluster, "spread", 6);
    let client = connect(&cluster).await;
    let even = |counts: &BTreeMap<u32, usize>| (1..=3).all(|n| counts.get(&n).is_some_and(|c| (1..=3).contains(c)));
    let deadline = Instant::now() + TIMEOUT;
    while !even(&leader_counts(&client, "spread").await) {
        assert!(
            Instant::now() < deadline,
            "leaders never spread: {:?}",
            leader_counts(&client, "spread").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    cluster.nodes[0].kill();
    let survivors = Arc::new(
        Client::connect(cluster.addrs[1..].to_vec(), &cluster.certs)
            .await
            .expect("connect"),
    );
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let counts = leader_counts(&survivors, "spread").await;
        if !counts.contains_key(&1) && !counts.contains_key(&0) && counts.values().sum::<usize>() == 6 {
            break;
        }
        assert!(Instant::now() < deadline, "node 1's partitions never moved: {counts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    cluster.nodes[0] = start_node(
        1,
        cluster.addrs[0],
        &cluster.addrs,
        &cluster.certs,
        cluster.scratch.path(),
    );
    let returned = Instant::now();
    let deadline = returned + TIMEOUT;
    loop {
        let counts = leader_counts(&survivors, "spread").await;
        if even(&counts) {
            eprintln!(
                "leaders spread again {:.1} s after node 1 returned: {counts:?}",
                returned.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(Instant::now() < deadline, "leaders never spread again: {counts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One record to partition 0, not idempotent, as `acks` asks.
async fn produce_one(client: &Client, topic: &str, value: &str, acks: Acks) -> Result<u64, ClientError> {
    produce_one_to(client, topic, 0, value, acks).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_all_needs_min_insync_replicas_in_sync_and_holding_the_record() {
    use runnel::client::protocol::BrokerError;
    let mut cluster = start_cluster(110);
    let seeds = cluster.addrs[0].to_string();
    wait_for("the topic to be created", TIMEOUT, || {
        runnel()
            .args([
                "topic",
                "create",
                "strict",
                "-p",
                "1",
                "-r",
                "3",
                "--min-insync",
                "3",
                "--seeds",
                &seeds,
            ])
            .arg("--certs")
            .arg(&cluster.certs)
            .status()
            .is_ok_and(|s| s.success())
    });
    let client = connect(&cluster).await;
    let leader = wait_for_leader(&client, "strict").await;
    produce_one(&client, "strict", "all three", Acks::All)
        .await
        .expect("three replicas in sync");

    let victim = [NodeId(1), NodeId(2), NodeId(3)]
        .into_iter()
        .find(|n| *n != leader)
        .expect("a follower");
    eprintln!("phase: SIGKILL follower {victim}; acks=all needs all three");
    cluster.nodes[victim.0 as usize - 1].kill();
    // The follower counts as in sync until it has lagged 5 s: a record
    // sent meanwhile commits on two replicas and is then answered as short
    // of copies; after that, acks=all is refused up front.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match produce_one(&client, "strict", "while one is down", Acks::All).await {
            Err(ClientError::Broker(BrokerError::NotEnoughReplicas {
                in_sync: 2,
                required: 3,
                ..
            })) => break,
            Err(ClientError::Broker(BrokerError::NotEnoughReplicasAfterAppend {
                copies: 2, required: 3, ..
            })) => {}
            other => assert!(Instant::now() < deadline, "acks=all with a replica down: {other:?}"),
        }
    }
    produce_one(&client, "strict", "leader only", Acks::Leader)
        .await
        .expect("acks=leader does not need the replicas");

    eprintln!("phase: node {victim} returns and catches up; acks=all is accepted again");
    cluster.nodes[victim.0 as usize - 1] = start_node(
        victim.0,
        cluster.addrs[victim.0 as usize - 1],
        &cluster.addrs,
        &cluster.certs,
        cluster.scratch.path(),
    );
    let deadline = Instant::now() + TIMEOUT;
    while let Err(e) = produce_one(&client, "strict", "all three again", Acks::All).await {
        assert!(Instant::now() < deadline, "acks=all after the replica returned: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The leader of partition 0 of `topic`, once it has one.
async fn wait_for_leader(client: &Client, topic: &str) -> NodeId {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(leader) = client
            .describe_topic(topic)
            .await
            .ok()
            .and_then(|t| t.partitions[0].leader)
        {
            return leader;
        }
        assert!(Instant::now() < deadline, "no leader of {topic}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `runnel topic ARGS` against the cluster; its output.
fn topic_cli(cluster: &ProcessCluster, args: &[&str]) -> std::process::Output {
    runnel()
        .arg("topic")
        .args(args)
        .args(["--seeds", &cluster.addrs[0].to_string()])
        .arg("--certs")
        .arg(&cluster.certs)
        .output()
        .expect("runnel topic")
}

fn topic_json(cluster: &ProcessCluster, name: &str) -> serde_json::Value {
    let output = topic_cli(cluster, &["describe", name, "--json"]);
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("describe --json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alter_changes_settings_all_or_none_and_added_partitions_serve_at_once() {
    let cluster = start_cluster(225);
    create_topic(&cluster, "grow", 2);
    let altered = topic_cli(
        &cluster,
        &["alter", "grow", "-c", "min.insync.replicas=3", "-c", "retention.ms=-1"],
    );
    assert!(altered.status.success(), "{altered:?}");
    let config = topic_json(&cluster, "grow")["config"].clone();
    assert_eq!(
        (config["min_insync"].as_u64(), config["retention_ms"].is_null()),
        (Some(3), true)
    );

    let too_many = topic_cli(
        &cluster,
        &[
            "alter",
            "grow",
            "-c",
            "retention.ms=60000",
            "-c",
            "min.insync.replicas=4",
        ],
    );
    let stderr = String::from_utf8_lossy(&too_many.stderr);
    assert!(
        !too_many.status.success() && stderr.contains("min-insync must be in [1, 3], not 4"),
        "{stderr}"
    );
    assert!(
        topic_json(&cluster, "grow")["config"]["retention_ms"].is_null(),
        "all or none"
    );
    let unknown = topic_cli(&cluster, &["alter", "grow", "-c", "segment.bytes=1"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        !unknown.status.success() && stderr.contains("segment.bytes"),
        "{stderr}"
    );

    let grown = topic_cli(&cluster, &["add-partitions", "grow", "-p", "4"]);
    assert!(grown.status.success(), "{grown:?}");
    let described = topic_json(&cluster, "grow");
    assert_eq!(described["config"]["partitions"], 4);
    assert_eq!(described["partitions"].as_array().map(Vec::len), Some(4));
    let fewer = topic_cli(&cluster, &["add-partitions", "grow", "-p", "3"]);
    let stderr = String::from_utf8_lossy(&fewer.stderr);
    assert!(
        !fewer.status.success() && stderr.contains("can only be added"),
        "{stderr}"
    );

    // The new partitions elect leaders and take acks=all writes (all
    // three replicas, as min.insync.replicas=3 now asks).
    let client = connect(&cluster).await;
    let deadline = Instant::now() + TIMEOUT;
    let offset = loop {
        match produce_one_to(&client, "grow", 3, "in a new partition", Acks::All).await {
            Ok(offset) => break offset,
            Err(e) => assert!(Instant::now() < deadline, "produce to partition 3: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let fetched = client.fetch("grow", 3, offset, 1 << 20).await.expect("fetch");
    assert_eq!(
        fetched.records.first().and_then(|r| r.record.value.clone()),
        Some(Bytes::from_static(b"in a new partition"))
    );
    let members = identical_replicas(&client, "grow", 3, &[NodeId(1), NodeId(2), NodeId(3)]).await;
    assert_eq!(members.len(), 1, "all three replicas of partition 3 hold it");
    records_are_deleted_by_hand(&cluster, &client, offset).await;
}

/// `runnel topic delete-records`: partition 3 of `grow` (one record, at
/// `offset`) deleted up to its high watermark; every replica then starts
/// past it. Past the high watermark and on a topic holding state, refused.
async fn records_are_deleted_by_hand(cluster: &ProcessCluster, client: &Client, offset: u64) {
    let deleted = topic_cli(cluster, &["delete-records", "grow", "-p", "3"]);
    let stdout = String::from_utf8_lossy(&deleted.stdout);
    let start = offset + 1;
    assert!(
        deleted.status.success() && stdout.contains(&format!("grow/3 now starts at offset {start}")),
        "{deleted:?}"
    );
    match client.fetch("grow", 3, offset, 1 << 20).await {
        Err(ClientError::Broker(runnel::client::BrokerError::OffsetOutOfRange { start: at, .. })) => {
            assert_eq!(at, start)
        }
        other => panic!("the deleted record read: {other:?}"),
    }
    for node in [NodeId(1), NodeId(2), NodeId(3)] {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match client.fetch_from_replica(node, "grow", 3, 0, 1024).await {
                Err(ClientError::Broker(runnel::client::BrokerError::OffsetOutOfRange { start: at, .. }))
                    if at == start =>
                {
                    break
                }
                other => assert!(Instant::now() < deadline, "node {node}'s replica: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let past = topic_cli(cluster, &["delete-records", "grow", "-p", "3", "--before", "999"]);
    let stderr = String::from_utf8_lossy(&past.stderr);
    assert!(!past.status.success() && stderr.contains("999"), "{stderr}");
    // A commit makes the offsets topic, which holds groups' state.
    let committed = std::collections::BTreeMap::from([(3, start)]);
    client
        .commit_offsets("readers", "grow", &committed)
        .await
        .expect("commit");
    let state = topic_cli(cluster, &["delete-records", "__consumer_offsets", "-p", "0"]);
    let stderr = String::from_utf8_lossy(&state.stderr);
    assert!(!state.status.success() && stderr.contains("holds state"), "{stderr}");
}

/// One record to `partition`, not idempotent, as `acks` asks.
async fn produce_one_to(
    client: &Client,
    topic: &str,
    partition: u32,
    value: &str,
    acks: Acks,
) -> Result<u64, ClientError> {
    let mut builder = BatchBuilder::new();
    builder
        .push(&Record {
            value: Some(Bytes::from(value.to_string())),
            ..Record::default()
        })
        .expect("push");
    client
        .produce(topic, partition, builder.build().expect("build"), acks)
        .await
}

/// Where a replica's log starts, as a fetch at offset 0 from it says.
async fn replica_start(client: &Client, node: NodeId, topic: &str) -> Result<u64, ClientError> {
    match client.fetch_from_replica(node, topic, 0, 0, 1024).await {
        Ok(_) => Ok(0),
        Err(ClientError::Broker(runnel::client::BrokerError::OffsetOutOfRange { start, .. })) => Ok(start),
        Err(e) => Err(e),
    }
}

/// `retention.ms` is enforced: records an hour old, kept under the default
/// week, go once the topic's retention is altered to a minute — every closed
/// segment on every replica, the active one stays — and readers start from
/// the oldest record left: a fetch below it is refused naming it,
/// `consume -o beginning` starts there. The partition takes writes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_expired_segments_on_every_replica_and_readers_start_after_them() {
    let (cluster, _nodes, _) = start_nodes(3, 3, 230, &[("RUNNEL_SEGMENT_BYTES", "4096")]);
    create_topic(&cluster, "aging", 1);
    let client = connect(&cluster).await;
    let an_hour_ago_ms = runnel::client::unix_now_ms() - 3_600_000;
    for b in 0..30 {
        let mut builder = BatchBuilder::new();
        for r in 0..20 {
            let record = Record {
                timestamp_ms: an_hour_ago_ms,
                value: Some(Bytes::from(format!("old-{b}-{r:<80}"))),
                ..Record::default()
            };
            builder.push(&record).expect("push");
        }
        let batch = builder.build().expect("build");
        let deadline = Instant::now() + TIMEOUT;
        while let Err(e) = client.produce("aging", 0, batch.clone(), Acks::All).await {
            assert!(Instant::now() < deadline, "produce: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let nodes = [NodeId(1), NodeId(2), NodeId(3)];
    let all = identical_replicas(&client, "aging", 0, &nodes).await;
    assert_eq!(all.len(), 600, "kept under the default retention of a week");

    let altered = topic_cli(&cluster, &["alter", "aging", "-c", "retention.ms=60000"]);
    assert!(altered.status.success(), "{altered:?}");
    let deadline = Instant::now() + TIMEOUT;
    let starts = loop {
        let mut starts = Vec::new();
        for &node in &nodes {
            starts.push(replica_start(&client, node, "aging").await.unwrap_or(0));
        }
        if starts.iter().all(|&s| s > 0) {
            break starts;
        }
        assert!(Instant::now() < deadline, "retention never ran: log starts {starts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        starts.windows(2).all(|w| w[0] == w[1]),
        "replicas start apart: {starts:?}"
    );
    let start = starts[0];
    let described = topic_json(&cluster, "aging");
    assert_eq!(described["partitions"][0]["start_offset"], start, "{described}");
    let left = identical_replicas_from(&client, "aging", start, &nodes).await;
    assert!(!left.is_empty() && left.len() < 600, "{} records left", left.len());
    assert_eq!(left[0].offset, start);
    assert_eq!(
        left[..],
        all[all.len() - left.len()..],
        "the newest records stay, unchanged"
    );

    let offset = produce_one_to(&client, "aging", 0, "new", Acks::All)
        .await
        .expect("a write after retention");
    let consumed = runnel()
        .args([
            "consume",
            "aging",
            "-o",
            "beginning",
            "-e",
            "--seeds",
            &cluster.addrs[0].to_string(),
        ])
        .arg("--certs")
        .arg(&cluster.certs)
        .output()
        .expect("consume");
    let printed = String::from_utf8_lossy(&consumed.stdout);
    let lines: Vec<&str> = printed.lines().collect();
    assert!(consumed.status.success(), "{consumed:?}");
    assert_eq!(lines.len(), left.len() + 1, "{printed}");
    assert_eq!(lines.last(), Some(&"new"));
    assert!(offset > start);
}

/// As [`identical_replicas`], reading each replica from `start`.
async fn identical_replicas_from(client: &Client, topic: &str, start: u64, nodes: &[NodeId]) -> Vec<StoredRecord> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut copies = Vec::new();
        for &node in nodes {
            let mut records = Vec::new();
            let mut offset = start;
            while let Ok(fetched) = client.fetch_from_replica(node, topic, 0, offset, 4 << 20).await {
                if fetched.next_offset == offset {
                    copies.push(std::mem::take(&mut records));
                    break;
                }
                offset = fetched.next_offset;
                records.extend(fetched.records);
            }
        }
        if copies.len() == nodes.len() && copies.windows(2).all(|w| w[0] == w[1]) {
            return copies.swap_remove(0);
        }
        assert!(Instant::now() < deadline, "replicas never agreed from offset {start}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `cleanup.policy=compact`: on every replica the closed segments keep
/// only the latest record of each key (a tombstone too, within
/// `delete.retention.ms`), at its offset; replicas compact on their own
/// and agree on every offset they both hold; a consumer reads the latest
/// values across the gaps; a record without a key is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_topic_keeps_the_latest_record_of_each_key_on_every_replica() {
    let (cluster, _nodes, _) = start_nodes(3, 3, 170, &[("RUNNEL_SEGMENT_BYTES", "4096")]);
    let seeds = cluster.addrs[0].to_string();
    wait_for("the compacted topic to be created", TIMEOUT, || {
        topic_cli(
            &cluster,
            &["create", "users", "-p", "1", "-r", "3", "--cleanup", "compact"],
        )
        .status
        .success()
    });
    assert_eq!(topic_json(&cluster, "users")["config"]["cleanup_policy"], "compact");
    let client = connect(&cluster).await;
    let keyed = |key: &str, value: Option<String>| Record {
        key: Some(Bytes::from(key.to_string())),
        value: value.map(Bytes::from),
        ..Record::default()
    };
    // Batch 0: keys written once, and one deleted in batch 1; then 30
    // batches that each update the same 20 keys.
    let mut batches = vec![
        (0..10)
            .map(|i| keyed(&format!("once-{i}"), Some(format!("first-{i}"))))
            .chain([keyed("gone", Some("soon deleted".into()))])
            .collect::<Vec<_>>(),
        vec![keyed("gone", None)],
    ];
    for round in 0..30 {
        batches.push(
            (0..20)
                .map(|k| keyed(&format!("k{k}"), Some(format!("round-{round}-{:<60}", k))))
                .collect(),
        );
    }
    for records in &batches {
        let mut builder = BatchBuilder::new();
        for record in records {
            builder.push(record).expect("push");
        }
        let batch = builder.build().expect("build");
        let deadline = Instant::now() + TIMEOUT;
        while let Err(e) = client.produce("users", 0, batch.clone(), Acks::All).await {
            assert!(Instant::now() < deadline, "produce: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let written: Vec<Record> = batches.concat();

    // Every replica compacts its closed segments (the controller asks
    // every 5 s; a segment holds about 40 records).
    let nodes = [NodeId(1), NodeId(2), NodeId(3)];
    let deadline = Instant::now() + TIMEOUT;
    let copies = loop {
        let mut copies = Vec::new();
        for &node in &nodes {
            copies.extend(replica_records(&client, node, "users", 0).await.ok());
        }
        let sizes: Vec<usize> = copies.iter().map(Vec::len).collect();
        if copies.len() == nodes.len() && sizes.iter().all(|&n| n < 120) {
            break copies;
        }
        assert!(Instant::now() < deadline, "replicas never compacted: {sizes:?} records");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut latest = BTreeMap::new();
    for record in &written {
        latest.insert(record.key.clone(), record.value.clone());
    }
    for (node, records) in nodes.iter().zip(&copies) {
        for stored in records {
            let at = usize::try_from(stored.offset)
                .ok()
                .and_then(|o| written.get(o.saturating_sub(1)));
            assert!(
                written.contains(&stored.record),
                "node {node}: offset {} holds a record never written (near {at:?})",
                stored.offset
            );
        }
        for (key, value) in &latest {
            let last = records.iter().rev().find(|r| &r.record.key == key);
            assert_eq!(
                last.map(|r| &r.record.value),
                Some(value),
                "node {node}: latest of {key:?}"
            );
        }
        let once: Vec<_> = records
            .iter()
            .filter(|r| r.record.key.as_deref().is_some_and(|k| k.starts_with(b"once-")))
            .collect();
        assert_eq!(once.len(), 10, "node {node}: keys written once stay");
        let gone: Vec<_> = records
            .iter()
            .filter(|r| r.record.key.as_deref() == Some(b"gone".as_slice()))
            .collect();
        assert_eq!(gone.len(), 1, "node {node}: only the tombstone of a deleted key stays");
        assert_eq!(gone[0].record.value, None);
    }
    let by_offset: Vec<BTreeMap<u64, &Record>> = copies
        .iter()
        .map(|records| records.iter().map(|r| (r.offset, &r.record)).collect())
        .collect();
    for (offset, record) in &by_offset[0] {
        for other in &by_offset[1..] {
            if let Some(theirs) = other.get(offset) {
                assert_eq!(theirs, record, "replicas disagree at offset {offset}");
            }
        }
    }

    let consumed = runnel()
        .args(["consume", "users", "-o", "beginning", "-e", "--seeds", &seeds])
        .arg("--certs")
        .arg(&cluster.certs)
        .output()
        .expect("consume");
    assert!(consumed.status.success(), "{consumed:?}");
    let printed = String::from_utf8_lossy(&consumed.stdout);
    // Lines are `key<TAB>value`.
    for k in 0..20 {
        let key = format!("k{k}\t");
        let last = printed.lines().rev().find(|l| l.starts_with(&key));
        let expected = format!("{key}round-29-{k:<60}");
        assert_eq!(
            last,
            Some(expected.as_str()),
            "k{k}'s latest value is read in {printed}"
        );
    }

    let keyless = produce_one_to(&client, "users", 0, "no key", Acks::All)
        .await
        .expect_err("a compacted topic needs keys");
    assert!(keyless.to_string().contains("every record needs a key"), "{keyless}");
}
