"""Choosing layers and ranks (a ``CompressionPlan``), and applying a plan to a model.

A plan is plain data (layer name, kind, ranks) so it can be written to the manifest and used later to
rebuild the student's structure before loading its weights.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import tensorly as tl
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from kegnet.compression import allocation, latency
from kegnet.compression.evbmf import evbmf_rank
from kegnet.compression.layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from kegnet.config import CompressionConfig
from kegnet.errors import Cancelled, CompressionError, NothingToFactorize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is factorized: ``conv`` by Tucker-2, ``pointwise`` (a 1×1 conv) and ``linear`` by
    truncated SVD, where ``in_rank == out_rank`` is the SVD rank."""

    name: str
    kind: Literal["conv", "pointwise", "linear"]
    in_rank: int
    out_rank: int
    params_before: int
    params_after: int
    # Share of the weight's spectral energy the ranks keep (the worse of the two channel modes; 1.0 = all),
    # None for plans made before it was recorded or on the meta device.
    kept_energy: float | None = None


@dataclass
class CompressionPlan:
    layers: list[LayerPlan] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> why it was left alone

    def to_dict(self) -> dict:
        return {"layers": [asdict(p) for p in self.layers], "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, data: dict) -> CompressionPlan:
        return cls([LayerPlan(**p) for p in data["layers"]], dict(data.get("skipped", {})))


def _factorizable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}


def _fused_attention_projections(model: nn.Module) -> dict[str, str]:
    """Projections inside ``nn.MultiheadAttention``: its fused kernel reads their weights directly, so
    they cannot be swapped for a factorized module (timm's attention uses plain Linears and can)."""
    return {f"{name}.out_proj": "a projection of nn.MultiheadAttention, whose fused kernel reads its weight "
                                "directly; not factorized"
            for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def select_layers(model: nn.Module, patterns: list[str] | None, all_linears: bool = False) -> dict[str, nn.Module]:
    """Layers named by ``patterns`` (exact names or globs). Default: every conv but the first (the stem
    sees raw pixels and is tiny), plus every linear but the classifier head when those linears hold more
    weights than the convs chosen (ViTs, ConvNeXts, MLPs: there the weights are in the linears) or when
    ``all_linears`` (an allocation that leaves whole what costs most, so more candidates cannot starve one)."""
    candidates = _factorizable(model)
    if patterns is None:
        convs = [n for n, m in candidates.items() if isinstance(m, nn.Conv2d)][1:]
        linears = [n for n, m in candidates.items() if isinstance(m, nn.Linear)][:-1]
        weight = lambda names: sum(candidates[n].weight.numel() for n in names)  # noqa: E731
        names = set(convs) | (set(linears) if all_linears or weight(linears) > weight(convs) else set())
        return {n: m for n, m in candidates.items() if n in names}
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise CompressionError(
                f"layer pattern {pattern!r} matches no Conv2d or Linear layer; "
                f"layers are: {', '.join(candidates) or 'none'}"
            )
        chosen.update((n, candidates[n]) for n in hits)
    return {n: candidates[n] for n in candidates if n in chosen}  # keep model order


def _conv_params(conv: nn.Conv2d, r_in: int, r_out: int) -> int:
    g, k = conv.groups, int(np.prod(conv.kernel_size))
    bias = conv.out_channels if conv.bias is not None else 0
    return conv.in_channels * r_in + g * r_in * r_out * k + r_out * conv.out_channels + bias


def _linear_params(linear: nn.Linear, r: int) -> int:
    return linear.in_features * r + r * linear.out_features + (linear.out_features if linear.bias is not None else 0)


def _pointwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)


def _pointwise_params(conv: nn.Conv2d, r: int) -> int:
    bias = conv.out_channels if conv.bias is not None else 0
    return (conv.in_channels + conv.out_channels) * r + bias


