# warren container image.
#
#   docker build -t warren .
#   docker run --rm -v "$PWD/deploy/compose/warren.toml:/etc/warren/warren.toml:ro" \
#       -p 5672:5672 -p 15673:15673 warren                      # run the proxy
#   docker run ... warren --log-format json                    # JSON logs (one object a line)
#   docker run ... warren check                                # validate the mounted config
#   docker exec <container> warren check-queues -w 500 -c 1000 \
#       -f /etc/warren/warren.toml -q celery                   # Nagios/Sensu queue-depth check,
#                                                               # inside the running container
#   docker build --build-arg WARREN_GIT_REVISION=$(git rev-parse --short HEAD) -t warren .
#                                                               # revision in warren_build_info
#
# The configuration is not baked in: mount it at /etc/warren/warren.toml (mount the directory
# rather than the file if it is edited in place, so that warren's file watcher sees an editor's
# replaced file; SIGHUP, i.e. `docker kill -s HUP`, and POST /reload also reload it).
# docker-compose.yml runs this image in front of three RabbitMQ clusters (deploy/README.md).

# ---- build ---------------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /build

# Dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml or Cargo.lock
# change, not on every source edit. A stub main.rs/lib.rs stands in for the sources; Cargo.toml's
# [[bench]] target and workspace members must exist for the manifest to load, so benches/ and
# crates/ (the codec) come along (both small; an edit of the codec rebuilds this layer).
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY crates ./crates
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin warren \
    && rm -rf src target/release/warren target/release/deps/warren-* \
        target/release/deps/libwarren-* target/release/.fingerprint/warren-*

# The real sources. The stub's fingerprints are gone, so cargo rebuilds the warren crate whatever
# the modification times of the copied files are (COPY keeps them). build.rs records the revision
# for warren_build_info: there is no .git here, so it comes from the build argument.
ARG WARREN_GIT_REVISION=
ENV WARREN_GIT_REVISION=$WARREN_GIT_REVISION
COPY build.rs ./
COPY src ./src
RUN cargo build --release --locked --bin warren \
    && install -m 0755 target/release/warren /usr/local/bin/warren \
    && /usr/local/bin/warren --version

# ---- runtime -------------------------------------------------------------------------------------
# debian:bookworm-slim rather than distroless/cc: the binary needs only glibc and libgcc_s, which
# both have, but a HEALTHCHECK must run something inside the container, and warren has no "probe
# my own admin endpoint" subcommand (`warren check` validates a file, `warren check-queues` is a
# queue-depth check that can be CRITICAL while warren is perfectly healthy). bookworm-slim has
# bash, whose /dev/tcp lets deploy/docker/warren-healthcheck ask GET /health or /ready without
# curl; distroless has no shell at all. Same Debian release as the build stage, so the same glibc.
FROM debian:bookworm-slim

# ca-certificates: for TLS connections to the brokers with public CAs. No other package is needed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 warren \
    && useradd --system --uid 10001 --gid warren --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin warren \
    && mkdir -p /etc/warren

COPY --from=build /usr/local/bin/warren /usr/local/bin/warren
COPY deploy/docker/warren-healthcheck /usr/local/bin/warren-healthcheck
RUN chmod 0755 /usr/local/bin/warren-healthcheck

# Not root; a numeric user so that runtimes that check runAsNonRoot can tell.
USER 10001:10001

# AMQP (the config's `listen`) and the admin endpoint (`[admin] listen`); both must be IP:port
# in the config, e.g. listen = "0.0.0.0:5672" and listen = "0.0.0.0:15673" inside a container.
EXPOSE 5672 15673

# Where warren-healthcheck finds the admin endpoint; change it with the config's [admin] listen.
ENV WARREN_ADMIN_ADDR=127.0.0.1:15673
# Liveness by default: /health answers 200 while the process serves. docker-compose.yml asks
# /ready instead, so the Celery services start only once warren reaches its clusters.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["warren-healthcheck", "/health"]

# SIGTERM: stop accepting, give clients timeouts.shutdown_grace_ms (default 5 s), close the rest.
# Give the container more than that to stop (docker stop -t 30, compose stop_grace_period: 30s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["warren", "--config", "/etc/warren/warren.toml"]
CMD ["run"]
