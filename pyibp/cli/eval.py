"""``pyibp eval``: the error of a trained run under FGSM, PGD or AutoAttack, merged into its eval.json."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Dict, Set

from .common import (CLIError, Output, ResultFile, common_options, count, format_table, load, pct, positive,
                     run_evaluation_options, test_set, torch_device)

__all__ = ["add_parser", "run"]


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds the subcommand to the ``pyibp`` parser (``command`` makes its sub-parser)."""
    p = command("eval", "error of a trained run under FGSM, PGD or AutoAttack",
                "Clean error and error under attack of a run's model on its test set; the result is\n"
                "printed and merged into RUN_DIR/eval.json. An example counts as broken when it is\n"
                "misclassified clean or after the attack. AutoAttack (Croce & Hein 2020) runs its\n"
                "cascade with a progress bar per attack and records the robust error after each.")
    run_evaluation_options(p, "attack")
    p.add_argument("--attack", choices=("fgsm", "pgd", "autoattack"), default="pgd", help="the attack")
    p.add_argument("--version", choices=("standard", "plus", "rand"), default="standard",
                   help="AutoAttack's version (standard: APGD-CE, APGD-T, FAB-T, Square)")
    p.add_argument("--steps", type=count(1), default=40,
                   help="PGD steps; with --attack autoattack, APGD and FAB iterations when given (default: the "
                        "original's 100; fewer is a quick look, not AutoAttack)")
    p.add_argument("--queries", type=count(1), default=5000,
                   help="AutoAttack's Square queries (default: the original's 5000)")
    p.add_argument("--alpha", type=positive, help="PGD step size (default: 2.5 ε / steps)")
    p.add_argument("--restarts", type=count(1), default=1, help="PGD restarts")
    p.add_argument("--random-start", action=argparse.BooleanOptionalAction, default=None,
                   help="PGD from random points of the box (default: yes when --restarts > 1)")
    common_options(p, seed_help="seeds the random starts")


def run(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    """Runs ``pyibp eval``; returns the exit code."""
    import torch
    from ..attacks import FGSM, PGD
    from ..data import loader
    from ..evaluation import evaluate
    from ..runs import eval_batch_size
    device = torch_device(args.device)
    config, model, meta = load(args.run, device)
    eps = config.eps if args.eps is None else args.eps
    test = test_set(config, args, device, args.test_subset)
    if eps == 0:
        raise CLIError("--eps 0 leaves nothing to attack; the clean error is the error at ε = 0")
    if args.attack == "autoattack":
        return _autoattack(args, out, config, model, meta, test, eps, device, "steps" in explicit)
    alpha = args.alpha if args.alpha is not None else 2.5 * eps / args.steps
    random_start = args.random_start if args.random_start is not None else args.restarts > 1
    settings: Dict[str, Any] = {}
    if args.attack == "pgd":
        settings = dict(alpha=alpha, steps=args.steps, restarts=args.restarts, random_start=random_start)
        attack = PGD(model, eps, **settings, generator=torch.Generator(device).manual_seed(args.seed))
        start_kind = " random" if random_start else ""
        label = f"pgd-{args.steps} alpha={alpha:.4g} restarts={args.restarts}{start_kind} eps={eps}"
    else:
        attack = FGSM(model, eps)
        label = f"fgsm eps={eps}"
    start = time.perf_counter()
    batches = loader(test, args.batch_size or eval_batch_size(device))
    result = evaluate(model, batches, attack=attack, device=device, quiet=args.quiet)
    entry = {"attack": args.attack, "eps": eps, **settings,
             "seed": args.seed, "examples": result["examples"], "clean_error": result["error"],
             "adv_error": result["adv_error"], "epoch": meta["epoch"], "seconds": time.perf_counter() - start}
    saved = ResultFile(Path(args.run) / "eval.json")
    saved.add(label, entry)
    out.show(format_table(("run", "epoch", "attack", "examples", "clean error", "error under attack", "seconds"),
                          [(args.run, f"{meta['epoch']}/{config.epochs}", label, result["examples"],
                            pct(result["error"]), pct(result["adv_error"]), round(entry["seconds"], 1))]))
    out.result({"run": args.run, "label": label, **entry})
    saved.check()
    return 0


def progress_bars(quiet: bool):
    """A ``progress(attack, done, total)`` callback drawing one bar per attack, and a closer."""
    from tqdm import tqdm
    bars: Dict[str, Any] = {}

    def progress(name: str, done: int, total: int) -> None:
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = tqdm(total=total, desc=name, disable=quiet, leave=False)
        bar.update(done - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()
    return progress, close


def _autoattack(args, out: Output, config, model, meta, test, eps: float, device, steps_given: bool) -> int:
    from ..attacks import autoattack
    from ..attacks.autoattack import QUERIES, STEPS
    from ..runs import eval_batch_size
    x, y = test.tensors
    steps = args.steps if steps_given else STEPS
    progress, close = progress_bars(args.quiet)
    start = time.perf_counter()
    try:
        result = autoattack(model.eval(), x, y, eps, version=args.version, seed=args.seed, steps=steps,
                            n_queries=args.queries, batch_size=args.batch_size or eval_batch_size(device),
                            progress=progress)
    finally:
        close()
    shortened = "" if (steps, args.queries) == (STEPS, QUERIES) else f" steps={steps} queries={args.queries}"
    label = f"autoattack-{args.version}{shortened} eps={eps}"
    entry = {"attack": "autoattack", **result.report(), "steps": steps, "queries": args.queries,
             "seed": args.seed, "epoch": meta["epoch"],
             "seconds": time.perf_counter() - start, "adv_error": result.robust_error}
    saved = ResultFile(Path(args.run) / "eval.json")
    saved.add(label, entry)
    rows = [(args.run, f"{meta['epoch']}/{config.epochs}", "clean", len(y), "", pct(result.clean_error), "")]
    rows += [(args.run, f"{meta['epoch']}/{config.epochs}", a.name, a.attacked, a.broken, pct(a.robust_error),
              round(a.seconds, 1)) for a in result.attacks]
    out.show(format_table(("run", "epoch", "attack", "attacked", "broken", "robust error so far", "seconds"), rows))
    out.result({"run": args.run, "label": label, **entry})
    saved.check()
    return 0
