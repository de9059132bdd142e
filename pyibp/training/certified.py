"""Certified training: IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al. 2020), with the
initialisation and warm-up regularisers of Shi et al. (2021).

The loss mixes the clean cross-entropy with a robust term, for IBP and CROWN-IBP the
cross-entropy of the worst-case logits that the bounds certify::

    loss = kappa * CE(model(x), y) + (1 - kappa) * CE(-m, y)

where ``m`` (B, K) are lower bounds of ``logit_y - logit_j`` over the ε-box (0 at j = y), so
``-m`` is an upper bound of ``logit_j - logit_y``, the logits shifted by ``logit_y``. ε ramps up
from 0, κ down from 1 (to 0.5 in Gowal et al., to 0 in Zhang et al.), and for CROWN-IBP the bound
is ``beta * CROWN-IBP + (1 - beta) * IBP`` with β ramping from 1 to 0
(:func:`pyibp.bounds.crown_ibp_mixed_margins`). :class:`CertifiedTraining` is the step every
certified method shares; the expressive losses of :mod:`pyibp.training.expressive` replace its
robust term.

Modes: the clean forward pass runs in ``model.train()`` (Dropout active, BatchNorm normalising by
batch statistics and updating its running averages); the bounds are computed in eval mode, with
each BatchNorm a fixed affine map: by default (``bn_stats="batch"``, Shi et al. 2021) the one of the
batch statistics the clean pass normalised with, so that the bounds follow the network being
trained; with ``bn_stats="running"`` the one of its running statistics, the map the trained model
is verified with.

Example:
    >>> train, _ = pyibp.data.mnist5k()
    >>> model = ibp_init(pyibp.models.tutorial_cnn())
    >>> opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    >>> loader = pyibp.data.loader(train, 100, shuffle=True)          # 40 steps per epoch
    >>> method = IBP(eps=LinearRamp(0.0, 0.1, begin_step=40, ramp_steps=200),
    ...              kappa=LinearRamp(1.0, 0.5, begin_step=40, ramp_steps=200))
    >>> step = 0
    >>> for epoch in range(10):
    ...     metrics, step = train_epoch(model, method, loader, opt, step=step)
"""
from __future__ import annotations

import abc
import contextlib
import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bounds import (Eps, _check_labels, _check_model_device, batch_statistics, check_box,
                      crown_ibp_mixed_margins, margin_bounds, margin_pass)
from ..bounds.checks import compute_dtype
from ..bounds.crown import _margin_pass
from ..bounds.graph import bound_graph
from ..distributed import syncs_gradients, unwrap
from ..models import eval_mode
from .method import Method, StepLoss
from .schedules import Schedule, as_schedule, eps_schedules

__all__ = ["CertifiedTraining", "IBP", "CROWNIBP", "ibp_loss", "bound_terms", "ibp_init", "shi_regularizer",
           "BoundTerms", "BN_STATS", "BOUNDS", "CERTIFIED_DEFAULTS"]

Pair = Tuple[Tensor, Tensor]
BN_STATS = ("batch", "running")
BOUNDS = ("ibp", "crown-ibp")   # the bounds of ibp_loss
# The ε at which Shi et al. evaluate their regularisers while the training ε is still 0.
_REG_MIN_EPS = 1e-6
# Certified training follows Shi et al. (2021) — IBP initialisation, ε = 0 for a short warm-up, a
# smooth ramp with their warm-up regularisers (weight 0.5), gradient clipping at 10, learning rate
# x0.2 twice near the end — with the κ mixing of Zhang et al. (2020) (1 -> 0 over the ramp; Gowal
# et al.'s 1 -> 0.5 verified worse here) and CROWN-IBP's β (1 -> 0). Their Adam rate (5e-4) is for
# 100 times more steps: on the 800 steps of mnist-5k 2e-3 verified 13 % where 5e-4 verified 26 %.
CERTIFIED_DEFAULTS: Dict[str, Any] = dict(epochs=30, lr=2e-3, lr_schedule="step", lr_decay_at=(0.75, 0.9),
                                          lr_decay=0.2)


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _check_bn_stats(bn_stats: str) -> None:
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")


