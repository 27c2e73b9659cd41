#!/usr/bin/env bash
# scripts/bench.sh — warren's throughput and latency benchmark (benches/throughput.rs), end to end.
#
#   scripts/bench.sh [--topology single|sharded] [--pin] [--keep] [-- BENCH-ARGS...]
#
# 1. builds the benchmark and the warren binary in the release (bench) profile, before any
#    broker runs, so the build does not compete with the measurement;
# 2. starts one single-node RabbitMQ "cluster" per shard with scripts/rabbit.sh (bench-a, plus
#    bench-b for --topology sharded) in its own state dir, on free ports;
# 3. runs `cargo bench --bench throughput` against them (the benchmark starts warren itself),
#    printing the report and saving it to target/bench/throughput-<topology>-<time>.md;
# 4. stops the nodes and deletes their state (unless --keep).
#
# BENCH-ARGS go to the benchmark after the defaults (--sizes 100,4096), so they override them,
# e.g.  scripts/bench.sh -- --rounds 3 --sizes 100     (see `cargo bench --bench throughput -- --help`)
#
# --pin puts the RabbitMQ nodes on CPU 0 and everything else (the benchmark client, the relay,
# warren) on CPU 1 (taskset), so that the broker has a core to itself on both sides of the
# comparison, as it would on its own host: direct, the client talks to a broker alone on its core;
# proxied, warren's CPU is taken from the client's core, not the broker's. Needs 2 or more CPUs.
#
# Environment: WARREN_RABBIT_DIR (default /tmp/warren-bench) is the RabbitMQ state dir; it is
# separate from the test suite's so both can run on one machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export WARREN_RABBIT_DIR=${WARREN_RABBIT_DIR:-/tmp/warren-bench}
# The benchmark's brokers run without the management plugin (its statistics cost CPU).
export WARREN_RABBIT_MANAGEMENT=0

topology=single
keep=0
pin=0
bench_args=()
while [ $# -gt 0 ]; do
    case "$1" in
    --topology) topology=${2:?--topology needs single or sharded}; shift 2 ;;
    --topology=*) topology=${1#*=}; shift ;;
    --keep) keep=1; shift ;;
    --pin) pin=1; shift ;;
    --) shift; bench_args=("$@"); break ;;
    -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument '$1' (benchmark options go after --)" >&2; exit 2 ;;
    esac
done
case "$topology" in
single) clusters=(bench-a) ;;
sharded) clusters=(bench-a bench-b) ;;
*) echo "bench.sh: --topology must be single or sharded" >&2; exit 2 ;;
esac

# Without --pin both prefixes are empty and everything shares every CPU.
pin_broker=() pin_rest=()
if [ "$pin" = 1 ]; then
    command -v taskset >/dev/null 2>&1 || { echo "bench.sh: --pin needs taskset (util-linux)" >&2; exit 2; }
    [ "$(nproc --all)" -ge 2 ] || { echo "bench.sh: --pin needs at least 2 CPUs" >&2; exit 2; }
    pin_broker=(taskset -c 0) pin_rest=(taskset -c 1)
fi

log() { printf '[bench.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

log "building (release profile)"
cargo bench --bench throughput --no-run

scripts/rabbit.sh install
cleanup() {
    if [ "$keep" = 1 ]; then
        log "--keep: nodes left running in $WARREN_RABBIT_DIR (scripts/rabbit.sh down-all to stop)"
    else
        log "stopping the RabbitMQ nodes"
        for c in "${clusters[@]}"; do scripts/rabbit.sh down "$c" || true; done
    fi
}
trap cleanup EXIT

# Start the nodes in parallel; each `up-single` prints "NAME 127.0.0.1:PORT".
log "starting RabbitMQ: ${clusters[*]}"
tmp=$(mktemp -d)
pids=()
for c in "${clusters[@]}"; do
    "${pin_broker[@]}" scripts/rabbit.sh up-single "$c" auto >"$tmp/$c" &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
nodes=() beams=()
for c in "${clusters[@]}"; do
    nodes+=("$(awk '{print $2}' "$tmp/$c")")
    beams+=("$(tr -dc '0-9' <"$WARREN_RABBIT_DIR/nodes/$c-1/pid")")
done
rm -rf "$tmp"

join() { local IFS=,; echo "$*"; }
source_desc="commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || source_desc="$source_desc + uncommitted changes in src/ or Cargo.toml"
[ "$pin" = 1 ] && source_desc="$source_desc; --pin: RabbitMQ on CPU 0, client, relay and warren on CPU 1"
export WARREN_BENCH_SOURCE=$source_desc
mkdir -p target/bench
out="target/bench/throughput-$topology-$(date +%Y%m%d-%H%M%S).md"
log "running the benchmark; report goes to $out"
# The benchmark starts the relay and warren itself; they inherit its CPU affinity.
"${pin_rest[@]}" cargo bench --bench throughput -- \
    --topology "$topology" --nodes "$(join "${nodes[@]}")" --broker-pids "$(join "${beams[@]}")" \
    --sizes 100,4096 "${bench_args[@]}" | tee "$out"
