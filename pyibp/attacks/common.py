"""What every attack shares: the objectives, argument checks, the input domain, the projection
onto the ball and the domain (the fused steps of :mod:`pyibp.ops`), random starts, and the guard
that leaves the model as the attack found it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..bounds import _check_labels, _check_model_device, check_box, per_example_tensor

__all__ = ["attack_loss", "Domain", "NORMS", "LOSSES", "Eps", "Bound"]

Eps = Union[float, Tensor]
Bound = Union[float, Tensor]
NORMS = ("linf", "l2")
LOSSES = ("ce", "margin", "dlr")


# ---------------------------------------------------------------------------------------------
# objectives
def _others_max(logits: Tensor, cls: Tensor) -> Tensor:
    """max_{j != cls} logit_j, (B,)."""
    return logits.scatter(1, cls[:, None], float("-inf")).amax(1)


def attack_loss(logits: Tensor, y: Tensor, loss: str = "ce", target: Optional[Tensor] = None) -> Tensor:
    """Per-example objective the attacks maximise.

    Args:
        logits: (B, K).  y: (B,) integer labels.
        loss: ``"ce"``, the cross-entropy ``F.cross_entropy(logits, y, reduction="none")``;
            ``"margin"``, the negative margin ``max_{j != y} z_j - z_y`` (positive exactly when the
            example is misclassified, as in Carlini-Wagner); ``"dlr"``, the difference of logits
            ratio of Croce & Hein (2020), ``-(z_y - max_{j != y} z_j) / (z_π1 - z_π3)`` with
            ``z_π1 >= z_π2 >= ...`` the sorted logits (needs K >= 3).
        target: (B,) target classes for a targeted objective, or None. Then ``"ce"`` is
            ``-F.cross_entropy(logits, target)``, ``"margin"`` is ``z_t - max_{j != t} z_j`` and
            ``"dlr"`` is ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)`` (needs K >= 4).
    Returns:
        (B,), in float32 at least (reduced-precision logits are promoted).

    Example:
        >>> attack_loss(torch.tensor([[2.0, 0.5]]), torch.tensor([0]), "margin")
        tensor([-1.5000])
    """
    _check_choice("loss", loss, LOSSES)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    y = y.long()
    if loss == "dlr":
        _check_dlr_classes(logits.shape[1], target is not None)
        top = logits.sort(dim=1, descending=True).values
        true = logits.gather(1, y[:, None])[:, 0]
        if target is None:
            return -(true - _others_max(logits, y)) / (top[:, 0] - top[:, 2] + 1e-12)
        tgt = logits.gather(1, target.long()[:, None])[:, 0]
        return -(true - tgt) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)
    if target is None:
        if loss == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        return _others_max(logits, y) - logits.gather(1, y[:, None])[:, 0]
    target = target.long()
    if loss == "ce":
        return -F.cross_entropy(logits, target, reduction="none")
    return logits.gather(1, target[:, None])[:, 0] - _others_max(logits, target)


def _check_dlr_classes(classes: int, targeted: bool) -> None:
    needed, divisor = (4, "z_π1 - (z_π3 + z_π4) / 2") if targeted else (3, "z_π1 - z_π3")
    if classes < needed:
        kind = "the targeted DLR loss" if targeted else "the DLR loss"
        raise ValueError(f"{kind} divides by {divisor} and needs at least {needed} classes, the model has "
                         f"{classes}; use loss='ce' or 'margin'")


def misclassified(logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
    """(B,) bool: the success of an attack (untargeted: not y; targeted: the target)."""
    pred = logits.argmax(1)
    return pred != y if target is None else pred == target


# ---------------------------------------------------------------------------------------------
# argument checks
def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_count(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_scalar_eps(eps: Eps) -> None:
    """Fails early (in the classes' constructors) on a negative or non-finite float eps."""
    if not isinstance(eps, Tensor) and not (math.isfinite(float(eps)) and float(eps) >= 0):
        raise ValueError(f"eps must be a finite value >= 0, got {eps!r}")


def check_alpha(alpha: Eps, x: Tensor) -> Tensor:
    """alpha as a float64 tensor of shape () or (B,) on x's device, every value finite and > 0."""
    a = per_example_tensor("alpha", alpha, x, torch.float64)
    if a.numel() and not (torch.isfinite(a) & (a > 0)).all():
        bad = a[~(torch.isfinite(a) & (a > 0))].flatten()[0].item()
        raise ValueError(f"alpha (the step size) must be finite and > 0, got {bad}")
    return a


def check_logits(logits: Tensor, y: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"the model must return logits of shape ({y.shape[0]}, num_classes), "
                         f"got {tuple(logits.shape)}")
    _check_labels(y, logits, logits.shape[1])


def _check_batched(model: nn.Module, x: Tensor) -> None:
    """An image without its batch dimension runs through nn.Conv2d (which accepts unbatched input)
    and fails later with a shape error; name the mistake instead."""
    convs = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}
    first = next((m for m in model.modules() if type(m) in convs), None)
    if first is not None and x.dim() == convs[type(first)] - 1:
        raise ValueError(f"x has shape {tuple(x.shape)}, one input without its batch dimension for the model's "
                         f"{type(first).__name__}; pass a batch, e.g. x[None] of shape {(1,) + tuple(x.shape)}")


