// The Node wrappers that production services put around amqplib, run directly against RabbitMQ
// and through warren with the same code, and compared observation by observation:
//
//   - amqp-connection-manager: a reconnecting connection, ChannelWrapper with setup functions,
//     confirm channels, publishes queued while disconnected, waitForConnect, consumers that are
//     re-established after a reconnect;
//   - rascal: config-driven exchanges / queues / bindings, publications with confirms,
//     subscriptions with redelivery counting and dead-lettering, the republish and forward
//     recovery strategies, shovels, queue arguments (TTL + DLX), purge, nuke, bounce, shutdown,
//     and recovery from a connection the server closed.
//
// Run (tests/clients/package.json pins the libraries; scripts/test.sh runs `npm ci` there):
//   node tests/clients/node_wrappers_edge.mjs DIRECT_URL PROXY_URL [SCENARIO ...]
//   e.g. node tests/clients/node_wrappers_edge.mjs amqp://guest:guest@127.0.0.1:5701/ \
//          amqp://guest:guest@127.0.0.1:5675/
//
// Environment:
//   NODE_WRAPPERS_PATH  a node_modules directory with amqplib, amqp-connection-manager and rascal
//                       (default: tests/clients/node_modules);
//   WARREN_DIRECT_CTL   rabbitmqctl for the direct node (a command prefix, e.g.
//                       "scripts/rabbit.sh ctl shard-a-1"), used to force-close this script's own
//                       connections; without it, DIRECT_MGMT:
//   DIRECT_MGMT         RabbitMQ management API of the direct node, used likewise
//                       (default http://guest:guest@HOST:PORT+10000);
//   PROXY_ADMIN         warren's admin endpoint, used likewise through POST /clients/ID/close
//                       (default http://HOST:PORT+10000); PROXY_ADMIN_TOKEN if it needs a token.
//
// A "forced close" is the server closing the client connection with 320 CONNECTION_FORCED:
// rabbitmqctl close_connection or the management API's DELETE /api/connections/NAME directly, warren's POST /clients/ID/close through
// warren. Only connections this script opened are closed: each carries a connection_name
// (client property) unique to the run, and is looked up by it.
//
// Each scenario returns the lines a client can observe (counts, sorted bodies, reply codes and
// texts with generated names reduced to their shape). RabbitMQ's answer is the expected one by
// construction. Lines starting "info " are printed but not compared (timing-dependent facts such
// as how many in-flight publishes a wrapper re-sent). Exit 0 when every compared line is the same
// both ways, 1 otherwise, with a diff.

import { createRequire } from 'node:module';
import path from 'node:path';
import crypto from 'node:crypto';
import { execSync } from 'node:child_process';

const LIBS = process.env.NODE_WRAPPERS_PATH ||
  path.join(path.dirname(new URL(import.meta.url).pathname), 'node_modules');
const require = createRequire(path.join(LIBS, '_resolve_from_here.js'));
const amqplib = require('amqplib');
const acm = require('amqp-connection-manager');
const rascal = require('rascal');

const STEP_MS = 8000;
const SCENARIO_MS = 90000;

// ---------------------------------------------------------------------------------------------
// Helpers.

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const hex = (n) => crypto.randomBytes(n).toString('hex');
const RUN = hex(3);

class Timeout extends Error {
  constructor(what) { super(`timeout: ${what}`); this.name = 'Timeout'; }
}
function within(p, ms, what) {
  let timer;
  const t = new Promise((_, rej) => { timer = setTimeout(() => rej(new Timeout(what)), ms); });
  return Promise.race([Promise.resolve(p), t]).finally(() => clearTimeout(timer));
}
async function waitUntil(pred, ms = STEP_MS, step = 20) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (pred()) return true;
    await sleep(step);
  }
  return pred();
}

/** A name this script generated, or a broker-generated one, reduced to something stable. */
function shape(s, names) {
  let out = String(s);
  for (const [real, label] of names) out = out.split(real).join(label);
  out = out.replace(new RegExp(`nwe\\.${RUN}\\.(direct|proxy)\\.`, 'g'), 'P.').replace(new RegExp(`nwe\\.${RUN}\\.`, 'g'), 'P.');
  out = out.replace(/amq\.gen-[A-Za-z0-9_-]{22}/g, '<server-named>');
  out = out.replace(/warren\.gen-[A-Za-z0-9_-]{22}/g, '<server-named>');
  out = out.replace(/amq\.ctag-[A-Za-z0-9_-]{22}/g, '<ctag>');
  return out;
}
function errText(e) {
  if (!e) return 'none';
  if (e instanceof Timeout) return 'timeout';
  const code = e.code !== undefined ? `${e.code} ` : '';
  return `${code}${e.message}`;
}
const sorted = (xs) => [...xs].sort((a, b) => (String(a) < String(b) ? -1 : String(a) > String(b) ? 1 : 0));
function tally(bodies) {
  const m = new Map();
  for (const b of bodies) m.set(b, (m.get(b) || 0) + 1);
  return m;
}
/** Compact count summary of received bodies versus the expected ones. */
function countLine(label, expected, received) {
  const t = tally(received);
  let lost = 0;
  let dup = 0;
  for (const b of expected) {
    const n = t.get(b) || 0;
    if (n === 0) lost += 1;
    if (n > 1) dup += n - 1;
  }
  const extra = received.filter((b) => !expected.includes(b)).length;
  return `${label}: expected=${expected.length} received=${received.length} lost=${lost} dup=${dup} unexpected=${extra}`;
}

// --- forcing a server-side close of one of our own connections -----------------------------------

function authFetch(url, opts = {}) {
  const u = new URL(url);
  const headers = { ...(opts.headers || {}) };
  if (u.username) {
    headers.authorization = `Basic ${Buffer.from(`${decodeURIComponent(u.username)}:${decodeURIComponent(u.password)}`).toString('base64')}`;
    u.username = '';
    u.password = '';
  }
  return fetch(u.toString(), { ...opts, headers });
}

/** Finds this script's connections named `name` (polls: the management API lists a new
 * connection after a moment); returns a function that closes them and resolves to the count. */
/** Directly: rabbitmqctl for the node (a command prefix, e.g. "scripts/rabbit.sh ctl shard-a-1"),
 * which lists a connection at once; without it, the node's management API. */
