"""The part the Lightning and ``transformers`` callbacks share: the schedule over a step budget, and saving.

Neither framework is imported here. A :class:`SnapshotPlan` is fixed once the budget ``T`` (optimizer steps) is
known; the rate of 0-based step ``s`` for a param group whose peak is ``lr0`` is
:func:`snapens.schedule.cosine_snapshot_lr` ``(s, T, M, lr0, lr_min)``, and snapshot ``k`` (1-based) is due after
step ``cosine_snapshot_steps(T, M)[k - 1]``.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from snapens.checkpoint import SnapshotStore
from snapens.schedule import check_lr_min, cosine_anneal, cosine_snapshot_steps

logger = logging.getLogger(__name__)


def check_callback_args(n_snapshots: int, dirpath: str | os.PathLike[str], lr_min: float) -> Path:
    """Validate the arguments both callbacks take; returns ``dirpath`` as a :class:`~pathlib.Path`."""
    if isinstance(n_snapshots, bool) or not isinstance(n_snapshots, int) or n_snapshots < 1:
        raise ValueError(f"Expected an integer n_snapshots (M) >= 1, but got {n_snapshots!r}")
    check_lr_min(lr_min)
    if not isinstance(dirpath, (str, os.PathLike)) or not os.fspath(dirpath):
        raise ValueError(f"Expected a folder path for dirpath, but got {dirpath!r}")
    return Path(dirpath)


def check_budget(total_steps: float, n_snapshots: int, where: str) -> int:
    """The step budget as an int; ValueError when it is unknown, infinite or smaller than ``M``."""
    if total_steps is None or not math.isfinite(total_steps) or total_steps < 1:
        raise ValueError(
            f"SnapshotCallback needs a finite training budget in optimizer steps, but {where} is {total_steps!r}: "
            "set max_epochs or max_steps"
        )
    total = int(total_steps)
    if total < n_snapshots:
        raise ValueError(
            f"SnapshotCallback(n_snapshots={n_snapshots}) needs at least {n_snapshots} optimizer steps, one per "
            f"cycle, but {where} is {total}: train longer or use fewer snapshots"
        )
    if total // n_snapshots < 2:
        logger.warning("%d steps for %d cycles leaves cycles of one step, whose snapshots are taken at the peak "
                       "learning rate; train longer or use fewer snapshots", total, n_snapshots)
    return total


@dataclass
class SnapshotPlan:
    """``M`` cycles over ``total_steps`` optimizer steps, each param group annealed from its own peak."""

    n_snapshots: int
    total_steps: int
    peaks: list[float]
    lr_min: float = 0.0
    snapshot_steps: list[int] = field(init=False)

    def __post_init__(self) -> None:
        for peak in self.peaks:
            if peak <= self.lr_min:
                raise ValueError(f"Expected every param group's learning rate (peak) > lr_min ({self.lr_min!r}), "
                                 f"but got {peak!r}")
        self.snapshot_steps = cosine_snapshot_steps(self.total_steps, self.n_snapshots)

    def lrs(self, step: int) -> list[float]:
        """The rate of every param group for the 0-based optimizer ``step``: ``cosine_snapshot_lr`` of each peak.

        The cycle is located from the cached snapshot steps, because this runs before every optimizer step
        (``cosine_snapshot_lr`` re-derives and re-checks the cycles on each call); the rate is the schedule's own
        :func:`~snapens.schedule.cosine_anneal`.
        """
        cycle = min(bisect.bisect_left(self.snapshot_steps, step), self.n_snapshots - 1)
        start = self.snapshot_steps[cycle - 1] + 1 if cycle else 0
        length = self.snapshot_steps[cycle] - start + 1
        pos = min(max(step - start, 0), length - 1)  # past the budget: stay at the last step
        return [cosine_anneal(pos, length, peak, self.lr_min) for peak in self.peaks]

    def apply(self, optimizer: Any, step: int) -> None:
        """Set every param group's ``lr`` for the optimizer step ``step`` (0-based) that is about to run."""
        groups = optimizer.param_groups
        if len(groups) != len(self.peaks):
            raise ValueError(f"the optimizer has {len(groups)} param groups, but the schedule was set up for "
                             f"{len(self.peaks)}; SnapshotCallback does not support adding groups during training")
        for group, lr in zip(groups, self.lrs(step)):
            group["lr"] = lr

    def taken_by(self, steps_done: int) -> int:
        """How many snapshots are due once ``steps_done`` optimizer steps have run."""
        return sum(bound < steps_done for bound in self.snapshot_steps)

    def to_dict(self) -> dict[str, Any]:
        return {"n_snapshots": self.n_snapshots, "total_steps": self.total_steps, "peaks": list(self.peaks),
                "lr_min": self.lr_min}


def save_snapshot(
    store: SnapshotStore,
    plan: SnapshotPlan,
    index: int,
    state_dict: Mapping[str, torch.Tensor],
    *,
    epoch: float,
    model_name: str,
    model_kwargs: Mapping[str, Any],
) -> None:
    """Write snapshot ``index`` (1-based) of ``plan``: taken after step ``bounds[index - 1]``."""
    bound = plan.snapshot_steps[index - 1]
    store.save(
        state_dict, index=index, step=bound + 1, epoch=max(float(epoch), 0.0), lr=plan.lrs(bound)[0],
        model_name=model_name, model_kwargs=model_kwargs,
    )
    logger.info("snapshot %d/%d (after step %d of %d) saved to %s", index, plan.n_snapshots, bound + 1,
                plan.total_steps, store.folder)


class SnapshotCallbackBase:
    """What the Lightning and ``transformers`` ``SnapshotCallback`` share: their arguments and their state.

    Args:
        n_snapshots: ``M``, the number of cycles and snapshots.
        dirpath: the snapshot folder (created on the first save); ``<run>/snapshots`` suits ``from_run``.
        lr_min: the floor each cycle anneals to (0 in the paper).
        model_name: the architecture name recorded in the manifest (default: the model's class name).
        model_kwargs: JSON-serialisable constructor arguments recorded with it (default: none).

    Attributes:
        saved: the snapshot indices this process wrote (empty on every process but the one that writes).
    """

    def __init__(
        self,
        n_snapshots: int,
        dirpath: str | os.PathLike[str],
        lr_min: float = 0.0,
        *,
        model_name: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.dirpath: Path = check_callback_args(n_snapshots, dirpath, lr_min)
        self.n_snapshots = n_snapshots
        self.lr_min = float(lr_min)
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})
        self.store = SnapshotStore(self.dirpath)
        self.plan: SnapshotPlan | None = None
        self.taken = 0
        self.saved: list[int] = []


def model_identity(module: torch.nn.Module, name: str | None, kwargs: Mapping[str, Any] | None,
                   ) -> tuple[str, dict[str, Any]]:
    """The ``model`` entry of the manifest: the given name, or the module's class name; kwargs as given."""
    return (name or type(module).__name__), dict(kwargs or {})


def describe_missing(store: SnapshotStore, indices: Sequence[int]) -> list[int]:
    """The snapshot indices among ``indices`` that ``store``'s manifest does not list."""
    listed = {info.index for info in store.list()}
    return [k for k in indices if k not in listed]
