#!/usr/bin/env bash
# scripts/rabbit.sh — start/stop local RabbitMQ nodes and two-node clusters for warren's tests.
#
# Everything lives under one state dir (${WARREN_RABBIT_DIR:-/tmp/warren-rabbit}):
#   .erlang.cookie          shared cookie (0400); the dir is HOME for the server and the CLI
#   nodes/<NODE>/           one folder per node (NODE = <cluster>-1, <cluster>-2)
#     node.env              ERLNAME, PORT, DIST_PORT, MGMT_PORT, CLUSTER (written at creation,
#                           reused on restart; MGMT_PORT is empty for a node without management)
#     rabbitmq.conf, enabled_plugins ([rabbitmq_management] or empty), mnesia/, log/, pid
#
# Every node runs the management plugin (its HTTP API and UI, user guest/guest) on 127.0.0.1 at
# its AMQP port + 10000 (5701 -> 15701, as 5672 -> 15672 for RabbitMQ's defaults), unless
# WARREN_RABBIT_MANAGEMENT=0 when the node is created. `management NAME` prints a cluster's API
# URLs. Queue statistics are collected every second (collect_statistics_interval = 1000, 5 s by
# default) so that the API's queue depths follow the tests closely.
#
# Every rabbitmqctl call is a short-lived hidden Erlang node that must bind a port in
# RABBITMQ_CTL_DIST_PORT_MIN..MAX (default 35672..35682: only 11 CLI calls at once machine-wide);
# the range is widened to 200 ports because parallel `up`s, test runs and sessions all poll.
#
# Erlang node names are "warren-<NODE>@localhost" for the default state dir. For any other state
# dir the prefix also carries a short hash of the dir ("warren<hash>-<NODE>@localhost"), because
# epmd is shared by the whole machine: two test runs with their own state dirs must not both
# register "warren-shard-a-1".
#
# Ports given as "auto" are picked at random in [6000,12700] so that the distribution port
# (port + 20000) stays below the kernel's ephemeral range (32768+) and away from the CLI's
# 35672-35871; the management port (port + 10000) is then in [16000,22700], clear of both. Picked
# ports are reserved machine-wide in /tmp/warren-rabbit-ports/ (one file per AMQP port naming the
# state dir; the other two ports go with it) so parallel callers do not pick the same ones.
#
# Measured on the 2-core Debian 12 box (RabbitMQ 3.10.8, OTP 25), machine otherwise idle:
#   `up NAME auto auto` (2 nodes booting in parallel + join + policy) ...... ~13 s
#       (boot of both nodes ~10.5 s, join_cluster ~2.5 s, set_policy <1 s)
#   three `up` in parallel (what scripts/test.sh does, 6 nodes) ............ ~21 s
#   `up` of a cluster that is already up ..................................... ~1 s
#   `kill-node` ~1.5 s; `start-node` (restart, rejoins its cluster) ......... ~7 s
#       (also right after `kill-node`: TIME_WAIT sockets on the node's ports do not delay it)
#   `stop-node` ~3.5 s; `down NAME` ~3 s; `wipe NAME` ~1 s
# With other sessions compiling Rust on the same 2 cores (load ~10), three parallel `up`s took
# 35-65 s: hence the generous default startup timeout.
#
# Environment: WARREN_RABBIT_DIR (state dir), WARREN_RABBIT_TIMEOUT (s per node start, default
# 120), WARREN_RABBIT_ERL_ARGS (extra VM flags for started nodes, e.g. "-kernel net_ticktime 10"),
# WARREN_RABBIT_MANAGEMENT (1, the default: new nodes run the management plugin; 0: they do not).
set -euo pipefail

RABBIT_BIN=${RABBIT_BIN:-/usr/lib/rabbitmq/bin}
STATE_DIR=${WARREN_RABBIT_DIR:-/tmp/warren-rabbit}
DEFAULT_STATE_DIR=/tmp/warren-rabbit
PORT_REG=${WARREN_RABBIT_PORT_REGISTRY:-/tmp/warren-rabbit-ports}
STARTUP_TIMEOUT=${WARREN_RABBIT_TIMEOUT:-120}
# Extra Erlang VM flags for every node we start (e.g. "-kernel net_ticktime 10").
EXTRA_ERL_ARGS=${WARREN_RABBIT_ERL_ARGS:-}
# New nodes run the management plugin on their AMQP port + MGMT_OFFSET.
MANAGEMENT=${WARREN_RABBIT_MANAGEMENT:-1}
MGMT_OFFSET=10000

