"""``pyibp train`` under torchrun: 2 gloo processes on the CPU against one plain process with the
same global batch, a 2-process run killed mid-epoch and resumed, and the --amp / --compile switches.

The recipe leaves out Shi et al.'s warm-up regularisers: they are statistics of the whole batch
(mean widths, ratios of active to inactive neurons), which each rank computes on its slice, so with
them N processes only approximate one process. Everything else is a mean over examples and matches.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
# 400 examples at a global batch of 50: 8 steps per epoch, 25 examples per rank and step. Clean
# training for 10 steps, then ε ramps to 0.02 with κ going to 0.5.
RECIPE = ["--method", "ibp", "--epochs", "2", "--train-subset", "400", "--test-subset", "200", "--batch-size", "50",
          "--eps", "0.02", "--lr", "0.003", "--lr-schedule", "constant", "--no-ibp-init", "--reg-weight", "0",
          "--warmup-steps", "10", "--ramp-steps", "6", "--kappa-end", "0.5", "--eval-pgd-steps", "2",
          "--eval-pgd-subset", "100", "--device", "cpu", "--seed", "1"]
TIMING = ("seconds", "eval_seconds")
RUN_FILES = ["checkpoint.pt", "config.json", "curves.png", "metrics.jsonl"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, delay: float = 0.0) -> list:
    """The command line of ``pyibp ARGS`` under torchrun with ``nproc`` local processes, pausing
    ``delay`` seconds after every training batch when it is > 0 (tests/slow_pyibp.py)."""
    program = ["-m", "pyibp"] if delay == 0 else [str(REPO / "tests" / "slow_pyibp.py"), str(delay)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), *program, *args]


def run(cmd: list, env: dict = ENV, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def metrics(folder: Path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path):
    return torch.load(folder / "checkpoint.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same recipe trained by one plain process and by 2 processes under torchrun."""
    root = tmp_path_factory.mktemp("dist")
    one = run([sys.executable, "-m", "pyibp", "train", *RECIPE, "--out", str(root / "one"), "--quiet"])
    two = run(torchrun(2, "train", *RECIPE, "--out", str(root / "two"), "--json"))
    return root / "one", root / "two", one, two


def test_two_processes_write_a_complete_run_folder(runs):
    _, folder, _, proc = runs
    assert sorted(p.name for p in folder.iterdir()) == RUN_FILES
    records = metrics(folder)
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [8, 16]
    assert records[1]["train_error"] < records[0]["train_error"]              # it trained
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 16
    assert not any(name.startswith("module.") for name in state["model"])  # the model, not its DDP wrapper
    # Rank 0 alone prints: one JSON document on stdout.
    printed = json.loads(proc.stdout)
    assert printed["final"]["epoch"] == 2 and printed["run"] == str(folder)


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    """Equal up to float32 rounding (the gradients agree to about 1e-6), which Adam amplifies in
    weights whose gradients are nearly 0: it divides each gradient by its running RMS, so noise there
    moves a weight by up to lr per step. Hence 0.5 % on losses and 2 % on the weights' norms."""
    one, two, _, _ = runs
    assert len(metrics(one)) == len(metrics(two)) == 2
    for a, b in zip(metrics(one), metrics(two)):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if key.endswith("error") and value is not None:   # fractions of 400 or 200 examples
                assert b[key] == pytest.approx(value, abs=2 / 200 + 1e-9), key
            else:
                assert b[key] == pytest.approx(value, rel=5e-3), key
    ours, theirs = weights(two), weights(one)
    for name, tensor in theirs.items():
        assert float((ours[name] - tensor).norm()) <= 2e-2 * float(tensor.norm()), name