def _batch_statistics(model: nn.Module, bn_stats: str):
    """:func:`pyibp.batch_statistics` when ``bn_stats == "batch"`` and ``model`` has a
    BatchNorm in training mode (whose clean pass then records them), else a no-op context."""
    training_bn = any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.training
                      for m in unwrap(model).modules())
    return batch_statistics(model) if bn_stats == "batch" and training_bn else contextlib.nullcontext()


class BoundTerms(NamedTuple):
    """What the robust term of one certified step computes.

    ``robust`` (B,): the per-example robust loss; ``ibp`` (B, K): IBP margins over the whole
    ε-box (the training metrics' verified error); ``input_box`` / ``pre_activations``: the boxes
    of the propagated region, recorded only when asked for (Shi et al.'s regularisers), else
    ``None`` / ``[]``.
    """

    robust: Tensor
    ibp: Tensor
    input_box: Optional[Pair]
    pre_activations: List[Pair]


def _robust_ce(margins: Tensor, y: Tensor) -> Tensor:
    """CE of the worst-case logits ``-margins`` (entry y is 0): (B,)."""
    return F.cross_entropy(-margins, y, reduction="none")


def bound_terms(model: nn.Module, x: Tensor, y: Tensor, eps_t: Tensor, *, beta: float = 0.0,
                loss_fusion: bool = False, lower: float = 0.0, upper: float = 1.0,
                record: bool = False) -> BoundTerms:
    """The robust term of IBP (``beta = 0``) or CROWN-IBP (``beta > 0``), on validated arguments.

    The robust CE is ``CE(-m, y)`` of the IBP margins ``m``, or of the CROWN-IBP training bound
    ``beta * CROWN-IBP + (1 - beta) * IBP`` (:func:`pyibp.bounds.crown_ibp_mixed_margins`); with
    ``loss_fusion`` it is ``beta * fused + (1 - beta) * CE(-IBP)`` (the fused CROWN-IBP bound of
    the cross-entropy, :func:`pyibp.bounds.crown_ibp_robust_ce`, from the same pass as the IBP
    margins). The boxes are recorded only when ``record`` (they cost the fusion of Linear/Conv
    with ReLU). ``model`` runs in the mode it is in (training calls this in eval mode).

    Args:
        x: (B, *).  y: (B,) int64 labels.  eps_t: () or (B,), as :func:`pyibp.bounds.check_box` returns.
    Returns:
        :class:`BoundTerms`, ``robust`` (B,), ``ibp`` (B, K).

    Example:
        >>> terms = bound_terms(model, x, y, torch.tensor(0.1), beta=0.5)
        >>> terms.robust.mean().backward()
    """
    if beta == 0.0:
        if not record:
            ibp = margin_bounds(model, x, y, eps_t, lower=lower, upper=upper)
            return BoundTerms(_robust_ce(ibp, y), ibp, None, [])
        p = margin_pass(model, x, y, eps_t, lower=lower, upper=upper, crown=False)
        return BoundTerms(_robust_ce(p.ibp, y), p.ibp, p.input_box, list(p.pre_activations))
    if loss_fusion:
        # One pass for the IBP margins and the fused bound: pyibp.bounds has no public call for both.
        p = _margin_pass(bound_graph(model), x, y, eps_t, lower, upper, compute_dtype(model, x, None), crown=False,
                         fused=True, boxes=record)
        robust = p.fused_ce if beta == 1.0 else beta * p.fused_ce + (1 - beta) * _robust_ce(p.ibp, y)
        return BoundTerms(robust, p.ibp, p.input_box if record else None, list(p.pre_activations))
    robust = _robust_ce(crown_ibp_mixed_margins(model, x, y, eps_t, beta, lower=lower, upper=upper), y)
    if record:
        p = margin_pass(model, x, y, eps_t, lower=lower, upper=upper, crown=False)
        return BoundTerms(robust, p.ibp, p.input_box, list(p.pre_activations))
    with torch.no_grad():   # the metrics' IBP margins
        ibp = margin_bounds(model, x, y, eps_t, lower=lower, upper=upper)
    return BoundTerms(robust, ibp, None, [])


