"""The training loop's state and actions: what :func:`snapens.engine.fit` does at each step, snapshot and epoch end.

Private to :mod:`snapens.engine`, which exports the public types defined here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
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
from snapens._precision import Precision
from snapens.distributed import _Ranks
from snapens.engine._background import _BackgroundWriter, _cpu_copy, _SignalGuard

logger = logging.getLogger("snapens.engine")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped and the snapshots taken before are kept."""


class Loader(Protocol):
    """What :func:`fit` needs of a data loader (e.g. :class:`snapens.data.BatchLoader`)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


class Scheduler(Protocol):
    """What :func:`fit` needs of a scheduler (those of :mod:`snapens.schedule`, see :func:`~snapens.schedule.make_scheduler`)."""

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


@dataclass
class _Counters:
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

    def prepare(self, sync_batchnorm: bool, compile: bool, state: dict[str, Any] | None) -> _Counters:
        """Move the model to the device, load ``state`` (or make the folder), wrap in DDP and compile."""
        if sync_batchnorm and self.ranks.enabled:  # reuses the parameters: the optimizer stays valid
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif sync_batchnorm:
            logger.info("sync_batchnorm ignored: a single process")
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        counters = self._load(state) if state is not None else _Counters()
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
        return counters

    def _load(self, state: dict[str, Any]) -> _Counters:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("scaler"))
        runs.restore_rng_state(state["rng_ranks"][self.ranks.rank] if self.ranks.enabled else state["rng"])
        counters = _Counters(step=int(state["step"]), epoch=int(state["epoch"]), skip=int(state["batch"]),
                        best_val_acc=float(state["best_val_acc"]), best_epoch=int(state["best_epoch"]),
                        rows=[dict(r) for r in state["rows"]], partial=state.get("partial"))
        logger.info("resuming %s at epoch %d, batch %d (step %d of %d)", self.run_dir, counters.epoch + 1,
                    counters.skip,
                    counters.step, self.scheduler.total_steps)
        if self.writer:
            runs.remove_stale_temp_files(self.run_dir)
            runs.write_metrics(self.run_dir / runs.METRICS_FILE, counters.rows)  # drop rows written after the state
        return counters

    def begin_epoch(self, counters: _Counters, epoch: int) -> None:
        counters.epoch, counters.epoch_val, counters.seen, counters.seconds = epoch, None, 0, 0.0
        counters.loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        counters.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        if counters.partial is not None and counters.skip:
            # each rank its own sums
            mine = counters.partial["ranks"][self.ranks.rank] if self.ranks.enabled else counters.partial
            counters.loss_sum += mine["loss_sum"].to(self.device)
            counters.correct += mine["correct"].to(self.device)
            counters.seen, counters.seconds = int(mine["seen"]), float(counters.partial["seconds"])
        counters.partial = None
        counters.lr = self.optimizer.param_groups[0]["lr"]
        counters.go()

    def train_step(self, counters: _Counters, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = _to_device(x, y, self.device, self.channels_last)
        counters.lr = self.optimizer.param_groups[0]["lr"]  # the rate this step runs at (set before it)
        with self.precision.autocast():
            logits = self.forward(x)
            loss = self.loss_fn(logits, y, x)
        self.precision.backward_and_step(loss, self.optimizer)
        counters.loss_sum.add_(loss.detach(), alpha=y.shape[0])
        counters.correct.add_((logits.detach().argmax(1) == y).sum())
        counters.seen += y.shape[0]
        counters.step += 1

    def totals(self, counters: _Counters) -> tuple[Any, Any, int]:
        """The epoch's sums so far over all ranks (a non-finite loss on any rank is non-finite everywhere)."""
        if not self.ranks.enabled:
            return counters.loss_sum, counters.correct, counters.seen
        loss_all, correct_all, seen_all = self.ranks.sum([float(counters.loss_sum), float(counters.correct),
                                                          float(counters.seen)])
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

    def state(self, counters: _Counters, *, epoch: int, batch: int, finished: bool, partial: dict[str, Any] | None,
              rng_ranks: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The resume state (:mod:`snapens.runs`): resuming it continues after ``batch`` batches of ``epoch``."""
        return {
            "format": runs.STATE_FORMAT, "format_version": runs.STATE_VERSION, "finished": finished,
            "epoch": epoch, "batch": batch, "step": counters.step, "epochs": self.epochs,
            "total_steps": self.scheduler.total_steps, "n_cycles": len(self.snapshot_steps),
            "snapshot_steps": self.snapshot_steps, "model_name": self.model_name,
            "model": checkpoint.unwrap_state_dict(self.model), "optimizer": _cpu_copy(self.optimizer.state_dict()),
            "scheduler": _cpu_copy(self.scheduler.state_dict()), "scaler": _cpu_copy(self.precision.state_dict()),
            "rng": rng_ranks[0] if rng_ranks else runs.capture_rng_state(), "rng_ranks": rng_ranks,
            "world_size": self.ranks.world_size, "best_val_acc": counters.best_val_acc,
            "best_epoch": counters.best_epoch,
            "rows": [dict(r) for r in counters.rows], "partial": partial, "extra": {},
        }

    def save_start(self, counters: _Counters, guard: _SignalGuard) -> None:
        # A state before the first step, written synchronously: a run killed before its first epoch end can
        # still be resumed (from the start, bit-exactly) rather than being neither resumable nor restartable.
        rng_ranks = self.gather_rng()
        if self.writer:
            with guard.critical():
                runs.save_training_state(self.state_path, self.state(counters, epoch=0, batch=0, finished=False,
                                                                     partial=None, rng_ranks=rng_ranks))

    def save_stopped(self, counters: _Counters, batch: int, writes: _BackgroundWriter, guard: _SignalGuard) -> None:
        """The state after ``batch`` of the epoch, with every rank's partial sums (a resumed epoch adds up
        exactly as this one would); no rank returns before it is on disk."""
        counters.pause()
        _train_means_or_raise(*self.totals(counters), counters.epoch, counters.step)
        rng_ranks = self.gather_rng()
        sums = {"loss_sum": counters.loss_sum.cpu(), "correct": counters.correct.cpu(), "seen": counters.seen}
        sums_ranks = self.ranks.all_gather(sums) if self.ranks.enabled else None
        if self.writer:
            partial = {**sums, "seconds": counters.seconds, "ranks": sums_ranks}
            writes.wait()
            with guard.critical():
                runs.save_training_state(self.state_path, self.state(
                    counters, epoch=counters.epoch, batch=batch + 1, finished=False, partial=partial,
                    rng_ranks=rng_ranks))
        if self.ranks.enabled:
            self.ranks.barrier()  # nobody exits (and makes torchrun stop the rest) before the state is saved

    def snapshot(self, counters: _Counters, batch: int, writes: _BackgroundWriter, guard: _SignalGuard) -> int:
        """Validate and save the snapshot of the cycle that the step just taken ended; returns its index."""
        counters.pause()
        index, step = self.scheduler.cycle + 1, counters.step
        epoch = counters.epoch + (batch + 1) / self.steps_per_epoch
        train_loss, train_acc = _train_means_or_raise(*self.totals(counters), counters.epoch, step)
        val_loss, val_acc = self.validate()
        if batch + 1 == self.steps_per_epoch:
            counters.epoch_val = (val_loss, val_acc)  # the epoch ends here too: reuse this validation
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
                path = self.store.save(weights, index=index, step=step, epoch=round(epoch, 6), lr=float(counters.lr),
                                       model_name=self.model_name, model_kwargs=self.model_kwargs,
                                       metrics=metrics).path
            val = f", val acc {100 * metrics['val_acc']:.2f}%" if "val_acc" in metrics else ""
            logger.info("*** snapshot %d/%d at step %d (epoch %.2f, lr %.3g%s) -> %s", index, len(self.snapshot_steps),
                        step, epoch, counters.lr, val, path)
            if self.on_cycle_end is not None:
                self.on_cycle_end(SnapshotEvent(index=index, step=step, epoch=epoch, lr=float(counters.lr),
                                                metrics=dict(metrics), path=path))
        counters.go()
        return index

    def next_cycle(self, index: int) -> None:
        """After snapshot ``index``: an independent model for the next cycle, with ``reinit_factory``."""
        if self.reinit_factory is not None and index < len(self.snapshot_steps):
            _reinitialise(self.model, self.optimizer, self.reinit_factory, self.reinit_seed + index)

    def end_epoch(self, counters: _Counters, writes: _BackgroundWriter) -> dict[str, float]:
        """Validate, log, and submit the epoch's files (best, metrics.csv, then state.pt); returns its row."""
        counters.pause()
        counters.train_seconds += counters.seconds
        counters.skip = 0
        loss_now, correct_now, seen_now = self.totals(counters)
        counters.images += seen_now
        train_loss, train_acc = _train_means_or_raise(loss_now, correct_now, seen_now, counters.epoch, counters.step)
        val_loss, val_acc = counters.epoch_val if counters.epoch_val is not None else self.validate()
        done = counters.epoch + 1
        row = {"epoch": done, "step": counters.step, "lr": counters.lr, "train_loss": train_loss,
               "train_acc": train_acc,
               "val_loss": val_loss, "val_acc": val_acc, "seconds": counters.seconds}
        counters.rows.append(row)
        improved = self.val_loader is not None and val_acc > counters.best_val_acc
        if improved:
            counters.best_val_acc, counters.best_epoch = val_acc, done
        rng_ranks = self.gather_rng()
        if self.writer:
            best = checkpoint.unwrap_state_dict(self.model) if improved else None
            best_meta = {"model": {"name": self.model_name, "kwargs": self.model_kwargs}, "epoch": done,
                         "step": counters.step, "val_acc": val_acc, "val_loss": val_loss}
            state = self.state(counters, epoch=done, batch=0, finished=done == self.epochs, partial=None,
                               rng_ranks=rng_ranks)
            writes.submit(functools.partial(_write_epoch_files, self.run_dir, best, best_meta,
                                            [dict(r) for r in counters.rows], state))
        logger.info(
            "epoch %d/%d  step %d  lr %.4g  loss %.4f  acc %.2f%%%s  %.1fs  %.0f img/s%s",
            done, self.epochs, counters.step, counters.lr, train_loss, 100 * train_acc,
            f"  val loss {val_loss:.4f}  val acc {100 * val_acc:.2f}%" if self.val_loader is not None else "",
            counters.seconds, seen_now / max(counters.seconds, 1e-9), "  (best)" if improved else "",
        )
        return row

    def result(self, counters: _Counters) -> FitResult:
        return FitResult(
            run_dir=self.run_dir, snapshots=self.store.list() if self.writer else [], rows=counters.rows,
            best_val_acc=counters.best_val_acc if self.val_loader is not None else math.nan,
            best_epoch=counters.best_epoch,
            steps=counters.step, train_seconds=counters.train_seconds,
            images_per_second=counters.images / max(counters.train_seconds, 1e-9),
        )


def _write_epoch_files(run_dir: Path, best: dict[str, torch.Tensor] | None, best_meta: dict[str, Any],
                       rows: list[dict[str, float]], state: dict[str, Any]) -> None:
    # Order matters for crash safety: state.pt last, so a crash before it replays this epoch.
    if best is not None:
        checkpoint.save_weights(run_dir / runs.BEST_FILE, best, best_meta)
    runs.write_metrics(run_dir / runs.METRICS_FILE, rows)
    runs.save_training_state(run_dir / runs.STATE_FILE, state)


def _train_means_or_raise(
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
