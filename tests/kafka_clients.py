"""kafka-python against a Runnel cluster's Kafka listeners (tests/kafka.rs).

Each command prints JSON lines the Rust test reads:
  create BOOTSTRAP TOPIC PARTITIONS REPLICATION [KEY=VALUE...] (topic settings)
  produce BOOTSTRAP TOPIC COUNT TAG     (idempotent, acks=all, gzip)
  consume BOOTSTRAP TOPIC               (every record up to the end offsets)
  group BOOTSTRAP TOPIC GROUP MAX IDLE_MS (a group member: reads until MAX
        records or IDLE_MS without one, commits what it delivered whenever
        it finds nothing new and at the end, leaves)
  describe BOOTSTRAP GROUP              (state and each member's partitions)
  configs BOOTSTRAP TOPIC               (the topic's settings, DescribeConfigs)
  delete-groups BOOTSTRAP GROUP...      (DeleteGroups; each group's outcome)
  delete-offsets BOOTSTRAP GROUP TOPIC PARTITION... (OffsetDelete; each partition's
        outcome or the request's error, then the group's committed offsets of TOPIC)
  alter BOOTSTRAP TOPIC MODE KEY=VALUE... (MODE incremental: IncrementalAlterConfigs,
        KEY= deletes the setting; MODE replace: AlterConfigs; the outcome)
  grow BOOTSTRAP TOPIC COUNT            (CreatePartitions to COUNT in all; the outcome)
  delete-records BOOTSTRAP TOPIC PARTITION OFFSET (DeleteRecords below OFFSET, -1: the
        high watermark; the low watermark, or the error, then the earliest offset)

With RUNNEL_KAFKA_TLS=<certificate directory> every client uses TLS with the
cluster CA and the client certificate.
"""

import json
import os
import sys
import time

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import CommitFailedError, KafkaError


def tls():
    """TLS settings when RUNNEL_KAFKA_TLS names a certificate directory:
    the cluster CA and the client certificate `runnel certs init` made."""
    certs = os.environ.get("RUNNEL_KAFKA_TLS")
    if not certs:
        return {}
    return {"security_protocol": "SSL", "ssl_cafile": os.path.join(certs, "ca.pem"),
            "ssl_certfile": os.path.join(certs, "client.pem"), "ssl_keyfile": os.path.join(certs, "client.key")}


def emit(**fields):
    print(json.dumps(fields), flush=True)


def create(bootstrap, topic, partitions, replication, *settings):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), **tls(), request_timeout_ms=30000)
    configs = dict(setting.split("=", 1) for setting in settings)
    admin.create_topics([NewTopic(topic, num_partitions=int(partitions), replication_factor=int(replication),
                                  topic_configs=configs)])
    emit(created=topic, topics=sorted(admin.list_topics()))
    admin.close()


def produce(bootstrap, topic, count, tag):
    producer = KafkaProducer(
        bootstrap_servers=bootstrap.split(","), **tls(),
        acks="all",
        enable_idempotence=True,
        compression_type="gzip",
        retries=100,
        retry_backoff_ms=100,
        request_timeout_ms=10000,
        delivery_timeout_ms=60000,
        linger_ms=5,
    )
    started = time.monotonic()
    sent = []
    for i in range(int(count)):
        value = "%s-%d" % (tag, i)
        future = producer.send(topic, key=("k%d" % i).encode(), value=value.encode(), headers=[("tag", tag.encode())])
        sent.append((value, future))
    producer.flush()
    for value, future in sent:
        meta = future.get(timeout=60)
        emit(acked=value, partition=meta.partition, offset=meta.offset)
    emit(done=len(sent), seconds=round(time.monotonic() - started, 3))
    producer.close()


def consume(bootstrap, topic):
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","), **tls(),
        enable_auto_commit=False,
        consumer_timeout_ms=10000,
    )
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    ends = consumer.end_offsets(partitions)
    for message in consumer:
        emit(
            partition=message.partition,
            offset=message.offset,
            key=message.key.decode() if message.key is not None else None,
            value=message.value.decode(),
            headers={k: v.decode() for k, v in message.headers},
        )
        if all(consumer.position(tp) >= ends[tp] for tp in partitions):
            break
    emit(end_offsets={str(tp.partition): offset for tp, offset in ends.items()})
    consumer.close()


