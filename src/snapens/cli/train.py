"""``snapens train``: train one network with M learning-rate cycles and keep a snapshot at the end of each.

With no arguments it trains the embedded default (scikit-learn's 8x8 digits, ``cnn-small``), then evaluates
the snapshot ensemble on the test split and writes its plots: 24 s on a quiet 2-core CPU, 39 s with
``--threads 1`` on a busy one (the README has the measurements). ``--limit-train N --limit-test N`` try a big
dataset on a stratified subset in minutes. Every default comes from
:class:`snapens.config.TrainConfig`; ``--preset`` overlays a named setting (``--list-presets``), explicit flags
override both.

The Keras implementation's flags still work: ``--M 5 --nb_epoch 200 --alpha_zero 0.1 --model wrn --wrn_N 2
--wrn_k 4`` is ``--snapshots 5 --epochs 200 --lr 0.1 --model wrn-16-4``.

Exit codes: 0 done, 2 bad input, 130 SIGINT, 143 SIGTERM (both save a resumable state first; continue with
``snapens train --resume --run-dir RUN_DIR``).

Several GPUs (or CPU processes): ``torchrun --nproc_per_node=N -m snapens train --run-dir RUN_DIR ...``
(or ``python -m torch.distributed.run --nproc_per_node=N -m snapens train ...``) trains data-parallel, one
process per GPU (NCCL, device ``cuda:LOCAL_RANK``) or, on CPUs, per process (gloo). ``--batch-size`` is per
process: the global batch is batch_size x N, and the learning rate is not rescaled (pass --lr for that).
Every process takes the same steps, so the schedule and the snapshots fall where they would in one process
with the global batch. Rank 0 alone prints, validates (on the whole validation split) and writes the run
folder; resuming reads its state.pt on every process, so RUN_DIR must be on a filesystem they share, and the
run must be resumed with the same N. SIGINT/SIGTERM reach all processes (torchrun forwards them); they stop
together within 10 steps and rank 0 saves the state. ``--sync-bn`` computes BatchNorm statistics over the
global batch (CUDA only). The test evaluation at the end runs on rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import random
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from snapens import engine, runs
from snapens._io import atomic_write_json, read_json
from snapens._lock import run_lock
from snapens._precision import Precision
from snapens.cli import CLIError
from snapens.cli._common import (
    build_loaders,
    configure_logging,
    default_run_dir,
    environment_info,
    format_table,
    plural,
    progress_enabled,
    set_threads,
)
from snapens.distributed import (
    DistContext,
    all_ranks_agree,
    broadcast_object,
    distributed_session,
    launch_context,
    process_device,
)
from snapens.runs import CONFIG_FILE
from snapens.schedule import make_scheduler
from snapens.config import (
    AUTO_MAX_SNAPSHOTS,
    M_SCHEDULES,
    PRECISIONS,
    PRESETS,
    SCHEDULE_OPTIONS,
    SCHEDULES,
    TrainConfig,
    auto_min_cycle_epochs,
    auto_snapshots,
    resolve_config,
)

__all__ = ["register", "run", "train_run", "config_from_args", "legacy_model_name"]

logger = logging.getLogger(__name__)

#: Flags that may change when a run is resumed: where and how fast it runs, not what it computes.
RESUME_OVERRIDABLE = ("device", "threads", "data_dir", "download")
_LEGACY_SIZES = ("wrn_N", "wrn_k", "dn_depth", "dn_growth_rate")


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser("train", help="train a snapshot ensemble", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"digits, cifar10, cifar100, svhn, cifar10-jpeg or folder:PATH "
                                     f"(default: {d.dataset})")
    g.add_argument("--data-dir", help="folder holding the dataset files (default: ./data)")
    g.add_argument("--download", action="store_true", default=None, help="download CIFAR archives if missing")
    g.add_argument("--val-size", type=_val_size, metavar="N|F",
                   help="training images held out for validation: a count, a fraction, or 0 (default: the "
                        "dataset's)")
    g.add_argument("--no-augment", dest="augment", action="store_const", const=False, default=None,
                   help="turn off the dataset's default augmentation")
    g.add_argument("--limit-train", type=int, metavar="N",
                   help="train on a stratified subset of N training images, seeded by --seed (validation shrinks "
                        "in proportion; default: all)")
    g.add_argument("--limit-test", type=int, metavar="N",
                   help="evaluate on a stratified subset of N test images, the same for every seed (default: all)")
    g = p.add_argument_group("model and schedule")
    g.add_argument("--model", help=f"wrn-D-K, densenet-D-K, densenet-bc-D-K, resnet-D, cnn-small (default: "
                                   f"{d.model}); legacy: wrn, dn")
    g.add_argument("--epochs", type=int, help=f"training budget in epochs (default: {d.epochs})")
    g.add_argument("--snapshots", type=_snapshots, metavar="M",
                   help=f"cycles = snapshots, or auto: epochs // the dataset's shortest useful cycle, 1 to "
                        f"{AUTO_MAX_SNAPSHOTS} (README, Training runs; default: {d.snapshots})")
    g.add_argument("--schedule", choices=SCHEDULES, help=f"(default: {d.schedule})")
    g.add_argument("--lr", type=float, help=f"restart learning rate lr0 (default: {d.lr})")
    g.add_argument("--lr-min", type=float, help=f"learning rate at the end of each cycle (default: {d.lr_min})")
    g.add_argument("--cycle-decay", type=float,
                   help=f"cosine schedules: each restart's peak is the previous one's times this (default: "
                        f"{d.cycle_decay})")
    g.add_argument("--cycle-mult", type=float,
                   help=f"cosine schedules: each cycle this many times longer than the last, lengths summing to "
                        f"the budget (default: {d.cycle_mult})")
    g.add_argument("--fge-start", type=float, metavar="F",
                   help=f"fge: fraction of the budget trained before the first cycle (default: {d.fge_start})")
    g.add_argument("--cycle-epochs", type=int,
                   help=f"fge: epochs per triangular cycle, a snapshot at its middle (default: {d.cycle_epochs})")
    g.add_argument("--swa-start", type=float, metavar="F",
                   help=f"swa: fraction of the budget before the constant SWA rate (default: {d.swa_start})")
    g.add_argument("--swa-lr", type=float,
                   help="swa: the constant SWA learning rate, a snapshot at each epoch end (default: lr / 2)")
    g.add_argument("--batch-size", type=int,
                   help=f"per process under torchrun: the global batch is this times the process count, the "
                        f"LR is not rescaled (default: {d.batch_size})")
    g.add_argument("--momentum", type=float, help=f"(default: {d.momentum})")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Nesterov momentum (default: {d.nesterov})")
    g.add_argument("--weight-decay", type=float, help=f"(default: {d.weight_decay})")
    g.add_argument("--seed", type=int, help=f"(default: {d.seed})")
    g.add_argument("--preset", help="a named setting, e.g. paper-wrn-32-4-cifar100 (see --list-presets)")
    g.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    g.add_argument("--list-models", action="store_true", help="print the model name forms and examples and exit")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", help=f"auto, cpu, cuda, cuda:N (default: {d.device})")
    g.add_argument("--precision", choices=PRECISIONS,
                   help=f"auto = bf16 where the hardware runs it natively, else fp32 (default: {d.precision})")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False, default=None,
                   help="keep the NCHW memory format")
    g.add_argument("--threads", type=int,
                   help=f"CPU threads for torch (default: {d.threads}). More threads pay off only for big models "
                        "on cores nobody else uses; on a shared or busy machine keep 1 (extra threads spin "
                        "and can make a run 10x slower). Kept by --resume: another count changes the bits")
    g.add_argument("--sync-bn", action="store_true", default=None,
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)")
    g = p.add_argument_group("run folder")
    g.add_argument("--run-dir", type=Path, help="where to write the run (default: runs/<dataset>-<model>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --run-dir")
    g.add_argument("--no-eval", dest="evaluate", action="store_const", const=False, default=None,
                   help="skip the test-set evaluation at the end (kept by --resume)")
    g.add_argument("--quiet", action="store_true", help="no progress bars and no per-epoch lines")
    g = p.add_argument_group("legacy flags (the Keras implementation)")
    g.add_argument("--M", dest="legacy_M", type=int, metavar="M", help="= --snapshots")
    g.add_argument("--nb_epoch", dest="legacy_nb_epoch", type=int, metavar="N", help="= --epochs")
    g.add_argument("--alpha_zero", dest="legacy_alpha_zero", type=float, metavar="LR", help="= --lr")
    g.add_argument("--wrn_N", type=int, metavar="N", help="with --model wrn: depth 6N+4 (default 2)")
    g.add_argument("--wrn_k", type=int, metavar="K", help="with --model wrn: widen factor (default 4)")
    g.add_argument("--dn_depth", type=int, metavar="D", help="with --model dn: depth (default 40)")
    g.add_argument("--dn_growth_rate", type=int, metavar="K", help="with --model dn: growth rate (default 12)")
    p.set_defaults(func=run)


def _snapshots(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer M or auto, got {text!r}") from None


def _val_size(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None


def legacy_model_name(model: str, args: argparse.Namespace) -> str:
    """Map the Keras script's ``--model wrn|dn`` and its size flags to a model name (``wrn-16-4``, ...)."""
    from snapens.models import densenet_name_from_legacy, wrn_name_from_legacy

    if model == "wrn":
        if args.dn_depth is not None or args.dn_growth_rate is not None:
            raise CLIError("--dn_depth/--dn_growth_rate go with --model dn, not --model wrn")
        return wrn_name_from_legacy(2 if args.wrn_N is None else args.wrn_N, 4 if args.wrn_k is None else args.wrn_k)
    if args.wrn_N is not None or args.wrn_k is not None:
        raise CLIError("--wrn_N/--wrn_k go with --model wrn, not --model dn")
    return densenet_name_from_legacy(40 if args.dn_depth is None else args.dn_depth,
                                     12 if args.dn_growth_rate is None else args.dn_growth_rate)


