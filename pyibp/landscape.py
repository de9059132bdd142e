"""The loss surface around one input, the picture of the tutorial's chapter 4.

Along two directions through a test image ``x`` — the sign of the loss gradient at ``x`` (the
direction FGSM takes) and a random sign pattern — the cross-entropy is evaluated on a grid
``x + a·sign(∇ₓ loss) + b·r`` with ``a, b`` in ``[-ε, ε]``. A standard network's surface rises
steeply along the gradient sign; after adversarial or certified training it stays low and flat,
which is what robustness looks like from inside the ε-box.

Example:
    >>> surface = loss_surface(model, x[:1], y[:1], eps=0.1)
    >>> plot_surfaces([("standard", surface)], "loss.png")
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import eval_mode
from .runs import atomic_write

__all__ = ["Surface", "loss_surface", "plot_surfaces"]


@dataclass
class Surface:
    """A loss surface on a square grid.

    Attributes:
        a: (P,) offsets along the gradient sign.  b: (P,) offsets along the random sign.
        loss: (P, P) cross-entropy, ``loss[i, j]`` at ``x + a[j]·g + b[i]·r`` (meshgrid order).
        eps: the half-width of the grid.
    """

    a: Tensor
    b: Tensor
    loss: Tensor
    eps: float


def loss_surface(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, points: int = 41, seed: int = 0,
                 lower: Optional[float] = 0.0, upper: Optional[float] = 1.0, chunk: int = 1024) -> Surface:
    """Cross-entropy of ``model`` on the grid ``x + a·sign(∇ₓ CE(model(x), y)) + b·r``, ``a, b ∈ [-eps, eps]``.

    ``r`` is a random ±1 pattern from a generator seeded with ``seed`` (the same for every model,
    so that surfaces of several models share their directions). Points are clamped to
    ``[lower, upper]`` (the input domain the attacks and bounds use; pass None for the tutorial's
    unclamped grid). The model runs in eval mode; its modes are restored afterwards.

    Args:
        x: (1, *) one input.  y: (1,) its label.  points: grid points per axis (>= 2).
    Returns:
        :class:`Surface` with ``loss`` of shape (points, points), on the CPU.

    Equivalent to the tutorial's ``draw_loss``::

        g = torch.autograd.grad(F.cross_entropy(model(x), y), x)[0].sign()
        r = torch.randint(0, 2, x.shape).mul(2).sub(1)
        loss[i, j] = F.cross_entropy(model(x + a[j] * g + b[i] * r), y)

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        >>> s = loss_surface(model, torch.rand(1, 1, 28, 28), torch.tensor([3]), 0.1, points=5)
        >>> s.loss.shape
        torch.Size([5, 5])
    """
    if x.shape[0] != 1 or tuple(y.shape) != (1,):
        raise ValueError(f"x must hold one input (1, *) and y one label (1,), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    x = x.detach()
    with eval_mode(model):
        xg = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
        g = grad.sign()
        generator = torch.Generator().manual_seed(seed)
        r = (torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x)
        offsets = torch.linspace(-eps, eps, points, dtype=x.dtype, device=x.device)
        bb, aa = torch.meshgrid(offsets, offsets, indexing="ij")
        coeff_a, coeff_b = aa.reshape(-1), bb.reshape(-1)
        view = (-1,) + (1,) * (x.dim() - 1)
        losses = []
        with torch.no_grad():
            for start in range(0, coeff_a.numel(), chunk):
                ca, cb = coeff_a[start:start + chunk].reshape(view), coeff_b[start:start + chunk].reshape(view)
                xs = x + ca * g + cb * r
                if lower is not None or upper is not None:
                    xs = xs.clamp(lower, upper)
                losses.append(F.cross_entropy(model(xs), y.expand(xs.shape[0]), reduction="none"))
    loss = torch.cat(losses).reshape(points, points).float().cpu()
    return Surface(offsets.float().cpu(), offsets.float().cpu(), loss, float(eps))


def plot_surfaces(surfaces: Sequence[Tuple[str, Surface]], path: Union[str, os.PathLike], *,
                  suptitle: str = "") -> Tuple[float, float]:
    """Draws each ``(title, surface)`` as a 3-D surface, side by side on one z-scale, into ``path`` (png).

    The z-axis of every panel spans the same range (0 to the largest loss of all surfaces), so a
    flat surface next to a steep one reads as what it is. Written atomically.

    Returns:
        The common z-range ``(z_min, z_max)``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not surfaces:
        raise ValueError("surfaces must hold at least one (title, surface) pair")
    z_max = max(float(s.loss.max()) for _, s in surfaces)
    z_min = min(0.0, min(float(s.loss.min()) for _, s in surfaces))
    z_max = z_max if z_max > z_min else z_min + 1.0
    n = len(surfaces)
    fig = plt.figure(figsize=(5.2 * n, 5.0))
    for i, (title, s) in enumerate(surfaces):
        ax = fig.add_subplot(1, n, i + 1, projection="3d")
        bb, aa = torch.meshgrid(s.b, s.a, indexing="ij")
        ax.plot_surface(aa.numpy(), bb.numpy(), s.loss.numpy(), cmap="viridis", vmin=z_min, vmax=z_max,
                        rstride=1, cstride=1, linewidth=0, antialiased=False)
        ax.set_zlim(z_min, z_max)
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel("along sign(∇ₓ loss)")
        ax.set_ylabel("along random sign")
        ax.set_zlabel("cross-entropy")
        ax.set_title(title)
        ax.view_init(elev=25, azim=-60)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)
    return z_min, z_max
