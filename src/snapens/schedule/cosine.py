"""The cyclic cosine schedule of snapshot ensembles (paper Eq. 2), the step baseline and the Keras per-epoch rate.

Pure functions of a 0-based optimizer step (:mod:`snapens.schedule` explains the formula and how a budget not
divisible by ``M`` is split).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "check_lr_min",
    "cosine_anneal",
    "cosine_snapshot_lr",
    "cosine_snapshot_steps",
    "cycle_lengths",
    "cycle_position",
    "keras_epoch_lr",
    "step_decay_lr",
]


def _check_budget(total_steps: int, n_cycles: int) -> None:
    if isinstance(n_cycles, bool) or not isinstance(n_cycles, int) or n_cycles < 1:
        raise ValueError(f"Expected a positive integer n_cycles (M), but got {n_cycles!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < n_cycles:
        raise ValueError(
            f"Expected an integer total_steps >= n_cycles ({n_cycles}), but got {total_steps!r}: "
            "each cycle needs at least one step"
        )


def check_lr_min(lr_min: float) -> None:
    """The floor of a cosine schedule: a finite number >= 0, or a ValueError saying so."""
    if isinstance(lr_min, bool) or not isinstance(lr_min, (int, float)) or not math.isfinite(lr_min) or lr_min < 0:
        raise ValueError(f"Expected a finite lr_min >= 0, but got {lr_min!r}")


def _check_lrs(lr_max: float, lr_min: float) -> None:
    check_lr_min(lr_min)
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
    return cosine_anneal(pos, length, peak, lr_min)


def cosine_anneal(pos: int, length: int, peak: float, lr_min: float = 0.0) -> float:
    """The rate at 0-based position ``pos`` of a cycle of ``length`` steps: the one cosine of every schedule here.

    ``lr = lr_min + (peak - lr_min) / 2 * (1 + cos(pi * pos / length))``: ``peak`` at ``pos = 0``, falling towards
    ``lr_min`` (reached at ``pos = length``, one step past the cycle). No checks: callers validated the cycle.
    """
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
    _check_rate_and_step("lr_max", lr_max, step)
    if not 0 < gamma <= 1:
        raise ValueError(f"Expected 0 < gamma <= 1, but got {gamma!r}")
    passed = sum(step >= round(f * total_steps) for f in milestones)
    return lr_max * gamma**passed


def _check_rate_and_step(name: str, rate: float, step: int) -> None:
    """A rate function's peak ``name`` (finite, > 0) and its 0-based ``step`` (>= 0)."""
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"Expected a finite {name} > 0, but got {rate!r}")
    if step < 0:
        raise ValueError(f"Expected a step >= 0, but got {step!r}")


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