def ibp_loss(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, kappa: float, *, method: str = "ibp",
             beta: float = 1.0, loss_fusion: bool = False, bn_stats: str = "batch", lower: float = 0.0,
             upper: float = 1.0) -> Tensor:
    """The certified-training loss ``kappa * CE(model(x), y) + (1 - kappa) * CE(-m, y)`` (a scalar).

    ``m`` are the margin lower bounds of :func:`pyibp.margin_bounds` (``method="ibp"``) or, for
    ``method="crown-ibp"``, ``beta * CROWN-IBP + (1 - beta) * IBP``
    (:func:`pyibp.bounds.crown_ibp_mixed_margins`). The clean logits come from ``model`` in the
    mode it is in; the bounds from eval mode (see the module docstring).

    With ``loss_fusion`` (CROWN-IBP only) the robust term is
    ``beta * crown_ibp_robust_ce(...) + (1 - beta) * CE(-m_IBP, y)`` instead: CROWN bounds the loss
    itself through one specification row per example rather than the K-1 margins (Xu et al. 2020),
    which makes the CROWN pass about K-1 times cheaper (see :func:`pyibp.bounds.crown.crown_ibp_robust_ce`).

    Args:
        x: (B, *) in [lower, upper].  y: (B,) labels.  eps: float, () or (B,).
        kappa: weight of the clean loss, in [0, 1].  method: the bound, one of :data:`BOUNDS`.
        beta: CROWN-IBP's share of the bound, in [0, 1].
        loss_fusion: bound the cross-entropy directly (CROWN-IBP only).
        bn_stats: ``"batch"``: when ``model`` is in training mode, its BatchNorm layers are bounded
            with the batch statistics of the clean pass (Shi et al. 2021;
            :func:`pyibp.batch_statistics`); ``"running"``: with their running statistics.
    Returns:
        A scalar tensor, the batch mean. Equivalent to::

            m = pyibp.margin_bounds(model, x, y, eps)
            kappa * F.cross_entropy(model(x), y) + (1 - kappa) * F.cross_entropy(-m, y)

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))
        >>> loss = ibp_loss(model, torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), 0.1, 0.5)
        >>> loss.backward()
    """
    if method not in BOUNDS:
        raise ValueError(f"method must be one of {BOUNDS} (the bound; the expressive losses are methods of "
                         f"pyibp.training.expressive), got {method!r}")
    crown = method == BOUNDS[1]
    if loss_fusion and not crown:
        raise ValueError(f"loss_fusion applies to the CROWN-IBP bound only, got method={method!r}")
    kappa, beta = _check_unit("kappa", kappa), _check_unit("beta", beta)
    eps_t = check_box(x, eps, lower, upper)
    _check_model_device(model, x)
    _check_labels(y, x, None)
    _check_bn_stats(bn_stats)
    statistics = _batch_statistics(model, bn_stats)
    with statistics:
        # The clean pass would only add zeros at κ = 0, unless it records BatchNorm's batch
        # statistics or DDP needs it to average the gradients.
        clean = None
        if kappa > 0 or not isinstance(statistics, contextlib.nullcontext) or syncs_gradients(model):
            clean = F.cross_entropy(model(x), y)
        if kappa == 1.0:
            return clean
        with eval_mode(model):
            robust = bound_terms(model, x, y.long(), eps_t, beta=beta if crown else 0.0, loss_fusion=loss_fusion,
                                 lower=lower, upper=upper).robust.mean()
    return robust if clean is None else kappa * clean + (1 - kappa) * robust


# ---------------------------------------------------------------------------------------------
# Shi et al. (2021): initialisation and warm-up regularisers
def ibp_init(model: nn.Module) -> nn.Module:
    """IBP initialisation (Shi, Wang, Zhang, Yi, Hsieh, "Fast Certified Robust Training with Short
    Warmup", NeurIPS 2021), in place; returns ``model``.

    Every Linear/Conv2d weight except the last layer's is drawn from ``N(0, σ²)`` with
    ``σ = sqrt(2π) / fan_in`` (fan_in: inputs per output, ``weight[0].numel()``). Since
    ``E|w| = σ sqrt(2/π) = 2 / fan_in``, a layer maps input widths Δ to output widths
    ``E[Σ_k |w_jk| Δ_k] = 2 Δ``, which ReLU halves on average: the interval width neither
    explodes nor vanishes with depth at initialisation (PyTorch's default, uniform in
    ``±1/sqrt(fan_in)``, multiplies it by about ``sqrt(fan_in) / 4`` per layer). Biases and the
    last layer keep their initialisation.

    Equivalent to ``nn.init.normal_(w, 0, math.sqrt(2 * math.pi) / w[0].numel())`` for each such w.

    Example:
        >>> model = ibp_init(pyibp.models.tutorial_cnn())
        >>> round(model[0].weight.std().item(), 2)   # sqrt(2π) / 9
        0.28
    """
    # In network order; any mode (a fresh model is in training mode, BatchNorm and all).
    layers = [m for m in unwrap(model).modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for layer in layers[:-1]:
            fan_in = layer.weight[0].numel()
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2 * math.pi) / fan_in)
    return model


