"""File-format safety: an uploaded weights file's structure is inspected before any reader opens it.

``check_checkpoint_file`` reads only headers, zip directories and pickle opcodes (never through ``pickle``,
``torch.load`` or a safetensors loader) and guarantees, when it returns, that:

- no reader ever allocates more than the budget: the tensors, archive entries and storages the file declares
  fit ``max_bytes`` and the bytes the file really holds (no deflated or overlapping zip entries, no
  safetensors header whose spans overrun the data, no legacy pickle that declares huge storages), and the
  archive's entry count and pickled structure are bounded (``MAX_ARCHIVE_ENTRIES``, ``MAX_PICKLE_BYTES``);
- no pickled code runs: pickles are only walked with ``pickletools.genops`` and a stack simulation, and
  programs (TorchScript archives, ``torch.export`` ``.pt2`` files) are refused by their entry names.

Loading itself is ``kegnet.checkpoint``'s (safetensors, or ``torch.load(weights_only=True)``, which refuses
any pickled object other than tensors). Every refusal is a ``CheckpointError`` whose message tells the user
what to fix.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickletools
import struct
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kegnet.errors import CheckpointError

log = logging.getLogger(__name__)

# Message parts shared with kegnet.checkpoint, whose readers fail with the same advice.
HOW_TO_SAVE = "save it with torch.save(model.state_dict(), path) or safetensors.torch.save_file"
DAMAGED = f"the checkpoint could not be read; it looks truncated or damaged; {HOW_TO_SAVE}"
NOT_WEIGHTS = ("the checkpoint holds Python objects other than tensors (a pickled model or code) and was refused "
               f"without running it; {HOW_TO_SAVE}")


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length followed by a JSON object.
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


# Bounds on the structure of an upload, checked before any reader allocates what the file declares.
MAX_ARCHIVE_ENTRIES = 65_536  # tensors in a state dict; Python's zipfile keeps ~0.5 KB per entry
# torch.load unpickles the structure in Python: each 1-byte opcode can push a new object (EMPTY_DICT: ~70 bytes
# each, measured), so the pickle itself is bounded. A state dict pickles to ~140 bytes per tensor (measured).
MAX_PICKLE_BYTES = 8 * 1024 * 1024
# safetensors' own reader refuses headers above 100 MB, but parsing one that large in Python takes seconds and
# gigabytes (100 MiB of ``{}``: 11 s, +2.5 GB, measured); a state dict's header takes ~100 bytes per tensor.
MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024
# Tensors in one file, any format (safetensors, zip, legacy): each costs a Python object in every reader.
MAX_TENSORS = MAX_ARCHIVE_ENTRIES
# Keys under which training scripts commonly nest the state dict (kegnet.checkpoint unwraps the same).
NESTED_KEYS = ("model_state", "state_dict", "model_state_dict", "model")
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
        walk, _ = _legacy_walk(path)
        declared = sum(walk.storages.values())
        if declared > budget:
            raise CheckpointError(f"the checkpoint declares {declared:,} bytes of tensors, above this "
                                  f"service's limit of {budget:,}; {HOW_TO_SAVE}")
        walk.check_tensors()
        return "legacy"
    raise CheckpointError(f"the file is neither safetensors nor a torch.save checkpoint; {HOW_TO_SAVE}")


def _check_torch_archive(path: Path, size: int, budget: int) -> None:
    count = _zip_entry_count(path, size)
    if count is not None and count > MAX_ARCHIVE_ENTRIES:
        raise CheckpointError(f"the checkpoint archive has {count:,} entries, above the limit of "
                              f"{MAX_ARCHIVE_ENTRIES:,}; {HOW_TO_SAVE}")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            _check_archive_entries(infos, size, budget)
            _archive_walk(zf, infos)
    except CheckpointError:  # a ValueError too: not "damaged"
        raise
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
        log.info("unreadable zip %s: %s", path.name, exc)
        raise CheckpointError(DAMAGED) from exc


def _check_archive_entries(infos: list[zipfile.ZipInfo], size: int, budget: int) -> None:
    """The archive's directory: bounded, no program, stored entries within the file and the budget."""
    if len(infos) > MAX_ARCHIVE_ENTRIES:
        raise CheckpointError(f"the checkpoint archive has {len(infos):,} entries, above the limit of "
                              f"{MAX_ARCHIVE_ENTRIES:,}; {HOW_TO_SAVE}")
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
                              f"bytes, above the limit of {MAX_PICKLE_BYTES:,}; {HOW_TO_SAVE}")
    total = sum(i.file_size for i in infos)
    if total > budget:
        raise CheckpointError(f"the checkpoint archive holds {total:,} bytes, above this service's limit of "
                              f"{budget:,}")
    if total > size or any(i.compress_size != i.file_size for i in infos):
        raise CheckpointError(f"the checkpoint archive's entries declare more bytes ({total:,}) than the file "
                              f"holds ({size:,}): it is malformed; {HOW_TO_SAVE}")


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
    running them (``_legacy_walk``)."""
    return sum(_legacy_walk(path)[0].storages.values())


def _legacy_walk(path: Path) -> tuple[_Walk, Any]:
    """The simulated object pickle of a legacy (pre-zip) torch.save file and the object it builds.

    A legacy file is five pickles (magic number, protocol, system info, the object, the storage keys) and
    then the raw storages. torch.load allocates every storage at the size the object pickle declares
    (``("storage", type, key, location, numel, view)`` persistent ids) before reading its bytes: a 350-byte
    file can ask for any amount (measured with torch 2.14: untouched, so not resident, and a request above
    what the kernel grants fails cleanly; but it is bounded here all the same). The pickles together are
    bounded by ``MAX_PICKLE_BYTES``. Tar files (torch's first format) are refused.
    """
    if tarfile.is_tarfile(path):
        raise CheckpointError(f"the checkpoint is in torch's old tar format, which is not accepted; {HOW_TO_SAVE}")
    walk = _Walk()
    try:
        with path.open("rb") as f:
            for i in range(4):
                for op, arg, _ in pickletools.genops(f):
                    if f.tell() > MAX_PICKLE_BYTES:
                        raise CheckpointError(f"the checkpoint's pickled structure is above the limit of "
                                              f"{MAX_PICKLE_BYTES:,} bytes; {HOW_TO_SAVE}")
                    if i == 3:  # the object: follow the stack to read its storages and tensors
                        walk.step(op, arg)
    except CheckpointError:
        raise
    except (ValueError, EOFError, IndexError, KeyError, TypeError, struct.error) as exc:
        log.info("unreadable legacy pickle %s: %s", path.name, exc)
        raise CheckpointError(DAMAGED) from exc
    return walk, walk.result


def _archive_walk(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> tuple[_Walk, Any]:
    """The simulated ``data.pkl`` of a torch.save archive (stored, at most ``MAX_PICKLE_BYTES``: checked
    before) and the object it builds; every storage it declares must be an entry of exactly its bytes."""
    pickles = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    if len(pickles) != 1:
        raise CheckpointError(DAMAGED)
    walk = _Walk()
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(zf.read(pickles[0]))):
            walk.step(op, arg)
    except CheckpointError:
        raise
    except (ValueError, EOFError, IndexError, KeyError, TypeError, struct.error, zipfile.BadZipFile) as exc:
        log.info("unreadable archive pickle: %s", exc)
        raise CheckpointError(DAMAGED) from exc
    prefix = pickles[0].filename[: -len("data.pkl")]
    sizes = {i.filename: i.file_size for i in infos}
    for key, nbytes in walk.storages.items():
        entry = sizes.get(f"{prefix}data/{key}")
        if entry is None or (key in walk.exact and entry != walk.exact[key]):
            raise CheckpointError(f"the checkpoint archive declares a storage ({key}) of {nbytes:,} bytes that "
                                  f"it does not hold: it is malformed; {HOW_TO_SAVE}")
    walk.check_tensors()
    return walk, walk.result


_MARK = object()

# What a checkpoint tells its tensors apart by: the storage type (a global in the pickle) names the dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
_STORAGE_ELEMENT_BYTES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1,
}
# Advice for tensors that do not own their storage exactly (views, shared or expanded storages).
OWN_STORAGE = ("every tensor must own its storage exactly: save the state dict of real tensors, e.g. "
               "torch.save({k: v.contiguous().clone() for k, v in model.state_dict().items()}, path)")
_TENSOR_REBUILD = "torch._utils _rebuild_tensor_v2"
_PARAMETER_REBUILDS = ("torch._utils _rebuild_parameter", "torch._utils _rebuild_parameter_with_state")


@dataclass(frozen=True)
class _Storage:
    """A storage a pickle declares (its persistent id): torch.load allocates ``numel`` elements of it."""

    key: str
    type_name: str  # "FloatStorage", ... ("" when the id names no storage type we know)
    numel: int

    @property
    def dtype(self) -> str:
        return _STORAGE_DTYPES.get(self.type_name, "")


@dataclass(frozen=True, eq=False)
class _Tensor:
    """A tensor a pickle rebuilds, checked to own its whole storage (``_Walk._rebuild``)."""

    storage: _Storage
    shape: tuple[int, ...]


@dataclass
class _Walk:
    """The stack simulation of one pickle (``pickletools.genops``, nothing unpickled): constants, globals,
    tuples, dicts (state dicts and their nesting), declared storages and the tensors rebuilt from them; every
    other object is ``None``. Tensors are checked as they are rebuilt (``_rebuild``); objects are bounded."""

    stack: list[Any] = field(default_factory=list)
    memo: dict[int, Any] = field(default_factory=dict)
    storages: dict[str, int] = field(default_factory=dict)  # root key -> bytes torch.load allocates
    exact: dict[str, int] = field(default_factory=dict)  # the same, for storages of a known element size
    used: set[str] = field(default_factory=set)  # storage keys a tensor was rebuilt from
    placed: set[int] = field(default_factory=set)  # ids of tensors already placed in a dict
    tensors: int = 0
    objects: int = 0
    result: Any = None  # the object the pickle builds (at STOP)
    problem: str = ""  # the first tensor that does not own its storage: raised after the byte budgets

    def check_tensors(self) -> None:
        """Raise the first tensor problem found (a view, a shared storage, one tensor under two names)."""
        if self.problem:
            raise CheckpointError(self.problem)

    def step(self, op: pickletools.OpcodeInfo, arg: Any) -> None:
        """Apply one opcode's effect on the stack; a global a state dict never names is refused (what
        ``torch.load(weights_only=True)`` refuses too: code or objects other than tensors)."""
        if not self._object_op(op.name):
            _simulate(op, arg, self.stack, self.memo, self)
            if op.name in ("GLOBAL", "STACK_GLOBAL") and not _weights_global(self.stack[-1][1]):
                log.warning("refused a checkpoint naming global %.100s", self.stack[-1][1])
                raise CheckpointError(NOT_WEIGHTS)

    def _object_op(self, name: str) -> bool:
        """Dicts, calls and BUILD; False for any other opcode."""
        stack = self.stack
        if name == "EMPTY_DICT":
            stack.append(self._new({}))
        elif name in ("DICT", "SETITEMS"):
            at = len(stack) - 1 - stack[::-1].index(_MARK)
            items = stack[at + 1:]
            del stack[at:]
            target = self._new({}) if name == "DICT" else stack[-1]
            for k, v in zip(items[::2], items[1::2], strict=False):
                self._set(target, k, v)
            if name == "DICT":
                stack.append(target)
        elif name == "SETITEM":
            v, k = stack.pop(), stack.pop()
            self._set(stack[-1], k, v)
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            stack.append(self._reduce(fn, args))
        elif name == "BUILD":  # an object's state (an OrderedDict's _metadata): not part of the tensors
            stack.pop()
        elif name == "STOP":
            self.result = stack.pop() if stack else None
        else:
            return False
        return True

    def _new(self, obj: dict[Any, Any]) -> dict[Any, Any]:
        self.objects += 1
        if self.objects > 4 * MAX_TENSORS:  # a state dict holds a few dicts per module
            raise CheckpointError(f"the checkpoint's pickled structure holds more than {4 * MAX_TENSORS:,} "
                                  f"objects; {HOW_TO_SAVE}")
        return obj

    def _set(self, target: Any, key: Any, value: Any) -> None:
        if isinstance(value, _Tensor):
            if id(value) in self.placed:  # one stored value would back two entries
                self.problem = self.problem or f"the checkpoint holds one tensor under two names; {OWN_STORAGE}"
            self.placed.add(id(value))
        if isinstance(target, dict) and isinstance(key, str | int):
            target[key] = value

    def _reduce(self, fn: Any, args: Any) -> Any:
        """What a call builds: a tensor (checked), a parameter's tensor, an OrderedDict; else ``None``."""
        name = fn[1] if isinstance(fn, tuple) and len(fn) == 2 and fn[0] == "global" else ""
        if name == _TENSOR_REBUILD:
            return self._rebuild(args)
        if name in _PARAMETER_REBUILDS and isinstance(args, tuple) and args and isinstance(args[0], _Tensor):
            return args[0]
        if name == "collections OrderedDict":
            return self._new({})
        if name.startswith("torch._utils _rebuild"):  # sparse, quantized, nested, meta tensors: not weights
            raise CheckpointError(f"the checkpoint holds a tensor of a kind kegnet does not read "
                                  f"({name.rpartition(' ')[2]}); {HOW_TO_SAVE}")
        return None

    def _rebuild(self, args: Any) -> _Tensor:
        """``_rebuild_tensor_v2(storage, offset, size, stride, ...)``: a tensor that owns its whole storage."""
        if not (isinstance(args, tuple) and len(args) >= 4 and isinstance(args[0], _Storage)
                and _ints(args[2]) and _ints(args[3]) and isinstance(args[1], int)):
            raise CheckpointError(DAMAGED)
        storage, offset, size, stride = args[0], args[1], tuple(args[2]), tuple(args[3])
        self.tensors += 1
        if self.tensors > MAX_TENSORS:
            raise CheckpointError(f"the checkpoint holds more than {MAX_TENSORS:,} tensors; {HOW_TO_SAVE}")
        if len(size) > _MAX_DIMS or len(stride) != len(size) or any(d < 0 for d in size):
            raise CheckpointError(DAMAGED)
        if offset != 0 or stride != _contiguous(size, stride) or math.prod(size) != storage.numel:
            self.problem = self.problem or (
                f"the checkpoint holds a tensor that is a view of a storage (shape {size}, stride {stride}, "
                f"offset {offset}, storage of {storage.numel:,} elements: an expanded, strided or partial "
                f"view); {OWN_STORAGE}")
        if storage.key in self.used:
            self.problem = self.problem or (f"two tensors of the checkpoint share one storage (tied or aliased "
                                            f"weights); {OWN_STORAGE}")
        self.used.add(storage.key)
        return _Tensor(storage, size)


