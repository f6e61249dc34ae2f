"""The G2P teacher: a decoder-only Transformer language model of CMUdict entries, trained here and cached.

Recipe (bounded for one CPU thread, about 20 minutes): ``DecoderTransformer`` (``ARCH``: d_model 128, 3 layers,
4 heads, d_ff 512, tied embeddings, no dropout) trained on the train split's whole sequences ``BOS letters SEP
phonemes EOS`` with next-token cross-entropy over every non-pad target (letters included, so the model's own
samples from BOS look like dictionary entries: the data-free pipeline samples from it). AdamW (betas 0.9 /
0.98, weight decay 0.01), linear warm-up then cosine decay to a tenth of the peak rate, batch 128 over
shuffled epochs, each batch trimmed to its longest row. Every ``eval_every`` steps the greedy word accuracy on
a fixed subset of the validation split (``eval_words`` words, decoded after ``BOS letters SEP``) is measured
and the best checkpoint is kept (model selection on validation only; the test split is never read here).

Teachers (``TEACHERS``): ``base`` (``ARCH``, the benchmark's main teacher) and ``small`` (d_model 64, 4 layers,
4 heads: another shape, deeper and narrower, so defaults are not read off one model). Cached as
``bench/results/teachers/g2p-transformer-seed{seed}.safetensors`` (``base``) or
``g2p-transformer-{name}-seed{seed}.safetensors`` with a JSON sidecar (arch, steps, training seconds, train
size, validation accuracy, torch version); ``g2p_teacher`` reloads it instead of training again.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from safetensors.torch import load_file, save_file
from torch import nn

from bench.g2p.data import BOS, EOS, PAD, SEP, VOCAB_SIZE, G2PData, load_g2p
from bench.g2p.metrics import G2PScore, after_prefix, score
from kegnet.models import create_model
from kegnet.sequence.generate import beam_search, greedy_decode

log = logging.getLogger(__name__)

CACHE = Path(__file__).resolve().parent.parent / "results" / "teachers"
ARCH: dict[str, Any] = {"n_layers": 3, "n_heads": 4, "d_model": 128}
TEACHERS: dict[str, dict[str, Any]] = {"base": ARCH, "small": {"n_layers": 4, "n_heads": 4, "d_model": 64}}
MAX_LENGTH = 35  # seq_len() with the default 16 letters / 16 phones
SPECIAL_IDS: dict[str, int] = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "sep_id": SEP}


def sequence_spec(max_length: int = MAX_LENGTH) -> dict[str, int]:
    """``ModelSpec.sequence`` of a G2P model: vocabulary, maximum length, special tokens."""
    return {"vocab_size": VOCAB_SIZE, "max_length": max_length, **SPECIAL_IDS}


def build_model(arch: dict[str, Any] | None = None, max_length: int = MAX_LENGTH) -> nn.Module:
    """A fresh ``DecoderTransformer`` of ``arch`` (default ``ARCH``) over the G2P vocabulary."""
    return create_model("transformer", vocab_size=VOCAB_SIZE, max_length=max_length, **(arch or ARCH))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``(B, L)`` right-padded sequences over every non-pad target."""
    width = int((batch != PAD).sum(1).max())
    batch = batch[:, :width]
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), ignore_index=PAD)


def evaluate(model: nn.Module, data: G2PData, split: str, words: int | None = None, beam: int = 0,
             batch_size: int = 1024) -> G2PScore:
    """Word accuracy and PER on the first ``words`` words (None: all) of ``split``: greedy (``beam`` 0 or 1)
    or beam search of width ``beam``, decoding after ``BOS letters SEP``."""
    pre = data.prefixes(split)
    n = len(pre.references) if words is None else min(words, len(pre.references))
    return decode_score(model, pre.tokens[:n], pre.lengths[:n], pre.references[:n], data.seq_len, beam, batch_size)


def decode_score(model: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor, references: list[list[int]],
                 max_length: int, beam: int = 0, batch_size: int = 1024) -> G2PScore:
    """Decode right-padded prefixes ``(N, P)`` with ``lengths`` (greedy or beam ``beam``) and score."""
    kw = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_length": max_length, "device": "cpu"}
    if beam > 1:
        out = beam_search(model, tokens, lengths, beam_size=beam, batch_size=batch_size, **kw)
    else:
        out = greedy_decode(model, tokens, lengths, batch_size=batch_size, **kw)
    return score(after_prefix(out.tokens, out.prefix_lengths), references)


