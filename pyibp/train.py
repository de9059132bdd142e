"""Epoch loops for standard and adversarial training, and evaluation under attack.

* :func:`train_epoch`: standard training (cross-entropy on clean inputs).
* :func:`adversarial_train_epoch`: PGD training (Madry et al. 2018); the tutorial's recipe on MNIST
  is ε=0.1, α=0.01, 20 steps, SGD with lr 0.1, then 0.01 after 5 epochs.
* :func:`fgsm_train_epoch`: "Fast is better than free" (Wong, Rice, Kolter 2020): FGSM from a
  random start, α = 1.25ε, with the cyclic learning rate of :func:`cyclic_lr`.
* :func:`evaluate`: clean error and error under FGSM or PGD.

Every loop returns a dict of plain floats (``loss``, ``error``, ``seconds``, ``lr``, ``examples``)
and shows a tqdm bar only when stdout is a terminal and ``quiet`` is False.

Modes: training steps run in ``model.train()``; the attack that makes the training inputs runs in
``model.eval()`` (BatchNorm with its running statistics, no dropout), so that the attack's own
forward passes neither update BatchNorm's running averages nor see batch statistics of half-made
adversarial inputs; the mode is switched back for the update. :func:`evaluate` runs in eval mode
and restores every submodule's mode on return.

Example:
    >>> train, test = pyibp.data.mnist5k()
    >>> model = pyibp.models.tutorial_cnn()
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> for epoch in range(10):
    ...     if epoch == 5:
    ...         opt.param_groups[0]["lr"] = 0.01
    ...     adversarial_train_epoch(model, loader(train, 100, shuffle=True, seed=epoch), opt,
    ...                             eps=0.1, alpha=0.01, steps=20)
    >>> evaluate(model, loader(test, 500), attack="pgd", eps=0.1, alpha=0.01, steps=40)["adv_error"]
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import fgsm, pgd

__all__ = ["train_epoch", "adversarial_train_epoch", "fgsm_train_epoch", "evaluate", "cyclic_lr",
           "progress", "batches", "eval_mode", "model_device", "EpochMeter"]

Device = Union[str, torch.device, None]
Perturb = Callable[[Tensor, Tensor], Tensor]
Metrics = Dict[str, float]


# ---------------------------------------------------------------------------------------------
# small pieces shared by the loops (and by pyibp.certified_training)
def progress(iterable: Iterable, *, desc: Optional[str] = None, total: Optional[int] = None,
             quiet: bool = False):
    """``tqdm(iterable)``, drawn only when stdout is a terminal and not ``quiet``."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                disable=quiet or not sys.stdout.isatty())


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def batches(loader: Iterable, device: torch.device) -> Iterator[Tuple[Tensor, Tensor]]:
    """``(x, y)`` pairs of ``loader`` moved to ``device``."""
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; every submodule gets its own mode back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


