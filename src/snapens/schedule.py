"""Learning-rate schedules for snapshot ensembles, counted in optimizer steps.

The pure functions (:func:`cosine_snapshot_lr`, :func:`step_decay_lr`, :func:`seed_epoch_lr`) map a step to a
learning rate; the :class:`~torch.optim.lr_scheduler.LRScheduler` subclasses around them are thin, set the rate
*before* the optimizer step it applies to, and resume exactly from ``state_dict()``.

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

import logging
import math
from collections.abc import Sequence

import torch  # noqa: F401  (the docstring examples use it)
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "cycle_lengths",
    "cycle_bounds",
    "cycle_position",
    "cosine_snapshot_lr",
    "step_decay_lr",
    "seed_epoch_lr",
    "SnapshotLR",
    "StepDecayLR",
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


def cycle_lengths(total_steps: int, n_cycles: int) -> list[int]:
    """Lengths of the ``M`` cycles: ``T // M`` each, the first ``T mod M`` one step longer.

    Example:
        >>> cycle_lengths(13, 4)
        [4, 3, 3, 3]
    """
    _check_budget(total_steps, n_cycles)
    base, extra = divmod(total_steps, n_cycles)
    return [base + 1 if k < extra else base for k in range(n_cycles)]


def cycle_bounds(total_steps: int, n_cycles: int) -> list[int]:
    """0-based step index of the last step of each cycle: where snapshot ``k`` is taken (after that step).

    Example:
        >>> cycle_bounds(13, 4)
        [3, 6, 9, 12]
    """
    bounds, end = [], -1
    for length in cycle_lengths(total_steps, n_cycles):
        end += length
        bounds.append(end)
    return bounds


def cycle_position(step: int, total_steps: int, n_cycles: int) -> tuple[int, int, int]:
    """Locate a 0-based ``step``: returns ``(cycle, pos, length)`` with ``0 <= pos < length``.

    Steps past the budget stay in the last cycle (``pos`` clamped to its last step).
    """
    if step < 0:
        raise ValueError(f"Expected a step >= 0, but got {step!r}")
    lengths = cycle_lengths(total_steps, n_cycles)
    start = 0
    for cycle, length in enumerate(lengths):
        if step < start + length:
            return cycle, step - start, length
        start += length
    return n_cycles - 1, lengths[-1] - 1, lengths[-1]


def cosine_snapshot_lr(step: int, total_steps: int, n_cycles: int, lr_max: float, lr_min: float = 0.0) -> float:
    """Cyclic cosine learning rate at 0-based ``step`` (paper Eq. 2 with a floor).

    ``lr = lr_min + (lr_max - lr_min) / 2 * (1 + cos(pi * pos / L))`` where ``pos`` is the step's index inside its
    cycle and ``L`` that cycle's length (see :func:`cycle_lengths`). With ``lr_min = 0`` and ``T`` divisible by
    ``M`` this is exactly Eq. 2.

    Example:
        >>> cosine_snapshot_lr(0, 100, 5, 0.1)
        0.1
        >>> round(cosine_snapshot_lr(10, 100, 5, 0.1), 6)  # half-way through the first cycle of 20 steps
        0.05
    """
    _check_lrs(lr_max, lr_min)
    _, pos, length = cycle_position(step, total_steps, n_cycles)
    return lr_min + (lr_max - lr_min) * 0.5 * (1.0 + math.cos(math.pi * pos / length))


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


def seed_epoch_lr(epoch: int, n_epochs: int, n_snapshots: int, lr0: float) -> float:
    """The old Keras implementation's per-epoch rate, reproduced exactly for users who must match old results.

    ``lr = lr0 / 2 * (cos(pi * (epoch mod floor(T/M)) / floor(T/M)) + 1)`` with a 0-based ``epoch`` and ``T`` in
    epochs, set once per epoch. Unlike :func:`cosine_snapshot_lr` it is constant within an epoch, and when ``T`` is
    not a multiple of ``M`` the trailing ``T mod M`` epochs restart at ``lr0`` and are never saved.

    Example:
        >>> f"{seed_epoch_lr(39, 200, 5, 0.1):.3g}"
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


class _StepwiseLR(LRScheduler):
    """Base for schedulers whose rate is a pure function of the 0-based optimizer step.

    ``last_epoch`` (PyTorch's name) counts optimizer steps here. After construction, and after each call to
    :meth:`step`, the param groups hold the rate for the *next* optimizer step, so a loop of
    ``optimizer.step(); scheduler.step()`` never runs a step at a stale rate. Each group scales from its own
    ``initial_lr`` (its peak).
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, n_cycles: int, last_step: int = -1) -> None:
        _check_budget(total_steps, n_cycles)
        self.total_steps = total_steps
        self.n_cycles = n_cycles
        self._bounds = cycle_bounds(total_steps, n_cycles)
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
        """0-based cycle of the step the rates currently apply to (so, before ``step()``, the one just taken)."""
        return cycle_position(self.last_epoch, self.total_steps, self.n_cycles)[0]

    @property
    def snapshot_steps(self) -> list[int]:
        """0-based steps after which the ``M`` snapshots are taken (:func:`cycle_bounds`)."""
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
    ) -> None:
        _check_budget(total_steps, n_cycles)
        peaks = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for peak in peaks:
            _check_lrs(peak, lr_min)
        self.lr_min = lr_min
        if total_steps // n_cycles < 2:
            # A one-step cycle runs its only step at the peak: its snapshot is never annealed.
            logger.warning("%d steps for %d cycles leaves cycles of one step, whose snapshots are taken at the "
                           "peak learning rate; use a larger budget or fewer cycles", total_steps, n_cycles)
        super().__init__(optimizer, total_steps, n_cycles, last_step)

    def _lr_at(self, step: int, peak: float) -> float:
        return cosine_snapshot_lr(step, self.total_steps, self.n_cycles, peak, self.lr_min)


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
