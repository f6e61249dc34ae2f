"""Readers for the real datasets in ../shared/datasets, with each teacher's exact preprocessing."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The teachers' preprocessing (../shared/teachers/README.md): resize 28→32 bilinear, then normalize.
_NORMALIZATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2856, 0.3385)}


def shared_dir() -> Path:
    """``$KEGNET_SHARED`` or the ``shared`` folder beside the checkout."""
    env = os.environ.get("KEGNET_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_image_split(name: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST or Fashion-MNIST as the paper's teachers see it: ``(N, 1, 32, 32)`` float, ``(N,)`` int64."""
    prefix = "t10k" if split == "test" else "train"
    root = shared_dir() / "datasets" / name
    images = torch.from_numpy(_read_idx(root / f"{prefix}-images-idx3-ubyte.gz").copy()).float().div(255)
    labels = torch.from_numpy(_read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
    images = F.interpolate(images[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    mean, std = _NORMALIZATION[name]
    return (images - mean) / std, labels


def load_uci_split(name: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """A z-scored UCI set (``_R.dat``): ``(N, F)`` float, ``(N,)`` int64 labels from 0."""
    root = shared_dir() / "datasets" / name
    rows = np.loadtxt(root / f"{name}_{split}_R.dat", skiprows=1, dtype=np.float64)
    return torch.from_numpy(rows[:, 1:-1]).float(), torch.from_numpy(rows[:, -1]).long()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = sum(
        (model(xb.to(device)).argmax(1).cpu() == yb).sum().item()
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
    )
    return correct / len(y)
