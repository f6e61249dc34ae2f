#!/usr/bin/env bash
# One command demo: install into .venv (scripts/setup.sh), start a private redis-server, a Celery worker and
# the API, compress a digits classifier over HTTP, print a before/after table, then stop everything this
# script started. Every command runs with .venv/bin/python; nobody else's Redis is used or flushed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="$PWD/.venv/bin/python"

OUT="${KEGNET_DEMO_OUT:-$PWD/demo-out}"   # the teacher, the downloaded student and its manifest stay here
WORK="$(mktemp -d -t kegnet-demo-XXXXXX)"  # the service's own files and the logs; removed at the end
PORT="${KEGNET_DEMO_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KEGNET_KEY_PREFIX="kegnet-demo"
export KEGNET_DATA_DIR="$WORK/data"
export KEGNET_AUTH_DISABLED=true          # local demo only; see service/keys.py for real keys
export KEGNET_TORCH_THREADS="${KEGNET_TORCH_THREADS:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export KEGNET_HEARTBEAT_INTERVAL_S=1

source scripts/private-redis.sh
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  stop_private_redis  # the demo's own server: its jobs and Celery's keys go with it
  if [ "${KEGNET_DEMO_KEEP_LOGS:-0}" = 1 ]; then echo "logs: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
start_private_redis
export KEGNET_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"

echo "starting the worker and the API (logs in $WORK)"
# setsid: each gets its own process group, so cleanup stops the worker's children too.
setsid "$PY" -m celery -A worker.celery_app:app worker -P prefork -c 1 -Q gpu --loglevel INFO \
  -n "demo-$$@%h" --without-gossip --without-mingle >"$WORK/worker.log" 2>&1 &
PIDS+=($!)
setsid "$PY" -m uvicorn service.app:app --host 127.0.0.1 --port "$PORT" --log-level warning \
  >"$WORK/api.log" 2>&1 &
PIDS+=($!)

"$PY" -m kegnet.demo --url "http://127.0.0.1:$PORT" --out "$OUT" "$@" || {
  echo "the demo failed; the service's logs:"; tail -n 40 "$WORK/worker.log" "$WORK/api.log"; exit 1; }