const CTL = process.env.WARREN_DIRECT_CTL || '';
const CLOSED = new Set(); // connections already closed (the management API lists them a while)
async function findConnections(target, name, reason = 'forced by node_wrappers_edge') {
  const end = Date.now() + 15000;
  const headers = target.token ? { authorization: `Bearer ${target.token}` } : {};
  while (Date.now() < end) {
    const urls = [];
    if (target.kind === 'direct' && CTL) {
      // rabbitmqctl sees a connection at once; the management API only once its statistics
      // are in, which a loaded machine can hold back for longer than this.
      const out = execSync(`${CTL} -q list_connections --no-table-headers pid client_properties`).toString();
      for (const line of out.split('\n')) {
        const tab = line.indexOf('\t');
        const pid = line.slice(0, tab).trim();
        if (tab > 0 && line.includes(`"${name}"`) && !CLOSED.has(pid)) {
          CLOSED.add(pid);
          urls.push(['ctl', pid]);
        }
      }
    } else if (target.kind === 'direct') {
      const r = await authFetch(`${target.mgmt}/api/connections?columns=name,client_properties`);
      for (const c of await r.json()) {
        if (c.client_properties && c.client_properties.connection_name === name && !CLOSED.has(c.name)) {
          CLOSED.add(c.name);
          urls.push([`${target.mgmt}/api/connections/${encodeURIComponent(c.name)}`, { method: 'DELETE', headers: { 'X-Reason': reason } }]);
        }
      }
    } else {
      const r = await authFetch(`${target.admin}/clients`, { headers });
      // As above: a connection already closed here may still be listed while it ends (its
      // links closing, its publishes being confirmed); it is not closed and counted again.
      for (const c of (await r.json()).clients || []) {
        if (c.connection_name === name && !CLOSED.has(`warren-${c.id}`)) {
          CLOSED.add(`warren-${c.id}`);
          urls.push([`${target.admin}/clients/${c.id}/close?reason=${encodeURIComponent(reason)}`, { method: 'POST', headers }]);
        }
      }
    }
    if (urls.length > 0) {
      return async () => {
        let closed = 0;
        for (const [u, o] of urls) {
          if (u === 'ctl') {
            execSync(`${CTL} close_connection '${o}' '${reason.replace(/'/g, '')}'`);
            closed += 1;
          } else if ((await authFetch(u, o)).status < 300) closed += 1;
        }
        return closed;
      };
    }
    await sleep(250);
  }
  return async () => 0;
}

/** Closes every connection whose connection_name is `name`; returns how many were closed. */
async function forceClose(target, name, reason) {
  return (await findConnections(target, name, reason))();
}

// --- plain amqplib helpers for setting up and checking -------------------------------------------

async function plain(target, fn) {
  const conn = await amqplib.connect(target.url, { clientProperties: { connection_name: `nwe-${RUN}-plain` } });
  conn.on('error', () => {});
  try {
    const ch = await conn.createConfirmChannel();
    ch.on('error', () => {});
    return await fn(ch, conn);
  } finally {
    try { await conn.close(); } catch (_) { /* already closed */ }
  }
}
async function publishN(target, exchange, key, bodies, opts = {}) {
  await plain(target, async (ch) => {
    for (const b of bodies) ch.publish(exchange, key, Buffer.from(b), opts);
    await ch.waitForConfirms();
  });
}
/** Consumes `queue` with acks until `want` messages came and 300 ms passed quiet, or ms. */
async function drain(target, queue, want, ms = STEP_MS) {
  return plain(target, async (ch) => {
    const got = [];
    let last = Date.now();
    await ch.consume(queue, (m) => {
      if (!m) return;
      got.push(m);
      last = Date.now();
      ch.ack(m);
    });
    await waitUntil(() => got.length >= want && Date.now() - last > 300, ms);
    await sleep(200);
    return got;
  });
}
async function exists(target, kind, name) {
  try {
    await plain(target, async (ch) => (kind === 'queue' ? ch.checkQueue(name) : ch.checkExchange(name)));
    return 'exists';
  } catch (e) {
    return `absent(${e.code})`;
  }
}
async function queueCount(target, name) {
  try {
    return await plain(target, async (ch) => (await ch.checkQueue(name)).messageCount);
  } catch (e) {
    return `error ${e.code}`;
  }
}
async function cleanup(target, queues = [], exchanges = []) {
  try {
    await plain(target, async (ch) => {
      for (const q of queues) await ch.deleteQueue(q);
      for (const e of exchanges) await ch.deleteExchange(e);
    });
  } catch (_) { /* best effort */ }
}

// --- amqp-connection-manager -----------------------------------------------------------------------

function acmConnect(target, connName) {
  const conn = acm.connect([target.url], {
    reconnectTimeInSeconds: 0.3,
    heartbeatIntervalInSeconds: 5,
    connectionOptions: { clientProperties: { connection_name: connName } },
  });
  conn.events = { connect: 0, disconnect: [] };
  conn.on('connect', () => { conn.events.connect += 1; });
  conn.on('disconnect', ({ err }) => { conn.events.disconnect.push(err); });
  conn.on('connectFailed', () => {});
  return conn;
}
function disconnectLine(conn, names) {
  const errs = conn.events.disconnect.map((e) => shape(errText(e), names));
  return `disconnects=${errs.length} [${errs.join(' | ')}]`;
}

// ---------------------------------------------------------------------------------------------
// Scenarios: amqp-connection-manager.

/** ChannelWrapper with confirms: every publish resolves once, every message arrives once. */
async function acm_confirm_publish(t) {
  const obs = [];
  const q = `nwe.${RUN}.${t.side}.acm_confirm`;
  const names = [[q, 'Q']];
  const conn = acmConnect(t, `nwe-${RUN}-${t.side}-acm1`);
  const ch = conn.createChannel({ confirm: true, setup: (c) => c.assertQueue(q, { durable: true }) });
  try {
    await within(ch.waitForConnect(), STEP_MS, 'waitForConnect');
    obs.push('waitForConnect ok');
    const bodies = Array.from({ length: 300 }, (_, i) => `m${String(i).padStart(3, '0')}`);
    let ok = 0;
    let failed = 0;
    const settled = new Map();
    await within(Promise.all(bodies.map((b, i) => {
      const p = i % 2 === 0 ? ch.sendToQueue(q, Buffer.from(b), { persistent: true }) : ch.publish('', q, Buffer.from(b));
      return p.then(() => { ok += 1; settled.set(b, (settled.get(b) || 0) + 1); }, () => { failed += 1; });
    })), 30000, 'confirms');
    obs.push(`confirmed=${ok} failed=${failed} settled-twice=${[...settled.values()].filter((n) => n > 1).length}`);
    obs.push(`queueLength after confirms=${ch.queueLength()}`);
    // A publish to a missing exchange: the promise rejects, the wrapper recreates its channel.
    try {
      await within(ch.publish(`nwe.${RUN}.missing`, 'k', Buffer.from('x')), STEP_MS, 'missing exchange publish');
      obs.push('publish to missing exchange: resolved');
    } catch (e) {
      obs.push(`publish to missing exchange: rejected ${shape(errText(e), [[`nwe.${RUN}.missing`, 'MISSING']])}`);
    }
    try {
      await within(ch.sendToQueue(q, Buffer.from('after-error')), STEP_MS, 'publish after channel error');
      obs.push('publish after channel error: confirmed');
    } catch (e) {
      obs.push(`publish after channel error: ${shape(errText(e), names)}`);
    }
    const got = await drain(t, q, bodies.length + 1);
    obs.push(countLine('received', [...bodies, 'after-error'], got.map((m) => m.content.toString())));
    obs.push(`connects=${conn.events.connect} ${disconnectLine(conn, names)}`);
  } finally {
    await ch.close().catch(() => {});
    await conn.close().catch(() => {});
    await cleanup(t, [q]);
  }
  return obs;
}

