"""Loading a stranger's weights safely and checking them against the model spec.

Only two readers are ever used: safetensors, and ``torch.load(weights_only=True)``, which refuses any
pickled object other than tensors and plain containers (so code in the file never runs). Every failure
becomes a ``CheckpointError`` or ``SpecError`` whose message tells the user what to fix.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import pickletools
import struct
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from kegnet.errors import CheckpointError, SpecError
from kegnet.metrics import count_parameters
from kegnet.models import create_model
from kegnet.models.libraries import library_version
from kegnet.models.registry import DEFAULT_MAX_PARAMETERS
from kegnet.spec import ModelSpec

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# Keys under which training scripts commonly nest the state dict.
_NESTED_KEYS = ("model_state", "state_dict", "model_state_dict", "model")
_HOW_TO_SAVE = "save it with torch.save(model.state_dict(), path) or safetensors.torch.save_file"
_DAMAGED = f"the checkpoint could not be read; it looks truncated or damaged; {_HOW_TO_SAVE}"


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length followed by a JSON object.
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


# Bounds on the structure of an upload, checked before any reader allocates what the file declares.
MAX_ARCHIVE_ENTRIES = 65_536  # tensors in a state dict; Python's zipfile keeps ~0.5 KB per entry
# torch.load unpickles the structure in Python: each 1-byte opcode can push a new object (EMPTY_DICT: ~70 bytes
# each, measured), so the pickle itself is bounded. A state dict pickles to ~140 bytes per tensor (measured).
MAX_PICKLE_BYTES = 8 * 1024 * 1024
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # safetensors' own limit on its JSON header
_MAX_DIMS = 64

_SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}

_PROGRAM_REFUSED = (
    "programs carry code and are never loaded here; upload the weights instead: "
    "torch.save(model.state_dict(), path), safetensors.torch.save_file, or an ONNX file with arch \"onnx\""
)


def read_state_dict(path: str | Path, *, max_bytes: int | None = None) -> StateDict:
    """Read a ``.safetensors`` or ``torch.save`` file into a flat ``{name: tensor}`` dict on the CPU.

    ``max_bytes`` is the memory budget of the tensors the file may declare (default: the file's own size):
    the file is inspected first (``check_checkpoint_file``) so that nothing larger is ever allocated.
    """
    path = Path(path)
    kind = check_checkpoint_file(path, max_bytes=max_bytes)
    if kind == "safetensors":
        try:
            return _unwrap(load_safetensors(str(path), device="cpu"))
        except (SafetensorError, ValueError, OSError) as exc:
            log.info("safetensors refused %s: %s", path.name, exc)
            raise CheckpointError("the safetensors file is damaged or truncated; save it again with "
                                  "safetensors.torch.save_file") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refused a global: the file carries objects (possibly code) beyond tensors.
        log.warning("refused a checkpoint that is not weights-only: %s", str(exc).splitlines()[0])
        raise CheckpointError(
            "the checkpoint holds Python objects other than tensors (a pickled model or code) and was "
            f"refused without running it; {_HOW_TO_SAVE}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
        # torch's own message may advise weights_only=False: log it, never pass it on.
        log.info("torch.load refused %s: %s", path.name, str(exc).splitlines()[0] if str(exc) else type(exc))
        raise CheckpointError(_DAMAGED) from exc
    return _unwrap(obj)


def check_checkpoint_file(path: str | Path, *, max_bytes: int | None = None) -> str:
    """Inspect an uploaded weights file without loading it; returns ``"safetensors"``, ``"zip"`` (torch.save)
    or ``"legacy"`` (torch.save before torch 1.6), or raises ``CheckpointError`` saying what to fix.

    What it declares must fit ``max_bytes`` (default: the file's size) and the file itself:
    - a torch.save zip archive: only stored (uncompressed) entries, as torch.save writes them (a deflated
      entry expands without limit while torch.load reads it); the entries' total size at most the file's
      size (overlapping entries expand too) and ``max_bytes``; at most ``MAX_ARCHIVE_ENTRIES`` entries.
      TorchScript archives and ``torch.export`` programs (``.pt2``) are recognized by their entry names
      and refused: they carry code.
    - safetensors: every tensor's dtype × shape equals its ``data_offsets`` span, and the spans tile the
      data exactly up to the end of the file.
    - legacy pickles: the storages they declare (allocated by torch.load before their bytes are read) at
      most ``max_bytes`` in all (``_legacy_storage_bytes``).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError("the checkpoint file is empty")
    budget = size if max_bytes is None else max_bytes
    if size > budget:
        raise CheckpointError(f"the checkpoint is {size:,} bytes, above this service's limit of {budget:,}")
    with path.open("rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):
        _check_safetensors(path, size, budget)
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        _check_torch_archive(path, size, budget)
        return "zip"
    if head[:1] == b"\x80":
        declared = _legacy_storage_bytes(path)
        if declared > budget:
            raise CheckpointError(f"the checkpoint declares {declared:,} bytes of tensors, above this "
                                  f"service's limit of {budget:,}; {_HOW_TO_SAVE}")
        return "legacy"
    raise CheckpointError(f"the file is neither safetensors nor a torch.save checkpoint; {_HOW_TO_SAVE}")


def _check_torch_archive(path: Path, size: int, budget: int) -> None:
    count = _zip_entry_count(path, size)
    if count is not None and count > MAX_ARCHIVE_ENTRIES:
        raise CheckpointError(f"the checkpoint archive has {count:,} entries, above the limit of "
                              f"{MAX_ARCHIVE_ENTRIES:,}; {_HOW_TO_SAVE}")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
        log.info("unreadable zip %s: %s", path.name, exc)
        raise CheckpointError(_DAMAGED) from exc
    if len(infos) > MAX_ARCHIVE_ENTRIES:
        raise CheckpointError(f"the checkpoint archive has {len(infos):,} entries, above the limit of "
                              f"{MAX_ARCHIVE_ENTRIES:,}; {_HOW_TO_SAVE}")
    program = _program_kind([i.filename for i in infos])
    if program:
        raise CheckpointError(f"the file is {program}, not a state dict; {_PROGRAM_REFUSED}")
    compressed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(
            f"the checkpoint archive has compressed entries ({', '.join(compressed[:3])}), which torch.save "
            f"never writes; save it with torch.save(model.state_dict(), path) and upload that file as it is "
            "(do not re-zip it)")
    pickles = [i for i in infos if i.filename.endswith(".pkl") and i.file_size > MAX_PICKLE_BYTES]
    if pickles:
        raise CheckpointError(f"the checkpoint's structure ({pickles[0].filename}) is {pickles[0].file_size:,} "
                              f"bytes, above the limit of {MAX_PICKLE_BYTES:,}; {_HOW_TO_SAVE}")
    total = sum(i.file_size for i in infos)
    if total > budget:
        raise CheckpointError(f"the checkpoint archive holds {total:,} bytes, above this service's limit of "
                              f"{budget:,}")
    if total > size or any(i.compress_size != i.file_size for i in infos):
        raise CheckpointError(f"the checkpoint archive's entries declare more bytes ({total:,}) than the file "
                              f"holds ({size:,}): it is malformed; {_HOW_TO_SAVE}")


def _program_kind(names: list[str]) -> str | None:
    """What a zip archive holds when it is a program rather than weights, from its entry names.

    torch.jit.save writes ``<name>/code/...`` and ``<name>/constants.pkl``; torch.export.save (``.pt2``)
    writes ``<name>/archive_format``, ``<name>/models/*.json`` and ``<name>/data/weights/...`` (torch 2.14).
    """
    rests = {n.partition("/")[2] for n in names}
    if any(r.startswith("code/") for r in rests) or "constants.pkl" in rests:
        return "a TorchScript archive (torch.jit.save)"
    if ("archive_format" in rests or any(r.startswith(("models/", "data/weights/")) for r in rests)
            or any(n.endswith("serialized_exported_program.json") for n in names)):
        return "a torch.export program (.pt2, torch.export.save)"
    return None


def _zip_entry_count(path: Path, size: int) -> int | None:
    """The entry count an archive's end-of-central-directory record declares (zip64 too), read before
    zipfile builds an object per entry; None when no record is found (zipfile then says it is damaged)."""
    with path.open("rb") as f:
        tail_len = min(size, 22 + 65_535)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return None
        count = struct.unpack_from("<H", tail, at + 10)[0]
        if count != 0xFFFF or at < 20 or tail[at - 20:at - 16] != b"PK\x06\x07":
            return int(count)
        (zip64_at,) = struct.unpack_from("<Q", tail, at - 20 + 8)
        if zip64_at + 56 > size:
            return None
        f.seek(zip64_at)
        record = f.read(56)
        if record[:4] != b"PK\x06\x06":
            return None
        return int(struct.unpack_from("<Q", record, 32)[0])


def _legacy_storage_bytes(path: Path) -> int:
    """Bytes of the storages a legacy (pre-zip) torch.save file declares, read from its pickles without
    running them (``pickletools.genops`` and a small stack simulation).

    A legacy file is five pickles (magic number, protocol, system info, the object, the storage keys) and
    then the raw storages. torch.load allocates every storage at the size the object pickle declares
    (``("storage", type, key, location, numel, view)`` persistent ids) before reading its bytes: a 350-byte
    file can ask for any amount (measured with torch 2.14: untouched, so not resident, and a request above
    what the kernel grants fails cleanly; but it is bounded here all the same). The pickles together are
    bounded by ``MAX_PICKLE_BYTES``. Tar files (torch's first format) are refused.
    """
    if tarfile.is_tarfile(path):
        raise CheckpointError(f"the checkpoint is in torch's old tar format, which is not accepted; {_HOW_TO_SAVE}")
    storages: dict[str, int] = {}  # root key -> bytes (views of one storage share its allocation)
    try:
        with path.open("rb") as f:
            for i in range(4):
                stack: list[Any] = []
                memo: dict[int, Any] = {}
                for op, arg, _ in pickletools.genops(f):
                    if f.tell() > MAX_PICKLE_BYTES:
                        raise CheckpointError(f"the checkpoint's pickled structure is above the limit of "
                                              f"{MAX_PICKLE_BYTES:,} bytes; {_HOW_TO_SAVE}")
                    if i == 3:  # the object: follow the stack to read its persistent ids
                        pid = _simulate(op, arg, stack, memo)
                        if pid is not None:
                            key, nbytes = _declared_storage(pid)
                            storages[key] = max(storages.get(key, 0), nbytes)
    except CheckpointError:
        raise
    except (ValueError, EOFError, IndexError, KeyError, TypeError, struct.error) as exc:
        log.info("unreadable legacy pickle %s: %s", path.name, exc)
        raise CheckpointError(_DAMAGED) from exc
    return sum(storages.values())


_MARK = object()


def _simulate(op: pickletools.OpcodeInfo, arg: Any, stack: list[Any], memo: dict[int, Any]) -> Any:
    """Apply one opcode's effect on the stack, keeping only constants, globals and tuples of them (enough
    to read persistent ids); every other object is ``None``. Returns the persistent id BINPERSID takes."""
    name = op.name
    if name == "MARK":
        stack.append(_MARK)
    elif op.arg is not None and name in _CONSTANT_OPS:
        stack.append(arg)
    elif name == "NONE":
        stack.append(None)
    elif name == "GLOBAL":
        stack.append(("global", str(arg)))
    elif name == "STACK_GLOBAL":
        qualname, module = stack.pop(), stack.pop()
        stack.append(("global", f"{module} {qualname}"))
    elif name == "EMPTY_TUPLE":
        stack.append(())
    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        n = int(name[-1])
        items = tuple(stack[-n:])
        del stack[-n:]
        stack.append(items)
    elif name == "TUPLE":
        at = len(stack) - 1 - stack[::-1].index(_MARK)
        items = tuple(stack[at + 1:])
        del stack[at:]
        stack.append(items)
    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
        memo[int(arg)] = stack[-1]
    elif name == "MEMOIZE":
        memo[len(memo)] = stack[-1]
    elif name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo[int(arg)])
    elif name == "DUP":
        stack.append(stack[-1])
    elif name == "BINPERSID":
        pid = stack.pop()
        stack.append(None)
        return pid
    elif name == "PERSID":
        stack.append(None)
        return arg
    else:  # the generic effect: pop what the opcode takes (through the mark), push placeholders
        before = op.stack_before
        if pickletools.markobject in before:
            at = len(stack) - 1 - stack[::-1].index(_MARK)
            del stack[at:]
            drop = before.index(pickletools.markobject)
        else:
            drop = len(before)
        if drop:
            if drop > len(stack):
                raise ValueError("pickle stack underflow")
            del stack[-drop:]
        stack.extend([None] * len(op.stack_after))
    return None


_CONSTANT_OPS = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
})


