"""Timing, memory and reporting helpers shared by the benchmark scripts."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
import weakref
from typing import Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, *, repeats: int = 20,
                   warmup: int = 3, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: Dict[str, Callable[[], object]], device: torch.device, *, repeats: int = 20,
                        warmup: int = 2) -> Dict[str, float]:
    """Median wall time of each ``fn``, timed round-robin so that load from other processes on a
    shared machine falls on all of them alike rather than on whichever ran during the burst."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensors created by ATen ops while active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _release(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = set()
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t.untyped_storage(), self._release, n)
        return out


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory of the tensors ``fn`` allocates (CUDA: the allocator's peak above the start)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    mode = _LiveBytes()
    with mode:
        fn()
    return mode.peak


def print_table(rows: List[Dict[str, object]], columns: List[str]) -> None:
    """Prints rows of dicts as an aligned text table."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def environment() -> Dict[str, object]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path: str, payload: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(), **payload}, f, indent=2)
    print(f"\nwrote {path}")


def devices(requested: Optional[str]) -> List[torch.device]:
    if requested:
        return [torch.device(requested)]
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