def _merge(new: Any, old: Any, new_flag: str, old_flag: str) -> Any:
    if old is None:
        return new
    if new is not None and new != old:
        raise CLIError(f"{new_flag} {new} and {old_flag} {old} disagree; give one of them")
    return old


def explicit_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (None where not given), legacy flags mapped."""
    model = args.model
    if model in ("wrn", "dn"):
        model = legacy_model_name(model, args)
    elif any(getattr(args, k) is not None for k in _LEGACY_SIZES):
        raise CLIError("--wrn_N, --wrn_k, --dn_depth and --dn_growth_rate need --model wrn or --model dn")
    return {
        "dataset": args.dataset, "data_dir": args.data_dir, "download": args.download, "model": model,
        "epochs": _merge(args.epochs, args.legacy_nb_epoch, "--epochs", "--nb_epoch"),
        "snapshots": _merge(args.snapshots, args.legacy_M, "--snapshots", "--M"),
        "schedule": args.schedule, "lr": _merge(args.lr, args.legacy_alpha_zero, "--lr", "--alpha_zero"),
        "lr_min": args.lr_min, "cycle_decay": args.cycle_decay, "cycle_mult": args.cycle_mult,
        "fge_start": args.fge_start, "cycle_epochs": args.cycle_epochs, "swa_start": args.swa_start,
        "swa_lr": args.swa_lr, "batch_size": args.batch_size, "momentum": args.momentum,
        "nesterov": args.nesterov, "weight_decay": args.weight_decay, "val_size": args.val_size,
        "augment": args.augment, "limit_train": args.limit_train, "limit_test": args.limit_test,
        "seed": args.seed, "device": args.device, "precision": args.precision,
        "channels_last": args.channels_last, "compile": args.compile, "threads": args.threads,
    }


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then ``--preset``, then explicit flags: the resolved :class:`TrainConfig`."""
    overrides = explicit_overrides(args)
    if overrides["snapshots"] is not None and overrides["schedule"] not in (None, *M_SCHEDULES):
        raise CLIError(f"--snapshots {overrides['snapshots']} applies to {', '.join(M_SCHEDULES)}; the {overrides['schedule']} schedule "
                       "takes as many snapshots as its budget holds (see --cycle-epochs, --swa-start)")
    return resolve_config(args.preset, **overrides)


