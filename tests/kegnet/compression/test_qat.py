"""kegnet.compression.qat: the rounding it emulates is onnxruntime's, and fine-tuning through it brings the
int8 model closer to its teacher than quantizing the student as it is."""

import copy

import torch
from torch import nn

from kegnet.compression import quantize
from kegnet.compression.qat import finetune_quantized, round_activation, round_weight
from kegnet.export import export_onnx
from kegnet.generation import NoiseSampler

CPU = torch.device("cpu")


def test_weights_fall_on_a_symmetric_per_channel_grid_with_the_gradient_passing_through() -> None:
    w = torch.tensor([[0.5, -0.25, 0.1], [2.0, 1.0, -0.03]], requires_grad=True)
    for reduce_range, q_max in ((True, 64), (False, 127)):
        r = round_weight(w, reduce_range)
        steps = r.detach() / (w.detach().abs().amax(1, keepdim=True) / q_max)
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= q_max + 1e-4
        assert torch.equal(r[:, 0].detach().abs(), w[:, 0].detach().abs())  # each channel's largest is exact
    round_weight(w, True).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_activations_clip_to_their_range_and_take_256_levels_with_an_exact_zero() -> None:
    x = torch.linspace(-2, 6, 1001, requires_grad=True)
    r = round_activation(x, -1.0, 4.0)
    assert r.min() >= -1.0 - 1e-6 and r.max() <= 4.0 + 1e-6 and len(r.unique()) <= 256
    assert round_activation(torch.zeros(1), -1.0, 4.0).item() == 0.0
    r.sum().backward()  # gradient 1 inside the range, 0 where clipped
    inside, outside = (x > -0.99) & (x < 3.99), (x < -1.01) | (x > 4.01)
    assert (x.grad[inside] == 1).all() and (x.grad[outside] == 0).all()
    assert round_activation(torch.tensor([3.0]), 1.0, 4.0).item() > 0  # the range always holds 0


def _nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                            nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity's: the copy must keep them
        teacher[1].running_mean.uniform_(-0.5, 0.5)
        teacher[1].running_var.uniform_(0.5, 2.0)
    return teacher, copy.deepcopy(teacher)


def test_finetuning_leaves_the_student_and_its_layers_alone_and_moves_the_copy() -> None:
    teacher, student = _nets()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    sampler = NoiseSampler("gaussian", (1, 8, 8), CPU)
    cal = sampler.sample(64, torch.Generator().manual_seed(1))[0]
    tuned = finetune_quantized(student, teacher, sampler, cal, steps=5, batch_size=16, device=CPU, seed=0)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert [type(m) for m in tuned.modules()] == [type(m) for m in student.modules()]  # plain layers again
    assert not tuned.training and not torch.equal(tuned[0].weight, student[0].weight)
    assert torch.equal(tuned[1].running_mean, student[1].running_mean)  # BatchNorm frozen (eval mode)


def test_the_int8_model_of_the_finetuned_copy_is_closer_to_the_teacher(tmp_path) -> None:
    """The student is the teacher with coarse weights: quantizing it as it is keeps its error, fine-tuning
    through the rounding removes most of it."""
    teacher, student = _nets()
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.add_(0.05 * torch.randn_like(m.weight))
    sampler = NoiseSampler("gaussian", (1, 8, 8), CPU)
    cal = sampler.sample(128, torch.Generator().manual_seed(1))[0]
    tuned = finetune_quantized(student, teacher, sampler, cal, steps=150, lr=3e-3, batch_size=64, device=CPU,
                               seed=0)
    x = sampler.sample(512, torch.Generator().manual_seed(2))[0]
    with torch.no_grad():
        target = teacher(x)
    errors = {}
    for name, model in (("as it is", student), ("fine-tuned", tuned)):
        export_onnx(model, (1, 8, 8), tmp_path / f"{name}.onnx", traced=True)
        quantize.prepare(tmp_path / f"{name}.onnx", tmp_path / f"{name}.prep.onnx")
        quantize.quantize(tmp_path / f"{name}.prep.onnx", tmp_path / f"{name}.int8.onnx", cal, "minmax")
        errors[name] = (quantize.OnnxModel(tmp_path / f"{name}.int8.onnx")(x) - target).pow(2).mean().item()
    assert errors["fine-tuned"] < 0.5 * errors["as it is"]