_STORAGE_ELEMENT_BYTES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1,
}


def _declared_storage(pid: Any) -> tuple[str, int]:
    """(root key, bytes) a legacy persistent id makes torch.load allocate. An element size we do not know
    counts as 16 bytes (complex128, the largest); an id torch would not accept counts as nothing (torch.load
    refuses it later)."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        return "", 0
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(numel, int) or numel < 0:
        return "", 0
    name = storage_type[1].rpartition(" ")[2] if isinstance(storage_type, tuple) and len(storage_type) == 2 else ""
    return str(key), numel * _STORAGE_ELEMENT_BYTES.get(name, 16)


def _check_safetensors(path: Path, size: int, budget: int) -> None:
    damaged = "the safetensors file is damaged or truncated"
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CheckpointError(f"{damaged}: its header declares {n:,} bytes, more than the file holds")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
            raise CheckpointError(f"{damaged}: its header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{damaged}: its header is not a JSON object")
    data_len = size - 8 - n
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        label = repr(name[:80])
        if not isinstance(info, dict):
            raise CheckpointError(f"{damaged}: tensor {label} has no dtype/shape/data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        bits = _SAFETENSORS_DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
        if bits is None:
            raise CheckpointError(f"tensor {label} has an unsupported dtype {str(dtype)[:20]!r}")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CheckpointError(f"{damaged}: tensor {label} has an invalid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise CheckpointError(f"{damaged}: tensor {label} has data_offsets outside the file")
        declared = -(-math.prod(shape) * bits // 8)
        if declared > budget or declared != offsets[1] - offsets[0]:
            raise CheckpointError(f"{damaged}: tensor {label} declares {declared:,} bytes ({dtype} × "
                                  f"{tuple(shape)}) but its data_offsets span {offsets[1] - offsets[0]:,}")
        spans.append((offsets[0], offsets[1]))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise CheckpointError(f"{damaged}: its tensors overlap or leave gaps in the data")
        position = end
    if position != data_len:
        raise CheckpointError(f"{damaged}: its tensors declare {position:,} bytes of data but the file holds "
                              f"{data_len:,}")


def _unwrap(obj: object) -> StateDict:
    """Find the state dict in ``obj`` (possibly nested one level) and check it holds only tensors."""
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"the checkpoint does not hold a state dict of tensors; {_HOW_TO_SAVE}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"the state dict has non-tensor entries: {', '.join(bad[:5])}")
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def check_finite(state: StateDict) -> None:
    """Raise if any floating-point tensor holds NaN or infinity."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"weights contain NaN or infinite values in: {', '.join(bad[:5])}")