def _read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise CLIError(f"cannot resume: {run_dir} is not a directory")
    if not path.exists():
        raise CLIError(f"cannot resume: {run_dir} is not a snapens run folder ({CONFIG_FILE} is missing)")
    try:
        info = read_json(path)  # refuses a FIFO rather than blocking on it
        info["config"] = dict(info["config"])
        return info
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"cannot resume: {path} is unreadable: {exc}") from exc


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    return _read_run_info(run_dir)["config"]


def _sync_bn(args: argparse.Namespace) -> bool:
    """``--sync-bn``; on resume the run's own setting (changing it would change what the run computes)."""
    if not args.resume:
        return bool(args.sync_bn)
    saved = bool((_read_run_info(args.run_dir).get("distributed") or {}).get("sync_bn", False))
    if args.sync_bn and not saved:
        raise CLIError(f"--resume continues the run as configured in {args.run_dir / CONFIG_FILE}; "
                       "do not change --sync-bn")
    return saved


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_header(cfg: TrainConfig, run_dir: Path, device: torch.device, precision: str, threads: int,
               resume: bool = False, world_size: int = 1, n_snapshots: int | None = None) -> str:
    """The lines printed before training: what is trained, on what hardware, and where it goes.

    ``n_snapshots``: the scheduler's count, shown for the schedules whose count is not M (fge, swa).
    """
    procs = (f", {world_size} processes (batch {cfg.batch_size} each, global batch {cfg.batch_size * world_size})"
             if world_size > 1 else "")
    snaps = (f"M={plural(cfg.snapshots, 'snapshot')}{_auto_note(cfg)}"
             if cfg.schedule in M_SCHEDULES or n_snapshots is None else plural(n_snapshots, "snapshot"))
    return (f"snapens train: {cfg.dataset}, {cfg.model}, {plural(cfg.epochs, 'epoch')}, {snaps} "
            f"({cfg.schedule}, lr {cfg.lr:g} -> {cfg.lr_min:g}), batch {cfg.batch_size}, seed {cfg.seed}\n"
            f"device {device}, precision {precision}, threads {threads}{procs}\n"
            f"run dir: {run_dir}{' (resuming)' if resume else ''}")


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
    """The options of ``cfg.schedule`` for :func:`engine.make_scheduler` (those of other schedules left out)."""
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


