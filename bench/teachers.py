"""Teachers for the benchmarks: the paper's own checkpoints from ../shared, or ones the bench trains itself.

The paper ships no UCI teacher, so the pendigits scenario trains the paper's UCI MLP (11 hidden layers of 100
units, ELU, dropout 0.15; Adam 1e-3, batch 64, early stopping on a validation split) on the real training
split, once per seed, and caches it under bench/results/teachers/.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from bench.datasets import accuracy, load_uci_split
from kegnet import ModelSpec, create_model, load_teacher

log = logging.getLogger(__name__)

CACHE = Path(__file__).parent / "results" / "teachers"


def uci_spec(name: str) -> ModelSpec:
    features, classes = {"pendigits": (16, 10)}[name]
    return ModelSpec(arch="mlp", arch_kwargs={"hidden": [100] * 11, "activation": "elu", "dropout": 0.15},
                     input_shape=(features,), num_classes=classes)


def train_uci_teacher(name: str, seed: int = 0, max_epochs: int = 300, patience: int = 20) -> nn.Module:
    """Train the paper's UCI MLP on ``name``'s training split; the best validation epoch is kept."""
    spec = uci_spec(name)
    x, y = load_uci_split(name, "train")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n_val = len(x) // 10
    val, trn = perm[:n_val], perm[n_val:]
    torch.manual_seed(seed)
    model = create_model(spec.arch, input_shape=spec.input_shape, num_classes=spec.num_classes, **spec.kwargs())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    best, best_state, since, epochs_run = -1.0, None, 0, 0
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
    log.info("%s teacher (seed %d): best validation accuracy %.4f after %d epochs", name, seed, best, epochs_run)
    model.load_state_dict(best_state)
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
