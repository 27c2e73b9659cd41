<?php
/*
 * Edge cases as php-amqplib users (Laravel / Symfony messenger stacks) and rabbitmq-c's
 * command line tools (amqp-tools) use RabbitMQ, run directly against RabbitMQ and through
 * warren with the same code, and compared observation by observation.
 *
 *     php tests/clients/php_edge.php DIRECT_HOST:PORT PROXY_HOST:PORT [-v] [SCENARIO ...]
 *
 * e.g. `php tests/clients/php_edge.php 127.0.0.1:5701 127.0.0.1:5676`. With SCENARIO names only
 * those run; `--list` prints the names; `-v` prints the observations of passing scenarios too.
 * The whole run takes about a minute and a half (heartbeat scenarios idle on purpose).
 *
 * Needs (Debian 12):  apt-get install -y php-cli php-amqplib amqp-tools
 *   php-cli      PHP 8.2 with the sockets, pcntl and mbstring extensions this script uses
 *   php-amqplib  3.5, autoloaded from /usr/share/php/PhpAmqpLib/autoload.php
 *                (set PHP_AMQPLIB_AUTOLOAD to use another copy, e.g. a Composer vendor/autoload.php)
 *   amqp-tools   rabbitmq-c 0.11's amqp-publish, amqp-consume, amqp-get, amqp-declare-queue,
 *                amqp-delete-queue (the amqp_tools_* scenarios; skipped when not installed)
 * Both sides log in as guest/guest on vhost "/".
 *
 * Each scenario takes a Target and returns the list of what a client observes: replies,
 * exception classes, reply codes and texts, counts, sorted bodies, exit codes. RabbitMQ's
 * answer is the expected one by construction, so any difference fails. Generated names (this
 * run's queues and exchanges, consumer tags) are replaced by labels. Lines starting with `[doc]`
 * are differences docs/semantics.md and docs/routing.md list (server-named queue names,
 * get-ok message_count, prefetch split, when a wrong password is refused, channel_max
 * wording): shown, not compared.
 *
 * Every wait is bounded: a step that does not answer in time is observed as a timeout
 * (a hang through warren is itself a finding) and a whole scenario is stopped after
 * SCENARIO_SECONDS. What a scenario declares by name is deleted afterwards on a fresh
 * connection.
 *
 * Exits 0 when every scenario observes the same both ways, 1 otherwise (with a diff).
 */

declare(strict_types=1);

$autoload = getenv('PHP_AMQPLIB_AUTOLOAD') ?: '/usr/share/php/PhpAmqpLib/autoload.php';
require_once $autoload;

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Connection\AMQPLazyConnection;
use PhpAmqpLib\Channel\AMQPChannel;
use PhpAmqpLib\Message\AMQPMessage;
use PhpAmqpLib\Wire\AMQPTable;
use PhpAmqpLib\Wire\AMQPArray;
use PhpAmqpLib\Wire\AMQPDecimal;
use PhpAmqpLib\Wire\AMQPAbstractCollection;
use PhpAmqpLib\Exception\AMQPTimeoutException;
use PhpAmqpLib\Exception\AMQPBasicCancelException;

const SCENARIO_SECONDS = 60;
const STEP = 5.0; // seconds: one bounded wait

class ScenarioTimeout extends \Exception {}

pcntl_async_signals(true);
pcntl_signal(SIGALRM, function () { throw new ScenarioTimeout('scenario timeout'); });

// ---------------------------------------------------------------------------------------------
// Targets, observations

class Target
{
    public string $host;
    public int $port;
    public array $conns = [];
    public array $queues = [];
    public array $exchanges = [];
    public array $names = []; // generated name => label
    public string $run;

    public function __construct(string $addr)
    {
        [$h, $p] = explode(':', $addr);
        $this->host = $h;
        $this->port = (int)$p;
        $this->run = bin2hex(random_bytes(4));
    }

    public function connect(array $o = []): AMQPStreamConnection
    {
        $class = $o['class'] ?? AMQPStreamConnection::class;
        $c = new $class(
            $this->host, $this->port, $o['user'] ?? 'guest', $o['password'] ?? 'guest',
            $o['vhost'] ?? '/', false, $o['login_method'] ?? 'AMQPLAIN', null, 'en_US',
            3.0, $o['rw_timeout'] ?? 10.0, null, false, $o['heartbeat'] ?? 0
        );
        $this->conns[] = $c;
        return $c;
    }

    public function q(string $label): string
    {
        $n = "php-edge-$label-{$this->run}";
        $this->queues[] = $n;
        $this->names[$n] = "Q:$label";
        return $n;
    }

    public function x(string $label): string
    {
        $n = "php-edge-$label-{$this->run}";
        $this->exchanges[] = $n;
        $this->names[$n] = "X:$label";
        return $n;
    }

    public function cleanup(): void
    {
        foreach ($this->conns as $c) {
            try { if ($c->isConnected()) { $c->close(); } } catch (\Throwable $e) {}
        }
        $this->conns = [];
        if (!$this->queues && !$this->exchanges) {
            return;
        }
        try {
            $c = $this->connect();
            foreach ($this->queues as $q) {
                $ch = $c->channel();
                try { $ch->queue_delete($q); $ch->close(); } catch (\Throwable $e) {}
            }
            foreach ($this->exchanges as $x) {
                $ch = $c->channel();
                try { $ch->exchange_delete($x); $ch->close(); } catch (\Throwable $e) {}
            }
            $c->close();
        } catch (\Throwable $e) {}
        $this->conns = [];
    }

    /** Replaces generated names in an observation. */
    public function rename(string $s): string
    {
        $s = strtr($s, $this->names);
        $s = preg_replace('/amq\.ctag-[A-Za-z0-9_\-]{22}/', '<ctag>', $s);
        $s = preg_replace('/(amq|warren)\.gen-[A-Za-z0-9_\-]{22}/', '<gen>', $s);
        return $s;
    }
}

function short_class($e): string
{
    $p = explode('\\', get_class($e));
    return end($p);
}

/** An exception as a client sees it: class, code, text. */
function err(\Throwable $e): string
{
    if ($e instanceof ScenarioTimeout) {
        throw $e;
    }
    if ($e instanceof AMQPBasicCancelException) {
        return 'AMQPBasicCancelException tag=' . $e->getConsumerTag();
    }
    return short_class($e) . ' ' . $e->getCode() . ' ' . $e->getMessage();
}

/** Runs fn, observes its result (or its exception) under label. */
function attempt(array &$obs, string $label, callable $fn): mixed
{
    try {
        $r = $fn();
        $obs[] = "$label: " . (is_null($r) ? 'ok' : show($r));
        return $r;
    } catch (ScenarioTimeout $e) {
        throw $e;
    } catch (\Throwable $e) {
        $obs[] = "$label: " . err($e);
        return null;
    }
}

function show($v): string
{
    if ($v instanceof AMQPMessage) {
        return 'msg ' . $v->getBody();
    }
    if (is_array($v)) {
        return json_encode($v, JSON_UNESCAPED_SLASHES | JSON_PRESERVE_ZERO_FRACTION);
    }
    if (is_bool($v)) {
        return $v ? 'true' : 'false';
    }
    return (string)$v;
}

/** Whole-queue message count (passive declare on a fresh channel). */
function qcount(AMQPStreamConnection $c, string $q): string
{
    $ch = $c->channel();
    try {
        [, $n, $cc] = $ch->queue_declare($q, true);
        $ch->close();
        return "messages=$n consumers=$cc";
    } catch (ScenarioTimeout $e) {
        throw $e;
    } catch (\Throwable $e) {
        return err($e);
    }
}

/** Waits (bounded) until the queue holds $want messages; returns the count seen. */
function settle(AMQPStreamConnection $c, string $q, int $want, float $secs = 5.0): int
{
    $end = microtime(true) + $secs;
    $ch = $c->channel();
    do {
        [, $n] = $ch->queue_declare($q, true);
        if ($n == $want) {
            break;
        }
        usleep(100000);
    } while (microtime(true) < $end);
    $ch->close();
    return (int)$n;
}

/** basic_get until get-empty; bodies (sorted). */
function drain(AMQPChannel $ch, string $q, bool $ack = true, int $limit = 1000): array
{
    $out = [];
    for ($i = 0; $i < $limit; $i++) {
        $m = $ch->basic_get($q, !$ack);
        if ($m === null) {
            break;
        }
        if ($ack) {
            $ch->basic_ack($m->getDeliveryTag());
        }
        $out[] = $m->getBody();
    }
    sort($out, SORT_STRING);
    return $out;
}

function publish_confirmed(AMQPStreamConnection $c, string $q, int $n, string $prefix = 'm'): void
{
    $ch = $c->channel();
    $ch->confirm_select();
    for ($i = 0; $i < $n; $i++) {
        $ch->basic_publish(new AMQPMessage("$prefix$i"), '', $q);
    }
    $ch->wait_for_pending_acks(STEP);
    $ch->close();
}

