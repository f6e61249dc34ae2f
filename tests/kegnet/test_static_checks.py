"""Issue 20's probes: each is refused by ``preflight.check_static`` (what the API runs) within 10 s and
+300 MB of RSS, without building a real model or running the upload."""

from __future__ import annotations

import json
import resource
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kegnet import ModelSpec
from kegnet.config import ClassifierConfig
from kegnet.errors import KegnetError
from kegnet.preflight import Limits, check_static

# The service's defaults (jobs.settings.Settings).
LIMITS = Limits(max_parameters=200_000_000, max_bytes=200 * 1024 * 1024, max_memory_bytes=64 * 1024 ** 3,
                max_macs=int(5e17))
MAX_SECONDS, MAX_RSS_MB = 10.0, 300.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def refused(fn: Callable[[], Any], needle: str) -> tuple[float, float]:
    """Run ``fn``, expect a ``KegnetError`` containing ``needle``; returns (seconds, peak RSS growth MB)."""
    before, t0 = _peak_mb(), time.perf_counter()
    with pytest.raises(KegnetError) as info:
        fn()
    seconds, grown = time.perf_counter() - t0, _peak_mb() - before
    assert needle in str(info.value), str(info.value)
    assert seconds < MAX_SECONDS and grown < MAX_RSS_MB, (seconds, grown)
    print(f"refused in {seconds:.2f} s, +{grown:.0f} MB peak RSS: {str(info.value)[:120]}")
    return seconds, grown


def _config() -> ClassifierConfig:
    return ClassifierConfig()


def _static(path: Path, model: dict[str, Any], limits: Limits = LIMITS) -> Callable[[], Any]:
    return lambda: check_static([path], ModelSpec.model_validate(model), _config(), limits)


def _graph(nodes: list[Any], name: str = "g", functions: list[Any] | None = None) -> onnx.ModelProto:
    """``y = x + s`` (x (N, 3)) where ``s`` is what ``nodes`` compute from nothing."""
    nodes = [*nodes, helper.make_node("Add", ["x", "s"], ["y"])]
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                             functions=functions or [])


def _constant(name: str, values: list[int]) -> Any:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, dtype=np.int64)))


def _fill(shape: str, out: str) -> Any:
    return helper.make_node("ConstantOfShape", [shape], [out],
                            value=numpy_helper.from_array(np.array([1.0], dtype=np.float32)))


def test_onnx_chained_matmuls_are_priced_and_refused(tmp_path: Path) -> None:
    nodes = [_constant("shape", [4000, 4000]), _fill("shape", "m0")]
    nodes += [helper.make_node("MatMul", [f"m{i}", f"m{i}"], [f"m{i + 1}"]) for i in range(40)]
    nodes += [helper.make_node("ReduceSum", ["m40"], ["s"], keepdims=0)]
    path = tmp_path / "chain.onnx"
    path.write_bytes(_graph(nodes).SerializeToString())
    assert path.stat().st_size < 2_000
    refused(_static(path, {"arch": "onnx"}), "this job would need about")  # 2.6e12 MACs, 6.6e8 activations


def test_onnx_constant_of_shape_of_1e9_floats_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fill.onnx"
    path.write_bytes(_graph([_constant("shape", [10 ** 9]), _fill("shape", "big"),
                             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0)]).SerializeToString())
    refused(_static(path, {"arch": "onnx"}), "1,000,000,000 elements")


def test_onnx_fill_of_a_size_only_a_run_tells_is_refused(tmp_path: Path) -> None:
    """The fill's size comes from data (the input's values): unknown statically, so refused."""
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0), helper.make_node("Cast", ["m"], ["n"], to=7),
             helper.make_node("Reshape", ["n", "one"], ["shape"]), _fill("shape", "big"),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0)]
    model = _graph(nodes)
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "one"))
    path = tmp_path / "dyn.onnx"
    path.write_bytes(model.SerializeToString())
    refused(_static(path, {"arch": "onnx"}), "only running the graph would tell")


