"""``kegnet`` command line: ``kegnet compress`` runs the pipeline locally; ``submit|status|wait|download``
talk to the HTTP service (see kegnet/client.py)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from kegnet.config import MAX_TEACHERS, TASK_CONFIGS, config_for
from kegnet.console import fail
from kegnet.errors import KegnetError
from kegnet.events import ProgressEvent
from kegnet.spec import ModelSpec

EPILOG = ("Errors are one line on stderr, 'error: ...'. Exit codes: 0 done; 1 the run or the job failed; "
          "2 bad options or input (nothing was run).")
# Plain click help: typer's rich panels show flags as taking values ("--verbose <bool>").
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Data-free model compression (KegNet).", epilog=EPILOG)


class BadInput(ValueError):
    """Bad options or input, found before anything runs: exit code 2."""


def validation_message(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """pydantic's errors as one line: each field's dotted name and what is wrong or what is allowed."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and x in TASK_CONFIGS)]
        field = ".".join(loc) or "value"
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1]) if model else []
            parts.append(f"unknown field {field!r}" + (f"; allowed: {', '.join(allowed)}" if allowed else ""))
        else:
            parts.append(f"{field}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    """The field names of the (nested) model at ``path`` of ``model``, or [] when it is not a model."""
    for name in path:
        info = model.model_fields.get(name)
        sub = getattr(info, "annotation", None) if info else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return sorted(model.model_fields)


@app.callback()
def _root() -> None:
    """Data-free model compression (KegNet)."""  # a callback keeps `compress` a subcommand


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise BadInput(f"--input-shape {text!r}: use C,H,W for images or F for feature vectors, e.g. 1,32,32") \
            from None


def _parse_ranks(text: str | None) -> dict[str, list[int]]:
    """``conv2=3:4,conv3=7:11`` -> {"conv2": [3, 4], "conv3": [7, 11]} (in_rank:out_rank)."""
    if not text:
        return {}
    ranks = {}
    for item in text.split(","):
        name, _, pair = item.partition("=")
        a, _, b = pair.partition(":")
        try:
            ranks[name.strip()] = [int(a), int(b or a)]
        except ValueError:
            raise BadInput(f"--ranks: bad rank {item!r}; use LAYER=IN:OUT") from None
    return ranks


def _json(option: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadInput(f"{option} is not valid JSON: {exc}") from None


def check_arch(arch: str) -> None:
    """Refuse an architecture name nothing provides before anything runs, with the closest names (did you
    mean): built-in names here, torchvision's and timm's in kegnet.models.libraries."""
    from kegnet.models import libraries, list_models

    source, name = libraries.split_arch(arch)
    try:
        if source in libraries.SOURCES:
            libraries.check_library_name(source, name)
            return
    except ImportError:  # the library is not installed: the run says so
        return
    known = list_models()
    if arch != "onnx" and arch not in known:
        hint = libraries.did_you_mean(arch, known) or f"; available: {', '.join(known)}"
        raise BadInput(f"unknown architecture {arch!r}{hint} (or torchvision:<name>, timm:<name>)")


def spec_from_options(checkpoints: list[Path], arch: str | None, arch_kwargs: str, input_shape: str | None,
                      num_classes: int | None, sequence: str | None = None) -> ModelSpec:
    """The ``ModelSpec`` of the command's options; ``.onnx`` files default to ``arch=onnx``; ``sequence`` (a
    JSON ``SequenceSpec``) makes it a sequence model."""
    if sequence is not None:
        return ModelSpec(arch=arch or "transformer", arch_kwargs=_json("--arch-kwargs", arch_kwargs),
                         task="sequence", sequence=_json("--sequence", sequence))
    if arch is None:
        if not all(p.suffix.lower() == ".onnx" for p in checkpoints):
            raise BadInput("give --arch (lenet5, resnet, mlp, torchvision:<name>, timm:<name>); only .onnx files "
                           "bring their own architecture")
        arch = "onnx"
    return ModelSpec(arch=arch, arch_kwargs=_json("--arch-kwargs", arch_kwargs),
                     input_shape=_parse_shape(input_shape) if input_shape else None, num_classes=num_classes)


class StageProgress:
    """Shows pipeline events: a bar in steps for stages that count them (generators, student) on a terminal,
    plain lines every ~10% otherwise, and one line when each stage ends with its elapsed time, as the manifest
    records it; skipped stages stay silent. A stage runs from the previous stage's last event to its own last
    one (some stages, e.g. decompose, report only when they end). While no line is printed for
    ``heartbeat_s`` (a long stage without step counts), a line says what runs and for how long."""

    def __init__(self, stream: Any = None, stages: Sequence[str] = (), heartbeat_s: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.stages = list(stages)  # the task's stage order: names the stage that runs before it reports
        self.bar: tqdm | None = None
        self.stage: str | None = None
        self.message = ""
        self.stage_done = False
        self.started = self.last_event = self.last_line = time.monotonic()
        self.next_line = 0.0  # fraction of the stage at which the next plain line is printed
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            now = time.monotonic()
            if event.stage != self.stage:
                self._end_stage(self.last_event)  # a stage whose last event counted steps ends here
                # The new stage began when the previous one reported last (the first stage: at start).
                self.stage, self.started, self.next_line = event.stage, self.last_event, 0.0
                self.stage_done, self.message = False, ""
            self.last_event, self.message = now, event.message or self.message
            if event.stage == "done" or event.skipped:
                self.stage_done = True
                return
            if event.total:
                self._steps(event)
            elif event.stage_progress >= 1.0:  # the stage's closing report
                self._end_stage(now)
        self._start_ticker()

    def _end_stage(self, end: float) -> None:
        """The stage's one closing line, with the seconds it ran (once; not for skipped stages)."""
        self._close_bar()
        if self.stage is not None and not self.stage_done:
            self._line(f"{self.stage:<10} {self.message} ({end - self.started:.1f} s)")
        self.stage_done = True

    def _steps(self, event: ProgressEvent) -> None:
        shown = {k: round(v, 4) for k, v in event.metrics.items() if isinstance(v, float)}
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(total=event.total, desc=f"{event.stage:<10}", unit="step", file=self.stream)
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update((event.step or 0) - self.bar.n)
            self.last_line = time.monotonic()
        elif event.stage_progress >= self.next_line:  # about every 10% of the stage
            metrics = " ".join(f"{k}={v}" for k, v in shown.items())
            self._line(f"{event.stage:<10} {event.step}/{event.total} {metrics}".rstrip())
            self.next_line = event.stage_progress + 0.1

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self.last_line = time.monotonic()

    def running(self) -> str | None:
        """What runs now, as the heartbeat line says it: ``plan: timing 14 layers… 12 s``; None at the end."""
        now = time.monotonic()
        if self.stage is None:
            return f"starting… {now - self.started:.0f} s"
        if not self.stage_done:
            return f"{self.stage}: {self.message}… {now - self.started:.0f} s"
        if self.stage == "done":
            return None
        after = self.stages.index(self.stage) + 1 if self.stage in self.stages else len(self.stages)
        name = self.stages[after] if after < len(self.stages) else f"after {self.stage}"
        return f"{name}… {now - self.last_event:.0f} s"  # a stage that reports only when it ends (decompose)

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, self.heartbeat_s)):
            with self._lock:
                if self.bar is None and time.monotonic() - self.last_line >= self.heartbeat_s:
                    text = self.running()
                    if text is None:
                        return
                    self._line(text)

    def _start_ticker(self) -> None:
        if self._ticker is None and not self._stop.is_set():
            self._ticker = threading.Thread(target=self._tick, name="kegnet-progress", daemon=True)
            self._ticker.start()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.last_line = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._close_bar()


