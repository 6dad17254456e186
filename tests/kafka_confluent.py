"""confluent-kafka (librdkafka) against a Runnel cluster's Kafka listeners
(tests/kafka.rs).

Each command prints JSON lines the Rust test reads:
  produce BOOTSTRAP TOPIC COUNT TAG CODEC FIRST_TS_MS
        (idempotent, acks=all, compression CODEC; record i has key k<i>,
        value <TAG>-<i>, a header and timestamp FIRST_TS_MS + 10 * i)
  consume BOOTSTRAP TOPIC FROM
        (FROM = earliest | offset:PARTITION:OFFSET | time:MS; every record
        from there up to the end offsets of the partitions read)
  member BOOTSTRAP TOPIC GROUP
        (a group member until killed: prints each record it delivers, then
        commits past it synchronously; prints each assignment)
"""

import json
import sys
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition


def emit(**fields):
    print(json.dumps(fields), flush=True)


def produce(bootstrap, topic, count, tag, codec, first_ts_ms):
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": codec,
        "linger.ms": 5,
        "message.timeout.ms": 60000,
    })
    acked = []

    def delivered(error, message):
        if error is not None:
            emit(failed=message.value().decode(), error=str(error))
            return
        acked.append(message.value().decode())
        emit(acked=message.value().decode(), partition=message.partition(), offset=message.offset(),
             timestamp=message.timestamp()[1])

    for i in range(int(count)):
        producer.produce(topic, key=("k%d" % i).encode(), value=("%s-%d" % (tag, i)).encode(),
                         headers=[("codec", codec.encode())], timestamp=int(first_ts_ms) + 10 * i,
                         on_delivery=delivered)
        producer.poll(0)
    left = producer.flush(60)
    emit(done=len(acked), left=left)


def consume(bootstrap, topic, start):
    # Partition EOF events say when a partition is read to its end, also
    # when its last entries are control batches no message is made of.
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False,
                         "enable.partition.eof": True})
    partitions = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
    if start == "earliest":
        wanted = [TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[0])
                  for p in partitions]
    elif start.startswith("offset:"):
        _, partition, offset = start.split(":")
        wanted = [TopicPartition(topic, int(partition), int(offset))]
    else:
        by_time = [TopicPartition(topic, p, int(start.split(":")[1])) for p in partitions]
        wanted = consumer.offsets_for_times(by_time, timeout=30)
        emit(offsets_for_times={str(tp.partition): tp.offset for tp in wanted})
    ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in wanted}
    wanted = [tp for tp in wanted if tp.offset >= 0 and tp.offset < ends[tp.partition]]
    consumer.assign(wanted)
    left = {tp.partition for tp in wanted}
    deadline = time.monotonic() + 30
    while left and time.monotonic() < deadline:
        message = consumer.poll(1.0)
        if message is None:
            continue
        if message.error():
            if message.error().code() == KafkaError._PARTITION_EOF:
                left.discard(message.partition())
            continue
        emit(partition=message.partition(), offset=message.offset(), key=message.key().decode(),
             value=message.value().decode(), timestamp=message.timestamp()[1],
             headers={k: v.decode() for k, v in message.headers() or []})
        if message.offset() + 1 >= ends[message.partition()]:
            left.discard(message.partition())
    emit(end_offsets={str(p): o for p, o in ends.items()}, unfinished=sorted(left))
    consumer.close()


def member(bootstrap, topic, group_id):
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "partition.assignment.strategy": "range",
    })
    consumer.subscribe([topic], on_assign=lambda c, ps: emit(assigned=sorted(p.partition for p in ps)))
    while True:
        message = consumer.poll(1.0)
        if message is None:
            continue
        if message.error():
            emit(error=str(message.error()))
            continue
        emit(partition=message.partition(), offset=message.offset(), value=message.value().decode())
        try:
            consumer.commit(message=message, asynchronous=False)
        except KafkaException as e:
            emit(commit_failed=str(e))


def static_member(bootstrap, topic, group_id, instance):
    """A static member (group.instance.id) that joins, prints its first
    assignment and closes, which for a static member sends no LeaveGroup."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "group.instance.id": instance,
        "enable.auto.commit": False,
        "session.timeout.ms": 30000,
        "heartbeat.interval.ms": 500,
        "partition.assignment.strategy": "range",
    })
    assigned = []
    consumer.subscribe([topic], on_assign=lambda c, ps: assigned.append(sorted(p.partition for p in ps)))
    deadline = time.monotonic() + 60
    while not assigned and time.monotonic() < deadline:
        consumer.poll(0.2)
    emit(assigned=assigned[0] if assigned else None)
    consumer.close()


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"produce": produce, "consume": consume, "member": member, "static-member": static_member}[command](*args)
