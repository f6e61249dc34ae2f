"""Tiny teachers for the peer tests: a BatchNorm convnet on 1×8×8 images and an MLP on 6 features."""

import pytest
import torch
from torch import nn

from kegnet import ClassifierConfig


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


def _eval_with_stats(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Running statistics that are not the defaults (0 and 1), as a trained teacher's would be."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(32, *shape) * 2 + 0.5)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _warm_optimizers() -> None:
    """torch's first optimizer imports its compiler stack (about 2 s here): paid before a peer's clock runs,
    as the bench pays it in the KegNet run before the peers."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


@pytest.fixture
def conv_teacher() -> nn.Module:
    return _eval_with_stats(TinyConvNet(), (1, 8, 8))


@pytest.fixture
def mlp_teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def config(layers: list[str]) -> ClassifierConfig:
    """Explicit ranks on ``layers``, slower layers kept (as the suite compresses)."""
    return ClassifierConfig.from_preset("fast", compression={
        "layers": layers, "rank_method": "explicit", "ranks": {name: [2, 2] for name in layers},
        "keep_slower": True})
