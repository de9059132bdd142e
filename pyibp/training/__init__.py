"""Training: each method an object configured once, one epoch loop for all of them.

* :mod:`~pyibp.training.method`: :class:`Method` (``loss`` on a batch at a global step) and
  :class:`StepLoss` (what it returns).
* :mod:`~pyibp.training.loop`: :func:`train_epoch`, the one epoch loop (metrics, progress bar,
  gradient clipping, the learning-rate scheduler per step).
* :mod:`~pyibp.training.adversarial`: :class:`Standard`, :class:`PGDTraining` (Madry et al.),
  :class:`FGSMTraining` (Wong et al.).
* :mod:`~pyibp.training.certified`: :class:`IBP`, :class:`CROWNIBP` on the shared
  :class:`CertifiedTraining` step; :func:`ibp_loss`, :func:`ibp_init`, :func:`shi_regularizer`.
* :mod:`~pyibp.training.expressive`: :class:`MTLIBP`, :class:`CCIBP`, :class:`SABR`.
* :mod:`~pyibp.training.schedules`: ε/κ/β ramps (and those of a recipe), :func:`cyclic_lr`.
* :mod:`~pyibp.training.registry`: the methods by name (:func:`register` adds one).

Example:
    >>> model = ibp_init(pyibp.models.tutorial_cnn())
    >>> opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    >>> method = IBP(eps=LinearRamp(0.0, 0.1, 40, 400), kappa=LinearRamp(1.0, 0.0, 40, 400))
    >>> step = 0
    >>> for epoch in range(10):
    ...     metrics, step = train_epoch(model, method, pyibp.data.loader(train, 100, shuffle=True, seed=epoch), opt,
    ...                                 step=step, grad_clip=10.0)
"""
from .adversarial import FGSMTraining, PGDTraining, Standard
from .certified import CROWNIBP, IBP, BoundTerms, CertifiedTraining, bound_terms, ibp_init, ibp_loss, shi_regularizer
from .expressive import CCIBP, MTLIBP, SABR, ExpressiveTraining, adversarial_point, sabr_box
from .loop import train_epoch
from .method import Method, StepLoss
from .registry import METHODS, method_class, method_names, register
from .schedules import Constant, LinearRamp, Schedule, ScheduleWarning, SmoothRamp, StepList, as_schedule, cyclic_lr

__all__ = ["Method", "StepLoss", "train_epoch", "Standard", "PGDTraining", "FGSMTraining", "CertifiedTraining", "IBP",
           "CROWNIBP", "ExpressiveTraining", "MTLIBP", "CCIBP", "SABR", "BoundTerms", "bound_terms", "ibp_loss",
           "ibp_init", "shi_regularizer", "adversarial_point", "sabr_box", "METHODS", "register", "method_class",
           "method_names", "Constant", "LinearRamp", "SmoothRamp", "StepList", "Schedule", "as_schedule", "cyclic_lr",
           "ScheduleWarning"]
