"""The decoder-only Transformer: shapes, causality, documented keys, checkpoints, bad specs, the parameter cap."""

from __future__ import annotations

import itertools
import re
import resource
import time

import pytest
import torch
from torch import nn

from kegnet.errors import SpecError
from kegnet.models import create_model, list_models, register_model, registry, transformer
from kegnet.models.transformer import DecoderTransformer

SMALL = {"vocab_size": 23, "max_length": 12, "n_layers": 2, "n_heads": 4, "d_model": 32}


def _model(seed: int = 0, **overrides: object) -> DecoderTransformer:
    torch.manual_seed(seed)
    return DecoderTransformer(**{**SMALL, **overrides}).eval()


def _tokens(b: int, t: int, vocab: int = SMALL["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_registered_as_transformer() -> None:
    assert "transformer" in list_models(task="sequence")
    assert "transformer" not in list_models(task="classify") and "mlp" not in list_models(task="sequence")
    assert registry._REGISTRY["transformer"].task == "sequence"
    with pytest.raises(ValueError, match="already registered"):
        register_model("transformer", task="sequence")(DecoderTransformer)
    with pytest.raises(ValueError, match="unknown task 'vision'"):
        register_model("other", task="vision")


@pytest.mark.parametrize("t", [1, 5, SMALL["max_length"]])
def test_logits_have_shape_batch_time_vocab(t: int) -> None:
    assert _model()(_tokens(3, t)).shape == (3, t, SMALL["vocab_size"])


@pytest.mark.parametrize(("tokens", "match"), [
    (torch.zeros(2, SMALL["max_length"] + 1, dtype=torch.long), "sequence length 13 is outside 1..max_length"),
    (torch.zeros(2, 0, dtype=torch.long), "sequence length 0"),
    (torch.zeros(2, 4), "integer tensor of shape"),
    (torch.zeros(4, dtype=torch.long), "integer tensor of shape"),
])
def test_bad_inputs_are_refused(tokens: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _model()(tokens)


@pytest.mark.parametrize("tie", [True, False])
def test_changing_token_t_leaves_earlier_logits_alone(tie: bool) -> None:
    model = _model(tie_embeddings=tie)
    tokens = _tokens(2, SMALL["max_length"])
    with torch.no_grad():
        base = model(tokens)
        for t in (0, 4, SMALL["max_length"] - 1):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % SMALL["vocab_size"]
            out = model(changed)
            assert torch.equal(out[:, :t], base[:, :t])
            assert not torch.allclose(out[:, t], base[:, t])  # the change does reach position t


def _documented_keys(n_layers: int, tie: bool, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The key table of transformer's module docstring, expanded: ``{i}`` over the layers, ``{weight,bias}``
    to both, symbolic shapes (``3d``, ``F``...) to numbers."""
    table = transformer.__doc__.split("=====\n")[2]  # the rows between the header's rule and the closing one
    rows = re.findall(r"^``([^`]+)``\s+\(([^)]*)\)", table, flags=re.MULTILINE)
    assert rows, "key table not found in the module docstring"
    keys: dict[str, tuple[int, ...]] = {}
    for pattern, shape in rows:
        dims = tuple(int(m[0] or 1) * sizes[m[1]] for m in re.findall(r"(\d*)([VLdF])", shape))
        names = [pattern.replace("{i}", str(i)) for i in range(n_layers)] if "{i}" in pattern else [pattern]
        for name in names:
            group = re.search(r"\{([^}]+)\}", name)
            for leaf in group[1].split(",") if group else [""]:
                keys[name.replace(group[0], leaf) if group else name] = dims
    if tie:
        del keys["head.weight"]  # documented as present only when untied
    return keys


@pytest.mark.parametrize(("tie", "d_ff"), [(True, None), (False, 48)])
def test_state_dict_keys_are_exactly_the_documented_ones(tie: bool, d_ff: int | None) -> None:
    model = _model(tie_embeddings=tie, d_ff=d_ff)
    d = SMALL["d_model"]
    sizes = {"V": SMALL["vocab_size"], "L": SMALL["max_length"], "d": d, "F": d_ff or 4 * d}
    expected = _documented_keys(SMALL["n_layers"], tie, sizes)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == expected


@pytest.mark.parametrize("tie", [True, False])
def test_a_saved_state_dict_loads_into_the_registry_model(tie: bool) -> None:
    kwargs = {k: v for k, v in SMALL.items() if k not in ("vocab_size", "max_length")}
    saved = _model(seed=3, tie_embeddings=tie)
    state = {k: v.clone() for k, v in saved.state_dict().items()}
    torch.manual_seed(4)  # a different initialisation, overwritten by the load
    loaded = create_model("transformer", vocab_size=SMALL["vocab_size"], max_length=SMALL["max_length"],
                          tie_embeddings=tie, **kwargs).eval()
    loaded.load_state_dict(state, strict=True)
    tokens = _tokens(2, SMALL["max_length"])
    with torch.no_grad():
        assert torch.equal(loaded(tokens), saved(tokens))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"d_model": 30, "n_heads": 4}, r"d_model \(30\) must be divisible by n_heads \(4\)"),
    ({"vocab_size": 1}, r"vocab_size must be in 2\.\.65536, got 1"),
    ({"vocab_size": 70_000}, r"vocab_size must be in 2\.\.65536, got 70000"),
    ({"vocab_size": 12.5}, "vocab_size must be an integer, got 12.5"),
    ({"max_length": 0}, r"max_length must be in 1\.\.2048"),
    ({"max_length": 4096}, r"max_length must be in 1\.\.2048"),
    ({"n_layers": 49}, r"n_layers must be in 1\.\.48"),
    ({"n_heads": 0}, r"n_heads must be in"),
    ({"d_model": 8192, "n_heads": 8}, r"d_model must be in 1\.\.4096"),
    ({"d_ff": 0}, r"d_ff must be in"),
    ({"n_layers": True}, "n_layers must be an integer, got True"),
    ({"tie_embeddings": "yes"}, "tie_embeddings must be true or false"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
])
def test_bad_arguments_are_refused_with_the_reason(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DecoderTransformer(**{**SMALL, **kwargs})
    spec = {**SMALL, **kwargs}
    with pytest.raises(SpecError, match="cannot build 'transformer' with these arguments: " + match):
        create_model("transformer", **spec)


def test_unknown_arguments_and_names_are_refused_listing_what_is_accepted() -> None:
    with pytest.raises(SpecError, match="'transformer' does not take argument.s. n_embd; it takes: d_ff, d_model, "
                                        "dropout, n_heads, n_layers, tie_embeddings"):
        create_model("transformer", vocab_size=10, max_length=8, n_embd=64)
    with pytest.raises(SpecError, match="unknown sequence architecture 'gpt9'; available: transformer"):
        create_model("gpt9", vocab_size=10, max_length=8)
    with pytest.raises(SpecError, match="'mlp' is a classifier: give input shape and classes, not vocabulary size "
                                        "and maximum length"):
        create_model("mlp", vocab_size=10, max_length=8)
    with pytest.raises(SpecError, match="'transformer' is a sequence model: give vocabulary size and maximum "
                                        "length, not input shape and classes"):
        create_model("transformer", input_shape=(8,), num_classes=10)


def test_counted_parameters_match_the_built_model() -> None:
    for tie, d_ff in itertools.product([True, False], [None, 40]):
        spec = {**SMALL, "tie_embeddings": tie, "d_ff": d_ff}
        counted = registry.count_model_parameters("transformer", **spec)
        assert counted == sum(p.numel() for p in create_model("transformer", **spec).parameters())
        with pytest.raises(SpecError, match="above this service's limit"):
            create_model("transformer", max_parameters=counted - 1, **spec)


def test_the_cap_counts_on_the_meta_device(monkeypatch: pytest.MonkeyPatch) -> None:
    devices: list[torch.device] = []

    def spy(vocab_size: int, max_length: int, d_model: int) -> nn.Module:
        model = DecoderTransformer(vocab_size, max_length, d_model=d_model)
        devices.append(next(model.parameters()).device)
        return model

    monkeypatch.setitem(registry._REGISTRY, "spy", registry.Entry(spy, "sequence"))
    with pytest.raises(SpecError, match="above this service's limit of 1,000"):
        create_model("spy", vocab_size=10, max_length=8, d_model=16, max_parameters=1_000)
    assert devices == [torch.device("meta")]


def test_the_cap_refuses_a_huge_spec_without_allocating_it() -> None:
    # The largest spec the bounds allow: about 9.9 G parameters (40 GB in float32), only ever counted on meta.
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=r"'transformer' with these arguments has 9,9\d\d,\d{3},\d{3} parameters, "
                                        r"above this service's limit of 400,000,000"):
        create_model("transformer", vocab_size=65_536, max_length=2_048, n_layers=48, n_heads=32, d_model=4_096)
    assert time.perf_counter() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 300 * 1024  # KiB
