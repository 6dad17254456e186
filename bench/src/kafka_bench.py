"""`runnel bench kafka`'s Kafka side: confluent-kafka (librdkafka).

  produce BOOTSTRAP TOPIC PARTITIONS RECORD_BYTES SECONDS
      idempotent, acks=all, uncompressed, large batches; chunks of 500
      records round-robin over the partitions for SECONDS (produce_batch, so
      Python's per-call cost stays out of the way), then waits for every
      acknowledgement.
  consume BOOTSTRAP TOPIC PARTITIONS RECORDS
      reads RECORDS records from offset 0 of every partition.

Each prints one JSON line of figures. Embedded in the runnel binary.
"""

import json
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition


def produce(bootstrap, topic, partitions, record_bytes, seconds):
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "none",
        "linger.ms": 5,
        "batch.size": 1000000,
        "queue.buffering.max.kbytes": 65536,
        "message.timeout.ms": 60000,
    })
    partitions, value = int(partitions), b"k" * int(record_bytes)
    latencies, acked, failed = [], [0], [0]

    def delivered(error, message):
        # Called per record by librdkafka's thread; kept cheap: counts, and
        # samples one latency in 16.
        if error is not None:
            failed[0] += 1
            return
        acked[0] += 1
        if acked[0] & 15 == 0:
            latencies.append(message.latency())

    chunk = [{"value": value}] * 500
    cpu_started = time.process_time()
    started = time.monotonic()
    until = started + float(seconds)
    partition = 0
    while time.monotonic() < until:
        try:
            producer.produce_batch(topic, chunk, partition=partition, on_delivery=delivered)
            partition = (partition + 1) % partitions
        except BufferError:
            pass
        producer.poll(0.001)
    left = producer.flush(120)
    elapsed = time.monotonic() - started
    latencies.sort()
    pick = lambda p: latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1e3 if latencies else None
    cpu = time.process_time() - cpu_started
    print(json.dumps({"records": acked[0], "failed": failed[0], "unflushed": left, "seconds": elapsed, "cpu_seconds": cpu,
                      "ack_p50_ms": pick(0.5), "ack_p99_ms": pick(0.99)}), flush=True)


def consume(bootstrap, topic, partitions, records):
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "runnel-bench",
        "enable.auto.commit": False,
        "fetch.max.bytes": 52428800,
        "max.partition.fetch.bytes": 4194304,
    })
    consumer.assign([TopicPartition(topic, p, 0) for p in range(int(partitions))])
    wanted, read, size = int(records), 0, 0
    started = time.monotonic()
    while read < wanted and time.monotonic() - started < 300:
        for message in consumer.consume(num_messages=10000, timeout=1.0):
            if message.error() is None:
                read += 1
                size += len(message.value())
    elapsed = time.monotonic() - started
    consumer.close()
    print(json.dumps({"records": read, "bytes": size, "seconds": elapsed}), flush=True)


if __name__ == "__main__":
    {"produce": produce, "consume": consume}[sys.argv[1]](*sys.argv[2:])
