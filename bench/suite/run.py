"""``python -m bench suite``: every suite teacher compressed with every sample recipe; one table.

For each teacher and seed the pipeline runs once with ``distill.recipes`` = ``RECIPES``: the generators and
the decomposition are shared, one student is fine-tuned per recipe, and the pipeline picks one by the common
synthetic exam (data-free). The bench then scores every candidate on the real test split, which never
chooses anything. Tucker only runs once per teacher (deterministic).

Budgets are CPU budgets (``BUDGETS``): the fast preset for the tabular MLPs, less for the convnets.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.datasets import accuracy
from bench.suite.teachers import ENTRIES, suite_teacher
from kegnet import ClassifierConfig, run_pipeline
from kegnet.config import Recipe
from kegnet.distill.exam import CRITERION, Grade, choose

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parents[1] / "results"

RECIPES = [Recipe(codes=c, noise_share=s) for c in ("one_hot", "simplex", "pairs", "sparse") for s in (0.0, 0.5)]
RECIPES += [Recipe(source="gaussian"), Recipe(source="uniform")]

# Generator and student budgets per kind of teacher (ClassifierConfig sections on top of the fast preset).
BUDGETS: dict[str, dict[str, Any]] = {
    "mlp": {},  # the fast preset: 5 generators x 300 steps x 256, 1,500 student steps x 256
    "lenet5": {"generator": {"num_generators": 3, "steps": 200, "batch_size": 128},
               "distill": {"steps": 600, "batch_size": 128, "holdout_samples": 1536}},
    "convnet": {"generator": {"num_generators": 2, "steps": 200, "batch_size": 64},
                "distill": {"steps": 300, "batch_size": 64, "eval_every": 50, "holdout_samples": 1024}},
}
MAX_SEEDS = {"lenet5": 1, "convnet": 1}  # ten students per seed; convnets take 2-5 s per step on this CPU


def kind_of(entry: str) -> str:
    arch = ENTRIES[entry].arch
    return "mlp" if arch == "mlp" else "lenet5" if arch == "lenet5" else "convnet"


def budget_of(entry: str) -> dict[str, Any]:
    return BUDGETS[kind_of(entry)]


def config_for(entry: str, method: str = "kegnet", recipes: list[Recipe] | None = None,
               extra: dict[str, Any] | None = None) -> ClassifierConfig:
    budget, extra = budget_of(entry), extra or {}
    sections = {k: {**budget.get(k, {}), **extra.get(k, {})} for k in ("generator", "distill")}
    if recipes is not None:
        sections["distill"]["recipes"] = [r.model_dump() for r in recipes]
    compression = {**ENTRIES[entry].compression, "keep_slower": True, **extra.get("compression", {})}
    return ClassifierConfig.from_preset("fast", method=method, compression=compression, export_portable=False,
                                      export_onnx=False, **sections)


def run_entry(entry: str, seeds: int, device: str, recipes: list[Recipe],
              extra: dict[str, Any] | None = None, first_seed: int = 0) -> dict[str, Any]:
    path, spec, task, teacher_info = suite_teacher(entry)
    x_test, y_test = task[2], task[3]
    out: dict[str, Any] = {"entry": entry, "task": ENTRIES[entry].task, "arch": spec.arch,
                           "classes": spec.num_classes, "train_rows": len(task[1]), "test_rows": len(y_test),
                           "teacher": teacher_info, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tucker = run_pipeline(path, spec, config_for(entry, "tucker-only", extra=extra), tmp, device=device, seed=0)
        out["tucker_only"] = {"accuracy": accuracy(tucker.student, x_test, y_test),
                              "exam": tucker.report.classify.confidence.estimate,
                              "ratio": tucker.report.compression_ratio, "seconds": time.perf_counter() - t0}
    for seed in range(first_seed, first_seed + min(seeds, MAX_SEEDS.get(kind_of(entry), seeds))):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = run_pipeline(path, spec, config_for(entry, recipes=recipes, extra=extra), tmp, device=device,
                                  seed=seed)
            seconds = time.perf_counter() - t0
        conf = result.report.classify.confidence.model_dump()  # with kegnet.distill.confidence's detail
        out["runs"].append({
            "seed": seed, "seconds": seconds, "timings_s": result.report.timings_s,
            "chosen": conf["chosen"], "estimate": conf["estimate"], "warnings": conf["warnings"],
            "calibrated": conf.get("calibrated"),
            "candidates": {name: {"accuracy": accuracy(model, x_test, y_test), **conf["candidates"][name]}
                           for name, model in result.candidates.items()},
        })
        log.info("%s seed %d: %.0f s, chose %s", entry, seed, seconds, conf["chosen"])
    return out


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _grade(candidate: dict[str, Any]) -> Grade:
    """A Grade with the bench's recorded figures (its per-class table reduced to the balanced score)."""
    g = Grade(candidate["agreement"], candidate["kl"])
    g.per_class = {0: (candidate.get("balanced", candidate["agreement"]), 1)}
    return g


