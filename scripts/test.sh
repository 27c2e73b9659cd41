#!/usr/bin/env bash
# scripts/test.sh — warren's whole test suite (the README's second command; also what CI runs).
#
#   scripts/test.sh [all|rust|python|clients|celery|reload|evacuate|haproxy|fault ...]   (default: all; several may be given)
#
#   1. installs RabbitMQ (scripts/rabbit.sh install) and a Python venv at .venv with
#      tests/python/requirements.txt, plus the py-amqp/kombu sdists (all cached between runs);
#   2. starts three two-node RabbitMQ clusters (shard-a, shard-b, control; plus shard-c when the
#      reload part runs) on free ports in a fresh state dir (not for the fault part alone, which
#      starts its own) and exports for the Rust tests:
#        WARREN_RABBIT_DIR     the state dir (tests may `scripts/rabbit.sh up` private clusters there)
#        WARREN_TEST_CLUSTERS  "shard-a=127.0.0.1:P,127.0.0.1:P;shard-b=...;control=..."
#        WARREN_TEST_MANAGEMENT "shard-a=http://127.0.0.1:M,http://127.0.0.1:M;..." (their
#                              management APIs, guest/guest; tests/admin_queues_mgmt.rs)
#      everything is torn down on exit, failures and Ctrl-C included;
#   3. rust:   cargo test --all-targets --no-fail-fast (every test binary runs even if one fails)
#              (needs the venv too: tests/compose.rs runs check-jsonschema on docker-compose.yml;
#              and promtool, from Debian's prometheus package, for tests/admin_metrics.rs)
#   4. python: builds and starts target/debug/warren on a free port in front of the test clusters,
#              runs py-amqp's and kombu's integration suites directly and through it and compares
#              (tests/python/run_suites.py);
#      clients: pika, Node's amqplib and the RabbitMQ Java client, each a scenario of its own
#              (confirms, returns, qos and acks, tx, big messages through 4096-byte frames), and
#              RabbitMQ's tutorials 1-6 in pika, directly and through it; edge cases compared
#              (py-amqp, Java); amqplib's and pika's own test suites both ways (tests/clients/run.sh;
#              installs nodejs, npm's amqplib, Debian's librabbitmq-client-java and a JDK when
#              missing);
#      celery: Celery end to end through it (tests/e2e/celery_e2e.py), then GET /clients and
#              closing one client with pika and a Celery connection (tests/e2e/clients_e2e.py),
#              Flower's broker tab through the admin endpoint's /api/queues (tests/e2e/flower_e2e.py),
#              Celery's features (canvas, ETA, retries, revoke, time limits, broadcast,
#              control, beat) directly and through warren, compared (tests/e2e/celery_patterns.py),
#              kombu's and Celery's everyday patterns compared likewise (tests/e2e/kombu_edge.py,
#              tests/e2e/celery_more.py), Dramatiq and nameko likewise
#              (tests/e2e/frameworks_compare.py, in a venv of their own),
#              and a routing rule keeping Celery's fast queue on shard-a
#              (tests/e2e/celery_rules_e2e.py; the test config carries the rule);
#      reload: hot reload under load: add a third shard cluster (shard-c) then drain it, and
#              invalid files x SIGHUP / file change / POST /reload (tests/e2e/reload_e2e.py);
#      evacuate: 20,000 messages in 20 queues on shard-a without consumers, publishers through
#              warren meanwhile, POST /clusters/shard-a/evacuate, SIGKILL of warren halfway and a
#              restart; a ledger: none lost, duplicates within the counted ones
#              (tests/e2e/evacuate_e2e.py; WARREN_EVACUATE_ARGS, e.g. "--messages 100000");
#      haproxy: two warren instances behind HAProxy configured as deploy/haproxy/haproxy.cfg:
#              Celery through it while both instances reload, the same queue depth from either
#              instance (/queues, check-queues), a rolling stop (tests/e2e/haproxy_e2e.py;
#              installs Debian's haproxy when missing);
#      fault:  no-loss fault tests with a ledger, on private clusters of their own: all nine
#              scenarios with the CI workload (tests/fault/fault_e2e.py --quick, ~8.5 min); the
#              test clusters above are stopped first to free the machine;
#   5. prints a summary (and the fault tests' table, with the ledger of any failed scenario) and
#      exits non-zero if any part failed.
#
# Environment knobs:
#   WARREN_PY_TOPOLOGY=single|sharded  clusters behind the proxy for python/celery (default sharded:
#                                      shard-a + shard-b shards and control; single: only shard-a)
#   WARREN_TEST_TARGET=proxy|direct    direct: no proxy; the suites run directly only and the Celery
#                                      test talks to shard-a itself (checks the harness, not warren);
#                                      reload, haproxy and fault are skipped
#   WARREN_E2E_TASKS (10000), WARREN_E2E_WORKERS (3), WARREN_E2E_ARGS (default --management)
#   WARREN_EVACUATE_ARGS (default none: 20,000 messages) arguments of tests/e2e/evacuate_e2e.py
#   WARREN_FAULT_ARGS (default --quick) arguments of tests/fault/fault_e2e.py; "" gives the full
#                                      run (100,000 messages, ~15 min), see docs/reliability.md
#   WARREN_TEST_BIN=PATH               run the python/celery/reload/haproxy/fault parts against this proxy
#                                      binary instead of building target/debug/warren
#   WARREN_KEEP_CLUSTERS=1             leave the clusters running at exit (prints how to stop them)
#   RUST_LOG                           passed to the proxy (default info)
#
# Measured on the 2-core box: clusters up ~20-25 s (in parallel with cargo's build), suites ~45 s
# per target, clients ~10 s plus ~7 s per target for the tutorials, Celery e2e (1000 tasks) ~15 s
# per target, reload ~30 s, evacuate ~35 s, haproxy ~25 s, fault ~8.5 min; see .ci/run for whole-run numbers.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RABBIT="$ROOT/scripts/rabbit.sh"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TOPOLOGY=${WARREN_PY_TOPOLOGY:-sharded}
TARGET=${WARREN_TEST_TARGET:-proxy}