def _classes(model: nn.Module) -> int:
    """The classifier's output count: its last ``nn.Linear``'s outputs (1 where it has none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 1


def _grid_params(m: nn.Module, r_in: np.ndarray, r_out: np.ndarray) -> np.ndarray:
    """Parameters after factorizing ``m`` at arrays of ranks (elementwise; ``r_out`` unused for one rank)."""
    if _pointwise(m):
        return _pointwise_params(m, r_in)
    return _conv_params(m, r_in, r_out) if isinstance(m, nn.Conv2d) else _linear_params(m, r_in)


def _full_ranks(m: nn.Module) -> tuple[int, int]:
    if _pointwise(m):
        full = min(m.in_channels, m.out_channels) // m.groups
        return full, full
    if isinstance(m, nn.Conv2d):
        return m.in_channels // m.groups, m.out_channels // m.groups
    full = min(m.in_features, m.out_features)
    return full, full


def _evbmf_ranks(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        r = max(1, evbmf_rank(m.weight.detach().cpu().double().numpy()))
        return r, r
    if _pointwise(m):
        r = max(1, evbmf_rank(m.weight.detach().cpu().double().numpy()[: m.out_channels // m.groups, :, 0, 0]))
        return r, r
    w = m.weight.detach().cpu().double().numpy()[: m.out_channels // m.groups]  # first group
    # Clamped to 1: EVBMF returns 0 for untrained or tiny layers.
    return max(1, evbmf_rank(tl.unfold(w, 1))), max(1, evbmf_rank(tl.unfold(w, 0)))


def _fraction_ranks(m: nn.Module, fraction: float) -> tuple[int, int]:
    full_in, full_out = _full_ranks(m)
    if isinstance(m, nn.Linear) or _pointwise(m):
        r = max(1, int(full_in * fraction))
        return r, r
    return max(1, int(full_in * fraction)), max(1, int(full_out * fraction))


def _layer_plan(name: str, m: nn.Module, r_in: int, r_out: int) -> LayerPlan:
    full_in, full_out = _full_ranks(m)
    r_in, r_out = min(r_in, full_in), min(r_out, full_out)
    before = sum(p.numel() for p in m.parameters())
    if _pointwise(m):
        return LayerPlan(name, "pointwise", r_in, r_in, before, _pointwise_params(m, r_in))
    if isinstance(m, nn.Conv2d):
        return LayerPlan(name, "conv", r_in, r_out, before, _conv_params(m, r_in, r_out))
    return LayerPlan(name, "linear", r_in, r_in, before, _linear_params(m, r_in))


def blas_threads() -> contextlib.AbstractContextManager:
    """numpy's BLAS (the SVDs of EVBMF and Tucker) limited to torch's thread count: on a busy CPU its own
    default of one thread per core made decompositions 10-25x slower."""
    return threadpool_limits(limits=torch.get_num_threads())


def plan_compression(model: nn.Module, config: CompressionConfig) -> CompressionPlan:
    """Choose layers and ranks for ``model`` following ``config``."""
    with blas_threads():
        return _plan_compression(model, config)


def needs_weights(config: CompressionConfig) -> bool:
    """Whether the ranks depend on the weights' values (EVBMF, or the spectra of the balanced and global
    allocations)."""
    return config.rank_method == "evbmf" or (config.rank_method == "ratio" and config.allocation != "uniform")


def check_layers(model: nn.Module, config: CompressionConfig) -> None:
    """What a plan checks without reading any weight (``model`` may be on the meta device): the layers named
    exist and some can be factorized; with ranks that need no weights, the whole plan."""
    if needs_weights(config):
        _compressible(model, config, CompressionPlan())
    else:
        plan_compression(model, config)


def _compressible(model: nn.Module, config: CompressionConfig, plan: CompressionPlan) -> dict[str, nn.Module]:
    """The selected layers that can be factorized; the others go to ``plan.skipped`` with the reason."""
    layers: dict[str, nn.Module] = {}
    if config.layers is None:
        plan.skipped.update(_fused_attention_projections(model))
    # The global allocation may take the reduction from a small linear (LeNet-5's fc1) and leave a conv whole.
    all_linears = config.rank_method == "ratio" and config.allocation == "global"
    for name, m in select_layers(model, config.layers, all_linears).items():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.in_channels // m.groups == 1:
            plan.skipped[name] = "depthwise convolution: one input channel per group leaves nothing to factorize"
        elif isinstance(m, nn.Conv2d) and m.padding_mode != "zeros" and m.groups > 1:
            plan.skipped[name] = "grouped convolution with non-zero padding mode is not supported"
        else:
            layers[name] = m
    if not layers:
        raise NothingToFactorize("no layer can be compressed; name Conv2d or Linear layers in 'layers'")
    return layers


def _plan_compression(model: nn.Module, config: CompressionConfig) -> CompressionPlan:
    plan = CompressionPlan()
    layers = _compressible(model, config, plan)
    on_meta = any(p.is_meta for p in model.parameters())
    tails = {} if on_meta else {name: allocation.energy_tails(m) for name, m in layers.items()}
    for name, (r_in, r_out) in _ranks(model, layers, config, tails).items():
        layer = _layer_plan(name, layers[name], r_in, r_out)
        if name in tails:
            layer = replace(layer, kept_energy=allocation.kept_energy(tails[name], layer.in_rank, layer.out_rank))
        if layer.params_after >= layer.params_before and _allocated_globally(config):
            plan.skipped[name] = ("left whole by the global allocation: the other layers lose less energy for the "
                                  "parameters it would save")
        elif layer.params_after >= layer.params_before:
            plan.skipped[name] = (f"ranks ({layer.in_rank}, {layer.out_rank}) would not reduce its "
                                  f"{layer.params_before} parameters")
        else:
            plan.layers.append(layer)
    if not plan.layers:
        reasons = [f"{n}: {why}" for n, why in plan.skipped.items()]
        more = f"; and {len(reasons) - 6} more" if len(reasons) > 6 else ""
        raise NothingToFactorize("no layer gets smaller at these ranks; choose lower ranks (rank_method fraction or "
                               f"ratio) or other layers ({'; '.join(reasons[:6])}{more})")
    return plan


def _allocated_globally(config: CompressionConfig) -> bool:
    return config.rank_method == "ratio" and config.allocation == "global"


def _ranks(model: nn.Module, layers: dict[str, nn.Module], config: CompressionConfig,
           tails: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[int, int]]:
    """Every layer's ``(in_rank, out_rank)`` by the config's rank method."""
    if config.rank_method == "evbmf":
        return {name: _evbmf_ranks(m) for name, m in layers.items()}
    if config.rank_method == "fraction":
        return {name: _fraction_ranks(m, config.rank_fraction) for name, m in layers.items()}
    if config.rank_method == "explicit":
        return {name: _explicit_ranks(name, config.ranks) for name in layers}
    try:
        return _ratio_ranks(model, layers, config, tails, whole_model=True)
    except CompressionError:
        if config.target_ratio is not None:
            raise
        # Nobody asked for this ratio: where the layers that can be factorized hold too few of the weights for
        # 2x of the whole model, ask 2x of them (the job warns that the model ratio fell short).
        log.info("the default %gx is out of reach for the whole model; aiming at %gx of the layers factorized",
                 config.ratio, config.ratio)
        return _ratio_ranks(model, layers, config, tails, whole_model=False)


def _ratio_ranks(model: nn.Module, layers: dict[str, nn.Module], config: CompressionConfig,
                 tails: dict[str, tuple[np.ndarray, np.ndarray]], *, whole_model: bool) -> dict[str, tuple[int, int]]:
    """Ranks at ``config.ratio`` for the whole model, or (``whole_model=False``) for ``layers`` alone."""
    if config.allocation != "uniform":
        return _spectral_ranks(model, layers, config.ratio, tails, config.allocation, whole_model=whole_model,
                               floor_classes=config.rank_floor)
    fraction = _fraction_for_ratio(model, layers, config.ratio, whole_model=whole_model)
    return {name: _fraction_ranks(m, fraction) for name, m in layers.items()}


def _spectral_ranks(model: nn.Module, layers: dict[str, nn.Module], target: float,
                    tails: dict[str, tuple[np.ndarray, np.ndarray]], how: str, *, whole_model: bool = True,
                    floor_classes: float) -> dict[str, tuple[int, int]]:
    """Ranks at the target ratio by the layers' spectra (``kegnet.compression.allocation``): every layer
    keeping the same share of its energy (``balanced``), or the least energy lost in all (``global``, no rank
    below ``floor_classes`` times the class count where the target allows, nor below the class count in a layer
    too narrow for that floor)."""
    before = {name: sum(p.numel() for p in m.parameters()) for name, m in layers.items()}
    total = sum(p.numel() for p in model.parameters()) if whole_model else sum(before.values())
    rest = total - sum(before.values())

    def params_of(name: str, r_in: int, r_out: int) -> int | None:
        after = _layer_plan(name, layers[name], r_in, r_out).params_after
        return after if after < before[name] else None

    budget = int(total / target) - rest
    if how == "global":
        classes = _classes(model)
        nominal = max(1, round(floor_classes * classes))

        @functools.cache  # the narrowness test, the floor's bisection and the allocation read the same choices
        def layer_choices(name: str, min_rank: int) -> allocation.Choices:
            m = layers[name]
            return allocation.choices(tails[name], isinstance(m, nn.Linear) or _pointwise(m), before[name],
                                      functools.partial(_grid_params, m), min_rank)

        # A layer too narrow for the floor (no rank at or above it makes the layer smaller) would be forced
        # whole; its floor is the class count instead (ResNet-14's 16-channel convs, docs/benchmarks.md).
        narrow = {name for name in layers if len(layer_choices(name, nominal)[0]) == 1}

        def options_at(floor: int) -> dict[str, allocation.Choices]:
            return {name: layer_choices(name, min(floor, classes) if name in narrow else floor) for name in layers}

        # No rank below the floor, or where that cannot reach the target, the highest floor that can.
        floor = allocation.highest_floor(options_at, nominal, budget)
        ranks = None if floor is None else allocation.global_ranks(options_at(floor), budget)
    else:
        eps = allocation.balanced_eps(tails, before, params_of, budget)
        ranks = None if eps is None else allocation.ranks_at(tails, eps)
    if ranks is None:
        _fraction_for_ratio(model, layers, target, whole_model=whole_model)  # raises with the reachable ratio
        raise CompressionError(f"target ratio {target}x is out of reach by compressing these layers; add layers "
                               "or lower target_ratio")
    return ranks


SLOWER = "factorized it ran slower"


# A layer's timings whose medians sit this far above their fastest runs were disturbed (a busy host): they
# are measured again, and the decision's tolerance widens to the spread that remains.
NOISY_SPREAD = 0.25


def drop_slower_layers(model: nn.Module, plan: CompressionPlan, input_shape: tuple[int, ...],
                       device: torch.device, config: CompressionConfig,
                       should_cancel: Callable[[], bool] | None = None) -> dict[str, dict[str, float]]:
    """Time each planned layer, original and factorized, on ``device``; returns per-layer milliseconds.

    Unless ``config.keep_slower``, a layer whose factorized form is slower than the original at
    ``config.latency_batch`` (beyond ``latency_tolerance`` and ``latency_floor_ms``) is moved from ``plan.layers`` to
    ``plan.skipped`` with the figures. Runs of the two forms alternate, and the decision compares their
    fastest runs (medians are recorded too): other processes only ever add time. The factorized forms
    are timed with random factors (latency does not depend on the values), so no decomposition is
    computed here. Other batch sizes of ``latency.BATCHES`` are recorded too. Timings run under the job's
    torch thread count (recorded as ``threads``); where the decision batch's runs were disturbed (``spread``
    over ``NOISY_SPREAD``) they are taken again and the fastest of both kept (``remeasured``), and the
    tolerance widens to the spread that remains (``tolerance``).
    """
    shapes = latency.layer_input_shapes(model, [p.name for p in plan.layers], input_shape, device)
    timings: dict[str, dict[str, float]] = {}
    kept = []
    for p in plan.layers:
        original = model.get_submodule(p.name)
        factorized = _structure(original, p).to(device)
        row = _time_layer(original, factorized, shapes[p.name], device, config, should_cancel)
        timings[p.name] = row
        b = config.latency_batch
        before, after = row[f"original_batch{b}_min_ms"], row[f"factorized_batch{b}_min_ms"]
        if config.keep_slower or after <= before * (1 + row["tolerance"]) + config.latency_floor_ms:
            kept.append(p)
        else:
            plan.skipped[p.name] = (f"{SLOWER} on {device.type} at batch {config.latency_batch} (fastest runs "
                                    f"{after:.3f} ms vs {before:.3f} ms); set keep_slower to keep it")
    plan.layers = kept
    return timings


def _time_layer(original: nn.Module, factorized: nn.Module, shape: tuple[int, ...], device: torch.device,
                config: CompressionConfig, should_cancel: Callable[[], bool] | None) -> dict[str, float]:
    """One layer's timings, original and factorized, at every batch; the decision batch again if disturbed."""
    row: dict[str, float] = {"threads": float(torch.get_num_threads()), "remeasured": 0.0}
    timing = {"repeats": config.latency_repeats, "budget_s": config.latency_budget_s, "should_cancel": should_cancel}
    for b in sorted({config.latency_batch, *latency.BATCHES}):
        t = latency.compare_ms(original, factorized, shape, b, device, **timing)
        if b == config.latency_batch and t["spread"] > NOISY_SPREAD:
            again = latency.compare_ms(original, factorized, shape, b, device, **timing)
            t = {**again, "first_min_ms": min(t["first_min_ms"], again["first_min_ms"]),
                 "second_min_ms": min(t["second_min_ms"], again["second_min_ms"]),
                 "spread": min(t["spread"], again["spread"])}
            row["remeasured"] = 1.0
        row |= {f"original_batch{b}_ms": t["first_ms"], f"factorized_batch{b}_ms": t["second_ms"],
                f"original_batch{b}_min_ms": t["first_min_ms"], f"factorized_batch{b}_min_ms": t["second_min_ms"]}
        if b == config.latency_batch:
            row["spread"] = t["spread"]
            row["tolerance"] = max(config.latency_tolerance, t["spread"] if t["spread"] > NOISY_SPREAD else 0.0)
    return row


