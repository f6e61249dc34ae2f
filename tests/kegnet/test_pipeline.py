import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kegnet import Cancelled, ModelSpec, load_student, run_pipeline
from kegnet.export import sha256_file
from tests.conftest import tiny_config


@pytest.mark.parametrize("method", ["kegnet", "gaussian", "uniform", "tucker-only"])
def test_every_method_produces_a_loadable_student(tmp_path: Path, small_cnn, small_cnn_spec, method: str) -> None:
    events = []
    result = run_pipeline(small_cnn, small_cnn_spec, tiny_config(method), tmp_path, device="cpu", seed=1,
                          progress=events.append)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["compression_ratio"] > 1 and m["parameters"]["student"] < m["parameters"]["teacher"]
    assert m["macs"]["student"] > 0 and set(m["timings_s"]) == {"load", "plan", "generators", "decompose",
                                                                 "finetune", "export"}
    samples = {"samples.png"} if method == "kegnet" else set()  # what the generators make, for image inputs
    assert set(m["files"]) == {"student.safetensors", "student.pt2", "student.onnx", "curves.png", *samples}
    for name, info in m["files"].items():
        assert sha256_file(tmp_path / name) == info["sha256"]
    assert (m["synthetic_agreement"] is None) == (method == "tucker-only")
    assert "layers1.0.conv1" not in m["plan"]["layers"]  # default: every conv but the first
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and events[-1].stage == "done"

    x = torch.randn(5, *small_cnn_spec.input_shape)
    reloaded = load_student(tmp_path)
    program = torch.export.load(str(tmp_path / "student.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(reloaded(x), result.student(x), atol=1e-6)
        assert torch.allclose(program(x), result.student(x), atol=1e-5)
        assert program(torch.randn(17, *small_cnn_spec.input_shape)).shape == (17, 3)  # dynamic batch


def test_onnx_model_matches_the_student(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    ort = pytest.importorskip("onnxruntime")
    result = run_pipeline(small_cnn, small_cnn_spec, tiny_config("tucker-only"), tmp_path, device="cpu", seed=0)
    session = ort.InferenceSession(str(tmp_path / "student.onnx"))
    assert [i.name for i in session.get_inputs()] == ["x"]
    for batch in (1, 9):  # dynamic batch size
        x = torch.randn(batch, *small_cnn_spec.input_shape)
        (logits,) = session.run(["logits"], {"x": x.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(logits), result.student(x), atol=1e-5)


def test_onnx_is_optional(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    cfg = tiny_config("tucker-only").model_copy(update={"export_onnx": False})
    result = run_pipeline(small_cnn, small_cnn_spec, cfg, tmp_path, device="cpu", seed=0)
    assert "student.onnx" not in result.manifest["files"] and result.manifest["onnx_skipped"] is None


def test_vector_teacher_and_fixed_transfer_set(tmp_path: Path) -> None:
    spec = ModelSpec(arch="mlp", arch_kwargs={"hidden": [32, 32]}, input_shape=(16,), num_classes=10)
    torch.manual_seed(0)
    from kegnet import create_model

    teacher = create_model("mlp", input_shape=(16,), num_classes=10, hidden=[32, 32])
    save_file(teacher.state_dict(), str(tmp_path / "t.safetensors"))
    cfg = tiny_config(distill={"transfer": "fixed"}, compression={"rank_method": "explicit",
                                                                 "ranks": {"*": [5, 5]}})
    result = run_pipeline(tmp_path / "t.safetensors", spec, cfg, tmp_path / "out", device="cpu", seed=0)
    assert [(p["name"], p["in_rank"]) for p in result.manifest["plan"]["layers"]] == [("layers.0", 5),
                                                                                     ("layers.3", 5)]


def test_cancel_stops_between_steps(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        run_pipeline(small_cnn, small_cnn_spec, tiny_config(), tmp_path, device="cpu", seed=0,
                     should_cancel=should_cancel)
    assert not (tmp_path / "manifest.json").exists()


def test_passing_trained_generators_gives_the_same_student(tmp_path: Path) -> None:
    # The student has dropout (global RNG): fine-tuning must not depend on whether the generators were
    # trained in this run or handed in (the bench reuses them across settings and runs).
    spec = ModelSpec(arch="mlp", arch_kwargs={"hidden": [32, 32], "dropout": 0.2}, input_shape=(16,),
                     num_classes=10)
    from kegnet import create_model

    torch.manual_seed(0)
    teacher = create_model("mlp", input_shape=(16,), num_classes=10, hidden=[32, 32], dropout=0.2)
    cfg = tiny_config("kegnet", compression={"rank_method": "explicit", "ranks": {"*": [5, 5]}})
    first = run_pipeline(teacher, spec, cfg, tmp_path / "a", device="cpu", seed=3)
    second = run_pipeline(teacher, spec, cfg, tmp_path / "b", device="cpu", seed=3, generators=first.generators)
    for (name, a), b in zip(first.student.state_dict().items(), second.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("codes", ["one_hot", "simplex"])
def test_the_student_learns_from_the_configured_class_codes(tmp_path: Path, small_cnn, small_cnn_spec,
                                                            monkeypatch: pytest.MonkeyPatch, codes: str) -> None:
    from kegnet.generation import samplers

    asked: list[torch.Tensor] = []
    hooked: set[int] = set()
    original = samplers.KegNetSampler.sample

    def recording(self: samplers.KegNetSampler, n: int, rng: torch.Generator):  # type: ignore[no-untyped-def]
        for g in self.generators:  # record what each generator is asked for, then sample as usual
            if id(g) not in hooked:
                hooked.add(id(g))
                g.register_forward_pre_hook(lambda m, args: asked.append(args[0].detach()))
        return original(self, n, rng)

    monkeypatch.setattr(samplers.KegNetSampler, "sample", recording)
    run_pipeline(small_cnn, small_cnn_spec, tiny_config(distill={"label_codes": codes}), tmp_path, device="cpu",
                 seed=0)
    codes_seen = torch.cat(asked)
    one_hot = bool(((codes_seen == 0) | (codes_seen == 1)).all())
    assert len(codes_seen) > 0 and one_hot == (codes == "one_hot")