def _external_in_function(location: str) -> onnx.ModelProto:
    tensor = numpy_helper.from_array(np.zeros(3, dtype=np.float32), "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "12")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    body = [helper.make_node("Constant", [], ["w"], value=tensor), helper.make_node("Identity", ["w"], ["out"])]
    fn = helper.make_function("local", "F", [], ["out"], body, [helper.make_opsetid("", 17)])
    return _graph([helper.make_node("F", [], ["s"], domain="local")], functions=[fn])


def test_onnx_external_data_in_a_local_function_says_the_same_for_any_path(tmp_path: Path) -> None:
    exists = tmp_path / "secret.bin"
    exists.write_bytes(bytes(12))
    messages = []
    for location in (str(exists), str(tmp_path / "missing.bin"), "secret.bin"):
        path = tmp_path / "ext.onnx"
        path.write_bytes(_external_in_function(location).SerializeToString())
        with pytest.raises(KegnetError, match="external data") as info:
            _static(path, {"arch": "onnx"})()
        messages.append(str(info.value))
    assert len(set(messages)) == 1, messages


def test_timm_vit_of_16384_tokens_is_refused_by_its_cost(tmp_path: Path) -> None:
    """Right keys and shapes (a ViT-Tiny's, 23 MB), 16,384 tokens: attention dominates, and is priced now."""
    from safetensors.torch import save_file

    from kegnet.models.registry import build_on_meta

    model = {"arch": "timm:vit_tiny_patch16_224", "input_shape": [3, 256, 256], "num_classes": 10,
             "arch_kwargs": {"img_size": 256, "patch_size": 2}}
    meta = build_on_meta(model["arch"], input_shape=(3, 256, 256), num_classes=10, **model["arch_kwargs"])
    path = tmp_path / "vit.safetensors"
    save_file({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in meta.state_dict().items()}, str(path))
    refused(_static(path, model), "this job would need about")


def test_big_beit_with_wrong_keys_is_refused_without_building_it(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pt"
    torch.save({"not.a.key": torch.zeros(16)}, path)
    assert path.stat().st_size < 2_000
    model = {"arch": "timm:beit_base_patch16_224", "input_shape": [3, 512, 512], "num_classes": 10,
             "arch_kwargs": {"img_size": 512, "patch_size": 8}}
    # 87.5 M parameters and 201 M buffer elements: under the library's default cap of 400 M, so the keys decide
    refused(_static(path, model, Limits(max_parameters=400_000_000, max_bytes=LIMITS.max_bytes)), "missing keys")
    refused(_static(path, model), "buffers take memory too")  # the service's 200 M: the buffers decide


def test_beit_buffers_count_against_the_parameter_cap(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pt"
    torch.save({"not.a.key": torch.zeros(16)}, path)
    model = {"arch": "timm:beit_base_patch16_224", "input_shape": [3, 512, 512], "num_classes": 10,
             "arch_kwargs": {"img_size": 512, "patch_size": 4}}
    refused(_static(path, model), "buffers take memory too")


def test_expanded_stride_zero_tensors_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "expanded.pt"
    state = {"layers.0.weight": torch.zeros(1).expand(8192, 8192), "layers.0.bias": torch.zeros(1).expand(8192)}
    torch.save(state, path)
    assert path.stat().st_size < 3_000
    model = {"arch": "mlp", "input_shape": [8192], "num_classes": 8192, "arch_kwargs": {"hidden": []}}
    refused(_static(path, model), "view of a storage")


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_safetensors_header_of_100_mib_is_refused(tmp_path: Path) -> None:
    body = b"{" + b",".join(b'"k%d":{}' % i for i in range(20)) + b"}"
    header = body + b" " * (100 * 1024 * 1024 - len(body))
    path = _safetensors(tmp_path / "huge.safetensors", header)
    refused(_static(path, {"arch": "mlp", "input_shape": [8], "num_classes": 3}), "above the limit of 16,777,216")


def test_safetensors_with_too_many_zero_size_tensors_is_refused(tmp_path: Path) -> None:
    entries = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(70_000)}
    header = json.dumps(entries).encode()
    assert len(header) < 16 * 1024 * 1024
    path = _safetensors(tmp_path / "many.safetensors", header)
    refused(_static(path, {"arch": "mlp", "input_shape": [8], "num_classes": 3}), "more than 65,536 tensors")


def test_a_good_upload_passes_and_is_priced(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from kegnet import create_model

    model = create_model("mlp", input_shape=(8,), num_classes=3, hidden=[16])
    path = tmp_path / "good.safetensors"
    save_file(model.state_dict(), str(path))
    spec, cost = check_static([path], ModelSpec(arch="mlp", input_shape=(8,), num_classes=3,
                                                arch_kwargs={"hidden": [16]}), _config(), LIMITS)
    assert spec.input_shape == (8,) and cost.macs > 0 and cost.memory_bytes > 0
