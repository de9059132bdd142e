"""The data of a run: its data set cut to the recipe's fixed random subsets."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.data import TensorDataset

from ..data import load_dataset
from .files import Device, PathLike
from .recipe import TrainConfig

__all__ = ["subset", "load_data", "checked_subset"]


def subset(dataset: TensorDataset, n: Optional[int], seed: int = 0) -> TensorDataset:
    """``n`` examples drawn without replacement by a generator seeded with ``seed`` (in data order).

    mnist-5k is stored grouped by class, so the first n examples would hold one digit only.
    """
    if n is None or n >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=g)[:n].sort().values
    return TensorDataset(*(t[index.to(t.device)] for t in dataset.tensors))


def load_data(config: TrainConfig, *, data_dir: Optional[PathLike] = None, download: bool = False,
              device: Optional[Device] = None) -> Tuple[TensorDataset, TensorDataset]:
    """The run's (train, test) sets, cut to ``train_subset`` / ``test_subset``, on ``device``.

    A subset larger than its set is a ValueError naming both sizes: the recipe would otherwise
    record a size the run never had.
    """
    train, test = load_dataset(config.dataset, data_dir=data_dir, download=download, device=device)
    return (checked_subset(train, config.train_subset, "train_subset", f"training examples of {config.dataset}"),
            checked_subset(test, config.test_subset, "test_subset", f"test examples of {config.dataset}"))


def checked_subset(dataset: TensorDataset, n: Optional[int], name: str, what: str) -> TensorDataset:
    """:func:`subset`, refusing an ``n`` larger than ``dataset`` (``name`` and ``what`` word the
    ValueError, e.g. ``"test_subset"``, ``"test examples of mnist-5k"``)."""
    if n is not None and n > len(dataset):
        raise ValueError(f"{name} must be at most {len(dataset)} (the {what}), got {n}")
    return subset(dataset, n)