class EpochMeter:
    """Sums of loss and errors over an epoch, kept on the device until :meth:`result` (one sync).

    Example:
        >>> meter = EpochMeter()
        >>> meter.add(F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) != y)
        >>> meter.result()["error"]
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.loss: Union[Tensor, float] = 0.0
        self.errors: Union[Tensor, float] = 0.0
        self.examples = 0

    def add(self, loss: Tensor, wrong: Tensor) -> None:
        """Adds per-example losses (B,) and misclassification flags (B,)."""
        self.loss = self.loss + loss.detach().sum(dtype=torch.float64)
        self.errors = self.errors + wrong.sum()
        self.examples += loss.numel()

    def postfix(self) -> Dict[str, str]:
        n = max(self.examples, 1)
        return {"loss": f"{float(self.loss) / n:.4f}", "err": f"{float(self.errors) / n:.4f}"}

    def result(self, **extra: float) -> Metrics:
        n = max(self.examples, 1)
        out = {"loss": float(self.loss) / n, "error": float(self.errors) / n, "examples": self.examples,
               "seconds": time.perf_counter() - self.start}
        out.update(extra)
        return out


def _resolve_device(model: nn.Module, device: Device) -> torch.device:
    return torch.device(device) if device is not None else model_device(model)


# ---------------------------------------------------------------------------------------------
# training
def _fit_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
               scheduler: Optional[torch.optim.lr_scheduler.LRScheduler], device: Device, quiet: bool,
               desc: str, perturb: Optional[Perturb]) -> Metrics:
    """One pass of cross-entropy training on ``x + perturb(x, y)`` (on x itself when perturb is None)."""
    device = _resolve_device(model, device)
    meter = EpochMeter()
    bar = progress(batches(loader, device), desc=desc, total=len(loader) if hasattr(loader, "__len__") else None,
                   quiet=quiet)
    model.train()
    for x, y in bar:
        if perturb is not None:
            with eval_mode(model):
                x = x + perturb(x, y)
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="none")
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        meter.add(loss, logits.detach().argmax(1) != y)
        if not bar.disable:
            bar.set_postfix(meter.postfix(), refresh=False)
    return meter.result(lr=optimizer.param_groups[0]["lr"])


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None, device: Device = None,
                quiet: bool = False) -> Metrics:
    """One epoch of standard training: mean cross-entropy, one optimizer step per batch.

    Args:
        loader: yields ``(x, y)``: x (B, *) inputs, y (B,) labels.
        scheduler: stepped after every optimizer step (schedules are counted in steps).
        device: where batches go (default: the model's device).
    Returns:
        ``{"loss", "error", "examples", "seconds", "lr"}``: mean training loss and error of the
        epoch (measured on each batch before its step), and the learning rate at the end.

    Equivalent to the tutorial's ``epoch(loader, model, opt)`` with ``model.train()``.

    Example:
        >>> train_epoch(model, loader(train, 100, shuffle=True), torch.optim.SGD(model.parameters(), 0.1))
    """
    return _fit_epoch(model, loader, optimizer, scheduler, device, quiet, "train", None)


def adversarial_train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                            eps: float, alpha: float, steps: int, norm: str = "linf",
                            random_start: bool = True, restarts: int = 1, lower: float = 0.0,
                            upper: float = 1.0, loss: str = "ce",
                            scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                            device: Device = None, quiet: bool = False,
                            generator: Optional[torch.Generator] = None) -> Metrics:
    """One epoch of PGD adversarial training (Madry et al. 2018).

    Each batch is replaced by ``x + pgd(model, x, y, eps, ...)`` (made in eval mode, see the module
    docstring) and the model takes a cross-entropy step on it in train mode.

    Args:
        eps, alpha, steps, norm, random_start, restarts, lower, upper, loss, generator: as in
            :func:`pyibp.attacks.pgd`. The tutorial's MNIST recipe: eps=0.1, alpha=0.01, steps=20.
        scheduler, device, quiet: as in :func:`train_epoch`.
    Returns:
        As :func:`train_epoch`, with loss and error measured on the adversarial inputs.

    Equivalent to the tutorial's ``epoch_adversarial(loader, model, pgd_linf, opt, ...)``.

    Example:
        >>> adversarial_train_epoch(model, loader(train, 100, shuffle=True), opt, eps=0.1, alpha=0.01, steps=20)
    """
    def perturb(x: Tensor, y: Tensor) -> Tensor:
        return pgd(model, x, y, eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start,
                   restarts=restarts, lower=lower, upper=upper, loss=loss, generator=generator)

    return _fit_epoch(model, loader, optimizer, scheduler, device, quiet, f"pgd-{steps} train", perturb)


def fgsm_train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                     eps: float, alpha: Optional[float] = None, lower: float = 0.0, upper: float = 1.0,
                     scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                     device: Device = None, quiet: bool = False,
                     generator: Optional[torch.Generator] = None) -> Metrics:
    """One epoch of "fast" FGSM adversarial training (Wong, Rice, Kolter 2020).

    Each batch is attacked by a single l∞ step of size ``alpha`` (default ``1.25 * eps``) from a
    point uniform in the eps-box, i.e. ``pgd(..., steps=1, random_start=True)``; pair it with
    :func:`cyclic_lr` stepped per batch (the paper: SGD, lr peaking at 0.2 on CIFAR-10).

    Returns:
        As :func:`train_epoch`, with loss and error measured on the adversarial inputs.

    Example:
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        >>> sched = cyclic_lr(opt, total_steps=epochs * len(train_loader))
        >>> for _ in range(epochs):
        ...     fgsm_train_epoch(model, train_loader, opt, eps=0.1, scheduler=sched)
    """
    step = 1.25 * eps if alpha is None else alpha

    def perturb(x: Tensor, y: Tensor) -> Tensor:
        return pgd(model, x, y, eps, alpha=step, steps=1, random_start=True, lower=lower, upper=upper,
                   generator=generator)

    return _fit_epoch(model, loader, optimizer, scheduler, device, quiet, "fgsm train", perturb)


def cyclic_lr(optimizer: torch.optim.Optimizer, total_steps: int, *,
              peak: float = 0.4) -> torch.optim.lr_scheduler.LambdaLR:
    """The triangular one-cycle schedule of Wong et al. (2020), counted in optimizer steps.

    The learning rate rises linearly from 0 to the optimizer's lr at ``peak * total_steps`` and
    falls linearly back to 0 at ``total_steps``; call ``scheduler.step()`` after every
    optimizer step (pass it as ``scheduler=``). Step t trains with the rate at position t + 1, so
    the first step already moves and the last one is close to 0.

    Equivalent to ``lr(t) = np.interp(t + 1, [0, peak * T, T], [0, lr_max, 0])``.

    Example:
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.2)
        >>> sched = cyclic_lr(opt, total_steps=1000)
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if not 0 < peak <= 1:
        raise ValueError(f"peak must lie in (0, 1], got {peak!r}")
    knots = [0.0, peak * total_steps, float(total_steps)]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: float(np.interp(t + 1, knots, [0.0, 1.0, 0.0])))


