"""The training engine: one network, a cyclic schedule, a snapshot at the end of every cycle, crash-safe.

:func:`fit` runs the loop the paper describes (Huang et al. 2017, section 3)::

    for each optimizer step t:            # the LR for step t is already in the param groups
        loss(model(x), y).backward(); optimizer.step()
        if t is the last step of cycle k: save snapshot k + 1
        scheduler.step()                  # set the LR for step t + 1

and owns the run folder: ``snapshots/`` (a :class:`~snapens.checkpoint.SnapshotStore`), ``best.safetensors``
(the best single model by *validation* accuracy), ``metrics.csv`` (one row per epoch) and ``state.pt`` (the
resume state, written atomically at every epoch end and when SIGINT/SIGTERM arrives).

Nothing here knows an architecture or a dataset: the model, the optimizer, the scheduler and the loaders are
passed in. A loader is any re-iterable of ``(x, y)`` batches with ``__len__``; if it has ``set_epoch(epoch)``
it is called before each epoch, so that data order and augmentation are functions of ``(seed, epoch)`` and a
resumed run replays exactly what an uninterrupted one would have seen.

Momentum is not reset at the restarts (as in the official code), except with ``reinit_factory`` (independent
models, one per cycle), where each new model starts with a fresh optimizer state.

Many processes (``torchrun``): when a ``torch.distributed`` process group with more than one rank is
initialised, :func:`fit` trains data-parallel. Each rank passes the same model, optimizer, scheduler and run
folder, and a training loader that yields *its* share of every global batch (``BatchLoader(rank=,
world_size=)``); all loaders must have the same length, so every rank takes the same steps. Then:

* the model is wrapped in ``DistributedDataParallel`` after it is moved to the device (and, with
  ``sync_batchnorm``, converted to ``SyncBatchNorm``; CUDA only) and before ``torch.compile``; snapshots and
  states always come from the unwrapped module. DDP averages the gradients of the ranks' mean losses, which
  for equal shards is the gradient of the mean loss over the global batch; the learning rate is not rescaled.
* rank 0 alone writes files and validates, on the full validation split, while the others wait; the
  validation numbers are broadcast, so the "best" decision and the metrics rows are the same on every rank.
  Training loss and accuracy are summed over the ranks.
* control messages (metrics, flags, RNG states) go through a CPU (gloo) group, a few per epoch, so they never
  wait on a GPU stream. A SIGINT/SIGTERM on any rank is seen by all within ``stop_check_every`` steps (the
  stop flag is all-reduced then, and at every epoch end); all ranks stop after the same step, rank 0 writes
  the state, and no rank returns before it is on disk. A non-finite loss on any rank stops all of them at the
  next snapshot or epoch end (the summed loss is non-finite everywhere).
* the resume state holds every rank's RNG state (dropout draws differ per rank); on resume every rank reads
  ``state.pt`` from the run folder, which must therefore be on a filesystem shared by the ranks, and the
  number of processes must be the one the run started with.
* errors found before training (a bad argument, a refused resume) make every rank raise, not hang.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snapens._precision import Precision
from snapens.distributed import _Ranks, all_ranks_agree, resolve_device
from snapens.engine._background import TrainingInterrupted, _BackgroundWriter, _SignalGuard
from snapens.engine._loop import (
    FitResult,
    Loader,
    NonFiniteLossError,
    Scheduler,
    SnapshotEvent,
    _cross_entropy,
    _Job,
    _Counters,
)
from snapens.runs import read_resume_state, run_exists

__all__ = [
    "FitResult",
    "Loader",
    "NonFiniteLossError",
    "Precision",
    "Scheduler",
    "SnapshotEvent",
    "TrainingInterrupted",
    "fit",
]

logger = logging.getLogger(__name__)

_PROGRESS_EVERY = 25  # steps between progress-bar texts (each costs one host sync)


def _check_arguments(
    *, epochs: int, train_loader: Loader, scheduler: Scheduler, stop_check_every: int, device: str | torch.device,
    precision: str | Precision, sync_batchnorm: bool, ranks: _Ranks, run_dir: Path, resume: bool, model_name: str,
) -> tuple[torch.device, Precision, dict[str, Any] | None]:
    """The device, the precision and the resume state (None for a fresh run), or a ValueError."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch < 1:
        raise ValueError("the training loader yields no batches")
    total_steps = epochs * steps_per_epoch
    if scheduler.total_steps != total_steps:
        raise ValueError(f"scheduler was built for {scheduler.total_steps!r} steps, but epochs * len(train_loader) "
                         f"= {epochs} * {steps_per_epoch} = {total_steps}")
    if isinstance(stop_check_every, bool) or not isinstance(stop_check_every, int) or stop_check_every < 1:
        raise ValueError(f"stop_check_every must be a positive integer, got {stop_check_every!r}")
    # Resolved once: a torch.device and a Precision that the caller resolved are used as they are.
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    prec = Precision.resolve(precision, dev)  # a Precision passes through (after a device-type check)
    if sync_batchnorm and ranks.enabled and dev.type != "cuda":
        raise ValueError(f"sync_batchnorm needs CUDA devices (torch's SyncBatchNorm), got {dev}")
    if resume:
        expect = {"total_steps": total_steps, "n_cycles": len(scheduler.snapshot_steps), "epochs": epochs,
                  "snapshot_steps": list(scheduler.snapshot_steps), "model_name": model_name,
                  "world_size": ranks.world_size}
        return dev, prec, read_resume_state(run_dir, expect=expect)
    if run_exists(run_dir):
        raise ValueError(f"{run_dir} already holds a training run; resume it or choose another folder")
    return dev, prec, None