/** Publishes made while the server has closed the connection are queued and flushed after it. */
async function acm_publish_while_forced_closed(t) {
  const obs = [];
  const q = `nwe.${RUN}.${t.side}.acm_queued`;
  const names = [[q, 'Q']];
  const cname = `nwe-${RUN}-${t.side}-acm2`;
  const conn = acmConnect(t, cname);
  const ch = conn.createChannel({ confirm: true, setup: (c) => c.assertQueue(q, { durable: true }) });
  try {
    await within(ch.waitForConnect(), STEP_MS, 'waitForConnect');
    const first = Array.from({ length: 100 }, (_, i) => `a${String(i).padStart(3, '0')}`);
    const second = Array.from({ length: 100 }, (_, i) => `b${String(i).padStart(3, '0')}`);
    const third = Array.from({ length: 1000 }, (_, i) => `c${String(i).padStart(4, '0')}`);
    let ok = 0;
    let failed = 0;
    const failures = [];
    const track = (p) => p.then(() => { ok += 1; }, (e) => { failed += 1; failures.push(shape(errText(e), names)); });
    await within(Promise.all(first.map((b) => track(ch.sendToQueue(q, Buffer.from(b))))), 20000, 'first batch');
    obs.push(`first batch confirmed=${ok} failed=${failed}`);
    const disc = conn.events.disconnect.length;
    const closed = await forceClose(t, cname, 'queued publishes test');
    obs.push(`force-closed connections=${closed}`);
    await waitUntil(() => conn.events.disconnect.length > disc, STEP_MS);
    // Now disconnected (or reconnecting): these are queued in the wrapper.
    const pending = second.map((b) => track(ch.sendToQueue(q, Buffer.from(b))));
    obs.push(`queued while disconnected=${ch.queueLength() >= 1 ? 'yes' : 'no'}`);
    await within(Promise.all(pending), 30000, 'second batch');
    obs.push(`after reconnect confirmed=${ok} failed=${failed}`);
    // A third batch in flight when the server closes the connection again. How many are in
    // flight depends on timing, so only invariants are compared: each publish settles once, every
    // confirmed one arrives, nothing arrives twice, and what arrived unconfirmed was rejected.
    const close2 = await findConnections(t, cname, 'in-flight publishes test');
    const okBefore = ok;
    const failedBefore = failed;
    const confirmedC = new Set();
    const inflight = third.map((b) => track(ch.sendToQueue(q, Buffer.from(b)).then((r) => { confirmedC.add(b); return r; })));
    await waitUntil(() => ok - okBefore >= 20, STEP_MS, 1);
    const closing = close2();
    obs.push(`force-closed again=${(await closing) > 0 ? 'yes' : 'no'}`);
    await within(Promise.all(inflight), 30000, 'third batch');
    const okC = ok - okBefore;
    const failedC = failed - failedBefore;
    obs.push(`batch c settled=${okC + failedC}/${third.length}`);
    obs.push(`info failure kinds=${sorted([...new Set(failures)]).join(' | ') || 'none'}`);
    const got = (await drain(t, q, first.length + second.length + okC, 12000)).map((m) => m.content.toString());
    const ab = got.filter((b) => !b.startsWith('c'));
    const c = got.filter((b) => b.startsWith('c'));
    obs.push(countLine('batches a+b', [...first, ...second], ab));
    const cTally = tally(c);
    obs.push(`batch c: confirmed but lost=${[...confirmedC].filter((b) => !cTally.has(b)).length} duplicated=${[...cTally.values()].filter((n) => n > 1).length} arrived unconfirmed but not rejected=${c.filter((b) => !confirmedC.has(b)).length > failedC ? 'yes' : 'no'}`);
    obs.push(`info batch c: confirmed=${okC} rejected=${failedC} arrived=${c.length} arrived-unconfirmed=${c.filter((b) => !confirmedC.has(b)).length}`);
    obs.push(`reconnected=${conn.events.connect >= 3 ? 'yes' : conn.events.connect} ${disconnectLine(conn, names)}`);
  } finally {
    await ch.close().catch(() => {});
    await conn.close().catch(() => {});
    await cleanup(t, [q]);
  }
  return obs;
}

/** A setup function declaring a server-named queue, bound to a fanout, re-run on reconnect. */
async function acm_setup_server_named_reconnect(t) {
  const obs = [];
  const ex = `nwe.${RUN}.${t.side}.fan`;
  const cname = `nwe-${RUN}-${t.side}-acm3`;
  const names = [[ex, 'EX']];
  const conn = acmConnect(t, cname);
  const queues = [];
  const got = [];
  const ch = conn.createChannel({
    confirm: true,
    setup: async (c) => {
      await c.assertExchange(ex, 'fanout', { durable: false, autoDelete: false });
      const ok = await c.assertQueue('', { exclusive: true });
      queues.push(ok.queue);
      await c.bindQueue(ok.queue, ex, '');
      await c.consume(ok.queue, (m) => { if (m) { got.push(`${queues.length}:${m.content.toString()}:${m.fields.redelivered}`); c.ack(m); } });
    },
  });
  try {
    await within(ch.waitForConnect(), STEP_MS, 'waitForConnect');
    await publishN(t, ex, '', ['x1', 'x2', 'x3']);
    await waitUntil(() => got.length >= 3, STEP_MS);
    const closed = await forceClose(t, cname, 'setup rerun test');
    obs.push(`force-closed=${closed}`);
    await waitUntil(() => queues.length >= 2, 15000);
    await within(ch.waitForConnect(), STEP_MS, 'waitForConnect 2');
    obs.push(`setup runs=${queues.length} names=${queues.map((x) => shape(x, names)).join(',')} distinct=${new Set(queues).size}`);
    obs.push(`old queue after reconnect: ${await exists(t, 'queue', queues[0])}`);
    await publishN(t, ex, '', ['y1', 'y2', 'y3', 'y4']);
    await waitUntil(() => got.length >= 7, STEP_MS);
    await sleep(300);
    obs.push(`consumed=${sorted(got).join(' ')}`);
    const conf = await within(ch.publish(ex, '', Buffer.from('z1')).then(() => 'confirmed', (e) => errText(e)), STEP_MS, 'z1');
    await waitUntil(() => got.length >= 8, STEP_MS);
    obs.push(`wrapper publish after reconnect: ${conf}; consumed=${got.length}`);
    obs.push(`connects=${conn.events.connect} ${disconnectLine(conn, names)}`);
  } finally {
    await ch.close().catch(() => {});
    await conn.close().catch(() => {});
    await cleanup(t, [], [ex]);
  }
  return obs;
}

/** A prefetch-5 manual-ack consumer holding its window when the server closes the connection. */
async function acm_prefetch_unacked_reconnect(t) {
  const obs = [];
  const q = `nwe.${RUN}.${t.side}.acm_prefetch`;
  const cname = `nwe-${RUN}-${t.side}-acm4`;
  const names = [[q, 'Q']];
  const bodies = Array.from({ length: 20 }, (_, i) => `p${String(i).padStart(2, '0')}`);
  await plain(t, async (c) => { await c.assertQueue(q, { durable: true }); });
  await publishN(t, '', q, bodies, { persistent: true });
  const conn = acmConnect(t, cname);
  const before = [];
  const after = [];
  let ackNow = false;
  const ch = conn.createChannel({ confirm: false, setup: (c) => c.prefetch(5) });
  try {
    await within(ch.waitForConnect(), STEP_MS, 'waitForConnect');
    await ch.consume(q, (m) => {
      if (!ackNow) { before.push(m); return; }
      after.push(m);
      ch.ack(m);
    }, { noAck: false, prefetch: 5 });
    await waitUntil(() => before.length >= 5, STEP_MS);
    await sleep(500);
    obs.push(`held before the close=${before.length} redelivered=${before.filter((m) => m.fields.redelivered).length}`);
    ackNow = true;
    const closed = await forceClose(t, cname, 'prefetch test');
    obs.push(`force-closed=${closed}`);
    await waitUntil(() => after.length >= bodies.length, 20000);
    await sleep(500);
    const held = new Set(before.map((m) => m.content.toString()));
    const afterBodies = after.map((m) => m.content.toString());
    obs.push(countLine('after reconnect', bodies, afterBodies));
    obs.push(`held ones redelivered=${after.filter((m) => held.has(m.content.toString()) && m.fields.redelivered).length}/${held.size}`);
    obs.push(`others marked redelivered=${after.filter((m) => !held.has(m.content.toString()) && m.fields.redelivered).length}`);
    obs.push(`queue left=${await queueCount(t, q)}`);
    obs.push(`connects=${conn.events.connect} ${disconnectLine(conn, names)}`);
  } finally {
    await ch.close().catch(() => {});
    await conn.close().catch(() => {});
    await cleanup(t, [q]);
  }
  return obs;
}

