"""``python -m bench suite --variants '{"name": {config overrides}, ...}'``: configurations side by side.

For each suite entry and seed, every variant runs the product's pipeline twice: once without fine-tuning
(the start: the decomposed, possibly output-fitted student; one run for variants that differ only in
fine-tuning) and once as a job would. Generators depend only
on the generator section, so variants that share it share one training (passed in, which gives the same
students as training them in the job); each row is charged the generator time. Real test data scores the
students and chooses nothing. Rows: the start, the default student (the exam's choice among the variant's
recipes), the exam estimate, the ratio and the job's seconds.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.datasets import accuracy
from bench.suite.run import config_for
from bench.suite.teachers import suite_teacher
from kegnet import KegnetError, run_pipeline
from kegnet.config import Recipe

log = logging.getLogger(__name__)


def run_variant_entry(entry: str, seeds: int, first_seed: int, device: str, variants: dict[str, dict[str, Any]],
                      recipes: list[Recipe] | None) -> dict[str, Any]:
    path, spec, task, teacher_info = suite_teacher(entry)
    x_test, y_test = task[2], task[3]
    out: dict[str, Any] = {"entry": entry, "teacher_accuracy": teacher_info["test_accuracy"],
                           "variants": {name: [] for name in variants}}
    for seed in range(first_seed, first_seed + seeds):  # not capped: variants are asked for by name
        shared: dict[str, tuple[list[torch.nn.Module], float]] = {}  # generator section -> generators, seconds
        starts: dict[str, tuple[float, float]] = {}  # what the start depends on -> its accuracy, exam estimate
        for name, extra in variants.items():
            cfg = config_for(entry, recipes=recipes, extra=extra)
            key = json.dumps(cfg.generator.model_dump(), sort_keys=True)
            gens, gen_s = shared.get(key, (None, 0.0))
            start_cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"steps": 0})})
            start_key = _start_key(cfg)
            try:
                if start_key not in starts:  # variants that differ only in fine-tuning share one start
                    with tempfile.TemporaryDirectory() as tmp:
                        start = run_pipeline(path, spec, start_cfg, tmp, device=device, seed=seed, generators=gens)
                    starts[start_key] = (accuracy(start.student, x_test, y_test),
                                         start.report.classify.confidence.estimate)
                    if gens is None and start.generators is not None:
                        gens, gen_s = start.generators, start.report.timings_s.get("generators", 0.0)
                        shared[key] = (gens, gen_s)
            except KegnetError as exc:  # the job a user would get fails: a row that says why
                out["variants"][name].append({"seed": seed, "error": str(exc)})
                continue
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                job = run_pipeline(path, spec, cfg, tmp, device=device, seed=seed, generators=gens)
                seconds = time.perf_counter() - t0 + gen_s
            conf = job.report.classify.confidence
            timings = {**job.report.timings_s, "generators": gen_s}
            out["variants"][name].append({
                "seed": seed, "start": starts[start_key][0], "start_exam": starts[start_key][1],
                "accuracy": accuracy(job.student, x_test, y_test), "chosen": conf.chosen, "estimate": conf.estimate,
                "level": conf.level, "ratio": job.report.compression_ratio, "seconds": seconds, "timings_s": timings,
                "retried": job.report.agreement.retried if job.report.agreement else None,
                "fit": job.report.classify.fit, "ranks": {p["name"]: [p["in_rank"], p["out_rank"]]
                                                          for p in job.report.classify.plan["layers"]},
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            })
            log.info("%s seed %d %s: start %.4f, student %.4f", entry, seed, name, out["variants"][name][-1]["start"],
                     out["variants"][name][-1]["accuracy"])
    return out


def _start_key(cfg: Any) -> str:
    """What the student before fine-tuning depends on: the generators, the compression, and the samples
    the output fit and the exam draw (the distill section's codes and exam size)."""
    d = cfg.distill
    return json.dumps({"generator": cfg.generator.model_dump(), "compression": cfg.compression.model_dump(),
                       "samples": [d.label_codes, [r.model_dump() for r in d.recipes], d.noise_share,
                                   d.holdout_samples]}, sort_keys=True, default=str)


def run_variants(entries: list[str], seeds: int, first_seed: int, device: str, variants: dict[str, dict[str, Any]],
                 recipes: list[Recipe] | None, out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "seeds": seeds, "first_seed": first_seed,
                              "variants": variants, "recipes": [r.name for r in recipes] if recipes else None,
                              "entries": []}
    for name in entries:
        result["entries"].append(run_variant_entry(name, seeds, first_seed, device, variants, recipes))
        out.write_text(json.dumps(result, indent=2))
        print(f"{name} done", flush=True)
    print(variant_table(result["entries"]))
    return result


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = f"{100 * statistics.mean(values):.2f}"
    return mean + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")


def variant_table(entries: list[dict[str, Any]]) -> str:
    """One row per entry and variant: real test accuracy (%) of the start and of the default student."""
    lines = ["| teacher | teacher acc. | variant | ratio | start (no fine-tuning) | default student | exam estimate "
             "| job s | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        for name, all_runs in e["variants"].items():
            runs = [r for r in all_runs if "error" not in r]
            for r in all_runs:
                if "error" in r:
                    lines.append(f"| {e['entry']} | {100 * e['teacher_accuracy']:.2f} | {name} | job fails (seed "
                                 f"{r['seed']}): {r['error'][:140]} | | | | | |")
            if not runs:
                continue
            lines.append(f"| {e['entry']} | {100 * e['teacher_accuracy']:.2f} | {name} | {runs[0]['ratio']:.2f}x | "
                         f"{_cell([r['start'] for r in runs])} | {_cell([r['accuracy'] for r in runs])} | "
                         f"{_cell([r['estimate'] for r in runs])} | {statistics.mean(r['seconds'] for r in runs):.0f} "
                         f"| {len(runs)} |")
    return "\n".join(lines)
