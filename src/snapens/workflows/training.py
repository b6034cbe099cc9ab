"""Train a run folder: :func:`train` (the whole of ``snapens train``) and :func:`train_run` (the training alone).

A run folder (:mod:`snapens.runs`) gets ``config.json`` before the first step, then what
:func:`snapens.engine.fit` writes, then (``evaluate=True``) ``summary.json`` (:func:`snapens.workflows.evaluate`).
Under torchrun every process calls the same function with its :class:`~snapens.distributed.DistContext`;
rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from snapens import runs
from snapens._io import atomic_write_json
from snapens._lock import run_lock
from snapens._precision import Precision
from snapens.config import (
    AUTO_MAX_SNAPSHOTS,
    M_SCHEDULES,
    SCHEDULE_OPTIONS,
    TrainConfig,
    auto_min_cycle_epochs,
    auto_snapshots,
)
from snapens.distributed import (
    DistContext,
    all_ranks_agree,
    broadcast_object,
    distributed_session,
    process_device,
)
from snapens.runs import CONFIG_FILE
from snapens.schedule import SWA_FACTOR, make_scheduler
from snapens.workflows.common import (
    build_loaders,
    check_lr,
    check_recorded_split,
    check_model_name,
    default_run_dir,
    environment_info,
    plural,
    set_threads,
)

__all__ = ["RESUME_FREE", "changed_settings", "check_schedule", "preflight", "resume_info", "run_header", "schedule_options", "train", "train_run"]

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def resume_info(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The config.json of the run to resume (:func:`snapens.runs.read_run_info`), its errors prefixed
    ``cannot resume:``."""
    try:
        return runs.read_run_info(run_dir)
    except ValueError as exc:
        raise ValueError(f"cannot resume: {exc}") from exc


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_header(cfg: TrainConfig, run_dir: Path, device: torch.device, precision: str, threads: int,
               resume: bool = False, world_size: int = 1, n_snapshots: int | None = None) -> str:
    """The lines announced before training: what is trained, on what hardware, and where it goes.

    ``n_snapshots``: the scheduler's count, shown for the schedules whose count is not M (fge, swa).
    """
    procs = (f", {world_size} processes (batch {cfg.batch_size} each, global batch {cfg.batch_size * world_size})"
             if world_size > 1 else "")
    snaps = (f"M={plural(cfg.snapshots, 'snapshot')}{_auto_note(cfg)}"
             if cfg.schedule in M_SCHEDULES or n_snapshots is None else plural(n_snapshots, "snapshot"))
    return (f"snapens train: {cfg.dataset}, {cfg.model}, {plural(cfg.epochs, 'epoch')}, {snaps} "
            f"({cfg.schedule}, {_lr_note(cfg)}), batch {cfg.batch_size}, seed {cfg.seed}\n"
            f"device {device}, precision {precision}, threads {threads}{procs}\n"
            f"run dir: {run_dir}{' (resuming)' if resume else ''}")


def _lr_note(cfg: TrainConfig) -> str:
    """The rates ``cfg.schedule`` runs, from its own parameters: ``lr 0.1 -> 0`` for the cosine schedules."""
    if cfg.schedule == "fge":
        return f"lr {cfg.lr:g} step phase, then cycles {cfg.fge_lr1 * cfg.lr:g} -> {cfg.fge_lr2 * cfg.lr:g}"
    if cfg.schedule == "swa":
        swa = cfg.swa_lr if cfg.swa_lr is not None else SWA_FACTOR * cfg.lr
        return f"lr {cfg.lr:g} -> swa_lr {swa:g} constant from {cfg.swa_start:.0%} of the budget"
    if cfg.schedule == "step":
        return f"lr {cfg.lr:g}, x0.1 at 50% and 75% of the budget"
    return f"lr {cfg.lr:g} -> {cfg.lr_min:g}"


def _auto_note(cfg: TrainConfig) -> str:
    """`` (auto: 32 epochs // 16)`` for a ``--snapshots auto`` run, empty otherwise."""
    if not cfg.snapshots_auto:
        return ""
    try:
        cycle = auto_min_cycle_epochs(cfg.dataset)
    except ValueError:
        cycle = None
    if cycle is None or auto_snapshots(cfg.dataset, cfg.epochs) != cfg.snapshots:
        return " (auto, as recorded in config.json)"  # the table changed since the run was configured
    bound = (f", at most {AUTO_MAX_SNAPSHOTS}" if cfg.epochs // cycle > AUTO_MAX_SNAPSHOTS
             else ", at least 1" if cfg.epochs < cycle else "")
    return f" (auto: {cfg.epochs} epochs // {cycle}{bound})"