def build_teacher(spec: ModelSpec, state: StateDict, *, max_parameters: int | None = DEFAULT_MAX_PARAMETERS
                  ) -> nn.Module:
    """Build ``spec``'s architecture, load ``state`` strictly, and check one forward pass on ``input_shape``.

    The architecture is counted on the meta device first and refused above ``max_parameters``.
    """
    model = create_model(spec.arch, max_parameters=max_parameters, **spec.model_arguments(), **spec.kwargs())
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        raise SpecError(f"the weights do not match architecture {spec.arch!r} ({'; '.join(parts)})")
    wrong = [
        f"{k} is {tuple(state[k].shape)} but {spec.arch!r} expects {tuple(v.shape)}"
        for k, v in expected.items() if state[k].shape != v.shape
    ]
    if wrong:
        raise SpecError("shape mismatch: " + "; ".join(wrong[:4]) + f" (check {spec.shape_fields})")
    check_finite(state)
    model.load_state_dict(state, strict=True)
    _check_forward(model, spec)
    return model


def _check_forward(model: nn.Module, spec: ModelSpec) -> None:
    """One forward pass on the spec's probe (``ModelSpec.probe``: zeros of ``input_shape`` must give
    ``(2, num_classes)`` logits; BOS tokens ``(2, 2)`` must give ``(2, 2, vocab_size)``)."""
    model.eval()
    x, expected, described = spec.probe()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError) as exc:
        raise SpecError(f"the model cannot run on {described}: {exc}") from exc
    if tuple(out.shape) != expected:
        raise SpecError(f"the model outputs shape {tuple(out.shape)} for {described}, expected {expected}")


