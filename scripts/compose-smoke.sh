#!/usr/bin/env bash
# docker compose, run for real: build the image offline, start redis + api + worker with compose, and drive
# the stack over HTTP (scripts/compose_smoke.py: a job to succeeded and its student checked, the worker killed
# mid-job, Redis restarted, four jobs on two workers that share no volume with the API, a worker killed
# during its upload, down). Prints every step with its time.
#
#   sudo bash scripts/compose-smoke.sh          # root: it may install packages and start dockerd
#
# On a host without a Docker engine it installs Debian's (docker.io, docker-compose v1, debootstrap) and starts
# dockerd (overlay2 where it works, else vfs; KEGNET_DOCKER_STORAGE_DRIVER forces one), and stops it at the end.
# Where the public base images cannot be pulled it builds local ones from Debian packages
# (scripts/base-images.sh). Python packages come from wheelhouse/ (scripts/wheelhouse.sh): the image build
# itself never reaches an index. The worker runs on the CPU (docker-compose.cpu.yml, profile "cpu").
#
# Settings: KEGNET_SMOKE_PORT (18000), KEGNET_SMOKE_PROJECT (kegnet-smoke), KEGNET_SMOKE_NO_CACHE=1 for a cold
# image build, KEGNET_BASE_IMAGE / KEGNET_REDIS_IMAGE to force base images.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
say() { printf '[compose-smoke %5ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
PROJECT=${KEGNET_SMOKE_PROJECT:-kegnet-smoke}
PORT=${KEGNET_SMOKE_PORT:-18000}
WORK=$(mktemp -d -t kegnet-compose-smoke-XXXXXX)
STARTED_DOCKERD=0
COMPOSE=()

cleanup() {
  local rc=$?
  if [ ${#COMPOSE[@]} -gt 0 ]; then
    if [ $rc -ne 0 ]; then
      say "failed; the last lines of each container's log:"
      "${COMPOSE[@]}" logs --tail 30 2>&1 | tail -n 120 || true
    fi
    "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  if [ "$STARTED_DOCKERD" = 1 ]; then
    say "stopping the dockerd this script started"
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT

# 1. Tools: Debian's Docker engine, compose and debootstrap; the project on this host (the smoke's client).
if ! command -v dockerd >/dev/null || ! { command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1; } \
   || ! command -v debootstrap >/dev/null; then
  say "installing docker.io docker-compose debootstrap (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
fi
say "installing the project on the host (scripts/setup.sh)"
bash scripts/setup.sh >/dev/null 2>"$WORK/setup.err" || { cat "$WORK/setup.err"; exit 1; }

# 2. The engine: the running one, or a dockerd of our own: overlay2 where the kernel and file system allow it
#    (much less disk and time), else vfs, which works everywhere (every layer and container a full copy).
start_dockerd() {
  say "starting dockerd (storage driver $1)"
  dockerd --storage-driver "$1" >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  STARTED_DOCKERD=1
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return 0
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.5
  done
  kill "$DOCKERD_PID" 2>/dev/null || true; wait "$DOCKERD_PID" 2>/dev/null || true
  STARTED_DOCKERD=0
  return 1
}
if ! docker info >/dev/null 2>&1; then
  driver=${KEGNET_DOCKER_STORAGE_DRIVER:-auto}
  if [ "$driver" = auto ]; then
    start_dockerd overlay2 || start_dockerd vfs
  else
    start_dockerd "$driver"
  fi || { tail -n 20 "$WORK/dockerd.log"; exit 1; }
fi
if docker compose version >/dev/null 2>&1; then COMPOSE_CMD=(docker compose); else COMPOSE_CMD=(docker-compose); fi
say "engine: docker $(docker version -f '{{.Server.Version}}'), storage $(docker info -f '{{.Driver}}'); compose: $("${COMPOSE_CMD[@]}" version --short 2>/dev/null || "${COMPOSE_CMD[@]}" version | head -1)"

# 3. Base images: the public ones if a registry answers, else local ones from Debian packages.
if [ -z "${KEGNET_BASE_IMAGE:-}" ]; then
  if timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1 && timeout 60 docker pull -q redis:7.4-alpine >/dev/null 2>&1; then
    export KEGNET_BASE_IMAGE=python:3.11-slim KEGNET_REDIS_IMAGE=redis:7.4-alpine
  else
    say "no image registry answers: building base images from Debian packages (scripts/base-images.sh)"
    mapfile -t bases < <(bash scripts/base-images.sh)
    export KEGNET_BASE_IMAGE=${bases[0]} KEGNET_REDIS_IMAGE=${KEGNET_REDIS_IMAGE:-${bases[1]}}
  fi
fi
say "base image $KEGNET_BASE_IMAGE, redis image ${KEGNET_REDIS_IMAGE:-redis:7.4-alpine}"

# 4. The wheelhouse (the build installs from it with --no-index).
t=$(date +%s)
bash scripts/wheelhouse.sh "$KEGNET_BASE_IMAGE" 2> >(grep -v "^WARNING: Location" >&2)
say "wheelhouse ready in $(( $(date +%s) - t )) s"

# 5. The stack's settings: a throwaway env file, fast heartbeats so a lost worker is noticed in seconds, and
#    a fresh worker secret (the workers fetch and return each job's files through the API), and room for the
#    four jobs one key submits at once on two workers.
cat >"$WORK/smoke.env" <<EOF
KEGNET_REDIS_URL=redis://redis:6379/0
KEGNET_DATA_DIR=/data
KEGNET_WORKER_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
KEGNET_AUTH_DISABLED=false
KEGNET_MAX_ACTIVE_JOBS_PER_KEY=4
KEGNET_HEARTBEAT_INTERVAL_S=1
KEGNET_HEARTBEAT_STALE_S=10
KEGNET_REAPER_INTERVAL_S=2
KEGNET_TORCH_THREADS=1
OMP_NUM_THREADS=1
EOF
export KEGNET_ENV_FILE="$WORK/smoke.env" KEGNET_PORT="$PORT" KEGNET_IMAGE=${KEGNET_IMAGE:-kegnet:latest}
COMPOSE=("${COMPOSE_CMD[@]}" -p "$PROJECT" -f docker-compose.yml -f docker-compose.cpu.yml --profile cpu)
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true   # what a failed earlier run left

# 6. The image (one for api and worker).
t=$(date +%s)
build_args=(); [ "${KEGNET_SMOKE_NO_CACHE:-0}" = 1 ] && build_args=(--no-cache)
"${COMPOSE[@]}" build "${build_args[@]}" api >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
size=$(docker image inspect -f '{{.Size}}' "$KEGNET_IMAGE" | awk '{printf "%.2f GB", $1/1e9}')
say "image $KEGNET_IMAGE built in $(( $(date +%s) - t )) s ($size)"

# 7. The stack, over HTTP.
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3   # scripts/setup.sh's interpreter, as in every script
"$PY" scripts/compose_smoke.py --url "http://127.0.0.1:$PORT" --service worker-cpu -- "${COMPOSE[@]}"
say "compose smoke test passed in $(( $(date +%s) - T0 )) s"