_TORCH_TYPES = frozenset({"Size", "device", "dtype", "float32", "float64", "float16", "bfloat16", "int64", "int32",
                          "int16", "int8", "uint8", "bool", "complex64", "complex128"})


def _weights_global(name: str) -> bool:
    """Whether a pickled global (``"module qualname"``) is one a state dict of tensors names: tensor and
    parameter rebuilders, storage types, OrderedDict, torch's sizes, devices and dtypes."""
    module, _, qualname = name.partition(" ")
    if module == "torch._utils":
        return qualname.startswith("_rebuild")
    if module == "torch":
        return qualname.endswith("Storage") or qualname in _TORCH_TYPES
    return name == "collections OrderedDict"


def _ints(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """The strides a contiguous tensor of ``size`` has; a dimension of size 1 keeps the given stride (torch
    leaves it free: ``is_contiguous`` ignores it)."""
    out, step = [], 1
    for d, s in zip(reversed(size), reversed(stride), strict=True):
        out.append(s if d == 1 else step)
        step *= max(d, 1)
    return tuple(reversed(out))


def _simulate(op: pickletools.OpcodeInfo, arg: Any, stack: list[Any], memo: dict[int, Any],
              walk: _Walk | None = None) -> Any:
    """Apply one opcode's effect on the stack, keeping only constants, globals and tuples of them (enough
    to read persistent ids); every other object is ``None``. Returns the persistent id BINPERSID takes; with
    a ``walk``, the id becomes a ``_Storage`` on the stack."""
    name = op.name
    if name == "MARK":
        stack.append(_MARK)
    elif op.arg is not None and name in _CONSTANT_OPS:
        stack.append(arg)
    elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
        stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
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
    elif name in ("BINPERSID", "PERSID"):
        pid = stack.pop() if name == "BINPERSID" else arg
        stack.append(_storage(pid, walk) if walk is not None else None)
        return pid
    else:
        _generic(op, stack)
    return None


def _generic(op: pickletools.OpcodeInfo, stack: list[Any]) -> None:
    """An opcode's generic effect: pop what it takes (through the mark), push placeholders."""
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


def _storage(pid: Any, walk: _Walk) -> _Storage | None:
    """The storage a persistent id declares (zip: ``("storage", type, key, location, numel)``; legacy: the
    same and a view), its bytes recorded in ``walk.storages``."""
    key, nbytes = _declared_storage(pid)
    if not key:
        return None
    walk.storages[key] = max(walk.storages.get(key, 0), nbytes)
    storage_type = pid[1]
    type_name = storage_type[1].rpartition(" ")[2] if isinstance(storage_type, tuple) and len(storage_type) == 2 else ""
    if type_name not in _STORAGE_DTYPES:
        return _Storage(key, "", int(pid[4]))
    walk.exact[key] = nbytes
    return _Storage(key, type_name, int(pid[4]))


_CONSTANT_OPS = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
})


