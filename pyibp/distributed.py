"""Data-parallel training on PyTorch's own engine: torchrun, DistributedDataParallel, NCCL/gloo.

Under ``torchrun --nproc_per_node N`` every process runs the same script; :func:`init_distributed`
reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...), joins the process
group (NCCL on CUDA, gloo on the CPU) and picks this rank's device. Without torchrun it returns a
one-process context and nothing else changes.

Batches: :class:`ShardedLoader` draws the same shuffled sequence of *global* batches on every
rank (seeded by ``(seed, epoch)``, like DistributedSampler's per-epoch shuffling) and gives each
rank its slice of every global batch. With DDP averaging the gradients, one step on N ranks then
equals one step of a single process on the whole global batch.

Only rank 0 writes logs and checkpoints (``ctx.is_main``); :func:`reduce_metrics` turns each
rank's epoch metrics into the metrics of the whole epoch.

Example (``torchrun --nproc_per_node 2 train.py``)::

    ctx = init_distributed("cpu")
    model = wrap_model(tutorial_cnn().to(ctx.device), ctx)
    train_loader = ShardedLoader(train_set, global_batch_size=100, ctx=ctx, seed=0)
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)
        metrics = reduce_metrics(train_epoch(model, train_loader, opt), ctx)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

__all__ = ["DistContext", "init_distributed", "ShardedLoader", "reduce_metrics", "wrap_model", "unwrap",
           "shutdown"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: Optional[str] = None) -> DistContext:
    """Joins torchrun's process group when launched by torchrun, else a one-process context.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (default: cuda when available). On CUDA each rank uses
            GPU ``LOCAL_RANK`` and NCCL; on the CPU, gloo.
    Example:
        >>> ctx = init_distributed("cpu")      # plain `python`: rank 0 of 1
        >>> ctx.world_size
        1
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu")
    if world_size > 1:
        if kind == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown(ctx: DistContext) -> None:
    """Leaves the process group (a no-op for one process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(model)`` when there are several processes, else ``model``.

    pyibp's bounds and attacks accept the wrapped model (they work on ``model.module``); the
    clean forward pass of each training step goes through DDP, which averages the gradients of
    the whole loss (clean and bound terms alike) in the backward pass.
    """
    if not ctx.enabled:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


class ShardedLoader:
    """This rank's slices of the same sequence of shuffled global batches on every rank.

    Args:
        dataset: a TensorDataset (held in memory).
        global_batch_size: examples per step over all ranks; rank r takes examples
            ``r, r + N, r + 2N, ...`` of each global batch (N = world size).
        shuffle, seed: the order of epoch e is ``randperm(n)`` seeded with ``seed + e`` (call
            :meth:`set_epoch` each epoch), the same on every rank and across resumed runs.
    Example:
        >>> loader = ShardedLoader(train_set, 100, ctx=init_distributed("cpu"), seed=0)
        >>> loader.set_epoch(3); x, y = next(iter(loader))
    """

    def __init__(self, dataset: TensorDataset, global_batch_size: int, *, ctx: DistContext,
                 shuffle: bool = True, seed: int = 0):
        if global_batch_size < ctx.world_size:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be >= the number of processes "
                             f"({ctx.world_size})")
        self.tensors = dataset.tensors
        self.global_batch_size, self.ctx, self.shuffle, self.seed = global_batch_size, ctx, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.tensors[0]) // self.global_batch_size)

    def __iter__(self) -> Iterator[Tuple[Tensor, ...]]:
        n = len(self.tensors[0])
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        order = order.to(self.tensors[0].device)
        rank, world = self.ctx.rank, self.ctx.world_size
        for start in range(0, n, self.global_batch_size):
            index = order[start:start + self.global_batch_size][rank::world]
            yield tuple(t[index] for t in self.tensors)


# Metrics that are averages over examples; the rest (lr, eps, ...) are the same on every rank.
_PER_EXAMPLE_PREFIXES = ("loss", "error", "clean_error", "verified_error", "robust_loss", "pgd_error",
                         "fgsm_error", "adv_error")


def reduce_metrics(metrics: Dict[str, float], ctx: DistContext) -> Dict[str, float]:
    """Combines each rank's epoch metrics into the whole epoch's: per-example means are averaged
    with the ranks' example counts as weights, ``examples`` is summed, ``seconds`` is the slowest
    rank's; other values are rank 0's. Needs ``metrics["examples"]``; a no-op for one process."""
    if not ctx.enabled:
        return dict(metrics)
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
    count = float(metrics.get("examples", 1))
    sums = torch.tensor([float(metrics[k]) * (count if k.startswith(_PER_EXAMPLE_PREFIXES) else 1.0)
                         for k in keys] + [count], dtype=torch.float64)
    maxima = torch.tensor([float(metrics.get("seconds", 0.0))], dtype=torch.float64)
    if ctx.device.type == "cuda":
        sums, maxima = sums.to(ctx.device), maxima.to(ctx.device)
    dist.all_reduce(sums)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    total = float(sums[-1])
    out = dict(metrics)
    for k, v in zip(keys, sums[:-1].tolist()):
        if k.startswith(_PER_EXAMPLE_PREFIXES):
            out[k] = v / max(total, 1.0)
    out["examples"] = int(total)
    if "seconds" in out:
        out["seconds"] = float(maxima[0])
    return out
