// Edge cases of AMQP 0-9-1 run with CloudAMQP's @cloudamqp/amqp-client (npm), once directly
// against RabbitMQ and once through warren, with the same code; every observation is printed for
// both sides and compared line by line.
//
//   node tests/clients/amqp_client_edge.mjs DIRECT_URL PROXY_URL [SCENARIO ...]
//   e.g. node tests/clients/amqp_client_edge.mjs amqp://guest:guest@127.0.0.1:5701 \
//            amqp://guest:guest@127.0.0.1:5675
//
// The client library comes from tests/clients/node_modules (package.json pins it; scripts/test.sh
// runs `npm ci` there), or from the package directory AMQP_CLIENT_PATH names.
//
// Each scenario is an async function of a Side (one broker address). It records observations:
// replies, counts, sorted bodies, error codes and texts, never timings or generated names (names
// this script makes are replaced by their label, server-named queues and consumer tags by their
// shape). Messages of a sharded queue are compared as sorted sets (docs/routing.md: order holds per
// cluster only). Lines starting with "[doc]" are differences docs/semantics.md lists: printed,
// not compared. Every wait is bounded; a reply that does not come is observed as "timeout".
// The client's own warnings (an unknown confirm tag, a delivery for an unknown consumer, a frame
// it does not understand) are observed too, at the end of each scenario.
// Exit 0 when both sides observe the same, 1 on any mismatch, 2 on a usage error.

import crypto from 'node:crypto';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const LIB = process.env.AMQP_CLIENT_PATH ||
  path.join(path.dirname(new URL(import.meta.url).pathname), 'node_modules', '@cloudamqp', 'amqp-client');
const libUrl = (f) => pathToFileURL(path.join(LIB, 'lib', 'mjs', f)).href;
const { AMQPClient } = await import(libUrl('index.js'));
const Frame = await import(libUrl('amqp-frame.js'));

const STEP_MS = 5000;
const SCENARIO_MS = 120000;

// ---------------------------------------------------------------------------------------------
// Helpers.

class Timeout extends Error {}

function within(p, ms, what) {
  let timer;
  const t = new Promise((_, rej) => { timer = setTimeout(() => rej(new Timeout(`timeout: ${what}`)), ms); });
  return Promise.race([Promise.resolve(p), t]).finally(() => clearTimeout(timer));
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const sorted = (xs) => [...xs].sort();
const body = (m) => (m && m.body ? Buffer.from(m.body).toString() : '');
const sha = (b) => crypto.createHash('sha256').update(b).digest('hex').slice(0, 16);

function errText(e) {
  if (e instanceof Timeout) return 'timeout';
  if (e && e.message) return `error: ${e.message}`;
  return `error: ${e}`;
}

async function waitUntil(pred, ms = STEP_MS) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (pred()) return true;
    await sleep(10);
  }
  return pred();
}

/** One broker address: connections, names, observations, clean-up. */
class Side {
  constructor(url) {
    this.url = url;
    this.run = `ace${crypto.randomBytes(4).toString('hex')}`;
    this.obs = [];
    this.conns = [];
    this.warnings = [];
    this.queues = new Set();
    this.exchanges = new Set();
  }

  name(label) { return `${this.run}-${label}`; }
  q(label) { const n = this.name(label); this.queues.add(n); return n; }
  x(label) { const n = this.name(label); this.exchanges.add(n); return n; }

  norm(s) {
    return String(s)
      .split(this.run).join('<run>')
      .replace(/(amq|warren)\.gen-[A-Za-z0-9_-]+/g, '<server-named>')
      .replace(/amq\.ctag-[A-Za-z0-9_-]+/g, '<ctag>');
  }

  see(label, value) { this.obs.push(this.norm(`${label}: ${value}`)); }
  doc(label, value) { this.obs.push(this.norm(`[doc] ${label}: ${value}`)); }

  /** Runs fn bounded; records its reply (fmt) or its error. Returns the reply or undefined. */
  async try(label, fn, fmt = () => 'ok', ms = STEP_MS) {
    try {
      const r = await within(Promise.resolve().then(fn), ms, label);
      this.see(label, fmt(r));
      return r;
    } catch (e) {
      this.see(label, errText(e));
      return undefined;
    }
  }

  logger(tag) {
    const keep = (lvl) => (...a) => {
      const s = a.map((x) => (x instanceof Error ? x.message : typeof x === 'object' ? JSON.stringify(x) : String(x))).join(' ');
      // connection-close noise is observed through errors already
      if (/connection closed|socket|ECONNRESET/i.test(s)) return;
      this.warnings.push(`${tag} ${lvl} ${s.replace(/\d+ms/g, '')}`);
    };
    return { debug: () => {}, info: () => {}, warn: keep('warn'), error: keep('error') };
  }

  async connect(params = {}) {
    const u = new URL(this.url);
    for (const [k, v] of Object.entries(params)) u.searchParams.set(k, String(v));
    const c = new AMQPClient(u.toString(), undefined, this.logger(`conn${this.conns.length}`));
    this.conns.push(c);
    await within(c.connect(), STEP_MS, 'connect');
    c.errors = [];
    c.onerror = (e) => c.errors.push(e && e.message ? e.message : String(e));
    return c;
  }

  async chan(conn) {
    const ch = await within(conn.channel(), STEP_MS, 'channel.open');
    ch.errors = [];
    ch.onerror = (r) => ch.errors.push(String(r));
    ch.returns = [];
    ch.onReturn = (m) => ch.returns.push(m);
    return ch;
  }

  async cleanUp() {
    let c;
    try {
      c = new AMQPClient(this.url);
      await within(c.connect(), STEP_MS, 'cleanup connect');
      for (const q of this.queues) {
        try { const ch = await within(c.channel(), STEP_MS, 'ch'); await within(ch.queueDelete(q), STEP_MS, 'qd'); await ch.close().catch(() => {}); } catch { /* gone */ }
      }
      for (const x of this.exchanges) {
        try { const ch = await within(c.channel(), STEP_MS, 'ch'); await within(ch.exchangeDelete(x), STEP_MS, 'xd'); await ch.close().catch(() => {}); } catch { /* gone */ }
      }
    } catch { /* nothing to clean with */ }
    try { if (c) await within(c.close(), STEP_MS, 'close'); } catch { /* ignore */ }
    for (const conn of this.conns) {
      try { if (!conn.closed) await within(conn.close(), 2000, 'close'); } catch { /* ignore */ }
      try { conn.socket?.destroy(); } catch { /* ignore */ }
    }
  }
}

/** Publishes and waits for the confirm of each (the channel must be in confirm mode). */
async function pubEach(ch, x, rk, bodies, props = {}, mandatory = false) {
  const out = [];
  for (const b of bodies) {
    try {
      await within(ch.basicPublish(x, rk, b, props, mandatory), STEP_MS, `confirm ${b}`);
      out.push('ack');
    } catch (e) {
      out.push(e instanceof Timeout ? 'timeout' : e.message === 'Message rejected' ? 'nack' : errText(e));
    }
  }
  return out;
}

const tally = (xs) => {
  const m = new Map();
  for (const x of xs) m.set(x, (m.get(x) || 0) + 1);
  return [...m.entries()].sort().map(([k, v]) => `${k}x${v}`).join(' ') || 'none';
};

async function getAll(ch, q, noAck = true, limit = 1000) {
  const out = [];
  for (let i = 0; i < limit; i += 1) {
    const m = await within(ch.basicGet(q, { noAck }), STEP_MS, 'get');
    if (!m) break;
    out.push(m);
  }
  return out;
}

async function count(ch, q) {
  return (await within(ch.queueDeclare(q, { passive: true }), STEP_MS, 'passive declare')).messageCount;
}

