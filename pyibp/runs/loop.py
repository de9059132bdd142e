"""One epoch of a run: training by the recipe's method (:func:`pyibp.training.train_epoch`), then
the per-epoch test (clean, IBP-verified and PGD error), both over the ranks of a process group."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..attacks import PGD
from ..data import loader
from ..distributed import DistContext, reduce_metrics, unwrap
from ..evaluation import evaluate, verify
from ..training import Method, method_class, train_epoch
from .data import subset
from .files import Device
from .recipe import TrainConfig
from .seeds import derive_seed

__all__ = ["build_method", "train_one_epoch", "evaluate_epoch", "eval_batch_size"]

# metrics.jsonl's names of the training metrics (the others keep the method's own names).
_RECORD_NAMES = {"loss": "train_loss", "error": "train_error", "eps": "train_eps",
                 "robust_loss": "train_robust_loss", "verified_error": "train_verified_error"}
_NOT_RECORDED = ("examples", "steps")


def build_method(config: TrainConfig, steps_per_epoch: int) -> Method:
    """The training method of the recipe, configured once for a run of ``steps_per_epoch`` steps
    per epoch (its schedules are functions of the global step).

    Example:
        >>> build_method(TrainConfig.for_method("pgd", eps=0.1), 40)
        PGDTraining(eps=0.1, alpha=0.025, steps=10, ...)
    """
    return method_class(config.method).from_recipe(config, steps_per_epoch)


def train_one_epoch(config: TrainConfig, method: Method, model: nn.Module, batches: Iterable,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int,
                    step: int, device: torch.device, quiet: bool, ctx: DistContext,
                    amp: str) -> Tuple[Dict[str, Any], int]:
    """One epoch of ``method``; returns (metrics of all ranks in metrics.jsonl's names, new global step).

    ``model`` is the training model (DDP, compiled, ...); with ``amp`` a certified model arrives
    wrapped in :class:`AutocastForward` already, and the other methods' epoch runs under autocast
    here (their attacks are forward and backward passes like the training step).
    """
    # The random starts of epoch e come from their own generator: a resumed epoch draws the
    # same. Rank 0 keeps the one-process seed; the other ranks attack other examples.
    keys = ("attack",) if ctx.rank == 0 else ("attack", ctx.rank)
    g = torch.Generator(device).manual_seed(derive_seed(config.seed, epoch, *keys))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" and not method.certified
                else contextlib.nullcontext())
    with autocast:
        m, new_step = train_epoch(model, method, batches, optimizer, step=step, scheduler=scheduler,
                                  grad_clip=config.grad_clip, generator=g, device=device, quiet=quiet)
    m = reduce_metrics(m, ctx)
    return {_RECORD_NAMES.get(k, k): v for k, v in m.items() if k not in _NOT_RECORDED}, new_step


def eval_batch_size(device: Device) -> int:
    """Examples per evaluation batch: small on the CPU (batches of 100 attack 2x faster than 500
    there, staying in cache), large on a GPU."""
    return 100 if torch.device(device).type == "cpu" else 500


def _shard(dataset: TensorDataset, ctx: DistContext) -> TensorDataset:
    """Rank r's examples ``r, r + N, ...`` of ``dataset`` (all of it for one process)."""
    if not ctx.enabled:
        return dataset
    return TensorDataset(*(t[ctx.rank::ctx.world_size] for t in dataset.tensors))


def evaluate_epoch(config: TrainConfig, model: nn.Module, test: TensorDataset, device: torch.device,
                   quiet: bool, ctx: Optional[DistContext] = None) -> Dict[str, Any]:
    """Test metrics after an epoch: clean error, IBP-verified error at ``config.eps`` (whole test
    set), and PGD error (``eval_pgd_steps`` steps, α = 2.5 ε / steps) on ``eval_pgd_subset`` examples.

    Runs on ``unwrap(model)`` in float32 (never under autocast). With several processes (``ctx``)
    each rank evaluates its shard of the examples and the errors are combined over the ranks.
    """
    ctx = ctx if ctx is not None else DistContext(device=device)
    model = unwrap(model)
    start = time.perf_counter()
    batch = eval_batch_size(device)
    with torch.autocast(device.type, enabled=False):
        result = verify(model, loader(_shard(test, ctx), batch), config.eps, method="ibp", device=device,
                        quiet=quiet)
        # An empty shard (a test set smaller than the number of processes) adds nothing.
        counted = reduce_metrics({"clean_error": result.clean_error if len(result) else 0.0,
                                  "verified_error": result.verified_error if len(result) else 0.0,
                                  "examples": len(result)}, ctx)
        out: Dict[str, Any] = {"test_clean_error": counted["clean_error"],
                               "test_verified_error": counted["verified_error"], "test_pgd_error": None}
        if config.eval_pgd_steps > 0 and config.eps > 0:
            pgd_set = _shard(subset(test, config.eval_pgd_subset), ctx)
            attack = PGD(model, config.eps, alpha=2.5 * config.eps / config.eval_pgd_steps,
                         steps=config.eval_pgd_steps, random_start=False)
            adv = evaluate(model, loader(pgd_set, batch), attack=attack, device=device, quiet=quiet)
            counted = reduce_metrics({"pgd_error": adv["adv_error"] if adv["examples"] else 0.0,
                                      "examples": adv["examples"]}, ctx)
            out["test_pgd_error"] = counted["pgd_error"]
    seconds = reduce_metrics({"seconds": time.perf_counter() - start, "examples": 0}, ctx)["seconds"]
    out["eval_seconds"] = seconds
    return out

