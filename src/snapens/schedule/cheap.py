"""The rest of the cheap-ensemble family as pure functions of a 0-based step: Fast Geometric Ensembling
(Garipov et al. 2018) and the SWA recipe (Izmailov et al. 2018)."""

from __future__ import annotations

import math

from snapens.schedule.cosine import _check_rate_and_step, step_decay_lr

__all__ = ["SWA_FACTOR", "fge_cycles", "fge_lr", "fge_snapshot_steps", "swa_lr", "swa_snapshot_steps"]

#: The SWA rate as a multiple of ``lr0`` when none is given: the SWA repository's 0.05 for ``lr_init = 0.1``.
SWA_FACTOR = 0.5


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1):
        raise ValueError(f"Expected {name} as a fraction of the budget in (0, 1), but got {value!r}")


def _check_factor(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"Expected a finite {name} > 0, but got {value!r}")


def fge_cycles(total_steps: int, cycle_steps: int, fge_start: float = 0.5) -> tuple[int, list[int]]:
    """Where FGE's cycles start and how many of each cycle's steps are trained: ``(start_step, lengths)``.

    As in the paper, each cycle of ``c = cycle_steps`` steps goes from ``a1`` down to ``a2`` and back, and its model
    is collected at its middle, the lowest rate. The budget ends exactly at the last collection: the last cycle is
    trained only down to its middle (its first ``c // 2`` steps), so no step is trained without being collected.
    With ``R = T - round(fge_start * T)`` the steps after ``fge_start``, the run holds the most cycles that fit,
    ``n = (R + c - c // 2) // c`` (``(n - 1) c + c // 2 <= R``), and the steps that cannot make another cycle
    (fewer than ``c``) lengthen the conventional phase before them::

        start_step = T - (n - 1) c - c // 2,    lengths = [c] * (n - 1) + [c // 2]

    Example:
        >>> fge_cycles(100, 10)  # R = 50: n = 55 // 10 = 5, start = 100 - 40 - 5
        (55, [10, 10, 10, 10, 5])
        >>> fge_cycles(103, 10)  # round(51.5) = 52, R = 51: n = 56 // 10 = 5, start = 103 - 40 - 5
        (58, [10, 10, 10, 10, 5])

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
    half = cycle_steps // 2
    n = (remaining + cycle_steps - half) // cycle_steps
    return total_steps - (n - 1) * cycle_steps - half, [cycle_steps] * (n - 1) + [half]


def fge_snapshot_steps(total_steps: int, cycle_steps: int, fge_start: float = 0.5) -> list[int]:
    """0-based steps after which FGE collects a model: the ``c // 2``-th step of each cycle of ``c`` steps, the last
    one the budget's last step (:func:`fge_cycles`).

    That step has ``t = 1/2`` in the formula of :func:`fge_lr` (``c`` even) and runs at the lowest rate ``a2``; for
    an odd ``c`` it is the first of the two steps closest to ``t = 1/2``, which share the lowest rate.

    Example:
        >>> fge_snapshot_steps(100, 10)  # cycles from step 55: 55 + 5 - 1, then every 10
        [59, 69, 79, 89, 99]
    """
    start, lengths = fge_cycles(total_steps, cycle_steps, fge_start)
    return [start + k * cycle_steps + cycle_steps // 2 - 1 for k in range(len(lengths))]


def fge_lr(step: int, total_steps: int, cycle_steps: int, lr0: float, fge_start: float = 0.5,
           lr1_factor: float = 0.5, lr2_factor: float = 0.005) -> float:
    """Fast Geometric Ensembling's learning rate at 0-based ``step`` (Garipov et al. 2018).

    Before ``start_step`` (:func:`fge_cycles`): the step schedule compressed into that phase,
    :func:`step_decay_lr` ``(step, start_step, lr0)`` (``lr0``, x0.1 at its half and again at three quarters).
    Then, in a cycle of ``c`` steps with 1-based position ``i``, ``t = i / c`` and the triangle of the paper::

        alpha = (1 - 2t) a1 + 2t a2        for t <= 1/2
        alpha = (2 - 2t) a2 + (2t - 1) a1  for t >  1/2

    with ``a1 = lr1_factor * lr0`` and ``a2 = lr2_factor * lr0``: the paper's 0.05 and 0.0005 for ``lr0 = 0.1``
    by default. The last cycle ends at its middle, with the budget; past the budget the rate stays the last step's.

    Example:
        >>> fge_lr(59, 100, 10, 0.1)  # the middle of the first cycle (steps 55..64): a2
        0.0005
    """
    _check_rate_and_step("lr0", lr0, step)
    _check_factor("lr1_factor", lr1_factor)
    _check_factor("lr2_factor", lr2_factor)
    start, _ = fge_cycles(total_steps, cycle_steps, fge_start)
    if step < start:
        return step_decay_lr(step, start, lr0)
    pos = min(step, total_steps - 1) - start
    a1, a2 = lr1_factor * lr0, lr2_factor * lr0
    t = (pos % cycle_steps + 1) / cycle_steps
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


def swa_lr(step: int, total_steps: int, lr0: float, swa_start: float = 0.75,
           swa_factor: float = SWA_FACTOR) -> float:
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
    _check_rate_and_step("lr0", lr0, step)
    _check_fraction("swa_start", swa_start)
    _check_factor("swa_factor", swa_factor)
    t = step / _swa_start_step(total_steps, swa_start)
    if t <= 0.5:
        return lr0
    if t <= 0.9:
        return lr0 * (1 - (1 - swa_factor) * (t - 0.5) / 0.4)
    return lr0 * swa_factor