def group(bootstrap, topic, group_id, max_records, idle_ms):
    """A member that commits what it delivered whenever a poll finds nothing
    new (so its commits follow its reads closely), and once more at the end."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap.split(","), **tls(),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    read, pending, assigned = 0, False, set()
    last_record = time.monotonic()
    while read < int(max_records) and time.monotonic() - last_record < int(idle_ms) / 1000:
        batches = consumer.poll(timeout_ms=200, max_records=int(max_records) - read)
        assigned |= {tp.partition for tp in consumer.assignment()}
        if not batches:
            if pending:
                pending = not commit(consumer)
            continue
        last_record = time.monotonic()
        for messages in batches.values():
            for message in messages:
                emit(partition=message.partition, offset=message.offset, value=message.value.decode())
                read += 1
                pending = True
    commit(consumer)
    committed = {str(tp.partition): consumer.committed(tp) for tp in consumer.assignment()}
    emit(read=read, assigned=sorted(assigned), committed=committed)
    consumer.close()


def commit(consumer):
    """Commits the positions of every record delivered so far; a commit
    refused during a rebalance is reported (the group's next owner rereads)."""
    try:
        consumer.commit()
        return True
    except CommitFailedError as e:
        emit(commit_failed=str(e))
        return False


def describe(bootstrap, group_id):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), **tls())
    info = admin.describe_groups([group_id])[group_id]
    members = []
    for member in info.get("members") or []:
        assignment = member.get("member_assignment") or {}
        topics = assignment.get("assigned_partitions", []) if isinstance(assignment, dict) else []
        members.append(sorted(p for t in topics for p in t.get("partitions", [])))
    emit(state=info.get("group_state"), members=members)
    admin.close()


def delete_groups(bootstrap, *group_ids):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), **tls())
    for group_id, error in admin.delete_groups(list(group_ids)).items():
        emit(group=group_id, error=error)
    admin.close()


def delete_offsets(bootstrap, group_id, topic, *partitions):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), **tls())
    try:
        wanted = [TopicPartition(topic, int(p)) for p in partitions]
        for tp, error in admin.delete_group_offsets(group_id, wanted).items():
            emit(partition=tp.partition, error=error.__name__)
    except KafkaError as e:
        emit(error=type(e).__name__)
    committed = admin.list_group_offsets(group_id).get(group_id, {})
    emit(committed=sorted([tp.partition, o.offset] for tp, o in committed.items() if tp.topic == topic))
    admin.close()


def configs(bootstrap, topic):
    from kafka.admin import ConfigResource, ConfigResourceType
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), **tls())
    found = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all")
    print(json.dumps(found, default=str), flush=True)
    admin.close()


def alter(bootstrap, topic, mode, *settings):
    from kafka.admin import ConfigResource, ConfigResourceType
    configs = {}
    for setting in settings:
        key, value = setting.split("=", 1)
        configs[key] = value if value else ("DELETE", None)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), **tls())
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)
    result = admin.alter_configs([resource], incremental=(mode == "incremental"), raise_on_unknown=False)
    emit(result=result.get("topic", {}).get(topic))
    admin.close()


def grow(bootstrap, topic, count):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), **tls())
    response = admin.create_partitions({topic: int(count)}, raise_errors=False)
    emit(results=[[r.name, r.error_code, r.error_message] for r in response.results])
    admin.close()


def delete_records(bootstrap, topic, partition, offset):
    tp = TopicPartition(topic, int(partition))
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), **tls(), request_timeout_ms=30000)
    try:
        result = admin.delete_records({tp: int(offset)})
        emit(low_watermark=result[tp]["low_watermark"])
    except Exception as error:  # the test reads which error it was
        emit(error=type(error).__name__)
    admin.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), **tls())
    emit(earliest=consumer.beginning_offsets([tp])[tp])
    consumer.close()


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"create": create, "produce": produce, "consume": consume, "group": group, "describe": describe, "configs": configs,
     "delete-groups": delete_groups, "delete-offsets": delete_offsets, "alter": alter, "grow": grow, "delete-records": delete_records}[command](*args)
