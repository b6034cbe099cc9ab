"""Learning-rate schedules for snapshot ensembles, counted in optimizer steps.

The pure functions (:func:`cosine_snapshot_lr`, :func:`step_decay_lr`, :func:`keras_epoch_lr`, and for the
rest of the cheap-ensemble family :func:`fge_lr` and :func:`swa_lr`) map a step to a learning rate; the
:class:`~torch.optim.lr_scheduler.LRScheduler` subclasses around them are thin, set the rate *before* the
optimizer step it applies to, and resume exactly from ``state_dict()``. Each says after which steps a snapshot
is taken (``snapshot_steps``, ``is_cycle_end()``; the functions :func:`cosine_snapshot_steps`,
:func:`fge_snapshot_steps`, :func:`swa_snapshot_steps`); for FGE and SWA their number follows from the budget.

Paper (Huang et al. 2017, Eq. 2), with 1-based iteration ``t``, budget ``T`` and ``M`` cycles::

    lr(t) = lr0 / 2 * (cos(pi * mod(t - 1, ceil(T / M)) / ceil(T / M)) + 1)

Here ``step = t - 1`` is 0-based. When ``T`` is a multiple of ``M`` our schedule is exactly Eq. 2. When it is not,
Eq. 2's ``ceil`` leaves a short last cycle (``T=13, M=4`` gives cycles of 4, 4, 4 and 1 steps, the last one a
lone step at ``lr0`` whose snapshot is barely trained). We instead split the ``T`` steps into ``M`` cycles whose
lengths differ by at most one (the first ``T mod M`` cycles are one step longer: ``4, 3, 3, 3``) and anneal each
over its own length, so every cycle starts at its peak and ends at its minimum.

Note on the last step of a cycle: Eq. 2 gives it ``lr0/2 * (1 + cos(pi * (L-1)/L))``, about
``lr0 * pi**2 / (4 L**2)``, not 0; the official Torch code shifts the phase by one step so that the last step runs
at exactly 0 and the first slightly below ``lr0``. We follow Eq. 2; the difference is one step of phase.
"""

from __future__ import annotations

import bisect
import logging
import math
import warnings
from collections.abc import Sequence

import torch  # noqa: F401  (the docstring examples use it)
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "cycle_lengths",
    "cosine_snapshot_steps",
    "cycle_bounds",
    "cycle_position",
    "cosine_snapshot_lr",
    "step_decay_lr",
    "keras_epoch_lr",
    "seed_epoch_lr",
    "fge_cycles",
    "fge_snapshot_steps",
    "fge_lr",
    "swa_snapshot_steps",
    "swa_lr",
    "SnapshotLR",
    "StepDecayLR",
    "FGELR",
    "SWAScheduleLR",
]

logger = logging.getLogger(__name__)


