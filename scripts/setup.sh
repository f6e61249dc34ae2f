#!/usr/bin/env bash
# Install kegnet with the service extras (CPU PyTorch pinned first, so pip never pulls a CUDA build)
# and make sure Redis answers on 127.0.0.1:6379. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q --disable-pip-version-check -e ".[service,onnx,dev]"
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting redis-server on 127.0.0.1:6379"
  mkdir -p /tmp/kegnet-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/kegnet-redis --logfile /tmp/kegnet-redis/redis.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
