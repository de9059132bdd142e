"""Memory bandwidth of pyibp's elementwise kernels, against a copy and against their plain-PyTorch twins.

Each kernel reads and writes a known number of bytes (e.g. interval_relu: two tensors in, two
out); its achieved bandwidth is that count over its median time. A tensor copy of the same size
(`clone`) is the practical ceiling of the device, and the plain-PyTorch twin
(`pyibp.reference`) is what the fused kernel replaces. On CUDA the reachable bandwidth of an H100
is ~3 TB/s; a kernel well below the copy's figure has a memory-access problem.

    python benchmarks/bench_kernels.py [--device cuda] [--elements 16777216] [--out out.json]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import devices, interleaved_medians, print_table, write_json  # noqa: E402
from pyibp import ops, reference  # noqa: E402


def kernels(n: int, device: torch.device, dtype: torch.dtype) -> Dict[str, Tuple[Callable, Callable, int]]:
    """name -> (fused, plain twin, bytes the fused kernel must move)."""
    size = torch.finfo(dtype).bits // 8
    side = 64
    shape = (max(1, n // (16 * side * side)), 16, side, side)
    mu = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    rad = torch.rand_like(mu)
    count = mu.numel()
    scale, shift = torch.randn(16, device=device, dtype=dtype), torch.randn(16, device=device, dtype=dtype)
    x = torch.rand(shape, device=device, dtype=dtype)
    eps = torch.tensor(0.1, device=device)
    delta, grad = torch.zeros_like(x), torch.randn_like(x)
    rows = 8
    A = torch.randn(max(1, count // (rows * 4096)), rows, 4096, device=device, dtype=dtype)
    box_mu = torch.randn(A.shape[0], 4096, device=device, dtype=dtype)
    box_rad = torch.rand_like(box_mu)
    slopes = torch.rand_like(A)                     # alpha-CROWN's last layer: one slope per row and neuron
    grad_A, grad_shift = torch.randn_like(A), torch.randn(A.shape[:2], device=device, dtype=dtype)
    alpha_inputs = [A, box_mu - box_rad, box_mu + box_rad, slopes]
    alpha_leaves = [t.detach().requires_grad_() for t in alpha_inputs]     # the twin's autograd inputs
    out_mu, out_rad = ops.interval_relu(mu, rad)

    def pgd_plain():
        d = (delta + 0.01 * grad.sign()).clamp(-0.1, 0.1)
        return torch.clamp(d, -x, 1 - x)

    return {
        "copy (ceiling)": (lambda: mu.clone(), lambda: mu.clone(), 2 * count * size),
        "interval_relu": (lambda: ops.interval_relu(mu, rad), lambda: reference.interval_relu_ref(mu, rad),
                          4 * count * size),
        "interval_relu_backward": (
            lambda: torch.ops.pyibp.interval_relu_backward(mu, rad, out_mu, out_rad),
            lambda: torch.autograd.grad(reference.interval_relu_ref(mu.requires_grad_(), rad.requires_grad_()),
                                        (mu, rad), (mu.detach(), rad.detach())),
            6 * count * size),
        "interval_affine": (lambda: ops.interval_affine(mu, rad, scale, shift),
                            lambda: reference.interval_affine_ref(mu, rad, scale, shift), 4 * count * size),
        "center_to_interval": (lambda: ops.center_to_interval(mu, rad),
                               lambda: reference.center_to_interval_ref(mu, rad), 4 * count * size),
        "input_box": (lambda: ops.input_box(x, eps, 0.0, 1.0), lambda: reference.input_box_ref(x, eps, 0.0, 1.0),
                      3 * count * size),
        "relu_relaxation": (lambda: ops.relu_relaxation(mu - rad, mu + rad),
                            lambda: reference.relu_relaxation_ref(mu - rad, mu + rad), 5 * count * size),
        "crown_relu_step": (lambda: ops.crown_relu_step(A, box_mu, box_rad),
                            lambda: reference.crown_relu_step_ref(A, box_mu, box_rad), 2 * A.numel() * size),
        "crown_relu_alpha_step": (lambda: ops.crown_relu_alpha_step(*alpha_inputs),
                                  lambda: reference.crown_relu_alpha_step_ref(*alpha_inputs), 3 * A.numel() * size),
        "crown_relu_alpha_step_backward": (
            lambda: torch.ops.pyibp.crown_relu_alpha_step_backward(grad_A, grad_shift, *alpha_inputs),
            lambda: torch.autograd.grad(reference.crown_relu_alpha_step_ref(*alpha_leaves), alpha_leaves,
                                        (grad_A, grad_shift)),
            5 * A.numel() * size),
        "pgd_linf_step_": (lambda: ops.pgd_linf_step_(delta, grad, x, eps, eps / 10, 0.0, 1.0), pgd_plain,
                           4 * count * size),
    }


def run(args) -> None:
    rows, results = [], []
    for device in devices(args.device):
        work = kernels(args.elements, device, torch.float32)
        for name, (fused, plain, moved) in work.items():
            with torch.enable_grad() if name.endswith("_backward") else torch.no_grad():
                t = interleaved_medians({"fused": fused, "plain": plain}, device, repeats=args.repeats)
            row = {"device": device.type, "kernel": name, "fused_ms": 1e3 * t["fused"],
                   "fused_GB_per_s": moved / t["fused"] / 1e9, "plain_ms": 1e3 * t["plain"],
                   "speedup_over_plain": t["plain"] / t["fused"]}
            rows.append(row)
            results.append(row)
    print(f"elementwise kernels, float32, ~{args.elements:,} elements per tensor")
    print_table(rows, ["device", "kernel", "fused_ms", "fused_GB_per_s", "plain_ms", "speedup_over_plain"])
    write_json(args.out, {"benchmark": "kernels", "elements": args.elements, "results": results})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: every device present)")
    parser.add_argument("--elements", type=int, default=1 << 22, help="elements per tensor (default 4M)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_kernels.json"))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