def shi_regularizer(input_box: Pair, pre_activations: Sequence[Pair], *,
                    tol: float = 0.5) -> Tuple[Tensor, Tensor]:
    """The warm-up regularisers of Shi et al. (2021): ``(L_tightness, L_relu)``.

    With ``Δ_0`` the mean radius of the input box and, for each ReLU i, ``Δ_i`` the mean radius of
    its pre-activation box ``[l, u]`` and ``c = (l + u) / 2`` its centres:

    * ``L_tightness = mean_i relu(tol - Δ_0 / Δ_i) / tol``: penalises layers whose interval widths
      grow much larger than the input's (exploding bounds);
    * ``L_relu = mean_i [relu(tol - r_mean) + relu(tol - r_var)] / tol`` with
      ``r = min(ratio, 1 / ratio)`` of the active (l > 0) versus inactive (u < 0) neurons' mean
      centre (``mean(c·[l>0]) / -mean(c·[u<0])``) and spread (``Σ (c - mean c)²`` over each set):
      keeps ReLUs from all becoming inactive, which IBP training otherwise favours. A ratio whose
      two sides are both 0 (neither active nor inactive neurons) adds nothing.

    Args:
        input_box: ``(mu, rad)`` of the input box, e.g. ``margin_pass(...).input_box``.
        pre_activations: ``(l, u)`` per ReLU, e.g. ``margin_pass(...).pre_activations``.
        tol: τ, the target ratio (0.5 in the paper).
    Returns:
        Two scalar tensors (zeros when there is no ReLU). Training adds
        ``λ (1 - ε/ε_max) (L_tightness + L_relu)`` during the ε ramp (λ = 0.5 in the paper).

    Example:
        >>> p = pyibp.bounds.crown.margin_pass(model, x, y, 0.01, crown=False)
        >>> tightness, relu_balance = shi_regularizer(p.input_box, p.pre_activations)
    """
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    rad_in = input_box[1]
    zero = rad_in.new_zeros(())
    if not pre_activations:
        return zero, zero
    width_0 = rad_in.mean()
    tightness, balance = zero, zero
    for low, up in pre_activations:
        centre, radius = (up + low) / 2, (up - low) / 2
        tightness = tightness + F.relu(tol - width_0 / radius.mean().clamp(min=1e-12)) / tol
        active, inactive = (low > 0).to(centre.dtype), (up < 0).to(centre.dtype)
        spread = (centre - centre.mean()) ** 2
        term = zero
        # min(a/b, b/a) = min(a, b) / max(a, b) for a, b >= 0, written so that no gradient is 0/0.
        for a, b in (((centre * active).mean(), -(centre * inactive).mean()),
                     ((spread * active).sum(), (spread * inactive).sum())):
            larger = torch.maximum(a, b)
            ratio = torch.minimum(a, b) / larger.clamp(min=1e-12)
            term = term + torch.where(larger > 0, F.relu(tol - ratio) / tol, zero)
        balance = balance + term
    n = len(pre_activations)
    return tightness / n, balance / n