/** Waits until a queue holds `want` ready messages; the last count. */
async function settle(ch, q, want, ms = STEP_MS) {
  const end = Date.now() + ms;
  let n = await count(ch, q);
  while (n !== want && Date.now() < end) { await sleep(25); n = await count(ch, q); }
  return n;
}

/** A raw method frame: fields written by fn(writer). Sent as is, no reply awaited. */
async function rawMethod(conn, ch, classId, methodId, fn) {
  const w = new Frame.Writer({ bufferSize: 4096, type: Frame.Type.METHOD, channel: ch.id, classId, method: methodId });
  fn(w);
  w.finalize();
  await conn.send(w.toUint8Array());
}

const declOk = (r) => `messages ${r.messageCount} consumers ${r.consumerCount}`;
const headerSummary = (m, keys) => keys.map((k) => `${k}=${JSON.stringify(m.properties.headers?.[k] ?? null)}`).join(' ');
const xdeath = (m) => {
  const d = m.properties.headers?.['x-death'];
  if (!Array.isArray(d)) return 'no x-death';
  return d.map((e) => `${e.reason}/${e.count}/${String(e.queue).replace(/^.*?-/, '')}`).join(',');
};

// ---------------------------------------------------------------------------------------------
// Scenarios.

/** x-priority on basic.consume: the higher-priority consumer takes what it can hold. */
async function consumer_priorities(s) {
  const c = await s.connect();
  const q = s.q('cprio');
  const ch0 = await s.chan(c); await ch0.queueDeclare(q, { durable: false });
  const hi = await s.chan(c); const lo = await s.chan(c);
  const gotHi = []; const gotLo = [];
  await s.try('consume prio 10', () => hi.basicConsume(q, { noAck: false, args: { 'x-priority': 10 } }, (m) => gotHi.push(body(m))));
  await s.try('consume prio 1', () => lo.basicConsume(q, { noAck: false, args: { 'x-priority': 1 } }, (m) => gotLo.push(body(m))));
  await ch0.confirmSelect();
  s.see('publish 10', tally(await pubEach(ch0, '', q, [...Array(10).keys()].map((i) => `a${i}`))));
  await waitUntil(() => gotHi.length + gotLo.length >= 10);
  s.see('unlimited prefetch: high/low', `${gotHi.length}/${gotLo.length}`);
  // now with a bounded high-priority consumer: prefetch 4 (>= shard clusters), no acks
  const hi2 = await s.chan(c); await hi2.basicQos(4);
  const lo2 = await s.chan(c);
  const q2 = s.q('cprio2'); await ch0.queueDeclare(q2, { durable: false });
  const g2h = []; const g2l = [];
  await hi2.basicConsume(q2, { noAck: false, args: { 'x-priority': 5 } }, (m) => g2h.push(m));
  await lo2.basicConsume(q2, { noAck: false, args: { 'x-priority': 0 } }, (m) => g2l.push(m));
  s.see('publish 12', tally(await pubEach(ch0, '', q2, [...Array(12).keys()].map((i) => `b${i}`))));
  await waitUntil(() => g2h.length + g2l.length >= 12);
  await sleep(200);
  s.see('prefetch 4 high / unlimited low', `${g2h.length}/${g2l.length}`);
  s.see('all delivered once', sorted([...g2h, ...g2l].map(body)).join(','));
  s.see('invalid x-priority type', await (async () => {
    const ch = await s.chan(c);
    try { await within(ch.basicConsume(q, { args: { 'x-priority': 'high' } }, () => {}), STEP_MS, 'consume'); return 'ok'; } catch (e) { return errText(e); }
  })());
}

/** alternate-exchange: unroutable messages go to the AE, are not returned; a missing AE. */
async function alternate_exchange(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const ae = s.x('ae'); const x = s.x('withae'); const qae = s.q('aeq'); const qmain = s.q('mainq');
  await ch.exchangeDeclare(ae, 'fanout', { durable: false });
  await s.try('declare direct with alternate-exchange', () => ch.exchangeDeclare(x, 'direct', { durable: false }, { 'alternate-exchange': ae }));
  await ch.queueDeclare(qae, { durable: false }); await ch.queueBind(qae, ae, '');
  await ch.queueDeclare(qmain, { durable: false }); await ch.queueBind(qmain, x, 'k');
  await ch.confirmSelect();
  s.see('publish routed + unroutable (mandatory)', tally([
    ...(await pubEach(ch, x, 'k', ['r1', 'r2'], {}, true)),
    ...(await pubEach(ch, x, 'nokey', ['u1', 'u2', 'u3'], {}, true)),
  ]));
  await sleep(100);
  s.see('returns', ch.returns.length);
  s.see('main queue', sorted((await getAll(ch, qmain)).map(body)).join(','));
  s.see('ae queue', sorted((await getAll(ch, qae)).map((m) => `${body(m)}@${m.routingKey}`)).join(','));
  // AE that does not exist: message is unroutable → returned when mandatory
  const x2 = s.x('missingae');
  await ch.exchangeDeclare(x2, 'direct', { durable: false }, { 'alternate-exchange': s.name('nosuchae') });
  s.see('publish to exchange with missing AE (mandatory)', (await pubEach(ch, x2, 'k', ['m1'], {}, true)).join(','));
  await sleep(100);
  s.see('returns after missing AE', ch.returns.map((m) => `${m.replyCode} ${m.replyText} ${body(m)}`).join('; '));
  // redeclare with a different AE: RabbitMQ 406
  await s.try('redeclare with other AE', () => ch.exchangeDeclare(x, 'direct', { durable: false }, { 'alternate-exchange': s.name('other') }));
}

/** headers exchanges: x-match all / any / all-with-x / any-with-x, and as e2e binding. */
async function headers_exchange(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const hx = s.x('hx'); await ch.exchangeDeclare(hx, 'headers', { durable: false });
  const binds = {
    all: { 'x-match': 'all', a: 1, b: 'two' },
    any: { 'x-match': 'any', a: 1, b: 'two' },
    dflt: { a: 1 },
    allx: { 'x-match': 'all-with-x', 'x-k': 'v' },
    anyx: { 'x-match': 'any-with-x', 'x-k': 'v', c: true },
  };
  for (const [label, args] of Object.entries(binds)) {
    const q = s.q(`h-${label}`);
    await ch.queueDeclare(q, { durable: false });
    await s.try(`bind ${label}`, () => ch.queueBind(q, hx, '', args));
  }
  await s.try('bind bad x-match', async () => { const q = s.q('h-bad'); const c2 = await s.chan(c); await c2.queueDeclare(q, { durable: false }); await c2.queueBind(q, hx, '', { 'x-match': 'some' }); });
  await ch.confirmSelect();
  const msgs = [
    ['m-ab', { a: 1, b: 'two' }], ['m-a', { a: 1 }], ['m-b', { b: 'two' }], ['m-none', {}],
    ['m-xk', { 'x-k': 'v' }], ['m-c', { c: true }], ['m-a-str', { a: '1' }],
  ];
  for (const [b, h] of msgs) await pubEach(ch, hx, 'ignored', [b], { headers: h }, true);
  await sleep(100);
  s.see('returned (unroutable)', sorted(ch.returns.map(body)).join(','));
  for (const label of Object.keys(binds)) {
    s.see(`queue ${label}`, sorted((await getAll(ch, s.name(`h-${label}`))).map(body)).join(','));
  }
  // exchange-to-exchange: topic source → headers destination (x-match any binding args on e2e)
  const src = s.x('hsrc'); const dst = s.x('hdst'); const q = s.q('h-e2e');
  await ch.exchangeDeclare(src, 'headers', { durable: false });
  await ch.exchangeDeclare(dst, 'fanout', { durable: false });
  await s.try('e2e bind headers any', () => ch.exchangeBind(dst, src, '', { 'x-match': 'any', t: 'yes', u: 'yes' }));
  await ch.queueDeclare(q, { durable: false }); await ch.queueBind(q, dst, '');
  await pubEach(ch, src, '', ['e-t'], { headers: { t: 'yes' } });
  await pubEach(ch, src, '', ['e-no'], { headers: { t: 'no' } });
  await pubEach(ch, src, '', ['e-u'], { headers: { u: 'yes', z: 1 } });
  s.see('e2e headers queue', sorted((await getAll(ch, q)).map((m) => `${body(m)}@${m.exchange.replace(s.run, '<run>')}`)).join(','));
  await s.try('e2e unbind', () => ch.exchangeUnbind(dst, src, '', { 'x-match': 'any', t: 'yes', u: 'yes' }));
  await pubEach(ch, src, '', ['e-t2'], { headers: { t: 'yes' } });
  s.see('after e2e unbind', (await getAll(ch, q)).length);
}

