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
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from snapens import checkpoint, runs
from snapens._precision import Precision, cpu_supports_bf16, resolve_precision
from snapens.distributed import (
    _Ranks,
    all_ranks_agree,
    broadcast_object,
    raise_if_any_rank_failed,
    resolve_device,
)
from snapens.runs import METRICS_FIELDS, STATE_FILE, read_resume_state, run_exists
from snapens.schedule import make_scheduler

__all__ = [
    "METRICS_FIELDS",
    "STATE_FILE",
    "FitResult",
    "NonFiniteLossError",
    "Precision",
    "Scheduler",
    "SnapshotEvent",
    "TrainingInterrupted",
    "all_ranks_agree",
    "broadcast_object",
    "cpu_supports_bf16",
    "fit",
    "make_scheduler",
    "raise_if_any_rank_failed",
    "read_resume_state",
    "resolve_device",
    "resolve_precision",
    "run_exists",
]

logger = logging.getLogger(__name__)

_PROGRESS_EVERY = 25  # steps between progress-bar texts (each costs one host sync)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped and the snapshots taken before are kept."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after the resume state was written.

    Attributes:
        signum: the signal number (``signal.SIGINT`` or ``signal.SIGTERM``).
        state_path: where the resume state was written.
    """

    def __init__(self, signum: int, state_path: Path) -> None:
        super().__init__(f"training interrupted by {signal.Signals(signum).name}; state saved to {state_path}")
        self.signum = int(signum)
        self.state_path = state_path


class Loader(Protocol):
    """What :func:`fit` needs of a data loader (e.g. :class:`snapens.data.BatchLoader`)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


class Scheduler(Protocol):
    """What :func:`fit` needs of a scheduler (those of :mod:`snapens.schedule`, see :func:`make_scheduler`)."""

    total_steps: int

    @property
    def snapshot_steps(self) -> list[int]: ...

    @property
    def cycle(self) -> int: ...

    def is_cycle_end(self) -> bool: ...

    def step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class SnapshotEvent:
    """What ``on_cycle_end`` receives after snapshot ``index`` (1-based) was written."""

    index: int
    step: int
    epoch: float
    lr: float
    metrics: dict[str, float]
    path: Path


@dataclass
class FitResult:
    """The outcome of :func:`fit`.

    Attributes:
        run_dir: the run folder.
        snapshots: the snapshot manifest entries, sorted by index.
        rows: one dict per epoch, as in ``metrics.csv``.
        best_val_acc: best validation accuracy in [0, 1] (``nan`` without a validation loader).
        best_epoch: the epoch (1-based) of ``best.safetensors``, 0 if none.
        steps: optimizer steps done in total.
        train_seconds: seconds spent in training steps in this call (validation and file writes excluded).
        images_per_second: training images per second in this call.
    """

    run_dir: Path
    snapshots: list[checkpoint.SnapshotInfo]
    rows: list[dict[str, float]]
    best_val_acc: float
    best_epoch: int
    steps: int
    train_seconds: float = 0.0
    images_per_second: float = 0.0


# ------------------------------------------------------------------------------------------ background writes


