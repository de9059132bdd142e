"""Certified training: IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al. 2020), with the
initialisation and warm-up regularisers of Shi et al. (2021).

The loss mixes the clean cross-entropy with the cross-entropy of the worst-case logits that the
bounds certify::

    loss = kappa * CE(model(x), y) + (1 - kappa) * CE(-m, y)

where ``m`` (B, K) are lower bounds of ``logit_y - logit_j`` over the ε-box (0 at j = y), so
``-m`` is an upper bound of ``logit_j - logit_y``, the logits shifted by ``logit_y``. ε ramps up
from 0, κ down from 1 (to 0.5 in Gowal et al., to 0 in Zhang et al.), and for CROWN-IBP the bound
is ``beta * CROWN-IBP + (1 - beta) * IBP`` with β ramping from 1 to 0.

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
    >>> eps = LinearRamp(0.0, 0.1, begin_step=40, ramp_steps=200)
    >>> kappa = LinearRamp(1.0, 0.5, begin_step=40, ramp_steps=200)
    >>> step = 0
    >>> for epoch in range(10):
    ...     metrics, step = certified_train_epoch(model, loader, opt, eps_schedule=eps,
    ...                                           kappa_schedule=kappa, step_offset=step)
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bounds import Eps, _check_labels, _check_model_device, batch_statistics, check_box, margin_bounds
from .bounds.checks import compute_dtype
from .bounds.crown import _margin_pass
from .bounds.graph import bound_graph
from .distributed import syncs_gradients, unwrap
from .expressive_losses import EXPRESSIVE_METHODS, adversarial_point, expressive_robust_ce
from .schedules import Schedule, as_schedule
from .train import batches, eval_mode, model_device, progress

__all__ = ["ibp_loss", "certified_train_epoch", "ibp_init", "shi_regularizer", "METHODS"]

Pair = Tuple[Tensor, Tensor]
Device = Union[str, torch.device, None]
METHODS = ("ibp", "crown-ibp") + EXPRESSIVE_METHODS
BN_STATS = ("batch", "running")
# The ε at which Shi et al. evaluate their regularisers while the training ε is still 0.
_REG_MIN_EPS = 1e-6


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_expressive(expressive_alpha: float, sabr_lambda: float, attack_steps: int, attack_step_scale: float,
                      attack_eps_scale: float) -> None:
    _check_unit("expressive_alpha", expressive_alpha)
    _check_unit("sabr_lambda", sabr_lambda)
    if not (isinstance(attack_steps, int) and attack_steps >= 1):
        raise ValueError(f"attack_steps must be an integer >= 1, got {attack_steps!r}")
    if not attack_step_scale > 0 or not attack_eps_scale > 0:
        raise ValueError(f"attack_step_scale and attack_eps_scale must be > 0, got {attack_step_scale} "
                         f"and {attack_eps_scale}")


def _check_loss_fusion(method: str, loss_fusion: bool) -> None:
    if loss_fusion and method != "crown-ibp":
        raise ValueError(f"loss_fusion applies to method='crown-ibp' only, got method={method!r}")


def _check_bn_stats(bn_stats: str) -> None:
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")


def _batch_statistics(model: nn.Module, bn_stats: str):
    """:func:`pyibp.batch_statistics` when ``bn_stats == "batch"`` and ``model`` has a
    BatchNorm in training mode (whose clean pass then records them), else a no-op context."""
    training_bn = any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.training
                      for m in unwrap(model).modules())
    return batch_statistics(model) if bn_stats == "batch" and training_bn else contextlib.nullcontext()


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# the bound part of the loss
def _bounds(model: nn.Module, x: Tensor, y: Tensor, eps_t: Tensor, *, method: str, beta: float,
            lower: float, upper: float, record: bool, loss_fusion: bool = False
            ) -> Tuple[Tensor, Tensor, Optional[Pair], List[Pair]]:
    """``(robust CE (B,), IBP margins, input box, pre-activation boxes)`` on validated arguments.

    The robust CE is ``CE(-m, y)`` of the IBP margins ``m``, or of ``beta * CROWN-IBP + (1 - beta) * IBP``
    margins; with ``loss_fusion`` it is ``beta * fused + (1 - beta) * CE(-IBP)`` (the fused CROWN-IBP
    bound, :func:`pyibp.bounds.crown.crown_ibp_robust_ce`). The boxes are recorded only when ``record``
    (they cost the fusion of Linear/Conv with ReLU).
    """
    use_crown = method == "crown-ibp" and beta > 0
    if not use_crown and not record:
        ibp = margin_bounds(model, x, y, eps_t, lower=lower, upper=upper)
        return _robust_ce(ibp, y), ibp, None, []
    fused = use_crown and loss_fusion
    p = _margin_pass(bound_graph(model), x, y, eps_t, lower, upper, compute_dtype(model, x, None),
                     crown=use_crown and not fused, fused=fused, boxes=record)
    if not use_crown:
        robust = _robust_ce(p.ibp, y)
    elif fused:
        robust = p.fused_ce if beta == 1.0 else beta * p.fused_ce + (1 - beta) * _robust_ce(p.ibp, y)
    else:
        robust = _robust_ce(p.crown if beta == 1.0 else beta * p.crown + (1 - beta) * p.ibp, y)
    return robust, p.ibp, p.input_box, p.pre_activations


def _robust_ce(margins: Tensor, y: Tensor) -> Tensor:
    """CE of the worst-case logits ``-margins`` (entry y is 0): (B,)."""
    return F.cross_entropy(-margins, y, reduction="none")


def ibp_loss(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, kappa: float, *, method: str = "ibp",
             beta: float = 1.0, loss_fusion: bool = False, bn_stats: str = "batch", lower: float = 0.0,
             upper: float = 1.0) -> Tensor:
    """The certified-training loss ``kappa * CE(model(x), y) + (1 - kappa) * CE(-m, y)`` (a scalar).

    ``m`` are the margin lower bounds of :func:`pyibp.margin_bounds` (``method="ibp"``) or, for
    ``method="crown-ibp"``, ``beta * CROWN-IBP + (1 - beta) * IBP``
    (:func:`pyibp.bounds.crown.crown_ibp_mixed_margins`). The clean logits come from ``model`` in the
    mode it is in; the bounds from eval mode (see the module docstring).

    With ``loss_fusion`` (CROWN-IBP only) the robust term is
    ``beta * crown_ibp_robust_ce(...) + (1 - beta) * CE(-m_IBP, y)`` instead: CROWN bounds the loss
    itself through one specification row per example rather than the K-1 margins (Xu et al. 2020),
    which makes the CROWN pass about K-1 times cheaper (see :func:`pyibp.bounds.crown.crown_ibp_robust_ce`).

    Args:
        x: (B, *) in [lower, upper].  y: (B,) labels.  eps: float, () or (B,).
        kappa: weight of the clean loss, in [0, 1].  beta: CROWN-IBP's share of the bound, in [0, 1].
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
    if method in EXPRESSIVE_METHODS:
        raise ValueError(f"ibp_loss computes the 'ibp' and 'crown-ibp' losses; for {method!r} use "
                         "pyibp.expressive_losses.expressive_loss")
    _check_method(method)
    _check_loss_fusion(method, loss_fusion)
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
            robust = _bounds(model, x, y, eps_t, method=method, beta=beta, lower=lower, upper=upper,
                             record=False, loss_fusion=loss_fusion)[0].mean()
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
# the epoch
def certified_train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, *,
                          eps_schedule: Union[float, Schedule], kappa_schedule: Union[float, Schedule],
                          beta_schedule: Union[float, Schedule, None] = None, method: str = "ibp",
                          loss_fusion: bool = False, bn_stats: str = "batch", step_offset: int = 0, grad_clip: Optional[float] = None,
                          scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                          lower: float = 0.0, upper: float = 1.0, reg_tightness: float = 0.0,
                          reg_relu: float = 0.0, reg_tol: float = 0.5, expressive_alpha: float = 0.5,
                          sabr_lambda: float = 0.4, attack_steps: int = 1, attack_step_scale: float = 10.0,
                          attack_eps_scale: float = 1.0, generator: Optional[torch.Generator] = None,
                          quiet: bool = False, device: Device = None) -> Tuple[Dict[str, float], int]:
    """One epoch of certified training; returns ``(metrics, step)``, step being the new global step.

    Each batch at global step ``t`` (``step_offset`` for the first batch) uses ``ε = eps_schedule(t)``,
    ``κ = kappa_schedule(t)``, ``β = beta_schedule(t)`` and minimises
    ``κ CE(model(x), y) + (1 - κ) CE(-m, y)`` (see :func:`ibp_loss`), plus, when ``reg_tightness``
    or ``reg_relu`` is > 0, Shi et al.'s warm-up regularisers
    ``(1 - ε/ε_final) (reg_tightness L_tightness + reg_relu L_relu)`` (:func:`shi_regularizer`;
    ε_final is ``eps_schedule.final``; while ε = 0 the boxes are taken at ε = 1e-6, as in their code).

    Args:
        loader: yields ``(x, y)``: x (B, *) in [lower, upper], y (B,) labels.
        eps_schedule, kappa_schedule, beta_schedule: callables ``step -> float`` from
            :mod:`pyibp.schedules`, or numbers (constants). beta is used by ``method="crown-ibp"``
            only and defaults to 1 (pure CROWN-IBP bounds); at β = 0 the CROWN pass is skipped.
        method: ``"ibp"``, ``"crown-ibp"``, or an expressive loss of :mod:`pyibp.expressive_losses`
            (``"mtl-ibp"``, ``"cc-ibp"``, ``"sabr"``), whose robust term replaces ``CE(-m, y)``.
        loss_fusion: CROWN-IBP bounds the cross-entropy itself, one CROWN row per example instead
            of K-1 (see :func:`ibp_loss`).
        bn_stats: ``"batch"`` (Shi et al.) or ``"running"``: which statistics the bounds of each
            training step give BatchNorm layers (see :func:`ibp_loss`).
        grad_clip: clip the gradients' total 2-norm to this value (Shi et al.: 10).
        scheduler: a learning-rate scheduler, stepped after every optimizer step (build step and
            cosine schedules with ``T_max``/milestones in steps, e.g. ``epochs * len(loader)``).
        reg_tightness, reg_relu: weights of the regularisers (Shi et al.: 0.5 both); reg_tol: τ.
        expressive_alpha: the IBP share α of ``"mtl-ibp"`` / ``"cc-ibp"``; sabr_lambda: SABR's λ.
        attack_steps, attack_step_scale, attack_eps_scale: the expressive losses' attack
            (:func:`pyibp.expressive_losses.adversarial_point`), from random starts drawn by ``generator``.
        device: where the batches go (default: the model's device).
    Returns:
        ``metrics`` with ``loss`` (mean training loss), ``clean_error`` (train-mode predictions),
        ``verified_error`` (IBP-verified error on the training batches, each at its step's ε, eval
        mode), ``robust_loss`` (the mean robust term of the loss), ``eps``, ``kappa``, ``beta`` (at the last step;
        0 for ``"ibp"``),
        ``seconds``, ``lr`` (at the end), ``examples``, ``steps``; and the global step after the epoch.

    Example:
        >>> metrics, step = certified_train_epoch(model, loader, opt, eps_schedule=LinearRamp(0, 0.1, 0, 400),
        ...                                       kappa_schedule=LinearRamp(1, 0.5, 0, 400))
        >>> metrics["verified_error"]
    """
    _check_method(method)
    _check_loss_fusion(method, loss_fusion)
    _check_bn_stats(bn_stats)
    _check_expressive(expressive_alpha, sabr_lambda, attack_steps, attack_step_scale, attack_eps_scale)
    expressive = method in EXPRESSIVE_METHODS
    eps_of = as_schedule(eps_schedule, "eps_schedule")
    kappa_of = as_schedule(kappa_schedule, "kappa_schedule")
    beta_of = as_schedule(1.0 if beta_schedule is None else beta_schedule, "beta_schedule")
    if step_offset < 0:
        raise ValueError(f"step_offset must be >= 0, got {step_offset}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
    if reg_tightness < 0 or reg_relu < 0:
        raise ValueError(f"reg_tightness and reg_relu must be >= 0, got {reg_tightness} and {reg_relu}")
    regularise = reg_tightness > 0 or reg_relu > 0
    eps_final = getattr(eps_of, "final", None)
    if regularise and eps_final is None:
        raise ValueError("the regularisers are scaled by 1 - eps/eps_final: eps_schedule needs a `final` "
                         "attribute (use a pyibp.schedules class)")
    device = torch.device(device) if device is not None else model_device(model)

    start = time.perf_counter()
    step = step_offset
    sums = torch.zeros(4, dtype=torch.float64, device=device)   # loss, clean errors, verified errors, robust
    examples = 0
    eps = kappa = beta = float("nan")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = progress(batches(loader, device), desc=f"{method} train", quiet=quiet,
                   total=len(loader) if hasattr(loader, "__len__") else None)
    model.train()
    for x, y in bar:
        eps, kappa = float(eps_of(step)), _check_unit("kappa", kappa_of(step))
        beta = _check_unit("beta", beta_of(step)) if method == "crown-ibp" else 0.0
        reg_scale = max(0.0, 1.0 - eps / eps_final) if regularise and eps_final > 0 else 0.0
        bound_eps = max(eps, _REG_MIN_EPS) if reg_scale > 0 else eps
        eps_t = check_box(x, bound_eps, lower, upper)
        _check_model_device(model, x)
        y = _check_labels(y, x, None).long()

        needs_bound_grad = kappa < 1.0 or reg_scale > 0
        # The attack runs before the step's clean pass so that it records no BatchNorm statistics.
        x_adv = (adversarial_point(model, x, y, eps_t, steps=attack_steps, step_scale=attack_step_scale,
                                   eps_scale=attack_eps_scale, lower=lower, upper=upper, generator=generator)
                 if expressive and kappa < 1.0 else x)
        statistics = _batch_statistics(model, bn_stats)
        with statistics:
            # At κ = 0 the clean pass only feeds the metrics: no graph, no backward through it,
            # unless the bounds use the batch statistics it records, or DDP needs its forward pass
            # to average the gradients.
            batch_stats = not isinstance(statistics, contextlib.nullcontext)
            with torch.set_grad_enabled(kappa > 0 or (batch_stats and needs_bound_grad)
                                        or syncs_gradients(model)):
                logits = model(x)
            with eval_mode(model), torch.set_grad_enabled(needs_bound_grad):
                if expressive:
                    robust, ibp, box, pre = expressive_robust_ce(
                        model, x, y, x_adv, eps_t, method=method, alpha=expressive_alpha, lam=sabr_lambda,
                        lower=lower, upper=upper, record=reg_scale > 0)
                else:
                    robust, ibp, box, pre = _bounds(model, x, y, eps_t, method=method, beta=beta, lower=lower,
                                                    upper=upper, record=reg_scale > 0, loss_fusion=loss_fusion)
        clean = F.cross_entropy(logits, y, reduction="none")
        loss = kappa * clean + (1 - kappa) * robust
        total = loss.mean()
        if reg_scale > 0:
            tightness, balance = shi_regularizer(box, pre, tol=reg_tol)
            total = total + reg_scale * (reg_tightness * tightness + reg_relu * balance)

        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        step += 1

        with torch.no_grad():
            verified = ibp.scatter(1, y[:, None], math.inf).amin(1) > 0
            wrong = logits.argmax(1) != y
            sums += torch.stack([loss.sum(), wrong.sum(), (~verified).sum(), robust.sum()]).double()
        examples += y.shape[0]
        if not bar.disable:
            bar.set_postfix({"eps": f"{eps:.4f}", "loss": f"{float(sums[0]) / examples:.4f}"}, refresh=False)

    n = max(examples, 1)
    loss_sum, clean_err, verified_err, robust_sum = (float(v) / n for v in sums.tolist())
    metrics = {"loss": loss_sum, "clean_error": clean_err, "verified_error": verified_err,
               "robust_loss": robust_sum, "eps": eps, "kappa": kappa, "beta": beta,
               "seconds": time.perf_counter() - start, "lr": optimizer.param_groups[0]["lr"],
               "examples": examples, "steps": step - step_offset}
    return metrics, step
