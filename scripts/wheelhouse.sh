#!/usr/bin/env bash
# Fill wheelhouse/ with a wheel for every pinned requirement of the image (pyproject.toml: dependencies and
# the service and onnx extras, plus setuptools to build the project), for an offline `docker build`.
#
#   bash scripts/wheelhouse.sh [BASE_IMAGE]
#
# Runs where PyPI is reachable. The wheels are resolved on this host first (its pip settings and local
# mirrors apply); with BASE_IMAGE, a second pass runs pip inside that image, so environment markers are
# those of the image's own Python (Debian's 3.11.2 needs async-timeout, a 3.11.7 host does not) and only
# the missing wheels are fetched. Safe to run again: wheels already here are not downloaded twice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BASE_IMAGE=${1:-}
mkdir -p wheelhouse
python3 scripts/requirements.py pyproject.toml service onnx > wheelhouse/requirements.txt

# Done before for the same requirements and base image: nothing to fetch.
stamp="$(sha256sum wheelhouse/requirements.txt | cut -c1-16) ${BASE_IMAGE:-host}"
[ -n "$BASE_IMAGE" ] && stamp="$stamp $(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")"
if [ "$(cat wheelhouse/.complete 2>/dev/null)" = "$stamp" ]; then
  echo "wheelhouse: up to date ($(ls wheelhouse/*.whl | wc -l) wheels, $(du -sh wheelhouse | cut -f1))"
  exit 0
fi
rm -f wheelhouse/.complete

"$PY" -m pip wheel -q --disable-pip-version-check --wheel-dir wheelhouse --find-links wheelhouse \
  -r wheelhouse/requirements.txt

if [ -n "$BASE_IMAGE" ]; then
  # The host's CA bundle, for hosts behind a TLS-intercepting proxy (pip's own bundle would not trust it).
  ca=(); [ -f /etc/ssl/certs/ca-certificates.crt ] && ca=(-v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro
                                                          -e PIP_CERT=/host-ca.crt)
  docker run --rm "${ca[@]}" -v "$PWD/wheelhouse:/wheelhouse" -e PIP_DISABLE_PIP_VERSION_CHECK=1 \
    --user "$(id -u):$(id -g)" -e HOME=/tmp "$BASE_IMAGE" sh -c '
      python3 -m venv /tmp/venv && /tmp/venv/bin/pip download -q --only-binary=:all: \
        --dest /wheelhouse --find-links /wheelhouse -r /wheelhouse/requirements.txt'
fi
echo "$stamp" > wheelhouse/.complete
echo "wheelhouse: $(ls wheelhouse/*.whl | wc -l) wheels, $(du -sh wheelhouse | cut -f1)"
