// KafkaJS (2.2.4, pure JavaScript) against Runnel's Kafka listener, for
// tests/kafka.rs. Each command prints JSON lines; `.ci/test` installs
// kafkajs with npm and names its folder in RUNNEL_KAFKAJS.
const path = require("path");
const { Kafka, logLevel, CompressionTypes } = require(path.join(process.env.RUNNEL_KAFKAJS, "node_modules", "kafkajs"));

process.env.KAFKAJS_NO_PARTITIONER_WARNING = "1";
const emit = (fields) => console.log(JSON.stringify(fields));
const client = (bootstrap) =>
  new Kafka({ clientId: "kafkajs-test", brokers: bootstrap.split(","), logLevel: logLevel.NOTHING });

// Creates `topic` and produces `count` records in two sends (gzip, then
// uncompressed) with an idempotent producer and acks=all.
async function produce(bootstrap, topic, partitions, count) {
  const kafka = client(bootstrap);
  const admin = kafka.admin();
  await admin.connect();
  await admin.createTopics({
    topics: [{ topic, numPartitions: Number(partitions), replicationFactor: 3 }],
    waitForLeaders: true,
  });
  await admin.disconnect();
  const producer = kafka.producer({ idempotent: true, maxInFlightRequests: 1 });
  await producer.connect();
  const half = Math.floor(Number(count) / 2);
  const messages = (from, to) =>
    Array.from({ length: to - from }, (_, k) => {
      const i = from + k;
      return { key: `k${i % 7}`, value: `js-${i}`, headers: { n: String(i) }, timestamp: String(1_700_000_000_000 + i) };
    });
  for (const [compression, from, to] of [
    [CompressionTypes.GZIP, 0, half],
    [CompressionTypes.None, half, Number(count)],
  ]) {
    const acks = await producer.send({ topic, acks: -1, compression, messages: messages(from, to) });
    for (const a of acks) emit({ partition: a.partition, base_offset: Number(a.baseOffset), error: a.errorCode });
  }
  await producer.disconnect();
}

// Joins `group`, reads until `expected` distinct records arrived, commits,
// prints each record delivered, and leaves; then prints the group's
// committed offsets.
async function group(bootstrap, topic, groupId, expected) {
  const kafka = client(bootstrap);
  const consumer = kafka.consumer({ groupId, sessionTimeout: 10000, heartbeatInterval: 500 });
  await consumer.connect();
  await consumer.subscribe({ topic, fromBeginning: true });
  // Distinct records: a rebalance redelivers what was not committed.
  const seen = new Set();
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      const missing = `only ${seen.size} of ${expected} records in 60 s`;
      diagnose(kafka, groupId, topic).then(
        (state) => reject(new Error(`${missing}; ${state}`)),
        (e) => reject(new Error(`${missing}; no diagnosis: ${e}`)),
      );
    }, 60000);
    consumer
      .run({
        autoCommit: true,
        eachMessage: async ({ partition, message }) => {
          seen.add(`${partition}:${message.offset}`);
          emit({
            partition,
            offset: Number(message.offset),
            key: message.key.toString(),
            value: message.value.toString(),
            timestamp: Number(message.timestamp),
            header: message.headers.n.toString(),
          });
          if (seen.size >= Number(expected)) {
            clearTimeout(timer);
            resolve();
          }
        },
      })
      .catch(reject);
  });
  await consumer.disconnect();
  const admin = kafka.admin();
  await admin.connect();
  const offsets = await admin.fetchOffsets({ groupId, topics: [topic] });
  emit({ committed: offsets[0].partitions.map((p) => [p.partition, Number(p.offset)]) });
  await admin.disconnect();
}

// Resets the group's offsets to the earliest (`admin.resetOffsets`, which
// commits -2 for each partition) and prints what the group holds then.
async function reset(bootstrap, topic, groupId) {
  const admin = client(bootstrap).admin();
  await admin.connect();
  await admin.resetOffsets({ groupId, topic, earliest: true });
  const offsets = await admin.fetchOffsets({ groupId, topics: [topic] });
  emit({ reset: offsets[0].partitions.map((p) => [p.partition, Number(p.offset)]) });
  await admin.disconnect();
}

// What the cluster says of the group and the topic when records are
// missing: the committed offsets, each partition's offsets and the
// group's state (within 15 s).
async function diagnose(kafka, groupId, topic) {
  const admin = kafka.admin();
  const ask = async () => {
    await admin.connect();
    try {
      const committed = await admin.fetchOffsets({ groupId, topics: [topic] });
      const ends = await admin.fetchTopicOffsets(topic);
      const described = await admin.describeGroups([groupId]);
      return JSON.stringify({
        committed: committed[0].partitions.map((p) => [p.partition, Number(p.offset)]),
        offsets: ends.map((p) => [p.partition, Number(p.low), Number(p.high)]),
        group: described.groups.map((g) => ({ state: g.state, members: g.members.length })),
      });
    } finally {
      await admin.disconnect();
    }
  };
  const late = new Promise((_, reject) => setTimeout(() => reject(new Error('no answer in 15 s')), 15000));
  return Promise.race([ask(), late]);
}

const [command, ...args] = process.argv.slice(2);
({ produce, group, reset })[command](...args).catch((e) => {
  console.error(`kafkajs ${command} failed: ${e.stack || e}`);
  process.exit(1);
});
