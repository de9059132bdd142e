"""The ``pyibp`` command end to end, in subprocesses, on tiny budgets.

One small IBP run (3 epochs of 4 steps) is trained once per module; the other commands read it.
The resume test kills a second copy of the same run with SIGKILL in the middle of its second
epoch, resumes it, and requires the same metrics and weights as the uninterrupted run.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_support import ENV, REPO, run_main

TINY = ["--method", "ibp", "--epochs", "3", "--train-subset", "200", "--test-subset", "100", "--batch-size", "50",
        "--warmup-steps", "2", "--ramp-steps", "4", "--eval-pgd-steps", "2", "--eval-pgd-subset", "100",
        "--device", "cpu", "--seed", "1"]
TIMING = ("seconds", "eval_seconds")


def pyibp(*args: str, check: bool = True, env: dict = ENV, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pyibp ARGS`` in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "pyibp", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pyibp {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def slow_pyibp(delay: float, *args: str) -> list:
    """The command line of ``pyibp ARGS`` pausing ``delay`` seconds after every training batch."""
    return [sys.executable, str(REPO / "tests" / "slow_pyibp.py"), str(delay), *args]


def metrics(folder: Path):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny IBP run and the JSON its `train --json` printed."""
    folder = tmp_path_factory.mktemp("runs") / "ibp"
    proc = pyibp("train", *TINY, "--out", str(folder), "--json")
    return folder, json.loads(proc.stdout)


def test_train_writes_a_run_folder(run):
    folder, printed = run
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "config.json", "curves.png", "metrics.jsonl"]
    config = json.loads((folder / "config.json").read_text())
    assert config["method"] == "ibp" and config["epochs"] == 3 and config["train_subset"] == 200
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [4, 8, 12]            # 200 examples / batch 50
    for r in records:
        for key in ("train_loss", "train_error", "test_clean_error", "test_pgd_error", "test_verified_error"):
            assert 0 <= r[key] < float("inf"), key
        # the same 100 test examples: PGD cannot break what IBP verified
        assert r["test_clean_error"] <= r["test_pgd_error"] <= r["test_verified_error"]
        assert r["seconds"] > 0 and r["lr"] > 0
    # warm-up of 2 steps at ε = 0, then a ramp over 4 steps to 0.1
    assert records[0]["train_eps"] < records[1]["train_eps"] == records[2]["train_eps"] == pytest.approx(0.1)
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and state["step"] == 12
    assert {"model", "optimizer", "scheduler", "rng", "config"} <= set(state)
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert printed["final"]["epoch"] == 3 and printed["run"] == str(folder)


def test_resume_after_sigkill_mid_epoch_matches_uninterrupted_run(run, tmp_path):
    reference, _ = run
    folder = tmp_path / "killed"
    proc = subprocess.Popen(slow_pyibp(0.4, "train", *TINY, "--out", str(folder)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        # The epoch line is printed after the checkpoint is written; then epoch 2 starts.
        for line in proc.stdout:
            if line.startswith("epoch   1/3"):
                break
        else:
            raise AssertionError(f"the run ended without finishing epoch 1: {proc.stderr.read()}")
        time.sleep(1.0)  # a couple of epoch 2's batches (0.4 s each of 4)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len(metrics(folder)) == 1

    resumed = pyibp("train", *TINY, "--out", str(folder), "--resume")
    assert "resuming" in resumed.stdout
    assert metrics(folder) == metrics(reference)
    ours = torch.load(folder / "checkpoint.pt", weights_only=True)
    theirs = torch.load(reference / "checkpoint.pt", weights_only=True)
    for name, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][name], tensor), name


