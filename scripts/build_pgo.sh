#!/usr/bin/env bash
# scripts/build_pgo.sh — a release build of warren optimised with a profile of its own traffic
# (profile-guided optimisation), for production.
#
#   scripts/build_pgo.sh [--out FILE]       default: target/pgo/warren
#
# At the message rates of a Celery site, each message wakes warren with caches the broker and
# the clients have just used, and its time goes more with the code and data it touches than with
# the instructions it runs. A profile tells the compiler which branches are taken and which code
# is cold, so the hot path is laid out densely and the error paths moved aside. What it gives,
# measured side by side with the plain release build (docs/benchmarks.md): about 12% less CPU per
# message at 2,000 msg/s and a quarter fewer instructions per message.
#
# 1. builds warren instrumented (-Cprofile-generate) in target/pgo-gen;
# 2. trains it: scripts/bench.sh's publish, confirm, consume and latency phases through it, 100 B
#    and 4 KiB messages, against a local single-node RabbitMQ (started and stopped by
#    scripts/bench.sh, state in $WARREN_RABBIT_DIR, default /tmp/warren-pgo);
# 3. merges the profile with llvm-profdata from the Rust toolchain's llvm-tools component
#    (installed with `rustup component add llvm-tools` when missing);
# 4. builds warren with the profile (-Cprofile-use) in target/pgo and copies the binary to FILE.
#
# Needs what scripts/bench.sh needs (rabbitmq-server; it installs Debian's when missing) and
# rustup. Takes about 8 minutes on a 2-core machine. The binary is an ordinary warren: same
# code, same behaviour; only its layout and inlining differ.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=target/pgo/warren
while [ $# -gt 0 ]; do
    case "$1" in
    --out) out=${2:?--out needs a file}; shift 2 ;;
    -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_pgo.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
log() { printf '[build_pgo.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
    log "installing the llvm-tools component (for llvm-profdata)"
    rustup component add llvm-tools
fi
[ -x "$profdata" ] || { echo "build_pgo.sh: no llvm-profdata at $profdata" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
raw=$work/raw

log "1/4 building warren instrumented (target/pgo-gen)"
RUSTFLAGS="-Cprofile-generate=$raw" cargo build --release --locked --bin warren \
    --target-dir target/pgo-gen

log "2/4 training it with scripts/bench.sh (publish, confirm, consume, latency)"
export WARREN_RABBIT_DIR=${WARREN_RABBIT_DIR:-/tmp/warren-pgo}
WARREN_BENCH_PROXY_BIN=$PWD/target/pgo-gen/release/warren scripts/bench.sh -- \
    --targets proxy --phases publish,confirm,consume,latency --rounds 1 --sizes 100,4096 \
    --count 20000 --latency-secs 5 >"$work/train.log" 2>&1 || {
    cat "$work/train.log" >&2
    exit 1
}

log "3/4 merging the profile"
# Build scripts and proc macros of the instrumented build wrote profiles too: only warren's
# binary is merged (the largest file, and the one written after the build).
shopt -s nullglob
profiles=("$raw"/*.profraw)
[ ${#profiles[@]} -gt 0 ] || { echo "build_pgo.sh: the training wrote no profile" >&2; exit 1; }
newest=$(ls -t "${profiles[@]}" | head -1)
"$profdata" merge -o "$work/warren.profdata" "$newest"

log "4/4 building warren with the profile (target/pgo)"
RUSTFLAGS="-Cprofile-use=$work/warren.profdata" cargo build --release --locked --bin warren \
    --target-dir target/pgo
mkdir -p "$(dirname "$out")"
cp target/pgo/release/warren "$out"
log "done: $out ($("$out" --version))"
