"""Adversarial attacks on the fused PGD step: :func:`fgsm`, :func:`pgd`, and the classes :class:`FGSM`, :class:`PGD`.

Every attack returns the perturbation ``delta`` (the adversarial input is ``x + delta``), with
``|delta| <= eps`` (l∞) or ``||delta||_2 <= eps`` (l2) and ``lower <= x + delta <= upper``
holding exactly in x's dtype, as :func:`pyibp.ops.pgd_linf_step_` / :func:`pyibp.ops.pgd_l2_step_`
guarantee.

Only the gradient with respect to ``delta`` is computed (``torch.autograd.grad``): parameters are
switched to ``requires_grad=False`` for the duration of the attack, so the backward pass skips
the weight gradients, and restored afterwards, also when the attack raises. The model's mode
(``train``/``eval``), its parameters and their ``.grad`` are left as they were. The model runs in
the mode it is in: attack a trained model in ``eval()`` mode, since BatchNorm in training mode
would use batch statistics and update its running averages with the attack's inputs.

Example:
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    >>> x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    >>> delta = pgd(model, x, y, 0.1, alpha=0.01, steps=40)
    >>> x_adv = x + delta
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .bounds import _check_labels, _check_model_device, check_box, per_example_tensor
from .distributed import unwrap

__all__ = ["fgsm", "pgd", "FGSM", "PGD", "attack_loss", "NORMS", "LOSSES"]

Eps = Union[float, Tensor]
NORMS = ("linf", "l2")
LOSSES = ("ce", "margin")


# ---------------------------------------------------------------------------------------------
# losses
def attack_loss(logits: Tensor, y: Tensor, loss: str = "ce") -> Tensor:
    """Per-example objective the attacks maximise.

    Args:
        logits: (B, K).  y: (B,) integer labels.
        loss: ``"ce"``, the cross-entropy ``F.cross_entropy(logits, y, reduction="none")``, or
            ``"margin"``, the negative margin ``max_{j != y} logit_j - logit_y`` (positive exactly
            when the example is misclassified, as in Carlini-Wagner).
    Returns:
        (B,).

    Example:
        >>> attack_loss(torch.tensor([[2.0, 0.5]]), torch.tensor([0]), "margin")
        tensor([-1.5000])
    """
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        true = logits.gather(1, y[:, None])[:, 0]
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        return other - true
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


# ---------------------------------------------------------------------------------------------
# validation
def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_config(norm: str, loss: str, steps: int, restarts: int, random_start: bool) -> None:
    _check_choice("norm", norm, NORMS)
    _check_choice("loss", loss, LOSSES)
    for name, value in (("steps", steps), ("restarts", restarts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if restarts > 1 and not random_start:
        raise ValueError(f"restarts={restarts} needs random_start=True: from zero every restart is the same run")


def _check_scalar_eps(eps: Eps) -> None:
    """Fails early (in the classes' constructors) on a negative or non-finite float eps."""
    if not isinstance(eps, Tensor) and not (math.isfinite(float(eps)) and float(eps) >= 0):
        raise ValueError(f"eps must be a finite value >= 0, got {eps!r}")


def _check_alpha(alpha: Eps, x: Tensor) -> Tensor:
    """alpha as a float64 tensor of shape () or (B,) on x's device, every value finite and > 0."""
    a = per_example_tensor("alpha", alpha, x, torch.float64)
    if a.numel() and not (torch.isfinite(a) & (a > 0)).all():
        bad = a[~(torch.isfinite(a) & (a > 0))].flatten()[0].item()
        raise ValueError(f"alpha (the step size) must be finite and > 0, got {bad}")
    return a


def _check_logits(logits: Tensor, y: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"the model must return logits of shape ({y.shape[0]}, num_classes), "
                         f"got {tuple(logits.shape)}")
    _check_labels(y, logits, logits.shape[1])


# ---------------------------------------------------------------------------------------------
# the attack loop
@contextlib.contextmanager
def _input_gradients_only(model: nn.Module) -> Iterator[None]:
    """Grad mode on, parameters frozen; their requires_grad flags are restored on exit."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _input_grad(model: nn.Module, x: Tensor, delta: Tensor, y: Tensor, loss: str, check: bool) -> Tensor:
    """Gradient of the summed per-example loss at ``x + delta`` with respect to delta only."""
    d = delta.detach().requires_grad_(True)  # a fresh leaf: the step below mutates delta's storage
    logits = model(x + d)
    if check:
        _check_logits(logits, y)
    (grad,) = torch.autograd.grad(attack_loss(logits, y, loss).sum(), d)
    return grad


def _take(p: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` of a per-example parameter; a shared one (shape ()) stays as it is."""
    return p[index] if p.dim() == 1 else p


def _random_start(x: Tensor, eps: Tensor, norm: str, generator: Optional[torch.Generator]) -> Tensor:
    """A point drawn uniformly from the eps-ball (not yet projected onto the domain)."""
    e = eps.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1)) if eps.dim() == 1 else eps.to(x.dtype)
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return (2 * u - 1) * e
    # l2: a Gaussian direction has a uniform direction; radius eps * U^(1/d) makes the point
    # uniform in the ball's volume.
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    norms = direction.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
    dim = x[0].numel()
    u = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device)
    radius = u.pow(1.0 / dim) / norms
    return direction * radius.reshape((-1,) + (1,) * (x.dim() - 1)) * e