def check_inputs(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, lower: Bound, upper: Bound,
                 target: Optional[Tensor] = None) -> Tuple[Tensor, "Domain", Tensor, Optional[Tensor]]:
    """Validates an attack's inputs; returns (eps as () or (B,) of x's dtype, the domain, y and the
    target as int64)."""
    lower, upper = (float(b) if isinstance(b, Tensor) and b.numel() == 1 else b for b in (lower, upper))
    scalar = not isinstance(lower, Tensor) and not isinstance(upper, Tensor)
    eps_t = check_box(x, eps, float(lower), float(upper)) if scalar else check_box(x, eps, -math.inf, math.inf)
    domain = Domain.of(x, lower, upper)
    _check_model_device(model, x)
    _check_batched(model, x)
    _check_labels(y, x, None)
    if target is not None:
        _check_labels(target, x, None)
        target = target.long()
    return eps_t, domain, y.long(), target


# ---------------------------------------------------------------------------------------------
# the input domain
def _bound_tensor(name: str, value: Bound, x: Tensor) -> Tensor:
    """A domain bound in x's dtype: shape () for one value, else broadcast to x's shape. A 1-d
    tensor of x.shape[1] values is per channel (dim 1), as for normalised images."""
    if not isinstance(value, Tensor):
        return torch.tensor(float(value), dtype=x.dtype, device=x.device)
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}; put both on one device")
    if not value.is_floating_point():
        value = value.double()
    if value.numel() == 1:
        return value.detach().reshape(()).to(x.dtype)
    if value.dim() == 1 and x.dim() >= 2 and value.shape[0] == x.shape[1]:
        value = value.reshape((1, -1) + (1,) * (x.dim() - 2))
    try:
        return value.detach().to(x.dtype).expand(x.shape).contiguous()
    except RuntimeError:
        raise ValueError(f"{name} must be a float, a tensor of shape ({x.shape[1]},) (one value per channel) or "
                         f"one broadcastable to x's shape {tuple(x.shape)}, got shape {tuple(value.shape)}") from None


@dataclass(frozen=True)
class Domain:
    """The input domain ``lower <= x' <= upper`` in x's dtype: each bound of shape () or x's shape.

    ``floats`` holds the two bounds as floats when both are single values (the PGD kernels take
    them so); per-element bounds go through the APGD kernels, which read tensors.
    """

    lower: Tensor
    upper: Tensor
    floats: Optional[Tuple[float, float]]

    @staticmethod
    def of(x: Tensor, lower: Bound, upper: Bound) -> "Domain":
        lo, hi = _bound_tensor("lower", lower, x), _bound_tensor("upper", upper, x)
        if lo.dim() == 0 and hi.dim() == 0:
            if not float(lo) <= float(hi):
                raise ValueError(f"lower ({float(lo)}) must be <= upper ({float(hi)})")
            return Domain(lo, hi, (float(lo), float(hi)))
        if torch.isnan(lo).any() or torch.isnan(hi).any() or (lo > hi).any():
            raise ValueError("lower must be <= upper everywhere (and not NaN), got lower > upper in "
                             f"{int((lo > hi).sum())} places")
        if x.numel() and ((x < lo) | (x > hi)).any():
            raise ValueError(f"x has {int(((x < lo) | (x > hi)).sum())} values outside the input domain "
                             "[lower, upper]; pass lower=/upper= matching your data")
        return Domain(lo, hi, None)

    def take(self, index: Tensor) -> "Domain":
        """The domain of the rows ``index`` of x."""
        pick = lambda t: t if t.dim() == 0 else t[index]  # noqa: E731
        return Domain(pick(self.lower), pick(self.upper), self.floats)