def fit(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    train_loader: Loader,
    epochs: int,
    run_dir: str | os.PathLike[str],
    model_name: str,
    model_kwargs: Mapping[str, Any] | None = None,
    val_loader: Loader | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    precision: str | Precision = "fp32",
    channels_last: bool = True,
    compile: bool = False,
    reinit_factory: Callable[[], nn.Module] | None = None,
    reinit_seed: int = 0,
    resume: bool = False,
    on_cycle_end: Callable[[SnapshotEvent], None] | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    progress: bool = False,
    handle_signals: bool = True,
    sync_batchnorm: bool = False,
    stop_check_every: int = 10,
) -> FitResult:
    """Train ``model`` for ``epochs`` epochs and save a snapshot at the end of every scheduler cycle.

    The budget is ``T = epochs * len(train_loader)`` optimizer steps; ``scheduler`` must be built for exactly
    that ``T`` (see :func:`~snapens.schedule.make_scheduler`) and its ``snapshot_steps`` (0-based, ``M`` of them) say where
    snapshot ``k + 1`` is taken: after step ``snapshot_steps[k]``.

    Under an initialised ``torch.distributed`` process group of more than one rank it trains data-parallel
    (see the module docstring): call it on every rank with the same arguments and a loader that yields this
    rank's share of each global batch.

    Files on disk (the promise the kill-and-resume tests check): the run folder's writes reach the disk in
    the order the loop makes them, each atomically: the state before the first step; per epoch ``best``,
    ``metrics.csv``, then ``state.pt`` (on a background thread); a snapshot only after every write submitted
    before it is complete. So a kill at any moment leaves a ``state.pt`` no older than the last epoch end
    before the newest snapshot on disk, and resuming from it re-takes (bit-identically) any snapshot after it.

    Args:
        model: the network (moved to ``device``; parameters keep their identity, so an optimizer built on them
            stays valid).
        optimizer: built on ``model.parameters()``; its param groups hold the restart rate ``lr0``.
        scheduler: a scheduler of :mod:`snapens.schedule` (see :func:`~snapens.schedule.make_scheduler`); snapshots are taken
            after each of its ``snapshot_steps``, however many there are.
        train_loader: batches ``(x, y)``; ``set_epoch(epoch)`` is called first if present.
        epochs: number of epochs.
        run_dir: the run folder (created if missing).
        model_name, model_kwargs: how to rebuild the model; stored in every snapshot.
        val_loader: validation batches; gives per-epoch ``val_loss``/``val_acc`` and ``best.safetensors``.
        loss_fn: ``(logits, y, x) -> mean loss`` (``x`` is the batch's input, e.g. for a distillation
            teacher); cross-entropy of ``logits`` and ``y`` by default.
        device: where to train (under torchrun: this rank's device, e.g. ``cuda:LOCAL_RANK``).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast (``auto`` is resolved by :meth:`Precision.resolve`),
            or a :class:`~snapens._precision.Precision` resolved before; ``fp16`` uses a gradient scaler.
        channels_last: put 4-D inputs and conv weights in channels-last memory format.
        compile: run the forward pass through ``torch.compile`` (snapshots come from the unwrapped model).
        reinit_factory: with it, the model is re-initialised at the start of every cycle after the first from
            ``reinit_factory()`` called under ``torch.manual_seed(reinit_seed + k)`` for cycle ``k``, and the
            optimizer state is reset: ``M`` independent models (the ``single-cycle`` baseline).
        reinit_seed: base seed for ``reinit_factory``.
        resume: continue from ``run_dir/state.pt``.
        on_cycle_end: called with a :class:`SnapshotEvent` after each snapshot (on every rank).
        on_epoch_end: called with each epoch's metrics row (on every rank; the rows are identical).
        progress: show a tqdm bar per epoch (rank 0 only).
        handle_signals: catch SIGINT/SIGTERM, save the state and raise :class:`TrainingInterrupted`.
        sync_batchnorm: with many processes, convert BatchNorm layers to ``SyncBatchNorm`` (batch statistics
            over the global batch; CUDA only; the module is changed in place). Ignored in a single process.
        stop_check_every: with many processes, steps between the all-reduces of the stop flag: the most
            steps a rank trains on after a signal reached another rank.

    Returns:
        A :class:`FitResult` (``snapshots`` is empty on ranks other than 0).

    Raises:
        ValueError: inconsistent arguments, a run folder that already holds a run (without ``resume``), or a
            state that cannot be resumed; on every rank.
        NonFiniteLossError: the loss became NaN/inf; earlier snapshots are kept.
        TrainingInterrupted: SIGINT/SIGTERM arrived; the state was saved first.
    """
    ranks, run_dir = _Ranks(), Path(run_dir)
    with all_ranks_agree():
        dev, prec, state = _check_arguments(
            epochs=epochs, train_loader=train_loader, scheduler=scheduler, stop_check_every=stop_check_every,
            device=device, precision=precision, sync_batchnorm=sync_batchnorm, ranks=ranks, run_dir=run_dir,
            resume=resume, model_name=model_name)
    steps_per_epoch = len(train_loader)
    if ranks.enabled and len(set(lengths := ranks.all_gather(steps_per_epoch))) > 1:
        raise ValueError(f"the ranks' training loaders have different lengths {lengths}; every rank must take "
                         "the same steps (shard with BatchLoader(rank=..., world_size=...))")
    job = _Job(model=model, optimizer=optimizer, scheduler=scheduler, precision=prec, device=dev, ranks=ranks,
               run_dir=run_dir, epochs=epochs, steps_per_epoch=steps_per_epoch, model_name=model_name,
               model_kwargs=dict(model_kwargs or {}), val_loader=val_loader, loss_fn=loss_fn or _cross_entropy,
               channels_last=channels_last, stop_check_every=stop_check_every, reinit_factory=reinit_factory,
               reinit_seed=reinit_seed, on_cycle_end=on_cycle_end)
    counters = job.prepare(sync_batchnorm, compile, state)  # start, or resume from state.pt

    writes = _BackgroundWriter()
    with (_SignalGuard(handle_signals, job.state_path, second_raises=not ranks.enabled) as guard,
          _finally(writes.wait)):
        if state is None:
            job.save_start(counters, guard)
        for epoch in range(counters.epoch, epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            job.begin_epoch(counters, epoch)
            bar = _progress_bar(progress and job.writer, steps_per_epoch, counters.skip, epoch, epochs)
            for i, (x, y) in enumerate(train_loader):
                if i < counters.skip:  # replaying a stopped epoch: these batches were trained before the stop
                    continue
                job.train_step(counters, x, y)
                cycle_end = scheduler.is_cycle_end()  # the step just taken ends a cycle: snapshot it
                if cycle_end:
                    index = job.snapshot(counters, i, writes, guard)
                scheduler.step()  # the rate of the next step
                if cycle_end:
                    job.next_cycle(index)
                _tick(bar, counters, i)
                # A stop at the epoch end is handled below, with the epoch's state.
                stop = job.stop_signal(guard, i) if i + 1 < steps_per_epoch else None
                if stop is not None:
                    if bar is not None:
                        bar.close()
                    job.save_stopped(counters, i, writes, guard)
                    raise TrainingInterrupted(stop, job.state_path)
            if bar is not None:
                bar.close()
            row = job.end_epoch(counters, writes)  # validate, log, save the state (in the background)
            if on_epoch_end is not None:
                on_epoch_end(dict(row))
            stop = job.stop_signal(guard)
            if stop is not None and epoch + 1 < epochs:
                if ranks.enabled:
                    writes.wait()
                    ranks.barrier()  # the epoch's state is on disk before any rank leaves
                raise TrainingInterrupted(stop, job.state_path)
    if ranks.enabled:
        ranks.barrier()  # when fit returns on any rank, rank 0's files are complete
    return job.result(counters)


def _tick(bar: Any, counters: _Counters, batch: int) -> None:
    if bar is not None:
        bar.update(1)
        if (batch + 1) % _PROGRESS_EVERY == 0:
            bar.set_postfix_str(_postfix(counters.loss_sum, counters.correct, counters.seen, counters.lr,
                                         counters.seconds + time.perf_counter() - counters.t0))


@contextlib.contextmanager
def _finally(action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` when the block exits, also on an exception (which then takes precedence)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            action()
        raise
    action()


def _progress_bar(enabled: bool, total: int, initial: int, epoch: int, epochs: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr,
                dynamic_ncols=True, unit="step")


def _postfix(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, lr: float, seconds: float) -> str:
    n = max(seen, 1)
    return (f"loss {float(loss_sum) / n:.4f} acc {100 * int(correct) / n:.1f}% lr {lr:.3g} "
            f"{seen / max(seconds, 1e-9):.0f} img/s")
