# One image for the API and the worker. The PyPI torch wheel for Linux bundles CUDA; the worker gets the GPU
# from docker compose (deploy.resources.reservations.devices).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md* ./
COPY kegnet ./kegnet
COPY service ./service
COPY worker ./worker
RUN pip install "torch==2.14.1" "torchvision==0.29.1" && pip install ".[service,onnx]"

# Uploads are parsed by the service: never run it as root.
RUN useradd --create-home --uid 10001 kegnet && mkdir -p /data && chown kegnet /data
USER kegnet
ENV KEGNET_DATA_DIR=/data
EXPOSE 8000
CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000"]
