"""``python -m bench <scenario> [--seeds N] [--device cpu|cuda] [--scale F]``: prints a table, writes JSON.

Scenarios (bench/scenarios.py) run the real pipeline on real teachers and score the students on real test
data, which the pipeline itself never sees. ``--scale`` multiplies every step budget (0.01 for a smoke run).
``python -m bench scale`` measures time and memory of generator training as the input and batch grow
(``--teacher torchvision:resnet18 --sides 224`` for ImageNet-sized inputs). ``bench/gpu.sh OUTDIR`` runs the
GPU rows. Rows report parameters, ratio, real test accuracy, the latency of student and teacher at batch 1
and 64 from the run report, and the seconds of every pipeline stage. ``python -m bench g2p --help``: the
sequence-model benchmark (grapheme-to-phoneme on CMUdict, bench/g2p/run.py), with options of its own.
``python -m bench peers --entries E1,E2 [--methods dafl,deepinversion] [--seconds S]``: data-free peers
re-implemented from their papers, at the KegNet default's wall time on each suite entry (bench/peers/run.py).
``python -m bench calibration [--files F ...]``: the confidence estimate against the real accuracy of every
recorded student (bench/calibration.py; reads bench/results only, runs nothing).

Within one seed, the KegNet generators are trained once and shared by the scenario's compression settings
(they depend on the teacher only); the generator time is reported in every row that uses them.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bench.datasets import accuracy
from bench.scenarios import SCENARIOS, Scenario
from kegnet import ClassifierConfig, KegnetError, ModelSpec, run_pipeline
from kegnet.compression.latency import model_latency
from kegnet.generation import make_generator
from kegnet.metrics import count_parameters
from kegnet.pipeline import resolve_device

RESULTS = Path(__file__).parent / "results"
CACHE = RESULTS / "generators"


def teacher_digest(teacher: torch.nn.Module) -> str:
    """A fingerprint of a teacher's weights (scenarios that share a teacher share its generators)."""
    h = hashlib.sha256()
    for name, value in teacher.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _generator_key(cfg: ClassifierConfig, teachers: list[str], seed: int) -> str:
    """What KegNet generators depend on: their config, the teachers (digests) they learn from, the seed."""
    text = json.dumps([cfg.generator.model_dump(), teachers, seed])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_file(key: str) -> Path:
    """Where generators are kept on disk between runs (ablations reuse them)."""
    return CACHE / f"{key}.safetensors"