/** Pumps a channel for deliveries until $until() or $secs; true when $until() held. */
function pump(AMQPChannel $ch, callable $until, float $secs = STEP): bool
{
    $end = microtime(true) + $secs;
    while (!$until()) {
        $left = $end - microtime(true);
        if ($left <= 0) {
            return false;
        }
        try {
            $ch->wait(null, false, max(0.05, min($left, 0.5)));
        } catch (AMQPTimeoutException $e) {
        }
    }
    return true;
}

/** Every field type php-amqplib writes (rabbit field-set). */
function every_type_table(): AMQPTable
{
    $t = new AMQPTable();
    $t->set('i8', -5, AMQPAbstractCollection::T_INT_SHORTSHORT);
    $t->set('u8', 250, AMQPAbstractCollection::T_INT_SHORTSHORT_U);
    $t->set('i16', -30000, AMQPAbstractCollection::T_INT_SHORT);
    $t->set('u16', 65000, AMQPAbstractCollection::T_INT_SHORT_U);
    $t->set('i32', -2000000000, AMQPAbstractCollection::T_INT_LONG);
    $t->set('u32', 4000000000, AMQPAbstractCollection::T_INT_LONG_U);
    $t->set('i64', -9000000000000000000, AMQPAbstractCollection::T_INT_LONGLONG);
    $t->set('int_auto', 123456789012);
    // php-amqplib 3.5 writes no float fields ('f', 'd'): a PHP float becomes a long string
    $t->set('float_auto', 2.25);
    $t->set('float_small', 1.0E-7);
    $t->set('dec', new AMQPDecimal(12345, 3), AMQPAbstractCollection::T_DECIMAL);
    $t->set('ts', 1700000000, AMQPAbstractCollection::T_TIMESTAMP);
    $t->set('ts_obj', new \DateTimeImmutable('@1600000000'));
    $t->set('void', null, AMQPAbstractCollection::T_VOID);
    $t->set('yes', true, AMQPAbstractCollection::T_BOOL);
    $t->set('no', false);
    $t->set('str', 'héllo wörld');
    $t->set('empty', '');
    $t->set('bytes', "\x00\x01\xff binary", AMQPAbstractCollection::T_BYTES);
    $t->set('arr', new AMQPArray([1, 'two', 3.5, true, null, [4, 5], ['k' => 'v']]));
    $t->set('empty_arr', new AMQPArray([]));
    $t->set('nested', new AMQPTable(['a' => ['b' => ['c' => ['d' => 'deep', 'n' => 7]]], 'list' => [1, 2]]));
    $t->set('empty_table', new AMQPTable([]));
    return $t;
}

/** A decoded table, typed and deterministic. */
function typed_dump($v): string
{
    if ($v instanceof AMQPAbstractCollection) {
        $v = $v->getNativeData();
    }
    if ($v instanceof AMQPDecimal) {
        return 'dec(' . $v->getN() . 'e-' . $v->getE() . ')';
    }
    if ($v instanceof \DateTimeInterface) {
        return 'ts(' . $v->getTimestamp() . ')';
    }
    if (is_array($v)) {
        $parts = [];
        foreach ($v as $k => $x) {
            $parts[] = "$k:" . typed_dump($x);
        }
        return '{' . implode(',', $parts) . '}';
    }
    if (is_string($v)) {
        return 's(' . bin2hex($v) . ')';
    }
    return gettype($v) . '(' . var_export($v, true) . ')';
}

/** Raw application_headers of a received message: key => [type symbol, value] (one level). */
function header_types(AMQPMessage $m): array
{
    $h = $m->get_properties()['application_headers'] ?? null;
    if (!$h instanceof AMQPTable) {
        return [];
    }
    $out = [];
    foreach ($h as $k => [$type, $val]) {
        $out[] = "$k=" . AMQPAbstractCollection::getSymbolForDataType($type) . ':' . typed_dump($val);
    }
    sort($out);
    return $out;
}

// ---------------------------------------------------------------------------------------------
// php-amqplib scenarios

function stream_and_lazy_connections(Target $t): array
{
    $obs = [];
    $c = $t->connect(['login_method' => 'PLAIN']);
    $p = $c->getServerProperties();
    $caps = $p['capabilities'][1] ?? [];
    $caps = $caps instanceof AMQPAbstractCollection ? $caps->getNativeData() : $caps;
    ksort($caps);
    $obs[] = 'product=' . ($p['product'][1] ?? '?') . ' capabilities=' . implode(',', array_keys($caps));
    $ch = $c->channel();
    $q = $t->q('stream');
    attempt($obs, 'declare', fn () => array_slice($ch->queue_declare($q, false, false, false, false), 1));
    for ($i = 0; $i < 3; $i++) {
        $ch->basic_publish(new AMQPMessage("s$i"), '', $q);
    }
    $obs[] = 'settled=' . settle($c, $q, 3);
    $obs[] = 'got=' . show(drain($ch, $q));

    $lazy = $t->connect(['class' => AMQPLazyConnection::class]);
    $obs[] = 'lazy connected before channel: ' . show($lazy->isConnected());
    $lch = $lazy->channel();
    $obs[] = 'lazy connected after channel: ' . show($lazy->isConnected());
    $lch->basic_publish(new AMQPMessage('lazy'), '', $q);
    $obs[] = 'settled=' . settle($c, $q, 1);
    $m = $lch->basic_get($q, true);
    $obs[] = 'lazy get: ' . show($m);
    $lazy->close();
    $obs[] = 'lazy connected after close: ' . show($lazy->isConnected());
    // reconnect() of a stream connection, then the queue is still there
    $c->reconnect();
    $obs[] = 'after reconnect: ' . qcount($c, $q);
    $lazy2 = $t->connect(['class' => AMQPLazyConnection::class, 'password' => 'wrong']);
    try {
        $lazy2->channel();
        $obs[] = 'lazy wrong password at channel(): opened';
    } catch (ScenarioTimeout $e) {
        throw $e;
    } catch (\Throwable $e) {
        // docs/semantics.md: warren refuses a wrong password at connection.open (class 10 method 40)
        $obs[] = 'lazy wrong password at channel(): ' . short_class($e) . ' ' . $e->getCode();
        $obs[] = '[doc] lazy wrong password at channel(): ' . err($e);
    }
    return $obs;
}

function consume_wait_loop_with_timeouts(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $q = $t->q('consume');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    publish_confirmed($c, $q, 6, 'c');
    $ch->basic_qos(0, 10, false);
    $got = [];
    $tag = $ch->basic_consume($q, '', false, false, false, false, function (AMQPMessage $m) use (&$got) {
        $got[] = $m->getBody() . ($m->isRedelivered() ? '*' : '');
        $m->ack();
    });
    $obs[] = 'tag=' . $t->rename($tag) . ' consuming=' . show($ch->is_consuming());
    $obs[] = 'all delivered: ' . show(pump($ch, function () use (&$got) { return count($got) >= 6; }));
    sort($got);
    $obs[] = 'got=' . show($got);
    attempt($obs, 'wait with nothing to deliver', fn () => $ch->wait(null, false, 0.5));
    attempt($obs, 'cancel', fn () => $t->rename((string)$ch->basic_cancel($tag)));
    $obs[] = 'consuming after cancel: ' . show($ch->is_consuming());
    // own consumer tag, then a duplicate tag on the same channel (refused by the broker on a 2nd channel)
    $ch->basic_consume($q, 'mytag', false, false, false, false, fn ($m) => $m->ack());
    $ch2 = $c->channel();
    attempt($obs, 'duplicate tag on other channel', fn () => $ch2->basic_consume($q, 'mytag', false, false, false, false, fn ($m) => null));
    $ch3 = $c->channel();
    attempt($obs, 'same tag on third channel', fn () => $ch3->basic_consume($q, 'mytag', false, false, false, false, fn ($m) => null));
    foreach ([$ch, $ch2, $ch3] as $x) {
        if ($x->is_open() && isset($x->callbacks['mytag'])) {
            $x->basic_cancel('mytag');
        }
    }
    // consume() loop (php-amqplib 3.2+) stopped from the callback
    publish_confirmed($c, $q, 3, 'l');
    $ch4 = $c->channel();
    $seen = [];
    $ch4->basic_consume($q, 'loop', false, false, false, false, function (AMQPMessage $m) use (&$seen, $ch4) {
        $seen[] = $m->getBody();
        $m->ack();
        if (count($seen) >= 3) {
            $ch4->stopConsume();
        }
    });
    attempt($obs, 'consume() until stopConsume', fn () => $ch4->consume(2.0));
    sort($seen);
    $obs[] = 'loop got=' . show($seen);
    $obs[] = 'left: ' . qcount($c, $q);
    return $obs;
}