usage() {
    cat <<EOF
usage: scripts/rabbit.sh COMMAND [ARGS]

  install                      apt-get install rabbitmq-server if rabbitmqctl is missing
  up NAME PORT1 PORT2          two-node cluster NAME-1/NAME-2 (ports may be 'auto'), ha-all policy;
                               prints "NAME 127.0.0.1:P1 127.0.0.1:P2" on stdout (the nodes'
                               management APIs are on P1+10000 and P2+10000: see 'management')
  up-single NAME PORT          one-node "cluster" NAME-1; prints "NAME 127.0.0.1:P"
  up-single-tls NAME PORT CERTDIR [verify-peer]
                               one-node "cluster" NAME-1 that speaks only amqps on PORT (no plain
                               listener), with CERTDIR/ca.pem, server.pem, server.key (PEM, copied
                               into the node's dir); verify-peer: clients must present a
                               certificate signed by ca.pem (default: client certificates are
                               not asked for); prints "NAME 127.0.0.1:P"
  stop-node NODE               clean stop (rabbitmqctl stop)
  kill-node NODE               kill -9 the node's beam.smp
  start-node NODE              start a stopped/killed node again with its data dir and port
  stop-app NODE | start-app NODE
  pause-node NODE | resume-node NODE   SIGSTOP / SIGCONT the node's beam.smp
  ctl NODE ARGS...             rabbitmqctl -n <erlang name of NODE> ARGS...
  port NODE                    print the node's AMQP port
  management-port NODE         print the node's management (HTTP API) port
  management NAME              print "NAME http://127.0.0.1:M1 http://127.0.0.1:M2": the management
                               API of each node of cluster NAME (user guest, password guest); fails
                               for a cluster made without the plugin (WARREN_RABBIT_MANAGEMENT=0,
                               or an older rabbit.sh): 'down NAME' and 'up' it again
  wipe NAME                    delete every queue and non-default exchange in vhost / of cluster
                               NAME (test isolation; prints "queues exchanges" deleted)
  down NAME                    stop the cluster's nodes and delete their dirs
  down-all                     down every cluster in the state dir
  status                       list nodes in the state dir

NODE is <cluster>-1 or <cluster>-2 (e.g. shard-a-2).
State dir: \$WARREN_RABBIT_DIR (now: $STATE_DIR). Logs go to stderr, results to stdout.
EOF
}

log() { printf '[rabbit.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

now_ms() { date +%s%3N; }

# ---------------------------------------------------------------------------------------------
# naming and per-node environment

name_prefix() {
    local dir
    dir=$(cd "$STATE_DIR" 2>/dev/null && pwd -P || echo "$STATE_DIR")
    if [ "$dir" = "$DEFAULT_STATE_DIR" ]; then
        echo "warren"
    else
        echo "warren$(printf '%s' "$dir" | cksum | awk '{printf "%x", $1 % 1048576}')"
    fi
}

node_dir() { echo "$STATE_DIR/nodes/$1"; }

ensure_state_dir() {
    mkdir -p "$STATE_DIR/nodes"
    if [ ! -f "$STATE_DIR/.erlang.cookie" ]; then
        local cookie
        cookie=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr 'a-f' 'A-F')
        (umask 077 && printf '%s' "$cookie" >"$STATE_DIR/.erlang.cookie.tmp")
        mv "$STATE_DIR/.erlang.cookie.tmp" "$STATE_DIR/.erlang.cookie" 2>/dev/null || true
        chmod 0400 "$STATE_DIR/.erlang.cookie"
    fi
}

# Load node.env of NODE into ERLNAME/PORT/DIST_PORT/CLUSTER; fail if the node is unknown.
load_node() {
    local node=$1 dir
    dir=$(node_dir "$node")
    [ -f "$dir/node.env" ] || die "unknown node '$node' (no $dir/node.env); see 'status'"
    ERLNAME='' PORT='' DIST_PORT='' MGMT_PORT='' CLUSTER=''
    : "$CLUSTER"
    # shellcheck disable=SC1091
    . "$dir/node.env"
}

# Run a command with the environment RabbitMQ's scripts need for NODE (after load_node).
with_node_env() {
    local dir
    dir=$(node_dir "$NODE")
    env HOME="$STATE_DIR" \
        RABBITMQ_NODENAME="$ERLNAME" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$PORT" \
        RABBITMQ_DIST_PORT="$DIST_PORT" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_PID_FILE="$dir/pid" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
        RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
        RABBITMQ_CTL_DIST_PORT_MIN=35672 RABBITMQ_CTL_DIST_PORT_MAX=35871 \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} $EXTRA_ERL_ARGS" \
        "$@"
}

