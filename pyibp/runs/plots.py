"""The curves of a run: its metrics.jsonl records drawn as losses, errors, ε and learning rate."""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

from .files import PathLike, atomic_write

__all__ = ["plot_curves"]


def plot_curves(records: Sequence[Dict[str, Any]], path: PathLike, title: str = "") -> None:
    """Training curves of ``metrics.jsonl`` records: losses, errors (%), ε and learning rate.

    Drawn to be read at a glance for any number of epochs: whole-epoch ticks, a log scale only
    where values span more than a decade (and are all positive: a learning rate that ends at 0
    stays linear), tick labels in plain numbers.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator, ScalarFormatter

    epochs = [r["epoch"] for r in records]

    def plain() -> Any:   # as many digits as the ticks' spacing needs, no offset or ×10ⁿ factor
        formatter = ScalarFormatter(useOffset=False)
        formatter.set_scientific(False)
        return formatter

    def epoch_axis(ax: Any) -> None:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(set(epochs)) <= 1:
            ax.set_xlim(min(epochs, default=1) - 1, max(epochs, default=1) + 1)

    def value_axis(ax: Any, values: Sequence[float]) -> None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            return
        if finite:   # at least ±1 % of the values around them: a flat curve reads as flat
            low, high = min(finite), max(finite)
            pad = max(0.1 * (high - low), 0.01 * max(abs(low), abs(high))) or 0.05
            ax.set_ylim(low - pad, high + pad)
        ax.yaxis.set_major_formatter(plain())

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    losses = [r["train_loss"] for r in records]
    ax.plot(epochs, losses, marker="o", markersize=3, label="train loss")
    if any("train_robust_loss" in r for r in records):
        robust = [r.get("train_robust_loss", math.nan) for r in records]
        ax.plot(epochs, robust, marker="o", markersize=3, label="train robust loss")
        losses = losses + robust
    epoch_axis(ax)
    value_axis(ax, losses)
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    ax = axes[1]
    for key, label in (("train_error", "train"), ("train_verified_error", "train verified"),
                       ("test_clean_error", "test clean"), ("test_pgd_error", "test PGD"),
                       ("test_verified_error", "test IBP-verified")):
        if any(r.get(key) is not None for r in records):
            ax.plot(epochs, [100 * r[key] if r.get(key) is not None else math.nan for r in records],
                    marker="o", markersize=3, label=label)
    epoch_axis(ax)
    ax.set_ylabel("error (%)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize="small")
    ax = axes[2]
    eps = [r["train_eps"] for r in records]
    ax.plot(epochs, eps, marker="o", markersize=3, color="tab:purple", label="ε (train)")
    epoch_axis(ax)
    ax.set_ylabel("ε at the epoch's last step")
    ax.set_ylim(-0.05 * (max(eps, default=0) or 1), 1.05 * (max(eps, default=0) or 1))
    ax.yaxis.set_major_formatter(plain())
    lr_ax = ax.twinx()
    lrs = [r["lr"] for r in records]
    lr_ax.plot(epochs, lrs, marker="o", markersize=3, color="tab:gray", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    value_axis(lr_ax, lrs)
    lr_ax.legend(*[sum(z, []) for z in zip(ax.get_legend_handles_labels(), lr_ax.get_legend_handles_labels())],
                 loc="best", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
