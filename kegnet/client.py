"""A small HTTP client for the KegNet service, and the ``kegnet submit|status|wait|download`` commands.

    client = KegnetClient("http://127.0.0.1:8000", api_key="kgn_...")
    job = client.submit("teacher.safetensors", {"arch": "lenet5", "input_shape": [1, 32, 32], "num_classes": 10})
    job = client.submit(["a.safetensors", "b.safetensors"], model, {"distill": {"ensemble_weighting": "entropy"}})
    job = client.submit("resnet18.safetensors", {"arch": "torchvision:resnet18", "input_shape": [3, 224, 224],
                                                 "num_classes": 10})
    job = client.submit("model.onnx", {"arch": "onnx"})    # shape and classes from the graph
    job = client.submit("t.safetensors", model, eval_set="eval.safetensors")  # real accuracy, reported only
    job = client.wait(job["id"])
    client.download(job["id"], "out/")

The URL and key default to ``KEGNET_URL`` and ``KEGNET_API_KEY``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    """The service refused a request; ``status`` is the HTTP status, ``detail`` its message."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status, self.detail = status, detail
        super().__init__(f"HTTP {status}: {_detail_text(detail)}")


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):  # pydantic errors
        return "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in detail)
    return str(detail)


def _plain(obj: Any) -> Any:
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj


class KegnetClient:
    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = (url or os.environ.get("KEGNET_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("KEGNET_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> KegnetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ClientError(r.status_code, detail)
        return r

    def submit(self, checkpoint: str | Path | Sequence[str | Path], model: Any, config: Any = None, *,
               seed: int = 0, device: str = "auto", idempotency_key: str | None = None,
               eval_set: str | Path | None = None) -> dict[str, Any]:
        """Upload one checkpoint, or several (a teacher ensemble, in this order), and queue the job.

        ``eval_set``: an optional labelled safetensors file (``x`` (N, *input_shape) float, ``y`` (N,) int);
        the job reports the teacher's and student's accuracy on it and never trains or selects on it.
        """
        paths = [checkpoint] if isinstance(checkpoint, str | Path) else list(checkpoint)
        spec: dict[str, Any] = {"model": _plain(model), "seed": seed, "device": device}
        if config is not None:
            spec["config"] = _plain(config)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with contextlib.ExitStack() as files:
            # The same field repeated, one part per teacher; the server never uses the file names.
            parts = [("checkpoint", ("checkpoint", files.enter_context(Path(p).open("rb")), "application/octet-stream"))
                     for p in paths]
            if eval_set is not None:
                parts.append(("eval_set", ("eval_set", files.enter_context(Path(eval_set).open("rb")),
                                           "application/octet-stream")))
            r = self.http.post("/v1/jobs", files=parts, data={"spec": json.dumps(spec)}, headers=headers)
        return self._check(r).json()

    def status(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def list(self, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return self._check(self.http.get("/v1/jobs", params=params)).json()

    def events(self, job_id: str, after: int = 0) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/events", params={"after": after})).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def delete(self, job_id: str) -> None:
        self._check(self.http.delete(f"/v1/jobs/{job_id}"))

    def wait(self, job_id: str, *, timeout: float | None = None, poll: float = 1.0,
             progress: bool = True) -> dict[str, Any]:
        """Poll until the job ends; shows a tqdm bar of its progress. Raises ``TimeoutError``."""
        from tqdm import tqdm

        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=100, unit="%", disable=not progress, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")
        try:
            while True:
                job = self.status(job_id)
                bar.set_description_str(f"{job['status']:<10} {job.get('stage') or '':<10}")
                bar.update(round(100 * (job.get("progress") or 0.0)) - bar.n)
                if job["status"] in TERMINAL:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
                time.sleep(poll)
        finally:
            bar.close()

    def download(self, job_id: str, dest: str | Path, names: list[str] | None = None) -> list[Path]:
        """Download artifacts into ``dest`` and check each one's sha256 against the listing."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        listing = self._check(self.http.get(f"/v1/jobs/{job_id}/artifacts")).json()
        paths = []
        for art in listing:
            if names and art["name"] not in names:
                continue
            path = dest / Path(art["name"]).name  # never trust a server-sent path either
            digest = hashlib.sha256()
            with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{art['name']}") as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                with path.open("wb") as f:
                    for chunk in r.iter_bytes():
                        digest.update(chunk)
                        f.write(chunk)
            if digest.hexdigest() != art["sha256"]:
                path.unlink(missing_ok=True)
                raise ClientError(502, f"checksum mismatch for {art['name']}")
            paths.append(path)
        return paths


def register_client_commands(app: Any) -> None:
    """Add ``submit``, ``status``, ``wait`` and ``download`` to a ``typer.Typer`` app."""
    import typer

    url_opt = typer.Option(None, "--url", envvar="KEGNET_URL", help="service URL (default http://127.0.0.1:8000)")
    key_opt = typer.Option(None, "--api-key", envvar="KEGNET_API_KEY", help="API key (Bearer)")
    _add_submit(app, url_opt, key_opt)
    _add_job_commands(app, url_opt, key_opt)


def _fail(exc: Exception) -> NoReturn:
    """The CLI's one error style (kegnet.console.fail): one line; exit 2 when the request was refused as bad input
    (a 4xx other than 401/403/404... all of them: the caller must change something) or could not be built,
    1 when the service failed it (5xx), could not be reached, or a wait timed out."""
    from kegnet.console import fail

    bad_input = isinstance(exc, ValueError) or (isinstance(exc, ClientError) and 400 <= exc.status < 500)
    fail(str(exc) or type(exc).__name__, 2 if bad_input else 1)


def _show(job: dict[str, Any]) -> None:
    import typer

    typer.echo(json.dumps(job, indent=2))


def _add_submit(app: Any, url_opt: Any, key_opt: Any) -> None:
    import typer

    @app.command("submit")
    def submit_cmd(
        checkpoints: list[Path] = typer.Argument(
            ..., exists=True, dir_okay=False,
            help="safetensors or state-dict file; several (one architecture) for a teacher ensemble",
        ),
        arch: str = typer.Option(None, help="lenet5 | resnet | mlp | torchvision:<name> | timm:<name> | onnx "
                                            "(default for .onnx files)"),
        input_shape: str = typer.Option(None, help="C,H,W or F, e.g. 1,32,32"),
        num_classes: int = typer.Option(None),
        sequence: str = typer.Option(None, help='a sequence model: JSON {"vocab_size", "max_length", "bos_id", '
                                               '"eos_id", "pad_id", "sep_id"?} (arch defaults to transformer)'),
        arch_kwargs: str = typer.Option("{}", help="JSON object of architecture arguments"),
        spec_file: Path = typer.Option(None, exists=True, help="JSON file {model, config, seed, device}"),
        config_file: Path = typer.Option(None, exists=True,
                                         help="JSON config of the job (kegnet.config: ClassifierConfig, or "
                                              "SequenceJobConfig for a sequence model)"),
        seed: int = typer.Option(0),
        device: str = typer.Option("auto", help="auto|cpu|cuda"),
        quantize: str = typer.Option(None, help="int8: also an INT8 model (student.int8.onnx), calibrated on the "
                                                "job's synthetic samples; sets compression.quantize"),
        idempotency_key: str = typer.Option(None),
        eval_set: Path = typer.Option(None, exists=True, dir_okay=False,
                                      help="labelled safetensors file (x, y): accuracy reported, never trained on"),
        wait: bool = typer.Option(False, help="follow the job until it ends"),
        out: Path = typer.Option(None, help="download the artifacts here when it succeeds (implies --wait)"),
        url: str = url_opt, api_key: str = key_opt,
    ) -> None:
        """Upload a teacher (or several, an ensemble) and queue a compression job."""
        try:
            spec, model, config = _submission(checkpoints, arch, input_shape, num_classes, sequence, arch_kwargs,
                                              spec_file, config_file)
            if quantize is not None:
                config = _with_quantize(config, quantize)
        except ValueError as exc:  # bad JSON or shapes: one line, exit 2
            _fail(exc)
        with KegnetClient(url, api_key) as client:
            try:
                job = client.submit(checkpoints, model, config, seed=spec.get("seed", seed),
                                    device=spec.get("device", device), idempotency_key=idempotency_key,
                                    eval_set=eval_set)
                if wait or out:
                    job = client.wait(job["id"])
                    if out and job["status"] == "succeeded":
                        client.download(job["id"], out)
            except (ClientError, httpx.HTTPError, TimeoutError) as exc:
                _fail(exc)
        _show(job)
        if job["status"] in ("failed", "cancelled"):
            raise typer.Exit(1)


def _json(what: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None


def _submission(checkpoints: list[Path], arch: str | None, input_shape: str | None, num_classes: int | None,
                sequence: str | None, arch_kwargs: str, spec_file: Path | None,
                config_file: Path | None) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The spec file's fields, the model and the config of ``kegnet submit``'s options; ``ValueError`` says
    which option is wrong."""
    spec: dict[str, Any] = _json("--spec-file", spec_file.read_text()) if spec_file else {}
    model = spec.get("model")
    if model is None and sequence:
        model = {"arch": arch or "transformer", "arch_kwargs": _json("--arch-kwargs", arch_kwargs),
                 "task": "sequence", "sequence": _json("--sequence", sequence)}
    if model is None:
        onnx = all(p.suffix.lower() == ".onnx" for p in checkpoints)
        arch = arch or ("onnx" if onnx else None)
        if not (arch and ((input_shape and num_classes) or arch == "onnx")):
            raise ValueError("give --spec-file, or --arch, --input-shape and --num-classes (an .onnx file needs "
                             "none of them: its graph says)")
        model = {"arch": arch, "arch_kwargs": _json("--arch-kwargs", arch_kwargs)}
        if input_shape:
            try:
                model["input_shape"] = [int(x) for x in input_shape.split(",")]
            except ValueError:
                raise ValueError(f"--input-shape {input_shape!r}: use C,H,W for images or F for feature vectors, "
                                 "e.g. 1,32,32") from None
        if num_classes:
            model["num_classes"] = num_classes
    config = _json("--config-file", config_file.read_text()) if config_file else spec.get("config")
    return spec, model, config


def _with_quantize(config: Any, quantize: str) -> dict[str, Any]:
    """``config`` (a JSON object, or None) with ``compression.quantize`` set; the server validates the value."""
    if config is not None and not isinstance(config, dict):
        raise ValueError("the config must be a JSON object to add --quantize to it")
    config = dict(config or {})
    config["compression"] = {**config.get("compression", {}), "quantize": quantize}
    return config


def _add_job_commands(app: Any, url_opt: Any, key_opt: Any) -> None:
    import typer

    @app.command("status")
    def status_cmd(job_id: str, url: str = url_opt, api_key: str = key_opt) -> None:
        """Show a job."""
        with KegnetClient(url, api_key) as client:
            try:
                _show(client.status(job_id))
            except (ClientError, httpx.HTTPError) as exc:
                _fail(exc)

    @app.command("wait")
    def wait_cmd(job_id: str, timeout: float = typer.Option(None, help="seconds"),
                 url: str = url_opt, api_key: str = key_opt) -> None:
        """Follow a job with a progress bar until it ends; exit 1 if it failed or was cancelled."""
        with KegnetClient(url, api_key) as client:
            try:
                job = client.wait(job_id, timeout=timeout)
            except (ClientError, httpx.HTTPError, TimeoutError) as exc:
                _fail(exc)
        _show(job)
        if job["status"] != "succeeded":
            raise typer.Exit(1)

    @app.command("download")
    def download_cmd(job_id: str, out: Path = typer.Option(Path("."), help="directory"),
                     name: list[str] = typer.Option(None, help="only these artifacts"),
                     url: str = url_opt, api_key: str = key_opt) -> None:
        """Download a finished job's artifacts (checksums verified)."""
        with KegnetClient(url, api_key) as client:
            try:
                for path in client.download(job_id, out, name or None):
                    typer.echo(str(path))
            except (ClientError, httpx.HTTPError) as exc:
                _fail(exc)
