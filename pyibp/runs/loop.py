"""One epoch of a run: training by the recipe's method, then the per-epoch test (clean,
IBP-verified and PGD error), both over the ranks of a process group."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..certified_training import certified_train_epoch
from ..certify import verify
from ..data import loader
from ..distributed import DistContext, reduce_metrics, unwrap
from ..schedules import Schedule
from ..train import adversarial_train_epoch, evaluate, fgsm_train_epoch, train_epoch
from .data import subset
from .files import Device
from .recipe import CERTIFIED, TrainConfig
from .seeds import derive_seed

__all__ = ["train_one_epoch", "evaluate_epoch", "eval_batch_size"]


def train_one_epoch(config: TrainConfig, model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, schedules: Tuple[Schedule, ...],
                    epoch: int, step: int, device: torch.device, quiet: bool, ctx: DistContext,
                    amp: str) -> Tuple[Dict[str, Any], int]:
    """One epoch of ``config.method``; returns (metrics of all ranks in metrics.jsonl's names, new global step).

    ``model`` is the training model (DDP, compiled, ...); with ``amp`` a certified model arrives
    wrapped in :class:`AutocastForward` already, and the other methods' epoch runs under autocast
    here (their attacks are forward and backward passes like the training step).
    """
    # The random starts of epoch e come from their own generator: a resumed epoch draws the
    # same. Rank 0 keeps the one-process seed; the other ranks attack other examples.
    keys = ("attack",) if ctx.rank == 0 else ("attack", ctx.rank)
    g = torch.Generator(device).manual_seed(derive_seed(config.seed, epoch, *keys))
    if config.method in CERTIFIED:
        eps, kappa, beta = schedules
        m, new_step = certified_train_epoch(
            model, batches, optimizer, eps_schedule=eps, kappa_schedule=kappa,
            beta_schedule=beta if config.method == "crown-ibp" else None, method=config.method,
            loss_fusion=config.loss_fusion, bn_stats=config.bn_stats, step_offset=step,
            grad_clip=config.grad_clip, scheduler=scheduler, reg_tightness=config.reg_weight,
            reg_relu=config.reg_weight, expressive_alpha=config.expressive_alpha, sabr_lambda=config.sabr_lambda,
            attack_steps=config.attack_steps, attack_step_scale=config.attack_step_scale,
            attack_eps_scale=config.attack_eps_scale, generator=g, quiet=quiet, device=device)
        m = reduce_metrics(m, ctx)
        out = {"train_loss": m["loss"], "train_robust_loss": m["robust_loss"], "train_error": m["clean_error"],
               "train_verified_error": m["verified_error"], "train_eps": m["eps"], "kappa": m["kappa"]}
        if config.method == "crown-ibp":
            out["beta"] = m["beta"]
        return {**out, "lr": m["lr"], "seconds": m["seconds"]}, new_step
    eps = config.target_eps
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16"
                else contextlib.nullcontext())
    with autocast:
        if config.method == "standard":
            m = train_epoch(model, batches, optimizer, scheduler=scheduler, device=device, quiet=quiet)
            eps = 0.0
        else:
            if config.method == "pgd":
                alpha = (config.attack_alpha if config.attack_alpha is not None
                         else 2.5 * eps / config.attack_steps)
                m = adversarial_train_epoch(model, batches, optimizer, eps=eps, alpha=alpha,
                                            steps=config.attack_steps, random_start=config.attack_random_start,
                                            scheduler=scheduler, device=device, quiet=quiet, generator=g)
            else:
                m = fgsm_train_epoch(model, batches, optimizer, eps=eps, alpha=config.attack_alpha,
                                     scheduler=scheduler, device=device, quiet=quiet, generator=g)
    m = reduce_metrics(m, ctx)
    return {"train_loss": m["loss"], "train_error": m["error"], "train_eps": eps, "lr": m["lr"],
            "seconds": m["seconds"]}, step + len(batches)


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
            adv = evaluate(model, loader(pgd_set, batch), attack="pgd", eps=config.eps,
                           alpha=2.5 * config.eps / config.eval_pgd_steps, steps=config.eval_pgd_steps,
                           device=device, quiet=quiet)
            counted = reduce_metrics({"pgd_error": adv["adv_error"] if adv["examples"] else 0.0,
                                      "examples": adv["examples"]}, ctx)
            out["test_pgd_error"] = counted["pgd_error"]
    seconds = reduce_metrics({"seconds": time.perf_counter() - start, "examples": 0}, ctx)["seconds"]
    out["eval_seconds"] = seconds
    return out

