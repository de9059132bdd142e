"""AutoAttack (Croce & Hein 2020): :func:`autoattack`, the cascade the field reports robust
accuracy with, and :class:`AutoAttackResult`, its per-attack report.

Versions, as in the original (fra31/auto-attack):

* ``standard``: APGD-CE (1 run), APGD-T (9 target classes), FAB-T (9 target classes), Square
  (5000 queries);
* ``plus``: APGD-CE and APGD-DLR (5 restarts each), FAB (untargeted, 5 restarts), Square,
  APGD-T, FAB-T;
* ``rand`` (randomised defences): APGD-CE and APGD-DLR with the gradient averaged over 20 draws
  (expectation over transformation).

Each attack runs only on the examples every earlier attack left correctly classified, and a
perturbation counts only if the model misclassifies ``x + delta`` when checked afterwards. Inside
each attack an example leaves the batch as soon as it is broken; the runs of APGD-T and FAB-T (one
per target) share one batch on accelerators, where a step of 9 x B rows costs about what one of B
rows does, and go one after the other on the CPU, where the cost grows with the rows.

Before the cascade, pyibp certifies what it can (``skip_verified``, on by default): an example
whose sound IBP or CROWN-IBP margin bounds (:mod:`pyibp.bounds.sound`: bounds of the network in
exact real arithmetic) are all positive over the l∞ box of radius eps, which contains the l2 ball
too, cannot be broken by any perturbation, so no attack runs on it. The robust error is the one
the cascade would report on every example; on certifiably trained models most of the time goes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..bounds import margin_bounds
from ..distributed import unwrap
from .apgd import run_apgd
from .common import NORMS, Bound, Domain, Eps, Evaluator, _check_choice, check_count, check_inputs, take, untouched
from .fab import run_fab
from .square import check_image, run_square

__all__ = ["autoattack", "AutoAttackResult", "AttackRecord", "VERSIONS", "ATTACKS"]

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSIONS: Dict[str, tuple] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
STEPS, TARGETS, QUERIES, EOT_DRAWS = 100, 9, 5000, 20
Progress = Callable[[str, int, int], None]


@dataclass
class AttackRecord:
    """One attack of the cascade: how many examples it broke and the robust error after it."""

    name: str
    attacked: int          # examples it ran on (those still robust before it)
    broken: int            # of those, how many it broke
    robust_error: float    # fraction of all examples misclassified clean or by any attack so far
    seconds: float


@dataclass
class AutoAttackResult:
    """What :func:`autoattack` returns.

    Attributes:
        delta: (B, *) the worst-case perturbation per example (zero where none was found), in the
            ball and the domain exactly.
        robust: (B,) bool, correctly classified at ``x`` and at every perturbation tried.
        clean_error, robust_error: fractions of the B examples.
        attacks: one :class:`AttackRecord` per attack run, in cascade order.
        verified: (B,) bool, certified robust by sound bounds before the cascade (not attacked);
            all False with ``skip_verified=False`` or where the model cannot be bounded.
        verification: how ``verified`` was decided: ``"sound ibp + crown-ibp"``, ``"sound ibp"``,
            or why nothing was (``"off"``, or the bound's refusal).
        verification_seconds: its time.
    """

    delta: Tensor
    robust: Tensor
    clean_error: float
    robust_error: float
    version: str
    norm: str
    eps: float
    attacks: List[AttackRecord] = field(default_factory=list)
    verified: Optional[Tensor] = None
    verification: str = "off"
    verification_seconds: float = 0.0

    def report(self) -> Dict[str, object]:
        """A JSON-ready summary: ``{"version", "norm", "eps", "examples", "clean_error",
        "robust_error", "verified", "verification", "verification_seconds",
        "attacks": [{"name", "attacked", "broken", "robust_error", "seconds"}]}``."""
        verified = 0 if self.verified is None else int(self.verified.sum())
        return {"version": self.version, "norm": self.norm, "eps": self.eps, "examples": int(self.robust.numel()),
                "clean_error": self.clean_error, "robust_error": self.robust_error, "verified": verified,
                "verification": self.verification, "verification_seconds": self.verification_seconds,
                "attacks": [vars(a).copy() for a in self.attacks]}


def _settings(version: str) -> Dict[str, Dict[str, object]]:
    """Per attack, the arguments of its run in this version (the original's set_version)."""
    restarts = 5 if version == "plus" else 1
    eot = EOT_DRAWS if version == "rand" else 1
    return {
        "apgd-ce": dict(kind="apgd", loss="ce", targeted=False, restarts=restarts, eot=eot),
        "apgd-dlr": dict(kind="apgd", loss="dlr", targeted=False, restarts=restarts, eot=eot),
        "apgd-t": dict(kind="apgd", loss="dlr", targeted=True, restarts=1, eot=1),
        "fab": dict(kind="fab", targeted=False, restarts=restarts),
        "fab-t": dict(kind="fab", targeted=True, restarts=1),
        "square": dict(kind="square"),
    }


def _units(setting: Dict[str, object], classes: int, steps: int, n_queries: int) -> int:
    """Progress units (steps or queries) of one batch of an attack."""
    if setting["kind"] == "square":
        return n_queries
    targets = min(TARGETS, classes - 1) if setting["targeted"] else 1
    return targets * int(setting["restarts"]) * steps


def _check_classes(names: Sequence[str], classes: int) -> None:
    needs = {"apgd-dlr": 3, "apgd-t": 4, "fab-t": 2, "fab": 2, "apgd-ce": 2, "square": 2}
    short = [n for n in names if classes < needs[n]]
    if short:
        raise ValueError(f"the model has {classes} classes; {', '.join(short)} need at least "
                         f"{max(needs[n] for n in short)} (the DLR loss divides by z_π1 - z_π3, targeted by z_π1 - "
                         f"(z_π3 + z_π4) / 2); pass attacks= without them, e.g. attacks=('apgd-ce', 'fab-t', 'square')")


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, norm: str = "linf", version: str = "standard",
               attacks: Optional[Sequence[str]] = None, lower: Bound = 0.0, upper: Bound = 1.0, seed: int = 0,
               batch_size: int = 500, steps: int = STEPS, n_queries: int = QUERIES,
               progress: Optional[Progress] = None, skip_verified: bool = True) -> AutoAttackResult:
    """AutoAttack (Croce & Hein 2020) on a batch: the worst case over the cascade of ``version``.

    Args:
        model: maps (B, *) inputs to (B, K) logits; attack it in ``eval()`` mode.
        x: (B, *) inputs in [lower, upper] (images (B, C, H, W) for Square).  y: (B,) labels.
        eps: radius, a float or a tensor of shape () or (B,).  norm: ``"linf"`` or ``"l2"``.
        version: ``"standard"``, ``"plus"`` or ``"rand"`` (see the module).
        attacks: run these instead of the version's list (any of :data:`ATTACKS`, in order).
        lower, upper: the input domain, as in :func:`pyibp.pgd`.
        seed: seeds one generator per attack (the global RNG is not touched), so results repeat.
        batch_size: examples per attack call (memory; results do not depend on it up to the
            random draws). On an accelerator APGD-T and FAB-T run their 9 targets as one batch,
            9 x batch_size rows (on the CPU one target after the other, on the examples still
            robust): lower batch_size if memory runs short.
        steps, n_queries: iterations of each APGD and FAB run, and Square's queries: the
            original's 100 and 5000 unless changed (fewer only for a quick look: it is then not AutoAttack).
        progress: called as ``progress(attack, done, total)`` after each step or query, with
            ``total`` the units of that attack (for a progress bar per attack).
        skip_verified: first certify the examples with sound IBP, then sound CROWN-IBP (see the
            module), and attack only the others. Same robust error, less time; False attacks every
            example, as the original does (to cross-check certificates against attacks, say).
            Models the bound engine cannot bound, or in training mode, are attacked in full.
    Returns:
        an :class:`AutoAttackResult`; ``result.report()`` is JSON-ready.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
        >>> x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
        >>> result = autoattack(model, x, y, 0.1, attacks=("apgd-ce", "square"))
        >>> result.robust_error >= result.clean_error
        True
    """
    _check_choice("norm", norm, NORMS)
    _check_choice("version", version, tuple(VERSIONS))
    names = tuple(attacks) if attacks is not None else VERSIONS[version]
    for name in names:
        _check_choice("attack", name, ATTACKS)
    check_count("batch_size", batch_size)
    check_count("steps", steps)
    check_count("n_queries", n_queries)
    eps_t, domain, y, _ = check_inputs(model, x, y, eps, lower, upper)
    if "square" in names:
        check_image(x, norm)
    model, x = unwrap(model), x.detach()
    settings = _settings(version)
    B = x.shape[0]
    delta = torch.zeros_like(x)
    records: List[AttackRecord] = []
    with untouched(model):
        ev = Evaluator(model)
        with torch.no_grad():
            logits = [ev.logits(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, B, batch_size)]
        clean = torch.cat(logits) if B else None      # computed once: APGD-T, FAB-T rank their targets by them
        robust = clean.argmax(1) == y if B else torch.zeros(0, dtype=torch.bool, device=x.device)
        classes = logits[0].shape[1] if B else 0
        if B:
            _check_classes(names, classes)
        clean_error = 1 - int(robust.sum()) / B if B else 0.0
        started = time.perf_counter()
        verified, verification = _certified(model, x, y, eps_t, domain, robust, batch_size) if skip_verified \
            else (torch.zeros_like(robust), "off")
        verification_seconds = time.perf_counter() - started
        for name in names:
            setting, started = settings[name], time.perf_counter()
            todo = (robust & ~verified).nonzero()[:, 0]
            chunks = [todo[i:i + batch_size] for i in range(0, todo.numel(), batch_size)]
            total, done = _units(setting, classes, steps, n_queries) * len(chunks), 0
            generator = torch.Generator(device=x.device).manual_seed(seed)

            def tick(n: int, name: str = name) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(name, done, total)

            broken = 0
            for rows in chunks:
                found = _run(setting, ev, x[rows], y[rows], take(eps_t, rows), domain.take(rows), clean[rows], norm,
                             steps, n_queries, generator, tick)
                with torch.no_grad():
                    wrong = ev.logits(x[rows] + found, y[rows]).argmax(1) != y[rows]
                delta[rows[wrong]], robust[rows[wrong]] = found[wrong], False
                broken += int(wrong.sum())
            records.append(AttackRecord(name, todo.numel(), broken, 1 - int(robust.sum()) / B if B else 0.0,
                                        time.perf_counter() - started))
    eps_value = float(eps_t) if eps_t.dim() == 0 else float(eps_t.max()) if eps_t.numel() else 0.0
    return AutoAttackResult(delta, robust, clean_error, 1 - int(robust.sum()) / B if B else 0.0, version,
                            norm, eps_value, records, verified, verification, verification_seconds)


def _certified(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, domain: Domain, todo: Tensor,
               batch_size: int) -> Tuple[Tensor, str]:
    """``(verified (B,) bool, how)``: the examples of ``todo`` whose sound IBP, then sound CROWN-IBP
    margins are all positive over the l∞ box of radius eps (which holds the l2 ball too)."""
    verified = torch.zeros_like(todo)
    if model.training:
        return verified, "skipped: the model is in training mode (its function depends on the batch)"
    how = "sound ibp + crown-ibp"
    for method in ("ibp", "crown-ibp"):
        rows = (todo & ~verified).nonzero()[:, 0]
        try:
            for chunk in rows.split(batch_size):
                if chunk.numel() == 0:
                    continue
                d = domain.take(chunk)
                with torch.no_grad():
                    m = margin_bounds(model, x[chunk], y[chunk], take(eps, chunk), lower=d.lower, upper=d.upper,
                                      method=method, sound=True)
                verified[chunk] = m.scatter(1, y[chunk, None], math.inf).amin(1) > 0
        except (TypeError, ValueError) as refusal:      # an op or dtype the sound bounds refuse, by name
            if method == "ibp":
                return verified, f"skipped: {refusal}"
            how = f"sound ibp (crown-ibp refused: {refusal})"
    return verified, how


def _run(setting: Dict[str, object], ev: Evaluator, x: Tensor, y: Tensor, eps: Tensor, domain: Domain,
         clean_logits: Tensor, norm: str, steps: int, n_queries: int, generator: torch.Generator,
         tick: Callable[[int], None]) -> Tensor:
    kind = setting["kind"]
    if kind == "apgd":
        ev.eot = int(setting["eot"])
        try:
            delta, _ = run_apgd(ev, x, y, eps, domain, norm=norm, loss=str(setting["loss"]),
                                targeted=bool(setting["targeted"]), n_target_classes=TARGETS, steps=steps,
                                restarts=int(setting["restarts"]), generator=generator, tick=tick,
                                clean_logits=clean_logits)
        finally:
            ev.eot = 1
        return delta
    if kind == "fab":
        delta, _ = run_fab(ev, x, y, eps, domain, norm=norm, targeted=bool(setting["targeted"]),
                           n_target_classes=TARGETS, steps=steps, restarts=int(setting["restarts"]),
                           generator=generator, tick=tick, clean_logits=clean_logits)
        return delta
    delta, _ = run_square(ev, x, y, eps, domain, norm=norm, n_queries=n_queries, p_init=0.8, loss="margin",
                          generator=generator, tick=tick)
    return delta
