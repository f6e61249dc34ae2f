"""The G2P benchmark (issue 13): data-free compression of the CMUdict teacher, scored on held-out words.

``python -m bench g2p [--seeds N] [--rows teacher,svd,word,sequence,both] [--test-words N] [--samples N]
[--steps N] [--beam-size K] [--target-ratio R] [--student-layers N] [--layers P,...] [--out FILE] [--report]``

Rows:

- ``teacher``: the cached teacher (``bench.g2p.teacher``), once (it does not depend on the seed);
- ``svd``: the pipeline with ``sequence.steps: 0`` (the SVD student, no fine-tuning; objective ``word`` so no
  beam search is spent on it);
- ``word`` / ``sequence`` / ``both``: the pipeline with that ``sequence.objective`` (Kim & Rush 2016).

The compression pipeline gets the teacher module and nothing else: its data are the teacher's own samples
from BOS and its beam completions of them. The dictionary is read only here, to score each model on the
``--test-words`` words of the held-out test split (a fixed draw with seed 0, the same for every row), by decoding the
pronunciation after ``BOS letters SEP``: word accuracy and phoneme error rate (PER) with greedy decoding and
with beam 5. Decode speed is words per second on the CPU, greedy, the pronunciation after the given prefix,
at batch 1 (the first ``--speed-words`` of those words one at a time) and batched (the whole subset in batches of
``--speed-batch``), the fastest of ``--repeats`` timings. Stage seconds come from the run report's ``timings_s``.

``--report`` prints the table of an existing ``--out`` file without running anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.g2p.data import BOS, EOS, PAD, G2PData, load_g2p
from bench.g2p.metrics import after_prefix, score
from bench.g2p.teacher import TEACHERS, g2p_teacher, sequence_spec
from kegnet import ModelSpec, SequenceJobConfig, run_pipeline
from kegnet.metrics import count_parameters
from kegnet.sequence.generate import beam_search, greedy_decode

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent.parent / "results"
ROWS: tuple[str, ...] = ("teacher", "svd", "word", "sequence", "both")
OBJECTIVE = {"svd": "word", "word": "word", "sequence": "sequence", "both": "both"}

# Settings sized for one CPU thread on a shared 2-core host, where a row should take a few minutes. Measured
# there with the 608k-parameter teacher (no KV cache: every decoding step re-runs the prefix): sampling 1,000
# sequences from BOS ~20 s, beam 5 over 1,000 prompts ~40 s, one fine-tuning step (batch 128, teacher and
# student) ~0.5-0.8 s, scoring one model on 1,000 test words (greedy, beam 5, speed) ~100 s. With 2,000
# samples and 300 steps a row takes ~4-6 minutes; the whole table (5 rows, one seed) ~25 minutes.
DEFAULTS: dict[str, Any] = {
    "test_words": 1000, "samples": 2000, "beam_size": 5, "steps": 300, "batch_size": 128, "lr": 1e-3,
    "holdout": 256, "eval_every": 100, "target_ratio": 3.0, "speed_words": 100, "speed_batch": 256, "repeats": 2,
    "eval_beam": 5, "student_layers": None, "layers": None, "temperature": 1.0,
}


def model_spec(teacher: nn.Module, max_length: int) -> ModelSpec:
    """The spec the pipeline gets: the teacher's architecture and the token layout, nothing of the data."""
    kwargs = {"n_layers": teacher.n_layers, "n_heads": teacher.n_heads, "d_model": teacher.d_model,
              "d_ff": teacher.d_ff, "tie_embeddings": teacher.tie_embeddings}
    return ModelSpec(arch="transformer", arch_kwargs=kwargs, task="sequence", sequence=sequence_spec(max_length))