/** Quorum queues: delivery limit, x-delivery-count, basic.get, dead-lettering. */
async function quorum_queues(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const dlx = s.x('qdlx'); const dlq = s.q('qdlq'); const qq = s.q('quorum');
  await ch.exchangeDeclare(dlx, 'fanout', { durable: false });
  await ch.queueDeclare(dlq, { durable: false }); await ch.queueBind(dlq, dlx, '');
  await s.try('declare quorum', () => ch.queueDeclare(qq, { durable: true, autoDelete: false, exclusive: false },
    { 'x-queue-type': 'quorum', 'x-delivery-limit': 2, 'x-dead-letter-exchange': dlx }), declOk);
  await s.try('redeclare quorum as classic', () => ch.queueDeclare(qq, { durable: true, autoDelete: false, exclusive: false }), declOk);
  const ch2 = await s.chan(c);
  await s.try('passive declare quorum', () => ch2.queueDeclare(qq, { passive: true }), declOk);
  await ch2.confirmSelect();
  s.see('publish 1', (await pubEach(ch2, '', qq, ['d1'])).join(','));
  const seen = [];
  for (let i = 0; i < 5; i += 1) {
    const m = await within(ch2.basicGet(qq, { noAck: false }), STEP_MS, 'get');
    if (!m) { seen.push('empty'); break; }
    seen.push(`${body(m)} redelivered=${m.redelivered} ${headerSummary(m, ['x-delivery-count'])}`);
    await m.nack(true);
    await sleep(50);
  }
  s.see('get/nack-requeue loop', seen.join(' | '));
  const dead = await getAll(ch2, dlq);
  s.see('dead-lettered after limit', dead.map((m) => `${body(m)} ${xdeath(m)} ${headerSummary(m, ['x-delivery-count'])}`).join(';'));
  // reject without requeue dead-letters from quorum too
  s.see('publish 2', (await pubEach(ch2, '', qq, ['r1', 'r2'])).join(','));
  await settle(ch2, qq, 2);
  const got = await getAll(ch2, qq, false);
  for (const m of got) await m.reject(false);
  await settle(ch2, dlq, 2);
  s.see('rejected to DLQ', sorted((await getAll(ch2, dlq)).map((m) => `${body(m)} ${xdeath(m)}`)).join(';'));
  await s.try('get from empty quorum', () => ch2.basicGet(qq), (m) => (m ? body(m) : 'empty'));
  // invalid quorum declarations
  const bad = [
    ['exclusive quorum', { durable: true, exclusive: true, autoDelete: false }],
    ['non-durable quorum', { durable: false, exclusive: false, autoDelete: false }],
    ['auto-delete quorum', { durable: true, exclusive: false, autoDelete: true }],
  ];
  for (const [label, opts] of bad) {
    const chx = await s.chan(c);
    await s.try(label, () => chx.queueDeclare(s.q(`bad-${label.replace(/ /g, '')}`), opts, { 'x-queue-type': 'quorum' }), declOk);
  }
  const chp = await s.chan(c);
  await s.try('quorum with x-max-priority', () => chp.queueDeclare(s.q('qprio'), { durable: true, exclusive: false, autoDelete: false }, { 'x-queue-type': 'quorum', 'x-max-priority': 5 }), declOk);
  const chy = await s.chan(c);
  await s.try('unknown x-queue-type', () => chy.queueDeclare(s.q('qbogus'), { durable: true, exclusive: false, autoDelete: false }, { 'x-queue-type': 'bogus' }), declOk);
  // consume from quorum with prefetch and x-delivery-count on redelivery via channel close
  const chc = await s.chan(c); await chc.basicQos(10);
  const qq2 = s.q('quorum2');
  await ch2.queueDeclare(qq2, { durable: true, autoDelete: false, exclusive: false }, { 'x-queue-type': 'quorum' });
  s.see('publish 4', tally(await pubEach(ch2, '', qq2, ['c0', 'c1', 'c2', 'c3'])));
  const first = [];
  await chc.basicConsume(qq2, { noAck: false }, (m) => first.push(m));
  await waitUntil(() => first.length >= 4);
  s.see('first deliveries', sorted(first.map((m) => `${body(m)} r=${m.redelivered} ${headerSummary(m, ['x-delivery-count'])}`)).join(';'));
  await chc.close();
  const chd = await s.chan(c); await chd.basicQos(10);
  const again = [];
  await chd.basicConsume(qq2, { noAck: false }, (m) => { again.push(m); m.ack(); });
  await waitUntil(() => again.length >= 4);
  s.see('after channel close', sorted(again.map((m) => `${body(m)} r=${m.redelivered} ${headerSummary(m, ['x-delivery-count'])}`)).join(';'));
}

/** Lazy queues and x-queue-mode. */
async function lazy_queue(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const q = s.q('lazy');
  await s.try('declare lazy', () => ch.queueDeclare(q, { durable: false }, { 'x-queue-mode': 'lazy' }), declOk);
  await s.try('redeclare default mode', () => ch.queueDeclare(q, { durable: false }), declOk);
  const ch2 = await s.chan(c);
  await s.try('redeclare lazy', () => ch2.queueDeclare(q, { durable: false }, { 'x-queue-mode': 'lazy' }), declOk);
  await ch2.confirmSelect();
  s.see('publish 20', tally(await pubEach(ch2, '', q, [...Array(20).keys()].map((i) => `l${i}`))));
  s.see('count', await settle(ch2, q, 20));
  s.see('bodies', sorted((await getAll(ch2, q)).map(body)).join(','));
  const ch3 = await s.chan(c);
  await s.try('bad x-queue-mode', () => ch3.queueDeclare(s.q('lazybad'), { durable: false }, { 'x-queue-mode': 'sleepy' }), declOk);
}

/** user_id must be the connection's user. */
async function user_id_validation(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const q = s.q('uid'); await ch.queueDeclare(q, { durable: false });
  await ch.confirmSelect();
  s.see('user_id guest', (await pubEach(ch, '', q, ['ok'], { userId: 'guest' })).join(','));
  s.see('user_id other', (await pubEach(ch, '', q, ['bad'], { userId: 'mallory' })).join(','));
  await sleep(100);
  s.see('channel closed', ch.closed);
  s.see('channel errors', ch.errors.join(' | '));
  const ch2 = await s.chan(c);
  s.see('queue holds', sorted((await getAll(ch2, q)).map((m) => `${body(m)} uid=${m.properties.userId}`)).join(','));
  // without confirms: the refused publish closes the channel, the next publish is not routed
  const ch3 = await s.chan(c);
  await ch3.basicPublish('', q, 'nc-bad', { userId: 'nobody' });
  await ch3.basicPublish('', q, 'nc-behind');
  await waitUntil(() => ch3.closed, 2000);
  s.see('no-confirm channel closed', ch3.closed);
  const ch4 = await s.chan(c);
  s.see('after no-confirm refusal', (await getAll(ch4, q)).map(body).join(',') || 'none');
}

/** immediate=true: RabbitMQ closes the connection with 540. */
async function immediate_flag(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const q = s.q('imm'); await ch.queueDeclare(q, { durable: false });
  await s.try('publish immediate', () => ch.basicPublish('', q, 'i1', {}, false, true));
  await waitUntil(() => c.closed, 3000);
  s.see('connection closed', c.closed);
  s.see('connection errors', c.errors.join(' | '));
  const c2 = await s.connect(); const ch2 = await s.chan(c2);
  s.see('queue holds', await count(ch2, q));
  await ch2.confirmSelect();
  s.see('immediate on confirm channel', (await pubEach(ch2, '', q, ['i2'], {}, false).then(async () => {
    try { await within(ch2.basicPublish('', q, 'i3', {}, false, true), STEP_MS, 'confirm'); return 'ack'; } catch (e) { return errText(e); }
  })));
  await waitUntil(() => c2.closed, 3000);
  s.see('connection 2 errors', c2.errors.join(' | '));
}

/** Internal exchanges: no direct publish; reachable through e2e bindings. */
async function internal_exchange(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const ix = s.x('internal'); const front = s.x('front'); const q = s.q('intq');
  await s.try('declare internal', () => ch.exchangeDeclare(ix, 'fanout', { durable: false, internal: true }));
  await ch.exchangeDeclare(front, 'fanout', { durable: false });
  await ch.exchangeBind(ix, front, '');
  await ch.queueDeclare(q, { durable: false }); await ch.queueBind(q, ix, '');
  await ch.confirmSelect();
  s.see('publish via front', (await pubEach(ch, front, '', ['via-front'])).join(','));
  s.see('queue', (await getAll(ch, q)).map((m) => `${body(m)}@${m.exchange.replace(s.run, '<run>')}`).join(','));
  s.see('publish to internal', (await pubEach(ch, ix, '', ['direct-internal'])).join(','));
  await waitUntil(() => ch.closed, 2000);
  s.see('channel errors', ch.errors.join(' | '));
  const ch2 = await s.chan(c);
  await s.try('redeclare not internal', () => ch2.exchangeDeclare(ix, 'fanout', { durable: false, internal: false }));
  const ch3 = await s.chan(c);
  await s.try('passive internal', () => ch3.exchangeDeclare(ix, 'fanout', { passive: true }));
  s.see('queue after', (await getAll(ch3, q)).length);
}

/** Auto-delete exchanges go with their last binding (as source). */
async function auto_delete_exchange(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const ax = s.x('adx'); const q = s.q('adq');
  await ch.exchangeDeclare(ax, 'direct', { durable: false, autoDelete: true });
  await s.try('passive before any binding', () => ch.exchangeDeclare(ax, 'direct', { passive: true }));
  await ch.queueDeclare(q, { durable: false });
  await ch.queueBind(q, ax, 'a'); await ch.queueBind(q, ax, 'b');
  await ch.queueUnbind(q, ax, 'a');
  await s.try('passive with one binding left', () => ch.exchangeDeclare(ax, 'direct', { passive: true }));
  await ch.queueUnbind(q, ax, 'b');
  await s.try('passive after last unbind', () => ch.exchangeDeclare(ax, 'direct', { passive: true }));
  // e2e: auto-delete destination/source
  const ch2 = await s.chan(c);
  const src = s.x('adsrc'); const dst = s.x('addst');
  await ch2.exchangeDeclare(src, 'fanout', { durable: false, autoDelete: true });
  await ch2.exchangeDeclare(dst, 'fanout', { durable: false });
  await ch2.exchangeBind(dst, src, '');
  await s.try('unbind e2e', () => ch2.exchangeUnbind(dst, src, ''));
  await s.try('passive e2e source after unbind', () => ch2.exchangeDeclare(src, 'fanout', { passive: true }));
  const ch3 = await s.chan(c);
  // auto-delete exchange whose bound queue is deleted
  const ax2 = s.x('adx2'); const q2 = s.q('adq2');
  await ch3.exchangeDeclare(ax2, 'fanout', { durable: false, autoDelete: true });
  await ch3.queueDeclare(q2, { durable: false }); await ch3.queueBind(q2, ax2, '');
  await ch3.queueDelete(q2);
  await s.try('passive after bound queue deleted', () => ch3.exchangeDeclare(ax2, 'fanout', { passive: true }));
  const ch4 = await s.chan(c);
  await ch4.confirmSelect();
  s.see('publish to auto-deleted exchange', (await pubEach(ch4, ax2, '', ['gone'])).join(','));
  await waitUntil(() => ch4.closed, 2000);
  s.see('channel errors', ch4.errors.join(' | '));
}

/** exchange.delete if_unused; queue.unbind of bindings that do not exist. */
async function delete_if_unused_and_unbind_missing(s) {
  const c = await s.connect(); let ch = await s.chan(c);
  const x = s.x('used'); const q = s.q('usedq');
  await ch.exchangeDeclare(x, 'direct', { durable: false });
  await ch.queueDeclare(q, { durable: false }); await ch.queueBind(q, x, 'k');
  await s.try('exchange.delete if_unused (bound)', () => ch.exchangeDelete(x, { ifUnused: true }));
  ch = await s.chan(c);
  await s.try('passive after refused delete', () => ch.exchangeDeclare(x, 'direct', { passive: true }));
  await s.try('binding still works', async () => { await ch.confirmSelect(); await ch.basicPublish(x, 'k', 'b1'); return count(ch, q); }, (n) => `queue ${n}`);
  // as e2e destination only: if_unused looks at bindings where it is the source
  const src = s.x('src'); await ch.exchangeDeclare(src, 'fanout', { durable: false });
  const dst = s.x('dst'); await ch.exchangeDeclare(dst, 'fanout', { durable: false });
  await ch.exchangeBind(dst, src, '');
  await s.try('delete if_unused e2e destination', () => ch.exchangeDelete(dst, { ifUnused: true }));
  ch = await s.chan(c);
  await s.try('delete if_unused e2e source', () => ch.exchangeDelete(src, { ifUnused: true }));
  ch = await s.chan(c);
  await s.try('delete if_unused missing exchange', () => ch.exchangeDelete(s.name('never'), { ifUnused: true }));
  ch = await s.chan(c);
  await s.try('delete missing exchange', () => ch.exchangeDelete(s.name('never2')));
  ch = await s.chan(c);
  await ch.queueUnbind(q, x, 'k');
  await s.try('exchange.delete if_unused (unbound)', () => ch.exchangeDelete(x, { ifUnused: true }));
  await s.try('unbind binding that does not exist', () => ch.queueUnbind(q, 'amq.direct', s.name('nokey')));
  await s.try('unbind with args that do not match', async () => { await ch.queueBind(q, 'amq.headers', '', { a: 1 }); await ch.queueUnbind(q, 'amq.headers', '', { a: 2 }); });
  await s.try('unbind from missing exchange', () => ch.queueUnbind(q, s.name('nox'), 'k'));
  const ch2 = await s.chan(c);
  await s.try('unbind missing queue', () => ch2.queueUnbind(s.name('noq'), 'amq.direct', 'k'));
  const ch3 = await s.chan(c);
  await s.try('e2e unbind that does not exist', () => ch3.exchangeUnbind('amq.fanout', 'amq.direct', s.name('k')));
  await s.try('e2e unbind missing source', () => ch3.exchangeUnbind('amq.fanout', s.name('nosrc'), 'k'));
  const ch4 = await s.chan(c);
  await s.try('bind to missing exchange', () => ch4.queueBind(q, s.name('nox2'), 'k'));
}