ctl_node() { # NODE must be loaded
    with_node_env "$RABBIT_BIN/rabbitmqctl" -n "$ERLNAME" "$@"
}

# Pid of the node's beam.smp if it is alive, else nothing. The pid file is written only some way
# into the boot, so a node that is still booting is found by the RABBITMQ_NODENAME in its
# environment instead (needed so that `down` right after `up` started does not orphan it).
beam_pid() {
    local f pid p
    f="$(node_dir "$NODE")/pid"
    if [ -s "$f" ]; then
        pid=$(tr -dc '0-9' <"$f")
        if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && grep -q '^beam' "/proc/$pid/comm" \
            && ! is_zombie "$pid"; then
            echo "$pid"
            return 0
        fi
    fi
    for p in $(pgrep -x beam.smp 2>/dev/null || true); do
        if tr '\0' '\n' 2>/dev/null <"/proc/$p/environ" | grep -qx "RABBITMQ_NODENAME=$ERLNAME" \
            && ! is_zombie "$p"; then
            echo "$p"
            return 0
        fi
    done
}

is_zombie() { # PID: exited but not reaped yet (counts as dead)
    local st
    st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null || true)
    [ "$st" = Z ]
}

# Wait until PID is gone (or a zombie); at most SECS seconds. Returns 1 if it is still alive.
wait_gone() {
    local pid=$1 secs=$2 i
    for i in $(seq 1 $((secs * 10))); do
        if ! kill -0 "$pid" 2>/dev/null || is_zombie "$pid"; then return 0; fi
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------------------------------------
# ports

port_free() { # PORT: nothing listening/bound on it (any address)
    python3 - "$1" <<'PY'
import socket, sys
p = int(sys.argv[1])
for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "127.0.0.1")):
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.bind((addr, p))
    except OSError:
        sys.exit(1)
    finally:
        s.close()
PY
}

# PORT can be listened on by a node that binds it itself: no socket LISTENs on it (any address).
# Unlike port_free, sockets in TIME_WAIT do not count: RabbitMQ's AMQP listener and the Erlang
# distribution listener both bind with SO_REUSEADDR, which Linux allows next to TIME_WAIT sockets
# on the port, so the test bind does the same. Used when (re)starting a node on the port it owns:
# after `kill-node` its AMQP and distribution ports keep TIME_WAIT sockets for up to 60 s, and a
# bind without SO_REUSEADDR (port_free) would refuse the restart that long. pick_port keeps the
# stricter port_free for fresh ports.
port_listenable() {
    python3 - "$1" <<'PY'
import socket, sys
p = int(sys.argv[1])
for addr in ("0.0.0.0", "127.0.0.1"):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((addr, p))
    except OSError:
        sys.exit(1)
    finally:
        s.close()
PY
}

reg_lock() { exec 9>"$PORT_REG.lock"; flock 9; }
reg_unlock() { flock -u 9; exec 9>&-; }

# A port is reserved by another state dir that still exists.
port_reserved_elsewhere() {
    local f="$PORT_REG/$1" owner
    [ -f "$f" ] || return 1
    owner=$(cat "$f" 2>/dev/null || true)
    [ "$owner" = "$STATE_DIR" ] && return 1
    [ -d "$owner" ] && return 0
    rm -f "$f" # owner dir is gone: stale reservation
    return 1
}

