"""``pyibp certify``: the verified error of a trained run (IBP, CROWN-IBP), merged into its
certify.json."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Set

from .common import (Output, ResultFile, common_options, format_table, load, pct, run_evaluation_options, test_set,
                     torch_device)

__all__ = ["add_parser", "run"]


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds the subcommand to the ``pyibp`` parser (``command`` makes its sub-parser)."""
    p = command("certify", "verified error of a trained run (IBP, CROWN-IBP)",
                "Verified error of a run's model on its test set: an example is verified when it is\n"
                "classified correctly and no input of its ε-box can change that, as the bounds prove.\n"
                "The result is printed and merged into RUN_DIR/certify.json.")
    run_evaluation_options(p, "certify")
    p.add_argument("--method", nargs="+", choices=("ibp", "crown-ibp"), default=["ibp", "crown-ibp"],
                   help="bounding methods")
    p.add_argument("--float64", action="store_true", help="compute the bounds in float64")
    common_options(p, seed_help="unused (verification is deterministic); accepted for uniformity")


def run(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    """Runs ``pyibp certify``; returns the exit code."""
    import torch
    from ..certify import verify
    from ..data import loader
    from ..runs import eval_batch_size
    device = torch_device(args.device)
    config, model, meta = load(args.run, device)
    eps = config.eps if args.eps is None else args.eps
    test = test_set(config, args, device, args.test_subset)
    batches = loader(test, args.batch_size or eval_batch_size(device))
    rows, results = [], {}
    saved = ResultFile(Path(args.run) / "certify.json")
    for method in dict.fromkeys(args.method):
        start = time.perf_counter()
        r = verify(model, batches, eps, method=method, device=device, quiet=args.quiet,
                   dtype=torch.float64 if args.float64 else None)
        seconds = time.perf_counter() - start
        entry = {"method": method, "eps": eps, "float64": args.float64, "examples": len(r),
                 "clean_error": r.clean_error, "verified_error": r.verified_error, "epoch": meta["epoch"],
                 "seconds": seconds}
        results[method] = entry
        saved.add(f"{method} eps={eps}{' float64' if args.float64 else ''}", entry)
        rows.append((method, eps, len(r), pct(r.clean_error), pct(r.verified_error), round(seconds, 1)))
    out.show(format_table(("method", "eps", "examples", "clean error", "verified error", "seconds"), rows,
                          title=f"{args.run} (epoch {meta['epoch']}/{config.epochs}, {config.method})"))
    out.result({"run": args.run, "results": results})
    saved.check()
    return 0

