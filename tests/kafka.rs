//! Kafka clients against a 3-node cluster's Kafka listeners, unchanged:
//! kcat (librdkafka) and kafka-python produce, with every compression codec
//! and an idempotent producer, consume, read offsets and create topics; a
//! garbage frame closes only its own connection; and killing a partition's
//! leader loses no acknowledged record and duplicates none; confluent-kafka
//! and kcat read by offset and by time, and three confluent-kafka members
//! share six partitions through a member's SIGKILL.
//!
//! kcat, kafka-python and confluent-kafka are outside parts: `.ci/test`
//! installs them (kcat from Debian's packages, the Python clients into a
//! virtualenv under `target/`, named by `RUNNEL_KAFKA_PYTHON`). Without them
//! these tests fail, saying so.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{certs_init, wait_for, NodeCommand, NodeProcess};
use runnel::cluster::NodeId;

const TIMEOUT: Duration = Duration::from_secs(90);
const CODECS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];

struct KafkaCluster {
    scratch: tempfile::TempDir,
    addrs: Vec<SocketAddr>,
    kafka: Vec<SocketAddr>,
    nodes: Vec<NodeProcess>,
}

impl KafkaCluster {
    fn seeds(&self) -> String {
        self.addrs
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn certs(&self) -> std::path::PathBuf {
        self.scratch.path().join("certs")
    }

    fn bootstrap(&self, except: &[usize]) -> String {
        let addrs = self.kafka.iter().enumerate().filter(|(i, _)| !except.contains(i));
        addrs.map(|(_, a)| a.to_string()).collect::<Vec<_>>().join(",")
    }
}

/// Three nodes on 127.0.0.`first_host`.., each serving Kafka on a TCP port.
fn start_cluster(first_host: u8) -> KafkaCluster {
    start_cluster_with(first_host, false)
}

/// [`start_cluster`], serving Kafka over TLS when `tls`: each node's
/// certificate is issued again to name its IP address, which clients check.
fn start_cluster_with(first_host: u8, tls: bool) -> KafkaCluster {
    start_cluster_env(first_host, tls, &[])
}

/// [`start_cluster_with`], the nodes run with `env` set.
fn start_cluster_env(first_host: u8, tls: bool, env: &[(&str, &str)]) -> KafkaCluster {
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    certs_init(&certs, 3);
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|i| common::free_addr_on_host(first_host + i).expect("a free loopback address"))
        .collect();
    let kafka: Vec<SocketAddr> = addrs.iter().map(|a| free_tcp_port(a.ip())).collect();
    let nodes = (0..3)
        .map(|i| {
            let mut flags = vec!["--kafka-listen".to_string(), kafka[i].to_string()];
            if tls {
                let mut issue = Command::new(env!("CARGO_BIN_EXE_runnel"));
                issue.args([
                    "certs",
                    "issue",
                    "--node",
                    &(i + 1).to_string(),
                    "--host",
                    &addrs[i].ip().to_string(),
                ]);
                run(issue.arg("--dir").arg(&certs), "runnel certs issue --host", None);
                flags.push("--kafka-tls".to_string());
            }
            let mut command =
                NodeCommand::for_tests(env!("CARGO_BIN_EXE_runnel"), scratch.path(), &certs, &addrs).flags(flags);
            for (name, value) in env {
                command = command.env(name, value);
            }
            command
                .spawn(NodeId(i as u32 + 1), addrs[i])
                .expect("spawn runnel node")
        })
        .collect();
    KafkaCluster {
        scratch,
        addrs,
        kafka,
        nodes,
    }
}

fn free_tcp_port(ip: std::net::IpAddr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).expect("a free TCP port");
    listener.local_addr().expect("local address")
}

fn kcat() -> Command {
    let found = Command::new("kcat").arg("-V").stdout(Stdio::null()).status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "kcat is not installed: run `.ci/test`, which installs it, or `apt-get install kcat`"
    );
    Command::new("kcat")
}

fn python() -> Command {
    venv_python("tests/kafka_clients.py")
}

/// `tests/kafka_confluent.py`: confluent-kafka (on librdkafka), from the
/// same virtualenv.
fn confluent() -> Command {
    venv_python("tests/kafka_confluent.py")
}

fn venv_python(script: &str) -> Command {
    let python = std::env::var("RUNNEL_KAFKA_PYTHON").unwrap_or_else(|_| {
        panic!(
            "RUNNEL_KAFKA_PYTHON is not set: run `.ci/test`, which makes a virtualenv with kafka-python and \
             confluent-kafka and sets it"
        )
    });
    let mut command = Command::new(python);
    command.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(script));
    command
}

fn run(command: &mut Command, what: &str, stdin: Option<&[u8]>) -> Output {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.unwrap_or_default()).expect("write stdin");
    drop(input);
    let output = wait_with_deadline(child, what);
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    output
}

/// Waits for a child process (its output read as it comes, so a full pipe
/// never stalls it), killing it past [`TIMEOUT`].
fn wait_with_deadline(child: std::process::Child, what: &str) -> Output {
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    match finished.recv_timeout(TIMEOUT) {
        Ok(output) => output.expect("output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("{what} did not finish in {TIMEOUT:?}");
        }
    }
}

fn json_lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `kcat -L -J` as the listener at `bootstrap` answers it.
fn metadata(bootstrap: &str) -> Option<serde_json::Value> {
    let mut command = kcat();
    command.args(["-b", bootstrap, "-L", "-J", "-m", "5"]);
    let output = command.output().ok()?;
    serde_json::from_slice(&output.stdout).ok()
}

fn leaders(bootstrap: &str, topic: &str) -> Option<Vec<i64>> {
    let metadata = metadata(bootstrap)?;
    let topic = metadata["topics"].as_array()?.iter().find(|t| t["topic"] == topic)?;
    let partitions = topic["partitions"].as_array()?;
    partitions
        .iter()
        .map(|p| p["leader"].as_i64().filter(|l| *l > 0))
        .collect()
}

/// Once every node is in Kafka metadata, creates `topic` (3 partitions,
/// 3 replicas) with kafka-python's admin client and waits for its leaders;
/// the create command's output.
fn create_topic_when_ready(bootstrap: &str, topic: &str) -> Output {
    create_partitions_when_ready(bootstrap, topic, 3)
}

/// [`create_topic_when_ready`] with `partitions` partitions.
fn create_partitions_when_ready(bootstrap: &str, topic: &str, partitions: u32) -> Output {
    wait_for("every node to be in Kafka metadata", TIMEOUT, || {
        metadata(bootstrap).is_some_and(|m| m["brokers"].as_array().is_some_and(|b| b.len() == 3))
    });
    let created = run(
        python().args(["create", bootstrap, topic, &partitions.to_string(), "3"]),
        "kafka-python create",
        None,
    );
    wait_for("the topic's leaders", TIMEOUT, || leaders(bootstrap, topic).is_some());
    created
}

/// Every record of `topic`, read by kcat to the end of each partition.
fn kcat_records(bootstrap: &str, topic: &str) -> Vec<serde_json::Value> {
    let mut command = kcat();
    command.args(["-b", bootstrap, "-C", "-t", topic, "-o", "beginning", "-e", "-J", "-q"]);
    json_lines(&run(&mut command, "kcat -C", None))
}

