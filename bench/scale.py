"""``python -m bench scale``: time per generator step and peak memory as the input and the batch grow.

Each configuration runs in a fresh process, so its peak memory is its own: ``torch.cuda.max_memory_allocated``
on a GPU, the process's peak resident set size on a CPU. The diversity loss is computed two ways: ours
(``torch.cdist``, B×B) and the paper code's broadcast (a B×B×D tensor), which is skipped where that one
tensor alone would exceed ``--max-broadcast-gib``.

``--teacher``: ``resnet8`` (kegnet's CIFAR-style ResNet of depth 8, the first table) or a library name such as
``torchvision:resnet18`` (at 224×224×3: does the generator fit at the default batch, and how long is a step).
``--steps``: timed steps after one warm-up step (a ResNet-18 step at 224 takes tens of seconds on a CPU).
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from kegnet import create_model
from kegnet.config import GeneratorConfig
from kegnet.generation import Decoder, decoder_loss, diversity_loss, make_generator
from kegnet.generation.codes import sample_labels
from kegnet.generation.train import freeze
from kegnet.pipeline import resolve_device

SIDES = (32, 64, 128)
BATCHES = (64, 256, 1024)
MAX_BROADCAST_GIB = 8.0


def broadcast_diversity_loss(samples: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The paper code's form: materializes ``(B, B, D)`` differences. Reference for the scale table only."""
    x = samples.flatten(1)
    d_x = (x[:, None, :] - x[None, :, :]).abs().mean(2)
    d_z = (noise[:, None, :] - noise[None, :, :]).square().mean(2)
    return torch.exp(-(d_x * d_z).mean())


TEACHERS = ("resnet8", "torchvision:resnet18")


def _teacher(name: str, shape: tuple[int, int, int]) -> torch.nn.Module:
    if name == "resnet8":
        return create_model("resnet", input_shape=shape, num_classes=10, depth=8)
    return create_model(name, input_shape=shape, num_classes=10)


def measure_one(side: int, batch: int, form: str, device: str, steps: int = 5,
                teacher_name: str = "resnet8") -> dict[str, Any]:
    """Generator training steps for a 3×side×side input at ``batch``; seconds per step and peak memory."""
    dev = resolve_device(device)
    torch.manual_seed(0)
    shape = (3, side, side)
    teacher = freeze(_teacher(teacher_name, shape), "eval").to(dev)
    cfg = GeneratorConfig()
    gen = make_generator(shape, 10, cfg.noise_dim).to(dev)
    dec = Decoder(math.prod(shape), cfg.noise_dim, cfg.decoder_layers).to(dev)
    opt = torch.optim.Adam([*gen.parameters(), *dec.parameters()], lr=1e-3)
    rng = torch.Generator(device=dev).manual_seed(0)
    div = diversity_loss if form == "cdist" else broadcast_diversity_loss

    def step() -> None:
        labels = sample_labels(batch, 10, rng, dev)
        noise = torch.randn(batch, cfg.noise_dim, generator=rng, device=dev)
        x = gen(labels, noise)
        loss = F.cross_entropy(teacher(x), labels.argmax(1)) + decoder_loss(dec(x), noise) + div(x, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocator, kernels)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"side": side, "batch": batch, "form": form, "teacher": teacher_name, "steps": steps,
            "s_per_step": (time.perf_counter() - t0) / steps,
            "peak_mib": peak, "memory": "GPU allocated" if dev.type == "cuda" else "process RSS"}


def run_scale(device: str, sides: tuple[int, ...] = SIDES, batches: tuple[int, ...] = BATCHES,
              max_broadcast_gib: float = MAX_BROADCAST_GIB, teacher: str = "resnet8", steps: int = 5,
              forms: tuple[str, ...] = ("cdist", "broadcast"), threads: int | None = None) -> dict[str, Any]:
    rows = []
    print("| teacher | input | batch | diversity loss | s / step | peak MiB | note |\n|---|---|---|---|---|---|---|",
          flush=True)
    for side in sides:
        for batch in batches:
            for form in forms:
                tensor_gib = batch * batch * 3 * side * side * 4 / 2**30
                if form == "broadcast" and tensor_gib > max_broadcast_gib:
                    row = {"side": side, "batch": batch, "form": form, "teacher": teacher, "skipped": True,
                           "note": f"B×B×D tensor alone is {tensor_gib:.0f} GiB"}
                else:
                    proc = subprocess.run([sys.executable, "-m", "bench.scale", str(side), str(batch), form, device,
                                           str(steps), teacher, str(threads or 0)], capture_output=True, text=True)
                    if proc.returncode != 0:
                        row = {"side": side, "batch": batch, "form": form, "teacher": teacher, "failed": True,
                               "note": (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]}
                    else:
                        row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "note": ""}
                rows.append(row)
                secs = f"{row['s_per_step']:.3f}" if "s_per_step" in row else "-"
                peak = f"{row['peak_mib']:.0f}" if "peak_mib" in row else "-"
                print(f"| {teacher} | 3×{side}×{side} | {batch} | {form} | {secs} | {peak} | {row['note']} |",
                      flush=True)
    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return {"scenario": "scale", "device": name, "date": time.strftime("%Y-%m-%d"), "rows": rows}


if __name__ == "__main__":
    side_, batch_, form_, device_, steps_, teacher_, threads_ = sys.argv[1:8]
    if int(threads_):
        torch.set_num_threads(int(threads_))  # a fresh process: --threads must be passed on
    print(json.dumps(measure_one(int(side_), int(batch_), form_, device_, int(steps_), teacher_)))
