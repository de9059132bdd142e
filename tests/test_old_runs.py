"""Run folders written by pyibp before the training package (tests/data/run_v0_mtl_ibp, written by
the code of commit 876beca, its numbers in expected.json) still load, evaluate, certify and resume
to the same numbers."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from pyibp.attacks import FGSM, PGD
from pyibp.data import loader
from pyibp.evaluation import evaluate, verify
from pyibp.runs import load_data, load_run, read_config, read_metrics, train

DATA = Path(__file__).resolve().parent / "data"
RUN = DATA / "run_v0_mtl_ibp"
EXPECTED = json.loads((RUN / "expected.json").read_text())


@pytest.fixture(autouse=True)
def factory_on_path(monkeypatch):
    """The run's model is the factory ``pyibp_compat_models:tiny_cnn`` of tests/data."""
    monkeypatch.syspath_prepend(str(DATA))


def _numbers(folder: Path) -> dict:
    """What expected.json records of a run folder: certify, PGD and FGSM on its test set."""
    config, model, meta = load_run(folder)
    _, test = load_data(config)
    batches = loader(test, 100)
    out = {"epoch": meta["epoch"]}
    for method in ("ibp", "crown-ibp"):
        out[f"verified_error_{method}"] = verify(model, batches, config.eps, method=method).verified_error
    settings = EXPECTED["pgd"]
    attack = PGD(model, config.eps, alpha=settings["alpha"], steps=settings["steps"], restarts=settings["restarts"],
                 random_start=settings["random_start"], generator=torch.Generator().manual_seed(settings["seed"]))
    r = evaluate(model, batches, attack=attack, quiet=True)
    out.update(clean_error=r["error"], pgd_error=r["adv_error"], pgd_loss=r["adv_loss"])
    out["fgsm_error"] = evaluate(model, batches, attack=FGSM(model, config.eps), quiet=True)["adv_error"]
    return out


def _without_timings(records):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


def _same(records, expected):
    """Equal records; the training losses (sums in float64 now, in float32 when they were written) to 1e-6."""
    assert len(records) == len(expected)
    for got, want in zip(_without_timings(records), expected):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-6) if key.endswith("_loss") else value), key


def test_an_old_run_loads_evaluates_and_certifies_to_the_numbers_it_had():
    assert _numbers(RUN) == pytest.approx(EXPECTED["at_checkpoint"], rel=1e-6)


def test_an_old_run_resumes_to_the_records_and_model_of_the_run_never_interrupted(tmp_path):
    torch.set_num_threads(1)
    folder = tmp_path / "run"
    shutil.copytree(RUN, folder)
    _same(read_metrics(folder / "metrics.jsonl"), EXPECTED["resumed_records"][:-1])
    _, records = train(folder, read_config(folder), resume=True, quiet=True)
    _same(records, EXPECTED["resumed_records"])
    assert _numbers(folder) == pytest.approx(EXPECTED["after_resume"], rel=1e-6)