function qos_prefetch_window(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $q = $t->q('qos');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    publish_confirmed($c, $q, 12, 'p');
    attempt($obs, 'qos(0,4,false)', fn () => $ch->basic_qos(0, 4, false));
    $held = [];
    $ch->basic_consume($q, 'qos', false, false, false, false, function (AMQPMessage $m) use (&$held) {
        $held[] = $m;
    });
    pump($ch, fn () => false, 1.0);
    $obs[] = '[doc] held with prefetch 4 before any ack: ' . count($held);
    $obs[] = 'held at most 4: ' . show(count($held) <= 4);
    // ack everything as it comes: all 12 arrive
    $done = 0;
    $total = count($held);
    foreach ($held as $m) {
        $m->ack();
    }
    $ch->callbacks['qos'] = function (AMQPMessage $m) use (&$total) {
        $total++;
        $m->ack();
    };
    pump($ch, function () use (&$total) { return $total >= 12; }, STEP);
    $obs[] = 'total delivered acking: ' . $total;
    attempt($obs, 'qos prefetch_size 10', fn () => $ch->basic_qos(10, 0, false));
    $obs[] = 'left: ' . qcount($t->connect(), $q);
    return $obs;
}

function confirms_with_handlers(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $q = $t->q('confirm');
    $full = $t->q('full');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    $ch->queue_declare($full, false, false, false, false, false,
        new AMQPTable(['x-max-length' => 0, 'x-overflow' => 'reject-publish']));
    $acks = [];
    $nacks = [];
    $ch->set_ack_handler(function (AMQPMessage $m) use (&$acks) { $acks[] = $m->getBody(); });
    $ch->set_nack_handler(function (AMQPMessage $m) use (&$nacks) { $nacks[] = $m->getBody(); });
    attempt($obs, 'confirm_select', fn () => $ch->confirm_select());
    for ($i = 0; $i < 20; $i++) {
        $ch->basic_publish(new AMQPMessage(sprintf('a%02d', $i)), '', $q);
    }
    for ($i = 0; $i < 3; $i++) {
        $ch->basic_publish(new AMQPMessage("n$i"), '', $full);
    }
    attempt($obs, 'wait_for_pending_acks_returns', fn () => $ch->wait_for_pending_acks_returns(STEP));
    sort($acks);
    sort($nacks);
    $obs[] = 'acks=' . count($acks) . ' ' . show(array_slice($acks, 0, 3)) . ' nacks=' . show($nacks);
    $obs[] = 'queue: ' . qcount($c, $q) . ' full: ' . qcount($c, $full);
    // confirm_select twice is fine; tx_select on a confirm channel is 406
    attempt($obs, 'confirm_select again', fn () => $ch->confirm_select());
    attempt($obs, 'tx_select on confirm channel', fn () => $ch->tx_select());
    attempt($obs, 'publish on closed channel', fn () => $ch->basic_publish(new AMQPMessage('x'), '', $q));
    return $obs;
}

function mandatory_return_listener(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $q = $t->q('mand');
    $x = $t->x('mand-direct');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    $ch->exchange_declare($x, 'direct', false, false, false);
    $returns = [];
    $ch->set_return_listener(function ($code, $text, $exchange, $key, AMQPMessage $m) use (&$returns, $t) {
        $returns[] = $t->rename("$code $text ex=$exchange key=$key body=" . $m->getBody());
    });
    $acks = 0;
    $ch->set_ack_handler(function () use (&$acks) { $acks++; });
    $ch->confirm_select();
    $ch->basic_publish(new AMQPMessage('routable'), '', $q, true);
    $ch->basic_publish(new AMQPMessage('no-queue'), '', 'php-edge-nosuchqueue', true);
    $ch->basic_publish(new AMQPMessage('no-binding'), $x, 'k', true);
    $ch->basic_publish(new AMQPMessage('not-mandatory'), $x, 'k', false);
    attempt($obs, 'wait_for_pending_acks_returns', fn () => $ch->wait_for_pending_acks_returns(STEP));
    sort($returns);
    $obs[] = 'acks=' . $acks . ' returns=' . show($returns);
    // without confirms: returns arrive on a later wait()
    $ch2 = $c->channel();
    $r2 = [];
    $ch2->set_return_listener(function ($code, $text) use (&$r2) { $r2[] = "$code $text"; });
    $ch2->basic_publish(new AMQPMessage('plain'), $x, 'k', true);
    pump($ch2, function () use (&$r2) { return count($r2) >= 1; }, 2.0);
    $obs[] = 'plain channel returns=' . show($r2);
    $obs[] = 'queue: ' . qcount($c, $q);
    return $obs;
}

function basic_get_and_errors(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $q = $t->q('get');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    attempt($obs, 'get empty', fn () => $ch->basic_get($q) === null ? 'null' : 'message');
    publish_confirmed($c, $q, 3, 'g');
    $m = $ch->basic_get($q);
    $obs[] = '[doc] message_count after first get: ' . $m->getMessageCount();
    $obs[] = 'first redelivered=' . show($m->isRedelivered()) . ' exchange="' . $m->getExchange() . '" key=' . $t->rename($m->getRoutingKey());
    $m->nack(true);
    $bodies = [];
    $redelivered = 0;
    while (($m = $ch->basic_get($q)) !== null) {
        $bodies[] = $m->getBody();
        $redelivered += $m->isRedelivered() ? 1 : 0;
        $m->ack();
    }
    sort($bodies);
    $obs[] = 'after nack requeue: ' . show($bodies) . " redelivered=$redelivered";
    attempt($obs, 'ack unknown tag', function () use ($ch) { $ch->basic_ack(99); return $ch->basic_get('php-edge-anything'); });
    attempt($obs, 'use closed channel', fn () => $ch->basic_get($q));
    $ch2 = $c->channel();
    attempt($obs, 'get missing queue', fn () => $ch2->basic_get('php-edge-missing-queue'));
    $ch3 = $c->channel();
    attempt($obs, 'reject twice', function () use ($ch3, $c, $q) {
        publish_confirmed($c, $q, 1, 'r');
        $m = $ch3->basic_get($q);
        $m->reject(false);
        $m->reject(false);
        return $ch3->basic_get($q);
    });
    $obs[] = 'connection still up: ' . show($c->isConnected()) . ' ' . qcount($c, $q);
    return $obs;
}

function recover_redelivers(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $q = $t->q('recover');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    publish_confirmed($c, $q, 4, 'r');
    $got = [];
    $ch->basic_consume($q, 'rec', false, false, false, false, function (AMQPMessage $m) use (&$got) {
        $got[] = $m;
    });
    pump($ch, function () use (&$got) { return count($got) >= 4; });
    $obs[] = 'first round ' . count($got);
    attempt($obs, 'basic_recover(true)', fn () => $ch->basic_recover(true));
    pump($ch, function () use (&$got) { return count($got) >= 8; });
    $red = [];
    foreach (array_slice($got, 4) as $m) {
        $red[] = $m->getBody() . ($m->isRedelivered() ? '*' : '');
    }
    sort($red);
    $obs[] = 'after recover ' . show($red);
    foreach (array_slice($got, 4) as $m) {
        $m->ack();
    }
    pump($ch, fn () => false, 0.5);
    $obs[] = 'extra deliveries: ' . (count($got) - 8);
    $ch->basic_cancel('rec');
    $obs[] = qcount($c, $q);
    attempt($obs, 'basic_recover(false) (requeue=false)', fn () => $ch->basic_recover(false));
    return $obs;
}

function batch_publish(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $q = $t->q('batch');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    for ($i = 0; $i < 50; $i++) {
        $ch->batch_basic_publish(new AMQPMessage(sprintf('b%02d', $i), ['delivery_mode' => 2]), '', $q);
    }
    attempt($obs, 'publish_batch', fn () => $ch->publish_batch());
    $obs[] = 'settled=' . settle($c, $q, 50);
    $b = drain($ch, $q);
    $obs[] = 'got ' . count($b) . ' first=' . ($b[0] ?? '') . ' last=' . end($b);
    // a batch with a missing exchange in the middle: the channel closes there
    $ch2 = $c->channel();
    $ch2->batch_basic_publish(new AMQPMessage('before'), '', $q);
    $ch2->batch_basic_publish(new AMQPMessage('bad'), 'php-edge-missing-ex', 'k');
    $ch2->batch_basic_publish(new AMQPMessage('after'), '', $q);
    $ch2->publish_batch();
    attempt($obs, 'next sync call', fn () => $ch2->queue_declare($q, true)[1]);
    $ch3 = $c->channel();
    usleep(300000);
    $obs[] = 'delivered around the refused one: ' . show(drain($ch3, $q));
    return $obs;
}