reserve_port() { mkdir -p "$PORT_REG"; printf '%s' "$STATE_DIR" >"$PORT_REG/$1"; }
release_port() {
    local f="$PORT_REG/$1"
    if [ -f "$f" ] && [ "$(cat "$f" 2>/dev/null)" = "$STATE_DIR" ]; then rm -f "$f"; fi
}

# Pick a free port P (P, P+20000 and, with management, P+10000 free, not reserved), reserve it,
# print it. Caller holds lock.
pick_port() {
    local tries=0 p
    while [ $tries -lt 200 ]; do
        tries=$((tries + 1))
        p=$((6000 + RANDOM % 6700))
        port_reserved_elsewhere "$p" && continue
        [ -f "$PORT_REG/$p" ] && continue # reserved by us (another node of ours)
        port_free "$p" || continue
        port_free $((p + 20000)) || continue
        if [ "$MANAGEMENT" = 1 ]; then port_free $((p + MGMT_OFFSET)) || continue; fi
        reserve_port "$p"
        echo "$p"
        return 0
    done
    die "could not find a free port pair"
}

# ---------------------------------------------------------------------------------------------
# node lifecycle

# For up-single-tls: the certificate dir and the client verification mode of new nodes.
TLS_CERTDIR=
TLS_VERIFY=verify_none

# create_node NODE CLUSTER PORT: write the node's dir and config (does not start it). With
# TLS_CERTDIR set, PORT is an amqps listener and there is no plain one. With MANAGEMENT=1 the
# management plugin listens on 127.0.0.1:PORT+MGMT_OFFSET (plain HTTP).
create_node() {
    local node=$1 cluster=$2 port=$3 dir mgmt_port=
    dir=$(node_dir "$node")
    mkdir -p "$dir/mnesia" "$dir/log"
    : >"$dir/rabbitmq-env.conf"
    if [ "$MANAGEMENT" = 1 ]; then
        mgmt_port=$((port + MGMT_OFFSET))
        printf '[rabbitmq_management].\n' >"$dir/enabled_plugins"
    else
        printf '[].\n' >"$dir/enabled_plugins"
    fi
    if [ -n "$TLS_CERTDIR" ]; then
        mkdir -p "$dir/tls"
        cp "$TLS_CERTDIR/ca.pem" "$TLS_CERTDIR/server.pem" "$TLS_CERTDIR/server.key" "$dir/tls/"
        local fail_if_no_cert=false
        [ "$TLS_VERIFY" = verify_peer ] && fail_if_no_cert=true
        cat >"$dir/rabbitmq.conf" <<EOF
loopback_users = none
cluster_name = $cluster
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:$port
ssl_options.cacertfile = $dir/tls/ca.pem
ssl_options.certfile = $dir/tls/server.pem
ssl_options.keyfile = $dir/tls/server.key
ssl_options.verify = $TLS_VERIFY
ssl_options.fail_if_no_peer_cert = $fail_if_no_cert
log.console = false
log.file.level = info
EOF
    else
        cat >"$dir/rabbitmq.conf" <<EOF
loopback_users = none
cluster_name = $cluster
listeners.tcp.default = 127.0.0.1:$port
log.console = false
log.file.level = info
EOF
    fi
    if [ -n "$mgmt_port" ]; then
        cat >>"$dir/rabbitmq.conf" <<EOF
management.tcp.ip = 127.0.0.1
management.tcp.port = $mgmt_port
collect_statistics_interval = 1000
EOF
    fi
    cat >"$dir/node.env" <<EOF
ERLNAME=$(name_prefix)-$node@localhost
PORT=$port
DIST_PORT=$((port + 20000))
MGMT_PORT=$mgmt_port
CLUSTER=$cluster
EOF
}