def schedule_options(cfg: TrainConfig) -> dict[str, Any]:
    """The options of ``cfg.schedule`` for :func:`snapens.schedule.make_scheduler` (other schedules' left out)."""
    return {name: getattr(cfg, name) for name in SCHEDULE_OPTIONS[cfg.schedule]}


def _absolute_data_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its data location made absolute, so that config.json finds the data from any directory."""
    from snapens.data import DEFAULT_CIFAR10_JPEG, DEFAULT_DATA_DIR

    data_dir, dataset = cfg.data_dir, cfg.dataset
    if dataset.lower().startswith("folder:"):
        path = Path(dataset[len("folder:"):]).expanduser()
        if not path.is_absolute():
            path = Path(data_dir or ".").expanduser() / path
        dataset = f"folder:{path.resolve()}"
    elif data_dir is None and dataset != "digits":
        data_dir = DEFAULT_CIFAR10_JPEG if dataset == "cifar10-jpeg" else DEFAULT_DATA_DIR
    if data_dir is not None:
        data_dir = str(Path(data_dir).expanduser().resolve())
    return dataclasses.replace(cfg, dataset=dataset, data_dir=data_dir)


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """The learning-rate scheduler of ``cfg`` for ``steps_per_epoch`` steps per epoch.

    Raises:
        ValueError: the schedule does not fit the budget, or its cycle lengths or rates are not computable
            (e.g. ``--cycle-mult 1e308`` overflows).
    """
    try:
        return make_scheduler(cfg.schedule, optimizer, total_steps=cfg.epochs * steps_per_epoch,
                              n_cycles=cfg.snapshots, lr_min=cfg.lr_min, steps_per_epoch=steps_per_epoch,
                              **schedule_options(cfg))
    except (OverflowError, ZeroDivisionError) as exc:
        raise ValueError(f"the {cfg.schedule} schedule cannot be computed for these settings (cycle_mult "
                         f"{cfg.cycle_mult:g}, cycle_decay {cfg.cycle_decay:g}, lr {cfg.lr:g}): {exc}") from None


def check_schedule(cfg: TrainConfig, splits: Any) -> None:
    """Build ``cfg``'s scheduler for the training split of ``splits`` (one process) without training: the check
    :func:`train_run` makes before its first write, for callers that train several runs (``reproduce``).

    Raises:
        ValueError: the schedule does not fit the budget (e.g. FGE cycles longer than the budget left).
    """
    train_loader, _ = build_loaders(cfg, splits, "cpu")
    _scheduler(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr), len(train_loader))


#: Settings that may differ when a run is resumed: where and how fast it runs, not what it computes.
RESUME_FREE = ("device", "threads", "data_dir", "download")


def changed_settings(cfg: TrainConfig, run_dir: str | os.PathLike[str]) -> list[str]:
    """The settings of ``cfg`` that differ from those recorded in ``run_dir/config.json`` (:data:`RESUME_FREE`
    aside): what resuming the run with ``cfg`` would change.

    Raises:
        ValueError: ``run_dir`` holds no readable config.json (``cannot resume: ...``).
    """
    import json

    saved = resume_info(run_dir)["config"]
    now = json.loads(json.dumps(_absolute_data_paths(cfg).to_dict()))  # tuples as lists, as config.json has them
    return sorted(k for k, v in now.items() if k not in RESUME_FREE and saved.get(k) != v)


def preflight(configs: list[TrainConfig]) -> None:
    """Check runs before any of them is trained: each config's model and schedule, on the dataset of the first
    (read once; the configs must share it). ``snapens reproduce`` trains one run per method: a method that
    cannot run must fail before the first one spends its budget.

    Raises:
        ValueError / FileNotFoundError: an unknown model, a missing dataset, a schedule that does not fit.
    """
    from snapens.data import load_dataset

    if not configs:
        return
    for cfg in configs:
        check_model_name(cfg.model, **cfg.model_kwargs)
    first = _absolute_data_paths(configs[0])
    with torch.random.fork_rng(devices=[]):
        splits = load_dataset(first.dataset, data_dir=first.data_dir, download=first.download,
                              val_size=first.val_size, seed=first.seed, limit_train=first.limit_train,
                              limit_test=first.limit_test)
        for cfg in configs:
            check_schedule(cfg, splits)


def _check_run_dir(run_dir: Path, resume: bool, start_over: bool) -> None:
    """Refuse a file in the folder's place, a run to resume that cannot be, or a run that would be overwritten."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--run-dir {run_dir} is a file, not a folder")
    if resume:
        resume_info(run_dir)
        if not start_over:
            runs.read_resume_state(run_dir)  # finished or foreign -> ValueError, nothing touched
    elif runs.run_exists(run_dir) or (run_dir / CONFIG_FILE).exists():
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")


