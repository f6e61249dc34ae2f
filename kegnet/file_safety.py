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

import json
import logging
import math
import pickletools
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from kegnet.errors import CheckpointError

log = logging.getLogger(__name__)

# Message parts shared with kegnet.checkpoint, whose readers fail with the same advice.
HOW_TO_SAVE = "save it with torch.save(model.state_dict(), path) or safetensors.torch.save_file"
DAMAGED = f"the checkpoint could not be read; it looks truncated or damaged; {HOW_TO_SAVE}"


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
                                  f"service's limit of {budget:,}; {HOW_TO_SAVE}")
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
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
        log.info("unreadable zip %s: %s", path.name, exc)
        raise CheckpointError(DAMAGED) from exc
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
    running them (``pickletools.genops`` and a small stack simulation).

    A legacy file is five pickles (magic number, protocol, system info, the object, the storage keys) and
    then the raw storages. torch.load allocates every storage at the size the object pickle declares
    (``("storage", type, key, location, numel, view)`` persistent ids) before reading its bytes: a 350-byte
    file can ask for any amount (measured with torch 2.14: untouched, so not resident, and a request above
    what the kernel grants fails cleanly; but it is bounded here all the same). The pickles together are
    bounded by ``MAX_PICKLE_BYTES``. Tar files (torch's first format) are refused.
    """
    if tarfile.is_tarfile(path):
        raise CheckpointError(f"the checkpoint is in torch's old tar format, which is not accepted; {HOW_TO_SAVE}")
    storages: dict[str, int] = {}  # root key -> bytes (views of one storage share its allocation)
    try:
        with path.open("rb") as f:
            for i in range(4):
                stack: list[Any] = []
                memo: dict[int, Any] = {}
                for op, arg, _ in pickletools.genops(f):
                    if f.tell() > MAX_PICKLE_BYTES:
                        raise CheckpointError(f"the checkpoint's pickled structure is above the limit of "
                                              f"{MAX_PICKLE_BYTES:,} bytes; {HOW_TO_SAVE}")
                    if i == 3:  # the object: follow the stack to read its persistent ids
                        pid = _simulate(op, arg, stack, memo)
                        if pid is not None:
                            key, nbytes = _declared_storage(pid)
                            storages[key] = max(storages.get(key, 0), nbytes)
    except CheckpointError:
        raise
    except (ValueError, EOFError, IndexError, KeyError, TypeError, struct.error) as exc:
        log.info("unreadable legacy pickle %s: %s", path.name, exc)
        raise CheckpointError(DAMAGED) from exc
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
