"""The :class:`~torch.optim.lr_scheduler.LRScheduler` subclasses: thin wrappers of the pure rate functions that
set the rate *before* the optimizer step it applies to and know after which steps the snapshots are taken."""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch  # noqa: F401  (the docstring examples use it)
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from snapens.schedule.cheap import (
    SWA_FACTOR,
    _check_factor,
    fge_cycles,
    fge_lr,
    fge_snapshot_steps,
    swa_lr,
    swa_snapshot_steps,
)
from snapens.schedule.cosine import (
    _check_budget,
    _check_decay,
    _check_lrs,
    cosine_snapshot_lr,
    cosine_snapshot_steps,
    cycle_lengths,
    step_decay_lr,
)

__all__ = ["FGELR", "SWAScheduleLR", "SnapshotLR", "StepDecayLR", "group_peaks"]

logger = logging.getLogger("snapens.schedule")


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
        self._snapshot_steps = (list(snapshot_steps) if snapshot_steps is not None
                                else cosine_snapshot_steps(total_steps, n_cycles))
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
        return self.last_epoch in self._snapshot_steps

    @property
    def cycle(self) -> int:
        """0-based cycle of the step the rates currently apply to (so, before ``step()``, the one just taken).

        Cycle ``k`` is the steps after snapshot ``k - 1`` up to and including snapshot ``k``'s step.
        """
        return min(bisect.bisect_left(self._snapshot_steps, self.last_epoch), len(self._snapshot_steps) - 1)

    @property
    def steps_done(self) -> int:
        """Optimizer steps taken so far (``last_epoch + 1`` until the next ``step()``): what a snapshot's ``step``
        stores (:meth:`snapens.checkpoint.SnapshotStore.save`). Read it between ``optimizer.step()`` and
        ``scheduler.step()``, as :meth:`is_cycle_end`."""
        return self.last_epoch + 1

    @property
    def snapshot_steps(self) -> list[int]:
        """0-based steps after which the ``M`` snapshots are taken (:func:`cosine_snapshot_steps` for the cyclic
        schedule)."""
        return list(self._snapshot_steps)


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
        group_peaks(optimizer)
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
    of snapshots follows from the budget, ``(R + c - c // 2) // c`` for ``R = T - round(fge_start * T)``; the last
    one is taken at the budget's last step (:func:`fge_cycles`).

    Args:
        optimizer: the wrapped optimizer; its groups' ``lr`` are ``lr0``.
        total_steps: the budget ``T`` in optimizer steps.
        cycle_steps: the length ``c`` of a cycle in optimizer steps (the paper's 2-4 epochs, converted once).
        fge_start: fraction of the budget trained before the first cycle.
        lr1_factor, lr2_factor: ``a1`` and ``a2`` as multiples of ``lr0``.
        last_step: the index of the last optimizer step taken, ``-1`` for a fresh run.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, cycle_steps: int, fge_start: float = 0.5,
                 lr1_factor: float = 0.5, lr2_factor: float = 0.005, last_step: int = -1) -> None:
        snaps = fge_snapshot_steps(total_steps, cycle_steps, fge_start)
        _check_factor("lr1_factor", lr1_factor)
        _check_factor("lr2_factor", lr2_factor)
        group_peaks(optimizer)
        self.cycle_steps, self.fge_start = cycle_steps, fge_start
        self.lr1_factor, self.lr2_factor = lr1_factor, lr2_factor
        start, _ = fge_cycles(total_steps, cycle_steps, fge_start)
        if start != round(fge_start * total_steps):
            logger.info("FGE: cycles of %d steps start at step %d, not %d: the steps that do not make another cycle "
                        "go to the conventional phase", cycle_steps, start, round(fge_start * total_steps))
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

    def __init__(self, optimizer: Optimizer, total_steps: int, every: int, swa_start: float = 0.75,
                 swa_factor: float = SWA_FACTOR, last_step: int = -1) -> None:
        snaps = swa_snapshot_steps(total_steps, every, swa_start)
        _check_factor("swa_factor", swa_factor)
        group_peaks(optimizer)
        self.every, self.swa_start, self.swa_factor = every, swa_start, swa_factor
        super().__init__(optimizer, total_steps, len(snaps), last_step, snapshot_steps=snaps)

    def _lr_at(self, step: int, peak: float) -> float:
        return swa_lr(step, self.total_steps, peak, self.swa_start, self.swa_factor)


def group_peaks(optimizer: Any) -> list[float]:
    """Each param group's peak rate: its ``initial_lr`` when a scheduler recorded one, otherwise its ``lr``.

    Raises:
        ValueError: a peak that is not a finite number > 0.
    """
    peaks = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    for peak in peaks:
        if not math.isfinite(peak) or peak <= 0:
            raise ValueError(f"Expected a finite lr > 0 in every param group, but got {peak!r}")
    return peaks
