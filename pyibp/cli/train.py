"""``pyibp train``: the recipe from the command line, then a run folder trained to its last epoch
(one process, or every rank under torchrun)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Set

from .common import (CLIError, Output, checked, common_options, count, data_options, format_table,
                     nonnegative, pct, positive, torch_device, unit)

__all__ = ["add_parser", "run", "RECIPE_FIELDS"]


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds the subcommand to the ``pyibp`` parser (``command`` makes its sub-parser)."""
    p = command("train", "train a model into a run folder",
                "Trains a model and writes a run folder: config.json, metrics.jsonl (one line per epoch),\n"
                "checkpoint.pt (replaced atomically every epoch) and curves.png. A run killed at any point\n"
                "continues with --resume and ends as if never interrupted (same seed, CPU).\n\n"
                "Runs unchanged under torchrun (torchrun --nproc_per_node N -m pyibp train ...): one process\n"
                "per GPU (NCCL) or N CPU processes (gloo, --device cpu) with DistributedDataParallel, each\n"
                "taking its slice of every global batch of --batch-size examples; rank 0 writes the run folder.",
                epilog=_method_table())
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run folder")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in RUN_DIR (a new one if it holds none)")
    mode.add_argument("--overwrite", action="store_true", help="start over, deleting the run in RUN_DIR")
    _train_options(p)
    s = p.add_argument_group("speed (not part of the recipe; under torchrun every process takes one device)")
    s.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="bf16: mixed precision for the training forward passes (meant for CUDA); bounds, loss "
                        "and evaluation stay in float32")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the model of the training step's clean forward pass")
    data_options(p, with_dataset=True)
    common_options(p, seed_help="seeds the initialisation, the data order and the attacks' random starts")


def _method_table() -> str:
    from ..runs import TrainConfig
    from ..training import method_class, method_names
    lines = ["per-method defaults (options left out take these):"]
    for method in method_names():
        c = TrainConfig.for_method(method)
        shown = {"epochs": c.epochs, "optimizer": c.optimizer, "lr": c.lr, "lr-schedule": c.lr_schedule}
        if c.lr_schedule == "step":
            shown.update({"lr-decay-at": " ".join(map(str, c.lr_decay_at)), "lr-decay": c.lr_decay})
        shown.update({name.replace("_", "-"): getattr(c, name) for name in method_class(method).options})
        lines.append(f"  {method:<10} " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    lines += ["", "certified training: ε = 0 for --warmup-steps (one epoch, at most 15% of all steps), then a",
              "smooth ramp to --train-eps over --ramp-steps (35% of all steps); κ and β ramp linearly over the",
              "same steps. All schedules count optimizer steps (batches): mnist-5k at batch 100 is 40 steps",
              "per epoch. A recipe whose ε never reaches its target is announced before training starts."]
    return "\n".join(lines)


def _readers(*fields: str, certified: bool = False) -> str:
    """The registered methods that read any of the recipe ``fields`` (or all certified ones)."""
    from ..training import method_class, method_names
    return ", ".join(name for name in method_names()
                     if (certified and method_class(name).certified) or set(fields) & set(method_class(name).options))


def _model(text: str) -> str:
    from ..models import check_model
    try:
        check_model(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).replace("model must be", "must be", 1)) from None
    return text