# ---------------------------------------------------------------------------------------------
# the methods
class CertifiedTraining(Method):
    """The step every certified method shares; subclasses give its robust term (:meth:`robust`).

    Each batch at global step ``t`` uses ``ε = eps(t)`` and ``κ = kappa(t)`` and minimises
    ``κ CE(model(x), y) + (1 - κ) robust``, plus, when ``reg_tightness`` or ``reg_relu`` is > 0,
    Shi et al.'s warm-up regularisers ``(1 - ε/ε_final) (reg_tightness L_tightness + reg_relu L_relu)``
    (:func:`shi_regularizer`; ε_final is ``eps.final``; while ε = 0 the boxes are taken at
    ε = 1e-6, as in their code).

    Args:
        eps, kappa: callables ``step -> float`` from :mod:`pyibp.training.schedules`, or numbers.
        bn_stats: ``"batch"`` (Shi et al.) or ``"running"``: which statistics the bounds of each
            training step give BatchNorm layers (see :func:`ibp_loss`).
        reg_tightness, reg_relu: weights of the regularisers (Shi et al.: 0.5 both); reg_tol: τ.
        lower, upper: the input domain.

    The step's metrics: ``verified_error`` (IBP-verified error of the batch at its step's ε over the
    whole ε-box, eval mode), ``robust_loss`` (the mean robust term), ``eps`` and ``kappa``.
    """

    certified = True
    options = ("kappa_end", "reg_weight", "ibp_init", "grad_clip")
    defaults = CERTIFIED_DEFAULTS

    def __init__(self, eps: Union[float, Schedule], kappa: Union[float, Schedule] = 0.0, *, bn_stats: str = "batch",
                 reg_tightness: float = 0.0, reg_relu: float = 0.0, reg_tol: float = 0.5, lower: float = 0.0,
                 upper: float = 1.0):
        _check_bn_stats(bn_stats)
        if reg_tightness < 0 or reg_relu < 0:
            raise ValueError(f"reg_tightness and reg_relu must be >= 0, got {reg_tightness} and {reg_relu}")
        self.eps, self.kappa = as_schedule(eps, "eps"), as_schedule(kappa, "kappa")
        self.bn_stats, self.reg_tightness, self.reg_relu, self.reg_tol = bn_stats, reg_tightness, reg_relu, reg_tol
        self.lower, self.upper = lower, upper
        self.eps_final = getattr(self.eps, "final", None)
        if self.regularises and self.eps_final is None:
            raise ValueError("the regularisers are scaled by 1 - eps/eps_final: eps needs a `final` attribute "
                             "(use a pyibp.training.schedules class)")

    @property
    def regularises(self) -> bool:
        return self.reg_tightness > 0 or self.reg_relu > 0

    @staticmethod
    def recipe_values(config: Any, steps_per_epoch: int) -> Dict[str, Any]:
        """The keyword arguments of :class:`CertifiedTraining` a recipe sets (ε, κ, BatchNorm
        statistics, regularisers)."""
        eps, kappa, _ = eps_schedules(config, steps_per_epoch)
        return dict(eps=eps, kappa=kappa, bn_stats=config.bn_stats, reg_tightness=config.reg_weight,
                    reg_relu=config.reg_weight)

    @classmethod
    def from_recipe(cls, config: Any, steps_per_epoch: int) -> "CertifiedTraining":
        return cls(**cls.recipe_values(config, steps_per_epoch))

    def prepare(self, model: nn.Module, x: Tensor, y: Tensor, eps_t: Tensor, kappa: float,
                generator: Optional[torch.Generator]) -> Optional[Tensor]:
        """What the robust term needs before the step's clean pass (an attack runs here, so that it
        records no BatchNorm statistics); None by default."""
        return None

    @abc.abstractmethod
    def robust(self, model: nn.Module, x: Tensor, y: Tensor, eps_t: Tensor, step: int, record: bool,
               prepared: Optional[Tensor]) -> BoundTerms:
        """The robust term of batch x (B, *) at ε ``eps_t``, in eval mode; ``prepared`` is what
        :meth:`prepare` returned; the boxes are recorded when ``record``."""

    def step_values(self, step: int) -> Dict[str, float]:
        """Values of this step among the metrics beside ε and κ (e.g. CROWN-IBP's β)."""
        return {}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, step: int,
             generator: Optional[torch.Generator] = None) -> StepLoss:
        eps, kappa = float(self.eps(step)), _check_unit("kappa", self.kappa(step))
        values = {"eps": eps, "kappa": kappa, **self.step_values(step)}
        reg_scale = max(0.0, 1.0 - eps / self.eps_final) if self.regularises and self.eps_final > 0 else 0.0
        bound_eps = max(eps, _REG_MIN_EPS) if reg_scale > 0 else eps
        eps_t = check_box(x, bound_eps, self.lower, self.upper)
        _check_model_device(model, x)
        y = _check_labels(y, x, None).long()
        needs_bound_grad = kappa < 1.0 or reg_scale > 0
        prepared = self.prepare(model, x, y, eps_t, kappa, generator)
        statistics = _batch_statistics(model, self.bn_stats)
        with statistics:
            # At κ = 0 the clean pass only feeds the metrics: no graph, no backward through it,
            # unless the bounds use the batch statistics it records, or DDP needs its forward pass
            # to average the gradients.
            batch_stats = not isinstance(statistics, contextlib.nullcontext)
            with torch.set_grad_enabled(kappa > 0 or (batch_stats and needs_bound_grad) or syncs_gradients(model)):
                logits = model(x)
            with eval_mode(model), torch.set_grad_enabled(needs_bound_grad):
                terms = self.robust(model, x, y, eps_t, step, reg_scale > 0, prepared)
        clean = F.cross_entropy(logits, y, reduction="none")
        loss = kappa * clean + (1 - kappa) * terms.robust
        objective = loss.mean()
        if reg_scale > 0:
            tightness, balance = shi_regularizer(terms.input_box, terms.pre_activations, tol=self.reg_tol)
            objective = objective + reg_scale * (self.reg_tightness * tightness + self.reg_relu * balance)
        with torch.no_grad():
            verified = terms.ibp.scatter(1, y[:, None], math.inf).amin(1) > 0
        return StepLoss(loss, logits, objective,
                        sums={"verified_error": (~verified).sum(),
                              "robust_loss": terms.robust.detach().sum(dtype=torch.float64)},
                        values=values)