def _check_budget(total_steps: int, n_cycles: int) -> None:
    if isinstance(n_cycles, bool) or not isinstance(n_cycles, int) or n_cycles < 1:
        raise ValueError(f"Expected a positive integer n_cycles (M), but got {n_cycles!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < n_cycles:
        raise ValueError(
            f"Expected an integer total_steps >= n_cycles ({n_cycles}), but got {total_steps!r}: "
            "each cycle needs at least one step"
        )


def _check_lrs(lr_max: float, lr_min: float) -> None:
    if not math.isfinite(lr_min) or lr_min < 0:
        raise ValueError(f"Expected a finite lr_min >= 0, but got {lr_min!r}")
    if not math.isfinite(lr_max) or lr_max <= lr_min:
        raise ValueError(f"Expected a finite lr_max > lr_min ({lr_min!r}), but got {lr_max!r}")


def _check_mult(cycle_mult: float) -> None:
    if not (math.isfinite(cycle_mult) and cycle_mult >= 1):
        raise ValueError(f"Expected a finite cycle_mult >= 1 (each cycle at least as long as the last), but got "
                         f"{cycle_mult!r}")


def cycle_lengths(total_steps: int, n_cycles: int, cycle_mult: float = 1.0) -> list[int]:
    """Lengths of the ``M`` cycles, summing exactly to ``T``.

    With ``cycle_mult = 1``: ``T // M`` each, the first ``T mod M`` one step longer. With ``cycle_mult = r > 1``
    (timm's ``--lr-cycle-mul``) cycle ``k`` ideally lasts ``T * r**k / sum_j r**j`` steps; each gets the floor of
    that and the steps left over go one each to the cycles with the largest fractional parts (earlier cycles
    first on ties), so the lengths sum to ``T`` and each is within one step of its ideal. (With ``r = 1`` this
    is the same split.)

    Example:
        >>> cycle_lengths(13, 4)
        [4, 3, 3, 3]
        >>> cycle_lengths(70, 3, cycle_mult=2.0)
        [10, 20, 40]

    Raises:
        ValueError: a bad budget, ``cycle_mult < 1``, or a cycle that would get no step.
    """
    _check_budget(total_steps, n_cycles)
    _check_mult(cycle_mult)
    if cycle_mult == 1:
        base, extra = divmod(total_steps, n_cycles)
        return [base + 1 if k < extra else base for k in range(n_cycles)]
    weights = [cycle_mult**k for k in range(n_cycles)]
    ideal = [total_steps * w / sum(weights) for w in weights]
    lengths = [math.floor(x) for x in ideal]
    by_fraction = sorted(range(n_cycles), key=lambda k: (-(ideal[k] - lengths[k]), k))
    for k in by_fraction[:total_steps - sum(lengths)]:
        lengths[k] += 1
    if min(lengths) < 1:
        raise ValueError(f"cycle_mult={cycle_mult!r} with {n_cycles} cycles over {total_steps} steps leaves cycle "
                         f"lengths {lengths}: every cycle needs at least one step; use a smaller cycle_mult, fewer "
                         "cycles or a larger budget")
    return lengths


def cosine_snapshot_steps(total_steps: int, n_cycles: int, cycle_mult: float = 1.0) -> list[int]:
    """0-based steps after which the cyclic schedule's snapshots are taken: the last step of each cycle.

    Example:
        >>> cosine_snapshot_steps(13, 4)
        [3, 6, 9, 12]
    """
    bounds, end = [], -1
    for length in cycle_lengths(total_steps, n_cycles, cycle_mult):
        end += length
        bounds.append(end)
    return bounds


def cycle_bounds(total_steps: int, n_cycles: int, cycle_mult: float = 1.0) -> list[int]:
    """Deprecated name of :func:`cosine_snapshot_steps`."""
    warnings.warn("snapens.schedule.cycle_bounds is deprecated; use cosine_snapshot_steps", DeprecationWarning,
                  stacklevel=2)
    return cosine_snapshot_steps(total_steps, n_cycles, cycle_mult)


def cycle_position(step: int, total_steps: int, n_cycles: int, cycle_mult: float = 1.0) -> tuple[int, int, int]:
    """Locate a 0-based ``step``: returns ``(cycle, pos, length)`` with ``0 <= pos < length``.

    Steps past the budget stay in the last cycle (``pos`` clamped to its last step).
    """
    if step < 0:
        raise ValueError(f"Expected a step >= 0, but got {step!r}")
    lengths = cycle_lengths(total_steps, n_cycles, cycle_mult)
    start = 0
    for cycle, length in enumerate(lengths):
        if step < start + length:
            return cycle, step - start, length
        start += length
    return n_cycles - 1, lengths[-1] - 1, lengths[-1]


def _check_decay(cycle_decay: float) -> None:
    if not (math.isfinite(cycle_decay) and 0 < cycle_decay <= 1):
        raise ValueError(f"Expected a cycle_decay in (0, 1] (each restart's peak times this), but got "
                         f"{cycle_decay!r}")


def cosine_snapshot_lr(
    step: int,
    total_steps: int,
    n_cycles: int,
    lr_max: float,
    lr_min: float = 0.0,
    cycle_decay: float = 1.0,
    cycle_mult: float = 1.0,
) -> float:
    """Cyclic cosine learning rate at 0-based ``step`` (paper Eq. 2 with a floor and timm-style cycle shaping).

    ``lr = lr_min + (lr_max * d**k - lr_min) / 2 * (1 + cos(pi * pos / L))`` where ``k`` is the step's 0-based
    cycle, ``d`` the ``cycle_decay``, ``pos`` the step's index inside its cycle and ``L`` that cycle's length
    (see :func:`cycle_lengths`, which ``cycle_mult`` shapes). With ``lr_min = 0``, ``d = 1``, ``cycle_mult = 1``
    and ``T`` divisible by ``M`` this is exactly Eq. 2.

    Example:
        >>> cosine_snapshot_lr(0, 100, 5, 0.1)
        0.1
        >>> round(cosine_snapshot_lr(10, 100, 5, 0.1), 6)  # half-way through the first cycle of 20 steps
        0.05
        >>> round(cosine_snapshot_lr(40, 100, 5, 0.1, cycle_decay=0.5), 6)  # third cycle starts at 0.1 * 0.5**2
        0.025

    Raises:
        ValueError: bad rates or budget, ``cycle_decay`` outside (0, 1], ``cycle_mult < 1``, or a decayed peak
            at or below ``lr_min``.
    """
    _check_lrs(lr_max, lr_min)
    _check_decay(cycle_decay)
    cycle, pos, length = cycle_position(step, total_steps, n_cycles, cycle_mult)
    peak = lr_max * cycle_decay**cycle
    if peak <= lr_min:
        raise ValueError(f"cycle_decay={cycle_decay!r} brings the peak of cycle {cycle + 1} to {peak!r}, not above "
                         f"lr_min={lr_min!r}")
    return lr_min + (peak - lr_min) * 0.5 * (1.0 + math.cos(math.pi * pos / length))


def step_decay_lr(
    step: int,
    total_steps: int,
    lr_max: float,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> float:
    """The paper's single-model baseline: ``lr_max * gamma**k``, ``k`` = milestones passed.

    Milestones are fractions of the budget; step ``s`` has passed milestone ``f`` when ``s >= round(f * T)``.
    """
    if total_steps < 1:
        raise ValueError(f"Expected a positive total_steps, but got {total_steps!r}")
    if not math.isfinite(lr_max) or lr_max <= 0:
        raise ValueError(f"Expected a finite lr_max > 0, but got {lr_max!r}")
    if not 0 < gamma <= 1:
        raise ValueError(f"Expected 0 < gamma <= 1, but got {gamma!r}")
    if step < 0:
        raise ValueError(f"Expected a step >= 0, but got {step!r}")
    passed = sum(step >= round(f * total_steps) for f in milestones)
    return lr_max * gamma**passed


def keras_epoch_lr(epoch: int, n_epochs: int, n_snapshots: int, lr0: float) -> float:
    """The old Keras implementation's per-epoch rate, reproduced exactly for users who must match old results.

    ``lr = lr0 / 2 * (cos(pi * (epoch mod floor(T/M)) / floor(T/M)) + 1)`` with a 0-based ``epoch`` and ``T`` in
    epochs, set once per epoch. Unlike :func:`cosine_snapshot_lr` it is constant within an epoch, and when ``T`` is
    not a multiple of ``M`` the trailing ``T mod M`` epochs restart at ``lr0`` and are never saved.

    Example:
        >>> f"{keras_epoch_lr(39, 200, 5, 0.1):.3g}"
        '0.000154'
    """
    if n_snapshots < 1 or n_epochs < n_snapshots:
        raise ValueError(f"Expected 1 <= n_snapshots <= n_epochs, but got n_snapshots={n_snapshots!r}, "
                         f"n_epochs={n_epochs!r}")
    if epoch < 0:
        raise ValueError(f"Expected an epoch >= 0, but got {epoch!r}")
    if not math.isfinite(lr0) or lr0 <= 0:
        raise ValueError(f"Expected a finite lr0 > 0, but got {lr0!r}")
    period = n_epochs // n_snapshots
    return lr0 / 2 * (math.cos(math.pi * (epoch % period) / period) + 1)


def seed_epoch_lr(epoch: int, n_epochs: int, n_snapshots: int, lr0: float) -> float:
    """Deprecated name of :func:`keras_epoch_lr` (no random seed is involved: it is the Keras per-epoch rate)."""
    warnings.warn("snapens.schedule.seed_epoch_lr is deprecated; use keras_epoch_lr", DeprecationWarning,
                  stacklevel=2)
    return keras_epoch_lr(epoch, n_epochs, n_snapshots, lr0)


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1):
        raise ValueError(f"Expected {name} as a fraction of the budget in (0, 1), but got {value!r}")


def _check_factor(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"Expected a finite {name} > 0, but got {value!r}")


def fge_cycles(total_steps: int, cycle_steps: int, fge_start: float = 0.5) -> tuple[int, list[int]]:
    """Where FGE's cycles start and how long each is: ``(start_step, lengths)``.

    The first ``start_step = round(fge_start * T)`` steps train conventionally; the remaining ``R = T - start_step``
    steps hold ``R // c`` cycles of ``c = cycle_steps`` steps. A remainder ``R mod c`` that cannot fill a cycle is
    folded into the last cycle (its triangle is stretched over ``c + R mod c`` steps), so every step of the budget
    belongs to a cycle whose snapshot is taken. As in the paper, each cycle's model is collected at its middle:
    the second half of the last cycle (about ``c / 2`` steps back up to ``a1``) is trained but not collected, so
    the run's final weights are not a snapshot.

    Example:
        >>> fge_cycles(100, 10)
        (50, [10, 10, 10, 10, 10])
        >>> fge_cycles(103, 10)
        (52, [10, 10, 10, 10, 11])

    Raises:
        ValueError: ``fge_start`` outside (0, 1), ``cycle_steps < 2``, or a cycle longer than what is left of
            the budget after ``fge_start``.
    """
    _check_fraction("fge_start", fge_start)
    if isinstance(cycle_steps, bool) or not isinstance(cycle_steps, int) or cycle_steps < 2:
        raise ValueError(f"Expected an integer cycle_steps >= 2 (a cycle goes down and back up), but got "
                         f"{cycle_steps!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"Expected a positive integer total_steps, but got {total_steps!r}")
    start = round(fge_start * total_steps)
    remaining = total_steps - start
    if start < 1 or remaining < cycle_steps:
        raise ValueError(f"a cycle of {cycle_steps} steps is longer than the {remaining} steps left of the "
                         f"{total_steps}-step budget after fge_start={fge_start!r} ({start} steps): use a smaller "
                         "fge_start, shorter cycles or a larger budget")
    n, extra = divmod(remaining, cycle_steps)
    return start, [cycle_steps] * (n - 1) + [cycle_steps + extra]


def fge_snapshot_steps(total_steps: int, cycle_steps: int, fge_start: float = 0.5) -> list[int]:
    """0-based steps after which FGE collects a model: the ``L // 2``-th step of each cycle of ``L`` steps.

    That step has ``t = 1/2`` in the formula of :func:`fge_lr` (``L`` even) and runs at the lowest rate ``a2``; for
    an odd ``L`` it is the first of the two steps closest to ``t = 1/2``, which share the lowest rate.

    Example:
        >>> fge_snapshot_steps(100, 10)
        [54, 64, 74, 84, 94]
    """
    start, lengths = fge_cycles(total_steps, cycle_steps, fge_start)
    steps = []
    for length in lengths:
        steps.append(start + length // 2 - 1)
        start += length
    return steps


def fge_lr(
    step: int,
    total_steps: int,
    cycle_steps: int,
    lr0: float,
    fge_start: float = 0.5,
    lr1_factor: float = 0.5,
    lr2_factor: float = 0.005,
) -> float:
    """Fast Geometric Ensembling's learning rate at 0-based ``step`` (Garipov et al. 2018).

    Before ``start_step`` (:func:`fge_cycles`): the step schedule compressed into that phase,
    :func:`step_decay_lr` ``(step, start_step, lr0)`` (``lr0``, x0.1 at its half and again at three quarters).
    Then, in a cycle of ``L`` steps with 1-based position ``i``, ``t = i / L`` and the triangle of the paper::

        alpha = (1 - 2t) a1 + 2t a2        for t <= 1/2
        alpha = (2 - 2t) a2 + (2t - 1) a1  for t >  1/2

    with ``a1 = lr1_factor * lr0`` and ``a2 = lr2_factor * lr0``: the paper's 0.05 and 0.0005 for ``lr0 = 0.1``
    by default.

    Example:
        >>> fge_lr(54, 100, 10, 0.1)  # the middle of the first cycle: a2
        0.0005
    """
    if not math.isfinite(lr0) or lr0 <= 0:
        raise ValueError(f"Expected a finite lr0 > 0, but got {lr0!r}")
    _check_factor("lr1_factor", lr1_factor)
    _check_factor("lr2_factor", lr2_factor)
    if step < 0:
        raise ValueError(f"Expected a step >= 0, but got {step!r}")
    start, lengths = fge_cycles(total_steps, cycle_steps, fge_start)
    if step < start:
        return step_decay_lr(step, start, lr0)
    pos = min(step - start, total_steps - 1 - start)  # past the budget: the last step's rate
    for length in lengths[:-1]:
        if pos < length:
            break
        pos -= length
    else:
        length = lengths[-1]
    a1, a2 = lr1_factor * lr0, lr2_factor * lr0
    t = (pos + 1) / length
    if t <= 0.5:
        return (1 - 2 * t) * a1 + 2 * t * a2
    return (2 - 2 * t) * a2 + (2 * t - 1) * a1


def swa_snapshot_steps(total_steps: int, every: int, swa_start: float = 0.75) -> list[int]:
    """0-based steps after which SWA collects a model: every ``every`` steps counted back from the last step.

    The SWA phase is the steps ``>= round(swa_start * T)``. Counting back from ``T - 1`` puts the last collected
    model at the end of the budget (no trained-but-uncollected tail) and, with ``every`` = steps per epoch and
    ``T`` a whole number of epochs, a model at each epoch end of the phase.

    Example:
        >>> swa_snapshot_steps(40, 4)  # phase: steps 30..39
        [31, 35, 39]

    Raises:
        ValueError: ``swa_start`` outside (0, 1), ``every < 1``, or an SWA phase without a step.
    """
    _check_fraction("swa_start", swa_start)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"Expected an integer snapshot interval every >= 1 step, but got {every!r}")
    start = _swa_start_step(total_steps, swa_start)
    return list(range(total_steps - 1, start - 1, -every))[::-1]


def _swa_start_step(total_steps: int, swa_start: float) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"Expected a positive integer total_steps, but got {total_steps!r}")
    start = round(swa_start * total_steps)
    if not 1 <= start < total_steps:
        raise ValueError(f"swa_start={swa_start!r} of {total_steps} steps leaves {total_steps - start} steps of "
                         f"SWA after {start} steps of training: both phases need at least one step")
    return start


def swa_lr(step: int, total_steps: int, lr0: float, swa_start: float = 0.75, swa_factor: float = 0.5) -> float:
    """The SWA recipe's learning rate at 0-based ``step`` (Izmailov et al. 2018, the official training script).

    With ``S = round(swa_start * T)``, ``t = step / S`` and ``r = swa_factor`` (the SWA rate is ``r * lr0``;
    the repository's 0.05 for ``lr_init = 0.1``)::

        lr = lr0                              for t <= 0.5
        lr = lr0 * (1 - (1 - r)(t - 0.5)/0.4) for 0.5 < t <= 0.9   (linear decay to the SWA rate)
        lr = r * lr0                          for t > 0.9, and constant through the SWA phase (step >= S)

    Example:
        >>> swa_lr(0, 100, 0.1), swa_lr(80, 100, 0.1)
        (0.1, 0.05)
    """
    if not math.isfinite(lr0) or lr0 <= 0:
        raise ValueError(f"Expected a finite lr0 > 0, but got {lr0!r}")
    _check_fraction("swa_start", swa_start)
    _check_factor("swa_factor", swa_factor)
    if step < 0:
        raise ValueError(f"Expected a step >= 0, but got {step!r}")
    t = step / _swa_start_step(total_steps, swa_start)
    if t <= 0.5:
        return lr0
    if t <= 0.9:
        return lr0 * (1 - (1 - swa_factor) * (t - 0.5) / 0.4)
    return lr0 * swa_factor


class _StepwiseLR(LRScheduler):
    """Base for schedulers whose rate is a pure function of the 0-based optimizer step.

    ``last_epoch`` (PyTorch's name) counts optimizer steps here. After construction, and after each call to
    :meth:`step`, the param groups hold the rate for the *next* optimizer step, so a loop of
    ``optimizer.step(); scheduler.step()`` never runs a step at a stale rate. Each group scales from its own
    ``initial_lr`` (its peak).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        n_cycles: int,
        last_step: int = -1,
        snapshot_steps: Sequence[int] | None = None,
    ) -> None:
        # snapshot_steps: where the snapshots fall when they are not the ends of n_cycles equal cycles.
        _check_budget(total_steps, n_cycles)
        self.total_steps = total_steps
        self.n_cycles = n_cycles
        self._bounds = list(snapshot_steps) if snapshot_steps is not None else cosine_snapshot_steps(total_steps, n_cycles)
        super().__init__(optimizer, last_epoch=last_step)

    def _lr_at(self, step: int, peak: float) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        # last_epoch == k means k optimizer steps are done: the group lr is for step k (0-based).
        return [self._lr_at(self.last_epoch, peak) for peak in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def is_cycle_end(self) -> bool:
        """Whether the optimizer step just taken (index ``last_epoch``) ends a cycle: where snapshots are taken."""
        return self.last_epoch in self._bounds

    @property
    def cycle(self) -> int:
        """0-based cycle of the step the rates currently apply to (so, before ``step()``, the one just taken).

        Cycle ``k`` is the steps after snapshot ``k - 1`` up to and including snapshot ``k``'s step.
        """
        return min(bisect.bisect_left(self._bounds, self.last_epoch), len(self._bounds) - 1)

    @property
    def snapshot_steps(self) -> list[int]:
        """0-based steps after which the ``M`` snapshots are taken (:func:`cosine_snapshot_steps` for the cyclic
        schedule)."""
        return list(self._bounds)


class SnapshotLR(_StepwiseLR):
    """Cyclic cosine annealing with ``M`` restarts, stepped once per optimizer step (paper Eq. 2).

    Each param group anneals from its own initial lr (its peak ``lr_max``) to ``lr_min`` over every cycle; see
    :func:`cosine_snapshot_lr` for the formula and how a budget not divisible by ``M`` is split.

    Call ``scheduler.step()`` right after ``optimizer.step()``. Before each ``scheduler.step()``,
    :meth:`is_cycle_end` says whether the optimizer step just taken ended a cycle: take snapshot :attr:`cycle`
    then.

    Args:
        optimizer: the wrapped optimizer; its groups' ``lr`` are the peaks.
        total_steps: the budget ``T`` in optimizer steps.
        n_cycles: the number of cycles and snapshots ``M``.
        lr_min: the floor each cycle anneals to.
        last_step: the index of the last optimizer step taken, ``-1`` for a fresh run.
        cycle_decay: each restart's peak is the previous one's times this (timm's ``--lr-cycle-decay``).
        cycle_mult: each cycle this many times longer than the previous (timm's ``--lr-cycle-mul``); the
            lengths still sum to ``total_steps`` (:func:`cycle_lengths`). Both 1.0: the plain schedule.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sched = SnapshotLR(opt, total_steps=6, n_cycles=2)
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 4))
        ...     opt.step()
        ...     if sched.is_cycle_end():
        ...         lrs.append("snap")
        ...     sched.step()
        >>> lrs
        [0.1, 0.075, 0.025, 'snap', 0.1, 0.075, 0.025, 'snap']
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        n_cycles: int,
        lr_min: float = 0.0,
        last_step: int = -1,
        *,
        cycle_decay: float = 1.0,
        cycle_mult: float = 1.0,
    ) -> None:
        _check_budget(total_steps, n_cycles)
        _check_decay(cycle_decay)
        lengths = cycle_lengths(total_steps, n_cycles, cycle_mult)
        peaks = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for peak in peaks:
            _check_lrs(peak, lr_min)
            last_peak = peak * cycle_decay ** (n_cycles - 1)
            if last_peak <= lr_min:
                raise ValueError(f"cycle_decay={cycle_decay!r} brings the last cycle's peak to {last_peak!r}, not "
                                 f"above lr_min={lr_min!r}")
        self.lr_min = lr_min
        self.cycle_decay = cycle_decay
        self.cycle_mult = cycle_mult
        if min(lengths) < 2:
            # A one-step cycle runs its only step at the peak: its snapshot is never annealed.
            logger.warning("%d steps for %d cycles leaves cycles of one step, whose snapshots are taken at the "
                           "peak learning rate; use a larger budget or fewer cycles", total_steps, n_cycles)
        super().__init__(optimizer, total_steps, n_cycles, last_step,
                         snapshot_steps=cosine_snapshot_steps(total_steps, n_cycles, cycle_mult))

    def _lr_at(self, step: int, peak: float) -> float:
        return cosine_snapshot_lr(step, self.total_steps, self.n_cycles, peak, self.lr_min, self.cycle_decay,
                                  self.cycle_mult)


