"""Evaluation of trained models, in one place: :func:`evaluate` (clean error, and the error under
any attack object), :func:`verify` (per-example certificates of a bounding method of
:data:`METHODS`) and :func:`robustness_report` (clean, attacked and verified error side by side).

An attack is any callable ``attack(x, y) -> x_adv`` (the convention of :mod:`pyibp.attacks`:
configured once with its model, called on a batch, returning adversarial inputs of the ε-box), so
an attack added to :mod:`pyibp.attacks`, or one of your own, is evaluated without changes here.

An example is *verified* at ε when it is classified correctly and every margin lower bound
``logit_y - logit_j`` (j != y) over the box ``x ± ε ∩ [lower, upper]`` is > 0: no input of the box
changes the prediction. So, for any model and any attack that stays in the box,

    clean error <= attacked error <= verified error.

Example:
    >>> _, test = pyibp.data.mnist5k()
    >>> evaluate(model, pyibp.data.loader(test, 500), attack=PGD(model, 0.1, alpha=0.01, steps=40))["adv_error"]
    >>> result = verify(model, pyibp.data.loader(test, 500), 0.1, method="crown-ibp")
    >>> result.verified_error, result.clean_error
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import PGD, Attack
from .bounds import METHODS, AlphaOptions, margin_bounds
from .data import batches, progress
from .models import eval_mode, model_device
from .precision import full_precision

__all__ = ["evaluate", "verify", "robustness_report", "VerificationResult", "METHODS"]

Device = Union[str, torch.device, None]
Data = Union[Iterable[Tuple[Tensor, Tensor]], Tuple[Tensor, Tensor]]


@dataclass
class VerificationResult:
    """Per-example certificates for one ε and one bounding method (tensors on the CPU, data order).

    Attributes:
        verified: (N,) bool, correct and every margin lower bound > 0.
        worst_margin: (N,) the smallest lower bound of ``logit_y - logit_j`` over j != y (> 0: robust).
        correct: (N,) bool, the clean prediction is y.
        eps, method: what was verified.
        sound: the kind of certificate: True, the bounds hold for the network in exact real
            arithmetic (``sound=True``, :mod:`pyibp.bounds.sound`); False, for its float evaluation
            with round-to-nearest, up to rounding error.
    """

    verified: Tensor
    worst_margin: Tensor
    correct: Tensor
    eps: float
    method: str
    sound: bool = False

    def __len__(self) -> int:
        return self.verified.numel()

    @property
    def verified_error(self) -> float:
        """Fraction of examples not verified (1 - certified accuracy)."""
        return 1.0 - self.verified.double().mean().item() if len(self) else float("nan")

    @property
    def clean_error(self) -> float:
        return 1.0 - self.correct.double().mean().item() if len(self) else float("nan")

    def __repr__(self) -> str:
        return (f"VerificationResult(method={self.method!r}, eps={self.eps}, sound={self.sound}, examples={len(self)}, "
                f"clean_error={self.clean_error:.4f}, verified_error={self.verified_error:.4f})")


def _as_batches(data: Data, batch_size: int) -> Iterable[Tuple[Tensor, Tensor]]:
    """An iterable of (x, y) batches from a loader, or from a pair of tensors split into batches."""
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must hold the same number of examples, got {x.shape[0]} and {y.shape[0]}")
        return list(zip(x.split(batch_size), y.split(batch_size)))
    return data


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite value >= 0, got {eps}")
    return eps


def _certify_batch(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str, lower: float, upper: float,
                   dtype: Optional[torch.dtype], correct: Tensor, sound: bool = False,
                   alpha: AlphaOptions = AlphaOptions()) -> Tuple[Tensor, Tensor]:
    """(verified, worst margin) of one batch, in eval mode under no_grad."""
    margins = margin_bounds(model, x, y, eps, lower=lower, upper=upper, method=method, dtype=dtype, sound=sound,
                            alpha=alpha)
    worst = margins.scatter(1, y.long()[:, None], math.inf).amin(1)
    return correct & (worst > 0), worst


def _batches_of(data: Data, model: nn.Module, device: Device, batch_size: int, desc: str, quiet: bool
                ) -> Iterator[Tuple[Tensor, Tensor]]:
    loader = _as_batches(data, batch_size)
    device = torch.device(device) if device is not None else model_device(model)
    total = len(loader) if hasattr(loader, "__len__") else None
    return progress(batches(loader, device), desc=desc, total=total, quiet=quiet)


def evaluate(model: nn.Module, data: Data, *, attack: Optional[Attack] = None, device: Device = None,
             batch_size: int = 256, quiet: bool = False, return_correct: bool = False) -> Dict[str, object]:
    """Clean error, and the error under ``attack``, in eval mode.

    An example counts as broken by the attack when it is misclassified clean *or* at
    ``attack(x, y)``: both points lie in the ball, so the adversarial error is a valid lower bound of
    the robust error and never below the clean error.

    Args:
        data: a loader yielding ``(x, y)`` batches, or a pair of tensors (cut into ``batch_size``).
        attack: any callable ``attack(x, y) -> x_adv`` (B, *) (:class:`pyibp.attacks.PGD`,
            :class:`~pyibp.attacks.FGSM`, :class:`~pyibp.attacks.APGD`, :class:`~pyibp.attacks.FAB`,
            :class:`~pyibp.attacks.Square`, :class:`~pyibp.attacks.AutoAttack`, or your own).
        return_correct: also return per-example booleans ``correct`` and ``adv_correct`` (N,)
            on the CPU, in the data's order.
    Returns:
        ``{"loss", "error", "examples", "seconds"}`` on clean inputs, plus ``"adv_loss"``,
        ``"adv_error"`` when attacking (adv_loss: the mean cross-entropy at the attack's points).
        The model's mode (every submodule's) is as before the call.

    Equivalent to, per batch::

        correct = model(x).argmax(1) == y
        adv_correct = correct & (model(attack(x, y)).argmax(1) == y)

    Example:
        >>> r = evaluate(model, loader(test, 500), attack=PGD(model, eps=0.1, alpha=0.01, steps=40))
        >>> r["error"], r["adv_error"]          # clean and PGD-40 error, fractions in [0, 1]
    """
    if attack is not None and not callable(attack):
        raise TypeError(f"attack must be a callable attack(x, y) -> x_adv (e.g. pyibp.attacks.PGD(model, ...)), "
                        f"got {attack!r}")
    start = time.perf_counter()
    sums = {"loss": 0.0, "error": 0.0, "adv_loss": 0.0, "adv_error": 0.0}
    examples = 0
    correct, adv_correct = [], []
    with eval_mode(model):
        for x, y in _batches_of(data, model, device, batch_size, f"eval {_name(attack)}", quiet):
            with torch.no_grad():
                logits = model(x)
            right = logits.argmax(1) == y
            _add(sums, "", F.cross_entropy(logits, y, reduction="none"), ~right)
            correct.append(right)
            examples += y.shape[0]
            if attack is None:
                continue
            x_adv = attack(x, y)
            with torch.no_grad():
                adv_logits = model(x_adv)
            adv_right = right & (adv_logits.argmax(1) == y)
            _add(sums, "adv_", F.cross_entropy(adv_logits, y, reduction="none"), ~adv_right)
            adv_correct.append(adv_right)
    n = max(examples, 1)
    out: Dict[str, object] = {"loss": float(sums["loss"]) / n, "error": float(sums["error"]) / n,
                              "examples": examples, "seconds": time.perf_counter() - start}
    if attack is not None:
        out.update(adv_loss=float(sums["adv_loss"]) / n, adv_error=float(sums["adv_error"]) / n)
    if return_correct:
        out["correct"] = torch.cat(correct).cpu() if correct else torch.zeros(0, dtype=torch.bool)
        if attack is not None:
            out["adv_correct"] = torch.cat(adv_correct).cpu() if adv_correct else torch.zeros(0, dtype=torch.bool)
    return out


def _add(sums: Dict[str, object], prefix: str, loss: Tensor, wrong: Tensor) -> None:
    """Adds a batch's per-example losses and errors to ``sums`` (kept on the device: one sync at the end)."""
    sums[prefix + "loss"] = sums[prefix + "loss"] + loss.sum(dtype=torch.float64)
    sums[prefix + "error"] = sums[prefix + "error"] + wrong.sum()


