#!/usr/bin/env bash
# tests/clients/run.sh DIRECT_ADDR [PROXY_ADDR] — pika, Node's amqplib and the RabbitMQ Java client,
# each running its scenario (tests/clients/*), and RabbitMQ's tutorials 1-6 in pika
# (tutorials.py), directly against RabbitMQ and then through warren; then the edge cases of
# edge_compare.py (py-amqp), raw_compare.py (raw frames, malformed input), pika_edge.py (pika's
# blocking and asynchronous patterns), storm_compare.py (AMQPStorm, rabbitpy),
# amqp_client_edge.mjs (CloudAMQP's Node client), node_wrappers_edge.mjs
# (amqp-connection-manager, rascal), php_edge.php (php-amqplib, amqp-tools), bunny_edge.rb
# (Ruby's Bunny), go_edge/main.go (Go's amqp091-go), amqplib_edge.js (Node services' patterns) and JavaEdge.java
# (the Java client: recovery, RpcClient, tx, qos, ...), each run both ways and compared
# observation by observation (lines tagged [doc:...] are differences docs/semantics.md lists,
# shown but not compared), and amqplib's own test suite both ways (amqplib_suite.sh), and pika's
# own acceptance tests both ways (pika_suite.sh).
# WARREN_ADMIN (host:port of warren's admin endpoint, default
# 127.0.0.1:15673) lets JavaEdge and node_wrappers_edge.mjs close a client from the server side
# through warren;
# WARREN_DIRECT_CTL (a rabbitmqctl command prefix for the direct node, e.g. "scripts/rabbit.sh
# ctl shard-a-1") does it directly, else the node's management API.
#
# Run by `scripts/test.sh clients`, which installs what they need (pika in .venv, amqplib with
# `npm ci` here, Debian's nodejs, librabbitmq-client-java and a JDK). The direct run checks the
# scenario itself; the proxied run is the test. Without PROXY_ADDR only the direct runs happen.
# Exits non-zero if any run fails.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY="${WARREN_VENV_PY:-$ROOT/.venv/bin/python}"
JAVA_CP=/usr/share/java/amqp-client.jar:/usr/share/java/slf4j-api.jar:/usr/share/java/slf4j-nop.jar

direct=${1:?usage: run.sh DIRECT_ADDR [PROXY_ADDR]}
proxy=${2:-}
targets=("direct=$direct")
[ -n "$proxy" ] && targets+=("proxy=$proxy")

fails=0
summary=()
# WARREN_CLIENTS_LOGS (a directory): each step's output is also kept there, and a failed step's
# last lines go to failed.txt, which scripts/test.sh prints under its summary (the end of a
# long CI log is what gets read).
logs=${WARREN_CLIENTS_LOGS:-}
[ -n "$logs" ] && mkdir -p "$logs" && : >"$logs/failed.txt"
# run_logged FILE COMMAND...: runs COMMAND, its output also kept in FILE when logs are kept.
run_logged() {
    local file=$1
    shift
    if [ -n "$logs" ]; then "$@" 2>&1 | tee "$file"; else "$@"; fi
}
# step NAME KIND COMMAND...: runs COMMAND and adds its line (PASS/FAIL, seconds) to the summary.
# A comparison that fails is run once more: the two sides run seconds apart on a loaded machine,
# and a timing window missed once is not a difference. The first failure stays in the summary
# ("PASS 2nd") and its last lines in failed.txt, so an intermittent difference is still seen.
step() {
    local name=$1 kind=$2 t0 status=PASS file
    shift 2
    t0=$(date +%s)
    file="${logs:-/tmp}/$name-$kind.txt"
    if ! run_logged "$file" "$@"; then
        status=FAIL
        [ -n "$logs" ] && { echo "--- $name $kind failed; its last lines ($file):"
            tail -n 40 "$file"; } >>"$logs/failed.txt"
        if [ "$kind" = compare ] || [ "$kind" = suite ]; then
            echo "--- $name $kind failed; running it once more"
            file="${logs:-/tmp}/$name-$kind-2nd.txt"
            if run_logged "$file" "$@"; then status="PASS 2nd"; else
                [ -n "$logs" ] && { echo "--- $name $kind failed again; its last lines ($file):"
                    tail -n 40 "$file"; } >>"$logs/failed.txt"
            fi
        fi
        [ "$status" = FAIL ] && fails=$((fails + 1))
    fi
    summary+=("$(printf '  %-16s %-7s %s %3ss' "$name" "$kind" "$status" $(($(date +%s) - t0)))")
}

client() { # CLIENT ADDR: one client's scenario against ADDR
    case $1 in
    pika) "$PY" "$HERE/pika_client.py" "amqp://guest:guest@$2/%2F" ;;
    amqplib) node "$HERE/amqplib_client.js" "amqp://guest:guest@$2/" ;;
    java) java -cp "$JAVA_CP" "$HERE/JavaClient.java" "amqp://guest:guest@$2" ;;
    tutorials) "$PY" "$HERE/tutorials.py" "amqp://guest:guest@$2/%2F" ;;
    esac
}

