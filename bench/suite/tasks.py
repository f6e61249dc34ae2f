"""Real classification tasks for the suite: UCI, scikit-learn's bundled sets, MNIST and Fashion-MNIST, and
harder variants made from the same data (fewer or more classes, permuted pixels, imbalanced classes).

Every task is ``(x_train, y_train, x_test, y_test)``: float inputs as the teacher sees them, int64 labels from
0. Splits are fixed (seed 0) so that a cached teacher and its test set always match.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bench.datasets import load_image_split, load_uci_split, shared_dir

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _split(x: np.ndarray, y: np.ndarray, test_share: float = 0.2) -> Split:
    """A fixed stratification-free 80/20 split, features z-scored with the training rows' statistics."""
    perm = np.random.default_rng(0).permutation(len(x))
    n_test = round(len(x) * test_share)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-8
    xt = torch.from_numpy((x - mean) / std).float()
    yt = torch.from_numpy(y).long()
    return xt[train], yt[train], xt[test], yt[test]


def uci(name: str) -> Split:
    """pendigits and statlog-shuttle have fixed train/test files; letter has one file, split here."""
    if name == "letter":
        rows = np.loadtxt(shared_dir() / "datasets" / "letter" / "letter_R.dat", skiprows=1)
        return _split(rows[:, 1:-1], rows[:, -1].astype(np.int64))
    return (*load_uci_split(name, "train"), *load_uci_split(name, "test"))


def sklearn_set(name: str) -> Split:
    """scikit-learn's bundled sets large enough to test on: digits (1,797 rows, 8×8 as 64 features, 10
    classes) and breast_cancer (569 rows, 30 features, 2 classes)."""
    from sklearn import datasets

    data = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}[name]()
    return _split(np.asarray(data.data, dtype=np.float64), np.asarray(data.target, dtype=np.int64))


def images(name: str) -> Split:
    """MNIST or Fashion-MNIST as the paper's teachers see them: (N, 1, 32, 32), normalized."""
    return (*load_image_split(name, "train"), *load_image_split(name, "test"))


def imbalanced(task: Split, decay: float) -> Split:
    """Class c keeps a share ``decay**c`` of its training rows (class 0 all of them); the test set is as is,
    so the teacher is scored on every class."""
    x, y, xt, yt = task
    keep = torch.rand(len(y), generator=torch.Generator().manual_seed(0)) < decay ** y.double()
    return x[keep], y[keep], xt, yt


def first_classes(task: Split, k: int) -> Split:
    """Only classes 0..k-1, in train and test."""
    x, y, xt, yt = task
    return x[y < k], y[y < k], xt[yt < k], yt[yt < k]


def permuted(task: Split) -> Split:
    """One fixed random permutation of the pixels: no spatial structure left for an image prior to use."""
    x, y, xt, yt = task
    perm = torch.randperm(x[0].numel(), generator=torch.Generator().manual_seed(0))
    return (x.flatten(1)[:, perm].view_as(x), y, xt.flatten(1)[:, perm].view_as(xt), yt)


def rgb(task: Split) -> Split:
    """Grey images replicated to 3 channels (N, 3, H, W): what a torchvision net, built for colour, takes."""
    x, y, xt, yt = task
    return x.expand(-1, 3, -1, -1).contiguous(), y, xt.expand(-1, 3, -1, -1).contiguous(), yt


def merged(a: Split, b: Split) -> Split:
    """Two 10-class image tasks as one 20-class task (b's classes after a's)."""
    offset = int(a[1].max()) + 1
    return (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1] + offset]),
            torch.cat([a[2], b[2]]), torch.cat([a[3], b[3] + offset]))


TASKS: dict[str, Callable[[], Split]] = {
    "pendigits": lambda: uci("pendigits"),
    "letter": lambda: uci("letter"),
    "shuttle": lambda: uci("statlog-shuttle"),
    "digits": lambda: sklearn_set("digits"),
    "breast-cancer": lambda: sklearn_set("breast_cancer"),
    "pendigits-imbalanced": lambda: imbalanced(uci("pendigits"), 0.7),
    "mnist": lambda: images("mnist"),
    "fashion": lambda: images("fashion-mnist"),
    "fashion-rgb": lambda: rgb(images("fashion-mnist")),
    "mnist-5class": lambda: first_classes(images("mnist"), 5),
    "mnist-permuted": lambda: permuted(images("mnist")),
    "mnist-imbalanced": lambda: imbalanced(images("mnist"), 0.7),
    "mnist+fashion": lambda: merged(images("mnist"), images("fashion-mnist")),
}