def train_teacher(data: G2PData, seed: int = 0, arch: dict[str, Any] | None = None, steps: int = 3000,
                  batch: int = 128, lr: float = 2e-3, warmup: int = 200, weight_decay: float = 0.01,
                  eval_every: int = 250, eval_words: int = 500, time_budget_s: float | None = None,
                  limit: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train a teacher on ``data``'s train split (the first ``limit`` rows, if given); returns the best
    validation checkpoint (eval mode) and its figures. ``time_budget_s`` stops early (after an evaluation)."""
    arch = dict(arch or ARCH)
    torch.manual_seed(seed)
    model = build_model(arch, data.seq_len)
    x = data.sequences["train"] if limit is None else data.sequences["train"][:limit]
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warmup = min(warmup, max(1, steps // 10))

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    epochs = -(-steps * batch // len(x))
    order = torch.cat([torch.randperm(len(x), generator=gen) for _ in range(epochs)])[: steps * batch]
    best: dict[str, Any] = {"accuracy": -1.0}
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    train_s = 0.0
    done = 0
    for i, idx in enumerate(order.split(batch)):
        t_step = time.perf_counter()
        model.train()
        loss = lm_loss(model, x[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t_step
        done = i + 1
        last = done == steps
        over = time_budget_s is not None and time.perf_counter() - t0 >= time_budget_s
        if done % eval_every == 0 or last or over:
            s = evaluate(model, data, "validation", eval_words)
            history.append({"step": done, "loss": loss.item(), "val_word_accuracy": s.word_accuracy,
                            "val_per": s.per, "seconds": time.perf_counter() - t0})
            log.info("teacher step %d/%d loss %.3f val acc %.4f PER %.4f (%.0fs)", done, steps, loss.item(),
                     s.word_accuracy, s.per, time.perf_counter() - t0)
            if s.word_accuracy > best["accuracy"]:
                best = {"accuracy": s.word_accuracy, "per": s.per, "step": done,
                        "state": copy.deepcopy(model.state_dict())}
            if over:
                log.info("time budget %.0fs reached after %d steps", time_budget_s, done)
                break
        elif done % 50 == 0:
            log.info("teacher step %d/%d loss %.3f (%.0fs)", done, steps, loss.item(), time.perf_counter() - t0)
    model.load_state_dict(best["state"])
    model.eval()
    figures = {
        "arch": "transformer", "arch_kwargs": arch, "sequence": sequence_spec(data.seq_len),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": seed, "steps_planned": steps, "steps_run": done, "best_step": best["step"], "batch": batch,
        "lr": lr, "warmup": warmup, "weight_decay": weight_decay, "train_size": len(x),
        "epochs_seen": done * batch / len(x), "train_seconds": time.perf_counter() - t0,
        "train_step_seconds": train_s, "eval_words": eval_words,
        "val_word_accuracy": best["accuracy"], "val_per": best["per"], "history": history,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    return model, figures


def cache_path(seed: int = 0, name: str = "base") -> Path:
    return CACHE / (f"g2p-transformer-seed{seed}.safetensors" if name == "base"
                    else f"g2p-transformer-{name}-seed{seed}.safetensors")


def g2p_teacher(seed: int = 0, data: G2PData | None = None, name: str = "base",
                **train_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The cached teacher ``name`` (of ``TEACHERS``) for ``seed`` (trained and cached on first use) and its
    sidecar figures."""
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; choose from {', '.join(TEACHERS)}")
    path = cache_path(seed, name)
    sidecar = path.with_suffix(".json")
    if not path.exists():
        data = data or load_g2p()
        model, figures = train_teacher(data, seed, arch=TEACHERS[name], **train_kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"arch_kwargs": json.dumps(figures["arch_kwargs"])})
        tmp.replace(path)
        sidecar.write_text(json.dumps(figures, indent=2) + "\n")
        return model, figures
    figures = json.loads(sidecar.read_text())
    model = build_model(figures["arch_kwargs"], figures["sequence"]["max_length"])
    model.load_state_dict(load_file(str(path)))
    return model.eval(), figures


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.g2p.teacher [--teacher NAME] [--steps N] [--budget S] [--measure N]``: train and cache
    the teacher, or (``--measure N``) time N training steps and exit."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", default="base", choices=sorted(TEACHERS))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--budget", type=float, default=None, help="stop after this many seconds (after an eval)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-words", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--measure", type=int, default=0, help="time this many steps, print s/step, exit")
    p.add_argument("--test-words", type=int, default=0, help="after training, score this many test words")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    data = load_g2p()
    if args.measure:
        model = build_model(TEACHERS[args.teacher])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        for warm in (True, False):
            t0 = time.perf_counter()
            for _ in range(3 if warm else args.measure):
                idx = torch.randint(len(data.sequences["train"]), (128,), generator=gen)
                loss = lm_loss(model, data.sequences["train"][idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        per = (time.perf_counter() - t0) / args.measure
        t0 = time.perf_counter()
        evaluate(model, data, "validation", args.eval_words)
        print(f"{per:.3f} s/step ({1 / per:.2f} steps/s); eval of {args.eval_words} words "
              f"{time.perf_counter() - t0:.1f}s; params {sum(q.numel() for q in model.parameters())}")
        return
    model, figures = g2p_teacher(args.seed, data, args.teacher, steps=args.steps, time_budget_s=args.budget,
                                 eval_every=args.eval_every, eval_words=args.eval_words)
    print(json.dumps({k: v for k, v in figures.items() if k != "history"}, indent=2))
    if args.test_words:
        for beam in (1, 5):
            s = evaluate(model, data, "test", args.test_words, beam=beam)
            print(f"test ({s.words} words) beam {beam}: word accuracy {s.word_accuracy:.4f} PER {s.per:.4f}")


if __name__ == "__main__":
    main()
