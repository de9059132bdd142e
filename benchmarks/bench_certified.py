"""Time per certified-training step: standard vs IBP (pyibp, and the tutorial's formulas) vs CROWN-IBP.

A step is forward + backward + optimizer step on one batch (SGD, momentum 0.9):
  * standard:   F.cross_entropy(model(x), y)
  * ibp:        pyibp.training.ibp_loss(..., kappa=0.5)                      — fused IBP, last-layer elision
  * ibp-torch:  the same loss with margin_bounds(backend="torch")            — the tutorial's IBP formulas
  * ibp-k0:     κ = 0 (the default recipe after its ramp): the bound's loss only, and the clean
                forward pass without a graph, for the metrics                 — as pyibp.training.IBP
  * crown-ibp:  ibp_loss(..., method="crown-ibp", beta=1)                     — IBP + one CROWN backward pass
                over the K-1 margins
  * crown-ibp-lf: the same with loss_fusion=True                              — one CROWN row per example
  * mtl-ibp, cc-ibp: pyibp.training.MTLIBP / CCIBP(alpha=0.5).loss at κ = 0     — the default recipe's step:
                a 1-step attack (10 ε from a random start), IBP, the adversarial logits; clean pass
                without a graph as in ibp-k0
  * sabr:       the same with an 8-step attack (0.5 ε) and IBP over the box of radius 0.4 ε, plus
                the no-grad IBP of the whole ε-box the training metrics read
Median of interleaved repeats after warm-up (synchronised on CUDA). Prints a table and writes JSON.

    python benchmarks/bench_certified.py [--quick] [--device cpu|cuda] [--models tutorial-cnn cifar-cnn]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyibp  # noqa: E402
from common import devices, interleaved_medians, print_table, write_json  # noqa: E402
from pyibp.training import CCIBP, MTLIBP, SABR, ibp_loss  # noqa: E402
from pyibp.models import cifar_cnn, tutorial_cnn  # noqa: E402

# name -> (factory, input shape, batch, eps)
MODELS = {"tutorial-cnn": (tutorial_cnn, (1, 28, 28), 100, 0.1),
          "cifar-cnn": (cifar_cnn, (3, 32, 32), 64, 8 / 255)}
KAPPA = 0.5
# On the tutorial CNN. The CROWN-IBP target is checked for both forms of its bound.
TARGETS = {"ibp_x_standard": 2.5, "crown-ibp_x_ibp": 2.0, "crown-ibp-lf_x_ibp": 2.0}


def losses(model, x, y, eps) -> Dict[str, Callable[[], torch.Tensor]]:
    def tutorial_ibp():
        margins = pyibp.margin_bounds(model, x, y, eps, backend="torch")
        return KAPPA * F.cross_entropy(model(x), y) + (1 - KAPPA) * F.cross_entropy(-margins, y)

    def ibp_kappa0():
        with torch.no_grad():
            model(x)
        return ibp_loss(model, x, y, eps, 0.0)

    def expressive(method):
        # The whole training step's loss at κ = 0: the attack, the clean pass without a graph, the robust term.
        return lambda: method.loss(model, x, y, 0).objective

    return {"standard": lambda: F.cross_entropy(model(x), y),
            "ibp": lambda: ibp_loss(model, x, y, eps, KAPPA),
            "ibp-k0": ibp_kappa0,
            "ibp-torch": tutorial_ibp,
            "crown-ibp": lambda: ibp_loss(model, x, y, eps, KAPPA, method="crown-ibp", beta=1.0),
            "crown-ibp-lf": lambda: ibp_loss(model, x, y, eps, KAPPA, method="crown-ibp", beta=1.0,
                                             loss_fusion=True),
            "mtl-ibp": expressive(MTLIBP(eps, 0.0, alpha=0.5, attack_steps=1, attack_step_scale=10.0)),
            "cc-ibp": expressive(CCIBP(eps, 0.0, alpha=0.5, attack_steps=1, attack_step_scale=10.0)),
            "sabr": expressive(SABR(eps, 0.0, lam=0.4, attack_steps=8, attack_step_scale=0.5))}


def training_step(model, optimizer, loss_fn):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
    return step


def run(args):
    rows, ratios = [], {}
    for device in devices(args.device):
        for name in args.models:
            factory, shape, batch, eps = MODELS[name]
            torch.manual_seed(0)
            model = factory().to(device)
            # Tiny steps keep the weights (and so the share of unstable ReLUs) close to the start.
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
            x = torch.rand(batch, *shape, device=device)
            y = torch.randint(0, 10, (batch,), device=device)
            steps = {k: training_step(model, optimizer, f) for k, f in losses(model, x, y, eps).items()}
            times = interleaved_medians(steps, device, repeats=args.repeats, warmup=args.warmup)
            for method, t in times.items():
                rows.append({"device": device.type, "model": name, "batch": batch, "method": method,
                             "ms_per_step": 1e3 * t, "x_standard": t / times["standard"],
                             "x_ibp": t / times["ibp"]})
            ratios[f"{device.type}/{name}"] = {"ibp_x_standard": times["ibp"] / times["standard"],
                                               "ibp-k0_x_standard": times["ibp-k0"] / times["standard"],
                                               "ibp-torch_x_standard": times["ibp-torch"] / times["standard"],
                                               "crown-ibp_x_ibp": times["crown-ibp"] / times["ibp"],
                                               "crown-ibp-lf_x_ibp": times["crown-ibp-lf"] / times["ibp"]}
    print_table(rows, ["device", "model", "batch", "method", "ms_per_step", "x_standard", "x_ibp"])
    print(f"\nA step: forward + backward + SGD step; kappa = {KAPPA}; threads: {torch.get_num_threads()}.")
    for key, r in ratios.items():
        if key.endswith("tutorial-cnn"):
            verdict = ", ".join(f"{k} = {r[k]:.2f} (target <= {v}: {'met' if r[k] <= v else 'not met'})"
                                for k, v in TARGETS.items())
            print(f"{key}: {verdict}")
    write_json(args.out, {"benchmark": "certified_training_step", "kappa": KAPPA, "repeats": args.repeats,
                          "targets": TARGETS, "ratios": ratios, "results": rows})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda when present)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per method (default 10, quick 3)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up step")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "bench_certified.json"))
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.warmup = 1 if args.quick else 2
    run(args)


if __name__ == "__main__":
    main()