def _declared_storage(pid: Any) -> tuple[str, int]:
    """(root key, bytes) a persistent id makes torch.load allocate. An element size we do not know counts as
    16 bytes (complex128, the largest); an id torch would not accept counts as nothing (torch.load refuses it
    later)."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        return "", 0
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        return "", 0
    name = storage_type[1].rpartition(" ")[2] if isinstance(storage_type, tuple) and len(storage_type) == 2 else ""
    return str(key), numel * _STORAGE_ELEMENT_BYTES.get(name, 16)


_SAFETENSORS_DAMAGED = "the safetensors file is damaged or truncated"
# What declared_tensors reports as a safetensors tensor's dtype: torch's name for it.
_SAFETENSORS_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64",
    "F64": "float64", "C64": "complex64", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
}


def _safetensors_header(path: Path, size: int) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and its length, bounded before it is parsed: at most
    ``MAX_SAFETENSORS_HEADER`` bytes, and at most ``MAX_TENSORS`` tensors. Every tensor is a JSON object,
    so the count of ``{`` bytes (a C-speed scan; braces inside names only add to it) bounds the tensors
    and the objects the parser would build."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise CheckpointError(f"{_SAFETENSORS_DAMAGED}: its header declares {n:,} bytes, more than the file "
                                  "holds")
        if n > MAX_SAFETENSORS_HEADER:
            raise CheckpointError(f"the safetensors header is {n:,} bytes, above the limit of "
                                  f"{MAX_SAFETENSORS_HEADER:,}; {HOW_TO_SAVE}")
        raw = f.read(n)
    objects = raw.count(b"{") - 1  # the header itself is one
    if objects > MAX_TENSORS + 1:  # and the __metadata__ object
        raise CheckpointError(f"the safetensors file declares more than {MAX_TENSORS:,} tensors (its header "
                              f"holds {objects:,} objects), above the limit; {HOW_TO_SAVE}")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise CheckpointError(f"{_SAFETENSORS_DAMAGED}: its header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{_SAFETENSORS_DAMAGED}: its header is not a JSON object")
    return header, n


def _check_safetensors(path: Path, size: int, budget: int) -> None:
    damaged = _SAFETENSORS_DAMAGED
    header, n = _safetensors_header(path, size)
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
    _check_tiling(spans, data_len)


def _check_tiling(spans: list[tuple[int, int]], data_len: int) -> None:
    """The tensors' byte spans tile the data exactly: no overlap, no gap, nothing after the last."""
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise CheckpointError(f"{_SAFETENSORS_DAMAGED}: its tensors overlap or leave gaps in the data")
        position = end
    if position != data_len:
        raise CheckpointError(f"{_SAFETENSORS_DAMAGED}: its tensors declare {position:,} bytes of data but the "
                              f"file holds {data_len:,}")


