"""The one epoch loop: every training method's batches go through :func:`train_epoch`."""
from __future__ import annotations

import time
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..data import batches, progress
from ..models import model_device
from .method import Method

__all__ = ["train_epoch"]

Metrics = Dict[str, float]


def train_epoch(model: nn.Module, method: Method, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                step: int = 0, scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                grad_clip: Optional[float] = None, generator: Optional[torch.Generator] = None,
                device: Union[str, torch.device, None] = None, quiet: bool = False) -> Tuple[Metrics, int]:
    """One epoch of ``method``: per batch its loss, one optimizer step, the scheduler stepped.

    Args:
        model: trained in training mode (a DDP-wrapped or compiled model works as is).
        loader: yields ``(x, y)``: x (B, *) inputs, y (B,) labels.
        step: the global step of the first batch (schedules are functions of it).
        scheduler: stepped after every optimizer step (schedules are counted in steps).
        grad_clip: clip the gradients' total 2-norm to this value (Shi et al.: 10); None: off.
        generator: the random draws of the method's attacks (default: the global generator).
        device: where the batches go (default: the model's device).
    Returns:
        ``(metrics, step)``: ``metrics`` holds ``loss`` and ``error`` (means over the epoch's examples,
        each measured on its batch before the step), the method's ``sums`` divided by the number of
        examples and its last ``values`` (e.g. ``verified_error``, ``eps``), ``lr`` (at the end),
        ``examples``, ``steps`` and ``seconds``; ``step`` is the global step after the epoch.

    Equivalent to::

        for x, y in loader:
            out = method.loss(model.train(), x, y, step)
            optimizer.zero_grad(); out.loss.mean().backward(); optimizer.step(); scheduler.step(); step += 1

    Example:
        >>> metrics, step = train_epoch(model, PGDTraining(eps=0.1, alpha=0.025, steps=10), loader, optimizer)
        >>> metrics["error"]
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
    device = torch.device(device) if device is not None else model_device(model)
    start = time.perf_counter()
    first = step
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Sums stay on the device until the end of the epoch (one synchronisation).
    loss_sum: Union[Tensor, float] = 0.0
    errors: Union[Tensor, float] = 0.0
    sums: Dict[str, Tensor] = {}
    values: Dict[str, float] = {}
    examples = 0
    bar = progress(batches(loader, device), desc=f"{method.name or type(method).__name__} train", quiet=quiet,
                   total=len(loader) if hasattr(loader, "__len__") else None)
    model.train()
    for x, y in bar:
        out = method.loss(model, x, y, step, generator)
        objective = out.loss.mean() if out.objective is None else out.objective
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        step += 1
        with torch.no_grad():
            loss_sum = loss_sum + out.loss.detach().sum(dtype=torch.float64)
            errors = errors + (out.logits.detach().argmax(1) != y).sum()
            for key, value in out.sums.items():
                sums[key] = sums[key] + value.detach() if key in sums else value.detach().double()
        values.update(out.values)
        examples += y.shape[0]
        if not bar.disable:
            bar.set_postfix({**{k: f"{v:.4f}" for k, v in out.values.items()},
                             "loss": f"{float(loss_sum) / examples:.4f}"}, refresh=False)
    n = max(examples, 1)
    metrics: Metrics = {"loss": float(loss_sum) / n, "error": float(errors) / n,
                        **{key: float(value) / n for key, value in sums.items()}, **values,
                        "lr": optimizer.param_groups[0]["lr"], "examples": examples, "steps": step - first,
                        "seconds": time.perf_counter() - start}
    return metrics, step
