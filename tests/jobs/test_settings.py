"""The settings' defaults: the library's bounds, and cost limits that admit real workloads (kegnet/cost.py)."""

from __future__ import annotations

import pytest

from jobs.settings import Settings
from kegnet.config import PRESETS
from kegnet.cost import check_cost, estimate_cost, profile_model
from kegnet.models import create_model


def test_the_sample_cap_defaults_to_the_library_bound() -> None:
    from kegnet.evaluation import DEFAULT_MAX_SAMPLES

    assert Settings.model_fields["max_eval_samples"].default == DEFAULT_MAX_SAMPLES


def _check_under_defaults(cost) -> None:
    defaults = Settings()
    check_cost(cost, max_memory_bytes=defaults.max_job_memory_bytes, max_macs=int(defaults.max_job_macs))


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_defaults_admit_both_presets_on_a_224px_resnet18(preset: str) -> None:
    shape = (3, 224, 224)
    teacher = create_model("torchvision:resnet18", input_shape=shape, num_classes=1000)
    _check_under_defaults(estimate_cost(profile_model(teacher, shape), shape, 1000, PRESETS[preset]))


def test_defaults_admit_every_bench_scenario() -> None:
    """Every scenario x setting x method as bench builds it, with a stand-in teacher at least as large as any
    of theirs (a torchvision ResNet-18 at 3x32x32; their inputs are 1x32x32, 3x32x32 or 16 features)."""
    from bench.__main__ import make_config
    from bench.scenarios import SCENARIOS

    shape = (3, 32, 32)
    profile = profile_model(create_model("torchvision:resnet18", input_shape=shape, num_classes=10), shape)
    checked = 0
    for scenario in SCENARIOS.values():
        teachers = 3 if "ensemble" in scenario.about or scenario.teachers_of else 1
        for setting in scenario.settings:
            for method in scenario.methods:
                config = make_config(scenario, setting, method, scale=1.0)
                _check_under_defaults(estimate_cost(profile, shape, 10, config, teachers))
                checked += 1
    assert checked > 30


