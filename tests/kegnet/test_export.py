"""student.safetensors: the same student always gives the same bytes."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from kegnet.export import write_weights


def test_the_same_student_gives_the_same_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    # Several metadata keys: safetensors itself wrote them in a random order (one map per file).
    metadata = {f"key{i}": f'{{"value": {i}}}' for i in range(8)}
    files = [tmp_path / f"s{i}.safetensors" for i in range(6)]
    for path in files:
        write_weights(student, path, metadata)
    assert len({path.read_bytes() for path in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == metadata
        assert torch.equal(f.get_tensor("2.weight"), student[2].weight.detach())