def train_run(
    cfg: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
    dist_ctx: DistContext | None = None,
    sync_bn: bool = False,
    evaluate: bool = True,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    extra_info: Mapping[str, Any] | None = None,
) -> Path:
    """Train one run described by ``cfg`` into ``run_dir`` (data, model, SGD, scheduler, :func:`engine.fit`).

    Everything that can be checked is checked before any file is written: an existing run (without
    ``resume``), a finished or foreign run (with it), the device and precision, the dataset and the model.
    Writes ``config.json`` (the resolved config and the environment) before training starts.

    Under torchrun (``dist_ctx.enabled``, inside :func:`~snapens.cli._common.distributed_session`) every rank
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
            training. Recorded in config.json, so that ``--resume`` keeps ``--no-eval``.
        loss_fn: the training loss ``(logits, y, x)`` (see :func:`engine.fit`); cross-entropy when None.
        extra_info: more entries of config.json (e.g. ``snapens distill``'s ``"distill"``).

    Returns:
        ``run_dir``.

    Raises:
        ValueError / CLIError / FileNotFoundError: bad input, reported before any file is written.
        engine.TrainingInterrupted: SIGINT/SIGTERM (the state was saved).
        engine.NonFiniteLossError: the loss diverged.
    """
    from snapens.data import load_dataset
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
        if run_dir.exists() and not run_dir.is_dir():
            raise CLIError(f"--run-dir {run_dir} is a file, not a folder")
        if resume:
            _read_run_config(run_dir)
            if not start_over:
                runs.read_resume_state(run_dir)  # finished or foreign -> ValueError, nothing touched
        elif runs.run_exists(run_dir) or (run_dir / CONFIG_FILE).exists():
            raise CLIError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
        device = process_device(cfg.device, ctx)
        precision = Precision.resolve(cfg.precision, device)  # resolved once, used by fit too
        threads = set_threads(cfg.threads)
        cfg = dataclasses.replace(cfg, threads=threads)  # recorded, so that --resume uses the same count
        with torch.random.fork_rng(devices=[]):  # an unknown model name fails here, before the data is read
            try:
                build_model(cfg.model, num_classes=10, in_channels=3, **cfg.model_kwargs)
            except ValueError as exc:
                raise CLIError(f"{exc}; `snapens train --list-models` lists them all") from exc

    def load() -> Any:
        return load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, val_size=cfg.val_size,
                            seed=cfg.seed, limit_train=cfg.limit_train, limit_test=cfg.limit_test)

    # Rank 0 reads the dataset first (it may download it or build a cache); the others wait, then read it.
    splits = None
    with all_ranks_agree():
        if ctx.is_main:
            splits = load()
    with all_ranks_agree():
        if splits is None:
            splits = load()
        if evaluate and len(splits.test) == 0:
            raise CLIError(f"the test split of {cfg.dataset} is empty, so the run could not be evaluated; add test "
                           "images or pass --no-eval")
    if ctx.is_main:
        logger.info("dataset %s: %d train, %d val, %d test images, %d classes", splits.name, len(splits.train),
                    len(splits.val), len(splits.test), len(splits.classes))
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
    scheduler = make_scheduler(cfg.schedule, optimizer, total_steps=cfg.epochs * len(train_loader),
                                      n_cycles=cfg.snapshots, lr_min=cfg.lr_min, steps_per_epoch=len(train_loader),
                                      **schedule_options(cfg))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if ctx.is_main:
        (announce or logger.info)(run_header(cfg, run_dir, device, precision.name, threads, resume, ctx.world_size,
                                             n_snapshots=len(scheduler.snapshot_steps)))
    if start_over and ctx.is_main:
        logger.info("%s has no training state yet (stopped before its first step): starting it from step 0",
                    run_dir)
    if ctx.is_main and not resume:
        atomic_write_json(run_dir / CONFIG_FILE, {
            "format_version": 1,
            "config": cfg.to_dict(),
            "model": {"name": cfg.model, "kwargs": model_kwargs},
            "dataset": {"name": splits.name, "classes": list(splits.classes), "num_train": len(splits.train),
                        "num_val": len(splits.val), "num_test": len(splits.test), "mean": list(splits.mean),
                        "std": list(splits.std)},
            "environment": environment_info(device, precision.name, ctx.world_size),
            "distributed": {"world_size": ctx.world_size, "global_batch_size": cfg.batch_size * ctx.world_size,
                            "sync_bn": bool(sync_bn and ctx.enabled)},
            "evaluate": bool(evaluate),
            **dict(extra_info or {}),
        })
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