usage() {
    # The header above, up to (not including) its "Measured on" paragraph.
    sed -n '2,/^# Measured on/{/^# Measured on/!p;}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(all)
for p in "${PARTS[@]}"; do
    case "$p" in
    all | rust | python | clients | celery | reload | evacuate | haproxy | fault) ;;
    -h | --help | help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
    esac
done
PART="${PARTS[*]}"

case "$TOPOLOGY" in single | sharded) ;; *) echo "WARREN_PY_TOPOLOGY must be single or sharded" >&2; exit 2 ;; esac
case "$TARGET" in proxy | direct) ;; *) echo "WARREN_TEST_TARGET must be proxy or direct" >&2; exit 2 ;; esac

want() { [[ " $PART " == *" all "* || " $PART " == *" $1 "* ]]; }

T_START=$(date +%s)
say() { printf '\n==> [test.sh +%ss] %s\n' "$(($(date +%s) - T_START))" "$*"; }

declare -a RESULT_NAMES=() RESULT_STATUS=() RESULT_SECS=()
record() { RESULT_NAMES+=("$1"); RESULT_STATUS+=("$2"); RESULT_SECS+=("$3"); }

# A step that compares RabbitMQ directly with warren runs once more if it fails, as the clients
# part's steps do (tests/clients/run.sh): its summary line then says "PASS 2nd", and the first
# run's output stays in the log above and in $LOGS. Celery's own races (a result consumer that
# starts after its replies were sent, a pool process killed by a time limit) make a scenario
# differ now and then on RabbitMQ alone; a difference warren makes shows on both runs.
# $1: the step's name; the rest: the command. COMPARE_RUN is 1 or 2 while it runs.
compare_step() {
    local name=$1 t
    t=$(date +%s)
    shift
    COMPARE_RUN=1
    if "$@"; then
        record "$name" PASS $(($(date +%s) - t))
        return
    fi
    echo "$name: the first run failed (output above, logs in $LOGS); running it once more" >&2
    COMPARE_RUN=2
    if "$@"; then
        record "$name" "PASS 2nd" $(($(date +%s) - t))
    else
        record "$name" FAIL $(($(date +%s) - t))
    fi
}

# Runs a compare script against RabbitMQ directly and through warren and diffs the OBS lines.
# $1: the logs' prefix; $2: the script; the rest: its arguments after the broker URL.
compare_obs() {
    local name=$1 script=$2 run=""
    shift 2
    [ "${COMPARE_RUN:-1}" = 1 ] || run="-2nd"
    local direct="$LOGS/$name-rabbitmq$run" proxied="$LOGS/$name-warren$run"
    if "$PY" "$script" "amqp://guest:guest@$DIRECT//" "$@" >"$direct.txt" 2>"$direct.err" &&
        "$PY" "$script" "$broker" "$@" >"$proxied.txt" 2>"$proxied.err" &&
        diff <(grep '^OBS' "$direct.txt") <(grep '^OBS' "$proxied.txt"); then
        grep -h '^DOC' "$proxied.txt" | sed 's/^/  warren, documented: /'
        return 0
    fi
    tail -n 5 "$direct.err" "$proxied.err"
    return 1
}

