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

Layout: :mod:`~snapens.schedule.cosine` (the cyclic cosine, the step baseline, the Keras rate),
:mod:`~snapens.schedule.cheap` (FGE, SWA), :mod:`~snapens.schedule.schedulers` (the ``LRScheduler`` classes) and
:mod:`~snapens.schedule.factory` (:func:`make_scheduler`); every public name is importable from here.
"""

from __future__ import annotations

from snapens.schedule.cheap import SWA_FACTOR, fge_cycles, fge_lr, fge_snapshot_steps, swa_lr, swa_snapshot_steps
from snapens.schedule.cosine import (
    check_lr_min,
    cosine_anneal,
    cosine_snapshot_lr,
    cosine_snapshot_steps,
    cycle_lengths,
    cycle_position,
    keras_epoch_lr,
    step_decay_lr,
)
from snapens.schedule.factory import make_scheduler
from snapens.schedule.schedulers import FGELR, SWAScheduleLR, SnapshotLR, StepDecayLR, group_peaks

__all__ = [
    "cycle_lengths",
    "cosine_snapshot_steps",
    "cycle_position",
    "cosine_anneal",
    "cosine_snapshot_lr",
    "check_lr_min",
    "step_decay_lr",
    "keras_epoch_lr",
    "fge_cycles",
    "fge_snapshot_steps",
    "fge_lr",
    "swa_snapshot_steps",
    "swa_lr",
    "SWA_FACTOR",
    "group_peaks",
    "SnapshotLR",
    "StepDecayLR",
    "FGELR",
    "SWAScheduleLR",
    "make_scheduler",
]
