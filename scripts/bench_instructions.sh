#!/usr/bin/env bash
# scripts/bench_instructions.sh — instructions warren executes per message, against the relay's.
#
#   scripts/bench_instructions.sh [--rate R] [--secs S] [--keep-profiles DIR]
#
# CPU time per message (scripts/bench.sh, the latency phase) moves by 10% or more from round to
# round on a shared machine, which hides the effect of most code changes. The number of
# instructions a message costs does not depend on the machine's load, so it compares two builds
# to within a percent or two. This script counts them with valgrind's callgrind:
#
# 1. runs the benchmark's latency phase (one publisher, one consumer, 100-byte messages, R
#    messages per second, default 200: slow enough that nothing batches, as at 2,000 msg/s
#    without a profiler) through the relay and through warren, both under callgrind, for S
#    seconds (default 20), then again for 2 x S seconds, each after a short warm-up (1,000
#    messages: `--count 10000`, whose tenth the warm-up sends);
# 2. takes the difference of the two runs' totals, so start-up, warm-up and shutdown cancel out,
#    and divides it by the R x S messages the second run had in addition;
# 3. prints warren's and the relay's instructions per message and their ratio, and with
#    --keep-profiles keeps the four callgrind profiles in DIR (callgrind_annotate reads them).
#
# Needs valgrind (Debian: apt-get install valgrind). Takes about 4 minutes with the defaults.
# The figure is the user-space work per message only: system calls and wake-ups are the
# kernel's, and `scripts/bench.sh` measures the whole.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
rate=200 secs=20 keep=""
while [ $# -gt 0 ]; do
    case "$1" in
    --rate) rate=${2:?--rate needs a number}; shift 2 ;;
    --secs) secs=${2:?--secs needs a number}; shift 2 ;;
    --keep-profiles) keep=${2:?--keep-profiles needs a directory}; shift 2 ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "bench_instructions.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
command -v valgrind >/dev/null 2>&1 || {
    echo "bench_instructions.sh: needs valgrind (Debian: apt-get install valgrind)" >&2
    exit 2
}
command -v callgrind_annotate >/dev/null 2>&1 || {
    echo "bench_instructions.sh: needs callgrind_annotate (part of valgrind)" >&2
    exit 2
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log() { printf '[bench_instructions.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# One run of the latency phase under callgrind; profiles go to $work/$1.
run() {
    local dir=$work/$1 length=$2
    mkdir -p "$dir"
    log "latency phase, $rate msg/s for $length s, relay and warren under callgrind"
    WARREN_BENCH_WRAP="valgrind --tool=callgrind --callgrind-out-file=$dir/callgrind.%p" \
        scripts/bench.sh -- --targets relay,proxy --phases latency --rounds 1 --sizes 100 \
        --latency-rate "$rate" --latency-secs "$length" --count 10000 >"$dir/bench.log" 2>&1 || {
        cat "$dir/bench.log" >&2
        exit 1
    }
}

# Total instructions of the profile in $1 whose command line contains $2.
total() {
    local dir=$1 what=$2 f
    for f in "$dir"/callgrind.*; do
        if grep -q "^cmd:.*$what" "$f"; then
            callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }'
            return
        fi
    done
    echo "bench_instructions.sh: no profile of $what in $dir" >&2
    exit 1
}

run short "$secs"
run long $((2 * secs))
messages=$((rate * secs))
per_message() { echo $((($(total "$work/long" "$1") - $(total "$work/short" "$1")) / messages)); }
relay=$(per_message " --relay ")
warren=$(per_message "warren --config")
ratio=$(awk -v w="$warren" -v r="$relay" 'BEGIN { printf "%.2f", w / r }')
echo "instructions per message ($rate msg/s, 100 B, difference of a $secs s and a $((2 * secs)) s run):"
echo "  relay   $relay"
echo "  warren  $warren  (${ratio}x the relay)"
if [ -n "$keep" ]; then
    mkdir -p "$keep"
    cp -r "$work/short" "$work/long" "$keep/"
    log "profiles kept in $keep/short and $keep/long"
fi
