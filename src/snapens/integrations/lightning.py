"""Snapshot Ensembles inside a Lightning ``Trainer``: one callback sets the rate and keeps the snapshots.

::

    from snapens.integrations.lightning import SnapshotCallback   # pip install "snapshot-ensembles[lightning]"

    trainer = L.Trainer(max_epochs=30, callbacks=[SnapshotCallback(n_snapshots=5, dirpath="runs/x/snapshots")])
    trainer.fit(module, train_loader)

The callback takes over the learning rate of the optimizer that ``configure_optimizers`` returns: before every
optimizer step ``s`` (0-based, ``trainer.global_step``) each param group gets
``cosine_snapshot_lr(s, T, M, lr0, lr_min)`` (paper Eq. 2, see :mod:`snapens.schedule`) with ``T =
trainer.estimated_stepping_batches`` (so ``max_epochs``/``max_steps``, gradient accumulation and the number of
devices count) and ``lr0`` the group's rate from ``configure_optimizers`` (its peak). A module that also returns
an LR scheduler is refused: two schedules cannot both own the rate.

Snapshot ``k`` is the LightningModule's ``state_dict`` after the last step of cycle ``k``, written by global rank
0 only into a :class:`snapens.checkpoint.SnapshotStore` at ``dirpath`` (``snapshot-KK.safetensors`` and
``manifest.json``). With ``dirpath=<run>/snapshots``, :meth:`snapens.ensemble.SnapshotEnsemble.from_run` reads it::

    ens = SnapshotEnsemble.from_run("runs/x", lambda name, **kwargs: MyModule(), inputs="normalized")

The callback's progress is part of Lightning checkpoints (:meth:`SnapshotCallback.state_dict`), so
``trainer.fit(..., ckpt_path=...)`` resumes the same schedule without a duplicate or missing snapshot. Supports
one optimizer (automatic or manual optimization) on single-device and DDP strategies.
"""

from __future__ import annotations

import logging
from typing import Any

from snapens.integrations._optional import import_optional

pl = import_optional("lightning.pytorch", extra="lightning", needs="Lightning", pip="lightning")

from snapens.checkpoint import unwrap_state_dict
from snapens.integrations._plan import SnapshotCallbackBase, SnapshotPlan, check_budget, describe_missing
from snapens.integrations._plan import model_identity, save_snapshot
from snapens.schedule import group_peaks

__all__ = ["SnapshotCallback"]

logger = logging.getLogger(__name__)


