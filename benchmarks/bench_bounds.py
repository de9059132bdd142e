"""Speed of interval bounds: plain forward pass vs the tutorial's formulas vs pyibp's fused operators.

One process, one run: for each model, batch size and device, the median time of
  * plain:    model(x)                                   — the floor a bound is measured against
  * tutorial: IBP in lower/upper form, four products per layer (pyibp backend="torch")
  * pyibp:    IBP in centre/radius form through the fused C++/CUDA operators
forward only and forward+backward (gradients to the parameters, as in certified training), with
peak memory. Prints a table and writes JSON.

    python benchmarks/bench_bounds.py [--models tutorial-cnn cifar-cnn] [--batches 1 32 256]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyibp  # noqa: E402
from common import devices, interleaved_medians, peak_bytes, print_table, write_json  # noqa: E402
from pyibp.models import cifar_cnn, tutorial_cnn  # noqa: E402

MODELS = {"tutorial-cnn": (tutorial_cnn, (1, 28, 28)), "cifar-cnn": (cifar_cnn, (3, 32, 32))}
EPS = 0.1


def workloads(model, x, y):
    """name -> (forward, forward+backward) closures."""
    def plain():
        return model(x)

    def plain_bwd():
        model(x).sum().backward()

    def bounds(backend):
        def fwd():
            return pyibp.margin_bounds(model, x, y, EPS, backend=backend)

        def bwd():
            pyibp.margin_bounds(model, x, y, EPS, backend=backend).sum().backward()
        return fwd, bwd

    return {"plain": (plain, plain_bwd), "tutorial": bounds("torch"), "pyibp": bounds("fused")}


def run(args):
    rows, results = [], []
    for device in devices(args.device):
        for name in args.models:
            factory, shape = MODELS[name]
            torch.manual_seed(0)
            model = factory().to(device).eval()
            for batch in args.batches:
                x = torch.rand(batch, *shape, device=device)
                y = torch.randint(0, 10, (batch,), device=device)
                repeats = args.repeats if batch < 256 else max(5, args.repeats // 2)
                work = workloads(model, x, y)
                with torch.no_grad():
                    fwd = interleaved_medians({k: f for k, (f, _) in work.items()}, device, repeats=repeats)
                    mem = {k: peak_bytes(f, device) for k, (f, _) in work.items()}
                bwd = interleaved_medians({k: b for k, (_, b) in work.items()}, device, repeats=repeats)
                model.zero_grad(set_to_none=True)
                times = {k: (fwd[k], bwd[k], mem[k]) for k in work}
                for label, (t_fwd, t_bwd, mem) in times.items():
                    row = {"device": device.type, "model": name, "batch": batch, "method": label,
                           "fwd_ms": 1e3 * t_fwd, "fwd_x_plain": t_fwd / times["plain"][0],
                           "fwd_speedup_vs_tutorial": times["tutorial"][0] / t_fwd,
                           "fwdbwd_ms": 1e3 * t_bwd, "fwdbwd_x_plain": t_bwd / times["plain"][1],
                           "fwdbwd_speedup_vs_tutorial": times["tutorial"][1] / t_bwd,
                           "peak_fwd_MiB": mem / 2**20}
                    rows.append(row)
                    results.append(row)
    print_table(rows, ["device", "model", "batch", "method", "fwd_ms", "fwd_x_plain", "fwd_speedup_vs_tutorial",
                       "fwdbwd_ms", "fwdbwd_x_plain", "fwdbwd_speedup_vs_tutorial", "peak_fwd_MiB"])
    print("\nx_plain: time / plain forward (or forward+backward) of the same model and batch; "
          "speedup_vs_tutorial: tutorial time / this time.")
    print("Targets (CPU, batch 256, tutorial CNN): pyibp fwd_x_plain <= 2.3, fwd_speedup_vs_tutorial >= 1.8.")
    write_json(args.out, {"benchmark": "bounds", "eps": EPS, "results": results})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda when present)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_bounds.json"))
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