# ---------------------------------------------------------------------------------------------
# steps and projections (all exact in x's dtype: the fused kernels guarantee it)
def pgd_step_(delta: Tensor, grad: Tensor, x: Tensor, eps: Tensor, alpha: Tensor, domain: Domain,
              norm: str) -> Tensor:
    """One PGD step in place. Float domains use the PGD kernels; per-element domains the APGD
    kernel with momentum 1, which is the same step."""
    if domain.floats is not None:
        step = ops.pgd_linf_step_ if norm == "linf" else ops.pgd_l2_step_
        return step(delta, grad, x, eps, alpha, *domain.floats)
    step = ops.apgd_linf_step_ if norm == "linf" else ops.apgd_l2_step_
    return step(delta, torch.empty_like(delta), grad, x, eps, alpha, 1.0, domain.lower, domain.upper)


def project_(delta: Tensor, x: Tensor, eps: Tensor, domain: Domain, norm: str) -> Tensor:
    """Projects delta in place onto the ball and the domain: an APGD step with a zero gradient
    and momentum 1 (the APGD kernels take every dtype and domain)."""
    step = ops.apgd_linf_step_ if norm == "linf" else ops.apgd_l2_step_
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    return step(delta, torch.empty_like(delta), torch.zeros_like(delta), x, eps, zero, 1.0, domain.lower,
                domain.upper)


def per_example_view(t: Tensor, x: Tensor) -> Tensor:
    """A () or (B,) tensor shaped to broadcast against x."""
    return t.reshape((-1,) + (1,) * (x.dim() - 1)) if t.dim() == 1 else t


def take(p: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` of a per-example parameter; a shared one (shape ()) stays as it is."""
    return p[index] if p.dim() == 1 else p


def runs_at_once(x: Tensor, runs: int) -> int:
    """How many runs (targets, restarts) of one attack share a batch: all of them on an
    accelerator, where a step of 9 x B rows takes about the time of one of B rows; one at a
    time on the CPU, where the time grows with the rows and a run started only on the examples
    every earlier run left unbroken does the least work (measured: 9 targets of APGD-T as one
    batch took 2.7x the time of 9 runs on the tutorial CNN, FAB-T 3.4x).

    Example:
        >>> runs_at_once(torch.zeros(4, 1, 28, 28), 9)      # a CPU tensor
        1
    """
    return runs if x.device.type != "cpu" else 1


def uniform_start(x: Tensor, eps: Tensor, norm: str, generator: Optional[torch.Generator]) -> Tensor:
    """A point drawn uniformly from the eps-ball (not yet projected onto the domain)."""
    e = per_example_view(eps.to(x.dtype), x)
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return (2 * u - 1) * e
    # l2: a Gaussian direction has a uniform direction; radius eps * U^(1/d) makes the point
    # uniform in the ball's volume.
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    norms = direction.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
    u = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device)
    radius = u.pow(1.0 / max(x[0].numel(), 1)) / norms
    return direction * per_example_view(radius, x) * e


# ---------------------------------------------------------------------------------------------
# the model
def _model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


class Evaluator:
    """Runs the model on ``x + delta`` for an attack: the input cast to the model's dtype (a half
    or bfloat16 model takes float32 inputs), the logits checked once, and the loss's gradient with
    respect to delta only, averaged over ``eot`` forward passes for randomised models
    (expectation over transformation; the logits and losses returned are the last pass's)."""

    def __init__(self, model: nn.Module, eot: int = 1):
        self.model, self.dtype, self.checked, self.eot = model, _model_dtype(model), False, eot

    def logits(self, inputs: Tensor, y: Tensor) -> Tensor:
        out = self.model(inputs if self.dtype is None else inputs.to(self.dtype))
        if not self.checked:
            check_logits(out, y)
            self.checked = True
        return out

    def grad(self, x: Tensor, delta: Tensor, y: Tensor, loss: str,
             target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """``(gradient, logits, per-example loss)`` at ``x + delta``; the gradient is of delta's dtype."""
        d = delta.detach().requires_grad_(True)  # a fresh leaf: the steps mutate delta's storage
        total = None
        for _ in range(self.eot):
            with torch.enable_grad():
                logits = self.logits(x + d, y)
                values = attack_loss(logits, y, loss, target)
                (grad,) = torch.autograd.grad(values.sum(), d)
            total = grad if total is None else total + grad
        return (total if self.eot == 1 else total / self.eot), logits.detach(), values.detach()


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Parameters frozen (no weight gradients are computed); on exit their requires_grad flags,
    every buffer (BatchNorm running statistics, num_batches_tracked: a model in training mode
    updates them on each forward) are restored, also when the attack raises. The model's mode is
    left as it is: attack a trained model in ``eval()`` mode."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
