# Sourced by scripts/test.sh and scripts/demo.sh: start_private_redis starts a redis-server of our own on a
# free port, with its own directory, no persistence, and stops it when the script exits; REDIS_PORT is its
# port. Nobody else's Redis (6379, a shared one) is ever used or flushed.
start_private_redis() {
  if ! command -v redis-server >/dev/null; then
    echo "error: redis-server is not installed (Debian: apt-get install redis-server)" >&2
    exit 2
  fi
  REDIS_DIR="$(mktemp -d -t kegnet-redis-XXXXXX)"
  REDIS_PORT="$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$REDIS_DIR" --save "" --appendonly no \
    --daemonize yes --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log" \
    --maxmemory-policy noeviction >/dev/null
  for _ in $(seq 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "error: the private redis-server did not start; its log:" >&2
  cat "$REDIS_DIR/redis.log" >&2
  exit 1
}

stop_private_redis() {
  if [ -n "${REDIS_DIR:-}" ] && [ -f "$REDIS_DIR/redis.pid" ]; then
    kill "$(cat "$REDIS_DIR/redis.pid")" 2>/dev/null || true
    for _ in $(seq 50); do [ -f "$REDIS_DIR/redis.pid" ] || break; sleep 0.1; done
  fi
  [ -n "${REDIS_DIR:-}" ] && rm -rf "$REDIS_DIR"
  return 0
}
