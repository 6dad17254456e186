//! Kafka clients against a 3-node cluster's Kafka listeners, unchanged:
//! kcat (librdkafka) and kafka-python produce, with every compression codec
//! and an idempotent producer, consume, read offsets and create topics; a
//! garbage frame closes only its own connection; and killing a partition's
//! leader loses no acknowledged record and duplicates none.
//!
//! kcat and kafka-python are outside parts: `.ci/test` installs them (kcat
//! from Debian's packages, kafka-python into a virtualenv under `target/`,
//! named by `RUNNEL_KAFKA_PYTHON`). Without them these tests fail, saying so.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    certs_init(&certs, 3);
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|i| common::free_addr_on_host(first_host + i).expect("a free loopback address"))
        .collect();
    let kafka: Vec<SocketAddr> = addrs.iter().map(|a| free_tcp_port(a.ip())).collect();
    let nodes = (0..3)
        .map(|i| {
            NodeCommand::for_tests(env!("CARGO_BIN_EXE_runnel"), scratch.path(), &certs, &addrs)
                .flags(["--kafka-listen", &kafka[i].to_string()])
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
    let python = std::env::var("RUNNEL_KAFKA_PYTHON").unwrap_or_else(|_| {
        panic!("RUNNEL_KAFKA_PYTHON is not set: run `.ci/test`, which makes a virtualenv with kafka-python and sets it")
    });
    let mut command = Command::new(python);
    command.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kafka_clients.py"));
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
    wait_for("every node to be in Kafka metadata", TIMEOUT, || {
        metadata(bootstrap).is_some_and(|m| m["brokers"].as_array().is_some_and(|b| b.len() == 3))
    });
    let created = run(
        python().args(["create", bootstrap, topic, "3", "3"]),
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
    drop(cluster.scratch);
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
    for record in kcat_records(&survivors, "payments") {
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

fn member(bootstrap: &str, topic: &str, group: &str) -> Member {
    let mut command = python();
    command.args(["group", bootstrap, topic, group, "1000000", "60000"]);
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
