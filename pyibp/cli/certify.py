"""``pyibp certify``: the verified error of a trained run (IBP, CROWN-IBP, CROWN, alpha-CROWN, or complete
verification: branch and bound), merged into its certify.json."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Set

import torch

from ..bounds.specs import METHODS
from .common import (Output, ResultFile, common_options, format_table, load, pct, run_evaluation_options, test_set,
                     torch_device)

__all__ = ["add_parser", "run"]


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds the subcommand to the ``pyibp`` parser (``command`` makes its sub-parser)."""
    p = command("certify", "verified error of a trained run (IBP, CROWN-IBP, CROWN, alpha-CROWN)",
                "Verified error of a run's model on its test set: an example is verified when it is\n"
                "classified correctly and no input of its ε-box can change that, as the bounds prove.\n"
                "The result is printed and merged into RUN_DIR/certify.json.")
    run_evaluation_options(p, "certify")
    p.add_argument("--method", nargs="+", choices=METHODS + ("bab",), default=["ibp", "crown-ibp"],
                   help="bounding methods, from the cheapest to the tightest: " + ", ".join(METHODS) +
                        "; bab: complete verification (alpha-CROWN, then a falsifier and ReLU branch and bound "
                        "per example left open, --timeout seconds each)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="bab: seconds of complete verification per example alpha-CROWN leaves open (default 60)")
    p.add_argument("--alpha-steps", type=int, default=20, metavar="N",
                   help="alpha-CROWN: optimisation steps of the ReLU slopes (default 20)")
    p.add_argument("--alpha-lr", type=float, default=0.5, metavar="LR",
                   help="alpha-CROWN: Adam's learning rate for the slopes (default 0.5)")
    p.add_argument("--float64", action="store_true", help="compute the bounds in float64")
    p.add_argument("--sound", action="store_true",
                   help="certificates of the network in exact real arithmetic, whatever the float rounding "
                        "(see pyibp.bounds.sound and pyibp.bounds.sound_crown)")
    p.add_argument("--autoattack", action="store_true",
                   help="also run AutoAttack (standard) on the same examples and show its robust error beside "
                        "the verified error (every verified example must stay unbroken)")
    common_options(p, seed_help="unused (verification is deterministic); accepted for uniformity")


def run(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    """Runs ``pyibp certify``; returns the exit code."""
    from ..bounds import AlphaOptions
    from ..evaluation import verify
    from ..data import loader
    from ..runs import eval_batch_size
    device = torch_device(args.device)
    config, model, meta = load(args.run, device)
    eps = config.eps if args.eps is None else args.eps
    test = test_set(config, args, device, args.test_subset)
    batches = loader(test, args.batch_size or eval_batch_size(device))
    rows, results, verified = [], {}, {}
    saved = ResultFile(Path(args.run) / "certify.json")
    methods = list(dict.fromkeys(args.method))
    alpha = AlphaOptions(steps=args.alpha_steps, lr=args.alpha_lr)      # a ValueError names a bad option
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    for method in methods:
        start = time.perf_counter()
        if method == "bab":
            rows.append(_bab_row(args, model, test, eps, alpha, meta, results, verified, saved))
            continue
        r = verify(model, batches, eps, method=method, device=device, quiet=args.quiet,
                   dtype=torch.float64 if args.float64 else None, sound=args.sound, alpha=alpha)
        seconds = time.perf_counter() - start
        entry = {"method": method, "eps": eps, "float64": args.float64, "sound": r.sound,
                 "certificate": "exact real arithmetic" if r.sound else "float round-to-nearest", "examples": len(r),
                 "clean_error": r.clean_error, "verified_error": r.verified_error, "epoch": meta["epoch"],
                 "seconds": seconds}
        if method == "alpha-crown":
            entry.update(steps=alpha.steps, lr=alpha.lr)
        results[method] = entry
        verified[method] = r.verified
        saved.add(f"{method} eps={eps}{' float64' if args.float64 else ''}{' sound' if r.sound else ''}", entry)
        rows.append((method, eps, len(r), pct(r.clean_error), pct(r.verified_error), round(seconds, 1)))
    if args.autoattack:
        rows.append(_autoattack_row(args, model, test, eps, device, verified, results, saved))
    out.show(format_table(("method", "eps", "examples", "clean error", "verified error", "seconds"), rows,
                          title=f"{args.run} (epoch {meta['epoch']}/{config.epochs}, {config.method})"))
    out.result({"run": args.run, "results": results})
    saved.check()
    return 0



def _bab_row(args, model, test, eps: float, alpha, meta, results, verified, saved) -> tuple:
    """Complete verification of every test example (:func:`pyibp.verifier.robustness.verify_robustness`):
    verified, falsified (a checked counterexample, or misclassified) or unknown."""
    from ..verifier.robustness import verify_robustness
    x, y = test.tensors
    start = time.perf_counter()
    r = verify_robustness(model.eval(), x, y, eps, timeout=args.timeout, alpha=alpha)
    seconds = time.perf_counter() - start
    counts = {s: r.status.count(s) for s in ("verified", "falsified", "unknown")}
    with torch.no_grad():
        clean = float((model(x).argmax(1) != y).double().mean()) if len(y) else float("nan")
    entry = {"method": "bab", "eps": eps, "timeout": args.timeout, "steps": alpha.steps, "examples": len(y),
             **counts, "clean_error": clean, "verified_error": r.verified_error, "epoch": meta["epoch"],
             "seconds": seconds}
    results["bab"] = entry
    verified["bab"] = r.verified
    saved.add(f"bab eps={eps} timeout={args.timeout:g}", entry)
    return ("bab", eps, len(y), pct(clean), pct(r.verified_error), round(seconds, 1))


def _autoattack_row(args, model, test, eps: float, device, verified, results, saved) -> tuple:
    """AutoAttack (standard) on the examples just verified: its robust error is a lower bound of the
    true robust error that every verified error must stay above, example by example."""
    import sys

    from ..attacks import autoattack
    from ..runs import eval_batch_size
    from .eval import progress_bars
    x, y = test.tensors
    progress, close = progress_bars(args.quiet)
    start = time.perf_counter()
    try:
        # every example is attacked, verified or not: this run cross-checks the certificates
        aa = autoattack(model.eval(), x, y, eps, seed=args.seed, batch_size=args.batch_size or eval_batch_size(device),
                        progress=progress, skip_verified=False)
    finally:
        close()
    seconds = time.perf_counter() - start
    robust = aa.robust.cpu()
    broken = {method: int((v & ~robust).sum()) for method, v in verified.items()}
    entry = {"method": "autoattack-standard", "eps": eps, "examples": len(y), "clean_error": aa.clean_error,
             "robust_error": aa.robust_error, "verified_but_broken": broken, "attacks": aa.report()["attacks"],
             "seconds": seconds}
    results["autoattack"] = entry
    saved.add(f"autoattack-standard eps={eps}", entry)
    for method, count in broken.items():
        if count:
            print(f"pyibp certify: UNSOUND: AutoAttack broke {count} example(s) that {method} verified",
                  file=sys.stderr)
    return ("autoattack (robust error)", eps, len(y), pct(aa.clean_error), pct(aa.robust_error), round(seconds, 1))