def _name(attack: Optional[Attack]) -> str:
    return "clean" if attack is None else type(attack).__name__


def verify(model: nn.Module, data: Data, eps: float, *, method: str = "ibp", lower: float = 0.0,
           upper: float = 1.0, dtype: Optional[torch.dtype] = None, device: Device = None,
           batch_size: int = 256, quiet: bool = True, sound: bool = False,
           alpha: AlphaOptions = AlphaOptions()) -> VerificationResult:
    """Certifies every example of ``data`` against l∞ perturbations of size ``eps``.

    Runs the model in eval mode (every submodule's mode is restored afterwards) without gradients.

    Args:
        data: a loader yielding ``(x, y)`` batches, or a pair of tensors ``(x, y)``
            (x (N, *) in [lower, upper], y (N,)), cut into batches of ``batch_size``.
        eps: the radius.  method: ``"ibp"``, ``"crown-ibp"``, ``"crown"`` or ``"alpha-crown"``, each
            never looser than the one before (:func:`pyibp.margin_bounds`); ``alpha`` sets alpha-CROWN's steps.
        dtype: compute the bounds in this dtype (torch.float64 makes float32 rounding smaller, not gone).
        device: where the batches go (default: the model's).
        sound: certificates of the network in exact real arithmetic, whatever the float rounding
            (IBP or CROWN-IBP; see :mod:`pyibp.bounds.sound`); the result says which kind it holds.
    Returns:
        :class:`VerificationResult`. Per batch it equals::

            correct = model(x).argmax(1) == y
            m = pyibp.margin_bounds(model, x, y, eps, method=method, sound=sound)
            worst_margin = m.scatter(1, y[:, None], inf).amin(1)
            verified = correct & (worst_margin > 0)

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        >>> result = verify(model, (torch.rand(50, 1, 28, 28), torch.randint(0, 10, (50,))), 0.01)
        >>> result.verified.shape
        torch.Size([50])
    """
    _check_method(method)
    eps = _check_eps(eps)
    verified, worst, correct = [], [], []
    with eval_mode(model), torch.no_grad():
        for x, y in _batches_of(data, model, device, batch_size, f"verify {method}", quiet):
            # The classification is part of the certificate: in IEEE float32 too (pyibp.precision).
            with full_precision(x.device.type):
                right = model(x).argmax(1) == y
            v, w = _certify_batch(model, x, y, eps, method, lower, upper, dtype, right, sound, alpha)
            verified.append(v.cpu())
            worst.append(w.cpu())
            correct.append(right.cpu())
    cat = lambda ts, dt: torch.cat(ts) if ts else torch.zeros(0, dtype=dt)  # noqa: E731
    return VerificationResult(cat(verified, torch.bool), cat(worst, torch.float32), cat(correct, torch.bool),
                              eps, method, sound)


