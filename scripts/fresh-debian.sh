#!/usr/bin/env bash
# The newcomer's path, checked: a fresh Debian 12 container with only python3 and redis-server
# (debootstrap + docker import, as scripts/base-images.sh) gets a copy of this repository's tracked files and
# runs the README's two commands as written: `bash scripts/test.sh ARGS` and `bash scripts/demo.sh`.
#
#   sudo bash scripts/fresh-debian.sh [PYTEST ARGS]   # default: -k "restart or store" tests/service tests/jobs
#
# Root: it may install docker.io and debootstrap and start a dockerd of its own (stopped at the end). pip in
# the container uses this host's pip settings (PIP_* variables, /etc/pip.conf, /etc/xdg/pip) and local wheel
# directories (/opt/wheels, /opt/pypi*), mounted read-only where they exist, else PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
say() { printf '[fresh-debian %5ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
IMAGE=${KEGNET_FRESH_IMAGE:-kegnet-local/fresh-debian:bookworm}
ROOTFS=${KEGNET_ROOTFS_DIR:-/var/tmp/kegnet-rootfs}
ARGS=("$@"); [ ${#ARGS[@]} -gt 0 ] || ARGS=(-k "restart or store" tests/service tests/jobs)
DOCKERD_PID=""
cleanup() {
  if [ -n "$DOCKERD_PID" ]; then
    say "stopping the dockerd this script started"
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
  fi
}
trap cleanup EXIT

tools() {
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    say "installing docker.io debootstrap (Debian packages)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
  fi
  docker info >/dev/null 2>&1 && return 0
  for driver in overlay2 vfs; do
    say "starting dockerd (storage driver $driver)"
    dockerd --storage-driver "$driver" >/tmp/kegnet-fresh-dockerd.log 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill "$DOCKERD_PID" 2>/dev/null || true; wait "$DOCKERD_PID" 2>/dev/null || true; DOCKERD_PID=""
  done
  tail -n 20 /tmp/kegnet-fresh-dockerd.log; exit 1
}

image() {  # Debian 12 (bookworm) minbase plus python3 and redis-server; nothing else
  if docker image inspect "$IMAGE" >/dev/null 2>&1; then say "$IMAGE exists"; return; fi
  if [ ! -x "$ROOTFS/minbase/usr/bin/apt-get" ]; then
    say "debootstrap bookworm"
    rm -rf "$ROOTFS/minbase" && mkdir -p "$ROOTFS"
    debootstrap --variant=minbase bookworm "$ROOTFS/minbase" http://deb.debian.org/debian >"$ROOTFS/debootstrap.log" 2>&1 \
      || { tail -n 20 "$ROOTFS/debootstrap.log"; exit 1; }
  fi
  local root="$ROOTFS/fresh"
  rm -rf "$root" && cp -a "$ROOTFS/minbase" "$root" && cp /etc/resolv.conf "$root/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"
  say "apt-get install python3 redis-server"
  chroot "$root" /bin/sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends python3 redis-server >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*"
  rm -f "$root/usr/sbin/policy-rc.d" && : >"$root/etc/resolv.conf"
  tar --numeric-owner -C "$root" -c . | docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' - "$IMAGE" >/dev/null
  rm -rf "$root"
}

pip_settings() {  # docker run options that give the container this host's pip sources, read-only
  PIP_OPTS=()
  for d in /opt/wheels /opt/pypi /opt/pypi-more /etc/xdg/pip /etc/ssl/certs; do
    [ -e "$d" ] && PIP_OPTS+=(-v "$d:$d:ro")
  done
  [ -f /etc/pip.conf ] && PIP_OPTS+=(-v /etc/pip.conf:/etc/pip.conf:ro)
  while IFS='=' read -r name _; do PIP_OPTS+=(-e "$name"); done < <(env | grep '^PIP_' || true)
}

tools
image
pip_settings
say "running the README's two commands in $IMAGE"
# The tracked files as they are in this checkout (a clean clone's content), as root in /repo.
git ls-files -z | tar --null -T - -c | docker run --rm -i --network host "${PIP_OPTS[@]}" "$IMAGE" bash -c '
  set -e; mkdir /repo && cd /repo && tar -x
  t=$(date +%s); bash scripts/test.sh "$@"; echo "[fresh-debian] scripts/test.sh passed in $(( $(date +%s) - t )) s"
  t=$(date +%s); bash scripts/demo.sh; echo "[fresh-debian] scripts/demo.sh passed in $(( $(date +%s) - t )) s"' \
  fresh "${ARGS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
say "both commands passed in a fresh Debian 12 container"
