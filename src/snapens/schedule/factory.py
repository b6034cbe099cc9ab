"""The scheduler for a schedule name of :data:`snapens.config.SCHEDULES`."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from snapens.config import SCHEDULE_OPTIONS, lr_min_problem
from snapens.schedule.schedulers import FGELR, SWAScheduleLR, SnapshotLR, StepDecayLR

__all__ = ["make_scheduler"]


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
    * ``single-cycle``: ``M`` cosine cycles too; :func:`snapens.engine.fit` re-initialises the model at each cycle
      start when given ``reinit_factory`` (``M`` independent models, each trained for ``T / M`` steps).
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
    unknown = sorted(set(given) - set(SCHEDULE_OPTIONS.get(schedule, ())))
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} do not apply to the {schedule!r} schedule")
    problem = lr_min_problem(schedule, lr_min)
    if problem is not None:
        raise ValueError(problem)
    if schedule in ("fge", "swa"):
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"the {schedule} schedule needs steps_per_epoch >= 1, got {steps_per_epoch!r}")
    if schedule in ("cosine-cycles", "single-cycle"):
        return SnapshotLR(optimizer, total_steps=total_steps, n_cycles=n_cycles, lr_min=lr_min, **given)
    if schedule == "step":
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
