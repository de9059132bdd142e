"""Training throughput (images per second) of standard, PGD-7, IBP and CROWN-IBP (margins, and with
loss fusion) training epochs, with 1 and 2 processes (torchrun; gloo on the CPU, NCCL on GPUs), and on
CUDA with and without bf16 mixed precision and torch.compile. One run; prints a table and writes JSON.

    python benchmarks/bench_training.py [--device cpu] [--procs 1 2] [--examples 800]

Each configuration runs in its own process group (``torchrun --nproc_per_node P`` of this script
in worker mode) over the same global batches, so the 2-process figure is the speed-up a user gets
from launching the same command under torchrun. On a 2-core machine the 2-process CPU figure is
bounded by the cores, not by pyibp: report it as measured.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402

METHODS = ("standard", "pgd7", "ibp", "crown-ibp", "crown-ibp-lf")   # lf: with loss fusion


def _epoch(method, model, loader, opt, eps):
    from pyibp.training import CROWNIBP, IBP, PGDTraining, Standard, train_epoch
    trained = {"standard": lambda: Standard(), "pgd7": lambda: PGDTraining(eps, alpha=eps / 4, steps=7),
               "ibp": lambda: IBP(eps, 0.5), "crown-ibp": lambda: CROWNIBP(eps, 0.5),
               "crown-ibp-lf": lambda: CROWNIBP(eps, 0.5, loss_fusion=True)}[method]()
    return train_epoch(model, trained, loader, opt, quiet=True)[0]


def worker(args) -> None:
    """One configuration, in this process (one rank of a torchrun group, or alone)."""
    from pyibp import distributed
    from pyibp.models import build_model
    torch.set_num_threads(max(1, args.threads))
    ctx = distributed.init_distributed(args.device)
    shape = (1, 28, 28) if args.model == "tutorial-cnn" else (3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((args.examples,) + shape, generator=gen).to(ctx.device)
    y = torch.randint(0, 10, (args.examples,), generator=gen).to(ctx.device)
    data = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    model = build_model(args.model, shape[0], 10, shape[1]).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    model = distributed.wrap_model(model, ctx)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = distributed.ShardedLoader(data, args.batch, ctx=ctx, seed=0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and ctx.device.type == "cuda")
    with amp:
        warm = distributed.ShardedLoader(torch.utils.data.TensorDataset(x[:2 * args.batch], y[:2 * args.batch]),
                                         args.batch, ctx=ctx, seed=1)
        _epoch(args.method, model, warm, opt, args.eps)  # compile, allocator and cuDNN warm-up
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = _epoch(args.method, model, loader, opt, args.eps)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    metrics = distributed.reduce_metrics({**metrics, "seconds": seconds}, ctx)
    if ctx.is_main:
        with open(args.result, "w") as f:
            json.dump({"images_per_second": metrics["examples"] / metrics["seconds"], **metrics}, f)
    distributed.shutdown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, method: str, procs: int, amp: bool, compile_: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        script = [os.path.abspath(__file__), "--worker", "--result", result, "--method", method,
                  "--device", args.device, "--model", args.model, "--examples", str(args.examples),
                  "--batch", str(args.batch), "--eps", str(args.eps),
                  "--threads", str(max(1, args.threads // procs))]
        script += ["--amp"] * amp + ["--compile"] * compile_ + ["--channels-last"] * args.channels_last
        if procs == 1:
            cmd = [sys.executable] + script
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port())] + script
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // procs)))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        with open(result) as f:
            return json.load(f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="tutorial-cnn", choices=["tutorial-cnn", "cifar-cnn", "cnn7"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--examples", type=int, default=800, help="images per measured epoch")
    parser.add_argument("--batch", type=int, default=100, help="global batch size")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_training.json"))
    # worker mode (used by the launcher)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    variants = [(False, False)] + ([(True, False), (False, True), (True, True)] if args.device == "cuda" else [])
    rows = []
    for method in args.methods:
        base = None
        for procs in args.procs:
            for amp, compile_ in variants:
                if procs > 1 and (amp or compile_):
                    continue
                r = launch(args, method, procs, amp, compile_)
                base = base or r["images_per_second"]
                rows.append({"device": args.device, "model": args.model, "method": method, "procs": procs,
                             "bf16": amp, "compile": compile_, "images_per_s": r["images_per_second"],
                             "x_1proc_eager": r["images_per_second"] / base})
    print_table(rows, ["device", "model", "method", "procs", "bf16", "compile", "images_per_s", "x_1proc_eager"])
    write_json(args.out, {"benchmark": "training", "examples": args.examples, "global_batch": args.batch,
                          "results": rows})


if __name__ == "__main__":
    main()