go_edge_compare() { # go_edge (built from Debian's amqp091-go in GOPATH mode) both ways
    local out="$ROOT/target/go-edge"
    mkdir -p "$out" && cp "$HERE/go_edge/main.go" "$out/main.go" &&
        (cd "$out" && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$out/cache" go build -o go_edge main.go) &&
        DIRECT_MGMT="http://${direct%:*}:$((${direct##*:} + 10000))" \
            PROXY_ADMIN="http://${WARREN_ADMIN:-${proxy%:*}:$((${proxy##*:} + 10000))}" \
            "$out/go_edge" "amqp://guest:guest@$direct/" "amqp://guest:guest@$proxy/"
}

java_edge_compare() { # JavaEdge.java against RabbitMQ and warren, outputs diffed
    local out rc1 rc2 skip='\[doc:' ok=0
    out=$(mktemp -d)
    java -cp "$JAVA_CP" "$HERE/JavaEdge.java" "amqp://guest:guest@$direct" >"$out/rabbitmq.txt" 2>"$out/rabbitmq.err"
    rc1=$?
    WARREN_ADMIN=${WARREN_ADMIN:-127.0.0.1:15673} \
        java -cp "$JAVA_CP" "$HERE/JavaEdge.java" "amqp://guest:guest@$proxy" >"$out/warren.txt" 2>"$out/warren.err"
    rc2=$?
    if grep -q '^recovery.*closed from the server side.*: false' "$out/rabbitmq.txt"; then
        # The reference could not close its connection from the server side (rabbitmqctl or
        # the management API too slow on a loaded machine): the recovery scenarios are not
        # compared, but warren's side must still have recovered.
        echo "JavaEdge: RabbitMQ's side could not close its connection; recovery scenarios checked on warren's side only"
        skip='\[doc:|^recovery'
        [ "$(grep -c '^recovery.*recovered=true' "$out/warren.txt")" = 2 ] || rc2=1
    fi
    if [ $rc1 != 0 ] || [ $rc2 != 0 ] ||
        ! diff <(grep -Ev "$skip" "$out/rabbitmq.txt") <(grep -Ev "$skip" "$out/warren.txt"); then
        ok=1
        echo "JavaEdge exit codes: rabbitmq $rc1, warren $rc2; stderr tails:"
        tail -n 5 "$out/rabbitmq.err" "$out/warren.err"
    fi
    grep -h '\[doc:' "$out/warren.txt" | sed 's/^/  warren, documented: /'
    rm -rf "$out"
    return $ok
}

for t in "${targets[@]}"; do
    name=${t%%=*}
    addr=${t#*=}
    for c in pika amqplib java tutorials; do
        echo "--- $c, $name ($addr)"
        step "$c" "$name" client "$c" "$addr"
    done
done
if [ -n "$proxy" ]; then
    echo "--- edge cases, rabbitmq ($direct) against warren ($proxy)"
    step edges compare "$PY" "$HERE/edge_compare.py" "$direct" "$proxy"
    echo "--- raw frames and malformed input, rabbitmq ($direct) against warren ($proxy)"
    step raw compare "$PY" "$HERE/raw_compare.py" "$direct" "$proxy"
    echo "--- pika edge cases, rabbitmq ($direct) against warren ($proxy)"
    step pika-edge compare "$PY" "$HERE/pika_edge.py" "$direct" "$proxy"
    echo "--- amqplib edge cases, rabbitmq ($direct) against warren ($proxy)"
    step node-edge compare node "$HERE/amqplib_edge.js" "amqp://guest:guest@$direct/" "amqp://guest:guest@$proxy/"
    echo "--- AMQPStorm and rabbitpy edge cases, rabbitmq ($direct) against warren ($proxy)"
    step storm-edge compare "$PY" "$HERE/storm_compare.py" "$direct" "$proxy"
    echo "--- CloudAMQP amqp-client edge cases, rabbitmq ($direct) against warren ($proxy)"
    step amqp-client-edge compare node "$HERE/amqp_client_edge.mjs" "amqp://guest:guest@$direct" "amqp://guest:guest@$proxy"
    echo "--- amqp-connection-manager and rascal, rabbitmq ($direct) against warren ($proxy)"
    step node-wrappers compare env ${WARREN_ADMIN:+PROXY_ADMIN=http://$WARREN_ADMIN} \
        node "$HERE/node_wrappers_edge.mjs" "amqp://guest:guest@$direct/" "amqp://guest:guest@$proxy/"
    echo "--- php-amqplib and amqp-tools, rabbitmq ($direct) against warren ($proxy)"
    step php-edge compare php "$HERE/php_edge.php" "$direct" "$proxy"
    echo "--- Ruby's Bunny, rabbitmq ($direct) against warren ($proxy)"
    step bunny-edge compare env ${WARREN_ADMIN:+WARREN_ADMIN=http://$WARREN_ADMIN} \
        ruby "$HERE/bunny_edge.rb" "amqp://guest:guest@$direct" "amqp://guest:guest@$proxy"
    echo "--- Go's amqp091-go, rabbitmq ($direct) against warren ($proxy)"
    step go-edge compare go_edge_compare
    echo "--- Java client edge cases, rabbitmq ($direct) against warren ($proxy)"
    step java-edge compare java_edge_compare
    step amqplib suite "$HERE/amqplib_suite.sh" "$direct" "$proxy"
    step pika suite "$HERE/pika_suite.sh" "$direct" "$proxy"
fi
echo "clients:"
printf '%s\n' "${summary[@]}"
[ $fails = 0 ]
