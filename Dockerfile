# One image for the API and the worker (docker compose runs both from it). The PyPI torch wheel for Linux
# bundles CUDA; the worker gets the GPU from docker compose (deploy.resources.reservations.devices).
#
# Offline / air-gapped builds: put wheels in wheelhouse/ first (bash scripts/wheelhouse.sh) and every Python
# package is installed from there with --no-index; with wheelhouse/ empty, from PyPI. BASE_IMAGE is any
# image with python3 (3.11) and its venv module: the public slim image by default, or a local one built
# from Debian packages (scripts/compose-smoke.sh does that where no registry is reachable).
# Classic-builder compatible (docker-compose v1 builds through the API): no BuildKit-only syntax.
ARG BASE_IMAGE=python:3.11-slim

# 1. The pinned requirements, from pyproject.toml. A stage of its own so that the expensive install below is
#    cached on the list itself, not on unrelated edits of pyproject.toml.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml scripts/requirements.py /src/
RUN python3 /src/requirements.py /src/pyproject.toml service onnx > /requirements.txt

# 2. Every dependency in a virtual environment (Debian's python3 refuses system-wide pip installs), and the
#    setuptools wheel that builds the project in stage 3 (kept outside the venv). The wheels are deleted in
#    the same step, so they never reach a later layer.
FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=requirements /requirements.txt /requirements.txt
COPY wheelhouse/ /wheels/
RUN set -e; python3 -m venv /opt/venv; \
    if ls /wheels/*.whl >/dev/null 2>&1; then \
      echo "installing from the wheelhouse only (--no-index)"; index="--no-index --find-links /wheels"; \
    else index=""; fi; \
    /opt/venv/bin/pip install $index -r /requirements.txt; \
    /opt/venv/bin/pip download -q $index --no-deps -d /opt/build-wheels "$(grep '^setuptools==' /requirements.txt)"; \
    rm -rf /wheels

# 3. The project itself, apart from the dependencies: a code change rebuilds only this small stage and the
#    final copy. Installed with its metadata (the manifest records the version); its console script is
#    pointed at the runtime's interpreter.
FROM ${BASE_IMAGE} AS project
COPY --from=deps /opt/build-wheels /tmp/build-wheels
COPY pyproject.toml README.md /src/
COPY kegnet /src/kegnet
COPY jobs /src/jobs
COPY service /src/service
COPY worker /src/worker
RUN python3 -m venv /tmp/build \
 && /tmp/build/bin/pip install -q --no-deps --no-index --find-links /tmp/build-wheels --target /opt/kegnet /src \
 && sed -i '1s|.*|#!/opt/venv/bin/python|' /opt/kegnet/bin/kegnet

# 4. The runtime: base + the environment + the project. Uploads are parsed here: never run as root.
#    Settings first, the two large copies last: with the vfs storage driver every step after them would
#    copy the whole 6 GB file system again.
FROM ${BASE_IMAGE}
RUN useradd --create-home --uid 10001 kegnet && mkdir -p /data && chown kegnet /data
ENV PATH=/opt/kegnet/bin:/opt/venv/bin:$PATH PYTHONPATH=/opt/kegnet \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 KEGNET_DATA_DIR=/data
WORKDIR /home/kegnet
EXPOSE 8000
CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000"]
USER kegnet
COPY --from=deps /opt/venv /opt/venv
COPY --from=project /opt/kegnet /opt/kegnet
