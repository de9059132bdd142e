"""Square Attack (Andriushchenko, Croce, Flammarion, Hein 2020): :func:`square`, a score-based
random search that needs no gradients, as AutoAttack runs it (margin loss, ``p_init = 0.8``,
5000 queries, the un-rescaled schedule of the square size).

l∞: start from vertical stripes ``±eps``; each query sets one square window (one window and one
sign per channel, shared by the batch, as in the original) to ``±eps`` and keeps it where the
margin loss drops or the example becomes misclassified (a convolutional ``nn.Sequential`` then
recomputes only the activations the window reaches: :mod:`pyibp.attacks.windowed`). l2: start from a grid of
"eta" bumps scaled onto the sphere of radius eps; each query moves the mass of one window into
another, on the sphere. Examples leave the batch once misclassified.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ..distributed import unwrap
from .common import (NORMS, Bound, Domain, Eps, Evaluator, _check_choice, attack_loss, check_count, check_inputs,
                     check_logits, per_example_view, project_, take, untouched)
from .windowed import Region, WindowedForward

__all__ = ["square"]

Tick = Callable[[int], None]
SQUARE_LOSSES = ("margin", "ce")


def square_fraction(query: int, p_init: float) -> float:
    """The fraction p of the image a square covers at ``query`` (the original's schedule for
    10,000 queries, which AutoAttack applies un-rescaled to its 5,000).

    Example:
        >>> square_fraction(0, 0.8), square_fraction(100, 0.8)
        (0.8, 0.2)
    """
    for last, divisor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                          (8000, 256)):
        if query <= last:
            return p_init / divisor
    return p_init / 512


class _Random:
    """The random draws of Square from one generator on x's device."""

    def __init__(self, x: Tensor, generator: Optional[torch.Generator]):
        self.device, self.dtype, self.generator = x.device, x.dtype, generator

    def signs(self, *shape: int) -> Tensor:
        u = torch.rand(shape, generator=self.generator, device=self.device, dtype=self.dtype)
        return torch.sign(2 * u - 1)

    def below(self, high: int) -> int:
        """An integer in [0, high) (0 when high <= 0), drawn as the original draws it."""
        u = torch.rand((), generator=self.generator, device=self.device)
        return int(high * u) if high > 0 else 0

    def coin(self) -> bool:
        return bool(torch.rand((), generator=self.generator, device=self.device) > 0.5)


