#!/usr/bin/env bash
# tests/clients/aio_suite.sh DIRECT_ADDR PROXY_ADDR — the asyncio clients' own test suites
# (aiormq and aio-pika, pytest), run directly against RabbitMQ and then through warren. Every
# run must pass.
#
# The suites ship in the PyPI sdists; they are unpacked under target/aio-suite once, with a venv
# of their own (target/aio-suite/venv), and reused. Their conftest.py starts a RabbitMQ in
# docker: the script appends fixtures that point them at AMQP_URL instead (the unpacked copy
# only) and marks the tests of SKIP below as skipped, with the reason pytest prints.
#
# Not part of scripts/test.sh: it takes 25-35 minutes on the 2-core machine. Last run: aiormq
# 554 passed both ways; aio-pika 884 passed through warren (223 skipped, the reasons below).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
AIORMQ=7.2.4
AIO_PIKA=10.2.1
DIR="$ROOT/target/aio-suite"
VENV="$DIR/venv"
STAMP="$DIR/installed-aiormq-$AIORMQ-aio-pika-$AIO_PIKA"
TIMEOUT=${AIO_SUITE_TIMEOUT:-120}

# Tests left out of both runs: PATTERN (a regular expression searched in the pytest node id,
# e.g. "test_connection.py::test_x[amqp]") <TAB> reason. None of the reasons is a warren bug.
SKIP=$(cat <<'EOF'
[[-]amqps(-client)?[]-]	needs a TLS listener (5671); the brokers here have none
test_ssl_verification_fails_without_trusted_ca$|test_ssl_context$	needs a TLS listener (5671)
test_amqps\.py::	needs a TLS listener (5671)
test_robust_recovery\.py::	restarts a broker of its own in docker (rabbitmqctl)
test_closing_waiter_cancellation\[.*-connection-True\]	fails against RabbitMQ too (aiormq's own close race)
test_connection_close_during_publish_drain	fails against RabbitMQ too (aiormq's own close race)
test_leak_unclosed_channel	fails against RabbitMQ too (channels still referenced after gc)
test_create_channels_during_reconnect	fails against RabbitMQ too (aio-pika's own reconnect race)
test_bad_credentials|test_wrong_credentials	docs/semantics.md "Wrong password": 403 comes at connection.open, where aiormq raises InvalidFrameError, not ProbableAuthenticationError
test_connection\.py::test_bad_channel\[	docs/semantics.md "Channel number above channel_max": opens channel 65535 of channel_max 2047
::test_async_for_queue|::test_async_with_connection|::test_non_acked_messages_are_redelivered_to_queue|::test_regression_only_messages_cancelled_subscription_are_nacked	docs/semantics.md "Order of one publisher's messages": expects publish order from two shard clusters
EOF
)

direct=${1:?usage: aio_suite.sh DIRECT_ADDR PROXY_ADDR}
proxy=${2:?usage: aio_suite.sh DIRECT_ADDR PROXY_ADDR}

# Appended to each suite's tests/conftest.py: the broker comes from AMQP_URL, docker is never
# asked for, and the SKIP list (AIO_SUITE_SKIP) marks tests skipped.
OVERRIDE=$(cat <<'EOF'


# ---- appended by warren's tests/clients/aio_suite.sh: use the broker at AMQP_URL, no docker
import os as _aio_os
import re as _aio_re

from yarl import URL as _AioURL

from tests.docker_client import ContainerInfo as _AioContainerInfo


def pytest_configure(config):
    pass


def pytest_collection_modifyitems(config, items):
    rules = []
    for line in _aio_os.environ.get("AIO_SUITE_SKIP", "").splitlines():
        if line.strip():
            pattern, reason = line.split("\t", 1)
            rules.append((_aio_re.compile(pattern), reason))
    for item in items:
        nodeid = item.nodeid.removeprefix("tests/")
        for pattern, reason in rules:
            if pattern.search(nodeid):
                item.add_marker(pytest.mark.skip(reason=reason))
                break


@pytest.fixture(scope="session")
def docker():
    pytest.skip("needs docker")


@pytest.fixture(scope="session")
def rabbitmq_container():
    # No TLS listener: 5671 maps to a closed port (the amqps tests are skipped).
    url = _AioURL(_aio_os.environ["AMQP_URL"])
    return _AioContainerInfo(
        id="external", ports={"5672/tcp": url.port, "5671/tcp": 1}, host=url.host,
    )


@pytest.fixture(scope="session")
def amqp_direct_url():
    return _AioURL(_aio_os.environ["AMQP_URL"])
EOF
)

if [ ! -e "$STAMP" ]; then
    rm -rf "$DIR"
    mkdir -p "$DIR/dl"
    (python3.11 -m venv "$VENV" &&
        "$VENV/bin/pip" download -q --no-deps --no-binary aiormq,aio-pika -d "$DIR/dl" \
            "aiormq==$AIORMQ" "aio-pika==$AIO_PIKA" &&
        "$VENV/bin/pip" install -q "$DIR/dl/aiormq-$AIORMQ.tar.gz" \
            "$DIR/dl/aio_pika-$AIO_PIKA.tar.gz" pytest==9.2.0 aiomisc==18.0.37 \
            aiomisc-pytest==2.0.0 pytest-timeout==2.4.0 shortuuid==1.0.13 \
            timeout-decorator==0.5.0 &&
        tar xzf "$DIR/dl/aiormq-$AIORMQ.tar.gz" -C "$DIR" &&
        tar xzf "$DIR/dl/aio_pika-$AIO_PIKA.tar.gz" -C "$DIR" &&
        printf '%s\n' "$OVERRIDE" >>"$DIR/aiormq-$AIORMQ/tests/conftest.py" &&
        printf '%s\n' "$OVERRIDE" >>"$DIR/aio_pika-$AIO_PIKA/tests/conftest.py" &&
        touch "$STAMP") || {
        echo "cannot install the aiormq $AIORMQ and aio-pika $AIO_PIKA test suites" >&2
        exit 1
    }
fi

fails=0
for t in "rabbitmq=$direct" "warren=$proxy"; do
    name=${t%%=*}
    addr=${t#*=}
    for suite in "aiormq-$AIORMQ" "aio_pika-$AIO_PIKA"; do
        echo "--- ${suite%-*}'s suite, $name ($addr)"
        if ! (cd "$DIR/$suite" && AMQP_URL="amqp://guest:guest@$addr/" AIO_SUITE_SKIP="$SKIP" \
            "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rfEs --timeout="$TIMEOUT" \
            -o log_cli=false tests/); then
            fails=$((fails + 1))
        fi
    done
done
[ $fails = 0 ]