/** A confirmed publisher and a manual-ack consumer, each on its own reconnecting connection,
 * force-closed several times while 1500 messages stream through. The application re-publishes
 * what the wrapper rejects. Nothing confirmed may be lost; a duplicate must be explained by a
 * re-publish of a rejected publish or by a redelivery. */
async function acm_storm_reconnects(t) {
  const obs = [];
  const q = `nwe.${RUN}.${t.side}.storm`;
  const names = [[q, 'Q']];
  const pname = `nwe-${RUN}-${t.side}-acm5p`;
  const cname = `nwe-${RUN}-${t.side}-acm5c`;
  const pconn = acmConnect(t, pname);
  const cconn = acmConnect(t, cname);
  const pch = pconn.createChannel({ confirm: true, setup: (c) => c.assertQueue(q, { durable: true }) });
  const got = [];
  const cch = cconn.createChannel({
    confirm: false,
    setup: async (c) => {
      await c.assertQueue(q, { durable: true });
      await c.prefetch(20);
      await c.consume(q, (m) => {
        if (!m) return;
        got.push({ b: m.content.toString(), r: m.fields.redelivered });
        c.ack(m);
      });
    },
  });
  const N = 1500;
  const bodies = Array.from({ length: N }, (_, i) => `s${String(i).padStart(4, '0')}`);
  const retried = new Set();
  let rejections = 0;
  try {
    await within(Promise.all([pch.waitForConnect(), cch.waitForConnect()]), STEP_MS, 'waitForConnect');
    const publishOne = async (b) => {
      for (let attempt = 0; attempt < 20; attempt += 1) {
        try {
          await pch.sendToQueue(q, Buffer.from(b), { persistent: true });
          return true;
        } catch (e) {
          rejections += 1;
          retried.add(b);
          await sleep(50);
        }
      }
      return false;
    };
    let sent = 0;
    const closer = (async () => {
      let closed = 0;
      for (let round = 0; round < 6; round += 1) {
        await waitUntil(() => sent >= 150 + round * 220, 20000, 5);
        const conn = round % 2 === 0 ? pconn : cconn;
        const before = conn.events.connect;
        closed += await forceClose(t, round % 2 === 0 ? pname : cname, 'storm');
        await waitUntil(() => conn.events.connect > before, STEP_MS);
      }
      return closed;
    })();
    const pubs = [];
    for (let i = 0; i < N; i += 1) {
      pubs.push(publishOne(bodies[i]));
      sent += 1;
      if (i % 10 === 0) await sleep(10);
    }
    const results = await within(Promise.all(pubs), 60000, 'storm publishes');
    const closed = await closer;
    const closes = { length: 6 };
    obs.push(`force-closed=${closed}/${closes.length}`);
    obs.push(`published (confirmed, with retries)=${results.filter(Boolean).length}/${N}`);
    await waitUntil(() => new Set(got.map((g) => g.b)).size >= N, 20000);
    await sleep(1000);
    const t2 = tally(got.map((g) => g.b));
    const lost = bodies.filter((b) => !t2.has(b)).length;
    const redelivered = new Set(got.filter((g) => g.r).map((g) => g.b));
    const dups = [...t2].filter(([, n]) => n > 1).map(([b]) => b);
    const unexplained = dups.filter((b) => !retried.has(b) && !redelivered.has(b));
    obs.push(`lost=${lost} unexplained duplicates=${unexplained.length}`);
    obs.push(`info duplicates=${dups.length} (after a retried publish ${dups.filter((b) => retried.has(b)).length}, redelivered ${dups.filter((b) => redelivered.has(b)).length}) rejections=${rejections}`);
    if (unexplained.length) obs.push(`info unexplained: ${unexplained.slice(0, 10).join(' ')}`);
    obs.push(`queue left=${await queueCount(t, q)}`);
  } finally {
    await pch.close().catch(() => {});
    await cch.close().catch(() => {});
    await pconn.close().catch(() => {});
    await cconn.close().catch(() => {});
    await cleanup(t, [q]);
  }
  return obs;
}

/** A wrapper consumer whose queue another connection deletes (a consumer cancel notification),
 * then re-creates: does the wrapper's consumer see the new queue's messages? */
async function acm_consumer_cancelled_by_queue_delete(t) {
  const obs = [];
  const q = `nwe.${RUN}.${t.side}.cancel`;
  const names = [[q, 'Q']];
  const conn = acmConnect(t, `nwe-${RUN}-${t.side}-acm6`);
  const got = [];
  const ch = conn.createChannel({ confirm: true, setup: (c) => c.assertQueue(q, { durable: false }) });
  let errors = [];
  ch.on('error', (e) => errors.push(shape(errText(e), names)));
  try {
    await within(ch.waitForConnect(), STEP_MS, 'waitForConnect');
    await ch.consume(q, (m) => { got.push(m === null ? 'null' : m.content.toString()); if (m) ch.ack(m); });
    await publishN(t, '', q, ['k1', 'k2']);
    await waitUntil(() => got.length >= 2, STEP_MS);
    await plain(t, async (c) => { await c.deleteQueue(q); });
    await waitUntil(() => got.includes('null'), STEP_MS);
    obs.push(`after delete: ${sorted(got).join(' ')}`);
    await plain(t, async (c) => { await c.assertQueue(q, { durable: false }); });
    await publishN(t, '', q, ['k3']);
    await sleep(1500);
    obs.push(`after re-create: ${sorted(got).join(' ')} queue holds=${await queueCount(t, q)}`);
    obs.push(`wrapper errors=${errors.join(' | ') || 'none'} connects=${conn.events.connect} ${disconnectLine(conn, names)}`);
  } finally {
    await ch.close().catch(() => {});
    await conn.close().catch(() => {});
    await cleanup(t, [q]);
  }
  return obs;
}

// ---------------------------------------------------------------------------------------------
// Scenarios: rascal.

function rascalConfig(t, cname, vhost) {
  return ({
    vhosts: {
      '/': {
        connection: {
          url: t.url,
          socketOptions: { clientProperties: { connection_name: cname }, timeout: 10000 },
          retry: { min: 200, max: 1000, factor: 2, strategy: 'exponential' },
        },
        ...vhost,
      },
    },
  });
}
async function rascalBroker(t, cname, vhost, extra = {}) {
  const config = rascalConfig(t, cname, vhost);
  Object.assign(config, extra);
  const broker = await within(rascal.BrokerAsPromised.create(rascal.withDefaultConfig(config)), 20000, 'rascal create');
  broker.errors = [];
  broker.on('error', (e) => broker.errors.push(e));
  return broker;
}
async function rascalPublish(broker, pub, content, overrides) {
  const p = await broker.publish(pub, content, overrides);
  return within(new Promise((resolve) => {
    p.on('success', () => resolve('success'));
    p.on('error', (e) => resolve(`error ${errText(e)}`));
    p.on('return', () => resolve('returned'));
  }), 15000, `publish ${pub}`);
}
function rh(message) { return (message.properties.headers || {}).rascal || {}; }