/** nowait variants written as raw frames; a synchronous call after them shows their effect. */
async function nowait_methods(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const x = s.x('nwx'); const q = s.q('nwq'); const x2 = s.x('nwx2');
  const EX = Frame.ClassId.EXCHANGE; const QU = Frame.ClassId.QUEUE; const BA = Frame.ClassId.BASIC;
  // exchange.declare nowait (bits: passive 1, durable 2, auto-delete 4, internal 8, nowait 16)
  await rawMethod(c, ch, EX, 10, (w) => { w.writeUint16(0); w.writeShortString(x); w.writeShortString('direct'); w.writeUint8(16); w.writeTable({}); });
  await rawMethod(c, ch, EX, 10, (w) => { w.writeUint16(0); w.writeShortString(x2); w.writeShortString('fanout'); w.writeUint8(16); w.writeTable({}); });
  // queue.declare nowait (passive 1, durable 2, exclusive 4, auto-delete 8, nowait 16)
  await rawMethod(c, ch, QU, 10, (w) => { w.writeUint16(0); w.writeShortString(q); w.writeUint8(16); w.writeTable({}); });
  // queue.bind nowait
  await rawMethod(c, ch, QU, 20, (w) => { w.writeUint16(0); w.writeShortString(q); w.writeShortString(x); w.writeShortString('k'); w.writeUint8(1); w.writeTable({}); });
  // exchange.bind nowait
  await rawMethod(c, ch, EX, 30, (w) => { w.writeUint16(0); w.writeShortString(x); w.writeShortString(x2); w.writeShortString('k'); w.writeUint8(1); w.writeTable({}); });
  await s.try('passive queue after nowait declare+bind', () => ch.queueDeclare(q, { passive: true }), declOk);
  await s.try('passive exchange after nowait', () => ch.exchangeDeclare(x, 'direct', { passive: true }));
  // confirm.select nowait
  await rawMethod(c, ch, Frame.ClassId.CONFIRM, 10, (w) => { w.writeUint8(1); });
  ch.confirmId = 1; // the client sets this on select-ok, which a nowait select does not get
  s.see('publish via x2 → x → q after nowait confirm.select', tally(await pubEach(ch, x2, 'k', ['n1', 'n2', 'n3'])));
  s.see('queue count', await settle(ch, q, 3));
  // basic.consume nowait with our own tag
  const got = [];
  const Consumer = (await import(libUrl('amqp-consumer.js'))).AMQPConsumer;
  ch.consumers.set('nwtag', new Consumer(ch, 'nwtag', (m) => got.push(body(m))));
  await rawMethod(c, ch, BA, 20, (w) => { w.writeUint16(0); w.writeShortString(q); w.writeShortString('nwtag'); w.writeUint8(2 | 8); w.writeTable({}); });
  await waitUntil(() => got.length >= 3);
  s.see('nowait consumer got', sorted(got).join(','));
  // basic.cancel nowait, then publish: nothing more delivered
  await rawMethod(c, ch, BA, 30, (w) => { w.writeShortString('nwtag'); w.writeUint8(1); });
  await s.try('passive after nowait cancel', () => ch.queueDeclare(q, { passive: true }), declOk);
  s.see('publish after cancel', tally(await pubEach(ch, x2, 'k', ['n4'])));
  await sleep(300);
  s.see('nowait consumer after cancel', sorted(got).join(','));
  s.see('count after cancel', await settle(ch, q, 1));
  // queue.purge nowait, then count
  await rawMethod(c, ch, QU, 30, (w) => { w.writeUint16(0); w.writeShortString(q); w.writeUint8(1); });
  s.see('count after nowait purge', await count(ch, q));
  // a nowait declare that the broker refuses: the channel closes; observed at the next call
  await rawMethod(c, ch, QU, 20, (w) => { w.writeUint16(0); w.writeShortString(q); w.writeShortString(s.name('missingx')); w.writeShortString('k'); w.writeUint8(1); w.writeTable({}); });
  await s.try('call after refused nowait bind', () => ch.queueDeclare(q, { passive: true }), declOk);
  s.see('channel errors', ch.errors.join(' | '));
  // queue.delete nowait and exchange.delete nowait
  const ch2 = await s.chan(c);
  await rawMethod(c, ch2, QU, 40, (w) => { w.writeUint16(0); w.writeShortString(q); w.writeUint8(4); });
  await rawMethod(c, ch2, EX, 20, (w) => { w.writeUint16(0); w.writeShortString(x2); w.writeUint8(2); });
  await s.try('passive queue after nowait delete', () => ch2.queueDeclare(q, { passive: true }), declOk);
  const ch3 = await s.chan(c);
  await s.try('passive exchange after nowait delete', () => ch3.exchangeDeclare(x2, 'fanout', { passive: true }));
  // nowait basic.qos does not exist; nowait declare of a conflicting queue
  const ch4 = await s.chan(c);
  const q2 = s.q('nwq2'); await ch4.queueDeclare(q2, { durable: false }, { 'x-max-length': 5 });
  await rawMethod(c, ch4, QU, 10, (w) => { w.writeUint16(0); w.writeShortString(q2); w.writeUint8(16); w.writeTable({ 'x-max-length': 6 }); });
  await s.try('call after conflicting nowait declare', () => ch4.queueDeclare(q2, { passive: true }), declOk);
}

/** x-overflow drop-head / reject-publish / reject-publish-dlx with x-max-length 0 and 2. */
async function overflow_modes(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const dlx = s.x('ofdlx'); const dlq = s.q('ofdlq');
  await ch.exchangeDeclare(dlx, 'fanout', { durable: false });
  await ch.queueDeclare(dlq, { durable: false }); await ch.queueBind(dlq, dlx, '');
  await ch.confirmSelect();
  for (const mode of ['drop-head', 'reject-publish', 'reject-publish-dlx']) {
    const q = s.q(`of-${mode}`);
    await ch.queueDeclare(q, { durable: false }, { 'x-max-length': 0, 'x-overflow': mode, 'x-dead-letter-exchange': dlx });
    s.see(`${mode} max 0: publish 3`, tally(await pubEach(ch, '', q, ['o1', 'o2', 'o3'].map((b) => `${mode}-${b}`))));
    s.see(`${mode} max 0: queue`, await count(ch, q));
    await sleep(50);
    s.see(`${mode} max 0: dead-lettered`, sorted((await getAll(ch, dlq)).map((m) => `${body(m)} ${xdeath(m)}`)).join(';') || 'none');
    // with a limit of 2, 6 messages: per cluster limit (documented), so only observed as [doc]
    const q2 = s.q(`of2-${mode}`);
    await ch.queueDeclare(q2, { durable: false }, { 'x-max-length': 2, 'x-overflow': mode });
    const r = await pubEach(ch, '', q2, [...Array(6).keys()].map((i) => `p${i}`));
    s.doc(`${mode} max 2: publish 6`, tally(r));
    s.doc(`${mode} max 2: queue`, sorted((await getAll(ch, q2)).map(body)).join(','));
  }
  await s.try('invalid x-overflow', async () => { const c2 = await s.chan(c); await c2.queueDeclare(s.q('ofbad'), { durable: false }, { 'x-overflow': 'explode' }); });
  // quorum queue with drop-head / reject-publish
  const ch3 = await s.chan(c); await ch3.confirmSelect();
  const qq = s.q('of-quorum');
  await s.try('quorum reject-publish max 0', () => ch3.queueDeclare(qq, { durable: true, exclusive: false, autoDelete: false }, { 'x-queue-type': 'quorum', 'x-max-length': 0, 'x-overflow': 'reject-publish' }), declOk);
  // a quorum queue takes one message past a limit of 0 (its check is "already over"), so each
  // cluster takes one: the documented per-cluster x-max-length
  s.doc('quorum reject-publish publish 2', tally(await pubEach(ch3, '', qq, ['qr1', 'qr2'])));
}

