"""``pyibp export``: a trained run's model as ONNX, and its test examples' robustness properties as
VNN-LIB with an instances.csv, so that other verifiers can check pyibp's models."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Set

from .common import CLIError, Output, count, data_options, format_table, load, nonnegative, positive, test_set

__all__ = ["add_parser", "run", "export_onnx"]


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds the subcommand to the ``pyibp`` parser (``command`` makes its sub-parser)."""
    p = command("export", "a trained run as ONNX (and its robustness properties as VNN-LIB)",
                "Writes RUN_DIR's model as an ONNX network with batch size 1 (inputs in [0, 1], the\n"
                "normalisation inside). With --vnnlib DIR, also the l∞ robustness property of each of its\n"
                "first --examples test examples (prop_<i>.vnnlib: a counterexample is an input of the\n"
                "ε-box where another class scores at least as high as the label) and DIR/instances.csv\n"
                "(rows onnx,vnnlib,timeout) for `pyibp verify --instances` or any VNN-COMP verifier.",
                "example:\n  pyibp export runs/ibp --onnx ibp.onnx --vnnlib props --eps 0.1 --examples 20")
    p.add_argument("run", metavar="RUN_DIR", help="a run folder written by pyibp train")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    p.add_argument("--vnnlib", metavar="DIR", help="also write robustness properties and instances.csv here")
    p.add_argument("--eps", type=nonnegative, help="ε of the properties (default: the run's)")
    p.add_argument("--examples", type=count(1), default=10, help="properties of this many test examples")
    p.add_argument("--timeout", type=positive, default=60.0, help="the timeout written in instances.csv")
    p.add_argument("--opset", type=count(7), default=13, help="the ONNX opset version")
    data_options(p, with_dataset=False)
    group = p.add_argument_group("common options")
    group.add_argument("--quiet", action="store_true", help="print nothing but errors")
    group.add_argument("--json", action="store_true", help="print the written files as one JSON document")


def export_onnx(model, example, path: str, opset: int = 13) -> None:
    """``model`` (eval mode) as an ONNX file with a fixed batch of 1, by torch's TorchScript exporter
    (it needs no onnxscript)."""
    import io
    import warnings

    import torch
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # the TorchScript exporter's deprecation notice
        torch.onnx.export(model.eval(), example, buffer, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["output"])
    Path(path).write_bytes(buffer.getvalue())


def run(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    """Runs ``pyibp export``; returns the exit code."""
    import torch
    start = time.perf_counter()
    device = torch.device("cpu")
    config, model, meta = load(args.run, device)
    test = test_set(config, args, device, None)
    x, y = test.tensors
    try:
        export_onnx(model, x[:1], args.onnx, args.opset)
    except ModuleNotFoundError as err:
        raise CLIError(f"{err}; install the onnx package (pip install 'pyibp[onnx]')") from None
    written = {"onnx": args.onnx}
    rows = [("onnx", args.onnx)]
    if args.vnnlib is not None:
        written.update(_properties(args, config, model, x, y))
        rows += [("vnnlib", f"{written['properties']} properties in {args.vnnlib}"),
                 ("instances", written["instances"])]
    elif args.eps is not None or "examples" in explicit:
        raise CLIError("--eps and --examples describe the properties of --vnnlib DIR; give --vnnlib too")
    out.show(format_table(("written", "where"), rows,
                          title=f"{args.run} (epoch {meta['epoch']}/{config.epochs}, {config.method}) in "
                                f"{time.perf_counter() - start:.1f} s"))
    out.result(written)
    return 0


def _properties(args: argparse.Namespace, config, model, x, y) -> dict:
    import torch

    from ..verifier import robustness_property, write_vnnlib
    eps = config.eps if args.eps is None else args.eps
    folder = Path(args.vnnlib)
    folder.mkdir(parents=True, exist_ok=True)
    n = min(args.examples, len(y))
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
        correct = int((model(x[:n]).argmax(1) == y[:n]).sum())
    onnx_from_folder = os.path.relpath(os.path.abspath(args.onnx), os.path.abspath(folder))
    lines = []
    for i in range(n):
        name = f"prop_{i}_eps_{eps:g}.vnnlib"
        write_vnnlib(robustness_property(x[i], int(y[i]), eps, num_classes=num_classes), folder / name)
        lines.append(f"{onnx_from_folder},{name},{args.timeout:g}\n")
    (folder / "instances.csv").write_text("".join(lines))
    return {"vnnlib": str(folder), "properties": n, "eps": eps, "correctly_classified": correct,
            "instances": str(folder / "instances.csv")}