def replan_ratio(model: nn.Module, plan: CompressionPlan, config: CompressionConfig) -> CompressionPlan:
    """For ``rank_method="ratio"``: solve the ranks again on the layers ``plan`` kept, so that leaving
    slower layers alone does not quietly lower the whole-model ratio; other methods return ``plan``."""
    slower = [n for n, why in plan.skipped.items() if why.startswith(SLOWER)]
    if config.rank_method != "ratio" or not plan.layers or not slower:
        return plan
    try:
        again = plan_compression(model, config.model_copy(update={"layers": [p.name for p in plan.layers]}))
    except CompressionError as exc:
        if config.target_ratio is None:
            # Nobody asked for this ratio: a smaller reduction of faster layers beats a failed job (the job's
            # warnings say the default ratio was not reached).
            log.info("the default target ratio is out of reach with the layers kept (%s); keeping their ranks", exc)
            return plan
        raise CompressionError(f"{len(slower)} layers ran slower factorized and are left alone, so {exc}; or set "
                               "keep_slower") from exc
    again.skipped = {**plan.skipped, **again.skipped}
    return again


def _structure(layer: nn.Module, p: LayerPlan) -> nn.Module:
    """The factorized module for ``p`` with uninitialized factors (shapes only)."""
    if p.kind == "conv":
        return Tucker2Conv2d(layer, p.in_rank, p.out_rank)
    return LowRankConv1x1(layer, p.in_rank) if p.kind == "pointwise" else LowRankLinear(layer, p.in_rank)


