"""``python -m bench peers``: data-free peers against the KegNet default, same teacher, student and time.

For each suite entry (bench/suite/teachers.py) and seed, the KegNet default runs first (``run_pipeline``
with the suite's config and the product's default recipe; its wall time is measured), unless ``seconds``
is given. Each peer then gets that wall time, including building its student: the same plan and Tucker-2 /
SVD factorization the pipeline makes from the entry's compression config (kegnet/tasks/classify.py's plan
and decompose stages; the suite keeps slower layers, so no latency filter applies). The bench scores every
student on the entry's real test split; the methods themselves only see the teacher.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.datasets import accuracy
from bench.peers import dafl, deepinversion, fast
from bench.peers.common import PeerResult
from bench.suite.run import config_for
from bench.suite.teachers import ENTRIES, suite_teacher
from kegnet import ClassifierConfig, ModelSpec, load_teacher, run_pipeline
from kegnet.compression import apply_plan, plan_compression
from kegnet.metrics import count_parameters
from kegnet.pipeline import resolve_device

log = logging.getLogger(__name__)

METHODS = ("dafl", "deepinversion", "fast-dfkd")
PAPERS = {"dafl": "Chen et al. 2019, Data-Free Learning of Student Networks (ICCV)",
          "deepinversion": "Yin et al. 2020, Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion "
                           "(CVPR)",
          "fast-dfkd": "Fang et al. 2022, Up to 100x Faster Data-free Knowledge Distillation (AAAI)"}


def build_student(teacher: nn.Module, config: ClassifierConfig, seed: int) -> nn.Module:
    """The factorized student the pipeline starts from: plan on the teacher, then decompose."""
    if not config.compression.keep_slower:
        raise ValueError("peers compare at the plan itself: the config must keep slower layers")
    plan = plan_compression(teacher, config.compression)
    return apply_plan(teacher, plan, n_iter_max=config.compression.n_iter_max, seed=seed)


def train_peer(method: str, teacher: nn.Module, student: nn.Module, spec: ModelSpec, seconds: float, *,
               batch_size: int, device: torch.device, seed: int) -> PeerResult:
    """Run one peer method on ``student`` (in place) for ``seconds``."""
    shape = tuple(spec.input_shape)
    if method == "dafl":
        return dafl.train(teacher, student, shape, seconds, batch_size=batch_size, device=device, seed=seed)
    if method == "deepinversion":
        return deepinversion.train(teacher, student, shape, seconds, batch_size=batch_size,
                                   num_classes=spec.num_classes, device=device, seed=seed)
    if method == "fast-dfkd":
        return fast.train(teacher, student, shape, seconds, batch_size=batch_size, num_classes=spec.num_classes,
                          device=device, seed=seed)
    raise ValueError(f"unknown peer {method!r}; known: {', '.join(METHODS)}")


def run_kegnet(path: Path, spec: ModelSpec, config: ClassifierConfig, x: torch.Tensor, y: torch.Tensor,
               device: torch.device, seed: int) -> dict[str, Any]:
    """The KegNet default on this entry: real test accuracy, wall time, stage times, the student's size."""
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        result = run_pipeline(path, spec, config, tmp, device=str(device), seed=seed)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    report = result.report
    return {"accuracy": accuracy(result.student, x, y), "seconds": seconds, "cpu_s": cpu,
            "timings_s": report.timings_s,
            "recipe": report.classify.recipe, "parameters": report.parameters.student,
            "steps": {"generator": config.generator.steps, "student": config.distill.steps}}


def run_peer(method: str, teacher: nn.Module, spec: ModelSpec, config: ClassifierConfig, seconds: float,
             x: torch.Tensor, y: torch.Tensor, device: torch.device, seed: int) -> dict[str, Any]:
    """One peer row: the student is built inside the peer's time, then trained for what is left."""
    t0, c0 = time.perf_counter(), time.process_time()
    student = build_student(teacher, config, seed).to(device)
    built = time.perf_counter() - t0
    result = train_peer(method, teacher, student, spec, max(seconds - built, 1e-3),
                        batch_size=config.distill.batch_size, device=device, seed=seed)
    # Before scoring: the test split is the bench's time, not the peer's. CPU seconds are recorded beside
    # wall seconds: on a shared host they tell whether two rows had the same share of the machine.
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"accuracy": accuracy(student, x, y), "seconds": seconds, "cpu_s": cpu, "decompose_s": built,
            "steps": result.steps, "settings": result.settings, "parameters": count_parameters(student)}


