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

from kegnet.config import MAX_TEACHERS, PipelineConfig
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


def usage_snippet(out: Path, manifest: dict[str, Any]) -> str:
    """Three lines that load the student and predict, for the files this run wrote."""
    shape = ", ".join(str(d) for d in manifest["spec"]["input_shape"])
    files = manifest["files"]
    if "student.pt2" in files:
        load = f'import torch; student = torch.export.load("{out / "student.pt2"}").module()'
        predict = "classes = student(x).argmax(1)"
    elif "student.onnx" in files:
        load = f'import onnxruntime, numpy; student = onnxruntime.InferenceSession("{out / "student.onnx"}")'
        predict = 'classes = student.run(None, {"x": x.numpy()})[0].argmax(1)'
    else:
        load = f'from kegnet import load_student; student = load_student("{out}")'
        predict = "classes = student(x).argmax(1)"
    return f"  {load}\n  x = ...  # a float32 tensor of shape (N, {shape})\n  {predict}"


def report_lines(manifest: dict[str, Any]) -> list[str]:
    """The recipe kept, the confidence estimate and its warnings, and the accuracy on the user's labelled set."""
    lines = []
    if manifest.get("recipe"):
        lines.append(f"sample recipe kept: {manifest['recipe']}")
    conf = manifest.get("confidence")
    if conf:
        lines.append(f"confidence estimate: {conf['estimate']:.4f} ({conf['level']}; agreement with the teacher on a "
                     "synthetic exam, not an accuracy)")
        lines += [f"warning: {w}" for w in conf.get("warnings") or []]
    ev = manifest.get("evaluation")
    if ev:
        lines.append(f"evaluation accuracy on your {ev['samples']} labelled samples: teacher "
                     f"{ev['teacher_accuracy']:.4f}, student {ev['student_accuracy']:.4f} (reported only, never "
                     "used for training or selection)")
    return lines


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
    method: str = typer.Option("kegnet", help="kegnet | gaussian | uniform | tucker-only"),
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
    config_json: str | None = typer.Option(None, "--config", help="JSON overrides of PipelineConfig sections"),
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
    from kegnet.pipeline import run_pipeline  # torch import deferred until a command needs it

    if threads:
        import torch

        torch.set_num_threads(threads)

    overrides: dict[str, Any] = {"method": method}
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
    extra = json.loads(config_json) if config_json else {}
    for section, values in (("compression", comp), ("generator", gen), ("distill", dist)):
        overrides[section] = {**extra.pop(section, {}), **values}
    overrides.update(extra)
    try:
        spec = spec_from_options(checkpoints, arch, arch_kwargs, input_shape, num_classes, sequence)
        config = PipelineConfig.from_preset(preset, **overrides)  # type: ignore[arg-type]
    except (ValidationError, json.JSONDecodeError, KeyError) as exc:
        typer.secho(f"invalid options: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc

    progress = StageProgress()
    try:
        source = checkpoints[0] if len(checkpoints) == 1 else checkpoints
        created = not out.exists()
        result = run_pipeline(source, spec, config, out, device=device, seed=seed, progress=progress,
                              eval_set=eval_set)
    except KegnetError as exc:
        progress.close()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed run leaves no empty folder behind
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    finally:
        progress.close()
    m = result.manifest
    if spec.is_sequence:
        _echo_sequence_result(out, m)
        return
    typer.echo(f"parameters {m['parameters']['teacher']:,} -> {m['parameters']['student']:,} "
               f"({m['compression_ratio']:.2f}x); MACs {m['macs']['teacher']:,} -> {m['macs']['student']:,}")
    lat = m["latency"]
    typer.echo(f"latency on {lat['device']} (ms, batch 1 / 64): teacher {lat['teacher']['batch1_ms']:.3f} / "
               f"{lat['teacher']['batch64_ms']:.2f}, student {lat['student']['batch1_ms']:.3f} / "
               f"{lat['student']['batch64_ms']:.2f}; {len(m['plan']['layers'])} layers factorized, "
               f"{len(m['plan']['skipped'])} left as they were (manifest.json says why)")
    if m["teachers"]["count"] > 1:
        t = m["teachers"]
        typer.echo(f"{t['count']} teachers, {t['weighting']} weighting; student compressed from teacher "
                   f"{t['student_from']}")
    if m["synthetic_agreement"]:
        what = "the teacher" if m["teachers"]["count"] == 1 else "the teacher ensemble"
        typer.echo(f"synthetic agreement with {what}: {m['synthetic_agreement']['best']:.4f}")
    for line in report_lines(m):
        typer.echo(line)
    typer.echo(f"wrote {', '.join(sorted(m['files']))} and manifest.json to {out}")
    typer.echo("\nuse the student (inputs preprocessed exactly as for the teacher):")
    typer.echo(usage_snippet(out, m))


def _echo_sequence_result(out: Path, m: dict[str, Any]) -> None:
    """What a sequence job did: size, agreement with the teacher's greedy outputs, decode speed, files."""
    agree, speed = m["synthetic_agreement"], m["decode_speed"]
    typer.echo(f"parameters {m['parameters']['teacher']:,} -> {m['parameters']['student']:,} "
               f"({m['compression_ratio']:.2f}x)")
    typer.echo(f"agreement with the teacher's greedy completions of held-out generations: {agree['exact']:.2%} "
               f"identical, {agree['best']:.2%} of tokens (SVD only: {agree['exact_before_finetune']:.2%}, "
               f"{agree['before_finetune']:.2%})")
    typer.echo("greedy decoding, sequences/s (batch 1 / 64): teacher "
               f"{speed['teacher']['batch1_sequences_per_s']:.1f} / {speed['teacher']['batch64_sequences_per_s']:.0f}, "
               f"student {speed['student']['batch1_sequences_per_s']:.1f} / "
               f"{speed['student']['batch64_sequences_per_s']:.0f}")
    typer.echo(f"wrote {', '.join(sorted(m['files']))} and manifest.json to {out}")
    typer.echo(f"\nuse the student: torch.export.load(\"{out / 'student.pt2'}\").module()(tokens) -> logits "
               "(B, T, V); or kegnet.load_student")


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