#[test]
fn kafka_clients_produce_consume_and_create_topics_with_every_codec_and_a_garbage_frame_closes_only_its_connection() {
    let cluster = start_cluster(230);
    let bootstrap = cluster.bootstrap(&[]);
    let created = create_topic_when_ready(&bootstrap, "orders");
    assert_eq!(json_lines(&created)[0]["created"], "orders");
    let configs = run(
        python().args(["configs", &bootstrap, "orders"]),
        "kafka-python describe_configs",
        None,
    );
    let configs = &json_lines(&configs)[0]["topic"]["orders"];
    assert_eq!(configs["retention.ms"]["value"], "604800000", "{configs}");
    assert_eq!(configs["cleanup.policy"]["value"], "delete", "{configs}");
    admin_alters_settings_and_grows_the_topic(&bootstrap);

    let mut expected: BTreeSet<String> = BTreeSet::new();
    for codec in CODECS {
        let lines: Vec<String> = (0..200).map(|i| format!("k{i}:{codec}-{i}")).collect();
        expected.extend((0..200).map(|i| format!("{codec}-{i}")));
        let mut command = kcat();
        command.args([
            "-b", &bootstrap, "-P", "-t", "orders", "-K:", "-z", codec, "-X", "acks=all",
        ]);
        run(
            &mut command,
            &format!("kcat -P -z {codec}"),
            Some(lines.join("\n").as_bytes()),
        );
    }
    let produced = run(
        python().args(["produce", &bootstrap, "orders", "500", "py"]),
        "kafka-python produce",
        None,
    );
    let acked: Vec<_> = json_lines(&produced)
        .into_iter()
        .filter(|l| l.get("acked").is_some())
        .collect();
    assert_eq!(acked.len(), 500);
    expected.extend((0..500).map(|i| format!("py-{i}")));

    let records = kcat_records(&bootstrap, "orders");
    let values: Vec<String> = records
        .iter()
        .map(|r| r["payload"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(values.len(), expected.len(), "every record once");
    assert_eq!(values.iter().cloned().collect::<BTreeSet<_>>(), expected);
    let keyed = records.iter().find(|r| r["payload"] == "zstd-7").expect("zstd-7");
    assert_eq!(keyed["key"], "k7", "keys survive");

    let consumed = run(
        python().args(["consume", &bootstrap, "orders"]),
        "kafka-python consume",
        None,
    );
    let lines = json_lines(&consumed);
    let python_values: BTreeSet<String> = lines
        .iter()
        .filter_map(|l| l["value"].as_str().map(String::from))
        .collect();
    assert_eq!(python_values, expected, "kafka-python reads the same records");
    let header = lines.iter().find(|l| l["value"] == "py-3").expect("py-3");
    assert_eq!(header["headers"]["tag"], "py", "headers survive");

    garbage_frames_close_only_their_connection(cluster.kafka[0], &bootstrap);
    let leader = leaders(&bootstrap, "orders").expect("leaders")[0] as usize;
    pipelined_produce_requests_append_and_are_answered_in_order(cluster.kafka[leader - 1]);
    admin_deletes_records(&bootstrap);
    drop(cluster.scratch);
}

/// kafka-python's admin client deletes `orders`' records: partition 0
/// below an offset, partition 1 below its high watermark (-1); readers
/// then start there, and the records after stay. Past the high watermark
/// is refused by name.
fn admin_deletes_records(bootstrap: &str) {
    let offsets = |records: &[serde_json::Value], partition: i64| -> Vec<i64> {
        let of = |r: &&serde_json::Value| r["partition"].as_i64() == Some(partition);
        records.iter().filter(of).filter_map(|r| r["offset"].as_i64()).collect()
    };
    let before = kcat_records(bootstrap, "orders");
    let (zero, one) = (offsets(&before, 0), offsets(&before, 1));
    assert!(
        zero.len() > 20 && !one.is_empty(),
        "{} and {} records",
        zero.len(),
        one.len()
    );
    let cut = zero[zero.len() / 2];
    let delete = |partition: &str, offset: &str| -> Vec<serde_json::Value> {
        let output = run(
            python().args(["delete-records", bootstrap, "orders", partition, offset]),
            &format!("delete_records {partition} {offset}"),
            None,
        );
        json_lines(&output)
    };
    let answer = delete("0", &cut.to_string());
    assert_eq!(answer[0]["low_watermark"], cut, "{answer:?}");
    assert_eq!(answer[1]["earliest"], cut, "ListOffsets earliest: {answer:?}");
    let answer = delete("1", "-1");
    let high_watermark = answer[0]["low_watermark"].as_i64().expect("a low watermark");
    assert!(high_watermark > *one.last().expect("records"), "{answer:?}");
    let refused = delete("0", "999999");
    assert_eq!(refused[0]["error"], "OffsetOutOfRangeError", "{refused:?}");
    let after = kcat_records(bootstrap, "orders");
    let kept: Vec<i64> = zero.iter().copied().filter(|&o| o >= cut).collect();
    assert_eq!(offsets(&after, 0), kept, "partition 0 reads from the cut on");
    assert!(offsets(&after, 1).is_empty(), "partition 1 is empty");
    assert_eq!(offsets(&after, 2), offsets(&before, 2), "partition 2 untouched");
}

/// Five produce requests for one partition written back to back on one
/// connection (as librdkafka pipelines them): the listener hands each
/// request's batch on before it reads the next, so they append in request
/// order, three offsets each, and their answers come in request order.
fn pipelined_produce_requests_append_and_are_answered_in_order(listener: SocketAddr) {
    use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader};
    use kafka_protocol::protocol::{Decodable, Encodable};
    use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType};
    const VERSION: i16 = 7;
    let request = |k: i32| {
        let records: Vec<Record> = (0..3)
            .map(|i| Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i,
                // The encoder keeps `offset - sequence` constant; a batch
                // without a producer has base sequence -1.
                sequence: i as i32 - 1,
                timestamp: 1_700_000_000_000,
                key: None,
                value: Some(format!("pipelined-{k}-{i}").into_bytes().into()),
                headers: Default::default(),
            })
            .collect();
        let mut batch = bytes::BytesMut::new();
        let options = RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        };
        RecordBatchEncoder::encode(&mut batch, &records, &options).expect("batch");
        let partition = kafka_protocol::messages::produce_request::PartitionProduceData::default()
            .with_index(0)
            .with_records(Some(batch.freeze()));
        let topic = kafka_protocol::messages::produce_request::TopicProduceData::default()
            .with_name(kafka_protocol::messages::TopicName(
                kafka_protocol::protocol::StrBytes::from_static_str("orders"),
            ))
            .with_partition_data(vec![partition]);
        let produce = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![topic]);
        let mut body = bytes::BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(ApiKey::Produce as i16)
            .with_request_api_version(VERSION)
            .with_correlation_id(100 + k)
            .encode(&mut body, ApiKey::Produce.request_header_version(VERSION))
            .expect("header");
        produce.encode(&mut body, VERSION).expect("request");
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    };
    let mut stream = TcpStream::connect(listener).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let frames: Vec<u8> = (0..5).flat_map(request).collect();
    stream.write_all(&frames).expect("five requests at once");
    let mut answers = Vec::new();
    for _ in 0..5 {
        let mut size = [0u8; 4];
        stream.read_exact(&mut size).expect("an answer");
        let mut body = bytes::Bytes::from({
            let mut body = vec![0u8; u32::from_be_bytes(size) as usize];
            stream.read_exact(&mut body).expect("the answer's body");
            body
        });
        let header =
            ResponseHeader::decode(&mut body, ApiKey::Produce.response_header_version(VERSION)).expect("header");
        let response = ProduceResponse::decode(&mut body, VERSION).expect("response");
        let partition = &response.responses[0].partition_responses[0];
        assert_eq!(partition.error_code, 0, "{partition:?}");
        answers.push((header.correlation_id, partition.base_offset));
    }
    let correlations: Vec<i32> = answers.iter().map(|a| a.0).collect();
    assert_eq!(correlations, vec![100, 101, 102, 103, 104], "answers in request order");
    let first = answers[0].1;
    let offsets: Vec<i64> = answers.iter().map(|a| a.1).collect();
    assert_eq!(
        offsets,
        (0..5).map(|k| first + 3 * k).collect::<Vec<_>>(),
        "appended in request order"
    );
}

