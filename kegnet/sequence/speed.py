"""How fast a sequence model decodes, and its ``torch.export`` program."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from kegnet.spec import SequenceSpec


def export_program(student: nn.Module, tokens: SequenceSpec, path: Path) -> None:
    """A ``torch.export`` program of the student's forward pass on the CPU: ``tokens (B, T) -> (B, T, V)``,
    batch and length dynamic (T up to ``max_length``)."""
    model = student.cpu().eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    length = torch.export.Dim("length", min=1, max=tokens.max_length)
    example = torch.full((2, min(4, tokens.max_length)), tokens.bos_id, dtype=torch.long)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch, 1: length},))
    torch.export.save(program, str(path))


@torch.inference_mode()
def decode_speed(model: nn.Module, tokens: SequenceSpec, device: torch.device, *, batch: int = 64,
                 repeats: int = 3) -> dict[str, float]:
    """Greedy decoding of ``max_length`` tokens from BOS, EOS ignored (so teacher and student decode the same
    number of steps, whatever they generate), fastest of ``repeats``: sequences and tokens per second at batch
    1 and at ``batch``. With the model's key-value cache when it has one (as ``kegnet.sequence.generate``
    decodes), else re-running the prefix every step."""
    model.eval()
    cached = callable(getattr(model, "new_cache", None)) and callable(getattr(model, "step", None))
    out = {}
    for b in (1, batch):
        best = float("inf")
        for _ in range(repeats):
            nxt = torch.full((b, 1), tokens.bos_id, dtype=torch.long, device=device)
            seq, cache = nxt, model.new_cache(b, device=device) if cached else None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            while seq.shape[1] < tokens.max_length:
                logits = model.step(nxt, cache) if cached else model(seq)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        out[f"batch{b}_sequences_per_s"] = b / best
        out[f"batch{b}_tokens_per_s"] = b * (tokens.max_length - 1) / best
    return out