/** Publications with confirms, a subscription with a redelivery limit, dead-lettering. */
async function rascal_redeliveries_dead_letter(t) {
  const obs = [];
  const p = `nwe.${RUN}.${t.side}.rr`;
  const names = [[p, 'P']];
  const vhost = {
    exchanges: { [`${p}.ex`]: { type: 'topic' }, [`${p}.dlx`]: { type: 'fanout' } },
    queues: {
      [`${p}.q`]: { options: { durable: true, arguments: { 'x-dead-letter-exchange': `${p}.dlx` } } },
      [`${p}.dlq`]: { options: { durable: true } },
    },
    bindings: [`${p}.ex[a.#] -> ${p}.q`, `${p}.dlx -> ${p}.dlq`],
    publications: { pub: { exchange: `${p}.ex`, routingKey: 'a.b' }, unroutable: { exchange: `${p}.ex`, routingKey: 'z' } },
    subscriptions: {
      sub: { queue: `${p}.q`, prefetch: 4, redeliveries: { limit: 2, counter: 'mem' } },
      dl: { queue: `${p}.dlq`, prefetch: 10 },
    },
  };
  const broker = await rascalBroker(t, `nwe-${RUN}-${t.side}-r1`, vhost, {
    redeliveries: { counters: { mem: { type: 'inMemory', size: 1000 } } },
  });
  try {
    const bodies = Array.from({ length: 12 }, (_, i) => `r${String(i).padStart(2, '0')}`);
    const results = [];
    for (const b of bodies) results.push(await rascalPublish(broker, 'pub', b));
    obs.push(`publish results=${JSON.stringify(tally(results).size === 1 ? [results[0], results.length] : sorted(results))}`);
    obs.push(`unroutable mandatory publish=${await rascalPublish(broker, 'unroutable', 'u')}`);
    const deliveries = new Map();
    const acked = [];
    const exceeded = [];
    const sub = await broker.subscribe('sub');
    sub.on('error', (e) => obs.push(`sub error ${shape(errText(e), names)}`));
    sub.on('message', (m, content, ackOrNack) => {
      const list = deliveries.get(content) || [];
      list.push(`${m.fields.redelivered ? 'R' : 'N'}${rh(m).redeliveries}`);
      deliveries.set(content, list);
      if (Number(content.slice(1)) % 4 === 0) ackOrNack(new Error('poison'), { strategy: 'nack', requeue: true });
      else { acked.push(content); ackOrNack(); }
    });
    sub.on('redeliveries_exceeded', (err, m, ackOrNack) => {
      exceeded.push(m.content.toString());
      ackOrNack(err, { strategy: 'nack' });
    });
    const dead = [];
    const dl = await broker.subscribe('dl');
    dl.on('message', (m, content, ackOrNack) => {
      const xd = (m.properties.headers['x-death'] || []).map((d) => `${d.reason}:${d.count}:${shape(d.queue, names)}`).join(',');
      dead.push(`${content}(${xd})`);
      ackOrNack();
    });
    dl.on('error', () => {});
    await waitUntil(() => dead.length >= 3 && acked.length >= 9, 20000);
    await sleep(500);
    obs.push(`acked=${sorted(acked).join(' ')}`);
    obs.push(`exceeded=${sorted(exceeded).join(' ')}`);
    obs.push(`dead-lettered=${sorted(dead).join(' ')}`);
    obs.push(`deliveries of poison=${sorted([...deliveries].filter(([b]) => Number(b.slice(1)) % 4 === 0).map(([b, l]) => `${b}:${l.join('/')}`)).join(' ')}`);
    await sub.cancel();
    await dl.cancel();
    obs.push(`queue left=${await queueCount(t, `${p}.q`)} dlq left=${await queueCount(t, `${p}.dlq`)}`);
    obs.push(`broker errors=${broker.errors.map((e) => shape(errText(e), names)).join(' | ') || 'none'}`);
  } finally {
    await broker.nuke().catch(() => {});
  }
  return obs;
}

/** The republish recovery strategy with attempts, chained to a dead-lettering nack. */
async function rascal_republish_strategy(t) {
  const obs = [];
  const p = `nwe.${RUN}.${t.side}.rp`;
  const names = [[p, 'P']];
  const vhost = {
    exchanges: { [`${p}.ex`]: { type: 'direct' }, [`${p}.dlx`]: { type: 'fanout' } },
    queues: {
      [`${p}.q`]: { options: { arguments: { 'x-dead-letter-exchange': `${p}.dlx` } } },
      [`${p}.dlq`]: {},
    },
    bindings: [`${p}.ex[k] -> ${p}.q`, `${p}.dlx -> ${p}.dlq`],
    publications: { pub: { exchange: `${p}.ex`, routingKey: 'k' } },
    subscriptions: { sub: { queue: `${p}.q`, prefetch: 5 }, dl: { queue: `${p}.dlq` } },
  };
  const broker = await rascalBroker(t, `nwe-${RUN}-${t.side}-r2`, vhost);
  try {
    const bodies = Array.from({ length: 6 }, (_, i) => `rp${i}`);
    for (const b of bodies) await rascalPublish(broker, 'pub', b);
    const seen = [];
    const sub = await broker.subscribe('sub');
    sub.on('error', (e) => obs.push(`sub error ${shape(errText(e), names)}`));
    sub.on('message', (m, content, ackOrNack) => {
      const rec = ((rh(m).recovery || {})[`${p}.q`]) || {};
      seen.push(`${content}:rep=${rec.republished || 0}:ex=${shape(m.fields.exchange, names)}:rk=${shape(m.fields.routingKey, names)}:redel=${m.fields.redelivered}`);
      if (content.endsWith('0') || content.endsWith('3')) {
        ackOrNack(new Error('retry me'), [{ strategy: 'republish', attempts: 2 }, { strategy: 'nack' }]);
      } else ackOrNack();
    });
    const dead = [];
    const dl = await broker.subscribe('dl');
    dl.on('error', () => {});
    dl.on('message', (m, content, ackOrNack) => {
      const rec = ((rh(m).recovery || {})[`${p}.q`]) || {};
      const xd = (m.properties.headers['x-death'] || []).map((d) => `${d.reason}:${d.count}:${shape(d.exchange, names)}:${shape((d['routing-keys'] || []).join('+'), names)}`).join(',');
      dead.push(`${content}(rep=${rec.republished} err=${rec.error ? rec.error.message : '-'} ${xd})`);
      ackOrNack();
    });
    await waitUntil(() => dead.length >= 2 && seen.length >= 10, 20000);
    await sleep(500);
    obs.push(`seen=${sorted(seen).join(' ')}`);
    obs.push(`dead-lettered=${sorted(dead).join(' ')}`);
    await sub.cancel();
    await dl.cancel();
    obs.push(`queue left=${await queueCount(t, `${p}.q`)} dlq left=${await queueCount(t, `${p}.dlq`)}`);
    obs.push(`broker errors=${broker.errors.map((e) => shape(errText(e), names)).join(' | ') || 'none'}`);
  } finally {
    await broker.nuke().catch(() => {});
  }
  return obs;
}

