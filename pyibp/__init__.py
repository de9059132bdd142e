"""pyibp: fast interval bound propagation, attacks and certified training for PyTorch.

The public API::

    lb, ub = pyibp.interval_bounds(model, x, eps)          # bounds on every logit
    margins = pyibp.margin_bounds(model, x, y, eps)        # lower bounds of logit_y - logit_j
    margins = pyibp.margin_bounds(model, x, y, eps, method="alpha-crown")   # tighter: CROWN, alpha-CROWN
    low = pyibp.spec_bounds(model, lower, upper, C, d)      # any C f(x) + d over any box
    ce = pyibp.crown_ibp_robust_ce(model, x, y, eps)       # upper bounds of the worst-case cross-entropy
    delta = pyibp.pgd(model, x, y, eps, alpha=0.01, steps=40)   # an attack inside the same box
    result = pyibp.autoattack(model, x, y, eps)            # AutoAttack standard, with a per-attack report
    pyibp.evaluate(model, loader, attack=pyibp.attacks.PGD(model, eps, alpha=0.01, steps=40))["adv_error"]
    metrics, step = pyibp.training.train_epoch(model, pyibp.training.IBP(eps=0.1), loader, optimizer)
"""
from . import attacks, bounds, data, distributed, evaluation, models, nn, ops, training
from .attacks import apgd, autoattack, fab, fgsm, pgd, square
from .bounds import (SUPPORTED_LAYERS, AlphaOptions, batch_statistics, bound_graph, crown_ibp_margin_bounds,
                     crown_ibp_robust_ce, interval_bounds, margin_bounds, spec_bounds)
from .evaluation import evaluate, robustness_report, verify

__version__ = "0.1.0"

__all__ = ["interval_bounds", "margin_bounds", "spec_bounds", "AlphaOptions", "crown_ibp_margin_bounds",
           "crown_ibp_robust_ce", "fgsm", "pgd", "apgd", "fab", "square", "autoattack",
           "evaluate", "verify", "robustness_report", "bound_graph", "batch_statistics", "SUPPORTED_LAYERS",
           "attacks", "bounds", "data", "distributed", "evaluation", "models", "nn", "ops", "training", "__version__"]
