//! Three nodes in one process with brokers and controllers, used through the
//! Rust client as an application would: create a topic, produce, consume,
//! and get clear errors for bad requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use runnel_actors::{Broker, BrokerConfig, Controller, ControllerConfig};
use runnel_client::protocol::{MetadataError, TopicConfig};
use runnel_client::{Acks, Client, ClientError, Consumer, Producer};
use runnel_cluster::tls::CertDir;
use runnel_cluster::{Node, NodeConfig, NodeId};
use runnel_storage::Record;
use runnel_verify::fixtures::free_addr;

const DEADLINE: Duration = Duration::from_secs(30);

struct Member {
    _node: Node,
    _controller: Controller,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_created_produced_to_and_consumed_through_the_client() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    CertDir::new(&certs)
        .init(&[NodeId(1), NodeId(2), NodeId(3)], &[])
        .expect("certs");
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr().expect("a free loopback port")).collect();
    let mut members = Vec::new();
    for id in 1..=3u32 {
        let config = NodeConfig::new(NodeId(id), addrs[id as usize - 1], addrs.clone(), 1);
        let node = Node::start(
            config,
            &CertDir::new(&certs).node_identity(NodeId(id)).expect("identity"),
        )
        .await
        .expect("node");
        let broker = Arc::new(
            Broker::start(
                node.handle(),
                BrokerConfig::new(scratch.path().join(format!("data-{id}"))),
            )
            .await
            .expect("broker"),
        );
        let controller = Controller::start(broker, ControllerConfig::new(vec![NodeId(1), NodeId(2), NodeId(3)]))
            .await
            .expect("controller");
        members.push(Member {
            _node: node,
            _controller: controller,
        });
    }

    tracing::info!("phase: create a topic once all nodes are up");
    let client = Arc::new(Client::connect(addrs.clone(), &certs).await.expect("connect"));
    let deadline = Instant::now() + DEADLINE;
    loop {
        match client.create_topic("payments", TopicConfig::new(6, 3)).await {
            Ok(()) => break,
            Err(ClientError::Refused(MetadataError::NotEnoughNodes { .. }) | ClientError::Broker(_))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("create topic: {e}"),
        }
    }
    let topics = client.topics().await.expect("topics");
    assert_eq!(topics.len(), 1);
    assert_eq!(topics[0].partitions.len(), 6);
    assert!(topics[0].partitions.iter().all(|p| p.replicas.len() == 3));

    tracing::info!("phase: bad requests get errors that name the problem");
    let err = client
        .create_topic("payments", TopicConfig::new(1, 1))
        .await
        .expect_err("duplicate");
    assert_eq!(err.to_string(), "topic \"payments\" already exists");
    let err = client
        .create_topic("bad name", TopicConfig::new(1, 1))
        .await
        .expect_err("bad name");
    assert!(err.to_string().contains("only ASCII letters"), "{err}");
    let err = client
        .create_topic("wide", TopicConfig::new(1, 4))
        .await
        .expect_err("too wide");
    assert_eq!(err.to_string(), "replication factor 4 is more than the 3 live nodes");
    let err = Producer::new(client.clone(), "nope", Acks::All)
        .await
        .err()
        .expect("unknown topic");
    assert_eq!(err.to_string(), "topic \"nope\" does not exist");
    let mut producer = Producer::new(client.clone(), "payments", Acks::All)
        .await
        .expect("producer");
    let err = producer
        .send(Some(6), Record::default())
        .await
        .expect_err("partition out of range");
    assert!(
        err.to_string()
            .contains("partition 6 of topic \"payments\" does not exist"),
        "{err}"
    );
    let huge = Record {
        value: Some(Bytes::from(vec![0u8; 2 << 20])),
        ..Record::default()
    };
    let err = producer.send(None, huge).await.expect_err("too large");
    assert!(matches!(err, ClientError::RecordTooLarge { .. }), "{err}");

    let err = client
        .inject_panic(NodeId(1), "payments", 0)
        .await
        .expect_err("fault hook on by default");
    assert!(err.to_string().contains("test fault hooks are disabled"), "{err}");

    tracing::info!("phase: produce keyed records, then consume every partition");
    let count = 3000u32;
    producer.batch_records_max = 100;
    let mut acknowledged = 0u64;
    for i in 0..count {
        let record = Record {
            timestamp_ms: i64::from(i),
            key: Some(Bytes::from(format!("card-{}", i % 50))),
            value: Some(Bytes::from(format!("{i}"))),
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

    let mut consumer = Consumer::new(client.clone(), "payments");
    for partition in 0..6 {
        consumer.assign(partition, 0);
    }
    let mut seen = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while seen.len() < count as usize {
        assert!(Instant::now() < deadline, "consumed only {} of {count}", seen.len());
        seen.extend(consumer.poll().await.expect("poll"));
    }
    assert_eq!(seen.len(), count as usize, "nothing twice");
    // Per partition: offsets increase and, per key, values keep production order.
    let mut last_value_per_key = std::collections::BTreeMap::new();
    let mut last_offset_per_partition = std::collections::BTreeMap::new();
    for (partition, record) in &seen {
        let previous = last_offset_per_partition.insert(*partition, record.offset);
        assert!(
            previous.is_none_or(|p| p < record.offset),
            "offsets go backwards in partition {partition}"
        );
        let key = record.record.key.clone().expect("key");
        let value: u32 = std::str::from_utf8(record.record.value.as_deref().expect("value"))
            .expect("utf-8")
            .parse()
            .expect("number");
        let previous = last_value_per_key.insert(key, value);
        assert!(previous.is_none_or(|p| p < value), "per-key order broken");
    }

    tracing::info!("phase: every replica holds the same records at the same offsets");
    let topic = client.describe_topic("payments").await.expect("describe");
    for partition in &topic.partitions {
        let mut reference = None;
        for &node in &partition.replicas {
            let deadline = Instant::now() + DEADLINE;
            let records = loop {
                let fetched = client
                    .fetch_from_replica(node, "payments", partition.partition, 0, 16 << 20)
                    .await
                    .expect("fetch");
                if fetched.records.len() == last_value_count(&seen, partition.partition) || Instant::now() > deadline {
                    break fetched.records;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            match &reference {
                None => reference = Some(records),
                Some(reference) => assert_eq!(
                    &records, reference,
                    "partition {} differs on node {node}",
                    partition.partition
                ),
            }
        }
    }
    drop(members);
}

fn last_value_count(seen: &[(u32, runnel_storage::StoredRecord)], partition: u32) -> usize {
    seen.iter().filter(|(p, _)| *p == partition).count()
}