def _explicit_ranks(name: str, ranks: dict[str, tuple[int, int]]) -> tuple[int, int]:
    for pattern, pair in ranks.items():
        if pattern == name or fnmatch.fnmatchcase(name, pattern):
            return pair
    raise CompressionError(f"no rank given for layer {name!r}; add it to 'ranks' as [in_rank, out_rank]")


def _fraction_for_ratio(model: nn.Module, layers: dict[str, nn.Module], target: float, *,
                        whole_model: bool = True) -> float:
    """Largest channel fraction (bisection) whose student (or, ``whole_model=False``, whose ``layers``) is at
    least ``target`` times smaller."""
    compressed = sum(p.numel() for m in layers.values() for p in m.parameters())
    total = sum(p.numel() for p in model.parameters()) if whole_model else compressed
    rest = total - compressed

    def ratio(f: float) -> float:
        after = rest + sum(_layer_plan(n, m, *_fraction_ranks(m, f)).params_after for n, m in layers.items())
        return total / after

    if ratio(1e-9) < target:
        raise CompressionError(
            f"target ratio {target}x is out of reach by compressing these layers (at most {ratio(1e-9):.2f}x); "
            "add layers or lower target_ratio"
        )
    lo, hi = 1e-9, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) >= target else (lo, mid)
    return lo


