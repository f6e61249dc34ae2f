"""Uploads are inspected before any reader allocates what they declare (kegnet.file_safety.check_checkpoint_file)."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kegnet import CheckpointError, file_safety, read_state_dict
from kegnet.file_safety import check_checkpoint_file
from tests.conftest import MNIST_TEACHER, needs_shared


def _state(numel: int = 16) -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(numel), "b": torch.ones(3)}


def _no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must not read this file")

    monkeypatch.setattr(torch, "load", refuse)


def _rezip(src: Path, dst: Path, compress_type: int) -> Path:
    """The same archive with every entry stored with ``compress_type`` (torch.load still reads it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compress_type) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return dst


def test_empty_truncated_and_foreign_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        check_checkpoint_file(empty)
    good = tmp_path / "good.pt"
    torch.save(_state(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        check_checkpoint_file(cut)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="neither safetensors nor"):
        check_checkpoint_file(text)


def test_deflated_archive_is_refused_before_torch_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain.pt"
    torch.save(_state(1 << 20), plain)  # 4 MiB of zeros
    bomb = _rezip(plain, tmp_path / "bomb.pt", zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 64 * 1024
    assert torch.load(bomb, weights_only=True)["w"].numel() == 1 << 20  # torch would inflate it
    _no_torch_load(monkeypatch)
    with pytest.raises(CheckpointError, match="compressed entries .*torch.save never writes"):
        read_state_dict(bomb, max_bytes=1 << 30)


def test_stored_archive_over_the_budget_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.pt"
    torch.save(_state(4096), path)
    assert read_state_dict(path, max_bytes=1 << 20)["w"].numel() == 4096
    _no_torch_load(monkeypatch)
    with pytest.raises(CheckpointError, match="above this service's limit of 10,000"):
        read_state_dict(path, max_bytes=10_000)


def test_archive_pickle_and_entry_count_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.pt"
    torch.save(_state(), path)
    with zipfile.ZipFile(path) as zf:
        assert file_safety._zip_entry_count(path, path.stat().st_size) == len(zf.infolist())
    _no_torch_load(monkeypatch)
    monkeypatch.setattr(file_safety, "MAX_PICKLE_BYTES", 64)
    with pytest.raises(CheckpointError, match=r"structure \(m/data.pkl\) is .* above the limit of 64"):
        read_state_dict(path)
    monkeypatch.setattr(file_safety, "MAX_ARCHIVE_ENTRIES", 3)
    with pytest.raises(CheckpointError, match="entries, above the limit of 3"):
        read_state_dict(path)


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(("header", "data", "needle"), [
    ({"w": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 16]}}, bytes(16), "declares 1,073,741,824"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(32), "declare 16 bytes of data but"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "v": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24), "declares 16|overlap"),
    ({"w": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}, bytes(16), "unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}}, bytes(16), "outside the file"),
])
def test_safetensors_header_must_match_the_file(tmp_path: Path, header: dict, data: bytes, needle: str) -> None:
    path = _safetensors(tmp_path / "m.safetensors", header, data)
    with pytest.raises(CheckpointError, match=needle):
        read_state_dict(path, max_bytes=1 << 30)


def test_safetensors_over_the_budget_and_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_state(1024), str(path))
    assert read_state_dict(path, max_bytes=1 << 20)["w"].numel() == 1024
    with pytest.raises(CheckpointError, match="above this service's limit of 2,000"):
        read_state_dict(path, max_bytes=2000)


