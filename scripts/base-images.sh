#!/usr/bin/env bash
# Build the two base images the stack needs from Debian's own packages, for hosts that cannot pull from an
# image registry: a Python 3.11 image (python3 + venv) for the Dockerfile and a Redis image for compose.
#
#   sudo bash scripts/base-images.sh      # prints the two image names; skips an image that already exists
#
# debootstrap builds a minimal Debian root file system, apt-get (in a chroot) adds the packages, and
# `docker import` turns each tree into an image. Needs root, debootstrap and a reachable Debian mirror.
set -euo pipefail
SUITE=${KEGNET_DEBIAN_SUITE:-bookworm}
MIRROR=${KEGNET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON_IMAGE=${KEGNET_LOCAL_PYTHON_IMAGE:-kegnet-local/python:3.11-$SUITE}
REDIS_IMAGE=${KEGNET_LOCAL_REDIS_IMAGE:-kegnet-local/redis:7-$SUITE}
WORK=${KEGNET_ROOTFS_DIR:-/var/tmp/kegnet-rootfs}
PATH_ENV='ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

log() { echo "[base-images] $*" >&2; }

# A minimal Debian tree, made once and copied for each image.
minbase() {
  if [ ! -x "$WORK/minbase/usr/bin/apt-get" ]; then
    log "debootstrap $SUITE from $MIRROR"
    rm -rf "$WORK/minbase" && mkdir -p "$WORK"
    debootstrap --variant=minbase "$SUITE" "$WORK/minbase" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -n 20 "$WORK/debootstrap.log" >&2; exit 1; }
  fi
}

# build_image NAME PACKAGES CHANGES...: a copy of the minimal tree plus PACKAGES, imported as NAME.
build_image() {
  local name=$1 packages=$2; shift 2
  if docker image inspect "$name" >/dev/null 2>&1; then log "$name exists"; return; fi
  minbase
  local root="$WORK/${name//[\/:]/_}"
  rm -rf "$root" && cp -a "$WORK/minbase" "$root"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # No daemon may start inside the chroot while packages install (redis-server's postinst would try).
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"
  log "installing $packages into $name"
  chroot "$root" /bin/sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends $packages >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*"
  rm -f "$root/usr/sbin/policy-rc.d" && : >"$root/etc/resolv.conf"
  local changes=(--change "$PATH_ENV" --change "ENV LANG=C.UTF-8")
  for c in "$@"; do changes+=(--change "$c"); done
  tar --numeric-owner -C "$root" -c . | docker import "${changes[@]}" - "$name" >/dev/null
  rm -rf "$root"
  log "$name: $(docker image inspect -f '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}')"
}

build_image "$PYTHON_IMAGE" "python3 python3-venv ca-certificates" 'CMD ["python3"]'
# Debian's redis-server runs in the foreground when given arguments; compose passes --dir /data.
build_image "$REDIS_IMAGE" "redis-server" 'WORKDIR /data' 'EXPOSE 6379' 'CMD ["redis-server", "--dir", "/data"]'
echo "$PYTHON_IMAGE"
echo "$REDIS_IMAGE"
