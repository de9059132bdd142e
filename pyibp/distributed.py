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
rank's epoch metrics into the metrics of the whole epoch; :func:`on_main` runs a step (reading or
preparing a run folder) on rank 0 alone and hands its result, or its exception, to every rank.

Mixed precision: :class:`AutocastForward` runs a model's forward pass under ``torch.autocast``
and is looked through by :func:`unwrap`, so pyibp's bounds and attacks, which unwrap the model,
stay in float32 while the clean forward pass of each training step runs in bf16.

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
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

__all__ = ["DistContext", "init_distributed", "ShardedLoader", "reduce_metrics", "wrap_model", "unwrap",
           "shutdown", "barrier", "broadcast_object", "on_main", "broadcast_buffers", "AutocastForward",
           "launched_by_torchrun", "syncs_gradients"]

T = TypeVar("T")


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


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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


def barrier(ctx: DistContext) -> None:
    """Waits until every rank gets here (a no-op for one process)."""
    if ctx.enabled:
        dist.barrier(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def broadcast_object(obj: T, ctx: DistContext, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled; ``obj`` of the other ranks is ignored).

    Tensors arrive on the device they were pickled on: send CPU tensors (e.g. a checkpoint loaded
    with ``map_location="cpu"``). Returns ``obj`` itself for one process. A step that may fail
    on rank 0 goes through :func:`on_main` instead, which hands the error to every rank.

    Example:
        >>> seed = broadcast_object(random.randrange(2**31) if ctx.is_main else None, ctx)   # one seed for all
    """
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.device.type == "cuda" else None)
    return box[0]


def on_main(fn: Callable[[], T], ctx: DistContext) -> T:
    """``fn()`` on rank 0 only; every rank returns its result, or raises its exception.

    For the steps that touch a run folder (checking it, reading its recipe, creating it): rank 0
    alone does them, so the folder need not be on a file system the other nodes share, and an
    error there (a run in the way) stops every rank with the same message instead of leaving the
    others waiting. For one process it is ``fn()``.
    """
    if not ctx.enabled:
        return fn()
    payload: Tuple[Any, Optional[BaseException]] = (None, None)
    if ctx.is_main:
        try:
            payload = (fn(), None)
        except Exception as err:  # noqa: BLE001 - handed to every rank, re-raised below
            payload = (None, err)
        try:
            pickle.dumps(payload)
        except Exception:  # an unpicklable result or exception still stops every rank
            err = payload[1]
            payload = (None, RuntimeError(f"on rank 0: {type(err).__name__}: {err}" if err is not None
                                          else "on rank 0: the result cannot be sent to the other ranks"))
    result, error = broadcast_object(payload, ctx)
    if error is not None:
        raise error
    return result


def broadcast_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Copies rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of every forward pass, so after the last step of an epoch
    each rank holds the statistics updated by its own slice; this makes evaluation and the saved
    checkpoint use rank 0's on every rank. A no-op for one process.
    """
    if not ctx.enabled:
        return
    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer.data, src=0)


class AutocastForward(nn.Module):
    """``module``'s forward pass under ``torch.autocast(device_type, dtype)``, floating outputs
    returned in float32 (the loss is then computed in float32, as autocast itself does for
    cross-entropy).

    :func:`unwrap` looks through it, and so do pyibp's bounds and attacks: wrap the model of a
    certified training step to get a bf16 clean forward pass with bounds in float32.

    Example:
        >>> amp_model = AutocastForward(model, "cuda")          # logits (B, K) float32, bf16 inside
        >>> certified_train_epoch(amp_model, loader, opt, eps_schedule=0.1, kappa_schedule=0.5)
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args, **kwargs)
        return out.float() if isinstance(out, Tensor) and out.is_floating_point() else out


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


def _layers_of_wrapping(model: nn.Module) -> Iterator[nn.Module]:
    """``model``, then each module it wraps (DistributedDataParallel, DataParallel,
    :class:`AutocastForward`, ``torch.compile``), outermost first."""
    while True:
        yield model
        if isinstance(model, (DistributedDataParallel, nn.DataParallel, AutocastForward)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / ``torch.compile`` /
    :class:`AutocastForward` wrappers, in any nesting."""
    *_, inner = _layers_of_wrapping(model)
    return inner


def syncs_gradients(model: nn.Module) -> bool:
    """Whether ``model`` is, or wraps, a DistributedDataParallel: its forward pass must then run
    with gradients enabled in every training step, since that is what makes the backward pass
    average the gradients over the ranks (also those of loss terms computed past the wrapper)."""
    return any(isinstance(m, DistributedDataParallel) for m in _layers_of_wrapping(model))


class ShardedLoader:
    """This rank's slices of the same sequence of shuffled global batches on every rank.

    Args:
        dataset: a TensorDataset (held in memory).
        global_batch_size: examples per step over all ranks; rank r takes examples
            ``r, r + N, r + 2N, ...`` of each global batch (N = world size).
        shuffle, seed: the order of epoch e is ``randperm(n)`` from a generator seeded with
            ``seed + e`` (call :meth:`set_epoch` each epoch; it can also take the epoch's seed
            itself), the same on every rank and across resumed runs. For one process the batches
            are those of ``pyibp.data.loader(dataset, global_batch_size, shuffle=True, seed=s)``
            with s the epoch's seed.

    One step on N ranks equals one step on the whole global batch when every slice holds the same
    number of examples (``global_batch_size`` and the last batch multiples of N): DDP averages the
    ranks' gradients with equal weights. Otherwise slices differ by one example and the examples
    of the smaller slices weigh slightly more.

    Raises:
        ValueError: ``global_batch_size`` is smaller than the number of processes, or the last
            global batch is (some rank would get an empty batch).
    Example:
        >>> loader = ShardedLoader(train_set, 100, ctx=init_distributed("cpu"), seed=0)
        >>> loader.set_epoch(3); x, y = next(iter(loader))
        >>> loader.set_epoch(3, seed=derive_seed(0, 3, "shuffle"))   # the seed of pyibp train
    """

    def __init__(self, dataset: TensorDataset, global_batch_size: int, *, ctx: DistContext,
                 shuffle: bool = True, seed: int = 0):
        if global_batch_size < ctx.world_size:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be >= the number of processes "
                             f"({ctx.world_size})")
        n = len(dataset.tensors[0])
        last = n % global_batch_size
        if 0 < last < ctx.world_size:
            raise ValueError(f"the last global batch holds {last} examples ({n} examples, global batch "
                             f"{global_batch_size}), fewer than the {ctx.world_size} processes: a rank would get "
                             "an empty batch; change the batch size or the number of examples")
        self.tensors = dataset.tensors
        self.global_batch_size, self.ctx, self.shuffle, self.seed = global_batch_size, ctx, shuffle, seed
        self.epoch, self.epoch_seed = 0, seed

    def set_epoch(self, epoch: int, *, seed: Optional[int] = None) -> None:
        """The next pass is epoch ``epoch``, shuffled by ``seed`` (default: ``self.seed + epoch``)."""
        self.epoch = epoch
        self.epoch_seed = self.seed + epoch if seed is None else seed

    def __len__(self) -> int:
        return -(-len(self.tensors[0]) // self.global_batch_size)

    def __iter__(self) -> Iterator[Tuple[Tensor, ...]]:
        n = len(self.tensors[0])
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.epoch_seed))
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
