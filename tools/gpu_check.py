"""`make gpu-check`: everything a GPU must settle, in one command, with one report.

On a machine with an NVIDIA GPU it
  1. builds pyibp with its CUDA kernels for the GPU that is present (its compute capability only),
  2. runs the whole test suite, on CUDA too (the CUDA-only tests included),
  3. runs every CUDA operator under compute-sanitizer's memcheck and racecheck,
  4. reruns, by name, the checks that only a GPU can make: box vertices of a conv net inside
     `interval_bounds` with the global TF32 settings on, and half/bfloat16 against float32 for
     every operator,
  5. runs the benchmarks on CUDA (bounds, elementwise kernel bandwidth),
and writes `report.md` and `report.json` (and each step's full log) into the folder named by
$GPU_CHECK_OUT (else $OUT, else ./gpu-check-report). The whole run is budgeted to fit in 8 minutes
on one H100/H200; each step gets what is left. It needs only what the lent machines have: python3
with torch, nvcc, compute-sanitizer, pytest, hypothesis.

Without a GPU it says so and exits with status 1 without running anything.

    python3 tools/gpu_check.py            # what `make gpu-check` runs
    python3 tools/gpu_check.py --exercise # (internal) every CUDA operator once, for the sanitizers
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 8 * 60


def _gpu_present() -> Optional[str]:
    """The GPU's name, or None when there is no usable NVIDIA GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    return line or None


class Report:
    """The steps' results, written after every step so that a run cut short still leaves a report."""

    def __init__(self, folder: Path, gpu: str):
        self.folder, self.gpu, self.start = folder, gpu, time.monotonic()
        self.steps: List[Dict[str, object]] = []
        folder.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return BUDGET_S - (time.monotonic() - self.start)

    def run(self, name: str, cmd: List[str], *, share: float, env: Optional[Dict[str, str]] = None,
            summary: Optional[str] = None) -> bool:
        """Runs ``cmd`` with at most ``share`` of the time left; records status, time, the line
        matching ``summary`` (a regex) and the log."""
        limit = max(30.0, self.left() * share)
        log_path = self.folder / f"{len(self.steps) + 1:02d}-{re.sub(r'[^a-z0-9]+', '-', name.lower())}.log"
        print(f"== {name} (limit {limit:.0f} s)", flush=True)
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                                  timeout=limit)
            output, status = proc.stdout + proc.stderr, "passed" if proc.returncode == 0 else f"failed ({proc.returncode})"
        except subprocess.TimeoutExpired as err:
            output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
            status = f"timed out after {limit:.0f} s"
        log_path.write_text(output)
        found = [line for line in output.splitlines() if summary and re.search(summary, line)]
        step = {"step": name, "status": status, "seconds": round(time.monotonic() - started, 1),
                "summary": found[-1].strip() if found else "", "log": log_path.name,
                "tail": "\n".join(output.splitlines()[-25:])}
        self.steps.append(step)
        print(f"   {status} in {step['seconds']} s  {step['summary']}", flush=True)
        self.write()
        return status == "passed"

    def write(self) -> None:
        ok = all(s["status"] == "passed" for s in self.steps)
        payload = {"gpu": self.gpu, "passed": ok, "seconds": round(time.monotonic() - self.start, 1),
                   "steps": self.steps, "benchmarks": self._benchmarks()}
        (self.folder / "report.json").write_text(json.dumps(payload, indent=2))
        lines = [f"# pyibp gpu-check on {self.gpu}", "",
                 f"{'All steps passed' if ok else 'SOME STEPS FAILED'} in {payload['seconds']} s.", "",
                 "| step | status | seconds | summary |", "| --- | --- | --- | --- |"]
        lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['summary']} |" for s in self.steps]
        for s in self.steps:
            lines += ["", f"## {s['step']}: {s['status']}", "", "```", str(s["tail"]), "```"]
        (self.folder / "report.md").write_text("\n".join(lines) + "\n")

    def _benchmarks(self) -> Dict[str, object]:
        found = {}
        for name in ("bench_bounds", "bench_kernels"):
            path = self.folder / f"{name}.json"
            if path.exists():
                found[name] = json.loads(path.read_text())
        return found