/** The forward recovery strategy, and a shovel (subscription -> publication). */
async function rascal_forward_and_shovel(t) {
  const obs = [];
  const p = `nwe.${RUN}.${t.side}.fw`;
  const names = [[p, 'P']];
  const vhost = {
    exchanges: { [`${p}.ex`]: { type: 'topic' }, [`${p}.retry`]: { type: 'topic' }, [`${p}.out`]: { type: 'fanout' } },
    queues: { [`${p}.q`]: {}, [`${p}.retryq`]: {}, [`${p}.sq`]: {}, [`${p}.outq`]: {} },
    bindings: [`${p}.ex[in.#] -> ${p}.q`, `${p}.retry[#] -> ${p}.retryq`, `${p}.ex[sh.#] -> ${p}.sq`, `${p}.out -> ${p}.outq`],
    publications: {
      pub: { exchange: `${p}.ex`, routingKey: 'in.x' },
      shpub: { exchange: `${p}.ex`, routingKey: 'sh.x' },
      retry: { exchange: `${p}.retry` },
      out: { exchange: `${p}.out` },
    },
    subscriptions: { sub: { queue: `${p}.q` }, retrysub: { queue: `${p}.retryq` }, shsub: { queue: `${p}.sq` }, outsub: { queue: `${p}.outq` } },
  };
  const broker = await rascalBroker(t, `nwe-${RUN}-${t.side}-r3`, vhost, { shovels: { sh: { subscription: 'shsub', publication: 'out' } } });
  try {
    for (let i = 0; i < 5; i += 1) await rascalPublish(broker, 'pub', `f${i}`);
    for (let i = 0; i < 8; i += 1) await rascalPublish(broker, 'shpub', `s${i}`);
    const handled = [];
    const forwarded = [];
    const shovelled = [];
    const sub = await broker.subscribe('sub');
    sub.on('error', (e) => obs.push(`sub error ${shape(errText(e), names)}`));
    sub.on('message', (m, content, ackOrNack) => {
      handled.push(content);
      if (content === 'f1' || content === 'f4') ackOrNack(new Error('fwd'), [{ strategy: 'forward', publication: 'retry', options: { routingKey: 'r.k' } }]);
      else ackOrNack();
    });
    const rs = await broker.subscribe('retrysub');
    rs.on('error', () => {});
    rs.on('message', (m, content, ackOrNack) => {
      const r = rh(m);
      forwarded.push(`${content}:rk=${m.fields.routingKey}:origQ=${shape(r.originalQueue, names)}:origEx=${shape(r.originalExchange, names)}:origRk=${r.originalRoutingKey}:fwd=${((r.recovery || {})[`${p}.q`] || {}).forwarded}`);
      ackOrNack();
    });
    const os = await broker.subscribe('outsub');
    os.on('error', () => {});
    os.on('message', (m, content, ackOrNack) => { shovelled.push(content); ackOrNack(); });
    await waitUntil(() => forwarded.length >= 2 && shovelled.length >= 8 && handled.length >= 5, 20000);
    await sleep(500);
    obs.push(`handled=${sorted(handled).join(' ')}`);
    obs.push(`forwarded=${sorted(forwarded).join(' ')}`);
    obs.push(`shovelled=${sorted(shovelled).join(' ')}`);
    await broker.unsubscribeAll();
    for (const q of ['q', 'retryq', 'sq', 'outq']) obs.push(`${q} left=${await queueCount(t, `${p}.${q}`)}`);
    obs.push(`broker errors=${broker.errors.map((e) => shape(errText(e), names)).join(' | ') || 'none'}`);
  } finally {
    await broker.nuke().catch(() => {});
  }
  return obs;
}

/** README's retry loop: forward to a delay exchange with a CC back to the incoming queue, a TTL
 * wait queue dead-lettering into a retry exchange, attempts, then nack into a dead-letter queue. */
async function rascal_forward_delay_loop(t) {
  const obs = [];
  const p = `nwe.${RUN}.${t.side}.dl`;
  const names = [[p, 'P']];
  const vhost = {
    exchanges: { [`${p}.jobs`]: { type: 'topic' }, [`${p}.delay`]: { type: 'topic' }, [`${p}.retry`]: { type: 'topic' }, [`${p}.dead`]: { type: 'fanout' } },
    queues: {
      [`${p}.incoming`]: { options: { arguments: { 'x-dead-letter-exchange': `${p}.dead` } } },
      [`${p}.wait`]: { options: { arguments: { 'x-message-ttl': 200, 'x-dead-letter-exchange': `${p}.retry` } } },
      [`${p}.dlq`]: {},
    },
    bindings: [`${p}.jobs[a.#] -> ${p}.incoming`, `${p}.delay[delay.#] -> ${p}.wait`, `${p}.retry[incoming.#] -> ${p}.incoming`, `${p}.dead -> ${p}.dlq`],
    publications: { pub: { exchange: `${p}.jobs`, routingKey: 'a.b.c' }, delay: { exchange: `${p}.delay`, routingKey: 'delay.200' } },
    subscriptions: { sub: { queue: `${p}.incoming` }, dl: { queue: `${p}.dlq` } },
  };
  const broker = await rascalBroker(t, `nwe-${RUN}-${t.side}-r7`, vhost);
  try {
    for (let i = 0; i < 4; i += 1) await rascalPublish(broker, 'pub', `d${i}`);
    const seen = [];
    const sub = await broker.subscribe('sub');
    sub.on('error', (e) => obs.push(`sub error ${shape(errText(e), names)}`));
    sub.on('message', (m, content, ackOrNack) => {
      const rec = ((rh(m).recovery || {})[`${p}.incoming`]) || {};
      seen.push(`${content}:fwd=${rec.forwarded || 0}:redel=${m.fields.redelivered}`);
      if (content === 'd1' || content === 'd2') {
        ackOrNack(new Error('later'), [{ strategy: 'forward', publication: 'delay', attempts: 2, options: { routingKey: 'delay.200', options: { CC: ['incoming.a.b.c'] } } }, { strategy: 'nack' }]);
      } else ackOrNack();
    });
    const dead = [];
    const dl = await broker.subscribe('dl');
    dl.on('error', () => {});
    dl.on('message', (m, content, ackOrNack) => {
      const xd = (m.properties.headers['x-death'] || []).map((d) => `${d.reason}:${d.count}:${shape(d.queue, names)}:${shape((d['routing-keys'] || []).join('+'), names)}`);
      dead.push(`${content}(${sorted(xd).join(',')})`);
      ackOrNack();
    });
    await waitUntil(() => dead.length >= 2, 20000);
    await sleep(500);
    obs.push(`seen=${sorted(seen).join(' ')}`);
    obs.push(`dead-lettered=${sorted(dead).join(' ')}`);
    await broker.unsubscribeAll();
    for (const q of ['incoming', 'wait', 'dlq']) obs.push(`${q} left=${await queueCount(t, `${p}.${q}`)}`);
    obs.push(`broker errors=${broker.errors.map((e) => shape(errText(e), names)).join(' | ') || 'none'}`);
  } finally {
    await broker.nuke().catch(() => {});
  }
  return obs;
}

