"""Run an uploaded model's checks in a child process with a memory and a time limit.

A stranger's upload can describe a model that allocates without bound or computes for hours when it runs
(an ONNX graph of chained huge MatMuls, a constant of a billion floats). The API never runs one
(kegnet.preflight.check_static reads files only); the worker's ``validate`` stage runs
``kegnet.preflight.check_model`` here first: in ``python -m kegnet.isolation``, whose address space is capped
(``RLIMIT_AS``: what the imports took, plus ``memory_bytes``) and whose CPU time is capped
(``RLIMIT_CPU``), killed at ``timeout_s`` of wall time or as soon as the job is cancelled. A model that
passes here is then loaded by the job itself; one that does not fails the job with a message.

The child reads one JSON request on stdin and writes one JSON answer on stdout: ``{"spec": ...}`` or
``{"error": message, "kind": exception class name}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kegnet.errors import Cancelled, CheckpointError, CompressionError, KegnetError, SpecError

GIB = 1024 ** 3
_KINDS: dict[str, type[KegnetError]] = {c.__name__: c for c in (KegnetError, CheckpointError, SpecError,
                                                                  CompressionError)}
_POLL_S = 0.2  # how often the parent looks at the child and at the cancel flag


@dataclass(frozen=True)
class Isolation:
    """The child's limits: memory above what its imports take, and wall-clock seconds."""

    memory_bytes: int = 8 * GIB
    timeout_s: float = 600.0


def check_model_isolated(paths: Sequence[Path], spec: Any, config: Any, limits: Any, isolation: Isolation, *,
                         eval_set: Path | None = None, should_cancel: Callable[[], bool] | None = None) -> Any:
    """``kegnet.preflight.check_model`` in a limited child process; returns the resolved ``ModelSpec``.

    Raises the child's ``KegnetError`` (same class and message), ``KegnetError`` when the child ran out of
    memory or time or died, and ``Cancelled`` (the child killed) when ``should_cancel()`` turns true.
    """
    request = {"paths": [str(p) for p in paths], "spec": spec.model_dump(mode="json"),
               "config": config.model_dump(mode="json"), "limits": asdict(limits),
               "eval_set": str(eval_set) if eval_set is not None else None, "memory_bytes": isolation.memory_bytes,
               "cpu_s": int(isolation.timeout_s) + 5}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen([sys.executable, "-m", "kegnet.isolation"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    out, err = _wait(proc, json.dumps(request).encode(), isolation, should_cancel)
    answer = _answer(out)
    if answer is not None and "spec" in answer:
        from kegnet.spec import ModelSpec

        return ModelSpec.model_validate(answer["spec"])
    if answer is not None and "error" in answer:
        raise _KINDS.get(answer.get("kind", ""), KegnetError)(answer["error"])
    raise KegnetError(_died(proc.returncode, isolation, err))


def _wait(proc: subprocess.Popen, request: bytes, isolation: Isolation,
          should_cancel: Callable[[], bool] | None) -> tuple[bytes, bytes]:
    """Feed the child its request and wait for it, killing it on cancel or past the time limit."""
    deadline = time.monotonic() + isolation.timeout_s
    pending: bytes | None = request
    while True:
        try:
            return proc.communicate(pending, timeout=_POLL_S)
        except subprocess.TimeoutExpired:
            pending = None  # written once; communicate() goes on reading
        if should_cancel is not None and should_cancel():
            _kill(proc)
            raise Cancelled("cancelled while checking the teacher")
        if time.monotonic() > deadline:
            _kill(proc)
            raise KegnetError(f"checking the teacher (one forward pass of each file) took longer than "
                              f"{isolation.timeout_s:.0f} s, this service's limit; upload a smaller model or one "
                              "that computes less per sample")


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate()


def _answer(out: bytes) -> dict[str, Any] | None:
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def _died(returncode: int | None, isolation: Isolation, err: bytes) -> str:
    tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
    how = f"signal {-returncode}" if returncode is not None and returncode < 0 else f"exit code {returncode}"
    return (f"the teacher could not be checked within this service's limits ({isolation.memory_bytes / GIB:.1f} "
            f"GiB of memory, {isolation.timeout_s:.0f} s): the check process ended with {how}"
            f"{' (' + tail[0][:200] + ')' if tail[0] else ''}; upload a model that needs less memory or time")


# ---- the child ------------------------------------------------------------------------------------------
def _vm_bytes() -> int:
    """This process's current address space (VmSize), what the imports took."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _limit(memory_bytes: int, cpu_s: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + memory_bytes, resource.RLIM_INFINITY))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))


def _child(request: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: F401 - imported before the limit: the imports' own address space is not the model's

    from kegnet.config import TASK_CONFIGS
    from kegnet.preflight import Limits, check_model
    from kegnet.spec import ModelSpec

    spec = ModelSpec.model_validate(request["spec"])
    config = TASK_CONFIGS[spec.task].model_validate(request["config"])
    limits = Limits(**request["limits"])
    eval_set = Path(request["eval_set"]) if request["eval_set"] else None
    _limit(request["memory_bytes"], request["cpu_s"])
    try:
        # No plan here: it only reads weights (nothing of the upload runs), and the job's own plan stage makes
        # it next, with the same errors; on a large teacher EVBMF takes tens of seconds.
        resolved = check_model([Path(p) for p in request["paths"]], spec, config, limits, eval_set=eval_set,
                               check_plan=False)
    except KegnetError as exc:
        return {"error": str(exc), "kind": type(exc).__name__}
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, MemoryError) or "alloc" in str(exc).lower():
            gib = request["memory_bytes"] / GIB
            return {"error": f"the teacher needs more than this service's {gib:.1f} GiB of memory to run once; "
                             "upload a smaller model", "kind": "SpecError"}
        return {"error": f"the teacher failed to run: {str(exc)[:300]}", "kind": "SpecError"}
    return {"spec": resolved.model_dump(mode="json")}


def main() -> None:
    answer = _child(json.loads(sys.stdin.buffer.read()))
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