def run_entry(entry: str, methods: list[str], seed: int, device: torch.device, seconds: float | None,
              extra: dict[str, Any] | None, kegnet: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry and seed: the KegNet default (or ``kegnet``, its row from an earlier run, whose time is then
    the budget; or only ``seconds``), then each peer at that time."""
    path, spec, task, teacher_info = suite_teacher(entry)
    x, y = task[2], task[3]
    config = config_for(entry, extra=extra)
    row: dict[str, Any] = {"entry": entry, "seed": seed, "classes": spec.num_classes, "teacher": teacher_info,
                           "peers": {}}
    if kegnet is not None:
        row["kegnet"], seconds = kegnet, kegnet["seconds"]
    elif seconds is None:
        row["kegnet"] = run_kegnet(path, spec, config, x, y, device, seed)
        seconds = row["kegnet"]["seconds"]
        log.info("%s seed %d: kegnet %.4f in %.0f s", entry, seed, row["kegnet"]["accuracy"], seconds)
    row["budget_s"] = seconds
    teacher = load_teacher(path, spec).to(device)
    for method in methods:
        row["peers"][method] = run_peer(method, teacher, spec, config, seconds, x, y, device, seed)
        log.info("%s seed %d: %s %.4f", entry, seed, method, row["peers"][method]["accuracy"])
    return row


def kegnet_rows(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The KegNet default rows of an earlier ``peers`` JSON by (entry, seed), marked with where they came from
    (a peer added later then gets the same budget without running KegNet again)."""
    rows = json.loads(path.read_text())["rows"]
    return {(r["entry"], r["seed"]): {**r["kegnet"], "from": str(path)} for r in rows if "kegnet" in r}


def run_peers(entries: list[str], methods: list[str], seeds: int, device: str, out: Path,
              seconds: float | None = None, extra: dict[str, Any] | None = None,
              budgets: Path | None = None, first_seed: int = 0) -> dict[str, Any]:
    """Every entry × seed (``first_seed`` onward); the JSON is rewritten after each, so a long run can be read
    as it goes. With ``budgets`` (an earlier peers JSON), each entry's KegNet row and time come from there."""
    unknown = [m for m in methods if m not in METHODS] + [e for e in entries if e not in ENTRIES]
    if unknown:
        raise ValueError(f"unknown methods or entries: {unknown}")
    dev = resolve_device(device)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": str(dev), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "methods": methods, "papers": PAPERS,
                              "seconds": seconds, "extra": extra, "rows": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    # torch's first optimizer imports its compiler stack (seconds): not a cost of whichever row runs first.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    earlier = kegnet_rows(budgets) if budgets is not None else {}
    for entry in entries:
        for seed in range(first_seed, first_seed + seeds):
            result["rows"].append(run_entry(entry, methods, seed, dev, seconds, extra, earlier.get((entry, seed))))
            out.write_text(json.dumps(result, indent=2))
            print(table(result["rows"], methods), flush=True)
    return result


def _cell(figures: dict[str, Any]) -> str:
    """Accuracy %, then wall seconds, CPU seconds where recorded, and the steps reached."""
    cpu = f", {figures['cpu_s']:.0f} CPU s" if "cpu_s" in figures else ""
    steps = ", ".join(f"{v:,} {k}" for k, v in figures["steps"].items())
    return f"{100 * figures['accuracy']:.2f} ({figures['seconds']:.0f} s{cpu}; {steps})"


def table(rows: list[dict[str, Any]], methods: list[str]) -> str:
    """Real test accuracy %, each cell with its seconds and the steps it reached."""
    names = {"dafl": "DAFL (re-impl.)", "deepinversion": "DeepInversion (re-impl.)",
             "fast-dfkd": "Fast-DFKD (re-impl.)"}
    lines = ["| teacher | seed | teacher acc. | kegnet default | " + " | ".join(names[m] for m in methods) + " |",
             "|" + "---|" * (4 + len(methods))]
    for r in rows:
        k = r.get("kegnet")
        cells = [_cell(k) if k else "-"] + [_cell(r["peers"][m]) for m in methods]
        lines.append(f"| {r['entry']} | {r['seed']} | {100 * r['teacher']['test_accuracy']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)