def _resume_config(args: argparse.Namespace) -> TrainConfig:
    if args.run_dir is None:
        raise CLIError("--resume needs --run-dir RUN_DIR (the folder of the interrupted run)")
    if args.preset is not None:
        raise CLIError(f"--resume continues the run as configured in {args.run_dir / CONFIG_FILE}; "
                       "do not pass --preset")
    overrides = explicit_overrides(args)
    saved = _read_run_config(args.run_dir)
    if overrides["snapshots"] == "auto" and saved.get("snapshots_auto"):
        overrides["snapshots"] = None  # the original command repeated: keep the M it picked, even if the table changed
    # Repeating the original command with --resume is fine; changing what the run computes is not.
    changed = sorted(k for k, v in overrides.items()
                     if v is not None and k not in RESUME_OVERRIDABLE and saved.get(k) != v)
    if changed:
        names = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise CLIError(f"--resume continues the run as configured in {args.run_dir / CONFIG_FILE}; "
                       f"do not change {names}")
    if saved.get("threads") is None:  # written before the count was recorded: the one the run used
        saved["threads"] = (_read_run_info(args.run_dir).get("environment") or {}).get("threads")
    if overrides["threads"] is not None and saved["threads"] is not None and overrides["threads"] != saved["threads"]:
        logger.warning("warning: --threads %d, but the run started with %d threads: the resumed run's results "
                       "will differ (slightly) from an uninterrupted run's; resume without --threads to keep them "
                       "bit-identical", overrides["threads"], saved["threads"])
    saved.update({k: overrides[k] for k in RESUME_OVERRIDABLE if overrides[k] is not None})
    try:
        return TrainConfig(**saved)
    except TypeError as exc:
        raise CLIError(f"cannot resume: {args.run_dir / CONFIG_FILE} does not match this snapens: {exc}") from exc


def _print_presets() -> None:
    rows = [[name, p["model"], p["dataset"], p["epochs"], p["snapshots"], p["lr"], p["batch_size"]]
            for name, p in PRESETS.items()]
    print(format_table(["preset", "model", "dataset", "epochs", "M", "lr0", "batch"], rows))


