#!/usr/bin/env bash
# scripts/bench_celery.sh — chained Celery tasks directly against RabbitMQ and through warren,
# in one run (benches/celery_chain/run.py).
#
#   scripts/bench_celery.sh [--pin] [-- RUN-ARGS...]     e.g. -- --rounds 5 --chains 8 --steps 250
#
# The workload Celery sites run: each task publishes the next of its chain (confirm_publish,
# acks_late), one prefork worker, several chains at once. Starts one single-node RabbitMQ
# (bench-chain, its own state dir) and a release-built warren in front of it (one shard
# cluster), then alternates direct and proxied rounds and prints the medians and their ratio.
# --pin: RabbitMQ on CPU 0, everything else (driver, worker, warren) on CPU 1, as scripts/bench.sh.
# Needs the test venv (.venv, made by scripts/test.sh) for Celery.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export WARREN_RABBIT_DIR=${WARREN_RABBIT_DIR:-/tmp/warren-bench}
export WARREN_RABBIT_MANAGEMENT=0
PY=.venv/bin/python
pin=0
args=()
while [ $# -gt 0 ]; do
    case "$1" in
    --pin) pin=1; shift ;;
    --) shift; args=("$@"); break ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_celery.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
[ -x "$PY" ] || { echo "bench_celery.sh: $PY missing (run scripts/test.sh once, or make the venv)" >&2; exit 2; }
pin_broker=() pin_rest=()
if [ "$pin" = 1 ]; then
    pin_broker=(taskset -c 0) pin_rest=(taskset -c 1)
fi
log() { printf '[bench_celery.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

log "building warren (release)"
cargo build --release --bin warren
scripts/rabbit.sh install
tmp=$(mktemp -d)
warren_pid=
cleanup() {
    [ -n "$warren_pid" ] && kill "$warren_pid" 2>/dev/null || true
    scripts/rabbit.sh down bench-chain >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT
log "starting RabbitMQ (bench-chain)"
node=$("${pin_broker[@]}" scripts/rabbit.sh up-single bench-chain auto | awk '{print $2}')
port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$tmp/warren.toml" <<TOML
listen = "127.0.0.1:$port"
[[clusters]]
name = "shard-a"
role = "shard"
nodes = ["$node"]
TOML
"${pin_rest[@]}" target/release/warren --config "$tmp/warren.toml" >"$tmp/warren.log" 2>&1 &
warren_pid=$!
for _ in $(seq 1 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
log "RabbitMQ $node, warren 127.0.0.1:$port (commit $(git rev-parse --short HEAD))"
"${pin_rest[@]}" "$PY" benches/celery_chain/run.py --direct "$node" --proxy "127.0.0.1:$port" "${args[@]}"