def _legacy_file(path: Path, numel: int) -> Path:
    """A pre-zip torch.save file whose object pickle declares a float storage of ``numel`` elements but whose
    data section holds 4 (torch.load allocates the declared size before it reads the data)."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    marker = object()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj is marker else None

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (marker, 0, (4,), (1,), False, OrderedDict()))

    with path.open("wb") as f:
        pickle.dump(MAGIC_NUMBER, f, protocol=2)
        pickle.dump(PROTOCOL_VERSION, f, protocol=2)
        pickle.dump({"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        Pickler(f, protocol=2).dump({"w": Tensor()})
        pickle.dump(["0"], f, protocol=2)
        f.write(struct.pack("<q", 4) + bytes(16))
    return path


def test_legacy_pickle_declaring_huge_storages_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = _legacy_file(tmp_path / "ok.pt", 4)
    assert read_state_dict(small)["w"].shape == (4,)
    bomb = _legacy_file(tmp_path / "bomb.pt", 1 << 28)
    _no_torch_load(monkeypatch)
    with pytest.raises(CheckpointError, match="declares 1,073,741,824 bytes of tensors, above"):
        read_state_dict(bomb, max_bytes=1 << 20)


def test_legacy_torch_save_files_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4).half()}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert check_checkpoint_file(path) == "legacy"
    assert file_safety._legacy_storage_bytes(path) == 4 * 27 * 4 + 4 * 2
    loaded = read_state_dict(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@needs_shared(MNIST_TEACHER)
def test_the_papers_legacy_teacher_fits_its_own_size() -> None:
    assert file_safety._legacy_storage_bytes(MNIST_TEACHER) <= MNIST_TEACHER.stat().st_size
    assert check_checkpoint_file(MNIST_TEACHER, max_bytes=MNIST_TEACHER.stat().st_size) == "legacy"


def _programs(tmp_path: Path) -> dict[str, Path]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    torch.jit.save(torch.jit.script(model), tmp_path / "ts.pt")
    torch.export.save(torch.export.export(model, (torch.zeros(2, 4),)), tmp_path / "m.pt2")
    return {"TorchScript archive": tmp_path / "ts.pt", "torch.export program": tmp_path / "m.pt2"}


def test_programs_are_named_refused_and_never_get_torchs_advice(tmp_path: Path) -> None:
    for what, path in _programs(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            read_state_dict(path)
        message = str(info.value)
        assert f"is a {what}" in message and "carry code" in message
        assert "state_dict" in message and "safetensors" in message and 'arch "onnx"' in message
        assert "weights_only" not in message and "truncated" not in message


def test_torchs_own_message_is_never_passed_on(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(_state(), good)
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(tmp_path / "nopkl.pt", "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("data.pkl"):
                zout.writestr(info, zin.read(info.filename))
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "nopkl.pt")
    message = str(info.value)
    assert "truncated or damaged" in message
    assert "miniz" not in message and "weights_only" not in message and "PytorchStreamReader" not in message


def test_overlapping_entries_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second central-directory record pointing at the same stored data (entries that overlap) makes the
    archive declare more bytes than it holds: each copy would be read again."""
    path = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(4096)}, path)
    raw = bytearray(path.read_bytes())
    eocd = raw.rfind(b"PK\x05\x06")
    (cd_size, cd_offset) = struct.unpack_from("<LL", raw, eocd + 12)
    central = bytes(raw[cd_offset:cd_offset + cd_size])
    at = central.find(b"m/data/0") - 46
    name_len, extra_len, comment_len = struct.unpack_from("<HHH", central, at + 28)
    record = bytearray(central[at:at + 46 + name_len + extra_len + comment_len])
    record[46:46 + name_len] = b"m/data/9"
    central += bytes(record)
    count = struct.unpack_from("<H", raw, eocd + 10)[0] + 1
    tail = bytearray(raw[eocd:eocd + 22])
    struct.pack_into("<HHLL", tail, 8, count, count, len(central), cd_offset)
    path.write_bytes(bytes(raw[:cd_offset]) + central + bytes(tail))
    with zipfile.ZipFile(path) as zf:
        assert [i.filename for i in zf.infolist()].count("m/data/9") == 1
    _no_torch_load(monkeypatch)
    with pytest.raises(CheckpointError, match="declare more bytes .* than the file holds"):
        read_state_dict(path, max_bytes=1 << 30)


def test_declared_tensors_reads_names_shapes_and_dtypes_without_loading(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"conv.weight": torch.zeros(4, 3, 3, 3), "conv.bias": torch.zeros(4).half(), "n": torch.tensor(3)}
    expected = {"conv.weight": ((4, 3, 3, 3), "float32"), "conv.bias": ((4,), "float16"), "n": ((), "int64")}
    zipped, legacy, nested, st = (tmp_path / n for n in ("z.pt", "l.pt", "n.pt", "s.safetensors"))
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, nested)
    save_file(state, str(st))
    _no_torch_load(monkeypatch)
    for path in (zipped, legacy, nested, st):
        check_checkpoint_file(path)
        assert file_safety.declared_tensors(path) == expected, path


@pytest.mark.parametrize("make", [
    lambda: {"w": torch.zeros(1).expand(64, 64)},  # stride 0
    lambda: {"w": torch.zeros(8, 8)[2:]},  # an offset view
    lambda: {"w": torch.zeros(8, 8).t()},  # strided
    lambda: (lambda w: {"a": w[0], "b": w[1]})(torch.zeros(2, 4)),  # two tensors, one storage
])
def test_tensors_that_do_not_own_their_storage_are_refused(tmp_path: Path, make) -> None:
    path = tmp_path / "v.pt"
    torch.save(make(), path)
    with pytest.raises(CheckpointError, match="contiguous"):
        check_checkpoint_file(path)
    torch.save({k: v.contiguous().clone() for k, v in make().items()}, path)  # what the message advises
    check_checkpoint_file(path)
