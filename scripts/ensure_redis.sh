#!/usr/bin/env bash
# Make sure a Redis server answers on 127.0.0.1:$TQ_REDIS_PORT (default 6390) for the connector tests.
# Installs Debian's redis-server if it is missing (root: apt-get directly; otherwise through sudo), then
# starts a daemonized, non-persistent server with its files under .tmp/redis-$PORT/. Idempotent: returns
# at once when a server already answers. Prints the URL to use (redis://127.0.0.1:PORT/0) on stdout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORT=${TQ_REDIS_PORT:-6390}
DIR="$ROOT/.tmp/redis-$PORT"
URL="redis://127.0.0.1:$PORT/0"

say() { printf '[ensure_redis] %s\n' "$*" >&2; }

ping() { command -v redis-cli >/dev/null && [[ "$(redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null)" == PONG ]]; }

if ping; then echo "$URL"; exit 0; fi

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { say "ERROR: redis-server is missing and we are not root (no sudo)"; exit 1; }
        SUDO=(sudo)
    fi
    say "installing Debian's redis-server"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

mkdir -p "$DIR"
say "starting redis-server on 127.0.0.1:$PORT (dir $DIR)"
redis-server --bind 127.0.0.1 --port "$PORT" --daemonize yes --dir "$DIR" \
    --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" --save "" --appendonly no >/dev/null
for _ in $(seq 100); do
    if ping; then echo "$URL"; exit 0; fi
    sleep 0.1
done
say "ERROR: redis-server did not answer on port $PORT; see $DIR/redis.log"
tail -n 20 "$DIR/redis.log" >&2 || true
exit 1