def chosen_among(run: dict[str, Any], names: list[str], by: str = CRITERION) -> str:
    """What the exam would choose among ``names`` only, by ``by`` (post hoc: a candidate's grade does not
    depend on the others)."""
    return choose({n: _grade(run["candidates"][n]) for n in names}, by=by)


def selection_table(entries: list[dict[str, Any]], candidate_sets: dict[str, list[str]]) -> str:
    """For each set of candidate recipes and each exam criterion: how often the choice is within 1 point of
    the best recipe of the set on real data, and the mean and worst loss against it (points)."""
    lines = ["| candidates | exam criterion | within 1 point of the set's best | mean loss | worst loss | "
             "mean accuracy |", "|---|---|---|---|---|---|"]
    for label, names in candidate_sets.items():
        for by in ("agreement", "balanced", "kl"):
            losses, accs = [], []
            for e in entries:
                for run in e["runs"]:
                    c = run["candidates"]
                    pick = chosen_among(run, names, by)
                    losses.append(max(c[n]["accuracy"] for n in names) - c[pick]["accuracy"])
                    accs.append(c[pick]["accuracy"])
            hits = sum(loss <= 0.01 for loss in losses)
            lines.append(f"| {label} | {by} | {hits}/{len(losses)} | {100 * _mean(losses):.2f} | "
                         f"{100 * max(losses):.2f} | {100 * _mean(accs):.2f} |")
    return "\n".join(lines)


def default_pick(entry: dict[str, Any], run: dict[str, Any]) -> str | None:
    """The student the product's default gives: its one recipe, or the exam's choice among its recipes
    (None when the run did not train them: a subset of recipes)."""
    names = [r.name for r in ClassifierConfig().candidate_recipes(entry["arch"] != "mlp", entry["classes"])]
    names = [n for n in names if n in run["candidates"]]
    if not names:
        return None
    return names[0] if len(names) == 1 else chosen_among(run, names)


def method_accuracies(entry: dict[str, Any]) -> dict[str, list[float]]:
    """Per-seed real accuracies of the table's columns for one entry."""
    cols: dict[str, list[float]] = {"tucker-only": [entry["tucker_only"]["accuracy"]], "gaussian": [],
                                    "uniform": [], "kegnet default": [], "data-free choice": [], "best recipe": []}
    for run in entry["runs"]:
        c = run["candidates"]
        for noise in ("gaussian", "uniform"):  # a run with a subset of the recipes may lack them
            if noise in c:
                cols[noise].append(c[noise]["accuracy"])
        default = default_pick(entry, run)
        if default is not None:
            cols["kegnet default"].append(c[default]["accuracy"])
        pick = chosen_among(run, list(c))  # the library's rule today, on the recorded grades
        cols["data-free choice"].append(c[pick]["accuracy"])
        cols["best recipe"].append(max(v["accuracy"] for v in c.values()))
    return cols