def _cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU: safe to serialise while training mutates the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class _BackgroundWriter:
    """Runs the epoch-end file writes (best, metrics, state) on one worker thread, in submission order.

    Serialising and fsync'ing the state costs ~0.1 s for a WRN-16-4; done in the background it overlaps the
    next epoch's steps. Each job works on CPU copies taken when it was submitted. Crash safety is unchanged:
    every file is still replaced atomically, and the state is written after the files it vouches for.
    A failed job re-raises at the next :meth:`submit` or :meth:`wait`.

    The order of files on disk is the order of the writes in the loop: :func:`fit` calls :meth:`wait` before
    every write it does itself (a snapshot, a state on SIGINT/SIGTERM), so a snapshot taken after epoch ``e``
    never reaches the disk before the state of epoch ``e``; see :func:`fit` ("Files on disk").
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # re-raised in the training thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="snapens-writer", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# ------------------------------------------------------------------------------------------------- signals


class _SignalGuard:
    """Turn the first SIGINT/SIGTERM into a flag that the loop checks between steps; a second one raises.

    With ``second_raises=False`` (many processes) a second signal is only logged: torchrun forwards the signal
    it receives to every worker, so after a Ctrl-C each worker gets SIGINT twice (terminal and launcher), and
    a rank leaving early would strand the others in a collective. torchrun's SIGKILL after its grace period
    (30 s) remains the hard stop.
    """

    def __init__(self, enabled: bool, state_path: Path, *, second_raises: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._state_path = state_path
        self._second_raises = second_raises
        self._previous: dict[int, Any] = {}
        self._in_write = False
        self._deferred: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if not self._second_raises:
                logger.warning("%s received again: still stopping at the next agreed step",
                               signal.Signals(signum).name)
                return
            if self._in_write:  # never inside torch.save / safetensors: raise when the write is complete
                self._deferred = signum
                return
            # Impatient second signal: stop now; atomic writes keep files whole.
            raise TrainingInterrupted(signum, self._state_path)
        self.signum = signum
        logger.warning("%s received: finishing the current step and saving the state", signal.Signals(signum).name)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A file write that a second signal must not cut short (a raise inside ``torch.save`` turns into
        ``RuntimeError: unexpected pos``): the second signal is raised when the block is done."""
        self._in_write = True
        try:
            yield
        finally:
            self._in_write = False
        if self._deferred is not None:
            raise TrainingInterrupted(self._deferred, self._state_path)

    def __enter__(self) -> _SignalGuard:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ---------------------------------------------------------------------------------------------------- fit