def _train_options(parser: argparse.ArgumentParser) -> None:
    from ..models import MODELS
    from ..runs import PRESETS, TrainConfig
    from ..training import method_names
    g = parser.add_argument_group("recipe (left out: the method's default, see below)")
    g.add_argument("--preset", choices=sorted(PRESETS), metavar="NAME",
                   help="a published recipe (CNN-7 on MNIST or CIFAR-10; see the README's table): "
                        f"{', '.join(sorted(PRESETS))}; options given beside it win")
    g.add_argument("--method", choices=method_names(), default=TrainConfig.method, help="training method")
    g.add_argument("--model", type=_model, default="tutorial-cnn", metavar="MODEL",
                   help=f"architecture: one of {', '.join(MODELS)}, or your own as FILE.py:FACTORY or "
                        "MODULE:FACTORY (a function returning an nn.Module, called with the keywords it takes of "
                        "in_channels, num_classes, image_size; recorded in config.json)")
    g.add_argument("--eps", type=nonnegative, default=0.1, help="ε of the l∞ threat model (evaluation)")
    g.add_argument("--train-eps", type=nonnegative, help="ε trained at (default: --train-eps-scale x --eps)")
    g.add_argument("--train-eps-scale", type=positive, help="train at this multiple of --eps (default: 1)")
    g.add_argument("--epochs", type=count(1), help="epochs")
    g.add_argument("--batch-size", type=count(1), default=100, help="examples per step")
    g.add_argument("--optimizer", choices=("adam", "sgd"), help="optimizer (default: adam)")
    g.add_argument("--lr", type=positive, help="learning rate (the peak of a cyclic schedule)")
    g.add_argument("--momentum", type=nonnegative, help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=nonnegative, help="weight decay (default: 0)")
    g.add_argument("--lr-schedule", choices=("step", "cyclic", "constant"), help="learning-rate schedule")
    g.add_argument("--lr-decay-at", type=unit, nargs="+", metavar="FRACTION",
                   help="step schedule: decay at these fractions of all steps")
    g.add_argument("--lr-decay", type=unit, help="step schedule: factor per decay")
    a = parser.add_argument_group(f"attacks of adversarial training ({_readers('attack_alpha', 'attack_steps')})")
    a.add_argument("--attack-steps", type=count(1),
                   help="PGD steps per training batch (default: the method's, see below)")
    a.add_argument("--attack-alpha", type=positive,
                   help="step size (default: 2.5 ε / steps for pgd, 1.25 ε for fgsm)")
    a.add_argument("--attack-random-start", action=argparse.BooleanOptionalAction, default=None,
                   help="PGD from a random point of the ε-box (default: yes)")
    x = parser.add_argument_group(f"expressive losses ({_readers('expressive_alpha', 'sabr_lambda')}: De Palma et al. "
                                  "2024, Müller et al. 2023); their attack takes --attack-steps (defaults below)")
    x.add_argument("--expressive-alpha", type=unit,
                   help=f"{_readers('expressive_alpha')}: the IBP share α of the loss; 1: IBP, 0: the adversarial "
                        "loss")
    x.add_argument("--sabr-lambda", type=unit,
                   help=f"{_readers('sabr_lambda')}: radius of the propagated small box, as a share of ε")
    x.add_argument("--attack-step-scale", type=positive,
                   help="step size as a multiple of the attack radius (default: the method's, see below)")
    x.add_argument("--attack-eps-scale", type=positive, help="attack radius as a multiple of ε (default: 1)")
    c = parser.add_argument_group(f"certified training ({_readers(certified=True)})")
    c.add_argument("--warmup-steps", type=count(0),
                   help="steps at ε = 0 (default: one epoch, at most 15%% of all steps)")
    c.add_argument("--ramp-steps", type=count(0), help="steps of the ε ramp (default: 35%% of all steps)")
    c.add_argument("--eps-ramp", choices=("smooth", "linear"), help="ramp shape (default: smooth, Shi et al. 2021)")
    c.add_argument("--eps-list", type=nonnegative, nargs="+", metavar="EPS",
                   help="one training ε per epoch instead of the ramp (the tutorial's recipe)")
    c.add_argument("--kappa-start", type=unit, help="weight of the clean loss at the start (default: 1)")
    c.add_argument("--kappa-end", type=unit, help="... after the ramp (default: 0, Zhang et al. 2020)")
    c.add_argument("--beta-start", type=unit,
                   help=f"{_readers('beta_end')}: CROWN-IBP share of the bound at the start (default: 1)")
    c.add_argument("--beta-end", type=unit, help="... after the ramp (default: 0, Zhang et al. 2020)")
    c.add_argument("--loss-fusion", action=argparse.BooleanOptionalAction, default=None,
                   help=f"{_readers('loss_fusion')}: bound the cross-entropy itself through one CROWN row per example "
                        "instead of K-1 margins (Xu et al. 2020; about K-1 times cheaper; default: yes)")
    c.add_argument("--bn-stats", choices=("batch", "running"),
                   help="BatchNorm in the training bounds: the batch statistics of the clean pass (Shi "
                        "et al. 2021) or the running ones (default: batch)")
    c.add_argument("--ibp-init", action=argparse.BooleanOptionalAction, default=None,
                   help="IBP initialisation of Shi et al. 2021 (default: yes for certified training)")
    c.add_argument("--grad-clip", type=nonnegative,
                   help="clip the gradient norm; 0: off (default: 10 for certified training)")
    c.add_argument("--reg-weight", type=nonnegative,
                   help="weight of Shi et al.'s warm-up regularisers (default: 0.5 for certified training)")
    e = parser.add_argument_group("budget and per-epoch evaluation")
    e.add_argument("--train-subset", type=count(1), help="train on this many examples (a fixed random subset)")
    e.add_argument("--test-subset", type=count(1), help="evaluate on this many test examples")
    e.add_argument("--eval-pgd-steps", type=count(0), default=10, help="PGD steps of the per-epoch test; 0: none")
    e.add_argument("--eval-pgd-subset", type=count(1), default=1000, help="test examples the per-epoch PGD attacks")