function transactions(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $q = $t->q('tx');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    attempt($obs, 'tx_select', fn () => $ch->tx_select());
    $ch->basic_publish(new AMQPMessage('rolled'), '', $q);
    attempt($obs, 'tx_rollback', fn () => $ch->tx_rollback());
    $obs[] = 'after rollback: ' . qcount($c, $q);
    $ch->basic_publish(new AMQPMessage('t1'), '', $q);
    $ch->basic_publish(new AMQPMessage('t2'), '', $q);
    $obs[] = 'before commit: ' . qcount($c, $q);
    attempt($obs, 'tx_commit', fn () => $ch->tx_commit());
    $obs[] = 'after commit: ' . qcount($c, $q);
    $m = $ch->basic_get($q);
    $m->ack();
    attempt($obs, 'rollback the ack', fn () => $ch->tx_rollback());
    $obs[] = 'after ack rollback: ' . qcount($c, $q);
    attempt($obs, 'confirm_select on tx channel', fn () => $ch->confirm_select());
    $ch2 = $c->channel();
    attempt($obs, 'commit without select', fn () => $ch2->tx_commit());
    $ch3 = $c->channel();
    $ch3->tx_select();
    $ch3->basic_publish(new AMQPMessage('x'), 'php-edge-missing-ex', 'k');
    attempt($obs, 'commit after publish to missing exchange', fn () => $ch3->tx_commit());
    $obs[] = 'end: ' . qcount($c, $q);
    return $obs;
}

function queue_declare_flags_and_arguments(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $ch = $c->channel();
    attempt($obs, 'passive missing', fn () => $ch->queue_declare($t->q('nope'), true));
    $ch = $c->channel();
    $ex = $t->q('exclusive');
    attempt($obs, 'exclusive declare', fn () => array_slice($ch->queue_declare($ex, false, false, true, false), 1));
    $other = $t->connect();
    $och = $other->channel();
    attempt($obs, 'exclusive from other connection', fn () => $och->queue_declare($ex, false, false, true, false));
    $och = $other->channel();
    attempt($obs, 'passive exclusive from other connection', fn () => $och->queue_declare($ex, true));
    $och = $other->channel();
    attempt($obs, 'consume exclusive from other connection', fn () => $och->basic_consume($ex, '', false, true));
    // auto_delete: deleted after its last consumer is cancelled
    $ad = $t->q('autodel');
    $ch->queue_declare($ad, false, false, false, true);
    $tag = $ch->basic_consume($ad, '', false, true, false, false, fn ($m) => null);
    $ch->basic_cancel($tag);
    usleep(300000);
    $obs[] = 'auto_delete after cancel: ' . qcount($other, $ad);
    // arguments with every type, then an equal redeclare and a conflicting one
    $aq = $t->q('args');
    $args = new AMQPTable([
        'x-message-ttl' => 60000,
        'x-expires' => 600000,
        'x-max-priority' => 5,
        'x-dead-letter-exchange' => '',
        'x-dead-letter-routing-key' => 'dlk',
        'x-queue-mode' => 'lazy',
    ]);
    $all = every_type_table();
    foreach ($all as $k => [$type, $val]) {
        $args->set("x-custom-$k", $val instanceof AMQPAbstractCollection ? $val : ($type == AMQPAbstractCollection::T_TIMESTAMP ? (is_int($val) ? $val : $val) : $val), $type);
    }
    attempt($obs, 'declare with every type', fn () => array_slice($ch->queue_declare($aq, false, false, false, false, false, $args), 1));
    attempt($obs, 'redeclare same', fn () => array_slice($ch->queue_declare($aq, false, false, false, false, false, $args), 1));
    attempt($obs, 'redeclare other ttl', fn () => $ch->queue_declare($aq, false, false, false, false, false, new AMQPTable(['x-message-ttl' => 1000])));
    $ch = $c->channel();
    attempt($obs, 'redeclare durable', fn () => $ch->queue_declare($aq, false, true, false, false, false, $args));
    $ch = $c->channel();
    attempt($obs, 'ttl as string', fn () => $ch->queue_declare($t->q('badttl'), false, false, false, false, false, new AMQPTable(['x-message-ttl' => 'soon'])));
    $ch = $c->channel();
    attempt($obs, 'ttl as float', fn () => $ch->queue_declare($t->q('floatttl'), false, false, false, false, false, new AMQPTable(['x-message-ttl' => 1.5])));
    $ch = $c->channel();
    attempt($obs, 'ttl as decimal', fn () => $ch->queue_declare($t->q('decttl'), false, false, false, false, false, new AMQPTable(['x-message-ttl' => new AMQPDecimal(15, 1)])));
    $ch = $c->channel();
    attempt($obs, 'max-priority 300', fn () => $ch->queue_declare($t->q('prio300'), false, false, false, false, false, new AMQPTable(['x-max-priority' => 300])));
    $ch = $c->channel();
    attempt($obs, 'unknown queue type', fn () => $ch->queue_declare($t->q('qtype'), false, false, false, false, false, new AMQPTable(['x-queue-type' => 'fancy'])));
    $ch = $c->channel();
    attempt($obs, 'quorum non-durable', fn () => $ch->queue_declare($t->q('qnd'), false, false, false, false, false, new AMQPTable(['x-queue-type' => 'quorum'])));
    $ch = $c->channel();
    [$sn] = $ch->queue_declare('', false, false, true, true);
    $obs[] = '[doc] server-named: ' . $t->rename($sn);
    $obs[] = 'server-named prefix reserved: ' . show(str_starts_with($sn, 'amq.gen-') || str_starts_with($sn, 'warren.gen-'));
    attempt($obs, 'nowait declare then passive', function () use ($ch, $t) {
        $ch->queue_declare($q = $t->q('nowait'), false, false, false, false, true);
        return array_slice($ch->queue_declare($q, true), 1);
    });
    return $obs;
}

function headers_every_type_round_trip(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $q = $t->q('headers');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    $props = [
        'content_type' => 'application/json',
        'content_encoding' => 'utf-8',
        'application_headers' => every_type_table(),
        'delivery_mode' => AMQPMessage::DELIVERY_MODE_PERSISTENT,
        'priority' => 7,
        'correlation_id' => 'corr-1',
        'reply_to' => 'somewhere',
        'expiration' => '600000',
        'message_id' => 'mid-1',
        'timestamp' => 1700000001,
        'type' => 'my.type',
        'user_id' => 'guest',
        'app_id' => 'php-edge',
    ];
    $ch->confirm_select();
    $ch->basic_publish(new AMQPMessage('{"k":1}', $props), '', $q);
    $ch->wait_for_pending_acks(STEP);
    $m = null;
    pump($ch, function () use (&$m, $ch, $q) { return ($m = $ch->basic_get($q, true)) !== null; }, STEP);
    if (!$m) {
        return ['no message'];
    }
    $p = $m->get_properties();
    ksort($p);
    foreach ($p as $k => $v) {
        if ($k === 'application_headers') {
            continue;
        }
        $obs[] = "prop $k=" . typed_dump($v);
    }
    foreach (header_types($m) as $h) {
        $obs[] = "header $h";
    }
    // a header table the broker itself must read (headers exchange, x-match all with typed values)
    $x = $t->x('hdrs');
    $hq = $t->q('hdrs-q');
    $ch->exchange_declare($x, 'headers', false, false, false);
    $ch->queue_declare($hq, false, false, false, false);
    $ch->queue_bind($hq, $x, '', false, new AMQPTable(['x-match' => 'all', 'n' => 5, 'flag' => true, 's' => 'v']));
    $send = function (array $h, string $body) use ($ch, $x) {
        $ch->basic_publish(new AMQPMessage($body, ['application_headers' => new AMQPTable($h)]), $x, '');
    };
    $send(['n' => 5, 'flag' => true, 's' => 'v'], 'match');
    $send(['n' => 5, 'flag' => true, 's' => 'v', 'extra' => [1, 2]], 'match-extra');
    $send(['n' => 6, 'flag' => true, 's' => 'v'], 'n-differs');
    $send(['n' => 5, 'flag' => false, 's' => 'v'], 'flag-differs');
    $ch->wait_for_pending_acks(STEP);
    usleep(200000);
    $obs[] = 'headers exchange routed: ' . show(drain($ch, $hq));
    return $obs;
}

