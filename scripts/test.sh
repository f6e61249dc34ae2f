#!/usr/bin/env bash
# The test command (README): install into .venv (scripts/setup.sh), start a private redis-server on a free
# port (stopped at exit; the tests flush its database 15 and never touch another Redis), lint, run the suite.
# Arguments go to pytest: `bash scripts/test.sh -k submit tests/service`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The web page's browser test (tests/integration/test_web.py) drives Debian's chromium through Playwright
# (Playwright's own browser download is not used); without it that test skips.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian's chromium for the browser test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
      || echo "note: chromium could not be installed: the browser test will skip" >&2
  else
    echo "note: /usr/bin/chromium is missing and this is not root: the browser test will skip" \
         "(sudo apt-get install chromium)" >&2
  fi
fi
PY=.venv/bin/python
source scripts/private-redis.sh
trap stop_private_redis EXIT
start_private_redis
export KEGNET_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/15"
"$PY" -m ruff check .
"$PY" -m pytest -q -p no:cacheprovider "$@"