# ---------------------------------------------------------------------------------------------
# evaluation
def evaluate(model: nn.Module, loader: Iterable, *, attack: Optional[str] = None, eps: float = 0.0,
             alpha: Optional[float] = None, steps: Optional[int] = None, restarts: int = 1,
             random_start: bool = False, norm: str = "linf", loss: str = "ce", lower: float = 0.0, upper: float = 1.0,
             device: Device = None, quiet: bool = False, return_correct: bool = False,
             generator: Optional[torch.Generator] = None) -> Dict[str, object]:
    """Clean error, and error under ``attack`` (``None``, ``"fgsm"`` or ``"pgd"``), in eval mode.

    An example counts as broken by the attack when it is misclassified clean *or* at
    ``x + delta``: both points lie in the ball, so the adversarial error is a valid lower bound of
    the robust error and never below the clean error.

    Args:
        attack: ``"fgsm"`` (l∞, uses eps only) or ``"pgd"`` (uses eps, alpha, steps, restarts,
            random_start, norm, loss, generator; see :func:`pyibp.attacks.pgd`).
        return_correct: also return per-example booleans ``correct`` and ``adv_correct`` (N,)
            on the CPU, in the loader's order.
    Returns:
        ``{"loss", "error", "examples", "seconds"}`` on clean inputs, plus ``"adv_loss"``,
        ``"adv_error"`` when attacking (adv_loss: the mean cross-entropy at ``x + delta``).
        The model's mode (every submodule's) is as before the call.

    Example:
        >>> r = evaluate(model, loader(test, 500), attack="pgd", eps=0.1, alpha=0.01, steps=40)
        >>> r["error"], r["adv_error"]          # clean and PGD-40 error, fractions in [0, 1]
    """
    if attack not in (None, "fgsm", "pgd"):
        raise ValueError(f"attack must be None, 'fgsm' or 'pgd', got {attack!r}")
    if attack == "pgd" and (alpha is None or steps is None):
        raise ValueError(f"attack='pgd' needs alpha (the step size) and steps, got alpha={alpha}, "
                         f"steps={steps}; e.g. alpha=eps/4, steps=40")
    device = _resolve_device(model, device)
    clean, adv = EpochMeter(), EpochMeter()
    correct, adv_correct = [], []
    with eval_mode(model):
        for x, y in progress(batches(loader, device), desc=f"eval {attack or 'clean'}", quiet=quiet,
                             total=len(loader) if hasattr(loader, "__len__") else None):
            with torch.no_grad():
                logits = model(x)
            right = logits.argmax(1) == y
            clean.add(F.cross_entropy(logits, y, reduction="none"), ~right)
            correct.append(right)
            if attack is None:
                continue
            if attack == "fgsm":
                delta = fgsm(model, x, y, eps, lower=lower, upper=upper)
            else:
                delta = pgd(model, x, y, eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start,
                            restarts=restarts, lower=lower, upper=upper, loss=loss, generator=generator)
            with torch.no_grad():
                adv_logits = model(x + delta)
            adv_right = right & (adv_logits.argmax(1) == y)
            adv.add(F.cross_entropy(adv_logits, y, reduction="none"), ~adv_right)
            adv_correct.append(adv_right)
    out: Dict[str, object] = dict(clean.result())
    if attack is not None:
        result = adv.result()
        out.update(adv_loss=result["loss"], adv_error=result["error"])
    if return_correct:
        out["correct"] = torch.cat(correct).cpu() if correct else torch.zeros(0, dtype=torch.bool)
        if attack is not None:
            out["adv_correct"] = torch.cat(adv_correct).cpu() if adv_correct else torch.zeros(0, dtype=torch.bool)
    return out