function exchange_bind_chain(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $ch = $c->channel();
    $src = $t->x('src');
    $dst = $t->x('dst');
    $q = $t->q('e2e');
    $ch->exchange_declare($src, 'topic', false, false, false);
    $ch->exchange_declare($dst, 'fanout', false, false, false);
    $ch->queue_declare($q, false, false, false, false);
    $ch->queue_bind($q, $dst);
    attempt($obs, 'exchange_bind', fn () => $ch->exchange_bind($dst, $src, 'a.*'));
    $ch->confirm_select();
    foreach (['a.x', 'a.y', 'b.x', 'a.x.y'] as $k) {
        $ch->basic_publish(new AMQPMessage("via-$k"), $src, $k);
    }
    $ch->wait_for_pending_acks(STEP);
    usleep(200000);
    $obs[] = 'routed: ' . show(drain($ch, $q));
    attempt($obs, 'exchange_unbind', fn () => $ch->exchange_unbind($dst, $src, 'a.*'));
    $ch->basic_publish(new AMQPMessage('after-unbind'), $src, 'a.x');
    $ch->wait_for_pending_acks(STEP);
    usleep(200000);
    $obs[] = 'after unbind: ' . qcount($c, $q);
    attempt($obs, 'bind to missing source', fn () => $ch->exchange_bind($dst, 'php-edge-missing-src', 'k'));
    $ch = $c->channel();
    attempt($obs, 'exchange_delete if_unused of bound source', function () use ($ch, $src, $dst) {
        $ch->exchange_bind($dst, $src, 'z');
        return $ch->exchange_delete($src, true);
    });
    $ch = $c->channel();
    attempt($obs, 'redeclare as other type', fn () => $ch->exchange_declare($src, 'direct', false, false, false));
    $ch = $c->channel();
    attempt($obs, 'passive missing exchange', fn () => $ch->exchange_declare('php-edge-missing-x', 'direct', true));
    $ch = $c->channel();
    attempt($obs, 'internal exchange publish', function () use ($ch, $t) {
        $ch->exchange_declare($ix = $t->x('internal'), 'fanout', false, false, false, true);
        $ch->basic_publish(new AMQPMessage('x'), $ix, '');
        return $ch->queue_declare('', false, false, true, true) ? 'declared' : '';
    });
    return $obs;
}

function delayed_retry_dlx_ttl(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $ch = $c->channel();
    $work = $t->q('work');
    $retry = $t->q('retry');
    $wx = $t->x('work-x');
    $rx = $t->x('retry-x');
    $ch->exchange_declare($wx, 'direct', false, false, false);
    $ch->exchange_declare($rx, 'direct', false, false, false);
    $ch->queue_declare($work, false, false, false, false, false, new AMQPTable([
        'x-dead-letter-exchange' => $rx, 'x-dead-letter-routing-key' => 'retry']));
    $ch->queue_declare($retry, false, false, false, false, false, new AMQPTable([
        'x-message-ttl' => 300, 'x-dead-letter-exchange' => $wx, 'x-dead-letter-routing-key' => 'work']));
    $ch->queue_bind($work, $wx, 'work');
    $ch->queue_bind($retry, $rx, 'retry');
    publish_confirmed($c, $work, 3, 'job');
    $attempts = [];
    $ch->basic_qos(0, 10, false);
    $ch->basic_consume($work, 'worker', false, false, false, false, function (AMQPMessage $m) use (&$attempts, $t) {
        $h = $m->has('application_headers') ? $m->get('application_headers')->getNativeData() : [];
        $deaths = [];
        foreach ($h['x-death'] ?? [] as $d) {
            $deaths[] = $t->rename("{$d['queue']}:{$d['reason']}:{$d['count']}");
        }
        sort($deaths);
        $attempts[] = $m->getBody() . ' ' . implode('|', $deaths);
        if (count($h['x-death'] ?? []) === 0 || $h['x-death'][0]['count'] < 2) {
            $m->nack(false); // to the retry queue, back after the TTL
        } else {
            $m->ack();
        }
    });
    pump($ch, function () use (&$attempts) { return count($attempts) >= 9; }, 8.0);
    sort($attempts);
    foreach ($attempts as $a) {
        $obs[] = "attempt $a";
    }
    $obs[] = 'work ' . qcount($c, $work) . ' retry ' . qcount($c, $retry);
    return $obs;
}

function channel_and_protocol_exceptions(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $ch = $c->channel();
    attempt($obs, 'declare amq.x queue', fn () => $ch->queue_declare('amq.php-edge'));
    $obs[] = 'channel open after error: ' . show($ch->is_open());
    attempt($obs, 'reuse closed channel', fn () => $ch->queue_declare('php-edge-x'));
    $ch = $c->channel();
    attempt($obs, 'publish to missing exchange then sync call', function () use ($ch) {
        $ch->basic_publish(new AMQPMessage('x'), 'php-edge-missing', 'k');
        return $ch->queue_declare('', false, false, true, true) ? 'declared' : '';
    });
    $ch = $c->channel();
    attempt($obs, 'bind missing queue', fn () => $ch->queue_bind('php-edge-missing-q', 'amq.direct', 'k'));
    $ch = $c->channel();
    attempt($obs, 'delete amq.direct', fn () => $ch->exchange_delete('amq.direct'));
    $ch = $c->channel();
    attempt($obs, 'declare exchange unknown type', fn () => $ch->exchange_declare($t->x('badtype'), 'nosuch', false, false, false));
    $ch = $c->channel();
    attempt($obs, 'queue_delete if_empty with messages', function () use ($ch, $c, $t) {
        $ch->queue_declare($q = $t->q('ifempty'), false, false, false, false);
        publish_confirmed($c, $q, 2, 'e');
        return $ch->queue_delete($q, false, true);
    });
    $ch = $c->channel();
    attempt($obs, 'queue_delete missing', fn () => $ch->queue_delete($t->q('never')));
    attempt($obs, 'queue_purge missing', fn () => $ch->queue_purge($t->q('never')));
    $ch = $c->channel();
    attempt($obs, 'channel close with custom code', fn () => $ch->close(200, 'bye'));
    attempt($obs, 'connection still up', fn () => $c->isConnected());
    attempt($obs, 'qos with prefetch_size (connection error)', fn () => $c->channel()->basic_qos(1000, 0, false));
    $obs[] = 'connected after 540: ' . show($c->isConnected());
    return $obs;
}

function connection_refusals(Target $t): array
{
    $obs = [];
    foreach ([
        'wrong password' => ['password' => 'nope'],
        'wrong password PLAIN' => ['password' => 'nope', 'login_method' => 'PLAIN'],
        'unknown user' => ['user' => 'php-edge-nobody'],
        'missing vhost' => ['vhost' => 'php-edge-no-vhost'],
    ] as $label => $o) {
        $e = null;
        try {
            $c = $t->connect($o);
            $obs[] = "$label: connected " . show($c->isConnected());
            continue;
        } catch (ScenarioTimeout $x) {
            throw $x;
        } catch (\Throwable $x) {
            $e = $x;
        }
        $line = "$label: " . err($e);
        if (str_contains($label, 'password') || str_contains($label, 'user')) {
            // docs/semantics.md: a wrong password is refused after tune, at connection.open
            $obs[] = "[doc] $line";
            $obs[] = "$label: refused with " . (str_contains($e->getMessage(), 'ACCESS_REFUSED') ? 'ACCESS_REFUSED' : 'something else');
        } else {
            $obs[] = $line;
        }
    }
    return $obs;
}

class TunedConnection extends AMQPStreamConnection
{
    public static int $channelMax = 0;
    public static int $frameMax = 0;
    public array $serverTune = [];

    protected function connection_tune($args)
    {
        $cm = $args->read_short();
        $fm = $args->read_long();
        $hb = $args->read_short();
        $this->serverTune = [$cm, $fm, $hb];
        $this->channel_max = self::$channelMax ?: $cm;
        $this->frame_max = self::$frameMax ?: $fm;
        if ($this->heartbeat > 0 && $hb > 0) {
            $this->heartbeat = min($this->heartbeat, $hb);
        }
        $this->x_tune_ok($this->channel_max, $this->frame_max, $this->heartbeat);
        $this->io->afterTune($this->heartbeat);
    }
}

function channel_max_and_frame_max(Target $t): array
{
    $obs = [];
    $q = $t->q('tune');
    TunedConnection::$channelMax = 3;
    TunedConnection::$frameMax = 4096;
    $c = $t->connect(['class' => TunedConnection::class]);
    $obs[] = 'server tune channel_max,frame_max=' . show(array_slice($c->serverTune, 0, 2)) . ' heartbeat offered=' . show($c->serverTune[2] > 0);
    $chs = [];
    for ($i = 1; $i <= 3; $i++) {
        $chs[$i] = attempt($obs, "open channel $i", fn () => $c->channel($i) ? 'open' : '');
    }
    $ch = $c->channel(1);
    $ch->queue_declare($q, false, false, false, false);
    $body = str_repeat('0123456789abcdef', 6400) . 'end'; // 102403 bytes in 4088-byte frames
    $ch->confirm_select();
    $ch->basic_publish(new AMQPMessage($body), '', $q);
    attempt($obs, 'confirm of a 100 KB body in 4 KiB frames', fn () => $ch->wait_for_pending_acks(STEP));
    $m = null;
    pump($ch, function () use (&$m, $ch, $q) { return ($m = $ch->basic_get($q, true)) !== null; }, STEP);
    $obs[] = 'body back: ' . ($m ? strlen($m->getBody()) . ' ' . md5($m->getBody()) : 'none') . ' same=' . show($m && $m->getBody() === $body);
    $c->channel(2)->close();
    attempt($obs, 'reopen channel 2', fn () => $c->channel(2) ? 'open' : '');
    try {
        $c->channel(4);
        $obs[] = 'channel 4 of channel_max 3: opened';
    } catch (ScenarioTimeout $e) {
        throw $e;
    } catch (\Throwable $e) {
        $obs[] = 'channel 4 of channel_max 3: ' . short_class($e) . ' ' . $e->getCode();
        $obs[] = '[doc] ' . err($e);
    }
    TunedConnection::$channelMax = 0;
    TunedConnection::$frameMax = 0;
    return $obs;
}