def _plot_if_possible(run_dir: Path, device: torch.device) -> None:
    """The run's PNGs (``snapens plot``) when matplotlib is installed; a note otherwise, never a failure.

    Plots are optional output: a failure to draw or write them (e.g. an unwritable ``plots/``) is a warning,
    and the training keeps its exit code 0.
    """
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return
    from snapens.cli.plot import plot_run

    try:
        paths = plot_run(run_dir, device=str(device))
    except Exception as exc:  # noqa: BLE001 - any plotting failure: the run itself is complete
        print(f"snapens: warning: plots not written ({exc}); the run is complete, retry with: snapens plot "
              f"{run_dir}", file=sys.stderr)
        return
    print(f"plots: {', '.join(str(p) for p in paths)}")


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Temp files of ``summary.json``, weights and plots left by a process killed while evaluating or plotting
    (safe to remove: this process holds the folder's lock and training is over)."""
    for folder in (run_dir, run_dir / runs.PLOTS_DIR):
        for tmp in folder.glob(".*.tmp*"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _evaluate_setting(args: argparse.Namespace) -> bool:
    """``--no-eval``; on resume, the run's own setting unless ``--no-eval`` is given now."""
    if args.evaluate is not None:
        return bool(args.evaluate)
    if args.resume and args.run_dir is not None and (args.run_dir / CONFIG_FILE).is_file():
        return bool(_read_run_info(args.run_dir).get("evaluate", True))
    return True


def _trained_not_evaluated(run_dir: Path) -> bool:
    """Whether ``run_dir`` finished training but has no ``summary.json`` (e.g. killed while evaluating)."""
    state = run_dir / runs.STATE_FILE
    if not state.is_file() or (run_dir / runs.SUMMARY_FILE).exists():
        return False
    try:
        return bool(runs.load_training_state(state).get("finished"))
    except (OSError, ValueError, RuntimeError):
        return False  # train_run reports an unreadable state


def run(args: argparse.Namespace) -> int:
    """Entry point of ``snapens train`` (one process, or every process of a torchrun job)."""
    if args.list_presets:
        _print_presets()
        return 0
    if args.list_models:
        from snapens.models import list_models, model_forms

        print("\n".join(model_forms()))
        print("examples: " + ", ".join(list_models()))
        return 0
    ctx = launch_context()
    configure_logging(args.quiet, rank=ctx.rank)
    cfg = _resume_config(args) if args.resume else config_from_args(args)
    sync_bn = _sync_bn(args)
    evaluate = _evaluate_setting(args)
    progress = progress_enabled(args.quiet) and ctx.is_main
    device = process_device(cfg.device, ctx)
    with contextlib.ExitStack() as owned:
        with distributed_session(ctx, device):
            # Under torchrun the default folder is named after rank 0's clock, on every rank.
            run_dir = broadcast_object(args.run_dir or default_run_dir(cfg.dataset, cfg.model))
            with all_ranks_agree():
                if run_dir.exists() and not run_dir.is_dir():
                    raise CLIError(f"--run-dir {run_dir} is a file, not a folder")
                if ctx.is_main:  # rank 0 writes the folder, so it alone owns it, until evaluation and plots end
                    owned.enter_context(run_lock(run_dir, create=True))
                only_evaluate = args.resume and evaluate and _trained_not_evaluated(run_dir)
            only_evaluate = broadcast_object(only_evaluate)
            try:
                if only_evaluate:
                    if ctx.is_main:
                        print(f"{run_dir} finished training but was not evaluated: evaluating it", flush=True)
                else:
                    train_run(cfg, run_dir, resume=args.resume, progress=progress,
                              announce=lambda s: print(s, flush=True), dist_ctx=ctx, sync_bn=sync_bn,
                              evaluate=evaluate)
            except engine.TrainingInterrupted as exc:
                if ctx.is_main:
                    name = signal.Signals(exc.signum).name
                    again = "torchrun --nproc_per_node=N -m " if ctx.enabled else ""
                    print(f"snapens: {name}: training state saved to {exc.state_path}; continue with: "
                          f"{again}snapens train --resume --run-dir {run_dir}", file=sys.stderr)
                return 128 + exc.signum
            except engine.NonFiniteLossError as exc:
                if not ctx.is_main:
                    return 2  # the same error on every rank: rank 0 reports it
                raise CLIError(str(exc)) from exc
        if not ctx.is_main:
            return 0
        if evaluate:
            from snapens.cli.evaluate import evaluate_run
            from snapens.report import format_summary

            _remove_stale_temp_files(run_dir)
            summary = evaluate_run(run_dir, device=str(device), progress=progress)
            print(format_summary(summary))
            _plot_if_possible(run_dir, device)
        print(f"run dir: {run_dir}")
    return 0
