// Node's amqplib against one AMQP address (warren, or RabbitMQ directly for comparison).
//
//   node tests/clients/amqplib_client.js amqp://guest:guest@127.0.0.1:5673/
//
// What a Node service relies on, with amqplib's defaults except frameMax=4096 (what amqplib
// used before 2.0, and the smallest a broker may ask for: every body is split into many
// frames): confirm-channel publishes each confirmed once, a consumer with prefetch and manual
// acks receives every message exactly once (a nack with requeue gives it back once), a
// mandatory unroutable publish comes back as a 'return', a 1 MiB message survives re-splitting,
// and basic.get / purge / delete answer with counts. Order is not asserted: through warren with
// two shard clusters a queue's messages live on both, each in order. Exits 0 when all hold;
// prints one line per check.

'use strict';

const amqp = require('amqplib');
const crypto = require('node:crypto');

const N = 500;
const url = process.argv[2];
if (!url) {
  console.error('usage: amqplib_client.js AMQP_URL');
  process.exit(2);
}

let failed = 0;
function check(ok, what) {
  console.log(`  [${ok ? 'PASS' : 'FAIL'}] ${what}`);
  if (!ok) failed += 1;
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function main() {
  const sep = url.includes('?') ? '&' : '?';
  const conn = await amqp.connect(`${url}${sep}frameMax=4096&heartbeat=10`);
  let connError = null;
  conn.on('error', (e) => { connError = e; });
  const props = conn.connection.serverProperties;
  check(props.capabilities && props.capabilities.publisher_confirms === true,
    `server advertises publisher_confirms (product ${props.product} ${props.version})`);
  check(conn.connection.frameMax === 4096, `frame_max negotiated to 4096 (got ${conn.connection.frameMax})`);

  const ch = await conn.createConfirmChannel();
  let chError = null;
  ch.on('error', (e) => { chError = e; });
  const queue = `clients-amqplib-${crypto.randomBytes(6).toString('hex')}`;
  await ch.assertQueue(queue, { durable: false, autoDelete: false });

  // Confirmed publishes: every callback once, no error.
  let acked = 0;
  let nacked = 0;
  for (let i = 0; i < N; i += 1) {
    ch.publish('', queue, Buffer.from(`msg-${i}`), { persistent: true, messageId: String(i) },
      (err) => { if (err) nacked += 1; else acked += 1; });
  }
  await withTimeout(ch.waitForConfirms(), 30000, 'waitForConfirms');
  check(acked === N && nacked === 0, `${N} confirmed publishes: ${acked} acked, ${nacked} nacked`);

  // A mandatory publish nobody can route comes back.
  const returned = new Promise((resolve) => ch.once('return', resolve));
  ch.publish('', `${queue}-nowhere`, Buffer.from('lost'), { mandatory: true });
  const ret = await withTimeout(returned, 10000, 'basic.return');
  check(ret.fields.replyCode === 312 && ret.content.toString() === 'lost',
    `mandatory unroutable publish returned with 312 (${ret.fields.replyText})`);
  await withTimeout(ch.waitForConfirms(), 10000, 'confirm of the returned publish');

  // A consumer with a prefetch of 10 and manual acks; message 7 is nacked once with requeue.
  const consumer = await conn.createChannel();
  consumer.on('error', (e) => { chError = e; });
  await consumer.prefetch(10);
  const seen = new Map();
  let inFlight = 0;
  let maxInFlight = 0;
  let nackedOnce = false;
  let redelivered = false;
  const done = new Promise((resolve) => {
    consumer.consume(queue, (msg) => {
      inFlight += 1;
      maxInFlight = Math.max(maxInFlight, inFlight);
      const id = msg.properties.messageId;
      setImmediate(() => {
        inFlight -= 1;
        if (id === '7' && !nackedOnce) {
          nackedOnce = true;
          consumer.nack(msg, false, true);
          return;
        }
        if (id === '7') redelivered = msg.fields.redelivered;
        seen.set(id, (seen.get(id) || 0) + 1);
        consumer.ack(msg);
        if (seen.size === N) resolve();
      });
    }, { noAck: false });
  });
  await withTimeout(done, 60000, `${N} deliveries`);
  const twice = [...seen.values()].filter((c) => c > 1).length;
  check(seen.size === N && twice === 0, `consumer got all ${N} exactly once (${seen.size} distinct, ${twice} twice)`);
  check(redelivered, 'the nacked message came back once, marked redelivered');
  check(maxInFlight <= 10, `never more than the prefetch of 10 unacknowledged (max ${maxInFlight})`);
  await consumer.close();

  // 1 MiB through 4096-byte frames, both ways.
  const big = crypto.randomBytes(1024 * 1024);
  ch.publish('', queue, big, { messageId: 'big' });
  await withTimeout(ch.waitForConfirms(), 30000, 'confirm of the 1 MiB message');
  let got = false;
  for (let i = 0; i < 100 && !got; i += 1) {
    got = await ch.get(queue, { noAck: true });
    if (!got) await new Promise((r) => setTimeout(r, 50));
  }
  check(got && Buffer.compare(got.content, big) === 0, '1 MiB message round trip (basic.get) intact');

  // Counts: purge and delete report what was there.
  for (let i = 0; i < 3; i += 1) ch.publish('', queue, Buffer.from(`purge-${i}`));
  await withTimeout(ch.waitForConfirms(), 10000, 'confirms before purge');
  const purged = await ch.purgeQueue(queue);
  check(purged.messageCount === 3, `purge reports 3 messages (got ${purged.messageCount})`);
  const deleted = await ch.deleteQueue(queue);
  check(deleted.messageCount === 0, `delete reports an empty queue (got ${deleted.messageCount})`);

  await ch.close();
  await conn.close();
  check(connError === null && chError === null,
    `no channel or connection error (${connError || chError || 'none'})`);
}

main().then(
  () => {
    console.log(failed === 0 ? 'amqplib: all checks passed' : `amqplib: ${failed} check(s) failed`);
    process.exit(failed === 0 ? 0 : 1);
  },
  (e) => {
    console.error(`amqplib: error: ${e && e.stack ? e.stack : e}`);
    process.exit(1);
  },
);