/** A message that "crashes" its consumer: held unacked while the server closes the connection,
 * three times; rascal's redelivery counter (redelivered flag + message id) must trip its limit. */
async function rascal_redeliveries_across_forced_close(t) {
  const obs = [];
  const p = `nwe.${RUN}.${t.side}.rc`;
  const cname = `nwe-${RUN}-${t.side}-r8`;
  const names = [[p, 'P']];
  const vhost = {
    exchanges: { [`${p}.dlx`]: { type: 'fanout' } },
    queues: { [`${p}.q`]: { options: { durable: true, arguments: { 'x-dead-letter-exchange': `${p}.dlx` } } }, [`${p}.dlq`]: {} },
    bindings: [`${p}.dlx -> ${p}.dlq`],
    publications: { pub: { queue: `${p}.q` } },
    subscriptions: { sub: { queue: `${p}.q`, prefetch: 5, redeliveries: { limit: 2, counter: 'mem' } } },
  };
  const broker = await rascalBroker(t, cname, vhost, { redeliveries: { counters: { mem: { type: 'inMemory', size: 100 } } } });
  try {
    for (let i = 0; i < 5; i += 1) await rascalPublish(broker, 'pub', `c${i}`);
    const seen = [];
    const exceeded = [];
    const sub = await broker.subscribe('sub');
    sub.on('error', () => {});
    sub.on('message', (m, content, ackOrNack) => {
      seen.push(`${content}:${m.fields.redelivered ? 'R' : 'N'}${rh(m).redeliveries}`);
      if (content !== 'c2') ackOrNack(); // c2 is held: the "crash" comes before its ack
    });
    sub.on('redeliveries_exceeded', (err, m, ackOrNack) => { exceeded.push(m.content.toString()); ackOrNack(err, { strategy: 'nack' }); });
    for (let round = 0; round < 3; round += 1) {
      await waitUntil(() => seen.filter((x) => x.startsWith('c2')).length >= round + 1, 15000);
      await sleep(200);
      const errs = broker.errors.length;
      await forceClose(t, cname, 'crash loop');
      await waitUntil(() => broker.errors.length > errs, STEP_MS);
    }
    await waitUntil(() => exceeded.length >= 1, 15000);
    await sleep(500);
    obs.push(`seen=${sorted(seen).join(' ')}`);
    obs.push(`exceeded=${exceeded.join(' ')}`);
    await broker.unsubscribeAll();
    obs.push(`q left=${await queueCount(t, `${p}.q`)} dlq=${await queueCount(t, `${p}.dlq`)}`);
  } finally {
    await broker.nuke().catch(() => {});
  }
  return obs;
}

/** A queue with x-message-ttl and x-dead-letter-exchange in options.arguments. */
async function rascal_queue_ttl_dlx(t) {
  const obs = [];
  const p = `nwe.${RUN}.${t.side}.ttl`;
  const names = [[p, 'P']];
  const vhost = {
    exchanges: { [`${p}.ex`]: { type: 'topic' }, [`${p}.dlx`]: { type: 'topic' } },
    queues: {
      [`${p}.wait`]: { options: { arguments: { 'x-message-ttl': 300, 'x-dead-letter-exchange': `${p}.dlx`, 'x-dead-letter-routing-key': 'expired.k' } } },
      [`${p}.dlq`]: {},
    },
    bindings: [`${p}.ex[#] -> ${p}.wait`, `${p}.dlx[expired.#] -> ${p}.dlq`],
    publications: { pub: { exchange: `${p}.ex`, routingKey: 'w.x' } },
    subscriptions: { dl: { queue: `${p}.dlq` } },
  };
  const broker = await rascalBroker(t, `nwe-${RUN}-${t.side}-r4`, vhost);
  try {
    for (let i = 0; i < 6; i += 1) await rascalPublish(broker, 'pub', `t${i}`);
    const dead = [];
    const dl = await broker.subscribe('dl');
    dl.on('error', () => {});
    dl.on('message', (m, content, ackOrNack) => {
      const xd = (m.properties.headers['x-death'] || []).map((d) => `${d.reason}:${d.count}:${shape(d.queue, names)}:${(d['routing-keys'] || []).join('+')}`).join(',');
      dead.push(`${content}:rk=${m.fields.routingKey}:${xd}:first=${shape(m.properties.headers['x-first-death-reason'], names)}`);
      ackOrNack();
    });
    await waitUntil(() => dead.length >= 6, 15000);
    await sleep(400);
    obs.push(`expired into dlq=${sorted(dead).join(' ')}`);
    obs.push(`wait left=${await queueCount(t, `${p}.wait`)}`);
    // Re-declaring with different arguments through a second rascal broker: a 406 at init.
    const vhost2 = { queues: { [`${p}.wait`]: { options: { arguments: { 'x-message-ttl': 999 } } } } };
    try {
      const b2 = await rascalBroker(t, `nwe-${RUN}-${t.side}-r4b`, vhost2);
      obs.push('conflicting redeclare: broker created');
      await b2.shutdown().catch(() => {});
    } catch (e) {
      obs.push(`conflicting redeclare: ${shape(errText(e), names)}`);
    }
    obs.push(`broker errors=${broker.errors.map((e) => shape(errText(e), names)).join(' | ') || 'none'}`);
  } finally {
    await broker.nuke().catch(() => {});
  }
  return obs;
}

/** broker.purge(), broker.nuke() and what is left afterwards. */
async function rascal_purge_and_nuke(t) {
  const obs = [];
  const p = `nwe.${RUN}.${t.side}.pn`;
  const names = [[p, 'P']];
  const vhost = {
    exchanges: { [`${p}.ex`]: { type: 'fanout' }, [`${p}.other`]: { type: 'direct' } },
    queues: { [`${p}.q1`]: {}, [`${p}.q2`]: { options: { durable: true } } },
    bindings: [`${p}.ex -> ${p}.q1`, `${p}.ex -> ${p}.q2`],
    publications: { pub: { exchange: `${p}.ex` } },
    subscriptions: { s1: { queue: `${p}.q1` } },
  };
  const broker = await rascalBroker(t, `nwe-${RUN}-${t.side}-r5`, vhost);
  let nuked = false;
  try {
    for (let i = 0; i < 20; i += 1) await rascalPublish(broker, 'pub', `n${i}`);
    await sleep(200);
    obs.push(`before purge q1=${await queueCount(t, `${p}.q1`)} q2=${await queueCount(t, `${p}.q2`)}`);
    await within(broker.purge(), STEP_MS, 'purge');
    obs.push(`after purge q1=${await queueCount(t, `${p}.q1`)} q2=${await queueCount(t, `${p}.q2`)}`);
    for (let i = 0; i < 3; i += 1) await rascalPublish(broker, 'pub', `m${i}`);
    const got = [];
    const s1 = await broker.subscribe('s1');
    s1.on('error', () => {});
    s1.on('message', (m, content, ackOrNack) => { got.push(content); ackOrNack(); });
    await waitUntil(() => got.length >= 3, STEP_MS);
    obs.push(`consumed after purge=${sorted(got).join(' ')}`);
    // A queue that is not in the config, bound to a config exchange: nuke leaves it.
    const extraQ = `${p}.extra`;
    await plain(t, async (c) => { await c.assertQueue(extraQ); await c.bindQueue(extraQ, `${p}.ex`, ''); });
    await within(broker.nuke(), 20000, 'nuke');
    nuked = true;
    obs.push('nuke ok');
    for (const q of ['q1', 'q2', 'extra']) obs.push(`after nuke queue ${q}: ${await exists(t, 'queue', `${p}.${q}`)}`);
    for (const e of ['ex', 'other']) obs.push(`after nuke exchange ${e}: ${await exists(t, 'exchange', `${p}.${e}`)}`);
    obs.push(`broker errors=${broker.errors.map((e) => shape(errText(e), names)).join(' | ') || 'none'}`);
    await cleanup(t, [extraQ]);
  } finally {
    if (!nuked) await broker.nuke().catch(() => {});
  }
  return obs;
}