def robustness_report(model: nn.Module, data: Data, eps: float, *, pgd_steps: int = 40, pgd_restarts: int = 1,
                      alpha: Optional[float] = None, random_start: Optional[bool] = None,
                      attack: Optional[Attack] = None, methods: Sequence[str] = METHODS[:2], lower: float = 0.0,
                      upper: float = 1.0, dtype: Optional[torch.dtype] = None, device: Device = None,
                      batch_size: int = 256, generator: Optional[torch.Generator] = None,
                      quiet: bool = True) -> Dict[str, object]:
    """Clean error, error under attack (PGD by default) and the verified error of each method, on
    the same examples.

    An example counts as broken by the attack when it is misclassified clean or at the attack's
    point; an example verified by any method counts as not broken (no point of the box can break
    it). An attack finding a misclassified point inside a verified box would mean an unsound bound:
    such examples are counted in ``"contradictions"`` and a warning is raised. So for every model
    ``clean_error <= pgd_error <= verified_error[m]`` for each method m.

    Args:
        data: a loader of ``(x, y)`` or a pair of tensors, as in :func:`verify`.
        pgd_steps, pgd_restarts: of :func:`pyibp.attacks.pgd` (l∞, cross-entropy).
        alpha: PGD step size; default ``2.5 * eps / pgd_steps`` (Madry et al.).
        random_start: default True when ``pgd_restarts > 1`` (restarts from zero would repeat).
        attack: any attack object ``attack(x, y) -> x_adv`` of radius ``eps`` instead of PGD
            (its error is reported as ``pgd_error`` all the same).
        methods: bounding methods to verify with, from :data:`METHODS`.
        dtype: dtype of the bounds (see :func:`verify`).
    Returns:
        ``{"examples", "eps", "clean_error", "pgd_error", "verified_error": {method: error},
        "contradictions", "seconds"}``.

    Example:
        >>> report = robustness_report(model, pyibp.data.loader(test, 500), 0.1, pgd_restarts=3)
        >>> report["clean_error"], report["pgd_error"], report["verified_error"]["crown-ibp"]
    """
    for m in methods:
        _check_method(m)
    if len(methods) == 0:
        raise ValueError("methods must name at least one bounding method, got an empty sequence")
    eps = _check_eps(eps)
    if alpha is None:
        alpha = 2.5 * eps / pgd_steps if eps > 0 else 1.0
    if random_start is None:
        random_start = pgd_restarts > 1
    if attack is None:
        attack = PGD(model, eps, alpha=alpha, steps=pgd_steps, restarts=pgd_restarts, random_start=random_start,
                     lower=lower, upper=upper, generator=generator)
    start = time.perf_counter()
    counts = {"clean": 0, "pgd": 0, "contradictions": 0, **{m: 0 for m in methods}}
    examples = 0
    with eval_mode(model):
        for x, y in _batches_of(data, model, device, batch_size, "robustness report", quiet):
            with torch.no_grad():
                correct = model(x).argmax(1) == y
                verified_any = torch.zeros_like(correct)
                for m in methods:
                    v = _certify_batch(model, x, y, eps, m, lower, upper, dtype, correct)[0]
                    counts[m] += int((~v).sum())
                    verified_any |= v
            x_adv = attack(x, y)
            with torch.no_grad():
                attacked = model(x_adv).argmax(1) != y
            broken = ~correct | attacked
            counts["contradictions"] += int((broken & verified_any).sum())
            counts["clean"] += int((~correct).sum())
            counts["pgd"] += int((broken & ~verified_any).sum())
            examples += y.shape[0]
    if counts["contradictions"]:
        warnings.warn(f"the attack misclassified {counts['contradictions']} example(s) whose box was verified: a bound "
                      "is unsound or float32 rounding decided a near-zero margin; rerun with dtype=torch.float64 "
                      "and report the model if it persists", RuntimeWarning, stacklevel=2)
    n = max(examples, 1)
    return {"examples": examples, "eps": eps, "clean_error": counts["clean"] / n, "pgd_error": counts["pgd"] / n,
            "verified_error": {m: counts[m] / n for m in methods}, "contradictions": counts["contradictions"],
            "seconds": time.perf_counter() - start}
