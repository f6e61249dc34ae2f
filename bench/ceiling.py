"""``python -m bench.ceiling ENTRY [--steps 1500,12000] [--config JSON]``: what a student structure can reach
with the real training data, the ceiling no data-free method can pass.

The suite entry's student (its compression, a ``tucker-only`` job: the decomposed start, no fine-tuning) is
fine-tuned on the entry's **real training split** by the product's objective (``kegnet.distill.kd_loss`` at T=4,
Adam 1e-3, batch 256, cosine schedule), once per budget in ``--steps``, each from the same start, scored on the
real test split. A data-free target above this ceiling cannot be met by better samples: it needs a larger student.
Real data appears only here, never in the product.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.datasets import accuracy
from bench.suite.run import config_for
from bench.suite.teachers import ENTRIES, suite_teacher
from kegnet import load_teacher, run_pipeline
from kegnet.distill import kd_step

log = logging.getLogger("bench.ceiling")

TEMPERATURE = 4.0
BATCH = 256


def run(entry: str, steps: list[int], seed: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Real-data KD of ``entry``'s student: its start and test accuracy after each budget in ``steps``."""
    path, spec, (x, _, x_test, y_test), info = suite_teacher(entry)
    teacher = load_teacher(path, spec).eval()
    with tempfile.TemporaryDirectory() as tmp:
        job = run_pipeline(path, spec, config_for(entry, "tucker-only", extra=extra), tmp, device="cpu", seed=seed)
    student = job.student
    out: dict[str, Any] = {"entry": entry, "teacher": info["test_accuracy"], "ratio": job.report.compression_ratio,
                           "start": accuracy(student, x_test, y_test), "steps": {}}
    for budget in steps:
        t0 = time.perf_counter()
        tuned = finetune(copy.deepcopy(student), teacher, x, budget, seed)
        out["steps"][budget] = {"accuracy": accuracy(tuned, x_test, y_test), "seconds": time.perf_counter() - t0}
        log.info("%s, %d steps: %.4f", entry, budget, out["steps"][budget]["accuracy"])
    return out


def finetune(student: nn.Module, teacher: nn.Module, x: torch.Tensor, steps: int, seed: int) -> nn.Module:
    """``steps`` of KD (T=4) on batches drawn from ``x``, Adam 1e-3 with a cosine schedule."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    student.train()
    for _ in range(steps):
        xb = x[torch.randint(0, len(x), (BATCH,), generator=gen)]
        with torch.no_grad():
            target = teacher(xb)
        kd_step(student, opt, xb, target, TEMPERATURE)
        sched.step()
    return student.eval()


def table(result: dict[str, Any]) -> str:
    budgets = list(result["steps"])
    lines = ["| entry | teacher | ratio | start | " + " | ".join(f"real-data KD, {s} steps" for s in budgets) + " |",
             "|---" * (4 + len(budgets)) + "|"]
    cells = " | ".join(f"{100 * result['steps'][s]['accuracy']:.2f}" for s in budgets)
    lines.append(f"| {result['entry']} | {100 * result['teacher']:.2f} | {result['ratio']:.2f}x | "
                 f"{100 * result['start']:.2f} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("entry", choices=sorted(ENTRIES))
    parser.add_argument("--steps", default="1500,12000", help="comma-separated budgets (student steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", type=json.loads, default={},
                        help="config sections over the entry's, e.g. '{\"compression\": {\"target_ratio\": 3}}'")
    parser.add_argument("--out", type=Path, help="JSON path")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    steps = sorted(int(s) for s in args.steps.split(","))
    result = run(args.entry, steps, args.seed, args.config)
    result |= {"command": "python -m bench.ceiling " + shlex.join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d")}
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
