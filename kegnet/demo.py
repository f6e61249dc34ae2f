"""End-to-end demo against a running service: train a tiny digits classifier, compress it over HTTP, compare.

    python -m kegnet.demo --url http://127.0.0.1:8000        (``bash scripts/demo.sh`` starts everything)

The teacher is an MLP trained in seconds on scikit-learn's bundled 8×8 digits; the service never sees the
data, only the weights. The held-out split is the user's own evaluation set, used here only to report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
import torch
from torch import nn

from kegnet.client import KegnetClient
from kegnet.models import create_model
from kegnet.report import RunReport

MODEL = {"arch": "mlp", "arch_kwargs": {"hidden": [64, 64]}, "input_shape": [64], "num_classes": 10}
CONFIG = {
    "preset": "fast",
    "generator": {"num_generators": 2, "steps": 600, "batch_size": 128},
    # A 64-unit layer runs slower as two smaller ones (per-call overhead dominates at this size); the demo
    # compresses it anyway to show the whole path. Larger models keep only what measured not slower.
    "compression": {"rank_method": "ratio", "target_ratio": 2.5, "keep_slower": True},
    "distill": {"steps": 800, "batch_size": 128, "holdout_samples": 512, "eval_every": 100},
}


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    as_x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


def train_teacher(x: torch.Tensor, y: torch.Tensor, seed: int = 0, epochs: int = 40) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(MODEL["arch"], input_shape=tuple(MODEL["input_shape"]), num_classes=10,
                         **MODEL["arch_kwargs"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def wait_ready(client: KegnetClient, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.http.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the service at {client.url} is not ready after {timeout:.0f} s")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="service URL (default $KEGNET_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=None, help="default $KEGNET_API_KEY")
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--wait-ready", type=float, default=60.0, help="seconds to wait for /readyz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = load_digits_split(args.seed)
    t0 = time.perf_counter()
    teacher = train_teacher(x_tr, y_tr, args.seed)
    print(f"trained the teacher on {len(x_tr)} digits in {time.perf_counter() - t0:.1f} s")
    from safetensors.torch import save_file

    ckpt = args.out / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(ckpt))

    with KegnetClient(args.url, args.api_key) as client:
        wait_ready(client, args.wait_ready)
        job = client.submit(ckpt, MODEL, CONFIG, seed=args.seed, device="auto")
        print(f"submitted job {job['id']}; following it:")
        job = client.wait(job["id"], poll=0.5)
        if job["status"] != "succeeded":
            print(f"job {job['status']}: {job.get('error')}", file=sys.stderr)
            return 1
        client.download(job["id"], args.out / "results")

    results = args.out / "results"
    report = RunReport.read(results)  # manifest.json, typed
    student = torch.export.load(results / "student.pt2").module()  # our own output file
    acc_t, acc_s = accuracy(teacher, x_te, y_te), accuracy(student, x_te, y_te)
    params, speed = report.parameters, report.speed  # speed: ms per forward pass (a classifier job)
    with torch.no_grad():
        agree = (student(x_te).argmax(1) == teacher(x_te).argmax(1)).float().mean().item()
    rows = [("parameters", f"{params.teacher:,}", f"{params.student:,}"),
            (f"latency batch 1, {speed.unit} ({speed.device})", f"{speed.teacher['batch1_ms']:.3f}",
             f"{speed.student['batch1_ms']:.3f}"),
            (f"latency batch 64, {speed.unit}", f"{speed.teacher['batch64_ms']:.3f}",
             f"{speed.student['batch64_ms']:.3f}"),
            ("compression", "1.00x", f"{report.compression_ratio:.2f}x"),
            (f"test accuracy ({len(x_te)} digits)", f"{acc_t:.2%}", f"{acc_s:.2%}"),
            ("agreement with teacher", "", f"{agree:.2%}")]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {'teacher':>10}  {'student':>10}")
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>10}  {b:>10}")
    print(f"\nthe student is in {results}/; use it with plain PyTorch:")
    print(f'  import torch; student = torch.export.load("{results / "student.pt2"}").module()')
    print("  x = ...  # float32 (N, 64): digits standardized as for the teacher")
    print("  classes = student(x).argmax(1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
