"""``python -m bench.steps ENTRY SEED [--no-retry] --out FILE``: every graded step of fine-tuning read several ways.

One suite job (``bench.suite.run.config_for``: the entry's default row) with, at the start and at each graded
step of fine-tuning, the student's agreement with the teacher on the whole synthetic exam (what the job reads),
its balanced score and KL, agreement on the exam samples the teacher is sure of
(``kegnet.distill.exam.confident_part``) and on the generator samples alone, and real test accuracy (bench only:
the job never sees it). Written to find which reading tells a retry that pays (Fashion ResNet-18) from one that
does not (fashion-lcnet), issue 21; ``--no-retry`` sets ``distill.retry_lr`` 0 to see the first pass run out.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kegnet.distill.train as train
import kegnet.tasks.classify as classify
from bench.datasets import accuracy
from bench.suite.run import config_for
from bench.suite.teachers import suite_teacher
from kegnet import run_pipeline
from kegnet.distill.exam import Exam, confident_part, generator_part, grade


def run(entry: str, seed: int, retry: bool) -> dict[str, Any]:
    path, spec, task, _ = suite_teacher(entry)
    x_test, y_test = task[2], task[3]
    points: list[dict[str, Any]] = []

    def read(student: nn.Module, exam: Exam, step: int, lr: float | None) -> None:
        g, sure = grade(student, exam), confident_part(exam)
        points.append({"step": step, "lr": lr, "agreement": g.agreement, "balanced": g.balanced, "kl": g.kl,
                       "confident": grade(student, sure).agreement, "confident_n": len(sure.x),
                       "generator": grade(student, generator_part(exam)).agreement,
                       "real": accuracy(student, x_test, y_test)})

    # Wrap the two places a step is seen: the start (the task's call of distill) and each graded step.
    distill, evaluate = classify.distill, train._evaluate

    def distill_reading_the_start(teacher, student, sampler, config, **kw):  # noqa: ANN001, ANN202
        if kw.get("exam") is not None:
            read(student, kw["exam"], 0, None)
        return distill(teacher, student, sampler, config, **kw)

    def evaluate_and_read(student, exam, step, mean_loss, result, select_best, lr=None):  # noqa: ANN001, ANN202
        best = evaluate(student, exam, step, mean_loss, result, select_best, lr)
        read(student, exam, step, lr)
        return best

    classify.distill, train._evaluate = distill_reading_the_start, evaluate_and_read
    try:
        extra = {} if retry else {"distill": {"retry_lr": 0}}
        with tempfile.TemporaryDirectory() as tmp:
            result = run_pipeline(path, spec, config_for(entry, extra=extra), tmp, device="cpu", seed=seed)
    finally:
        classify.distill, train._evaluate = distill, evaluate
    return {"entry": entry, "seed": seed, "retry": retry, "final_real": accuracy(result.student, x_test, y_test),
            "points": points}


def table(result: dict[str, Any]) -> str:
    lines = ["| step | lr | exam agreement | balanced | KL | sure samples | generator samples | real % |",
             "|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['step']} | {p['lr'] or '-'} | {p['agreement']:.4f} | {p['balanced']:.4f} | "
                     f"{p['kl']:.4f} | {p['confident']:.4f} ({p['confident_n']}) | {p['generator']:.4f} | "
                     f"{100 * p['real']:.2f} |")
    return "\n".join(lines) + f"\n\nstudent kept: {100 * result['final_real']:.2f}% on real test data"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.steps", description=__doc__.split("\n")[0])
    parser.add_argument("entry")
    parser.add_argument("seed", type=int)
    parser.add_argument("--no-retry", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    result = run(args.entry, args.seed, not args.no_retry)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
