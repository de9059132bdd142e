"""Complete verification of l∞ robustness, example by example: :func:`verify_robustness`.

Each example is first bounded with alpha-CROWN over the whole batch at once (most verifiable ones
end there); the correctly classified ones it leaves open go to :func:`~pyibp.verifier.complete.complete_verify`
(falsifier, ReLU branch and bound) one at a time, each within ``timeout`` seconds. A misclassified
example is falsified by itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Union

import torch
from torch import Tensor, nn

from ..bounds import AlphaOptions, margin_bounds
from .complete import complete_verify
from .spec import robustness_property

__all__ = ["RobustnessOutcome", "verify_robustness"]


@dataclass
class RobustnessOutcome:
    """Per example (data order): ``status`` "verified" (proved robust and correct), "falsified" (a
    checked counterexample, or misclassified) or "unknown" (timeout or undecided), and the seconds
    each took (the shared alpha-CROWN pass split evenly)."""

    status: List[str]
    seconds: Tensor

    @property
    def verified(self) -> Tensor:
        return torch.tensor([s == "verified" for s in self.status], dtype=torch.bool)

    @property
    def falsified(self) -> Tensor:
        return torch.tensor([s == "falsified" for s in self.status], dtype=torch.bool)

    @property
    def verified_error(self) -> float:
        """1 - the fraction verified: the complete verified error where nothing is unknown."""
        return 1.0 - self.verified.double().mean().item() if self.status else float("nan")


def verify_robustness(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, timeout: float = 60.0,
                      lower: Union[float, Tensor] = 0.0, upper: Union[float, Tensor] = 1.0,
                      alpha: AlphaOptions = AlphaOptions()) -> RobustnessOutcome:
    """Decides, for each example, whether every input of ``x_i ± eps ∩ [lower, upper]`` is classified y_i.

    Args:
        model: an nn.Module pyibp can bound, in eval mode.  x: (N, *) inputs.  y: (N,) labels.
        eps: the radius.  timeout: seconds of complete verification per example left open by alpha-CROWN.
    Returns:
        :class:`RobustnessOutcome`.
    Example:
        >>> out = verify_robustness(model, x[:10], y[:10], 0.03, timeout=10)
        >>> out.verified.sum(), out.falsified.sum()
    """
    start = time.monotonic()
    with torch.no_grad():
        logits = model(x)
        correct = logits.argmax(1) == y
        margins = margin_bounds(model, x, y, eps, lower=lower, upper=upper, method="alpha-crown", alpha=alpha)
    worst = margins.scatter(1, y.long()[:, None], float("inf")).amin(1)
    status = ["verified" if c and w > 0 else "falsified" if not c else "unknown"
              for c, w in zip(correct.tolist(), worst.tolist())]
    seconds = torch.full((len(status),), (time.monotonic() - start) / max(len(status), 1), dtype=torch.float64)
    classes = logits.shape[1]
    for i, s in enumerate(status):
        if s != "unknown":
            continue
        prop = robustness_property(x[i], int(y[i]), eps, num_classes=classes,
                                   lower=lower if not isinstance(lower, Tensor) else lower.cpu(),
                                   upper=upper if not isinstance(upper, Tensor) else upper.cpu())
        outcome = complete_verify(model, prop, timeout=timeout, device=x.device)
        status[i] = {"unsat": "verified", "sat": "falsified"}.get(outcome.status, "unknown")
        seconds[i] += outcome.seconds
    return RobustnessOutcome(status, seconds)
