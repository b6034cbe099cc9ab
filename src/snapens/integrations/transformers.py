"""Snapshot Ensembles inside a Hugging Face ``Trainer``: one callback sets the rate and keeps the snapshots.

::

    from snapens.integrations.transformers import SnapshotCallback   # pip install "snapshot-ensembles[transformers]"

    args = TrainingArguments(output_dir="runs/x", learning_rate=0.1, lr_scheduler_type="constant", ...)
    trainer = Trainer(model, args, train_dataset=..., callbacks=[SnapshotCallback(5, dirpath="runs/x/snapshots")])
    trainer.train()

Before every optimizer step ``s`` (0-based, ``state.global_step``) each param group gets
``cosine_snapshot_lr(s, T, M, lr0, lr_min)`` (paper Eq. 2, see :mod:`snapens.schedule`) with ``T =
state.max_steps`` (optimizer steps: gradient accumulation counted) and ``lr0`` the group's initial rate (its peak,
``TrainingArguments.learning_rate`` for the Trainer's own optimizer). The ``Trainer`` always runs a scheduler of
its own; the callback refuses any that changes the rate (the default ``"linear"``, warmup, ...), because it would
be silently overridden: pass ``lr_scheduler_type="constant"`` and no warmup. (The Trainer then logs the constant
peak as ``learning_rate``; the rate the optimizer runs with is the callback's.)

Snapshot ``k`` is the model's ``state_dict`` after the last optimizer step of cycle ``k``, written by the world's
process zero into a :class:`snapens.checkpoint.SnapshotStore` at ``dirpath`` (``snapshot-KK.safetensors`` and
``manifest.json``). With ``dirpath=<run>/snapshots``, :meth:`snapens.ensemble.SnapshotEnsemble.from_run` reads
it. Progress needs no state of its own: the snapshots due are those whose cycle ended before ``state.global_step``,
so ``trainer.train(resume_from_checkpoint=...)`` continues without a duplicate or missing snapshot.
"""

from __future__ import annotations

import logging
from typing import Any

from snapens.integrations._optional import import_optional

transformers = import_optional("transformers", extra="transformers", needs="transformers",
                               pip="transformers accelerate")

if not hasattr(transformers.TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover - old releases
    raise ImportError(
        f"snapens.integrations.transformers needs a transformers release whose TrainerCallback has "
        f"on_pre_optimizer_step (found {transformers.__version__}): pip install transformers accelerate (or pip install -e '.[transformers]' in a clone)"
    )

from torch.optim.lr_scheduler import LambdaLR

from snapens.checkpoint import unwrap_state_dict
from snapens.integrations._plan import SnapshotCallbackBase, SnapshotPlan, check_budget, describe_missing
from snapens.integrations._plan import model_identity, save_snapshot
from snapens.schedule import group_peaks

__all__ = ["SnapshotCallback"]

logger = logging.getLogger(__name__)


def _check_constant_schedule(lr_scheduler: Any, args: Any, total_steps: int) -> None:
    """ValueError unless the Trainer's scheduler keeps every rate at its initial value for the whole budget."""
    if lr_scheduler is None:
        return
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps one
    probes = sorted({0, 1, total_steps // 2, total_steps - 1})
    constant = isinstance(inner, LambdaLR) and all(
        float(fn(step)) == 1.0 for fn in inner.lr_lambdas for step in probes
    )
    if not constant:
        kind = getattr(args, "lr_scheduler_type", None)
        kind = getattr(kind, "value", kind)
        raise ValueError(
            f"SnapshotCallback sets the learning rate itself, but the Trainer has a schedule that changes it "
            f"({type(inner).__name__}, lr_scheduler_type={kind!r}, warmup={getattr(args, 'warmup_steps', 0)!r}) "
            "and would be silently overridden: pass lr_scheduler_type='constant' without warmup to "
            "TrainingArguments, and no scheduler in Trainer(optimizers=...)"
        )


class SnapshotCallback(SnapshotCallbackBase, transformers.TrainerCallback):
    """Cyclic cosine learning rate over ``state.max_steps`` and one snapshot per cycle (process zero writes).

    Takes ``(n_snapshots, dirpath, lr_min=0.0, *, model_name=None, model_kwargs=None)`` and keeps :attr:`saved`
    as described in :class:`~snapens.integrations._plan.SnapshotCallbackBase` (only process zero saves).
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        total = check_budget(state.max_steps, self.n_snapshots, "state.max_steps")
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise ValueError("SnapshotCallback needs the Trainer's optimizer, but the callback got none")
        _check_constant_schedule(kwargs.get("lr_scheduler"), args, total)
        # initial_lr is the rate the optimizer was built with; it survives a resume (it is in the optimizer's
        # saved param groups), while lr holds the last rate this callback set.
        self.plan = SnapshotPlan(self.n_snapshots, total, group_peaks(optimizer), self.lr_min)
        self.taken = self.plan.taken_by(state.global_step)
        self.saved = []
        if self.taken and state.is_world_process_zero:
            missing = describe_missing(self.store, range(1, self.taken + 1))
            if missing:
                logger.warning("resumed at step %d, but snapshots %s are not in %s", state.global_step, missing,
                               self.store.folder)
        logger.info("snapshot schedule: %d optimizer steps, %d cycles ending after steps %s", total,
                    self.n_snapshots, [b + 1 for b in self.plan.snapshot_steps])

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.plan is not None
        # global_step counts the optimizer steps already taken: this is the 0-based index of the coming one.
        self.plan.apply(kwargs["optimizer"], state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        plan = self.plan
        if plan is None or self.taken >= plan.n_snapshots or plan.snapshot_steps[self.taken] >= state.global_step:
            return
        due = plan.taken_by(state.global_step)
        if state.is_world_process_zero:
            model = kwargs["model"]
            name, model_kwargs = model_identity(model, self.model_name, self.model_kwargs)
            weights = unwrap_state_dict(model)
            for index in range(self.taken + 1, due + 1):
                save_snapshot(self.store, plan, index, weights, epoch=state.epoch or 0.0, model_name=name,
                              model_kwargs=model_kwargs)
                self.saved.append(index)
        self.taken = due

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.plan is not None and self.taken < self.n_snapshots:
            logger.warning("training ended after %d of %d optimizer steps with %d of %d snapshots",
                           state.global_step, self.plan.total_steps, self.taken, self.n_snapshots)