def exercise() -> None:
    """Every CUDA operator once, forward and backward, in every dtype, for the sanitizers."""
    import torch

    from pyibp import ops

    dev = "cuda"
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        kw = dict(device=dev, dtype=dtype)
        for layout in (torch.contiguous_format, torch.channels_last):
            mu = torch.randn(3, 5, 7, 6, **kw).contiguous(memory_format=layout).requires_grad_()
            rad = torch.rand(3, 5, 7, 6, **kw).contiguous(memory_format=layout).requires_grad_()
            w = torch.randn(4, 5, 3, 3, **kw, requires_grad=True)
            b = torch.randn(8, **kw)[::2].requires_grad_()           # a strided bias
            m, r = ops.interval_conv2d(mu, rad, w, w.abs(), b, (1, 1), (1, 1), (1, 1), 1, True)
            m, r = ops.interval_relu(*ops.interval_affine(m, r, torch.randn(4, **kw), torch.randn(4, **kw)))
            lo, up = ops.center_to_interval(m, r)
            m, r = ops.interval_to_center(lo, up)
            flat_m, flat_r = m.flatten(1), r.flatten(1)
            lw = torch.randn(10, flat_m.shape[1], **kw, requires_grad=True)
            margins = ops.margin_elision(flat_m, flat_r, lw, torch.randn(10, **kw), torch.tensor([0, 9, 3], device=dev))
            A = torch.randn(3, 4, flat_m.shape[1], **kw, requires_grad=True)
            step, shift = ops.crown_relu_step(A, flat_m, flat_r)
            s_low, s_up, t = ops.relu_relaxation(lo, up)
            total = margins.sum() + step.sum() + shift.sum() + (s_up * t).sum()
            n = flat_m.shape[1]
            for slopes, width in ((torch.rand(3, 4, n, **kw), n), (torch.rand(1, 1, n, **kw), 5)):  # 5: a short row
                a_step, a_shift = ops.crown_relu_alpha_step(A[..., :width], (flat_m - flat_r)[:, :width],
                                                            (flat_m + flat_r)[:, :width],
                                                            slopes[..., :width].requires_grad_())
                total = total + a_step.sum() + a_shift.sum()
            total.float().backward()
            x = torch.rand(3, 5, 7, 6, **kw)
            ops.input_box(x, torch.rand(3, device=dev), 0.0, 1.0)
            delta = torch.zeros_like(x)
            ops.pgd_linf_step_(delta, torch.randn_like(x), x, torch.tensor(0.1, device=dev),
                               torch.tensor(0.02, device=dev), 0.0, 1.0)
            ops.pgd_l2_step_(delta, torch.randn_like(x), x, torch.tensor(0.5, device=dev),
                             torch.tensor(0.1, device=dev), 0.0, 1.0)
    torch.cuda.synchronize()
    print("exercised every CUDA operator")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exercise", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.exercise:
        exercise()
        return 0
    gpu = _gpu_present()
    if gpu is None:
        print("gpu-check: no NVIDIA GPU found (nvidia-smi is missing or lists no device); nothing was run. "
              "Run `make gpu-check` on a machine with a CUDA GPU.", file=sys.stderr)
        return 1
    folder = Path(os.environ.get("GPU_CHECK_OUT") or os.environ.get("OUT") or ROOT / "gpu-check-report")
    report = Report(folder, gpu)
    python = sys.executable
    capability = gpu.rsplit(",", 1)[-1].strip()
    build_env = {"PYIBP_CUDA": "1", "TORCH_CUDA_ARCH_LIST": capability, "MAX_JOBS": str(os.cpu_count() or 4),
                 "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")}
    run_env = {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if not report.run("build with CUDA", [python, "setup.py", "build_ext", "--inplace"], share=0.4, env=build_env,
                      summary=r"error|copying|Finished"):
        print(f"gpu-check: the build failed; report in {folder}", file=sys.stderr)
        return 1
    report.run("test suite (CPU and CUDA)", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
               share=0.45, env=run_env, summary=r"\d+ (passed|failed)")
    report.run("TF32 vertex test", [python, "-m", "pytest", "-q", "tests/test_precision.py", "-k", "vertices"],
               share=0.1, env=run_env, summary=r"\d+ (passed|failed|skipped)")
    report.run("half/bfloat16 vs float32, every operator",
               [python, "-m", "pytest", "-q", "tests/test_ops.py", "-k", "reduced_precision"],
               share=0.1, env=run_env, summary=r"\d+ (passed|failed|skipped)")
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    for tool in ("memcheck", "racecheck"):
        report.run(f"compute-sanitizer {tool}",
                   [sanitizer, "--tool", tool, "--error-exitcode", "1", python, str(Path(__file__)), "--exercise"],
                   share=0.3, env=run_env, summary=r"ERROR SUMMARY|RACECHECK SUMMARY|exercised")
    report.run("benchmark: bounds", [python, "benchmarks/bench_bounds.py", "--device", "cuda", "--repeats", "10",
                                     "--out", str(folder / "bench_bounds.json")], share=0.5, env=run_env,
               summary=r"wrote")
    report.run("benchmark: kernel bandwidth", [python, "benchmarks/bench_kernels.py", "--device", "cuda",
                                               "--elements", str(1 << 24), "--out", str(folder / "bench_kernels.json")],
               share=0.9, env=run_env, summary=r"wrote")
    report.write()
    print((folder / "report.md").read_text())
    return 0 if all(s["status"] == "passed" for s in report.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
