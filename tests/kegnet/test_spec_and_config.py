import pytest
from pydantic import ValidationError

from kegnet import ClassifierConfig, ModelSpec


@pytest.mark.parametrize("shape", [(0,), (1, 2), (1, 2, 3, 4), (1, 2000, 2000), (64, 32, 32)])
def test_input_shape_bounds(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValidationError):
        ModelSpec(arch="mlp", input_shape=shape, num_classes=10)


def test_arch_name_is_a_plain_identifier() -> None:
    with pytest.raises(ValidationError):
        ModelSpec(arch="../../etc/passwd", input_shape=(4,), num_classes=2)


@pytest.mark.parametrize("override", [
    {"generator": {"steps": 10**9}}, {"generator": {"batch_size": 1}}, {"distill": {"lr": -1}},
    {"compression": {"rank_method": "explicit"}}, {"method": "magic"}, {"unknown": 1},
])
def test_config_rejects_out_of_bounds(override: dict) -> None:
    with pytest.raises(ValidationError):
        ClassifierConfig.from_preset("fast", **override)


def test_paper_preset_matches_the_paper() -> None:
    cfg = ClassifierConfig.from_preset("paper")
    g = cfg.generator
    assert (g.num_generators, g.steps, g.batch_size, g.lr, g.alpha, g.beta, g.noise_dim) == (5, 20_000, 256, 1e-3,
                                                                                             1.0, 0.0, 10)
    assert g.teacher_mode == "train" and cfg.distill.transfer == "fixed"
    assert (g.smoothness, g.activation, g.batchnorm_prior) == (0.0, 0.0, 0.0)  # the paper's loss, nothing added
    assert cfg.distill.samples_per_generator == 6400


def test_recipes_must_fit_the_method() -> None:
    with pytest.raises(ValueError, match="need method 'kegnet'"):
        ClassifierConfig(method="gaussian", distill={"recipes": [{"codes": "pairs"}]})
    with pytest.raises(ValueError, match="not tucker-only"):
        ClassifierConfig(method="tucker-only", distill={"recipes": [{"source": "gaussian"}]})
    with pytest.raises(ValueError, match="twice"):
        ClassifierConfig(distill={"recipes": [{"source": "gaussian"}, {"source": "gaussian"}]})
    with pytest.raises(ValueError):
        ClassifierConfig(distill={"recipes": [{"source": "gaussian"}] * 13})
    assert [r.name for r in ClassifierConfig(method="uniform").candidate_recipes(True, 10)] == ["uniform"]
    assert ClassifierConfig(method="tucker-only").candidate_recipes(False, 3) == []
    one = ClassifierConfig(distill={"label_codes": "pairs", "noise_share": 0.25}).candidate_recipes(True, 3)
    assert [r.name for r in one] == ["kegnet/pairs+noise0.25"]
