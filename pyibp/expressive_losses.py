"""Expressive certified-training losses: MTL-IBP and CC-IBP (De Palma et al., "Expressive Losses for
Verified Robustness via Convex Combinations", ICLR 2024) and SABR (Müller et al., "Certified Training:
Small Boxes are All You Need", ICLR 2023).

Each mixes the IBP bound with an adversarial point ``x_adv`` of the ε-box, found by a short PGD
(:func:`adversarial_point`); with ``m`` the IBP margin lower bounds (:func:`pyibp.margin_bounds`,
``-m`` the worst-case logits shifted by ``logit_y``) the robust term of the loss is, per example::

    mtl-ibp:  alpha * CE(-m(x, ε), y) + (1 - alpha) * CE(model(x_adv), y)
    cc-ibp:   CE((1 - alpha) * (z_adv - z_adv[y]) + alpha * (-m(x, ε)), y),   z_adv = model(x_adv)
    sabr:     CE(-m(c, λε), y)   over the small box of :func:`sabr_box` around x_adv

``alpha = 1`` is the IBP loss, ``alpha = 0`` the adversarial loss (PGD training); SABR's
``λ = 1`` is IBP, ``λ → 0`` the adversarial loss. The attacks run in eval mode and compute no
parameter gradients; the bounds and the adversarial logits are computed in eval mode too (BatchNorm
with the statistics the training step chose, see :mod:`pyibp.certified_training`).

The papers' attacks: MTL-IBP / CC-IBP one step of size 10·ε from a random start (their MNIST and
CIFAR-10 8/255 recipes; 8 steps of 0.25·ε over a 2.1·ε box for CIFAR-10 2/255); SABR 8 steps.

Example:
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))
    >>> x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    >>> loss = expressive_loss(model, x, y, 0.1, method="mtl-ibp", alpha=0.5)
    >>> loss.backward()
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import pgd
from .bounds import Eps, check_box, margin_bounds, margin_pass
from .train import eval_mode

__all__ = ["EXPRESSIVE_METHODS", "ExpressiveTerms", "adversarial_point", "sabr_box", "expressive_robust_ce",
           "expressive_loss"]

EXPRESSIVE_METHODS = ("mtl-ibp", "cc-ibp", "sabr")
Pair = Tuple[Tensor, Tensor]


class ExpressiveTerms(NamedTuple):
    """What one expressive robust term computes.

    ``robust`` (B,): the per-example robust loss; ``ibp`` (B, K): IBP margins over the whole
    ε-box (the training metrics' verified error); ``input_box`` / ``pre_activations``: the boxes
    of the propagated region (the ε-box, SABR's small box), recorded only when asked for (Shi et
    al.'s regularisers), else ``None`` / ``[]``.
    """

    robust: Tensor
    ibp: Tensor
    input_box: Optional[Pair]
    pre_activations: List[Pair]


def _check_method(method: str) -> None:
    if method not in EXPRESSIVE_METHODS:
        raise ValueError(f"method must be one of {EXPRESSIVE_METHODS}, got {method!r}")


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _as_column(eps_t: Tensor, x: Tensor) -> Tensor:
    """eps of shape () or (B,) broadcastable against x (B, *)."""
    return eps_t.reshape(-1, *([1] * (x.dim() - 1))) if eps_t.dim() else eps_t


def adversarial_point(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, steps: int = 1,
                      step_scale: float = 10.0, eps_scale: float = 1.0, lower: float = 0.0, upper: float = 1.0,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """The adversarial point of the expressive losses: l∞ PGD from a random start, in eval mode.

    The attack radius is ``eps_scale * eps`` and each of the ``steps`` steps has size
    ``step_scale * eps_scale * eps`` (De Palma et al.: 1 step of 10·ε, an FGSM from a random start
    that ends on a vertex of the box). At ε = 0 it returns ``x``.

    Args:
        x: (B, *) in [lower, upper].  y: (B,) labels.  eps: float, () or (B,).
        generator: the random generator of the random start (default: the global one).
    Returns:
        ``x_adv`` (B, *), detached, with ``|x_adv - x| <= eps_scale * eps`` and inside the domain.
        Equivalent to ``x + pyibp.pgd(model.eval(), x, y, eps_scale * eps, alpha=step_scale *
        eps_scale * eps, steps=steps, random_start=True)``, restoring the model's mode.

    Example:
        >>> x_adv = adversarial_point(model, x, y, 0.1)            # one step of 10·ε
        >>> bool(((x_adv - x).abs() <= 0.1 + 1e-7).all())
        True
    """
    if not step_scale > 0 or not eps_scale > 0:
        raise ValueError(f"step_scale and eps_scale must be > 0, got {step_scale} and {eps_scale}")
    radius = check_box(x, eps, lower, upper) * float(eps_scale)
    if not bool((radius > 0).any()):
        return x.detach()
    with eval_mode(model):
        # An example at ε = 0 takes steps of size 0 and stays at x.
        delta = pgd(model, x, y, radius, alpha=radius * float(step_scale), steps=steps, random_start=True,
                    lower=lower, upper=upper, generator=generator)
    return (x + delta).detach()


def sabr_box(x: Tensor, x_adv: Tensor, eps: Eps, lam: float, *, lower: float = 0.0,
             upper: float = 1.0) -> Tuple[Tensor, Tensor]:
    """SABR's small box: centre and radius ``τ = λ·ε`` of the box ``[c - τ, c + τ] ∩ [lower, upper]``.

    The centre is ``x_adv`` moved (per coordinate) into ``[x - ε + τ, x + ε - τ] ∩ [lower + τ,
    upper - τ]``, so that the small box lies inside the ε-box and the domain with its full width;
    where a coordinate's clipped ε-box is narrower than 2τ (next to the domain's edge, λ > 1/2)
    the centre is kept in ``[x - ε + τ, x + ε - τ] ∩ [lower, upper]`` and the box is cut by the
    domain. Either way ``[c - τ, c + τ] ∩ [lower, upper] ⊆ [x - ε, x + ε] ∩ [lower, upper]``. (SABR's
    reference code scales τ per coordinate by the clipped box's width instead; the two agree away
    from the domain's edges.)

    Args:
        x, x_adv: (B, *), x in [lower, upper].  eps: float, () or (B,).  lam: λ in [0, 1].
    Returns:
        ``(centre (B, *), tau)``, tau of eps's shape; ``centre`` lies in [lower, upper].
        Propagate it with ``pyibp.margin_bounds(model, centre, y, tau, lower=lower, upper=upper)``.

    Example:
        >>> c, tau = sabr_box(x, x_adv, 0.1, 0.4)
        >>> bool(((c - x).abs() <= 0.1 - tau + 1e-7).all())
        True
    """
    lam = _check_fraction("lam", lam)
    eps_t = check_box(x, eps, lower, upper)
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv must have x's shape {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    tau = eps_t * lam
    e, t = _as_column(eps_t, x), _as_column(tau, x)
    near, far = x - e + t, x + e - t
    lo, hi = torch.clamp(near, min=lower + t), torch.clamp(far, max=upper - t)
    fits = lo <= hi
    lo = torch.where(fits, lo, near.clamp(min=lower))
    hi = torch.where(fits, hi, far.clamp(max=upper))
    return torch.minimum(torch.maximum(x_adv.detach(), lo), hi), tau


def _ibp(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, lower: float, upper: float,
         record: bool) -> Tuple[Tensor, Optional[Pair], List[Pair]]:
    if not record:
        return margin_bounds(model, x, y, eps, lower=lower, upper=upper), None, []
    p = margin_pass(model, x, y, eps, lower=lower, upper=upper, crown=False)
    return p.ibp, p.input_box, list(p.pre_activations)


def expressive_robust_ce(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, eps: Eps, *, method: str,
                         alpha: float = 0.5, lam: float = 0.4, lower: float = 0.0, upper: float = 1.0,
                         record: bool = False) -> ExpressiveTerms:
    """The robust term of ``method`` at the given adversarial point (see the module docstring).

    ``model`` runs in the mode it is in (certified training calls this in eval mode).

    Args:
        x, x_adv: (B, *) in [lower, upper].  y: (B,) labels.  eps: float, () or (B,).
        method: ``"mtl-ibp"``, ``"cc-ibp"`` or ``"sabr"``.
        alpha: the IBP share of MTL-IBP / CC-IBP, in [0, 1].  lam: SABR's λ, in [0, 1].
        record: also return the boxes of the propagated region (Shi et al.'s regularisers).
    Returns:
        :class:`ExpressiveTerms`; ``robust`` (B,). At ``alpha = 1`` MTL-IBP and CC-IBP equal
        ``F.cross_entropy(-pyibp.margin_bounds(model, x, y, eps), y, reduction="none")``, at
        ``alpha = 0`` ``F.cross_entropy(model(x_adv), y, reduction="none")``.

    Example:
        >>> x_adv = adversarial_point(model, x, y, 0.1)
        >>> terms = expressive_robust_ce(model, x, y, x_adv, 0.1, method="cc-ibp", alpha=0.3)
        >>> terms.robust.mean().backward()
    """
    _check_method(method)
    alpha, lam = _check_fraction("alpha", alpha), _check_fraction("lam", lam)
    eps_t = check_box(x, eps, lower, upper)
    if method == "sabr":
        centre, tau = sabr_box(x, x_adv, eps_t, lam, lower=lower, upper=upper)
        small, box, pre = _ibp(model, centre, y, tau, lower, upper, record)
        with torch.no_grad():
            whole = margin_bounds(model, x, y, eps_t, lower=lower, upper=upper)
        return ExpressiveTerms(F.cross_entropy(-small, y, reduction="none"), whole, box, pre)
    m, box, pre = _ibp(model, x, y, eps_t, lower, upper, record)
    if alpha == 1.0:
        return ExpressiveTerms(F.cross_entropy(-m, y, reduction="none"), m, box, pre)
    z_adv = model(x_adv)
    if method == "mtl-ibp":
        adv = F.cross_entropy(z_adv, y, reduction="none")
        robust = adv if alpha == 0.0 else alpha * F.cross_entropy(-m, y, reduction="none") + (1 - alpha) * adv
    else:
        # Both logit vectors shifted by their entry y (CE ignores the shift), so that the IBP
        # worst case -m and the adversarial logits are combined on one scale.
        shifted = z_adv - z_adv.gather(1, y[:, None])
        robust = F.cross_entropy((1 - alpha) * shifted + alpha * (-m), y, reduction="none")
    return ExpressiveTerms(robust, m, box, pre)


def expressive_loss(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, method: str, alpha: float = 0.5,
                    lam: float = 0.4, attack_steps: int = 1, step_scale: float = 10.0, eps_scale: float = 1.0,
                    lower: float = 0.0, upper: float = 1.0,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """The batch mean of ``method``'s robust loss, attack included (a scalar).

    :func:`adversarial_point` (eval mode), then :func:`expressive_robust_ce` in eval mode; the
    model's mode is restored. Training adds ``kappa * CE(model(x), y)`` on top in
    :func:`pyibp.certified_training.certified_train_epoch`.

    Example:
        >>> loss = expressive_loss(model, x, y, 0.1, method="sabr", lam=0.4, attack_steps=8, step_scale=0.5)
        >>> loss.backward()
    """
    _check_method(method)
    x_adv = adversarial_point(model, x, y, eps, steps=attack_steps, step_scale=step_scale, eps_scale=eps_scale,
                              lower=lower, upper=upper, generator=generator)
    with eval_mode(model):
        return expressive_robust_ce(model, x, y, x_adv, eps, method=method, alpha=alpha, lam=lam, lower=lower,
                                    upper=upper).robust.mean()