def pipeline_config(row: str, s: dict[str, Any]) -> SequenceJobConfig:
    """The pipeline config of a compressed row with settings ``s`` (``DEFAULTS`` and overrides)."""
    return SequenceJobConfig.model_validate({
        "compression": {"rank_method": "ratio", "target_ratio": s["target_ratio"], "layers": s["layers"]},
        "sequence": {"objective": OBJECTIVE[row], "samples": s["samples"], "beam_size": s["beam_size"],
                     "student_layers": s["student_layers"], "temperature": s["temperature"],
                     "steps": 0 if row == "svd" else s["steps"], "batch_size": s["batch_size"], "lr": s["lr"],
                     "holdout": s["holdout"], "eval_every": s["eval_every"]},
        "export_portable": False,
    })


def _decode_kw(max_length: int) -> dict[str, Any]:
    return {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_length": max_length, "device": "cpu"}


def accuracy(model: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor, refs: list[list[int]],
             max_length: int, beam: int) -> dict[str, float]:
    """Greedy and beam-``beam`` word accuracy and PER of ``model`` on the prefixes ``(N, P)``."""
    kw = _decode_kw(max_length)
    greedy = greedy_decode(model, tokens, lengths, batch_size=1024, **kw)
    g = score(after_prefix(greedy.tokens, greedy.prefix_lengths), refs)
    out = {"greedy_word_accuracy": g.word_accuracy, "greedy_per": g.per}
    if beam > 1:
        beams = beam_search(model, tokens, lengths, beam_size=beam, batch_size=1024, **kw)
        b = score(after_prefix(beams.tokens, beams.prefix_lengths), refs)
        out |= {f"beam{beam}_word_accuracy": b.word_accuracy, f"beam{beam}_per": b.per}
    return out


def decode_speed(models: Sequence[nn.Module], tokens: torch.Tensor, lengths: torch.Tensor, max_length: int,
                 speed_words: int, speed_batch: int, repeats: int) -> list[dict[str, float]]:
    """Greedy words per second of each model after the given prefixes: one at a time over the first
    ``speed_words`` rows, and all rows in batches of ``speed_batch``; the fastest of ``repeats`` timings each.
    The models take turns within every repeat, so a student and its teacher see the same load on a shared
    host (timings of one model alone drift by tens of percent there)."""
    kw = _decode_kw(max_length)
    for model in models:
        model.eval()
    n1 = min(speed_words, len(tokens))
    best1 = [float("inf")] * len(models)
    best_b = [float("inf")] * len(models)
    for _ in range(repeats):
        for j, model in enumerate(models):
            t0 = time.perf_counter()
            for i in range(n1):
                greedy_decode(model, tokens[i:i + 1], lengths[i:i + 1], batch_size=1, **kw)
            best1[j] = min(best1[j], time.perf_counter() - t0)
            t0 = time.perf_counter()
            greedy_decode(model, tokens, lengths, batch_size=speed_batch, **kw)
            best_b[j] = min(best_b[j], time.perf_counter() - t0)
    return [{"batch1_words_per_s": n1 / b1, "batched_words_per_s": len(tokens) / bb, "batch1_words": n1,
             "batched_words": len(tokens), "batch": min(speed_batch, len(tokens))}
            for b1, bb in zip(best1, best_b, strict=True)]


def test_subset(total: int, n: int) -> torch.Tensor:
    """The fixed test words scored: ``n`` of the ``total`` drawn with seed 0 (the same in every run and row),
    in split (alphabetical) order; all of them when ``n >= total``."""
    if n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].sort().values


