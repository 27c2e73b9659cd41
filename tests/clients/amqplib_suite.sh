#!/usr/bin/env bash
# tests/clients/amqplib_suite.sh DIRECT_ADDR PROXY_ADDR — Node amqplib's own test suite (mocha,
# 270 tests: channels, consumers, confirms, gets, acks and nacks, recover, prefetch, errors and
# closes), run directly against RabbitMQ and then through warren. Both runs must pass.
#
# The suite ships in amqplib 0.10's npm package (later releases publish no tests); it is
# unpacked with its dev dependencies under target/amqplib-suite-VERSION once and reused.
# Four tests are left out of both runs, for reasons that are not warren's:
#   - "Connect API serverProperties", "... using custom heartbeat option", "... ipv6" connect to
#     localhost:5672 whatever URL says;
#   - "binding, consuming ack" expects two messages sent one after the other to come back from
#     basic.get in that order: through warren with two shard clusters they may sit on two
#     clusters (docs/semantics.md, "Order of one publisher's messages").
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VERSION=0.10.9
DIR="$ROOT/target/amqplib-suite-$VERSION"
SKIP='^(Connect API (serverProperties|using custom heartbeat option|ipv6)|binding, consuming ack)$'

direct=${1:?usage: amqplib_suite.sh DIRECT_ADDR PROXY_ADDR}
proxy=${2:?usage: amqplib_suite.sh DIRECT_ADDR PROXY_ADDR}

if [ ! -x "$DIR/package/node_modules/.bin/mocha" ]; then
    rm -rf "$DIR"
    mkdir -p "$DIR"
    (cd "$DIR" && npm pack "amqplib@$VERSION" --silent >/dev/null &&
        tar xzf "amqplib-$VERSION.tgz" &&
        cd package && npm install --no-audit --no-fund --silent >/dev/null) || {
        echo "cannot install amqplib $VERSION's test suite" >&2
        exit 1
    }
fi

fails=0
for t in "rabbitmq=$direct" "warren=$proxy"; do
    name=${t%%=*}
    addr=${t#*=}
    echo "--- amqplib's suite, $name ($addr)"
    if ! (cd "$DIR/package" && URL="amqp://guest:guest@$addr" \
        node_modules/.bin/mocha -u tdd --exit -R dot -i -g "$SKIP" test/); then
        fails=$((fails + 1))
    fi
done
[ $fails = 0 ]