/** single-active-consumer with consumer priorities; cancel hands over. */
async function single_active_with_priorities(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const q = s.q('sac');
  await ch.queueDeclare(q, { durable: false }, { 'x-single-active-consumer': true });
  const a = await s.chan(c); const b = await s.chan(c); const d = await s.chan(c);
  const ga = []; const gb = []; const gd = [];
  const ca = await a.basicConsume(q, { noAck: true, tag: 'low', args: { 'x-priority': 1 } }, (m) => ga.push(body(m)));
  await b.basicConsume(q, { noAck: true, tag: 'high', args: { 'x-priority': 10 } }, (m) => gb.push(body(m)));
  await d.basicConsume(q, { noAck: true, tag: 'none' }, (m) => gd.push(body(m)));
  await s.try('passive: consumer count', () => ch.queueDeclare(q, { passive: true }), declOk);
  await ch.confirmSelect();
  s.see('publish 6', tally(await pubEach(ch, '', q, [...Array(6).keys()].map((i) => `s${i}`))));
  await waitUntil(() => ga.length + gb.length + gd.length >= 6);
  s.see('low/high/none', `${ga.length}/${gb.length}/${gd.length}`);
  await ca.cancel();
  s.see('publish 4 after cancel of first', tally(await pubEach(ch, '', q, [...Array(4).keys()].map((i) => `t${i}`))));
  await waitUntil(() => ga.length + gb.length + gd.length >= 10);
  s.see('low/high/none', `${ga.length}/${gb.length}/${gd.length}`);
  s.see('all', sorted([...ga, ...gb, ...gd]).join(','));
  // exclusive consume on a SAC queue
  const e = await s.chan(c);
  await s.try('exclusive consume on SAC queue', () => e.basicConsume(q, { exclusive: true }, () => {}), (r) => `consumer ${r.tag}`);
}

/** basic.recover(requeue=true) with a consumer and with a get; recover(false) is 540. */
async function recover(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const q = s.q('rec'); await ch.queueDeclare(q, { durable: false });
  await ch.confirmSelect();
  await pubEach(ch, '', q, ['r0', 'r1', 'r2', 'r3']);
  const cc = await s.chan(c);
  const got = [];
  await cc.basicConsume(q, { noAck: false, tag: 'rc' }, (m) => got.push(m));
  await waitUntil(() => got.length >= 4);
  s.see('first', sorted(got.map((m) => `${body(m)} r=${m.redelivered}`)).join(','));
  const acked = body(got[0]);
  await got[0].ack();
  await s.try('basic.recover requeue', () => cc.basicRecover(true));
  await waitUntil(() => got.length >= 7);
  await sleep(200);
  const again = got.slice(4);
  s.see('after recover(true): count, all redelivered, the unacked ones',
    `${again.length} ${again.every((m) => m.redelivered)} ${sorted(again.map(body)).join(',') === sorted(got.slice(1, 4).map(body)).join(',')}`);
  s.see('acked one not redelivered', !again.some((m) => body(m) === acked));
  for (const m of again) await m.ack();
  await sleep(100);
  s.see('queue after acks', await count(ch, q));
  s.see('channel errors', cc.errors.join(' | '));
  // recover on a channel with a basic.get delivery
  await cc.basicCancel('rc');
  const gch = await s.chan(c);
  await pubEach(ch, '', q, ['g0']);
  const m = await gch.basicGet(q, { noAck: false });
  s.see('get', body(m));
  await s.try('recover(true) with get delivery', () => gch.basicRecover(true));
  s.see('count after recover of get', await settle(ch, q, 1));
  // recover(false): RabbitMQ does not implement it
  const c2 = await s.connect(); const ch2 = await s.chan(c2);
  await s.try('basic.recover no requeue', () => ch2.basicRecover(false));
  await waitUntil(() => c2.closed, 2000);
  s.see('connection errors', c2.errors.join(' | '));
}

/** basic.nack multiple, requeue true and false; reject; ack multiple. */
async function nack_multiple(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const q = s.q('nackm'); await ch.queueDeclare(q, { durable: false });
  await ch.confirmSelect();
  await pubEach(ch, '', q, [...Array(8).keys()].map((i) => `n${i}`));
  const cc = await s.chan(c); await cc.basicQos(8);
  const got = [];
  await cc.basicConsume(q, { noAck: false }, (m) => got.push(m));
  await waitUntil(() => got.length >= 8);
  s.see('delivered', got.length);
  // nack multiple up to the 4th delivery without requeue: 4 dropped
  await cc.basicNack(got[3].deliveryTag, false, true);
  await sleep(200);
  s.see('ready after nack-multiple(4, no requeue)', await count(ch, q));
  // nack multiple up to the 6th with requeue: 2 come back redelivered
  await cc.basicNack(got[5].deliveryTag, true, true);
  await waitUntil(() => got.length >= 10);
  await sleep(200);
  s.see('redelivered after nack-multiple requeue: count, flags', `${got.length - 8} ${got.slice(8).map((m) => m.redelivered).join(',')}`);
  s.see('they are deliveries 5 and 6', sorted(got.slice(4, 6).map(body)).join(',') === sorted(got.slice(8).map(body)).join(','));
  // ack multiple of everything outstanding (the last delivery tag)
  await cc.basicAck(got[got.length - 1].deliveryTag, true);
  await sleep(200);
  s.see('queue after ack multiple', await count(ch, q));
  s.see('channel errors', cc.errors.join(' | '));
  // nack multiple with tag 0 = all outstanding
  await pubEach(ch, '', q, ['z0', 'z1', 'z2']);
  await waitUntil(() => got.length >= 13);
  await s.try('nack multiple tag 0 requeue', () => cc.basicNack(0, true, true));
  await waitUntil(() => got.length >= 16);
  await sleep(200);
  s.see('after nack all', sorted(got.slice(13).map((m) => `${body(m)} r=${m.redelivered}`)).join(','));
  await cc.basicAck(0, true);
  await sleep(100);
  s.see('queue after ack 0 multiple', await count(ch, q));
  // nack of an unknown tag: 406
  await s.try('nack unknown tag', async () => { await cc.basicNack(999, false, false); await cc.queueDeclare(q, { passive: true }); });
  s.see('channel errors 2', cc.errors.join(' | '));
}