# Start NODE detached (no wait). NODE must be loaded.
launch_node() {
    local dir pid
    dir=$(node_dir "$NODE")
    pid=$(beam_pid)
    if [ -n "$pid" ]; then
        log "$NODE already running (pid $pid)"
        return 0
    fi
    # The node owns these ports: only a listener on them is in the way, not TIME_WAIT sockets a
    # killed instance left behind (see port_listenable).
    port_listenable "$PORT" || die "$NODE: port $PORT is in use by something else (a socket listens on it)"
    port_listenable "$DIST_PORT" || die "$NODE: dist port $DIST_PORT is in use by something else (a socket listens on it)"
    if [ -n "$MGMT_PORT" ]; then
        port_listenable "$MGMT_PORT" || die "$NODE: management port $MGMT_PORT is in use by something else (a socket listens on it)"
    fi
    rm -f "$dir/pid"
    log "starting $NODE ($ERLNAME) on 127.0.0.1:$PORT"
    with_node_env "$RABBIT_BIN/rabbitmq-server" -detached >>"$dir/log/start.out" 2>&1 \
        || die "$NODE: rabbitmq-server -detached failed; see $dir/log/start.out"
}

# Wait until NODE's app is running (or the timeout passes). NODE must be loaded.
await_node() {
    local deadline dir
    dir=$(node_dir "$NODE")
    deadline=$(($(date +%s) + STARTUP_TIMEOUT))
    # await_startup fails straight away while the node is not yet registered in epmd: retry.
    while :; do
        if ctl_node await_startup --timeout "$STARTUP_TIMEOUT" >/dev/null 2>&1; then
            return 0
        fi
        # The pid file is written early in the boot: if it is there but the VM is gone, the node
        # died (port taken, bad config, ...): fail now instead of at the timeout.
        if [ -s "$dir/pid" ] && [ -z "$(beam_pid)" ]; then
            log "$NODE died during startup; last log lines:"
            tail -n 20 "$dir/log/$ERLNAME.log" >&2 2>/dev/null || true
            tail -n 20 "$dir/log/start.out" >&2 2>/dev/null || true
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            log "$NODE did not start within ${STARTUP_TIMEOUT}s; last log lines:"
            tail -n 20 "$dir/log/$ERLNAME.log" >&2 2>/dev/null || true
            tail -n 20 "$dir/log/start.out" >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.5
    done
}

node_running() { # NODE loaded: beam alive and app running
    [ -n "$(beam_pid)" ] && ctl_node await_startup --timeout 5 >/dev/null 2>&1
}

cluster_nodes() { # CLUSTER -> list its nodes present in the state dir
    local d
    for d in "$STATE_DIR/nodes/$1"-[0-9]*; do
        [ -f "$d/node.env" ] || continue
        if grep -qx "CLUSTER=$1" "$d/node.env"; then basename "$d"; fi
    done
}