class StepDecayLR(_StepwiseLR):
    """The paper's single-model baseline: ``lr0``, x0.1 at 50% and again at 75% of the budget.

    Behind the same interface as :class:`SnapshotLR`: with ``n_cycles`` given, :meth:`is_cycle_end` marks the same
    steps as the cyclic schedule, which yields the paper's "NoCycle" snapshot ensemble.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        n_cycles: int = 1,
        milestones: Sequence[float] = (0.5, 0.75),
        gamma: float = 0.1,
        last_step: int = -1,
    ) -> None:
        _check_budget(total_steps, n_cycles)
        if any(not 0 < f < 1 for f in milestones):
            raise ValueError(f"Expected milestones as fractions in (0, 1), but got {list(milestones)!r}")
        for group in optimizer.param_groups:
            peak = group.get("initial_lr", group["lr"])
            if not math.isfinite(peak) or peak <= 0:
                raise ValueError(f"Expected a finite lr > 0 in every param group, but got {peak!r}")
        self.milestones = tuple(float(f) for f in milestones)
        if not 0 < gamma <= 1:
            raise ValueError(f"Expected 0 < gamma <= 1, but got {gamma!r}")
        self.gamma = gamma
        super().__init__(optimizer, total_steps, n_cycles, last_step)

    def _lr_at(self, step: int, peak: float) -> float:
        return step_decay_lr(step, self.total_steps, peak, self.milestones, self.gamma)


class FGELR(_StepwiseLR):
    """Fast Geometric Ensembling (Garipov et al. 2018): conventional training, then short triangular cycles.

    The rate is :func:`fge_lr` of each group's own initial lr; :attr:`snapshot_steps` are
    :func:`fge_snapshot_steps` (the lowest-rate step of each cycle), where :meth:`is_cycle_end` is true. The number
    of snapshots follows from the budget: ``(T - round(fge_start * T)) // cycle_steps``.

    Args:
        optimizer: the wrapped optimizer; its groups' ``lr`` are ``lr0``.
        total_steps: the budget ``T`` in optimizer steps.
        cycle_steps: the length ``c`` of a cycle in optimizer steps (the paper's 2-4 epochs, converted once).
        fge_start: fraction of the budget trained before the first cycle.
        lr1_factor, lr2_factor: ``a1`` and ``a2`` as multiples of ``lr0``.
        last_step: the index of the last optimizer step taken, ``-1`` for a fresh run.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        cycle_steps: int,
        fge_start: float = 0.5,
        lr1_factor: float = 0.5,
        lr2_factor: float = 0.005,
        last_step: int = -1,
    ) -> None:
        snaps = fge_snapshot_steps(total_steps, cycle_steps, fge_start)
        _check_factor("lr1_factor", lr1_factor)
        _check_factor("lr2_factor", lr2_factor)
        _check_peaks(optimizer)
        self.cycle_steps, self.fge_start = cycle_steps, fge_start
        self.lr1_factor, self.lr2_factor = lr1_factor, lr2_factor
        start, lengths = fge_cycles(total_steps, cycle_steps, fge_start)
        if lengths[-1] != cycle_steps:
            logger.info("FGE: %d steps after step %d do not fill whole cycles of %d; the last cycle lasts %d",
                        total_steps - start, start, cycle_steps, lengths[-1])
        super().__init__(optimizer, total_steps, len(snaps), last_step, snapshot_steps=snaps)

    def _lr_at(self, step: int, peak: float) -> float:
        return fge_lr(step, self.total_steps, self.cycle_steps, peak, self.fge_start, self.lr1_factor,
                      self.lr2_factor)


