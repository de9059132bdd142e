"""The curves of a run: its metrics.jsonl records drawn as losses, errors, ε and learning rate."""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

from .files import PathLike, atomic_write

__all__ = ["plot_curves"]


def plot_curves(records: Sequence[Dict[str, Any]], path: PathLike, title: str = "") -> None:
    """Training curves of ``metrics.jsonl`` records: losses, errors (%), ε and learning rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in records], marker=".", label="train loss")
    if any("train_robust_loss" in r for r in records):
        ax.plot(epochs, [r.get("train_robust_loss", math.nan) for r in records], marker=".",
                label="train robust loss")
    ax.set_xlabel("epoch")
    ax.set_yscale("log")
    ax.legend()
    ax = axes[1]
    for key, label in (("train_error", "train"), ("train_verified_error", "train verified"),
                       ("test_clean_error", "test clean"), ("test_pgd_error", "test PGD"),
                       ("test_verified_error", "test IBP-verified")):
        if any(r.get(key) is not None for r in records):
            ax.plot(epochs, [100 * r[key] if r.get(key) is not None else math.nan for r in records],
                    marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    ax = axes[2]
    ax.plot(epochs, [r["train_eps"] for r in records], marker=".", color="tab:purple", label="ε (train)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ε at the epoch's last step")
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [r["lr"] for r in records], marker=".", color="tab:gray", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_yscale("log")
    fig.legend(*[sum(z, []) for z in zip(ax.get_legend_handles_labels(), lr_ax.get_legend_handles_labels())],
               loc="upper right", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)

