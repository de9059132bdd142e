"""Layers that pyibp adds to the ones PyTorch has."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """Per-channel input normalisation ``(x - mean) / std`` as a layer.

    Keeping the preprocessing inside the model lets bounds be stated in pixel space
    (``lower=0, upper=1``) while the network sees normalised inputs.

    Args:
        mean, std: one value per channel (C,); std must be non-zero.
    Shapes:
        (B, C, *) -> (B, C, *).
    Example:
        >>> model = nn.Sequential(Normalize([0.1307], [0.3081]), nn.Flatten(), nn.Linear(784, 10))
    """

    def __init__(self, mean: Union[Sequence[float], Tensor], std: Union[Sequence[float], Tensor]):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.shape != std.shape:
            raise ValueError(f"mean and std must have one value per channel each, got {tuple(mean.shape)} "
                             f"and {tuple(std.shape)}")
        if (std == 0).any():
            raise ValueError(f"std must be non-zero, got {std.tolist()}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """``(1 / std, -mean / std)``: the layer as the per-channel affine map ``x * scale + shift``."""
        return 1.0 / self.std, -self.mean / self.std

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.reshape(shape)) / self.std.reshape(shape)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


class Residual(nn.Module):
    """A residual block ``body(x) + shortcut(x)`` as a layer, for building ResNets as nn.Sequential.

    ``body`` and ``shortcut`` are any modules (``shortcut=None`` is the identity). It is an
    ordinary module to pyibp's bounds: its forward is traced like any other (a ``+`` of two
    branches), so a block written inline in a forward (``out + self.shortcut(x)``) is bounded
    the same way.

    Shapes:
        (B, *) -> the shape of ``body``'s output, which must equal ``shortcut``'s.
    Example:
        >>> block = Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)))
        >>> block(torch.rand(2, 8, 6, 6)).shape
        torch.Size([2, 8, 6, 6])
    """

    def __init__(self, body: nn.Module, shortcut: Optional[nn.Module] = None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.shortcut(x)