@dataclass
class LoadedTeacher:
    """A teacher built from an upload: the module (eval mode, CPU), its spec with input shape and class
    count filled in (an ONNX graph supplies them), and where its architecture came from (for the manifest)."""

    model: nn.Module
    spec: ModelSpec
    architecture: dict[str, Any] = field(default_factory=dict)


def open_teacher(path: str | Path, spec: ModelSpec, *, max_parameters: int | None = DEFAULT_MAX_PARAMETERS,
                 onnx_limits: Any = None, max_bytes: int | None = None) -> LoadedTeacher:
    """Read an uploaded checkpoint (state dict, safetensors, or an ONNX graph for ``arch="onnx"``) and build
    the teacher it describes. ``max_bytes``: the file's budget (``read_state_dict``; for a graph, the bytes
    of ``OnnxLimits`` unless ``onnx_limits`` is given)."""
    if spec.arch == "onnx":
        if onnx_limits is None and max_bytes is not None:  # the same byte budget bounds a graph
            from kegnet.models.onnx_graph import OnnxLimits

            onnx_limits = OnnxLimits(max_bytes=max_bytes, max_initializer_bytes=max_bytes)
        return _open_onnx(Path(path), spec, max_parameters, onnx_limits)
    model = build_teacher(spec, read_state_dict(path, max_bytes=max_bytes), max_parameters=max_parameters)
    return LoadedTeacher(model, spec, architecture_of(spec))


def architecture_of(spec: ModelSpec) -> dict[str, Any]:
    """Where a spec's architecture comes from, for the manifest: source, name, kwargs, library version."""
    architecture = {"source": spec.source, "name": spec.arch.partition(":")[2] or spec.arch, "kwargs": spec.kwargs()}
    if library_version(spec.source):
        architecture["library_version"] = library_version(spec.source)
    return architecture


def _open_onnx(path: Path, spec: ModelSpec, max_parameters: int | None, limits: Any) -> LoadedTeacher:
    from kegnet.models import onnx_graph

    if spec.arch_kwargs:
        raise SpecError("an onnx architecture takes no arch_kwargs: everything is in the graph")
    graph = onnx_graph.read_graph(path, limits)
    declared = graph.input_shape
    shape = spec.input_shape
    if shape is None:
        if any(d is None for d in declared):
            raise SpecError(f"the ONNX graph leaves its input size free ({_dims(declared)}); give input_shape")
        shape = tuple(int(d) for d in declared)  # type: ignore[arg-type]
    elif len(shape) != len(declared) or any(d is not None and d != s for d, s in zip(declared, shape, strict=False)):
        raise SpecError(f"input_shape {_dims(shape)} does not match the ONNX graph's input {_dims(declared)}")
    classes = spec.num_classes or graph.num_classes
    if classes is None:
        raise SpecError("the ONNX graph does not declare its class count; give num_classes")
    if spec.num_classes and graph.num_classes and spec.num_classes != graph.num_classes:
        raise SpecError(f"num_classes {spec.num_classes} does not match the ONNX graph's output "
                        f"({graph.num_classes} classes)")
    resolved = ModelSpec(arch="onnx", input_shape=shape, num_classes=classes)  # validates the bounds too
    model = onnx_graph.to_torch(graph)
    count = count_parameters(model)
    if max_parameters is not None and count > max_parameters:
        raise SpecError(f"the ONNX graph has {count:,} parameters, above this service's limit of "
                        f"{max_parameters:,}")
    check_finite({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)})
    _check_forward(model, resolved)
    return LoadedTeacher(model, resolved, {"source": "onnx", **graph.info})


def _dims(shape: tuple[int | None, ...]) -> str:
    return ",".join("?" if d is None else str(d) for d in shape)


def load_teacher(path: str | Path, spec: ModelSpec, *, max_parameters: int | None = DEFAULT_MAX_PARAMETERS
                 ) -> nn.Module:
    """Read a checkpoint and build the teacher it describes; the model is in eval mode on the CPU."""
    return open_teacher(path, spec, max_parameters=max_parameters).model