compare_frameworks() {
    setup_frameworks_venv &&
        "$FW_VENV/bin/python" tests/e2e/frameworks_compare.py \
            "amqp://guest:guest@$DIRECT/%2F" "${broker%//}/%2F"
}

# ------------------------------------------------------------------------------------------------
# 1. installs (cached)

setup_venv() {
    if [ ! -x "$PY" ]; then
        say "creating venv $VENV"
        if ! python3 -m venv "$VENV"; then
            rm -rf "$VENV"
            say "python3 -m venv failed; installing python3-venv"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    local stamp="$VENV/.warren-requirements.sha256" sum
    sum=$(sha256sum tests/python/requirements.txt | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
        say "installing tests/python/requirements.txt into $VENV"
        "$PY" -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt
        echo "$sum" >"$stamp"
    fi
}

# Dramatiq and nameko (tests/e2e/frameworks_compare.py) get a venv of their own: nameko brings
# eventlet and a pytest plugin that have no business near the py-amqp and kombu suites.
FW_VENV="$ROOT/target/frameworks-venv"
setup_frameworks_venv() {
    local stamp="$FW_VENV/.warren-requirements.sha256" sum
    sum=$(sha256sum tests/python/frameworks-requirements.txt | cut -d' ' -f1)
    [ "$(cat "$stamp" 2>/dev/null)" = "$sum" ] && return 0
    say "installing tests/python/frameworks-requirements.txt into $FW_VENV"
    rm -rf "$FW_VENV"
    python3 -m venv "$FW_VENV" &&
        "$FW_VENV/bin/python" -m pip install -q --disable-pip-version-check \
            -r tests/python/frameworks-requirements.txt &&
        echo "$sum" >"$stamp"
}

# ------------------------------------------------------------------------------------------------
# 2. clusters and teardown

STATE=$(mktemp -d /tmp/warren-test.XXXX)
export WARREN_RABBIT_DIR="$STATE"
LOGS="$STATE/logs"
mkdir -p "$LOGS"
PROXY_PID=
CLUSTERS_PID=
KEEP_LOGS=0

teardown() {
    local rc=$?
    set +e
    if [ -n "$PROXY_PID" ] && kill -0 "$PROXY_PID" 2>/dev/null; then
        kill -TERM "$PROXY_PID" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PROXY_PID" 2>/dev/null
    fi
    # A cluster start still running in the background (Ctrl-C during boot) must finish first, or
    # a node it launches after down-all would outlive the run.
    if [ -n "$CLUSTERS_PID" ] && kill -0 "$CLUSTERS_PID" 2>/dev/null; then
        echo "waiting for the cluster start to finish before tearing down..." >&2
        wait "$CLUSTERS_PID" 2>/dev/null
    fi
    if [ "${WARREN_KEEP_CLUSTERS:-0}" = 1 ]; then
        echo "clusters left running; stop them with: WARREN_RABBIT_DIR=$STATE scripts/rabbit.sh down-all && rm -rf $STATE" >&2
        exit "$rc"
    fi
    if [ "$rc" != 0 ] || [ "$KEEP_LOGS" = 1 ]; then
        # Keep the logs (ours, the proxy's, the nodes') outside the state dir that goes away.
        local keep
        keep=$(mktemp -d /tmp/warren-test-logs.XXXX)
        mkdir -p "$keep/rabbit"
        cp -r "$LOGS"/. "$keep"/ 2>/dev/null
        for d in "$STATE"/nodes/*/log; do
            [ -d "$d" ] && mkdir -p "$keep/rabbit/$(basename "$(dirname "$d")")" \
                && cp "$d"/*.log "$keep/rabbit/$(basename "$(dirname "$d")")/" 2>/dev/null
        done
        for d in "$STATE"/failed-*; do [ -d "$d" ] && cp -r "$d" "$keep/rabbit/" 2>/dev/null; done
        echo "logs kept in $keep" >&2
    fi
    "$RABBIT" down-all >/dev/null 2>&1
    # The fault harness removes its own clusters; this is in case it was killed.
    [ -d "$STATE/fault-rabbit/nodes" ] && WARREN_RABBIT_DIR="$STATE/fault-rabbit" "$RABBIT" down-all >/dev/null 2>&1
    rm -rf "$STATE"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The reload part adds a third shard cluster to a running proxy: it needs shard-c too.
CLUSTER_NAMES=(shard-a shard-b control)
if want reload; then CLUSTER_NAMES+=(shard-c); fi
NEED_CLUSTERS=0
if want rust || want python || want clients || want celery || want reload || want evacuate || want haproxy; then NEED_CLUSTERS=1; fi

start_clusters() { # runs in the background; writes $STATE/<name>.addr
    local name pids=() rc=0
    # Survive Ctrl-C (it reaches the whole process group): teardown waits for this to finish and
    # only then stops the nodes, so that none is launched after down-all has looked.
    trap '' INT
    for name in "${CLUSTER_NAMES[@]}"; do
        "$RABBIT" up "$name" auto auto >"$STATE/$name.addr" 2>"$LOGS/rabbit-up-$name.log" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    return $rc
}

addr_of() { # NAME INDEX -> 127.0.0.1:PORT
    awk -v i="$2" '{print $(i + 1)}' "$STATE/$1.addr"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# ------------------------------------------------------------------------------------------------

say "installing what is missing (cached)"
"$RABBIT" install
if want rust && [ ! -x /usr/bin/chromium ]; then
    # tests/admin_page.rs renders the admin status page in headless Chromium.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium ||
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
fi
if want rust && ! command -v systemd-analyze >/dev/null 2>&1; then
    # tests/systemd.rs checks deploy/systemd/warren.service with `systemd-analyze verify`.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd ||
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd; }
fi
if want rust && ! command -v promtool >/dev/null 2>&1; then
    # tests/admin_metrics.rs runs `promtool check metrics` on /metrics and `promtool check rules`
    # on deploy/prometheus/warren-alerts.yml; Debian's prometheus package has promtool. Its
    # service is not wanted: stopped if the install started it.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus ||
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        systemctl disable --now prometheus || true
    fi
fi
if want rust; then
    # promtool and check-jsonschema are installed: the tests must run them, not skip.
    export WARREN_REQUIRE_TOOLS=1
fi
if want clients; then
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" ||
            { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; }
    }
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || apt_install nodejs npm
    # `java File.java` compiles the source in memory: it needs a JDK, not only a JRE.
    command -v javac >/dev/null 2>&1 || apt_install default-jdk-headless
    [ -f /usr/share/java/amqp-client.jar ] || apt_install librabbitmq-client-java
    # php-amqplib with the rabbitmq-c tools, Ruby's Bunny and Go's amqp091-go: Debian's packages.
    { command -v php >/dev/null 2>&1 && [ -f /usr/share/php/PhpAmqpLib/autoload.php ]; } ||
        apt_install php-cli php-amqplib
    command -v amqp-publish >/dev/null 2>&1 || apt_install amqp-tools
    { command -v ruby >/dev/null 2>&1 && ruby -e 'require "bunny"' 2>/dev/null; } || apt_install ruby ruby-bunny
    { command -v go >/dev/null 2>&1 && [ -d /usr/share/gocode/src/github.com/rabbitmq/amqp091-go ]; } ||
        apt_install golang-go golang-github-rabbitmq-amqp091-go-dev
    lock_sum=$(sha256sum tests/clients/package-lock.json | cut -d' ' -f1)
    if [ "$(cat tests/clients/node_modules/.warren-lock.sha256 2>/dev/null)" != "$lock_sum" ]; then
        say "npm ci in tests/clients (amqplib)"
        (cd tests/clients && npm ci --no-audit --no-fund) && echo "$lock_sum" >tests/clients/node_modules/.warren-lock.sha256
    fi
fi
if want haproxy && [ "$TARGET" = proxy ] && ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
    # tests/e2e/haproxy_e2e.py runs Debian's haproxy in front of two warren instances. Its
    # service is not wanted (the test starts its own): stopped if the install started it.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy ||
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy; }
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet haproxy 2>/dev/null; then
        systemctl disable --now haproxy || true
    fi
fi
# The Rust part needs the venv too: tests/compose.rs runs its check-jsonschema.
if want rust || want python || want clients || want celery || want reload || want evacuate || want haproxy || want fault; then
    setup_venv
    if want python; then "$PY" tests/python/run_suites.py setup; fi
fi

T_CL=$(date +%s)
if [ "$NEED_CLUSTERS" = 1 ]; then
    say "starting clusters ${CLUSTER_NAMES[*]} in $STATE (in the background)"
    start_clusters &
    CLUSTERS_PID=$!
fi

# Compile while the nodes boot.
BUILD_OK=1
if want rust; then
    say "cargo test --all-targets --no-run (compiling while the clusters start)"
    cargo test --all-targets --no-run || BUILD_OK=0
fi
WARREN_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/warren"
PROXY_BUILD_OK=1
if [ -n "${WARREN_TEST_BIN:-}" ]; then
    WARREN_BIN=$(realpath "$WARREN_TEST_BIN")
    say "using WARREN_TEST_BIN=$WARREN_BIN (not building the proxy)"
    [ -x "$WARREN_BIN" ] || { echo "WARREN_TEST_BIN: $WARREN_BIN is not executable" >&2; PROXY_BUILD_OK=0; }
elif [ "$TARGET" = proxy ] && { want python || want clients || want celery || want reload || want evacuate || want haproxy || want fault; }; then
    say "cargo build --bin warren"
    cargo build --bin warren || PROXY_BUILD_OK=0
fi

if [ "$NEED_CLUSTERS" = 1 ]; then
    if ! wait "$CLUSTERS_PID"; then
        echo "starting the clusters failed:" >&2
        tail -n 30 "$LOGS"/rabbit-up-*.log >&2
        exit 1
    fi
    say "clusters up after $(($(date +%s) - T_CL))s: $(for n in "${CLUSTER_NAMES[@]}"; do cat "$STATE/$n.addr"; done | tr '\n' ';')"
    WARREN_TEST_CLUSTERS=""
    # shard-c (reload part only) is left out: the Rust tests use shard-a, shard-b and control.
    for name in shard-a shard-b control; do
        WARREN_TEST_CLUSTERS+="${WARREN_TEST_CLUSTERS:+;}$name=$(addr_of "$name" 1),$(addr_of "$name" 2)"
    done
    export WARREN_TEST_CLUSTERS
    echo "WARREN_TEST_CLUSTERS=$WARREN_TEST_CLUSTERS"
    WARREN_TEST_MANAGEMENT=""
    for name in shard-a shard-b control; do
        urls=$("$RABBIT" management "$name" 2>/dev/null | cut -d' ' -f2- | tr ' ' ',') || urls=""
        [ -z "$urls" ] || WARREN_TEST_MANAGEMENT+="${WARREN_TEST_MANAGEMENT:+;}$name=$urls"
    done
    export WARREN_TEST_MANAGEMENT
    echo "WARREN_TEST_MANAGEMENT=$WARREN_TEST_MANAGEMENT"
    echo "WARREN_RABBIT_DIR=$WARREN_RABBIT_DIR"
fi

# ------------------------------------------------------------------------------------------------
# 3. Rust

if want rust; then
    say "cargo test --all-targets --no-fail-fast"
    t0=$(date +%s)
    if [ "$BUILD_OK" = 1 ] && cargo test --all-targets --no-fail-fast; then
        record rust PASS $(($(date +%s) - t0))
    else
        record rust FAIL $(($(date +%s) - t0))
    fi
fi

# ------------------------------------------------------------------------------------------------
# 4. proxy + Python suites + Celery

write_config() { # FILE LISTEN_PORT ADMIN_PORT
    {
        echo "# written by scripts/test.sh (topology: $TOPOLOGY)"
        echo "listen = \"127.0.0.1:$2\""
        echo
        echo "[admin]"
        echo "listen = \"127.0.0.1:$3\""
        local name role
        local clusters=(shard-a)
        [ "$TOPOLOGY" = sharded ] && clusters=(shard-a shard-b control)
        for name in "${clusters[@]}"; do
            role=shard
            [ "$name" = control ] && role=control
            echo
            echo "[[clusters]]"
            echo "name = \"$name\""
            echo "role = \"$role\""
            echo "nodes = [\"$(addr_of "$name" 1)\", \"$(addr_of "$name" 2)\"]"
        done
        if [ "$TOPOLOGY" = sharded ]; then
            # tests/e2e/celery_rules_e2e.py: Celery's fast queue kept on shard-a.
            echo
            echo "[[routing.rules]]"
            echo "match = [\"rules-fast.*\"]"
            echo "clusters = [\"shard-a\"]"
        fi
    } >"$1"
}

start_proxy() { # sets PROXY_ADDR; returns non-zero if the proxy does not come up
    local port admin cfg="$STATE/proxy.toml" i
    port=$(free_port)
    admin=$(free_port)
    while [ "$admin" = "$port" ]; do admin=$(free_port); done
    write_config "$cfg" "$port" "$admin"
    echo "--- $cfg"
    cat "$cfg"
    echo "---"
    RUST_LOG=${RUST_LOG:-info} "$WARREN_BIN" --config "$cfg" >"$LOGS/warren.log" 2>&1 &
    PROXY_PID=$!
    for i in $(seq 1 300); do
        if ! kill -0 "$PROXY_PID" 2>/dev/null; then
            echo "warren exited during startup; log tail:" >&2
            tail -n 40 "$LOGS/warren.log" >&2
            PROXY_PID=
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            PROXY_ADDR="127.0.0.1:$port"
            ADMIN_ADDR="127.0.0.1:$admin"
            echo "warren (pid $PROXY_PID) accepts on $PROXY_ADDR, admin 127.0.0.1:$admin; log $LOGS/warren.log"
            return 0
        fi
        sleep 0.1
    done
    echo "warren did not accept on 127.0.0.1:$port within 30 s; log tail:" >&2
    tail -n 40 "$LOGS/warren.log" >&2
    return 1
}

stop_proxy() {
    [ -n "$PROXY_PID" ] || return 0
    kill -TERM "$PROXY_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$PROXY_PID" 2>/dev/null; then
        echo "warren did not exit within 10 s of SIGTERM; killing" >&2
        kill -KILL "$PROXY_PID" 2>/dev/null || true
    fi
    wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=
}

if want python || want clients || want celery; then
    DIRECT="$(addr_of shard-a 1)"
    PROXY_ADDR=
    PROXY_UP=0
    if [ "$TARGET" = proxy ]; then
        if [ "$PROXY_BUILD_OK" = 1 ]; then
            say "starting warren ($TOPOLOGY topology)"
            if start_proxy; then PROXY_UP=1; fi
        else
            say "not starting warren: cargo build --bin warren failed (see above)"
        fi
    fi
    RESET="scripts/rabbit.sh wipe shard-a"
    [ "$TOPOLOGY" = sharded ] && RESET="$RESET && scripts/rabbit.sh wipe shard-b && scripts/rabbit.sh wipe control"

    if want python; then
        say "python: py-amqp and kombu integration suites ($TARGET)"
        t0=$(date +%s)
        args=(run --direct "$DIRECT" --out "$LOGS/suites" --reset-cmd "$RESET")
        [ "$TOPOLOGY" = sharded ] && args+=(--sharded)
        ok=1
        if [ "$TARGET" = proxy ]; then
            if [ "$PROXY_UP" = 1 ]; then
                args+=(--proxy "$PROXY_ADDR")
            else
                echo "warren is not running: the suites run directly only and the part fails" >&2
                ok=0
            fi
        fi
        "$PY" tests/python/run_suites.py "${args[@]}" || ok=0
        if [ "$ok" = 1 ]; then record python PASS $(($(date +%s) - t0)); else record python FAIL $(($(date +%s) - t0)); fi
    fi

    if want clients; then
        say "clients: pika, amqplib, Java, tutorials ($TARGET)"
        t0=$(date +%s)
        ok=1
        if [ "$TARGET" = proxy ] && [ "$PROXY_UP" = 0 ]; then
            echo "warren is not running: the clients run directly only and the part fails" >&2
            ok=0
        fi
        proxy_arg=()
        [ "$TARGET" = proxy ] && [ "$PROXY_UP" = 1 ] && proxy_arg=("$PROXY_ADDR")
        WARREN_VENV_PY="$PY" WARREN_ADMIN="${ADMIN_ADDR:-}" WARREN_DIRECT_CTL="$RABBIT ctl shard-a-1" \
            WARREN_CLIENTS_LOGS="$LOGS/clients" tests/clients/run.sh "$DIRECT" "${proxy_arg[@]}" || ok=0
        if [ "$ok" = 1 ]; then record clients PASS $(($(date +%s) - t0)); else record clients FAIL $(($(date +%s) - t0)); fi
    fi

    if want celery; then
        say "celery: end to end ($TARGET)"
        t0=$(date +%s)
        if [ "$TARGET" = direct ]; then
            broker="amqp://guest:guest@$DIRECT//"
        else
            broker="amqp://guest:guest@$PROXY_ADDR//"
        fi
        # shellcheck disable=SC2086
        if { [ "$TARGET" = direct ] || [ "$PROXY_UP" = 1 ]; } &&
            "$PY" tests/e2e/celery_e2e.py "$broker" "${WARREN_E2E_TASKS:-10000}" "${WARREN_E2E_WORKERS:-3}" ${WARREN_E2E_ARGS:---management}; then
            record celery PASS $(($(date +%s) - t0))
            if [ "$TARGET" = proxy ]; then
                # GET /clients and POST /clients/ID/close with pika and a Celery connection.
                t1=$(date +%s)
                if "$PY" tests/e2e/clients_e2e.py "$PROXY_ADDR" "$ADMIN_ADDR"; then
                    record celery-clients PASS $(($(date +%s) - t1))
                else
                    record celery-clients FAIL $(($(date +%s) - t1))
                fi
            fi
            if [ "$TARGET" = proxy ] && [ "$TOPOLOGY" = sharded ] && [ -n "$WARREN_TEST_MANAGEMENT" ]; then
                # Flower's broker tab, with Flower's own code, through a warren of its own
                # whose shard clusters have `management`: the sums, as one broker shows them.
                t1=$(date +%s)
                if "$PY" tests/e2e/flower_e2e.py "$WARREN_BIN" "$LOGS/celery-flower-warren.log" 2>&1 |
                    tee "$LOGS/celery-flower.txt"; [ "${PIPESTATUS[0]}" = 0 ]; then
                    record celery-flower PASS $(($(date +%s) - t1))
                else
                    record celery-flower FAIL $(($(date +%s) - t1))
                fi
            fi
            if [ "$TARGET" = proxy ] && [ "$TOPOLOGY" = sharded ]; then
                # Both shard clusters must have carried tasks (warren's own per-cluster counters).
                metrics=$(python3 -c "import urllib.request,sys; print(urllib.request.urlopen('http://$ADMIN_ADDR/metrics').read().decode())")
                a=$(echo "$metrics" | awk '/^warren_publishes_total\{cluster="shard-a"\}/ {print $2}')
                b=$(echo "$metrics" | awk '/^warren_publishes_total\{cluster="shard-b"\}/ {print $2}')
                echo "publishes through warren: shard-a ${a:-0}, shard-b ${b:-0}"
                if [ "${a%.*}" -gt 1000 ] 2>/dev/null && [ "${b%.*}" -gt 1000 ] 2>/dev/null; then
                    record celery-spread PASS 0
                else
                    record celery-spread FAIL 0
                fi
                # Celery's features (canvas, ETA, retries, revoke, time limits, broadcast,
                # control, beat, ...) directly and through warren, compared line by line.
                compare_step celery-patterns compare_obs patterns tests/e2e/celery_patterns.py
                # More of Celery and kombu (two workers on one queue, topic/headers routing,
                # dead-lettering, quorum queues and native delayed delivery, the CLI, races for
                # exclusive queues) directly and through warren, compared line by line.
                compare_step celery-more compare_obs more tests/e2e/celery_more.py --drop-delayed
                # Dramatiq and nameko (delays, retries, dead-letters, RPC, events) directly and
                # through warren, compared.
                compare_step frameworks compare_frameworks
                # kombu's and Celery's everyday patterns (SimpleQueue, Broadcast, pidbox, ensure,
                # QoS at runtime, remote control, ...) directly and through warren, compared.
                compare_step kombu-edge "$PY" tests/e2e/kombu_edge.py "amqp://guest:guest@$DIRECT//" "$broker"
                # A routing rule: fast tasks only on shard-a, checked on each cluster directly.
                t1=$(date +%s)
                if "$PY" tests/e2e/celery_rules_e2e.py "$broker" "$(addr_of shard-a 1)" "$(addr_of shard-b 1)"; then
                    record celery-rules PASS $(($(date +%s) - t1))
                else
                    record celery-rules FAIL $(($(date +%s) - t1))
                fi
            fi
        else
            [ "$TARGET" = proxy ] && [ "$PROXY_UP" = 0 ] && echo "warren is not running: celery part fails" >&2
            record celery FAIL $(($(date +%s) - t0))
        fi
    fi

    if [ "$TARGET" = proxy ] && [ "$PROXY_UP" = 1 ]; then
        if ! kill -0 "$PROXY_PID" 2>/dev/null; then
            echo "warren died during the tests; log tail:" >&2
            tail -n 40 "$LOGS/warren.log" >&2
            record proxy-alive FAIL 0
            PROXY_PID=
        fi
        stop_proxy
    fi
fi

# ------------------------------------------------------------------------------------------------
# 4b. reload, haproxy and fault tests (each starts its own proxy)

if [ "$TARGET" = direct ] && { want reload || want evacuate || want haproxy || want fault; }; then
    say "reload, evacuate, haproxy, fault: skipped (WARREN_TEST_TARGET=direct; they test the proxy)"
fi

if want reload && [ "$TARGET" = proxy ]; then
    say "reload: add and drain a third shard cluster under load; invalid files"
    t0=$(date +%s)
    if [ "$PROXY_BUILD_OK" = 1 ] && "$PY" tests/e2e/reload_e2e.py "$WARREN_BIN" \
        --shard-a "$(addr_of shard-a 1),$(addr_of shard-a 2)" \
        --shard-b "$(addr_of shard-b 1),$(addr_of shard-b 2)" \
        --shard-c "$(addr_of shard-c 1),$(addr_of shard-c 2)" \
        --control "$(addr_of control 1),$(addr_of control 2)"; then
        record reload PASS $(($(date +%s) - t0))
    else
        record reload FAIL $(($(date +%s) - t0))
    fi
fi

if want evacuate && [ "$TARGET" = proxy ]; then
    say "evacuate: move shard-a's backlog to shard-b, with a SIGKILL of warren halfway"
    t0=$(date +%s)
    # shellcheck disable=SC2086 # WARREN_EVACUATE_ARGS is a list of arguments
    if [ "$PROXY_BUILD_OK" = 1 ] && "$PY" tests/e2e/evacuate_e2e.py "$WARREN_BIN" \
        --shard-a "$(addr_of shard-a 1),$(addr_of shard-a 2)" \
        --shard-b "$(addr_of shard-b 1),$(addr_of shard-b 2)" \
        --control "$(addr_of control 1),$(addr_of control 2)" ${WARREN_EVACUATE_ARGS:-}; then
        record evacuate PASS $(($(date +%s) - t0))
    else
        record evacuate FAIL $(($(date +%s) - t0))
    fi
fi

if want haproxy && [ "$TARGET" = proxy ]; then
    say "haproxy: two warren instances behind HAProxy (Celery with reloads, depths, rolling stop)"
    t0=$(date +%s)
    if [ "$PROXY_BUILD_OK" = 1 ] && "$PY" tests/e2e/haproxy_e2e.py "$WARREN_BIN" \
        --shard-a "$(addr_of shard-a 1),$(addr_of shard-a 2)" \
        --shard-b "$(addr_of shard-b 1),$(addr_of shard-b 2)" \
        --control "$(addr_of control 1),$(addr_of control 2)"; then
        record haproxy PASS $(($(date +%s) - t0))
    else
        record haproxy FAIL $(($(date +%s) - t0))
    fi
fi

FAULT_SUMMARY="$LOGS/fault-summary.txt"
if want fault && [ "$TARGET" = proxy ]; then
    # The fault tests start clusters of their own and are timing-sensitive (heartbeat detection,
    # failover): stop the test clusters first (their logs are kept for a failed run).
    if [ "$NEED_CLUSTERS" = 1 ] && [ "${WARREN_KEEP_CLUSTERS:-0}" != 1 ]; then
        for d in "$STATE"/nodes/*/log; do
            [ -d "$d" ] && mkdir -p "$LOGS/rabbit/$(basename "$(dirname "$d")")" \
                && cp "$d"/*.log "$LOGS/rabbit/$(basename "$(dirname "$d")")/" 2>/dev/null
        done
        say "stopping the test clusters before the fault tests"
        "$RABBIT" down-all >/dev/null 2>&1 || true
    fi
    FAULT_ARGS=${WARREN_FAULT_ARGS---quick}
    say "fault: no-loss fault tests (tests/fault/fault_e2e.py ${FAULT_ARGS:-<full run>})"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    # The fault clusters need no management API (and its statistics would only add load to
    # the timings of kills and restarts).
    if [ "$PROXY_BUILD_OK" = 1 ] && WARREN_RABBIT_MANAGEMENT=0 "$PY" tests/fault/fault_e2e.py --warren "$WARREN_BIN" $FAULT_ARGS \
        --rabbit-dir "$STATE/fault-rabbit" --summary-file "$FAULT_SUMMARY"; then
        record fault PASS $(($(date +%s) - t0))
    else
        record fault FAIL $(($(date +%s) - t0))
    fi
fi

# ------------------------------------------------------------------------------------------------
# 5. summary

passed=0
failed=0
echo
echo "==================== scripts/test.sh summary ($PART, target $TARGET, topology $TOPOLOGY) ===================="
for i in "${!RESULT_NAMES[@]}"; do
    printf '  %-12s %-8s %5ss\n' "${RESULT_NAMES[$i]}" "${RESULT_STATUS[$i]}" "${RESULT_SECS[$i]}"
    if [ "${RESULT_STATUS[$i]%% *}" = PASS ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
# A failed part whose output has a file of its own: its end here too, where a CI log's tail shows it.
for i in "${!RESULT_NAMES[@]}"; do
    out="$LOGS/${RESULT_NAMES[$i]}.txt"
    if [ "${RESULT_STATUS[$i]%% *}" != PASS ] && [ -s "$out" ]; then
        echo "  --- ${RESULT_NAMES[$i]}: the end of its output ($out)"
        tail -n 25 "$out" | sed 's/^/    /'
    fi
done
echo "  total time $(($(date +%s) - T_START))s"
if [ -s "$FAULT_SUMMARY" ]; then
    echo
    echo "fault tests (tests/fault/fault_e2e.py; details and every check above):"
    sed 's/^/  /' "$FAULT_SUMMARY"
fi
if [ -s "$LOGS/clients/failed.txt" ]; then
    echo
    echo "clients: the steps that failed at least once (tests/clients/run.sh; every step's output in $LOGS/clients):"
    sed 's/^/  /' "$LOGS/clients/failed.txt"
fi
[ "$failed" = 0 ] || KEEP_LOGS=1
echo "test.sh: $passed passed, $failed failed"
[ "$failed" = 0 ]
