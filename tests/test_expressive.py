"""The expressive losses (MTL-IBP, CC-IBP, SABR): their limits (IBP and the adversarial loss),
SABR's box, gradients, training, and their recipes (config.json, resume, presets)."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyibp
from pyibp.cli import train as train_cli
from pyibp.cli.main import _explicit_options, _subparser, build_parser, main
from pyibp.data import loader, mnist5k
from pyibp.evaluation import verify
from pyibp.runs import PRESETS, TrainConfig, read_metrics, train
from pyibp.training import CCIBP, MTLIBP, SABR, adversarial_point, ibp_loss, sabr_box, train_epoch

EXPRESSIVE = {"mtl-ibp": MTLIBP, "cc-ibp": CCIBP, "sabr": SABR}

EPS = 0.1


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


@pytest.fixture(scope="module")
def batch():
    train_set, _ = mnist5k()
    x, y = train_set.tensors
    return x[:32], y[:32]


@pytest.mark.parametrize("method", [MTLIBP, CCIBP])
def test_alpha_one_is_the_ibp_loss_and_alpha_zero_the_adversarial_loss(method, batch):
    torch.manual_seed(0)
    model, (x, y) = mlp().eval(), batch
    x_adv = adversarial_point(model, x, y, EPS, generator=torch.Generator().manual_seed(0))

    def robust(alpha):
        return method(EPS, alpha=alpha).robust_term(model, x, y, x_adv, EPS).robust

    torch.testing.assert_close(robust(1.0).mean(), ibp_loss(model, x, y, EPS, 0.0))
    adv = robust(0.0)
    torch.testing.assert_close(adv, F.cross_entropy(model(x_adv), y, reduction="none"))
    # In between: MTL-IBP is the mix of the two losses; CC-IBP's CE of mixed logits lies below it
    # (CE is convex in the logits).
    mid = robust(0.3)
    mix = 0.3 * robust(1.0) + 0.7 * adv
    if method is MTLIBP:
        torch.testing.assert_close(mid, mix)
    else:
        assert bool((mid <= mix + 1e-5).all()) and bool((mid >= adv - 1e-5).all())


def test_the_adversarial_point_lies_in_its_box_and_beats_the_clean_point(batch):
    torch.manual_seed(0)
    model, (x, y) = mlp().eval(), batch
    x_adv = adversarial_point(model, x, y, EPS, steps=1, step_scale=10.0)
    assert bool(((x_adv - x).abs() <= EPS + 1e-6).all()) and 0 <= x_adv.min() and x_adv.max() <= 1
    assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    wide = adversarial_point(model, x, y, EPS, eps_scale=2.0)
    assert (wide - x).abs().max() > EPS + 1e-3 and bool(((wide - x).abs() <= 2 * EPS + 1e-6).all())
    assert torch.equal(adversarial_point(model, x, y, 0.0), x)
    with pytest.raises(ValueError, match="step_scale"):
        adversarial_point(model, x, y, EPS, step_scale=0.0)


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.4, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("per_example", [False, True])
def test_sabr_box_lies_inside_the_eps_box_and_the_domain(lam, per_example):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 8, 8, generator=g)
    x[:, :, :2] = torch.randint(0, 2, (64, 1, 2, 8), generator=g).float()   # pixels on the domain's edges
    eps = torch.rand(64, generator=g) * 0.4 if per_example else torch.tensor(0.3)
    x_adv = x + (torch.rand(x.shape, generator=g) * 2 - 1) * 0.8      # anywhere, even far outside
    centre, tau = sabr_box(x, x_adv, eps, lam)
    e, t = (eps.view(-1, 1, 1, 1), tau.view(-1, 1, 1, 1)) if per_example else (eps, tau)
    torch.testing.assert_close(tau, eps * lam)
    low, up = (centre - t).clamp(min=0.0), (centre + t).clamp(max=1.0)
    tol = 1e-6
    assert bool((low >= x - e - tol).all()) and bool((up <= x + e + tol).all())
    assert bool((0 <= centre).all()) and bool((centre <= 1).all())
    # Where the clipped ε-box is wide enough, the small box keeps its full width 2τ.
    wide = ((x + e).clamp(max=1) - (x - e).clamp(min=0)) >= 2 * t
    torch.testing.assert_close((up - low)[wide], (2 * t).expand_as(x)[wide])
    # A point inside the allowed centres stays where it is.
    inside, _ = sabr_box(x, centre, eps, lam)
    torch.testing.assert_close(inside, centre)


def test_sabr_at_lambda_one_is_ibp(batch):
    torch.manual_seed(0)
    model, (x, y) = mlp().eval(), batch
    x_adv = adversarial_point(model, x, y, EPS)
    sabr = SABR(EPS, lam=1.0).robust_term(model, x, y, x_adv, EPS).robust.mean()
    torch.testing.assert_close(sabr, ibp_loss(model, x, y, EPS, 0.0))
    small = SABR(EPS, lam=0.2).robust_term(model, x, y, x_adv, EPS).robust.mean()
    assert small < sabr   # a smaller box: a smaller worst case


@pytest.mark.parametrize("method", EXPRESSIVE.values())
def test_gradients_are_finite_and_reach_every_parameter(method, batch):
    torch.manual_seed(0)
    model, (x, y) = pyibp.models.tutorial_cnn(), batch
    model.train()
    loss = method(EPS, 0.0, attack_steps=2, attack_step_scale=0.5).loss(model, x, y, 0).objective
    loss.backward()
    assert torch.isfinite(loss) and model.training
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and p.grad.abs().sum() > 0, name


def test_bad_options_are_named(batch):
    model, (x, y) = mlp(), batch
    with pytest.raises(ValueError, match="alpha must lie in"):
        MTLIBP(EPS, alpha=1.5)
    with pytest.raises(ValueError, match="lam must lie in"):
        sabr_box(x, x, EPS, -0.1)
    with pytest.raises(ValueError, match="pyibp.training.expressive"):
        ibp_loss(model, x, y, EPS, 0.0, method="mtl-ibp")
    with pytest.raises(ValueError, match="expressive_alpha"):
        TrainConfig.for_method("cc-ibp", expressive_alpha=2.0)
    with pytest.raises(ValueError, match="attack_step_scale"):
        SABR(EPS, attack_step_scale=0.0)
    with pytest.raises(ValueError, match="attack_steps"):
        CCIBP(EPS, attack_steps=0)


@pytest.mark.parametrize("method", EXPRESSIVE.values())
def test_each_method_trains_a_small_model_below_chance(method):
    torch.manual_seed(0)
    train_set, _ = mnist5k()
    data = torch.utils.data.TensorDataset(*(t[:400] for t in train_set.tensors))
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    step = 0
    for epoch in range(3):
        batches = loader(data, 50, shuffle=True, seed=epoch)
        metrics, step = train_epoch(model, method(0.05, 0.0, attack_steps=1), batches, opt, step=step,
                                    generator=torch.Generator().manual_seed(epoch), quiet=True)
    assert step == 24 and metrics["error"] < 0.5 and metrics["verified_error"] <= 1.0
    result = verify(model.eval(), loader(data, 200), 0.05, quiet=True)
    assert result.clean_error < 0.5


TINY = dict(epochs=2, train_subset=100, test_subset=20, batch_size=50, eval_pgd_steps=0,
            seed=3)


class Interrupt(Exception):
    pass


def _stop_after_first_epoch(line: str) -> None:
    if line.startswith("epoch   1/"):
        raise Interrupt


@pytest.mark.parametrize("method", ["sabr"])
def test_config_records_the_options_and_an_interrupted_run_resumes_to_the_same_result(method, tmp_path):
    torch.set_num_threads(1)
    config = TrainConfig.for_method(method, expressive_alpha=0.3, sabr_lambda=0.6, attack_steps=2, **TINY)
    whole, records = train(tmp_path / "whole", config, quiet=True)
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert (saved["method"], saved["expressive_alpha"], saved["sabr_lambda"], saved["attack_steps"]) == \
        (method, 0.3, 0.6, 2)
    assert TrainConfig.from_json(saved) == config
    with pytest.raises(Interrupt):
        train(tmp_path / "cut", config, quiet=True, log=_stop_after_first_epoch)
    assert len(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == 1
    _, resumed = train(tmp_path / "cut", config, resume=True, quiet=True)
    drop = ("seconds", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in drop} for r in records]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _parsed(argv):
    parser = build_parser()
    args = parser.parse_args(["train", "--out", "x", *argv])
    return train_cli._config_from_args(args, _explicit_options(_subparser(parser, "train"), argv))


def test_the_command_line_sets_the_options_and_presets_the_published_recipes():
    config = _parsed(["--method", "cc-ibp", "--expressive-alpha", "0.2", "--attack-eps-scale", "1.5",
                      "--train-eps-scale", "2"])
    assert (config.method, config.expressive_alpha, config.attack_eps_scale, config.target_eps) == \
        ("cc-ibp", 0.2, 1.5, 0.2)
    assert _parsed(["--method", "sabr"]).attack_steps == 8
    preset = _parsed(["--preset", "mtl-ibp-cifar10-2", "--epochs", "5"])
    assert (preset.method, preset.dataset, preset.model, preset.eps, preset.epochs, preset.batch_size) == \
        ("mtl-ibp", "cifar10", "cnn7", 2 / 255, 5, 128)
    assert (preset.expressive_alpha, preset.attack_steps, preset.attack_eps_scale, preset.kappa_end) == \
        (0.004, 8, 2.1, 0.0)
    assert preset.warmup_steps == 2 * 391 and preset.ramp_steps == 80 * 391 and preset.grad_clip == 10.0
    for name, values in PRESETS.items():
        values = dict(values)
        TrainConfig.for_method(values.pop("method"), **values)   # every preset is a valid recipe


def test_train_help_lists_the_methods_and_presets(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(m in out for m in EXPRESSIVE) and "sabr-cifar10-8" in out and "expressive-alpha" in out
