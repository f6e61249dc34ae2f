"""A large-vocabulary, long-sequence job: its memory has knobs that change it, and the refusal names them."""

from __future__ import annotations

import pytest

from kegnet.config import SequenceJobConfig
from kegnet.cost import GIB, Profile, check_cost, estimate_sequence_cost
from kegnet.errors import SpecError

VOCAB, LENGTH = 65_536, 2_048
# A 30 M-parameter decoder on one full sequence: its MACs and activation elements (order of magnitude).
TEACHER = Profile(parameters=30_000_000, macs=30_000_000 * LENGTH, activations=200 * LENGTH * 512)
LIMITS = {"max_memory_bytes": 64 * GIB, "max_macs": int(1e18)}


def test_the_default_config_is_refused_naming_the_fields_that_lower_it() -> None:
    cost = estimate_sequence_cost(TEACHER, LENGTH, VOCAB, SequenceJobConfig())
    with pytest.raises(SpecError, match=r"GiB of memory in .*; lower config\.sequence\.(generation_batch|batch_size)"):
        check_cost(cost, **LIMITS)


def test_lowering_the_named_fields_brings_it_within_the_limits() -> None:
    config = SequenceJobConfig.model_validate({"sequence": {"generation_batch": 8, "batch_size": 8}})
    cost = estimate_sequence_cost(TEACHER, LENGTH, VOCAB, config)
    check_cost(cost, **LIMITS)
    assert cost.memory_bytes < 64 * GIB