def _children(pid: int) -> list:
    """PIDs of ``pid``'s child processes (torchrun's workers run in sessions of their own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc to find the workers")
def test_resume_of_a_killed_two_process_run_matches_the_uninterrupted_run(runs, tmp_path):
    _, reference, _, _ = runs
    folder = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(2, "train", *RECIPE, "--out", str(folder), delay=0.3), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ENV)
    try:
        for line in proc.stdout:
            if line.startswith("epoch   1/2"):  # printed after the checkpoint of epoch 1 is written
                break
        else:
            raise AssertionError("the run ended without finishing epoch 1")
        time.sleep(0.8)  # a few of epoch 2's 8 batches
        workers = _children(proc.pid)
        assert len(workers) == 2 and proc.poll() is None
        for pid in workers:  # every rank dies at once, as when the machine goes down
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len(metrics(folder)) == 1

    resumed = run(torchrun(2, "train", *RECIPE, "--out", str(folder), "--resume"))
    assert "resuming" in resumed.stdout and resumed.stdout.count("epoch   2/2") == 1   # rank 0 alone prints
    assert sorted(p.name for p in folder.iterdir()) == RUN_FILES
    assert metrics(folder) == metrics(reference)
    for name, tensor in weights(reference).items():
        assert torch.equal(weights(folder)[name], tensor), name


def test_a_run_in_the_way_stops_every_rank(runs):
    _, folder, _, _ = runs
    before = (folder / "metrics.jsonl").read_text()
    proc = subprocess.run(torchrun(2, "train", *RECIPE, "--out", str(folder)), capture_output=True, text=True,
                          env=ENV, timeout=120)   # rank 0 finds the run; no rank is left waiting
    assert proc.returncode != 0
    # Each rank exits with pyibp's one-line message (then torchrun reports the failed ranks).
    assert proc.stderr.count(f"pyibp train: error: {folder} already holds a run: pass --resume") == 2
    assert (folder / "metrics.jsonl").read_text() == before


def test_only_train_runs_under_torchrun(tmp_path):
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-m", "pyibp", "certify", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "only `pyibp train` runs under torchrun" in proc.stderr


def _train_tiny(folder: Path, *args: str) -> dict:
    """One epoch of 2 steps with ``args``, as one process; the printed JSON."""
    printed = json.loads(run([sys.executable, "-m", "pyibp", "train", "--epochs", "1", "--train-subset", "100",
                              "--test-subset", "50", "--batch-size", "50", "--eval-pgd-steps", "2", "--device", "cpu",
                              *args, "--out", str(folder), "--json"], timeout=600).stdout)
    final = printed["final"]
    assert final["epoch"] == 1 and final["step"] == 2 and 0 < final["train_loss"] < float("inf")
    assert "amp" not in printed["config"] and "compile" not in printed["config"]   # not part of the recipe
    assert sorted(p.name for p in folder.iterdir()) == RUN_FILES
    # The checkpoint holds the plain model (no compile or autocast wrapper) in float32.
    for name, tensor in weights(folder).items():
        assert not name.startswith(("_orig_mod", "module")) and tensor.dtype != torch.bfloat16, name
    return final


@pytest.mark.slow
def test_bf16_autocast_and_compile_train_certified_on_the_cpu(tmp_path):
    # About 40 s on 2 CPU cores, nearly all of it torch.compile (inductor's cache makes reruns faster).
    final = _train_tiny(tmp_path / "ibp", "--method", "ibp", "--warmup-steps", "0", "--ramp-steps", "2",
                        "--amp", "bf16", "--compile")
    assert final["train_eps"] > 0 and final["train_robust_loss"] > 0   # the bounds took part


def test_bf16_autocast_trains_adversarially_on_the_cpu(tmp_path):
    _train_tiny(tmp_path / "pgd", "--method", "pgd", "--attack-steps", "2", "--amp", "bf16")


def test_train_run_names_a_bad_amp(tmp_path):
    from pyibp.runs import TrainConfig, prepare_run_folder, train_run
    folder = prepare_run_folder(tmp_path / "r", TrainConfig.for_method("standard", epochs=1), resume=False,
                                overwrite=False)
    with pytest.raises(ValueError, match="amp must be one of .*'fp16'"):
        train_run(folder, device="cpu", amp="fp16")