@app.command()
def compress(
    checkpoints: list[Path] = typer.Argument(
        ..., exists=True, dir_okay=False, metavar="CHECKPOINT",
        help=f".safetensors, torch.save state dict or .onnx; up to {MAX_TEACHERS} of one architecture: a teacher "
             "ensemble",
    ),
    arch: str | None = typer.Option(
        None, help="lenet5 | resnet | mlp | torchvision:<name> | timm:<name> | onnx (default for .onnx files)"),
    input_shape: str | None = typer.Option(None, help="C,H,W or F (an ONNX graph may give it)"),
    num_classes: int | None = typer.Option(None, help="(an ONNX graph may give it)"),
    sequence: str | None = typer.Option(None, help='a sequence model instead of a classifier: JSON {"vocab_size", '
                                        '"max_length", "bos_id", "eos_id", "pad_id", "sep_id"?}; --arch transformer'),
    out: Path = typer.Option(..., help="output directory"),
    arch_kwargs: str = typer.Option("{}", help="JSON keyword arguments of the architecture"),
    method: str | None = typer.Option(None, help="kegnet (default) | gaussian | uniform | tucker-only"),
    preset: str = typer.Option("fast", help="fast (measured default) | paper (the paper's settings)"),
    layers: str | None = typer.Option(None, help="comma-separated layer names or globs"),
    rank_method: str | None = typer.Option(
        None, help="ratio (default: --target-ratio, 2x unless given) | evbmf | fraction | explicit"),
    ranks: str | None = typer.Option(None, help="explicit ranks: LAYER=IN:OUT,..."),
    rank_fraction: float | None = typer.Option(None, help="share of each layer's ranks kept (rank-method fraction)"),
    target_ratio: float | None = typer.Option(None, help="whole-model compression ratio (rank-method ratio; "
                                                                "default 2)"),
    keep_slower: bool = typer.Option(False, "--keep-slower",
                                     help="keep factorizations that measured slower than their layer on this device"),
    quantize: str | None = typer.Option(None, help="int8: also write student.int8.onnx, calibrated on the job's "
                                                   "synthetic samples (none: the default)"),
    generator_steps: int | None = typer.Option(None, help="override the preset's generator steps"),
    num_generators: int | None = typer.Option(None, help="override the preset's number of generators"),
    distill_steps: int | None = typer.Option(None, help="override the preset's student steps"),
    config_json: str | None = typer.Option(None, "--config", help="JSON overrides of the job's config sections "
                                           "(kegnet.config: ClassifierConfig, or SequenceJobConfig with --sequence)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    seed: int = typer.Option(0, help="seed of every random draw (the same seed repeats a run)"),
    threads: int | None = typer.Option(None, min=1, max=256,
                                       help="CPU threads for torch (default: torch's, one per core; on a busy "
                                            "machine fewer run faster)"),
    eval_set: Path | None = typer.Option(
        None, "--eval-set", exists=True, dir_okay=False,
        help="labelled safetensors file: x (N, *input_shape) float, y (N,) int; accuracy is reported, never "
             "used for training or selection"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log what each stage does"),
) -> None:
    """Compress CHECKPOINTS without data and write the student, manifest and curves to OUT.

    Several CHECKPOINTS of one architecture form a teacher ensemble (distill.ensemble_* fields in --config).
    """
    if len(checkpoints) > MAX_TEACHERS:
        fail(f"invalid options: at most {MAX_TEACHERS} checkpoints, got {len(checkpoints)}")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    spec, config = _options(checkpoints, arch, arch_kwargs, input_shape, num_classes, sequence, preset,
                            _overrides_of(method, layers, ranks, rank_method, rank_fraction, target_ratio,
                                          keep_slower, quantize, generator_steps, num_generators, distill_steps,
                                          config_json))
    if threads:
        import torch

        torch.set_num_threads(threads)

    result = _run(checkpoints, spec, config, out, device=device, seed=seed, eval_set=eval_set)
    for line in result.report.lines():
        typer.echo(line)
    typer.echo(f"\nuse the student ({out}):")
    typer.echo(result.report.usage(out))


def _overrides_of(*options: Any) -> dict[str, Any]:
    try:
        return _overrides(*options)
    except BadInput as exc:
        fail(f"invalid options: {exc}")


def _options(checkpoints: list[Path], arch: str | None, arch_kwargs: str, input_shape: str | None,
             num_classes: int | None, sequence: str | None, preset: str, overrides: dict[str, Any]) -> tuple[Any, Any]:
    """The run's spec and config from the options, or one ``error: invalid options: ...`` line and exit 2."""
    try:
        spec = spec_from_options(checkpoints, arch, arch_kwargs, input_shape, num_classes, sequence)
        check_arch(spec.arch)
    except ValidationError as exc:
        fail(f"invalid options: {validation_message(exc, ModelSpec)}")
    except ValueError as exc:  # BadInput, and the libraries' unknown names
        fail(f"invalid options: {exc}")
    try:
        config = config_for(spec.task, preset, **overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        fail(f"invalid options: {validation_message(exc, TASK_CONFIGS[spec.task])}")
    except (ValueError, KeyError) as exc:
        fail(f"invalid options: {exc}")
    return spec, config


def _run(checkpoints: list[Path], spec: ModelSpec, config: Any, out: Path, **options: Any) -> Any:
    """``run_pipeline`` with progress on stderr; a library error is one red line and exit code 1, and a failed
    run leaves no empty folder behind."""
    from kegnet.pipeline import run_pipeline  # torch import deferred until a command needs it
    from kegnet.tasks import get_task

    progress = StageProgress(stages=[stage.name for stage in get_task(spec.task).stages])
    created = not out.exists()
    try:
        return run_pipeline(checkpoints[0] if len(checkpoints) == 1 else checkpoints, spec, config, out,
                            progress=progress, **options)
    except KegnetError as exc:
        progress.close()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        fail(str(exc), 1)
    finally:
        progress.close()


def _overrides(method: str | None, layers: str | None, ranks: str | None, rank_method: str | None,
               rank_fraction: float | None, target_ratio: float | None, keep_slower: bool, quantize: str | None,
               generator_steps: int | None, num_generators: int | None, distill_steps: int | None,
               config_json: str | None) -> dict[str, Any]:
    """The config sections the options set, over ``--config``'s JSON; sections left empty are not sent, so a
    sequence job is not given the classifier's."""
    comp: dict[str, Any] = {}
    if layers:
        comp["layers"] = [v.strip() for v in layers.split(",") if v.strip()]
    if ranks:
        comp["ranks"] = _parse_ranks(ranks)
        comp.setdefault("rank_method", "explicit")
    for key, value in (("rank_method", rank_method), ("rank_fraction", rank_fraction),
                       ("target_ratio", target_ratio), ("keep_slower", keep_slower or None), ("quantize", quantize)):
        if value is not None:
            comp[key] = value
    gen = {k: v for k, v in (("steps", generator_steps), ("num_generators", num_generators)) if v is not None}
    dist = {"steps": distill_steps} if distill_steps is not None else {}
    overrides: dict[str, Any] = _json("--config", config_json) if config_json else {}
    if not isinstance(overrides, dict):
        raise BadInput('--config must be a JSON object, e.g. {"generator": {"steps": 100}}')
    for section, values in (("compression", comp), ("generator", gen), ("distill", dist)):
        if values:
            overrides[section] = {**overrides.get(section, {}), **values}
    if method is not None:
        overrides["method"] = method
    return overrides


def main() -> None:
    try:
        from kegnet.client import register_client_commands
    except ImportError:  # the HTTP client needs only httpx, but keep the local CLI usable without it
        pass
    else:
        register_client_commands(app)
    sys.exit(run_app())


def run_app(args: list[str] | None = None) -> int:
    """The app with click's errors (unknown option, missing file, bad value) in the CLI's one-line style."""
    from typer.exceptions import TyperException  # the base of click's errors, as typer vendors click

    try:
        result = app(args=args, standalone_mode=False, prog_name="kegnet")
    except TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # no arguments: the help, as it is
            print(exc.format_message(), file=sys.stderr)
            return 2
        return _one_line(exc.format_message(), int(getattr(exc, "exit_code", 2)))
    except (typer.Abort, KeyboardInterrupt):
        return _one_line("aborted", 130)
    return result if isinstance(result, int) else 0


def _one_line(message: str, code: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    main()
