"""Tightness and cost of each bounding method, side by side in one run: IBP, CROWN-IBP, CROWN, alpha-CROWN.

For each model (random ones drawn here, and trained run folders given with --runs), on the same
test examples: seconds per method, examples verified (every margin lower bound > 0, among the
correctly classified), and the mean worst margin. With ``--auto-lirpa PATH`` (a checkout of
auto_LiRPA's source; nothing of it is part of pyibp) its CROWN and alpha-CROWN ("CROWN-Optimized",
its default optimisation settings) run on the same examples in the same process, and the table
gives pyibp's time as a fraction of auto_LiRPA's and the largest difference of the bounds.

    python benchmarks/bench_methods.py [--runs runs/mtl-ibp] [--examples 32] [--auto-lirpa ~/auto_LiRPA]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyibp  # noqa: E402
from common import print_table, write_json  # noqa: E402
from pyibp.bounds import METHODS  # noqa: E402
from pyibp.runs import load_run  # noqa: E402
from pyibp.models import tutorial_cnn  # noqa: E402


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


RANDOM = {"random-mlp": (_mlp, 0.005), "random-tutorial-cnn": (tutorial_cnn, 0.0005)}


def _timed(fn: Callable[[], torch.Tensor], repeats: int) -> Tuple[torch.Tensor, float]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, sorted(times)[len(times) // 2]


def _auto_lirpa_margins(path: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                        method: str) -> torch.Tensor:
    """auto_LiRPA's lower bounds of the K-1 margins (B, K-1), rows j != y in increasing j."""
    if path not in sys.path:
        sys.path.insert(0, path)
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm
    classes = 10
    C = torch.eye(classes)[y][:, None] - torch.eye(classes)[None]
    others = torch.stack([torch.cat([torch.arange(0, int(t)), torch.arange(int(t) + 1, classes)]) for t in y])
    C = C.gather(1, others[..., None].expand(-1, -1, classes))
    bounded = BoundedModule(model, torch.zeros_like(x[:1]), device=x.device)
    box = BoundedTensor(x, PerturbationLpNorm(eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1)))
    lower, _ = bounded.compute_bounds(x=(box,), C=C, method="CROWN" if method == "crown" else "CROWN-Optimized",
                                      bound_upper=False)
    return lower.detach()


def run(args) -> None:
    torch.set_num_threads(args.threads)
    models: List[Tuple[str, nn.Module, float, torch.Tensor, torch.Tensor]] = []
    torch.manual_seed(0)
    _, test = pyibp.data.mnist5k()
    x_all, y_all = test.tensors
    x, y = x_all[:args.examples], y_all[:args.examples]
    for name in args.random:
        factory, eps = RANDOM[name]
        model = factory().eval()
        with torch.no_grad():       # a random model is verified on its own predictions
            models.append((name, model, eps, x, model(x).argmax(1)))
    for folder in args.runs:
        config, model, _ = load_run(folder, "cpu")
        models.append((f"{os.path.basename(os.path.normpath(folder))} ({config.method})", model, config.eps, x, y))
    rows = []
    for name, model, eps, x, y in models:
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        bounds: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            pyibp.margin_bounds(model, x[:2], y[:2], eps, method="crown-ibp")     # warm-up: graph capture
        for method in METHODS:
            with torch.no_grad():
                m, seconds = _timed(lambda: pyibp.margin_bounds(model, x, y, eps, method=method), args.repeats)
            worst = m.scatter(1, y[:, None], float("inf")).amin(1)
            bounds[method] = m
            rows.append({"model": name, "eps": eps, "tool": "pyibp", "method": method, "seconds": seconds,
                         "verified": int((correct & (worst > 0)).sum()), "correct": int(correct.sum()),
                         "mean_worst_margin": float(worst[correct].mean()) if correct.any() else float("nan")})
        if args.auto_lirpa:
            for method in ("crown", "alpha-crown"):
                low, seconds = _timed(lambda: _auto_lirpa_margins(args.auto_lirpa, model, x, y, eps, method),
                                      args.repeats)
                ours = bounds[method].gather(1, torch.stack([torch.cat([torch.arange(0, int(t)),
                                                                          torch.arange(int(t) + 1, 10)]) for t in y]))
                worst = low.amin(1)
                mine = next(r for r in rows if r["model"] == name and r["method"] == method)
                mine["x_auto_lirpa_time"] = mine["seconds"] / seconds
                mine["tighter_by_at_least"] = float((ours - low).min())
                rows.append({"model": name, "eps": eps, "tool": "auto_LiRPA", "method": method, "seconds": seconds,
                             "verified": int((correct & (worst > 0)).sum()), "correct": int(correct.sum()),
                             "mean_worst_margin": float(worst[correct].mean()) if correct.any() else float("nan")})
    print_table(rows, ["model", "eps", "tool", "method", "seconds", "verified", "correct", "mean_worst_margin",
                       "x_auto_lirpa_time", "tighter_by_at_least"])
    print(f"\n{args.examples} mnist-5k test examples, CPU, {args.threads} threads; seconds: median of {args.repeats}; "
          "x_auto_lirpa_time: pyibp's seconds / auto_LiRPA's (target <= 0.5); tighter_by_at_least: the smallest "
          "pyibp - auto_LiRPA margin bound (>= 0: never looser).")
    write_json(args.out, {"benchmark": "methods", "examples": args.examples, "results": rows})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", nargs="*", default=list(RANDOM), choices=list(RANDOM))
    parser.add_argument("--runs", nargs="*", default=[], help="trained run folders (pyibp train --out ...)")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--auto-lirpa", default=None, metavar="PATH", help="a checkout of auto_LiRPA's source")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_methods.json"))
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