function large_bodies(Target $t): array
{
    $obs = [];
    $c = $t->connect(['rw_timeout' => 20.0]);
    $q = $t->q('large');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    $ch->confirm_select();
    $acked = 0;
    $ch->set_ack_handler(function () use (&$acked) { $acked++; });
    $bodies = [];
    foreach ([1 << 20, 8 << 20] as $size) {
        $b = substr(str_repeat(hash('sha256', (string)$size), intdiv($size, 64) + 1), 0, $size);
        $bodies[] = $b;
        $ch->basic_publish(new AMQPMessage($b, ['content_type' => 'application/octet-stream']), '', $q);
    }
    attempt($obs, 'confirms', fn () => $ch->wait_for_pending_acks(15.0));
    $obs[] = "acked=$acked";
    $got = [];
    for ($i = 0; $i < 2; $i++) {
        $m = $ch->basic_get($q, true);
        if ($m) {
            $got[] = strlen($m->getBody()) . ':' . md5($m->getBody());
        }
    }
    sort($got);
    $want = array_map(fn ($b) => strlen($b) . ':' . md5($b), $bodies);
    sort($want);
    $obs[] = 'got=' . show($got) . ' intact=' . show($got === $want);
    // consumed rather than fetched
    $ch->basic_publish(new AMQPMessage($bodies[1]), '', $q);
    $ch->wait_for_pending_acks(15.0);
    $seen = [];
    $ch->basic_consume($q, 'big', false, true, false, false, function (AMQPMessage $m) use (&$seen) {
        $seen[] = strlen($m->getBody()) . ':' . md5($m->getBody());
    });
    pump($ch, function () use (&$seen) { return count($seen) >= 1; }, 15.0);
    $obs[] = 'consumed=' . show($seen);
    return $obs;
}

function heartbeats(Target $t): array
{
    $obs = [];
    $c = $t->connect(['heartbeat' => 2, 'rw_timeout' => 5.0]);
    $obs[] = 'negotiated heartbeat=' . $c->getHeartbeat();
    $q = $t->q('hb');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    $end = microtime(true) + 6.5;
    $err = 'none';
    while (microtime(true) < $end) {
        try {
            $c->checkHeartBeat();
            $ch->wait(null, false, 0.5);
        } catch (AMQPTimeoutException $e) {
        } catch (ScenarioTimeout $e) {
            throw $e;
        } catch (\Throwable $e) {
            $err = err($e);
            break;
        }
    }
    $obs[] = 'while pumping with check_heartbeat: ' . $err;
    attempt($obs, 'usable after idle', fn () => array_slice($ch->queue_declare($q, true), 1));
    // idle without reading for 3 intervals: the peer drops us (or not) as it would
    $c2 = $t->connect(['heartbeat' => 1, 'rw_timeout' => 3.0]);
    $ch2 = $c2->channel();
    sleep(4);
    attempt($obs, 'after 4 s silent with heartbeat 1', function () use ($ch2, $q) {
        return array_slice($ch2->queue_declare($q, true), 1);
    });
    return $obs;
}

function consumer_cancel_notification(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $q = $t->q('cancelme');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    publish_confirmed($c, $q, 2, 'k');
    $got = [];
    $ch->basic_consume($q, 'victim', false, false, false, false, function (AMQPMessage $m) use (&$got) {
        $got[] = $m->getBody();
        $m->ack();
    });
    pump($ch, function () use (&$got) { return count($got) >= 2; });
    $other = $t->connect();
    $och = $other->channel();
    attempt($obs, 'delete from other connection', fn () => $och->queue_delete($q));
    $seen = 'nothing';
    try {
        $ch->wait(null, false, STEP);
    } catch (ScenarioTimeout $e) {
        throw $e;
    } catch (\Throwable $e) {
        $seen = err($e);
    }
    $obs[] = 'consumer saw: ' . $seen;
    $obs[] = 'channel open: ' . show($ch->is_open()) . ' got=' . count($got);
    attempt($obs, 'declare again and consume', function () use ($ch, $q) {
        $ch->queue_declare($q, false, false, false, false);
        unset($ch->callbacks['victim']);
        return $ch->basic_consume($q, 'victim', false, true, false, false, fn ($m) => null);
    });
    attempt($obs, 'cancel after cancel-by-broker', fn () => $ch->basic_cancel('victim'));
    attempt($obs, 'cancel unknown tag', fn () => $ch->basic_cancel('never-was'));
    $obs[] = qcount($c, $q);
    return $obs;
}

function multiple_acks_and_requeue(Target $t): array
{
    $obs = [];
    $c = $t->connect();
    $q = $t->q('multi');
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    publish_confirmed($c, $q, 12, 'm');
    $got = [];
    $ch->basic_consume($q, 'multi', false, false, false, false, function (AMQPMessage $m) use (&$got) { $got[] = $m; });
    pump($ch, function () use (&$got) { return count($got) >= 12; });
    $obs[] = 'delivered ' . count($got);
    $tags = array_map(fn ($m) => $m->getDeliveryTag(), $got);
    $obs[] = 'tags 1..12 in order: ' . show($tags === range(1, 12));
    // ack the 6th with multiple: 1..6 gone; nack the 9th with multiple+requeue: 7..9 back
    $got[5]->ack(true);
    $got[8]->nack(true, true);
    $re = [];
    $ch->callbacks['multi'] = function (AMQPMessage $m) use (&$re) { $re[] = $m; };
    pump($ch, function () use (&$re) { return count($re) >= 3; });
    $b = array_map(fn ($m) => $m->getBody() . ($m->isRedelivered() ? '*' : ''), $re);
    sort($b);
    $want = array_map(fn ($m) => $m->getBody() . '*', array_slice($got, 6, 3));
    sort($want);
    $obs[] = 'redelivered after nack multiple are deliveries 7..9: ' . show($b === $want) . ' count=' . count($b);
    // reject the 10th without requeue, ack 11 and 12 and the redelivered ones one by one
    $got[9]->reject(false);
    $got[10]->ack();
    $got[11]->ack();
    foreach ($re as $m) {
        $m->ack();
    }
    pump($ch, fn () => false, 0.3);
    $ch->basic_cancel('multi');
    $obs[] = 'after: ' . qcount($c, $q);
    // unacked deliveries go back when their channel closes
    publish_confirmed($c, $q, 3, 'u');
    $ch2 = $c->channel();
    $held = [];
    $ch2->basic_consume($q, 'held', false, false, false, false, function (AMQPMessage $m) use (&$held) { $held[] = $m; });
    pump($ch2, function () use (&$held) { return count($held) >= 3; });
    $ch2->close();
    $obs[] = 'after closing channel with 3 unacked: ' . qcount($c, $q);
    // an ack on the wrong channel
    $ch3 = $c->channel();
    $ch4 = $c->channel();
    $m = null;
    pump($ch3, function () use (&$m, $ch3, $q) { return ($m = $ch3->basic_get($q)) !== null; });
    attempt($obs, 'ack on another channel', function () use ($ch4, $m) {
        $ch4->basic_ack($m->getDeliveryTag());
        return $ch4->queue_declare('', false, false, true, true) ? 'declared' : '';
    });
    attempt($obs, 'ack multiple of tag 1 on the right channel', function () use ($ch3, $m) {
        $ch3->basic_ack($m->getDeliveryTag(), true);
        return $ch3->basic_get('', true) === null ? 'null' : 'msg';
    });
    $obs[] = 'end: ' . qcount($c, $q);
    return $obs;
}