/** publisher confirms with mandatory on unroutable messages: return before ack. */
async function confirm_mandatory_unroutable(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const x = s.x('nobind'); await ch.exchangeDeclare(x, 'direct', { durable: false });
  await ch.confirmSelect();
  const events = [];
  ch.onReturn = (m) => events.push(`return ${m.replyCode} ${m.replyText} ${body(m)} ${m.routingKey}`);
  const ps = [];
  for (let i = 0; i < 5; i += 1) {
    ps.push(ch.basicPublish(x, `k${i}`, `u${i}`, { messageId: `id${i}` }, true).then(() => events.push(`ack u${i}`), (e) => events.push(`nack u${i} ${e.message}`)));
  }
  await within(Promise.all(ps), STEP_MS, 'confirms').catch(() => events.push('timeout'));
  await sleep(100);
  s.see('returns', events.filter((e) => e.startsWith('return')).sort().join(' | '));
  s.see('acks', events.filter((e) => !e.startsWith('return')).sort().join(','));
  const retBeforeAck = [...Array(5).keys()].every((i) => events.indexOf(`return 312 NO_ROUTE u${i} k${i}`) < events.indexOf(`ack u${i}`));
  s.see('each return before its ack', retBeforeAck);
  // mandatory to the default exchange, missing queue
  const e2 = [];
  ch.onReturn = (m) => e2.push(`return ${m.replyCode} ${m.replyText} ${m.exchange}/${m.routingKey.replace(s.run, '<run>')}`);
  s.see('default exchange missing queue', (await pubEach(ch, '', s.name('noqueue'), ['d'], {}, true)).join(','));
  await sleep(50);
  s.see('returns 2', e2.join(' | '));
  // not mandatory: silently dropped, acked
  s.see('not mandatory unroutable', (await pubEach(ch, x, 'k', ['quiet'], {}, false)).join(','));
  await sleep(50);
  s.see('returns 3', e2.length);
  // unconfirmed mandatory publish without confirm mode on a second channel
  const ch2 = await s.chan(c); const e3 = [];
  ch2.onReturn = (m) => e3.push(`${m.replyCode} ${body(m)} props=${m.properties.messageId}`);
  await ch2.basicPublish(x, 'k', 'plain', { messageId: 'pm' }, true);
  await waitUntil(() => e3.length > 0, 2000);
  s.see('return without confirms', e3.join(','));
}

/** channel.flow from the client. */
async function channel_flow(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  await s.try('flow(true)', () => ch.basicFlow(true), String);
  await s.try('flow(false)', () => ch.basicFlow(false), String);
  await waitUntil(() => ch.closed || c.closed, 1000);
  s.see('channel closed / conn closed', `${ch.closed}/${c.closed}`);
  s.see('errors', [...ch.errors, ...c.errors].join(' | '));
}

/** What the client learns of connection.blocked support, and the server properties. */
async function connection_blocked_support(s) {
  const c = await s.connect();
  const sp = c.serverProperties || c.server_properties || null;
  s.see('client sees server properties', sp ? 'yes' : 'no');
  if (sp && sp.capabilities) s.see('server capabilities', Object.keys(sp.capabilities).sort().map((k) => `${k}=${sp.capabilities[k]}`).join(','));
  s.see('blocked at start', c.blocked === undefined ? 'no' : c.blocked);
  // the client refuses publishes while blocked; emulate nothing, only observe channel-max / frame-max
  s.see('channelMax', c.channelMax);
  s.see('frameMax', c.frameMax);
  s.see('heartbeat', c.heartbeat);
}

/** 1 MiB and 8 MiB bodies, with confirms, through get and consume. */
async function large_messages(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const q = s.q('large'); await ch.queueDeclare(q, { durable: false });
  await ch.confirmSelect();
  const bodies = [1 << 20, 8 << 20].map((n, i) => { const b = Buffer.alloc(n); for (let j = 0; j < n; j += 4096) b[j] = (j / 4096 + i) & 0xff; return b; });
  for (const b of bodies) await s.try(`publish ${b.length}`, () => ch.basicPublish('', q, b), () => 'ack', 30000);
  const got = [];
  for (let i = 0; i < 2; i += 1) {
    const m = await within(ch.basicGet(q, { noAck: true }), 30000, 'get');
    if (m) got.push(`${m.bodySize} ${sha(Buffer.from(m.body))}`);
  }
  s.see('got', sorted(got).join(','));
  s.see('sent', sorted(bodies.map((b) => `${b.length} ${sha(b)}`)).join(','));
  for (const b of bodies) await ch.basicPublish('', q, b, { headers: { big: 'yes' } });
  const cc = await s.chan(c); const viaConsume = [];
  await cc.basicConsume(q, { noAck: true }, (m) => viaConsume.push(`${m.bodySize} ${sha(Buffer.from(m.body))} ${m.properties.headers?.big}`));
  await waitUntil(() => viaConsume.length >= 2, 30000);
  s.see('consumed', sorted(viaConsume).join(','));
}

/** 500 channels on one connection, each used, then closed. */
async function many_channels(s) {
  const c = await s.connect(); const ch0 = await s.chan(c);
  const q = s.q('manych'); await ch0.queueDeclare(q, { durable: false });
  const chans = [];
  for (let i = 0; i < 500; i += 1) chans.push(await within(c.channel(), STEP_MS, `open ${i}`).catch((e) => errText(e)));
  const opened = chans.filter((x) => typeof x !== 'string');
  s.see('opened', opened.length);
  s.see('ids distinct', new Set(opened.map((x) => x.id)).size);
  const res = await Promise.all(opened.map(async (ch, i) => {
    try { await ch.confirmSelect(); await within(ch.basicPublish('', q, `c${i}`), 10000, 'confirm'); return 'ack'; } catch (e) { return errText(e); }
  }));
  s.see('publishes', tally(res));
  s.see('queue', await settle(ch0, q, 500, 10000));
  const closes = await Promise.all(opened.map((ch) => within(ch.close(), 10000, 'close').then(() => 'closed', (e) => errText(e))));
  s.see('closes', tally(closes));
  // reopen on the same numbers straight away
  const again = [];
  for (let i = 0; i < 50; i += 1) again.push(await within(c.channel(), STEP_MS, 'reopen').then((ch) => ch.queueDeclare(q, { passive: true })).then((r) => `${r.messageCount}`, (e) => errText(e)));
  s.see('reopened 50 passive', tally(again));
}

/** Closing a channel with unacked deliveries requeues them, marked redelivered. */
async function close_channel_with_unacked(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const q = s.q('unacked'); await ch.queueDeclare(q, { durable: false });
  await ch.confirmSelect();
  await pubEach(ch, '', q, [...Array(6).keys()].map((i) => `u${i}`));
  const cc = await s.chan(c); await cc.basicQos(6);
  const got = [];
  await cc.basicConsume(q, { noAck: false }, (m) => got.push(m));
  await waitUntil(() => got.length >= 6);
  await got[0].ack(); await got[1].ack();
  const unacked = sorted(got.slice(2).map(body)).join(',');
  await s.try('close consuming channel', () => cc.close());
  s.see('ready after close', await settle(ch, q, 4));
  const again = await getAll(ch, q);
  s.see('redelivered: count, flags, the unacked ones', `${again.length} ${again.every((m) => m.redelivered)} ${sorted(again.map(body)).join(',') === unacked}`);
  // basic.get deliveries unacked at channel close
  await pubEach(ch, '', q, ['g1', 'g2']);
  const gch = await s.chan(c);
  const g = await getAll(gch, q, false);
  s.see('got unacked', g.length);
  await gch.close();
  s.see('ready after get-channel close', await settle(ch, q, 2));
  s.see('redelivered 2', sorted((await getAll(ch, q)).map((m) => `${body(m)} r=${m.redelivered}`)).join(','));
  // a channel closed by an error (406 unknown tag) with unacked deliveries
  await pubEach(ch, '', q, ['e1', 'e2']);
  const ech = await s.chan(c);
  const eg = await getAll(ech, q, false);
  s.see('got for error channel', eg.length);
  await ech.basicAck(12345).catch(() => {});
  await waitUntil(() => ech.closed, 2000);
  s.see('error channel errors', ech.errors.join(' | '));
  s.see('ready after error close', await settle(ch, q, 2));
  s.see('redelivered 3', sorted((await getAll(ch, q)).map((m) => `${body(m)} r=${m.redelivered}`)).join(','));
}

