#!/usr/bin/env bash
# scripts/bench_celery.sh — chained Celery tasks directly against RabbitMQ and through warren,
# in one run (benches/celery_chain/run.py).
#
#   scripts/bench_celery.sh [--pin] [--no-relay] [--haproxy] [-- RUN-ARGS...]   e.g. -- --rounds 5
#
# The workload Celery sites run: each task publishes the next of its chain (confirm_publish,
# acks_late), one prefork worker, several chains at once. Starts one single-node RabbitMQ
# (bench-chain, its own state dir) and a release-built warren in front of it (one shard
# cluster) and the plain TCP relay of scripts/bench.sh (what one more user-space hop costs), then
# runs rounds over direct, warren and the relay and prints the medians, the per-round ratios to
# direct, and the CPU per task of the worker (its pool included), of the broker and of each proxy.
# --pin: RabbitMQ on CPU 0, everything else (driver, worker, warren, relay) on CPU 1.
# --no-relay: direct and warren only.
# --haproxy: HAProxy (TCP mode, one thread) in front of the same node too: a widely run proxy in
#            the same rounds, for comparison (needs haproxy installed: scripts/test.sh haproxy
#            installs Debian's).
# WARREN_BENCH_PROXY_BIN=/path/to/warren runs that binary instead of building one (another
# commit, or the profile-optimised build of scripts/build_pgo.sh), as for scripts/bench.sh.
# Needs the test venv (.venv, made by scripts/test.sh) for Celery.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export WARREN_RABBIT_DIR=${WARREN_RABBIT_DIR:-/tmp/warren-bench}
export WARREN_RABBIT_MANAGEMENT=0
PY=.venv/bin/python
pin=0
relay=1
haproxy=0
args=()
while [ $# -gt 0 ]; do
    case "$1" in
    --pin) pin=1; shift ;;
    --no-relay) relay=0; shift ;;
    --haproxy) haproxy=1; shift ;;
    --) shift; args=("$@"); break ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_celery.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
[ -x "$PY" ] || { echo "bench_celery.sh: $PY missing (run scripts/test.sh once, or make the venv)" >&2; exit 2; }
pin_broker=() pin_rest=()
if [ "$pin" = 1 ]; then
    pin_broker=(taskset -c 0) pin_rest=(taskset -c 1)
fi
log() { printf '[bench_celery.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

warren_bin=${WARREN_BENCH_PROXY_BIN:-}
if [ -z "$warren_bin" ]; then
    log "building warren (release)"
    cargo build --release --bin warren
    warren_bin=target/release/warren
fi
[ -x "$warren_bin" ] || { echo "bench_celery.sh: $warren_bin is not an executable" >&2; exit 2; }
log "warren: $warren_bin"
relay_bin=
if [ "$relay" = 1 ]; then
    log "building the relay (the throughput benchmark's --relay)"
    relay_bin=$(cargo bench --bench throughput --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
    [ -x "$relay_bin" ] || { echo "bench_celery.sh: could not build the relay" >&2; exit 1; }
fi
haproxy_bin=
if [ "$haproxy" = 1 ]; then
    haproxy_bin=$(command -v haproxy || echo /usr/sbin/haproxy)
    [ -x "$haproxy_bin" ] || {
        echo "bench_celery.sh: --haproxy needs haproxy (scripts/test.sh haproxy installs Debian's)" >&2
        exit 2
    }
fi
scripts/rabbit.sh install
tmp=$(mktemp -d)
warren_pid= relay_pid= haproxy_pid=
cleanup() {
    [ -n "$warren_pid" ] && kill "$warren_pid" 2>/dev/null || true
    [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null || true
    [ -n "$haproxy_pid" ] && kill "$haproxy_pid" 2>/dev/null || true
    scripts/rabbit.sh down bench-chain >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT
log "starting RabbitMQ (bench-chain)"
node=$("${pin_broker[@]}" scripts/rabbit.sh up-single bench-chain auto | awk '{print $2}')
beam=$(tr -dc '0-9' <"$WARREN_RABBIT_DIR/nodes/bench-chain-1/pid")
free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits up to 5 s for something to listen on 127.0.0.1:$1.
wait_port() {
    for _ in $(seq 1 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
        sleep 0.1
    done
}
port=$(free_port)
cat >"$tmp/warren.toml" <<TOML
listen = "127.0.0.1:$port"
[[clusters]]
name = "shard-a"
role = "shard"
nodes = ["$node"]
TOML
"${pin_rest[@]}" "$warren_bin" --config "$tmp/warren.toml" >"$tmp/warren.log" 2>&1 &
warren_pid=$!
wait_port "$port"
relay_args=()
if [ -n "$relay_bin" ]; then
    rport=$(free_port)
    "${pin_rest[@]}" "$relay_bin" --relay "127.0.0.1:$rport" "$node" &
    relay_pid=$!
    wait_port "$rport"
    relay_args=(--relay "127.0.0.1:$rport" --relay-pid "$relay_pid")
fi
if [ -n "$haproxy_bin" ]; then
    hport=$(free_port)
    # TCP mode, one thread (ample for a handful of connections; the relay and warren run one
    # connection thread per core), and timeouts longer than a round.
    cat >"$tmp/haproxy.cfg" <<CFG
global
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen amqp
    bind 127.0.0.1:$hport
    server rabbit $node
CFG
    "${pin_rest[@]}" "$haproxy_bin" -f "$tmp/haproxy.cfg" >"$tmp/haproxy.log" 2>&1 &
    haproxy_pid=$!
    wait_port "$hport"
    relay_args+=(--other "haproxy=127.0.0.1:$hport@$haproxy_pid")
fi
log "RabbitMQ $node, warren 127.0.0.1:$port${relay_pid:+, relay 127.0.0.1:$rport}${haproxy_pid:+, haproxy 127.0.0.1:$hport} (commit $(git rev-parse --short HEAD))"
"${pin_rest[@]}" "$PY" benches/celery_chain/run.py --direct "$node" --proxy "127.0.0.1:$port" \
    --proxy-pid "$warren_pid" --broker-pid "$beam" "${relay_args[@]}" "${args[@]}"