/** bounce, a server-side close with rascal's recovery, and shutdown. */
async function rascal_bounce_recover_shutdown(t) {
  const obs = [];
  const p = `nwe.${RUN}.${t.side}.bs`;
  const cname = `nwe-${RUN}-${t.side}-r6`;
  const names = [[p, 'P']];
  const vhost = {
    exchanges: { [`${p}.ex`]: { type: 'fanout' } },
    queues: { [`${p}.q`]: { options: { durable: true } } },
    bindings: [`${p}.ex -> ${p}.q`],
    publications: { pub: { exchange: `${p}.ex` } },
    subscriptions: { s: { queue: `${p}.q`, prefetch: 3 } },
  };
  const broker = await rascalBroker(t, cname, vhost);
  let connects = 0;
  broker.on('vhost_initialised', () => { connects += 1; });
  let shut = false;
  try {
    const got = [];
    const subscribe = async () => {
      const s = await broker.subscribe('s');
      s.on('error', (e) => got.push(`suberr:${shape(errText(e), names)}`));
      s.on('message', (m, content, ackOrNack) => { got.push(`${content}${m.fields.redelivered ? '(R)' : ''}`); ackOrNack(); });
    };
    await subscribe();
    for (let i = 0; i < 3; i += 1) await rascalPublish(broker, 'pub', `a${i}`);
    await waitUntil(() => got.length >= 3, STEP_MS);
    await within(broker.bounce(), 20000, 'bounce');
    obs.push('bounce ok');
    // bounce ends the subscriptions; a service subscribes again
    await subscribe();
    for (let i = 0; i < 3; i += 1) await rascalPublish(broker, 'pub', `b${i}`);
    await waitUntil(() => got.length >= 6, STEP_MS);
    const closed = await forceClose(t, cname, 'rascal recovery test');
    obs.push(`force-closed=${closed}`);
    await waitUntil(() => broker.errors.length > 0, STEP_MS);
    // Publishing while rascal reconnects: it waits for the vhost, then publishes.
    const results = [];
    for (let i = 0; i < 3; i += 1) results.push(await rascalPublish(broker, 'pub', `c${i}`).catch((e) => `throw ${errText(e)}`));
    obs.push(`publishes across the reconnect=${sorted(results).join(',')}`);
    await waitUntil(() => got.filter((x) => !x.startsWith('suberr')).length >= 9, 15000);
    await sleep(500);
    obs.push(`consumed=${sorted(got).join(' ')}`);
    obs.push(`broker errors=${broker.errors.map((e) => shape(errText(e), names)).join(' | ') || 'none'}`);
    await within(broker.shutdown(), 20000, 'shutdown');
    shut = true;
    obs.push('shutdown ok');
    try {
      await broker.publish('pub', 'late');
      obs.push('publish after shutdown: accepted');
    } catch (e) {
      obs.push(`publish after shutdown: ${shape(errText(e), names)}`);
    }
    obs.push(`queue left=${await queueCount(t, `${p}.q`)}`);
  } finally {
    await cleanup(t, [`${p}.q`], [`${p}.ex`]);
    if (!shut) await broker.shutdown().catch(() => {});
  }
  return obs;
}

const SCENARIOS = {
  acm_confirm_publish,
  acm_publish_while_forced_closed,
  acm_setup_server_named_reconnect,
  acm_prefetch_unacked_reconnect,
  acm_storm_reconnects,
  acm_consumer_cancelled_by_queue_delete,
  rascal_redeliveries_dead_letter,
  rascal_republish_strategy,
  rascal_forward_and_shovel,
  rascal_forward_delay_loop,
  rascal_redeliveries_across_forced_close,
  rascal_queue_ttl_dlx,
  rascal_purge_and_nuke,
  rascal_bounce_recover_shutdown,
};

// ---------------------------------------------------------------------------------------------
// Driver.

function target(url, side) {
  const u = new URL(url);
  const port = Number(u.port || 5672);
  if (side === 'direct') {
    return { url, side, kind: 'direct', mgmt: (process.env.DIRECT_MGMT || `http://guest:guest@${u.hostname}:${port + 10000}`).replace(/\/$/, '') };
  }
  return {
    url, side, kind: 'proxy',
    admin: (process.env.PROXY_ADMIN || `http://${u.hostname}:${port + 10000}`).replace(/\/$/, ''),
    token: process.env.PROXY_ADMIN_TOKEN || '',
  };
}

async function runOne(t, name) {
  try {
    return await within(SCENARIOS[name](t), SCENARIO_MS, `scenario ${name}`);
  } catch (e) {
    return [`scenario failed: ${errText(e).replace(new RegExp(`nwe\\.${RUN}\\.${t.side}`, 'g'), 'P')}`];
  }
}

async function main(argv) {
  if (argv.length < 2) {
    console.error('usage: node node_wrappers_edge.mjs DIRECT_URL PROXY_URL [SCENARIO ...]');
    return 2;
  }
  const [directUrl, proxyUrl, ...only] = argv;
  const names = only.length ? only : Object.keys(SCENARIOS);
  const unknown = names.filter((n) => !SCENARIOS[n]);
  if (unknown.length) {
    console.error(`unknown scenario(s): ${unknown.join(', ')}; known: ${Object.keys(SCENARIOS).join(', ')}`);
    return 2;
  }
  const direct = target(directUrl, 'direct');
  const proxy = target(proxyUrl, 'proxy');
  const mismatched = [];
  for (const name of names) {
    const d = await runOne(direct, name);
    const w = await runOne(proxy, name);
    const cd = d.filter((l) => !l.startsWith('info '));
    const cw = w.filter((l) => !l.startsWith('info '));
    const same = cd.length === cw.length && cd.every((l, i) => l === cw[i]);
    console.log(`${same ? 'SAME ' : 'DIFF '} ${name}`);
    const n = Math.max(d.length, w.length);
    for (let i = 0; i < n; i += 1) {
      const a = d[i] === undefined ? '<none>' : d[i];
      const b = w[i] === undefined ? '<none>' : w[i];
      if (a === b) console.log(`    = ${a}`);
      else {
        console.log(`    direct: ${a}`);
        console.log(`    warren: ${b}`);
      }
    }
    if (!same) mismatched.push(name);
  }
  console.log('');
  console.log(`summary: ${names.length - mismatched.length} same, ${mismatched.length} different${mismatched.length ? `: ${mismatched.join(', ')}` : ''}`);
  console.log(`${names.length - mismatched.length} passed, ${mismatched.length} failed`);
  return mismatched.length ? 1 : 0;
}

main(process.argv.slice(2)).then((code) => process.exit(code), (e) => { console.error(e); process.exit(2); });
