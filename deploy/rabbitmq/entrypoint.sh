#!/usr/bin/env bash
# Entrypoint of the RabbitMQ services in docker-compose.yml: installs the cluster's shared Erlang
# cookie, then hands over to the image's own entrypoint (which drops to the rabbitmq user).
#
# Nodes of a cluster (and the CLI tools in the healthcheck) authenticate to each other with the
# Erlang cookie, so every node needs the same one. The RABBITMQ_ERLANG_COOKIE environment
# variable still works on 3.13 but is deprecated (every rabbitmqctl/rabbitmq-diagnostics call
# prints a warning), and a cookie file bind-mounted straight to /var/lib/rabbitmq/.erlang.cookie
# keeps the host file's owner and mode, which Erlang rejects unless it is readable by its owner
# only. So the cookie comes in as a compose secret (read-only, at /run/secrets/erlang_cookie) and
# is copied into place with mode 0400, owned by rabbitmq. /root/.erlang.cookie is a link to the
# same file in the image, and HOME is /var/lib/rabbitmq, so `docker compose exec ... rabbitmqctl`
# finds it too.
set -euo pipefail

secret=${RABBITMQ_COOKIE_FILE:-/run/secrets/erlang_cookie}
target=${RABBITMQ_DATA_DIR:-/var/lib/rabbitmq}/.erlang.cookie

cookie=$(tr -d '[:space:]' <"$secret")
if [ -z "$cookie" ]; then
    echo "entrypoint: $secret is empty: put a cookie (letters and digits) in it" >&2
    exit 1
fi
rm -f "$target"
(umask 077 && printf '%s' "$cookie" >"$target")
chmod 0400 "$target"
chown rabbitmq:rabbitmq "$target"

# The image's CMD is lost once `entrypoint:` is overridden, so name the server again.
if [ $# -eq 0 ]; then
    set -- rabbitmq-server
fi
exec docker-entrypoint.sh "$@"