function protocol_corners(Target $t): array
{
    $obs = [];
    $q = $t->q('corners');
    // connection.open with insist, another locale
    $c = new AMQPStreamConnection($t->host, $t->port, 'guest', 'guest', '/', true, 'AMQPLAIN', null, 'de_DE');
    $t->conns[] = $c;
    $obs[] = 'insist + de_DE connected: ' . show($c->isConnected());
    $ch = $c->channel();
    // access.request (class 30, deprecated, still answered by RabbitMQ 3.10)
    attempt($obs, 'access_request', fn () => $ch->access_request('/data', false, false, true, true, true));
    $ch = $c->channel();
    $ch->queue_declare($q, false, false, false, false);
    attempt($obs, 'basic_qos global', fn () => $ch->basic_qos(0, 5, true));
    // empty body, body with NULs, long routing key via default exchange
    $ch->confirm_select();
    $ch->basic_publish(new AMQPMessage(''), '', $q);
    $ch->basic_publish(new AMQPMessage("a\0b\0"), '', $q);
    attempt($obs, 'confirms', fn () => $ch->wait_for_pending_acks(STEP));
    $got = [];
    while (($m = $ch->basic_get($q, true)) !== null) {
        $got[] = bin2hex($m->getBody()) . '/' . $m->getBodySize();
    }
    sort($got);
    $obs[] = 'bodies=' . show($got);
    // consumer arguments (x-priority) and no_local
    $ch2 = $c->channel();
    attempt($obs, 'consume x-priority', fn () => $ch2->basic_consume($q, 'prio', false, true, false, false, fn ($m) => null, null, new AMQPTable(['x-priority' => 10])));
    attempt($obs, 'consume no_local', fn () => $ch2->basic_consume($q, 'nolocal', true, true, false, false, fn ($m) => null));
    attempt($obs, 'consumer count', fn () => $ch2->queue_declare($q, true)[2]);
    attempt($obs, 'consume x-priority as string', fn () => $ch2->basic_consume($q, 'prio2', false, true, false, false, fn ($m) => null, null, new AMQPTable(['x-priority' => 'high'])));
    $ch3 = $c->channel();
    attempt($obs, 'cancel nowait', fn () => $ch3->basic_cancel('nothing-here', true));
    attempt($obs, 'queue_unbind of a binding that is not there', fn () => $ch3->queue_unbind($q, 'amq.direct', 'none'));
    attempt($obs, 'queue_bind with arguments', fn () => $ch3->queue_bind($q, 'amq.headers', '', false, new AMQPTable(['x-match' => 'any', 'a' => 1])));
    attempt($obs, 'queue_bind x-match bogus', fn () => $ch3->queue_bind($q, 'amq.headers', '', false, new AMQPTable(['x-match' => 'some'])));
    $ch4 = $c->channel();
    attempt($obs, 'flow(true)', fn () => $ch4->flow(true));
    attempt($obs, 'flow(false)', fn () => $ch4->flow(false));
    $c2 = $t->connect();
    $ch5 = $c2->channel();
    attempt($obs, 'publish immediate', function () use ($ch5, $q) {
        $ch5->basic_publish(new AMQPMessage('imm'), '', $q, false, true);
        return $ch5->queue_declare($q, true)[1];
    });
    $obs[] = 'connected after immediate: ' . show($c2->isConnected());
    $c3 = $t->connect();
    $ch6 = $c3->channel();
    attempt($obs, 'publish expiration "abc"', function () use ($ch6, $q) {
        $ch6->basic_publish(new AMQPMessage('exp', ['expiration' => 'abc']), '', $q);
        return $ch6->queue_declare($q, true)[1];
    });
    $ch7 = $c3->channel();
    attempt($obs, 'publish user_id other', function () use ($ch7, $q) {
        $ch7->basic_publish(new AMQPMessage('uid', ['user_id' => 'someone']), '', $q);
        return $ch7->queue_declare($q, true)[1];
    });
    $ch8 = $c3->channel();
    attempt($obs, 'publish routing key to missing queue then get', function () use ($ch8, $q) {
        $ch8->basic_publish(new AMQPMessage('lost'), '', 'php-edge-no-such-queue');
        return $ch8->queue_declare($q, true)[1];
    });
    return $obs;
}

// ---------------------------------------------------------------------------------------------
// amqp-tools (rabbitmq-c)

