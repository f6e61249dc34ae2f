#!/usr/bin/env bash
# Install kegnet (with the service, onnx and dev extras) into the virtual environment .venv, made here if it
# is missing: stock Debian refuses `pip install` outside one (PEP 668, "externally-managed-environment").
# Every script uses that interpreter, .venv/bin/python (scripts/test.sh, scripts/demo.sh); so can you:
# `source .venv/bin/activate`.
#
# What it installs: torch 2.14.1 and torchvision 0.29.1 as PyPI ships them, which on Linux x86_64 are CUDA
# builds (torch 2.14.1+cu130, with its nvidia-* wheels: .venv is about 6 GB) that also run on a CPU: one
# install for a laptop and a GPU server, and the versions every test and benchmark here ran with. A fresh
# .venv took 112 s from a local wheel cache (2 cores); from PyPI it is a ~3 GB download. The CPU-only wheels (under 1 GB)
# live on PyTorch's own index; to use them, install them into .venv first (the pins then find them there):
#   .venv/bin/python -m pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu
# Redis is not installed here: the tests and the demo start their own redis-server (apt-get install redis-server).
# Safe to run again: when pyproject.toml and this script did not change, nothing is reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's python3 without python3-venv has no ensurepip: a venv without pip, then pip from its wheel.
    rm -rf "$VENV"
    python3 -m venv --without-pip "$VENV"
    python3 scripts/bootstrap_pip.py "$VENV/bin/python"
  fi
  echo "created the virtual environment $VENV"
fi
PY="$VENV/bin/python"
stamp="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.kegnet-installed" 2>/dev/null)" != "$stamp" ]; then
  "$PY" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  "$PY" -m pip install -q --disable-pip-version-check -e ".[service,onnx,dev]"
  echo "$stamp" > "$VENV/.kegnet-installed"
fi
if ! command -v redis-server >/dev/null; then
  echo "note: redis-server is not installed; the tests and the demo need it (apt-get install redis-server)" >&2
fi
