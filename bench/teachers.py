"""Teachers for the benchmarks: the paper's own checkpoints from ../shared, or ones the bench trains itself.

The paper ships no UCI teacher, so the pendigits scenario trains the paper's UCI MLP (11 hidden layers of 100
units, ELU, dropout 0.15; Adam 1e-3, batch 64, early stopping on a validation split) on the real training
split, once per seed, and caches it under bench/results/teachers/.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from bench.datasets import accuracy, load_image_split, load_uci_split
from kegnet import ModelSpec, create_model, load_teacher

log = logging.getLogger(__name__)

CACHE = Path(__file__).parent / "results" / "teachers"


def uci_spec(name: str) -> ModelSpec:
    features, classes = {"pendigits": (16, 10)}[name]
    return ModelSpec(arch="mlp", arch_kwargs={"hidden": [100] * 11, "activation": "elu", "dropout": 0.15},
                     input_shape=(features,), num_classes=classes)


def fit_early_stopping(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, max_epochs: int = 300,
                       patience: int = 20, max_steps: int | None = None) -> tuple[nn.Module, float, int]:
    """Adam 1e-3, batch 64, on all but a tenth of ``(x, y)`` (drawn with ``seed``); the epoch with the best
    accuracy on that tenth is kept, and training stops after ``patience`` epochs without a better one or
    after ``max_steps`` steps' worth of epochs. Returns the model, its validation accuracy, epochs run."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n_val = len(x) // 10
    val, trn = perm[:n_val], perm[n_val:]
    if max_steps is not None:
        max_epochs = min(max_epochs, max(1, max_steps // -(-len(trn) // 64)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    best, best_state, since, epochs_run = -1.0, copy.deepcopy(model.state_dict()), 0, 0
    for epoch in range(1, max_epochs + 1):
        epochs_run = epoch
        model.train()
        for idx in trn[torch.randperm(len(trn), generator=gen)].split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy(model, x[val], y[val])
        if acc > best:
            best, best_state, since = acc, copy.deepcopy(model.state_dict()), 0
        else:
            since += 1
            if since >= patience:
                break
    model.load_state_dict(best_state)
    return model, best, epochs_run


def train_uci_teacher(name: str, seed: int = 0, max_epochs: int = 300, patience: int = 20) -> nn.Module:
    """Train the paper's UCI MLP on ``name``'s training split; the best validation epoch is kept."""
    spec = uci_spec(name)
    x, y = load_uci_split(name, "train")
    torch.manual_seed(seed)
    model = create_model(spec.arch, input_shape=spec.input_shape, num_classes=spec.num_classes, **spec.kwargs())
    model, best, epochs_run = fit_early_stopping(model, x, y, seed, max_epochs, patience)
    log.info("%s teacher (seed %d): best validation accuracy %.4f after %d epochs", name, seed, best, epochs_run)
    return model.eval()


def uci_teacher(name: str, seed: int = 0) -> tuple[Path, ModelSpec]:
    """The cached teacher file for ``name`` and ``seed`` (trained on first use) and its spec."""
    spec = uci_spec(name)
    path = CACHE / f"{name}-mlp-seed{seed}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = train_uci_teacher(name, seed)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(path)
    load_teacher(path, spec)  # the same checks a user's upload gets
    return path, spec


# Image teachers from the libraries (torchvision, timm), trained here on the real Fashion-MNIST training set.
# Recipe (bounded for a 2-core CPU, ~8 minutes each): SGD momentum 0.9, nesterov, lr 0.05 with one-cycle
# (linear warm-up 15%, cosine down), weight decay 5e-4, batch 128, random shifts of up to 2 px and
# horizontal flips, ``IMAGE_STEPS[name]`` steps (2.2-5 s each on a shared 2-core CPU for either net, so
# under half an epoch: a budget, not a converged teacher).
IMAGE_STEPS = {"fashion-resnet18": 200, "fashion-mobilenetv3": 120}
IMAGE_TEACHERS: dict[str, ModelSpec] = {
    "fashion-resnet18": ModelSpec(arch="torchvision:resnet18", input_shape=(3, 32, 32), num_classes=10),
    "fashion-mobilenetv3": ModelSpec(arch="timm:mobilenetv3_small_100", input_shape=(1, 32, 32), num_classes=10),
}


def fashion_inputs(split: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as these teachers see it: (N, channels, 32, 32), grey replicated to 3 channels."""
    x, y = load_image_split("fashion-mnist", split)
    return (x.expand(-1, channels, -1, -1).contiguous() if channels > 1 else x), y


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The batch ``(N, C, H, W)`` shifted by one random offset of up to 2 px each way (zero padding)."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(F.pad(x, (2, 2, 2, 2)), shifts=(dy, dx), dims=(2, 3))[:, :, 2:-2, 2:-2]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 px (zero padding) and horizontal flips, per batch."""
    x = shift(x, gen)
    flip = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def fit_one_cycle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, steps: int,
                  augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                  device: torch.device = torch.device("cpu"), name: str = "") -> nn.Module:
    """SGD (momentum 0.9, nesterov, weight decay 5e-4), one-cycle to lr 0.05 (15% warm-up), batch 128,
    ``steps`` steps over shuffled epochs of ``(x, y)``, each batch through ``augment``; ``model`` is on
    ``device``, the data moves there batch by batch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps, pct_start=0.15)
    t0 = time.perf_counter()
    model.train()
    order = torch.cat([torch.randperm(len(x), generator=gen) for _ in range(-(-steps * 128 // len(x)))])
    for i, idx in enumerate(order[: steps * 128].split(128)):
        loss = F.cross_entropy(model(augment(x[idx], gen).to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if name and i % 20 == 0:
            log.info("%s step %d/%d loss %.3f (%.0fs)", name, i, steps, loss.item(), time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model


def train_image_teacher(name: str, seed: int = 0, steps: int | None = None,
                        limit: int | None = None) -> tuple[nn.Module, dict[str, float]]:
    """Train ``IMAGE_TEACHERS[name]`` on Fashion-MNIST's training split (on a GPU where there is one);
    returns the model, on the CPU, and its figures."""
    steps = steps or IMAGE_STEPS[name]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = IMAGE_TEACHERS[name]
    x, y = fashion_inputs("train", spec.input_shape[0])
    if limit:
        x, y = x[:limit], y[:limit]
    torch.manual_seed(seed)
    model = create_model(spec.arch, input_shape=spec.input_shape, num_classes=spec.num_classes,
                         **spec.kwargs()).to(dev)
    t0 = time.perf_counter()
    fit_one_cycle(model, x, y, seed, steps, _augment, dev, name)
    seconds = time.perf_counter() - t0
    xt, yt = fashion_inputs("test", spec.input_shape[0])
    figures = {"train_seconds": seconds, "test_accuracy": accuracy(model, xt, yt), "steps": steps, "batch": 128,
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "torch_threads": torch.get_num_threads()}
    log.info("%s teacher: %.4f test accuracy after %.0fs", name, figures["test_accuracy"], seconds)
    return model.cpu().eval(), figures


def image_teacher(name: str, seed: int = 0) -> tuple[Path, ModelSpec]:
    """The cached teacher file for ``name`` (trained on first use; training time and test accuracy are in the
    file's metadata and in ``<file>.json``) and its spec."""
    import json

    spec = IMAGE_TEACHERS[name]
    path = CACHE / f"{name}-seed{seed}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        model, figures = train_image_teacher(name, seed)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={k: str(v) for k, v in figures.items()})
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps({"spec": spec.model_dump(mode="json"), **figures}, indent=2))
    load_teacher(path, spec)  # the same checks a user's upload gets
    return path, spec


def onnx_teacher(name: str, seed: int = 0) -> Path:
    """``image_teacher(name)`` exported to ONNX (weights inside the file: ``external_data=False``), cached."""
    path = CACHE / f"{name}-seed{seed}.onnx"
    if not path.exists():
        source, spec = image_teacher(name, seed)
        model = load_teacher(source, spec)
        tmp = path.with_suffix(".tmp.onnx")
        torch.onnx.export(model, (torch.zeros(1, *spec.input_shape),), str(tmp), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          external_data=False)
        tmp.replace(path)
    return path