def _load_splits(cfg: TrainConfig, ctx: DistContext, evaluate: bool) -> Any:
    """The dataset of ``cfg``: rank 0 reads it first (it may download it or build a cache), the others then."""
    from snapens.data import load_dataset

    def load() -> Any:
        return load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, val_size=cfg.val_size,
                            seed=cfg.seed, limit_train=cfg.limit_train, limit_test=cfg.limit_test)

    splits = None
    with all_ranks_agree():
        if ctx.is_main:
            splits = load()
    with all_ranks_agree():
        if splits is None:
            splits = load()
        if evaluate and len(splits.test) == 0:
            raise ValueError(f"the test split of {cfg.dataset} is empty, so the run could not be evaluated; add "
                             "test images or pass --no-eval")
    if ctx.is_main:
        logger.info("dataset %s: %d train, %d val, %d test images, %d classes", splits.name, len(splits.train),
                    len(splits.val), len(splits.test), len(splits.classes))
    return splits


def _run_record(cfg: TrainConfig, splits: Any, model_kwargs: dict[str, Any], device: torch.device,
                precision: Precision, ctx: DistContext, sync_bn: bool, evaluate: bool,
                extra_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The content of config.json: the resolved config, the model, the dataset and the environment."""
    from snapens.data import split_fingerprint  # dataset.split_sha256: evaluate & co. rebuild this very split

    return {
        "format_version": 1,
        "config": cfg.to_dict(),
        "model": {"name": cfg.model, "kwargs": model_kwargs},
        "dataset": {"name": splits.name, "classes": list(splits.classes), "num_train": len(splits.train),
                    "num_val": len(splits.val), "num_test": len(splits.test), "mean": list(splits.mean),
                    "std": list(splits.std), "image_shape": [splits.in_channels, *splits.image_size],
                    "split_sha256": split_fingerprint(splits)},
        "environment": environment_info(device, precision.name, ctx.world_size),
        "distributed": {"world_size": ctx.world_size, "global_batch_size": cfg.batch_size * ctx.world_size,
                        "sync_bn": bool(sync_bn and ctx.enabled)},
        "evaluate": bool(evaluate),
        **dict(extra_info or {}),
    }


def train_run(
    cfg: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
    dist_ctx: DistContext | None = None,
    sync_bn: bool = False,
    evaluate: bool = True,
    loss_fn: LossFn | None = None,
    extra_info: Mapping[str, Any] | None = None,
    device: torch.device | None = None,
) -> Path:
    """Train one run described by ``cfg`` into ``run_dir`` (data, model, SGD, scheduler, :func:`engine.fit`).

    Everything that can be checked is checked before any file is written: an existing run (without
    ``resume``), a finished or foreign run (with it), the device and precision, the dataset and the model.
    Writes ``config.json`` (the resolved config and the environment) before training starts. It neither locks
    the folder nor evaluates the run: :func:`train` does both.

    Under torchrun (``dist_ctx.enabled``, inside :func:`snapens.distributed.distributed_session`) every rank
    calls it with the same arguments: each trains on its shard of every global batch, a check failing on one
    rank fails on all, rank 0 reads the dataset first (it may download it or write a cache) and alone
    announces and writes files.

    Args:
        cfg: the resolved configuration (``cfg.batch_size`` is per process).
        run_dir: the run folder (the same on every rank).
        resume: continue the run in ``run_dir`` from its ``state.pt``.
        progress: tqdm progress bars (rank 0 only).
        announce: receives the run header (:func:`run_header`) once everything is validated; logged at INFO
            when None. Rank 0 only.
        dist_ctx: this process's place in a torchrun job; a single process when None.
        sync_bn: with several processes, SyncBatchNorm (CUDA only).
        evaluate: the run is evaluated on the test split when it ends: an empty test split is refused before
            training. Recorded in config.json, so that a resumed run keeps the setting.
        loss_fn: the training loss ``(logits, y, x)`` (see :func:`engine.fit`); cross-entropy when None.
        extra_info: more entries of config.json (e.g. ``snapens distill``'s ``"distill"``).
        device: this process's device, resolved by the caller (:func:`snapens.distributed.process_device`);
            resolved from ``cfg.device`` when None.

    Returns:
        ``run_dir``.

    Raises:
        ValueError / FileNotFoundError: bad input, reported before any file is written.
        engine.TrainingInterrupted: SIGINT/SIGTERM (the state was saved).
        engine.NonFiniteLossError: the loss diverged.
    """
    from snapens import engine
    from snapens.data.loader import derive_seed
    from snapens.models import build_model

    ctx = dist_ctx or DistContext()
    if ctx.enabled and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"dist_ctx has world_size {ctx.world_size}, but no process group is initialised "
                         "(use snapens.distributed.distributed_session)")
    run_dir = Path(run_dir)
    cfg = _absolute_data_paths(cfg)
    # config.json without any training file: killed after writing it and before the first state (a few ms);
    # nothing was trained, so the run starts from step 0 with its recorded config: the same bits.
    start_over = resume and not runs.run_exists(run_dir)
    with all_ranks_agree():
        _check_run_dir(run_dir, resume, start_over)
        device = process_device(cfg.device, ctx) if device is None else device
        precision = Precision.resolve(cfg.precision, device)  # resolved once, used by fit too
        check_lr(cfg.lr)  # SGD overflows mid-run on absurd rates (MAX_LR)
        if cfg.swa_lr is not None:
            check_lr(cfg.swa_lr, "swa_lr")
        threads = set_threads(cfg.threads)
        cfg = dataclasses.replace(cfg, threads=threads)  # recorded, so that --resume uses the same count
        check_model_name(cfg.model, **cfg.model_kwargs)  # an unknown model fails here, before the data is read
    splits = _load_splits(cfg, ctx, evaluate)
    with all_ranks_agree():
        if resume and ctx.is_main:  # config.json edited since training (e.g. its seed): another split, refused
            check_recorded_split(splits, resume_info(run_dir))
    model_kwargs = {"num_classes": len(splits.classes), "in_channels": splits.in_channels, **cfg.model_kwargs}
    _seed_everything(cfg.seed)
    model = build_model(cfg.model, **model_kwargs)
    if ctx.rank > 0:
        # Each rank its own dropout stream (rank 0 keeps the single-process one); the initial weights are the
        # same on every rank (built above from cfg.seed, and DDP broadcasts rank 0's anyway).
        torch.manual_seed(derive_seed("rank", cfg.seed, ctx.rank))
    train_loader, val_loader = build_loaders(cfg, splits, device, rank=ctx.rank, world_size=ctx.world_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    # len(train_loader) is batches per epoch *per rank*, the same on every rank: every rank takes T steps.
    with all_ranks_agree():
        scheduler = _scheduler(cfg, optimizer, len(train_loader))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if ctx.is_main:
        (announce or logger.info)(run_header(cfg, run_dir, device, precision.name, threads, resume, ctx.world_size,
                                             n_snapshots=len(scheduler.snapshot_steps)))
        if start_over:
            logger.info("%s has no training state yet (stopped before its first step): starting it from step 0",
                        run_dir)
        if not resume:
            atomic_write_json(run_dir / CONFIG_FILE, _run_record(cfg, splits, model_kwargs, device, precision, ctx,
                                                                 sync_bn, evaluate, extra_info))
    reinit = None
    if cfg.schedule == "single-cycle":
        def reinit() -> torch.nn.Module:
            return build_model(cfg.model, **model_kwargs)
    engine.fit(
        model=model, optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, epochs=cfg.epochs,
        run_dir=run_dir, model_name=cfg.model, model_kwargs=model_kwargs, val_loader=val_loader, device=device,
        precision=precision, channels_last=cfg.channels_last, compile=cfg.compile, reinit_factory=reinit,
        # Members k >= 1 of the single-cycle baseline use seeds 1000 * (seed + 1) + k: distinct across seeds.
        reinit_seed=1000 * (cfg.seed + 1), resume=resume and not start_over, progress=progress and ctx.is_main,
        sync_batchnorm=sync_bn, loss_fn=loss_fn,
    )
    return run_dir


def _trained_not_evaluated(run_dir: Path) -> bool:
    """Whether ``run_dir`` finished training but has no ``summary.json`` (e.g. killed while evaluating)."""
    state = run_dir / runs.STATE_FILE
    if not state.is_file() or (run_dir / runs.SUMMARY_FILE).exists():
        return False
    try:
        return bool(runs.load_training_state(state).get("finished"))
    except (OSError, ValueError, RuntimeError):
        return False  # train_run reports an unreadable state


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    evaluate: bool = True,
    progress: bool = False,
    plot: bool = False,
    announce: Callable[[str], None] | None = None,
    on_summary: Callable[[dict[str, Any]], None] | None = None,
    sync_bn: bool = False,
    dist_ctx: DistContext | None = None,
) -> Path:
    """Train a run folder, then evaluate it on the test split: ``snapens train`` as a function.

    Holds the run folder's lock (rank 0) from before its first write until the evaluation (and plots) end. A
    run resumed after it finished training but before its evaluation (killed meanwhile) is evaluated only.

    Example:
        >>> cfg = TrainConfig(epochs=2, snapshots=2, device="cpu", threads=1)   # doctest: +SKIP
        >>> run = snapens.train(cfg, "runs/py")                               # doctest: +SKIP
        >>> snapens.evaluate(run)["ensemble_equal"]["error"]                   # doctest: +SKIP

    Args:
        config: the resolved configuration (:class:`~snapens.config.TrainConfig`,
            :func:`~snapens.config.resolve_config`).
        run_dir: the run folder; ``runs/<dataset>-<model>-<time>`` when None.
        resume: continue the interrupted run in ``run_dir`` (``config`` must be the one it was started with).
        evaluate: evaluate the run on the test split when it ends (``summary.json``,
            :func:`~snapens.workflows.evaluation.evaluate_run`, on the training device).
        progress: tqdm progress bars on stderr.
        plot: also write the run's PNGs (:func:`~snapens.workflows.plotting.plot_run`) after the evaluation when
            matplotlib is installed; a failure to draw them is logged as a warning, never raised.
        announce: receives the run header and notes (plots written or skipped); logged at INFO when None.
        on_summary: receives the evaluation's summary (rank 0).
        sync_bn: under torchrun, SyncBatchNorm (CUDA only).
        dist_ctx: under torchrun, this process's place (:func:`snapens.distributed.launch_context`): the process
            group is set up and torn down here. A single process when None.

    Returns:
        The run folder.

    Raises:
        ValueError / FileNotFoundError: bad input, reported before any file is written.
        snapens._lock.RunFolderBusy: another process holds the run folder.
        snapens.engine.TrainingInterrupted: SIGINT/SIGTERM (the state was saved; resume with ``resume=True``).
        snapens.engine.NonFiniteLossError: the loss diverged.
    """
    from snapens.workflows.evaluation import evaluate_run

    ctx = dist_ctx or DistContext()
    tell = announce or logger.info
    device = process_device(config.device, ctx)  # resolved once: training and evaluation use it
    with contextlib.ExitStack() as owned:
        with distributed_session(ctx, device):
            # Under torchrun the default folder is named after rank 0's clock, on every rank.
            folder = broadcast_object(Path(run_dir) if run_dir is not None
                                      else default_run_dir(config.dataset, config.model))
            with all_ranks_agree():
                if folder.exists() and not folder.is_dir():
                    raise ValueError(f"--run-dir {folder} is a file, not a folder")
                if ctx.is_main:  # rank 0 writes the folder, so it alone owns it, until evaluation and plots end
                    owned.enter_context(run_lock(folder, create=True))
                only_evaluate = resume and evaluate and _trained_not_evaluated(folder)
            if broadcast_object(only_evaluate):
                if ctx.is_main:
                    tell(f"{folder} finished training but was not evaluated: evaluating it")
            else:
                train_run(config, folder, resume=resume, progress=progress and ctx.is_main, announce=announce,
                          dist_ctx=ctx, sync_bn=sync_bn, evaluate=evaluate, device=device)
        if ctx.is_main and evaluate:
            runs.remove_stale_temp_files(folder)  # of a process killed while evaluating or plotting
            summary = evaluate_run(folder, device=device, progress=progress)
            if on_summary is not None:
                on_summary(summary)
            if plot:
                from snapens.workflows.plotting import plot_if_possible

                plot_if_possible(folder, device, tell)
    return folder
