"""``pyibp bench``: the benchmark scripts, each in its own process, and a bar chart of their ratios."""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Set, Tuple

from .common import PROG, CLIError, Output, common_options

__all__ = ["add_parser", "run", "plot_bench"]

REPO_BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "benchmarks"
BENCHMARKS = ("bounds", "attacks", "certified")   # run by default, when present
OPTIONAL_BENCHMARKS = ("training", "verify")      # long (torchrun groups; complete verification): only with --only


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds the subcommand to the ``pyibp`` parser (``command`` makes its sub-parser)."""
    p = command("bench", "run the benchmarks and chart their ratios",
                "Runs benchmarks/bench_bounds.py (and bench_attacks.py, bench_certified.py when present)\n"
                "from the source checkout, each in its own process; prints their tables, reads their JSON\n"
                "and draws the ratios (x_plain, speedups) as bar charts.")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS + OPTIONAL_BENCHMARKS,
                   help="run only these benchmarks (default: bounds, attacks, certified)")
    p.add_argument("--bench-args", default="", help='extra arguments for every script, e.g. "--repeats 5"')
    p.add_argument("--benchmarks-dir", default=str(REPO_BENCHMARKS), help="the folder holding bench_*.py")
    p.add_argument("--results-dir", default="bench-results",
                   help="folder for the scripts' JSON and the chart (default: bench-results in the current folder)")
    p.add_argument("--out", help="the bar chart (default: RESULTS_DIR/bench.png)")
    common_options(p, seed_help="unused; accepted for uniformity (--device is passed on when given)")


def _flat(row: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dicts of a result row as ``outer.inner`` keys."""
    out: Dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_ratio(key: str) -> bool:
    """Columns that hold ratios: x_plain, fwd_x_plain, x_standard, speedups, ratios.*"""
    name = key.rsplit(".", 1)[-1]
    return "speedup" in key or "ratio" in key or name.startswith("x_") or "_x_" in name


def _row_label(row: Dict[str, Any]) -> str:
    """The short identifying fields of a row (device, model, batch, method, ...)."""
    return " ".join(str(v) for v in row.values()
                    if (isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))) and len(str(v)) <= 16)


def plot_bench(payloads: List[Tuple[str, Dict[str, Any]]], path: Path) -> int:
    """Horizontal bar charts of every ratio column of the benchmarks' JSON; returns the panel count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..runs import atomic_write
    panels = []
    for name, payload in payloads:
        rows = [_flat(r) for r in payload.get("results", []) if isinstance(r, dict)]
        keys = dict.fromkeys(k for r in rows for k, v in r.items()
                             if _is_ratio(k) and isinstance(v, (int, float)) and not isinstance(v, bool))
        for key in keys:
            bars = [(_row_label(r), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
            panels.append((f"{name}: {key}", bars))
    if not panels:
        return 0
    # One column for one or two panels, else two; each panel tall enough for its bars, so the
    # picture stays about as tall as wide; tight_layout keeps the labels in the frame.
    cols = 1 if len(panels) <= 2 else 2
    rows = math.ceil(len(panels) / cols)
    panel_height = max(3.0, 0.32 * max(len(b) for _, b in panels) + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, panel_height * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, bars) in zip(axes.flat, panels):
        labels, values = zip(*bars)
        ax.barh(range(len(values)), values, color="tab:blue", height=0.6)
        ax.set_yticks(range(len(values)), labels, fontsize="small")
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)   # ratio 1: as fast as the reference
        ax.set_xlim(0, 1.2 * max(max(values), 1.0))       # room for the value printed after each bar
        ax.set_xlabel("ratio")
        ax.set_title(title, fontsize="medium")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return len(panels)


def run(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    """Runs ``pyibp bench``; returns the exit code."""
    folder = Path(args.benchmarks_dir)
    if not (folder / "bench_bounds.py").exists():
        raise CLIError(f"no benchmarks in {folder} (pyibp bench runs the bench_*.py scripts of a source checkout; "
                       "pass --benchmarks-dir)")
    names = args.only or [n for n in BENCHMARKS if (folder / f"bench_{n}.py").exists()]
    missing = [n for n in names if not (folder / f"bench_{n}.py").exists()]
    if missing:
        raise CLIError(f"--only {' '.join(missing)}: no bench_{missing[0]}.py in {folder}")
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.bench_args)
    payloads, failed = [], []
    for name in names:
        json_path = results_dir / f"bench_{name}.json"
        cmd = [sys.executable, str(folder / f"bench_{name}.py"), *extra]
        if "device" in explicit:
            cmd += ["--device", args.device]
        cmd += ["--out", str(json_path)]
        out.progress(f"$ {' '.join(shlex.quote(c) for c in cmd)}")
        before = json_path.stat().st_mtime_ns if json_path.exists() else None
        # The scripts' tables go to our stdout, or to stderr when stdout carries --json.
        sys.stdout.flush()
        sys.stderr.flush()
        code = subprocess.run(cmd, stdout=2 if args.json else None).returncode   # fd 2: our stderr
        written = json_path.exists() and json_path.stat().st_mtime_ns != before
        if code != 0 or not written:
            failed.append(f"bench_{name}.py (exit code {code}, {json_path} {'written' if written else 'not written'})")
            continue
        payloads.append((name, json.loads(json_path.read_text())))
    chart = Path(args.out) if args.out else results_dir / "bench.png"
    panels = plot_bench(payloads, chart) if payloads else 0
    if panels:
        out.show(f"\nwrote {chart} ({panels} charts of ratios)")
    out.result({"chart": str(chart) if panels else None, "failed": failed,
                "results": {name: payload for name, payload in payloads}})
    if failed:
        print(f"{PROG} bench: failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0