all_clusters() {
    local d
    for d in "$STATE_DIR"/nodes/*/node.env; do
        [ -f "$d" ] || continue
        sed -n 's/^CLUSTER=//p' "$d"
    done | sort -u
}

stop_node_hard() { # NODE loaded: SIGTERM (graceful in OTP >= 20), then SIGKILL after 20 s
    local pid
    pid=$(beam_pid)
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    kill -CONT "$pid" 2>/dev/null || true # a paused node must run to handle SIGTERM
    wait_gone "$pid" 20 && return 0
    log "$NODE did not stop on SIGTERM; killing"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 10 || log "$NODE (pid $pid) still there after SIGKILL"
}

# ---------------------------------------------------------------------------------------------
# commands

cmd_install() {
    if command -v rabbitmqctl >/dev/null 2>&1 && [ -x "$RABBIT_BIN/rabbitmq-server" ]; then
        log "rabbitmq-server already installed"
        return 0
    fi
    log "installing rabbitmq-server with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q rabbitmq-server >&2
    [ -x "$RABBIT_BIN/rabbitmq-server" ] || die "rabbitmq-server not found after install"
}

check_installed() {
    [ -x "$RABBIT_BIN/rabbitmq-server" ] || die "RabbitMQ is not installed; run: scripts/rabbit.sh install"
}

valid_name() {
    [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "bad cluster name '$1'"
}

# cmd_up NAME COUNT PORT...  (COUNT = 1 or 2)
do_up() {
    local name=$1 count=$2
    shift 2
    local ports=("$@") i node t0 existing
    valid_name "$name"
    check_installed
    ensure_state_dir
    t0=$(now_ms)

    existing=$(cluster_nodes "$name" | wc -l)
    if [ "$existing" -gt 0 ]; then
        [ "$existing" -eq "$count" ] || die "cluster $name exists with $existing node(s); run 'down $name' first"
        for i in $(seq 1 "$count"); do
            NODE="$name-$i"
            load_node "$NODE"
            if [ "${ports[$((i - 1))]}" != auto ] && [ "${ports[$((i - 1))]}" != "$PORT" ]; then
                die "cluster $name exists on other ports (node $NODE on $PORT); run 'down $name' first"
            fi
            ports[i - 1]=$PORT
        done
        local all_up=1
        for i in $(seq 1 "$count"); do
            NODE="$name-$i"; load_node "$NODE"
            node_running || all_up=0
        done
        if [ $all_up = 1 ]; then
            log "cluster $name is already up"
        else
            log "cluster $name exists but is not fully running: starting its nodes"
            # Start all in parallel: a node that was not the last to stop waits for its peers.
            for i in $(seq 1 "$count"); do NODE="$name-$i"; load_node "$NODE"; launch_node; done
            for i in $(seq 1 "$count"); do NODE="$name-$i"; load_node "$NODE"; await_node || die "$NODE failed to start"; done
        fi
        print_cluster "$name" "${ports[@]}"
        log_management "$name"
        return 0
    fi

    # Fresh cluster: resolve ports (reserve under a machine-wide lock).
    reg_lock
    for i in $(seq 0 $((count - 1))); do
        if [ "${ports[$i]}" = auto ]; then
            ports[i]=$(pick_port)
        else
            [[ ${ports[$i]} =~ ^[0-9]+$ ]] || { reg_unlock; die "bad port '${ports[$i]}'"; }
            if ! port_free "${ports[$i]}" || ! port_free $((ports[i] + 20000)); then
                reg_unlock
                die "port ${ports[$i]} or its dist port $((ports[i] + 20000)) is in use"
            fi
            if [ "$MANAGEMENT" = 1 ] && ! port_free $((ports[i] + MGMT_OFFSET)); then
                reg_unlock
                die "the management port $((ports[i] + MGMT_OFFSET)) of port ${ports[$i]} is in use (or set WARREN_RABBIT_MANAGEMENT=0)"
            fi
            reserve_port "${ports[$i]}"
        fi
    done
    reg_unlock

    # From here on a failure stops and removes the half-made cluster (keeping its logs), so that
    # the next `up` starts from scratch instead of finding a broken cluster.
    UP_CLEANUP=$name
    trap up_failed EXIT
    for i in $(seq 1 "$count"); do
        create_node "$name-$i" "$name" "${ports[$((i - 1))]}"
    done
    # Launch every node, then wait for all: they boot in parallel.
    for i in $(seq 1 "$count"); do NODE="$name-$i"; load_node "$NODE"; launch_node; done
    local pids=() rc=0
    for i in $(seq 1 "$count"); do
        ( NODE="$name-$i"; load_node "$NODE"; await_node ) &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    [ $rc = 0 ] || die "cluster $name: a node failed to start"
    log "cluster $name: node(s) booted after $(($(now_ms) - t0))ms"

    local first
    NODE="$name-1"; load_node "$NODE"; first=$ERLNAME
    if [ "$count" -ge 2 ]; then
        for i in $(seq 2 "$count"); do
            NODE="$name-$i"; load_node "$NODE"
            log "joining $NODE to $first"
            ctl_node stop_app >/dev/null
            ctl_node join_cluster "$first" >/dev/null
            ctl_node start_app >/dev/null
        done
    fi
    NODE="$name-1"; load_node "$NODE"
    ctl_node set_policy ha-all '.*' '{"ha-mode":"all","ha-sync-mode":"automatic"}' >/dev/null
    trap - EXIT
    UP_CLEANUP=
    log "cluster $name up in $(($(now_ms) - t0))ms"
    print_cluster "$name" "${ports[@]}"
    log_management "$name"
}

UP_CLEANUP=
up_failed() {
    local rc=$? keep node
    if [ "$rc" != 0 ] && [ -n "$UP_CLEANUP" ]; then
        keep="$STATE_DIR/failed-$UP_CLEANUP-$(date +%s)"
        for node in $(cluster_nodes "$UP_CLEANUP"); do
            mkdir -p "$keep/$node"
            cp -r "$(node_dir "$node")/log/." "$keep/$node/" 2>/dev/null || true
        done
        cmd_down "$UP_CLEANUP" >/dev/null 2>&1 || true
        log "up $UP_CLEANUP failed: its nodes were stopped and removed; their logs are in $keep"
    fi
    exit "$rc"
}

print_cluster() {
    local name=$1 out
    shift
    out=$name
    for p in "$@"; do out="$out 127.0.0.1:$p"; done
    echo "$out"
}

# "NAME http://127.0.0.1:M1 http://127.0.0.1:M2" for the nodes of cluster NAME; fails when a
# node has no management plugin.
management_urls() {
    local name=$1 node out
    out=$name
    for node in $(cluster_nodes "$name"); do
        NODE=$node; load_node "$NODE"
        [ -n "$MGMT_PORT" ] || return 1
        out="$out http://127.0.0.1:$MGMT_PORT"
    done
    [ "$out" != "$name" ] || return 1
    echo "$out"
}

log_management() {
    local urls
    if urls=$(management_urls "$1"); then
        log "cluster $1 management API (guest/guest): ${urls#"$1" }"
    else
        log "cluster $1 has no management plugin (made with WARREN_RABBIT_MANAGEMENT=0 or an older rabbit.sh; 'down $1' and 'up' it again to get one)"
    fi
}

cmd_down() {
    local name=$1 nodes node
    valid_name "$name"
    nodes=$(cluster_nodes "$name")
    [ -n "$nodes" ] || { log "no cluster $name in $STATE_DIR"; return 0; }
    local pids=()
    for node in $nodes; do
        ( NODE=$node; load_node "$NODE"; stop_node_hard ) &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || true; done
    for node in $nodes; do
        NODE=$node; load_node "$NODE"
        release_port "$PORT"
        rm -rf "$(node_dir "$node")"
    done
    log "cluster $name down"
}

cmd_down_all() {
    local c pids=()
    [ -d "$STATE_DIR/nodes" ] || { log "nothing in $STATE_DIR"; return 0; }
    for c in $(all_clusters); do
        cmd_down "$c" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || true; done
    rmdir "$STATE_DIR/nodes" 2>/dev/null || true
}

cmd_status() {
    local d node pid state
    printf '%-20s %-40s %-6s %-6s %-8s %s\n' NODE ERLANG-NAME PORT MGMT PID STATE
    for d in "$STATE_DIR"/nodes/*/node.env; do
        [ -f "$d" ] || continue
        node=$(basename "$(dirname "$d")")
        NODE=$node; load_node "$NODE"
        pid=$(beam_pid)
        if [ -z "$pid" ]; then
            state=down
        elif grep -q '^State:.*T' "/proc/$pid/status" 2>/dev/null; then
            state=paused
        elif ctl_node await_startup --timeout 3 >/dev/null 2>&1; then
            state=running
        else
            state=app-stopped
        fi
        printf '%-20s %-40s %-6s %-6s %-8s %s\n' "$node" "$ERLNAME" "$PORT" "${MGMT_PORT:--}" "${pid:--}" "$state"
    done
}

