"""Adversarial attacks on pyibp's fused steps.

* :func:`fgsm`, :func:`pgd`: gradient attacks in the l∞ or l2 ball, untargeted or targeted;
* :func:`apgd`: Auto-PGD (Croce & Hein 2020) on cross-entropy or DLR, untargeted or targeted
  (APGD-CE, APGD-DLR, APGD-T), its update one fused operator;
* :func:`fab`: FAB-T, the targeted minimum-norm attack (Croce & Hein 2020);
* :func:`square`: Square Attack (Andriushchenko et al. 2020), the score-based random search;
* :func:`autoattack`: the AutoAttack cascade (standard, plus, rand) with a per-attack report.

The calling convention. Each attack comes twice:

* a **function** ``attack(model, x, y, eps, **options) -> delta``: the perturbation (the
  adversarial input is ``x + delta``);
* an **attack object** configured once with its model and options — :class:`FGSM`, :class:`PGD`,
  :class:`APGD`, :class:`FAB`, :class:`Square`, :class:`AutoAttack` — and called on a batch:
  ``Attack(model, eps, **options)(x, y) -> x_adv`` (B, *), the adversarial inputs. This is what
  :func:`pyibp.evaluation.evaluate` and :func:`~pyibp.evaluation.robustness_report` take, so any
  callable ``(x, y) -> x_adv`` (:data:`Attack`), a new attack of this package or one of your
  own, is evaluated without changes there.

Either way ``|delta| <= eps`` (l∞) or ``||delta||_2 <= eps`` (l2) and ``lower <= x + delta <= upper``
hold exactly in x's dtype, as the fused steps of :mod:`pyibp.ops` guarantee.

Only the gradient with respect to ``delta`` is computed (``torch.autograd.grad``): parameters are
switched to ``requires_grad=False`` for the duration of the attack, so the backward pass skips
the weight gradients, and restored afterwards, also when the attack raises. The model's mode
(``train``/``eval``), its parameters, their ``.grad`` and its buffers are left as they were (a
model in training mode updates BatchNorm statistics on each forward: they are restored). The
model runs in the mode it is in: attack a trained model in ``eval()`` mode, since BatchNorm in
training mode would use batch statistics.

Example:
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    >>> x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    >>> delta = pgd(model, x, y, 0.1, alpha=0.01, steps=40)
    >>> x_adv = x + delta
"""
from .apgd import apgd, apgd_checkpoints
from .autoattack import ATTACKS, VERSIONS, AttackRecord, AutoAttackResult, autoattack
from .common import LOSSES, NORMS, attack_loss
from .configured import APGD, FAB, Attack, AutoAttack, Square
from .fab import fab
from .fgsm import FGSM, fgsm
from .pgd import PGD, pgd
from .square import square, square_fraction

__all__ = ["fgsm", "pgd", "FGSM", "PGD", "APGD", "FAB", "Square", "AutoAttack", "Attack", "apgd", "apgd_checkpoints",
           "fab", "square", "square_fraction", "autoattack", "AutoAttackResult", "AttackRecord", "VERSIONS", "ATTACKS", "attack_loss", "NORMS",
           "LOSSES"]