def score_model(model: nn.Module, data: G2PData, s: dict[str, Any],
                teacher: nn.Module | None = None) -> dict[str, Any]:
    """Accuracy and speed of ``model`` on the fixed test subset; with ``teacher``, the teacher's speed is
    measured again alongside (``teacher_speed``) and ``speedup_batch1`` / ``speedup_batched`` are the ratios."""
    pre = data.prefixes("test")
    rows = test_subset(len(pre.references), s["test_words"])
    tokens, lengths, refs = pre.tokens[rows], pre.lengths[rows], [pre.references[i] for i in rows.tolist()]
    t0 = time.perf_counter()
    out: dict[str, Any] = {"parameters": count_parameters(model)}
    out |= accuracy(model, tokens, lengths, refs, data.seq_len, s["eval_beam"])
    speeds = decode_speed([model] if teacher is None else [model, teacher], tokens, lengths, data.seq_len,
                          s["speed_words"], s["speed_batch"], s["repeats"])
    out["speed"] = speeds[0]
    if teacher is not None:
        out["teacher_speed"] = speeds[1]
        for key in ("batch1", "batched"):
            out[f"speedup_{key}"] = speeds[0][f"{key}_words_per_s"] / speeds[1][f"{key}_words_per_s"]
    out["score_seconds"] = time.perf_counter() - t0
    return out


def run_g2p(seeds: int = 1, rows: Sequence[str] = ROWS, settings: dict[str, Any] | None = None,
            teacher: nn.Module | None = None, teacher_info: dict[str, Any] | None = None,
            data: G2PData | None = None, work_dir: Path | None = None,
            partial: Path | None = None, teacher_name: str = "base") -> dict[str, Any]:
    """Run the rows for ``seeds`` pipeline seeds (0..seeds-1); ``teacher`` / ``data`` default to the cached
    teacher and the real dictionary (tests inject tiny ones). Returns the JSON-ready result; with ``partial``,
    the result so far is also written there after every row (a long run keeps what it finished)."""
    s = DEFAULTS | (settings or {})
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    data = data or load_g2p()
    if teacher is None:
        teacher, teacher_info = g2p_teacher(0, data, teacher_name)
    teacher.eval()
    spec = model_spec(teacher, data.seq_len)
    n_test = min(s["test_words"], len(data.entries["test"]))
    result: dict[str, Any] = {
        "benchmark": "g2p", "settings": s, "test_words": n_test, "test_split_words": len(data.entries["test"]),
        "test_subset": f"{n_test} of the {len(data.entries['test'])} test words (a fixed draw, seed 0)",
        "data": data.counts,
        "teacher": {k: v for k, v in (teacher_info or {}).items() if k != "history"},
        "host": {"cpu": platform.machine(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                 "python": platform.python_version()},
        "rows": [],
    }
    if "teacher" in rows:
        t0 = time.perf_counter()
        teacher_scores = score_model(teacher, data, s)
        log.info("teacher scored in %.0fs: %s", time.perf_counter() - t0,
                 {k: v for k, v in teacher_scores.items() if k != "speed"})
        result["rows"].append({"row": "teacher", "seed": None, "ratio": 1.0, **teacher_scores})

    def save_partial() -> None:
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(result | {"summary": summarize(result["rows"]), "partial": True},
                                          indent=2) + "\n")

    save_partial()
    with tempfile.TemporaryDirectory(prefix="g2p-bench-") as tmp:
        base = Path(work_dir or tmp)
        for seed in range(seeds):
            for row in rows:
                if row == "teacher":
                    continue
                cfg = pipeline_config(row, s)
                t0 = time.perf_counter()
                run = run_pipeline(teacher, spec, cfg, base / f"{row}-seed{seed}", device="cpu", seed=seed)
                wall = time.perf_counter() - t0
                r = run.report
                seq = r.sequence
                scores = score_model(run.student, data, s, teacher=teacher)
                entry = {
                    "row": row, "seed": seed, "objective": None if row == "svd" else OBJECTIVE[row],
                    "ratio": r.compression_ratio, **scores,
                    "teacher_parameters": r.parameters.teacher,
                    "timings_s": dict(r.timings_s),  # every stage, export included
                    "pipeline_seconds": wall,
                    # on the teacher's held-out generations: tokens matched, and completions identical
                    "agreement": r.agreement.model_dump() if r.agreement else None,
                    "exact_agreement": seq.exact_agreement.model_dump(), "generation": seq.generation,
                    "distill": None if seq.distill is None else {k: seq.distill[k] for k in
                                                                  ("best_step", "best_score", "score_curve")},
                    "ranks": sorted({v["rank"] for v in seq.compression["layers"].values()}),
                    "blocks": seq.compression.get("blocks"),
                }
                result["rows"].append(entry)
                log.info("%s seed %d: %s", row, seed, line(entry))
                save_partial()
    result["summary"] = summarize(result["rows"])
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


