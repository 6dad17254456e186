//! Brokers on three nodes in one process, talking over real QUIC with mutual
//! TLS: produce to a replicated partition, crash a replica (restarted in
//! place), kill the leader's node (failover), restart it (catch-up).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use runnel_actors::partition::ReplicaMsg;
use runnel_actors::protocol::GroupId;
use runnel_actors::{Acks, Broker, BrokerConfig, BrokerError};
use runnel_cluster::tls::CertDir;
use runnel_cluster::{Node, NodeConfig, NodeId};
use runnel_storage::{BatchBuilder, Record, RecordBatch};
use runnel_verify::fixtures::free_addr;

const GROUP: GroupId = GroupId(7);
const VOTERS: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];
const DEADLINE: Duration = Duration::from_secs(30);

struct Member {
    node: Node,
    broker: Broker,
}

struct Cluster {
    scratch: tempfile::TempDir,
    addrs: Vec<SocketAddr>,
    members: BTreeMap<NodeId, Member>,
    /// Acknowledged batches: tag → base offset.
    acked: BTreeMap<String, u64>,
}

fn batch(tag: &str) -> RecordBatch {
    let mut builder = BatchBuilder::new();
    for i in 0..5 {
        let value = Bytes::from(format!("{tag}/{i}"));
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

async fn start_member(scratch: &Path, addrs: &[SocketAddr], id: NodeId, voters: Option<Vec<NodeId>>) -> Member {
    let certs = CertDir::new(scratch.join("certs"));
    let node_id = id;
    let config = NodeConfig::new(node_id, addrs[id.0 as usize - 1], addrs.to_vec(), incarnation());
    let node = Node::start(config, &certs.node_identity(node_id).expect("identity"))
        .await
        .expect("node");
    let data: PathBuf = scratch.join(format!("data-{id}"));
    let broker = Broker::start(node.handle(), BrokerConfig::new(data))
        .await
        .expect("broker");
    broker.host(GROUP, voters, false).await.expect("host");
    Member { node, broker }
}

/// Incarnations must grow across restarts of a node id within the test.
fn incarnation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Cluster {
    async fn start() -> Cluster {
        let scratch = tempfile::tempdir().expect("tempdir");
        CertDir::new(scratch.path().join("certs"))
            .init(&[NodeId(1), NodeId(2), NodeId(3)], &[])
            .expect("certs");
        let addrs: Vec<SocketAddr> = VOTERS
            .iter()
            .map(|_| free_addr().expect("a free loopback port"))
            .collect();
        let mut members = BTreeMap::new();
        for id in VOTERS {
            members.insert(
                id,
                start_member(scratch.path(), &addrs, id, Some(VOTERS.to_vec())).await,
            );
        }
        Cluster {
            scratch,
            addrs,
            members,
            acked: BTreeMap::new(),
        }
    }

    /// The member whose replica leads, once one does.
    async fn leader(&self) -> NodeId {
        let deadline = Instant::now() + DEADLINE;
        loop {
            for (&id, member) in &self.members {
                if let Some(status) = member.broker.status(GROUP).await {
                    if status.leader == Some(id) {
                        return id;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader elected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Produces until acknowledged, following leadership changes.
    async fn produce(&mut self, tag: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let leader = self.leader().await;
            match self.members[&leader]
                .broker
                .produce(GROUP, batch(tag), Acks::All, 0)
                .await
            {
                Ok(base_offset) => {
                    self.acked.insert(tag.to_string(), base_offset);
                    return;
                }
                Err(BrokerError::NotLeader { .. } | BrokerError::LeadershipLost | BrokerError::Busy(_)) => {}
                Err(e) => panic!("produce {tag}: {e}"),
            }
            assert!(Instant::now() < deadline, "could not produce {tag}");
        }
    }

    /// Every committed user record on one replica: (offset, value).
    async fn records(&self, id: NodeId) -> Vec<(u64, Bytes)> {
        let broker = &self.members[&id].broker;
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let fetched = broker.fetch(GROUP, offset, 1 << 20, true).await.expect("fetch");
            if fetched.batches.is_empty() {
                return out;
            }
            for batch in fetched.batches {
                offset = batch.next_offset();
                if batch.is_control() {
                    continue;
                }
                for record in batch.records() {
                    let record = record.expect("record");
                    out.push((record.offset, record.record.value.expect("value")));
                }
            }
        }
    }

    /// Every acknowledged record is on `id` once, at its acknowledged offset.
    async fn check_acknowledged(&self, id: NodeId) {
        let records = self.records(id).await;
        let mut seen: BTreeMap<Bytes, Vec<u64>> = BTreeMap::new();
        for (offset, value) in &records {
            seen.entry(value.clone()).or_default().push(*offset);
        }
        for (tag, base_offset) in &self.acked {
            for i in 0..5u64 {
                let value = Bytes::from(format!("{tag}/{i}"));
                assert_eq!(
                    seen.get(&value),
                    Some(&vec![base_offset + i]),
                    "replica {id}: {value:?}"
                );
            }
        }
        assert!(
            seen.values().all(|offsets| offsets.len() == 1),
            "replica {id} holds a record twice"
        );
    }

    /// Waits until the replica's committed offset reaches `offset`.
    async fn wait_committed(&self, id: NodeId, offset: u64) {
        let deadline = Instant::now() + DEADLINE;
        while self.members[&id]
            .broker
            .status(GROUP)
            .await
            .is_none_or(|s| s.committed_offset < offset)
        {
            assert!(Instant::now() < deadline, "replica {id} did not reach offset {offset}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn leader_committed(&self) -> u64 {
        let leader = self.leader().await;
        self.members[&leader]
            .broker
            .status(GROUP)
            .await
            .expect("status")
            .committed_offset
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_partition_survives_a_replica_crash_and_a_leader_kill() {
    let mut cluster = Cluster::start().await;

    tracing::info!("phase: produce to the elected leader");
    for i in 0..100 {
        cluster.produce(&format!("first-{i}")).await;
    }
    let committed = cluster.leader_committed().await;
    for id in VOTERS {
        cluster.wait_committed(id, committed).await;
        cluster.check_acknowledged(id).await;
    }
    let reference = cluster.records(NodeId(1)).await;
    for id in [NodeId(2), NodeId(3)] {
        assert_eq!(cluster.records(id).await, reference, "replica {id} differs");
    }

    tracing::info!("phase: a follower's replica panics; its supervisor restarts it in place");
    let leader = cluster.leader().await;
    let follower = *VOTERS.iter().find(|&&id| id != leader).expect("a follower");
    let victim = cluster.members[&follower].broker.replica(GROUP).expect("replica");
    victim.cast(ReplicaMsg::InjectPanic).expect("cast");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let restarted = cluster.members[&follower]
            .broker
            .replica(GROUP)
            .is_some_and(|r| r.get_id() != victim.get_id());
        if restarted {
            break;
        }
        assert!(Instant::now() < deadline, "the crashed replica was not restarted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = cluster.members[&follower].broker.health().await;
    assert_eq!(health.len(), 1);
    assert_eq!(health[0].restarts, 1, "{health:?}");
    assert!(
        health[0]
            .last_failure
            .as_deref()
            .is_some_and(|r| r.contains("injected fault")),
        "{health:?}"
    );
    for i in 0..20 {
        cluster.produce(&format!("after-crash-{i}")).await;
    }
    let committed = cluster.leader_committed().await;
    cluster.wait_committed(follower, committed).await;
    cluster.check_acknowledged(follower).await;

    tracing::info!("phase: kill the leader's node; another replica takes over");
    let old_leader = cluster.leader().await;
    let Member { mut node, broker } = cluster.members.remove(&old_leader).expect("leader");
    drop(broker);
    node.shutdown();
    drop(node);
    for i in 0..50 {
        cluster.produce(&format!("after-failover-{i}")).await;
    }
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, old_leader);
    for &id in cluster.members.keys() {
        cluster.wait_committed(id, cluster.leader_committed().await).await;
        cluster.check_acknowledged(id).await;
    }

    tracing::info!("phase: restart the old leader's node with its data; it catches up");
    let member = start_member(cluster.scratch.path(), &cluster.addrs, old_leader, None).await;
    cluster.members.insert(old_leader, member);
    cluster
        .wait_committed(old_leader, cluster.leader_committed().await)
        .await;
    cluster.check_acknowledged(old_leader).await;
    let reference = cluster.records(new_leader).await;
    assert_eq!(
        cluster.records(old_leader).await,
        reference,
        "the restarted replica's log differs from the leader's"
    );
}

fn idempotent_batch(producer_id: i64, base_sequence: i32, tag: &str) -> RecordBatch {
    let producer = runnel_storage::ProducerInfo {
        producer_id,
        producer_epoch: 0,
        base_sequence,
    };
    let mut builder = BatchBuilder::new().producer(producer);
    for i in 0..5 {
        let value = Bytes::from(format!("{tag}/{i}"));
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
async fn an_idempotent_producers_retry_is_written_once_and_gaps_are_refused() {
    let mut cluster = Cluster::start().await;
    cluster.produce("warm-up").await;
    let leader = cluster.leader().await;
    let broker = &cluster.members[&leader].broker;
    let first = broker
        .produce(GROUP, idempotent_batch(42, 0, "a"), Acks::All, 0)
        .await
        .expect("first");
    let retry = broker
        .produce(GROUP, idempotent_batch(42, 0, "a"), Acks::All, 0)
        .await
        .expect("retry");
    assert_eq!(retry, first, "a retry answers with the original's offset");
    let err = broker
        .produce(GROUP, idempotent_batch(42, 20, "gap"), Acks::All, 0)
        .await
        .expect_err("gap accepted");
    assert_eq!(
        err,
        BrokerError::OutOfOrderSequence {
            producer_id: 42,
            expected: 5,
            got: 20
        }
    );
    let reused = idempotent_batch(42, 0, "a-but-longer");
    let mut longer = BatchBuilder::new().producer(reused.header().producer);
    for i in 0..7 {
        longer
            .push(&Record {
                timestamp_ms: 1,
                value: Some(Bytes::from(format!("x/{i}"))),
                ..Record::default()
            })
            .expect("push");
    }
    let err = broker
        .produce(GROUP, longer.build().expect("build"), Acks::All, 0)
        .await
        .expect_err("reuse accepted");
    assert_eq!(
        err,
        BrokerError::SequenceMismatch {
            producer_id: 42,
            base_sequence: 0,
            stored_last_sequence: 4
        },
        "a reused sequence names the stored batch"
    );
    let mut forged = BatchBuilder::new().attributes(runnel_storage::batch::ATTRIBUTE_CONTROL);
    forged
        .push(&Record {
            value: Some(Bytes::from_static(b"not a control entry")),
            ..Record::default()
        })
        .expect("push");
    let err = broker
        .produce(GROUP, forged.build().expect("build"), Acks::All, 0)
        .await
        .expect_err("control batch accepted");
    assert!(err.to_string().contains("attributes must be 0"), "{err}");
    let next = broker
        .produce(GROUP, idempotent_batch(42, 5, "b"), Acks::All, 0)
        .await
        .expect("next");
    assert!(next > first);
    cluster.acked.insert("a".to_string(), first);
    cluster.acked.insert("b".to_string(), next);
    for id in VOTERS {
        cluster.wait_committed(id, cluster.leader_committed().await).await;
        cluster.check_acknowledged(id).await;
    }
}
