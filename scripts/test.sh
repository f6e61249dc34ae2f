#!/usr/bin/env bash
# The test command (README): install into .venv (scripts/setup.sh), start a private redis-server on a free
# port (stopped at exit; the tests flush its database 15 and never touch another Redis), lint, run the suite.
# Arguments go to pytest: `bash scripts/test.sh -k submit tests/service`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
source scripts/private-redis.sh
trap stop_private_redis EXIT
start_private_redis
export KEGNET_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/15"
"$PY" -m ruff check .
"$PY" -m pytest -q -p no:cacheprovider "$@"