@torch.no_grad()
def _validate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    loader: Loader,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    channels_last: bool,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in [0, 1] over ``loader``; one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for x, y in loader:
        x, y = _to_device(x, y, device, channels_last)
        with autocast():
            logits = forward(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
    model.train(was_training)
    if seen == 0:
        return math.nan, math.nan
    return float(loss_sum) / seen, int(correct) / seen


def _to_device(
    x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device != device:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _all_finite(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state_dict.values() if t.is_floating_point())


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


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
    dev = resolve_device(device)
    prec = Precision.resolve(precision, dev)
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


@dataclass
class _Progress:
    """Where :func:`fit` stands: the counters and history that ``state.pt`` records, and the epoch's sums."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based), = epochs done
    skip: int = 0  # batches of that epoch trained before a stop (a resume skips them)
    best_val_acc: float = -1.0
    best_epoch: int = 0
    rows: list[dict[str, float]] = field(default_factory=list)
    partial: dict[str, Any] | None = None  # the stopped epoch's sums, from state.pt
    # The epoch's running sums stay on the device: one host sync per epoch (and per progress text / snapshot).
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    seen: int = 0
    seconds: float = 0.0  # training seconds of the epoch, counted in stretches from t0
    t0: float = 0.0
    lr: float = 0.0  # the rate of the last step
    epoch_val: tuple[float, float] | None = None  # a validation at a snapshot that also ended the epoch
    train_seconds: float = 0.0  # this call's
    images: int = 0

    def pause(self) -> None:
        self.seconds += time.perf_counter() - self.t0

    def go(self) -> None:
        self.t0 = time.perf_counter()


@dataclass
class _Job:
    """The fixed parts of one :func:`fit` call and the loop's actions on a :class:`_Progress`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    precision: Precision
    device: torch.device
    ranks: _Ranks
    run_dir: Path
    epochs: int
    steps_per_epoch: int
    model_name: str
    model_kwargs: dict[str, Any]
    val_loader: Loader | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    channels_last: bool
    stop_check_every: int
    reinit_factory: Callable[[], nn.Module] | None
    reinit_seed: int
    on_cycle_end: Callable[[SnapshotEvent], None] | None
    forward: Callable[[torch.Tensor], torch.Tensor] = field(init=False)
    eval_forward: Callable[[torch.Tensor], torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.writer = self.ranks.rank == 0  # rank 0 alone writes files
        self.state_path = self.run_dir / runs.STATE_FILE
        self.store = checkpoint.SnapshotStore(self.run_dir / runs.SNAPSHOT_DIR)
        self.snapshot_steps = list(self.scheduler.snapshot_steps)

    def prepare(self, sync_batchnorm: bool, compile: bool, state: dict[str, Any] | None) -> _Progress:
        """Move the model to the device, load ``state`` (or make the folder), wrap in DDP and compile."""
        if sync_batchnorm and self.ranks.enabled:  # reuses the parameters: the optimizer stays valid
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif sync_batchnorm:
            logger.info("sync_batchnorm ignored: a single process")
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        run = self._load(state) if state is not None else _Progress()
        if state is None and self.writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            runs.remove_stale_temp_files(self.run_dir)  # e.g. of a state.pt a kill before the first step left
        # Snapshots and states always come from `model` itself, never from the DDP or compiled wrappers.
        train_module: nn.Module = self.model
        if self.ranks.enabled:  # after the resume load; DDP broadcasts rank 0's weights anyway
            dev = self.device
            ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
            train_module = DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(train_module) if compile else train_module  # type: ignore[assignment]
        # Rank 0 validates alone, so validation must not go through DDP's forward (which may talk to the others).
        self.eval_forward = ((torch.compile(self.model) if compile else self.model)  # type: ignore[assignment]
                             if self.ranks.enabled else self.forward)
        train_module.train()
        return run

    def _load(self, state: dict[str, Any]) -> _Progress:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("scaler"))
        runs.restore_rng_state(state["rng_ranks"][self.ranks.rank] if self.ranks.enabled else state["rng"])
        run = _Progress(step=int(state["step"]), epoch=int(state["epoch"]), skip=int(state["batch"]),
                        best_val_acc=float(state["best_val_acc"]), best_epoch=int(state["best_epoch"]),
                        rows=[dict(r) for r in state["rows"]], partial=state.get("partial"))
        logger.info("resuming %s at epoch %d, batch %d (step %d of %d)", self.run_dir, run.epoch + 1, run.skip,
                    run.step, self.scheduler.total_steps)
        if self.writer:
            runs.remove_stale_temp_files(self.run_dir)
            runs.write_metrics(self.run_dir / runs.METRICS_FILE, run.rows)  # drop rows written after the state
        return run

    def begin_epoch(self, run: _Progress, epoch: int) -> None:
        run.epoch, run.epoch_val, run.seen, run.seconds = epoch, None, 0, 0.0
        run.loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        run.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        if run.partial is not None and run.skip:
            mine = run.partial["ranks"][self.ranks.rank] if self.ranks.enabled else run.partial  # each its own
            run.loss_sum += mine["loss_sum"].to(self.device)
            run.correct += mine["correct"].to(self.device)
            run.seen, run.seconds = int(mine["seen"]), float(run.partial["seconds"])
        run.partial = None
        run.lr = self.optimizer.param_groups[0]["lr"]
        run.go()

    def train_step(self, run: _Progress, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = _to_device(x, y, self.device, self.channels_last)
        run.lr = self.optimizer.param_groups[0]["lr"]  # the rate this step runs at (set before it)
        with self.precision.autocast():
            logits = self.forward(x)
            loss = self.loss_fn(logits, y, x)
        self.precision.backward_and_step(loss, self.optimizer)
        run.loss_sum.add_(loss.detach(), alpha=y.shape[0])
        run.correct.add_((logits.detach().argmax(1) == y).sum())
        run.seen += y.shape[0]
        run.step += 1

    def totals(self, run: _Progress) -> tuple[Any, Any, int]:
        """The epoch's sums so far over all ranks (a non-finite loss on any rank is non-finite everywhere)."""
        if not self.ranks.enabled:
            return run.loss_sum, run.correct, run.seen
        loss_all, correct_all, seen_all = self.ranks.sum([float(run.loss_sum), float(run.correct), float(run.seen)])
        return loss_all, correct_all, int(seen_all)

    def validate(self) -> tuple[float, float]:
        if self.val_loader is None:
            return math.nan, math.nan
        args = (self.model, self.val_loader, self.device, self.precision.autocast, self.channels_last)
        if not self.ranks.enabled:
            return _validate(self.forward, *args)
        # Rank 0 validates the whole split while the others wait in the broadcast.
        val_loss, val_acc = self.ranks.from_rank0(_validate(self.eval_forward, *args) if self.writer
                                                  else (math.nan, math.nan))
        return val_loss, val_acc

    def gather_rng(self) -> list[dict[str, Any]] | None:
        # Every rank's generators: dropout draws differ per rank and must continue per rank after a resume.
        return self.ranks.all_gather(runs.capture_rng_state()) if self.ranks.enabled else None

    def stop_signal(self, guard: _SignalGuard, batch: int | None = None) -> int | None:
        """The signal that stops every rank after ``batch`` (None: at the epoch end), or None to go on."""
        if not self.ranks.enabled:
            return guard.signum
        if batch is not None and (batch + 1) % self.stop_check_every:
            return None
        return self.ranks.max_int(guard.signum or 0) or None  # a collective: the largest signal any rank got

    def state(self, run: _Progress, *, epoch: int, batch: int, finished: bool, partial: dict[str, Any] | None,
              rng_ranks: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The resume state (:mod:`snapens.runs`): resuming it continues after ``batch`` batches of ``epoch``."""
        return {
            "format": runs.STATE_FORMAT, "format_version": runs.STATE_VERSION, "finished": finished,
            "epoch": epoch, "batch": batch, "step": run.step, "epochs": self.epochs,
            "total_steps": self.scheduler.total_steps, "n_cycles": len(self.snapshot_steps),
            "snapshot_steps": self.snapshot_steps, "model_name": self.model_name,
            "model": checkpoint.unwrap_state_dict(self.model), "optimizer": _cpu_copy(self.optimizer.state_dict()),
            "scheduler": _cpu_copy(self.scheduler.state_dict()), "scaler": _cpu_copy(self.precision.state_dict()),
            "rng": rng_ranks[0] if rng_ranks else runs.capture_rng_state(), "rng_ranks": rng_ranks,
            "world_size": self.ranks.world_size, "best_val_acc": run.best_val_acc, "best_epoch": run.best_epoch,
            "rows": [dict(r) for r in run.rows], "partial": partial, "extra": {},
        }

    def save_start(self, run: _Progress, guard: _SignalGuard) -> None:
        # A state before the first step, written synchronously: a run killed before its first epoch end can
        # still be resumed (from the start, bit-exactly) rather than being neither resumable nor restartable.
        rng_ranks = self.gather_rng()
        if self.writer:
            with guard.critical():
                runs.save_training_state(self.state_path, self.state(run, epoch=0, batch=0, finished=False,
                                                                     partial=None, rng_ranks=rng_ranks))

    def save_stopped(self, run: _Progress, batch: int, writes: _BackgroundWriter, guard: _SignalGuard) -> None:
        """The state after ``batch`` of the epoch, with every rank's partial sums (a resumed epoch adds up
        exactly as this one would); no rank returns before it is on disk."""
        run.pause()
        _check_finite(*self.totals(run), run.epoch, run.step)
        rng_ranks = self.gather_rng()
        sums = {"loss_sum": run.loss_sum.cpu(), "correct": run.correct.cpu(), "seen": run.seen}
        sums_ranks = self.ranks.all_gather(sums) if self.ranks.enabled else None
        if self.writer:
            partial = {**sums, "seconds": run.seconds, "ranks": sums_ranks}
            writes.wait()
            with guard.critical():
                runs.save_training_state(self.state_path, self.state(
                    run, epoch=run.epoch, batch=batch + 1, finished=False, partial=partial, rng_ranks=rng_ranks))
        if self.ranks.enabled:
            self.ranks.barrier()  # nobody exits (and makes torchrun stop the rest) before the state is saved

    def snapshot(self, run: _Progress, batch: int, writes: _BackgroundWriter, guard: _SignalGuard) -> int:
        """Validate and save the snapshot of the cycle that the step just taken ended; returns its index."""
        run.pause()
        index, step = self.scheduler.cycle + 1, run.step
        epoch = run.epoch + (batch + 1) / self.steps_per_epoch
        train_loss, train_acc = _check_finite(*self.totals(run), run.epoch, step)
        val_loss, val_acc = self.validate()
        if batch + 1 == self.steps_per_epoch:
            run.epoch_val = (val_loss, val_acc)  # the epoch ends here too: reuse this validation
        metrics = {"train_loss": train_loss, "train_acc": train_acc}
        if self.val_loader is not None:
            metrics |= {"val_loss": val_loss, "val_acc": val_acc}
        writes.wait()  # the ordering promise: the previous epoch's files first
        with guard.critical():
            # With many ranks only rank 0 copies the weights (the ones saved), and its verdict holds for all.
            weights = checkpoint.unwrap_state_dict(self.model) if self.writer else None
            finite = _all_finite(weights) if weights is not None else True
            if self.ranks.enabled:
                finite = bool(self.ranks.from_rank0([float(finite)])[0])
            if not finite:  # a step can blow up the weights while its own loss was still finite
                raise NonFiniteLossError(
                    f"the weights became NaN/inf at step {step} (epoch {epoch:.2f}); snapshot {index} not saved, "
                    "earlier snapshots are kept. Try a lower learning rate or fp32 precision.")
            path = self.store.folder / checkpoint.snapshot_filename(index)
            if weights is not None:
                path = self.store.save(weights, index=index, step=step, epoch=round(epoch, 6), lr=float(run.lr),
                                       model_name=self.model_name, model_kwargs=self.model_kwargs,
                                       metrics=metrics).path
            val = f", val acc {100 * metrics['val_acc']:.2f}%" if "val_acc" in metrics else ""
            logger.info("*** snapshot %d/%d at step %d (epoch %.2f, lr %.3g%s) -> %s", index, len(self.snapshot_steps),
                        step, epoch, run.lr, val, path)
            if self.on_cycle_end is not None:
                self.on_cycle_end(SnapshotEvent(index=index, step=step, epoch=epoch, lr=float(run.lr),
                                                metrics=dict(metrics), path=path))
        run.go()
        return index

    def next_cycle(self, index: int) -> None:
        """After snapshot ``index``: an independent model for the next cycle, with ``reinit_factory``."""
        if self.reinit_factory is not None and index < len(self.snapshot_steps):
            _reinitialise(self.model, self.optimizer, self.reinit_factory, self.reinit_seed + index)

    def end_epoch(self, run: _Progress, writes: _BackgroundWriter) -> dict[str, float]:
        """Validate, log, and submit the epoch's files (best, metrics.csv, then state.pt); returns its row."""
        run.pause()
        run.train_seconds += run.seconds
        run.skip = 0
        loss_now, correct_now, seen_now = self.totals(run)
        run.images += seen_now
        train_loss, train_acc = _check_finite(loss_now, correct_now, seen_now, run.epoch, run.step)
        val_loss, val_acc = run.epoch_val if run.epoch_val is not None else self.validate()
        done = run.epoch + 1
        row = {"epoch": done, "step": run.step, "lr": run.lr, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val_loss, "val_acc": val_acc, "seconds": run.seconds}
        run.rows.append(row)
        improved = self.val_loader is not None and val_acc > run.best_val_acc
        if improved:
            run.best_val_acc, run.best_epoch = val_acc, done
        rng_ranks = self.gather_rng()
        if self.writer:
            best = checkpoint.unwrap_state_dict(self.model) if improved else None
            best_meta = {"model": {"name": self.model_name, "kwargs": self.model_kwargs}, "epoch": done,
                         "step": run.step, "val_acc": val_acc, "val_loss": val_loss}
            state = self.state(run, epoch=done, batch=0, finished=done == self.epochs, partial=None,
                               rng_ranks=rng_ranks)
            writes.submit(functools.partial(_write_epoch_files, self.run_dir, best, best_meta,
                                            [dict(r) for r in run.rows], state))
        logger.info(
            "epoch %d/%d  step %d  lr %.4g  loss %.4f  acc %.2f%%%s  %.1fs  %.0f img/s%s",
            done, self.epochs, run.step, run.lr, train_loss, 100 * train_acc,
            f"  val loss {val_loss:.4f}  val acc {100 * val_acc:.2f}%" if self.val_loader is not None else "",
            run.seconds, seen_now / max(run.seconds, 1e-9), "  (best)" if improved else "",
        )
        return row

    def result(self, run: _Progress) -> FitResult:
        return FitResult(
            run_dir=self.run_dir, snapshots=self.store.list() if self.writer else [], rows=run.rows,
            best_val_acc=run.best_val_acc if self.val_loader is not None else math.nan, best_epoch=run.best_epoch,
            steps=run.step, train_seconds=run.train_seconds,
            images_per_second=run.images / max(run.train_seconds, 1e-9),
        )


def _write_epoch_files(run_dir: Path, best: dict[str, torch.Tensor] | None, best_meta: dict[str, Any],
                       rows: list[dict[str, float]], state: dict[str, Any]) -> None:
    # Order matters for crash safety: state.pt last, so a crash before it replays this epoch.
    if best is not None:
        checkpoint.save_weights(run_dir / runs.BEST_FILE, best, best_meta)
    runs.write_metrics(run_dir / runs.METRICS_FILE, rows)
    runs.save_training_state(run_dir / runs.STATE_FILE, state)


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
    that ``T`` (see :func:`make_scheduler`) and its ``snapshot_steps`` (0-based, ``M`` of them) say where
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
        scheduler: a scheduler of :mod:`snapens.schedule` (see :func:`make_scheduler`); snapshots are taken
            after each of its ``snapshot_steps``, however many there are.
        train_loader: batches ``(x, y)``; ``set_epoch(epoch)`` is called first if present.
        epochs: number of epochs.
        run_dir: the run folder (created if missing).
        model_name, model_kwargs: how to rebuild the model; stored in every snapshot.
        val_loader: validation batches; gives per-epoch ``val_loss``/``val_acc`` and ``best.safetensors``.
        loss_fn: ``(logits, y, x) -> mean loss`` (``x`` is the batch's input, e.g. for a distillation
            teacher); cross-entropy of ``logits`` and ``y`` by default.
        device: where to train (under torchrun: this rank's device, e.g. ``cuda:LOCAL_RANK``).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast (``auto`` is resolved by :func:`resolve_precision`),
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
    run = job.prepare(sync_batchnorm, compile, state)  # start, or resume from state.pt

    writes = _BackgroundWriter()
    with (_SignalGuard(handle_signals, job.state_path, second_raises=not ranks.enabled) as guard,
          _finally(writes.wait)):
        if state is None:
            job.save_start(run, guard)
        for epoch in range(run.epoch, epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            job.begin_epoch(run, epoch)
            bar = _progress_bar(progress and job.writer, steps_per_epoch, run.skip, epoch, epochs)
            for i, (x, y) in enumerate(train_loader):
                if i < run.skip:  # replaying a stopped epoch: these batches were trained before the stop
                    continue
                job.train_step(run, x, y)
                cycle_end = scheduler.is_cycle_end()  # the step just taken ends a cycle: snapshot it
                if cycle_end:
                    index = job.snapshot(run, i, writes, guard)
                scheduler.step()  # the rate of the next step
                if cycle_end:
                    job.next_cycle(index)
                _tick(bar, run, i)
                # A stop at the epoch end is handled below, with the epoch's state.
                stop = job.stop_signal(guard, i) if i + 1 < steps_per_epoch else None
                if stop is not None:
                    if bar is not None:
                        bar.close()
                    job.save_stopped(run, i, writes, guard)
                    raise TrainingInterrupted(stop, job.state_path)
            if bar is not None:
                bar.close()
            row = job.end_epoch(run, writes)  # validate, log, save the state (in the background)
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
    return job.result(run)


def _tick(bar: Any, run: _Progress, batch: int) -> None:
    if bar is not None:
        bar.update(1)
        if (batch + 1) % _PROGRESS_EVERY == 0:
            bar.set_postfix_str(_postfix(run.loss_sum, run.correct, run.seen, run.lr,
                                         run.seconds + time.perf_counter() - run.t0))


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


def _check_finite(
    loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, epoch: int, step: int
) -> tuple[float, float]:
    """Mean loss and accuracy so far in the epoch (one host sync); NaN/inf stops the run."""
    total = float(loss_sum)
    if not math.isfinite(total):
        raise NonFiniteLossError(
            f"training loss became {total} in epoch {epoch + 1} (by step {step}); stopped. Snapshots taken "
            "before are kept. Try a lower learning rate or fp32 precision."
        )
    return total / max(seen, 1), int(correct) / max(seen, 1)


def _reinitialise(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    factory: Callable[[], nn.Module],
    seed: int,
) -> None:
    # fork_rng: the fresh model's initialisation must not move the training RNG stream (dropout, resume).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = factory()
    model.load_state_dict(fresh.state_dict())
    optimizer.state.clear()  # a new, independent model: no momentum carried over
    logger.info("re-initialised the model (seed %d) for the next independent cycle", seed)


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
