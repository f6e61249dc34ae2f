"""Where the student's training inputs come from: KegNet generators, or the paper's noise baselines."""

from __future__ import annotations

import math

import torch
from torch import nn

from kegnet.generation.codes import CODE_SCHEMES, draw_codes


class Sampler:
    """Draws ``(x, labels)`` batches; ``labels`` is None when the source has no class in mind."""

    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @torch.no_grad()
    def sample_many(self, n: int, rng: torch.Generator, chunk: int = 4096
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` samples drawn ``chunk`` at a time (a transfer set or an exam: bounded peak memory)."""
        xs, ys = [], []
        for start in range(0, n, chunk):
            x, y = self.sample(min(chunk, n - start), rng)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), (None if ys[0] is None else torch.cat(ys))


class KegNetSampler(Sampler):
    """Equal shares from each trained generator, one code per sample; labels are each code's top class.

    ``codes`` is a scheme of ``kegnet.generation.codes``: ``"one_hot"`` asks each generator for one class
    (the paper); the mixing schemes ask for points between classes, near the teacher's decision boundaries.
    """

    def __init__(self, generators: list[nn.Module], num_classes: int, noise_dim: int, device: torch.device,
                 codes: str = "one_hot") -> None:
        if codes not in CODE_SCHEMES:
            raise ValueError(f"unknown class-code scheme {codes!r}; use one of {', '.join(CODE_SCHEMES)}")
        self.generators, self.num_classes, self.noise_dim, self.device = generators, num_classes, noise_dim, device
        self.codes = codes

    def with_codes(self, codes: str) -> KegNetSampler:
        """The same generators asked for another code scheme."""
        return KegNetSampler(self.generators, self.num_classes, self.noise_dim, self.device, codes)

    @torch.no_grad()
    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        per = math.ceil(n / len(self.generators))
        xs, ys = [], []
        for g in self.generators:
            codes = draw_codes(self.codes, per, self.num_classes, rng, self.device)
            xs.append(g(codes, torch.randn(per, self.noise_dim, generator=rng, device=self.device)))
            ys.append(codes.argmax(1))
        perm = torch.randperm(per * len(self.generators), generator=rng, device=self.device)[:n]
        return torch.cat(xs)[perm], torch.cat(ys)[perm]


class NoiseSampler(Sampler):
    """The paper's baselines: standard Gaussian, or uniform with unit variance (U(-√3, √3))."""

    def __init__(self, kind: str, input_shape: tuple[int, ...], device: torch.device) -> None:
        if kind not in ("gaussian", "uniform"):
            raise ValueError(kind)
        self.kind, self.input_shape, self.device = kind, input_shape, device

    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, None]:
        shape = (n, *self.input_shape)
        if self.kind == "gaussian":
            return torch.randn(shape, generator=rng, device=self.device), None
        return (torch.rand(shape, generator=rng, device=self.device) * 2 - 1) * math.sqrt(3), None


class MixedSampler(Sampler):
    """``share`` of each batch from ``other``, the rest from ``main`` (labels only if both give them).

    Used to add Gaussian noise to KegNet samples: on the pendigits MLP, noise alone taught the student
    better than one-hot generator samples did (those sit far from the decision boundaries).
    """

    def __init__(self, main: Sampler, other: Sampler, share: float) -> None:
        self.main, self.other, self.share = main, other, share

    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        k = round(n * self.share)
        x_main, y_main = self.main.sample(n - k, rng)
        if k == 0:
            return x_main, y_main
        x_other, y_other = self.other.sample(k, rng)
        labels = None if y_main is None or y_other is None else torch.cat([y_main, y_other])
        return torch.cat([x_main, x_other]), labels