Declared = dict[str, tuple[tuple[int, ...], str]]


def declared_tensors(path: str | Path) -> Declared:
    """``{name: (shape, dtype)}`` of the state dict a checkpoint holds (dtype as torch names it:
    ``"float32"``), read from its header or simulated pickle without loading any tensor data, unwrapped as
    ``kegnet.checkpoint.read_state_dict`` unwraps it (one level of ``NESTED_KEYS``, a ``module.`` prefix).

    Call it after ``check_checkpoint_file`` passed (the structure is bounded then); raises
    ``CheckpointError`` when the file holds no state dict of tensors.
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):
        header, _ = _safetensors_header(path, path.stat().st_size)
        found: dict[Any, Any] = {k: (tuple(v["shape"]), _SAFETENSORS_DTYPES.get(v["dtype"], v["dtype"].lower()))
                                 for k, v in header.items() if k != "__metadata__"}
        return _unwrap_declared(found)
    if head.startswith(b"PK\x03\x04"):
        with zipfile.ZipFile(path) as zf:
            _, top = _archive_walk(zf, zf.infolist())
    else:
        _, top = _legacy_walk(path)
    return _unwrap_declared(_as_declared(top))


def _as_declared(obj: Any) -> Any:
    """A simulated object with its tensors as ``(shape, dtype)``: dicts one level deep (enough to unwrap)."""
    if not isinstance(obj, dict):
        return obj
    return {k: (v.shape, v.storage.dtype) if isinstance(v, _Tensor) else v for k, v in obj.items()}


def _is_declared(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple)


def _unwrap_declared(obj: Any) -> Declared:
    """``kegnet.checkpoint._unwrap`` on declared tensors: the same nesting, checks and messages."""
    if isinstance(obj, dict) and not any(_is_declared(v) for v in obj.values()):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = _as_declared(obj[key])
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"the checkpoint does not hold a state dict of tensors; {HOW_TO_SAVE}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not _is_declared(v)]
    if bad:
        raise CheckpointError(f"the state dict has non-tensor entries: {', '.join(bad[:5])}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)