# Delete all queues and all exchanges but the default/amq.* ones in vhost "/" of a cluster, through
# its first running node. One CLI call (~1 s) instead of one per queue.
WIPE_EVAL='Qs = rabbit_amqqueue:list(<<"/">>),
[rabbit_amqqueue:delete(Q, false, false, <<"warren-tests">>) || Q <- Qs],
Xs = [element(2, X) || X <- rabbit_exchange:list(<<"/">>)],
Ds = [N || N = {resource, _, exchange, Nm} <- Xs, Nm =/= <<>>,
           binary:part(Nm, 0, min(4, byte_size(Nm))) =/= <<"amq.">>],
[rabbit_exchange:delete(N, false, <<"warren-tests">>) || N <- Ds],
io_lib:format("~b ~b", [length(Qs), length(Ds)]).'

cmd_wipe() {
    local name=$1 node out
    for node in $(cluster_nodes "$name"); do
        NODE=$node; load_node "$NODE"
        [ -n "$(beam_pid)" ] || continue
        if out=$(ctl_node eval "$WIPE_EVAL" 2>&1); then
            out=$(printf '%s' "$out" | tr -d '"')
            log "wiped cluster $name via $NODE: deleted $out (queues exchanges)"
            echo "$out"
            return 0
        fi
    done
    die "cluster $name: no running node to wipe through"
}

