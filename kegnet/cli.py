"""``kegnet`` command line: ``kegnet compress`` runs the pipeline locally; ``submit|status|wait|download``
talk to the HTTP service (see kegnet/client.py)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from tqdm import tqdm

from kegnet.config import MAX_TEACHERS, config_for
from kegnet.errors import KegnetError
from kegnet.events import ProgressEvent
from kegnet.spec import ModelSpec

# Plain click help: typer's rich panels show flags as taking values ("--verbose <bool>").
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Data-free model compression (KegNet).")


@app.callback()
def _root() -> None:
    """Data-free model compression (KegNet)."""  # a callback keeps `compress` a subcommand


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise typer.BadParameter("use C,H,W for images or F for feature vectors, e.g. 1,32,32") from exc


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
        except ValueError as exc:
            raise typer.BadParameter(f"bad rank {item!r}; use LAYER=IN:OUT") from exc
    return ranks


def spec_from_options(checkpoints: list[Path], arch: str | None, arch_kwargs: str, input_shape: str | None,
                      num_classes: int | None, sequence: str | None = None) -> ModelSpec:
    """The ``ModelSpec`` of the command's options; ``.onnx`` files default to ``arch=onnx``; ``sequence`` (a
    JSON ``SequenceSpec``) makes it a sequence model."""
    if sequence is not None:
        return ModelSpec(arch=arch or "transformer", arch_kwargs=json.loads(arch_kwargs), task="sequence",
                         sequence=json.loads(sequence))
    if arch is None:
        if not all(p.suffix.lower() == ".onnx" for p in checkpoints):
            raise typer.BadParameter("give --arch (lenet5, resnet, mlp, torchvision:<name>, timm:<name>); only "
                                     ".onnx files bring their own architecture", param_hint="--arch")
        arch = "onnx"
    return ModelSpec(arch=arch, arch_kwargs=json.loads(arch_kwargs),
                     input_shape=_parse_shape(input_shape) if input_shape else None, num_classes=num_classes)


class StageProgress:
    """Shows pipeline events: a bar in steps for stages that count them (generators, student) on a
    terminal, one line per stage otherwise, and one line when each stage ends; skipped stages stay silent."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.bar: tqdm | None = None
        self.stage: str | None = None
        self.started = time.monotonic()
        self.next_line = 0.0  # fraction of the stage at which the next plain line is printed

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage != self.stage:
            self.close()
            self.stage, self.started, self.next_line = event.stage, time.monotonic(), 0.0
        if event.stage == "done" or event.skipped:
            return
        if event.total:
            shown = {k: round(v, 4) for k, v in event.metrics.items() if isinstance(v, float)}
            if self.tty:
                if self.bar is None:
                    self.bar = tqdm(total=event.total, desc=f"{event.stage:<10}", unit="step", file=self.stream)
                self.bar.set_postfix(shown, refresh=False)
                self.bar.update((event.step or 0) - self.bar.n)
            elif event.stage_progress >= self.next_line:  # about every 10% of the stage
                metrics = " ".join(f"{k}={v}" for k, v in shown.items())
                print(f"{event.stage:<10} {event.step}/{event.total} {metrics}".rstrip(), file=self.stream, flush=True)
                self.next_line = event.stage_progress + 0.1
        if event.stage_progress >= 1.0 and not event.total:
            print(f"{event.stage:<10} {event.message} ({time.monotonic() - self.started:.1f} s)", file=self.stream,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
    rank_method: str | None = typer.Option(None, help="evbmf | fraction | explicit | ratio"),
    ranks: str | None = typer.Option(None, help="explicit ranks: LAYER=IN:OUT,..."),
    rank_fraction: float | None = typer.Option(None, help="share of each layer's ranks kept (rank-method fraction)"),
    target_ratio: float | None = typer.Option(None, help="whole-model compression ratio (rank-method ratio)"),
    keep_slower: bool = typer.Option(False, "--keep-slower",
                                     help="keep factorizations that measured slower than their layer on this device"),
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
        typer.secho(f"invalid options: at most {MAX_TEACHERS} checkpoints, got {len(checkpoints)}", fg="red",
                    err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)

    try:
        spec = spec_from_options(checkpoints, arch, arch_kwargs, input_shape, num_classes, sequence)
        overrides = _overrides(method, layers, ranks, rank_method, rank_fraction, target_ratio, keep_slower,
                               generator_steps, num_generators, distill_steps, config_json)
        config = config_for(spec.task, preset, **overrides)  # type: ignore[arg-type]
    except (ValidationError, ValueError, KeyError) as exc:  # json.JSONDecodeError is a ValueError
        typer.secho(f"invalid options: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc

    result = _run(checkpoints, spec, config, out, device=device, seed=seed, eval_set=eval_set)
    for line in result.report.lines():
        typer.echo(line)
    typer.echo(f"\nuse the student ({out}):")
    typer.echo(result.report.usage(out))


def _run(checkpoints: list[Path], spec: ModelSpec, config: Any, out: Path, **options: Any) -> Any:
    """``run_pipeline`` with progress on stderr; a library error is one red line and exit code 1, and a failed
    run leaves no empty folder behind."""
    from kegnet.pipeline import run_pipeline  # torch import deferred until a command needs it

    progress = StageProgress()
    created = not out.exists()
    try:
        return run_pipeline(checkpoints[0] if len(checkpoints) == 1 else checkpoints, spec, config, out,
                            progress=progress, **options)
    except KegnetError as exc:
        progress.close()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    finally:
        progress.close()


def _overrides(method: str | None, layers: str | None, ranks: str | None, rank_method: str | None,
               rank_fraction: float | None, target_ratio: float | None, keep_slower: bool,
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
                       ("target_ratio", target_ratio), ("keep_slower", keep_slower or None)):
        if value is not None:
            comp[key] = value
    gen = {k: v for k, v in (("steps", generator_steps), ("num_generators", num_generators)) if v is not None}
    dist = {"steps": distill_steps} if distill_steps is not None else {}
    overrides: dict[str, Any] = json.loads(config_json) if config_json else {}
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
    app()


if __name__ == "__main__":
    main()
