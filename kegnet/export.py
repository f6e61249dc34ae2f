"""Writing a run's outputs (loading a saved student back is ``kegnet.student``).

Files: ``student.safetensors`` (weights; its metadata holds the spec and the compression plan, so the file
alone rebuilds the model with this package), ``student.pt2`` (a ``torch.export`` program with a dynamic batch
size that loads with plain PyTorch), ``student.onnx`` (the same program for ONNX runtimes), ``curves.png``
and ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kegnet.compression import CompressionPlan
from kegnet.errors import reraise_interrupts
from kegnet.spec import ModelSpec

log = logging.getLogger(__name__)

# student.safetensors metadata: the spec (every student), and what rebuilds the student's structure from the
# teacher's: a classifier's compression plan, a sequence student's compression report (kegnet/sequence/compress.py).
SPEC_METADATA = "kegnet_spec"
PLAN_METADATA = "kegnet_plan"
SEQUENCE_REPORT = "kegnet_sequence_report"


def save_weights(student: nn.Module, spec: ModelSpec, plan: CompressionPlan, path: Path) -> None:
    write_weights(student, path, {SPEC_METADATA: spec.model_dump_json(), PLAN_METADATA: json.dumps(plan.to_dict())})


def write_weights(student: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """``student``'s state dict as safetensors with ``metadata`` (what ``kegnet.student.load_student`` rebuilds
    it from)."""
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    _sort_header(path)
    path.chmod(0o644)  # safetensors writes 0600; the run's other files are 0644


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place and at the same length.

    safetensors writes the metadata map in a random order (a Rust HashMap), so the same student came out as
    two different files; a job must repeat itself byte for byte (the same sha256 in every manifest). Readers
    do not depend on the order; the header keeps its length (padded with spaces, as the format allows).
    """
    with path.open("r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # it is the same JSON, so never longer; were it ever, the file stays as written
            f.seek(8)
            f.write(text.ljust(size, b" "))


def _export_args(student: nn.Module, input_shape: tuple[int, ...]) -> tuple[nn.Module, tuple, tuple]:
    # Batch 2 in the example: a batch of 1 would let the exporter specialize the batch dimension.
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return student.cpu().eval(), (torch.zeros(2, *input_shape),), ({0: batch},)


def export_program(student: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """Save a ``torch.export`` program of ``student`` on the CPU, batch size dynamic."""
    model, example, dynamic = _export_args(student, input_shape)
    program = torch.export.export(model, example, dynamic_shapes=dynamic)
    torch.export.save(program, str(path))


def export_onnx(student: nn.Module, input_shape: tuple[int, ...], path: Path, *, traced: bool = False) -> str | None:
    """Save an ONNX model of ``student`` (input ``x``, output ``logits``, batch dynamic).

    ``traced``: use the TorchScript-based exporter at once (graphs converted from ONNX by onnx2torch hold
    modules that torch.export cannot trace); otherwise torch.export's, falling back to the traced one.
    Returns None on success, else why no file was written (the ``onnx`` packages are an optional extra).
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return "the onnx and onnxscript packages are not installed (pip install 'kegnet[onnx]')"
    model, example, dynamic = _export_args(student, input_shape)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # it warns about every torchvision op it cannot register
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if traced:
                    raise RuntimeError("traced export asked for")
                program = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=dynamic,
                                            input_names=["x"], output_names=["logits"], verbose=False)
                program.save(str(path))
            except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; the older one may cope
                reraise_interrupts(exc)
                log.info("ONNX export through torch.export did not work (%s); using the TorchScript exporter",
                         type(exc).__name__)
                torch.onnx.export(model, example, str(path), dynamo=False, input_names=["x"],
                                  output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                                  opset_version=17)
    finally:
        onnx_log.setLevel(level)
    strip_debug_info(path)
    return None


def strip_debug_info(path: Path) -> None:
    """Drop what the exporter records on every node for debugging (its ``metadata_props``: the Python stack
    trace with this server's file paths, the FX node, the module names; and any ``doc_string``), in place.

    Users get no use from them and should not see our paths; on small models they are much of the file
    (LeNet-5's student at 4.10x: 80,185 -> 67,725 bytes, its int8 model 42,016 -> 31,476; docs/benchmarks.md).
    """
    import onnx

    if path.stat().st_size > 1 << 30:  # near protobuf's 2 GiB, where one file no longer holds the model
        return
    model = onnx.load(str(path))
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:  # an If's or a Loop's branches
                graphs.extend([attr.g] if attr.HasField("g") else attr.graphs)
    onnx.save(model, str(path))


def check_onnx(path: Path, student: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> dict[str, float | str]:
    """Run ``student.onnx`` in onnxruntime on a random batch and compare with the torch student.

    Returns ``{"max_abs_diff": ..., "runtime": "onnxruntime X"}``, or ``{"skipped": why}``.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed"}
    x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(seed))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = student.cpu().eval()(x)
    diff = float((torch.from_numpy(got) - want).abs().max())
    return {"max_abs_diff": diff, "runtime": f"onnxruntime {ort.__version__}"}


def plot_curves(generator_curve: list[dict], distill_curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if generator_curve:
        steps = [r["step"] for r in generator_curve]
        for key in ("cls_loss", "dec_loss", "div_loss"):
            axes[0].plot(steps, [r[key] for r in generator_curve], label=key)
        axes[0].plot(steps, [r["teacher_acc"] for r in generator_curve], label="teacher acc. on G's labels")
        axes[0].set_xlabel("generator step")
        axes[0].legend(fontsize=8)
    axes[0].set_title("generators")
    if distill_curve:
        steps = [r["step"] for r in distill_curve]
        axes[1].plot(steps, [r["agreement"] for r in distill_curve], label="agreement (held-out synthetic)")
        ax2 = axes[1].twinx()
        ax2.plot(steps[1:], [r["loss"] for r in distill_curve[1:]], color="tab:red", label="KD loss")
        ax2.set_ylabel("KD loss")
        axes[1].set_xlabel("student step")
        # One legend for both axes, below the plot so that it hides no curve.
        lines = axes[1].get_lines() + ax2.get_lines()
        axes[1].legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper center",
                       bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    axes[1].set_title("student")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_samples(sampler: object, num_classes: int, path: Path, *, per_class: int = 8, seed: int = 0,
                 max_classes: int = 20) -> None:
    """A grid of synthetic images, one row per class (at most ``max_classes``): what the generators make.

    ``sampler`` is a ``KegNetSampler``; each row asks every generator for that class (one-hot codes).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = sampler.generators  # type: ignore[attr-defined]
    device = next(gens[0].parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    classes = min(num_classes, max_classes)
    rows = []
    for c in range(classes):
        codes = torch.zeros(per_class, num_classes, device=device)
        codes[:, c] = 1
        g = gens[c % len(gens)]
        noise = torch.randn(per_class, sampler.noise_dim, generator=rng, device=device)  # type: ignore[attr-defined]
        rows.append(g(codes, noise).cpu())
    fig, axes = plt.subplots(classes, per_class, figsize=(per_class * 0.9, classes * 0.9), squeeze=False)
    for c, images in enumerate(rows):
        for j, image in enumerate(images):
            ax = axes[c][j]
            picture = image.permute(1, 2, 0).numpy()
            picture = (picture - picture.min()) / max(float(picture.max() - picture.min()), 1e-8)
            rgb = picture.shape[2] == 3  # other channel counts: the first channel, in grey
            ax.imshow(picture if rgb else picture[..., 0], cmap=None if rgb else "gray")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[c][0].set_ylabel(str(c), rotation=0, labelpad=10)
    fig.suptitle("synthetic samples, one row per class")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
