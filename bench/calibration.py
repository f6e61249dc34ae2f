"""``python -m bench calibration [--files F ...] [--all]``: the confidence estimate against real accuracy.

Every student recorded in bench/results with an exam grade and a real test accuracy is one point: the suite's
candidates (one per recipe and seed; the job kept one of them), the suite's tucker-only students, and the
scenario rows whose ``agreement`` is the exam agreement. The loss of a point is its teacher's real test
accuracy minus its own, in points. The tables: the kept students one per line; each level of today's rule
(``kegnet.distill.confidence``) with the count, mean and worst loss; the loss by bins of the estimate; the
statistics the exam records, each with the thresholds this file would fit on them; and the rule's thresholds
fitted without each teacher in turn, then applied to it (leave one teacher out).

Scenario rows written before the common exam existed (2026-11-30, commit 78cd4f1) carry the student's
agreement on held-out samples of its own recipe, not an exam grade: they are listed apart and never fitted on.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kegnet.distill.confidence import HIGH, LOW, estimate_of, level

RESULTS = Path(__file__).parent / "results"
LIMIT = 2.0  # points: a "high" student must be within this of its teacher on real data
LARGE = 5.0  # points: a loss this large must come with "low"
MARGIN = 0.02  # fitted thresholds sit this far above the worst point (about two standard errors of the exam)

# Scenario results whose ``agreement`` is the common exam's (single-recipe KegNet jobs run after commit 78cd4f1,
# before the bench recorded the whole confidence section); older scenario files hold own-recipe agreement.
EXAM_AGREEMENT_FILES = {"pendigits-auto.json", "mnist-auto-simplex.json", "mnist-auto-simplex-3.62x.json",
                        "mnist-sparse.json"}
# Scenarios grouped with a suite entry for leave-one-teacher-out: the same teacher file (the paper's LeNet-5
# and ResNet-14, ResNet-18 and its ONNX export), or for pendigits the same MLP trained on the same data by
# the older bench recipe (held out together, which is the stricter check).
SAME_TEACHER = {"mnist": "mnist-lenet5", "mnist-objectives": "mnist-lenet5", "fashion": "fashion-resnet14",
                "teacher-mode": "fashion-resnet14", "fashion-resnet18-onnx": "fashion-resnet18"}


@dataclass
class Point:
    """One student: its exam grades and its real loss against its teacher."""

    teacher: str
    run: str
    teacher_accuracy: float
    accuracy: float
    agreement: float
    balanced: float | None = None
    kl: float | None = None
    per_source: dict[str, float] = field(default_factory=dict)
    generator_exam: bool = True  # the exam held generator samples (not noise only)
    calibrated: bool = True  # generators of a kind "high" may be given for (kegnet.distill.confidence)
    kept: bool = True  # the student the job returned (a suite run returns one of its candidates)

    @property
    def loss(self) -> float:
        return 100 * (self.teacher_accuracy - self.accuracy)

    @property
    def estimate(self) -> float:
        return estimate_of(self.agreement, self.balanced)

    @property
    def level(self) -> str:
        return level(self.estimate, self.generator_exam, self.calibrated)


def suite_points(data: dict[str, Any]) -> list[Point]:
    """A suite file: every candidate of every run, and the tucker-only student (its exam is noise only: a
    tucker-only job has no generators)."""
    points = []
    for e in data["entries"]:
        teacher = e["teacher"]["test_accuracy"]
        tucker = e["tucker_only"]
        points.append(Point(e["entry"], "tucker-only", teacher, tucker["accuracy"], tucker["exam"],
                            generator_exam=False))
        for run in e["runs"]:
            for recipe, c in run["candidates"].items():
                points.append(Point(e["entry"], f"seed {run['seed']} {recipe}", teacher, c["accuracy"],
                                    c["agreement"], c.get("balanced"), c.get("kl"), c.get("per_source", {}),
                                    kept=c.get("chosen", False), calibrated=run.get("calibrated") is not False))
    return points


def scenario_points(data: dict[str, Any], name: str) -> tuple[list[Point], list[Point]]:
    """A scenario file: (rows graded on the exam, rows with the older own-recipe agreement)."""
    teachers = [r for r in data["rows"] if r.get("method") == "teacher"]
    if len(teachers) != 1:  # an ensemble: no one teacher accuracy to compare with
        return [], []
    teacher_accuracy = teachers[0]["accuracy"][0]
    teacher = SAME_TEACHER.get(data["scenario"], data["scenario"])
    exam, older = [], []
    for row in data["rows"]:
        for seed, (acc, agree) in enumerate(zip(row["accuracy"], row.get("agreement", []), strict=False)):
            if agree is None or row["method"] == "teacher":
                continue
            run = f"{name} {row['setting']} {row['method']} seed {seed}"
            conf = (row.get("confidence") or [None] * (seed + 1))[seed]
            if conf is not None:
                sources = conf.get("exam", {}).get("sources", {})
                exam.append(Point(teacher, run, teacher_accuracy, acc, conf.get("agreement", agree),
                                  conf.get("balanced"), conf.get("kl"),
                                  conf.get("per_source", {}), any(s.startswith("kegnet/") for s in sources),
                                  calibrated=conf.get("calibrated") is not False))
            elif name in EXAM_AGREEMENT_FILES:
                exam.append(Point(teacher, run, teacher_accuracy, acc, agree,
                                  generator_exam=row["method"].startswith("kegnet")))
            else:
                older.append(Point(teacher, run, teacher_accuracy, acc, agree,
                                   generator_exam=row["method"].startswith("kegnet")))
    return exam, older


def load(files: list[Path]) -> tuple[list[Point], list[Point]]:
    """(exam-graded points, older own-recipe points) of ``files``; a suite student recorded in two files (the
    merged suite.json and its parts) counts once."""
    points, older, seen = [], [], set()
    for path in files:
        data = json.loads(path.read_text())
        if "entries" in data:
            found = suite_points(data)
        elif "rows" in data and "scenario" in data:
            found, old = scenario_points(data, path.name)
            older += old
        else:
            continue  # scale timings, the sequence benchmark: no exam
        for p in found:
            key = (p.teacher, p.run)  # scenario runs are named with their file
            if key not in seen:
                seen.add(key)
                points.append(p)
    return points, older


def _generator_mean(per_source: dict[str, float]) -> float | None:
    values = [v for k, v in per_source.items() if k.startswith("kegnet/")]
    return statistics.mean(values) if values else None


# What a threshold could be put on (points without the statistic's fields are left out of its line).
STATISTICS: dict[str, Callable[[Point], float | None]] = {
    "agreement": lambda p: p.agreement,
    "balanced agreement": lambda p: p.balanced,
    "min(agreement, balanced)": lambda p: None if p.balanced is None else min(p.agreement, p.balanced),
    "worst exam source": lambda p: min(p.per_source.values()) if p.per_source else None,
    "generator sources (mean)": lambda p: _generator_mean(p.per_source),
    "agreement - KL / 4": lambda p: None if p.kl is None else p.agreement - p.kl / 4,
}


def fit_above(values: list[float], margin: float = MARGIN) -> float:
    """The smallest multiple of 0.01 at least ``margin`` above every value (0 when there is none)."""
    return math.ceil(round(100 * (max(values) + margin), 6)) / 100 if values else 0.0


def fit(points: list[Point], stat: Callable[[Point], float | None] = lambda p: p.estimate,
        margin: float = MARGIN) -> tuple[float, float]:
    """(high, low): "high" above every student with a calibrated generator exam that lost more than ``LIMIT``
    points, "low" below nothing that lost more than ``LARGE``."""
    bad = [v for p in points if p.generator_exam and p.calibrated and p.loss > LIMIT and (v := stat(p)) is not None]
    large = [v for p in points if p.loss > LARGE and (v := stat(p)) is not None]
    return fit_above(bad, margin), fit_above(large, margin)


def _levels(points: list[Point], high: float, low: float,
            stat: Callable[[Point], float | None] = lambda p: p.estimate,
            needs_generators: bool = True) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {"high": [], "medium": [], "low": []}
    for p in points:
        v = stat(p)
        if v is not None:
            out["high" if v >= high and ((p.generator_exam and p.calibrated) or not needs_generators)
                else "low" if v < low else "medium"].append(p)
    return out


# The rule before 2026-12-05 (plain exam agreement, high >= 0.92, low < 0.80), for comparison.
PREVIOUS = {"high": 0.92, "low": 0.80}


def _loss_cells(group: list[Point]) -> str:
    if not group:
        return "0 | - | - | -"
    within = sum(p.loss <= LIMIT for p in group)
    return (f"{len(group)} | {within} | {statistics.mean(p.loss for p in group):.2f} | "
            f"{max(p.loss for p in group):.2f}")


def level_table(points: list[Point], title: str) -> str:
    """Per level of the rule in kegnet/distill/confidence.py, then of the previous rule: count, within 2
    points, mean and worst loss."""
    lines = [f"| {title} | students | within {LIMIT:g} points | mean loss | worst loss |", "|---|---|---|---|---|"]
    for name, group in _levels(points, HIGH, LOW).items():
        lines.append(f"| {name} | {_loss_cells(group)} |")
    previous = _levels(points, PREVIOUS["high"], PREVIOUS["low"], lambda p: p.agreement, needs_generators=False)
    for name, group in previous.items():
        lines.append(f"| previous rule: {name} | {_loss_cells(group)} |")
    return "\n".join(lines)


def bins_table(points: list[Point]) -> str:
    """The real loss by bins of the estimate (a scatter in rows)."""
    edges = [0.0, 0.5, 0.7, 0.8, 0.85, 0.87, 0.89, 0.91, 0.93, 0.95, 0.97, 1.01]
    lines = ["| estimate | students | within 2 points | mean loss | worst loss | teachers |",
             "|---|---|---|---|---|---|"]
    for lo, hi in zip(edges, edges[1:], strict=False):
        group = [p for p in points if lo <= p.estimate < hi]
        if group:
            names = sorted({p.teacher for p in group})
            teachers = ", ".join(names) if len(names) <= 4 else f"{len(names)} teachers"
            lines.append(f"| {lo:.2f} - {min(hi, 1.0):.2f} | {_loss_cells(group)} | {teachers} |")
    return "\n".join(lines)


def runs_table(points: list[Point]) -> str:
    lines = ["| teacher | run | agreement | balanced | estimate | level | teacher acc. | student acc. | loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: -p.estimate):
        bal = f"{p.balanced:.3f}" if p.balanced is not None else "-"
        exam = "" if p.generator_exam else " (noise-only exam)"
        lines.append(f"| {p.teacher} | {p.run} | {p.agreement:.3f} | {bal} | {p.estimate:.3f} | {p.level}{exam} | "
                     f"{100 * p.teacher_accuracy:.2f} | {100 * p.accuracy:.2f} | {p.loss:.2f} |")
    return "\n".join(lines)


def leave_one_out(points: list[Point], stat: Callable[[Point], float | None]) -> tuple[int, int, float]:
    """Thresholds fitted without each teacher, applied to it: (its students wrongly "high", its students
    within 2 points that are "high", the worst loss among them), summed over teachers."""
    wrong = right = 0
    worst = 0.0
    for teacher in sorted({p.teacher for p in points}):
        high, low = fit([p for p in points if p.teacher != teacher], stat)
        held = _levels([p for p in points if p.teacher == teacher], high, low, stat)["high"]
        wrong += sum(p.loss > LIMIT for p in held)
        right += sum(p.loss <= LIMIT for p in held)
        worst = max([worst, *(p.loss for p in held)])
    return wrong, right, worst


def statistics_table(points: list[Point]) -> str:
    """Each statistic: its fitted thresholds, the students within 2 points it calls "high", and the
    leave-one-teacher-out check."""
    lines = ["| statistic | students | fitted high | fitted low | within 2 points called high | "
             "left-out teacher: wrongly high | left-out: right high | left-out: worst high loss |",
             "|---|---|---|---|---|---|---|---|"]
    for name, stat in STATISTICS.items():
        have = [p for p in points if stat(p) is not None]
        high, low = fit(have, stat)
        called = _levels(have, high, low, stat)["high"]
        within = sum(p.loss <= LIMIT for p in have if p.generator_exam)
        wrong, right, worst = leave_one_out(have, stat)
        lines.append(f"| {name} | {len(have)} | {high:.2f} | {low:.2f} | {len(called)}/{within} | {wrong} | "
                     f"{right} | {worst:.2f} |")
    return "\n".join(lines)


def per_teacher_table(points: list[Point]) -> str:
    """The rule's thresholds fitted without each teacher, and what they give that teacher."""
    lines = ["| left-out teacher | fitted high / low without it | its students high / medium / low | "
             "worst loss in high | losses > 5 points not low |", "|---|---|---|---|---|"]
    for teacher in sorted({p.teacher for p in points}):
        high, low = fit([p for p in points if p.teacher != teacher])
        levels = _levels([p for p in points if p.teacher == teacher], high, low)
        worst = f"{max(p.loss for p in levels['high']):.2f}" if levels["high"] else "-"
        missed = sum(p.loss > LARGE for p in levels["high"] + levels["medium"])
        lines.append(f"| {teacher} | {high:.2f} / {low:.2f} | {len(levels['high'])} / {len(levels['medium'])} / "
                     f"{len(levels['low'])} | {worst} | {missed} |")
    return "\n".join(lines)


def report(points: list[Point], older: list[Point], every_run: bool = False) -> str:
    kept = [p for p in points if p.kept]
    high, low = fit(points)
    teachers = sorted({p.teacher for p in points})
    parts = [
        f"{len(points)} students with an exam grade ({len(kept)} kept by their job), {len(teachers)} teachers: "
        + ", ".join(teachers),
        f"Rule (kegnet/distill/confidence.py): estimate = min(agreement, balanced agreement); high >= {HIGH}, "
        f"low < {LOW}; high needs generator samples on the exam. Fitted on these points: high {high}, low {low}.",
        runs_table(points if every_run else kept),
        level_table(kept, "level (kept students)"),
        level_table(points, "level (every student)"),
        bins_table(points),
        statistics_table(points),
        per_teacher_table(points),
    ]
    if older:
        parts.append("Older scenario rows (agreement on the recipe's own held-out samples, not the exam; not "
                     "fitted on):\n" + level_table(older, "level if it were the estimate"))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench calibration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="*", type=Path, default=None,
                        help="result JSON files (default: every bench/results/*.json)")
    parser.add_argument("--all", action="store_true", help="list every student, not only those kept")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS.glob("*.json"))
    points, older = load(files)
    print(report(points, older, args.all))
