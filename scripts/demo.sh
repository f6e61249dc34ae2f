#!/usr/bin/env bash
# One command demo: start Redis (if needed), a Celery worker and the API, compress a digits classifier
# over HTTP, print a before/after table, then stop everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh   # install (CPU torch pinned) and start Redis if it is not answering

PORT="${KEGNET_DEMO_PORT:-8765}"
OUT="${KEGNET_DEMO_OUT:-$PWD/demo-out}"   # the teacher, the downloaded student and its manifest stay here
WORK="$(mktemp -d -t kegnet-demo-XXXXXX)"  # the service's own files and the logs; removed at the end
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# DB 14 and a separate key prefix: the demo never touches anyone else's data in a shared Redis.
OWN_DB=0
if [ -z "${KEGNET_REDIS_URL:-}" ]; then OWN_DB=1; fi
export KEGNET_REDIS_URL="${KEGNET_REDIS_URL:-redis://127.0.0.1:6379/14}"
export KEGNET_KEY_PREFIX="kegnet-demo"
export KEGNET_DATA_DIR="$WORK/data"
export KEGNET_AUTH_DISABLED=true          # local demo only; see service/keys.py for real keys
export KEGNET_TORCH_THREADS="${KEGNET_TORCH_THREADS:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export KEGNET_HEARTBEAT_INTERVAL_S=1

PIDS=()
STARTED_REDIS=0
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  if [ "$STARTED_REDIS" = 1 ]; then
    redis-cli -p 6379 shutdown nosave >/dev/null 2>&1 || true
  elif [ "$OWN_DB" = 1 ]; then
    redis-cli -n 14 flushdb >/dev/null 2>&1 || true  # the demo's own database: its jobs and Celery's keys
  fi
  if [ "${KEGNET_DEMO_KEEP_LOGS:-0}" = 1 ]; then echo "logs: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting redis"
  redis-server --daemonize yes --port 6379 --bind 127.0.0.1 --dir "$WORK" --save "" --appendonly no \
    --maxmemory-policy noeviction >/dev/null
  STARTED_REDIS=1
  for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

echo "starting the worker and the API (logs in $WORK)"
# setsid: each gets its own process group, so cleanup stops the worker's children too.
setsid python -m celery -A worker.celery_app:app worker -P prefork -c 1 -Q gpu --loglevel INFO \
  -n "demo-$$@%h" --without-gossip --without-mingle >"$WORK/worker.log" 2>&1 &
PIDS+=($!)
setsid python -m uvicorn service.app:app --host 127.0.0.1 --port "$PORT" --log-level warning \
  >"$WORK/api.log" 2>&1 &
PIDS+=($!)

python -m kegnet.demo --url "http://127.0.0.1:$PORT" --out "$OUT" "$@" || {
  echo "the demo failed; the service's logs:"; tail -n 40 "$WORK/worker.log" "$WORK/api.log"; exit 1; }