def test_eval_and_certify_write_json_into_the_run(run):
    folder, _ = run
    pgd = json.loads(pyibp("eval", str(folder), "--attack", "pgd", "--steps", "5", "--restarts", "2",
                           "--device", "cpu", "--json").stdout)
    assert pgd["examples"] == 100 and pgd["restarts"] == 2 and pgd["random_start"] is True
    assert 0 <= pgd["clean_error"] <= pgd["adv_error"] <= 1
    fgsm = pyibp("eval", str(folder), "--attack", "fgsm", "--device", "cpu")
    assert "error under attack" in fgsm.stdout and "fgsm eps=0.1" in fgsm.stdout
    saved = json.loads((folder / "eval.json").read_text())["results"]
    assert len(saved) == 2 and {r["attack"] for r in saved.values()} == {"pgd", "fgsm"}

    aa = json.loads(pyibp("eval", str(folder), "--attack", "autoattack", "--steps", "5", "--queries", "20",
                          "--device", "cpu", "--json").stdout)
    assert [a["name"] for a in aa["attacks"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa["clean_error"] == pgd["clean_error"] <= aa["robust_error"] == aa["attacks"][-1]["robust_error"]
    assert "autoattack-standard steps=5 queries=20 eps=0.1" in json.loads((folder / "eval.json").read_text())["results"]

    cert = json.loads(pyibp("certify", str(folder), "--method", "ibp", "crown-ibp", "--device", "cpu",
                            "--json").stdout)["results"]
    ibp, crown = cert["ibp"], cert["crown-ibp"]
    assert ibp["clean_error"] == crown["clean_error"] == pgd["clean_error"]
    # Sound bounds: nothing verified is broken by PGD, and CROWN-IBP is never looser than IBP.
    assert pgd["adv_error"] <= crown["verified_error"] <= ibp["verified_error"]
    assert set(json.loads((folder / "certify.json").read_text())["results"]) == {"ibp eps=0.1", "crown-ibp eps=0.1"}
    both = json.loads(pyibp("certify", str(folder), "--method", "ibp", "--autoattack", "--test-subset", "20",
                            "--device", "cpu", "--json").stdout)["results"]
    aa_ibp = both["autoattack"]
    assert aa_ibp["verified_but_broken"] == {"ibp": 0}
    assert aa_ibp["clean_error"] <= aa_ibp["robust_error"] <= both["ibp"]["verified_error"]
    small = json.loads(pyibp("certify", str(folder), "--method", "ibp", "--eps", "0", "--device", "cpu",
                             "--json").stdout)["results"]["ibp"]
    assert small["verified_error"] == small["clean_error"]      # at ε = 0 verified means correct


def test_certify_sound_records_the_kind_of_certificate(run, capsys):
    folder, _ = run
    code, out, _ = run_main(["certify", str(folder), "--sound", "--device", "cpu", "--json"], capsys)
    results = json.loads(out)["results"]
    assert code == 0 and set(results) == {"ibp", "crown-ibp"}
    saved = json.loads((folder / "certify.json").read_text())["results"]
    for method, sound in results.items():
        assert sound["sound"] is True and sound["certificate"] == "exact real arithmetic"
        assert saved[f"{method} eps=0.1 sound"]["sound"] is True
        if f"{method} eps=0.1" in saved:      # a sound certificate is never stronger than the float one
            assert sound["verified_error"] >= saved[f"{method} eps=0.1"]["verified_error"]
    assert results["crown-ibp"]["verified_error"] <= results["ibp"]["verified_error"]


def test_certify_with_crown_and_alpha_crown_records_method_steps_and_time(run, capsys):
    folder, _ = run
    code, out, _ = run_main(["certify", str(folder), "--method", "crown-ibp", "crown", "alpha-crown",
                             "--alpha-steps", "3", "--test-subset", "4", "--device", "cpu", "--json"], capsys)
    results = json.loads(out)["results"]
    assert code == 0 and list(results) == ["crown-ibp", "crown", "alpha-crown"]
    assert (results["alpha-crown"]["verified_error"] <= results["crown"]["verified_error"]
            <= results["crown-ibp"]["verified_error"])
    saved = json.loads((folder / "certify.json").read_text())["results"]["alpha-crown eps=0.1"]
    assert saved["method"] == "alpha-crown" and saved["steps"] == 3 and saved["seconds"] > 0
    code, _, err = run_main(["certify", str(folder), "--method", "alpha-crown", "--alpha-steps", "-1"], capsys)
    assert code == 2 and "steps must be an integer >= 0, got -1" in err
    code, out, _ = run_main(["certify", str(folder), "--method", "alpha-crown", "bab", "--alpha-steps", "3",
                             "--timeout", "2", "--test-subset", "3", "--device", "cpu", "--json"], capsys)
    complete = json.loads(out)["results"]["bab"]
    assert code == 0 and complete["verified"] + complete["falsified"] + complete["unknown"] == 3
    assert complete["verified_error"] <= json.loads(out)["results"]["alpha-crown"]["verified_error"]


def test_landscape_draws_the_runs_side_by_side(run, tmp_path):
    folder, _ = run
    out = tmp_path / "loss.png"
    printed = json.loads(pyibp("landscape", str(folder), str(folder), "--out", str(out), "--points", "7",
                               "--device", "cpu", "--json").stdout)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first, second = printed["runs"]
    assert first == second                                       # same model, same directions
    assert 0 <= first["loss_at_x"] <= first["max_loss"] <= printed["z_range"][1]


def test_bench_runs_the_scripts_and_charts_the_ratios(tmp_path):
    printed = json.loads(pyibp("bench", "--only", "bounds", "--bench-args",
                               "--models tutorial-cnn --batches 1 --repeats 2", "--results-dir", str(tmp_path),
                               "--device", "cpu", "--json").stdout)
    assert printed["failed"] == []
    rows = printed["results"]["bounds"]["results"]
    assert {r["method"] for r in rows} == {"plain", "tutorial", "pyibp"}
    assert Path(printed["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "bench_bounds.json").exists()


def test_reproduce_prints_the_tutorials_tables(tmp_path):
    out = tmp_path / "repro"
    args = ["reproduce", "--epochs", "1", "--train-subset", "100", "--test-subset", "20", "--restarts", "2",
            "--autoattack-examples", "5",
            "--tutorial-recipe", "--out", str(out), "--device", "cpu"]
    proc = pyibp(*args)
    for text in ("published (tutorial, MNIST)", "tutorial recipe (mnist-5k, 20 test images)", "0.85", "2.83",
                 "5.15", "9.67", "PGD-40, random start, 2 restarts", "AutoAttack (standard), first 5 images",
                 "PGD-40, α = ε/10, first 5 images (AutoAttack's)", "CROWN-IBP-verified"):
        assert text in proc.stdout, text
    report = json.loads((out / "reproduce.json").read_text())
    assert set(report["runs"]) == {"standard", "pgd", "certified", "tutorial-standard", "tutorial-pgd",
                                   "tutorial-certified"}
    assert report["runs"]["tutorial-pgd"]["config"]["optimizer"] == "sgd"
    for name, entry in report["runs"].items():
        r = entry["results"]
        attacked = max(r["fgsm"], r["pgd40"], r["pgd40_small"], r["pgd40_random"])
        assert 0 <= r["clean"] <= min(r["fgsm"], r["pgd40"]) and attacked <= r["crown-ibp"] <= r["ibp"] <= 1, name
        assert 0 <= r["pgd40_autoattack_examples"] <= 1 and 0 <= r["autoattack"] <= 1, name   # like with like
    # The runs exist now: without --resume or --overwrite they are not touched.
    again = pyibp(*args, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr


# ---------------------------------------------------------------------------------------------
# errors: one line, exit code 2
@pytest.mark.parametrize("argv, words", [
    (["train", "--out", "x", "--eps", "-0.1"], ["--eps", ">= 0"]),
    (["train", "--out", "x", "--dataset", "imagenet"], ["--dataset", "imagenet"]),
    (["train", "--out", "x", "--resume", "--overwrite"], ["--overwrite", "--resume"]),
    (["train", "--out", "x", "--kappa-end", "1.5"], ["--kappa-end", "[0, 1]"]),
    (["train", "--out", "x", "--amp", "fp16"], ["--amp", "fp16"]),
    (["eval", "/nonexistent/run"], ["/nonexistent/run", "no run"]),
    (["landscape", "/nonexistent/run", "--points", "1"], ["--points", ">= 2"]),
    (["bench", "--benchmarks-dir", "/nonexistent"], ["/nonexistent", "--benchmarks-dir"]),
])
def test_bad_arguments_give_one_line_and_exit_code_2(argv, words, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)


def test_existing_run_is_not_overwritten_and_resume_keeps_its_recipe(run, capsys):
    folder, _ = run
    before = (folder / "metrics.jsonl").read_text()
    code, _, err = run_main(["train", *TINY, "--out", str(folder)], capsys)
    assert code == 2 and "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(["train", *TINY, "--out", str(folder), "--resume", "--lr", "0.1"], capsys)
    assert code == 2 and "--lr" in err and "0.1" in err
    assert (folder / "metrics.jsonl").read_text() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(run, capsys):
    code, _, err = run_main(["certify", str(run[0]), "--device", "cuda"], capsys)
    assert code == 2 and "--device cpu" in err


def test_missing_data_set_names_the_folder_without_a_traceback(tmp_path):
    proc = pyibp("train", "--dataset", "mnist", "--data-dir", "/nonexistent/data", "--out", str(tmp_path / "r"),
                 "--device", "cpu", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "/nonexistent/data" in lines[0] and "--download" in lines[0]


@pytest.mark.parametrize("command", ["train", "eval", "certify", "landscape", "bench", "reproduce"])
def test_help_shows_defaults(command, capsys):
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0 and "--device" in out and "--seed" in out and "default:" in out


# ---------------------------------------------------------------------------------------------
# the pieces of a run folder, in this process
def test_rng_states_survive_a_checkpoint_round_trip(tmp_path):
    import random

    import numpy as np

    from pyibp.runs import load_checkpoint, rng_state, save_checkpoint, set_rng_state

    def draw():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    save_checkpoint(tmp_path / "c.pt", {"format": 1, "rng": rng_state()})
    first = draw()
    assert draw() != first
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])      # torch.load(weights_only=True)
    assert draw() == first


def test_metrics_are_cut_back_to_the_checkpoint_and_torn_lines_dropped(tmp_path):
    from pyibp.runs import append_metrics, read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    for epoch in (1, 2, 3):
        append_metrics(path, {"epoch": epoch})
    with open(path, "a") as f:
        f.write('{"epoch": 4, "train_lo')                           # killed while writing
    assert [r["epoch"] for r in read_metrics(path)] == [1, 2, 3]
    assert [r["epoch"] for r in truncate_metrics(path, 2)] == [1, 2]
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]   # no temporary file left behind


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from pyibp.runs import atomic_write

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_recipe_defaults_and_configs_written_before_an_option_existed():
    from pyibp.runs import TrainConfig
    assert TrainConfig.for_method("crown-ibp").loss_fusion
    assert not TrainConfig.for_method("ibp").loss_fusion
    assert TrainConfig.for_method("ibp").bn_stats == "batch"
    with pytest.raises(ValueError, match=r"loss_fusion must be False unless the method reads it \(method 'ibp'"):
        TrainConfig.for_method("ibp", loss_fusion=True)
    old = TrainConfig.for_method("crown-ibp").to_json()
    del old["loss_fusion"], old["bn_stats"]
    resumed = TrainConfig.from_json(old)   # an earlier pyibp's run trained the margins, running statistics
    assert (resumed.loss_fusion, resumed.bn_stats) == (False, "running")