def _load_generators(path: Path, cfg: ClassifierConfig, spec: ModelSpec) -> tuple[list[torch.nn.Module], float] | None:
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        seconds = float(f.metadata()["seconds"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    gens = []
    for i in range(cfg.generator.num_generators):
        g = make_generator(tuple(spec.input_shape), spec.num_classes, cfg.generator.noise_dim)
        g.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}.")})
        gens.append(g.eval())
    return gens, seconds


def _save_generators(path: Path, gens: list[torch.nn.Module], seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, g in enumerate(gens) for k, v in g.state_dict().items()}
    save_file(tensors, str(path), metadata={"seconds": str(seconds)})


class _SharedDecomposition:
    """Within one bench run, rows that factorize the same teacher weights with the same plan, HOOI budget and
    seed get the same initial student: it is computed once and copied (``kegnet.tasks.classify.apply_plan``,
    which the classifier's decompose stage calls, is wrapped while the bench runs). Each row still reports the
    time the decomposition took."""

    def __init__(self) -> None:
        self.done: dict[str, tuple[torch.nn.Module, float]] = {}
        self.last_seconds = 0.0

    def __enter__(self) -> _SharedDecomposition:
        import kegnet.tasks.classify as classify

        self._module, self._original = classify, classify.apply_plan

        def apply_plan(model: torch.nn.Module, plan: Any, **kwargs: Any) -> torch.nn.Module:
            key = json.dumps([teacher_digest(model), plan.to_dict(),
                              sorted((k, v) for k, v in kwargs.items() if k != "should_cancel")])
            if key not in self.done:
                t0 = time.perf_counter()
                student = self._original(model, plan, **kwargs)
                self.done[key] = (copy.deepcopy(student), time.perf_counter() - t0)
                self.last_seconds = self.done[key][1]
                return student
            student, self.last_seconds = self.done[key]
            return copy.deepcopy(student)

        classify.apply_plan = apply_plan
        return self

    def __exit__(self, *exc: object) -> None:
        self._module.apply_plan = self._original


def make_config(scenario: Scenario, setting: str, method: str, scale: float,
                extra: dict[str, Any] | None = None) -> ClassifierConfig:
    """The "fast" preset with the scenario's overrides, then ``extra`` (``--config``), the setting's
    compression, and budgets × ``scale``."""
    base = ClassifierConfig.from_preset("fast")
    extra = extra or {}
    gen = {**scenario.overrides.get("generator", {}), **extra.get("generator", {})}
    dist = {**scenario.overrides.get("distill", {}), **extra.get("distill", {})}
    gen["steps"] = max(2, round(gen.get("steps", base.generator.steps) * scale))
    dist["steps"] = max(2, round(dist.get("steps", base.distill.steps) * scale))
    dist["eval_every"] = max(1, min(dist.get("eval_every", base.distill.eval_every), dist["steps"] // 5))
    variant = scenario.variants.get(method, {})
    gen.update(variant.get("generator", {}))
    dist.update(variant.get("distill", {}))
    compression = {"keep_slower": scenario.keep_slower, **scenario.settings[setting],
                   **extra.get("compression", {})}
    return ClassifierConfig.from_preset("fast", method=method.partition(":")[0], generator=gen, distill=dist,
                                      compression=compression, export_portable=False,
                                      export_onnx=False)


def run(name: str, seeds: int, device: str, scale: float, test_limit: int | None = None,
        methods: list[str] | None = None, settings: list[str] | None = None,
        extra: dict[str, Any] | None = None, reuse_generators: bool = False) -> dict[str, Any]:
    """Run the scenario's rows; with ``reuse_generators``, KegNet generators are kept on disk
    (bench/results/generators) and reused by later runs with the same generator config and seed, whose
    rows then report the original training time."""
    sc = SCENARIOS[name]
    dev = resolve_device(device)
    x, y = sc.test_set()
    if test_limit:
        x, y = x[:test_limit], y[:test_limit]
    built, spec = sc.teacher()
    teachers = [t.to(dev) for t in (built if isinstance(built, list) else [built])]
    digests = [teacher_digest(t) for t in teachers]
    # An upload scenario hands the pipeline the file (it builds its own module from it, as for a user).
    source = sc.teacher_file() if sc.teacher_file is not None else None
    if source is not None and len(teachers) > 1:
        raise ValueError("teacher_file scenarios have one teacher")
    rows: list[dict[str, Any]] = [
        {"setting": "-", "method": "teacher" if len(teachers) == 1 else f"teacher{i}",
         "accuracy": [accuracy(t, x, y)], "ratio": 1.0, "parameters": count_parameters(t),
         "latency_ms": [{"device": str(dev), "teacher": model_latency(t.eval(), tuple(spec.input_shape), dev)}]}
        for i, t in enumerate(teachers)
    ]
    print(_header(), flush=True)
    for row in rows:
        print(_fmt(row), flush=True)
    shared: dict[str, tuple[list[torch.nn.Module], float]] = {}  # generator key -> generators, seconds
    with _SharedDecomposition() as decompositions:
        _run_rows(sc, rows, teachers, digests, spec, source, dev, x, y, seeds, scale, methods, settings, extra,
                  reuse_generators, shared, decompositions)
    return {"scenario": name, "about": sc.about, "device": device_name(dev), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "rows": rows}


def _run_rows(sc: Scenario, rows: list[dict[str, Any]], teachers: list[torch.nn.Module], digests: list[str],
              spec: ModelSpec, source: tuple[Path, ModelSpec] | None, dev: torch.device, x: torch.Tensor,
              y: torch.Tensor, seeds: int, scale: float, methods: list[str] | None, settings: list[str] | None,
              extra: dict[str, Any] | None, reuse_generators: bool,
              shared: dict[str, tuple[list[torch.nn.Module], float]], decompositions: _SharedDecomposition) -> None:
    for setting in sc.settings:
        if settings and setting not in settings:
            continue
        # --methods may also name a variant that is not among the scenario's default rows.
        extra_variants = [m for m in methods or [] if m in sc.variants and m not in sc.methods]
        for method in [*sc.methods, *extra_variants]:
            if methods and method not in methods:
                continue
            row: dict[str, Any] = {"setting": setting, "method": method, "accuracy": [], "agreement": [],
                                   "seconds": [], "timings_s": [], "peak_gpu_mb": [], "latency_ms": [],
                                   "layers": [], "confidence": []}
            for seed in range(seeds):
                cfg = make_config(sc, setting, method, scale, extra)
                if cfg.method == "tucker-only" and seed > 0:
                    break  # deterministic: one run says it all
                members = sc.teachers_of.get(method, list(range(len(teachers))))
                teacher = [teachers[i] for i in members] if len(members) > 1 else teachers[members[0]]
                key = _generator_key(cfg, [digests[i] for i in members], seed)
                # Only KegNet rows use (and are charged for) generators; the noise baselines have none.
                gens, gen_s = shared.get(key, (None, 0.0)) if cfg.method == "kegnet" else (None, 0.0)
                cache = _cache_file(key) if reuse_generators and cfg.method == "kegnet" else None
                if gens is None and cache is not None:
                    gens, gen_s = _load_generators(cache, cfg, spec) or (None, 0.0)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    try:
                        if source is not None:
                            result = run_pipeline(source[0], source[1], cfg, tmp, device=str(dev), seed=seed,
                                                  generators=gens)
                        else:
                            result = run_pipeline(teacher, spec, cfg, tmp, device=str(dev), seed=seed,
                                                  generators=gens)
                    except KegnetError as exc:  # the job a user would get fails: a row that says why
                        row["error"] = str(exc)
                        break
                    seconds = time.perf_counter() - t0
                report = result.report
                plan = report.classify.plan
                timings = dict(report.timings_s)
                timings["decompose_computed"] = timings["decompose"]  # near 0 where it was shared
                timings["decompose"] = decompositions.last_seconds
                seconds += timings["decompose"] - timings["decompose_computed"]
                if gens is None and result.generators is not None:
                    shared[key] = (result.generators, timings["generators"])
                    if cache is not None:
                        _save_generators(cache, result.generators, timings["generators"])
                elif gens is not None:
                    timings["generators"], seconds = gen_s, seconds + gen_s
                row["accuracy"].append(accuracy(result.student, x, y))
                row["agreement"].append(report.agreement.final if report.agreement else None)
                row["confidence"].append(_confidence_detail(report.classify.confidence))
                row["seconds"].append(seconds)
                row["timings_s"].append(timings)
                row["peak_gpu_mb"].append(torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None)
                speed = report.speed  # unit "ms": milliseconds per forward pass
                row["latency_ms"].append({"device": speed.device, "teacher": speed.teacher, "student": speed.student})
                row["layers"].append({"factorized": len(plan["layers"]), "skipped": plan.get("skipped", {})})
                row["ratio"] = report.compression_ratio
                row["parameters"] = report.parameters.student
            rows.append(row)
            print(_fmt(row), flush=True)


def _confidence_detail(confidence: Any) -> dict[str, Any] | None:
    """The run's exam grades (kegnet/distill/confidence.py) without the per-class table: what
    ``python -m bench calibration`` compares with the real accuracy."""
    if confidence is None:
        return None
    keys = ("estimate", "level", "agreement", "balanced", "kl", "per_source", "before_finetune", "chosen", "exam",
            "generator_exam")
    return {k: v for k, v in confidence.model_dump().items() if k in keys}


def _pct(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


STAGES = ("load", "plan", "generators", "decompose", "finetune", "export")


def _header() -> str:
    return ("| setting | method | params | ratio | test acc. % | synth. agreement % | b1 ms (teacher) "
            "| b64 ms (teacher) | s: load / plan / generators / decompose / student / export | total s "
            "| peak GPU MiB | seeds |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _latency_cell(row: dict[str, Any], key: str) -> str:
    """The row's model at one batch, mean over seeds: the student, then in brackets the teacher as timed in
    the same job (machine load changes between jobs); a teacher row has the teacher only."""
    lat = row.get("latency_ms") or []
    if not lat:
        return "-"
    teacher = statistics.mean(entry["teacher"][key] for entry in lat)
    if "student" not in lat[0]:
        return f"{teacher:.2f}"
    return f"{statistics.mean(entry['student'][key] for entry in lat):.2f} ({teacher:.2f})"


def _fmt(row: dict[str, Any]) -> str:
    if "error" in row and not row["accuracy"]:
        return f"| {row['setting']} | {row['method']} | job fails: {row['error'][:160]} | | | | | | | | | |"
    timings = row.get("timings_s") or []
    agreement = [a for a in row.get("agreement", []) if a is not None]
    peak = [p for p in row.get("peak_gpu_mb", []) if p is not None]

    def mean_or_dash(values: list[float]) -> str:
        return f"{statistics.mean(values):.1f}" if values else "-"

    stages = " / ".join(mean_or_dash([t[s] for t in timings if s in t]) for s in STAGES) if timings else "-"
    cells = [row["setting"], row["method"], f"{row['parameters']:,}", f"{row['ratio']:.2f}x", _pct(row["accuracy"]),
             _pct(agreement) if agreement else "-", _latency_cell(row, "batch1_ms"), _latency_cell(row, "batch64_ms"),
             stages, mean_or_dash(row.get("seconds", [])), f"{max(peak):.0f}" if peak else "-",
             str(len(row["accuracy"]))]
    return "| " + " | ".join(cells) + " |"


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def _run_peers(args: argparse.Namespace) -> None:
    from bench.peers.run import METHODS, run_peers

    if not args.entries:
        raise SystemExit("peers needs --entries (names in bench/suite/teachers.py)")
    out = args.out or RESULTS / "peers.json"
    methods = args.methods.split(",") if args.methods else list(METHODS)
    result = run_peers(args.entries.split(","), methods, args.seeds, args.device, out, seconds=args.seconds,
                       extra=args.config, budgets=args.budgets, first_seed=args.first_seed)
    result["command"] = shlex.join(["python", "-m", "bench", *sys.argv[1:]])
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def main() -> None:
    if sys.argv[1:2] == ["calibration"]:  # reads recorded results only (bench/calibration.py)
        from bench.calibration import main as calibration_main

        calibration_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["g2p"]:  # the sequence-model benchmark has its own options (bench/g2p/run.py)
        from bench.g2p.run import main as g2p_main

        g2p_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("scenario", choices=sorted([*SCENARIOS, "scale", "suite", "g2p", "peers", "calibration"]))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step budget")
    parser.add_argument("--test-limit", type=int, default=None, help="score on the first N test samples")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the scenario's methods")
    parser.add_argument("--settings", default=None, help="comma-separated subset of settings, e.g. 4.10x")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--sides", default="32,64,128", help="scale: image sides")
    parser.add_argument("--batches", default="64,256,1024", help="scale: batch sizes")
    parser.add_argument("--teacher", default="resnet8", help="scale: resnet8 or a library name, e.g. "
                                                             "torchvision:resnet18")
    parser.add_argument("--steps", type=int, default=5, help="scale: timed steps per configuration")
    parser.add_argument("--forms", default="cdist,broadcast", help="scale: diversity-loss forms to time")
    parser.add_argument("--config", type=json.loads, default=None,
                        help='generator/distill overrides for an ablation, e.g. \'{"generator": {"activation": 0}}\'')
    parser.add_argument("--reuse-generators", action="store_true",
                        help="keep KegNet generators in bench/results/generators and reuse them (ablations)")
    parser.add_argument("--entries", default=None, help="suite: comma-separated subset of bench/suite/teachers.py")
    parser.add_argument("--recipes", default=None, help="suite: comma-separated subset of the recipes (names as in "
                                                        "the table, e.g. kegnet/pairs+noise0.5,gaussian)")
    parser.add_argument("--first-seed", type=int, default=0, help="suite and peers: the first seed (convnets run one "
                                                                   "seed per part: --seeds 1 --first-seed 1 is seed 1)")
    parser.add_argument("--variants", type=json.loads, default=None,
                        help='suite: configurations side by side, e.g. \'{"today": {}, "fit": {"compression": {"fit": '
                             '"outputs"}}}\' (bench/suite/variants.py; one table of starts and students)')
    parser.add_argument("--report", action="store_true", help="suite: print the tables of --out (default "
                                                                   "bench/results/suite.json) without running")
    parser.add_argument("--seconds", type=float, default=None,
                        help="peers: wall time of each peer (default: that of the KegNet default, run first)")
    parser.add_argument("--budgets", type=Path, default=None,
                        help="peers: an earlier peers JSON whose KegNet rows and times are reused")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<scenario>.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)  # 1-2 on a shared 2-core host: oversubscription crawls
    if args.scenario == "peers":
        _run_peers(args)
        return
    if args.scenario == "suite":
        from bench.suite.run import RECIPES, run_suite
        from bench.suite.teachers import ENTRIES

        out = args.out or RESULTS / "suite.json"
        entries = args.entries.split(",") if args.entries else list(ENTRIES)
        if args.report:
            from bench.suite.run import report

            print(report(json.loads(out.read_text())["entries"]))
            return
        names = args.recipes.split(",") if args.recipes else None
        recipes = [r for r in RECIPES if names is None or r.name in names]
        if args.variants is not None:
            from bench.suite.variants import run_variants

            result = run_variants(entries, args.seeds, args.first_seed, args.device, args.variants,
                                  recipes if names else None, out)
            result["command"] = shlex.join(["python", "-m", "bench", *sys.argv[1:]])
            out.write_text(json.dumps(result, indent=2))
            return
        result = run_suite(entries, args.seeds, args.device, out, recipes, extra=args.config,
                           first_seed=args.first_seed)
        result["command"] = shlex.join(["python", "-m", "bench", *sys.argv[1:]])
        out.write_text(json.dumps(result, indent=2))
        return
    if args.scenario == "scale":
        from bench.scale import run_scale

        ints = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
        result = run_scale(args.device, ints(args.sides), ints(args.batches), teacher=args.teacher,
                           steps=args.steps, forms=tuple(args.forms.split(",")), threads=args.threads)
    else:
        split = lambda text: text.split(",") if text else None  # noqa: E731
        result = run(args.scenario, args.seeds, args.device, args.scale, args.test_limit, split(args.methods),
                     split(args.settings), args.config, args.reuse_generators)
    result["command"] = shlex.join(["python", "-m", "bench", *sys.argv[1:]])
    out = args.out or RESULTS / f"{args.scenario}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