class IBP(CertifiedTraining):
    """IBP training (Gowal et al. 2018): the robust term is ``CE(-m, y)`` of the IBP margins.

    Arguments as :class:`CertifiedTraining`.

    Example:
        >>> method = IBP(eps=LinearRamp(0.0, 0.1, 40, 400), kappa=LinearRamp(1.0, 0.0, 40, 400))
        >>> metrics, step = train_epoch(ibp_init(model), method, loader, opt, grad_clip=10.0)
    """

    def robust(self, model: nn.Module, x: Tensor, y: Tensor, eps_t: Tensor, step: int, record: bool,
               prepared: Optional[Tensor]) -> BoundTerms:
        return bound_terms(model, x, y, eps_t, lower=self.lower, upper=self.upper, record=record)


class CROWNIBP(CertifiedTraining):
    """CROWN-IBP training (Zhang et al. 2020): the robust term is ``CE(-m, y)`` of
    ``β CROWN-IBP + (1 - β) IBP`` margins, β = ``beta(step)`` (at β = 0 the CROWN pass is skipped).

    Args:
        beta: a schedule or a number in [0, 1] (default 1: pure CROWN-IBP bounds).
        loss_fusion: CROWN-IBP bounds the cross-entropy itself, one CROWN row per example instead of
            K-1 (Xu et al. 2020; see :func:`ibp_loss`).
        options: those of :class:`CertifiedTraining`.

    Example:
        >>> method = CROWNIBP(eps=0.1, kappa=0.0, beta=LinearRamp(1.0, 0.0, 0, 400), loss_fusion=True)
    """

    options = CertifiedTraining.options + ("beta_end", "loss_fusion")
    # Loss fusion: 12 epochs on mnist-5k verified 16.3 % (CROWN-IBP) against 15.8 % with the K-1
    # margins, in half the training time (an epoch's CROWN steps cost a quarter).
    defaults = dict(CERTIFIED_DEFAULTS, loss_fusion=True)

    def __init__(self, eps: Union[float, Schedule], kappa: Union[float, Schedule] = 0.0, *,
                 beta: Union[float, Schedule] = 1.0, loss_fusion: bool = False, **options: Any):
        super().__init__(eps, kappa, **options)
        self.beta, self.loss_fusion = as_schedule(beta, "beta"), loss_fusion

    @classmethod
    def from_recipe(cls, config: Any, steps_per_epoch: int) -> "CROWNIBP":
        beta = eps_schedules(config, steps_per_epoch)[2]
        return cls(**cls.recipe_values(config, steps_per_epoch), beta=beta, loss_fusion=config.loss_fusion)

    def step_values(self, step: int) -> Dict[str, float]:
        return {"beta": _check_unit("beta", self.beta(step))}

    def robust(self, model: nn.Module, x: Tensor, y: Tensor, eps_t: Tensor, step: int, record: bool,
               prepared: Optional[Tensor]) -> BoundTerms:
        return bound_terms(model, x, y, eps_t, beta=_check_unit("beta", self.beta(step)),
                           loss_fusion=self.loss_fusion, lower=self.lower, upper=self.upper, record=record)