def _run(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, alpha: Tensor, *, steps: int, norm: str,
         random_start: bool, restarts: int, lower: float, upper: float, loss: str,
         generator: Optional[torch.Generator]) -> Tensor:
    step: Callable[..., Tensor] = ops.pgd_linf_step_ if norm == "linf" else ops.pgd_l2_step_
    lower, upper = float(lower), float(upper)
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    zero_alpha = torch.zeros((), dtype=torch.float64, device=x.device)
    everyone = torch.arange(x.shape[0], device=x.device)
    best = torch.zeros_like(x)
    best_loss = torch.full((x.shape[0],), float("-inf"), dtype=torch.float64, device=x.device)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with _input_gradients_only(model):
        for restart in range(restarts):
            # Later restarts only attack the examples no earlier restart has misclassified.
            if restart == 0:
                todo, xs, ys, e, a = everyone, x, y, eps, alpha
            else:
                todo = everyone[~fooled]
                xs, ys, e, a = x[todo], y[todo], _take(eps, todo), _take(alpha, todo)
            if random_start:
                delta = _random_start(xs, e, norm, generator)
                # A step with a zero gradient only projects onto the ball and the domain, exactly.
                step(delta, torch.zeros_like(xs), xs, e, zero_alpha, lower, upper)
            else:
                delta = torch.zeros_like(xs)
            for t in range(steps):
                grad = _input_grad(model, xs, delta, ys, loss, check=restart == 0 and t == 0)
                step(delta, grad, xs, e, a, lower, upper)
            if restarts == 1:
                return delta
            with torch.no_grad():
                logits = model(xs + delta)
                value = attack_loss(logits, ys, loss).to(torch.float64)
                wrong = logits.argmax(1) != ys
            # Among examples still classified correctly, a misclassifying delta wins, then the higher loss.
            better = wrong | (value > best_loss[todo])
            chosen = todo[better]
            best[chosen], best_loss[chosen] = delta[better], value[better]
            fooled[todo] = wrong
            if bool(fooled.all()):
                break
    return best