# The command-line options that are fields of TrainConfig (same names, dashes for underscores).
RECIPE_FIELDS = ("method", "model", "eps", "train_eps", "train_eps_scale", "expressive_alpha", "sabr_lambda",
                 "attack_step_scale", "attack_eps_scale", "epochs", "batch_size", "optimizer", "lr", "momentum",
                 "weight_decay", "lr_schedule", "lr_decay_at", "lr_decay", "attack_steps", "attack_alpha",
                 "attack_random_start", "warmup_steps", "ramp_steps", "eps_ramp", "eps_list", "kappa_start",
                 "kappa_end", "beta_start", "beta_end", "loss_fusion", "bn_stats", "ibp_init", "grad_clip",
                 "reg_weight", "train_subset", "test_subset", "eval_pgd_steps", "eval_pgd_subset", "dataset", "seed")


def _config_from_args(args: argparse.Namespace, explicit: Set[str]):
    from ..runs import PRESETS, TrainConfig
    overrides = {name: getattr(args, name) for name in RECIPE_FIELDS if name != "method"}
    for name in ("lr_decay_at", "eps_list"):
        if overrides[name] is not None:
            overrides[name] = tuple(overrides[name])
    method = args.method
    if args.preset is not None:
        # The preset's values, then only the options the user typed (not the parser's defaults).
        preset = dict(PRESETS[args.preset])
        method = args.method if "method" in explicit else preset.pop("method")
        preset.pop("method", None)
        overrides = {**preset, **{k: v for k, v in overrides.items() if k in explicit}}
    grad_clip = overrides.pop("grad_clip", None) if args.preset is None or "grad_clip" in explicit else None
    config = checked(lambda: TrainConfig.for_method(method, **overrides))
    if grad_clip is not None:
        config.grad_clip = grad_clip if grad_clip > 0 else None
    return config


def run(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    """Runs ``pyibp train``; returns the exit code."""
    from ..distributed import init_distributed, shutdown
    from ..runs import RecipeMismatch, train
    device = torch_device(args.device)
    config = _config_from_args(args, explicit)
    folder = Path(args.out)
    # Under torchrun: join the process group (each rank on its own GPU, or the CPU); rank 0
    # prints and touches the run folder. One process: a context of 1, nothing else changes.
    ctx = init_distributed(device.type)
    out = out if ctx.is_main else Output(True, False, muted=True)
    try:
        config, records = checked(lambda: train(
            folder, config, resume=args.resume, overwrite=args.overwrite,
            keep=[name for name in RECIPE_FIELDS if name in explicit], device=device, data_dir=args.data_dir,
            download=args.download, quiet=args.quiet, log=out.progress, amp=args.amp, compile=args.compile,
            ctx=ctx))
    except RecipeMismatch as err:
        clashes = ", ".join(f"--{name.replace('_', '-')} ({asked!r} here, {saved!r} saved)"
                            for name, asked, saved in err.clashes)
        raise CLIError(f"{folder} was started with another recipe: {clashes}; a resumed run keeps its config.json "
                       "(drop these options, or start over with --overwrite)") from None
    finally:
        shutdown(ctx)
    last = records[-1] if records else {}
    total = sum(r["seconds"] + r["eval_seconds"] for r in records)
    rows = [("epochs", f"{last.get('epoch', 0)}/{config.epochs}"), ("steps", last.get("step")),
            ("train loss", last.get("train_loss")), ("train error", pct(last.get("train_error"))),
            ("test clean error", pct(last.get("test_clean_error"))),
            (f"test PGD-{config.eval_pgd_steps} error (ε={config.eps})", pct(last.get("test_pgd_error"))),
            (f"test IBP-verified error (ε={config.eps})", pct(last.get("test_verified_error"))),
            ("seconds (all epochs)", round(total, 1))]
    out.show(format_table(("metric", "value"), rows, title=f"\n{folder} — {config.method}"))
    out.show(f"files: {folder}/config.json, metrics.jsonl, checkpoint.pt, curves.png")
    out.result({"run": str(folder), "config": config.to_json(), "final": last})
    return 0