def _eta_rectangle(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Nested rectangles of weight 1/k² around the centre, unit Frobenius norm."""
    out = torch.zeros(rows, cols, device=device, dtype=dtype)
    r, c = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        out[max(r, 0):min(r + 2 * k + 1, rows), max(c, 0):min(c + 2 * k + 1, cols)] += 1.0 / (k + 1) ** 2
        r, c = r - 1, c - 1
    return out / out.square().sum().sqrt()


def _eta(s: int, rand: _Random) -> Tensor:
    """An s x s bump, positive in one half and negative in the other, transposed at random."""
    out = torch.cat([_eta_rectangle(s // 2, s, rand.device, rand.dtype),
                     -_eta_rectangle(s - s // 2, s, rand.device, rand.dtype)])
    out = out / out.square().sum().sqrt()
    return out.t() if rand.coin() else out


def _l2_norms(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (t.dim() - 1))


def _on_sphere(delta: Tensor, eps: Tensor) -> Tensor:
    return delta / (_l2_norms(delta) + 1e-12) * eps


def _start(x: Tensor, e: Tensor, norm: str, rand: _Random) -> Tensor:
    B, c, h, w = x.shape
    if norm == "linf":
        return (e * rand.signs(B, c, 1, w)).expand(x.shape).contiguous()
    delta = torch.zeros_like(x)
    s = h // 5
    first = (h - 5 * s) // 2
    # The windows that fit (the original's h // s of them overrun images like 14 x 14).
    for row in range((h - first) // s):
        for col in range((w - first) // s):
            top, left = first + row * s, first + col * s
            delta[:, :, top:top + s, left:left + s] += _eta(s, rand).view(1, 1, s, s) * rand.signs(B, c, 1, 1)
    return _on_sphere(delta, e)


def _linf_window(shape: Tuple[int, ...], query: int, p_init: float, rand: _Random) -> Tuple[Region, Tensor]:
    """The window of an l∞ query and its signs per channel (C, 1, 1)."""
    c, h, w = shape[1:]
    s = max(int(round(math.sqrt(square_fraction(query, p_init) * h * w))), 1)
    top, left = rand.below(h - s), rand.below(w - s)
    return (top, top + s, left, left + s), rand.signs(c, 1, 1)


def _candidate(delta: Tensor, e: Tensor, norm: str, query: int, p_init: float, rand: _Random
               ) -> Tuple[Tensor, Optional[Region]]:
    """The next candidate of every example from its best delta (a new tensor), and for l∞ the
    window it changed (l2 rescales the whole delta: None)."""
    n, c, h, w = delta.shape
    new = delta.clone()
    if norm == "linf":
        (r0, r1, c0, c1), signs = _linf_window(delta.shape, query, p_init, rand)
        new[:, :, r0:r1, c0:c1] = e * signs
        return new, (r0, r1, c0, c1)
    p = square_fraction(query, p_init)
    size = int(round(math.sqrt(p * h * w)))
    s = max(size, 3)
    s += 1 - s % 2                      # odd, so the bump has a centre
    top, left = rand.below(h - s), rand.below(w - s)
    top2, left2 = rand.below(h - s), rand.below(w - s)
    window = (slice(None), slice(None), slice(top, top + s), slice(left, left + s))
    window2 = (slice(None), slice(None), slice(top2, top2 + s), slice(left2, left2 + s))
    mask = torch.zeros_like(delta[:1])
    mask[window], mask[window2] = 1.0, 1.0
    old = delta[window]
    old_norms = old.square().sum(dim=(-2, -1), keepdim=True).sqrt()
    image_norms, windows_norms = _l2_norms(delta), _l2_norms(delta * mask)
    bump = _eta(s, rand).view(1, 1, s, s) * rand.signs(n, c, 1, 1) + old / (1e-12 + old_norms)
    # The bump takes the mass of both windows plus what the ball has left, spread over the channels.
    budget = ((e ** 2 - image_norms ** 2).clamp_min(0) / c + windows_norms ** 2).sqrt()
    bump = bump / (1e-12 + bump.square().sum(dim=(-2, -1), keepdim=True).sqrt()) * budget
    new[window2] = 0.0
    new[window] = bump
    return _on_sphere(new, e), None


def run_square(ev: Evaluator, x: Tensor, y: Tensor, eps: Tensor, domain: Domain, *, norm: str, n_queries: int,
               p_init: float, loss: str, generator: Optional[torch.Generator], tick: Tick) -> Tuple[Tensor, Tensor]:
    """Square on checked inputs (B, C, H, W). Returns ``(delta, fooled)``."""
    rand = _Random(x, generator)
    e = per_example_view(eps.to(x.dtype), x)
    # l∞ queries change one window: a convolutional model recomputes only what it reaches
    windowed = WindowedForward.of(ev.model, ev.dtype) if norm == "linf" and ev.eot == 1 else None

    def margin_and_loss(rows: Tensor, logits: Tensor) -> Tuple[Tensor, Tensor]:
        margin = -attack_loss(logits, y[rows], "margin")
        return margin, (margin if loss == "margin" else -attack_loss(logits, y[rows], "ce"))

    everyone = torch.arange(x.shape[0], device=x.device)
    best = project_(_start(x, e, norm, rand), x, eps, domain, norm)
    with torch.no_grad():
        if windowed is not None:
            logits, cache = windowed.start(x + best)
            check_logits(logits, y)
        else:
            logits = ev.logits(x + best, y)
    margin, value = margin_and_loss(everyone, logits)
    for query in range(n_queries):
        todo = (margin > 0).nonzero()[:, 0]
        if todo.numel() == 0:
            tick(n_queries - query)
            break
        e_todo = e if e.dim() == 0 else e[todo]
        with torch.no_grad():
            if windowed is not None:      # only the window: its candidate values, projected, and their logits
                window, signs = _linf_window(x.shape, query, p_init, rand)
                r0, r1, c0, c1 = window
                rows = slice(None) if todo.numel() == x.shape[0] else todo    # a view while nobody is fooled
                xw = x[rows, :, r0:r1, c0:c1]
                new = (e_todo * signs).expand(xw.shape).contiguous()
                pick = lambda t: t if t.dim() == 0 else t[rows, :, r0:r1, c0:c1]  # noqa: E731
                project_(new, xw, take(eps, todo), Domain(pick(domain.lower), pick(domain.upper), domain.floats), norm)
                logits, patches = windowed.query(cache, todo, xw + new, window)
            else:
                new, window = _candidate(best[todo], e_todo, norm, query, p_init, rand)
                project_(new, x[todo], take(eps, todo), domain.take(todo), norm)
                logits = ev.logits(x[todo] + new, y[todo])
        m, v = margin_and_loss(todo, logits)
        improved = v < value[todo]
        value[todo] = torch.where(improved, v, value[todo])
        improved |= m <= 0
        margin[todo] = torch.where(improved, m, margin[todo])
        if windowed is not None:
            if bool(improved.any()):
                r0, r1, c0, c1 = window
                best[todo[improved], :, r0:r1, c0:c1] = new[improved]
                windowed.commit(cache, todo, improved, patches)
        else:
            best[todo[improved]] = new[improved]
        tick(1)
    return best, margin <= 0


def check_image(x: Tensor, norm: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"square needs images x of shape (B, C, H, W), got {tuple(x.shape)}")
    if norm == "l2" and min(x.shape[2], x.shape[3]) < 5:
        raise ValueError(f"l2 square needs images of at least 5 x 5 pixels, got {tuple(x.shape[2:])}")


def square(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, norm: str = "linf", n_queries: int = 5000,
           p_init: float = 0.8, loss: str = "margin", lower: Bound = 0.0, upper: Bound = 1.0,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """Square Attack (Andriushchenko et al. 2020): random search with square updates, l∞ or l2.

    A black-box attack: it only reads the logits, one forward pass of the examples not yet
    fooled per query. Each query proposes a change of one square window of side
    ``round(sqrt(p * H * W))`` (p from :func:`square_fraction`) and keeps it where the loss drops.

    Args:
        model: maps (B, C, H, W) inputs to (B, K) logits.
        x: (B, C, H, W) images in [lower, upper].  y: (B,) integer labels.
        eps: radius, a float or a tensor of shape () or (B,).  norm: ``"linf"`` or ``"l2"``.
        n_queries: queries per example (AutoAttack: 5000).  p_init: the initial square fraction.
        loss: ``"margin"`` (``z_y - max_{j != y} z_j``, minimised; AutoAttack's) or ``"ce"``.
        lower, upper: the input domain, as in :func:`pyibp.pgd`.
        generator: the random generator (default: the global one).
    Returns:
        delta of x's shape and dtype, exactly inside the ball and the domain: per example the
        first misclassifying perturbation found, otherwise the one of lowest loss.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> delta = square(model, x, y, 0.1, n_queries=50)
        >>> bool((delta.abs() <= 0.1).all())
        True
    """
    _check_choice("norm", norm, NORMS)
    _check_choice("loss", loss, SQUARE_LOSSES)
    check_count("n_queries", n_queries)
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must lie in (0, 1], got {p_init!r}")
    eps_t, domain, y, _ = check_inputs(model, x, y, eps, lower, upper)
    check_image(x, norm)
    model = unwrap(model)
    with untouched(model):
        delta, _ = run_square(Evaluator(model), x.detach(), y, eps_t, domain, norm=norm, n_queries=n_queries,
                              p_init=p_init, loss=loss, generator=generator, tick=lambda n: None)
    return delta