def apply_plan(model: nn.Module, plan: CompressionPlan, *, initialize: bool = True, n_iter_max: int = 100,
               seed: int = 0, should_cancel: Callable[[], bool] | None = None) -> nn.Module:
    """Return a copy of ``model`` with each planned layer replaced by its factorized form.

    ``initialize=False`` builds the structure only (to load a saved student's weights into it).
    ``should_cancel`` is asked between layers (a large Tucker-2 decomposition takes seconds).
    """
    student = copy.deepcopy(model)
    with blas_threads():
        _replace_layers(student, plan, initialize, n_iter_max, seed, should_cancel)
    return student


def _replace_layers(student: nn.Module, plan: CompressionPlan, initialize: bool, n_iter_max: int, seed: int,
                    should_cancel: Callable[[], bool] | None) -> None:
    for p in plan.layers:
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled while factorizing the layers")
        parent_name, _, attr = p.name.rpartition(".")
        parent = student.get_submodule(parent_name) if parent_name else student
        old = getattr(parent, attr)
        if not initialize:
            new = _structure(old, p)
        elif p.kind == "conv":
            new = Tucker2Conv2d.from_conv(old, p.in_rank, p.out_rank, n_iter_max=n_iter_max, seed=seed)
        elif p.kind == "pointwise":
            new = LowRankConv1x1.from_conv(old, p.in_rank)
        else:
            new = LowRankLinear.from_linear(old, p.in_rank)
        setattr(parent, attr, new.to(old.weight.device))
        log.debug("factorized %s with ranks (%d, %d)", p.name, p.in_rank, p.out_rank)
