"""``python -m bench <scenario> [--seeds N] [--device cpu|cuda] [--scale F]``: prints a table, writes JSON.

Scenarios run the real pipeline on the paper's teachers and score the students on real test data, which the
pipeline itself never sees. ``--scale`` multiplies every step budget (0.05 for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.datasets import accuracy, load_image_split, shared_dir
from kegnet import ModelSpec, PipelineConfig, load_teacher, run_pipeline

RESULTS = Path(__file__).parent / "results"

# Each scenario: teacher file, spec, test set, compression settings by name, and pipeline overrides.
SCENARIOS: dict[str, dict[str, Any]] = {
    "mnist": {
        "teacher": "kegnet-mnist-lenet5.pth.tar",
        "spec": ModelSpec(arch="lenet5", input_shape=(1, 32, 32), num_classes=10),
        "data": "mnist",
        "settings": {"3.62x": ["conv3"], "4.10x": ["conv2", "conv3"]},
        "methods": ["tucker-only", "gaussian", "uniform", "kegnet"],
        "overrides": {},
    },
    "fashion": {
        "teacher": "kegnet-fashion-resnet14.pth.tar",
        "spec": ModelSpec(arch="resnet", input_shape=(1, 32, 32), num_classes=10),
        "data": "fashion-mnist",
        "settings": {"1.40x": ["layers3.*.conv1"], "1.58x": ["layers3.*.conv2"]},
        "methods": ["tucker-only", "gaussian", "uniform", "kegnet"],
        "overrides": {"generator": {"lr": 1e-2, "beta": 10.0, "decoder_layers": 3}},
    },
    # Whether the frozen teacher should run in eval mode or with batch statistics while generators learn.
    "teacher-mode": {
        "teacher": "kegnet-fashion-resnet14.pth.tar",
        "spec": ModelSpec(arch="resnet", input_shape=(1, 32, 32), num_classes=10),
        "data": "fashion-mnist",
        "settings": {"1.58x": ["layers3.*.conv2"]},
        "methods": ["kegnet:eval", "kegnet:train"],
        "overrides": {"generator": {"lr": 1e-2, "beta": 10.0, "decoder_layers": 3, "num_generators": 2,
                                    "batch_size": 128}},
    },
}


def _scaled(overrides: dict[str, Any], scale: float, method: str) -> PipelineConfig:
    base = PipelineConfig.from_preset("fast")
    gen = {**overrides.get("generator", {})}
    dist = {**overrides.get("distill", {})}
    gen["steps"] = max(2, int(gen.get("steps", base.generator.steps) * scale))
    dist["steps"] = max(2, int(dist.get("steps", base.distill.steps) * scale))
    dist["eval_every"] = max(1, min(base.distill.eval_every, dist["steps"] // 5))
    name, _, mode = method.partition(":")
    if mode:
        gen["teacher_mode"] = mode
    return PipelineConfig.from_preset("fast", method=name, generator=gen, distill=dist)


def run(scenario: str, seeds: int, device: str, scale: float, test_limit: int | None,
        methods: list[str] | None = None, settings: list[str] | None = None) -> list[dict[str, Any]]:
    sc = SCENARIOS[scenario]
    x, y = load_image_split(sc["data"], "test")
    if test_limit:
        x, y = x[:test_limit], y[:test_limit]
    teacher = load_teacher(shared_dir() / "teachers" / sc["teacher"], sc["spec"])
    rows = [{"setting": "-", "method": "teacher", "accuracy": [accuracy(teacher, x, y)], "ratio": 1.0}]
    for setting, layers in sc["settings"].items():
        if settings and setting not in settings:
            continue
        for method in sc["methods"]:
            if methods and method not in methods:
                continue
            row: dict[str, Any] = {"setting": setting, "method": method, "accuracy": [], "seconds": [],
                                   "agreement": []}
            for seed in range(seeds):
                cfg = _scaled(sc["overrides"], scale, method)
                cfg.compression.layers = list(layers)
                if cfg.method == "tucker-only" and seed > 0:
                    break  # deterministic
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    result = run_pipeline(teacher, sc["spec"], cfg, tmp, device=device, seed=seed)
                    row["seconds"].append(time.perf_counter() - t0)
                row["accuracy"].append(accuracy(result.student, x, y))
                agree = result.manifest["synthetic_agreement"]
                row["agreement"].append(agree["best"] if agree else None)
                row["ratio"] = result.manifest["compression_ratio"]
                row["timings_s"] = result.manifest["timings_s"]
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def _fmt(row: dict[str, Any]) -> str:
    secs = row.get("seconds") or [0.0]
    return (f"| {row['setting']:>6} | {row['method']:<13} | {row.get('ratio', 1.0):5.2f}x | "
            f"{_mean_std(row['accuracy']):>14} | {statistics.mean(secs):7.1f} s | n={len(row['accuracy'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step budget")
    parser.add_argument("--test-limit", type=int, default=None, help="score on the first N test samples")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the scenario's methods")
    parser.add_argument("--settings", default=None, help="comma-separated subset of settings, e.g. 4.10x")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)  # 1 is fastest on a loaded 2-core host (oversubscription)
    print("| setting | method | ratio | test accuracy % | time/run | seeds |\n|---|---|---|---|---|---|")
    split = lambda text: text.split(",") if text else None  # noqa: E731
    rows = run(args.scenario, args.seeds, args.device, args.scale, args.test_limit, split(args.methods),
               split(args.settings))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.scenario}.json"
    out.write_text(json.dumps({"scenario": args.scenario, "args": vars(args), "device": _device_name(args.device),
                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"wrote {out}")


def _device_name(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