class SWAScheduleLR(_StepwiseLR):
    """The SWA recipe (Izmailov et al. 2018): decay to a constant SWA rate, models collected at a fixed interval.

    The rate is :func:`swa_lr` of each group's own initial lr; :attr:`snapshot_steps` are
    :func:`swa_snapshot_steps`, where :meth:`is_cycle_end` is true. Average the collected weights afterwards
    (``snapens average``); the number of snapshots follows from the budget.

    Args:
        optimizer: the wrapped optimizer; its groups' ``lr`` are ``lr0``.
        total_steps: the budget ``T`` in optimizer steps.
        every: steps between collected models (steps per epoch: one at each epoch end).
        swa_start: fraction of the budget before the constant SWA rate.
        swa_factor: the SWA rate as a multiple of ``lr0``.
        last_step: the index of the last optimizer step taken, ``-1`` for a fresh run.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        every: int,
        swa_start: float = 0.75,
        swa_factor: float = 0.5,
        last_step: int = -1,
    ) -> None:
        snaps = swa_snapshot_steps(total_steps, every, swa_start)
        _check_factor("swa_factor", swa_factor)
        _check_peaks(optimizer)
        self.every, self.swa_start, self.swa_factor = every, swa_start, swa_factor
        super().__init__(optimizer, total_steps, len(snaps), last_step, snapshot_steps=snaps)

    def _lr_at(self, step: int, peak: float) -> float:
        return swa_lr(step, self.total_steps, peak, self.swa_start, self.swa_factor)


def _check_peaks(optimizer: Optimizer) -> None:
    for group in optimizer.param_groups:
        peak = group.get("initial_lr", group["lr"])
        if not math.isfinite(peak) or peak <= 0:
            raise ValueError(f"Expected a finite lr > 0 in every param group, but got {peak!r}")


# ---------------------------------------------------------------------------------------- by schedule name
# (make_scheduler lived in snapens.engine, which still re-exports it)

from typing import Any  # noqa: E402  (kept with the block it serves)

__all__ += ["make_scheduler"]


def make_scheduler(
    schedule: str,
    optimizer: Optimizer,
    *,
    total_steps: int,
    n_cycles: int,
    lr_min: float = 0.0,
    steps_per_epoch: int | None = None,
    **options: Any,
) -> SnapshotLR | StepDecayLR | FGELR | SWAScheduleLR:
    """The scheduler for a schedule name of :data:`snapens.config.SCHEDULES`.

    * ``cosine-cycles``: :class:`~snapens.schedule.SnapshotLR`, ``M`` cosine cycles (the snapshot ensemble);
      ``options`` ``cycle_decay`` and ``cycle_mult`` shape them.
    * ``step``: :class:`~snapens.schedule.StepDecayLR` with snapshots at the same steps (the paper's NoCycle).
    * ``single-cycle``: ``M`` cosine cycles too; :func:`snapens.engine.fit` re-initialises the model at each cycle start when
      given ``reinit_factory`` (``M`` independent models, each trained for ``T / M`` steps).
    * ``fge``: :class:`~snapens.schedule.FGELR`; ``options`` ``cycle_epochs`` (required; converted to
      ``cycle_epochs * steps_per_epoch`` steps), ``fge_start``, ``fge_lr1`` and ``fge_lr2`` (multiples of lr0).
    * ``swa``: :class:`~snapens.schedule.SWAScheduleLR`, a snapshot every ``steps_per_epoch`` steps of the SWA
      phase; ``options`` ``swa_start`` and ``swa_lr`` (the first param group's SWA rate; the others scale with
      their lr).

    fge and swa ignore ``n_cycles``: their number of snapshots follows from the budget. Options left out or
    None take the scheduler's own (the papers') defaults.

    Raises:
        ValueError: an unknown schedule name or option, or a bad budget.
    """
    given = {k: v for k, v in options.items() if v is not None}
    allowed = {"cosine-cycles": {"cycle_decay", "cycle_mult"}, "single-cycle": {"cycle_decay", "cycle_mult"},
               "fge": {"fge_start", "cycle_epochs", "fge_lr1", "fge_lr2"}, "swa": {"swa_start", "swa_lr"}}
    unknown = sorted(set(given) - allowed.get(schedule, set()))
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} do not apply to the {schedule!r} schedule")
    if schedule in ("fge", "swa"):
        if lr_min:
            raise ValueError(f"lr_min={lr_min!r} applies to the cosine schedules, not to {schedule}")
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"the {schedule} schedule needs steps_per_epoch >= 1, got {steps_per_epoch!r}")
    if schedule in ("cosine-cycles", "single-cycle"):
        return SnapshotLR(optimizer, total_steps=total_steps, n_cycles=n_cycles, lr_min=lr_min, **given)
    if schedule == "step":
        if lr_min:
            raise ValueError(f"lr_min={lr_min!r} applies to the cosine schedules; the step schedule decays lr0 "
                             "by 10x at 50% and again at 75% of the budget")
        return StepDecayLR(optimizer, total_steps=total_steps, n_cycles=n_cycles)
    if schedule == "fge":
        if "cycle_epochs" not in given:
            raise ValueError("the fge schedule needs cycle_epochs (the length of a cycle in epochs)")
        cycle_epochs = given.pop("cycle_epochs")
        renamed = {"fge_start": "fge_start", "fge_lr1": "lr1_factor", "fge_lr2": "lr2_factor"}
        cycle_steps = int(cycle_epochs) * steps_per_epoch
        try:
            return FGELR(optimizer, total_steps=total_steps, cycle_steps=cycle_steps,
                         **{renamed[k]: v for k, v in given.items()})
        except ValueError as exc:  # say it in epochs too: that is what the user chose
            raise ValueError(f"cycle_epochs={cycle_epochs} ({cycle_steps} steps of {steps_per_epoch} per epoch), "
                             f"epochs={total_steps / steps_per_epoch:g}: {exc}") from exc
    if schedule == "swa":
        kwargs = {"swa_start": given["swa_start"]} if "swa_start" in given else {}
        if "swa_lr" in given:
            group = optimizer.param_groups[0]
            kwargs["swa_factor"] = given["swa_lr"] / group.get("initial_lr", group["lr"])
        return SWAScheduleLR(optimizer, total_steps=total_steps, every=steps_per_epoch, **kwargs)
    raise ValueError(f"unknown schedule {schedule!r}; expected cosine-cycles, step, single-cycle, fge or swa")
