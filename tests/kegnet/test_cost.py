"""kegnet.cost: a job's peak memory and compute, estimated before it is queued."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kegnet import SpecError
from kegnet.config import PRESETS, ClassifierConfig
from kegnet.cost import GIB, Profile, check_cost, estimate_cost, profile_model
from kegnet.models import create_model

ATTACK = ClassifierConfig.model_validate({"generator": {"num_generators": 16, "batch_size": 2048, "steps": 200_000}})


def test_profile_counts_macs_and_activations() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    assert profile_model(model, (10,)) == Profile(parameters=10 * 20 + 20 + 20 * 3 + 3, macs=10 * 20 + 20 * 3,
                                                  activations=20 + 20 + 3)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    assert profile_model(conv, (2, 8, 8)).macs == 4 * 8 * 8 * 2 * 9 + 4 * 8 * 8 * 5


def test_the_reported_job_is_refused_naming_the_generator_batch() -> None:
    """The issue's job: a 576-parameter teacher on 16x512x512 with 16 generators x batch 2,048 x 200,000 steps."""
    shape = (16, 512, 512)
    teacher = create_model("resnet", input_shape=shape, num_classes=10, depth=8, widths=[2, 2, 2])
    cost = estimate_cost(profile_model(teacher, shape), shape, 10, ATTACK)
    # One generator batch is 2,048 x 16x512x512 floats = 32 GiB; with the teacher's activations, far more.
    assert cost.generator_memory_bytes > 32 * GIB
    with pytest.raises(SpecError, match=r"GiB of memory in generator training, above .* lower "
                                        r"config.generator.batch_size"):
        check_cost(cost, max_memory_bytes=64 * GIB, max_macs=10**30)


def test_distillation_memory_and_compute_name_their_knobs() -> None:
    teacher = Profile(parameters=1000, macs=10**6, activations=10**4)
    noise = ClassifierConfig.model_validate({"method": "gaussian", "distill": {"batch_size": 4096}})
    cost = estimate_cost(teacher, (16, 512, 512), 10, noise)
    assert cost.generator_memory_bytes == 0 and cost.generator_macs == 0
    with pytest.raises(SpecError, match="in distillation, .* lower config.distill.batch_size"):
        check_cost(cost, max_memory_bytes=GIB, max_macs=10**30)
    lenet = create_model("lenet5", input_shape=(1, 32, 32), num_classes=10)
    paper = estimate_cost(profile_model(lenet, (1, 32, 32)), (1, 32, 32), 10, PRESETS["paper"])
    with pytest.raises(SpecError, match="multiply-accumulates, mostly in generator training, .* lower "
                                        "config.generator.steps"):
        check_cost(paper, max_memory_bytes=64 * GIB, max_macs=10**12)
    long_distill = ClassifierConfig.model_validate({"method": "uniform", "distill": {"steps": 500_000}})
    with pytest.raises(SpecError, match="mostly in distillation, .* lower config.distill.steps"):
        check_cost(estimate_cost(teacher, (8,), 3, long_distill), max_memory_bytes=GIB, max_macs=10**12)


def test_cost_grows_with_each_knob() -> None:
    teacher = Profile(parameters=10**5, macs=10**7, activations=10**5)
    base = estimate_cost(teacher, (3, 32, 32), 10, PRESETS["fast"])
    double_batch = ClassifierConfig.from_preset("fast", generator={"batch_size": 512})
    double_steps = ClassifierConfig.from_preset("fast", generator={"steps": 600}, distill={"steps": 3000})
    assert estimate_cost(teacher, (3, 32, 32), 10, double_batch).generator_memory_bytes > (
        1.9 * base.generator_memory_bytes - 4 * 4 * 5 * (10**6 + 120 * 3 * 32 * 32))
    assert estimate_cost(teacher, (3, 32, 32), 10, double_steps).macs == 2 * base.macs
    assert estimate_cost(teacher, (3, 32, 32), 10, PRESETS["fast"], teachers=3).macs > 1.5 * base.macs
    tucker = ClassifierConfig.from_preset("fast", method="tucker-only")
    assert estimate_cost(teacher, (3, 32, 32), 10, tucker).macs == 0
    three = ClassifierConfig.from_preset("fast", distill={"recipes": [{"codes": c} for c in ("one_hot", "pairs",
                                                                                         "sparse")]})
    with_three = estimate_cost(teacher, (3, 32, 32), 10, three)
    assert with_three.distill_macs == 3 * base.distill_macs
    assert with_three.distill_memory_bytes == base.distill_memory_bytes + 4 * 2 * 10**5


def test_vit_attention_is_counted_on_meta_within_10_percent() -> None:
    """A ViT-B at 4,096 patches (+ the class token): every block's qkv, projection and MLP linears
    (12·N·d²) and attention's two matmuls (2·N²·d); the patch embedding and head are small."""
    import timm

    from kegnet.cost import profile_model

    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", num_classes=10, img_size=256, patch_size=4)
    n, d, blocks = 4096 + 1, 768, 12
    expected = blocks * (12 * n * d * d + 2 * n * n * d) + 4096 * d * 3 * 4 * 4
    macs = profile_model(vit, (3, 256, 256)).macs
    assert abs(macs - expected) / expected < 0.10, (macs, expected)
    linear_only = blocks * 12 * n * d * d
    assert macs > 1.8 * linear_only  # attention is ~half the work at this length


def test_profiling_vit_b16_on_meta_is_fast_and_allocates_nothing() -> None:
    import resource
    import time

    import timm

    from kegnet.cost import profile_model

    before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", num_classes=1000)
    profile = profile_model(vit, (3, 224, 224))
    seconds = time.perf_counter() - t0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert 17e9 < profile.macs < 18.5e9 and profile.parameters > 86e6
    assert seconds < 5 and grown_mb < 100, (seconds, grown_mb)  # the real model alone is 346 MB
