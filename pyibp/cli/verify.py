"""``pyibp verify``: complete verification of ONNX networks against VNN-LIB properties (one, or a
whole benchmark's instances.csv), answered as VNN-COMP does: sat, unsat, timeout or unknown."""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Set

from .common import CLIError, Output, common_options, format_table, positive, torch_device

__all__ = ["add_parser", "run"]

SUMMARY = ("instances", "solved", "sat", "unsat", "timeout", "unknown", "errors", "seconds")


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds the subcommand to the ``pyibp`` parser (``command`` makes its sub-parser)."""
    p = command("verify", "complete verification of an ONNX network against a VNN-LIB property",
                "Decides whether NET.onnx has an input in SPEC.vnnlib's boxes whose outputs satisfy its\n"
                "output constraints (VNN-LIB states the counterexample region): 'sat' with a checked\n"
                "counterexample, 'unsat' (proved by bounds), 'timeout' or 'unknown'. The verdict is printed\n"
                "and, with --results, written as a VNN-COMP result file. With --instances, every row\n"
                "'onnx,vnnlib,timeout' of a benchmark's instances.csv (paths relative to the csv's folder)\n"
                "is verified in turn; --results then names the per-instance CSV. Every verdict exits 0;\n"
                "a missing or damaged input exits 2.",
                "examples:\n  pyibp verify mnist-net_256x2.onnx prop_0_0.03.vnnlib --timeout 120 --results out.txt\n"
                "  pyibp verify --instances mnist_fc/instances.csv --device cpu --results mnist_fc.csv")
    p.add_argument("onnx", nargs="?", metavar="NET.onnx", help="the network")
    p.add_argument("vnnlib", nargs="?", metavar="SPEC.vnnlib", help="the property (.vnnlib or .vnnlib.gz)")
    p.add_argument("--instances", metavar="CSV", help="a benchmark's instances.csv (rows onnx,vnnlib,timeout)")
    p.add_argument("--timeout", type=positive,
                   help="seconds per instance (default: 60, or the timeout of each row of --instances)")
    p.add_argument("--results", metavar="FILE",
                   help="write the VNN-COMP result file here (with --instances: the per-instance CSV, default "
                        "verify_results.csv)")
    p.add_argument("--sound", action="store_true", help="'unsat' only from bounds sound in exact real arithmetic")
    common_options(p, seed_help="seeds the falsifier's random restarts")


def run(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    """Runs ``pyibp verify``; returns the exit code."""
    device = torch_device(args.device)
    if args.instances is not None:
        if args.onnx is not None or args.vnnlib is not None:
            raise CLIError("give either NET.onnx SPEC.vnnlib or --instances CSV, not both")
        return _instances(args, out, device)
    if args.onnx is None or args.vnnlib is None:
        raise CLIError("give NET.onnx and SPEC.vnnlib (or --instances CSV)")
    start = time.monotonic()
    model, prop = _problem(args.onnx, args.vnnlib, {})
    outcome = _verify(args.onnx, model, prop, _budget(args.timeout or 60.0, start), device, args)
    if args.results is not None:
        from ..verifier.results import write_results
        write_results(args.results, outcome)
    out.show(f"{outcome.status}  ({outcome.seconds:.2f} s)  {args.onnx}  {args.vnnlib}")
    out.result({"onnx": args.onnx, "vnnlib": args.vnnlib, **outcome.to_json()})
    return 0


def _problem(onnx_path: str, vnnlib_path: str, models: Dict[str, Any]):
    """The converted network (cached per file) and the property shaped as its input; CLIError
    naming the file for anything unreadable."""
    from ..verifier import OnnxModelError, load_onnx, read_vnnlib
    model = models.get(onnx_path)
    if model is None:
        try:
            model = models[onnx_path] = load_onnx(onnx_path)
        except (OnnxModelError, TypeError) as err:
            message = str(err)
            raise CLIError(message if message.startswith(onnx_path) else f"{onnx_path}: {message}") from None
        except ModuleNotFoundError as err:
            raise CLIError(f"{err}; install the onnx package (pip install 'pyibp[onnx]')") from None
    prop = read_vnnlib(vnnlib_path, input_shape=model.onnx_input_shape[1:])
    outputs = 1
    for s in model.onnx_output_shape[1:]:
        outputs *= s
    if prop.num_outputs is not None and prop.num_outputs != outputs:
        raise CLIError(f"{vnnlib_path} declares {prop.num_outputs} outputs Y_j but {onnx_path} has {outputs}")
    return model, prop


def _budget(timeout: float, start: float) -> float:
    """What is left of ``timeout`` after reading the inputs (the timeout covers the whole instance)."""
    return max(timeout - (time.monotonic() - start), 0.05)


def _verify(onnx_path: str, model, prop, timeout: float, device, args):
    from ..verifier import complete_verify
    outcome = complete_verify(model, prop, timeout=timeout, device=device, sound=args.sound, seed=args.seed)
    if outcome.status == "sat":
        _cross_check(onnx_path, prop, outcome)
    return outcome


def _cross_check(onnx_path: str, prop, outcome) -> None:
    """Runs the counterexample through onnxruntime when it is installed: its outputs are the ones
    written, and a conjunction that does not hold on them turns the verdict into 'unknown'."""
    try:
        import onnxruntime
    except ImportError:
        return
    import torch
    cex = outcome.counterexample
    import gzip
    raw = Path(onnx_path).read_bytes()
    session = onnxruntime.InferenceSession(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw,
                                           providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    x = cex.x.reshape(1, *cex.x.shape).numpy().astype("float32" if "float)" in feed.type else "float64")
    y = torch.from_numpy(session.run(None, {feed.name: x})[0]).flatten()
    conjunction = prop.cases[cex.case].conjunctions[cex.conjunction]
    if bool(conjunction.holds(y.double())):
        outcome.counterexample = type(cex)(cex.x, y.to(cex.y.dtype), cex.case, cex.conjunction)
    else:
        print(f"pyibp verify: warning: onnxruntime's outputs at the counterexample do not satisfy the property "
              f"(pyibp's: {cex.y.tolist()}, onnxruntime's: {y.tolist()}); reporting unknown", file=sys.stderr)
        outcome.status, outcome.counterexample = "unknown", None


def _existing(path: Path) -> str:
    """``path``, or ``path.gz`` when only the compressed file is there (as VNN-COMP repositories ship them)."""
    zipped = path.with_name(path.name + ".gz")
    return str(zipped if not path.exists() and zipped.exists() else path)


def _rows(path: Path) -> List[List[str]]:
    if not path.is_file():
        raise CLIError(f"--instances {path}: no such file")
    rows = []
    with path.open(newline="") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            row = [c.strip() for c in row]
            if not any(row):
                continue
            if len(row) != 3:
                raise CLIError(f"{path}:{number}: expected onnx,vnnlib,timeout, got {','.join(row)!r}")
            try:
                float(row[2])
            except ValueError:
                raise CLIError(f"{path}:{number}: the timeout must be a number of seconds, got {row[2]!r}") from None
            rows.append(row)
    if not rows:
        raise CLIError(f"{path} lists no instances")
    return rows


def _instances(args: argparse.Namespace, out: Output, device) -> int:
    from tqdm import tqdm
    csv_path = Path(args.instances)
    rows, folder = _rows(csv_path), csv_path.parent
    results_path = Path(args.results or "verify_results.csv")
    models: Dict[str, Any] = {}
    records: List[Dict[str, Any]] = []
    errors = 0
    with results_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["onnx", "vnnlib", "timeout", "status", "seconds", "error"])
        for onnx_name, vnnlib_name, row_timeout in tqdm(rows, desc="instances", disable=args.quiet, leave=False):
            onnx_path, vnnlib_path = _existing(folder / onnx_name), _existing(folder / vnnlib_name)
            timeout = args.timeout or float(row_timeout)
            start = time.monotonic()
            record: Dict[str, Any] = {"onnx": onnx_name, "vnnlib": vnnlib_name, "timeout": timeout, "error": ""}
            try:
                model, prop = _problem(onnx_path, vnnlib_path, models)
                outcome = _verify(onnx_path, model, prop, _budget(timeout, start), device, args)
                record.update(status=outcome.status, seconds=round(outcome.seconds, 3))
            except (CLIError, ValueError, FileNotFoundError) as err:
                errors += 1
                record.update(status="error", seconds=round(time.monotonic() - start, 3), error=str(err))
                print(f"pyibp verify: error: {err}", file=sys.stderr)
            records.append(record)
            writer.writerow([record[k] for k in ("onnx", "vnnlib", "timeout", "status", "seconds", "error")])
            f.flush()
    summary = _summary(records)
    out.show(format_table(SUMMARY, [tuple(summary[k] for k in SUMMARY)], title=f"{csv_path} -> {results_path}"))
    out.result({"instances": str(csv_path), "results": str(results_path), "summary": summary, "rows": records})
    return 2 if errors else 0


def _summary(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    count = lambda status: sum(r["status"] == status for r in records)  # noqa: E731
    return {"instances": len(records), "solved": count("sat") + count("unsat"), "sat": count("sat"),
            "unsat": count("unsat"), "timeout": count("timeout"), "unknown": count("unknown"),
            "errors": count("error"), "seconds": round(sum(r["seconds"] for r in records), 2)}

