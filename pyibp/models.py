"""Models used by the tutorial and the certified-training literature, as plain nn.Sequential."""
from __future__ import annotations

from torch import nn

__all__ = ["tutorial_cnn", "cifar_cnn"]


def tutorial_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """The CNN of "Adversarial Robustness: Theory and Practice", chapter 4 (``model_cnn``).

    Conv 32 - Conv 32 stride 2 - Conv 64 - Conv 64 stride 2 (3x3, padding 1), Linear 100, Linear 10.

    Shapes:
        (B, 1, 28, 28) -> (B, 10).
    Example:
        >>> tutorial_cnn()(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * side * side, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def cifar_cnn(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> nn.Sequential:
    """A CIFAR-size CNN: 4 convolutions (64-64s2-128-128s2) and 2 linear layers (512, 10).

    Shapes:
        (B, 3, 32, 32) -> (B, 10).
    Example:
        >>> cifar_cnn()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128 * side * side, 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )
