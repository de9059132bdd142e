"""Adding a training method is its class and one registry line: a toy method, registered here,
trains through ``pyibp train --method NAME`` and shows in its help; the attack objects share one
calling convention, which evaluation takes as is."""
import json

import pytest
import torch
import torch.nn.functional as F

from cli_support import run_main
from pyibp.attacks import APGD, FAB, AutoAttack, Square, apgd, autoattack, fab, square
from pyibp.evaluation import evaluate
from pyibp.models import eval_mode
from pyibp.runs import TrainConfig
from pyibp.training import METHODS, Method, StepLoss, method_class, register


class NoisyInputs(Method):
    """Cross-entropy at a point drawn uniformly from the ε-box (a toy: not robust training)."""

    options = ("train_eps",)
    defaults = dict(epochs=1, lr=1e-3, ibp_init=False, grad_clip=None, reg_weight=0.0)

    def __init__(self, eps: float):
        self.eps = eps

    @classmethod
    def from_recipe(cls, config, steps_per_epoch):
        return cls(config.target_eps)

    def loss(self, model, x, y, step, generator=None):
        noise = torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1
        logits = model((x + self.eps * noise).clamp(0, 1))
        return StepLoss(F.cross_entropy(logits, y, reduction="none"), logits, values={"eps": self.eps})


@pytest.fixture
def toy():
    register("noisy-inputs", NoisyInputs)
    yield "noisy-inputs"
    del METHODS["noisy-inputs"]


def test_a_registered_method_trains_through_pyibp_train(toy, tmp_path, capsys):
    assert method_class(toy) is NoisyInputs and TrainConfig.for_method(toy).epochs == 1
    code, out, err = run_main(["train", "--method", toy, "--out", str(tmp_path / "run"), "--eps", "0.05",
                               "--train-subset", "100", "--test-subset", "20", "--batch-size", "50",
                               "--eval-pgd-steps", "0", "--device", "cpu", "--quiet", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["method"] == toy and result["final"]["epoch"] == 1
    assert result["final"]["train_eps"] == 0.05 and result["final"]["step"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["method"] == toy
    code, out, _ = run_main(["train", "--help"], capsys)
    assert code == 0 and f"{toy:<10} epochs=1" in out and "train-eps=None" in out


def test_registering_refuses_a_taken_name_and_a_class_that_is_no_method():
    with pytest.raises(ValueError, match=r"name must be a new method name .* got 'ibp'"):
        register("ibp", NoisyInputs)
    with pytest.raises(TypeError, match="subclass of pyibp.training.Method"):
        register("noise", dict)
    with pytest.raises(ValueError, match=r"method must be one of \('standard', .*got 'nope'"):
        TrainConfig.for_method("nope")


def test_attack_objects_return_the_functions_adversarial_inputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5)).eval()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 5, (6,))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    pairs = [(APGD(model, 0.1, steps=5, seed=3), lambda: apgd(model, x, y, 0.1, steps=5, generator=g())),
             (FAB(model, 0.1, steps=5, n_target_classes=2, seed=3),
              lambda: fab(model, x, y, 0.1, steps=5, n_target_classes=2, generator=g())),
             (Square(model, 0.1, n_queries=20, seed=3), lambda: square(model, x, y, 0.1, n_queries=20, generator=g())),
             (AutoAttack(model, 0.1, attacks=("apgd-ce", "square"), steps=5, n_queries=20, seed=3),
              lambda: autoattack(model, x, y, 0.1, attacks=("apgd-ce", "square"), steps=5, n_queries=20, seed=3).delta)]
    for attack, function in pairs:
        torch.testing.assert_close(attack(x, y), x + function(), rtol=0, atol=0, msg=repr(attack))
    aa = pairs[-1][0]
    assert aa.last is not None and aa.last.report()["examples"] == 6
    with eval_mode(model):
        result = evaluate(model, (x, y), attack=aa, quiet=True)
    assert result["adv_error"] == pytest.approx(aa.last.robust_error)