class SnapshotCallback(SnapshotCallbackBase, pl.Callback):
    """Cyclic cosine learning rate over the trainer's step budget and one snapshot per cycle (rank 0 writes).

    Takes ``(n_snapshots, dirpath, lr_min=0.0, *, model_name=None, model_kwargs=None)`` and keeps :attr:`saved`
    as described in :class:`~snapens.integrations._plan.SnapshotCallbackBase` (the manifest's default model name
    is the LightningModule's class name; only rank 0 saves).
    """

    _restored: dict[str, Any] | None = None  # a checkpoint's callback state, applied at on_train_start
    _state_key: str | None = None

    @property
    def state_key(self) -> str:
        # Lightning reads this around every hook call (profiler labels): build the string once.
        if self._state_key is None:
            self._state_key = self._generate_state_key(n_snapshots=self.n_snapshots)
        return self._state_key

    # -------------------------------------------------------------------------------------------- set-up

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after configure_optimizers and before a checkpoint's optimizer state is restored, so the
        # group rates here are the user's peaks, not the last rates this callback set.
        if trainer.lr_scheduler_configs:
            names = [type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs]
            raise ValueError(
                f"SnapshotCallback sets the learning rate itself, but configure_optimizers also returns the "
                f"scheduler(s) {names}: return only the optimizer (its lr is the peak of every cycle)"
            )
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SnapshotCallback supports exactly one optimizer, but configure_optimizers returns "
                             f"{len(trainer.optimizers)}")
        total = check_budget(trainer.estimated_stepping_batches, self.n_snapshots,
                             "trainer.estimated_stepping_batches")
        self.plan = SnapshotPlan(self.n_snapshots, total, group_peaks(trainer.optimizers[0]), self.lr_min)
        self.taken = 0
        self.saved = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Checkpoint state (if any) is loaded by now, whatever the strategy's restore order.
        assert self.plan is not None
        if self._restored is not None:
            state, self._restored = self._restored, None
            saved_plan = SnapshotPlan(state["n_snapshots"], state["total_steps"], state["peaks"], state["lr_min"])
            if saved_plan.to_dict() != self.plan.to_dict():
                logger.warning("the checkpoint's snapshot schedule %s differs from this trainer's %s: resuming "
                               "the checkpoint's", saved_plan.to_dict(), self.plan.to_dict())
            self.plan = saved_plan
            self.taken = int(state["taken"])
        elif trainer.global_step > 0:
            self.taken = self.plan.taken_by(trainer.global_step)
            logger.warning("resumed at step %d without SnapshotCallback state in the checkpoint: assuming the "
                           "first %d snapshot(s) were saved before it", trainer.global_step, self.taken)
        if trainer.is_global_zero and self.taken:
            missing = describe_missing(self.store, range(1, self.taken + 1))
            if missing:
                logger.warning("snapshots %s are not in %s (they were taken before the checkpoint)", missing,
                               self.store.folder)
        logger.info("snapshot schedule: %d optimizer steps, %d cycles ending after steps %s",
                    self.plan.total_steps, self.n_snapshots, [b + 1 for b in self.plan.snapshot_steps])
        self._save_due(trainer, pl_module, trainer.fit_loop.epoch_loop.batch_progress.current.completed)

    # ---------------------------------------------------------------------------------------- every step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # So that loggers (LearningRateMonitor) read the rate the coming step will use.
        assert self.plan is not None
        self.plan.apply(trainer.optimizers[0], trainer.global_step)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        assert self.plan is not None
        # global_step counts the optimizer steps already taken: this is the 0-based index of the coming one.
        self.plan.apply(optimizer, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        plan = self.plan
        if plan is not None and self.taken < plan.n_snapshots and plan.snapshot_steps[self.taken] < trainer.global_step:
            self._save_due(trainer, pl_module, batch_idx + 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plan is not None and self.taken < self.n_snapshots:
            logger.warning("training ended after %d of %d optimizer steps with %d of %d snapshots", trainer.global_step,
                           self.plan.total_steps, self.taken, self.n_snapshots)

    def _save_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches_done: int) -> None:
        """Save every snapshot whose cycle ended by now; ``batches_done`` counts this epoch's batches."""
        assert self.plan is not None
        due = self.plan.taken_by(trainer.global_step)
        if due <= self.taken:
            return
        # Every rank calls this: strategies that shard the model gather its state dict collectively.
        state = trainer.strategy.lightning_module_state_dict()
        for index in range(self.taken + 1, due + 1):
            bound = self.plan.snapshot_steps[index - 1]
            if bound + 1 != trainer.global_step:
                logger.warning("snapshot %d belongs after step %d but is taken after step %d", index, bound + 1,
                               trainer.global_step)
        if trainer.is_global_zero:
            weights = unwrap_state_dict(state)
            name, kwargs = model_identity(pl_module, self.model_name, self.model_kwargs)
            batches = trainer.num_training_batches
            epoch = trainer.current_epoch + (batches_done / batches if 0 < batches < float("inf") else 0.0)
            for index in range(self.taken + 1, due + 1):
                save_snapshot(self.store, self.plan, index, weights, epoch=epoch, model_name=name,
                              model_kwargs=kwargs)
                self.saved.append(index)
        self.taken = due

    # ------------------------------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        if self.plan is None:
            return {}
        return {**self.plan.to_dict(), "taken": self.taken}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._restored = dict(state_dict)
