"""Measured latency: of one layer before and after factorization, and of a whole model.

A Tucker-2 layer is three kernels where the conv it replaces was one, and is often *slower*, especially at
batch 1 and on GPUs (../shared/REFERENCE.md). So the plan keeps a factorization only where it measured
not slower, and the manifest reports latency next to parameters. Timings are medians of repeated runs
after a warm-up, synchronized on CUDA, within a time budget per measurement.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from kegnet.errors import Cancelled

BATCHES = (1, 64)  # what the manifest reports: one request at a time, and a throughput batch
CancelCheck = Callable[[], bool] | None


def _stop_if(should_cancel: CancelCheck) -> None:
    """Timings run up to ``latency_budget_s`` each: a cancelled job must not wait for them."""
    if should_cancel is not None and should_cancel():
        raise Cancelled("cancelled while timing the model")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def median_seconds(fn: Callable[[], object], device: torch.device, *, repeats: int = 15,
                   budget_s: float = 2.0, warmup: int = 2, should_cancel: CancelCheck = None) -> float:
    """Median wall time of ``fn()`` over up to ``repeats`` runs (at least 3) within about ``budget_s``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        _stop_if(should_cancel)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def layer_input_shapes(model: nn.Module, names: list[str], input_shape: tuple[int, ...],
                       device: torch.device) -> dict[str, tuple[int, ...]]:
    """The shape of each named layer's input for one sample of ``input_shape`` (batch dimension dropped)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def keep(name: str):  # noqa: ANN202 - a hook closure; it must return None (else it replaces the input)
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names]
    was_training = model.training
    try:
        model.eval()(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


def module_latency_ms(module: nn.Module, input_shape: tuple[int, ...], batch: int, device: torch.device, *,
                      repeats: int = 15, budget_s: float = 2.0, should_cancel: CancelCheck = None) -> float:
    """Median milliseconds of ``module`` on a batch of ``batch`` random inputs of ``input_shape``."""
    was_training = module.training
    module.eval()
    x = torch.randn(batch, *input_shape, device=device)
    try:
        return 1e3 * median_seconds(lambda: module(x), device, repeats=repeats, budget_s=budget_s,
                                    should_cancel=should_cancel)
    finally:
        module.train(was_training)


@torch.no_grad()
def compare_ms(first: nn.Module, second: nn.Module, input_shape: tuple[int, ...], batch: int,
               device: torch.device, *, repeats: int = 15, budget_s: float = 2.0,
               should_cancel: CancelCheck = None) -> dict[str, float]:
    """Time two modules on the same random batch, alternating runs so that both see the same machine.

    Returns the median and the minimum milliseconds of each (``first_ms``, ``first_min_ms``, ``second_ms``,
    ``second_min_ms``). The minimum is the least disturbed by other processes: decisions use it. ``spread``
    is how far the medians sit above the minimums (relative, the larger of the two): near 0 on a quiet
    machine, large when other processes interfere.
    """
    was = first.training, second.training
    first.eval()
    second.eval()
    x = torch.randn(batch, *input_shape, device=device)
    try:
        for _ in range(2):
            first(x)
            second(x)
        _sync(device)
        times: tuple[list[float], list[float]] = ([], [])
        start = time.perf_counter()
        while len(times[0]) < repeats and (len(times[0]) < 3 or time.perf_counter() - start < budget_s):
            _stop_if(should_cancel)
            for module, kept in ((first, times[0]), (second, times[1])):
                t0 = time.perf_counter()
                module(x)
                _sync(device)
                kept.append(time.perf_counter() - t0)
    finally:
        first.train(was[0])
        second.train(was[1])
    spread = max(statistics.median(t) / max(min(t), 1e-12) - 1.0 for t in times)
    return {"first_ms": 1e3 * statistics.median(times[0]), "first_min_ms": 1e3 * min(times[0]),
            "second_ms": 1e3 * statistics.median(times[1]), "second_min_ms": 1e3 * min(times[1]), "spread": spread}


def model_latency(model: nn.Module, input_shape: tuple[int, ...], device: torch.device, *,
                  batches: tuple[int, ...] = BATCHES, repeats: int = 15, budget_s: float = 2.0,
                  should_cancel: CancelCheck = None) -> dict[str, float]:
    """``{"batch1_ms": ..., "batch64_ms": ...}``: median milliseconds per forward pass of the whole model."""
    return {f"batch{b}_ms": module_latency_ms(model, input_shape, b, device, repeats=repeats, budget_s=budget_s,
                                             should_cancel=should_cancel)
            for b in batches}


__all__ = ["BATCHES", "compare_ms", "layer_input_shapes", "median_seconds", "model_latency", "module_latency_ms"]
