"""Word-level, sequence-level and Word+Seq KD for autoregressive students, and the distillation loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kegnet.errors import Cancelled
from kegnet.sequence.distill import cosine_lr, distill_sequence
from kegnet.sequence.objectives import distill_loss, sequence_kd_loss, shift, target_mask, word_kd_loss

V, L = 12, 8
PAD, BOS, EOS = 0, 1, 2
CPU = torch.device("cpu")


class TinyCausal(nn.Module):
    """Embedding + GRU + linear head: causal by construction. Shapes: (B, T) -> (B, T, V)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


def _model(seed: int, width: int = 16) -> TinyCausal:
    torch.manual_seed(seed)
    return TinyCausal(width)


def _sequences(n: int, seed: int) -> torch.Tensor:
    """Random right-padded sequences: BOS, 2..6 tokens from 3..V-1, EOS, then PAD. Shape (n, L)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((n, L), PAD, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(2, L - 1, (1,), generator=g))
        out[i, 0] = BOS
        out[i, 1:k] = torch.randint(3, V, (k - 1,), generator=g)
        out[i, k] = EOS
    return out


@torch.no_grad()
def _greedy(model: nn.Module, n: int) -> torch.Tensor:
    """Free-running greedy decodes after a prompt (BOS, token i % 9 + 3: diverse), padded after EOS. Shape (n, L)."""
    seq = torch.stack([torch.full((n,), BOS), torch.arange(n) % (V - 3) + 3], 1)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(L - 2):
        nxt = model(seq)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        done |= nxt == EOS
        seq = torch.cat([seq, nxt[:, None]], 1)
    return seq


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seq = _sequences(16, seed)
    inputs, targets = shift(seq)
    return inputs, targets, target_mask(seq, pad_id=PAD, eos_id=EOS)


def test_target_mask_excludes_prefix_padding_and_what_follows_eos() -> None:
    seq = torch.tensor([[BOS, 5, 6, EOS, PAD, PAD], [BOS, 5, EOS, 7, EOS, PAD]])
    mask = target_mask(seq, pad_id=PAD, eos_id=EOS)
    assert mask.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    prefixed = target_mask(seq, pad_id=PAD, eos_id=EOS, prefix_len=2)
    assert prefixed.tolist() == [[False, True, True, False, False], [False, True, False, False, False]]
    # padding with EOS, and a start token equal to EOS: the first EOS after the prefix is still a target
    assert target_mask(torch.tensor([[BOS, 5, EOS, EOS, EOS]]), pad_id=EOS, eos_id=EOS).tolist() == [
        [True, True, False, False]]
    assert target_mask(torch.tensor([[EOS, 5, 6, EOS, EOS]]), pad_id=EOS, eos_id=EOS).tolist() == [
        [True, True, True, False]]
    assert target_mask(seq, pad_id=None, eos_id=None).all()
    with pytest.raises(ValueError, match="prefix_len"):
        target_mask(seq, pad_id=PAD, eos_id=EOS, prefix_len=0)


def test_word_kd_is_zero_for_the_teacher_itself_and_positive_otherwise() -> None:
    inputs, _, mask = _batch()
    teacher, student = _model(0), _model(1)
    with torch.no_grad():
        t = teacher(inputs)
        assert word_kd_loss(t, t.clone(), mask, 2.0).abs().item() < 1e-6
        assert word_kd_loss(student(inputs), t, mask, 2.0).item() > 1e-3


def test_word_kd_carries_the_temperature_squared() -> None:
    inputs, _, mask = _batch()
    with torch.no_grad():
        s, t = _model(1)(inputs) * 5, _model(0)(inputs) * 5
    for temp in (0.5, 2.0, 4.0):
        plain = word_kd_loss(s / temp, t / temp, mask, 1.0)  # the KL between the softened distributions
        torch.testing.assert_close(word_kd_loss(s, t, mask, temp), plain * temp**2)


@pytest.mark.parametrize("objective", ["word", "sequence", "both"])
def test_logits_at_masked_positions_do_not_change_the_loss(objective: str) -> None:
    inputs, targets, mask = _batch()
    with torch.no_grad():
        s, t = _model(1)(inputs), _model(0)(inputs)
    before = distill_loss(objective, s, t, targets, mask, temperature=2.0)["loss"]
    noise = torch.randn(s.shape, generator=torch.Generator().manual_seed(3)) * 100
    off = ~mask[..., None]
    after = distill_loss(objective, s + noise * off, t - noise * off, targets, mask, temperature=2.0)["loss"]
    torch.testing.assert_close(before, after)
    assert before.item() > 0
    empty = distill_loss(objective, s.requires_grad_(), t, targets, torch.zeros_like(mask))["loss"]
    assert empty.item() == 0 and empty.requires_grad  # a batch with no target still backpropagates


def test_both_interpolates_the_two_terms() -> None:
    inputs, targets, mask = _batch()
    with torch.no_grad():
        s, t = _model(1)(inputs), _model(0)(inputs)
    terms = distill_loss("both", s, t, targets, mask, temperature=2.0, word_weight=0.3)
    torch.testing.assert_close(terms["word"], word_kd_loss(s, t, mask, 2.0))
    torch.testing.assert_close(terms["sequence"], sequence_kd_loss(s, targets, mask))
    torch.testing.assert_close(terms["loss"], 0.3 * terms["word"] + 0.7 * terms["sequence"])


@pytest.mark.parametrize("objective", ["word", "sequence", "both"])
def test_each_objective_decreases_on_a_fixed_batch(objective: str) -> None:
    teacher, student = _model(0), _model(1)
    beams = _greedy(teacher, 16)  # stands in for the beam outputs: the teacher's own high-probability sequences
    seq = _sequences(16, 5) if objective == "word" else beams
    inputs, targets = shift(seq)
    mask = target_mask(seq, pad_id=PAD, eos_id=EOS, prefix_len=1 if objective == "word" else 2)
    with torch.no_grad():
        t = teacher(inputs)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = distill_loss(objective, student(inputs), t, targets, mask, temperature=2.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _run(seed: int = 0, **kwargs: object) -> tuple[nn.Module, object]:
    teacher, student = _model(0), _model(1, width=8)
    args = dict(objective="sequence", beams=_greedy(teacher, 32), pad_id=PAD, eos_id=EOS, prefix_len=2, steps=30,
                batch_size=8,
                lr=1e-2, eval_every=10, score=lambda s: 0.0, device=CPU, seed=seed)
    args.update(kwargs)
    return student, distill_sequence(student, teacher, **args)


def test_the_loop_keeps_the_best_scoring_state() -> None:
    scores = iter([0.1, 0.3, 0.9, 0.2, 0.4, 0.5])  # steps 0, 10, 20, 30, 40, 50: the peak is at step 20
    snapshots: list[dict[str, torch.Tensor]] = []

    def score(student: nn.Module) -> float:
        assert not student.training
        snapshots.append({k: v.clone() for k, v in student.state_dict().items()})
        return next(scores)

    events: list[tuple[int, int, dict[str, float]]] = []
    student, result = _run(steps=50, score=score, progress=lambda *e: events.append(e))
    assert result.best_step == 20 and result.best_score == 0.9 and result.initial_score == 0.1
    assert [s for s, _ in result.score_curve] == [0, 10, 20, 30, 40, 50]
    assert [s for s, _ in result.loss_curve] == [10, 20, 30, 40, 50]
    assert result.loss_curve[-1][1] < result.loss_curve[0][1]
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, snapshots[2][k])
    assert [e[0] for e in events] == [0, 10, 20, 30, 40, 50] and all(e[1] == 50 for e in events)
    assert {"loss", "score", "lr", "sequence"} <= set(events[1][2])


def test_word_and_both_train_through_the_loop() -> None:
    _, word = _run(objective="word", beams=None, samples=_sequences(32, 1), prefix_len=1, temperature=2.0)
    _, both = _run(objective="both", word_weight=0.5, temperature=2.0)
    assert word.loss_curve[-1][1] < word.loss_curve[0][1] and both.loss_curve[-1][1] < both.loss_curve[0][1]
    with pytest.raises(ValueError, match="needs samples"):
        _run(objective="word")
    with pytest.raises(ValueError, match="beam outputs only"):
        _run(objective="both", samples=_sequences(4, 1))


def test_cancel_raises_between_steps() -> None:
    calls = iter(range(100))
    with pytest.raises(Cancelled):
        _run(should_cancel=lambda: next(calls) >= 3)
    assert next(calls) == 4  # checked before steps 1..4, the fourth asked to stop


def test_the_same_seed_gives_the_same_student() -> None:
    a, ra = _run(seed=7)
    b, rb = _run(seed=7)
    c, rc = _run(seed=8)
    assert ra.loss_curve == rb.loss_curve and ra.loss_curve != rc.loss_curve
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)


def test_cosine_schedule_warms_up_then_decays() -> None:
    assert cosine_lr(0, 100, 1.0) == 1.0 and cosine_lr(99, 100, 1.0, min_lr=0.1) < 0.11
    assert cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1) and cosine_lr(10, 100, 1.0, warmup=10) == 1.0