# ---------------------------------------------------------------------------------------------
# public API
def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, lower: float = 0.0,
         upper: float = 1.0) -> Tensor:
    """Fast Gradient Sign Method (Goodfellow, Shlens, Szegedy 2015), l∞.

    Args:
        model: maps (B, *) inputs to (B, K) logits.
        x: (B, *) floating-point inputs in [lower, upper].  y: (B,) integer labels in [0, K).
        eps: radius, a float or a tensor of shape () or (B,) (one per example).
        lower, upper: the input domain (use -inf, inf for none).
    Returns:
        delta of x's shape and dtype. Equivalent to::

            delta = torch.zeros_like(x, requires_grad=True)
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            g, = torch.autograd.grad(loss, delta)
            delta = torch.clamp(eps * g.sign(), lower - x, upper - x)

        (the tutorial's ``fgsm``, projected onto the domain), without touching parameter gradients.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> delta = fgsm(model, x, y, 0.1)
        >>> bool((delta.abs() <= 0.1).all())
        True
    """
    eps_t = check_box(x, eps, lower, upper)
    _check_model_device(model, x)
    _check_labels(y, x, None)
    return _run(unwrap(model), x.detach(), y, eps_t, eps_t.to(torch.float64), steps=1, norm="linf",
                random_start=False, restarts=1, lower=lower, upper=upper, loss="ce", generator=None)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, alpha: Eps, steps: int, norm: str = "linf",
        random_start: bool = False, restarts: int = 1, lower: float = 0.0, upper: float = 1.0,
        loss: str = "ce", generator: Optional[torch.Generator] = None) -> Tensor:
    """Projected gradient descent (Madry et al. 2018) in the l∞ or l2 ball, with restarts.

    Each step ascends the loss (sign of the gradient for l∞, normalised gradient for l2) and
    projects onto the ball ``||delta|| <= eps`` and the domain ``lower <= x + delta <= upper``.
    With ``restarts > 1`` (which needs ``random_start``) every restart begins from a fresh random
    point and, per example, the result is the first perturbation that misclassifies, otherwise
    the one with the highest loss; later restarts only run on the examples not yet misclassified.

    Args:
        model: maps (B, *) inputs to (B, K) logits; it runs in the mode it is in (use ``eval()``).
        x: (B, *) floating-point inputs in [lower, upper].  y: (B,) integer labels in [0, K).
        eps: radius, a float or a tensor of shape () or (B,).
        alpha: step size (> 0), a float or a tensor of shape () or (B,).  steps: steps per restart.
        norm: ``"linf"`` or ``"l2"`` (norms over all but the batch dimension).
        random_start: start from a point uniform in the ball (l∞: uniform per coordinate; l2:
            uniform direction, radius ``eps * U^(1/d)``), projected onto the domain.
        restarts: number of runs (>= 1).  loss: ``"ce"`` or ``"margin"`` (see :func:`attack_loss`).
        lower, upper: the input domain (use -inf, inf for none).
        generator: the random generator for the random starts (default: the global one).
    Returns:
        delta of x's shape and dtype. One restart of l∞ PGD equals the tutorial's ``pgd_linf``::

            delta = torch.zeros_like(x, requires_grad=True)
            for _ in range(steps):
                loss = F.cross_entropy(model(x + delta), y, reduction="sum")
                g, = torch.autograd.grad(loss, delta)
                delta.data = (delta + alpha * g.sign()).clamp(-eps, eps)
                delta.data = torch.clamp(delta, lower - x, upper - x)

        with each update one fused pass (:func:`pyibp.ops.pgd_linf_step_`) and no parameter
        gradients computed.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> delta = pgd(model, x, y, 1.0, alpha=0.2, steps=10, norm="l2", random_start=True, restarts=3)
        >>> bool((delta.flatten(1).norm(dim=1) <= 1.0).all())
        True
    """
    _check_config(norm, loss, steps, restarts, random_start)
    eps_t = check_box(x, eps, lower, upper)
    alpha_t = _check_alpha(alpha, x)
    _check_model_device(model, x)
    _check_labels(y, x, None)
    # A DDP wrapper would expect a parameter backward after each forward; attack the module inside.
    return _run(unwrap(model), x.detach(), y, eps_t, alpha_t, steps=steps, norm=norm, random_start=random_start,
                restarts=restarts, lower=lower, upper=upper, loss=loss, generator=generator)


class FGSM:
    """FGSM configured once, called on batches; returns adversarial inputs ``x + delta``.

    Example:
        >>> attack = FGSM(model, eps=0.1)
        >>> x_adv = attack(x, y)                  # (B, *), inside [0, 1] and the eps-box of x
    """

    def __init__(self, model: nn.Module, eps: Eps, *, lower: float = 0.0, upper: float = 1.0):
        _check_scalar_eps(eps)
        self.model, self.eps, self.lower, self.upper = model, eps, lower, upper

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return x + fgsm(self.model, x, y, self.eps, lower=self.lower, upper=self.upper)

    def __repr__(self) -> str:
        return f"FGSM(eps={self.eps}, lower={self.lower}, upper={self.upper})"


class PGD:
    """PGD configured once, called on batches; returns adversarial inputs ``x + delta``.

    Arguments as in :func:`pgd`; ``random_start`` defaults to True here, as in torchattacks.

    Example:
        >>> attack = PGD(model, eps=0.1, alpha=0.01, steps=40)
        >>> x_adv = attack(x, y)
    """

    def __init__(self, model: nn.Module, eps: Eps, alpha: Eps, steps: int, *, norm: str = "linf",
                 random_start: bool = True, restarts: int = 1, loss: str = "ce", lower: float = 0.0,
                 upper: float = 1.0, generator: Optional[torch.Generator] = None):
        _check_config(norm, loss, steps, restarts, random_start)
        _check_scalar_eps(eps)
        if not isinstance(alpha, Tensor) and not (math.isfinite(float(alpha)) and float(alpha) > 0):
            raise ValueError(f"alpha (the step size) must be finite and > 0, got {alpha!r}")
        self.model, self.eps, self.alpha, self.steps = model, eps, alpha, steps
        self.norm, self.random_start, self.restarts, self.loss = norm, random_start, restarts, loss
        self.lower, self.upper, self.generator = lower, upper, generator

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return x + pgd(self.model, x, y, self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                       random_start=self.random_start, restarts=self.restarts, lower=self.lower,
                       upper=self.upper, loss=self.loss, generator=self.generator)

    def __repr__(self) -> str:
        return (f"PGD(eps={self.eps}, alpha={self.alpha}, steps={self.steps}, norm={self.norm!r}, "
                f"random_start={self.random_start}, restarts={self.restarts}, loss={self.loss!r})")
