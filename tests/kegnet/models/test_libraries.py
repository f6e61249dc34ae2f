"""torchvision and timm architectures: only listed names, only whitelisted bounded arguments, counted first."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from kegnet import ModelSpec, create_model
from kegnet.checkpoint import open_teacher
from kegnet.errors import SpecError
from kegnet.models.registry import build_on_meta, count_model_parameters, model_size

IMG = (3, 32, 32)


@pytest.mark.parametrize("arch", [
    "torchvision:fasterrcnn_resnet50_fpn",  # a detection model: not in the classification registry
    "torchvision:os",
    "torchvision:get_model",
    "torchvision:list_models",
    "timm:not_a_model",
    "timm:resnet18.a1_in1k",  # a pretrained tag: names a download
    "timm:create_model",
])
def test_names_outside_the_registries_are_refused(arch: str) -> None:
    with pytest.raises(SpecError, match=r"unknown (torchvision|timm) model"):
        create_model(arch, input_shape=IMG, num_classes=10)


@pytest.mark.parametrize(("arch", "kwargs"), [
    ("timm:resnet18", {"checkpoint_path": "/etc/passwd"}),
    ("timm:resnet18", {"pretrained": True}),
    ("timm:resnet18", {"pretrained_cfg": "x"}),
    ("timm:resnet18", {"pretrained_cfg_overlay": "x"}),
    ("timm:resnet18", {"in_chans": 3}),
    ("torchvision:resnet18", {"weights": "IMAGENET1K_V1"}),
    ("torchvision:resnet18", {"progress": True}),
])
def test_kwargs_not_whitelisted_are_refused(arch: str, kwargs: dict) -> None:
    key = next(iter(kwargs))
    with pytest.raises(SpecError, match=f"not '{key}'"):
        create_model(arch, input_shape=IMG, num_classes=10, **kwargs)


@pytest.mark.parametrize(("arch", "kwargs", "message"), [
    ("timm:resnet18", {"drop_rate": 1.5}, "drop_rate must be a number in 0.0..0.99"),
    ("timm:resnet18", {"drop_rate": float("nan")}, "drop_rate must be"),
    ("timm:resnet18", {"drop_rate": "0.1"}, "drop_rate must be"),
    ("timm:resnet18", {"drop_rate": True}, "drop_rate must be"),
    ("timm:vit_tiny_patch16_224", {"img_size": 100_000}, "img_size must be an integer"),
    ("timm:vit_tiny_patch16_224", {"patch_size": 2.5}, "patch_size must be an integer"),
    ("timm:vit_tiny_patch16_224", {"patch_size": 0}, "patch_size must be an integer"),
    ("torchvision:mobilenet_v2", {"width_mult": 100.0}, "width_mult must be a number"),
    ("torchvision:mobilenet_v2", {"width_mult": -1}, "width_mult must be a number"),
    ("torchvision:googlenet", {"aux_logits": 1}, "aux_logits must be true or false"),
])
def test_out_of_bound_values_are_refused(arch: str, kwargs: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        create_model(arch, input_shape=IMG, num_classes=10, **kwargs)


def test_torchvision_takes_three_channel_images_only() -> None:
    with pytest.raises(SpecError, match="3,H,W"):
        create_model("torchvision:resnet18", input_shape=(1, 32, 32), num_classes=10)
    model = create_model("timm:resnet18", input_shape=(1, 32, 32), num_classes=10)  # timm: in_chans from the shape
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", [
    "torchvision:../x", "torchvision:", "timm:a.b", "timm:a/b", "os:path", "torchvision:timm:x", "torchvision:Resnet",
    "timm: resnet18", "timm:resnet18;rm", "../../etc/passwd", "torchvision:" + "a" * 65,
])
def test_spec_pattern_refuses_odd_names(arch: str) -> None:
    with pytest.raises(ValidationError):
        ModelSpec(arch=arch, input_shape=IMG, num_classes=10)


def test_spec_pattern_accepts_library_names() -> None:
    for arch in ("torchvision:resnet18", "timm:vit_tiny_patch16_224", "onnx", "lenet5"):
        ModelSpec(arch=arch, input_shape=IMG, num_classes=10)


def test_parameter_cap_refuses_a_huge_model_without_allocating_it() -> None:
    # regnet_y_128gf has 637 M parameters (2.5 GB in float32): counted on the meta device, never built.
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=r"637,\d{3},\d{3} parameters, above this service's limit of 10,000,000"):
        create_model("torchvision:regnet_y_128gf", input_shape=IMG, num_classes=10, max_parameters=10_000_000)
    assert time.perf_counter() - t0 < 15
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 300 * 1024  # KiB: far below 2.5 GB


def test_counted_parameters_match_the_built_model() -> None:
    for arch, kwargs in [("torchvision:resnet18", {}), ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),
                         ("torchvision:regnet_x_400mf", {}), ("timm:regnetx_002", {})]:
        counted = count_model_parameters(arch, input_shape=IMG, num_classes=10, **kwargs)
        # The cap counts buffer elements too (they take memory: issue 20).
        buffers = model_size(build_on_meta(arch, input_shape=IMG, num_classes=10, **kwargs))[1]
        built = create_model(arch, input_shape=IMG, num_classes=10, max_parameters=counted + buffers, **kwargs)
        assert counted == sum(p.numel() for p in built.parameters()) > 0
        assert buffers == sum(b.numel() for b in built.buffers())
        with pytest.raises(SpecError, match="above this service's limit"):
            create_model(arch, input_shape=IMG, num_classes=10, max_parameters=counted + buffers - 1, **kwargs)


def _save_like_timm(model: torch.nn.Module, directory: Path) -> Path:
    """The files ``timm.models.push_to_hub`` uploads, written locally by ``save_for_hf`` (no network)."""
    try:
        from timm.models._hub import save_for_hf

        save_for_hf(model, str(directory), safe_serialization="both")
    except (ImportError, AssertionError):  # huggingface_hub missing: timm's own writer is safetensors' save_file
        directory.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(directory / "model.safetensors"))
    return directory


def test_timm_own_safetensors_loads_as_it_is(tmp_path: Path) -> None:
    spec = ModelSpec(arch="timm:mobilenetv3_small_050", input_shape=IMG, num_classes=7)
    torch.manual_seed(0)
    model = create_model(spec.arch, input_shape=IMG, num_classes=7).eval()
    folder = _save_like_timm(model, tmp_path / "hub")
    x = torch.randn(3, *IMG)
    with torch.no_grad():
        want = model(x)
    files = [folder / "model.safetensors"] + ([folder / "pytorch_model.bin"]
                                              if (folder / "pytorch_model.bin").exists() else [])
    for path in files:
        loaded = open_teacher(path, spec)
        assert loaded.architecture["source"] == "timm" and loaded.architecture["name"] == "mobilenetv3_small_050"
        assert loaded.architecture["library_version"]
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(x), want)
