#!/usr/bin/env bash
# scripts/quickstart.sh — the README's first command: three local RabbitMQ clusters and warren in
# front of them.
#
# Starts (or finds already running) the clusters on the fixed ports that proxy.toml names:
#   shard-a  127.0.0.1:5701, 127.0.0.1:5702   management API http://127.0.0.1:15701, :15702
#   shard-b  127.0.0.1:5711, 127.0.0.1:5712   management API http://127.0.0.1:15711, :15712
#   control  127.0.0.1:5721, 127.0.0.1:5722   management API http://127.0.0.1:15721, :15722
# (state in ${WARREN_RABBIT_DIR:-/tmp/warren-rabbit}; the management APIs and UIs take
# guest/guest, and proxy.toml gives each cluster's first one as its `management`), then runs
#   cargo run --release -- --config proxy.toml
# in the foreground. Ctrl-C stops warren; the clusters keep running until
#   scripts/rabbit.sh down-all
# Point clients at amqp://guest:guest@127.0.0.1:5673// (the `listen` address in proxy.toml).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RABBIT="$ROOT/scripts/rabbit.sh"
CONFIG=${WARREN_CONFIG:-proxy.toml}

case "${1:-}" in
-h | --help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

if [ ! -f "$CONFIG" ]; then
    echo "quickstart: $CONFIG not found in $ROOT" >&2
    exit 1
fi
command -v cargo >/dev/null || { echo "quickstart: cargo not found (install the Rust toolchain)" >&2; exit 1; }

"$RABBIT" install

echo "starting clusters shard-a, shard-b, control (state in ${WARREN_RABBIT_DIR:-/tmp/warren-rabbit})..." >&2
pids=()
"$RABBIT" up shard-a 5701 5702 & pids+=($!)
"$RABBIT" up shard-b 5711 5712 & pids+=($!)
"$RABBIT" up control 5721 5722 & pids+=($!)
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
if [ "$rc" != 0 ]; then
    echo "quickstart: a cluster did not start (see the messages above; 'scripts/rabbit.sh status')" >&2
    exit 1
fi

DOWN="scripts/rabbit.sh down-all"
[ -z "${WARREN_RABBIT_DIR:-}" ] || DOWN="WARREN_RABBIT_DIR=$WARREN_RABBIT_DIR $DOWN"

# The management APIs that proxy.toml's `management` keys point at (GET /queues?queue=PATTERN
# lists the clusters' queues through them). Clusters made by an older rabbit.sh have none.
for name in shard-a shard-b control; do
    if urls=$("$RABBIT" management "$name" 2>/dev/null); then
        echo "$name management API (guest/guest): ${urls#"$name" }" >&2
    else
        down_one="scripts/rabbit.sh down $name"
        [ -z "${WARREN_RABBIT_DIR:-}" ] || down_one="WARREN_RABBIT_DIR=$WARREN_RABBIT_DIR $down_one"
        echo "quickstart: warning: cluster $name runs without the management plugin that $CONFIG's" \
            "\`management\` points at (it was made by an older scripts/rabbit.sh), so" \
            "GET /queues?queue=PATTERN cannot list its queues. Run '$down_one' and this script" \
            "again to recreate it with the plugin." >&2
    fi
done
cat >&2 <<EOF

clusters are up. Starting warren with $CONFIG (Ctrl-C stops warren).
When done, stop the clusters with:   $DOWN

EOF
# Ctrl-C goes to warren (which shuts down gracefully); this script survives it to print the hint.
trap ':' INT
status=0
cargo run --release --bin warren -- --config "$CONFIG" || status=$?
echo >&2
echo "warren stopped (status $status). The clusters are still running; stop them with: $DOWN" >&2
exit "$status"
