"""``pyibp landscape``: the tutorial's loss surfaces around a test image, one per run, side by side."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Set

from .common import (CLIError, Output, common_options, count, data_options, format_table, load, positive, test_set,
                     torch_device)

__all__ = ["add_parser", "run"]


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds the subcommand to the ``pyibp`` parser (``command`` makes its sub-parser)."""
    p = command("landscape", "plot the loss surface around a test image, for several runs",
                "The tutorial's picture: the cross-entropy around one test image along the sign of its\n"
                "gradient and along a random sign pattern, as 3-D surfaces, one per run, side by side\n"
                "on one z-scale.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by pyibp train")
    p.add_argument("--out", default="loss.png", help="the png to write")
    p.add_argument("--index", type=count(0), default=0, help="which test image")
    p.add_argument("--eps", type=positive, help="half-width of the grid (default: the first run's ε)")
    p.add_argument("--points", type=count(2), default=41, help="grid points per axis")
    p.add_argument("--no-clip", action="store_true", help="do not clamp the grid to [0, 1] (the tutorial does not)")
    data_options(p, with_dataset=False)
    common_options(p, seed_help="seeds the random direction")


def run(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    """Runs ``pyibp landscape``; returns the exit code."""
    from ..landscape import loss_surface, plot_surfaces
    device = torch_device(args.device)
    loaded = [(run, *load(run, device)) for run in args.runs]
    datasets = {c.dataset for _, c, _, _ in loaded}
    if len(datasets) > 1:
        raise CLIError(f"the runs were trained on different data sets ({', '.join(sorted(datasets))}); "
                       "the surfaces must share one test image")
    first = loaded[0][1]
    eps = args.eps if args.eps is not None else (first.eps or 0.1)
    test = test_set(first, args, device, None)
    if args.index >= len(test):
        raise CLIError(f"--index {args.index} is past the test set's {len(test)} images")
    x, y = (t[args.index:args.index + 1] for t in test.tensors)
    clip = (None, None) if args.no_clip else (0.0, 1.0)
    surfaces, summary = [], []
    for run, config, model, meta in loaded:
        s = loss_surface(model, x, y, eps, points=args.points, seed=args.seed, lower=clip[0], upper=clip[1])
        surfaces.append((f"{Path(run).name} ({config.method})", s))
        centre = args.points // 2
        summary.append({"run": run, "method": config.method, "loss_at_x": float(s.loss[centre, centre]),
                        "max_loss": float(s.loss.max())})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    z = plot_surfaces(surfaces, args.out, suptitle=f"cross-entropy around test image {args.index} "
                                                  f"(label {int(y)}), ε = {eps}")
    out.show(format_table(("run", "method", "loss at x", "max loss in the box"),
                          [(s["run"], s["method"], s["loss_at_x"], s["max_loss"]) for s in summary]))
    out.show(f"wrote {args.out}")
    out.result({"out": args.out, "eps": eps, "index": args.index, "z_range": list(z), "runs": summary})
    return 0