def table(entries: list[dict[str, Any]]) -> str:
    """The suite table (mean ± std over seeds, real test accuracy %), a summary row and the choice's hit rate."""
    columns = ["tucker-only", "gaussian", "uniform", "kegnet default", "data-free choice"]
    columns = [c for c in columns if all(method_accuracies(e)[c] for e in entries)]  # what every entry has
    lines = ["| teacher | classes | teacher acc. | ratio | " + " | ".join(columns) + " | best recipe (real data) |",
             "|" + "---|" * (len(columns) + 5)]
    ranks: dict[str, list[float]] = {c: [] for c in columns}
    gaps: dict[str, list[float]] = {c: [] for c in columns}
    hits = total = 0
    for e in entries:
        cols = method_accuracies(e)
        means = {c: _mean(cols[c]) for c in columns}
        order = sorted(columns, key=lambda c: -means[c])
        for c in columns:
            ranks[c].append(1 + sum(means[o] > means[c] + 1e-12 for o in order))
            gaps[c].append(max(means.values()) - means[c])
        recipe_means = {n: _mean([r["candidates"][n]["accuracy"] for r in e["runs"]])
                        for n in e["runs"][0]["candidates"]}
        best_name = max(recipe_means, key=recipe_means.__getitem__)
        for run in e["runs"]:
            pick = chosen_among(run, list(run["candidates"]))
            best = max(v["accuracy"] for v in run["candidates"].values())
            hits += run["candidates"][pick]["accuracy"] >= best - 0.01
            total += 1
        cells = [f"{100 * means[c]:.2f}" + (f" ± {100 * _spread(cols[c]):.2f}" if len(cols[c]) > 1 else "")
                 for c in columns]
        lines.append(f"| {e['entry']} | {e['classes']} | {100 * e['teacher']['test_accuracy']:.2f} | "
                     f"{e['tucker_only']['ratio']:.2f}x | " + " | ".join(cells)
                     + f" | {best_name} {100 * recipe_means[best_name]:.2f} |")
    lines.append("| **mean rank** (1 best) | | | | " + " | ".join(f"{_mean(ranks[c]):.2f}" for c in columns) + " | |")
    lines.append("| **worst gap to the best column** | | | | "
                 + " | ".join(f"{100 * max(gaps[c]):.2f}" for c in columns) + " | |")
    lines.append(f"\nData-free choice within 1 point of the real-data best recipe: {hits}/{total} runs "
                 f"({100 * hits / max(total, 1):.0f}%).")
    return "\n".join(lines)