/// A topic's setting of `topic`, as DescribeConfigs answers it.
fn topic_setting(bootstrap: &str, topic: &str, key: &str) -> serde_json::Value {
    let configs = run(python().args(["configs", bootstrap, topic]), "describe_configs", None);
    json_lines(&configs)[0]["topic"][topic][key]["value"].clone()
}

/// kafka-python's admin client changes `orders`' settings through
/// IncrementalAlterConfigs and AlterConfigs (all or none) and grows it from
/// 3 to 4 partitions with CreatePartitions.
fn admin_alters_settings_and_grows_the_topic(bootstrap: &str) {
    let alter = |mode: &str, settings: &[&str]| -> serde_json::Value {
        let output = run(
            python().args(["alter", bootstrap, "orders", mode]).args(settings),
            &format!("alter_configs {mode} {settings:?}"),
            None,
        );
        json_lines(&output)[0]["result"].clone()
    };
    assert_eq!(alter("incremental", &["min.insync.replicas=3"]), "OK");
    assert_eq!(topic_setting(bootstrap, "orders", "min.insync.replicas"), "3");
    let refused = alter("incremental", &["retention.ms=1000", "min.insync.replicas=4"]);
    assert!(
        refused
            .as_str()
            .is_some_and(|r| r.contains("min-insync must be in [1, 3]")),
        "{refused}"
    );
    assert_eq!(
        topic_setting(bootstrap, "orders", "retention.ms"),
        "604800000",
        "all or none"
    );
    assert_eq!(alter("replace", &["retention.ms=86400000"]), "OK");
    assert_eq!(topic_setting(bootstrap, "orders", "retention.ms"), "86400000");
    assert_eq!(
        alter("incremental", &["min.insync.replicas="]),
        "OK",
        "DELETE: back to the default"
    );
    assert_eq!(topic_setting(bootstrap, "orders", "min.insync.replicas"), "2");
    assert_eq!(
        alter(
            "incremental",
            &[
                "cleanup.policy=compact",
                "delete.retention.ms=1000",
                "min.compaction.lag.ms=60000"
            ]
        ),
        "OK"
    );
    assert_eq!(topic_setting(bootstrap, "orders", "cleanup.policy"), "compact");
    assert_eq!(topic_setting(bootstrap, "orders", "delete.retention.ms"), "1000");
    assert_eq!(topic_setting(bootstrap, "orders", "min.compaction.lag.ms"), "60000");
    let refused = alter("incremental", &["cleanup.policy=shred"]);
    assert!(
        refused
            .as_str()
            .is_some_and(|r| r.contains("not one of delete, compact")),
        "{refused}"
    );
    assert_eq!(alter("incremental", &["cleanup.policy="]), "OK", "back to delete");
    assert_eq!(topic_setting(bootstrap, "orders", "cleanup.policy"), "delete");
    let refused = alter("incremental", &["segment.bytes=1024"]);
    assert!(
        refused.as_str().is_some_and(|r| r.contains("segment.bytes")),
        "{refused}"
    );

    let grow = |count: &str| -> serde_json::Value {
        let output = run(
            python().args(["grow", bootstrap, "orders", count]),
            "create_partitions",
            None,
        );
        json_lines(&output)[0]["results"][0].clone()
    };
    assert_eq!(grow("4")[1], 0, "grown to 4");
    wait_for("the new partition's leader", TIMEOUT, || {
        leaders(bootstrap, "orders").is_some_and(|l| l.len() == 4)
    });
    let fewer = grow("2");
    assert_eq!(fewer[1], 37, "INVALID_PARTITIONS: {fewer}");
    assert!(
        fewer[2].as_str().is_some_and(|m| m.contains("can only be added")),
        "{fewer}"
    );
}

/// A frame that is not Kafka, and one claiming 2 GiB, each close their own
/// connection; the listener keeps serving.
fn garbage_frames_close_only_their_connection(listener: SocketAddr, bootstrap: &str) {
    for frame in [
        &b"\x00\x00\x00\x08GET / HT"[..],
        &b"\x7f\xff\xff\xff"[..],
        &b"\x00\x00\x00\x04\x7f\x00\x00\x00"[..],
    ] {
        let mut stream = TcpStream::connect(listener).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        stream.write_all(frame).expect("write");
        let mut rest = Vec::new();
        let read = stream.read_to_end(&mut rest);
        assert!(read.is_ok_and(|n| n == 0), "closed without an answer: {rest:?}");
    }
    assert!(metadata(bootstrap).is_some(), "still serving");
    an_unserved_api_is_answered_unsupported_and_the_connection_stays_open(listener);
}

/// DescribeAcls v1 (not served) gets its own response with
/// UNSUPPORTED_VERSION (35), then ApiVersions v0 on the same connection is
/// answered too.
fn an_unserved_api_is_answered_unsupported_and_the_connection_stays_open(listener: SocketAddr) {
    let mut stream = TcpStream::connect(listener).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let request = |api: i16, version: i16, correlation: i32| {
        let mut body = Vec::new();
        body.extend_from_slice(&api.to_be_bytes());
        body.extend_from_slice(&version.to_be_bytes());
        body.extend_from_slice(&correlation.to_be_bytes());
        body.extend_from_slice(&[0xff, 0xff]);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    };
    let answer = |stream: &mut TcpStream| {
        let mut size = [0u8; 4];
        stream
            .read_exact(&mut size)
            .expect("an answer, not a closed connection");
        let mut body = vec![0u8; u32::from_be_bytes(size) as usize];
        stream.read_exact(&mut body).expect("the answer's body");
        body
    };
    stream.write_all(&request(29, 1, 41)).expect("DescribeAcls");
    let acls = answer(&mut stream);
    assert_eq!(&acls[..4], &41i32.to_be_bytes(), "correlation id");
    assert_eq!(
        &acls[8..10],
        &35i16.to_be_bytes(),
        "UNSUPPORTED_VERSION after throttle_time_ms"
    );
    stream.write_all(&request(18, 0, 42)).expect("ApiVersions");
    let versions = answer(&mut stream);
    assert_eq!(&versions[..6], &[0, 0, 0, 42, 0, 0], "correlation id, then no error");
}