SUMMARY_KEYS = ("parameters", "ratio", "greedy_word_accuracy", "greedy_per", "beam5_word_accuracy", "beam5_per",
                "batch1_words_per_s", "batched_words_per_s", "speedup_batch1", "speedup_batched")


def _flat(entry: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in (entry | entry.get("speed", {})).items() if k in SUMMARY_KEYS}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row: the mean and standard deviation over seeds of each figure, and the mean stage seconds."""
    out: dict[str, dict[str, Any]] = {}
    for name in ROWS:
        group = [r for r in rows if r["row"] == name]
        if not group:
            continue
        flats = [_flat(r) for r in group]
        summary: dict[str, Any] = {"seeds": len(group)}
        for key in flats[0]:
            mean, std = _mean_std([f[key] for f in flats])
            summary[key] = mean
            summary[f"{key}_std"] = std
        if "timings_s" in group[0]:
            summary["timings_s"] = {k: statistics.fmean(r["timings_s"][k] for r in group)
                                    for k in group[0]["timings_s"]}
        out[name] = summary
    return out


def line(entry: dict[str, Any]) -> str:
    f = _flat(entry)
    return (f"{f['parameters']:,} params {f['ratio']:.2f}x greedy {100 * f['greedy_word_accuracy']:.2f}% "
            f"(PER {100 * f['greedy_per']:.2f}%) beam5 {100 * f.get('beam5_word_accuracy', float('nan')):.2f}% "
            f"{f['batch1_words_per_s']:.0f} / {f['batched_words_per_s']:.0f} words/s")


def _pm(r: dict[str, Any], key: str, scale: float = 100.0, spread: bool = True) -> str:
    """``r[key]`` (times ``scale``), with ``±`` its standard deviation over several seeds; ``-`` if absent."""
    if key not in r:
        return "-"
    text = f"{scale * r[key]:.2f}"
    return text + (f"±{scale * r[key + '_std']:.2f}" if spread and r["seeds"] > 1 else "")


def report(result: dict[str, Any]) -> str:
    """The table: one line per row, means over seeds (± standard deviation where there are several)."""
    summary = result.get("summary") or summarize(result["rows"])
    s = result["settings"]
    head = (f"G2P (CMUdict), {result['test_subset']}; greedy and beam {s['eval_beam']}; speed: greedy words/s "
            f"on the CPU ({result['host']['torch_threads']} torch thread(s)), batch 1 over "
            f"{min(s['speed_words'], result['test_words'])} words and batched ({s['speed_batch']})")
    cols = (f"{'row':<9} {'seeds':>5} {'params':>9} {'ratio':>6} {'greedy acc':>13} {'greedy PER':>11} "
            f"{'beam5 acc':>13} {'beam5 PER':>10} {'w/s b1':>8} {'w/s batch':>10} {'x b1':>5} {'x batch':>7}"
            f"  seconds per stage")
    lines = [head, cols, "-" * len(cols)]
    for name, r in summary.items():
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r.get("timings_s", {}).items())
        lines.append(f"{name:<9} {r['seeds']:>5} {r['parameters']:>9,.0f} {r['ratio']:>5.2f}x "
                     f"{_pm(r, 'greedy_word_accuracy'):>13} {_pm(r, 'greedy_per'):>11} "
                     f"{_pm(r, 'beam5_word_accuracy'):>13} "
                     f"{_pm(r, 'beam5_per'):>10} {r['batch1_words_per_s']:>8.0f} {r['batched_words_per_s']:>10.0f} "
                     f"{_pm(r, 'speedup_batch1', 1.0, False):>5} {_pm(r, 'speedup_batched', 1.0, False):>7}  {stages}")
    depth = s.get("student_layers")
    cfg = (f"pipeline: target ratio {s['target_ratio']}, student blocks {depth or 'all'}, "
           f"layers {','.join(s.get('layers') or ['all projections'])}, samples {s['samples']}, beam {s['beam_size']}, "
           f"steps {s['steps']} (batch {s['batch_size']}, lr {s['lr']}), holdout {s['holdout']}, "
           f"temperature {s.get('temperature', 1.0)}")
    lines.append(cfg)
    paired = any("teacher_speed" in r for r in result["rows"])
    lines.append("x b1 / x batch: student words/s over the teacher's, "
                 + ("the two timed in turns right after the student's scoring" if paired else
                    "the teacher timed once, before the students (older result files)")
                 + "; accuracies and PER in %, mean over seeds (± standard deviation)")
    t = result.get("teacher") or {}
    if t:
        lines.append(f"teacher: {t.get('parameters', 0):,} params {t.get('arch_kwargs')}, trained "
                     f"{t.get('steps_run')} steps on {t.get('train_size')} words in {t.get('train_seconds', 0):.0f}s; "
                     f"validation greedy accuracy {100 * t.get('val_word_accuracy', 0):.2f}% "
                     f"({t.get('eval_words')} words)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench g2p", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--test-words", type=int, default=DEFAULTS["test_words"],
                   help="score on N test words, a fixed draw (beam search is the costly part)")
    p.add_argument("--samples", type=int, default=DEFAULTS["samples"], help="pipeline: teacher samples")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="pipeline: fine-tuning steps")
    p.add_argument("--beam-size", type=int, default=DEFAULTS["beam_size"], help="pipeline: sequence-level beam")
    p.add_argument("--holdout", type=int, default=DEFAULTS["holdout"], help="pipeline: held-out generations")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="pipeline: word-level KD T")
    p.add_argument("--speed-words", type=int, default=DEFAULTS["speed_words"], help="words timed at batch 1")
    p.add_argument("--speed-batch", type=int, default=DEFAULTS["speed_batch"], help="batch of the batched timing")
    p.add_argument("--target-ratio", type=float, default=DEFAULTS["target_ratio"])
    p.add_argument("--teacher", default="base", choices=sorted(TEACHERS),
                   help="which cached teacher (bench.g2p.teacher.TEACHERS; trained on first use)")
    p.add_argument("--student-layers", type=int, default=None,
                   help="pipeline: keep this many of the teacher's blocks (default: all)")
    p.add_argument("--layers", default=None,
                   help="pipeline: comma-separated Linear layer patterns to factorize (default: every projection)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/g2p.json)")
    p.add_argument("--report", action="store_true", help="print the table of --out without running")
    args = p.parse_args(argv)
    out = args.out or RESULTS / "g2p.json"
    if args.report:
        print(report(json.loads(out.read_text())))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    settings = {"test_words": args.test_words, "samples": args.samples, "steps": args.steps,
                "beam_size": args.beam_size, "holdout": args.holdout, "lr": args.lr,
                "target_ratio": args.target_ratio, "speed_words": args.speed_words, "speed_batch": args.speed_batch,
                "temperature": args.temperature, "student_layers": args.student_layers,
                "layers": args.layers.split(",") if args.layers else None}
    t0 = time.perf_counter()
    result = run_g2p(args.seeds, [r for r in args.rows.split(",") if r], settings,
                     partial=out.with_suffix(".partial.json"), teacher_name=args.teacher)
    result["seconds"] = time.perf_counter() - t0
    result["command"] = shlex.join(["python", "-m", "bench", "g2p", *(sys.argv[1:] if argv is None else argv)])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(report(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