def recipe_table(entries: list[dict[str, Any]]) -> str:
    """Every recipe's real accuracy (mean over seeds) per teacher, and its mean gap to the best recipe."""
    names = list(entries[0]["runs"][0]["candidates"])
    lines = ["| teacher | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    gaps: dict[str, list[float]] = {n: [] for n in names}
    for e in entries:
        means = {n: _mean([r["candidates"][n]["accuracy"] for r in e["runs"]]) for n in names}
        best = max(means.values())
        for n in names:
            gaps[n].append(best - means[n])
        lines.append(f"| {e['entry']} | " + " | ".join(f"{100 * means[n]:.2f}" for n in names) + " |")
    lines.append("| **mean gap to best** | " + " | ".join(f"{100 * _mean(gaps[n]):.2f}" for n in names) + " |")
    lines.append("| **worst gap to best** | " + " | ".join(f"{100 * max(gaps[n]):.2f}" for n in names) + " |")
    return "\n".join(lines)


def exam_table(entries: list[dict[str, Any]]) -> str:
    """Every recipe's agreement with the teacher on the synthetic exam (mean over seeds, %): what the
    data-free choice sees."""
    names = list(entries[0]["runs"][0]["candidates"])
    lines = ["| teacher | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for e in entries:
        cells = [f"{100 * _mean([r['candidates'][n]['agreement'] for r in e['runs']]):.1f}" for n in names]
        lines.append(f"| {e['entry']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confidence_table(entries: list[dict[str, Any]]) -> str:
    """The default students by confidence level (kegnet/distill/confidence.py): how much of the teacher's real
    accuracy each level kept (student / teacher accuracy, %)."""
    from kegnet.distill.confidence import estimate_of, level

    kept: dict[str, list[float]] = {"high": [], "medium": [], "low": []}
    for e in entries:
        for run in e["runs"]:
            pick = default_pick(e, run)
            if pick is None:
                continue
            c = run["candidates"][pick]
            kept[level(estimate_of(c["agreement"], c.get("balanced")))].append(
                c["accuracy"] / e["teacher"]["test_accuracy"])
    lines = ["| level (exam estimate) | runs | teacher accuracy kept, % (min - max) |", "|---|---|---|"]
    for name, values in kept.items():
        span = f"{100 * min(values):.1f} - {100 * max(values):.1f}" if values else "-"
        lines.append(f"| {name} | {len(values)} | {span} |")
    return "\n".join(lines)


def run_suite(entries: list[str], seeds: int, device: str, out: Path,
              recipes: list[Recipe] | None = None, extra: dict[str, Any] | None = None,
              first_seed: int = 0) -> dict[str, Any]:
    """Every entry at ``seeds`` seeds from ``first_seed`` (capped per kind by ``MAX_SEEDS``: run other seeds of
    a convnet as separate parts with ``first_seed``), resuming from ``out``."""
    recipes = recipes or RECIPES
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "seeds": seeds, "budgets": BUDGETS,
                              "recipes": [r.name for r in recipes], "extra": extra, "first_seed": first_seed,
                              "entries": []}
    if out.exists():  # resume: entries already measured with the same recipes are kept
        old = json.loads(out.read_text())
        if old.get("recipes") == result["recipes"] and old.get("seeds") == seeds and old.get("extra") == extra \
                and old.get("first_seed", 0) == first_seed:
            result["entries"] = [e for e in old["entries"] if e["entry"] in entries]
    done = {e["entry"] for e in result["entries"]}
    for name in entries:
        if name in done:
            continue
        result["entries"].append(run_entry(name, seeds, device, recipes, extra, first_seed))
        out.write_text(json.dumps(result, indent=2))
        print(f"{name} done", flush=True)
    result["entries"].sort(key=lambda e: entries.index(e["entry"]))
    out.write_text(json.dumps(result, indent=2))
    print(report(result["entries"]))
    return result


# Sets of candidate recipes a default could train and choose between (selection_table).
CANDIDATE_SETS = {
    "pairs, pairs+noise": ["kegnet/pairs", "kegnet/pairs+noise0.5"],
    "sparse, sparse+noise": ["kegnet/sparse", "kegnet/sparse+noise0.5"],
    "pairs+noise, gaussian": ["kegnet/pairs+noise0.5", "gaussian"],
    "sparse, sparse+noise, gaussian": ["kegnet/sparse", "kegnet/sparse+noise0.5", "gaussian"],
}


def teachers_table(entries: list[dict[str, Any]]) -> str:
    """What each teacher is: task, architecture, data sizes, real accuracy, training time, the compression."""
    lines = ["| teacher | task | architecture | train / test rows | classes | teacher acc. | trained in | "
             "compression | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        t = e["teacher"]
        trained = f"{t['train_seconds']:.0f} s" if "train_seconds" in t else "the paper's file"
        lines.append(f"| {e['entry']} | {e['task']} | {e['arch']} | {e['train_rows']:,} / {e['test_rows']:,} | "
                     f"{e['classes']} | {100 * t['test_accuracy']:.2f} | {trained} | "
                     f"{e['tucker_only']['ratio']:.2f}x | {len(e['runs'])} |")
    return "\n".join(lines)


def report(entries: list[dict[str, Any]]) -> str:
    """The three tables: methods per teacher, every recipe per teacher, and the data-free choice."""
    common = [n for n in entries[0]["runs"][0]["candidates"]
              if all(n in e["runs"][0]["candidates"] for e in entries)]
    trimmed = [{**e, "runs": [{**r, "candidates": {n: r["candidates"][n] for n in common}} for r in e["runs"]]}
               for e in entries]
    sets = {"every recipe": common, **{k: v for k, v in CANDIDATE_SETS.items() if set(v) <= set(common)}}
    return "\n\n".join([teachers_table(entries), table(entries), recipe_table(trimmed),
                        selection_table(trimmed, sets), exam_table(trimmed), confidence_table(entries)])