/** connection.close with confirms still in flight. */
async function close_with_inflight_confirms(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const q = s.q('inflight'); await ch.queueDeclare(q, { durable: false });
  await ch.confirmSelect();
  const outcomes = [];
  const ps = [];
  for (let i = 0; i < 300; i += 1) ps.push(ch.basicPublish('', q, `f${i}`).then(() => outcomes.push('ack'), (e) => outcomes.push(e.message.replace(/\d+/g, 'N'))));
  await s.try('connection.close', () => c.close());
  await within(Promise.allSettled(ps), STEP_MS, 'settle').catch(() => {});
  s.see('settled', outcomes.length);
  s.doc('outcomes', tally(outcomes)); // how many acks arrive before close-ok is timing
  const c2 = await s.connect(); const ch2 = await s.chan(c2);
  s.see('queue holds every publish sent before close', await settle(ch2, q, 300));
  // closing a confirm channel with publishes in flight
  await ch2.confirmSelect();
  const o2 = []; const ps2 = [];
  for (let i = 0; i < 100; i += 1) ps2.push(ch2.basicPublish('', q, `g${i}`).then(() => o2.push('ack'), (e) => o2.push(e.message.replace(/\d+/g, 'N'))));
  await s.try('channel.close', () => ch2.close());
  await within(Promise.allSettled(ps2), STEP_MS, 'settle').catch(() => {});
  // the client leaves confirms it had not received by close-ok pending (it rejects nothing on
  // a close it asked for), so how many settle is timing on both sides
  s.doc('channel close settled', o2.length);
  const ch3 = await s.chan(c2);
  s.see('queue after channel close', await settle(ch3, q, 400));
}

/** Publish then get on the same channel without confirms, and transactions with the client. */
async function publish_then_get_and_tx(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const q = s.q('pg'); await ch.queueDeclare(q, { durable: false });
  const seen = [];
  for (let i = 0; i < 20; i += 1) {
    await ch.basicPublish('', q, `x${i}`);
    const m = await within(ch.basicGet(q), STEP_MS, 'get');
    seen.push(m ? 'got' : 'empty');
  }
  s.see('publish-then-get x20', tally(seen));
  const tx = await s.chan(c);
  await tx.txSelect();
  await tx.basicPublish('', q, 't1');
  await s.try('get before commit', () => tx.basicGet(q), (m) => (m ? body(m) : 'empty'));
  await tx.txCommit();
  await s.try('get after commit', () => tx.basicGet(q, { noAck: false }), (m) => (m ? body(m) : 'empty'));
  await tx.txRollback();
  s.see('ready after rollback of a get ack-less', await count(ch, q));
  await s.try('confirm.select on tx channel', () => tx.confirmSelect());
}

/** Dead-lettering from a classic queue by TTL and by delivery of expired per-message TTL. */
async function header_types_roundtrip(s) {
  const c = await s.connect(); const ch = await s.chan(c);
  const q = s.q('props'); await ch.queueDeclare(q, { durable: false });
  await ch.confirmSelect();
  const props = {
    contentType: 'application/json', contentEncoding: 'gzip', deliveryMode: 2, priority: 3,
    correlationId: 'corr', replyTo: 'me', expiration: '60000', messageId: 'mid', appId: 'app', type: 'ty', userId: 'guest',
    timestamp: new Date(1700000000000),
    headers: { int: 2, neg: -5, big: 2 ** 40, float: 1.5, bool: false, str: 's', nul: null, date: new Date(1000), tbl: { n: { m: 'deep' } }, arr: [1, 'a', true, [2]], bytes: Buffer.from([1, 2, 3]) },
  };
  await pubEach(ch, '', q, ['p'], props);
  const m = await within(ch.basicGet(q), STEP_MS, 'get');
  const canon = (v) => (v instanceof Date ? `date:${v.getTime()}` : v instanceof Uint8Array ? `bytes:${Buffer.from(v).toString('hex')}` : Array.isArray(v) ? v.map(canon) : v && typeof v === 'object' ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canon(v[k])])) : typeof v === 'bigint' ? `${v}n` : v);
  s.see('properties', JSON.stringify(canon(m.properties)));
}

/**
 * connection.update-secret with a secret the internal auth backend does not check (as the
 * client's own test suite sends), then the connection's first sharded work. RabbitMQ keeps
 * serving the connection; warren (lazy_links) opens its shard links with the new secret.
 */
async function update_secret_then_first_publish(s) {
  const c = await s.connect();
  await s.try('update-secret', () => c.updateSecret('not-the-password', 'rotation'));
  const ch = await s.chan(c);
  const q = s.q('secret');
  await s.try('declare', () => ch.queueDeclare(q, { durable: false }), declOk);
  await ch.confirmSelect();
  await s.try('confirmed publish', () => ch.basicPublish('', q, 's1'), () => 'ack');
  await s.try('get', () => ch.basicGet(q), (m) => (m ? body(m) : 'empty'));
  s.see('connection errors', c.errors.join(' | '));
}

const SCENARIOS = [
  consumer_priorities, alternate_exchange, headers_exchange, quorum_queues, lazy_queue,
  user_id_validation, immediate_flag, internal_exchange, auto_delete_exchange,
  delete_if_unused_and_unbind_missing, nowait_methods, overflow_modes, single_active_with_priorities,
  recover, nack_multiple, confirm_mandatory_unroutable, channel_flow, connection_blocked_support,
  large_messages, many_channels, close_channel_with_unacked, close_with_inflight_confirms,
  publish_then_get_and_tx, header_types_roundtrip, update_secret_then_first_publish,
];

// ---------------------------------------------------------------------------------------------
// Driver.

async function runOne(url, fn) {
  const s = new Side(url);
  try {
    await within(fn(s), SCENARIO_MS, fn.name);
  } catch (e) {
    s.see('scenario raised', errText(e));
  }
  await s.cleanUp();
  for (const w of s.warnings) s.see('client log', w);
  return s.obs;
}

async function main(argv) {
  const [direct, proxy, ...only] = argv;
  if (!direct || !proxy) {
    console.error('usage: node amqp_client_edge.mjs DIRECT_URL PROXY_URL [SCENARIO ...]');
    return 2;
  }
  const unknown = only.filter((n) => !SCENARIOS.some((f) => f.name === n));
  if (unknown.length) { console.error(`unknown scenario(s): ${unknown.join(', ')}`); return 2; }
  const mismatched = [];
  for (const fn of SCENARIOS) {
    if (only.length && !only.includes(fn.name)) continue;
    const want = await runOne(direct, fn);
    const got = await runOne(proxy, fn);
    const cmp = (xs) => xs.filter((x) => !x.startsWith('[doc]'));
    const [w, g] = [cmp(want), cmp(got)];
    const n = Math.max(w.length, g.length);
    const diffs = [];
    for (let i = 0; i < n; i += 1) if (w[i] !== g[i]) diffs.push(i);
    console.log(`== ${fn.name}: ${diffs.length ? 'MISMATCH' : 'same'}`);
    for (const o of want) console.log(`  rabbitmq | ${o}`);
    for (const o of got) console.log(`  warren   | ${o}`);
    if (diffs.length) mismatched.push([fn.name, diffs.map((i) => [w[i] ?? '-', g[i] ?? '-'])]);
  }
  console.log('\n== summary');
  for (const [name, d] of mismatched) {
    console.log(`MISMATCH ${name}`);
    for (const [a, b] of d) console.log(`   rabbitmq: ${a}\n   warren:   ${b}`);
  }
  console.log(mismatched.length ? `amqp-client edge cases: ${mismatched.length} scenario(s) differ` : 'amqp-client edge cases: all the same');
  return mismatched.length ? 1 : 0;
}

process.on('unhandledRejection', () => {});
main(process.argv.slice(2)).then((code) => process.exit(code));