/** Runs a command (bounded by timeout(1)); returns [exit code, stdout, stderr]. */
function sh(string $cmd, string $stdin = '', int $secs = 15): array
{
    $p = proc_open("timeout $secs $cmd", [0 => ['pipe', 'r'], 1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes);
    fwrite($pipes[0], $stdin);
    fclose($pipes[0]);
    $out = stream_get_contents($pipes[1]);
    $err = stream_get_contents($pipes[2]);
    fclose($pipes[1]);
    fclose($pipes[2]);
    return [proc_close($p), $out, $err];
}

function tool(Target $t, string $name, string $args, array $o = []): string
{
    $conn = "--server={$t->host} --port={$t->port} --username=" . escapeshellarg($o['user'] ?? 'guest')
        . ' --password=' . escapeshellarg($o['password'] ?? 'guest')
        . ' --vhost=' . escapeshellarg($o['vhost'] ?? '/');
    return "$name $conn $args";
}

/** A shell script running $body, for amqp-consume to run per message. */
function sink_script(string $body): string
{
    $f = tempnam('/tmp', 'php-edge-sink');
    file_put_contents($f, "#!/bin/sh\n$body\n");
    chmod($f, 0700);
    return $f;
}

function tools_available(): bool
{
    foreach (['amqp-publish', 'amqp-consume', 'amqp-get', 'amqp-declare-queue', 'amqp-delete-queue'] as $tool) {
        if (trim((string)shell_exec('command -v ' . $tool)) === '') {
            return false;
        }
    }
    return true;
}

function amqp_tools_publish_consume(Target $t): array
{
    if (!tools_available()) {
        return ['amqp-tools not installed'];
    }
    $obs = [];
    $q = $t->q('tools');
    [$rc, $out, $err] = sh(tool($t, 'amqp-declare-queue', '-d -q ' . escapeshellarg($q)));
    $obs[] = "declare-queue -d: rc=$rc out=" . $t->rename(trim($out)) . ' err=' . trim($err);
    [$rc, $out] = sh(tool($t, 'amqp-declare-queue', '-d -q ' . escapeshellarg($q)));
    $obs[] = "declare-queue again: rc=$rc out=" . $t->rename(trim($out));
    $rcs = [];
    for ($i = 0; $i < 8; $i++) {
        [$rc] = sh(tool($t, 'amqp-publish', "-r " . escapeshellarg($q) . " -p -C text/plain -H 'x-n: $i' -b body$i"));
        $rcs[] = $rc;
    }
    $obs[] = 'publish x8 rcs=' . implode(',', array_unique($rcs));
    [$rc, , $err] = sh(tool($t, 'amqp-publish', '-l -r ' . escapeshellarg($q)), "line-a\nline-b\nline-c\n");
    $obs[] = "publish -l rc=$rc err=" . trim($err);
    $c = $t->connect();
    $obs[] = 'settled=' . settle($c, $q, 11);
    // amqp-consume runs a command per message with the body on its stdin (popt would read the
    // options of `sh -c`, so the command is a script of its own)
    $file = tempnam('/tmp', 'php-edge-consume');
    $sink = sink_script("cat >> $file; echo >> $file");
    [$rc, , $err] = sh(tool($t, 'amqp-consume', '-q ' . escapeshellarg($q) . " -c 11 -p 3 $sink"));
    $lines = array_values(array_filter(explode("\n", (string)file_get_contents($file)), 'strlen'));
    sort($lines);
    $obs[] = "consume -c 11 rc=$rc err=" . trim($err) . ' got=' . show($lines);
    $obs[] = 'after consume: ' . qcount($c, $q);
    // amqp-get: one message, then an empty queue
    sh(tool($t, 'amqp-publish', '-r ' . escapeshellarg($q) . ' -b single'));
    settle($c, $q, 1);
    [$rc, $out, $err] = sh(tool($t, 'amqp-get', '-q ' . escapeshellarg($q)));
    $obs[] = "get rc=$rc out=" . trim($out) . ' err=' . trim($err);
    [$rc, $out, $err] = sh(tool($t, 'amqp-get', '-q ' . escapeshellarg($q)));
    $obs[] = "get empty rc=$rc out=" . trim($out) . ' err=' . trim($err);
    // a command that fails: amqp-consume acks anyway; -c more than there are: still waiting
    sh(tool($t, 'amqp-publish', '-r ' . escapeshellarg($q) . ' -b fails'));
    settle($c, $q, 1);
    $fail = sink_script('cat > /dev/null; exit 3');
    [$rc, , $err] = sh(tool($t, 'amqp-consume', '-q ' . escapeshellarg($q) . " -c 2 $fail"), '', 3);
    $obs[] = "consume -c 2 of 1, failing command (bounded 3 s) rc=$rc err=" . trim($err);
    $obs[] = 'after: ' . qcount($c, $q);
    // -A (no-ack) -c 3 of 5
    for ($i = 0; $i < 5; $i++) {
        sh(tool($t, 'amqp-publish', '-r ' . escapeshellarg($q) . " -b na$i"));
    }
    settle($c, $q, 5);
    file_put_contents($file, '');
    [$rc, , $err] = sh(tool($t, 'amqp-consume', '-A -q ' . escapeshellarg($q) . " -c 3 $sink"));
    $lines = array_values(array_filter(explode("\n", (string)file_get_contents($file)), 'strlen'));
    $obs[] = "consume -A -c 3 of 5 rc=$rc got " . count($lines) . ' left ' . qcount($c, $q);
    // an exclusive server-named queue bound to amq.fanout (-e), one published message
    $file2 = tempnam('/tmp', 'php-edge-consume');
    $sink2 = sink_script("cat > $file2");
    $p = proc_open('timeout 8 ' . tool($t, 'amqp-consume', "-e amq.fanout -r any -c 1 $sink2"), [], $pipes);
    usleep(1500000);
    sh(tool($t, 'amqp-publish', '-e amq.fanout -b fanned'));
    $rc = proc_close($p);
    $obs[] = "consume -e amq.fanout rc=$rc got=" . trim((string)file_get_contents($file2));
    // an 8 MiB body from stdin, fetched back with amqp-get
    $big = substr(str_repeat(hash('sha512', 'php-edge'), (8 << 20) / 128 + 1), 0, 8 << 20);
    [$rc, , $err] = sh(tool($t, 'amqp-publish', '-r ' . escapeshellarg($q)), $big, 30);
    settle($c, $q, 1);
    [$rc2, $out] = sh(tool($t, 'amqp-get', '-q ' . escapeshellarg($q)), '', 30);
    $obs[] = "8 MiB via stdin: publish rc=$rc err=" . trim($err) . " get rc=$rc2 size=" . strlen($out) . ' intact=' . show($out === $big);
    foreach ([$file, $file2, $sink, $sink2, $fail] as $f) {
        @unlink($f);
    }
    [$rc, $out, $err] = sh(tool($t, 'amqp-delete-queue', '-q ' . escapeshellarg($q)));
    $obs[] = "delete-queue rc=$rc out=" . trim($out) . ' err=' . trim($err);
    [$rc, $out] = sh(tool($t, 'amqp-declare-queue', '-q ""'));
    $obs[] = "declare-queue server-named rc=$rc";
    $obs[] = '[doc] server-named: ' . $t->rename(trim($out));
    return $obs;
}

function amqp_tools_failures(Target $t): array
{
    if (!tools_available()) {
        return ['amqp-tools not installed'];
    }
    $obs = [];
    $missing = escapeshellarg('php-edge-missing-' . $t->run);
    $norm = fn ($s) => trim(preg_replace('/php-edge-missing-[0-9a-f]+/', 'MISSING', $s));
    foreach ([
        'get missing queue' => tool($t, 'amqp-get', "-q $missing"),
        'consume missing queue' => tool($t, 'amqp-consume', "-q $missing -c 1 cat"),
        'delete missing queue' => tool($t, 'amqp-delete-queue', "-q $missing"),
        'delete -e of missing queue' => tool($t, 'amqp-delete-queue', "-e -q $missing"),
        'publish to missing exchange' => tool($t, 'amqp-publish', "-e $missing -r k -b x"),
        'declare amq. queue' => tool($t, 'amqp-declare-queue', '-q amq.php-edge'),
        'missing vhost' => tool($t, 'amqp-get', '-q x', ['vhost' => 'php-edge-no-vhost']),
    ] as $label => $cmd) {
        [$rc, $out, $err] = sh($cmd, '', 8);
        $obs[] = "$label: rc=$rc out=" . $norm($out) . ' err=' . $norm($err);
    }
    foreach ([
        'get wrong password' => tool($t, 'amqp-get', '-q x', ['password' => 'wrong']),
        'publish wrong password' => tool($t, 'amqp-publish', '-r x -b x', ['password' => 'wrong']),
    ] as $label => $cmd) {
        [$rc, $out, $err] = sh($cmd, '', 8);
        $obs[] = "$label: rc=$rc";
        $obs[] = "[doc] $label: err=" . $norm($err);
    }
    // a queue declared durable by amqp-declare-queue conflicts with a transient declare
    $q = $t->q('tools-dur');
    sh(tool($t, 'amqp-declare-queue', '-d -q ' . escapeshellarg($q)));
    [$rc, $out, $err] = sh(tool($t, 'amqp-declare-queue', '-q ' . escapeshellarg($q)));
    $obs[] = "redeclare transient: rc=$rc out=" . trim($out) . ' err=' . $t->rename(trim($err));
    [$rc, $out, $err] = sh(tool($t, 'amqp-delete-queue', '--if-unused -q ' . escapeshellarg($q)));
    $obs[] = "delete --if-unused: rc=$rc out=" . trim($out) . ' err=' . trim($err);
    return $obs;
}

// ---------------------------------------------------------------------------------------------

const SCENARIOS = [
    'stream_and_lazy_connections',
    'consume_wait_loop_with_timeouts',
    'qos_prefetch_window',
    'confirms_with_handlers',
    'mandatory_return_listener',
    'basic_get_and_errors',
    'recover_redelivers',
    'batch_publish',
    'transactions',
    'queue_declare_flags_and_arguments',
    'headers_every_type_round_trip',
    'exchange_bind_chain',
    'delayed_retry_dlx_ttl',
    'channel_and_protocol_exceptions',
    'connection_refusals',
    'channel_max_and_frame_max',
    'large_bodies',
    'heartbeats',
    'consumer_cancel_notification',
    'protocol_corners',
    'multiple_acks_and_requeue',
    'amqp_tools_publish_consume',
    'amqp_tools_failures',
];

function run_one(string $addr, string $fn): array
{
    $t = new Target($addr);
    pcntl_alarm(SCENARIO_SECONDS);
    try {
        $obs = $fn($t);
    } catch (ScenarioTimeout $e) {
        $obs = ['scenario timeout'];
    } catch (\Throwable $e) {
        $line = 0;
        foreach (array_merge([['file' => $e->getFile(), 'line' => $e->getLine()]], $e->getTrace()) as $f) {
            if (($f['file'] ?? '') === __FILE__) {
                $line = $f['line'];
                break;
            }
        }
        $obs = ['scenario raised ' . err($e) . " at line $line"];
    } finally {
        pcntl_alarm(0);
    }
    pcntl_alarm(20);
    try {
        $t->cleanup();
    } catch (\Throwable $e) {
    } finally {
        pcntl_alarm(0);
    }
    return array_map(fn ($o) => $t->rename($o), $obs);
}

function main(array $argv): int
{
    $args = array_slice($argv, 1);
    if (in_array('--list', $args, true)) {
        echo implode("\n", SCENARIOS), "\n";
        return 0;
    }
    $verbose = in_array('-v', $args, true);
    $args = array_values(array_filter($args, fn ($a) => $a !== '-v'));
    if (count($args) < 2) {
        fwrite(STDERR, "usage: php php_edge.php DIRECT_HOST:PORT PROXY_HOST:PORT [-v] [SCENARIO ...]\n");
        return 2;
    }
    [$direct, $proxy] = $args;
    $only = array_slice($args, 2);
    if ($unknown = array_diff($only, SCENARIOS)) {
        fwrite(STDERR, 'unknown scenarios: ' . implode(' ', $unknown) . "\n");
        return 2;
    }
    $fails = [];
    foreach (SCENARIOS as $fn) {
        if ($only && !in_array($fn, $only, true)) {
            continue;
        }
        $want = run_one($direct, $fn);
        $got = run_one($proxy, $fn);
        $broken = $want && str_starts_with($want[0], 'scenario ');
        $cmp = fn ($obs) => array_values(array_filter($obs, fn ($o) => !str_starts_with($o, '[doc]')));
        $same = $cmp($want) === $cmp($got) && !$broken;
        echo '[', $same ? 'PASS' : 'FAIL', "] $fn\n";
        if ($same && $verbose) {
            foreach ($want as $i => $w) {
                $g = $got[$i] ?? '-';
                echo "     $w\n";
                if (str_starts_with($w, '[doc]') && $g !== $w) {
                    echo "     (warren) $g\n";
                }
            }
        }
        if (!$same) {
            $fails[] = $fn;
            $n = max(count($want), count($got));
            for ($i = 0; $i < $n; $i++) {
                $w = $want[$i] ?? '-';
                $g = $got[$i] ?? '-';
                $mark = ($w === $g || str_starts_with($w, '[doc]')) ? ' ' : '!';
                echo "   $mark rabbitmq: $w\n   $mark warren:   $g\n";
            }
        }
    }
    echo $fails ? 'php edge cases: ' . count($fails) . ' differ: ' . implode(' ', $fails) . "\n" : "php edge cases: all the same\n";
    return $fails ? 1 : 0;
}

exit(main($argv));