need_node_arg() { [ $# -ge 1 ] || { usage >&2; exit 2; }; NODE=$1; load_node "$NODE"; }

main() {
    [ $# -ge 1 ] || { usage >&2; exit 2; }
    local cmd=$1
    shift
    case "$cmd" in
    install) cmd_install ;;
    up)
        [ $# -eq 3 ] || { usage >&2; exit 2; }
        do_up "$1" 2 "$2" "$3"
        ;;
    up-single)
        [ $# -eq 2 ] || { usage >&2; exit 2; }
        do_up "$1" 1 "$2"
        ;;
    up-single-tls)
        [ $# -eq 3 ] || [ $# -eq 4 ] || { usage >&2; exit 2; }
        local f
        for f in ca.pem server.pem server.key; do
            [ -r "$3/$f" ] || die "up-single-tls: $3/$f is missing or unreadable"
        done
        TLS_CERTDIR=$(cd "$3" && pwd -P)
        case "${4:-}" in
        '') TLS_VERIFY=verify_none ;;
        verify-peer) TLS_VERIFY=verify_peer ;;
        *) usage >&2; exit 2 ;;
        esac
        do_up "$1" 1 "$2"
        ;;
    stop-node)
        need_node_arg "$@"
        local pid
        pid=$(beam_pid)
        if [ -z "$pid" ]; then log "$NODE is not running"; return 0; fi
        ctl_node stop >&2
        # rabbitmqctl stop returns before the VM has exited: wait for it (and its port).
        wait_gone "$pid" 60 || die "$NODE (pid $pid) still running 60 s after stop"
        log "$NODE stopped"
        ;;
    kill-node)
        need_node_arg "$@"
        local pid
        pid=$(beam_pid)
        [ -n "$pid" ] || { log "$NODE is not running"; return 0; }
        kill -KILL "$pid"
        wait_gone "$pid" 10 || die "$NODE (pid $pid) still alive 10 s after SIGKILL"
        log "$NODE killed (pid $pid)"
        ;;
    start-node)
        need_node_arg "$@"
        check_installed
        launch_node
        await_node || die "$NODE failed to start"
        log "$NODE running"
        ;;
    stop-app) need_node_arg "$@"; ctl_node stop_app >&2 ;;
    start-app) need_node_arg "$@"; ctl_node start_app >&2 ;;
    pause-node | resume-node)
        need_node_arg "$@"
        local pid
        pid=$(beam_pid)
        [ -n "$pid" ] || die "$NODE is not running"
        if [ "$cmd" = pause-node ]; then kill -STOP "$pid"; else kill -CONT "$pid"; fi
        log "$NODE ${cmd%-node}d (pid $pid)"
        ;;
    ctl)
        need_node_arg "$@"
        shift
        ctl_node "$@"
        ;;
    port) need_node_arg "$@"; echo "$PORT" ;;
    management-port)
        need_node_arg "$@"
        [ -n "$MGMT_PORT" ] || die "$NODE has no management plugin"
        echo "$MGMT_PORT"
        ;;
    management)
        [ $# -eq 1 ] || { usage >&2; exit 2; }
        valid_name "$1"
        [ -n "$(cluster_nodes "$1")" ] || die "no cluster $1 in $STATE_DIR"
        management_urls "$1" || die "cluster $1 has no management plugin (made with WARREN_RABBIT_MANAGEMENT=0 or an older rabbit.sh): 'down $1' and 'up' it again"
        ;;
    down)
        [ $# -eq 1 ] || { usage >&2; exit 2; }
        cmd_down "$1"
        ;;
    wipe)
        [ $# -eq 1 ] || { usage >&2; exit 2; }
        cmd_wipe "$1"
        ;;
    down-all) cmd_down_all ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
    esac
}

main "$@"