#[test]
fn killing_a_partition_leader_under_a_kafka_producer_loses_and_duplicates_nothing() {
    let mut cluster = start_cluster(235);
    let bootstrap = cluster.bootstrap(&[]);
    create_topic_when_ready(&bootstrap, "payments");
    let before = run(
        python().args(["produce", &bootstrap, "payments", "300", "before"]),
        "produce",
        None,
    );
    let mut acked = acked_values(&before);

    let leader = leaders(&bootstrap, "payments").expect("leaders")[0] as usize;
    let killed_at = Instant::now();
    cluster.nodes[leader - 1].kill();
    let survivors = cluster.bootstrap(&[leader - 1]);
    let after = run(
        python().args(["produce", &survivors, "payments", "300", "after"]),
        "produce",
        None,
    );
    let failover = killed_at.elapsed();
    acked.extend(acked_values(&after));
    let new_leaders = leaders(&survivors, "payments").expect("leaders after the kill");
    assert!(
        !new_leaders.contains(&(leader as i64)),
        "{new_leaders:?} still names node {leader}"
    );

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let records = kcat_records(&survivors, "payments");
    expect_contiguous_offsets_from_zero(&records);
    for record in records {
        *seen
            .entry(record["payload"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    let lost: Vec<_> = acked.iter().filter(|v| !seen.contains_key(*v)).collect();
    let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    assert_eq!(acked.len(), 600);
    println!(
        "node {leader} (leader of partition 0) SIGKILLed; 300 more records acknowledged by the survivors \
         {:.1} s later; new leaders {new_leaders:?}; none lost, none duplicated",
        failover.as_secs_f64()
    );
}

/// Offsets as Kafka users know them: each partition's records are at
/// 0, 1, 2, … with no gap, also where a new leader took over (its Raft
/// entry takes no offset).
fn expect_contiguous_offsets_from_zero(records: &[serde_json::Value]) {
    let mut by_partition: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for record in records {
        let partition = record["partition"].as_i64().expect("partition");
        by_partition
            .entry(partition)
            .or_default()
            .push(record["offset"].as_i64().expect("offset"));
    }
    for (partition, mut offsets) in by_partition {
        offsets.sort_unstable();
        let expected: Vec<i64> = (0..offsets.len() as i64).collect();
        assert_eq!(offsets, expected, "partition {partition}'s offsets");
    }
}

fn acked_values(output: &Output) -> BTreeSet<String> {
    json_lines(output)
        .iter()
        .filter_map(|l| l["acked"].as_str().map(String::from))
        .collect()
}

/// A background kafka-python group member, SIGKILLed when dropped.
struct Member(std::process::Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A background kafka-python member of `group` (it waits up to 10 minutes
/// for records; killed when dropped).
fn member(bootstrap: &str, topic: &str, group: &str) -> Member {
    let mut command = python();
    command.args(["group", bootstrap, topic, group, "1000000", "600000"]);
    command.stdout(Stdio::null()).stderr(Stdio::null());
    Member(command.spawn().expect("spawn a group member"))
}

/// The group's state and each member's partitions, as kafka-python's admin
/// client describes them (none while the coordinator is not ready).
fn describe(bootstrap: &str, group: &str) -> Option<(String, Vec<Vec<u64>>)> {
    let output = python().args(["describe", bootstrap, group]).output().ok()?;
    let line = json_lines(&output).pop()?;
    let members = line["members"].as_array().cloned().unwrap_or_default();
    let members = members
        .iter()
        .map(|m| {
            m.as_array()
                .map(|ps| ps.iter().filter_map(|p| p.as_u64()).collect())
                .unwrap_or_default()
        })
        .collect();
    Some((line["state"].as_str().unwrap_or_default().to_string(), members))
}

/// Stable, with `members` members that each own some of the partitions
/// and together own all of them.
fn shared_by(bootstrap: &str, group: &str, members: usize, partitions: u64) -> bool {
    let Some((state, assigned)) = describe(bootstrap, group) else {
        return false;
    };
    let mut all: Vec<u64> = assigned.iter().flatten().copied().collect();
    all.sort_unstable();
    state == "Stable"
        && assigned.len() == members
        && assigned.iter().all(|a| !a.is_empty())
        && all == (0..partitions).collect::<Vec<_>>()
}

#[test]
fn kafka_consumer_groups_share_partitions_commit_only_what_they_delivered_and_rebalance_when_a_member_dies() {
    let cluster = start_cluster(240);
    let bootstrap = cluster.bootstrap(&[]);
    create_topic_when_ready(&bootstrap, "events");
    run(
        python().args(["produce", &bootstrap, "events", "300", "e"]),
        "produce",
        None,
    );

    // A member that stops after 100 records commits those 100 only; the
    // next member of the group reads exactly the other 200.
    let first = run(
        python().args(["group", &bootstrap, "events", "g", "100", "5000"]),
        "member 1",
        None,
    );
    let second = run(
        python().args(["group", &bootstrap, "events", "g", "1000", "3000"]),
        "member 2",
        None,
    );
    let values = |output: &Output| -> Vec<String> {
        json_lines(output)
            .iter()
            .filter_map(|l| l["value"].as_str().map(String::from))
            .collect()
    };
    let (first, second) = (values(&first), values(&second));
    assert_eq!((first.len(), second.len()), (100, 200));
    let all: BTreeSet<&String> = first.iter().chain(&second).collect();
    assert_eq!(all.len(), 300, "every record once across the two runs");

    // librdkafka's group consumer (kcat -G) with the same coordinator.
    let kcat_group = |what: &str| {
        let mut command = kcat();
        command.args([
            "-b",
            &bootstrap,
            "-G",
            "k",
            "-X",
            "auto.offset.reset=earliest",
            "events",
            "-e",
            "-q",
        ]);
        String::from_utf8_lossy(&run(&mut command, what, None).stdout)
            .lines()
            .count()
    };
    assert_eq!(kcat_group("kcat -G"), 300);
    assert_eq!(kcat_group("kcat -G again"), 0, "its commits hold");
    // DeleteGroups forgets an empty group's offsets: it reads all again.
    let deleted = run(python().args(["delete-groups", &bootstrap, "k"]), "delete k", None);
    assert_eq!(json_lines(&deleted)[0]["error"], "OK", "{deleted:?}");
    assert_eq!(kcat_group("kcat -G after DeleteGroups"), 300);
    offset_delete_forgets_what_no_member_reads(&bootstrap);

    // Two live members share the partitions; when one dies without
    // leaving, its session times out and the other takes them all.
    let started = Instant::now();
    let a = member(&bootstrap, "events", "live");
    let _b = member(&bootstrap, "events", "live");
    wait_for("two members to share the partitions", TIMEOUT, || {
        shared_by(&bootstrap, "live", 2, 3)
    });
    let shared_after = started.elapsed();
    let refused = run(
        python().args(["delete-groups", &bootstrap, "live"]),
        "delete live",
        None,
    );
    assert_eq!(json_lines(&refused)[0]["error"], "NonEmptyGroupError", "{refused:?}");
    drop(a);
    let killed = Instant::now();
    wait_for("the survivor to own every partition", TIMEOUT, || {
        shared_by(&bootstrap, "live", 1, 3)
    });
    println!(
        "two members shared 3 partitions {:.1} s after starting; after one was SIGKILLed the other owned all \
         3 partitions {:.1} s later (session timeout 6 s)",
        shared_after.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    drop(cluster.scratch);
}

/// OffsetDelete (kafka-python's `delete_group_offsets`): an empty group's
/// offset of one partition is forgotten and the others stay; a group
/// with a member reading the topic keeps it (GROUP_SUBSCRIBED_TO_TOPIC);
/// an unknown group is GROUP_ID_NOT_FOUND; an unknown partition is named.
fn offset_delete_forgets_what_no_member_reads(bootstrap: &str) {
    let delete = |group: &str, partitions: &[&str]| {
        let mut args = vec!["delete-offsets", bootstrap, group, "events"];
        args.extend(partitions);
        json_lines(&run(python().args(&args), "delete-offsets", None))
    };
    let lines = delete("g", &["0", "7"]);
    let outcome = |p: u64| lines.iter().find(|l| l["partition"] == p).map(|l| l["error"].clone());
    assert_eq!(outcome(0), Some("NoError".into()), "{lines:?}");
    assert_eq!(outcome(7), Some("UnknownTopicOrPartitionError".into()), "{lines:?}");
    let committed = lines
        .iter()
        .find_map(|l| l["committed"].as_array().cloned())
        .expect("committed");
    let partitions: Vec<u64> = committed.iter().filter_map(|pair| pair[0].as_u64()).collect();
    assert_eq!(
        partitions,
        vec![1, 2],
        "partition 0's offset is forgotten, the others stay"
    );

    let _reader = member(bootstrap, "events", "held");
    wait_for("the member to be given the partitions", TIMEOUT, || {
        shared_by(bootstrap, "held", 1, 3)
    });
    let lines = delete("held", &["1"]);
    assert_eq!(lines[0]["error"], "GroupSubscribedToTopicError", "{lines:?}");
    let lines = delete("nobody", &["0"]);
    assert_eq!(lines[0]["error"], "GroupIdNotFoundError", "{lines:?}");
}

/// A background `runnel consume --group` member, SIGKILLed when dropped.
fn runnel_member(cluster: &KafkaCluster, topic: &str, group: &str) -> Member {
    let mut command = common::runnel();
    command.args(["consume", topic, "--group", group, "--follow", "--format", "json"]);
    command
        .args(["--seeds", &cluster.seeds()])
        .arg("--certs")
        .arg(cluster.certs());
    command.stdout(Stdio::null()).stderr(Stdio::null());
    Member(command.spawn().expect("spawn runnel consume --group"))
}

/// `runnel group ARGS` (with the cluster's seeds and certificates).
fn runnel_group(cluster: &KafkaCluster, args: &[&str]) -> Output {
    let mut command = common::runnel();
    command.arg("group").args(args);
    command
        .args(["--seeds", &cluster.seeds()])
        .arg("--certs")
        .arg(cluster.certs());
    run(&mut command, &format!("runnel group {args:?}"), None)
}

fn group_json(cluster: &KafkaCluster, group: &str) -> serde_json::Value {
    let output = runnel_group(cluster, &["describe", group, "--json"]);
    serde_json::from_slice(&output.stdout).expect("describe --json")
}

#[test]
fn a_runnel_consumer_and_a_kafka_consumer_share_one_group_and_runnel_group_manages_it() {
    let cluster = start_cluster(245);
    let bootstrap = cluster.bootstrap(&[]);
    create_topic_when_ready(&bootstrap, "mixed");
    run(
        python().args(["produce", &bootstrap, "mixed", "300", "m"]),
        "produce",
        None,
    );

    let kafka_member = member(&bootstrap, "mixed", "shared");
    let runnel_member = runnel_member(&cluster, "mixed", "shared");
    wait_for("a Kafka and a Runnel member to share the partitions", TIMEOUT, || {
        shared_by(&bootstrap, "shared", 2, 3)
    });
    let described = group_json(&cluster, "shared");
    assert_eq!(described["state"], "Stable");
    let clients: BTreeSet<String> = described["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["client_id"].as_str().map(String::from))
        .collect();
    assert!(clients.contains("runnel") && clients.len() == 2, "{described}");
    wait_for("every record committed (lag 0)", TIMEOUT, || {
        let offsets = group_json(&cluster, "shared")["offsets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        offsets.len() == 3 && offsets.iter().all(|o| o["lag"] == 0)
    });

    drop(kafka_member);
    drop(runnel_member);
    wait_for("the group to empty once both sessions time out", TIMEOUT, || {
        group_json(&cluster, "shared")["state"] == "Empty"
    });
    runnel_group(
        &cluster,
        &["reset-offsets", "shared", "--topic", "mixed", "--to", "earliest"],
    );
    let lag: u64 = group_json(&cluster, "shared")["offsets"]
        .as_array()
        .expect("offsets")
        .iter()
        .filter_map(|o| o["lag"].as_u64())
        .sum();
    assert!(lag >= 300, "reset to the start: lag {lag}");
    let mut command = common::runnel();
    command.args([
        "consume", "mixed", "--group", "shared", "--max", "10", "--format", "json",
    ]);
    command
        .args(["--seeds", &cluster.seeds()])
        .arg("--certs")
        .arg(cluster.certs());
    let read = run(&mut command, "runnel consume --group --max 10", None);
    let printed = json_lines(&read);
    assert_eq!(printed.len(), 10);
    let mut next: BTreeMap<u64, u64> = BTreeMap::new();
    for record in &printed {
        let (p, o) = (
            record["partition"].as_u64().expect("p"),
            record["offset"].as_u64().expect("o"),
        );
        let n = next.entry(p).or_default();
        *n = (*n).max(o + 1);
    }
    let offsets = group_json(&cluster, "shared")["offsets"]
        .as_array()
        .cloned()
        .expect("offsets");
    for (p, n) in &next {
        let committed = offsets
            .iter()
            .find(|o| o["partition"] == *p)
            .map(|o| o["committed"].clone());
        assert_eq!(
            committed,
            Some((*n).into()),
            "partition {p}: committed just past the last printed record"
        );
    }
    let lag_after: u64 = offsets.iter().filter_map(|o| o["lag"].as_u64()).sum();
    assert!(lag - lag_after >= 10, "lag {lag} then {lag_after}");
    runnel_group(&cluster, &["delete", "shared"]);
    assert!(group_json(&cluster, "shared")["offsets"]
        .as_array()
        .is_some_and(|o| o.is_empty()));
}

/// confluent-kafka's codecs other than none, 150 records each.
const CONFLUENT_CODECS: [&str; 4] = ["gzip", "snappy", "lz4", "zstd"];

#[test]
fn confluent_kafka_and_kcat_read_by_offset_and_time_and_three_members_share_six_partitions_through_a_kill() {
    let cluster = start_cluster(250);
    let bootstrap = cluster.bootstrap(&[]);
    create_partitions_when_ready(&bootstrap, "cards", 6);
    let acked = produce_every_codec(&bootstrap);

    let earliest = confluent_records(&bootstrap, "earliest");
    assert_eq!(earliest.len(), 600, "every record once from earliest");
    for record in &earliest {
        let value = record["value"].as_str().expect("value");
        let (codec, index) = value.split_once('-').expect("codec-index");
        let at = &acked[value];
        assert_eq!(
            (&record["partition"], &record["offset"], &record["timestamp"]),
            (&at["partition"], &at["offset"], &at["timestamp"]),
            "{value}"
        );
        assert_eq!(record["key"], format!("k{index}"));
        assert_eq!(record["headers"]["codec"], codec);
    }

    // By offset: from an acknowledged record's offset, that record first.
    let from = &acked["lz4-75"];
    let (partition, offset) = (from["partition"].as_i64().unwrap(), from["offset"].as_i64().unwrap());
    let by_offset = confluent_records(&bootstrap, &format!("offset:{partition}:{offset}"));
    let expected = acked
        .values()
        .filter(|a| a["partition"] == partition && a["offset"].as_i64() >= Some(offset));
    assert_eq!(by_offset[0]["value"], "lz4-75");
    assert_eq!(by_offset.len(), expected.count());
    let mut command = kcat();
    let (partition_arg, offset_arg) = (partition.to_string(), offset.to_string());
    command.args([
        "-b",
        &bootstrap,
        "-C",
        "-t",
        "cards",
        "-p",
        &partition_arg,
        "-o",
        &offset_arg,
    ]);
    let kcat_by_offset = json_lines(&run(command.args(["-e", "-J", "-q"]), "kcat -o N", None));
    assert_eq!(kcat_by_offset[0]["payload"], "lz4-75");
    assert_eq!(kcat_by_offset.len(), by_offset.len());

    // By time: every record at or after an acknowledged record's timestamp.
    let since = acked["lz4-40"]["timestamp"].as_i64().expect("timestamp");
    let later: BTreeSet<&str> = acked
        .iter()
        .filter(|(_, a)| a["timestamp"].as_i64() >= Some(since))
        .map(|(v, _)| v.as_str())
        .collect();
    let by_time = confluent_records(&bootstrap, &format!("time:{since}"));
    let by_time: BTreeSet<&str> = by_time.iter().filter_map(|r| r["value"].as_str()).collect();
    assert_eq!(by_time, later, "confluent-kafka offsets_for_times");
    let mut command = kcat();
    let at = format!("s@{since}");
    command.args(["-b", &bootstrap, "-C", "-t", "cards", "-o", &at, "-e", "-J", "-q"]);
    let kcat_by_time = json_lines(&run(&mut command, "kcat -o s@", None));
    let kcat_by_time: BTreeSet<&str> = kcat_by_time.iter().filter_map(|r| r["payload"].as_str()).collect();
    assert_eq!(kcat_by_time, later, "kcat -o s@timestamp");

    three_members_share_six_partitions_through_a_kill(&cluster, &bootstrap, &acked);
}

/// 150 records with each codec from an idempotent confluent-kafka producer,
/// timestamps apart by 10 ms; each acknowledgement by value.
fn produce_every_codec(bootstrap: &str) -> BTreeMap<String, serde_json::Value> {
    let first_ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64 - 600_000;
    let mut acked = BTreeMap::new();
    for (i, codec) in CONFLUENT_CODECS.iter().enumerate() {
        let first = (first_ms + i as i64 * 1_500).to_string();
        let output = run(
            confluent().args(["produce", bootstrap, "cards", "150", codec, codec, &first]),
            "confluent-kafka produce",
            None,
        );
        for line in json_lines(&output) {
            assert!(line["failed"].is_null(), "{line}");
            if let Some(value) = line["acked"].as_str() {
                acked.insert(value.to_string(), line.clone());
            }
        }
    }
    assert_eq!(acked.len(), 600, "every record acknowledged");
    acked
}

fn confluent_records(bootstrap: &str, from: &str) -> Vec<serde_json::Value> {
    let output = run(
        confluent().args(["consume", bootstrap, "cards", from]),
        "confluent-kafka consume",
        None,
    );
    let lines = json_lines(&output);
    let last = lines.last().expect("the summary line");
    assert_eq!(last["unfinished"], serde_json::json!([]), "read to the end: {last}");
    lines.into_iter().filter(|l| l["value"].is_string()).collect()
}

/// Three confluent-kafka members (librdkafka's range assignor) share six
/// partitions; one is SIGKILLed and its partitions move to the others; no
/// record is skipped; a new member resumes from the committed offsets.
fn three_members_share_six_partitions_through_a_kill(
    cluster: &KafkaCluster,
    bootstrap: &str,
    acked: &BTreeMap<String, serde_json::Value>,
) {
    let files: Vec<_> = (0..4)
        .map(|i| cluster.scratch.path().join(format!("member-{i}.jsonl")))
        .collect();
    let mut members: Vec<Member> = files[..3].iter().map(|f| confluent_member(bootstrap, f)).collect();
    wait_for("three members to share six partitions", TIMEOUT, || {
        shared_by(bootstrap, "cg", 3, 6)
    });
    let all_first: BTreeSet<String> = acked.keys().cloned().collect();
    wait_for("the members to deliver every record", TIMEOUT, || {
        delivered(&files).is_superset(&all_first)
    });

    drop(members.remove(0));
    let killed = Instant::now();
    wait_for("two members to own every partition", TIMEOUT, || {
        shared_by(bootstrap, "cg", 2, 6)
    });
    let moved = killed.elapsed();
    let after = run(
        python().args(["produce", bootstrap, "cards", "600", "after"]),
        "kafka-python produce",
        None,
    );
    let mut all = all_first.clone();
    all.extend(acked_values(&after));
    wait_for("the two members to deliver every record", TIMEOUT, || {
        delivered(&files).is_superset(&all)
    });

    drop(members);
    let before_resume = delivered(&files[..3]);
    let _resumed = confluent_member(bootstrap, &files[3]);
    let last = run(
        python().args(["produce", bootstrap, "cards", "60", "last"]),
        "produce",
        None,
    );
    let last = acked_values(&last);
    wait_for("a new member to deliver the last records", TIMEOUT, || {
        delivered(&files[3..]).is_superset(&last)
    });
    let again: Vec<String> = delivered(&files[3..]).difference(&last).cloned().collect();
    assert!(again.iter().all(|v| before_resume.contains(v)), "{again:?}");
    assert!(
        again.len() <= 6,
        "more than one uncommitted record per partition read again: {again:?}"
    );
    println!(
        "3 confluent-kafka members shared 6 partitions; after one was SIGKILLed the other two owned all 6 \
         {:.1} s later (session timeout 6 s); 1,260 records delivered, none skipped; a new member re-read {} \
         record(s) whose commit the kills cut off",
        moved.as_secs_f64(),
        again.len()
    );
}

fn confluent_member(bootstrap: &str, output: &Path) -> Member {
    let file = std::fs::File::create(output).expect("member output");
    let mut command = confluent();
    command.args(["member", bootstrap, "cards", "cg"]);
    command.stdout(file).stderr(Stdio::null());
    Member(command.spawn().expect("spawn a confluent-kafka member"))
}

/// Every value the members writing `files` have printed.
fn delivered(files: &[std::path::PathBuf]) -> BTreeSet<String> {
    let lines = files.iter().filter_map(|f| std::fs::read_to_string(f).ok());
    let lines: Vec<String> = lines
        .flat_map(|text| text.lines().map(String::from).collect::<Vec<_>>())
        .collect();
    let records = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    records.filter_map(|r| r["value"].as_str().map(String::from)).collect()
}

#[test]
fn kafka_over_tls_serves_clients_with_a_cluster_certificate_and_refuses_others() {
    let cluster = start_cluster_with(225, true);
    let bootstrap = cluster.bootstrap(&[]);
    let certs = cluster.certs();
    let file = |dir: &Path, name: &str| dir.join(name).display().to_string();
    let tls_kcat = |ca: &str, cert: Option<(String, String)>, args: &[&str]| {
        let mut command = kcat();
        command.args([
            "-b",
            &bootstrap,
            "-X",
            "security.protocol=ssl",
            "-X",
            &format!("ssl.ca.location={ca}"),
        ]);
        if let Some((pem, key)) = cert {
            command.args(["-X", &format!("ssl.certificate.location={pem}")]);
            command.args(["-X", &format!("ssl.key.location={key}")]);
        }
        command.args(args).stdin(Stdio::null()).output().expect("kcat")
    };
    let ca = file(&certs, "ca.pem");
    let client = Some((file(&certs, "client.pem"), file(&certs, "client.key")));
    let brokers = |output: &Output| {
        let metadata: Option<serde_json::Value> = serde_json::from_slice(&output.stdout).ok();
        metadata
            .and_then(|m| m["brokers"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    wait_for("every node in Kafka metadata over TLS", TIMEOUT, || {
        brokers(&tls_kcat(&ca, client.clone(), &["-L", "-J", "-m", "5"])) == 3
    });

    let python_tls = || {
        let mut command = python();
        command.env("RUNNEL_KAFKA_TLS", &certs);
        command
    };
    run(
        python_tls().args(["create", &bootstrap, "secure", "3", "3"]),
        "create over TLS",
        None,
    );
    let produced = run(
        python_tls().args(["produce", &bootstrap, "secure", "100", "s"]),
        "produce over TLS",
        None,
    );
    let acked = acked_values(&produced);
    assert_eq!(acked.len(), 100);
    let read = tls_kcat(
        &ca,
        client.clone(),
        &["-C", "-t", "secure", "-o", "beginning", "-e", "-J", "-q"],
    );
    let read: BTreeSet<String> = json_lines(&read)
        .iter()
        .filter_map(|r| r["payload"].as_str().map(String::from))
        .collect();
    assert_eq!(read, acked, "kcat over TLS reads what kafka-python wrote over TLS");

    // No client certificate, one from another cluster's CA, and plaintext:
    // each is refused; the listener keeps serving.
    let other = cluster.scratch.path().join("other-certs");
    certs_init(&other, 1);
    let foreign = Some((file(&other, "client.pem"), file(&other, "client.key")));
    for (what, cert) in [("no client certificate", None), ("a foreign CA's certificate", foreign)] {
        let refused = tls_kcat(&ca, cert, &["-L", "-J", "-m", "3"]);
        assert_eq!(
            brokers(&refused),
            0,
            "{what}: {}",
            String::from_utf8_lossy(&refused.stderr)
        );
    }
    assert!(metadata(&bootstrap).is_none(), "plaintext against the TLS listener");
    assert_eq!(
        brokers(&tls_kcat(&ca, client, &["-L", "-J", "-m", "5"])),
        3,
        "still serving"
    );
}

/// One confluent-kafka static member of group `sg` (instance `instance`)
/// that joins, prints its assignment and closes; the partitions it got.
fn static_member_assignment(bootstrap: &str, instance: &str) -> Vec<u64> {
    let output = run(
        confluent().args(["static-member", bootstrap, "statics", "sg", instance]),
        "a static member",
        None,
    );
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).expect("its assignment");
    line["assigned"]
        .as_array()
        .unwrap_or_else(|| panic!("no assignment: {line}"))
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect()
}

/// Static membership: a confluent-kafka member with `group.instance.id`
/// closes (a static member sends no LeaveGroup) and a new process with the
/// same instance id takes its place at once: the same partitions, the same
/// generation (no rebalance), still one member, under a new member id.
#[test]
fn a_static_kafka_member_that_restarts_takes_its_partitions_back_without_a_rebalance() {
    let cluster = start_cluster(215);
    let bootstrap = cluster.bootstrap(&[]);
    create_partitions_when_ready(&bootstrap, "statics", 4);
    let first = static_member_assignment(&bootstrap, "worker-1");
    assert_eq!(first, vec![0, 1, 2, 3]);
    let before = group_json(&cluster, "sg");
    assert_eq!(before["members"].as_array().map(Vec::len), Some(1), "{before}");

    let second = static_member_assignment(&bootstrap, "worker-1");
    assert_eq!(second, first, "the same partitions back");
    let after = group_json(&cluster, "sg");
    assert_eq!(
        after["generation"], before["generation"],
        "no rebalance: {before} then {after}"
    );
    assert_eq!(after["state"], "Stable");
    let members = after["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 1, "{after}");
    assert_ne!(members[0]["member_id"], before["members"][0]["member_id"]);
}

/// `tests/kafka_kafkajs.js` under Node.js, with the kafkajs package that
/// `.ci/test` installs with npm (its folder in `RUNNEL_KAFKAJS`).
fn kafkajs(args: &[&str]) -> Command {
    let folder = std::env::var("RUNNEL_KAFKAJS").unwrap_or_else(|_| {
        panic!("RUNNEL_KAFKAJS is not set: run `.ci/test`, which installs kafkajs with npm and sets it")
    });
    let mut command = Command::new("node");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kafka_kafkajs.js"))
        .args(args)
        .env("RUNNEL_KAFKAJS", folder);
    command
}

/// KafkaJS, a client of its own (pure JavaScript, not librdkafka): it
/// creates a topic, produces 60 records with an idempotent producer and
/// acks=all (gzip, then uncompressed), and a consumer group of it reads
/// every one back once, with its key, header and timestamp, and commits
/// past the last; Runnel's own consumer reads the same records at the same
/// offsets.
#[test]
fn kafkajs_creates_a_topic_produces_idempotently_and_reads_in_a_group() {
    let cluster = start_cluster(210);
    let bootstrap = cluster.bootstrap(&[]);
    wait_for("every node in Kafka metadata", TIMEOUT, || {
        metadata(&bootstrap).is_some_and(|m| m["brokers"].as_array().is_some_and(|b| b.len() == 3))
    });
    let produced = run(
        &mut kafkajs(&["produce", &bootstrap, "js", "3", "60"]),
        "kafkajs produce",
        None,
    );
    let acks = json_lines(&produced);
    assert!(!acks.is_empty() && acks.iter().all(|a| a["error"] == 0), "{acks:?}");

    let read = run(
        &mut kafkajs(&["group", &bootstrap, "js", "js-group", "60"]),
        "kafkajs group",
        None,
    );
    let lines = json_lines(&read);
    let records: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("value").is_some()).collect();
    // Each record is in the log once (the idempotent producer), so a value
    // seen twice must be the same record delivered again: a group
    // redelivers what it had not committed when it rebalances (Kafka's
    // at-least-once, e.g. when its coordinator moves under load).
    let mut values: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut next: BTreeMap<u64, u64> = BTreeMap::new();
    for record in &records {
        let value = record["value"].as_str().expect("value");
        let i: u64 = value.trim_start_matches("js-").parse().expect("js-N");
        let place = (
            record["partition"].as_u64().expect("p"),
            record["offset"].as_u64().expect("o"),
        );
        let first = *values.entry(value.to_string()).or_insert(place);
        assert_eq!(first, place, "{value} is in the log twice");
        assert_eq!(record["key"], format!("k{}", i % 7), "{record}");
        assert_eq!(record["header"], i.to_string(), "{record}");
        assert_eq!(record["timestamp"], 1_700_000_000_000 + i, "{record}");
        let (p, o) = (
            record["partition"].as_u64().expect("p"),
            record["offset"].as_u64().expect("o"),
        );
        let n = next.entry(p).or_default();
        *n = (*n).max(o + 1);
    }
    assert_eq!(values.len(), 60, "every record once");
    let committed: BTreeMap<u64, u64> = lines
        .iter()
        .find_map(|l| l["committed"].as_array().cloned())
        .expect("committed offsets")
        .iter()
        .filter_map(|pair| Some((pair[0].as_u64()?, pair[1].as_u64()?)))
        .collect();
    assert_eq!(committed, next, "committed just past the last record of each partition");

    let mut command = common::runnel();
    command.args([
        "consume",
        "js",
        "-o",
        "earliest",
        "-e",
        "-f",
        "json",
        "--seeds",
        &cluster.seeds(),
    ]);
    command.arg("--certs").arg(cluster.certs());
    let ours = json_lines(&run(&mut command, "runnel consume", None));
    let at = |r: &serde_json::Value| {
        (
            r["partition"].as_u64(),
            r["offset"].as_u64(),
            r["value"].as_str().map(String::from),
        )
    };
    assert_eq!(ours.len(), 60, "the log holds each record once");
    let ours: BTreeSet<_> = ours.iter().map(at).collect();
    let theirs: BTreeSet<_> = records.iter().map(|r| at(r)).collect();
    assert_eq!(ours, theirs, "both protocols read the same records at the same offsets");
    kafkajs_resets_a_group_to_the_earliest(&bootstrap);
}

/// `admin.resetOffsets` commits -2 (earliest) for each partition: the
/// group keeps it as it came (as Kafka does), and a member of the group
/// (KafkaJS resolves any negative committed offset with its own
/// `fromBeginning`) reads all 60 again.
fn kafkajs_resets_a_group_to_the_earliest(bootstrap: &str) {
    let reset = run(
        &mut kafkajs(&["reset", bootstrap, "js", "js-group"]),
        "kafkajs reset",
        None,
    );
    let held: BTreeMap<u64, i64> = json_lines(&reset)
        .iter()
        .find_map(|l| l["reset"].as_array().cloned())
        .expect("the reset offsets")
        .iter()
        .filter_map(|pair| Some((pair[0].as_u64()?, pair[1].as_i64()?)))
        .collect();
    assert_eq!(
        held,
        BTreeMap::from([(0, -2), (1, -2), (2, -2)]),
        "-2 kept for each partition"
    );
    let again = run(
        &mut kafkajs(&["group", bootstrap, "js", "js-group", "60"]),
        "kafkajs group after the reset",
        None,
    );
    let read: BTreeSet<String> = json_lines(&again)
        .iter()
        .filter_map(|l| l["value"].as_str().map(String::from))
        .collect();
    assert_eq!(read.len(), 60, "every record read again from the earliest");
}

/// A topic created compacted through Kafka's CreateTopics: once replicas
/// compact, kcat and kafka-python read from the beginning across the gaps
/// and get every key's latest value at the offset it was written at.
#[test]
fn kafka_clients_read_a_compacted_topic_across_its_gaps() {
    let cluster = start_cluster_env(220, false, &[("RUNNEL_SEGMENT_BYTES", "4096")]);
    let bootstrap = cluster.bootstrap(&[]);
    wait_for("every node to be in Kafka metadata", TIMEOUT, || {
        metadata(&bootstrap).is_some_and(|m| m["brokers"].as_array().is_some_and(|b| b.len() == 3))
    });
    run(
        python().args(["create", &bootstrap, "prices", "1", "3", "cleanup.policy=compact"]),
        "kafka-python create compacted",
        None,
    );
    wait_for("the topic's leader", TIMEOUT, || {
        leaders(&bootstrap, "prices").is_some()
    });
    assert_eq!(topic_setting(&bootstrap, "prices", "cleanup.policy"), "compact");
    // Keys written once stay in closed segments; ten keys written 60 times
    // each leave only their latest.
    let mut lines: Vec<String> = (0..5).map(|j| format!("early-{j}:once-{j}")).collect();
    lines.extend((0..600).map(|i| format!("item-{}:price-{i}-{:<40}", i % 10, "")));
    let mut command = kcat();
    // Batches of 10, so that segments roll between them.
    command.args(["-b", &bootstrap, "-P", "-t", "prices", "-K:", "-X", "acks=all"]);
    command.args(["-X", "batch.num.messages=10", "-X", "linger.ms=0"]);
    run(&mut command, "kcat -P keyed", Some(lines.join("\n").as_bytes()));

    // Segments of 4 KiB hold about 50 records: compaction leaves each
    // closed segment's keys' latest and the active segment as it is.
    let mut records = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        records = kcat_records(&bootstrap, "prices");
        if records.len() < 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(records.len() < 200, "never compacted: {} records", records.len());
    let offsets: Vec<i64> = records.iter().map(|r| r["offset"].as_i64().expect("offset")).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "offsets rise: {offsets:?}");
    assert!(
        offsets.windows(2).any(|w| w[1] > w[0] + 1),
        "compaction leaves gaps: {offsets:?}"
    );
    let latest = |records: &[(String, String)]| -> BTreeMap<String, String> { records.iter().cloned().collect() };
    let kcat_pairs: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap_or_default().to_string(),
                r["payload"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let mut expected: BTreeMap<String, String> = (590..600)
        .map(|i| (format!("item-{}", i % 10), format!("price-{i}-{:<40}", "")))
        .collect();
    expected.extend((0..5).map(|j| (format!("early-{j}"), format!("once-{j}"))));
    assert_eq!(latest(&kcat_pairs), expected, "every key's latest value, read by kcat");

    let consumed = run(
        python().args(["consume", &bootstrap, "prices"]),
        "kafka-python consume",
        None,
    );
    let python: Vec<(i64, String, String)> = json_lines(&consumed)
        .iter()
        .filter(|l| l.get("value").is_some())
        .map(|l| {
            let field = |name: &str| l[name].as_str().unwrap_or_default().to_string();
            (l["offset"].as_i64().expect("offset"), field("key"), field("value"))
        })
        .collect();
    let kcat_read: Vec<(i64, String, String)> = offsets
        .iter()
        .zip(kcat_pairs)
        .map(|(offset, (key, value))| (*offset, key, value))
        .collect();
    assert_eq!(python, kcat_read, "kafka-python reads what kcat reads, offsets and all");
    drop(cluster.scratch);
}
