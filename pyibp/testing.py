"""Shared by the tests and the benchmarks: devices, dtypes, random architectures, box samplers."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .nn import Normalize

devices: List[torch.device] = [torch.device("cpu")] + (
    [torch.device("cuda")] if torch.cuda.is_available() else [])
float_dtypes: List[torch.dtype] = [torch.float32, torch.float64]

# Relative tolerances per dtype for comparing a fused kernel with its plain-PyTorch twin.
rtol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Gives every BatchNorm in ``model`` non-trivial running statistics and affine parameters
    (signs included), so that bounds through it are tested on more than the identity map."""
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            c = bn.num_features
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                bn.weight.copy_(torch.randn(c, generator=gen))
                bn.bias.copy_(torch.randn(c, generator=gen) * 0.5)
    return model


def random_model(seed: int, *, in_channels: int = 2, size: int = 8, num_classes: int = 5,
                 conv_blocks: int = 2, linear_blocks: int = 1, allow_pool: bool = True,
                 allow_batchnorm: bool = True, nest: bool = True) -> Tuple[nn.Sequential, Tuple[int, ...]]:
    """A random classifier using every layer pyibp supports, and its input shape (C, H, W).

    Layers and weights are drawn from ``seed`` alone (the global generator is neither read nor
    advanced), so a failing hypothesis example is reproducible: convolutions with random
    kernel/stride/padding/dilation/groups, optional BatchNorm (eval, with random statistics),
    ReLU, AvgPool/MaxPool, Flatten, Linear, Dropout, Identity, Normalize, and a nested Sequential.
    The model is returned in eval mode.

    Example:
        >>> model, shape = random_model(0)
        >>> model(torch.rand(3, *shape)).shape
        torch.Size([3, 5])
    """
    # The layers initialise their weights from the global generator: a fork of it seeded here.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _random_model(torch.Generator().manual_seed(seed), in_channels, size, num_classes, conv_blocks,
                             linear_blocks, allow_pool, allow_batchnorm, nest)


def _random_model(gen: torch.Generator, in_channels: int, size: int, num_classes: int, conv_blocks: int,
                  linear_blocks: int, allow_pool: bool, allow_batchnorm: bool,
                  nest: bool) -> Tuple[nn.Sequential, Tuple[int, ...]]:
    pick = lambda n: int(torch.randint(n, (1,), generator=gen))  # noqa: E731
    layers: List[nn.Module] = []
    if pick(2):
        layers.append(Normalize(torch.rand(in_channels, generator=gen) * 0.5,
                                torch.rand(in_channels, generator=gen) + 0.5))
    channels, side = in_channels, size
    for _ in range(conv_blocks):
        kernel, dilation = [1, 3][pick(2)], 1 + pick(2)
        padding, stride = pick(2), 1 + pick(2)
        extent = dilation * (kernel - 1)
        if side + 2 * padding - extent < 1:
            kernel, dilation, extent = 1, 1, 0
        out_channels = channels * (1 + pick(2)) if pick(3) == 0 else 2 + pick(4)
        groups = channels if out_channels % channels == 0 and pick(3) == 0 else 1
        layers.append(nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=padding,
                                dilation=dilation, groups=groups, bias=bool(pick(4))))
        side = (side + 2 * padding - extent - 1) // stride + 1
        channels = out_channels
        if allow_batchnorm and pick(3) == 0:
            layers.append(randomize_batchnorm(nn.BatchNorm2d(channels), gen))
        layers.append(nn.ReLU())
        if allow_pool and side >= 2 and pick(3) == 0:
            layers.append([nn.AvgPool2d, nn.MaxPool2d][pick(2)](2))
            side //= 2
    layers.append(nn.Flatten())
    features = channels * side * side
    for _ in range(linear_blocks):
        width = 3 + pick(8)
        layers.append(nn.Linear(features, width))
        features = width
        if allow_batchnorm and pick(3) == 0:
            layers.append(randomize_batchnorm(nn.BatchNorm1d(features), gen))
        layers.append(nn.ReLU())
        if pick(4) == 0:
            layers.append([nn.Dropout(0.5), nn.Identity()][pick(2)])
    layers.append(nn.Linear(features, num_classes))
    if nest and len(layers) > 3:
        cut = 1 + pick(len(layers) - 2)
        model = nn.Sequential(nn.Sequential(*layers[:cut]), *layers[cut:])
    else:
        model = nn.Sequential(*layers)
    return model.eval(), (in_channels, size, size)


def sample_box(x: Tensor, eps: Tensor, n: int, lower: float = 0.0, upper: float = 1.0,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """n points of each example's box ``x ± eps ∩ [lower, upper]``, half of them box vertices.

    Shapes:
        x (B, *), eps () or (B,) -> (n, B, *).
    """
    e = eps.reshape((-1,) + (1,) * (x.dim() - 1)) if eps.numel() > 1 else eps
    lo, hi = (x - e).clamp(min=lower), (x + e).clamp(max=upper)
    u = torch.rand((n,) + tuple(x.shape), generator=generator, dtype=x.dtype, device=x.device)
    u[: n // 2] = u[: n // 2].round()  # vertices: where the extremes of a piecewise-linear net lie
    return lo + (hi - lo) * u
