"""What a run folder survives: a second writer, damaged files, folders that cannot be written,
SIGTERM, short runs whose schedules must still reach ε, subsets larger than the data, and a
user's own model factory. Every failure is one line and exit code 2, and nothing computed is lost.

One tiny IBP run (1 epoch of 2 steps) is trained once per module; each test damages a copy.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from cli_support import ENV, REPO, run_main
from pyibp.cli import main
from pyibp.runs import LOCK, TrainConfig, files, plot_curves, read_metrics
from pyibp.training.schedules import ScheduleWarning, eps_schedules, eps_shortfall

TINY = ["--method", "ibp", "--epochs", "1", "--train-subset", "100", "--test-subset", "50", "--batch-size", "50",
        "--eval-pgd-steps", "2", "--eval-pgd-subset", "50", "--device", "cpu", "--seed", "1", "--quiet"]


def one_line(err: str, *words: str) -> str:
    """The one line of ``err``, which holds every word."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained") / "ibp"
    assert main(["train", *TINY, "--out", str(folder)]) == 0
    return folder


@pytest.fixture
def run_copy(trained, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(trained, folder)
    return folder


def slow_train(folder: Path, *args: str, delay: float = 0.5) -> subprocess.Popen:
    """``pyibp train`` in a subprocess pausing ``delay`` s after every batch (tests/slow_pyibp.py)."""
    cmd = [sys.executable, str(REPO / "tests" / "slow_pyibp.py"), str(delay), "train", *TINY, "--epochs", "2",
           "--out", str(folder), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# one writer; SIGTERM
def test_a_second_writer_is_refused_and_sigterm_stops_a_run_resumably(tmp_path, capsys):
    folder = tmp_path / "busy"
    proc = slow_train(folder)
    try:
        lock = folder / LOCK
        wait_for(lambda: lock.exists() and lock.read_text().strip())
        assert lock.read_text().split()[0] == str(proc.pid)
        for mode in ("--resume", "--overwrite"):
            code, _, err = run_main(["train", *TINY, "--epochs", "2", "--out", str(folder), mode], capsys)
            assert code == 2
            one_line(err, str(folder), "in use", f"pid {proc.pid}")
        wait_for(lambda: (folder / "curves.png").exists())   # epoch 1 written: metrics, checkpoint, curves
        time.sleep(0.3)   # into epoch 2 (2 batches of 0.5 s)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "pyibp train: terminated; continue with --resume" in err and "Traceback" not in err
    assert not (folder / LOCK).exists()
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1
    code, _, _ = run_main(["train", *TINY, "--epochs", "2", "--out", str(folder), "--resume"], capsys)
    assert code == 0
    assert [r["epoch"] for r in read_metrics(folder / "metrics.jsonl")] == [1, 2]   # each epoch once
    assert not (folder / LOCK).exists()


# ---------------------------------------------------------------------------------------------
# damaged files
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damaged", ["checkpoint.pt", "config.json"])
def test_a_damaged_file_is_named_with_what_to_do(run_copy, damaged, tmp_path, capsys):
    _truncate(run_copy / damaged)
    for argv in (["eval", str(run_copy), "--steps", "2", "--device", "cpu"],
                 ["certify", str(run_copy), "--method", "ibp", "--device", "cpu"],
                 ["landscape", str(run_copy), "--points", "3", "--out", str(tmp_path / "l.png"), "--device", "cpu"],
                 ["train", *TINY, "--out", str(run_copy), "--resume"]):
        code, _, err = run_main(argv, capsys)
        assert code == 2, argv
        one_line(err, str(run_copy / damaged), "damaged", "--overwrite")


def test_resume_refuses_to_drop_a_record_the_checkpoint_covers(run_copy, capsys):
    metrics = run_copy / "metrics.jsonl"
    _truncate(metrics)                               # the last (only) line torn; the checkpoint is at epoch 1
    before = metrics.read_bytes()
    code, _, err = run_main(["train", *TINY, "--out", str(run_copy), "--resume"], capsys)
    assert code == 2
    one_line(err, str(metrics), "epoch 1", "--overwrite")
    assert metrics.read_bytes() == before            # left as it was


def test_a_damaged_line_inside_metrics_is_not_taken_for_a_torn_end(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(files.RunFolderError, match="damaged at line 2 of 3"):
        read_metrics(path)


# ---------------------------------------------------------------------------------------------
# folders that cannot be written (the tests run as root, where chmod does not stop a write)
@pytest.fixture
def read_only(monkeypatch):
    def refuse(path, write, *, binary=True):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(files, "atomic_write", refuse)


@pytest.mark.parametrize("command, saved", [(["eval", "--steps", "2"], "eval.json"),
                                            (["certify", "--method", "ibp"], "certify.json")])
def test_a_read_only_run_folder_gets_the_result_printed_then_one_line(run_copy, read_only, command, saved, capsys):
    code, out, err = run_main([command[0], str(run_copy), *command[1:], "--device", "cpu", "--json"], capsys)
    assert code == 2
    printed = json.loads(out)                        # the result, complete, before the failure
    assert printed["run"] == str(run_copy)
    one_line(err, "not saved", str(run_copy / saved), "Read-only file system")
    assert not (run_copy / saved).exists()


def test_a_damaged_results_file_is_not_written_over(run_copy, capsys):
    (run_copy / "certify.json").write_text('{"results": {"ibp eps=0.1": ')
    code, out, err = run_main(["certify", str(run_copy), "--method", "ibp", "--device", "cpu"], capsys)
    assert code == 2 and "verified error" in out
    one_line(err, str(run_copy / "certify.json"), "damaged", "move it away")
    assert (run_copy / "certify.json").read_text() == '{"results": {"ibp eps=0.1": '


def test_a_read_only_out_folder_is_one_line(tmp_path, read_only, capsys):
    code, _, err = run_main(["train", *TINY, "--out", str(tmp_path / "ro")], capsys)
    assert code == 2
    one_line(err, "cannot write", str(tmp_path / "ro" / "config.json"), "Read-only")


# ---------------------------------------------------------------------------------------------
# schedules that fit the run
@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
@pytest.mark.parametrize("epochs", [1, 2])
def test_default_schedules_reach_eps_and_kappa_in_a_short_run(method, epochs):
    config = TrainConfig.for_method(method, eps=0.1, epochs=epochs)
    eps, kappa, beta = eps_schedules(config, steps_per_epoch=40)
    last = 40 * epochs - 1
    assert eps(0) == 0 and eps(last) == pytest.approx(0.1) and kappa(last) == 0 and beta(last) == 0
    assert eps_shortfall(config, 40) is None


def test_a_schedule_that_never_reaches_eps_is_announced_before_training(tmp_path, capsys):
    config = TrainConfig.for_method("ibp", eps=0.1, epochs=1, warmup_steps=40)
    assert "never reaches its target 0.1" in eps_shortfall(config, 40)
    code, _, err = run_main(["train", *TINY, "--warmup-steps", "5", "--out", str(tmp_path / "r")], capsys)
    assert code == 0
    one_line(err, "pyibp train: warning:", "ε never reaches its target 0.1", "warm-up")


# ---------------------------------------------------------------------------------------------
# subsets
@pytest.mark.parametrize("argv, words", [
    (["train", "--train-subset", "4001"], ["--train-subset", "at most 4000", "4001"]),
    (["train", "--test-subset", "1001"], ["--test-subset", "at most 1000", "1001"]),
])
def test_a_subset_larger_than_the_data_is_refused(argv, words, tmp_path, capsys):
    folder = tmp_path / "r"
    code, _, err = run_main([*argv, "--epochs", "1", "--device", "cpu", "--out", str(folder)], capsys)
    assert code == 2
    one_line(err, *words)
    assert not folder.exists()


def test_eval_refuses_a_test_subset_larger_than_the_data(trained, capsys):
    code, _, err = run_main(["certify", str(trained), "--test-subset", "1001", "--device", "cpu"], capsys)
    assert code == 2
    one_line(err, "--test-subset", "at most 1000")


# ---------------------------------------------------------------------------------------------
# the user's own model
FACTORY = '''
from torch import nn

def small(in_channels, image_size, num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, 16), nn.ReLU(),
                         nn.Linear(16, num_classes))

not_a_model = lambda: "a string"
'''


def test_a_factory_file_trains_and_every_command_rebuilds_it(tmp_path, capsys, monkeypatch):
    (tmp_path / "net.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "mine"
    code, _, err = run_main(["train", *TINY, "--epochs", "2", "--model", "net.py:small", "--out", str(folder)],
                            capsys)
    assert code == 0, err
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == f"{tmp_path / 'net.py'}:small"           # found again from any folder
    weights = torch.load(folder / "checkpoint.pt", weights_only=True)["model"]
    assert weights["1.weight"].shape == (16, 784)
    monkeypatch.chdir(REPO)
    for argv in (["eval", str(folder), "--steps", "2"], ["certify", str(folder), "--method", "ibp", "crown-ibp"],
                 ["landscape", str(folder), "--points", "3", "--out", str(tmp_path / "l.png")],
                 ["train", *TINY, "--epochs", "2", "--out", str(folder), "--resume", "--model",
                  str(tmp_path / "net.py") + ":small"]):
        code, _, err = run_main([*argv, "--device", "cpu"] if argv[0] != "train" else argv, capsys)
        assert code == 0, (argv, err)


@pytest.mark.parametrize("spec, words", [
    ("{tmp}/missing.py:small", ["no file", "missing.py"]),
    ("{tmp}/net.py:large", ["net.py", "'large'", "not a function"]),
    ("{tmp}/net.py:not_a_model", ["returned a str", "not a torch.nn.Module"]),
    ("no_such_package.models:small", ["no module 'no_such_package'"]),
    ("net.py:", ["--model", "FILE.py:FACTORY"]),
    ("resnet-huge", ["--model", "tutorial-cnn"]),
])
def test_a_bad_model_factory_is_one_line(spec, words, tmp_path, capsys):
    (tmp_path / "net.py").write_text(FACTORY)
    folder = tmp_path / "r"
    code, _, err = run_main(["train", *TINY, "--model", spec.format(tmp=tmp_path), "--out", str(folder)], capsys)
    assert code == 2
    one_line(err, *words)
    assert not folder.exists()


# ---------------------------------------------------------------------------------------------
# pictures
def test_curves_of_a_one_epoch_run_draw_without_warnings(tmp_path):
    record = {"epoch": 1, "step": 2, "train_loss": 2.30695, "train_error": 0.9, "test_clean_error": 0.9,
              "test_pgd_error": 0.95, "test_verified_error": 1.0, "train_eps": 0.1, "lr": 0.0}   # fgsm: lr ends at 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves([record], tmp_path / "one.png", "one epoch")
        plot_curves([dict(record, epoch=e, lr=1e-3 * 0.5 ** e) for e in range(1, 6)], tmp_path / "five.png")
    assert (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*.tmp"))
    assert issubclass(ScheduleWarning, UserWarning)


FAKE_BENCH = '''
import argparse, json, sys
parser = argparse.ArgumentParser()
parser.add_argument("--out")
args, _ = parser.parse_known_args()
if "{name}" == "attacks":
    sys.exit(3)                                              # fails before writing anything
rows = [{{"device": "cpu", "model": m, "batch": 32, "fwd_x_plain": r, "speedup_vs_tutorial": 2 * r}}
        for m, r in (("tutorial-cnn", 2.1), ("cifar-cnn", 1.8), ("cnn7", 1.5))]
json.dump({{"results": rows}}, open(args.out, "w"))
'''


def test_bench_writes_into_a_results_folder_and_says_what_failed(tmp_path, capfd, monkeypatch):
    import matplotlib.image
    scripts = tmp_path / "benchmarks"
    scripts.mkdir()
    for name in ("bounds", "attacks"):
        (scripts / f"bench_{name}.py").write_text(FAKE_BENCH.format(name=name))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["bench", "--benchmarks-dir", str(scripts), "--device", "cpu", "--json"], capfd)
    assert code == 1, err
    printed = json.loads(out)
    assert printed["failed"] == [f"bench_attacks.py (exit code 3, bench-results/bench_attacks.json not written)"]
    assert printed["chart"] == "bench-results/bench.png" and set(printed["results"]) == {"bounds"}
    assert sorted(p.name for p in (tmp_path / "bench-results").iterdir()) == ["bench.png", "bench_bounds.json"]
    assert sorted(p.name for p in scripts.iterdir()) == ["bench_attacks.py", "bench_bounds.py"]   # nothing beside the scripts
    height, width, _ = matplotlib.image.imread(tmp_path / "bench-results" / "bench.png").shape
    assert height >= 240 and width / height <= 3.5, (width, height)
    assert err.strip().splitlines()[-1].startswith("pyibp bench: failed: bench_attacks.py (exit code 3")


def test_a_model_pyibp_cannot_bound_is_refused_before_the_run_starts(tmp_path, capsys):
    (tmp_path / "odd.py").write_text("from torch import nn\n\ndef tanh_net():\n"
                                     "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Softsign())\n")
    folder = tmp_path / "r"
    code, _, err = run_main(["train", *TINY, "--model", f"{tmp_path / 'odd.py'}:tanh_net", "--out", str(folder)],
                            capsys)
    assert code == 2
    assert "softsign" in one_line(err, "cannot be bounded").lower()   # the layer is named
    assert not folder.exists()
